//! The optional TOML file under `serve`'s flags, and `--print-config`.
//!
//! The file's keys are `serve`'s long flag names (`nats-url`, `subject`,
//! `ttl`, ...), so every flag can live in the file and nothing needs a
//! second spelling. Precedence is flag > `IDEMQ_*` variable > file >
//! default: a file value is used only where clap says the value came from
//! its default (or nowhere). The file is merged by handing its values to
//! clap as extra arguments, so one parser (and its validation) serves
//! flags, variables and the file alike.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};

/// Flags that make no sense inside the file.
const NOT_IN_FILE: &[&str] = &["config", "print-config", "help", "version"];

/// The file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config file {path} is not valid TOML: {error}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        error: Box<toml::de::Error>,
    },
    /// Keys or values the command does not accept: one line per problem.
    #[error("config file {path}:\n  {}", problems.join("\n  "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<String>,
    },
}

/// A loaded config file: its keys, as `serve`'s long flag names.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    path: PathBuf,
    table: toml::Table,
}

impl ConfigFile {
    /// Reads and parses the file.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigFileError::Read {
            path: path.to_owned(),
            error,
        })?;
        let table = text
            .parse::<toml::Table>()
            .map_err(|error| ConfigFileError::Syntax {
                path: path.to_owned(),
                error: Box::new(error),
            })?;
        Ok(ConfigFile {
            path: path.to_owned(),
            table,
        })
    }

    /// The file's values as extra command-line arguments for `command`,
    /// leaving out every key already set by a flag or a variable in
    /// `matches`. Every key and value is checked against the flag it names
    /// (its value parser), and every problem is reported, not just the first.
    pub fn as_args(
        &self,
        command: &Command,
        matches: &ArgMatches,
    ) -> Result<FileArgs, ConfigFileError> {
        let mut args = FileArgs::default();
        let mut problems = Vec::new();
        for (key, value) in &self.table {
            let Some(arg) = command
                .get_arguments()
                .find(|arg| arg.get_long() == Some(key.as_str()))
                .filter(|_| !NOT_IN_FILE.contains(&key.as_str()))
            else {
                problems.push(format!(
                    "unknown key {key:?} (keys are the long flag names of `idemq serve`, \
                     e.g. nats-url)"
                ));
                continue;
            };
            let id = arg.get_id().as_str();
            if matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                continue;
            }
            let flag = matches!(arg.get_action(), ArgAction::SetTrue);
            let items = match value {
                toml::Value::Array(items) => {
                    if !matches!(arg.get_action(), ArgAction::Append) {
                        problems.push(format!("{key}: takes one value, not a list"));
                        continue;
                    }
                    items.iter().collect()
                }
                single => vec![single],
            };
            for item in items {
                match (flag, item) {
                    (true, toml::Value::Boolean(true)) => args.push(key, format!("--{key}")),
                    (true, toml::Value::Boolean(false)) => {}
                    (true, other) => {
                        problems.push(format!("{key}: expected true or false, found {other}"));
                    }
                    (false, toml::Value::Table(_) | toml::Value::Array(_)) => {
                        problems.push(format!("{key}: expected a plain value"));
                    }
                    (false, scalar) => {
                        let text = match scalar {
                            toml::Value::String(text) => text.clone(),
                            other => other.to_string(),
                        };
                        // Each value is parsed alone by the command, so a
                        // bad one is reported against its key; relations
                        // between flags are left to the merged parse.
                        let arg = format!("--{key}={text}");
                        let alone = command
                            .clone()
                            .try_get_matches_from([command.get_name(), arg.as_str()]);
                        match alone {
                            Err(error)
                                if matches!(
                                    error.kind(),
                                    ErrorKind::InvalidValue | ErrorKind::ValueValidation
                                ) =>
                            {
                                problems.push(format!(
                                    "{key}: {}",
                                    first_line(&error.to_string()).trim_start_matches("error: ")
                                ));
                            }
                            _ => args.push(key, arg),
                        }
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(args)
        } else {
            Err(ConfigFileError::Invalid {
                path: self.path.clone(),
                problems,
            })
        }
    }
}

/// What a file adds to the command line.
#[derive(Debug, Clone, Default)]
pub struct FileArgs {
    /// The extra arguments.
    pub args: Vec<OsString>,
    /// The keys they came from.
    pub keys: Vec<String>,
}

impl FileArgs {
    fn push(&mut self, key: &str, arg: String) {
        self.args.push(arg.into());
        if !self.keys.iter().any(|k| k == key) {
            self.keys.push(key.to_owned());
        }
    }
}

/// A value as TOML: integers as integers, everything else as a string
/// (the file's loader accepts either).
fn scalar(text: &str) -> toml::Value {
    match text.parse::<i64>() {
        Ok(number) => toml::Value::Integer(number),
        Err(_) => toml::Value::String(text.to_owned()),
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// The effective configuration of `command` as a TOML document that
/// `--config` reads back: one line per flag, a comment saying where each
/// value came from, secrets (flags that hide their env values) masked, unset options
/// commented out.
/// `from_file` names the keys the file supplied (clap saw them as
/// arguments); `resolved` supplies values computed outside clap (the
/// `NATS_URL` fallback), as `(flag, value, source)`.
pub fn render(
    command: &Command,
    matches: &ArgMatches,
    from_file: &[String],
    resolved: &[(&str, String, &str)],
) -> String {
    let mut out = String::from("# idemq serve: effective configuration\n");
    // clap refuses two arguments with one long name: each key comes once.
    for arg in command.get_arguments() {
        let Some(key) = arg.get_long() else { continue };
        if NOT_IN_FILE.contains(&key) {
            continue;
        }
        let id = arg.get_id().as_str();
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) if from_file.iter().any(|k| k == key) => "file",
            Some(ValueSource::CommandLine) => "flag",
            Some(ValueSource::EnvVariable) => "env",
            Some(ValueSource::DefaultValue) => "default",
            _ => "",
        };
        let raw: Vec<String> = matches
            .get_raw(id)
            .map(|values| values.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let (values, source) = match resolved.iter().find(|(flag, ..)| *flag == key) {
            Some((_, value, source)) if raw.is_empty() => (vec![value.clone()], *source),
            _ => (raw, source),
        };
        // A flag whose environment value clap hides (`hide_env_values`,
        // set on `--token` and `--password`) is a secret here too.
        let secret = arg.is_hide_env_values_set();
        // A server URL with credentials in it: shown masked, commented out.
        let masked: Vec<String> = values.iter().map(|v| crate::nats::mask_url(v)).collect();
        let url_credentials = masked != values;
        // Writing to a String cannot fail.
        let _ = match values.as_slice() {
            [] => writeln!(out, "# {key} =   (unset)"),
            _ if url_credentials => writeln!(
                out,
                "# {key} = {}  # {source}, credentials masked",
                scalar(&masked.join(","))
            ),
            // Commented out, so the printed file never carries a fake secret.
            _ if secret => writeln!(out, "# {key} = \"********\"  # {source}, masked"),
            _ if matches!(arg.get_action(), ArgAction::SetTrue) => {
                writeln!(out, "{key} = {}  # {source}", values[0] == "true")
            }
            [one] if !matches!(arg.get_action(), ArgAction::Append) => {
                writeln!(out, "{key} = {}  # {source}", scalar(one))
            }
            many => {
                let items: Vec<toml::Value> =
                    many.iter().cloned().map(toml::Value::String).collect();
                writeln!(out, "{key} = {}  # {source}", toml::Value::Array(items))
            }
        };
    }
    out
}

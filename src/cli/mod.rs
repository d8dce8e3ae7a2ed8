//! The `idemq` command line: `serve`, `send`, `key`, `get`, `stats`,
//! `purge`, `healthcheck`, one file per command.
//!
//! Flags and their `IDEMQ_*` environment variables are declared here and
//! in the command files, and nowhere else; their defaults are the library's
//! (`WorkerConfig::default()`, held to them by a test). `serve --config
//! FILE` adds a TOML layer under them (`config_file.rs`). `main.rs`
//! only calls [`parse_from`] and [`run`]. The library returns typed errors;
//! [`CliError`] maps them to exit statuses, and this module renders.

mod admin;
mod key;
mod send;
mod serve;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use async_nats::Client;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config_file::{self, ConfigFile};
use crate::nats::{ConnectError, NatsArgs};
use crate::server::ServeError;

pub use admin::{BucketArgs, GetArgs, HealthcheckArgs, PurgeArgs, StatsArgs};
pub use key::KeyArgs;
pub use send::SendArgs;
pub use serve::ServeArgs;

/// idemq: execute each NATS intent once per idempotency key, answer every copy alike.
#[derive(Debug, Parser)]
#[command(name = "idemq", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format: `pretty` for people, `json` for log collectors (filter with RUST_LOG).
    #[arg(long, global = true, env = "IDEMQ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
}

/// How log lines are written (to standard error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    Pretty,
    /// One JSON object per line, with the current span's fields.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a worker on the intent subjects.
    Serve(Box<ServeArgs>),
    /// Send one intent and print the reply.
    Send(SendArgs),
    /// Print the idempotency key of some inputs.
    Key(KeyArgs),
    /// Print the record stored under a key (exit status 1 when absent).
    Get(GetArgs),
    /// Show the bucket and every running worker's counters.
    Stats(StatsArgs),
    /// Remove a stored outcome so the next copy of its intent executes again.
    Purge(PurgeArgs),
    /// Exit 0 if a worker's /healthz (or /readyz) answers 200: for container health checks.
    Healthcheck(HealthcheckArgs),
}

/// A failure of a subcommand, with the exit status it maps to
/// ([`CliError::exit_code`], the one place that mapping lives).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line did not parse, or asked for help or the version:
    /// clap prints it and picks the exit status.
    #[error("{0}")]
    Clap(#[from] clap::Error),
    /// A usage or configuration error: exit status 2.
    #[error("{0}")]
    Usage(String),
    /// Connecting failed: exit status 2 for unusable authentication flags, else 1.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// `serve` did not start or stopped with an error: exit status 2 for a
    /// configuration or address problem, else 1.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The server refused a permission `serve` needs: exit status 1.
    #[error(
        "the NATS server refused a permission idemq needs ({0}); \
         deploy/nats-auth/ lists what the worker's user must be allowed"
    )]
    Refused(async_nats::ServerError),
    /// `get`, `stats` or `purge` failed: exit status 1.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// `send` got no reply: exit status 1.
    #[error("{0}")]
    NoReply(String),
    /// `healthcheck`: the worker did not answer 200: exit status 1.
    #[error("{0}")]
    Unhealthy(String),
    /// The output could not be written: exit status 1.
    #[error("cannot print: {0}")]
    Output(String),
}

impl CliError {
    /// The process exit status.
    pub fn exit_code(&self) -> ExitCode {
        let usage = match self {
            CliError::Clap(error) => {
                return ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2))
            }
            CliError::Usage(_) => true,
            CliError::Connect(error) => matches!(error, ConnectError::Auth(_)),
            CliError::Serve(error) => {
                matches!(error, ServeError::Config(_) | ServeError::Bind { .. })
            }
            CliError::Refused(_)
            | CliError::Admin(_)
            | CliError::NoReply(_)
            | CliError::Unhealthy(_)
            | CliError::Output(_) => false,
        };
        ExitCode::from(if usage { 2 } else { 1 })
    }
}

/// Parses a command line (the program name first). For `serve --config
/// FILE`, the file's settings are merged under flags and variables (see
/// `config_file.rs`), and `--print-config` gets its text.
pub fn parse_from<I, T>(args: I) -> Result<Cli, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut argv: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut command = Cli::command();
    command.build();
    let mut matches = command.clone().try_get_matches_from(&argv)?;
    let mut from_file = Vec::new();
    if let Some(("serve", serve)) = matches.subcommand() {
        if let Some(path) = serve.get_one::<PathBuf>("config") {
            let file = ConfigFile::load(path).map_err(|e| CliError::Usage(e.to_string()))?;
            let serve_command = serve_command(&command)?;
            let extra = file
                .as_args(serve_command, serve)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            argv.extend(extra.args);
            from_file = extra.keys;
            matches = command.clone().try_get_matches_from(&argv)?;
        }
    }
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let (Command::Serve(args), Some(("serve", serve))) = (&mut cli.command, matches.subcommand())
    {
        if args.print_config {
            let (url, source) = args.nats.url_with_source();
            let resolved = [("nats-url", url, source)];
            args.effective_config = Some(config_file::render(
                serve_command(&command)?,
                serve,
                &from_file,
                &resolved,
            ));
        }
    }
    Ok(cli)
}

fn serve_command(command: &clap::Command) -> Result<&clap::Command, CliError> {
    command
        .find_subcommand("serve")
        .ok_or_else(|| CliError::Usage("the serve subcommand is missing".to_owned()))
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Serve(args) => serve::run(*args).await,
        Command::Send(args) => send::run(args).await,
        Command::Key(args) => key::run(&args),
        Command::Get(args) => admin::get(args).await,
        Command::Stats(args) => admin::stats(&args).await,
        Command::Purge(args) => admin::purge(&args).await,
        Command::Healthcheck(args) => admin::healthcheck(args).await,
    }
}

/// Connects as `idemq` (see [`crate::nats::connect`]).
pub async fn connect(nats: &NatsArgs) -> Result<Client, CliError> {
    Ok(crate::nats::connect(nats, "idemq").await?)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::admin::AdminError;
    use crate::auth::AuthError;
    use crate::store::StoreError;

    /// Usage and configuration problems exit 2, everything else 1, decided
    /// by the error's kind alone.
    #[test]
    fn exit_statuses_follow_the_error_kind() {
        let status = |error: CliError| format!("{:?}", error.exit_code());
        let (two, one) = (
            format!("{:?}", ExitCode::from(2)),
            format!("{:?}", ExitCode::from(1)),
        );
        for usage in [
            CliError::Usage("bad flag".into()),
            CliError::Connect(ConnectError::Auth(AuthError::MixedUrlCredentials)),
            CliError::Serve(ServeError::Config(Vec::new())),
            CliError::Serve(ServeError::Bind {
                addr: ([127, 0, 0, 1], 9464).into(),
                source: std::io::Error::other("taken"),
            }),
        ] {
            assert_eq!(status(usage), two);
        }
        for failure in [
            CliError::Serve(ServeError::Store(StoreError::Setup("old".into()))),
            CliError::Serve(ServeError::StoppedEarly),
            CliError::Admin(AdminError::Workers("down".into())),
            CliError::NoReply("gave up".into()),
            CliError::Unhealthy("503".into()),
            CliError::Output("closed".into()),
        ] {
            assert_eq!(status(failure), one);
        }
    }

    /// The contract: every flag can also come from the environment as
    /// `IDEMQ_<FLAG>` (`NATS_URL` is an extra fallback of `--nats-url`).
    #[test]
    fn every_flag_reads_its_idemq_variable() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for command in std::iter::once(&cli).chain(cli.get_subcommands()) {
            for arg in command.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if matches!(long, "help" | "version") {
                    continue;
                }
                let wanted = format!("IDEMQ_{}", long.to_uppercase().replace('-', "_"));
                if arg.get_env().and_then(|v| v.to_str()) != Some(wanted.as_str()) {
                    missing.push(format!("{} --{long} (wants {wanted})", command.get_name()));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "flags without their variable:\n{}",
            missing.join("\n")
        );
    }
}

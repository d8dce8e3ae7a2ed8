//! NATS authentication: one set of flags for every subcommand that connects.
//!
//! Every way a nats-server can authenticate a client is here: a token, a
//! user and password, an nkey seed file, a credentials (`.creds`) file for
//! operator/JWT mode, and TLS with a CA and a client certificate. The flags
//! are [`AuthArgs`]; [`AuthArgs::apply`] checks them and sets them on
//! `async_nats::ConnectOptions`.
//!
//! Files are read and parsed here, before anything connects: async-nats
//! would only read them during the handshake, so a typo in a path would look
//! like a refused connection (exit status 1) instead of the usage error it
//! is (exit status 2, naming the flag and the file).

use std::fmt;
use std::path::{Path, PathBuf};

use async_nats::ConnectOptions;
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// How idemq authenticates to NATS (`--token`, `--user`/`--password`,
/// `--nkey`, `--creds`) and how it secures the connection (`--tls-*`).
///
/// At most one identity method may be given. TLS options combine with any
/// of them (a client certificate can be the identity on its own when the
/// server maps certificates to users).
#[derive(Clone, Default, Args)]
pub struct AuthArgs {
    /// Authenticate with this token
    #[arg(long, env = "IDEMQ_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Authenticate as this user (with --password)
    #[arg(long, env = "IDEMQ_USER")]
    pub user: Option<String>,
    /// The password of --user
    #[arg(long, env = "IDEMQ_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Authenticate with the nkey user seed (SU...) held in this file
    #[arg(long, env = "IDEMQ_NKEY", value_name = "FILE")]
    pub nkey: Option<PathBuf>,
    /// Authenticate with this NATS credentials file (user JWT and seed)
    #[arg(long, env = "IDEMQ_CREDS", value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// Trust the server certificates signed by the CA(s) in this PEM file (implies TLS)
    #[arg(long, env = "IDEMQ_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Present this client certificate (PEM, with --tls-key; implies TLS)
    #[arg(long, env = "IDEMQ_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, env = "IDEMQ_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Refuse to connect without TLS
    #[arg(
        long,
        env = "IDEMQ_TLS_REQUIRED",
        action = ArgAction::SetTrue,
        value_parser = BoolishValueParser::new()
    )]
    pub tls_required: bool,
}

/// Secrets never reach logs or `{:?}` output.
impl fmt::Debug for AuthArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = |value: &Option<String>| value.as_ref().map(|_| "***");
        f.debug_struct("AuthArgs")
            .field("token", &secret(&self.token))
            .field("user", &self.user)
            .field("password", &secret(&self.password))
            .field("nkey", &self.nkey)
            .field("creds", &self.creds)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

/// Why the authentication flags cannot be used: a usage error (exit status 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Two identity methods were given; the server accepts one.
    #[error("{first} and {second} are two ways to authenticate; give one")]
    Conflicting {
        /// The first flag.
        first: &'static str,
        /// The second flag.
        second: &'static str,
    },
    /// A flag that needs a partner was given alone.
    #[error("{flag} needs {needs}")]
    Incomplete {
        /// The flag given.
        flag: &'static str,
        /// The flag it needs.
        needs: &'static str,
    },
    /// A file named by a flag cannot be read.
    #[error("{flag} {}: cannot read the file: {reason}", path.display())]
    Unreadable {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// The servers of one `--nats-url` list carry different credentials.
    #[error("the --nats-url entries carry different credentials; give them once")]
    MixedUrlCredentials,
    /// A `--nats-url` entry is not a URL (shown with its credentials masked).
    #[error("--nats-url {url}: not a server URL ({reason})")]
    BadUrl {
        /// The entry, masked.
        url: String,
        /// Why.
        reason: String,
    },
    /// A file named by a flag does not hold what the flag needs.
    #[error("{flag} {}: {reason}", path.display())]
    Invalid {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl AuthArgs {
    /// Whether any TLS file was given: TLS is then required, so a server
    /// that offers no TLS cannot silently receive credentials in the clear.
    pub fn wants_tls(&self) -> bool {
        self.tls_required
            || self.tls_ca.is_some()
            || self.tls_cert.is_some()
            || self.tls_key.is_some()
    }

    /// Checks the flags and sets them on `options`. Every file is read and
    /// parsed now; nothing connects.
    pub fn apply(&self, options: ConnectOptions) -> Result<ConnectOptions, AuthError> {
        self.apply_with(options, None)
    }

    /// [`apply`](Self::apply), with the credentials a `--nats-url` carried
    /// ([`split_url_credentials`](crate::nats::split_url_credentials)): one more identity method, under the
    /// same rule of at most one.
    pub fn apply_with(
        &self,
        mut options: ConnectOptions,
        from_url: Option<&UrlCredentials>,
    ) -> Result<ConnectOptions, AuthError> {
        self.check_combination()?;
        if let Some(from_url) = from_url {
            let flag = [
                ("--token", self.token.is_some()),
                ("--user", self.user.is_some()),
                ("--nkey", self.nkey.is_some()),
                ("--creds", self.creds.is_some()),
            ]
            .into_iter()
            .find_map(|(flag, given)| given.then_some(flag));
            if let Some(flag) = flag {
                return Err(AuthError::Conflicting {
                    first: "credentials in --nats-url",
                    second: flag,
                });
            }
            options = match from_url {
                UrlCredentials::UserPassword { user, password } => {
                    options.user_and_password(user.clone(), password.clone())
                }
                UrlCredentials::Token(token) => options.token(token.clone()),
            };
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(path) = &self.nkey {
            options = options.nkey(read_user_seed(path)?);
        }
        if let Some(path) = &self.creds {
            let text = read_text("--creds", path)?;
            options = options.credentials(&text).map_err(|e| AuthError::Invalid {
                flag: "--creds",
                path: path.clone(),
                reason: format!("not a NATS credentials file ({e})"),
            })?;
        }
        if let Some(path) = &self.tls_ca {
            check_certificates("--tls-ca", path)?;
            options = options.add_root_certificates(path.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            check_certificates("--tls-cert", cert)?;
            check_private_key(key)?;
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.wants_tls() {
            options = options.require_tls(true);
        }
        Ok(options)
    }

    /// At most one identity method; partners come in pairs.
    fn check_combination(&self) -> Result<(), AuthError> {
        let methods: Vec<&'static str> = [
            ("--token", self.token.is_some()),
            ("--user", self.user.is_some()),
            ("--nkey", self.nkey.is_some()),
            ("--creds", self.creds.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect();
        if let [first, second, ..] = methods[..] {
            return Err(AuthError::Conflicting { first, second });
        }
        let pairs = [
            (
                "--user",
                self.user.is_some(),
                "--password",
                self.password.is_some(),
            ),
            (
                "--tls-cert",
                self.tls_cert.is_some(),
                "--tls-key",
                self.tls_key.is_some(),
            ),
        ];
        for (a, has_a, b, has_b) in pairs {
            match (has_a, has_b) {
                (true, false) => return Err(AuthError::Incomplete { flag: a, needs: b }),
                (false, true) => return Err(AuthError::Incomplete { flag: b, needs: a }),
                _ => {}
            }
        }
        Ok(())
    }
}

fn read_bytes(flag: &'static str, path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|e| AuthError::Unreadable {
        flag,
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn read_text(flag: &'static str, path: &Path) -> Result<String, AuthError> {
    String::from_utf8(read_bytes(flag, path)?).map_err(|_| AuthError::Invalid {
        flag,
        path: path.to_owned(),
        reason: "not UTF-8 text".to_owned(),
    })
}

/// The nkey user seed in `path`: its first line starting with `SU` (the
/// file `nk -gen user` writes, or a seed among comments), checked to be a
/// valid user seed.
fn read_user_seed(path: &Path) -> Result<String, AuthError> {
    let invalid = |reason: &str| AuthError::Invalid {
        flag: "--nkey",
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let text = read_text("--nkey", path)?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("SU"))
        .ok_or_else(|| invalid("no nkey user seed (a line starting with SU) in the file"))?;
    nkeys::KeyPair::from_seed(seed).map_err(|_| invalid("not a valid nkey user seed"))?;
    Ok(seed.to_owned())
}

/// At least one PEM certificate, and nothing unparsable.
fn check_certificates(flag: &'static str, path: &Path) -> Result<(), AuthError> {
    let pem = read_bytes(flag, path)?;
    let invalid = |reason: String| AuthError::Invalid {
        flag,
        path: path.to_owned(),
        reason,
    };
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        certificate.map_err(|e| invalid(format!("not a PEM certificate file ({e})")))?;
        count += 1;
    }
    if count == 0 {
        return Err(invalid("no PEM certificate in the file".to_owned()));
    }
    Ok(())
}

/// One PEM private key (PKCS#8, PKCS#1 or SEC1).
fn check_private_key(path: &Path) -> Result<(), AuthError> {
    let pem = read_bytes("--tls-key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| AuthError::Invalid {
        flag: "--tls-key",
        path: path.to_owned(),
        reason: format!("no PEM private key in the file ({e})"),
    })?;
    Ok(())
}

/// Credentials a server URL carried, the way other NATS clients take them:
/// `nats://user:password@host:port` or `nats://token@host:port`.
#[derive(Clone, PartialEq, Eq)]
pub enum UrlCredentials {
    /// `user:password@`.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// `token@`.
    Token(String),
}

impl fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlCredentials::UserPassword { user, .. } => write!(f, "{user}:***"),
            UrlCredentials::Token(_) => f.write_str("***"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        auth: AuthArgs,
    }

    fn parse(args: &[&str]) -> AuthArgs {
        Cli::try_parse_from(std::iter::once("idemq").chain(args.iter().copied()))
            .expect("parses")
            .auth
    }

    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    }

    fn error(args: &[&str]) -> AuthError {
        parse(args)
            .apply(ConnectOptions::new())
            .expect_err("refused")
    }

    #[test]
    fn two_identity_methods_conflict() {
        assert_eq!(
            error(&["--token", "t", "--creds", "x.creds"]),
            AuthError::Conflicting {
                first: "--token",
                second: "--creds"
            }
        );
        assert!(matches!(
            error(&["--user", "u", "--password", "p", "--nkey", "seed"]),
            AuthError::Conflicting { .. }
        ));
    }

    #[test]
    fn partners_come_in_pairs() {
        assert_eq!(
            error(&["--user", "u"]),
            AuthError::Incomplete {
                flag: "--user",
                needs: "--password"
            }
        );
        assert_eq!(
            error(&["--password", "p"]),
            AuthError::Incomplete {
                flag: "--password",
                needs: "--user"
            }
        );
        assert_eq!(
            error(&["--tls-cert", "c.pem"]),
            AuthError::Incomplete {
                flag: "--tls-cert",
                needs: "--tls-key"
            }
        );
    }

    #[test]
    fn a_missing_file_names_the_flag_and_the_file() {
        let problem = error(&["--nkey", "/nonexistent/user.nk"]);
        assert!(matches!(
            problem,
            AuthError::Unreadable { flag: "--nkey", .. }
        ));
        let text = problem.to_string();
        assert!(text.contains("--nkey /nonexistent/user.nk"), "{text}");
    }

    #[test]
    fn files_without_what_the_flag_needs_are_invalid() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let junk = file(&dir, "junk", "hello\n");
        let bad_seed = file(&dir, "bad.nk", "SUNOTASEED\n");
        for (flag, path) in [
            ("--nkey", &junk),
            ("--nkey", &bad_seed),
            ("--creds", &junk),
            ("--tls-ca", &junk),
        ] {
            assert!(
                matches!(error(&[flag, path]), AuthError::Invalid { flag: f, .. } if f == flag),
                "{flag} {path}"
            );
        }
        let problem = error(&["--tls-cert", &junk, "--tls-key", &junk]);
        assert!(matches!(
            problem,
            AuthError::Invalid {
                flag: "--tls-cert",
                ..
            }
        ));
    }

    #[test]
    fn a_valid_seed_file_is_accepted() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let seed = nkeys::KeyPair::new_user().seed().expect("seed");
        let path = file(&dir, "user.nk", &format!("# the worker\n{seed}\n"));
        assert!(parse(&["--nkey", &path])
            .apply(ConnectOptions::new())
            .is_ok());
        assert_eq!(read_user_seed(Path::new(&path)), Ok(seed));
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let auth = parse(&["--user", "u", "--password", "hunter2"]);
        let text = format!("{auth:?}");
        assert!(!text.contains("hunter2"), "{text}");
        let auth = parse(&["--token", "s3cret"]);
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    #[test]
    fn tls_files_require_tls() {
        assert!(!AuthArgs::default().wants_tls());
        assert!(parse(&["--tls-required"]).wants_tls());
        assert!(parse(&["--tls-ca", "ca.pem"]).wants_tls());
    }

    #[test]
    fn url_credentials_and_an_auth_flag_are_two_methods() {
        let args = AuthArgs {
            token: Some("t".to_owned()),
            ..AuthArgs::default()
        };
        let from_url = UrlCredentials::Token("u".to_owned());
        assert!(matches!(
            args.apply_with(ConnectOptions::new(), Some(&from_url)),
            Err(AuthError::Conflicting { .. })
        ));
    }
}

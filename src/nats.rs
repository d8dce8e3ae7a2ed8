//! Connecting to NATS: the servers and authentication flags every
//! subcommand shares ([`NatsArgs`]), [`connect`], and telling a permission
//! the server refused from other server errors ([`first_refusal`]).

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::auth::{AuthArgs, AuthError};
use crate::stats::Throttle;

/// The default server, when neither `--nats-url`, `IDEMQ_NATS_URL` nor `NATS_URL` is set.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Bound on establishing a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the NATS servers are and how to authenticate: the flags shared by
/// every subcommand that connects.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated for a cluster [env: IDEMQ_NATS_URL, NATS_URL]
    /// [default: nats://127.0.0.1:4222]
    #[arg(long, env = "IDEMQ_NATS_URL", hide_env = true)]
    pub nats_url: Option<String>,
    /// Prefix of this connection's request inboxes (default `_INBOX`), so a
    /// user can be allowed `_INBOX_<user>.>` instead of every client's
    /// `_INBOX.>`.
    #[arg(long, env = "IDEMQ_INBOX_PREFIX")]
    pub inbox_prefix: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub auth: AuthArgs,
}

impl NatsArgs {
    /// The URL list: the flag, `IDEMQ_NATS_URL`, `NATS_URL`, or the default.
    pub fn url(&self) -> String {
        self.url_with_source().0
    }

    /// The URL list and where it came from, when not from clap itself
    /// (`NATS_URL` or the default); `--print-config` shows it.
    pub fn url_with_source(&self) -> (String, &'static str) {
        if let Some(url) = &self.nats_url {
            return (url.clone(), "flag");
        }
        match std::env::var("NATS_URL").ok().filter(|url| !url.is_empty()) {
            Some(url) => (url, "env NATS_URL"),
            None => (DEFAULT_NATS_URL.to_owned(), "default"),
        }
    }

    /// These servers, without authentication (as embedders and tests start).
    pub fn new(url: impl Into<String>) -> NatsArgs {
        NatsArgs {
            nats_url: Some(url.into()),
            inbox_prefix: None,
            auth: AuthArgs::default(),
        }
    }
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The authentication flags are unusable (a usage error: nothing connected).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// No server could be reached, or the server refused the connection
    /// (`kind` tells which, e.g. `AuthorizationViolation`).
    #[error("cannot connect to NATS at {url}: {reason}")]
    Nats {
        /// The server list tried.
        url: String,
        /// What went wrong, as async-nats classifies it.
        kind: async_nats::ConnectErrorKind,
        /// The client's or the server's reason.
        reason: String,
    },
}

/// How often, at most, messages the client dropped are warned about.
const DROPS_WARNED_EVERY: Duration = Duration::from_secs(10);

/// Connects to the servers of `nats` with its authentication, a bounded
/// timeout and a connection name the server shows. Errors the server
/// reports later (a permission violation, say) are logged, and so are
/// messages the client drops because a subscription's buffer is full.
pub async fn connect(nats: &NatsArgs, name: &str) -> Result<async_nats::Client, ConnectError> {
    connect_reporting(nats, name, None).await
}

/// Like [`connect`], and also hands every error the server reports on the
/// connection to `server_errors` (dropped when the channel is full): `serve`
/// refuses to run with permissions it lacks instead of idling. With
/// Subscriptions keep the client's own buffer (65,536 messages): a
/// worker reads its intent subscriptions at once into its byte-bounded
/// intake, so that buffer only absorbs a scheduling hiccup.
pub async fn connect_reporting(
    nats: &NatsArgs,
    name: &str,
    server_errors: Option<tokio::sync::mpsc::Sender<async_nats::ServerError>>,
) -> Result<async_nats::Client, ConnectError> {
    // Credentials in the URLs become connect options; the client, its
    // logs and our errors see only the servers, and a masked list.
    let given = nats.url();
    let (servers, from_url) = crate::auth::split_url_credentials(&given)?;
    let url = crate::auth::mask_url(&given);
    // Messages the client dropped because a subscription's buffer was full:
    // warned about at most once per period, so a flood cannot flood the log.
    let drops = Arc::new(Throttle::new(DROPS_WARNED_EVERY));
    let options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(CONNECT_TIMEOUT)
        .event_callback(move |event| {
            let server_errors = server_errors.clone();
            let drops = Arc::clone(&drops);
            async move {
                match event {
                    async_nats::Event::ServerError(error) => {
                        tracing::error!(%error, "the NATS server reports an error");
                        if let Some(errors) = server_errors {
                            // Full or closed: the first errors are what matters.
                            let _ = errors.try_send(error);
                        }
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        if let Some(dropped) = drops.count() {
                            tracing::warn!(
                                subscription = sid,
                                dropped,
                                "a subscription's buffer was full: the client dropped messages"
                            );
                        }
                    }
                    _ => {}
                }
            }
        });
    let options = match &nats.inbox_prefix {
        Some(prefix) => options.custom_inbox_prefix(prefix.clone()),
        None => options,
    };
    let options = nats.auth.apply_with(options, from_url.as_ref())?;
    options
        .connect(servers.as_slice())
        .await
        .map_err(|e| ConnectError::Nats {
            url: url.clone(),
            kind: e.kind(),
            reason: e.to_string(),
        })
}

/// What a permission the server refused stops.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A publish: fatal at start-up (the bucket cannot be set up), one
    /// intent's problem afterwards (logged).
    Publish,
    /// A subscription: intents, replies, watches or purge notices would
    /// never arrive, so the worker is useless at any time.
    Subscription,
}

/// The kind of permission violation a server error reports, if it is one.
pub fn refused_kind(error: &async_nats::ServerError) -> Option<Refused> {
    let async_nats::ServerError::Other(text) = error else {
        return None;
    };
    let text = text.to_ascii_lowercase();
    if text.contains("permissions violation for subscription") {
        Some(Refused::Subscription)
    } else if text.contains("permissions violation") {
        Some(Refused::Publish)
    } else {
        None
    }
}

/// The first refusal of at least `kind` that `server_errors` reports
/// (`Publish` takes either); `None` once the connection is gone.
pub async fn first_refusal(
    server_errors: &mut tokio::sync::mpsc::Receiver<async_nats::ServerError>,
    kind: Refused,
) -> Option<async_nats::ServerError> {
    while let Some(error) = server_errors.recv().await {
        match refused_kind(&error) {
            Some(found) if kind == Refused::Publish || found == kind => return Some(error),
            _ => {}
        }
    }
    None
}

//! Connecting to NATS: the servers and authentication flags every
//! subcommand shares ([`NatsArgs`]), [`connect`], and telling a permission
//! the server refused from other server errors ([`first_refusal`]).

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::auth::{AuthArgs, AuthError, UrlCredentials};
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
    /// Prefix of this connection's request inboxes (default `_INBOX`; for
    /// `serve`, `_INBOX.<id>`, inboxes of its own that no reply may target),
    /// so a user can be allowed `_INBOX_<user>.>` instead of every client's
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
    let (servers, from_url) = split_url_credentials(&given)?;
    let url = mask_url(&given);
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

// ---------------------------------------------------------------------------
// Start-up against a cluster that is still electing its leaders

/// How long start-up keeps trying a JetStream call that a cluster could
/// not answer yet (see [`not_ready_yet`]).
pub const STARTUP_PATIENCE: Duration = Duration::from_secs(60);
/// Pause between such tries.
const STARTUP_PAUSE: Duration = Duration::from_millis(500);

/// The JetStream API's answers of a cluster that is not ready yet: no
/// leader for the cluster or the asset, too few peers up for the replicas.
const NOT_READY_CODES: [async_nats::jetstream::ErrorCode; 4] = [
    async_nats::jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE,
    async_nats::jetstream::ErrorCode::CLUSTER_NO_PEERS,
    async_nats::jetstream::ErrorCode::CLUSTER_INCOMPLETE,
    async_nats::jetstream::ErrorCode::CLUSTER_NOT_LEADER,
];

/// Whether a JetStream API call failed in a way that passes once a
/// just-started cluster has its leaders: the request timed out or found no
/// responders, or the API answered that the cluster or the asset has no
/// leader yet or too few peers (10008, 10005, 10004, 10009). Read
/// from the client's typed errors, through their sources.
pub fn not_ready_yet(error: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::context::{
        CreateKeyValueError, CreateKeyValueErrorKind, CreateStreamError, CreateStreamErrorKind,
        GetStreamError, GetStreamErrorKind,
    };
    use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
    let not_ready =
        |api: &async_nats::jetstream::Error| NOT_READY_CODES.contains(&api.error_code());
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(api) = error.downcast_ref::<async_nats::jetstream::Error>() {
            return not_ready(api);
        }
        // Some kinds hold the API's answer rather than have it as a source.
        let api = error
            .downcast_ref::<CreateStreamError>()
            .and_then(|e| match e.kind() {
                CreateStreamErrorKind::JetStream(api) => Some(api),
                _ => None,
            })
            .or_else(|| {
                error
                    .downcast_ref::<GetStreamError>()
                    .and_then(|e| match e.kind() {
                        GetStreamErrorKind::JetStream(api) => Some(api),
                        _ => None,
                    })
            })
            .or_else(|| {
                error
                    .downcast_ref::<ConsumerError>()
                    .and_then(|e| match e.kind() {
                        ConsumerErrorKind::JetStream(api) => Some(api),
                        _ => None,
                    })
            });
        if let Some(api) = api {
            return not_ready(&api);
        }
        let timed_out = error.downcast_ref::<CreateStreamError>().is_some_and(|e| {
            matches!(
                e.kind(),
                CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable
            )
        }) || error
            .downcast_ref::<GetStreamError>()
            .is_some_and(|e| matches!(e.kind(), GetStreamErrorKind::Request))
            || error
                .downcast_ref::<CreateKeyValueError>()
                .is_some_and(|e| matches!(e.kind(), CreateKeyValueErrorKind::TimedOut))
            || error.downcast_ref::<ConsumerError>().is_some_and(|e| {
                matches!(
                    e.kind(),
                    ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request
                )
            })
            || error
                .downcast_ref::<async_nats::RequestError>()
                .is_some_and(|e| {
                    matches!(
                        e.kind(),
                        async_nats::RequestErrorKind::TimedOut
                            | async_nats::RequestErrorKind::NoResponders
                    )
                });
        if timed_out {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Runs a start-up JetStream call until it succeeds, fails for good, or
/// [`STARTUP_PATIENCE`] passes while it keeps failing [`not_ready_yet`]
/// (three workers creating an R3 bucket on a cluster that just started).
pub async fn patiently<T, E, F, Fut>(what: &str, mut call: F) -> Result<T, E>
where
    E: std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + STARTUP_PATIENCE;
    loop {
        match call().await {
            Err(error) if not_ready_yet(&error) && tokio::time::Instant::now() < deadline => {
                tracing::warn!(%error, what, "JetStream is not ready yet; trying again");
                tokio::time::sleep(STARTUP_PAUSE).await;
            }
            done => return done,
        }
    }
}

// ---------------------------------------------------------------------------
// Credentials in `--nats-url` (docs/contract.md v1.1 and v1.2 §7)

/// The entries of a comma-separated `--nats-url` list. A comma ends an
/// entry, except inside its credentials, which may hold any character
/// (`,` and `@` included): an entry goes on across commas as long as an
/// `@` is still to come before the next entry with a scheme
/// (`nats://...`), so its credentials end at the last one. That holds
/// for entries without a scheme too, even one that reads as `host:port`:
/// `admin:2024,pw@h` is one entry, whose password is `2024,pw`. A list of
/// entries without a scheme where one carries credentials may so join
/// entries; they are then masked as one, never shown: write a scheme on
/// each entry of such a list.
fn url_entries(list: &str) -> Vec<&str> {
    let mut entries = Vec::new();
    let mut start = 0;
    let pieces: Vec<(usize, &str)> = list
        .split(',')
        .scan(0, |at, piece| {
            let begins = *at;
            *at += piece.len() + 1;
            Some((begins, piece))
        })
        .collect();
    for (i, (at, _)) in pieces.iter().enumerate().skip(1) {
        let entry = &list[start..at - 1];
        let rest = &pieces[i..];
        let next_is_entry = has_scheme(rest[0].1);
        // Up to the next entry with a scheme: is there an `@` to come?
        let to_come = rest
            .iter()
            .take_while(|(_, piece)| !has_scheme(piece))
            .any(|(_, piece)| piece.contains('@'));
        if next_is_entry || !to_come {
            entries.push(entry);
            start = *at;
        }
    }
    entries.push(&list[start..]);
    entries
        .into_iter()
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .collect()
}

/// Whether `entry` starts with a URL scheme (`nats://`, `tls://`, ...).
fn has_scheme(entry: &str) -> bool {
    let entry = entry.trim_start();
    entry.find("://").is_some_and(|end| {
        let scheme = &entry[..end];
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    })
}

/// What follows an entry's scheme (all of it, without one).
fn after_scheme(entry: &str) -> &str {
    match entry.find("://") {
        Some(end) if has_scheme(entry) => &entry[end + 3..],
        _ => entry,
    }
}

/// Where an entry's credentials are: from just after its `://` (or its
/// start) to the last `@`, whatever lies between.
fn userinfo_span(entry: &str) -> Option<(usize, usize)> {
    let start = entry.len() - after_scheme(entry).len();
    entry[start..].rfind('@').map(|at| (start, start + at))
}

/// Splits a comma-separated `--nats-url` list into the servers to dial,
/// without credentials (the client would otherwise ignore them, or log
/// them), and the credentials they carried, percent-decoded as nats.go
/// does (`pa%2Fss` is `pa/ss`). Every entry that carries credentials must
/// carry the same.
pub fn split_url_credentials(
    list: &str,
) -> Result<(Vec<String>, Option<UrlCredentials>), AuthError> {
    let mut servers = Vec::new();
    let mut found: Option<UrlCredentials> = None;
    for entry in url_entries(list) {
        let Some((start, at)) = userinfo_span(entry) else {
            servers.push(entry.to_owned());
            continue;
        };
        let userinfo = &entry[start..at];
        let decode = |part: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(|text| text.into_owned())
                .map_err(|e| AuthError::BadUrl {
                    url: mask_url(entry),
                    reason: format!("credentials are not UTF-8 once decoded: {e}"),
                })
        };
        let credentials = match userinfo.split_once(':') {
            Some((user, password)) => UrlCredentials::UserPassword {
                user: decode(user)?,
                password: decode(password)?,
            },
            None => UrlCredentials::Token(decode(userinfo)?),
        };
        match &found {
            Some(earlier) if *earlier != credentials => return Err(AuthError::MixedUrlCredentials),
            _ => found = Some(credentials),
        }
        servers.push(format!("{}{}", &entry[..start], &entry[at + 1..]));
    }
    Ok((servers, found))
}

/// A `--nats-url` list as it may be shown: `nats://user:***@host:port`,
/// `nats://***@host:port` for a token: everything between an entry's
/// `://` and its last `@` is masked but the user, whatever it holds. Every
/// log line, error message and `--print-config` shows URLs through this.
pub fn mask_url(list: &str) -> String {
    url_entries(list)
        .into_iter()
        .map(|entry| {
            let Some((start, at)) = userinfo_span(entry) else {
                return entry.to_owned();
            };
            let shown = match entry[start..at].split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_owned(),
            };
            format!("{}{shown}{}", &entry[..start], &entry[at..])
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod startup_tests {
    use async_nats::jetstream::context::{
        CreateKeyValueError, CreateKeyValueErrorKind, CreateStreamError, CreateStreamErrorKind,
    };

    use super::*;

    fn api(err_code: u64) -> async_nats::jetstream::Error {
        serde_json::from_value(serde_json::json!({
            "code": 503, "err_code": err_code, "description": "from the server"
        }))
        .expect("an API error")
    }

    #[test]
    fn a_cluster_not_ready_is_told_from_a_refusal_through_the_error_chain() {
        // As creating a bucket fails on a cluster without a meta leader:
        // the API's answer inside the stream error's kind, that error the
        // bucket error's source.
        let not_ready = CreateKeyValueError::with_source(
            CreateKeyValueErrorKind::JetStream,
            CreateStreamError::new(CreateStreamErrorKind::JetStream(api(10008))),
        );
        assert!(not_ready_yet(&not_ready));
        let timed_out = CreateStreamError::new(CreateStreamErrorKind::TimedOut);
        assert!(not_ready_yet(&timed_out));
        // 10058: stream name already in use with another configuration.
        let refused = CreateKeyValueError::with_source(
            CreateKeyValueErrorKind::JetStream,
            CreateStreamError::new(CreateStreamErrorKind::JetStream(api(10058))),
        );
        assert!(!not_ready_yet(&refused));
    }
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn any_character_in_credentials_stays_in_them_and_is_masked() {
        let list = "nats://u:pa/ss,wo?rd#1+=%zz@h1:4222,nats://h2:4223, tls://t/o,k@h3:1";
        assert_eq!(
            url_entries(list),
            [
                "nats://u:pa/ss,wo?rd#1+=%zz@h1:4222",
                "nats://h2:4223",
                "tls://t/o,k@h3:1"
            ]
        );
        assert_eq!(
            mask_url(list),
            "nats://u:***@h1:4222,nats://h2:4223,tls://***@h3:1"
        );
        // An `@` in the password: the last one ends the credentials.
        let (servers, found) = split_url_credentials("nats://u:p@s,s@h:1").expect("split");
        assert_eq!(servers, ["nats://h:1"]);
        assert_eq!(
            found,
            Some(UrlCredentials::UserPassword {
                user: "u".to_owned(),
                password: "p@s,s".to_owned()
            })
        );
        // Without a scheme, credentials run to the last `@` to come, even
        // across a piece that reads as `host:port`: a password or token
        // with a comma never shows, and entries joined so are masked.
        assert_eq!(
            url_entries("h1:4222,h2:4223,h3"),
            ["h1:4222", "h2:4223", "h3"]
        );
        assert_eq!(url_entries("u:p@h2,h3"), ["u:p@h2", "h3"]);
        assert_eq!(mask_url("admin:2024,pw@h:4222,h2"), "admin:***@h:4222,h2");
        assert_eq!(mask_url("tok,en@h:4222"), "***@h:4222");
        assert_eq!(mask_url("h1:4222,u:p@h2"), "h1:***@h2");
    }

    #[test]
    fn credentials_come_out_of_every_entry_and_are_masked_everywhere() {
        let (servers, found) =
            split_url_credentials("nats://u:p%40ss@h1:4222, nats://u:p%40ss@h2:4223,h3:4224")
                .expect("split");
        assert_eq!(servers, ["nats://h1:4222", "nats://h2:4223", "h3:4224"]);
        assert_eq!(
            found,
            Some(UrlCredentials::UserPassword {
                user: "u".to_owned(),
                password: "p@ss".to_owned()
            })
        );
        let (servers, found) = split_url_credentials("tls://s3cr3t@h:4222").expect("split");
        assert_eq!(servers, ["tls://h:4222"]);
        assert_eq!(found, Some(UrlCredentials::Token("s3cr3t".to_owned())));
        assert_eq!(
            split_url_credentials("nats://a:b@h1,nats://a:c@h2"),
            Err(AuthError::MixedUrlCredentials)
        );
        assert_eq!(
            mask_url("nats://u:secret@h:1,nats://tok@h:2,nats://h:3"),
            "nats://u:***@h:1,nats://***@h:2,nats://h:3"
        );
        assert_eq!(mask_url("u:secret@h:1"), "u:***@h:1");
        assert!(!format!("{:?}", found).contains("s3cr3t"));
    }
}

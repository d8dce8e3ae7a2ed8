//! Where replies (and dead letters) go in JetStream mode: a subject some
//! stream captures gets a JetStream publish, acknowledged before the
//! intent is settled; any other a core publish. Which subjects the
//! account's streams capture is listed, not looked up per reply.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use crate::reply_policy::subject_matches;

/// How long a reply into a stream may take to be acknowledged before the
/// intent is nak'ed instead of acked.
const REPLY_BOUND: Duration = Duration::from_secs(5);
/// Pause between attempts to store a reply in the stream that captures it.
pub(crate) const REPLY_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How often the streams are listed again without an advisory.
const ROUTE_REFRESH: Duration = Duration::from_secs(30);
/// How soon a failed list of the streams is tried again.
const ROUTE_RETRY: Duration = Duration::from_secs(1);
/// How long a starting worker tries to list the streams.
const LIST_BOUND: Duration = Duration::from_secs(30);

/// Which subjects the account's streams capture: listed when the worker
/// starts, listed again when a stream is created, updated or deleted (the
/// server's stream advisories) and every [`ROUTE_REFRESH`] in case an
/// advisory was missed, and matched here. A reply costs no JetStream API
/// call of its own.
pub(crate) struct ReplyRoutes {
    js: async_nats::jetstream::Context,
    /// The streams' subject filters; `None` until a list has succeeded
    /// (a consumer is opened only once one has).
    patterns: RwLock<Option<Arc<[String]>>>,
}

impl ReplyRoutes {
    /// Whether a stream captures `subject`; `None` while no list of the
    /// streams could be read (the reply is then sent as a JetStream
    /// publish, which is safe either way).
    fn captured(&self, subject: &str) -> Option<bool> {
        let patterns = self.read().clone()?;
        Some(
            patterns
                .iter()
                .any(|pattern| subject_matches(pattern, subject)),
        )
    }

    /// Lists the account's streams (`$JS.API.STREAM.LIST`, paged) and
    /// keeps their subjects; false when the list failed (the last one is
    /// kept).
    async fn list(&self) -> bool {
        let listed: Result<Vec<stream::Info>, _> = self.js.streams().try_collect().await;
        match listed {
            Ok(streams) => {
                let patterns: Arc<[String]> = streams
                    .into_iter()
                    .flat_map(|info| info.config.subjects)
                    .collect();
                *self.write() = Some(patterns);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot list the streams that may capture replies");
                false
            }
        }
    }

    /// Keeps the list current until shutdown: the advisories are
    /// subscribed to before listing, so no change falls between the two.
    pub(crate) async fn keep_current(
        &self,
        client: async_nats::Client,
        shutdown: CancellationToken,
    ) {
        let mut changes = Vec::with_capacity(STREAM_CHANGES.len());
        for change in STREAM_CHANGES {
            match client
                .subscribe(format!("$JS.EVENT.ADVISORY.STREAM.{change}.*"))
                .await
            {
                Ok(subscription) => changes.push(subscription),
                Err(error) => tracing::warn!(%error, "cannot watch stream advisories"),
            }
        }
        let mut changes = futures::stream::select_all(changes);
        // At once (the changes are watched now), then every ROUTE_REFRESH;
        // after a failed list, again after ROUTE_RETRY.
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                Some(_) = changes.next() => {}
            }
            wait = if self.list().await {
                ROUTE_REFRESH
            } else {
                ROUTE_RETRY
            };
        }
    }

    /// The routes of `js`'s account, listed once now: tried for up to
    /// [`LIST_BOUND`], since without the list a reply cannot tell a
    /// stream's subject from a plain one.
    pub(crate) async fn open(js: async_nats::jetstream::Context) -> Result<ReplyRoutes, String> {
        let routes = ReplyRoutes {
            js,
            patterns: RwLock::default(),
        };
        let listed = tokio::time::Instant::now() + LIST_BOUND;
        while !routes.list().await {
            if tokio::time::Instant::now() >= listed {
                return Err(format!(
                    "cannot list the streams that may capture replies within {}s",
                    LIST_BOUND.as_secs()
                ));
            }
            tokio::time::sleep(ROUTE_RETRY).await;
        }
        Ok(routes)
    }

    /// Publishes before the intent is settled: when a stream captures
    /// `subject`, a JetStream publish retried (bounded by [`REPLY_BOUND`])
    /// until the stream acknowledges it, through a leader election too, so
    /// the message is kept before the ack. Otherwise a core publish, at
    /// most once like any: the ack that follows goes out on the same
    /// connection after it, so the server routes the reply first. No flush
    /// between them: a flush only hands the bytes to the socket, and a
    /// connection that breaks loses a reply in the socket's buffer as it
    /// loses one in the client's, while the ack may follow on the next
    /// connection; only a round trip per intent would close that, and a
    /// caller without its answer retries and gets it from the store. An
    /// `Err` leaves the intent to be redelivered.
    pub(crate) async fn publish_before_settling(
        &self,
        client: &async_nats::Client,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), String> {
        if self.captured(subject) == Some(false) {
            return client
                .publish_with_headers(Subject::from(subject), headers, payload)
                .await
                .map_err(|e| e.to_string());
        }
        let deadline = tokio::time::Instant::now() + REPLY_BOUND;
        loop {
            let message = PublishMessage::build()
                .headers(headers.clone())
                .payload(payload.clone());
            let acked = match self.js.send_publish(subject.to_owned(), message).await {
                Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            };
            match acked {
                Ok(()) => return Ok(()),
                Err(error) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!(
                        "the stream capturing {subject} did not take it: {error}"
                    ))
                }
                Err(_) => tokio::time::sleep(REPLY_RETRY_PAUSE).await,
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Option<Arc<[String]>>> {
        // Only a cache; a panic while holding it leaves it usable.
        self.patterns
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Option<Arc<[String]>>> {
        self.patterns
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The stream advisories after which the streams are listed again.
const STREAM_CHANGES: [&str; 3] = ["CREATED", "UPDATED", "DELETED"];

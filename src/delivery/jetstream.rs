//! JetStream delivery: a durable pull consumer, acks after the outcome,
//! naks with back-off, dead letters.
//!
//! What changes from core mode is only what happens with a [`Verdict`]:
//!
//! * settled: publish the reply (to `Idem-Reply-To`/`reply_to`; the
//!   message's own reply subject is the ack subject), then ack. The reply
//!   carries `Nats-Msg-Id` = the key and the intent's fingerprint, so a
//!   stream that captures replies keeps one per intent, however many
//!   copies, and another intent under the same key keeps its own.
//! * invalid: answer, dead-letter, terminate.
//! * retry (a transient failure, the key held by another execution): nak
//!   with a growing delay and say nothing; on the last allowed delivery,
//!   answer with the failure, dead-letter with reason `max_deliver`,
//!   terminate.
//! * a delivery past `--max-deliver` (its last delivery's worker died, or
//!   another client took it): dead-lettered without executing. The
//!   consumer redelivers without limit, so no message depends on anyone
//!   hearing the server's max-deliveries advisory (PROTOCOL.md v1.2 §6).
//!
//! Until the message is acked, terminated or nak'ed, progress acks keep it
//! from being redelivered: under a slow handler, and while it is answered
//! and dead-lettered.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::message::{AckKind, PublishMessage};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::DeliveryError;
use crate::codes;
use crate::config::{JetStreamConfig, NAK_DELAY_CAP};
use crate::intake::Intake;
use crate::outcome::Answer;
use crate::pipeline::Pipeline;
use crate::reply_policy::subject_matches;
use crate::stats::Stats;
use crate::verdict::Verdict;

/// Header on dead letters: the error code, or `max_deliver`.
pub const DEAD_REASON_HEADER: &str = "Idem-Dead-Reason";
/// The reason of an intent that ran out of deliveries.
pub const MAX_DELIVER_REASON: &str = "max_deliver";
/// How long a pull waits on the server for the messages it asks for. It
/// ends as soon as it has them all, or after this with what came.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// How long past [`PULL_EXPIRES`] a pull the server has not ended is
/// waited for. The server ends every pull it holds by then, so a pull
/// still open was lost (the server restarted, the connection broke) and
/// the next one is made.
const PULL_GRACE: Duration = Duration::from_secs(1);
/// Pause after a pull that failed (no responders while JetStream comes
/// back, a refused request) before the next one.
const PULL_RETRY_PAUSE: Duration = Duration::from_millis(250);
/// How long a reply may take to be safe before the intent is nak'ed instead of acked.
const REPLY_BOUND: Duration = Duration::from_secs(5);
/// Pause between attempts to store a reply in the stream that captures it.
const REPLY_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How often the streams are listed again without an advisory.
const ROUTE_REFRESH: Duration = Duration::from_secs(30);
/// How soon a failed list of the streams is tried again.
const ROUTE_RETRY: Duration = Duration::from_secs(1);
/// How long a starting worker tries to list the streams.
const LIST_BOUND: Duration = Duration::from_secs(30);

/// Why a delivery could not be settled (it is nak'ed and redelivered).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SettleError(String);

/// Which subjects the account's streams capture: listed when the worker
/// starts, listed again when a stream is created, updated or deleted (the
/// server's stream advisories) and every [`ROUTE_REFRESH`] in case an
/// advisory was missed, and matched here. A reply costs no JetStream API
/// call of its own.
struct ReplyRoutes {
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
    async fn keep_current(&self, client: async_nats::Client, shutdown: CancellationToken) {
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

/// Most messages asked for per pull. A pull asks for no more than the
/// free permits, so never more than the in-flight bound, and at most this,
/// far below what a subscription buffers (the client's 65,536): none is
/// dropped there to be redelivered only after its ack wait.
const MAX_BATCH: usize = 256;

/// The stream and durable consumer one worker takes intents from.
pub(crate) struct Consumer {
    consumer: PullConsumer,
    config: JetStreamConfig,
    routes: ReplyRoutes,
}

impl Consumer {
    /// Opens the stream (creating it over the worker's subjects when
    /// missing) and creates or updates the durable consumer.
    pub(crate) async fn open(
        pipeline: &Pipeline,
        config: &JetStreamConfig,
    ) -> Result<Consumer, DeliveryError> {
        let js = async_nats::jetstream::new(pipeline.client.clone());
        let subjects = pipeline.config.subjects.clone();
        let stream_config = stream::Config {
            name: config.stream.clone(),
            subjects: subjects.clone(),
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        };
        let stream = crate::nats::patiently("open the stream", || {
            js.get_or_create_stream(stream_config.clone())
        })
        .await
        .map_err(|e| DeliveryError::Stream {
            stream: config.stream.clone(),
            reason: e.to_string(),
        })?;
        let (filter_subject, filter_subjects) = match subjects.as_slice() {
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        let consumer_config = pull::Config {
            durable_name: Some(config.durable.clone()),
            description: Some("idemq workers".to_owned()),
            filter_subject,
            filter_subjects,
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            // Unlimited: a delivery past --max-deliver is dead-lettered
            // by the worker that gets it (see `settle`).
            max_deliver: -1,
            backoff: config.backoff.clone(),
            max_ack_pending: i64::from(config.max_ack_pending),
            ..Default::default()
        };
        let consumer = crate::nats::patiently("open the consumer", || {
            stream.create_consumer(consumer_config.clone())
        })
        .await
        .map_err(|e| DeliveryError::Consumer {
            durable: config.durable.clone(),
            reason: e.to_string(),
        })?;
        let routes = ReplyRoutes {
            js,
            patterns: RwLock::default(),
        };
        // Without the list a reply cannot tell a stream's subject from a
        // plain one: a bounded wait for it, then the reason.
        let listed = tokio::time::Instant::now() + LIST_BOUND;
        while !routes.list().await {
            if tokio::time::Instant::now() >= listed {
                return Err(DeliveryError::Stream {
                    stream: config.stream.clone(),
                    reason: format!(
                        "cannot list the streams that may capture replies within {}s",
                        LIST_BOUND.as_secs()
                    ),
                });
            }
            tokio::time::sleep(ROUTE_RETRY).await;
        }
        Ok(Consumer {
            consumer,
            config: config.clone(),
            routes,
        })
    }

    /// Pulls and settles intents until shutdown.
    ///
    /// Each pull asks for exactly as many messages as there are free
    /// permits (at least one, at most [`MAX_BATCH`]) and holds those
    /// permits while it waits, so every message delivered starts at once
    /// with its own: none ages against its ack wait in a local queue, and
    /// the server keeps the rest for other workers. A pull ends once it
    /// has all its messages, or after [`PULL_EXPIRES`] with what came; its
    /// unused permits are then free again. One the server lost
    /// is given up after [`PULL_GRACE`] more, so a worker takes work again
    /// within about two seconds of a reconnect.
    pub(crate) async fn take(self, pipeline: &Arc<Pipeline>, intake: &Intake) {
        let this = Arc::new(self);
        let (routes, client, shutdown) = (
            Arc::clone(&this),
            pipeline.client.clone(),
            intake.shutdown.clone(),
        );
        intake
            .tracker
            .spawn(async move { routes.routes.keep_current(client, shutdown).await });
        while let Some(permits) = intake.free_permits(MAX_BATCH).await {
            if !this.pull(pipeline, intake, permits).await {
                tokio::select! {
                    () = intake.shutdown.cancelled() => {}
                    () = tokio::time::sleep(PULL_RETRY_PAUSE) => {}
                }
            }
        }
        // Stopping here stops pulling; a pull still open on the server
        // delivers to no one, and those messages are redelivered after
        // their ack wait.
    }

    /// One pull of one message per permit in `permits`: each message
    /// delivered is settled in its own task with one of them. False when
    /// the next pull should wait a little: this one failed, or ended at
    /// once with nothing (so a server that keeps answering so cannot make
    /// the worker spin).
    async fn pull(
        self: &Arc<Self>,
        pipeline: &Arc<Pipeline>,
        intake: &Intake,
        mut permits: OwnedSemaphorePermit,
    ) -> bool {
        let pulled = self
            .consumer
            .batch()
            .max_messages(permits.num_permits())
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut messages = match pulled {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "cannot pull from the consumer; retrying");
                return false;
            }
        };
        let sent = tokio::time::Instant::now();
        let lost = tokio::time::sleep_until(sent + PULL_EXPIRES + PULL_GRACE);
        tokio::pin!(lost);
        let mut taken = 0_usize;
        loop {
            let next = tokio::select! {
                biased;
                () = intake.shutdown.cancelled() => return true,
                next = messages.next() => next,
                () = &mut lost => {
                    tracing::warn!("a pull outlived its expiry on the server; pulling anew");
                    return true;
                }
            };
            let message = match next {
                None => return taken > 0 || sent.elapsed() >= PULL_EXPIRES / 2,
                Some(Ok(message)) => message,
                // No responders (the server restarted, or its JetStream is
                // not back yet), a status the pull ends with: the server
                // holds no pull of ours any more.
                Some(Err(error)) => {
                    tracing::warn!(%error, "pull ended early; pulling anew");
                    return false;
                }
            };
            // A pull delivers at most one message per permit; should the
            // server send more, the extra one waits for a permit here
            // (until shutdown, like any other).
            let permit = match permits.split(1) {
                Some(permit) => permit,
                None => match intake.free_permits(1).await {
                    Some(permit) => permit,
                    None => return true,
                },
            };
            taken += 1;
            let (pipeline, this) = (Arc::clone(pipeline), Arc::clone(self));
            let abandon = intake.abandon.clone();
            intake.tracker.spawn(async move {
                let _permit = permit;
                this.settle(&pipeline, message, &abandon).await;
            });
        }
    }

    /// Runs one delivery through the pipeline, then acks, naks or
    /// terminates it; progress acks keep it protected until then, the
    /// answer and the dead letter included.
    async fn settle(
        &self,
        pipeline: &Pipeline,
        message: async_nats::jetstream::Message,
        abandon: &CancellationToken,
    ) {
        let started = std::time::Instant::now();
        let every = self.config.ack_wait / 3;
        let decided = Box::pin(self.decide(pipeline, &message, abandon));
        let kind = while_in_progress(&message, every, decided).await;
        // A reply that could not be published must not be acked away.
        let kind = kind.unwrap_or_else(|error| {
            tracing::warn!(%error, "not settled; the intent will be redelivered");
            AckKind::Nak(Some(REPLY_RETRY_PAUSE))
        });
        if let Err(error) = message.ack_with(kind).await {
            tracing::warn!(%error, "ack failed; the message will be redelivered");
        }
        Stats::observe(&pipeline.stats.intent_seconds, started.elapsed());
    }

    /// What becomes of one delivery: its verdict, answered and
    /// dead-lettered as it says, as the ack to send.
    async fn decide(
        &self,
        pipeline: &Pipeline,
        message: &async_nats::jetstream::Message,
        abandon: &CancellationToken,
    ) -> Result<AckKind, SettleError> {
        let delivered = message.info().map_or(1, |info| info.delivered.max(1));
        if delivered > i64::from(self.config.max_deliver) {
            // Its last allowed delivery never reached a verdict: a worker
            // died holding it, or another client took it.
            pipeline.stats.received.inc();
            self.dead_letter(
                pipeline,
                message.headers.clone(),
                message.payload.clone(),
                MAX_DELIVER_REASON,
            )
            .await?;
            tracing::warn!(reason = MAX_DELIVER_REASON, subject = %message.subject, delivered, "intent dead-lettered");
            return Ok(AckKind::Term);
        }
        let handled = pipeline
            .handle(
                &message.subject,
                None,
                message.headers.as_ref(),
                &message.payload,
                abandon,
            )
            .await;
        let reply_to = handled.reply_to.as_deref();
        let fingerprint = handled.fingerprint;
        match handled.verdict {
            Verdict::Settled(reply) => self
                .answer(pipeline, message, reply_to, fingerprint, &reply)
                .await
                .map(|()| AckKind::Ack),
            Verdict::Invalid(reply) => {
                let reason = reply
                    .error_code()
                    .unwrap_or(codes::INVALID_INTENT)
                    .to_owned();
                self.give_up(pipeline, message, reply_to, fingerprint, &reply, &reason)
                    .await
            }
            Verdict::Retry { .. } if abandon.is_cancelled() => Ok(AckKind::Nak(None)),
            Verdict::Retry { reply, .. } if delivered >= i64::from(self.config.max_deliver) => {
                self.give_up(
                    pipeline,
                    message,
                    reply_to,
                    fingerprint,
                    &reply,
                    MAX_DELIVER_REASON,
                )
                .await
            }
            Verdict::Retry { after, .. } => Ok(AckKind::Nak(Some(nak_delay(after, delivered)))),
        }
    }

    /// Publishes the reply, if the intent named somewhere to send it.
    ///
    /// The ack that follows removes the intent for good, so the reply must
    /// be safe first. When a stream captures the reply subject the reply is
    /// a JetStream publish with a `Nats-Msg-Id`, retried (bounded)
    /// until the stream acknowledges it: through a leader election too, and
    /// the stream keeps each outcome once. Otherwise it is a core publish
    /// that must at least reach the server.
    async fn answer(
        &self,
        pipeline: &Pipeline,
        message: &async_nats::jetstream::Message,
        reply_to: Option<&str>,
        fingerprint: Option<u64>,
        reply: &Answer,
    ) -> Result<(), SettleError> {
        let Some(reply_to) = reply_to else {
            return Ok(());
        };
        let mut headers = reply.headers();
        // One stored outcome per intent in a capturing stream: keyed by the
        // key and the intent's fingerprint, so the copies of an intent (and
        // the redeliveries of one, and retried publishes) land once, while
        // another intent under the same key (KEY_REUSED) keeps its own
        // answer. Any other answer (a refusal, a transient error given up
        // on) is keyed by the message's own sequence: an intent published
        // again later must not find its final outcome taken for a
        // duplicate of that answer (PROTOCOL.md v1.2 §6).
        let msg_id = match (reply.idem_key(), fingerprint) {
            (Some(key), Some(fingerprint)) if reply.is_stored() => {
                Some(format!("{key}.{fingerprint:016x}"))
            }
            _ => message
                .info()
                .ok()
                .map(|info| format!("intent-{}", info.stream_sequence)),
        };
        if let Some(msg_id) = msg_id {
            headers.insert("Nats-Msg-Id", msg_id.as_str());
        }
        self.publish_kept(pipeline, reply_to, headers, reply.to_bytes())
            .await
            .map_err(|error| SettleError(format!("reply to {reply_to}: {error}")))
    }

    /// Publishes so that the message is kept before the intent is settled:
    /// when a stream captures `subject`, a JetStream publish retried
    /// (bounded by [`REPLY_BOUND`]) until the stream acknowledges it,
    /// through a leader election too; otherwise a core publish that must at
    /// least reach the server. Either way an `Err` leaves the intent to be
    /// redelivered.
    async fn publish_kept(
        &self,
        pipeline: &Pipeline,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), SettleError> {
        if self.routes.captured(subject) == Some(false) {
            pipeline
                .client
                .publish_with_headers(Subject::from(subject), headers, payload)
                .await
                .map_err(|e| SettleError(e.to_string()))?;
            return match tokio::time::timeout(REPLY_BOUND, pipeline.client.flush()).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(SettleError(
                    "the message did not reach the server".to_owned(),
                )),
            };
        }
        let deadline = tokio::time::Instant::now() + REPLY_BOUND;
        loop {
            let message = PublishMessage::build()
                .headers(headers.clone())
                .payload(payload.clone());
            let acked = match self
                .routes
                .js
                .send_publish(subject.to_owned(), message)
                .await
            {
                Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            };
            match acked {
                Ok(()) => return Ok(()),
                Err(error) if tokio::time::Instant::now() >= deadline => {
                    return Err(SettleError(format!(
                        "the stream capturing {subject} did not take it: {error}"
                    )))
                }
                Err(_) => tokio::time::sleep(REPLY_RETRY_PAUSE).await,
            }
        }
    }

    /// Answers, dead-letters and returns `Term`.
    async fn give_up(
        &self,
        pipeline: &Pipeline,
        message: &async_nats::jetstream::Message,
        reply_to: Option<&str>,
        fingerprint: Option<u64>,
        reply: &Answer,
        reason: &str,
    ) -> Result<AckKind, SettleError> {
        self.answer(pipeline, message, reply_to, fingerprint, reply)
            .await?;
        self.dead_letter(
            pipeline,
            message.headers.clone(),
            message.payload.clone(),
            reason,
        )
        .await?;
        tracing::warn!(%reason, subject = %message.subject, "intent dead-lettered");
        Ok(AckKind::Term)
    }

    /// Publishes a dead letter so it is kept ([`publish_kept`](Self::publish_kept)):
    /// the intent's payload and headers, plus [`DEAD_REASON_HEADER`].
    /// Headers that would make the dead-letter stream refuse or drop it
    /// (an expected stream or sequence meant for the intent's stream, a
    /// `Nats-Msg-Id` it may have seen) travel renamed as
    /// `Idem-Original-<name>` (PROTOCOL.md v1.1 §6).
    async fn dead_letter(
        &self,
        pipeline: &Pipeline,
        headers: Option<HeaderMap>,
        payload: Bytes,
        reason: &str,
    ) -> Result<(), SettleError> {
        let headers = dead_letter_headers(headers.as_ref(), reason);
        self.publish_kept(pipeline, &self.config.dead_letter_subject, headers, payload)
            .await
            .map_err(|error| SettleError(format!("dead letter: {error}")))?;
        pipeline.stats.dead_lettered.inc();
        Ok(())
    }
}

/// Awaits `work`, sending a progress ack for `message` every `every`
/// meanwhile, so the server does not redeliver it under a slow step.
async fn while_in_progress<T>(
    message: &async_nats::jetstream::Message,
    every: Duration,
    work: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = progress.tick() => {
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(%error, "progress ack failed");
                }
            }
        }
    }
}

/// Prefix of the headers a dead letter carries in place of those its
/// stream would act on.
pub const ORIGINAL_HEADER_PREFIX: &str = "Idem-Original-";

/// A dead letter's headers: the intent's, with `Nats-Expected-*` and
/// `Nats-Msg-Id` renamed (see [`ORIGINAL_HEADER_PREFIX`]), and the reason.
fn dead_letter_headers(original: Option<&HeaderMap>, reason: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in original.into_iter().flat_map(HeaderMap::iter) {
        let name: &str = name.as_ref();
        let acted_on = name
            .get(..13)
            .is_some_and(|head| head.eq_ignore_ascii_case("Nats-Expected"))
            || name.eq_ignore_ascii_case("Nats-Msg-Id");
        for value in values {
            if acted_on {
                headers.append(format!("{ORIGINAL_HEADER_PREFIX}{name}"), value.as_str());
            } else {
                headers.append(name, value.as_str());
            }
        }
    }
    headers.insert(DEAD_REASON_HEADER, reason);
    headers
}

/// The nak delay: the verdict's suggestion, doubled per delivery, capped.
fn nak_delay(after: Duration, delivered: i64) -> Duration {
    let doublings = u32::try_from(delivered.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(16);
    after.saturating_mul(1 << doublings).min(NAK_DELAY_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_carry_acted_on_headers_renamed() {
        let mut original = HeaderMap::new();
        original.insert("Nats-Expected-Stream", "INTENTS");
        original.insert("nats-expected-last-sequence", "7");
        original.insert("Nats-Msg-Id", "m-1");
        original.insert("Idempotency-Key", "k");
        let headers = dead_letter_headers(Some(&original), "INVALID_INTENT");
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(get("Nats-Expected-Stream"), None);
        assert_eq!(get("Nats-Msg-Id"), None);
        assert_eq!(get("nats-expected-last-sequence"), None);
        assert_eq!(
            get("Idem-Original-Nats-Expected-Stream").as_deref(),
            Some("INTENTS")
        );
        assert_eq!(
            get("Idem-Original-nats-expected-last-sequence").as_deref(),
            Some("7")
        );
        assert_eq!(get("Idem-Original-Nats-Msg-Id").as_deref(), Some("m-1"));
        assert_eq!(get("Idempotency-Key").as_deref(), Some("k"));
        assert_eq!(get(DEAD_REASON_HEADER).as_deref(), Some("INVALID_INTENT"));
    }

    #[test]
    fn nak_delay_doubles_and_is_capped() {
        let second = Duration::from_secs(1);
        assert_eq!(nak_delay(second, 1), second);
        assert_eq!(nak_delay(second, 3), Duration::from_secs(4));
        assert_eq!(nak_delay(second, 60), NAK_DELAY_CAP);
    }
}

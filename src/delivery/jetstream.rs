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
//!   hearing the server's max-deliveries advisory (docs/contract.md v1.2 §6).
//!
//! Until the message is acked, terminated or nak'ed, progress acks keep it
//! from being redelivered: under a slow handler, and while it is answered
//! and dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::dead_letter::{self, MAX_DELIVER_REASON};
use super::reply_routes::{ReplyRoutes, REPLY_RETRY_PAUSE};
use super::DeliveryError;
use crate::codes;
use crate::config::{JetStreamConfig, NAK_DELAY_CAP};
use crate::intake::Intake;
use crate::pipeline::{Incoming, Pipeline};
use crate::reply::EncodedReply;
use crate::stats::Stats;
use crate::verdict::Verdict;

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
/// Why a delivery could not be settled (it is nak'ed and redelivered).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SettleError(String);

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
        let routes = ReplyRoutes::open(js)
            .await
            .map_err(|reason| DeliveryError::Stream {
                stream: config.stream.clone(),
                reason,
            })?;
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
        let every = self.config.shortest_ack_wait() / 3;
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
            self.dead_letter(pipeline, message, MAX_DELIVER_REASON)
                .await?;
            tracing::warn!(reason = MAX_DELIVER_REASON, subject = %message.subject, delivered, "intent dead-lettered");
            return Ok(AckKind::Term);
        }
        let incoming = Incoming {
            subject: &message.subject,
            own_reply: None,
            headers: message.headers.as_ref(),
            payload: &message.payload,
        };
        let handled = pipeline.handle(incoming, abandon).await;
        let reply_to = handled.reply_to.as_deref();
        let fingerprint = handled.fingerprint;
        match handled.verdict {
            Verdict::Settled(reply) => self
                .answer(pipeline, message, reply_to, fingerprint, &reply)
                .await
                .map(|()| AckKind::Ack),
            Verdict::Invalid(reply) => {
                let reason = reply
                    .status
                    .code()
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
    /// The ack that follows removes the intent for good. When a stream
    /// captures the reply subject the reply is a JetStream publish with a
    /// `Nats-Msg-Id`, retried (bounded) until the stream acknowledges it:
    /// through a leader election too, and the stream keeps each outcome
    /// once. Otherwise it is a core publish that goes out before the ack
    /// on the same connection ([`ReplyRoutes::publish_before_settling`]).
    async fn answer(
        &self,
        pipeline: &Pipeline,
        message: &async_nats::jetstream::Message,
        reply_to: Option<&str>,
        fingerprint: Option<u64>,
        reply: &EncodedReply,
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
        // on) is keyed by the message's own stream and sequence: an intent
        // published again later must not find its final outcome taken for
        // a duplicate of that answer (docs/contract.md v1.2 §6), and two
        // intent streams replying into one results stream must not take
        // each other's answers for duplicates.
        let msg_id = match (&reply.idem_key, fingerprint) {
            (Some(key), Some(fingerprint)) if reply.stored => {
                Some(format!("{key}.{fingerprint:016x}"))
            }
            _ => message_id("intent", message),
        };
        if let Some(msg_id) = msg_id {
            headers.insert("Nats-Msg-Id", msg_id.as_str());
        }
        self.publish_before_settling(pipeline, reply_to, headers, reply.body.clone())
            .await
            .map_err(|error| SettleError(format!("reply to {reply_to}: {error}")))
    }

    /// Publishes before the intent is settled: acknowledged by a stream
    /// that captures the subject, else a core publish ahead of the
    /// settle (see [`ReplyRoutes::publish_before_settling`]).
    async fn publish_before_settling(
        &self,
        pipeline: &Pipeline,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), SettleError> {
        self.routes
            .publish_before_settling(&pipeline.client, subject, headers, payload)
            .await
            .map_err(SettleError)
    }

    /// Dead-letters the message (see [`dead_letter::send`]).
    async fn dead_letter(
        &self,
        pipeline: &Pipeline,
        message: &async_nats::jetstream::Message,
        reason: &str,
    ) -> Result<(), SettleError> {
        let subject = &self.config.dead_letter_subject;
        let (headers, payload) = (message.headers.as_ref(), message.payload.clone());
        let id = message_id("dead", message);
        dead_letter::send(
            &self.routes,
            pipeline,
            subject,
            headers,
            payload,
            reason,
            id.as_deref(),
        )
        .await
        .map_err(SettleError)
    }

    /// Answers, dead-letters and returns `Term`.
    async fn give_up(
        &self,
        pipeline: &Pipeline,
        message: &async_nats::jetstream::Message,
        reply_to: Option<&str>,
        fingerprint: Option<u64>,
        reply: &EncodedReply,
        reason: &str,
    ) -> Result<AckKind, SettleError> {
        self.answer(pipeline, message, reply_to, fingerprint, reply)
            .await?;
        self.dead_letter(pipeline, message, reason).await?;
        tracing::warn!(%reason, subject = %message.subject, "intent dead-lettered");
        Ok(AckKind::Term)
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

/// A `Nats-Msg-Id` for what the worker publishes about one stream message
/// (`kind`: a reply, a dead letter): `<kind>-<stream>-<sequence>`, the
/// same for every delivery of the message, unique across streams.
fn message_id(kind: &str, message: &async_nats::jetstream::Message) -> Option<String> {
    let info = message.info().ok()?;
    Some(format!("{kind}-{}-{}", info.stream, info.stream_sequence))
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
    fn nak_delay_doubles_and_is_capped() {
        let second = Duration::from_secs(1);
        assert_eq!(nak_delay(second, 1), second);
        assert_eq!(nak_delay(second, 3), Duration::from_secs(4));
        assert_eq!(nak_delay(second, 60), NAK_DELAY_CAP);
    }
}

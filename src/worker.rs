//! The pipeline: decode -> key -> claim -> handle -> complete -> reply.
//!
//! [`Worker::run`] takes messages from queue-group subscriptions and gives
//! each to [`Worker::process`], which is the whole life of one delivery in
//! one function. Intake is bounded by a semaphore: the loop takes a permit
//! *before* it takes the next message, so at the bound it stops reading and
//! nothing queues inside idemq.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{field, Instrument};

use crate::config::WorkerConfig;
use crate::handler::{Call, Handler, HandlerError};
use crate::intent::{Intent, IntentError, Limits};
use crate::outcome::{Outcome, Reply};
use crate::service;
use crate::stats::Stats;
use crate::store::{Acquire, ClaimRequest, IdempotencyStore, Lease, StoreError};

/// Shortest `retry_after_ms` suggested with `IN_PROGRESS`.
const MIN_RETRY_AFTER: Duration = Duration::from_millis(100);
/// How long shutdown waits, after the grace period, for claims to be released.
const RELEASE_BOUND: Duration = Duration::from_secs(5);

/// Why the worker refused to execute an intent. Each variant is one wire
/// error code; [`Rejection::code`] is the only place that mapping lives.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// The intent failed validation.
    #[error(transparent)]
    Invalid(#[from] IntentError),
    /// The key is taken by an intent with another fingerprint.
    #[error("idempotency key already used by a different intent")]
    KeyReused,
    /// Another execution holds the key.
    #[error("another execution holds this key")]
    InProgress {
        /// When to retry.
        retry_after: Duration,
    },
    /// No handler can run the intent now.
    #[error("{0}")]
    NoHandler(String),
    /// The worker is stopping and gave the intent's claim back.
    #[error("the worker is shutting down; retry")]
    ShuttingDown,
    /// The bucket could not be read or written.
    #[error(transparent)]
    StoreUnavailable(#[from] StoreError),
}

impl Rejection {
    /// The wire error code.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Invalid(IntentError::PayloadTooLarge { .. }) => "PAYLOAD_TOO_LARGE",
            Rejection::Invalid(IntentError::InvalidKey(_)) => "INVALID_KEY",
            Rejection::Invalid(_) => "INVALID_INTENT",
            Rejection::KeyReused => "KEY_REUSED",
            Rejection::InProgress { .. } => "IN_PROGRESS",
            Rejection::NoHandler(_) | Rejection::ShuttingDown => "NO_HANDLER",
            Rejection::StoreUnavailable(_) => "STORE_UNAVAILABLE",
        }
    }

    /// The `Error` outcome that carries this rejection.
    pub fn outcome(&self) -> Outcome {
        let retry_after_ms = match self {
            Rejection::InProgress { retry_after } => {
                Some(u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX))
            }
            _ => None,
        };
        Outcome::Error {
            code: self.code().to_owned(),
            message: self.to_string(),
            retry_after_ms,
        }
    }
}

/// Errors that stop the worker before or while it takes intents.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Subscribing or registering with NATS failed.
    #[error("NATS: {0}")]
    Nats(String),
}

/// A worker: one store, one handler, one configuration.
pub struct Worker {
    client: Client,
    store: Arc<dyn IdempotencyStore>,
    handler: Arc<dyn Handler>,
    config: WorkerConfig,
    stats: Arc<Stats>,
    /// Unique per worker process; prefixes claim owner tokens.
    instance: String,
}

/// Everything `process` needs, shared by all in-flight intents.
struct Shared {
    client: Client,
    store: Arc<dyn IdempotencyStore>,
    handler: Arc<dyn Handler>,
    config: WorkerConfig,
    stats: Arc<Stats>,
    instance: String,
}

/// Decrements the in-flight gauge however the task ends.
struct InFlight(Arc<Stats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Worker {
    /// A worker over `store`, executing with `handler`.
    pub fn new(
        client: Client,
        store: Arc<dyn IdempotencyStore>,
        handler: Arc<dyn Handler>,
        config: WorkerConfig,
    ) -> Worker {
        Worker {
            client,
            store,
            handler,
            config,
            stats: Arc::default(),
            instance: nuid::next().to_string(),
        }
    }

    /// The worker's counters (live).
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Takes intents until `shutdown` is cancelled, then shuts down cleanly:
    /// stops intake, lets in-flight intents finish within `grace`, and makes
    /// any still running release their claims (they answer `NO_HANDLER`, so
    /// the caller retries and another worker executes).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        self.config.validate().map_err(|problems| {
            let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
            WorkerError::Config(text.join("; "))
        })?;
        let mut subscriptions = Vec::with_capacity(self.config.subjects.len());
        for subject in &self.config.subjects {
            let subscription = self
                .client
                .queue_subscribe(subject.clone(), self.config.queue_group.clone())
                .await
                .map_err(|e| WorkerError::Nats(format!("subscribe to {subject}: {e}")))?;
            subscriptions.push(subscription);
        }
        let mut intake = futures::stream::select_all(subscriptions);
        let metadata = HashMap::from([
            ("subjects".to_owned(), self.config.subjects.join(",")),
            ("queue_group".to_owned(), self.config.queue_group.clone()),
            ("instance".to_owned(), self.instance.clone()),
        ]);
        let registration = service::register(
            &self.client,
            &self.instance,
            metadata,
            Arc::clone(&self.stats),
        )
        .await
        .map_err(|e| WorkerError::Nats(format!("register service: {e}")))?;

        let grace = self.config.grace;
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let shared = Arc::new(Shared {
            client: self.client.clone(),
            store: self.store,
            handler: self.handler,
            config: self.config,
            stats: self.stats,
            instance: self.instance,
        });
        let tracker = TaskTracker::new();
        let abandon = CancellationToken::new();
        tracker.spawn(registration.serve(shutdown.clone()));
        tracing::info!(subjects = ?shared.config.subjects, "taking intents");

        loop {
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_closed) => break,
                },
            };
            let message = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                message = intake.next() => match message {
                    Some(message) => message,
                    None => break,
                },
            };
            let shared = Arc::clone(&shared);
            let abandon = abandon.clone();
            tracker.spawn(async move { shared.process(message, permit, abandon).await });
        }

        // Stop intake first: unsubscribing lets the queue group route new
        // intents to the other workers while ours finish.
        drop(intake);
        tracker.close();
        tracing::info!(in_flight = tracker.len(), "shutting down");
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                still_running = tracker.len(),
                "grace period over; releasing claims"
            );
            abandon.cancel();
            if tokio::time::timeout(RELEASE_BOUND, tracker.wait())
                .await
                .is_err()
            {
                tracing::error!("some intents did not release their claims in time");
            }
        }
        if tokio::time::timeout(RELEASE_BOUND, shared.client.flush())
            .await
            .is_err()
        {
            tracing::warn!("flushing the last replies timed out");
        }
        Ok(())
    }
}

impl Shared {
    /// The life of one delivery: decode, execute or replay, reply.
    async fn process(
        &self,
        message: Message,
        permit: OwnedSemaphorePermit,
        abandon: CancellationToken,
    ) {
        let _permit = permit;
        Stats::bump(&self.stats.received);
        Stats::bump(&self.stats.in_flight);
        let _in_flight = InFlight(Arc::clone(&self.stats));
        let limits = Limits {
            max_payload: self.config.max_payload,
        };
        let decoded = Intent::decode(
            &message.subject,
            message.headers.as_ref(),
            &message.payload,
            limits,
        );
        let (reply_to, reply) = match decoded {
            Err(invalid) => {
                Stats::bump(&self.stats.invalid);
                tracing::info!(error = %invalid.error, subject = %message.subject, "invalid intent");
                let outcome = Rejection::Invalid(invalid.error).outcome();
                let reply = Reply::unstored(invalid.idem_key, invalid.intent_id, outcome);
                (
                    message.reply.map(|s| s.to_string()).or(invalid.reply_to),
                    reply,
                )
            }
            Ok(intent) => {
                let span = tracing::info_span!(
                    "intent",
                    idem_key = %intent.key,
                    intent_id = %intent.intent_id,
                    capability = %intent.capability,
                    status = field::Empty,
                    replayed = field::Empty,
                );
                let reply = self
                    .execute(&intent, &message.payload, &abandon)
                    .instrument(span.clone())
                    .await;
                span.record("status", reply.result.status());
                span.record("replayed", reply.replayed);
                let reply_to = message.reply.map(|s| s.to_string()).or(intent.reply_to);
                (reply_to, reply)
            }
        };
        let Some(reply_to) = reply_to else {
            tracing::debug!("intent has nowhere to reply to");
            return;
        };
        if let Err(error) = self
            .client
            .publish_with_headers(reply_to, reply.headers(), reply.to_bytes())
            .await
        {
            tracing::warn!(%error, "reply not sent");
        }
    }

    /// Claims the key (or waits for its holder) and produces the reply.
    async fn execute(
        &self,
        intent: &Intent,
        payload: &Bytes,
        abandon: &CancellationToken,
    ) -> Reply {
        let request = ClaimRequest {
            key: intent.key.clone(),
            intent_id: intent.intent_id.clone(),
            fingerprint: intent.fingerprint.clone(),
            owner: format!("{}.{}", self.instance, nuid::next()),
            lease: self.config.lease,
        };
        let acquired = self.store.acquire(&request, self.config.wait).await;
        match acquired {
            Ok(Acquire::Owner(lease)) => self.run_owned(intent, payload, lease, abandon).await,
            Ok(Acquire::Stored(record)) => self.replay(intent, &record),
            Ok(Acquire::Reused(_)) => self.refuse(intent, Rejection::KeyReused),
            Ok(Acquire::Busy(record)) => self.refuse(intent, self.in_progress(&record)),
            Err(error) => self.refuse(intent, Rejection::StoreUnavailable(error)),
        }
    }

    /// Runs the handler under the lease, renewing it, then stores the outcome.
    async fn run_owned(
        &self,
        intent: &Intent,
        payload: &Bytes,
        mut lease: Lease,
        abandon: &CancellationToken,
    ) -> Reply {
        if lease.takeover {
            Stats::bump(&self.stats.takeovers);
            tracing::warn!(attempt = lease.record.attempt, "took over an expired claim");
        }
        let call = Call {
            intent,
            payload,
            attempt: lease.record.attempt,
        };
        let handled = tokio::time::timeout(self.config.handler_timeout, self.handler.handle(call));
        tokio::pin!(handled);
        let every = lease.ttl / 3;
        let mut renewals = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let result = loop {
            tokio::select! {
                result = &mut handled => break result,
                _ = renewals.tick() => match self.store.renew(&lease).await {
                    Ok(renewed) => lease = renewed,
                    Err(StoreError::LeaseLost) => {
                        tracing::warn!("lease lost while the handler ran; its outcome is dropped");
                        return self.after_lost_lease(intent).await;
                    }
                    // The lease may still be alive; try again at the next tick.
                    Err(error) => tracing::warn!(%error, "lease renewal failed"),
                },
                () = abandon.cancelled() => {
                    self.release(&lease).await;
                    return self.refuse(intent, Rejection::ShuttingDown);
                }
            }
        };
        let outcome = match result {
            Err(_elapsed) => Outcome::Timeout,
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => {
                self.release(&lease).await;
                return match error {
                    HandlerError::Transient { code, message } => {
                        Stats::bump(&self.stats.transient);
                        let outcome = Outcome::error(code, message);
                        Reply::unstored(
                            Some(intent.key.clone()),
                            Some(intent.intent_id.clone()),
                            outcome,
                        )
                    }
                    HandlerError::NoHandler(reason) => {
                        self.refuse(intent, Rejection::NoHandler(reason))
                    }
                };
            }
        };
        let ttl = match intent.ttl_secs {
            Some(secs) => Duration::from_secs(secs).min(self.config.ttl),
            None => self.config.ttl,
        };
        match self.store.complete(&lease, outcome.clone(), ttl).await {
            Ok(record) => {
                Stats::bump(&self.stats.executed);
                Reply::from_record(&record, false).unwrap_or_else(|| {
                    Reply::unstored(
                        Some(intent.key.clone()),
                        Some(intent.intent_id.clone()),
                        outcome,
                    )
                })
            }
            Err(StoreError::LeaseLost) => {
                tracing::warn!("lease lost before the outcome was stored; it is dropped");
                self.after_lost_lease(intent).await
            }
            Err(error) => {
                Stats::bump(&self.stats.store_errors);
                tracing::error!(%error, "outcome executed but not stored");
                Reply::unstored(
                    Some(intent.key.clone()),
                    Some(intent.intent_id.clone()),
                    outcome,
                )
            }
        }
    }

    /// After losing the lease, answer with what the new owner stored, if anything.
    async fn after_lost_lease(&self, intent: &Intent) -> Reply {
        Stats::bump(&self.stats.takeovers);
        match self.store.get(&intent.key).await {
            Ok(Some(record))
                if record.result.is_some() && record.fingerprint == intent.fingerprint =>
            {
                self.replay(intent, &record)
            }
            Ok(_) => self.refuse(
                intent,
                Rejection::InProgress {
                    retry_after: self.config.wait.max(MIN_RETRY_AFTER),
                },
            ),
            Err(error) => self.refuse(intent, Rejection::StoreUnavailable(error)),
        }
    }

    async fn release(&self, lease: &Lease) {
        if let Err(error) = self.store.release(lease).await {
            // The lease's TTL frees the key anyway.
            tracing::warn!(%error, "claim not released; it frees itself when the lease expires");
        }
    }

    /// `IN_PROGRESS`, suggesting a retry when the holder's lease ends (at most `--wait`).
    fn in_progress(&self, record: &crate::outcome::Record) -> Rejection {
        let until_expiry = (record.expires_at - chrono::Utc::now())
            .to_std()
            .unwrap_or_default();
        Rejection::InProgress {
            retry_after: until_expiry.min(self.config.wait).max(MIN_RETRY_AFTER),
        }
    }

    fn replay(&self, intent: &Intent, record: &crate::outcome::Record) -> Reply {
        Stats::bump(&self.stats.replayed);
        Reply::from_record(record, true).unwrap_or_else(|| {
            self.refuse(
                intent,
                Rejection::StoreUnavailable(StoreError::Corrupt {
                    key: intent.key.to_string(),
                    reason: "done record without a result".to_owned(),
                }),
            )
        })
    }

    fn refuse(&self, intent: &Intent, rejection: Rejection) -> Reply {
        let counter = match &rejection {
            Rejection::KeyReused => Some(&self.stats.key_reused),
            Rejection::InProgress { .. } => Some(&self.stats.in_progress),
            Rejection::StoreUnavailable(_) => Some(&self.stats.store_errors),
            _ => None,
        };
        if let Some(counter) = counter {
            Stats::bump(counter);
        }
        tracing::info!(code = rejection.code(), reason = %rejection, "intent refused");
        Reply::unstored(
            Some(intent.key.clone()),
            Some(intent.intent_id.clone()),
            rejection.outcome(),
        )
    }
}

//! The worker: intake, the in-flight bound, and shutdown.
//!
//! [`Worker::run`] takes messages from the configured delivery (queue-group
//! subscriptions in core mode, a durable pull consumer in JetStream mode)
//! and hands each to the [`Pipeline`] in a task of its own. Intake is
//! bounded by a semaphore whose permit is taken *before* the next message
//! is read and moves into the task. Every task belongs to one
//! [`TaskTracker`], so shutdown knows exactly what is still running.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message, Subject};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::purge_subject;
use crate::config::{Delivery, WorkerConfig};
use crate::handler::Handler;
use crate::jetstream;
use crate::key::IdempotencyKey;
use crate::pipeline::{next_with_permit, Pipeline};
use crate::service;
use crate::stats::Stats;
use crate::store::IdempotencyStore;

/// How long shutdown waits, after the grace period, for claims to be released.
const RELEASE_BOUND: Duration = Duration::from_secs(5);

/// Errors that stop the worker before or while it takes intents.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Subscribing, creating the stream or consumer, or registering failed.
    #[error("NATS: {0}")]
    Nats(String),
}

/// A worker: one store, one handler, one configuration.
pub struct Worker {
    pipeline: Pipeline,
}

/// What intake needs besides the pipeline: the bound, the owner of every
/// task, and the two stop signals.
pub(crate) struct Intake {
    pub permits: Arc<Semaphore>,
    pub tracker: TaskTracker,
    /// Stop taking intents.
    pub shutdown: CancellationToken,
    /// Stop waiting for running handlers: release their claims.
    pub abandon: CancellationToken,
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
            pipeline: Pipeline::new(client, store, handler, config),
        }
    }

    /// The worker's counters (live).
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.pipeline.stats)
    }

    /// Takes intents until `shutdown` is cancelled, then shuts down cleanly:
    /// stops intake, lets in-flight intents finish within `grace`, and makes
    /// any still running release their claims (core mode answers them
    /// `NO_HANDLER` so callers retry elsewhere; JetStream mode naks them for
    /// redelivery).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let config = &self.pipeline.config;
        config.validate().map_err(|problems| {
            let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
            WorkerError::Config(text.join("; "))
        })?;
        let client = self.pipeline.client.clone();
        let grace = config.grace;
        let intake = Intake {
            permits: Arc::new(Semaphore::new(config.concurrency)),
            tracker: TaskTracker::new(),
            shutdown,
            abandon: CancellationToken::new(),
        };
        let mut metadata = HashMap::from([
            ("subjects".to_owned(), config.subjects.join(",")),
            ("instance".to_owned(), self.pipeline.instance.clone()),
            ("bucket".to_owned(), config.bucket.clone()),
        ]);
        let pipeline = Arc::new(self.pipeline);
        let purges = pipeline
            .client
            .subscribe(purge_subject(&pipeline.config.bucket))
            .await
            .map_err(|e| WorkerError::Nats(format!("subscribe to purge notices: {e}")))?;
        intake.tracker.spawn(evict_purged(
            Arc::clone(&pipeline),
            purges,
            intake.shutdown.clone(),
        ));
        match pipeline.config.delivery.clone() {
            Delivery::Core => {
                let subscriptions = subscribe(&pipeline).await?;
                metadata.insert("mode".to_owned(), "core".to_owned());
                metadata.insert(
                    "queue_group".to_owned(),
                    pipeline.config.queue_group.clone(),
                );
                register(&pipeline, metadata, &intake).await?;
                tracing::info!(subjects = ?pipeline.config.subjects, "taking intents");
                take_core(&pipeline, subscriptions, &intake).await;
            }
            Delivery::JetStream(js) => {
                let consumer = jetstream::Consumer::open(&pipeline, &js).await?;
                metadata.insert("mode".to_owned(), "jetstream".to_owned());
                metadata.insert("stream".to_owned(), js.stream.clone());
                register(&pipeline, metadata, &intake).await?;
                tracing::info!(stream = %js.stream, durable = %js.durable, "taking intents");
                consumer.take(&pipeline, &intake).await;
            }
        }

        intake.tracker.close();
        let in_flight = pipeline.stats.snapshot().in_flight;
        tracing::info!(in_flight, "shutting down");
        if tokio::time::timeout(grace, intake.tracker.wait())
            .await
            .is_err()
        {
            let still_running = pipeline.stats.snapshot().in_flight;
            tracing::warn!(still_running, "grace period over; releasing claims");
            intake.abandon.cancel();
            if tokio::time::timeout(RELEASE_BOUND, intake.tracker.wait())
                .await
                .is_err()
            {
                tracing::error!("some intents did not release their claims in time");
            }
        }
        if tokio::time::timeout(RELEASE_BOUND, client.flush())
            .await
            .is_err()
        {
            tracing::warn!("flushing the last replies timed out");
        }
        Ok(())
    }
}

/// Evicts purged keys from the outcome cache until shutdown. Every worker
/// subscribes (no queue group): each has its own cache.
async fn evict_purged(
    pipeline: Arc<Pipeline>,
    mut purges: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    loop {
        let notice = tokio::select! {
            () = shutdown.cancelled() => return,
            notice = purges.next() => match notice {
                Some(notice) => notice,
                None => return,
            },
        };
        match std::str::from_utf8(&notice.payload).map(IdempotencyKey::parse_scoped) {
            Ok(Ok(key)) => pipeline.cache.remove(&key),
            _ => tracing::debug!("ignored a malformed purge notice"),
        }
    }
}

/// Registers the micro service once intake is ready; it deregisters on shutdown.
async fn register(
    pipeline: &Pipeline,
    metadata: HashMap<String, String>,
    intake: &Intake,
) -> Result<(), WorkerError> {
    let registration = service::register(
        &pipeline.client,
        &pipeline.instance,
        metadata,
        Arc::clone(&pipeline.stats),
    )
    .await
    .map_err(|e| WorkerError::Nats(format!("register service: {e}")))?;
    intake
        .tracker
        .spawn(registration.serve(intake.shutdown.clone()));
    Ok(())
}

async fn subscribe(pipeline: &Pipeline) -> Result<Vec<async_nats::Subscriber>, WorkerError> {
    let mut subscriptions = Vec::with_capacity(pipeline.config.subjects.len());
    for subject in &pipeline.config.subjects {
        let subscription = pipeline
            .client
            .queue_subscribe(subject.clone(), pipeline.config.queue_group.clone())
            .await
            .map_err(|e| WorkerError::Nats(format!("subscribe to {subject}: {e}")))?;
        subscriptions.push(subscription);
    }
    Ok(subscriptions)
}

/// Core intake: every delivery is answered on its reply subject (else on
/// `Idem-Reply-To`/`reply_to`), whatever the verdict.
async fn take_core(
    pipeline: &Arc<Pipeline>,
    subscriptions: Vec<async_nats::Subscriber>,
    intake: &Intake,
) {
    let mut source = futures::stream::select_all(subscriptions);
    while let Some((permit, message)) =
        next_with_permit(&mut source, &intake.permits, &intake.shutdown).await
    {
        let abandon = intake.abandon.clone();
        let answer = answer_core(Arc::clone(pipeline), message, abandon, permit);
        intake.tracker.spawn(answer);
    }
    // Dropping the subscriptions unsubscribes: the queue group routes new
    // intents to the other workers while ours finish.
}

/// Answers one core-mode delivery. A function returning an `async move`
/// block rather than an `async fn`: an async fn keeps each by-value
/// parameter twice in its future, and this future is every intent's task.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold the message twice"
)]
fn answer_core(
    pipeline: Arc<Pipeline>,
    message: Message,
    abandon: CancellationToken,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> {
    async move {
        let _permit = permit;
        let started = std::time::Instant::now();
        let handled = pipeline
            .handle(
                &message.subject,
                message.reply.as_deref(),
                message.headers.as_ref(),
                &message.payload,
                &abandon,
            )
            .await;
        // The message's own reply subject as it came (no copy), else the
        // one the intent names; neither once the policy refused one.
        let own = message.reply.filter(|_| handled.answer_own);
        match own.or_else(|| handled.reply_to.map(Subject::from)) {
            Some(reply_to) => {
                let reply = handled.verdict.answer();
                // Boxed: inline, the publish would double every task's size.
                let published = Box::pin(pipeline.client.publish_with_headers(
                    reply_to,
                    reply.headers(),
                    reply.to_bytes(),
                ));
                if let Err(error) = published.await {
                    tracing::warn!(%error, "reply not sent");
                }
            }
            None => tracing::debug!("intent has nowhere to reply to"),
        }
        Stats::observe(&pipeline.stats.intent_seconds, started.elapsed());
    }
}

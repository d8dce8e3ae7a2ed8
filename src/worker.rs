//! The worker: a pipeline, a delivery, purge notices, registration, and
//! shutdown.
//!
//! [`Worker::run`] starts the configured delivery (queue-group
//! subscriptions in core mode, a durable pull consumer in JetStream mode,
//! both in `delivery/`), which takes messages through the permit-bounded
//! [`Intake`] and hands each to the `Pipeline` in a task of its own.
//! Every task belongs to the intake's tracker, so shutdown knows exactly
//! what is still running: it stops intake, waits `grace`, then releases
//! the claims of what still runs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Delivery, WorkerConfig};
use crate::delivery::{self, DeliveryError};
use crate::handler::Handler;
use crate::intake::Intake;
use crate::pipeline::Pipeline;
use crate::purge::purge_subject;
use crate::service;
use crate::stats::Stats;
use crate::store::IdempotencyStore;

/// How long shutdown waits, after the grace period, for claims to be released.
const RELEASE_BOUND: Duration = Duration::from_secs(5);

/// Errors that stop the worker before it takes intents.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is invalid: every problem.
    #[error("invalid configuration: {}", crate::config::join_problems(.0, "; "))]
    Config(Vec<ConfigError>),
    /// The delivery (subscriptions, or the stream and consumer) could not start.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The purge-notice subscription was refused.
    #[error("subscribe to purge notices: {0}")]
    PurgeNotices(#[source] async_nats::SubscribeError),
    /// The micro service could not be registered.
    #[error("register the idemq service: {0}")]
    Register(String),
}

/// A worker: one store, one handler, one configuration.
pub struct Worker {
    pipeline: Pipeline,
}

impl Worker {
    /// A worker over `store`, executing with `handler`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use idemq::handler::Echo;
    /// use idemq::store::memory::MemoryStore;
    /// use idemq::{Worker, WorkerConfig};
    /// use tokio_util::sync::CancellationToken;
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    /// let config = WorkerConfig {
    ///     subjects: vec!["intents.>".into()],
    ///     ..WorkerConfig::default()
    /// };
    /// let worker = Worker::new(client, Arc::new(MemoryStore::new()), Arc::new(Echo), config);
    /// // Takes intents until the token is cancelled, then stops cleanly.
    /// worker.run(CancellationToken::new()).await?;
    /// # Ok(())
    /// # }
    /// ```
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
        let (ready, _) = oneshot::channel();
        self.run_ready(shutdown, ready).await
    }

    /// [`run`](Self::run), sending on `ready` once intents are being taken
    /// (subscribed or consuming, and registered); `ready` is dropped unsent
    /// when start-up fails.
    pub(crate) async fn run_ready(
        self,
        shutdown: CancellationToken,
        ready: oneshot::Sender<()>,
    ) -> Result<(), WorkerError> {
        let config = &self.pipeline.config;
        config.validate().map_err(WorkerError::Config)?;
        let client = self.pipeline.client.clone();
        let grace = config.grace;
        let intake = Intake::new(config.concurrency, shutdown);
        let mut metadata = HashMap::from([
            ("subjects".to_owned(), config.subjects.join(",")),
            ("instance".to_owned(), self.pipeline.instance.clone()),
        ]);
        let pipeline = Arc::new(self.pipeline);
        // A bucket's purges are announced on its purge subject (`idemq
        // purge`); a store without a bucket has nobody to purge it.
        if let Some(bucket) = pipeline.store().bucket() {
            metadata.insert("bucket".to_owned(), bucket.to_owned());
            let purges = pipeline
                .client
                .subscribe(purge_subject(bucket))
                .await
                .map_err(WorkerError::PurgeNotices)?;
            let (pipeline, shutdown) = (Arc::clone(&pipeline), intake.shutdown.clone());
            intake.tracker.spawn(async move {
                crate::purge::evict_purged(&pipeline.cache, purges, shutdown).await;
            });
        }
        match pipeline.config.delivery.clone() {
            Delivery::Core => {
                let subscriptions = delivery::core::subscribe(&pipeline).await?;
                metadata.insert("mode".to_owned(), "core".to_owned());
                metadata.insert(
                    "queue_group".to_owned(),
                    pipeline.config.queue_group.clone(),
                );
                register(&pipeline, metadata, &intake).await?;
                tracing::info!(subjects = ?pipeline.config.subjects, "taking intents");
                announce(&pipeline, ready).await;
                delivery::core::take(&pipeline, subscriptions, &intake).await;
            }
            Delivery::JetStream(js) => {
                let consumer = delivery::jetstream::Consumer::open(&pipeline, &js).await?;
                metadata.insert("mode".to_owned(), "jetstream".to_owned());
                metadata.insert("stream".to_owned(), js.stream.clone());
                register(&pipeline, metadata, &intake).await?;
                tracing::info!(stream = %js.stream, durable = %js.durable, "taking intents");
                announce(&pipeline, ready).await;
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

/// Tells the starter the worker takes intents, once the server has seen
/// its subscriptions: a request sent on another connection right after
/// then finds the worker there. A flush only empties the client's buffer;
/// a read of the store is a round trip on the same connection, which the
/// server answers only after the subscriptions sent before it (and it is
/// a request the worker's permissions always allow).
async fn announce(pipeline: &Pipeline, ready: oneshot::Sender<()>) {
    let key = crate::store::probe_key();
    let probe = pipeline.store().read(&key);
    if tokio::time::timeout(RELEASE_BOUND, probe).await.is_err() {
        tracing::warn!("the store did not answer the start-up probe in time");
    }
    // The starter may have stopped waiting: nothing to tell then.
    let _ = ready.send(());
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
    .map_err(|e| WorkerError::Register(e.to_string()))?;
    intake
        .tracker
        .spawn(registration.serve(intake.shutdown.clone()));
    Ok(())
}

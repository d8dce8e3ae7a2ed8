//! One start-up path: a worker as `idemq serve` runs it.
//!
//! [`Server::start`] checks the nats-server, opens (or creates) the bucket,
//! starts the [`Worker`] and, with `metrics_addr`, the HTTP endpoints, and
//! returns once the worker takes intents. `idemq serve`, the test fixture,
//! the benchmark's in-process worker and `examples/embed.rs` all start
//! through it; [`run`] is start-then-wait for programs with nothing else
//! to do (mini-redis's `server::run`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Delivery, WorkerConfig};
use crate::handler::Handler;
use crate::stats::Stats;
use crate::store::kv::{check_server_version, BucketConfig, KvStore};
use crate::store::{IdempotencyStore, StoreError};
use crate::worker::{Worker, WorkerError};

/// How long stopping waits for the endpoints' open connections.
const ENDPOINTS_STOP_BOUND: Duration = Duration::from_secs(2);

/// What [`Server::start`] starts.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// The worker's settings.
    pub worker: WorkerConfig,
    /// The bucket for claims and outcomes (`--bucket`, `--replicas`).
    pub bucket: BucketConfig,
    /// Serve `/metrics`, `/healthz` and `/readyz` here (`--metrics-addr`).
    pub metrics_addr: Option<SocketAddr>,
}

/// Why a server did not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is invalid: every problem.
    #[error("{}", crate::config::join_problems(.0, "\n"))]
    Config(Vec<ConfigError>),
    /// The server is too old, or the bucket cannot be opened or created.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The metrics address cannot be bound.
    #[error("--metrics-addr {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The worker could not start.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The worker returned before it took intents, without an error.
    #[error("the worker stopped before it took intents")]
    StoppedEarly,
    /// The worker's task panicked.
    #[error("the worker task failed: {0}")]
    Panicked(String),
}

/// A running worker (and its endpoints); see the module docs.
pub struct Server {
    stats: Arc<Stats>,
    store: Arc<dyn IdempotencyStore>,
    worker: JoinHandle<Result<(), WorkerError>>,
    endpoints: Option<Endpoints>,
}

impl Server {
    /// Checks the server's version, opens `config.bucket` and starts the
    /// worker with `handler` until `shutdown`; returns once it takes intents.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use idemq::handler::Echo;
    /// use idemq::server::{Server, ServerConfig};
    /// use tokio_util::sync::CancellationToken;
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    /// let shutdown = CancellationToken::new();
    /// let server = Server::start(client, Arc::new(Echo), ServerConfig::default(), shutdown.clone()).await?;
    /// // It takes intents now; `shutdown.cancel()` stops it, `wait` sees it out.
    /// shutdown.cancel();
    /// server.wait().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start(
        client: Client,
        handler: Arc<dyn Handler>,
        config: ServerConfig,
        shutdown: CancellationToken,
    ) -> Result<Server, ServeError> {
        config.worker.validate().map_err(ServeError::Config)?;
        check_server_version(&client)?;
        let js = async_nats::jetstream::new(client.clone());
        let mut store = KvStore::open(js, &config.bucket).await?;
        // A redelivery may come this late: until then, a marker must say
        // the key ran (its attempt number, docs/contract.md v1.2 §4).
        if let Delivery::JetStream(delivery) = &config.worker.delivery {
            store.keep_markers_for(delivery.redelivery_horizon()).await;
        }
        Server::start_on(
            client,
            Arc::new(store),
            handler,
            config.worker,
            config.metrics_addr,
            shutdown,
        )
        .await
    }

    /// [`start`](Self::start) over a store of the caller's (the memory
    /// store, a wrapper), with no version check and no bucket to open.
    pub async fn start_on(
        client: Client,
        store: Arc<dyn IdempotencyStore>,
        handler: Arc<dyn Handler>,
        config: WorkerConfig,
        metrics_addr: Option<SocketAddr>,
        shutdown: CancellationToken,
    ) -> Result<Server, ServeError> {
        config.validate().map_err(ServeError::Config)?;
        // Bound before the worker starts: a taken port fails start-up
        // without leaving a worker behind.
        let listener = match metrics_addr {
            Some(addr) => Some(
                crate::http::bind(addr)
                    .await
                    .map_err(|source| ServeError::Bind { addr, source })?,
            ),
            None => None,
        };
        let worker = Worker::new(client.clone(), Arc::clone(&store), handler, config);
        let stats = worker.stats();
        // The endpoints come first and outlive intake: /healthz answers
        // while the worker starts and during the grace period, and /readyz
        // says whether it takes intents.
        let endpoints = listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            }
            let stop = CancellationToken::new();
            let readiness =
                crate::http::Readiness::new(client, Arc::clone(&store), shutdown.clone());
            let serving = tokio::spawn(crate::http::serve(
                listener,
                Arc::clone(&stats),
                readiness,
                stop.clone(),
            ));
            Endpoints { serving, stop }
        });
        let (ready, started) = oneshot::channel();
        let mut task = tokio::spawn(worker.run_ready(shutdown, ready));
        // The worker sends once it takes intents, and drops the sender when
        // it fails first: then its task says why.
        if started.await.is_err() {
            if let Some(endpoints) = endpoints {
                endpoints.stop().await;
            }
            return Err(match (&mut task).await {
                Ok(Err(error)) => ServeError::Worker(error),
                Ok(Ok(())) => ServeError::StoppedEarly,
                Err(panicked) => ServeError::Panicked(panicked.to_string()),
            });
        }
        Ok(Server {
            stats,
            store,
            worker: task,
            endpoints,
        })
    }

    /// The worker's counters (live).
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// The store the worker claims in.
    pub fn store(&self) -> &Arc<dyn IdempotencyStore> {
        &self.store
    }

    /// Waits for the worker's clean shutdown (after `shutdown` is
    /// cancelled), then stops the endpoints: in-flight scrapes finish, and
    /// a client that holds its connection open does not hold up the exit.
    pub async fn wait(self) -> Result<(), ServeError> {
        let result = match self.worker.await {
            Ok(result) => result.map_err(ServeError::Worker),
            Err(panicked) => Err(ServeError::Panicked(panicked.to_string())),
        };
        if let Some(endpoints) = self.endpoints {
            endpoints.stop().await;
        }
        result
    }
}

/// The HTTP endpoints' task and its stop signal.
struct Endpoints {
    serving: JoinHandle<std::io::Result<()>>,
    stop: CancellationToken,
}

impl Endpoints {
    /// Stops them: in-flight scrapes finish within a bound, then open
    /// connections are closed.
    async fn stop(mut self) {
        self.stop.cancel();
        match tokio::time::timeout(ENDPOINTS_STOP_BOUND, &mut self.serving).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "metrics endpoint failed"),
            Ok(Err(error)) => tracing::warn!(%error, "metrics endpoint task failed"),
            Err(_) => {
                tracing::warn!("metrics endpoint still had connections open; closing them");
                self.serving.abort();
            }
        }
    }
}

/// Starts a server and waits for it to stop (see [`Server::start`]).
pub async fn run(
    client: Client,
    handler: Arc<dyn Handler>,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    Server::start(client, handler, config, shutdown)
        .await?
        .wait()
        .await
}

/// Cancels `shutdown` on SIGINT or SIGTERM (SIGINT only where there is no
/// SIGTERM). Returns without cancelling if no handler can be installed.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the worker");
                // Without a SIGINT handler either, there is nothing to wait for.
                if tokio::signal::ctrl_c().await.is_err() {
                    return;
                }
            }
        }
    }
    #[cfg(not(unix))]
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    tracing::info!("signal received; stopping intake");
    shutdown.cancel();
}

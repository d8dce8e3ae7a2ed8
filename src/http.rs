//! The operations endpoints on `--metrics-addr`: `/metrics` (Prometheus),
//! `/healthz` (the process runs) and `/readyz` (connected to NATS and the
//! bucket answers).
//!
//! Liveness and readiness are kept apart on purpose: an orchestrator that
//! restarted the worker whenever NATS was away would only add restarts to
//! an outage, while readiness tells it (and a load balancer) to wait.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use async_nats::connection::State;
use async_nats::Client;
use axum::extract::State as Shared;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;
use crate::store::IdempotencyStore;

/// How long `/readyz` waits for the bucket to answer.
pub const READY_BOUND: Duration = Duration::from_secs(2);

/// The content type of prometheus-client's text encoding.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a probe of the bucket stands for readiness: however often
/// `/readyz` is asked, the bucket is read at most once per this.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    client: Client,
    store: Arc<dyn IdempotencyStore>,
    shutdown: CancellationToken,
    /// The last bucket probe.
    probed: Arc<tokio::sync::Mutex<Option<Probe>>>,
}

/// A bucket probe: when it started, and what it found.
type Probe = (Instant, Result<(), String>);

impl Readiness {
    /// Readiness of a worker on `client` and `store`, not ready once
    /// `shutdown` fires.
    pub fn new(
        client: Client,
        store: Arc<dyn IdempotencyStore>,
        shutdown: CancellationToken,
    ) -> Readiness {
        Readiness {
            client,
            store,
            shutdown,
            probed: Arc::default(),
        }
    }

    /// `Ok` when the worker is not stopping, the connection is up (both
    /// looked at every time, at no cost) and the store answered a read
    /// within [`READY_BOUND`] in the last [`PROBE_EVERY`]; otherwise why not.
    /// A scraper asking many times a second costs one read a second, and a
    /// lost connection still shows at once.
    pub async fn check(&self) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("shutting down".to_owned());
        }
        if self.client.connection_state() != State::Connected {
            return Err("not connected to NATS".to_owned());
        }
        // Held across the probe: concurrent requests wait for one read.
        let mut probed = self.probed.lock().await;
        if let Some((at, found)) = probed.as_ref() {
            if at.elapsed() < PROBE_EVERY {
                return found.clone();
            }
        }
        let at = Instant::now();
        let found =
            match tokio::time::timeout(READY_BOUND, self.store.read(&crate::store::probe_key()))
                .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => Err(format!("bucket unreachable: {error}")),
                Err(_) => Err(format!(
                    "bucket did not answer within {}",
                    humantime::format_duration(READY_BOUND)
                )),
            };
        *probed = Some((at, found.clone()));
        found
    }
}

struct Endpoints {
    stats: Arc<Stats>,
    readiness: Readiness,
}

/// Binds the address (so a bad or busy one fails at start-up).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    stats: Arc<Stats>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let endpoints = Arc::new(Endpoints { stats, readiness });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(endpoints);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn metrics(Shared(endpoints): Shared<Arc<Endpoints>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS)],
        endpoints.stats.encode(),
    )
}

async fn readyz(Shared(endpoints): Shared<Arc<Endpoints>>) -> impl IntoResponse {
    match endpoints.readiness.check().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// `idemq healthcheck`: asks a worker's `/healthz` (or `/readyz`) whether
/// it is well, for container health checks in images without curl. An
/// unspecified address (`0.0.0.0`) is dialled on loopback.
pub fn probe(addr: SocketAddr, ready: bool, timeout: Duration) -> Result<(), String> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let path = if ready { "readyz" } else { "healthz" };
    let url = format!("http://{addr}/{path}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    match agent.get(&url).call() {
        Ok(response) if response.status() == 200 => Ok(()),
        Ok(mut response) => {
            let status = response.status();
            let body = response.body_mut().read_to_string().unwrap_or_default();
            Err(format!("{url}: {status} {}", body.trim()))
        }
        Err(error) => Err(format!("{url}: {error}")),
    }
}

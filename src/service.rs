//! Discovery: the running worker as a NATS micro service named `idemq`.
//!
//! Registered only once the intent subscriptions exist and the bucket is
//! ready, so a `$SRV.PING.idemq` answer means "this worker takes intents".
//! The service has one endpoint, `status`, on a subject of its own per
//! worker (`idemq.status.<instance>`): it answers with the worker's
//! counters, and the same counters are the endpoint's data in `$SRV.STATS`.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::service::{endpoint::Endpoint, Service, ServiceExt};
use async_nats::Client;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

/// The service name every idemq worker registers.
pub const SERVICE_NAME: &str = "idemq";

/// A registered service and its status endpoint.
pub struct Registration {
    /// The service handle; stopping it deregisters the worker.
    pub service: Service,
    endpoint: Endpoint,
    stats: Arc<Stats>,
}

/// Where each worker answers for its status: `idemq.status.<instance>`.
const STATUS_PREFIX: &str = "idemq.status";

/// Registers the service. `metadata` shows in `$SRV.INFO` (subjects,
/// bucket, queue group); `instance` makes the status subject unique.
pub async fn register(
    client: &Client,
    instance: &str,
    metadata: HashMap<String, String>,
    stats: Arc<Stats>,
) -> Result<Registration, async_nats::Error> {
    let handler_stats = Arc::clone(&stats);
    let service = client
        .service_builder()
        .description("idempotent intent worker")
        .metadata(metadata)
        .stats_handler(move |_endpoint, _stats| {
            serde_json::to_value(handler_stats.snapshot()).unwrap_or_default()
        })
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await?;
    let endpoint = service
        .endpoint_builder()
        .name("status")
        .add(format!("{STATUS_PREFIX}.{instance}"))
        .await?;
    Ok(Registration {
        service,
        endpoint,
        stats,
    })
}

impl Registration {
    /// Answers status requests until `shutdown`, then deregisters.
    pub async fn serve(mut self, shutdown: CancellationToken) {
        while let Some(Some(request)) = shutdown.run_until_cancelled(self.endpoint.next()).await {
            let body = serde_json::to_vec(&self.stats.snapshot()).unwrap_or_default();
            if let Err(error) = request.respond(Ok(body.into())).await {
                tracing::debug!(%error, "status reply failed");
            }
        }
        if let Err(error) = self.service.stop().await {
            tracing::debug!(%error, "service stop failed");
        }
    }
}

//! Looking at and mending a running deployment: the data behind `idemq
//! stats` and what `idemq purge` does. The CLI (`cli/admin.rs`) renders.
//!
//! `stats` asks two places: the bucket (its stream's state and settings)
//! and every running worker, through the NATS micro service's
//! `$SRV.STATS.idemq` request, whose replies carry each worker's counters
//! as custom endpoint data. Workers answer within the collection window,
//! so the table is as complete as the slowest worker is quick.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::ErrorCode;
use async_nats::Client;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::key::IdempotencyKey;
use crate::outcome::RecordState;
use crate::service::SERVICE_NAME;
use crate::stats::Snapshot;
use crate::store::kv::KvStore;
use crate::store::{IdempotencyStore, Slot, StoreError, Versioned};

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The bucket's stream could not be read.
    #[error("bucket {bucket}: {reason}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// The server's or the client's reason.
        reason: String,
    },
    /// The workers could not be asked.
    #[error("cannot ask the workers: {0}")]
    Workers(String),
    /// A record could not be read or purged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `purge` of a claim whose execution still runs, without `force`.
    #[error("{key} is being executed (lease until {until}); --force purges it anyway")]
    Running {
        /// The key.
        key: String,
        /// When its lease ends (RFC 3339).
        until: String,
    },
    /// The record changed between `purge`'s read and its purge.
    #[error("{key} changed since it was read; nothing purged (run purge again to see it)")]
    Changed {
        /// The key.
        key: String,
    },
}

impl AdminError {
    fn bucket(bucket: &str, error: impl std::fmt::Display) -> AdminError {
        AdminError::Bucket {
            bucket: bucket.to_owned(),
            reason: error.to_string(),
        }
    }
}

/// Most worker answers collected (a bound, not an expectation).
const MAX_WORKERS: usize = 10_000;

/// The bucket as `idemq stats` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BucketStats {
    /// Bucket name.
    pub bucket: String,
    /// Keys held (claims, outcomes and expiry markers).
    pub keys: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Longest outcome lifetime the bucket allows, in seconds (0: none).
    pub max_age_secs: u64,
    /// Stream replicas.
    pub replicas: usize,
    /// `file` or `memory`.
    pub storage: String,
}

/// One worker's answer.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStats {
    /// The service instance id.
    pub id: String,
    /// idemq's version on that worker.
    pub version: String,
    /// When it started (RFC 3339).
    pub started: String,
    /// Its counters.
    pub stats: Snapshot,
}

/// Everything `idemq stats --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The bucket, if it exists.
    pub bucket: Option<BucketStats>,
    /// Every worker that answered, by id.
    pub workers: Vec<WorkerStats>,
    /// The workers' counters added up (in flight: now, across them).
    pub total: Snapshot,
    /// With `--tenants`: keys in the bucket per tenant (`""`: unscoped keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenants: Option<BTreeMap<String, u64>>,
}

impl Report {
    /// The report of these workers (sorted by id), with their total.
    pub fn new(bucket: Option<BucketStats>, mut workers: Vec<WorkerStats>) -> Report {
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        let total = workers
            .iter()
            .fold(Snapshot::default(), |sum, worker| sum + worker.stats);
        Report {
            bucket,
            workers,
            total,
            tenants: None,
        }
    }
}

/// The bucket and every worker that answers within `window`; with
/// `tenants`, the bucket's keys per tenant too.
pub async fn stats(
    client: &Client,
    bucket: &str,
    window: Duration,
    tenants: bool,
) -> Result<Report, AdminError> {
    let bucket_stats = bucket_stats(client, bucket).await?;
    let workers = worker_stats(client, window).await?;
    let mut report = Report::new(bucket_stats, workers);
    if tenants {
        report.tenants = Some(keys_per_tenant(client, bucket).await?);
    }
    Ok(report)
}

/// Keys per tenant, counted by the server (a `STREAM.INFO` with a subject
/// filter, paged): the first token of a scoped key, `""` for bare ones.
async fn keys_per_tenant(
    client: &Client,
    bucket: &str,
) -> Result<BTreeMap<String, u64>, AdminError> {
    let js = async_nats::jetstream::new(client.clone());
    let prefix = format!("$KV.{bucket}.");
    let stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| AdminError::bucket(bucket, e))?;
    let mut subjects = stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(|e| AdminError::bucket(bucket, e))?;
    let mut tenants = BTreeMap::new();
    while let Some(entry) = subjects.next().await {
        let (subject, count) = entry.map_err(|e| AdminError::bucket(bucket, e))?;
        let key = subject.strip_prefix(&prefix).unwrap_or(&subject);
        let tenant = key.rsplit_once('.').map_or("", |(tenant, _)| tenant);
        *tenants.entry(tenant.to_owned()).or_insert(0) += count as u64;
    }
    Ok(tenants)
}

async fn bucket_stats(client: &Client, bucket: &str) -> Result<Option<BucketStats>, AdminError> {
    let js = async_nats::jetstream::new(client.clone());
    let stream = format!("KV_{bucket}");
    match js.get_stream(&stream).await {
        Ok(handle) => {
            // get_stream has just fetched the stream's info.
            let info = handle.cached_info();
            Ok(Some(BucketStats {
                bucket: bucket.to_owned(),
                keys: info.state.messages,
                bytes: info.state.bytes,
                max_age_secs: info.config.max_age.as_secs(),
                replicas: info.config.num_replicas,
                storage: format!("{:?}", info.config.storage).to_lowercase(),
            }))
        }
        Err(error)
            if matches!(
                error.kind(),
                GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            Ok(None)
        }
        Err(error) => Err(AdminError::bucket(bucket, error)),
    }
}

/// Asks `$SRV.STATS.idemq` and collects the answers for `window`.
pub async fn worker_stats(
    client: &Client,
    window: Duration,
) -> Result<Vec<WorkerStats>, AdminError> {
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| AdminError::Workers(e.to_string()))?;
    client
        .publish_with_reply(format!("$SRV.STATS.{SERVICE_NAME}"), inbox, "".into())
        .await
        .map_err(|e| AdminError::Workers(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + window;
    let mut workers = Vec::new();
    while workers.len() < MAX_WORKERS {
        let Ok(Some(message)) = tokio::time::timeout_at(deadline, answers.next()).await else {
            break;
        };
        match parse_worker(&message.payload) {
            Some(worker) => workers.push(worker),
            None => tracing::warn!("ignored an unreadable $SRV.STATS answer"),
        }
    }
    Ok(workers)
}

/// A micro-service `$SRV.STATS` answer, as far as `idemq stats` reads it.
#[derive(Deserialize)]
struct StatsAnswer {
    id: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    started: String,
    endpoints: Vec<EndpointAnswer>,
}

/// One endpoint of it: idemq's `data` holds the worker's counters.
#[derive(Deserialize)]
struct EndpointAnswer {
    data: Option<Snapshot>,
}

/// A worker's answer; `None` when it is not one with counters.
fn parse_worker(payload: &[u8]) -> Option<WorkerStats> {
    let answer: StatsAnswer = serde_json::from_slice(payload).ok()?;
    let stats = answer.endpoints.into_iter().next()?.data?;
    Some(WorkerStats {
        id: answer.id,
        version: answer.version,
        started: answer.started,
        stats,
    })
}

/// What [`purge`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purged {
    /// The record is gone; workers were told on this subject.
    Purged {
        /// The purge subject the notice went to.
        notified_on: String,
    },
    /// Nothing was stored under the key.
    Absent,
}

/// Removes the record under `key` and tells every worker to drop it from
/// its cache, so the next copy executes again (`idemq purge`). A claim
/// whose execution still runs is left alone unless `force`: purging it
/// would let a copy execute beside the running one.
pub async fn purge(
    client: &Client,
    store: &KvStore,
    bucket: &str,
    key: &IdempotencyKey,
    force: bool,
) -> Result<Purged, AdminError> {
    let revision = match store.read(key).await? {
        Some(Versioned {
            revision,
            slot: Slot::Record(record),
        }) => {
            if record.state == RecordState::InProgress && !force {
                return Err(AdminError::Running {
                    key: key.to_string(),
                    until: record.expires_at.to_rfc3339(),
                });
            }
            revision
        }
        _ => return Ok(Purged::Absent),
    };
    // Only what was just read and judged is purged: a claim made since
    // (the record expired, a copy executes) makes this a conflict.
    match crate::purge::purge(client, store, bucket, key, revision).await {
        Ok(()) => Ok(Purged::Purged {
            notified_on: crate::purge::purge_subject(bucket),
        }),
        Err(StoreError::Conflict) => Err(AdminError::Changed {
            key: key.to_string(),
        }),
        Err(error) => Err(AdminError::Store(error)),
    }
}

//! `idemq stats` and `idemq purge`: looking at and mending a running
//! deployment from the command line.
//!
//! `stats` asks two places: the bucket (its stream's state and settings)
//! and every running worker, through the NATS micro service's
//! `$SRV.STATS.idemq` request, whose replies carry each worker's counters
//! as custom endpoint data. Workers answer within the collection window,
//! so the table is as complete as the slowest worker is quick.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::ErrorCode;
use async_nats::Client;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::cli::{connect, CliError, PurgeArgs, StatsArgs};
use crate::outcome::RecordState;
use crate::service::SERVICE_NAME;
use crate::stats::Snapshot;
use crate::store::{IdempotencyStore, Slot, StoreError, Versioned};

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

/// `idemq stats`.
pub async fn stats(args: &StatsArgs) -> Result<ExitCode, CliError> {
    let client = connect(&args.at.nats).await?;
    let bucket = bucket_stats(&client, &args.at.bucket).await?;
    let workers = worker_stats(&client, args.timeout).await?;
    let mut report = Report::new(bucket, workers);
    if args.tenants {
        report.tenants = Some(keys_per_tenant(&client, &args.at.bucket).await?);
    }
    if args.json {
        let json =
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Failed(e.to_string()))?;
        println!("{json}");
    } else {
        print!("{}", render(&report, &args.at.bucket));
    }
    Ok(ExitCode::SUCCESS)
}

/// Keys per tenant, counted by the server (a `STREAM.INFO` with a subject
/// filter, paged): the first token of a scoped key, `""` for bare ones.
async fn keys_per_tenant(client: &Client, bucket: &str) -> Result<BTreeMap<String, u64>, CliError> {
    let js = async_nats::jetstream::new(client.clone());
    let prefix = format!("$KV.{bucket}.");
    let stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| CliError::Failed(format!("bucket {bucket}: {e}")))?;
    let mut subjects = stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(|e| CliError::Failed(format!("bucket {bucket}: {e}")))?;
    let mut tenants = BTreeMap::new();
    while let Some(entry) = subjects.next().await {
        let (subject, count) =
            entry.map_err(|e| CliError::Failed(format!("bucket {bucket}: {e}")))?;
        let key = subject.strip_prefix(&prefix).unwrap_or(&subject);
        let tenant = key.rsplit_once('.').map_or("", |(tenant, _)| tenant);
        *tenants.entry(tenant.to_owned()).or_insert(0) += count as u64;
    }
    Ok(tenants)
}

async fn bucket_stats(client: &Client, bucket: &str) -> Result<Option<BucketStats>, CliError> {
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
        Err(error) => Err(CliError::Failed(format!("bucket {bucket}: {error}"))),
    }
}

/// Asks `$SRV.STATS.idemq` and collects the answers for `window`.
async fn worker_stats(client: &Client, window: Duration) -> Result<Vec<WorkerStats>, CliError> {
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| CliError::Failed(format!("subscribe: {e}")))?;
    client
        .publish_with_reply(format!("$SRV.STATS.{SERVICE_NAME}"), inbox, "".into())
        .await
        .map_err(|e| CliError::Failed(format!("publish: {e}")))?;
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

/// The report as a bucket summary and a table of workers.
pub fn render(report: &Report, bucket: &str) -> String {
    let mut out = String::new();
    match &report.bucket {
        Some(b) => out.push_str(&format!(
            "Bucket {}: {} keys, {} bytes, max age {}, {} replica(s), {} storage\n\n",
            b.bucket,
            b.keys,
            b.bytes,
            humantime::format_duration(Duration::from_secs(b.max_age_secs)),
            b.replicas,
            b.storage
        )),
        None => out.push_str(&format!("Bucket {bucket}: does not exist yet\n\n")),
    }
    if let Some(tenants) = &report.tenants {
        out.push_str("Keys per tenant:\n");
        for (tenant, keys) in tenants {
            let name = if tenant.is_empty() { "(none)" } else { tenant };
            out.push_str(&format!("  {name}: {keys}\n"));
        }
        out.push('\n');
    }
    if report.workers.is_empty() {
        out.push_str("No idemq worker answered.\n");
        return out;
    }
    let mut table = comfy_table::Table::new();
    let names = Snapshot::default().counters().map(|(name, _)| name);
    table
        .load_style(comfy_table::presets::NOTHING)
        .set_header(std::iter::once("WORKER").chain(names));
    let row = |name: &str, s: &Snapshot| {
        let values = s.counters().map(|(_, value)| value.to_string());
        std::iter::once(name.to_owned()).chain(values)
    };
    for worker in &report.workers {
        table.add_row(row(&worker.id, &worker.stats));
    }
    if report.workers.len() > 1 {
        table.add_row(row("total", &report.total));
    }
    for column in table.column_iter_mut().skip(1) {
        column.set_cell_alignment(comfy_table::CellAlignment::Right);
    }
    out.push_str(&table.to_string());
    out.push('\n');
    out
}

/// `idemq purge KEY`: removes the record and tells every worker to drop
/// it from its cache, so the next copy executes again. A claim whose
/// execution still runs is left alone unless `--force`: purging it would
/// let a copy execute beside the running one.
pub async fn purge(args: &PurgeArgs) -> Result<ExitCode, CliError> {
    let key = crate::cli::key_in(&args.key, args.tenant.as_deref())?;
    let (client, store) = args.at.open().await?;
    let seen = store
        .read(&key)
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let revision = match seen {
        Some(Versioned {
            revision,
            slot: Slot::Record(record),
        }) => {
            if record.state == RecordState::InProgress && !args.force {
                return Err(CliError::Failed(format!(
                    "{key} is being executed (lease until {}); --force purges it anyway",
                    record.expires_at.to_rfc3339()
                )));
            }
            revision
        }
        _ => {
            eprintln!("no record under {key}");
            return Ok(ExitCode::from(1));
        }
    };
    // Only what was just read and judged is purged: a claim made since
    // (the record expired, a copy executes) makes this a conflict.
    match crate::cache::purge(&client, &store, &args.at.bucket, &key, revision).await {
        Ok(()) => {}
        Err(StoreError::Conflict) => {
            return Err(CliError::Failed(format!(
                "{key} changed since it was read; nothing purged (run purge again to see it)"
            )))
        }
        Err(error) => return Err(CliError::Failed(error.to_string())),
    }
    println!(
        "purged {key}; workers notified on {}",
        crate::cache::purge_subject(&args.at.bucket)
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_every_counter_and_a_saturating_total() {
        let worker = |id: &str, received| WorkerStats {
            id: id.to_owned(),
            version: String::new(),
            started: String::new(),
            stats: Snapshot {
                received,
                executed: 2,
                in_flight: 1,
                ..Snapshot::default()
            },
        };
        let report = Report::new(None, vec![worker("b", 5), worker("a", u64::MAX)]);
        let total = report.total;
        assert_eq!(total.received, u64::MAX, "a worker's huge count saturates");
        assert_eq!((total.executed, total.in_flight), (4, 2));
        let text = render(&report, "B");
        let lines: Vec<&str> = text.lines().collect();
        let header: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(header.len(), 13, "{text}");
        assert_eq!(header[0], "WORKER");
        assert_eq!(header[9], "STORE_ERR");
        assert!(
            lines[3].trim_start().starts_with("a "),
            "sorted by id: {text}"
        );
        let total_row: Vec<&str> = lines[5].split_whitespace().collect();
        assert_eq!(total_row[0], "total", "{text}");
        assert_eq!(total_row[1], u64::MAX.to_string());
        assert_eq!(total_row[2], "4");
        assert_eq!(total_row[12], "2");
    }
}

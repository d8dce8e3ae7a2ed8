//! `idemq get`, `stats`, `purge` and `healthcheck`: the flags, and how
//! their results are printed ([`crate::admin`] fetches them).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use async_nats::Client;
use clap::builder::BoolishValueParser;
use clap::Args;

use super::{connect, CliError};
use crate::admin::{Purged, Report};
use crate::key::IdempotencyKey;
use crate::nats::NatsArgs;
use crate::stats::Snapshot;
use crate::store::kv::KvStore;
use crate::store::ClaimProtocol;

/// Where stored outcomes are: the servers and the bucket (for `get`,
/// `stats`, `purge`).
#[derive(Debug, Args)]
pub struct BucketArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub nats: NatsArgs,
    /// The bucket.
    #[arg(long, env = "IDEMQ_BUCKET", default_value = crate::store::kv::DEFAULT_BUCKET)]
    pub bucket: String,
}

impl BucketArgs {
    /// Connects and opens the existing bucket.
    pub async fn open(&self) -> Result<(Client, KvStore), CliError> {
        let client = connect(&self.nats).await?;
        let store = KvStore::existing(async_nats::jetstream::new(client.clone()), &self.bucket)
            .await
            .map_err(crate::admin::AdminError::Store)?;
        Ok((client, store))
    }
}

/// `idemq get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// The idempotency key.
    pub key: String,
    /// The tenant whose key it is (workers run with --tenant-token).
    #[arg(long, env = "IDEMQ_TENANT")]
    pub tenant: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub at: BucketArgs,
}

/// `idemq stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub at: BucketArgs,
    /// How long to collect the workers' answers.
    #[arg(long, env = "IDEMQ_TIMEOUT", default_value = "1s", value_parser = crate::config::duration_up_to_a_day)]
    pub timeout: Duration,
    /// Print JSON instead of a table.
    #[arg(long, env = "IDEMQ_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
    /// Also count the bucket's keys per tenant.
    #[arg(long, env = "IDEMQ_TENANTS", value_parser = BoolishValueParser::new())]
    pub tenants: bool,
}

/// `idemq purge`.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// The idempotency key whose outcome to remove.
    pub key: String,
    /// The tenant whose key it is (workers run with --tenant-token).
    #[arg(long, env = "IDEMQ_TENANT")]
    pub tenant: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub at: BucketArgs,
    /// Also remove a claim whose execution is still running (a copy may
    /// then execute beside it).
    #[arg(long, env = "IDEMQ_FORCE", value_parser = BoolishValueParser::new())]
    pub force: bool,
}

/// `idemq healthcheck`.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The worker's --metrics-addr (`0.0.0.0` is dialled on loopback).
    #[arg(long, env = "IDEMQ_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    /// Ask /readyz (NATS and the bucket reachable) instead of /healthz.
    #[arg(long, env = "IDEMQ_READY", value_parser = BoolishValueParser::new())]
    pub ready: bool,
    /// How long to wait for the answer.
    #[arg(long, env = "IDEMQ_TIMEOUT", default_value = "3s", value_parser = crate::config::duration_up_to_a_day)]
    pub timeout: Duration,
}

/// The KV key `idemq get`/`purge` name: `key`, in `tenant`'s scope if given.
fn key_in(key: &str, tenant: Option<&str>) -> Result<IdempotencyKey, CliError> {
    let key = IdempotencyKey::parse(key).map_err(|e| CliError::Usage(e.to_string()))?;
    match tenant {
        None => Ok(key),
        Some(tenant) => key.in_tenant(tenant).ok_or_else(|| {
            CliError::Usage(format!(
                "--tenant {tenant:?} is not a tenant name (1 or more of [A-Za-z0-9_=-])"
            ))
        }),
    }
}

/// Runs `idemq get`.
pub(super) async fn get(args: GetArgs) -> Result<ExitCode, CliError> {
    let key = key_in(&args.key, args.tenant.as_deref())?;
    let (_client, store) = args.at.open().await?;
    match store.get(&key).await {
        Ok(Some(record)) => {
            let json = serde_json::to_string_pretty(&record)
                .map_err(|e| CliError::Output(e.to_string()))?;
            println!("{json}");
            Ok(ExitCode::SUCCESS)
        }
        Ok(None) => {
            eprintln!("no record under {key}");
            Ok(ExitCode::from(1))
        }
        Err(error) => Err(crate::admin::AdminError::Store(error).into()),
    }
}

/// Runs `idemq stats`.
pub(super) async fn stats(args: &StatsArgs) -> Result<ExitCode, CliError> {
    let client: Client = connect(&args.at.nats).await?;
    let report = crate::admin::stats(&client, &args.at.bucket, args.timeout, args.tenants).await?;
    if args.json {
        let json =
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Output(e.to_string()))?;
        println!("{json}");
    } else {
        print!("{}", render(&report, &args.at.bucket));
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `idemq purge KEY`.
pub(super) async fn purge(args: &PurgeArgs) -> Result<ExitCode, CliError> {
    let key = key_in(&args.key, args.tenant.as_deref())?;
    let (client, store) = args.at.open().await?;
    match crate::admin::purge(&client, &store, &args.at.bucket, &key, args.force).await? {
        Purged::Purged { notified_on } => {
            println!("purged {key}; workers notified on {notified_on}");
            Ok(ExitCode::SUCCESS)
        }
        Purged::Absent => {
            eprintln!("no record under {key}");
            Ok(ExitCode::from(1))
        }
    }
}

/// Runs `idemq healthcheck`.
pub(super) async fn healthcheck(args: HealthcheckArgs) -> Result<ExitCode, CliError> {
    // A blocking HTTP client, bounded by --timeout: off the runtime.
    tokio::task::spawn_blocking(move || {
        crate::http::probe(args.metrics_addr, args.ready, args.timeout)
    })
    .await
    .map_err(|e| CliError::Unhealthy(e.to_string()))?
    .map_err(CliError::Unhealthy)?;
    Ok(ExitCode::SUCCESS)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::WorkerStats;

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
        assert_eq!(header.len(), 16, "{text}");
        assert_eq!(header[0], "WORKER");
        assert_eq!(header[4], "BY_DIGEST");
        assert_eq!(header[8], "OVERLOADED");
        assert_eq!(header[11], "STORE_ERR");
        assert_eq!(header[12], "UNSTORED");
        assert!(
            lines[3].trim_start().starts_with("a "),
            "sorted by id: {text}"
        );
        let total_row: Vec<&str> = lines[5].split_whitespace().collect();
        assert_eq!(total_row[0], "total", "{text}");
        assert_eq!(total_row[1], u64::MAX.to_string());
        assert_eq!(total_row[2], "4");
        assert_eq!(total_row[15], "2");
    }
}

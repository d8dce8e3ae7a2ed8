//! `idemq serve`: the flags, and the start-up through [`Server`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::Args;
use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::config::{Delivery, JetStreamConfig, WorkerConfig};
use crate::handler::{Echo, Forward, Handler};
use crate::nats::{first_refusal, NatsArgs, Refused};
use crate::server::{cancel_on_signal, Server, ServerConfig};
use crate::store::kv::BucketConfig;

/// `idemq serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub nats: NatsArgs,
    /// Subject to take intents from; repeat for several.
    #[arg(
        long = "subject",
        env = "IDEMQ_SUBJECT",
        value_delimiter = ',',
        default_value = "intents.>"
    )]
    pub subjects: Vec<String>,
    /// Only reply to subjects matching these patterns (e.g. `results.>`,
    /// `_INBOX.>`); system subjects, wildcards, the intent subjects and every
    /// subject the worker publishes to itself (the --forward subjects,
    /// dead letters, `idemq.>`, its own inboxes) are refused whatever this
    /// says.
    #[arg(long = "reply-allow", env = "IDEMQ_REPLY_ALLOW", value_delimiter = ',')]
    pub reply_allow: Vec<String>,
    /// Scope keys by tenant: the N-th token (from 1) of an intent's subject
    /// names it, and its KV key becomes `<tenant>.<idem_key>`.
    #[arg(long, env = "IDEMQ_TENANT_TOKEN")]
    pub tenant_token: Option<usize>,
    /// Queue group shared by the workers.
    #[arg(long, env = "IDEMQ_QUEUE_GROUP", default_value = "idemq")]
    pub queue_group: String,
    /// Key-value bucket for claims and outcomes.
    #[arg(long, env = "IDEMQ_BUCKET", default_value = crate::store::kv::DEFAULT_BUCKET)]
    pub bucket: String,
    /// How long outcomes are kept (an intent's ttl_secs is clamped to it).
    #[arg(long, env = "IDEMQ_TTL", default_value = "24h", value_parser = crate::config::duration_up_to_ten_years)]
    pub ttl: Duration,
    /// Replicas of the bucket's stream.
    #[arg(long, env = "IDEMQ_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: u8,
    /// Forward intents as NATS requests to this subject template (e.g. `exec.{capability}`).
    #[arg(long, env = "IDEMQ_FORWARD")]
    pub forward: Option<String>,
    /// How long a handler may run before the outcome is Timeout.
    #[arg(long, env = "IDEMQ_HANDLER_TIMEOUT", default_value = "30s", value_parser = crate::config::duration_up_to_a_day)]
    pub handler_timeout: Duration,
    /// How long a copy waits for a running execution before IN_PROGRESS.
    #[arg(long, env = "IDEMQ_WAIT", default_value = "5s", value_parser = crate::config::duration_up_to_a_day)]
    pub wait: Duration,
    /// The claim's lease, renewed while the handler runs.
    #[arg(long, env = "IDEMQ_LEASE", default_value = "30s", value_parser = crate::config::duration_up_to_a_day)]
    pub lease: Duration,
    /// Most intents in flight at once.
    #[arg(long, env = "IDEMQ_CONCURRENCY", default_value_t = 256)]
    pub concurrency: usize,
    /// Core mode: bytes of waiting intents the worker holds; a delivery
    /// past them is answered OVERLOADED at once (e.g. `64MiB`).
    #[arg(long, env = "IDEMQ_INTAKE_BYTES", default_value = "64MiB")]
    pub intake_bytes: bytesize::ByteSize,
    /// Largest accepted payload, in bytes.
    #[arg(long, env = "IDEMQ_MAX_PAYLOAD", default_value_t = 1024 * 1024)]
    pub max_payload: usize,
    /// JetStream mode: the stream to consume (created over the subjects when missing).
    #[arg(long, env = "IDEMQ_STREAM", requires = "durable")]
    pub stream: Option<String>,
    /// JetStream mode: the durable consumer shared by the workers.
    #[arg(long, env = "IDEMQ_DURABLE", requires = "stream")]
    pub durable: Option<String>,
    /// JetStream mode: where dead letters go (default: `idemq.dlq.<stream>`)
    #[arg(long, env = "IDEMQ_DEAD_LETTER_SUBJECT", requires = "stream")]
    pub dead_letter_subject: Option<String>,
    /// JetStream mode: how long the server waits for an ack before redelivering.
    #[arg(long, env = "IDEMQ_ACK_WAIT", default_value = "30s", value_parser = crate::config::duration_up_to_a_day)]
    pub ack_wait: Duration,
    /// JetStream mode: deliveries before an intent is dead-lettered.
    #[arg(long, env = "IDEMQ_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: u32,
    /// JetStream mode: redelivery delays after ack-wait expiries, comma-separated (e.g. `1s,5s,30s`).
    #[arg(long, env = "IDEMQ_BACKOFF", value_delimiter = ',', value_parser = crate::config::duration_up_to_a_day)]
    pub backoff: Vec<Duration>,
    /// JetStream mode: unacknowledged messages the consumer may have out, across all workers.
    #[arg(long, env = "IDEMQ_MAX_ACK_PENDING", default_value_t = 1000)]
    pub max_ack_pending: u32,
    /// Memory for stored outcomes kept to answer replays without a KV read
    /// (e.g. `64MiB`; 0 turns the cache off).
    #[arg(long, env = "IDEMQ_CACHE", default_value = "64MiB")]
    pub cache: bytesize::ByteSize,
    /// How long shutdown waits for in-flight intents.
    #[arg(long, env = "IDEMQ_GRACE", default_value = "10s", value_parser = crate::config::duration_up_to_a_day)]
    pub grace: Duration,
    /// Serve /metrics, /healthz and /readyz on this address (e.g. `0.0.0.0:9464`); off by default.
    #[arg(long, env = "IDEMQ_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Read settings from this TOML file, keyed by these flags' long names
    /// (`nats-url = "..."`); flags and IDEMQ_* variables override it.
    #[arg(long, env = "IDEMQ_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (TOML, secrets masked) and exit.
    #[arg(long, env = "IDEMQ_PRINT_CONFIG", value_parser = BoolishValueParser::new())]
    pub print_config: bool,
    /// The effective configuration, rendered by [`parse_from`](super::parse_from) for `--print-config`.
    #[arg(skip)]
    pub effective_config: Option<String>,
}

impl ServeArgs {
    /// What these flags start.
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            worker: self.worker_config(),
            bucket: BucketConfig {
                bucket: self.bucket.clone(),
                replicas: usize::from(self.replicas),
            },
            metrics_addr: self.metrics_addr,
        }
    }

    /// The worker configuration these flags describe.
    pub fn worker_config(&self) -> WorkerConfig {
        WorkerConfig {
            subjects: self.subjects.clone(),
            reply_allow: self.reply_allow.clone(),
            tenant_token: self.tenant_token,
            queue_group: self.queue_group.clone(),
            ttl: self.ttl,
            handler_timeout: self.handler_timeout,
            wait: self.wait,
            lease: self.lease,
            concurrency: self.concurrency,
            intake_bytes: usize::try_from(self.intake_bytes.as_u64()).unwrap_or(usize::MAX),
            max_payload: self.max_payload,
            grace: self.grace,
            delivery: self.delivery(),
            cache_bytes: usize::try_from(self.cache.as_u64()).unwrap_or(usize::MAX),
        }
    }

    fn delivery(&self) -> Delivery {
        let (Some(stream), Some(durable)) = (&self.stream, &self.durable) else {
            return Delivery::Core;
        };
        let mut js = JetStreamConfig::new(stream, durable);
        if let Some(subject) = &self.dead_letter_subject {
            js.dead_letter_subject.clone_from(subject);
        }
        js.ack_wait = self.ack_wait;
        js.max_deliver = self.max_deliver;
        js.backoff.clone_from(&self.backoff);
        js.max_ack_pending = self.max_ack_pending;
        js.replicas = usize::from(self.replicas);
        Delivery::JetStream(js)
    }
}

/// Runs `idemq serve`: a worker until SIGINT or SIGTERM.
pub(super) async fn run(args: ServeArgs) -> Result<ExitCode, CliError> {
    let config = args.server_config();
    if let Some(text) = &args.effective_config {
        print!("{text}");
    }
    if let Err(problems) = config.worker.validate() {
        return Err(crate::server::ServeError::Config(problems).into());
    }
    if args.print_config {
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(template) = &args.forward {
        Forward::check_template(template).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    let url = args.nats.url();
    let (errors, mut server_errors) = tokio::sync::mpsc::channel(16);
    // Inboxes of the worker's own, so that no reply can be aimed at them
    // (docs/contract.md v1.2 §2); still under `_INBOX.>` for permission sets.
    let mut nats = args.nats.clone();
    nats.inbox_prefix
        .get_or_insert_with(|| format!("_INBOX.{}", nuid::next()));
    let client = crate::nats::connect_reporting(&nats, "idemq", Some(errors)).await?;
    let handler: Arc<dyn Handler> = match &args.forward {
        Some(template) => Arc::new(
            Forward::new(client.clone(), template, args.handler_timeout)
                .map_err(|e| CliError::Usage(e.to_string()))?,
        ),
        None => Arc::new(Echo),
    };
    tracing::info!(url = %crate::nats::mask_url(&url), bucket = %args.bucket, forward = ?args.forward, "idemq serving");
    let shutdown = CancellationToken::new();
    // A refused JetStream request gets no reply, only a server error: race
    // the two so a missing permission fails now, not after the timeouts.
    let server = tokio::select! {
        started = Server::start(client, handler, config, shutdown.clone()) => started?,
        Some(error) = first_refusal(&mut server_errors, Refused::Publish) => {
            // Whatever start-up had begun stops with it.
            shutdown.cancel();
            return Err(CliError::Refused(error));
        }
    };
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    let stop_on_refusal = shutdown.clone();
    let refusals = tokio::spawn(async move {
        let error = first_refusal(&mut server_errors, Refused::Subscription).await;
        if error.is_some() {
            stop_on_refusal.cancel();
        }
        error
    });
    let result = server.wait().await;
    signals.abort();
    refusals.abort();
    if let Ok(Some(error)) = refusals.await {
        return Err(CliError::Refused(error));
    }
    result?;
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn serve(args: &[&str]) -> ServeArgs {
        let argv = ["idemq", "serve"].iter().chain(args);
        match crate::cli::Cli::try_parse_from(argv)
            .expect("parses")
            .command
        {
            crate::cli::Command::Serve(args) => *args,
            other => panic!("not serve: {other:?}"),
        }
    }

    /// Each default is declared twice (clap's text, the library's value);
    /// this holds the two together.
    #[test]
    fn the_flags_defaults_are_the_librarys() {
        let defaults = serve(&[]).server_config();
        assert_eq!(defaults.worker, WorkerConfig::default());
        assert_eq!(defaults.bucket, BucketConfig::default());
        assert_eq!(defaults.metrics_addr, None);
        let durable = serve(&["--stream", "S", "--durable", "D"]).worker_config();
        assert_eq!(
            durable.delivery,
            Delivery::JetStream(JetStreamConfig::new("S", "D"))
        );
    }
}

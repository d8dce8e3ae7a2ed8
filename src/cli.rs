//! The `idemq` command line: `serve`, `send`, `key`, `get`, `bench`,
//! `stats`, `purge`, `healthcheck`.
//!
//! Flags, their `IDEMQ_*` environment variables and their defaults are
//! declared here and nowhere else; `serve --config FILE` adds a TOML layer
//! under them ([`crate::config_file`]). `main.rs` only calls [`parse_from`]
//! and [`run`].

use std::ffi::OsString;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap, RequestErrorKind};
use clap::builder::BoolishValueParser;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{ConnectError, Delivery, JetStreamConfig, NatsArgs, WorkerConfig};
use crate::config_file::{self, ConfigFile};
use crate::handler::{Echo, Forward, Handler};
use crate::intent::IDEMPOTENCY_KEY_HEADER;
use crate::key::IdempotencyKey;
use crate::store::kv::{check_server_version, BucketConfig, KvStore};
use crate::store::IdempotencyStore;
use crate::worker::Worker;

/// idemq: execute each NATS intent once per idempotency key, answer every copy alike.
#[derive(Debug, Parser)]
#[command(name = "idemq", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format: `pretty` for people, `json` for log collectors (filter with RUST_LOG).
    #[arg(long, global = true, env = "IDEMQ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
}

/// How log lines are written (to standard error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    Pretty,
    /// One JSON object per line, with the current span's fields.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a worker on the intent subjects.
    Serve(Box<ServeArgs>),
    /// Send one intent and print the reply.
    Send(SendArgs),
    /// Print the idempotency key of some inputs.
    Key(KeyArgs),
    /// Print the record stored under a key (exit status 1 when absent).
    Get(GetArgs),
    /// Measure idemq beside baselines against a nats-server.
    Bench(crate::bench::BenchArgs),
    /// Show the bucket and every running worker's counters.
    Stats(StatsArgs),
    /// Remove a stored outcome so the next copy of its intent executes again.
    Purge(PurgeArgs),
    /// Exit 0 if a worker's /healthz (or /readyz) answers 200: for container health checks.
    Healthcheck(HealthcheckArgs),
}

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
    /// `_INBOX.>`); system subjects, wildcards and the intent subjects are
    /// refused whatever this says.
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
    #[arg(long, env = "IDEMQ_BUCKET", default_value = "IDEMPOTENCY")]
    pub bucket: String,
    /// How long outcomes are kept (an intent's ttl_secs is clamped to it).
    #[arg(long, env = "IDEMQ_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Replicas of the bucket's stream.
    #[arg(long, env = "IDEMQ_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: u8,
    /// Forward intents as NATS requests to this subject template (e.g. `exec.{capability}`).
    #[arg(long, env = "IDEMQ_FORWARD")]
    pub forward: Option<String>,
    /// How long a handler may run before the outcome is Timeout.
    #[arg(long, env = "IDEMQ_HANDLER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub handler_timeout: Duration,
    /// How long a copy waits for a running execution before IN_PROGRESS.
    #[arg(long, env = "IDEMQ_WAIT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// The claim's lease, renewed while the handler runs.
    #[arg(long, env = "IDEMQ_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
    /// Most intents in flight at once.
    #[arg(long, env = "IDEMQ_CONCURRENCY", default_value_t = 256)]
    pub concurrency: usize,
    /// Largest accepted payload, in bytes.
    #[arg(long, env = "IDEMQ_MAX_PAYLOAD", default_value_t = 1024 * 1024)]
    pub max_payload: usize,
    /// JetStream mode: the stream to consume (created over the subjects when missing).
    #[arg(long, env = "IDEMQ_STREAM", requires = "durable")]
    pub stream: Option<String>,
    /// JetStream mode: the durable consumer shared by the workers.
    #[arg(long, env = "IDEMQ_DURABLE", requires = "stream")]
    pub durable: Option<String>,
    /// JetStream mode: where dead letters go [default: idemq.dlq.<stream>]
    #[arg(long, env = "IDEMQ_DEAD_LETTER_SUBJECT", requires = "stream")]
    pub dead_letter_subject: Option<String>,
    /// JetStream mode: how long the server waits for an ack before redelivering.
    #[arg(long, env = "IDEMQ_ACK_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ack_wait: Duration,
    /// JetStream mode: deliveries before an intent is dead-lettered.
    #[arg(long, env = "IDEMQ_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: u32,
    /// JetStream mode: redelivery delays after ack-wait expiries, comma-separated (e.g. `1s,5s,30s`).
    #[arg(long, env = "IDEMQ_BACKOFF", value_delimiter = ',', value_parser = humantime::parse_duration)]
    pub backoff: Vec<Duration>,
    /// JetStream mode: unacknowledged messages the consumer may have out, across all workers.
    #[arg(long, env = "IDEMQ_MAX_ACK_PENDING", default_value_t = 1000)]
    pub max_ack_pending: u32,
    /// Memory for stored outcomes kept to answer replays without a KV read
    /// (e.g. `64MiB`; 0 turns the cache off).
    #[arg(long, env = "IDEMQ_CACHE", default_value = "14MiB")]
    pub cache: bytesize::ByteSize,
    /// How long shutdown waits for in-flight intents.
    #[arg(long, env = "IDEMQ_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
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
    /// The effective configuration, rendered by [`parse_from`] for `--print-config`.
    #[arg(skip)]
    pub effective_config: Option<String>,
}

impl ServeArgs {
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
            max_payload: self.max_payload,
            grace: self.grace,
            delivery: self.delivery(),
            bucket: self.bucket.clone(),
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

/// `idemq send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Subject to send the intent to (e.g. `intents.echo`).
    pub subject: String,
    /// The intent JSON, or `-` to read it from standard input.
    pub json: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub nats: NatsArgs,
    /// Send this Idempotency-Key header.
    #[arg(long, env = "IDEMQ_KEY")]
    pub key: Option<String>,
    /// How long to wait for each reply.
    #[arg(long, env = "IDEMQ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Resend the same intent (same key) this many times after a timeout.
    #[arg(long, env = "IDEMQ_RETRIES", default_value_t = 0)]
    pub retries: u32,
}

/// `idemq key`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["run_id", "intent_id"])))]
pub struct KeyArgs {
    /// Derive from a run id: generate(run_id, episode, step).
    #[arg(long, env = "IDEMQ_RUN_ID", conflicts_with_all = ["intent_id", "actor"])]
    pub run_id: Option<String>,
    /// Derive from intent metadata (with --actor).
    #[arg(long, env = "IDEMQ_INTENT_ID", requires = "actor")]
    pub intent_id: Option<String>,
    /// The actor (with --intent-id).
    #[arg(long, env = "IDEMQ_ACTOR", requires = "intent_id")]
    pub actor: Option<String>,
    /// The episode.
    #[arg(long, env = "IDEMQ_EPISODE")]
    pub episode: String,
    /// The step index.
    #[arg(long, env = "IDEMQ_STEP", default_value_t = 0)]
    pub step: u32,
}

/// Where stored outcomes are: the servers and the bucket (for `get`,
/// `stats`, `purge`).
#[derive(Debug, Args)]
pub struct BucketArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub nats: NatsArgs,
    /// The bucket.
    #[arg(long, env = "IDEMQ_BUCKET", default_value = "IDEMPOTENCY")]
    pub bucket: String,
}

impl BucketArgs {
    /// Connects and opens the existing bucket.
    pub async fn open(&self) -> Result<(Client, KvStore), CliError> {
        let client = connect(&self.nats).await?;
        let store = KvStore::existing(async_nats::jetstream::new(client.clone()), &self.bucket)
            .await
            .map_err(|e| CliError::Failed(e.to_string()))?;
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
    #[arg(long, env = "IDEMQ_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
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
    #[arg(long, env = "IDEMQ_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// A failure of a subcommand, with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line did not parse, or asked for help or the version:
    /// clap prints it and picks the exit status.
    #[error("{0}")]
    Clap(#[from] clap::Error),
    /// A usage or configuration error: exit status 2.
    #[error("{0}")]
    Usage(String),
    /// Anything else: exit status 1.
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// The process exit status.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Clap(error) => ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2)),
            CliError::Usage(_) => ExitCode::from(2),
            CliError::Failed(_) => ExitCode::from(1),
        }
    }
}

/// Parses a command line (the program name first). For `serve --config
/// FILE`, the file's settings are merged under flags and variables (see
/// [`crate::config_file`]), and `--print-config` gets its text.
pub fn parse_from<I, T>(args: I) -> Result<Cli, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut argv: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut command = Cli::command();
    command.build();
    let mut matches = command.clone().try_get_matches_from(&argv)?;
    let mut from_file = Vec::new();
    if let Some(("serve", serve)) = matches.subcommand() {
        if let Some(path) = serve.get_one::<PathBuf>("config") {
            let file = ConfigFile::load(path).map_err(|e| CliError::Usage(e.to_string()))?;
            let serve_command = serve_command(&command)?;
            let extra = file
                .as_args(serve_command, serve)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            argv.extend(extra.args);
            from_file = extra.keys;
            matches = command.clone().try_get_matches_from(&argv)?;
        }
    }
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let (Command::Serve(args), Some(("serve", serve))) = (&mut cli.command, matches.subcommand())
    {
        if args.print_config {
            let (url, source) = args.nats.url_with_source();
            let resolved = [("nats-url", url, source)];
            args.effective_config = Some(config_file::render(
                serve_command(&command)?,
                serve,
                &from_file,
                &resolved,
            ));
        }
    }
    Ok(cli)
}

fn serve_command(command: &clap::Command) -> Result<&clap::Command, CliError> {
    command
        .find_subcommand("serve")
        .ok_or_else(|| CliError::Failed("the serve subcommand is missing".to_owned()))
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Send(args) => send(args).await,
        Command::Key(args) => {
            let key = match (&args.run_id, &args.intent_id, &args.actor) {
                (Some(run_id), _, _) => IdempotencyKey::generate(run_id, &args.episode, args.step),
                (None, Some(intent_id), Some(actor)) => IdempotencyKey::from_intent_metadata(
                    intent_id,
                    actor,
                    &args.episode,
                    Some(args.step),
                ),
                _ => {
                    return Err(CliError::Usage(
                        "give --run-id, or --intent-id with --actor".to_owned(),
                    ))
                }
            };
            println!("{key}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Get(args) => get(args).await,
        Command::Stats(args) => crate::admin::stats(&args).await,
        Command::Purge(args) => crate::admin::purge(&args).await,
        Command::Healthcheck(args) => {
            // A blocking HTTP client, bounded by --timeout: off the runtime.
            tokio::task::spawn_blocking(move || {
                crate::http::probe(args.metrics_addr, args.ready, args.timeout)
            })
            .await
            .map_err(|e| CliError::Failed(e.to_string()))?
            .map_err(CliError::Failed)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => crate::bench::command(&args).await.map_err(|e| match e {
            crate::bench::BenchError::Usage(text) => CliError::Usage(text),
            other => CliError::Failed(other.to_string()),
        }),
    }
}

/// Connects (see [`crate::config::connect`]): unusable authentication
/// flags are a usage error (exit status 2), anything else exit status 1.
pub async fn connect(nats: &NatsArgs) -> Result<Client, CliError> {
    crate::config::connect(nats, "idemq")
        .await
        .map_err(connect_failure)
}

fn connect_failure(error: ConnectError) -> CliError {
    match error {
        ConnectError::Auth(auth) => CliError::Usage(auth.to_string()),
        other => CliError::Failed(other.to_string()),
    }
}

/// A permission the server refused `serve`: the worker cannot do its job
/// with it missing, so it stops rather than idle or answer half the time.
fn refused(error: &async_nats::ServerError) -> CliError {
    CliError::Failed(format!(
        "the NATS server refused a permission idemq needs ({error}); \
         deploy/nats-auth/ lists what the worker's user must be allowed"
    ))
}

/// What a permission the server refused stops.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// A publish: fatal at start-up (the bucket cannot be set up), one
    /// intent's problem afterwards (logged).
    Publish,
    /// A subscription: intents, replies, watches or purge notices would
    /// never arrive, so the worker is useless at any time.
    Subscription,
}

/// The kind of permission violation a server error reports, if it is one.
fn refused_kind(error: &async_nats::ServerError) -> Option<Refused> {
    let async_nats::ServerError::Other(text) = error else {
        return None;
    };
    let text = text.to_ascii_lowercase();
    if text.contains("permissions violation for subscription") {
        Some(Refused::Subscription)
    } else if text.contains("permissions violation") {
        Some(Refused::Publish)
    } else {
        None
    }
}

/// The first refusal of at least `kind` that `server_errors` reports
/// (`Publish` takes either); `None` once the connection is gone.
async fn first_refusal(
    server_errors: &mut tokio::sync::mpsc::Receiver<async_nats::ServerError>,
    kind: Refused,
) -> Option<async_nats::ServerError> {
    while let Some(error) = server_errors.recv().await {
        match refused_kind(&error) {
            Some(found) if kind == Refused::Publish || found == kind => return Some(error),
            _ => {}
        }
    }
    None
}

async fn serve(args: ServeArgs) -> Result<ExitCode, CliError> {
    let config = args.worker_config();
    if let Some(text) = &args.effective_config {
        print!("{text}");
    }
    if let Err(problems) = config.validate() {
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return Err(CliError::Usage(text.join("\n")));
    }
    if args.print_config {
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(template) = &args.forward {
        Forward::check_template(template).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    let url = args.nats.url();
    let (errors, mut server_errors) = tokio::sync::mpsc::channel(16);
    let capacity = Some(config.subscription_capacity());
    let client = crate::config::connect_reporting(&args.nats, "idemq", Some(errors), capacity)
        .await
        .map_err(connect_failure)?;
    let handler: Arc<dyn Handler> = match &args.forward {
        Some(template) => Arc::new(
            Forward::new(client.clone(), template, args.handler_timeout)
                .map_err(|e| CliError::Usage(e.to_string()))?,
        ),
        None => Arc::new(Echo),
    };
    check_server_version(&client).map_err(|e| CliError::Failed(e.to_string()))?;
    let bucket = BucketConfig {
        bucket: args.bucket.clone(),
        replicas: usize::from(args.replicas),
    };
    // A refused JetStream request gets no reply, only a server error: race
    // the two so a missing permission fails now, not after the timeouts.
    let store = tokio::select! {
        store = KvStore::open(async_nats::jetstream::new(client.clone()), &bucket) => {
            store.map_err(|e| CliError::Failed(e.to_string()))?
        }
        Some(error) = first_refusal(&mut server_errors, Refused::Publish) => {
            return Err(refused(&error))
        }
    };
    let store: Arc<dyn IdempotencyStore> = Arc::new(store);
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    let stop_on_refusal = shutdown.clone();
    let refusals = tokio::spawn(async move {
        let error = first_refusal(&mut server_errors, Refused::Subscription).await;
        if error.is_some() {
            stop_on_refusal.cancel();
        }
        error
    });
    tracing::info!(url = %crate::auth::mask_url(&url), bucket = %args.bucket, forward = ?args.forward, "idemq serving");
    let worker = Worker::new(client.clone(), Arc::clone(&store), handler, config);
    // The endpoints outlive intake: during the grace period /healthz still
    // answers and /readyz says the worker is stopping.
    let endpoints_stop = CancellationToken::new();
    let endpoints = match args.metrics_addr {
        Some(addr) => {
            let listener = crate::http::bind(addr)
                .await
                .map_err(|e| CliError::Usage(format!("--metrics-addr {addr}: {e}")))?;
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            let readiness = crate::http::Readiness::new(client, store, shutdown.clone());
            Some(tokio::spawn(crate::http::serve(
                listener,
                worker.stats(),
                readiness,
                endpoints_stop.clone(),
            )))
        }
        None => None,
    };
    let result = worker.run(shutdown.clone()).await;
    signals.abort();
    endpoints_stop.cancel();
    if let Some(endpoints) = endpoints {
        // Graceful: in-flight scrapes finish; a client that holds its
        // connection open does not hold up the exit.
        let mut endpoints = endpoints;
        match tokio::time::timeout(ENDPOINTS_STOP_BOUND, &mut endpoints).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "metrics endpoint failed"),
            Ok(Err(error)) => tracing::warn!(%error, "metrics endpoint task failed"),
            Err(_) => {
                tracing::warn!("metrics endpoint still had connections open; closing them");
                endpoints.abort();
            }
        }
    }
    refusals.abort();
    if let Ok(Some(error)) = refusals.await {
        return Err(refused(&error));
    }
    result.map_err(|e| CliError::Failed(e.to_string()))?;
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

/// How long the exit waits for the metrics endpoint's open connections.
const ENDPOINTS_STOP_BOUND: Duration = Duration::from_secs(2);

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
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

async fn send(args: SendArgs) -> Result<ExitCode, CliError> {
    let payload = match args.json.as_deref() {
        None => "{}".to_owned(),
        Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::Usage(format!("cannot read the intent from stdin: {e}")))?;
            text
        }
        Some(json) => json.to_owned(),
    };
    let mut headers = HeaderMap::new();
    if let Some(key) = &args.key {
        let key = IdempotencyKey::parse(key).map_err(|e| CliError::Usage(e.to_string()))?;
        headers.insert(IDEMPOTENCY_KEY_HEADER, key.as_str());
    }
    let client = connect(&args.nats).await?;
    for attempt in 0..=args.retries {
        let request = async_nats::Request::new()
            .payload(payload.clone().into())
            .headers(headers.clone())
            .timeout(Some(args.timeout));
        match client.send_request(args.subject.clone(), request).await {
            Ok(reply) => {
                println!("{}", String::from_utf8_lossy(&reply.payload));
                return Ok(ExitCode::SUCCESS);
            }
            Err(error) if error.kind() == RequestErrorKind::TimedOut => {
                eprintln!(
                    "no reply within {} (attempt {} of {})",
                    humantime::format_duration(args.timeout),
                    attempt + 1,
                    u64::from(args.retries) + 1
                );
            }
            Err(error) if error.kind() == RequestErrorKind::NoResponders => {
                return Err(CliError::Failed(format!(
                    "no worker is listening on {}",
                    args.subject
                )));
            }
            Err(error) => return Err(CliError::Failed(format!("request failed: {error}"))),
        }
    }
    Err(CliError::Failed("no reply; gave up".to_owned()))
}

/// The KV key `idemq get`/`purge` name: `key`, in `tenant`'s scope if given.
pub(crate) fn key_in(key: &str, tenant: Option<&str>) -> Result<IdempotencyKey, CliError> {
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

async fn get(args: GetArgs) -> Result<ExitCode, CliError> {
    let key = key_in(&args.key, args.tenant.as_deref())?;
    let (_client, store) = args.at.open().await?;
    match store.get(&key).await {
        Ok(Some(record)) => {
            let json = serde_json::to_string_pretty(&record)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            println!("{json}");
            Ok(ExitCode::SUCCESS)
        }
        Ok(None) => {
            eprintln!("no record under {key}");
            Ok(ExitCode::from(1))
        }
        Err(error) => Err(CliError::Failed(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// The contract: every flag can also come from the environment as
    /// `IDEMQ_<FLAG>` (`NATS_URL` is an extra fallback of `--nats-url`).
    #[test]
    fn every_flag_reads_its_idemq_variable() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for command in std::iter::once(&cli).chain(cli.get_subcommands()) {
            for arg in command.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if matches!(long, "help" | "version") {
                    continue;
                }
                let wanted = format!("IDEMQ_{}", long.to_uppercase().replace('-', "_"));
                if arg.get_env().and_then(|v| v.to_str()) != Some(wanted.as_str()) {
                    missing.push(format!("{} --{long} (wants {wanted})", command.get_name()));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "flags without their variable:\n{}",
            missing.join("\n")
        );
    }
}

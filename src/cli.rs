//! The `idemq` command line: `serve`, `send`, `key`, `get`, `bench`.
//!
//! Flags, their `IDEMQ_*` environment variables and their defaults are
//! declared here and nowhere else; `main.rs` only parses and calls [`run`].

use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap, RequestErrorKind};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{ConnectError, Delivery, JetStreamConfig, NatsArgs, WorkerConfig};
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
    /// Stored outcomes kept in memory to answer replays without a KV read (0: off).
    #[arg(long, env = "IDEMQ_CACHE", default_value_t = 10_000)]
    pub cache: usize,
    /// How long shutdown waits for in-flight intents.
    #[arg(long, env = "IDEMQ_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
}

impl ServeArgs {
    /// The worker configuration these flags describe.
    pub fn worker_config(&self) -> WorkerConfig {
        WorkerConfig {
            subjects: self.subjects.clone(),
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
            cache_capacity: self.cache,
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

/// `idemq get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// The idempotency key.
    pub key: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub nats: NatsArgs,
    /// The bucket.
    #[arg(long, env = "IDEMQ_BUCKET", default_value = "IDEMPOTENCY")]
    pub bucket: String,
}

/// A failure of a subcommand, with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
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
            CliError::Usage(_) => ExitCode::from(2),
            CliError::Failed(_) => ExitCode::from(1),
        }
    }
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

/// Whether the server refused a publish or a subscription.
fn is_refusal(error: &async_nats::ServerError) -> bool {
    matches!(error, async_nats::ServerError::Other(text)
        if text.to_ascii_lowercase().contains("permissions violation"))
}

/// Whether a server error, after start-up, makes the worker useless: a
/// refused subscription (intents, replies, watches or purge notices never
/// arrive). A refused publish is one intent's problem, and is logged.
fn is_fatal(error: &async_nats::ServerError) -> bool {
    matches!(error, async_nats::ServerError::Other(text)
        if text.to_ascii_lowercase().contains("permissions violation for subscription"))
}

/// The first refusal `server_errors` reports; pending forever if none comes.
async fn first_refusal(
    server_errors: &mut tokio::sync::mpsc::Receiver<async_nats::ServerError>,
) -> async_nats::ServerError {
    while let Some(error) = server_errors.recv().await {
        if is_refusal(&error) {
            return error;
        }
    }
    std::future::pending().await
}

async fn serve(args: ServeArgs) -> Result<ExitCode, CliError> {
    let config = args.worker_config();
    if let Err(problems) = config.validate() {
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return Err(CliError::Usage(text.join("\n")));
    }
    if let Some(template) = &args.forward {
        Forward::check_template(template).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    let url = args.nats.url();
    let (errors, mut server_errors) = tokio::sync::mpsc::channel(16);
    let client = crate::config::connect_reporting(&args.nats, "idemq", Some(errors))
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
        error = first_refusal(&mut server_errors) => return Err(refused(&error)),
    };
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    let stop_on_refusal = shutdown.clone();
    let refusals = tokio::spawn(async move {
        while let Some(error) = server_errors.recv().await {
            if is_fatal(&error) {
                stop_on_refusal.cancel();
                return Some(error);
            }
        }
        None
    });
    tracing::info!(url = %url, bucket = %args.bucket, forward = ?args.forward, "idemq serving");
    let result = Worker::new(client, Arc::new(store), handler, config)
        .run(shutdown)
        .await;
    signals.abort();
    refusals.abort();
    if let Ok(Some(error)) = refusals.await {
        return Err(refused(&error));
    }
    result.map_err(|e| CliError::Failed(e.to_string()))?;
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

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
                    args.retries + 1
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

async fn get(args: GetArgs) -> Result<ExitCode, CliError> {
    let key = IdempotencyKey::parse(&args.key).map_err(|e| CliError::Usage(e.to_string()))?;
    let client = connect(&args.nats).await?;
    let store = KvStore::existing(async_nats::jetstream::new(client), &args.bucket)
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
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

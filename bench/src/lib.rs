//! `idemq-bench`: idemq measured beside baselines, in one run, on one server.
//!
//! A throughput figure alone says little: 4000 intents a second is fast on
//! one machine and slow on another. So every idemq figure comes with
//! baselines measured in the same run, against the same nats-server, with
//! the same client concurrency, payload size and message count, all as
//! request/reply through the server so the topology matches idemq's:
//!
//! * (a) [`names::A_ECHO`]: a responder that replies with the payload;
//! * (b) [`names::B_CREATE_UPDATE`]: the least KV work any correct
//!   implementation needs: create the key, run the handler, update the key
//!   with the outcome, reply;
//! * (c) [`names::C_GET`]: one KV get of a stored outcome, then the reply;
//! * (d) [`names::D_NAIVE_FRESH`], [`names::D_NAIVE_STORM`]: the worker most
//!   people would write from the seed (get, run, put, reply; no claim).
//!
//! idemq (the echo handler; in process, or an external worker with
//! `--target`) runs all-fresh keys, the same keys again (all replayed), and
//! a retry storm in which every key is sent by `--copies` concurrent copies.
//! Two paced passes, idemq fresh and (b), offer half of idemq's all-fresh
//! throughput to compare their p99; a last pass saturates idemq at
//! `--rss-concurrency` requests in flight for the peak-RSS target.
//!
//! `--mode jetstream` measures idemq's durable JetStream mode instead: the
//! load publishes each intent into a work-queue stream (awaiting the
//! PubAck) with `Idem-Reply-To` naming a reply subject of its own, and
//! waits for the reply there. Beside idemq (fresh, replayed, storm) run
//! two pull-consumer baselines, each on a stream of its own:
//!
//! * (e) [`names::E_PULL_ECHO`]: reply with the payload to `Idem-Reply-To`, ack;
//! * (f) [`names::F_PULL_CREATE_UPDATE`]: (b)'s work (create, run, update,
//!   reply), then the ack.
//!
//! The load generator ([`load`]) runs on a thread, a runtime and a
//! connection of its own, as a separate client process would; the
//! responders ([`responders`]) take requests through the worker's own
//! intake bound. CPU time and peak RSS come from `/proc` ([`usage`]).

mod load;
mod plot;
mod report;
mod responders;
mod usage;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::Client;
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use idemq::config::{Delivery, JetStreamConfig};
use idemq::nats::{ConnectError, NatsArgs};

pub use report::{Latency, Ratio, Report, Scenario, Settings, Target};

use load::{Job, LoadGenerator, Measured, Via};
use names::{
    A_ECHO, B_CREATE_UPDATE, B_PACED, C_GET, D_NAIVE_FRESH, D_NAIVE_STORM, E_PULL_ECHO,
    F_PULL_CREATE_UPDATE, IDEMQ_FRESH, IDEMQ_JS_FRESH, IDEMQ_JS_REPLAYED, IDEMQ_JS_STORM,
    IDEMQ_PACED, IDEMQ_REPLAYED, IDEMQ_SATURATED, IDEMQ_STORM,
};
use responders::{Baseline, Responder};

/// The passes' names, as the report and its ratios refer to them.
pub mod names {
    /// (a) The echo responder, all-fresh keys.
    pub const A_ECHO: &str = "a-echo";
    /// (b) Create, run, update, reply; all-fresh keys.
    pub const B_CREATE_UPDATE: &str = "b-create-update";
    /// (c) One get of an outcome (b) stored, then the reply.
    pub const C_GET: &str = "c-get";
    /// (d) The naive worker on all-fresh keys.
    pub const D_NAIVE_FRESH: &str = "d-naive-fresh";
    /// (d) The naive worker on the retry storm.
    pub const D_NAIVE_STORM: &str = "d-naive-storm";
    /// idemq on all-fresh keys.
    pub const IDEMQ_FRESH: &str = "idemq-fresh";
    /// idemq on the all-fresh keys again: every one replayed.
    pub const IDEMQ_REPLAYED: &str = "idemq-replayed";
    /// idemq on the retry storm.
    pub const IDEMQ_STORM: &str = "idemq-storm";
    /// idemq on fresh keys, paced at half of its all-fresh throughput.
    pub const IDEMQ_PACED: &str = "idemq-fresh-paced";
    /// (b) on fresh keys, paced at the same rate.
    pub const B_PACED: &str = "b-create-update-paced";
    /// idemq on fresh keys at `--rss-concurrency` (when above `--concurrency`).
    pub const IDEMQ_SATURATED: &str = "idemq-fresh-saturated";
    /// (e) `--mode jetstream`: a pull consumer replying with the payload, then acking.
    pub const E_PULL_ECHO: &str = "e-pull-echo";
    /// (f) `--mode jetstream`: a pull consumer doing (b)'s work, then acking.
    pub const F_PULL_CREATE_UPDATE: &str = "f-pull-create-update";
    /// idemq in JetStream mode on all-fresh keys.
    pub const IDEMQ_JS_FRESH: &str = "idemq-js-fresh";
    /// idemq in JetStream mode on the fresh keys again: every one replayed.
    pub const IDEMQ_JS_REPLAYED: &str = "idemq-js-replayed";
    /// idemq in JetStream mode on the retry storm.
    pub const IDEMQ_JS_STORM: &str = "idemq-js-storm";
}

/// What a run measures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Core request/reply: idemq beside baselines (a) to (d).
    #[default]
    Core,
    /// idemq's durable JetStream mode beside pull-consumer baselines (e), (f).
    #[value(name = "jetstream")]
    #[serde(rename = "jetstream")]
    JetStream,
}

/// How often the progress line is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How often the progress line is repeated when stderr is not a terminal.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(10);
/// Most warm-up requests sent to a responder before its passes.
const MAX_WARM_UP: usize = 1000;
/// Resolution of the latency chart's curves, in points per nine.
const CURVE_STEPS_PER_NINE: u32 = 100;

/// Errors of a bench run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The options are unusable.
    #[error("{0}")]
    Usage(String),
    /// The nats-server could not be reached.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The URL tried.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// A bucket, subscription or worker could not be set up.
    #[error("cannot set up {what}: {reason}")]
    Setup {
        /// What was being set up.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// A responder never answered its readiness probe.
    #[error("nothing answers on {subject}: {reason}")]
    NotReady {
        /// The subject probed.
        subject: String,
        /// The last probe's error.
        reason: String,
    },
    /// The load generator's thread failed.
    #[error("load generator: {0}")]
    LoadGenerator(String),
    /// The chart could not be written.
    #[error("cannot write the chart to {path}: {reason}")]
    Plot {
        /// The file.
        path: String,
        /// Why it failed.
        reason: String,
    },
    /// The report could not be printed.
    #[error("cannot print the report: {0}")]
    Output(String),
}

/// `idemq-bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub nats: NatsArgs,
    /// `core`: request/reply, baselines (a) to (d); `jetstream`: intents
    /// published into streams, idemq's JetStream mode beside pull-consumer
    /// baselines (e) and (f).
    #[arg(long, env = "IDEMQ_MODE", value_enum, default_value_t = Mode::Core)]
    pub mode: Mode,
    /// Replicas of every bucket and stream the run creates (3 on a
    /// 3-node cluster).
    #[arg(long, env = "IDEMQ_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// Requests per pass.
    #[arg(long, env = "IDEMQ_COUNT", default_value_t = 20_000)]
    pub count: usize,
    /// Requests in flight in every unpaced pass.
    #[arg(long, env = "IDEMQ_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Size of each intent in bytes (padded JSON).
    #[arg(long, env = "IDEMQ_PAYLOAD", default_value_t = 128)]
    pub payload: usize,
    /// Concurrent copies of each key in the retry storm.
    #[arg(long, env = "IDEMQ_COPIES", default_value_t = 4)]
    pub copies: usize,
    /// Requests in flight in the saturated pass whose peak RSS is reported.
    #[arg(long, env = "IDEMQ_RSS_CONCURRENCY", default_value_t = 1024)]
    pub rss_concurrency: usize,
    /// Send idemq's passes to an external worker on this subject (e.g.
    /// `intents.echo`, served by `idemq serve`) instead of one in process
    /// (`--mode core` only).
    #[arg(long, env = "IDEMQ_TARGET")]
    pub target: Option<String>,
    /// With --target: the worker's process id, to read its CPU time and peak RSS.
    #[arg(long, env = "IDEMQ_WORKER_PID", requires = "target")]
    pub worker_pid: Option<u32>,
    /// The worker's `--cache` (e.g. `16MiB`): the worker in process gets
    /// it; with --target, say what the external worker has, for the peak
    /// RSS target. Default: idemq's default.
    #[arg(long, env = "IDEMQ_WORKER_CACHE")]
    pub worker_cache: Option<bytesize::ByteSize>,
    /// The nats-server's process id, to read its CPU time per request.
    #[arg(long, env = "IDEMQ_SERVER_PID")]
    pub server_pid: Option<u32>,
    /// How long each request waits for its reply.
    #[arg(long, env = "IDEMQ_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Start no request after this long; passes not reached are reported as skipped.
    #[arg(long, env = "IDEMQ_MAX_DURATION", default_value = "120s", value_parser = humantime::parse_duration)]
    pub max_duration: Duration,
    /// Print the report as JSON instead of a table.
    #[arg(long, env = "IDEMQ_JSON")]
    pub json: bool,
    /// Write the latency distributions to this SVG file.
    #[arg(long, env = "IDEMQ_PLOT", value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

impl BenchArgs {
    /// The options these flags describe.
    pub fn options(&self) -> BenchOptions {
        BenchOptions {
            mode: self.mode,
            replicas: self.replicas,
            count: self.count,
            concurrency: self.concurrency,
            payload: self.payload,
            copies: self.copies,
            rss_concurrency: self.rss_concurrency,
            target: self.target.clone(),
            worker_pid: self.worker_pid,
            worker_cache: self.worker_cache.map(|size| size.as_u64()),
            server_pid: self.server_pid,
            timeout: self.timeout,
            max_duration: self.max_duration,
        }
    }
}

/// What to measure, and within what bounds.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Core request/reply or JetStream mode.
    pub mode: Mode,
    /// Replicas of every bucket and stream the run creates.
    pub replicas: usize,
    /// Requests per pass (the storm sends `count / copies` keys, `copies` times each).
    pub count: usize,
    /// Requests in flight in every unpaced pass.
    pub concurrency: usize,
    /// Size of each intent in bytes; intents are padded up to it.
    pub payload: usize,
    /// Concurrent copies of each key in the retry storm.
    pub copies: usize,
    /// Requests in flight in the saturated pass (run only when above `concurrency`).
    pub rss_concurrency: usize,
    /// An external worker's subject; `None` runs a worker in process.
    pub target: Option<String>,
    /// The external worker's process id, for its CPU time and peak RSS.
    pub worker_pid: Option<u32>,
    /// The worker's `--cache` (the external worker's, as told); `None`:
    /// idemq's default.
    pub worker_cache: Option<u64>,
    /// The nats-server's process id, for its CPU time.
    pub server_pid: Option<u32>,
    /// How long each request waits for its reply.
    pub timeout: Duration,
    /// No request is started after this long.
    pub max_duration: Duration,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Core,
            replicas: 1,
            count: 20_000,
            concurrency: 64,
            payload: 128,
            copies: 4,
            rss_concurrency: 1024,
            target: None,
            worker_pid: None,
            worker_cache: None,
            server_pid: None,
            timeout: Duration::from_secs(5),
            max_duration: Duration::from_secs(120),
        }
    }
}

impl BenchOptions {
    /// Refuses options no run can honour.
    pub fn validate(&self) -> Result<(), BenchError> {
        let problem = if self.count == 0 {
            Some("--count must be at least 1".to_owned())
        } else if self.concurrency == 0 || self.rss_concurrency == 0 {
            Some("--concurrency and --rss-concurrency must be at least 1".to_owned())
        } else if self.copies == 0 || self.copies > self.concurrency || self.copies > self.count {
            Some("--copies must be from 1 to --concurrency and --count".to_owned())
        } else if self.timeout.is_zero() {
            Some("--timeout must be more than zero".to_owned())
        } else if !(1..=5).contains(&self.replicas) {
            Some("--replicas must be from 1 to 5".to_owned())
        } else if self.mode == Mode::JetStream && self.target.is_some() {
            Some(
                "--target is for --mode core only: --mode jetstream runs idemq in process"
                    .to_owned(),
            )
        } else if let Some(target) = self.target.as_deref() {
            (!idemq::intent::is_publish_subject(target))
                .then(|| format!("--target {target:?} is not a subject one can publish to"))
        } else {
            None
        };
        problem.map_or(Ok(()), |text| Err(BenchError::Usage(text)))
    }

    /// The in-flight bound of every responder and of the worker: never the
    /// limit, so that the client's concurrency is.
    fn responder_concurrency(&self) -> usize {
        self.concurrency.max(self.rss_concurrency)
    }
}

/// Runs `idemq-bench` from its parsed flags: the passes, then the table (or
/// JSON) on stdout and the chart, if asked for.
pub async fn command(args: &BenchArgs) -> Result<ExitCode, BenchError> {
    let options = args.options();
    options.validate()?;
    let interactive = std::io::stderr().is_terminal();
    let mut logged: Option<Instant> = None;
    let report = run(&args.nats, &options, |line| {
        if interactive {
            eprint!("\r\x1b[2K{line}");
        } else if logged.is_none_or(|at| at.elapsed() >= PROGRESS_LOG_EVERY) {
            logged = Some(Instant::now());
            eprintln!("{line}");
        }
    })
    .await;
    if interactive {
        eprint!("\r\x1b[2K");
    }
    let report = report?;
    if args.json {
        let json =
            serde_json::to_string_pretty(&report).map_err(|e| BenchError::Output(e.to_string()))?;
        println!("{json}");
    } else {
        print!("{}", report.table());
    }
    if let Some(path) = &args.plot {
        report.plot(path)?;
        eprintln!("latency chart written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

impl Report {
    /// Writes the latency distribution of every pass to an SVG file.
    pub fn plot(&self, path: &Path) -> Result<(), BenchError> {
        plot::write_svg(self, path)
    }
}

/// Runs every pass against the nats-server(s) of `nats` and reports. `progress`
/// gets a one-line status a few times a second.
///
/// Everything the run creates (subjects, streams, buckets, intent ids)
/// carries a fresh run id, so runs never see each other's keys; streams
/// and buckets are deleted when their passes are done (best effort).
pub async fn run(
    nats: &NatsArgs,
    options: &BenchOptions,
    progress: impl FnMut(&str),
) -> Result<Report, BenchError> {
    options.validate()?;
    let client = connect(nats, "idemq-bench").await?;
    idemq::store::kv::check_server_version(&client).map_err(|e| BenchError::Setup {
        what: "the benchmark".to_owned(),
        reason: e.to_string(),
    })?;
    let load = LoadGenerator::start(nats).await?;
    let run = nuid::next().to_string();
    let planned = match options.mode {
        Mode::Core => 10 + usize::from(options.concurrency < options.rss_concurrency),
        Mode::JetStream => 5,
    };
    let mut bench = Bench {
        options,
        js: jetstream::new(client.clone()),
        client,
        load,
        started: Instant::now(),
        deadline: Instant::now() + options.max_duration,
        planned,
        buckets: Vec::new(),
        streams: Vec::new(),
        report: Report {
            settings: Settings {
                mode: options.mode,
                replicas: options.replicas,
                server_version: String::new(),
                count: options.count,
                concurrency: options.concurrency,
                payload_bytes: 0,
                copies: options.copies,
                rss_concurrency: options.rss_concurrency,
                target: options.target.clone(),
                cores: std::thread::available_parallelism().map_or(1, usize::from),
                build: if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                },
                paced_rate: None,
                cache_budget_bytes: options
                    .worker_cache
                    .unwrap_or(idemq::config::WorkerConfig::default().cache_bytes as u64),
            },
            scenarios: Vec::new(),
            targets: Vec::new(),
            skipped: Vec::new(),
        },
        run,
        progress,
    };
    bench.report.settings.server_version = bench.client.server_info().version;
    bench.report.settings.payload_bytes = bench.intents("a", 1).get(0).len();
    let result = match options.mode {
        Mode::Core => bench.core().await,
        Mode::JetStream => bench.jetstream().await,
    };
    for stream in std::mem::take(&mut bench.streams) {
        responders::delete_stream(&bench.js, &stream).await;
    }
    for bucket in std::mem::take(&mut bench.buckets) {
        responders::delete_bucket(&bench.js, &bucket).await;
    }
    result?;
    bench.report.finish();
    Ok(bench.report)
}

/// Connects (see [`idemq::nats::connect`]).
async fn connect(nats: &NatsArgs, name: &str) -> Result<Client, BenchError> {
    idemq::nats::connect(nats, name).await.map_err(|e| match e {
        ConnectError::Auth(auth) => BenchError::Usage(auth.to_string()),
        other => BenchError::Connect {
            url: idemq::nats::mask_url(&nats.url()),
            reason: other.to_string(),
        },
    })
}

/// The intents of one pass, made as they are sent: a pass held in memory
/// would be counted in the peak RSS the pass measures.
#[derive(Debug, Clone)]
struct Intents {
    /// Unique per run.
    run: String,
    /// Passes with the same label send the same intents (same keys).
    label: String,
    /// Keys in the pass.
    count: usize,
    /// Bytes per intent; intents are padded up to it.
    size: usize,
}

impl Intents {
    /// Intent `index`: `{"intent_id":"<run>-<label>-<index>", ...}`, padded
    /// in `params` to the size asked for (or the least an intent takes).
    fn get(&self, index: usize) -> Bytes {
        let head = format!(
            r#"{{"intent_id":"{}-{}-{index}","actor":"bench","episode":"e","params":{{"pad":""#,
            self.run, self.label
        );
        let tail = r#""}}"#;
        let pad = self.size.saturating_sub(head.len() + tail.len());
        let mut text = String::with_capacity(head.len() + pad + tail.len());
        text.push_str(&head);
        text.extend(std::iter::repeat_n('x', pad));
        text.push_str(tail);
        Bytes::from(text)
    }
}

/// One pass to measure.
struct Pass {
    name: &'static str,
    description: &'static str,
    /// Names the keys: passes with the same label send the same intents.
    label: &'static str,
    copies: usize,
    concurrency: usize,
    /// Requests per second, for a paced pass.
    rate: Option<f64>,
}

/// A run in progress.
struct Bench<'o, P> {
    options: &'o BenchOptions,
    client: Client,
    js: jetstream::Context,
    load: LoadGenerator,
    /// Unique per run: in every subject, bucket and intent id.
    run: String,
    started: Instant,
    deadline: Instant,
    planned: usize,
    /// Buckets created and not yet deleted.
    buckets: Vec<String>,
    /// Streams created (by the bench or its worker) and not yet deleted.
    streams: Vec<String>,
    report: Report,
    progress: P,
}

/// An unpaced pass of one copy per key at `--concurrency`.
fn unpaced(
    options: &BenchOptions,
    name: &'static str,
    description: &'static str,
    label: &'static str,
) -> Pass {
    Pass {
        name,
        description,
        label,
        copies: 1,
        concurrency: options.concurrency,
        rate: None,
    }
}

impl<P: FnMut(&str)> Bench<'_, P> {
    /// Every core pass, in order; baselines first so idemq runs on a warm server.
    async fn core(&mut self) -> Result<(), BenchError> {
        let options = self.options;
        let concurrency = options.concurrency;
        let copies = options.copies;
        let unpaced = |name, description, label| unpaced(options, name, description, label);
        let storm = |name, description, label| Pass {
            copies,
            ..unpaced(name, description, label)
        };

        // (a) The floor: one request/reply round trip through the server.
        let echo = self.baseline(Baseline::Echo, "a", None).await?;
        let pass = unpaced(A_ECHO, "(a) raw echo responder", "a");
        self.measure(&echo, pass).await?;
        echo.stop().await;

        // (b), then (c) reading back the outcomes (b) stored.
        let bucket = self.bucket("b").await?;
        let create_update = self
            .baseline(Baseline::CreateUpdate, "b", Some(bucket.clone()))
            .await?;
        let pass = unpaced(
            B_CREATE_UPDATE,
            "(b) KV create, handler, update, reply",
            "b",
        );
        self.measure(&create_update, pass).await?;
        create_update.stop().await;
        let get = self.baseline(Baseline::Get, "c", Some(bucket)).await?;
        let pass = unpaced(C_GET, "(c) one KV get of a stored outcome, reply", "b");
        self.measure(&get, pass).await?;
        get.stop().await;
        self.drop_bucket("b").await;

        // (d) The naive worker, on fresh keys and on the storm.
        let bucket = self.bucket("d").await?;
        let naive = self.baseline(Baseline::Naive, "d", Some(bucket)).await?;
        let pass = unpaced(
            D_NAIVE_FRESH,
            "(d) naive get, handler, put, reply; fresh keys",
            "d",
        );
        self.measure(&naive, pass).await?;
        let pass = storm(D_NAIVE_STORM, "(d) naive worker; retry storm", "d-storm");
        self.measure(&naive, pass).await?;
        naive.stop().await;
        self.drop_bucket("d").await;

        // idemq.
        let idemq = self.idemq().await?;
        let pass = unpaced(IDEMQ_FRESH, "idemq, echo handler; fresh keys", "i");
        self.measure(&idemq, pass).await?;
        let pass = unpaced(
            IDEMQ_REPLAYED,
            "idemq; the fresh keys again, all replayed",
            "i",
        );
        self.measure(&idemq, pass).await?;
        let pass = storm(IDEMQ_STORM, "idemq; retry storm", "i-storm");
        self.measure(&idemq, pass).await?;
        let rate = self
            .report
            .scenarios
            .iter()
            .find(|s| s.name == IDEMQ_FRESH && !s.truncated)
            .map(|s| s.throughput / 2.0)
            .filter(|rate| *rate > 0.0);
        self.report.settings.paced_rate = rate;
        match rate {
            Some(rate) => {
                let pass = Pass {
                    rate: Some(rate),
                    ..unpaced(IDEMQ_PACED, "idemq; fresh keys at half its peak", "i-paced")
                };
                self.measure(&idemq, pass).await?;
            }
            None => self.report.skipped.push(IDEMQ_PACED.to_owned()),
        }
        if concurrency < self.options.rss_concurrency {
            let pass = Pass {
                concurrency: self.options.rss_concurrency,
                ..unpaced(
                    IDEMQ_SATURATED,
                    "idemq; fresh keys, saturated",
                    "i-saturated",
                )
            };
            self.measure(&idemq, pass).await?;
        }
        idemq.stop().await;
        self.drop_bucket("i").await;

        // (b) at the rate idemq was paced at.
        let Some(rate) = rate else {
            self.report.skipped.push(B_PACED.to_owned());
            return Ok(());
        };
        let bucket = self.bucket("b-paced").await?;
        let create_update = self
            .baseline(Baseline::CreateUpdate, "b-paced", Some(bucket))
            .await?;
        let pass = Pass {
            rate: Some(rate),
            ..unpaced(B_PACED, "(b) at idemq's paced rate", "b-paced")
        };
        self.measure(&create_update, pass).await?;
        create_update.stop().await;
        self.drop_bucket("b-paced").await;
        Ok(())
    }

    /// Every JetStream pass, in order; baselines first, as in core mode.
    async fn jetstream(&mut self) -> Result<(), BenchError> {
        let options = self.options;
        let unpaced = |name, description, label| unpaced(options, name, description, label);

        // (e) The floor: a pull consumer that replies and acks.
        let echo = self.pull_baseline(Baseline::Echo, "e", None).await?;
        let pass = unpaced(
            E_PULL_ECHO,
            "(e) pull consumer: reply to Idem-Reply-To, ack",
            "e",
        );
        self.measure(&echo, pass).await?;
        echo.stop().await;
        self.drop_stream("e").await;

        // (f) (b)'s work through a pull consumer.
        let bucket = self.bucket("f").await?;
        let create_update = self
            .pull_baseline(Baseline::CreateUpdate, "f", Some(bucket))
            .await?;
        let pass = unpaced(
            F_PULL_CREATE_UPDATE,
            "(f) pull: KV create, handler, update, reply, ack",
            "f",
        );
        self.measure(&create_update, pass).await?;
        create_update.stop().await;
        self.drop_stream("f").await;
        self.drop_bucket("f").await;

        // idemq in JetStream mode.
        let idemq = self.idemq().await?;
        let pass = unpaced(
            IDEMQ_JS_FRESH,
            "idemq JetStream mode, echo handler; fresh keys",
            "i",
        );
        self.measure(&idemq, pass).await?;
        let pass = unpaced(
            IDEMQ_JS_REPLAYED,
            "idemq JetStream mode; the fresh keys again, all replayed",
            "i",
        );
        self.measure(&idemq, pass).await?;
        let pass = Pass {
            copies: options.copies,
            ..unpaced(
                IDEMQ_JS_STORM,
                "idemq JetStream mode; retry storm",
                "i-storm",
            )
        };
        self.measure(&idemq, pass).await?;
        idemq.stop().await;
        self.drop_stream("i").await;
        self.drop_bucket("i").await;
        Ok(())
    }

    fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// The intents of one pass: `count` keys named by `label`.
    fn intents(&self, label: &str, count: usize) -> Intents {
        Intents {
            run: self.run.clone(),
            label: label.to_owned(),
            count,
            size: self.options.payload,
        }
    }

    fn subject(&self, name: &str) -> String {
        format!("bench.{}.{name}", self.run)
    }

    fn bucket_name(&self, name: &str) -> String {
        format!(
            "BENCH_{}_{}",
            self.run,
            name.replace('-', "_").to_uppercase()
        )
    }

    async fn bucket(&mut self, name: &str) -> Result<jetstream::kv::Store, BenchError> {
        let bucket = self.bucket_name(name);
        let store = responders::plain_bucket(&self.js, &bucket, self.options.replicas).await?;
        self.buckets.push(bucket);
        Ok(store)
    }

    /// The stream a JetStream-mode responder named `name` consumes.
    fn stream_name(&self, name: &str) -> String {
        format!("{}_STREAM", self.bucket_name(name))
    }

    async fn drop_stream(&mut self, name: &str) {
        let stream = self.stream_name(name);
        if let Some(at) = self.streams.iter().position(|s| *s == stream) {
            self.streams.swap_remove(at);
            responders::delete_stream(&self.js, &stream).await;
        }
    }

    async fn drop_bucket(&mut self, name: &str) {
        let bucket = self.bucket_name(name);
        if let Some(at) = self.buckets.iter().position(|b| *b == bucket) {
            self.buckets.swap_remove(at);
            responders::delete_bucket(&self.js, &bucket).await;
        }
    }

    async fn baseline(
        &mut self,
        baseline: Baseline,
        name: &str,
        kv: Option<jetstream::kv::Store>,
    ) -> Result<Responder, BenchError> {
        let mut responder = Responder::baseline(
            &self.client,
            baseline,
            self.subject(name),
            kv,
            self.options.responder_concurrency(),
        )
        .await?;
        self.warm_up(&mut responder, name).await?;
        Ok(responder)
    }

    /// Starts a pull-consumer baseline on a new stream over its subject.
    async fn pull_baseline(
        &mut self,
        baseline: Baseline,
        name: &str,
        kv: Option<jetstream::kv::Store>,
    ) -> Result<Responder, BenchError> {
        let stream = self.stream_name(name);
        // Deleted whatever happens next, as the worker's is.
        self.streams.push(stream.clone());
        let mut responder = Responder::pull_baseline(
            &self.js,
            baseline,
            &stream,
            self.subject(name),
            kv,
            self.options.responder_concurrency(),
            self.options.replicas,
        )
        .await?;
        self.warm_up(&mut responder, name).await?;
        Ok(responder)
    }

    /// idemq: an external worker (`--target`), or one in process, in core
    /// or (`--mode jetstream`) JetStream mode.
    async fn idemq(&mut self) -> Result<Responder, BenchError> {
        let mut responder = match &self.options.target {
            Some(subject) => Responder::external(subject.clone()),
            None => {
                let bucket = self.bucket_name("i");
                let prefix = self.subject("i");
                let concurrency = self.options.responder_concurrency();
                let delivery = match self.options.mode {
                    Mode::Core => Delivery::Core,
                    Mode::JetStream => {
                        let stream = self.stream_name("i");
                        // The worker creates it; deleted whatever happens next.
                        self.streams.push(stream.clone());
                        let mut js = JetStreamConfig::new(&stream, responders::DURABLE);
                        js.replicas = self.options.replicas;
                        Delivery::JetStream(js)
                    }
                };
                let replicas = self.options.replicas;
                let responder = Responder::idemq(
                    &self.client,
                    &bucket,
                    &prefix,
                    concurrency,
                    delivery,
                    replicas,
                    self.report.settings.cache_budget_bytes,
                )
                .await?;
                self.buckets.push(bucket);
                responder
            }
        };
        self.warm_up(&mut responder, "i").await?;
        Ok(responder)
    }

    /// How the load reaches `responder`: JetStream-mode replies come to
    /// `bench.<run>.r.<n>`.
    fn via(&self, responder: &Responder) -> Via {
        if responder.jetstream {
            Via::Stream {
                replies: self.subject("r"),
            }
        } else {
            Via::Request
        }
    }

    /// Waits until `responder` answers, then sends it a few requests whose
    /// figures are thrown away (connections, buckets and caches warm up).
    async fn warm_up(&mut self, responder: &mut Responder, name: &str) -> Result<(), BenchError> {
        responder
            .ready(&self.js, self.intents(&format!("{name}-probe"), 1).get(0))
            .await?;
        if self.expired() {
            return Ok(());
        }
        let keys = (self.options.count / 10).clamp(1, MAX_WARM_UP);
        let job = Job {
            subject: responder.subject.clone(),
            via: self.via(responder),
            intents: self.intents(&format!("{name}-warm"), keys),
            copies: 1,
            concurrency: self.options.concurrency,
            rate: None,
            deadline: self.deadline,
            timeout: self.options.timeout,
        };
        self.drive(job, &format!("warming up {name}"))
            .await
            .map(drop)
    }

    /// Runs one pass and adds its scenario to the report.
    async fn measure(&mut self, responder: &Responder, pass: Pass) -> Result<(), BenchError> {
        if self.expired() {
            self.report.skipped.push(pass.name.to_owned());
            return Ok(());
        }
        let keys = (self.options.count / pass.copies).max(1);
        let job = Job {
            subject: responder.subject.clone(),
            via: self.via(responder),
            intents: self.intents(pass.label, keys),
            copies: pass.copies,
            concurrency: pass.concurrency,
            rate: pass.rate,
            deadline: self.deadline,
            timeout: self.options.timeout,
        };
        if let Some(executions) = &responder.executions {
            // Forget the probe's and the warm-up's executions.
            executions.take();
        }
        let worker_pid = self.options.worker_pid.filter(|_| !responder.in_process);
        // The responder's memory: this process's, or the external worker's.
        let rss_pid = if responder.in_process {
            None
        } else {
            worker_pid
        };
        let rss_reset = usage::reset_peak_rss(rss_pid);
        let process_before = usage::process_cpu();
        let worker_before = worker_pid.and_then(usage::pid_cpu);
        let server_before = self.options.server_pid.and_then(usage::pid_cpu);
        let index = self.report.scenarios.len() + self.report.skipped.len() + 1;
        let title = format!("[{index}/{}] {}", self.planned, pass.name);
        let measured = self.drive(job, &title).await?;
        let process_after = usage::process_cpu();
        let worker_after = worker_pid.and_then(usage::pid_cpu);
        let server_after = self.options.server_pid.and_then(usage::pid_cpu);

        let worker_cpu = if responder.in_process {
            delta(process_before, process_after)
                .zip(measured.client_cpu)
                .map(|(process, client)| process.saturating_sub(client))
        } else {
            delta(worker_before, worker_after)
        };
        // Without the reset the figure would cover the run so far, not the pass.
        let peak_rss = if responder.in_process || worker_pid.is_some() {
            usage::peak_rss(rss_pid).filter(|_| rss_reset)
        } else {
            None
        };
        let cache = responder.cache_use(&self.client).await;
        let tally = responder.executions.as_ref().map(|e| e.take());
        let (executions, duplicates) = match (tally, responder.in_process) {
            (Some(tally), _) => (Some(tally.executions), Some(tally.duplicates)),
            (None, false) => (
                Some(measured.fresh_replies),
                Some(measured.duplicate_fresh_replies),
            ),
            (None, true) => (None, None),
        };
        let per_reply = |cpu: Option<Duration>| {
            cpu.filter(|_| measured.ok > 0)
                .map(|cpu| cpu.as_secs_f64() * 1e6 / measured.ok as f64)
        };
        let scenario = Scenario {
            name: pass.name.to_owned(),
            description: pass.description.to_owned(),
            keys,
            copies: pass.copies,
            concurrency: pass.concurrency,
            rate: pass.rate,
            requests: measured.requests,
            ok: measured.ok,
            error_replies: measured.error_replies,
            timeouts: measured.timeouts,
            failures: measured.failures,
            first_error: measured.first_error.clone(),
            wall_secs: measured.wall.as_secs_f64(),
            throughput: throughput(&measured),
            latency_ms: latency(&measured.latency),
            executions,
            duplicates,
            worker_cpu_us: per_reply(worker_cpu),
            client_cpu_us: per_reply(measured.client_cpu),
            server_cpu_us: per_reply(delta(server_before, server_after)),
            peak_rss_bytes: peak_rss,
            reply_bytes: (measured.ok > 0).then(|| measured.ok_bytes as f64 / measured.ok as f64),
            cache,
            truncated: measured.truncated,
            ratios: Vec::new(),
            curve: curve(&measured.latency),
        };
        self.report.scenarios.push(scenario);
        Ok(())
    }

    /// Hands `job` to the load generator and reports progress until it is done.
    async fn drive(&mut self, job: Job, title: &str) -> Result<Measured, BenchError> {
        let total = job.intents.count * job.copies;
        let started = Instant::now();
        let measured = self.load.run(job);
        tokio::pin!(measured);
        let mut ticks = tokio::time::interval(PROGRESS_EVERY);
        loop {
            tokio::select! {
                measured = &mut measured => return measured,
                _ = ticks.tick() => {
                    let line = format!(
                        "{title}: {}/{total} requests, {:.1} s (run {:.0} s of at most {:.0} s)",
                        self.load.completed(),
                        started.elapsed().as_secs_f64(),
                        self.started.elapsed().as_secs_f64(),
                        self.options.max_duration.as_secs_f64(),
                    );
                    (self.progress)(&line);
                }
            }
        }
    }
}

fn delta(before: Option<Duration>, after: Option<Duration>) -> Option<Duration> {
    before
        .zip(after)
        .map(|(before, after)| after.saturating_sub(before))
}

fn throughput(measured: &Measured) -> f64 {
    let secs = measured.wall.as_secs_f64();
    if secs > 0.0 {
        measured.ok as f64 / secs
    } else {
        0.0
    }
}

fn latency(histogram: &Histogram<u64>) -> Option<Latency> {
    if histogram.is_empty() {
        return None;
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    Some(Latency {
        p50: ms(histogram.value_at_quantile(0.5)),
        p90: ms(histogram.value_at_quantile(0.9)),
        p99: ms(histogram.value_at_quantile(0.99)),
        p99_9: ms(histogram.value_at_quantile(0.999)),
        max: ms(histogram.max()),
        mean: histogram.mean() / 1000.0,
    })
}

/// The distribution as (nines, ms) points from p0 to p99.9, for the chart.
fn curve(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    (0..=3 * CURVE_STEPS_PER_NINE)
        .map(|step| {
            let nines = f64::from(step) / f64::from(CURVE_STEPS_PER_NINE);
            let quantile = 1.0 - 10f64.powf(-nines);
            (nines, histogram.value_at_quantile(quantile) as f64 / 1000.0)
        })
        .collect()
}

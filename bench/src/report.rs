//! The bench's findings: one [`Scenario`] per pass, the ratios to the
//! baselines, the targets, and the text table.

use std::fmt::Write as _;

use serde::Serialize;

use super::names::{
    A_ECHO, B_CREATE_UPDATE, B_PACED, C_GET, D_NAIVE_FRESH, D_NAIVE_STORM, E_PULL_ECHO,
    F_PULL_CREATE_UPDATE, IDEMQ_FRESH, IDEMQ_JS_FRESH, IDEMQ_JS_REPLAYED, IDEMQ_JS_STORM,
    IDEMQ_PACED, IDEMQ_REPLAYED, IDEMQ_STORM,
};
use super::Mode;

const MIB: f64 = 1024.0 * 1024.0;

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// How the run was set up.
    pub settings: Settings,
    /// One entry per pass, in the order they ran.
    pub scenarios: Vec<Scenario>,
    /// The targets, each with its measured value (in JetStream
    /// mode only the storm's zero duplicates: the others are core mode's).
    pub targets: Vec<Target>,
    /// Passes not run because `--max-duration` was reached.
    pub skipped: Vec<String>,
}

/// The run's settings, as measured against.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// `core` (request/reply) or `jetstream` (intents published into streams).
    pub mode: Mode,
    /// Replicas of every bucket and stream.
    pub replicas: usize,
    /// The nats-server's version.
    pub server_version: String,
    /// Requests per pass.
    pub count: usize,
    /// Requests in flight in every unpaced pass.
    pub concurrency: usize,
    /// Size of each intent, in bytes.
    pub payload_bytes: usize,
    /// Concurrent copies of each key in the storm passes.
    pub copies: usize,
    /// Requests in flight in the saturated pass whose peak RSS is a target.
    pub rss_concurrency: usize,
    /// The external worker's subject, or `None` for the worker in process.
    pub target: Option<String>,
    /// CPU threads available to this process.
    pub cores: usize,
    /// `release` or `debug`: how this binary was built.
    pub build: &'static str,
    /// Requests per second offered in the paced passes (half of idemq's
    /// all-fresh throughput), once known.
    pub paced_rate: Option<f64>,
    /// The worker's `--cache`, in bytes: the peak RSS target is
    /// [`RSS_BASE_MIB`] on top of it.
    pub cache_budget_bytes: u64,
}

/// The worker's own memory at `--rss-concurrency` in flight, in MiB: its
/// peak RSS target is this plus `--cache` (operator's memory to spend).
pub const RSS_BASE_MIB: f64 = 48.0;

/// Most a cache entry may cost, as a multiple of the reply it holds.
pub const CACHE_ENTRY_OVER_REPLY: f64 = 1.5;

/// What the worker's outcome cache held after a pass (its
/// `idemq_cache_entries` and `idemq_cache_bytes`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CacheUse {
    /// Outcomes held.
    pub entries: u64,
    /// What they cost, as the cache counts them against `--cache`.
    pub bytes: u64,
}

impl CacheUse {
    /// Bytes per entry; `None` when it held none.
    pub fn per_entry(&self) -> Option<f64> {
        (self.entries > 0).then(|| self.bytes as f64 / self.entries as f64)
    }
}

/// One pass: a load against one responder.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    /// Short name, e.g. `a-echo` or `idemq-storm`.
    pub name: String,
    /// What ran, in words.
    pub description: String,
    /// Distinct idempotency keys sent.
    pub keys: usize,
    /// Concurrent copies of each key.
    pub copies: usize,
    /// Most requests in flight.
    pub concurrency: usize,
    /// Requests per second offered, for a paced pass.
    pub rate: Option<f64>,
    /// Requests sent.
    pub requests: u64,
    /// Successful replies.
    pub ok: u64,
    /// Replies carrying an error outcome.
    pub error_replies: u64,
    /// Requests unanswered within the timeout.
    pub timeouts: u64,
    /// Requests that failed otherwise.
    pub failures: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// From the first request to the last reply, in seconds.
    pub wall_secs: f64,
    /// Successful replies per second.
    pub throughput: f64,
    /// Latency of successful replies; `None` when there were none.
    pub latency_ms: Option<Latency>,
    /// Handler executions (counted in process, or from `Idem-Replayed:
    /// false` replies for an external worker); `None` where no handler runs.
    pub executions: Option<u64>,
    /// Executions beyond the first of their key.
    pub duplicates: Option<u64>,
    /// CPU time of the responder or worker per successful reply, in µs.
    pub worker_cpu_us: Option<f64>,
    /// CPU time of the load generator per successful reply, in µs.
    pub client_cpu_us: Option<f64>,
    /// CPU time of the nats-server per successful reply, in µs (`--server-pid`).
    pub server_cpu_us: Option<f64>,
    /// Peak RSS during the pass, in bytes (see the docs for what it covers).
    pub peak_rss_bytes: Option<u64>,
    /// Mean bytes of a successful reply (headers and payload).
    pub reply_bytes: Option<f64>,
    /// What idemq's outcome cache held after the pass (idemq passes).
    pub cache: Option<CacheUse>,
    /// True when `--max-duration` cut the pass short.
    pub truncated: bool,
    /// This pass's figure as a multiple of its baselines'.
    pub ratios: Vec<Ratio>,
    /// The latency distribution for the chart: (nines, milliseconds), where
    /// nines is `-log10(1 - quantile)`: 1 is p90, 2 is p99, 3 is p99.9.
    #[serde(skip)]
    pub curve: Vec<(f64, f64)>,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Slowest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// One figure of a pass divided by the same figure of another.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// `throughput` or `p99`.
    pub metric: &'static str,
    /// The pass divided by.
    pub against: &'static str,
    /// The quotient.
    pub value: f64,
}

/// A target of the issue and how this run did against it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// The target, in words.
    pub goal: &'static str,
    /// The measured value, in words; `None` when it could not be measured.
    pub measured: Option<String>,
    /// Whether it was met; `None` when it could not be measured.
    pub met: Option<bool>,
}

impl Report {
    fn scenario(&self, name: &str) -> Option<&Scenario> {
        self.scenarios.iter().find(|s| s.name == name)
    }

    fn ratio(&self, metric: &'static str, of: &str, against: &'static str) -> Option<f64> {
        let value = |s: &Scenario| match metric {
            "p99" => s.latency_ms.map(|l| l.p99),
            _ => Some(s.throughput),
        };
        let over = value(self.scenario(of)?)?;
        let under = value(self.scenario(against)?)?;
        (under > 0.0).then(|| over / under)
    }

    /// Fills in every scenario's ratios and the targets, once all passes ran.
    pub(super) fn finish(&mut self) {
        let wanted: [(&str, &'static str, &'static str); 10] = [
            (IDEMQ_FRESH, "throughput", B_CREATE_UPDATE),
            (IDEMQ_FRESH, "throughput", D_NAIVE_FRESH),
            (IDEMQ_REPLAYED, "throughput", A_ECHO),
            (IDEMQ_REPLAYED, "throughput", C_GET),
            (IDEMQ_STORM, "throughput", IDEMQ_FRESH),
            (IDEMQ_STORM, "throughput", D_NAIVE_STORM),
            (IDEMQ_PACED, "p99", B_PACED),
            (IDEMQ_JS_FRESH, "throughput", F_PULL_CREATE_UPDATE),
            (IDEMQ_JS_REPLAYED, "throughput", E_PULL_ECHO),
            (IDEMQ_JS_STORM, "throughput", IDEMQ_JS_FRESH),
        ];
        for (of, metric, against) in wanted {
            if let Some(value) = self.ratio(metric, of, against) {
                if let Some(scenario) = self.scenarios.iter_mut().find(|s| s.name == of) {
                    scenario.ratios.push(Ratio {
                        metric,
                        against,
                        value,
                    });
                }
            }
        }
        self.targets = self.targets();
    }

    fn targets(&self) -> Vec<Target> {
        // `of`'s throughput at least `floor` times `against`'s.
        let at_least = |goal, of: &str, against: &'static str, floor: f64| {
            let value = self.ratio("throughput", of, against);
            Target {
                goal,
                measured: value.map(|v| format!("{v:.2} x")),
                met: value.map(|v| v >= floor),
            }
        };
        let no_duplicates = |storm: &str| {
            let duplicates = self.scenario(storm).and_then(|s| s.duplicates);
            Target {
                goal: "storm: zero duplicate executions",
                measured: duplicates.map(|d| format!("{d} duplicates")),
                met: duplicates.map(|d| d == 0),
            }
        };
        let cache = self.cache_target();
        if self.settings.mode == Mode::JetStream {
            return vec![
                at_least(
                    "fresh throughput >= 0.8 x (f) pull create+update",
                    IDEMQ_JS_FRESH,
                    F_PULL_CREATE_UPDATE,
                    0.8,
                ),
                at_least(
                    "replayed throughput >= 0.8 x (e) pull echo",
                    IDEMQ_JS_REPLAYED,
                    E_PULL_ECHO,
                    0.8,
                ),
                no_duplicates(IDEMQ_JS_STORM),
                at_least(
                    "storm throughput >= fresh",
                    IDEMQ_JS_STORM,
                    IDEMQ_JS_FRESH,
                    1.0,
                ),
                cache,
            ];
        }
        let paced = self.ratio("p99", IDEMQ_PACED, B_PACED);
        let saturated = self
            .scenarios
            .iter()
            .filter(|s| s.name.starts_with("idemq-fresh") && s.rate.is_none())
            .filter(|s| s.concurrency >= self.settings.rss_concurrency)
            .find_map(|s| s.peak_rss_bytes.map(|bytes| (s, bytes)));
        vec![
            at_least(
                "all-fresh throughput >= 0.85 x (b) create+update",
                IDEMQ_FRESH,
                B_CREATE_UPDATE,
                0.85,
            ),
            at_least(
                "all-fresh throughput >= 0.75 x (d) naive",
                IDEMQ_FRESH,
                D_NAIVE_FRESH,
                0.75,
            ),
            at_least(
                "all-replayed throughput >= 0.9 x (a) echo",
                IDEMQ_REPLAYED,
                A_ECHO,
                0.9,
            ),
            no_duplicates(IDEMQ_STORM),
            at_least(
                "storm throughput >= all-fresh",
                IDEMQ_STORM,
                IDEMQ_FRESH,
                1.0,
            ),
            at_least(
                "storm throughput >= (d) naive on the same storm",
                IDEMQ_STORM,
                D_NAIVE_STORM,
                1.0,
            ),
            Target {
                goal: "p99 at half of peak throughput <= 2 x (b) p99 at the same rate",
                measured: paced.map(|v| format!("{v:.2} x")),
                met: paced.map(|v| v <= 2.0),
            },
            Target {
                goal: "peak RSS <= 48 MiB + --cache, saturated at --rss-concurrency",
                measured: saturated.map(|(s, bytes)| {
                    let mib = bytes as f64 / MIB;
                    format!(
                        "{mib:.1} MiB at concurrency {} (at most {:.1} MiB)",
                        s.concurrency,
                        self.rss_limit() / MIB
                    )
                }),
                met: saturated.map(|(_, bytes)| (bytes as f64) <= self.rss_limit()),
            },
            cache,
        ]
    }

    /// The peak RSS target, in bytes.
    fn rss_limit(&self) -> f64 {
        RSS_BASE_MIB * MIB + self.settings.cache_budget_bytes as f64
    }

    /// The cache's bytes per entry after the replayed pass, against the
    /// replies it answered with: an entry holds such a reply's body and
    /// key, and its headers are built again from them (in JetStream mode
    /// the replies also carry a `Nats-Msg-Id` the entry does not hold).
    fn cache_target(&self) -> Target {
        let replayed = match self.settings.mode {
            Mode::Core => IDEMQ_REPLAYED,
            Mode::JetStream => IDEMQ_JS_REPLAYED,
        };
        let measured = self.scenario(replayed).and_then(|s| {
            let per_entry = s.cache?.per_entry()?;
            let reply = s.reply_bytes.filter(|bytes| *bytes > 0.0)?;
            Some((per_entry, reply))
        });
        Target {
            goal: "cache: an entry costs <= 1.5 x the reply it holds",
            measured: measured.map(|(per_entry, reply)| {
                format!(
                    "{:.2} x ({per_entry:.0} B per entry, replies of {reply:.0} B)",
                    per_entry / reply
                )
            }),
            met: measured.map(|(per_entry, reply)| per_entry <= CACHE_ENTRY_OVER_REPLY * reply),
        }
    }

    /// The report as a text table, one row per pass, then the targets.
    pub fn table(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        let worker = match (&s.target, s.mode) {
            (Some(subject), _) => format!("external worker on {subject}"),
            (None, Mode::Core) => "worker in process".to_owned(),
            (None, Mode::JetStream) => "worker in process, JetStream mode".to_owned(),
        };
        let worker = match s.replicas {
            1 => worker,
            replicas => format!("{worker}, R{replicas}"),
        };
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "idemq-bench: {} requests per pass, concurrency {}, payload {} B, storm copies {}, \
             {worker}; nats-server {}, {} cores, {} build",
            s.count, s.concurrency, s.payload_bytes, s.copies, s.server_version, s.cores, s.build
        );
        if let Some(rate) = s.paced_rate {
            let _ = writeln!(
                out,
                "paced passes offer {rate:.0} req/s (half of idemq-fresh)"
            );
        }
        let _ = writeln!(
            out,
            "\n{:<24} {:>7} {:>6} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>5}  \
             vs baseline",
            "scenario",
            "ok",
            "err",
            "req/s",
            "p50 ms",
            "p90",
            "p99",
            "p99.9",
            "exec",
            "dup",
            "wrk µs",
            "srv µs",
            "RSS",
        );
        for scenario in &self.scenarios {
            let _ = writeln!(out, "{}", row(scenario));
        }
        for skipped in &self.skipped {
            let _ = writeln!(out, "{skipped:<24} not run: --max-duration reached");
        }
        for s in &self.scenarios {
            if let Some(cache) = s.cache {
                let per_entry = cache
                    .per_entry()
                    .map_or("-".to_owned(), |bytes| format!("{bytes:.0} B"));
                let reply = s
                    .reply_bytes
                    .map_or("-".to_owned(), |bytes| format!("{bytes:.0} B"));
                let _ = writeln!(
                    out,
                    "{:<24} cache after it: {} entries, {:.1} MiB of --cache {:.0} MiB, {per_entry} \
                     per entry; replies of {reply}",
                    s.name,
                    cache.entries,
                    cache.bytes as f64 / MIB,
                    self.settings.cache_budget_bytes as f64 / MIB,
                );
            }
        }
        let _ = writeln!(
            out,
            "\nerr: error replies + timeouts + failures\n\
             wrk µs, RSS: the responder's CPU time per reply and its peak RSS (MiB) during the \
             pass: this\n  process's (CPU less the load generator's thread) in process, the \
             --worker-pid's with --target\n\
             srv µs: the nats-server's CPU time per reply (--server-pid)"
        );
        if s.mode == Mode::JetStream {
            let _ = writeln!(
                out,
                "jetstream mode: each intent is a JetStream publish (PubAck awaited) into a \
                 work-queue stream,\n  with Idem-Reply-To; latency runs from the publish to the \
                 reply's arrival there"
            );
        }
        let _ = writeln!(out, "\ntargets");
        for target in &self.targets {
            let verdict = match target.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "n/a",
            };
            let measured = target.measured.as_deref().unwrap_or("not measured");
            let _ = writeln!(out, "  {verdict:<7} {:<64} {measured}", target.goal);
        }
        out
    }
}

fn row(s: &Scenario) -> String {
    let optional = |value: Option<u64>| value.map_or("-".to_owned(), |v| v.to_string());
    let ms = |pick: fn(&Latency) -> f64| {
        s.latency_ms
            .map_or("-".to_owned(), |l| format!("{:.2}", pick(&l)))
    };
    let rss = s
        .peak_rss_bytes
        .map_or("-".to_owned(), |bytes| format!("{:.1}", bytes as f64 / MIB));
    let micros = |us: Option<f64>| us.map_or("-".to_owned(), |us| format!("{us:.0}"));
    let ratios: Vec<String> = s
        .ratios
        .iter()
        .map(|r| match r.metric {
            "p99" => format!("p99 {:.2} x {}", r.value, short(r.against)),
            _ => format!("{:.2} x {}", r.value, short(r.against)),
        })
        .collect();
    format!(
        "{:<24} {:>7} {:>6} {:>8.0} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>5}  {}{}",
        s.name,
        s.ok,
        s.error_replies + s.timeouts + s.failures,
        s.throughput,
        ms(|l| l.p50),
        ms(|l| l.p90),
        ms(|l| l.p99),
        ms(|l| l.p99_9),
        optional(s.executions),
        optional(s.duplicates),
        micros(s.worker_cpu_us),
        micros(s.server_cpu_us),
        rss,
        ratios.join(", "),
        if s.truncated { " (cut short)" } else { "" },
    )
}

/// A baseline's name as the ratio column shows it: its letter, or the pass.
fn short(name: &str) -> &str {
    match name {
        A_ECHO => "(a)",
        B_CREATE_UPDATE | B_PACED => "(b)",
        C_GET => "(c)",
        D_NAIVE_FRESH | D_NAIVE_STORM => "(d)",
        E_PULL_ECHO => "(e)",
        F_PULL_CREATE_UPDATE => "(f)",
        IDEMQ_FRESH | IDEMQ_JS_FRESH => "fresh",
        other => other,
    }
}

//! What the worker did, counted once and shown three ways: Prometheus
//! metrics (`--metrics-addr`), the `$SRV.STATS.idemq` reply, and the
//! `idemq.status.<instance>` endpoint.
//!
//! The counters are prometheus-client metrics (atomics behind an `Arc`),
//! so the worker increments them without locks and the exposition reads
//! the same values the [`Snapshot`] does.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::codes::INVALID_CODES;

/// The label of `idemq_intents_invalid_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The contract's error code.
    pub code: String,
}

/// One metric per thing an operator asks about.
#[derive(Debug)]
pub struct Stats {
    /// Messages taken from the intent subjects.
    pub received: Counter,
    /// Handler executions whose outcome was stored.
    pub executed: Counter,
    /// Copies answered with a stored outcome.
    pub replayed: Counter,
    /// Of those, copies byte-identical to one already answered from the
    /// outcome cache, answered by a digest of their bytes without decoding.
    pub replayed_by_digest: Counter,
    /// Copies that found the key held by a running execution and waited for it.
    pub waited: Counter,
    /// Copies answered `IN_PROGRESS`.
    pub in_progress: Counter,
    /// Copies answered `KEY_REUSED`.
    pub key_reused: Counter,
    /// Core deliveries answered `OVERLOADED`: the intake already held
    /// `--intake-bytes` of waiting intents.
    pub overloaded: Counter,
    /// Executed outcomes answered without being stored (`Idem-Stored: false`):
    /// the store did not take them before the lease was lost.
    pub unstored: Counter,
    /// Messages refused as invalid, one counter per code in [`INVALID_CODES`].
    invalid: [Counter; 3],
    /// Transient failures: claim released, nothing stored.
    pub transient: Counter,
    /// Claims taken over from an owner whose lease expired.
    pub takeovers: Counter,
    /// Store failures answered `STORE_UNAVAILABLE`.
    pub store_errors: Counter,
    /// Intents sent to the dead-letter subject (JetStream mode).
    pub dead_lettered: Counter,
    /// Intents being processed now.
    pub in_flight: Gauge,
    /// Outcomes the cache holds now.
    pub cache_entries: Gauge,
    /// What they cost, as the cache counts it against `--cache`.
    pub cache_bytes: Gauge,
    /// How long handlers ran.
    pub handler_seconds: Histogram,
    /// From receipt of a message to its answer.
    pub intent_seconds: Histogram,
    registry: Registry,
}

/// A point-in-time copy of the counters, as JSON-friendly numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[allow(missing_docs)] // the fields mirror `Stats`, documented there
pub struct Snapshot {
    pub received: u64,
    pub executed: u64,
    pub replayed: u64,
    pub replayed_by_digest: u64,
    pub waited: u64,
    pub in_progress: u64,
    pub key_reused: u64,
    pub overloaded: u64,
    pub unstored: u64,
    pub invalid: u64,
    pub transient: u64,
    pub takeovers: u64,
    pub store_errors: u64,
    pub dead_lettered: u64,
    pub in_flight: u64,
    pub cache_entries: u64,
    pub cache_bytes: u64,
}

impl Snapshot {
    /// Every counter with its column name, in the order tables show them:
    /// the one list of the counters that tables and sums walk.
    pub fn counters_mut(&mut self) -> [(&'static str, &mut u64); 15] {
        [
            ("RECEIVED", &mut self.received),
            ("EXECUTED", &mut self.executed),
            ("REPLAYED", &mut self.replayed),
            ("BY_DIGEST", &mut self.replayed_by_digest),
            ("WAITED", &mut self.waited),
            ("IN_PROGRESS", &mut self.in_progress),
            ("KEY_REUSED", &mut self.key_reused),
            ("OVERLOADED", &mut self.overloaded),
            ("INVALID", &mut self.invalid),
            ("TRANSIENT", &mut self.transient),
            ("STORE_ERR", &mut self.store_errors),
            ("UNSTORED", &mut self.unstored),
            ("TAKEOVERS", &mut self.takeovers),
            ("DEAD", &mut self.dead_lettered),
            ("IN_FLIGHT", &mut self.in_flight),
        ]
    }

    /// The counters with their column names, by value.
    pub fn counters(mut self) -> [(&'static str, u64); 15] {
        self.counters_mut().map(|(name, value)| (name, *value))
    }
}

/// Sums counters, saturating: they come from other processes' answers.
impl std::ops::Add for Snapshot {
    type Output = Snapshot;

    fn add(mut self, mut other: Snapshot) -> Snapshot {
        for ((_, sum), (_, more)) in self.counters_mut().into_iter().zip(other.counters_mut()) {
            *sum = sum.saturating_add(*more);
        }
        // The caches' gauges: what the workers' caches hold together.
        self.cache_entries = self.cache_entries.saturating_add(other.cache_entries);
        self.cache_bytes = self.cache_bytes.saturating_add(other.cache_bytes);
        self
    }
}

/// Counts events that are worth a log line, but not one each: [`count`](Self::count)
/// says how many to report when a report is due, at most once per period.
#[derive(Debug)]
pub(crate) struct Throttle {
    period: Duration,
    since: std::sync::Mutex<ThrottleState>,
}

/// What a [`Throttle`] counted since its last report.
#[derive(Debug, Default)]
struct ThrottleState {
    unreported: u64,
    reported: Option<std::time::Instant>,
}

impl Throttle {
    /// Reports at most once per `period`.
    pub(crate) fn new(period: Duration) -> Throttle {
        Throttle {
            period,
            since: std::sync::Mutex::default(),
        }
    }

    /// Counts one event; the number to report now (this one included), if
    /// a report is due.
    pub(crate) fn count(&self) -> Option<u64> {
        let mut since = self
            .since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        since.unreported += 1;
        let now = std::time::Instant::now();
        if since
            .reported
            .is_some_and(|at| now.duration_since(at) < self.period)
        {
            return None;
        }
        since.reported = Some(now);
        Some(std::mem::take(&mut since.unreported))
    }
}

/// Latency buckets from 100 µs to about 105 s, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

impl Default for Stats {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("idemq");
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let received = counter(
            &mut registry,
            "intents_received",
            "Messages taken from the intent subjects",
        );
        let executed = counter(
            &mut registry,
            "intents_executed",
            "Handler executions whose outcome was stored",
        );
        let replayed = counter(
            &mut registry,
            "intents_replayed",
            "Copies answered with a stored outcome",
        );
        let replayed_by_digest = counter(
            &mut registry,
            "intents_replayed_by_digest",
            "Copies byte-identical to one answered from the cache, replayed without decoding",
        );
        let waited = counter(
            &mut registry,
            "intents_waited",
            "Copies that waited for a running execution of their key",
        );
        let in_progress = counter(
            &mut registry,
            "intents_in_progress",
            "Copies answered IN_PROGRESS",
        );
        let key_reused = counter(
            &mut registry,
            "intents_key_reused",
            "Copies answered KEY_REUSED",
        );
        let overloaded = counter(
            &mut registry,
            "intents_overloaded",
            "Core deliveries answered OVERLOADED: the intake held --intake-bytes of waiting intents",
        );
        let unstored = counter(
            &mut registry,
            "outcomes_unstored",
            "Executed outcomes answered without being stored (Idem-Stored: false)",
        );
        let invalid_family = Family::<CodeLabel, Counter>::default();
        registry.register(
            "intents_invalid",
            "Messages refused as invalid, by error code",
            invalid_family.clone(),
        );
        // Each code's counter is created up front (so every series exists
        // from the start) and kept: increments then need no map lookup.
        let invalid = INVALID_CODES.map(|code| {
            invalid_family
                .get_or_create(&CodeLabel {
                    code: code.to_owned(),
                })
                .clone()
        });
        let transient = counter(
            &mut registry,
            "transient_failures",
            "Transient handler failures (claim released, nothing stored)",
        );
        let store_errors = counter(
            &mut registry,
            "store_errors",
            "Store failures answered STORE_UNAVAILABLE",
        );
        let takeovers = counter(
            &mut registry,
            "takeovers",
            "Claims taken over after their owner's lease expired",
        );
        let dead_lettered = counter(
            &mut registry,
            "dead_lettered",
            "Intents sent to the dead-letter subject",
        );
        let in_flight = Gauge::default();
        registry.register(
            "intents_in_flight",
            "Intents being processed now",
            in_flight.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "cache_entries",
            "Outcomes the replay cache holds",
            cache_entries.clone(),
        );
        let cache_bytes = Gauge::default();
        registry.register(
            "cache_bytes",
            "What the cached outcomes cost, counted against --cache",
            cache_bytes.clone(),
        );
        let handler_seconds = seconds_histogram();
        registry.register(
            "handler_duration_seconds",
            "How long handlers ran",
            handler_seconds.clone(),
        );
        let intent_seconds = seconds_histogram();
        registry.register(
            "intent_duration_seconds",
            "From receipt of an intent to its answer",
            intent_seconds.clone(),
        );
        Stats {
            received,
            executed,
            replayed,
            replayed_by_digest,
            waited,
            in_progress,
            key_reused,
            overloaded,
            unstored,
            invalid,
            transient,
            takeovers,
            store_errors,
            dead_lettered,
            in_flight,
            cache_entries,
            cache_bytes,
            handler_seconds,
            intent_seconds,
            registry,
        }
    }
}

impl Stats {
    /// Counts a message refused with `code` (one of [`INVALID_CODES`]).
    pub fn count_invalid(&self, code: &str) {
        match INVALID_CODES.iter().position(|known| *known == code) {
            Some(index) => self.invalid[index].inc(),
            // Unreachable while INVALID_CODES lists every code the pipeline
            // maps an IntentError to; counted as the generic code if not.
            None => self.invalid[0].inc(),
        };
    }

    /// Records a duration in a histogram, in seconds.
    pub fn observe(histogram: &Histogram, elapsed: Duration) {
        histogram.observe(elapsed.as_secs_f64());
    }

    /// The metrics in the Prometheus text exposition format (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Encoding into a String only fails if a metric's own encoder does,
        // which the built-in metric types never do.
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "metrics encoding failed");
        }
        text
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            received: self.received.get(),
            executed: self.executed.get(),
            replayed: self.replayed.get(),
            replayed_by_digest: self.replayed_by_digest.get(),
            waited: self.waited.get(),
            in_progress: self.in_progress.get(),
            key_reused: self.key_reused.get(),
            overloaded: self.overloaded.get(),
            unstored: self.unstored.get(),
            invalid: self.invalid.iter().map(Counter::get).sum(),
            transient: self.transient.get(),
            takeovers: self.takeovers.get(),
            store_errors: self.store_errors.get(),
            dead_lettered: self.dead_lettered.get(),
            in_flight: u64::try_from(self.in_flight.get()).unwrap_or_default(),
            cache_entries: u64::try_from(self.cache_entries.get()).unwrap_or_default(),
            cache_bytes: u64::try_from(self.cache_bytes.get()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_reports_once_per_period_with_the_count_since_the_last_report() {
        let throttle = Throttle::new(Duration::from_secs(10));
        assert_eq!(throttle.count(), Some(1), "the first event is reported");
        for _ in 0..5 {
            assert_eq!(throttle.count(), None, "not again within the period");
        }
        let past = std::time::Instant::now().checked_sub(Duration::from_secs(11));
        throttle.since.lock().expect("lock").reported = past;
        assert_eq!(throttle.count(), Some(6), "the next report counts them all");
        assert_eq!(throttle.count(), None);
    }

    #[test]
    fn a_sum_of_snapshots_adds_every_counter_and_the_caches() {
        let mut one = Snapshot::default();
        for (i, (_, value)) in one.counters_mut().into_iter().enumerate() {
            *value = i as u64 + 1;
        }
        one.cache_entries = 3;
        one.cache_bytes = 700;
        let sum = one + one;
        for ((name, total), (_, single)) in sum.counters().into_iter().zip(one.counters()) {
            assert_eq!(total, 2 * single, "{name}");
        }
        assert_eq!((sum.cache_entries, sum.cache_bytes), (6, 1400));
    }
}

//! Counters of what the worker did, shared by the worker and the service.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// One counter per thing an operator asks about. Relaxed atomics: each is
/// an independent tally, read only for reporting.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages taken from the intent subjects.
    pub received: AtomicU64,
    /// Handler executions whose outcome was stored.
    pub executed: AtomicU64,
    /// Copies answered with a stored outcome.
    pub replayed: AtomicU64,
    /// Copies answered `IN_PROGRESS`.
    pub in_progress: AtomicU64,
    /// Copies answered `KEY_REUSED`.
    pub key_reused: AtomicU64,
    /// Messages refused as invalid.
    pub invalid: AtomicU64,
    /// Transient failures: claim released, nothing stored.
    pub transient: AtomicU64,
    /// Claims taken over from an owner whose lease expired.
    pub takeovers: AtomicU64,
    /// Store failures answered `STORE_UNAVAILABLE`.
    pub store_errors: AtomicU64,
    /// Intents sent to the dead-letter subject (JetStream mode).
    pub dead_lettered: AtomicU64,
    /// Intents being processed now.
    pub in_flight: AtomicU64,
}

/// A point-in-time copy of [`Stats`], as JSON-friendly numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[allow(missing_docs)] // the fields mirror `Stats`, documented there
pub struct Snapshot {
    pub received: u64,
    pub executed: u64,
    pub replayed: u64,
    pub in_progress: u64,
    pub key_reused: u64,
    pub invalid: u64,
    pub transient: u64,
    pub takeovers: u64,
    pub store_errors: u64,
    pub dead_lettered: u64,
    pub in_flight: u64,
}

impl Stats {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            received: get(&self.received),
            executed: get(&self.executed),
            replayed: get(&self.replayed),
            in_progress: get(&self.in_progress),
            key_reused: get(&self.key_reused),
            invalid: get(&self.invalid),
            transient: get(&self.transient),
            takeovers: get(&self.takeovers),
            store_errors: get(&self.store_errors),
            dead_lettered: get(&self.dead_lettered),
            in_flight: get(&self.in_flight),
        }
    }
}

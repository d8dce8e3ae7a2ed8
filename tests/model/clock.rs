//! Time: the lengths and margins of each property ([`Timing`]), and what
//! the model knows a key holds at an instant from the log of landed writes
//! alone ([`Clock`], [`View`]).

use std::time::Duration;

use tokio::time::Instant;

use crate::faulty::Landed;

/// The clock of one property: the store's lengths and the model's margins.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Every claim's lease.
    pub lease: Duration,
    /// Outcome TTLs: [`Ttl::Short`], [`Ttl::Long`].
    pub outcome_ttl: [Duration; 2],
    /// Acquire waits: [`Wait::Zero`], [`Wait::Short`], [`Wait::Long`].
    pub wait: [Duration; 3],
    /// Time jumps: [`Jump::Tick`], [`Jump::PastLease`], [`Jump::PastOutcome`].
    pub jump: [Duration; 3],
    /// How far behind a stale read may be: [`Lag::Short`], [`Lag::Long`].
    pub lag: [Duration; 2],
    /// How far the model's clock and the store's may disagree.
    pub tolerance: Duration,
    /// How long past its TTL a store may still show a value.
    pub grace: Duration,
    /// How late past an expiry a waiting acquire may notice it.
    pub watch_lag: Duration,
    /// Time is tokio's paused clock (jumps are `advance`), else real (`sleep`).
    pub paused: bool,
}

/// In memory, time is exact: the store expires a value at the very instant
/// its TTL (whole seconds) ends, and watchers wake then.
pub const MEMORY: Timing = Timing {
    lease: Duration::from_secs(3),
    outcome_ttl: [Duration::from_secs(4), Duration::from_secs(8)],
    wait: [
        Duration::ZERO,
        Duration::from_secs(1),
        Duration::from_secs(5),
    ],
    jump: [
        Duration::from_secs(1),
        Duration::from_secs(4),
        Duration::from_secs(9),
    ],
    lag: [Duration::from_millis(50), Duration::from_millis(1500)],
    tolerance: Duration::ZERO,
    grace: Duration::ZERO,
    watch_lag: Duration::ZERO,
    paused: true,
};

/// On nats-server, real time: the shortest TTLs there are (whole seconds),
/// and margins measured on nats-server 2.15.1: a 1 s TTL ran out 1.00-1.25 s
/// after the write, and a waiting acquire, whose watch reads the key
/// 100 ms past the lifetime it saw and then every 1.1 s, took over 1.1 or
/// 2.25 s after the claim.
pub const JETSTREAM: Timing = Timing {
    lease: Duration::from_secs(1),
    outcome_ttl: [Duration::from_secs(1), Duration::from_secs(2)],
    wait: [
        Duration::ZERO,
        Duration::from_millis(400),
        Duration::from_millis(3500),
    ],
    jump: [
        Duration::from_millis(300),
        Duration::from_millis(2100),
        Duration::from_millis(3100),
    ],
    lag: [Duration::from_millis(100), Duration::from_millis(600)],
    tolerance: Duration::from_millis(50),
    // Four times the lag measured, for a loaded machine.
    grace: Duration::from_secs(1),
    watch_lag: Duration::from_millis(1200),
    paused: false,
};

/// A TTL as both stores apply it: whole seconds, at least one.
pub fn whole_secs(ttl: Duration) -> Duration {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

/// What the model knows a key holds at some instant.
#[derive(Debug, Clone, Copy)]
pub enum View<'a> {
    /// Nothing alive: never written, released, or surely expired.
    Free,
    /// This record, surely still alive.
    Live(&'a Landed),
    /// A record at the edge of its TTL (real time only).
    Unsure,
}

/// Three-valued: whether an owner's lease is still the key's latest, alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alive {
    Yes,
    No,
    Unsure,
}

pub struct Clock {
    pub timing: Timing,
}

impl Clock {
    pub fn surely_live(&self, entry: &Landed, at: Instant) -> bool {
        entry.record.is_some() && at + self.timing.tolerance < entry.earliest_expiry()
    }

    pub fn surely_gone(&self, entry: &Landed, at: Instant) -> bool {
        entry.record.is_none() || at >= self.latest_expiry(entry)
    }

    /// The latest the store may still hold it.
    pub fn latest_expiry(&self, entry: &Landed) -> Instant {
        entry.end + whole_secs(entry.ttl) + self.timing.grace
    }

    pub fn view<'a>(&self, log: &'a [Landed], key: usize, at: Instant) -> View<'a> {
        match latest(log, key) {
            None => View::Free,
            Some(entry) if self.surely_gone(entry, at) => View::Free,
            Some(entry) if self.surely_live(entry, at) => View::Live(entry),
            Some(_) => View::Unsure,
        }
    }

    /// Whether `owner`'s lease on `key`, as `log` had it when a call
    /// started at `start`, lasted through the call's `end` (`Yes`: its writes
    /// had to be taken), or had ended before the call (`No`: they had to fail).
    pub fn alive(
        &self,
        log: &[Landed],
        key: usize,
        owner: &str,
        start: Instant,
        end: Instant,
    ) -> Alive {
        match latest(log, key) {
            Some(entry) if entry.owner == owner && entry.record.is_some() => {
                if self.surely_live(entry, end) {
                    Alive::Yes
                } else if self.surely_gone(entry, start) {
                    Alive::No
                } else {
                    Alive::Unsure
                }
            }
            // Never written, someone else's, or released.
            _ => Alive::No,
        }
    }
}

/// The key's latest landed write.
pub fn latest(log: &[Landed], key: usize) -> Option<&Landed> {
    log.iter()
        .filter(|entry| entry.key == key)
        .max_by_key(|entry| entry.revision)
}

pub fn at_revision(log: &[Landed], key: usize, revision: u64) -> Option<&Landed> {
    log.iter()
        .find(|entry| entry.key == key && entry.revision == revision)
}

pub fn describe(entry: &Landed) -> String {
    let what = match &entry.record {
        Some(r) => format!("{:?} attempt {}", r.state, r.attempt),
        None => "delete".to_owned(),
    };
    let ack = if entry.acked { "" } else { ", ack lost" };
    format!(
        "{}'s {what} at rev {} (step {}{ack})",
        entry.owner, entry.revision, entry.step
    )
}

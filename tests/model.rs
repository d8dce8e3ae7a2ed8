//! A model check of the claim protocol (`docs/claim.md`, docs/contract.md §4): random
//! schedules of 2-5 workers over 1-3 keys, run against the store's own
//! `acquire` / `renew` / `complete` / `release`, with faults injected
//! under them, and every step checked against a model of what the store
//! holds.
//!
//! A schedule (generated and shrunk by proptest) is a list of steps, run
//! one at a time, each to completion: a worker claims a key (wait 0,
//! short, or longer than a lease), two workers claim one key at once
//! (`tokio::join!`), an owner renews, completes (stores an outcome),
//! releases, or crashes (drops its lease, possibly in the middle of a
//! renewal or completion), a worker claims while the key's owner renews or
//! completes (`tokio::join!`, so a follower sees the holder's next write),
//! or time jumps (a tick, past a lease, past an outcome). Any step can
//! carry a fault for one primitive write of the
//! store underneath ([`Faulty`]): it lands but its acknowledgement is
//! lost, or it fails without landing (`Unacknowledged` or `Unavailable`);
//! reads can fail for the whole step; and a step's plain reads can be
//! stale: each returns what the key held a bounded time before (a record,
//! a marker, or no message), as a replica behind the writes answers
//! (`docs/claim.md`, "Stale replicas"), while the leader's reads stay current.
//! With stale reads an acquire may be busy where it could have decided, or
//! replay an outcome alive within the lag; every safety invariant holds. A step meant for a worker that
//! cannot do it (a claim by one holding a lease, a renewal by one holding
//! none) is done by the next worker that can; the trace says so.
//!
//! [`Faulty`] logs every write that lands (owner, expected and new revision,
//! TTL, when), including one whose caller was cut off after sending it.
//! From that log the model knows what the key holds and until when,
//! without asking the store. Owners use the lease as the worker does
//! (`pipeline.rs`): after a completion fails they only retry it, never
//! renew or release. After every step it checks:
//!
//! 1. at most one live execution per key: a worker that believes it holds a
//!    lease (until its `held_until`) never overlaps another's, and a claim
//!    never lands while another owner's record is alive by the model's clock;
//! 2. once an outcome is stored, every acquire with the same fingerprint gets
//!    `Stored` with exactly that record (another fingerprint: `Reused`) until
//!    its TTL runs out, and nothing is written over it;
//! 3. a fenced-out owner never writes: every landed write is a claim of a
//!    free key or the owner's own next revision, and a renew / complete /
//!    release of an owner whose lease is gone fails and changes nothing;
//! 4. an owner whose write landed (and is still the key's latest, alive) is
//!    never told `LeaseLost`, nor that someone else holds the key;
//! 5. a free key (never claimed, released, lease or outcome expired) is
//!    claimed by the next acquire, and an acquire that waits across the
//!    expiry of a lease it saw takes it over (`takeover`, attempt + 1);
//! 6. within one outcome's lifetime a key runs (an owner proceeds to
//!    complete) more than once only after as many leases were lost or
//!    released, as counted by the model.
//!
//! Two properties: the in-memory store with paused tokio time (exact
//! clock, thousands of cases), and JetStream KV on a real nats-server with
//! real time (few cases, short schedules, one server, fresh keys per case;
//! the model's clock then only decides what is surely alive or surely
//! expired, and leaves the edges of a TTL undecided).
//!
//! A violation fails the test with the shrunk schedule, the invariant and
//! a trace of every call and primitive write. `--nocapture` also shows how
//! often each path was taken; the in-memory property fails if one of
//! [`MUST_COVER`] never was.
//!
//! Run longer with `IDEMQ_MODEL_CASES=50000 cargo test --test model`
//! (in-memory cases, default 4000; 50000 take about 80 s) and
//! `IDEMQ_MODEL_KV_CASES=100` (KV cases, default 20; a case takes about
//! 1.5 s of real time).

mod common;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use idemq::outcome::{Outcome, Record, RecordState};
use idemq::store::kv::{BucketConfig, KvStore};
use idemq::store::memory::MemoryStore;
use idemq::store::{
    Acquire, ClaimProtocol, ClaimRequest, IdempotencyStore, Lease, Slot, StoreError, Versioned,
    Wakeups,
};
use idemq::IdempotencyKey;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestError, TestRunner};
use serde_json::json;
use tokio::time::Instant;

const FINGERPRINT: &str = "fp-main";
const OTHER_FINGERPRINT: &str = "fp-other";

/// The clock of one property: the store's lengths and the model's margins.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Every claim's lease.
    lease: Duration,
    /// Outcome TTLs: [`Ttl::Short`], [`Ttl::Long`].
    outcome_ttl: [Duration; 2],
    /// Acquire waits: [`Wait::Zero`], [`Wait::Short`], [`Wait::Long`].
    wait: [Duration; 3],
    /// Time jumps: [`Jump::Tick`], [`Jump::PastLease`], [`Jump::PastOutcome`].
    jump: [Duration; 3],
    /// How far behind a stale read may be: [`Lag::Short`], [`Lag::Long`].
    lag: [Duration; 2],
    /// How far the model's clock and the store's may disagree.
    tolerance: Duration,
    /// How long past its TTL a store may still show a value.
    grace: Duration,
    /// How late past an expiry a waiting acquire may notice it.
    watch_lag: Duration,
    /// Time is tokio's paused clock (jumps are `advance`), else real (`sleep`).
    paused: bool,
}

/// In memory, time is exact: the store expires a value at the very instant
/// its TTL (whole seconds) ends, and watchers wake then.
const MEMORY: Timing = Timing {
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
const JETSTREAM: Timing = Timing {
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

// ---------------------------------------------------------------------------
// Schedules

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Zero,
    Short,
    Long,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ttl {
    Short,
    Long,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Jump {
    Tick,
    PastLease,
    PastOutcome,
}

/// How far behind the stale reads of a step are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lag {
    Short,
    Long,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Midway {
    Renew,
    Complete,
}

/// What one step does. Worker and key numbers are indices; a step whose
/// worker cannot do it passes to the next one that can (see [`Model::effective`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// `acquire` by a worker holding nothing, with the key's usual
    /// fingerprint or another one.
    Claim {
        w: usize,
        key: usize,
        wait: Wait,
        other_fp: bool,
    },
    /// Two workers' `acquire`s of one key at once (`tokio::join!`).
    ClaimBoth {
        a: usize,
        b: usize,
        key: usize,
        wait: Wait,
    },
    /// An `acquire` by a worker holding nothing while the key's owner
    /// renews or completes, `after_ms` into the wait: a copy that follows
    /// the holder sees its next write.
    ClaimDuring {
        w: usize,
        key: usize,
        wait: Wait,
        owner: usize,
        call: Midway,
        after_ms: u64,
    },
    Renew {
        w: usize,
    },
    Complete {
        w: usize,
        ttl: Ttl,
    },
    Release {
        w: usize,
    },
    /// The worker drops its lease without a word; with `midway`, in the
    /// middle of that call, cut off after `after_ms`.
    Crash {
        w: usize,
        midway: Option<(Midway, u64)>,
    },
    Advance(Jump),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    /// The write lands; its caller is told `Unacknowledged`.
    LoseAck,
    /// The write does not land; its caller is told `Unacknowledged`.
    FailUnacknowledged,
    /// The write does not land; its caller is told `Unavailable`.
    FailUnavailable,
}

/// A fault for the `nth` primitive write (write or remove) of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fault {
    kind: FaultKind,
    nth: u8,
}

#[derive(Clone, PartialEq, Eq)]
struct Step {
    action: Action,
    fault: Option<Fault>,
    /// Every read of the step fails (`Unavailable`).
    reads_fail: bool,
    /// Every plain read of the step (not the leader's) returns what the
    /// key held this long ago: a replica that has not applied the latest
    /// writes (`docs/claim.md`, "Stale replicas").
    stale: Option<Lag>,
}

impl Step {
    /// Whether a fault in this step may leave a call with an error.
    fn faulty(&self) -> bool {
        self.fault.is_some() || self.reads_fail
    }

    /// Whether a fault in this step may make an acquire fail: the others
    /// are settled by the claim's own read.
    fn may_fail_acquire(&self) -> bool {
        self.reads_fail || matches!(self.fault, Some(f) if f.kind == FaultKind::FailUnavailable)
    }
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.action)?;
        if let Some(fault) = self.fault {
            write!(f, " + {:?} on write #{}", fault.kind, fault.nth)?;
        }
        if self.reads_fail {
            write!(f, " + reads fail")?;
        }
        if let Some(lag) = self.stale {
            write!(f, " + reads {lag:?} stale")?;
        }
        Ok(())
    }
}

#[derive(Clone)]
struct Schedule {
    workers: usize,
    keys: usize,
    steps: Vec<Step>,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} workers, {} keys:", self.workers, self.keys)?;
        for (i, step) in self.steps.iter().enumerate() {
            writeln!(f, "  {i:>2}: {step:?}")?;
        }
        Ok(())
    }
}

fn wait() -> impl Strategy<Value = Wait> {
    prop_oneof![2 => Just(Wait::Zero), 1 => Just(Wait::Short), 1 => Just(Wait::Long)]
}

/// How a property's schedules are drawn: weights of the step kinds and
/// how often a step carries a fault.
#[derive(Debug, Clone, Copy)]
struct Profile {
    max_workers: usize,
    max_keys: usize,
    max_steps: usize,
    /// Advance, Claim, ClaimBoth, ClaimDuring, Renew, Complete, Release, Crash.
    weights: [u32; 8],
    /// Out of 8 steps, how many carry a write fault.
    faulty_in_8: u32,
    /// Chance that every read of a step fails.
    reads_fail: f64,
    /// Chance that a step's plain reads are stale.
    stale: f64,
}

/// In memory a step costs nothing: long schedules, all kinds alike.
const MEMORY_PROFILE: Profile = Profile {
    max_workers: 5,
    max_keys: 3,
    max_steps: 40,
    weights: [3, 6, 2, 3, 3, 3, 1, 2],
    faulty_in_8: 3,
    reads_fail: 0.12,
    stale: 0.25,
};

/// On nats-server time is real: few time jumps, and the steps that do
/// happen are mostly an owner's calls, often with a fault.
const JETSTREAM_PROFILE: Profile = Profile {
    max_workers: 3,
    max_keys: 2,
    max_steps: 10,
    weights: [1, 5, 1, 2, 4, 4, 1, 1],
    faulty_in_8: 4,
    reads_fail: 0.12,
    stale: 0.25,
};

fn step(profile: Profile, workers: usize, keys: usize) -> impl Strategy<Value = Step> {
    let w = 0..workers;
    let k = 0..keys;
    let [advance, claim, claim_both, claim_during, renew, complete, release, crash] =
        profile.weights;
    let action = prop_oneof![
        advance => prop_oneof![Just(Jump::Tick), Just(Jump::PastLease), Just(Jump::PastOutcome)]
            .prop_map(Action::Advance),
        claim => (w.clone(), k.clone(), wait(), proptest::bool::weighted(0.1))
            .prop_map(|(w, key, wait, other_fp)| Action::Claim { w, key, wait, other_fp }),
        claim_both => (w.clone(), 1..workers, k.clone(), wait()).prop_map(move |(a, off, key, wait)| {
            Action::ClaimBoth { a, b: (a + off) % workers, key, wait }
        }),
        claim_during => (
            (w.clone(), k.clone(), wait()),
            w.clone(),
            prop_oneof![Just(Midway::Renew), Just(Midway::Complete)],
            prop_oneof![Just(0u64), Just(10), Just(100)],
        )
            .prop_map(|((w, key, wait), owner, call, after_ms)| Action::ClaimDuring {
                w,
                key,
                wait,
                owner,
                call,
                after_ms,
            }),
        renew => w.clone().prop_map(|w| Action::Renew { w }),
        complete => (w.clone(), prop_oneof![Just(Ttl::Short), Just(Ttl::Long)])
            .prop_map(|(w, ttl)| Action::Complete { w, ttl }),
        release => w.clone().prop_map(|w| Action::Release { w }),
        crash => (
            w,
            proptest::option::of((
                prop_oneof![Just(Midway::Renew), Just(Midway::Complete)],
                prop_oneof![Just(0u64), Just(150), Just(1000)],
            )),
        )
            .prop_map(|(w, midway)| Action::Crash { w, midway }),
    ];
    let kind = prop_oneof![
        Just(FaultKind::LoseAck),
        Just(FaultKind::FailUnacknowledged),
        Just(FaultKind::FailUnavailable),
    ];
    let fault = prop_oneof![
        8 - profile.faulty_in_8 => Just(None),
        profile.faulty_in_8 => (kind, 0u8..3).prop_map(|(kind, nth)| Some(Fault { kind, nth })),
    ];
    let stale = prop_oneof![Just(Lag::Short), Just(Lag::Long)];
    (
        action,
        fault,
        proptest::bool::weighted(profile.reads_fail),
        proptest::option::weighted(profile.stale, stale),
    )
        .prop_map(|(action, fault, reads_fail, stale)| Step {
            action,
            fault,
            reads_fail,
            stale,
        })
}

fn schedule(profile: Profile) -> impl Strategy<Value = Schedule> {
    (2..=profile.max_workers, 1..=profile.max_keys).prop_flat_map(move |(workers, keys)| {
        vec(step(profile, workers, keys), 1..=profile.max_steps).prop_map(move |steps| Schedule {
            workers,
            keys,
            steps,
        })
    })
}

// ---------------------------------------------------------------------------
// The fault-injecting store and its log of landed writes

tokio::task_local! {
    /// The owner token a call is made for (a remove carries no record).
    static ACTOR: String;
}

/// A write that landed in the store.
#[derive(Debug, Clone)]
struct Landed {
    key: usize,
    owner: String,
    /// What was written; `None` for a delete (a release).
    record: Option<Record>,
    expected: u64,
    revision: u64,
    ttl: Duration,
    /// When the write was sent and when its answer came: it landed between.
    start: Instant,
    end: Instant,
    acked: bool,
    step: usize,
}

impl Landed {
    fn is_done(&self) -> bool {
        matches!(&self.record, Some(r) if r.state == RecordState::Done)
    }

    fn is_claim(&self) -> bool {
        matches!(&self.record, Some(r) if r.state == RecordState::InProgress)
    }

    /// The earliest the store may expire it: its TTL from when it was sent.
    fn earliest_expiry(&self) -> Instant {
        self.start + whole_secs(self.ttl)
    }
}

/// What a key held from `at` on, for stale reads: a write that landed, or
/// what a read found.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    view: Option<Versioned>,
    /// When a record in it may expire, if known.
    until: Option<Instant>,
}

struct Shared {
    /// When the case started: trace lines say how long after.
    origin: Instant,
    keys: HashMap<IdempotencyKey, usize>,
    log: Vec<Landed>,
    fault: Option<Fault>,
    writes: u8,
    reads_fail: bool,
    /// How far behind this step's plain reads are.
    stale: Option<Duration>,
    /// Per key, what it held over time (see [`Seen`]).
    timeline: HashMap<usize, Vec<Seen>>,
    step: usize,
    trace: Vec<String>,
    /// Writes sent and not yet answered.
    in_flight: usize,
}

impl Shared {
    fn trace(&mut self, line: String) {
        let at = self.origin.elapsed().as_secs_f64();
        self.trace.push(format!("{at:>8.3}s {line}"));
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A store that delegates to a real one, injecting the step's faults into
/// its primitive writes and reads, and logging every write that lands.
#[derive(Clone)]
struct Faulty {
    inner: Arc<dyn IdempotencyStore>,
    shared: Arc<Mutex<Shared>>,
    coverage: Arc<Coverage>,
}

impl Faulty {
    /// Runs a primitive write to its end even if its caller gives up on it
    /// (a crash, an owner's timeout): a write once sent may still land, and
    /// then it is logged.
    async fn detached<T: Send + 'static>(
        &self,
        write: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        lock(&self.shared).in_flight += 1;
        let shared = Arc::clone(&self.shared);
        let task = tokio::spawn(async move {
            let written = write.await;
            lock(&shared).in_flight -= 1;
            written
        });
        task.await
            .map_err(|error| StoreError::Unavailable(format!("the write's task failed: {error}")))?
    }

    /// What the writer of a write that went through hears.
    fn acked<T>(&self, written: Result<T, StoreError>, acked: bool) -> Result<T, StoreError> {
        match written {
            Ok(_) if !acked => {
                self.coverage
                    .hit("store: a write landed, its ack lost (injected)");
                Err(lost_ack())
            }
            written => written,
        }
    }

    /// The fault for this write, if it is the step's `nth` one.
    fn write_fault(&self) -> Option<FaultKind> {
        let mut shared = lock(&self.shared);
        let n = shared.writes;
        shared.writes = shared.writes.saturating_add(1);
        match shared.fault {
            Some(fault) if fault.nth == n => {
                shared.fault = None;
                Some(fault.kind)
            }
            _ => None,
        }
    }

    fn note(&self, line: String) {
        let mut shared = lock(&self.shared);
        let step = shared.step;
        shared.trace(format!("    [{step}] {line}"));
    }

    fn key_index(&self, key: &IdempotencyKey) -> usize {
        lock(&self.shared)
            .keys
            .get(key)
            .copied()
            .unwrap_or(usize::MAX)
    }

    fn reads_fail(&self, what: &str, key: &IdempotencyKey) -> Result<(), StoreError> {
        if lock(&self.shared).reads_fail {
            self.coverage.hit("store: a read failed (injected)");
            self.note(format!(
                "{what} k{} -> injected Unavailable",
                self.key_index(key)
            ));
            return Err(StoreError::Unavailable("injected: reads fail".to_owned()));
        }
        Ok(())
    }

    /// Remembers what `key` held from now on, as a read found it.
    fn observe(&self, key: &IdempotencyKey, view: &Option<Versioned>) {
        let index = self.key_index(key);
        let mut shared = lock(&self.shared);
        let until = view.as_ref().and_then(|v| match v.slot {
            Slot::Record(_) => {
                at_revision(&shared.log, index, v.revision).map(Landed::earliest_expiry)
            }
            Slot::Free { .. } => None,
        });
        let line = shared.timeline.entry(index).or_default();
        if line.last().map(|seen| &seen.view) != Some(view) {
            line.push(Seen {
                at: Instant::now(),
                view: view.clone(),
                until,
            });
        }
    }

    /// What `key` held `lag` ago, by what landed and what reads found: a
    /// record that had run out by then reads as no message.
    fn as_of(&self, key: &IdempotencyKey, lag: Duration) -> Option<Versioned> {
        let index = self.key_index(key);
        let shared = lock(&self.shared);
        let then = Instant::now().checked_sub(lag).unwrap_or(shared.origin);
        let seen = shared
            .timeline
            .get(&index)?
            .iter()
            .rev()
            .find(|seen| seen.at <= then)?;
        match seen.until {
            Some(until) if until <= then => None,
            _ => seen.view.clone(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn landed(
        &self,
        key: &IdempotencyKey,
        owner: String,
        record: Option<Record>,
        expected: u64,
        revision: u64,
        ttl: Duration,
        start: Instant,
        acked: bool,
    ) {
        let key = self.key_index(key);
        let mut shared = lock(&self.shared);
        let step = shared.step;
        let what = match &record {
            Some(r) => format!("{:?} attempt {}", r.state, r.attempt),
            None => "delete".to_owned(),
        };
        let ack = if acked { "" } else { " [ack lost]" };
        shared.trace(format!(
            "    [{step}] {owner} wrote k{key} {what} over rev {expected} -> rev {revision}{ack}"
        ));
        let end = Instant::now();
        let seen = Seen {
            at: end,
            until: record.as_ref().map(|_| start + whole_secs(ttl)),
            view: Some(Versioned {
                revision,
                slot: match &record {
                    Some(record) => Slot::Record(record.clone()),
                    None => Slot::Free { expired: false },
                },
            }),
        };
        shared.timeline.entry(key).or_default().push(seen);
        shared.log.push(Landed {
            key,
            owner,
            record,
            expected,
            revision,
            ttl,
            start,
            end,
            acked,
            step,
        });
    }

    fn refused(&self, owner: &str, key: &IdempotencyKey, expected: u64, error: &StoreError) {
        self.note(format!(
            "{owner} write k{} over rev {expected} -> {error:?}",
            self.key_index(key)
        ));
    }
}

fn injected(kind: FaultKind) -> Option<StoreError> {
    match kind {
        FaultKind::LoseAck => None,
        FaultKind::FailUnacknowledged => Some(StoreError::Unacknowledged(
            "injected: timed out, not stored".to_owned(),
        )),
        FaultKind::FailUnavailable => Some(StoreError::Unavailable(
            "injected: refused, not stored".to_owned(),
        )),
    }
}

fn lost_ack() -> StoreError {
    StoreError::Unacknowledged("injected: stored, ack lost".to_owned())
}

#[async_trait::async_trait]
impl IdempotencyStore for Faulty {
    async fn read(&self, key: &IdempotencyKey) -> Result<Option<Versioned>, StoreError> {
        self.reads_fail("read", key)?;
        let current = self.inner.read(key).await?;
        self.observe(key, &current);
        let Some(lag) = lock(&self.shared).stale else {
            return Ok(current);
        };
        let then = self.as_of(key, lag);
        if then != current {
            self.coverage.hit("store: a stale read (injected)");
            let brief = |view: &Option<Versioned>| match view {
                None => "no message".to_owned(),
                Some(Versioned {
                    revision,
                    slot: Slot::Free { .. },
                }) => format!("a marker at rev {revision}"),
                Some(Versioned {
                    revision,
                    slot: Slot::Record(r),
                }) => {
                    format!("{}'s {:?} at rev {revision}", r.owner, r.state)
                }
            };
            self.note(format!(
                "read k{} -> {} (stale; the key holds {})",
                self.key_index(key),
                brief(&then),
                brief(&current)
            ));
        }
        Ok(then)
    }

    /// The leader's answer is never stale.
    async fn read_leader(&self, key: &IdempotencyKey) -> Result<Option<Versioned>, StoreError> {
        self.reads_fail("read_leader", key)?;
        let current = self.inner.read_leader(key).await?;
        self.observe(key, &current);
        Ok(current)
    }

    async fn write(
        &self,
        key: &IdempotencyKey,
        expected: u64,
        record: &Record,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        let fault = self.write_fault();
        if let Some(error) = fault.and_then(injected) {
            self.coverage
                .hit("store: a write failed without landing (injected)");
            self.refused(&record.owner, key, expected, &error);
            return Err(error);
        }
        let acked = fault != Some(FaultKind::LoseAck);
        let (this, key, record) = (self.clone(), key.clone(), record.clone());
        let written = self
            .detached(async move {
                let start = Instant::now();
                let written = this.inner.write(&key, expected, &record, ttl).await;
                match &written {
                    Ok(revision) => {
                        let owner = record.owner.clone();
                        this.landed(
                            &key,
                            owner,
                            Some(record),
                            expected,
                            *revision,
                            ttl,
                            start,
                            acked,
                        );
                    }
                    Err(error) => this.refused(&record.owner, &key, expected, error),
                }
                written
            })
            .await;
        self.acked(written, acked)
    }

    async fn remove(&self, key: &IdempotencyKey, expected: u64) -> Result<(), StoreError> {
        let owner = ACTOR
            .try_with(Clone::clone)
            .unwrap_or_else(|_| "?".to_owned());
        let fault = self.write_fault();
        if let Some(error) = fault.and_then(injected) {
            self.coverage
                .hit("store: a write failed without landing (injected)");
            self.refused(&owner, key, expected, &error);
            return Err(error);
        }
        let acked = fault != Some(FaultKind::LoseAck);
        let (this, key) = (self.clone(), key.clone());
        let removed = self
            .detached(async move {
                let start = Instant::now();
                let removed = this.inner.remove(&key, expected).await;
                match &removed {
                    Ok(()) => {
                        // The delete's revision, for the model (nothing else
                        // writes the key between the two calls).
                        let revision = match this.inner.read(&key).await {
                            Ok(Some(Versioned {
                                revision,
                                slot: Slot::Free { .. },
                            })) => revision,
                            _ => 0,
                        };
                        let ttl = idemq::store::memory::MARKER_TTL;
                        this.landed(&key, owner, None, expected, revision, ttl, start, acked);
                    }
                    Err(error) => this.refused(&owner, &key, expected, error),
                }
                removed
            })
            .await;
        self.acked(removed, acked)
    }

    async fn purge(&self, key: &IdempotencyKey, expected: u64) -> Result<(), StoreError> {
        self.inner.purge(key, expected).await
    }

    async fn wakeups(&self, key: &IdempotencyKey) -> Result<Wakeups, StoreError> {
        self.inner.wakeups(key).await
    }
}

/// A TTL as both stores apply it: whole seconds, at least one.
fn whole_secs(ttl: Duration) -> Duration {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

// ---------------------------------------------------------------------------
// The model's view of a key, from the log alone

/// What the model knows a key holds at some instant.
#[derive(Debug, Clone, Copy)]
enum View<'a> {
    /// Nothing alive: never written, released, or surely expired.
    Free,
    /// This record, surely still alive.
    Live(&'a Landed),
    /// A record at the edge of its TTL (real time only).
    Unsure,
}

/// Three-valued: whether an owner's lease is still the key's latest, alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alive {
    Yes,
    No,
    Unsure,
}

struct Clock {
    timing: Timing,
}

impl Clock {
    fn surely_live(&self, entry: &Landed, at: Instant) -> bool {
        entry.record.is_some() && at + self.timing.tolerance < entry.earliest_expiry()
    }

    fn surely_gone(&self, entry: &Landed, at: Instant) -> bool {
        entry.record.is_none() || at >= self.latest_expiry(entry)
    }

    /// The latest the store may still hold it.
    fn latest_expiry(&self, entry: &Landed) -> Instant {
        entry.end + whole_secs(entry.ttl) + self.timing.grace
    }

    fn view<'a>(&self, log: &'a [Landed], key: usize, at: Instant) -> View<'a> {
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
    fn alive(
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
fn latest(log: &[Landed], key: usize) -> Option<&Landed> {
    log.iter()
        .filter(|entry| entry.key == key)
        .max_by_key(|entry| entry.revision)
}

fn at_revision(log: &[Landed], key: usize, revision: u64) -> Option<&Landed> {
    log.iter()
        .find(|entry| entry.key == key && entry.revision == revision)
}

fn describe(entry: &Landed) -> String {
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

// ---------------------------------------------------------------------------
// The model

const INVARIANTS: [&str; 7] = [
    "the store answers with what it stores",
    "at most one live execution per key",
    "a stored outcome is replayed until it expires",
    "a fenced-out owner never writes",
    "an owner whose write landed is not told it lost the lease",
    "a free or expired key is taken over",
    "a key runs again only after a lost or released lease",
];

/// The message of a failed check: invariant 1-6, or 0 for the plain
/// consistency of what a call returns with what the log says landed.
fn violation(invariant: usize, step: usize, detail: impl fmt::Display) -> String {
    let which = match invariant {
        0 => "consistency".to_owned(),
        n => format!("invariant {n}"),
    };
    format!(
        "{which} ({}) violated at step {step}: {detail}",
        INVARIANTS[invariant]
    )
}

/// A call's result in a few words.
fn outcome_of<T>(result: &Result<T, StoreError>) -> String {
    match result {
        Ok(_) => "Ok".to_owned(),
        Err(error) => format!("{error:?}"),
    }
}

/// How often each interesting path was taken, over all cases of a property.
#[derive(Default)]
struct Coverage(Mutex<std::collections::BTreeMap<&'static str, u64>>);

impl Coverage {
    fn hit(&self, what: &'static str) {
        *self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(what)
            .or_default() += 1;
    }

    fn count(&self, what: &str) -> u64 {
        let counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        counts.get(what).copied().unwrap_or(0)
    }

    fn summary(&self) -> String {
        let counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        counts
            .iter()
            .map(|(what, n)| format!("  {n:>7}  {what}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

struct Ctx {
    store: Faulty,
    coverage: Arc<Coverage>,
    inner: Arc<dyn IdempotencyStore>,
    shared: Arc<Mutex<Shared>>,
    keys: Vec<IdempotencyKey>,
    clock: Clock,
    /// Names owner tokens apart across cases on a shared store.
    run: String,
}

impl Ctx {
    fn new(
        inner: Arc<dyn IdempotencyStore>,
        keys: Vec<IdempotencyKey>,
        timing: Timing,
        coverage: Arc<Coverage>,
    ) -> Ctx {
        let origin = Instant::now();
        let shared = Arc::new(Mutex::new(Shared {
            origin,
            keys: keys.iter().cloned().zip(0..).collect(),
            log: Vec::new(),
            fault: None,
            writes: 0,
            reads_fail: false,
            stale: None,
            // Every key starts with no message.
            timeline: (0..keys.len())
                .map(|key| {
                    let seen = Seen {
                        at: origin,
                        view: None,
                        until: None,
                    };
                    (key, vec![seen])
                })
                .collect(),
            step: 0,
            trace: Vec::new(),
            in_flight: 0,
        }));
        Ctx {
            coverage: Arc::clone(&coverage),
            store: Faulty {
                inner: Arc::clone(&inner),
                shared: Arc::clone(&shared),
                coverage: Arc::clone(&coverage),
            },
            inner,
            shared,
            keys,
            clock: Clock { timing },
            run: nuid::next().to_string()[..6].to_owned(),
        }
    }

    fn hit(&self, what: &'static str) {
        self.coverage.hit(what);
    }

    fn timing(&self) -> &Timing {
        &self.clock.timing
    }

    fn log(&self) -> Vec<Landed> {
        lock(&self.shared).log.clone()
    }

    fn log_len(&self) -> usize {
        lock(&self.shared).log.len()
    }

    fn note(&self, line: String) {
        lock(&self.shared).trace(line);
    }

    fn arm(&self, index: usize, step: &Step) {
        let mut shared = lock(&self.shared);
        shared.step = index;
        shared.fault = step.fault;
        shared.writes = 0;
        shared.reads_fail = step.reads_fail;
        shared.stale = step.stale.map(|lag| self.clock.timing.lag[lag as usize]);
    }

    fn disarm(&self) {
        let mut shared = lock(&self.shared);
        shared.fault = None;
        shared.reads_fail = false;
        shared.stale = None;
    }

    /// Waits (bounded) until every write a step sent has landed or
    /// failed, so that the step's checks see them.
    async fn settle(&self) {
        for _ in 0..5000 {
            if lock(&self.shared).in_flight == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.note("  writes still in flight after 5 s".to_owned());
    }

    fn trace(&self) -> String {
        lock(&self.shared).trace.join("\n")
    }
}

struct Held {
    key: usize,
    owner: String,
    lease: Lease,
    grant: usize,
    /// A completion was tried and failed (not `LeaseLost`): like the
    /// worker, it only retries the completion now, never renews or releases.
    completing: bool,
}

#[derive(Default)]
struct Worker {
    claims: u32,
    held: Option<Held>,
}

struct Grant {
    key: usize,
    generation: u32,
    owner: String,
    /// The handler ran: its owner proceeded to complete.
    ran: bool,
    ended: bool,
}

/// One key's executions within the lifetime of one outcome: from the
/// expiry of the previous outcome (or the start) to the expiry of the next.
#[derive(Default)]
struct Epoch {
    /// Which lifetime of the key this is, from 0.
    generation: u32,
    /// The outcome (its revision) whose lifetime this is.
    outcome: Option<u64>,
    closed: HashSet<u64>,
}

/// Runs and spare runs of one lifetime of one key.
#[derive(Debug, Default, Clone, Copy)]
struct Runs {
    runs: u32,
    /// Grants that ended without storing an outcome: lost or released.
    spare: u32,
}

struct Model {
    workers: Vec<Worker>,
    grants: Vec<Grant>,
    epochs: Vec<Epoch>,
    /// Per key and lifetime: a grant counts in the lifetime it was made in.
    runs: HashMap<(usize, u32), Runs>,
}

/// What an acquire started from, for checking what it returned.
struct Before {
    at: Instant,
    log_len: usize,
    wait: Duration,
    joined: bool,
}

impl Model {
    fn new(workers: usize, keys: usize) -> Model {
        Model {
            workers: (0..workers).map(|_| Worker::default()).collect(),
            grants: Vec::new(),
            epochs: (0..keys).map(|_| Epoch::default()).collect(),
            runs: HashMap::new(),
        }
    }

    fn request(&mut self, ctx: &Ctx, w: usize, key: usize, other_fp: bool) -> ClaimRequest {
        let worker = &mut self.workers[w];
        worker.claims += 1;
        let fingerprint = if other_fp {
            OTHER_FINGERPRINT
        } else {
            FINGERPRINT
        };
        ClaimRequest {
            key: ctx.keys[key].clone(),
            intent_id: format!("intent-{key}"),
            fingerprint: fingerprint.to_owned(),
            owner: format!("{}-w{w}.{}", ctx.run, worker.claims),
            lease: ctx.timing().lease,
        }
    }

    fn holders(&self, key: usize) -> impl Iterator<Item = (usize, &Held)> {
        self.workers
            .iter()
            .enumerate()
            .filter_map(move |(w, worker)| worker.held.as_ref().map(|held| (w, held)))
            .filter(move |(_, held)| held.key == key)
    }

    /// The worker that does a step meant for `w`: `w` if it `can`, else
    /// the next one (in turn) that can.
    fn pick(&self, w: usize, can: impl Fn(&Worker) -> bool) -> Option<usize> {
        let n = self.workers.len();
        (0..n).map(|j| (w + j) % n).find(|&v| can(&self.workers[v]))
    }

    /// The step's action as done: a claim by a worker that holds a lease,
    /// or an owner's call by one that holds none, passes to the next
    /// worker that can; `None` when none can.
    fn effective(&self, action: Action) -> Option<Action> {
        let idle = |worker: &Worker| worker.held.is_none();
        let holds = |worker: &Worker| worker.held.is_some();
        let owns = |worker: &Worker| worker.held.as_ref().is_some_and(|h| !h.completing);
        Some(match action {
            Action::Claim {
                w,
                key,
                wait,
                other_fp,
            } => Action::Claim {
                w: self.pick(w, idle)?,
                key,
                wait,
                other_fp,
            },
            Action::ClaimBoth { a, b, key, wait } => {
                let a = self.pick(a, idle)?;
                let b = self
                    .pick(b, |worker| idle(worker))
                    .filter(|&b| b != a)
                    .or_else(|| self.pick(a + 1, idle).filter(|&b| b != a))?;
                Action::ClaimBoth { a, b, key, wait }
            }
            Action::ClaimDuring {
                w,
                key,
                wait,
                owner,
                call,
                after_ms,
            } => {
                let owns_key = |worker: &Worker| {
                    worker.held.as_ref().is_some_and(|held| {
                        held.key == key && (call == Midway::Complete || !held.completing)
                    })
                };
                let w = self.pick(w, idle)?;
                match self.pick(owner, owns_key) {
                    Some(owner) => Action::ClaimDuring {
                        w,
                        key,
                        wait,
                        owner,
                        call,
                        after_ms,
                    },
                    None => Action::Claim {
                        w,
                        key,
                        wait,
                        other_fp: false,
                    },
                }
            }
            Action::Renew { w } => Action::Renew {
                w: self.pick(w, owns)?,
            },
            Action::Release { w } => Action::Release {
                w: self.pick(w, owns)?,
            },
            Action::Complete { w, ttl } => Action::Complete {
                w: self.pick(w, holds)?,
                ttl,
            },
            Action::Crash { w, midway } => Action::Crash {
                w: self.pick(w, holds)?,
                midway,
            },
            Action::Advance(jump) => Action::Advance(jump),
        })
    }

    async fn step(&mut self, ctx: &Ctx, i: usize, step: &Step) -> Result<(), String> {
        let Some(action) = self.effective(step.action) else {
            ctx.note(format!(
                "  {i}: no worker can do {:?}: skipped",
                step.action
            ));
            ctx.hit("step skipped");
            return Ok(());
        };
        if action != step.action {
            ctx.note(format!("  {i}: done as {action:?}"));
        }
        match action {
            Action::Claim {
                w,
                key,
                wait,
                other_fp,
            } => {
                if self.workers[w].held.is_some() {
                    ctx.note(format!("  {i}: w{w} holds a lease: skipped"));
                    ctx.hit("step skipped");
                    return Ok(());
                }
                let request = self.request(ctx, w, key, other_fp);
                let before = Before {
                    at: Instant::now(),
                    log_len: ctx.log_len(),
                    wait: ctx.timing().wait[wait as usize],
                    joined: false,
                };
                let acquired = ACTOR
                    .scope(
                        request.owner.clone(),
                        ctx.store.acquire(&request, before.wait),
                    )
                    .await;
                ctx.note(format!(
                    "  {i}: w{w} {} -> {}",
                    request.owner,
                    brief(&acquired)
                ));
                self.check_acquire(ctx, i, step, w, key, &request, &before, acquired)
            }
            Action::ClaimBoth { a, b, key, wait } => {
                if self.workers[a].held.is_some() || self.workers[b].held.is_some() {
                    ctx.note(format!("  {i}: w{a} or w{b} holds a lease: skipped"));
                    ctx.hit("step skipped");
                    return Ok(());
                }
                let first = self.request(ctx, a, key, false);
                let second = self.request(ctx, b, key, false);
                let before = Before {
                    at: Instant::now(),
                    log_len: ctx.log_len(),
                    wait: ctx.timing().wait[wait as usize],
                    joined: true,
                };
                let (one, two) = tokio::join!(
                    ACTOR.scope(first.owner.clone(), ctx.store.acquire(&first, before.wait)),
                    ACTOR.scope(
                        second.owner.clone(),
                        ctx.store.acquire(&second, before.wait)
                    ),
                );
                ctx.note(format!("  {i}: w{a} {} -> {}", first.owner, brief(&one)));
                ctx.note(format!("  {i}: w{b} {} -> {}", second.owner, brief(&two)));
                let owners = [&one, &two]
                    .iter()
                    .filter(|r| matches!(r, Ok(Acquire::Owner(_))))
                    .count();
                let log = ctx.log();
                let pre = ctx.clock.view(&log[..before.log_len], key, before.at);
                if matches!(pre, View::Free)
                    && owners == 0
                    && !step.may_fail_acquire()
                    && step.stale.is_none()
                {
                    return Err(violation(
                        5,
                        i,
                        format!("k{key} was free and neither of two concurrent acquires took it"),
                    ));
                }
                // Register the earlier owner first, so the later one is
                // checked against it.
                let revision = |r: &Result<Acquire, StoreError>| match r {
                    Ok(Acquire::Owner(lease)) => lease.revision,
                    _ => u64::MAX,
                };
                let mut both = [(a, first, one), (b, second, two)];
                both.sort_by_key(|(_, _, r)| revision(r));
                for (w, request, acquired) in both {
                    self.check_acquire(ctx, i, step, w, key, &request, &before, acquired)?;
                }
                Ok(())
            }
            Action::ClaimDuring {
                w,
                key,
                wait,
                owner,
                call,
                after_ms,
            } => {
                let request = self.request(ctx, w, key, false);
                let before = Before {
                    at: Instant::now(),
                    log_len: ctx.log_len(),
                    wait: ctx.timing().wait[wait as usize],
                    joined: true,
                };
                let acquire = ACTOR.scope(
                    request.owner.clone(),
                    ctx.store.acquire(&request, before.wait),
                );
                let owner_call = async {
                    tokio::time::sleep(Duration::from_millis(after_ms)).await;
                    match call {
                        Midway::Renew => self.renew(ctx, i, step, owner).await,
                        Midway::Complete => {
                            let ttl = ctx.timing().outcome_ttl[0];
                            self.complete(ctx, i, step, owner, ttl).await
                        }
                    }
                };
                let (acquired, called) = tokio::join!(acquire, owner_call);
                ctx.hit("acquire: during an owner's call");
                ctx.note(format!(
                    "  {i}: w{w} {} (during w{owner}'s {call:?}) -> {}",
                    request.owner,
                    brief(&acquired)
                ));
                called?;
                self.check_acquire(ctx, i, step, w, key, &request, &before, acquired)
            }
            Action::Renew { w } => self.renew(ctx, i, step, w).await,
            Action::Complete { w, ttl } => {
                let ttl = ctx.timing().outcome_ttl[ttl as usize];
                self.complete(ctx, i, step, w, ttl).await
            }
            Action::Release { w } => self.release(ctx, i, step, w).await,
            Action::Crash { w, midway } => self.crash(ctx, i, w, midway).await,
            Action::Advance(jump) => {
                let by = ctx.timing().jump[jump as usize];
                if ctx.timing().paused {
                    tokio::time::advance(by).await;
                } else {
                    tokio::time::sleep(by).await;
                }
                ctx.note(format!("  {i}: time + {by:?}"));
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_acquire(
        &mut self,
        ctx: &Ctx,
        i: usize,
        step: &Step,
        w: usize,
        key: usize,
        request: &ClaimRequest,
        before: &Before,
        acquired: Result<Acquire, StoreError>,
    ) -> Result<(), String> {
        let now = Instant::now();
        let log = ctx.log();
        let clock = &ctx.clock;
        let pre = clock.view(&log[..before.log_len], key, before.at);
        let who = format!("w{w} ({})", request.owner);
        // With stale reads an acquire may see the key as it was up to `lag`
        // before: it may answer an outcome stored (and alive) then, or be
        // busy where it could have decided; it never takes a key that is
        // not free (1, 3) nor answers anything else (2).
        let lag = step.stale.map(|lag| ctx.timing().lag[lag as usize]);
        let recently_stored = |record: &Record| {
            lag.is_some_and(|lag| {
                let since = before.at.checked_sub(lag).unwrap_or(before.at);
                log.iter().any(|e| {
                    e.key == key
                        && e.is_done()
                        && e.record.as_ref() == Some(record)
                        && !clock.surely_gone(e, since)
                })
            })
        };

        // 2: an outcome alive throughout is what the acquire answers.
        if let View::Live(stored) = pre {
            if stored.is_done() && clock.surely_live(stored, now) {
                let expected = stored.record.as_ref();
                let fine = match &acquired {
                    Ok(Acquire::Stored { record, .. }) => {
                        Some(record) == expected || recently_stored(record)
                    }
                    Ok(Acquire::Reused(_)) => {
                        expected.is_some_and(|r| r.fingerprint != request.fingerprint)
                    }
                    Ok(Acquire::Busy(_)) => lag.is_some(),
                    Err(_) => step.may_fail_acquire(),
                    _ => false,
                };
                if !fine {
                    return Err(violation(
                        2,
                        i,
                        format!(
                            "{who} acquired k{key} while {} was stored and alive, and got {}",
                            describe(stored),
                            brief(&acquired)
                        ),
                    ));
                }
            }
        }
        // 5: a free key is claimed (unless the other of two took it).
        if matches!(pre, View::Free)
            && !before.joined
            && lag.is_none()
            && !step.may_fail_acquire()
            && !matches!(acquired, Ok(Acquire::Owner(_)))
        {
            return Err(violation(
                5,
                i,
                format!(
                    "k{key} was free, and {who}'s acquire got {}",
                    brief(&acquired)
                ),
            ));
        }
        // 5: a lease seen running and expiring within the wait is taken over.
        let mut expect_takeover = None;
        if let View::Live(holder) = pre {
            let deadline = before.at + before.wait;
            if holder.is_claim()
                && holder.owner != request.owner
                && holder
                    .record
                    .as_ref()
                    .is_some_and(|r| r.fingerprint == request.fingerprint)
                && !before.joined
                && lag.is_none()
                && !step.may_fail_acquire()
                && clock.latest_expiry(holder) + ctx.timing().watch_lag < deadline
            {
                expect_takeover = Some(holder);
            }
        }

        ctx.hit(match &acquired {
            Ok(Acquire::Owner(lease)) if lease.takeover => "acquire: Owner, takeover",
            Ok(Acquire::Owner(_)) => "acquire: Owner",
            Ok(Acquire::Stored { waited: true, .. }) => "acquire: Stored, after waiting",
            Ok(Acquire::Stored { .. }) => "acquire: Stored",
            Ok(Acquire::Reused(_)) => "acquire: Reused",
            Ok(Acquire::Busy(_)) => "acquire: Busy",
            Err(_) => "acquire: error",
        });
        if expect_takeover.is_some() {
            ctx.hit("acquire: waits across a lease's expiry");
        }
        match acquired {
            Err(error) => {
                if !step.may_fail_acquire() {
                    return Err(violation(
                        5,
                        i,
                        format!("{who}'s acquire of k{key} failed with no fault to explain it: {error:?}"),
                    ));
                }
            }
            Ok(Acquire::Owner(lease)) => {
                let Some(claim) = at_revision(&log, key, lease.revision) else {
                    return Err(violation(
                        0,
                        i,
                        format!(
                            "{who} got k{key} at rev {} that no write produced",
                            lease.revision
                        ),
                    ));
                };
                if claim.owner != request.owner
                    || claim.record.as_ref() != Some(&lease.record)
                    || lease.unsettled
                    || lease.record.fingerprint != request.fingerprint
                {
                    return Err(violation(
                        0,
                        i,
                        format!(
                            "{who} got a lease at rev {} on the record of {} (attempt {}, unsettled {}), but rev {} is {}",
                            lease.revision,
                            lease.record.owner,
                            lease.record.attempt,
                            lease.unsettled,
                            lease.revision,
                            describe(claim)
                        ),
                    ));
                }
                // 1: nobody else still believes it holds the key.
                for (other, held) in self.holders(key) {
                    if held.lease.held_until > claim.end + ctx.timing().tolerance {
                        return Err(violation(
                            1,
                            i,
                            format!(
                                "{who} got k{key} while w{other} ({}) holds its lease for {:?} more",
                                held.owner,
                                held.lease.held_until - claim.end
                            ),
                        ));
                    }
                }
                let previous = log
                    .iter()
                    .filter(|e| e.key == key && e.revision < claim.revision)
                    .max_by_key(|e| e.revision);
                if lease.takeover && !previous.is_some_and(Landed::is_claim) {
                    return Err(violation(
                        6,
                        i,
                        format!(
                            "{who}'s lease says takeover, but k{key} held {} before",
                            previous.map_or("nothing".to_owned(), describe)
                        ),
                    ));
                }
                if let Some(holder) = expect_takeover {
                    let attempt = holder.record.as_ref().map_or(0, |r| r.attempt) + 1;
                    if !lease.takeover || lease.record.attempt != attempt {
                        return Err(violation(
                            5,
                            i,
                            format!(
                                "{who} waited across the expiry of {} and got k{key} with takeover {} attempt {} (expected a takeover, attempt {attempt})",
                                describe(holder),
                                lease.takeover,
                                lease.record.attempt
                            ),
                        ));
                    }
                }
                let grant = self.grants.len();
                self.grants.push(Grant {
                    key,
                    generation: self.epochs[key].generation,
                    owner: request.owner.clone(),
                    ran: false,
                    ended: false,
                });
                self.workers[w].held = Some(Held {
                    key,
                    owner: request.owner.clone(),
                    lease,
                    grant,
                    completing: false,
                });
                return Ok(());
            }
            Ok(Acquire::Stored { record, .. }) => {
                let stored = latest(&log, key).filter(|e| e.is_done());
                let fine = record.fingerprint == request.fingerprint
                    && (stored.is_some_and(|d| {
                        d.record.as_ref() == Some(&record) && !clock.surely_gone(d, before.at)
                    }) || recently_stored(&record));
                if !fine {
                    return Err(violation(
                        2,
                        i,
                        format!(
                            "{who} was answered with the outcome {record:?}, but k{key} holds {}",
                            latest(&log, key).map_or("nothing".to_owned(), describe)
                        ),
                    ));
                }
            }
            Ok(Acquire::Reused(record)) => {
                if record.fingerprint == request.fingerprint {
                    return Err(violation(
                        0,
                        i,
                        format!(
                            "{who} was told k{key} is reused by its own fingerprint: {record:?}"
                        ),
                    ));
                }
            }
            Ok(Acquire::Busy(record)) => {
                if record.fingerprint != request.fingerprint
                    || record.state != RecordState::InProgress
                    || record.owner == request.owner
                {
                    return Err(violation(
                        0,
                        i,
                        format!("{who} was told k{key} is busy with {record:?}"),
                    ));
                }
            }
        }
        if let Some(holder) = expect_takeover {
            return Err(violation(
                5,
                i,
                format!(
                    "{who} waited {:?} across the expiry of {} and did not take k{key} over",
                    before.wait,
                    describe(holder)
                ),
            ));
        }
        Ok(())
    }

    /// Checks common to an owner's renew and complete.
    #[allow(clippy::too_many_arguments)]
    fn check_owner_call<T: fmt::Debug>(
        &self,
        ctx: &Ctx,
        i: usize,
        step: &Step,
        w: usize,
        held: &Held,
        what: &str,
        alive: Alive,
        log_len: usize,
        unchanged: Option<(&Option<Versioned>, &Option<Versioned>)>,
        result: &Result<T, StoreError>,
    ) -> Result<(), String> {
        let now = Instant::now();
        let log = ctx.log();
        let key = held.key;
        let who = format!("w{w} ({})", held.owner);
        let landed_now: Vec<&Landed> = log[log_len..]
            .iter()
            .filter(|e| e.owner == held.owner)
            .collect();
        let renewal = what == "renewal";
        ctx.hit(match (renewal, result) {
            (true, Ok(_)) => "renew: Ok",
            (true, Err(StoreError::LeaseLost)) => "renew: LeaseLost",
            (true, Err(_)) => "renew: other error",
            (false, Ok(_)) => "complete: Ok",
            (false, Err(StoreError::LeaseLost)) => "complete: LeaseLost",
            (false, Err(_)) => "complete: other error",
        });
        if alive == Alive::No {
            ctx.hit(if renewal {
                "renew: lease gone"
            } else {
                "complete: lease gone"
            });
        }
        if result.is_ok() && landed_now.iter().any(|e| !e.acked) {
            ctx.hit("owner: a write whose ack was lost, settled in the same call");
        }
        // A completion that finds its own outcome, landed in an earlier call
        // (its ack lost) and run out since, reports it: it was stored.
        let own_outcome_found = !renewal
            && result.is_ok()
            && landed_now.is_empty()
            && log[..log_len]
                .iter()
                .any(|e| e.key == key && e.owner == held.owner && e.is_done());
        match alive {
            Alive::No if own_outcome_found => {
                ctx.hit("complete: finds its own outcome, run out since");
            }
            Alive::No => {
                // 3: a fenced or expired owner's call fails and writes nothing.
                if result.is_ok() || !landed_now.is_empty() {
                    return Err(violation(
                        3,
                        i,
                        format!(
                            "{who}'s lease on k{key} was gone (k{key} holds {}), yet its {what} returned {} and landed [{}]",
                            latest(&log[..log_len], key).map_or("nothing".to_owned(), describe),
                            outcome_of(result),
                            landed_now.iter().map(|e| describe(e)).collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
                if let Some((before, after)) = unchanged {
                    if before != after {
                        return Err(violation(
                            3,
                            i,
                            format!(
                                "{who}'s fenced {what} changed k{key} from {before:?} to {after:?}"
                            ),
                        ));
                    }
                }
            }
            Alive::Yes if !step.faulty() && result.is_err() => {
                return Err(violation(
                    0,
                    i,
                    format!("{who} holds k{key}, no fault, and its {what} failed: {result:?}"),
                ));
            }
            _ => {}
        }
        if matches!(result, Err(StoreError::LeaseLost)) {
            // 4: LeaseLost only when the lease is gone.
            if alive == Alive::Yes
                || ctx.clock.alive(&log, key, &held.owner, now, now) == Alive::Yes
            {
                return Err(violation(
                    4,
                    i,
                    format!(
                        "{who}'s {what} was told LeaseLost, but k{key} holds {}, alive",
                        latest(&log, key).map_or("nothing".to_owned(), describe)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The key's current record if it is surely alive until `until`.
    fn stable(ctx: &Ctx, key: usize, view: &Option<Versioned>, until: Instant) -> bool {
        let log = ctx.log();
        match view {
            Some(v) => at_revision(&log, key, v.revision)
                .is_some_and(|e| e.record.is_some() && ctx.clock.surely_live(e, until)),
            None => false,
        }
    }

    async fn renew(&mut self, ctx: &Ctx, i: usize, step: &Step, w: usize) -> Result<(), String> {
        let Some(mut held) = self.workers[w].held.take() else {
            ctx.note(format!("  {i}: w{w} holds nothing: skipped"));
            ctx.hit("step skipped");
            return Ok(());
        };
        if held.completing {
            ctx.note(format!("  {i}: w{w} is completing: skipped"));
            ctx.hit("step skipped");
            self.workers[w].held = Some(held);
            return Ok(());
        }
        let key = held.key;
        let (start, log_len) = (Instant::now(), ctx.log_len());
        let pre_log = ctx.log();
        if held.lease.unsettled {
            ctx.hit("owner: unsettled from an earlier call");
        }
        let before = ctx.inner.read(&ctx.keys[key]).await.ok().flatten();
        let result = ACTOR
            .scope(held.owner.clone(), ctx.store.renew(&mut held.lease))
            .await;
        let after = ctx.inner.read(&ctx.keys[key]).await.ok().flatten();
        let alive = ctx
            .clock
            .alive(&pre_log, key, &held.owner, start, Instant::now());
        ctx.note(format!("  {i}: w{w} {} renew -> {result:?}", held.owner));
        let unchanged =
            Self::stable(ctx, key, &before, Instant::now()).then_some((&before, &after));
        self.check_owner_call(
            ctx, i, step, w, &held, "renewal", alive, log_len, unchanged, &result,
        )?;
        match result {
            Ok(()) => {
                let log = ctx.log();
                let fine = latest(&log, key).is_some_and(|e| {
                    e.owner == held.owner
                        && e.revision == held.lease.revision
                        && e.is_claim()
                        && e.record.as_ref() == Some(&held.lease.record)
                }) && !held.lease.unsettled;
                if !fine {
                    return Err(violation(
                        0,
                        i,
                        format!(
                            "w{w}'s renewal succeeded, but its lease {:?} is not k{key}'s latest {:?}",
                            held.lease,
                            latest(&log, key)
                        ),
                    ));
                }
                self.workers[w].held = Some(held);
            }
            Err(StoreError::LeaseLost) => {}
            Err(_) => self.workers[w].held = Some(held),
        }
        Ok(())
    }

    /// The handler of this grant ran: count it against the key's epoch (6).
    fn ran(&mut self, ctx: &Ctx, i: usize, held: &Held) -> Result<(), String> {
        let grant = &mut self.grants[held.grant];
        if grant.ran {
            return Ok(());
        }
        grant.ran = true;
        let runs = self.runs.entry((grant.key, grant.generation)).or_default();
        runs.runs += 1;
        if runs.runs > 1 {
            ctx.hit("a key runs again after a lost or released lease");
        }
        if runs.runs > 1 + runs.spare {
            return Err(violation(
                6,
                i,
                format!(
                    "{} is run {} of k{} in one outcome's lifetime, with {} lease(s) lost or released before",
                    held.owner, runs.runs, held.key, runs.spare
                ),
            ));
        }
        Ok(())
    }

    fn outcome(owner: &str) -> Outcome {
        Outcome::Success(json!({ "by": owner }))
    }

    async fn complete(
        &mut self,
        ctx: &Ctx,
        i: usize,
        step: &Step,
        w: usize,
        ttl: Duration,
    ) -> Result<(), String> {
        let Some(mut held) = self.workers[w].held.take() else {
            ctx.note(format!("  {i}: w{w} holds nothing: skipped"));
            ctx.hit("step skipped");
            return Ok(());
        };
        self.ran(ctx, i, &held)?;
        let key = held.key;
        let (start, log_len) = (Instant::now(), ctx.log_len());
        let pre_log = ctx.log();
        if held.lease.unsettled {
            ctx.hit("owner: unsettled from an earlier call");
        }
        let before = ctx.inner.read(&ctx.keys[key]).await.ok().flatten();
        let outcome = Self::outcome(&held.owner);
        let result = ACTOR
            .scope(
                held.owner.clone(),
                ctx.store.complete(&mut held.lease, outcome.clone(), ttl),
            )
            .await;
        let after = ctx.inner.read(&ctx.keys[key]).await.ok().flatten();
        let alive = ctx
            .clock
            .alive(&pre_log, key, &held.owner, start, Instant::now());
        ctx.note(format!(
            "  {i}: w{w} {} complete -> {}",
            held.owner,
            match &result {
                Ok(r) => format!("Ok(rev {}, {:?})", held.lease.revision, r.state),
                Err(e) => format!("{e:?}"),
            }
        ));
        let unchanged =
            Self::stable(ctx, key, &before, Instant::now()).then_some((&before, &after));
        self.check_owner_call(
            ctx,
            i,
            step,
            w,
            &held,
            "completion",
            alive,
            log_len,
            unchanged,
            &result,
        )?;
        match result {
            Ok(record) => {
                let log = ctx.log();
                let fine = latest(&log, key).is_some_and(|e| {
                    e.owner == held.owner && e.is_done() && e.record.as_ref() == Some(&record)
                }) && record.result.as_ref() == Some(&outcome);
                if !fine {
                    return Err(violation(
                        0,
                        i,
                        format!(
                            "w{w}'s completion returned {record:?}, but k{key} holds {:?}",
                            latest(&log, key)
                        ),
                    ));
                }
            }
            Err(StoreError::LeaseLost) => {}
            Err(_) => {
                held.completing = true;
                self.workers[w].held = Some(held);
            }
        }
        Ok(())
    }

    async fn release(&mut self, ctx: &Ctx, i: usize, step: &Step, w: usize) -> Result<(), String> {
        let Some(mut held) = self.workers[w].held.take() else {
            ctx.note(format!("  {i}: w{w} holds nothing: skipped"));
            ctx.hit("step skipped");
            return Ok(());
        };
        if held.completing {
            ctx.note(format!("  {i}: w{w} is completing: skipped"));
            ctx.hit("step skipped");
            self.workers[w].held = Some(held);
            return Ok(());
        }
        let key = held.key;
        let (start, log_len) = (Instant::now(), ctx.log_len());
        let pre_log = ctx.log();
        let result = ACTOR
            .scope(held.owner.clone(), ctx.store.release(&mut held.lease))
            .await;
        let alive = ctx
            .clock
            .alive(&pre_log, key, &held.owner, start, Instant::now());
        ctx.note(format!("  {i}: w{w} {} release -> {result:?}", held.owner));
        let now = Instant::now();
        let log = ctx.log();
        let who = format!("w{w} ({})", held.owner);
        let removed = log[log_len..]
            .iter()
            .any(|e| e.owner == held.owner && e.record.is_none());
        ctx.hit(match result {
            Ok(true) => "release: freed",
            Ok(false) => "release: someone else's",
            Err(_) => "release: error",
        });
        match result {
            Ok(true) => {
                if ctx.clock.alive(&log, key, &held.owner, now, now) == Alive::Yes
                    || (alive == Alive::Yes && !removed)
                {
                    return Err(violation(
                        0,
                        i,
                        format!(
                            "{who}'s release said the key is free, but k{key} holds {}",
                            latest(&log, key).map_or("nothing".to_owned(), describe)
                        ),
                    ));
                }
            }
            Ok(false) => {
                if alive == Alive::Yes {
                    return Err(violation(
                        4,
                        i,
                        format!(
                            "{who}'s release was told someone else holds k{key}, but it holds {}",
                            latest(&log[..log_len], key).map_or("nothing".to_owned(), describe)
                        ),
                    ));
                }
            }
            Err(ref error) => {
                if !step.faulty() {
                    return Err(violation(
                        0,
                        i,
                        format!("{who}'s release failed with no fault: {error:?}"),
                    ));
                }
            }
        }
        if alive == Alive::No && !log[log_len..].iter().all(|e| e.owner != held.owner) {
            return Err(violation(
                3,
                i,
                format!("{who}'s lease was gone, yet its release landed a write"),
            ));
        }
        Ok(())
    }

    async fn crash(
        &mut self,
        ctx: &Ctx,
        i: usize,
        w: usize,
        midway: Option<(Midway, u64)>,
    ) -> Result<(), String> {
        let Some(mut held) = self.workers[w].held.take() else {
            ctx.note(format!("  {i}: w{w} holds nothing: skipped"));
            ctx.hit("step skipped");
            return Ok(());
        };
        let cut = |ms| Duration::from_millis(ms);
        match midway {
            None => {
                ctx.hit("crash");
                ctx.note(format!("  {i}: w{w} {} crashes", held.owner));
            }
            Some((Midway::Renew, ms)) if !held.completing => {
                let call = ACTOR.scope(held.owner.clone(), ctx.store.renew(&mut held.lease));
                let result = tokio::time::timeout(cut(ms), call).await;
                ctx.hit("crash in a renewal");
                ctx.note(format!(
                    "  {i}: w{w} {} crashes in a renewal: {result:?}",
                    held.owner
                ));
            }
            Some((_, ms)) => {
                self.ran(ctx, i, &held)?;
                let outcome = Self::outcome(&held.owner);
                let ttl = ctx.timing().outcome_ttl[0];
                let call = ACTOR.scope(
                    held.owner.clone(),
                    ctx.store.complete(&mut held.lease, outcome, ttl),
                );
                let result = tokio::time::timeout(cut(ms), call)
                    .await
                    .map(|r| r.map(|_| ()));
                ctx.hit("crash in a completion");
                ctx.note(format!(
                    "  {i}: w{w} {} crashes in a completion: {result:?}",
                    held.owner
                ));
            }
        }
        Ok(())
    }

    /// Checks after every step: each landed write was legal (1, 2, 3), no
    /// two beliefs overlap (1), and the epochs' bookkeeping (6).
    fn after_step(&mut self, ctx: &Ctx, i: usize, log_len: usize) -> Result<(), String> {
        let now = Instant::now();
        let log = ctx.log();
        let clock = &ctx.clock;
        for entry in &log[log_len..] {
            check_landing(clock, &log, entry)?;
        }
        for key in 0..self.epochs.len() {
            let believers: Vec<String> = self
                .holders(key)
                .filter(|(_, held)| held.lease.held_until > now + ctx.timing().tolerance)
                .map(|(w, held)| {
                    format!(
                        "w{w} ({}) for {:?}",
                        held.owner,
                        held.lease.held_until - now
                    )
                })
                .collect();
            if believers.len() > 1 {
                return Err(violation(
                    1,
                    i,
                    format!(
                        "several workers believe they hold k{key}: {}",
                        believers.join(", ")
                    ),
                ));
            }
            // An outcome's lifetime ends when it expires or is replaced.
            let top = latest(&log, key);
            let epoch = &mut self.epochs[key];
            if let Some(done) = top.filter(|e| e.is_done()) {
                if !epoch.closed.contains(&done.revision) {
                    epoch.outcome = Some(done.revision);
                }
            }
            if let Some(revision) = epoch.outcome {
                let gone = at_revision(&log, key, revision)
                    .is_none_or(|done| clock.surely_gone(done, now))
                    || top.is_some_and(|t| t.revision != revision);
                if gone {
                    epoch.generation += 1;
                    epoch.outcome = None;
                    epoch.closed.insert(revision);
                }
            }
        }
        for grant in self.grants.iter_mut().filter(|g| !g.ended) {
            let Some(top) = latest(&log, grant.key) else {
                continue;
            };
            if top.owner == grant.owner && !clock.surely_gone(top, now) {
                continue;
            }
            grant.ended = true;
            let last = log
                .iter()
                .filter(|e| e.key == grant.key && e.owner == grant.owner)
                .max_by_key(|e| e.revision);
            ctx.hit(match last {
                Some(e) if e.is_done() => "grant ended: outcome stored",
                Some(e) if e.record.is_none() => "grant ended: released",
                _ => "grant ended: lease lost (expired or taken over)",
            });
            if !last.is_some_and(Landed::is_done) {
                // Lost (expired, taken over) or released: one more run is allowed.
                let runs = self.runs.entry((grant.key, grant.generation)).or_default();
                runs.spare += 1;
            }
        }
        Ok(())
    }
}

/// Whether one landed write was allowed, given everything that landed
/// before it on its key.
fn check_landing(clock: &Clock, log: &[Landed], entry: &Landed) -> Result<(), String> {
    let key = entry.key;
    let step = entry.step;
    let earlier = || {
        log.iter()
            .filter(move |e| e.key == key && e.revision < entry.revision)
    };
    let previous = earlier().max_by_key(|e| e.revision);
    let replaced = at_revision(log, key, entry.expected).filter(|e| e.revision != entry.revision);
    match (&entry.record, replaced) {
        // Over a record: only the owner's own next revision of its claim.
        (_, Some(over)) if over.record.is_some() => {
            if over.owner != entry.owner {
                return Err(violation(
                    3,
                    step,
                    format!("{} overwrote {}", describe(entry), describe(over)),
                ));
            }
            if over.is_done() {
                return Err(violation(
                    2,
                    step,
                    format!(
                        "{} was written over its own stored outcome {}",
                        describe(entry),
                        describe(over)
                    ),
                ));
            }
        }
        (None, _) => {
            return Err(violation(
                3,
                step,
                format!(
                    "{} deleted what was not its own record (expected rev {})",
                    describe(entry),
                    entry.expected
                ),
            ));
        }
        // Over nothing or a marker: a fresh claim of a free key.
        (Some(record), _) => {
            if record.state != RecordState::InProgress || earlier().any(|e| e.owner == entry.owner)
            {
                return Err(violation(
                    3,
                    step,
                    format!(
                        "{} landed on a free key after its lease had ended (expected rev {})",
                        describe(entry),
                        entry.expected
                    ),
                ));
            }
            if let Some(previous) = previous.filter(|p| p.record.is_some()) {
                // The store cannot have expired it before its TTL from when it was sent.
                if entry.end + clock.timing.tolerance < previous.earliest_expiry() {
                    let (invariant, what) = if previous.is_done() {
                        (2, "the outcome")
                    } else {
                        (1, "the lease")
                    };
                    return Err(violation(
                        invariant,
                        step,
                        format!(
                            "{} claimed the key while {what} {} had {:?} to live",
                            describe(entry),
                            describe(previous),
                            previous.earliest_expiry() - entry.end
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn brief(acquired: &Result<Acquire, StoreError>) -> String {
    match acquired {
        Ok(Acquire::Owner(lease)) => format!(
            "Owner(rev {}, attempt {}, takeover {})",
            lease.revision, lease.record.attempt, lease.takeover
        ),
        Ok(Acquire::Stored { record, waited }) => {
            format!("Stored(by {}, waited {waited})", record.owner)
        }
        Ok(Acquire::Reused(record)) => format!("Reused({})", record.fingerprint),
        Ok(Acquire::Busy(record)) => format!("Busy(held by {})", record.owner),
        Err(error) => format!("{error:?}"),
    }
}

/// Runs one schedule; a violation comes back with the schedule and what
/// every step did.
async fn run(
    inner: Arc<dyn IdempotencyStore>,
    keys: Vec<IdempotencyKey>,
    timing: Timing,
    coverage: &Arc<Coverage>,
    schedule: &Schedule,
) -> Result<(), String> {
    let ctx = Ctx::new(inner, keys, timing, Arc::clone(coverage));
    let mut model = Model::new(schedule.workers, schedule.keys);
    for (i, step) in schedule.steps.iter().enumerate() {
        ctx.arm(i, step);
        let log_len = ctx.log_len();
        let done = model.step(&ctx, i, step).await;
        ctx.settle().await;
        ctx.disarm();
        if let Err(violation) = done.and_then(|()| model.after_step(&ctx, i, log_len)) {
            return Err(format!(
                "{violation}\n\nschedule: {schedule:?}\nwhat happened:\n{}\n",
                ctx.trace()
            ));
        }
    }
    Ok(())
}

fn cases(var: &str, default: u32) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Paths a property must have taken, so that a model that stopped reaching
/// them fails instead of passing vacuously.
const MUST_COVER: [&str; 16] = [
    "store: a stale read (injected)",
    "acquire: during an owner's call",
    "acquire: Owner",
    "acquire: Owner, takeover",
    "acquire: Stored",
    "acquire: Busy",
    "acquire: Reused",
    "acquire: waits across a lease's expiry",
    "renew: LeaseLost",
    "renew: lease gone",
    "complete: LeaseLost",
    "complete: lease gone",
    "owner: a write whose ack was lost, settled in the same call",
    "owner: unsettled from an earlier call",
    "grant ended: lease lost (expired or taken over)",
    "a key runs again after a lost or released lease",
];

fn report(
    result: Result<(), TestError<Schedule>>,
    coverage: &Coverage,
    name: &str,
    must_cover: &[&str],
) {
    // Shown with --nocapture.
    println!("{name}: paths taken\n{}", coverage.summary());
    match result {
        Ok(()) => {
            let missed: Vec<&&str> = must_cover
                .iter()
                .filter(|what| coverage.count(what) == 0)
                .collect();
            assert!(
                missed.is_empty(),
                "{name}: the schedules never reached {missed:?}; paths taken:\n{}",
                coverage.summary()
            );
        }
        Err(TestError::Fail(reason, schedule)) => {
            panic!("the claim protocol broke an invariant; shrunk to:\n{reason}\n(minimal schedule: {schedule:?})")
        }
        Err(TestError::Abort(reason)) => panic!("model check aborted: {reason}"),
    }
}

#[test]
fn claim_protocol_model_on_the_memory_store() {
    let config = Config {
        cases: cases("IDEMQ_MODEL_CASES", 4000),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let keys: Vec<IdempotencyKey> = (0..MEMORY_PROFILE.max_keys as u32)
        .map(|k| IdempotencyKey::generate("model", "ep", k))
        .collect();
    let coverage = Arc::new(Coverage::default());
    let result = runner.run(&schedule(MEMORY_PROFILE), |schedule| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a paused runtime");
        let store: Arc<dyn IdempotencyStore> = Arc::new(MemoryStore::new());
        runtime
            .block_on(run(store, keys.clone(), MEMORY, &coverage, &schedule))
            .map_err(TestCaseError::fail)
    });
    // A short run (IDEMQ_MODEL_CASES below 1000) need not reach them all.
    let must = if runner.config().cases >= 1000 {
        &MUST_COVER[..]
    } else {
        &[]
    };
    report(result, &coverage, "in memory", must);
}

#[test]
fn claim_protocol_model_on_jetstream_kv() {
    let config = Config {
        cases: cases("IDEMQ_MODEL_KV_CASES", 20),
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let server = common::NatsServer::start();
    let store: Arc<dyn IdempotencyStore> = runtime.block_on(async {
        let js = async_nats::jetstream::new(server.connect().await);
        Arc::new(
            KvStore::open(js, &BucketConfig::default())
                .await
                .expect("open bucket"),
        )
    });
    let mut runner = TestRunner::new(config);
    let coverage = Arc::new(Coverage::default());
    let result = runner.run(&schedule(JETSTREAM_PROFILE), |schedule| {
        // Fresh keys per case: nothing of an earlier case is seen.
        let run_id = format!("model-{}", nuid::next());
        let keys = (0..JETSTREAM_PROFILE.max_keys as u32)
            .map(|k| IdempotencyKey::generate(&run_id, "ep", k))
            .collect();
        let case = run(Arc::clone(&store), keys, JETSTREAM, &coverage, &schedule);
        // Every wait in a schedule is bounded; this bounds the case too.
        runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(120), case).await })
            .unwrap_or_else(|_| Err("the case did not finish within 120 s".to_owned()))
            .map_err(TestCaseError::fail)
    });
    drop(server);
    // Too few cases to demand every path; the common ones at least.
    report(
        result,
        &coverage,
        "on JetStream KV",
        &["acquire: Owner", "acquire: Busy"],
    );
}

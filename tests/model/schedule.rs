//! Schedules: what each step does (an [`Action`], maybe a [`Fault`] for
//! one of its writes, failing or stale reads), and how proptest draws them
//! for a property ([`Profile`], [`schedule`]).

use std::fmt;

use proptest::collection::vec;
use proptest::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Zero,
    Short,
    Long,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    Short,
    Long,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jump {
    Tick,
    PastLease,
    PastOutcome,
}

/// How far behind the stale reads of a step are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lag {
    Short,
    Long,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Midway {
    Renew,
    Complete,
}

/// What one step does. Worker and key numbers are indices; a step whose
/// worker cannot do it passes to the next one that can (see
/// [`Model::effective`](crate::steps::Model::effective)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
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
pub enum FaultKind {
    /// The write lands; its caller is told `Unacknowledged`.
    LoseAck,
    /// The write does not land; its caller is told `Unacknowledged`.
    FailUnacknowledged,
    /// The write does not land; its caller is told `Unavailable`.
    FailUnavailable,
}

/// A fault for the `nth` primitive write (write or remove) of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub nth: u8,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    pub fault: Option<Fault>,
    /// Every read of the step fails (`Unavailable`).
    pub reads_fail: bool,
    /// Every plain read of the step (not the leader's) returns what the
    /// key held this long ago: a replica that has not applied the latest
    /// writes (`docs/claim.md`, "Stale replicas").
    pub stale: Option<Lag>,
}

impl Step {
    /// Whether a fault in this step may leave a call with an error.
    pub fn faulty(&self) -> bool {
        self.fault.is_some() || self.reads_fail
    }

    /// Whether a fault in this step may make an acquire fail: the others
    /// are settled by the claim's own read.
    pub fn may_fail_acquire(&self) -> bool {
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
pub struct Schedule {
    pub workers: usize,
    pub keys: usize,
    pub steps: Vec<Step>,
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

pub fn wait() -> impl Strategy<Value = Wait> {
    prop_oneof![2 => Just(Wait::Zero), 1 => Just(Wait::Short), 1 => Just(Wait::Long)]
}

/// How a property's schedules are drawn: weights of the step kinds and
/// how often a step carries a fault.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub max_workers: usize,
    pub max_keys: usize,
    pub max_steps: usize,
    /// Advance, Claim, ClaimBoth, ClaimDuring, Renew, Complete, Release, Crash.
    pub weights: [u32; 8],
    /// Out of 8 steps, how many carry a write fault.
    pub faulty_in_8: u32,
    /// Chance that every read of a step fails.
    pub reads_fail: f64,
    /// Chance that a step's plain reads are stale.
    pub stale: f64,
}

/// In memory a step costs nothing: long schedules, all kinds alike.
pub const MEMORY_PROFILE: Profile = Profile {
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
pub const JETSTREAM_PROFILE: Profile = Profile {
    max_workers: 3,
    max_keys: 2,
    max_steps: 10,
    weights: [1, 5, 1, 2, 4, 4, 1, 1],
    faulty_in_8: 4,
    reads_fail: 0.12,
    stale: 0.25,
};

pub fn step(profile: Profile, workers: usize, keys: usize) -> impl Strategy<Value = Step> {
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

pub fn schedule(profile: Profile) -> impl Strategy<Value = Schedule> {
    (2..=profile.max_workers, 1..=profile.max_keys).prop_flat_map(move |(workers, keys)| {
        vec(step(profile, workers, keys), 1..=profile.max_steps).prop_map(move |steps| Schedule {
            workers,
            keys,
            steps,
        })
    })
}

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
//! store underneath ([`Faulty`](faulty::Faulty)): it lands but its acknowledgement is
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
//! [`Faulty`](faulty::Faulty) logs every write that lands (owner, expected and new revision,
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
//!
//! The files, in the order a case meets them:
//!
//! * `schedule.rs`: the steps of a schedule, and how proptest draws them;
//! * `faulty.rs`: the fault-injecting store and its log of landed writes;
//! * `clock.rs`: each property's timing, and the model's view of a key
//!   from the log alone;
//! * `context.rs`: what one case runs on, and the paths taken;
//! * `steps.rs`: the model's workers, and each step run against the store;
//! * `checks.rs`: the invariants, and the checks after each call and step;
//! * this file: running a case, and the two properties.

#[path = "../common/mod.rs"]
mod common;

mod checks;
mod clock;
mod context;
mod faulty;
mod schedule;
mod steps;

use std::sync::Arc;
use std::time::Duration;

use idemq::store::kv::{BucketConfig, KvStore};
use idemq::store::memory::MemoryStore;
use idemq::store::IdempotencyStore;
use idemq::IdempotencyKey;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use clock::{Timing, JETSTREAM, MEMORY};
use context::{Coverage, Ctx};
use schedule::{schedule, Schedule, JETSTREAM_PROFILE, MEMORY_PROFILE};
use steps::Model;

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

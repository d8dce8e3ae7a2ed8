//! The run-once API ([`idemq::run_once::Idempotent`]) and the seed's
//! helpers on it, against both stores: every test below runs on the
//! in-memory store and on JetStream KV on a real nats-server.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idemq::handler::HandlerError;
use idemq::outcome::Outcome;
use idemq::run_once::{fingerprint_of, Idempotent, RunError, RunOptions, RunRequest};
use idemq::store::ClaimProtocol;
use idemq::{seed, IdempotencyKey};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use common::poll::eventually;
use common::stores::Store;

fn key(step: u32) -> IdempotencyKey {
    IdempotencyKey::generate("run-once-suite", "ep", step)
}

fn options(lease: Duration, wait: Duration) -> RunOptions {
    RunOptions {
        lease,
        wait,
        ..RunOptions::default()
    }
}

/// A caller in a task of its own: `once.run` of a closure that counts its
/// runs in `runs` and answers `value` after `took`.
fn spawn_run(
    once: &Arc<Idempotent>,
    key: &IdempotencyKey,
    runs: &Arc<AtomicU32>,
    took: Duration,
    value: serde_json::Value,
) -> tokio::task::JoinHandle<Result<idemq::run_once::Done, RunError>> {
    let (once, key, runs) = (Arc::clone(once), key.clone(), Arc::clone(runs));
    tokio::spawn(async move { once.run(&key, "fp", |_| counted(&runs, took, value)).await })
}

/// Polls (2 s at most) until `runs` has counted one run.
async fn until_running(runs: &AtomicU32) {
    eventually(Duration::from_secs(2), "the closure starting", async || {
        runs.load(Ordering::SeqCst) == 1
    })
    .await;
}

/// A closure's body that counts its runs and answers `value` after `took`.
async fn counted(
    runs: &AtomicU32,
    took: Duration,
    value: serde_json::Value,
) -> Result<Outcome, HandlerError> {
    runs.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(took).await;
    Ok(Outcome::Success(value))
}

async fn concurrent_callers_of_one_key_execute_once(store: Store) {
    let once = Arc::new(Idempotent::new(
        store,
        options(Duration::from_secs(30), Duration::from_secs(10)),
    ));
    let runs = Arc::new(AtomicU32::new(0));
    let key = key(1);
    let fingerprint = fingerprint_of(&json!({"amount": 42})).expect("fingerprint");
    let callers: Vec<_> = (0..8)
        .map(|i| {
            let (once, runs, key, fingerprint) = (
                Arc::clone(&once),
                Arc::clone(&runs),
                key.clone(),
                fingerprint.clone(),
            );
            tokio::spawn(async move {
                once.run(&key, &fingerprint, |_| {
                    counted(&runs, Duration::from_millis(300), json!({"by": i}))
                })
                .await
            })
        })
        .collect();
    let mut done = Vec::new();
    for caller in callers {
        done.push(caller.await.expect("caller").expect("an outcome"));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "executions");
    let fresh: Vec<_> = done.iter().filter(|done| !done.replayed).collect();
    assert_eq!(fresh.len(), 1, "one caller ran it; the rest replayed");
    assert!(fresh[0].execution.is_some());
    for each in &done {
        assert_eq!(each.outcome(), fresh[0].outcome());
        assert_eq!(each.stored_at(), fresh[0].stored_at());
    }
}

async fn a_caller_dropped_mid_run_lets_the_next_take_over_after_the_lease(store: Store) {
    let lease = Duration::from_secs(1);
    let once = Arc::new(Idempotent::new(store, options(lease, Duration::ZERO)));
    let key = key(2);
    let runs = Arc::new(AtomicU32::new(0));
    let first = spawn_run(&once, &key, &runs, Duration::from_secs(60), json!("never"));
    until_running(&runs).await;
    first.abort();
    assert!(first.await.is_err(), "dropped mid-run");
    let blocked = once
        .run(&key, "fp", |_| {
            counted(&runs, Duration::ZERO, json!("early"))
        })
        .await;
    assert!(
        matches!(blocked, Err(RunError::InProgress { .. })),
        "the dropped caller's lease still holds the key: {blocked:?}"
    );
    // A caller that waits sees the lease run out (1 s, bounded by its
    // 10 s wait) and takes the key over.
    let waiting = Idempotent::new(
        Arc::clone(once.store()),
        options(lease, Duration::from_secs(10)),
    );
    let taken_over = waiting
        .run(&key, "fp", |attempt| async move {
            Ok(Outcome::Success(
                json!({"attempt": attempt.number, "takeover": attempt.takeover}),
            ))
        })
        .await;
    let done = taken_over.expect("taken over within the wait");
    assert!(!done.replayed);
    assert_eq!(
        done.outcome(),
        &Outcome::Success(json!({"attempt": 2, "takeover": true}))
    );
}

async fn a_closure_longer_than_the_lease_keeps_its_claim(store: Store) {
    let lease = Duration::from_secs(1);
    let once = Arc::new(Idempotent::new(store, options(lease, Duration::ZERO)));
    let key = key(3);
    let runs = Arc::new(AtomicU32::new(0));
    let long = spawn_run(
        &once,
        &key,
        &runs,
        Duration::from_millis(3500),
        json!("slow"),
    );
    // Past three leases, copies still find the key held.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let copy = once
            .run(&key, "fp", |_| {
                counted(&runs, Duration::ZERO, json!("copy"))
            })
            .await;
        match copy {
            Err(RunError::InProgress { .. }) => {}
            Ok(done) => assert!(done.replayed, "only the long run may execute: {done:?}"),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    let done = long.await.expect("caller").expect("stored");
    assert!(!done.replayed);
    assert_eq!(done.outcome(), &Outcome::Success(json!("slow")));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "executions");
}

async fn a_transient_failure_is_released_and_runs_again(store: Store) {
    let once = Idempotent::new(store, RunOptions::default());
    let key = key(4);
    let runs = AtomicU32::new(0);
    let failed = once
        .run(&key, "fp", |_| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Err(HandlerError::Transient {
                code: "503".into(),
                message: "later".into(),
            })
        })
        .await;
    match failed {
        Err(RunError::Released {
            error: HandlerError::Transient { code, .. },
            ..
        }) => assert_eq!(code, "503"),
        other => panic!("expected a released transient error, got {other:?}"),
    }
    assert_eq!(
        once.store().get(&key).await.expect("get"),
        None,
        "nothing stored, the claim given back"
    );
    let done = once
        .run(&key, "fp", |_| counted(&runs, Duration::ZERO, json!("ok")))
        .await
        .expect("second try");
    assert!(!done.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the retry ran again");
}

async fn a_definite_error_is_stored_and_replayed(store: Store) {
    let once = Idempotent::new(store, RunOptions::default());
    let key = key(5);
    let runs = AtomicU32::new(0);
    let bad = |_| async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(Outcome::error("BAD_PARAMS", "amount must be positive"))
    };
    let first = once.run(&key, "fp", bad).await.expect("stored");
    let again = once
        .run(&key, "fp", |_| counted(&runs, Duration::ZERO, json!("ok")))
        .await
        .expect("replayed");
    assert!(!first.replayed);
    assert!(again.replayed);
    assert_eq!(first.outcome(), again.outcome());
    assert_eq!(first.outcome().error_code(), Some("BAD_PARAMS"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

async fn another_fingerprint_under_the_key_is_refused(store: Store) {
    let once = Idempotent::new(store, RunOptions::default());
    let key = key(6);
    let fp = |amount| fingerprint_of(&json!({"amount": amount})).expect("fingerprint");
    once.run(&key, &fp(1), |_| async { Ok(Outcome::Success(json!(1))) })
        .await
        .expect("stored");
    let reused = once
        .run(&key, &fp(2), |_| async { Ok(Outcome::Success(json!(2))) })
        .await;
    assert_eq!(reused, Err(RunError::KeyReused));
}

async fn a_closure_past_its_timeout_is_stored_as_timeout(store: Store) {
    let once = Idempotent::new(
        store,
        RunOptions {
            timeout: Duration::from_millis(300),
            ..RunOptions::default()
        },
    );
    let runs = AtomicU32::new(0);
    let key = key(7);
    let done = once
        .run(&key, "fp", |_| {
            counted(&runs, Duration::from_secs(60), json!("late"))
        })
        .await
        .expect("stored");
    assert_eq!(done.outcome(), &Outcome::Timeout);
    let again = once
        .run(&key, "fp", |_| counted(&runs, Duration::ZERO, json!("x")))
        .await
        .expect("replayed");
    assert!(again.replayed);
    assert_eq!(again.outcome(), &Outcome::Timeout);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

async fn an_outcome_too_large_is_stored_as_result_too_large(store: Store) {
    let once = Idempotent::new(store, RunOptions::default());
    let key = key(8);
    let huge = "x".repeat(1_100_000);
    let done = once
        .run(
            &key,
            "fp",
            |_| async move { Ok(Outcome::Success(json!(huge))) },
        )
        .await
        .expect("stored");
    assert_eq!(done.outcome().error_code(), Some("RESULT_TOO_LARGE"));
    let again = once
        .run(&key, "fp", |_| async {
            Ok(Outcome::Success(json!("small")))
        })
        .await
        .expect("replayed");
    assert!(again.replayed, "never run again");
    assert_eq!(again.outcome().error_code(), Some("RESULT_TOO_LARGE"));
}

async fn a_cancelled_run_releases_its_claim_at_once(store: Store) {
    let once = Arc::new(Idempotent::new(
        store,
        options(Duration::from_secs(30), Duration::ZERO),
    ));
    let key = key(9);
    let cancel = CancellationToken::new();
    let runs = Arc::new(AtomicU32::new(0));
    let running = {
        let (once, key, runs, cancel) = (
            Arc::clone(&once),
            key.clone(),
            Arc::clone(&runs),
            cancel.clone(),
        );
        tokio::spawn(async move {
            let request = RunRequest {
                key: &key,
                fingerprint: "fp",
                intent_id: "charge-9",
                ttl: None,
            };
            once.run_request(&request, &cancel, |_| {
                counted(&runs, Duration::from_secs(60), json!("never"))
            })
            .await
        })
    };
    until_running(&runs).await;
    let held = once.store().get(&key).await.expect("get").expect("claimed");
    assert_eq!(held.intent_id, "charge-9");
    cancel.cancel();
    assert_eq!(running.await.expect("caller"), Err(RunError::Cancelled));
    // Released, not left to its 30 s lease: the next caller runs now.
    let done = once
        .run(&key, "fp", |_| {
            counted(&runs, Duration::ZERO, json!("next"))
        })
        .await
        .expect("the key is free");
    assert!(!done.replayed);
    // The release's marker says a run of the key started (docs/contract.md
    // v1.2 §4): this one is attempt 2.
    assert_eq!(done.execution.map(|e| e.attempt), Some(2));
}

async fn the_seed_helpers_run_once_and_replay(store: Store) {
    let once = Idempotent::new(Arc::clone(&store), RunOptions::default());
    let key = key(10);
    assert_eq!(
        seed::check_idempotency(store.as_ref(), &key).await,
        Ok(None)
    );
    let runs = AtomicU32::new(0);
    let operation = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, (String, String)>(json!({"charged": 42}))
    };
    let first =
        seed::execute_idempotent(&once, key.clone(), "charge-42".into(), 24, operation).await;
    let again =
        seed::execute_idempotent(&once, key.clone(), "charge-42".into(), 24, operation).await;
    assert_eq!(first, Ok(Outcome::Success(json!({"charged": 42}))));
    assert_eq!(again, first);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        seed::check_idempotency(store.as_ref(), &key).await,
        Ok(Some(Outcome::Success(json!({"charged": 42}))))
    );
    let failing = seed::execute_idempotent(
        &once,
        IdempotencyKey::generate("r", "e", 11),
        "x".into(),
        1,
        || async { Err::<serde_json::Value, _>(("BAD".to_owned(), "no".to_owned())) },
    )
    .await;
    assert_eq!(
        failing,
        Ok(Outcome::error("BAD", "no")),
        "stored, as in the seed"
    );
}

/// Options past every bound (docs/contract.md v1.2 §7): a lease of 1 ns (a
/// renewal timer of 0 panicked), a wait and a TTL no clock can add. They
/// are held to the bounds; a run that renews, waits and stores works.
async fn options_past_every_bound_are_held_to_them(store: Store) {
    let once = Idempotent::new(
        Arc::clone(&store),
        RunOptions {
            lease: Duration::from_nanos(1),
            wait: Duration::MAX,
            timeout: Duration::MAX,
            ttl: Duration::MAX,
        },
    );
    assert_eq!(once.options().lease, Duration::from_secs(1));
    assert_eq!(once.options().ttl, idemq::config::MAX_TTL);
    let runs = Arc::new(AtomicU32::new(0));
    let key = key(12);
    // Longer than the 1 s lease: it is renewed while the closure runs.
    let done = once
        .run(&key, "fp", |_| {
            counted(&runs, Duration::from_millis(1500), json!("bounded"))
        })
        .await
        .expect("runs");
    assert!(!done.replayed);
    let again = once
        .run(&key, "fp", |_| {
            counted(&runs, Duration::ZERO, json!("never"))
        })
        .await
        .expect("replays");
    assert!(again.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A per-call TTL no clock can add, through the run-once API and the
/// seed's helper (`ttl_hours` of `u32::MAX`): held to the longest TTL, the
/// outcome stored and replayed (it panicked after the closure had run,
/// leaving the key held until its lease ran out).
async fn a_per_call_ttl_past_every_bound_is_held_to_it(store: Store) {
    let once = Idempotent::new(Arc::clone(&store), RunOptions::default());
    let runs = Arc::new(AtomicU32::new(0));
    let forever = key(13);
    let request = RunRequest {
        key: &forever,
        fingerprint: "fp",
        intent_id: "forever",
        ttl: Some(Duration::MAX),
    };
    let cancel = CancellationToken::new();
    let done = once
        .run_request(&request, &cancel, |_| {
            counted(&runs, Duration::ZERO, json!("kept"))
        })
        .await
        .expect("runs");
    assert!(!done.replayed);
    let longest = chrono::Duration::from_std(idemq::config::MAX_TTL).expect("ten years");
    assert!(
        done.expires_at() <= done.stored_at() + longest,
        "held to MAX_TTL"
    );
    let again = once
        .run_request(&request, &cancel, |_| {
            counted(&runs, Duration::ZERO, json!("never"))
        })
        .await
        .expect("replays");
    assert!(again.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let seeded = key(14);
    let operation = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, (String, String)>(json!("seeded"))
    };
    let first =
        seed::execute_idempotent(&once, seeded.clone(), "s".into(), u32::MAX, operation).await;
    let again = seed::execute_idempotent(&once, seeded, "s".into(), u32::MAX, operation).await;
    assert_eq!(first, Ok(Outcome::Success(json!("seeded"))));
    assert_eq!(again, first);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// An owner that hears only after 3 s that its claim's write was lost,
/// and then finds its claim there (adopts it) with 1 s of a 4 s lease
/// left, renews at once. Renewing a third of a lease after adopting, as it
/// did, came after the lease ran out: a copy waiting meanwhile took the
/// key over and ran it a second time.
async fn an_owner_that_learns_late_that_its_claim_landed_renews_at_once(store: Store) {
    let faulty = common::stores::FaultyStore::new(Arc::clone(&store));
    let lease = Duration::from_secs(4);
    let owner = Arc::new(Idempotent::new(
        faulty.clone(),
        options(lease, Duration::ZERO),
    ));
    let copy = Idempotent::new(store, options(lease, Duration::from_secs(20)));
    let key = key(15);
    let runs = Arc::new(AtomicU32::new(0));
    faulty.lose_next_acks_after(1, Duration::from_secs(3));
    let first = spawn_run(&owner, &key, &runs, Duration::from_secs(3), json!("owner"));
    // The claim has landed (its ack is still "on its way"): the copy waits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let copied = copy
        .run(&key, "fp", |_| {
            counted(&runs, Duration::ZERO, json!("copy"))
        })
        .await
        .expect("the copy is answered");
    let done = first.await.expect("owner").expect("stored");
    assert!(!done.replayed);
    assert!(copied.replayed, "the copy replays the owner's outcome");
    assert_eq!(copied.outcome(), &Outcome::Success(json!("owner")));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "executions");
}

both_stores!(
    an_owner_that_learns_late_that_its_claim_landed_renews_at_once,
    a_per_call_ttl_past_every_bound_is_held_to_it,
    options_past_every_bound_are_held_to_them,
    concurrent_callers_of_one_key_execute_once,
    a_caller_dropped_mid_run_lets_the_next_take_over_after_the_lease,
    a_closure_longer_than_the_lease_keeps_its_claim,
    a_transient_failure_is_released_and_runs_again,
    a_definite_error_is_stored_and_replayed,
    another_fingerprint_under_the_key_is_refused,
    a_closure_past_its_timeout_is_stored_as_timeout,
    an_outcome_too_large_is_stored_as_result_too_large,
    a_cancelled_run_releases_its_claim_at_once,
    the_seed_helpers_run_once_and_replay,
);

#[test]
fn fingerprints_ignore_field_order() {
    #[derive(serde::Serialize)]
    struct Charge {
        amount: u32,
        account: &'static str,
    }
    let from_struct = fingerprint_of(&Charge {
        amount: 42,
        account: "acme",
    })
    .expect("fingerprint");
    let from_json: serde_json::Value =
        serde_json::from_str(r#"{"account":"acme","amount":42}"#).expect("json");
    assert_eq!(
        from_struct,
        fingerprint_of(&from_json).expect("fingerprint")
    );
    assert_ne!(
        from_struct,
        fingerprint_of(&json!({"account": "acme", "amount": 43})).expect("fingerprint")
    );
    assert_eq!(from_struct.len(), 64);
}

//! One suite for both stores: every test below runs against the in-memory
//! store and against JetStream KV on a real nats-server, so the two keep
//! the same semantics.

mod common;

use std::sync::Arc;
use std::time::Duration;

use idemq::outcome::{Outcome, RecordState};
use idemq::store::kv::{BucketConfig, KvStore};
use idemq::store::{Acquire, Claim, ClaimProtocol, ClaimRequest, StoreError};
use idemq::IdempotencyKey;
use serde_json::json;

use common::poll::eventually;
use common::stores::{FaultyStore, Store};

const LONG: Duration = Duration::from_secs(30);
const SHORT_LEASE: Duration = Duration::from_secs(1);

fn request(step: u32, fingerprint: &str, lease: Duration) -> ClaimRequest {
    ClaimRequest {
        key: IdempotencyKey::generate("store-suite", "ep", step),
        intent_id: format!("intent-{step}"),
        fingerprint: fingerprint.to_owned(),
        owner: nuid::next().to_string(),
        lease,
    }
}

fn with_owner(request: &ClaimRequest) -> ClaimRequest {
    ClaimRequest {
        owner: nuid::next().to_string(),
        ..request.clone()
    }
}

async fn owned(store: &Store, request: &ClaimRequest) -> idemq::store::Lease {
    match store
        .acquire(request, Duration::ZERO)
        .await
        .expect("acquire")
    {
        Acquire::Owner(lease) => lease,
        other => panic!("expected to own the key, got {other:?}"),
    }
}

/// Polls (10 s at most) until the key holds no record.
async fn until_gone(store: &Store, key: &IdempotencyKey) {
    eventually(
        Duration::from_secs(10),
        format!("{key} expiring"),
        async || store.get(key).await.expect("get").is_none(),
    )
    .await;
}

async fn first_claim_acquires_and_second_sees_it_taken(store: Store) {
    let first = request(1, "fp", LONG);
    let lease = owned(&store, &first).await;
    assert_eq!(lease.record.attempt, 1);
    assert_eq!(lease.record.state, RecordState::InProgress);
    assert!(!lease.takeover);
    match store.claim(&with_owner(&first), 1, 0).await.expect("claim") {
        Claim::Taken { revision, record } => {
            assert_eq!(revision, lease.revision);
            assert_eq!(record.owner, first.owner);
        }
        other => panic!("expected Taken, got {other:?}"),
    }
}

async fn complete_then_acquire_replays_the_stored_outcome(store: Store) {
    let first = request(2, "fp", LONG);
    let mut lease = owned(&store, &first).await;
    let outcome = Outcome::Success(json!({"n": 1}));
    let record = store
        .complete(&mut lease, outcome.clone(), LONG)
        .await
        .expect("complete");
    assert_eq!(record.state, RecordState::Done);
    match store
        .acquire(&with_owner(&first), LONG)
        .await
        .expect("acquire")
    {
        Acquire::Stored {
            record: stored,
            waited,
        } => {
            assert!(!waited, "the outcome was there already");
            assert_eq!(stored.result, Some(outcome));
            assert_eq!(stored.owner, first.owner);
        }
        other => panic!("expected Stored, got {other:?}"),
    }
}

async fn different_fingerprint_is_reused(store: Store) {
    let first = request(3, "fp-a", LONG);
    let mut lease = owned(&store, &first).await;
    let other = ClaimRequest {
        fingerprint: "fp-b".to_owned(),
        ..with_owner(&first)
    };
    assert!(matches!(
        store.acquire(&other, LONG).await.expect("acquire"),
        Acquire::Reused(_)
    ));
    store
        .complete(&mut lease, Outcome::Timeout, LONG)
        .await
        .expect("complete");
    assert!(matches!(
        store.acquire(&other, LONG).await.expect("acquire"),
        Acquire::Reused(_)
    ));
}

async fn concurrent_claims_elect_exactly_one_owner(store: Store) {
    let base = request(4, "fp", LONG);
    let claims = (0..16).map(|_| {
        let store = Arc::clone(&store);
        let request = with_owner(&base);
        tokio::spawn(async move { store.claim(&request, 1, 0).await })
    });
    let mut owners = 0;
    for claim in futures::future::join_all(claims).await {
        if let Claim::Acquired(_) = claim.expect("task").expect("claim") {
            owners += 1;
        }
    }
    assert_eq!(owners, 1);
}

async fn renewal_fences_the_stale_revision(store: Store) {
    let first = request(5, "fp", LONG);
    let mut lease = owned(&store, &first).await;
    let mut stale = lease.clone();
    store.renew(&mut lease).await.expect("renew");
    assert!(lease.revision > stale.revision);
    let late = store.complete(&mut stale, Outcome::Killed, LONG).await;
    assert_eq!(late, Err(StoreError::LeaseLost));
    store
        .complete(&mut lease, Outcome::Killed, LONG)
        .await
        .expect("complete with the current lease");
}

async fn release_frees_the_key_for_the_next_claim(store: Store) {
    let first = request(6, "fp", LONG);
    let mut lease = owned(&store, &first).await;
    let mut stale = lease.clone();
    assert!(store.release(&mut lease).await.expect("release"));
    assert!(!store.release(&mut stale).await.expect("second release"));
    let next = owned(&store, &with_owner(&first)).await;
    assert!(!next.takeover, "a released key is not a takeover");
}

async fn waiting_copy_gets_the_outcome_once_stored(store: Store) {
    let first = request(7, "fp", LONG);
    let mut lease = owned(&store, &first).await;
    let waiter = {
        let store = Arc::clone(&store);
        let request = with_owner(&first);
        tokio::spawn(async move { store.acquire(&request, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcome = Outcome::Success(json!("done"));
    store
        .complete(&mut lease, outcome.clone(), LONG)
        .await
        .expect("complete");
    match waiter.await.expect("task").expect("acquire") {
        Acquire::Stored { record, waited } => {
            assert!(waited, "the copy followed the running execution");
            assert_eq!(record.result, Some(outcome));
        }
        other => panic!("expected Stored, got {other:?}"),
    }
}

async fn wait_runs_out_while_the_holder_works(store: Store) {
    let first = request(8, "fp", LONG);
    let _lease = owned(&store, &first).await;
    let copy = with_owner(&first);
    match store
        .acquire(&copy, Duration::from_millis(300))
        .await
        .expect("acquire")
    {
        Acquire::Busy(record) => assert_eq!(record.owner, first.owner),
        other => panic!("expected Busy, got {other:?}"),
    }
}

async fn expired_lease_is_taken_over_and_fences_the_old_owner(store: Store) {
    let first = request(9, "fp", SHORT_LEASE);
    let mut old = owned(&store, &first).await;
    let copy = with_owner(&first);
    let new = match store
        .acquire(&copy, Duration::from_secs(10))
        .await
        .expect("acquire")
    {
        Acquire::Owner(lease) => lease,
        other => panic!("expected a takeover, got {other:?}"),
    };
    assert!(new.takeover);
    assert_eq!(new.record.attempt, 2);
    let late = store.complete(&mut old, Outcome::Killed, LONG).await;
    assert_eq!(late, Err(StoreError::LeaseLost));
    let record = store.get(&first.key).await.expect("get").expect("record");
    assert_eq!(record.owner, copy.owner);
    assert_eq!(record.state, RecordState::InProgress);
}

async fn outcome_expires_after_its_ttl(store: Store) {
    let first = request(10, "fp", LONG);
    let mut lease = owned(&store, &first).await;
    store
        .complete(
            &mut lease,
            Outcome::Success(json!(1)),
            Duration::from_secs(1),
        )
        .await
        .expect("complete");
    assert!(store.get(&first.key).await.expect("get").is_some());
    until_gone(&store, &first.key).await;
    let again = owned(&store, &with_owner(&first)).await;
    // The expiry's marker says the key ran within MARKER_TTL (docs/contract.md
    // v1.2 §4): the next run is not attempt 1.
    assert_eq!(again.record.attempt, 2);
}

async fn purge_frees_a_stored_outcome(store: Store) {
    let first = request(11, "fp", LONG);
    let mut lease = owned(&store, &first).await;
    store
        .complete(&mut lease, Outcome::Success(json!(1)), LONG)
        .await
        .expect("complete");
    let seen = store.read(&first.key).await.expect("read").expect("entry");
    store.purge(&first.key, seen.revision).await.expect("purge");
    assert_eq!(store.get(&first.key).await.expect("get"), None);
    owned(&store, &with_owner(&first)).await;
}

async fn acquire_from_a_read_decides_from_what_it_saw(store: Store) {
    // A running claim, read: the copy follows it to its outcome.
    let first = request(12, "fp", LONG);
    let mut lease = owned(&store, &first).await;
    let seen = store.read(&first.key).await.expect("read");
    let waiter = {
        let store = Arc::clone(&store);
        let request = with_owner(&first);
        tokio::spawn(async move {
            store
                .acquire_from(&request, Duration::from_secs(10), seen)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    store
        .complete(&mut lease, Outcome::Timeout, LONG)
        .await
        .expect("complete");
    match waiter.await.expect("task").expect("acquire") {
        Acquire::Stored { record, waited } => {
            assert!(waited, "the copy followed the running execution");
            assert_eq!(record.result, Some(Outcome::Timeout));
        }
        other => panic!("expected Stored, got {other:?}"),
    }

    // A released key, read: claimed at the marker's revision.
    let second = request(13, "fp", LONG);
    let mut released = owned(&store, &second).await;
    assert!(store.release(&mut released).await.expect("release"));
    let marker = store.read(&second.key).await.expect("read");
    let copy = with_owner(&second);
    match store
        .acquire_from(&copy, Duration::ZERO, marker.clone())
        .await
        .expect("acquire")
    {
        Acquire::Owner(lease) => assert_eq!(lease.record.owner, copy.owner),
        other => panic!("expected Owner, got {other:?}"),
    }

    // The same read, now stale: someone else claimed since, so it must not own.
    let late = with_owner(&second);
    match store
        .acquire_from(&late, Duration::ZERO, marker)
        .await
        .expect("acquire")
    {
        Acquire::Busy(record) => assert_eq!(record.owner, copy.owner),
        other => panic!("a stale read must not win the key, got {other:?}"),
    }
}

/// Lease for the lost-ack tests: short, so a renewal's patience (a third
/// of it) runs out quickly while reads fail.
const LOSSY_LEASE: Duration = Duration::from_secs(3);

async fn a_renewal_whose_ack_was_lost_keeps_the_lease(store: Store) {
    let lossy = FaultyStore::new(store);
    let store: Store = lossy.clone();
    let first = request(14, "fp", LOSSY_LEASE);
    let mut lease = owned(&store, &first).await;
    // The renewal lands, its ack is lost and the read-back fails too: the
    // call cannot tell, and must not say the lease is lost.
    lossy.lose_next_acks(1);
    lossy.fail_reads(true);
    let unsure = store.renew(&mut lease).await;
    assert!(
        matches!(&unsure, Err(error) if *error != StoreError::LeaseLost),
        "an unsettled renewal is not a lost lease: {unsure:?}"
    );
    lossy.fail_reads(false);
    // The next renewal conflicts with our own landed write: it adopts it.
    store
        .renew(&mut lease)
        .await
        .expect("our own landed renewal is adopted, not taken for another owner");
    let latest = store.read(&first.key).await.expect("read").expect("entry");
    assert_eq!(lease.revision, latest.revision);
    let record = store
        .complete(&mut lease, Outcome::Success(json!("kept")), LONG)
        .await
        .expect("the owner stores its outcome");
    assert_eq!(record.owner, first.owner);
}

async fn a_completion_whose_ack_was_lost_is_stored_once(store: Store) {
    let lossy = FaultyStore::new(store);
    let store: Store = lossy.clone();
    let first = request(15, "fp", LOSSY_LEASE);
    let mut lease = owned(&store, &first).await;
    // A renewal lands unacknowledged and unverified; the completion that
    // follows conflicts with it and must still store the outcome.
    lossy.lose_next_acks(1);
    lossy.fail_reads(true);
    let unsure = store.renew(&mut lease).await;
    assert!(unsure.is_err(), "the renewal could not be settled");
    lossy.fail_reads(false);
    let outcome = Outcome::Success(json!("once"));
    let record = store
        .complete(&mut lease, outcome.clone(), LONG)
        .await
        .expect("the owner's own landed renewal does not fence it");
    assert_eq!(record.result, Some(outcome.clone()));
    let stored = store.get(&first.key).await.expect("get").expect("record");
    assert_eq!(stored.state, RecordState::Done);
    assert_eq!(stored.result, Some(outcome));
}

/// Found by the model check (`tests/model/`): a completion lands, its ack
/// and read-back are lost, and the owner then renews or releases the same
/// lease. Neither may touch the outcome it stored.
async fn after_a_completion_whose_ack_was_lost_renew_and_release_keep_the_outcome(store: Store) {
    let lossy = FaultyStore::new(store);
    let store: Store = lossy.clone();
    let first = request(18, "fp", LOSSY_LEASE);
    let mut lease = owned(&store, &first).await;
    let outcome = Outcome::Success(json!("stored"));
    lossy.lose_next_acks(1);
    lossy.fail_reads(true);
    let unsure = store.complete(&mut lease, outcome.clone(), LONG).await;
    assert!(unsure.is_err(), "the completion could not be settled");
    lossy.fail_reads(false);
    store
        .renew(&mut lease)
        .await
        .expect("a renewal finds its own outcome, and leaves it");
    let stored = store.get(&first.key).await.expect("get").expect("record");
    assert_eq!(
        stored.state,
        RecordState::Done,
        "renew wrote over the outcome"
    );
    assert_eq!(stored.result, Some(outcome.clone()));
    let released = store.release(&mut lease).await.expect("release");
    assert!(!released, "nothing of the claim is left to release");
    let stored = store.get(&first.key).await.expect("get").expect("record");
    assert_eq!(stored.result, Some(outcome), "release removed the outcome");
}

async fn an_unsettled_owner_still_loses_to_another_owner(store: Store) {
    let lossy = FaultyStore::new(store);
    let store: Store = lossy.clone();
    let first = request(16, "fp", Duration::from_secs(1));
    let mut lease = owned(&store, &first).await;
    lossy.lose_next_acks(1);
    lossy.fail_reads(true);
    assert!(store.renew(&mut lease).await.is_err());
    assert!(lease.unsettled, "the lost ack is remembered");
    lossy.fail_reads(false);
    // The lease runs out and another owner takes the key over.
    let copy = with_owner(&first);
    match store
        .acquire(&copy, Duration::from_secs(10))
        .await
        .expect("acquire")
    {
        Acquire::Owner(new) => assert!(new.takeover),
        other => panic!("expected a takeover, got {other:?}"),
    }
    let late = store.complete(&mut lease, Outcome::Killed, LONG).await;
    assert_eq!(
        late,
        Err(StoreError::LeaseLost),
        "another owner's record is not ours"
    );
    let record = store.get(&first.key).await.expect("get").expect("record");
    assert_eq!(record.owner, copy.owner);
    assert_eq!(record.state, RecordState::InProgress);
}

async fn an_outcome_too_large_to_store_is_stored_as_result_too_large(store: Store) {
    let first = request(17, "fp", LONG);
    let mut lease = owned(&store, &first).await;
    let huge = Outcome::Success(json!("x".repeat(1024 * 1024)));
    let record = store
        .complete(&mut lease, huge, LONG)
        .await
        .expect("a definite outcome is stored");
    let code = record.result.as_ref().and_then(Outcome::error_code);
    assert_eq!(code, Some(idemq::codes::RESULT_TOO_LARGE));
    let stored = store.get(&first.key).await.expect("get").expect("record");
    assert_eq!(stored, record, "what is answered is what is stored");
    match store
        .acquire(&with_owner(&first), LONG)
        .await
        .expect("acquire")
    {
        Acquire::Stored { record: replay, .. } => assert_eq!(replay, record),
        other => panic!("the key replays, never runs again: {other:?}"),
    }
}

async fn purge_never_removes_a_claim_it_did_not_see(store: Store) {
    let first = request(18, "fp", LONG);
    let mut lease = owned(&store, &first).await;
    store
        .complete(&mut lease, Outcome::Success(json!(1)), LONG)
        .await
        .expect("complete");
    let seen = store.read(&first.key).await.expect("read").expect("entry");
    // Between the operator's read and the purge, the key moves on.
    let mut newer = lease.clone();
    newer.revision = seen.revision;
    newer.record.state = RecordState::InProgress;
    store
        .write(&first.key, seen.revision, &newer.record, LONG)
        .await
        .expect("a newer claim");
    let late = store.purge(&first.key, seen.revision).await;
    assert_eq!(late, Err(StoreError::Conflict));
    let record = store.get(&first.key).await.expect("get").expect("record");
    assert_eq!(
        record.state,
        RecordState::InProgress,
        "the newer claim stays"
    );
}

/// A record read back says when the store wrote it, by the store's clock
/// (a JetStream message's timestamp): the outcome cache counts its life
/// from there, as the bucket does.
async fn a_read_record_says_when_the_store_wrote_it(store: Store) {
    let first = request(20, "fp", LONG);
    let before = chrono::Utc::now();
    let mut lease = owned(&store, &first).await;
    let done = store
        .complete(&mut lease, Outcome::Success(json!(1)), LONG)
        .await
        .expect("complete");
    assert_eq!(done.written, None, "a record just written was not read");
    let read = store.get(&first.key).await.expect("get").expect("stored");
    let written = read.written.expect("the store's timestamp");
    let skew = chrono::Duration::seconds(2);
    assert!(
        written >= before - skew && written <= chrono::Utc::now() + skew,
        "{written} is when it was written"
    );
    assert_eq!(read, done, "the same record, whenever it was read");
}

both_stores!(
    a_read_record_says_when_the_store_wrote_it,
    first_claim_acquires_and_second_sees_it_taken,
    complete_then_acquire_replays_the_stored_outcome,
    different_fingerprint_is_reused,
    concurrent_claims_elect_exactly_one_owner,
    renewal_fences_the_stale_revision,
    release_frees_the_key_for_the_next_claim,
    waiting_copy_gets_the_outcome_once_stored,
    wait_runs_out_while_the_holder_works,
    expired_lease_is_taken_over_and_fences_the_old_owner,
    outcome_expires_after_its_ttl,
    purge_frees_a_stored_outcome,
    acquire_from_a_read_decides_from_what_it_saw,
    a_renewal_whose_ack_was_lost_keeps_the_lease,
    a_completion_whose_ack_was_lost_is_stored_once,
    after_a_completion_whose_ack_was_lost_renew_and_release_keep_the_outcome,
    an_unsettled_owner_still_loses_to_another_owner,
    an_outcome_too_large_to_store_is_stored_as_result_too_large,
    purge_never_removes_a_claim_it_did_not_see,
);

#[tokio::test]
async fn bucket_without_per_message_ttl_is_refused() {
    let server = common::NatsServer::start();
    common::stores::bucket_without_ttl(&server, "PLAIN").await;
    let js = async_nats::jetstream::new(server.connect().await);
    let config = BucketConfig {
        bucket: "PLAIN".to_owned(),
        replicas: 1,
    };
    match KvStore::open(js, &config).await {
        Err(StoreError::Setup(reason)) => assert!(reason.contains("per-message TTL"), "{reason}"),
        other => panic!("expected a setup error, got {other:?}"),
    }
}

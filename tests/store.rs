//! One suite for both stores: every test below runs against the in-memory
//! store and against JetStream KV on a real nats-server, so the two keep
//! the same semantics.

mod common;

use std::sync::Arc;
use std::time::Duration;

use idemq::outcome::{Outcome, RecordState};
use idemq::store::kv::{BucketConfig, KvStore};
use idemq::store::{Acquire, Claim, ClaimRequest, IdempotencyStore, StoreError};
use idemq::IdempotencyKey;
use serde_json::json;

type Store = Arc<dyn IdempotencyStore>;

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

/// Polls (bounded) until the key holds no record.
async fn until_gone(store: &Store, key: &IdempotencyKey) {
    for _ in 0..200 {
        if store.get(key).await.expect("get").is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{key} did not expire within 10s");
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
    let lease = owned(&store, &first).await;
    let outcome = Outcome::Success(json!({"n": 1}));
    let record = store
        .complete(&lease, outcome.clone(), LONG)
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
    let lease = owned(&store, &first).await;
    let other = ClaimRequest {
        fingerprint: "fp-b".to_owned(),
        ..with_owner(&first)
    };
    assert!(matches!(
        store.acquire(&other, LONG).await.expect("acquire"),
        Acquire::Reused(_)
    ));
    store
        .complete(&lease, Outcome::Timeout, LONG)
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
    let lease = owned(&store, &first).await;
    let renewed = store.renew(&lease).await.expect("renew");
    assert!(renewed.revision > lease.revision);
    let stale = store.complete(&lease, Outcome::Killed, LONG).await;
    assert_eq!(stale, Err(StoreError::LeaseLost));
    store
        .complete(&renewed, Outcome::Killed, LONG)
        .await
        .expect("complete with the current lease");
}

async fn release_frees_the_key_for_the_next_claim(store: Store) {
    let first = request(6, "fp", LONG);
    let lease = owned(&store, &first).await;
    assert!(store.release(&lease).await.expect("release"));
    assert!(!store.release(&lease).await.expect("second release"));
    let next = owned(&store, &with_owner(&first)).await;
    assert!(!next.takeover, "a released key is not a takeover");
}

async fn waiting_copy_gets_the_outcome_once_stored(store: Store) {
    let first = request(7, "fp", LONG);
    let lease = owned(&store, &first).await;
    let waiter = {
        let store = Arc::clone(&store);
        let request = with_owner(&first);
        tokio::spawn(async move { store.acquire(&request, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcome = Outcome::Success(json!("done"));
    store
        .complete(&lease, outcome.clone(), LONG)
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
    let old = owned(&store, &first).await;
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
    let late = store.complete(&old, Outcome::Killed, LONG).await;
    assert_eq!(late, Err(StoreError::LeaseLost));
    let record = store.get(&first.key).await.expect("get").expect("record");
    assert_eq!(record.owner, copy.owner);
    assert_eq!(record.state, RecordState::InProgress);
}

async fn outcome_expires_after_its_ttl(store: Store) {
    let first = request(10, "fp", LONG);
    let lease = owned(&store, &first).await;
    store
        .complete(&lease, Outcome::Success(json!(1)), Duration::from_secs(1))
        .await
        .expect("complete");
    assert!(store.get(&first.key).await.expect("get").is_some());
    until_gone(&store, &first.key).await;
    let again = owned(&store, &with_owner(&first)).await;
    assert_eq!(again.record.attempt, 1);
}

async fn purge_frees_a_stored_outcome(store: Store) {
    let first = request(11, "fp", LONG);
    let lease = owned(&store, &first).await;
    store
        .complete(&lease, Outcome::Success(json!(1)), LONG)
        .await
        .expect("complete");
    store.purge(&first.key).await.expect("purge");
    assert_eq!(store.get(&first.key).await.expect("get"), None);
    owned(&store, &with_owner(&first)).await;
}

async fn acquire_from_a_read_decides_from_what_it_saw(store: Store) {
    // A running claim, read: the copy follows it to its outcome.
    let first = request(12, "fp", LONG);
    let lease = owned(&store, &first).await;
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
        .complete(&lease, Outcome::Timeout, LONG)
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
    let released = owned(&store, &second).await;
    assert!(store.release(&released).await.expect("release"));
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

async fn kv_store(server: &common::NatsServer) -> Store {
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client);
    let store = KvStore::open(js, &BucketConfig::default())
        .await
        .expect("open bucket");
    Arc::new(store)
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(std::sync::Arc::new(idemq::store::memory::MemoryStore::new())).await;
                }
            )*
        }
        mod jetstream_kv {
            $(
                #[tokio::test]
                async fn $name() {
                    let server = crate::common::NatsServer::start();
                    super::$name(super::kv_store(&server).await).await;
                }
            )*
        }
    };
}

suite!(
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
);

#[tokio::test]
async fn bucket_without_per_message_ttl_is_refused() {
    let server = common::NatsServer::start();
    let js = async_nats::jetstream::new(server.connect().await);
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: "PLAIN".to_owned(),
        history: 1,
        ..Default::default()
    })
    .await
    .expect("plain bucket");
    let config = BucketConfig {
        bucket: "PLAIN".to_owned(),
        replicas: 1,
    };
    match KvStore::open(js, &config).await {
        Err(StoreError::Setup(reason)) => assert!(reason.contains("per-message TTL"), "{reason}"),
        other => panic!("expected a setup error, got {other:?}"),
    }
}

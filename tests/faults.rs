//! Network faults between a worker and its server, through a TCP fault
//! proxy of the test's own: the guarantee where acks are lost.

mod common;

use std::time::Duration;

use common::proxy::{Direction, FaultProxy, Mode};
use common::upstream::{Upstream, FORWARD};
use common::workers::{start_worker_on, test_config};
use common::NatsServer;
use idemq::store::kv::{BucketConfig, KvStore};
use idemq::store::IdempotencyStore;
use idemq::IdempotencyKey;
use serde_json::{json, Value};

/// Polls (bounded) until the upstream has seen `n` executions.
async fn until_executed(upstream: &Upstream, n: u32) {
    for _ in 0..100 {
        if upstream.total() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the upstream saw fewer than {n} executions within 5s");
}

#[tokio::test]
async fn a_handler_running_across_a_stalled_renewal_keeps_its_lease_and_runs_once() {
    if let Ok(filter) = std::env::var("IDEMQ_TEST_LOG") {
        // Only for a person reading a run: the worker runs in this process.
        let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    }
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let proxy = FaultProxy::before(&server).await;
    let through_proxy = async_nats::connect(proxy.url()).await.expect("connect");
    // The default lease (30 s): renewals every 10 s, each given 10 s. The
    // client's own timeouts: 5 s for a publish ack, 10 s for a read.
    let config = idemq::WorkerConfig {
        handler_timeout: Duration::from_secs(90),
        ..test_config()
    };
    let worker = start_worker_on(through_proxy, config, Some(FORWARD)).await;

    let body = json!({
        "intent_id": "stalled", "actor": "agent", "episode": "ep",
        "capability": "slow", "params": {"sleep_ms": 35_000},
    });
    let sent = {
        let client = client.clone();
        tokio::spawn(async move {
            let request = async_nats::Request::new()
                .payload(body.to_string().into())
                .timeout(Some(Duration::from_secs(90)));
            let reply = client
                .send_request("intents.work", request)
                .await
                .expect("a reply");
            serde_json::from_slice::<Value>(&reply.payload).expect("JSON")
        })
    };
    until_executed(&upstream, 1).await;
    // From before the first renewal (t = 10 s) to t = 27 s: the renewal
    // reaches the server and lands; neither its ack nor the read that
    // would settle it comes back in time, and the next renewal's conflict
    // comes back only after the hold. The server's lease (from t = 10 s)
    // lasts until t = 40 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set(Direction::Down, Mode::Hold);
    tokio::time::sleep(Duration::from_secs(23)).await;
    proxy.set(Direction::Down, Mode::Pass);

    let reply = tokio::time::timeout(Duration::from_secs(60), sent)
        .await
        .expect("answered within 60s")
        .expect("request task");
    assert_eq!(reply["result"]["status"], "Success", "{reply}");
    assert_eq!(reply["replayed"], false);
    assert_eq!(upstream.total(), 1, "executed once");
    let store = KvStore::open(
        async_nats::jetstream::new(client.clone()),
        &BucketConfig::default(),
    )
    .await
    .expect("bucket");
    let key = IdempotencyKey::parse(reply["idem_key"].as_str().expect("key")).expect("key");
    let record = store.get(&key).await.expect("get").expect("stored");
    assert_eq!(record.result.as_ref().map(|_| ()), Some(()), "{record:?}");
    assert_eq!(worker.stats.snapshot().takeovers, 0);
    worker.stop().await;
}

#[tokio::test]
async fn an_outcome_the_store_never_took_is_not_acked_away() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let proxy = FaultProxy::before(&server).await;
    let through_proxy = async_nats::connect(proxy.url()).await.expect("connect");
    let mut js_config = idemq::config::JetStreamConfig::new("INTENTS", "workers");
    // No redelivery while the worker's traffic is held.
    js_config.ack_wait = Duration::from_secs(30);
    let config = idemq::WorkerConfig {
        lease: Duration::from_secs(3),
        delivery: idemq::config::Delivery::JetStream(js_config),
        ..test_config()
    };
    let worker = start_worker_on(through_proxy, config, Some(FORWARD)).await;
    let js = async_nats::jetstream::new(client.clone());
    let body = json!({
        "intent_id": "unstored", "actor": "agent", "episode": "ep",
        "capability": "slow", "params": {"sleep_ms": 1000},
    });
    js.publish("intents.work", body.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("stream ack");
    until_executed(&upstream, 1).await;
    // The handler's answer still reaches the worker; nothing the worker
    // sends reaches the server for longer than the lease (and than the
    // client's ack and read timeouts): the outcome cannot be stored.
    proxy.set(Direction::Up, Mode::Hold);
    tokio::time::sleep(Duration::from_secs(18)).await;
    proxy.set(Direction::Up, Mode::Pass);

    let store = KvStore::open(js.clone(), &BucketConfig::default())
        .await
        .expect("bucket");
    let key = IdempotencyKey::from_intent_metadata("unstored", "agent", "ep", None);
    let mut stored = None;
    for _ in 0..150 {
        if let Some(record) = store.get(&key).await.expect("get") {
            if record.result.is_some() {
                stored = Some(record);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stored.is_some(),
        "the intent stayed in its stream and its outcome was stored in the end"
    );
    // The lease ran out while the store was unreachable: the documented
    // window, so a second execution is allowed, never a third.
    assert!(upstream.total() <= 2, "{} executions", upstream.total());
    let mut consumer = js
        .get_stream("INTENTS")
        .await
        .expect("stream")
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("workers")
        .await
        .expect("consumer");
    let mut pending = u64::MAX;
    for _ in 0..100 {
        let info = consumer.info().await.expect("info");
        pending = info.num_pending + info.num_ack_pending as u64;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pending, 0, "acked once the outcome was stored");
    worker.stop().await;
}

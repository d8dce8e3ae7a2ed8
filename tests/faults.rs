//! Network faults between a worker and its server, through a TCP fault
//! proxy of the test's own: the guarantee where acks are lost.

mod common;

use std::time::Duration;

use common::intents::{intent_for, intent_key};
use common::poll::eventually;
use common::proxy::{Direction, FaultProxy, Mode};
use common::upstream::{Upstream, FORWARD};
use common::workers::{start_worker_on, test_config};
use common::NatsServer;
use idemq::store::kv::{BucketConfig, KvStore};
use idemq::store::ClaimProtocol;
use idemq::IdempotencyKey;
use serde_json::{json, Value};

/// Polls (5 s at most) until the upstream has seen `n` executions.
async fn until_executed(upstream: &Upstream, n: u32) {
    eventually(
        Duration::from_secs(5),
        format!("{n} executions upstream"),
        async || upstream.total() >= n,
    )
    .await;
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

    let body = intent_for("stalled", "slow", json!({"sleep_ms": 35_000}));
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
    let body = intent_for("unstored", "slow", json!({"sleep_ms": 1000}));
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
    let key = intent_key("unstored");
    eventually(
        Duration::from_secs(15),
        "the intent stayed in its stream and its outcome was stored in the end",
        async || {
            let record = store.get(&key).await.expect("get");
            record.is_some_and(|record| record.result.is_some())
        },
    )
    .await;
    // The lease ran out while the store was unreachable: the documented
    // window, so a second execution is allowed, never a third.
    assert!(upstream.total() <= 2, "{} executions", upstream.total());
    let consumer = js
        .get_stream("INTENTS")
        .await
        .expect("stream")
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("workers")
        .await
        .expect("consumer");
    eventually(
        Duration::from_secs(10),
        "acked once the outcome was stored",
        async || {
            let info = consumer.get_info().await.expect("info");
            match info.num_pending + info.num_ack_pending as u64 {
                0 => Ok(()),
                pending => Err(format!("{pending} pending")),
            }
        },
    )
    .await;
    worker.stop().await;
}

/// The upstream of the tests below, played by the test itself: it is
/// handed each request, and answers when the test has set up its fault.
struct Scripted {
    client: async_nats::Client,
    requests: async_nats::Subscriber,
}

impl Scripted {
    async fn start(client: &async_nats::Client) -> Scripted {
        let requests = client.subscribe("exec.*").await.expect("subscribe exec.*");
        client.flush().await.expect("flush");
        Scripted {
            client: client.clone(),
            requests,
        }
    }

    /// The next request, within 20 s.
    async fn next(&mut self) -> async_nats::Message {
        use futures::StreamExt;
        tokio::time::timeout(Duration::from_secs(20), self.requests.next())
            .await
            .expect("a request within 20s")
            .expect("the subscription lives")
    }

    /// No request within `bound`: nothing executed again.
    async fn none_within(&mut self, bound: Duration) {
        use futures::StreamExt;
        if let Ok(Some(request)) = tokio::time::timeout(bound, self.requests.next()).await {
            panic!("executed again: {request:?}");
        }
    }

    async fn answer(&self, request: &async_nats::Message, body: &Value) {
        let reply = request.reply.clone().expect("a request");
        self.client
            .publish(reply, body.to_string().into())
            .await
            .expect("answer");
        self.client.flush().await.expect("flush");
    }
}

/// Sends one intent as a core request (60 s bound) in the background.
fn send(
    client: &async_nats::Client,
    intent_id: &str,
) -> tokio::task::JoinHandle<async_nats::Message> {
    let client = client.clone();
    let body = json!({
        "intent_id": intent_id, "actor": "agent", "episode": "ep", "capability": "work",
    });
    tokio::spawn(async move {
        let request = async_nats::Request::new()
            .payload(body.to_string().into())
            .timeout(Some(Duration::from_secs(60)));
        client
            .send_request("intents.work", request)
            .await
            .expect("a reply")
    })
}

/// The reply's JSON and its `Idem-Stored` header.
fn read(reply: &async_nats::Message) -> (Value, Option<String>) {
    let stored = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Idem-Stored"))
        .map(|v| v.as_str().to_owned());
    let body = serde_json::from_slice(&reply.payload).expect("JSON");
    (body, stored)
}

/// A worker (forwarding to `exec.*`) with `lease`, through `proxy`.
async fn worker_with_lease(proxy: &FaultProxy, lease: Duration) -> common::workers::RunningWorker {
    let through_proxy = async_nats::connect(proxy.url()).await.expect("connect");
    let config = idemq::WorkerConfig {
        lease,
        handler_timeout: Duration::from_secs(30),
        ..test_config()
    };
    start_worker_on(through_proxy, config, Some(FORWARD)).await
}

/// What the bucket holds under the intent's key.
async fn stored(client: &async_nats::Client, intent_id: &str) -> Option<idemq::Record> {
    let store = KvStore::open(
        async_nats::jetstream::new(client.clone()),
        &BucketConfig::default(),
    )
    .await
    .expect("bucket");
    store.get(&intent_key(intent_id)).await.expect("get")
}

/// Asserts `reply` is the outcome the bucket holds, answered as stored.
async fn assert_answered_as_stored(
    client: &async_nats::Client,
    intent_id: &str,
    reply: &async_nats::Message,
) {
    let (body, stored_header) = read(reply);
    assert_eq!(
        stored_header, None,
        "a stored outcome carries no Idem-Stored: {body}"
    );
    let record = stored(client, intent_id)
        .await
        .expect("the outcome is stored");
    let result = serde_json::to_value(record.result.as_ref().expect("done")).expect("JSON");
    assert_eq!(body["result"], result, "{body}");
    let at = body["stored_at"]
        .as_str()
        .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
        .unwrap_or_else(|| panic!("answered with stored_at: {body}"));
    assert_eq!(at, record.stored_at);
}

#[tokio::test]
async fn an_outcome_written_across_a_3s_store_outage_lands_and_is_answered_stored() {
    let mut server = NatsServer::start();
    let client = server.connect().await;
    let mut upstream = Scripted::start(&client).await;
    let proxy = FaultProxy::before(&server).await;
    let worker = worker_with_lease(&proxy, Duration::from_secs(10)).await;
    let sent = send(&client, "outage");
    let request = upstream.next().await;
    // The handler returns; the worker's writes from now on are held, and
    // the server is gone for 3 s before they reach it.
    proxy.set(Direction::Up, Mode::Hold);
    upstream.answer(&request, &json!({"paid": 42})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.stop();
    proxy.set(Direction::Up, Mode::Pass);
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.restart();

    let reply = tokio::time::timeout(Duration::from_secs(60), sent)
        .await
        .expect("answered")
        .expect("request task");
    let client = server.connect().await;
    assert_answered_as_stored(&client, "outage", &reply).await;
    let mut upstream = Scripted::start(&client).await;
    upstream.none_within(Duration::from_millis(500)).await;
    assert_eq!(worker.stats.snapshot().executed, 1);
    assert_eq!(worker.stats.snapshot().unstored, 0);
    worker.stop().await;
}

#[tokio::test]
async fn an_outcome_whose_acks_are_lost_past_the_lease_is_answered_as_the_stored_one() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let mut upstream = Scripted::start(&client).await;
    let proxy = FaultProxy::before(&server).await;
    let worker = worker_with_lease(&proxy, Duration::from_secs(2)).await;
    let sent = send(&client, "acks-lost");
    let request = upstream.next().await;
    // The outcome's write reaches the server and lands; what the server
    // answers (its ack, any read) is held for longer than the lease. The
    // chaos soak's "answered but nothing is stored" began this way: the
    // owner gave up when its lease ended by its own clock and answered the
    // outcome as unstored.
    proxy.set(Direction::Up, Mode::Hold);
    upstream.answer(&request, &json!({"paid": 7})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.set(Direction::Down, Mode::Hold);
    proxy.set(Direction::Up, Mode::Pass);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    proxy.set(Direction::Down, Mode::Pass);

    let reply = tokio::time::timeout(Duration::from_secs(30), sent)
        .await
        .expect("answered")
        .expect("request task");
    assert_answered_as_stored(&client, "acks-lost", &reply).await;
    upstream.none_within(Duration::from_millis(500)).await;
    assert_eq!(worker.stats.snapshot().unstored, 0);
    worker.stop().await;
}

#[tokio::test]
async fn an_outcome_the_store_refused_after_a_lost_lease_is_answered_unstored_and_its_retry_runs_again(
) {
    let server = NatsServer::start();
    let client = server.connect().await;
    let mut upstream = Scripted::start(&client).await;
    let proxy = FaultProxy::before(&server).await;
    let worker = worker_with_lease(&proxy, Duration::from_secs(2)).await;
    let sent = send(&client, "lease-lost");
    let request = upstream.next().await;
    // Nothing the worker sends reaches the server for 4 s: the claim's
    // 2 s lease ends there, and the outcome's write, released late, finds
    // the expiry marker. The executed outcome cannot be stored: it is
    // answered as it is, marked unstored, never as a settled answer.
    proxy.set(Direction::Up, Mode::Hold);
    upstream.answer(&request, &json!({"paid": 9})).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set(Direction::Up, Mode::Pass);

    let reply = tokio::time::timeout(Duration::from_secs(30), sent)
        .await
        .expect("answered")
        .expect("request task");
    let (body, stored_header) = read(&reply);
    assert_eq!(body["result"]["data"]["paid"], 9, "{body}");
    assert_eq!(stored_header.as_deref(), Some("false"), "{body}");
    assert_eq!(body["stored_at"], Value::Null, "{body}");
    assert_eq!(worker.stats.snapshot().unstored, 1);
    assert_eq!(
        stored(&client, "lease-lost").await.and_then(|r| r.result),
        None
    );

    // A retry runs the key again (after a lost lease: attempt 2), and that
    // outcome is stored.
    let retry = send(&client, "lease-lost");
    let again = upstream.next().await;
    let attempt = again
        .headers
        .as_ref()
        .and_then(|h| h.get("Idem-Attempt"))
        .map(|v| v.as_str().to_owned());
    assert_eq!(attempt.as_deref(), Some("2"));
    upstream.answer(&again, &json!({"paid": 9})).await;
    let reply = tokio::time::timeout(Duration::from_secs(30), retry)
        .await
        .expect("answered")
        .expect("request task");
    assert_answered_as_stored(&client, "lease-lost", &reply).await;
    worker.stop().await;
}

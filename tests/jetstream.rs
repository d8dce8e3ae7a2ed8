//! JetStream delivery against a real nats-server: intents published into a
//! stream, answered on their `reply_to`, acked only after the outcome; dead
//! letters; crashes and restarts lose nothing.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use async_nats::{Client, HeaderMap, Subscriber};
use common::intents::intent_for;
use common::poll::eventually;
use common::proxy::{Direction, FaultProxy, Mode};
use common::rig::Rig;
use common::upstream::{Upstream, FORWARD};
use common::workers::{start_worker, test_config, wait_for_workers, RunningWorker, WorkerProcess};
use common::NatsServer;
use futures::StreamExt;
use idemq::config::{Delivery, JetStreamConfig};
use idemq::WorkerConfig;
use serde_json::{json, Value};

const STREAM: &str = "INTENTS";
const DURABLE: &str = "workers";

fn js_config(tune: impl FnOnce(&mut JetStreamConfig)) -> WorkerConfig {
    let mut js = JetStreamConfig::new(STREAM, DURABLE);
    js.ack_wait = Duration::from_secs(2);
    tune(&mut js);
    WorkerConfig {
        delivery: Delivery::JetStream(js),
        ..test_config()
    }
}

/// An intent answered on `results.out`.
fn intent(id: &str, capability: &str, params: Value) -> Value {
    let mut body = intent_for(id, capability, params);
    body["reply_to"] = json!("results.out");
    body
}

/// Publishes into the stream and waits for the stream's ack.
async fn publish(js: &jetstream::Context, body: &Value) {
    js.publish("intents.work", body.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("stream ack");
}

/// Collects replies until `count` arrived or `bound` passed.
async fn collect(replies: &mut Subscriber, count: usize, bound: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + bound;
    let mut seen = Vec::new();
    while seen.len() < count {
        match tokio::time::timeout_at(deadline, replies.next()).await {
            Ok(Some(message)) => seen.push(serde_json::from_slice(&message.payload).expect("JSON")),
            _ => break,
        }
    }
    seen
}

async fn results(client: &Client) -> Subscriber {
    let subscriber = client.subscribe("results.>").await.expect("subscribe");
    client.flush().await.expect("flush");
    subscriber
}

async fn consumer(js: &jetstream::Context) -> PullConsumer {
    js.get_stream(STREAM)
        .await
        .expect("stream")
        .get_consumer(DURABLE)
        .await
        .expect("consumer")
}

/// Waits (10 s at most) until the consumer has nothing pending or unacked.
async fn until_drained(js: &jetstream::Context) {
    let consumer = consumer(js).await;
    eventually(
        Duration::from_secs(10),
        "the consumer with nothing pending or unacked",
        async || {
            let info = consumer.get_info().await.expect("consumer info");
            info.num_pending == 0 && info.num_ack_pending == 0
        },
    )
    .await;
}

/// A server, an upstream, one in-process worker in JetStream mode, and a
/// subscription to the replies: what most tests here start from.
/// The shared [`Rig`], with a JetStream-mode worker and its replies.
struct JsRig {
    server: NatsServer,
    client: Client,
    upstream: Upstream,
    worker: RunningWorker,
    js: jetstream::Context,
    replies: Subscriber,
}

async fn rig(config: WorkerConfig, forward: Option<&str>) -> JsRig {
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    let worker = start_worker(&server, config, forward).await;
    let js = jetstream::new(client.clone());
    let replies = results(&client).await;
    JsRig {
        server,
        client,
        upstream,
        worker,
        js,
        replies,
    }
}

#[tokio::test]
async fn two_hundred_intents_two_hundred_replies_two_hundred_executions() {
    let JsRig {
        server: _server,
        client: _client,
        upstream,
        worker,
        js,
        mut replies,
    } = rig(js_config(|_| {}), Some(FORWARD)).await;

    for i in 0..200 {
        publish(&js, &intent(&format!("bulk-{i}"), "ok", json!(i))).await;
    }
    let seen = collect(&mut replies, 200, Duration::from_secs(30)).await;
    assert_eq!(seen.len(), 200);
    let keys: HashSet<&str> = seen
        .iter()
        .map(|r| r["idem_key"].as_str().expect("key"))
        .collect();
    assert_eq!(keys.len(), 200);
    assert!(seen
        .iter()
        .all(|r| r["replayed"] == false && r["result"]["status"] == "Success"));
    assert_eq!(upstream.total(), 200);
    until_drained(&js).await;
    worker.stop().await;
}

#[tokio::test]
async fn intents_published_three_times_execute_once_and_answer_each_copy() {
    let JsRig {
        server: _server,
        client: _client,
        upstream,
        worker,
        js,
        mut replies,
    } = rig(js_config(|_| {}), Some(FORWARD)).await;

    for _copy in 0..3 {
        for i in 0..50 {
            let body = intent(&format!("dup-{i}"), "slow", json!({"sleep_ms": 20}));
            publish(&js, &body).await;
        }
    }
    let seen = collect(&mut replies, 150, Duration::from_secs(30)).await;
    assert_eq!(seen.len(), 150);
    let fresh = seen.iter().filter(|r| r["replayed"] == false).count();
    assert_eq!(fresh, 50);
    let mut per_key: HashMap<&str, Vec<&Value>> = HashMap::new();
    for reply in &seen {
        per_key
            .entry(reply["idem_key"].as_str().expect("key"))
            .or_default()
            .push(&reply["result"]);
    }
    assert_eq!(per_key.len(), 50);
    assert!(per_key
        .values()
        .all(|copies| copies.len() == 3 && copies.iter().all(|r| *r == copies[0])));
    assert_eq!(upstream.total(), 50);
    assert!(upstream.duplicates().is_empty());
    until_drained(&js).await;
    worker.stop().await;
}

#[tokio::test]
async fn a_results_stream_keeps_one_reply_per_intent_under_a_key() {
    let JsRig {
        server: _server,
        client: _client,
        upstream,
        worker,
        js,
        mut replies,
    } = rig(js_config(|_| {}), Some(FORWARD)).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "RESULTS".to_owned(),
        subjects: vec!["results.>".to_owned()],
        ..Default::default()
    })
    .await
    .expect("results stream");

    // One intent twice, then another intent under the same key.
    publish(&js, &intent("kept", "ok", json!(1))).await;
    publish(&js, &intent("kept", "ok", json!(1))).await;
    let copies = collect(&mut replies, 2, Duration::from_secs(10)).await;
    assert_eq!(copies.len(), 2, "both copies answered: {copies:?}");
    publish(&js, &intent("kept", "ok", json!(2))).await;
    let refusal = collect(&mut replies, 1, Duration::from_secs(10)).await;
    assert_eq!(refusal.len(), 1, "the other intent answered too");
    until_drained(&js).await;

    let mut stream = js.get_stream("RESULTS").await.expect("stream");
    let held = stream.info().await.expect("info").state.messages;
    assert_eq!(
        held, 2,
        "the intent's outcome once, and the other intent's KEY_REUSED"
    );
    let reused = stream.get_last_raw_message_by_subject("results.out").await;
    let reused: Value = serde_json::from_slice(&reused.expect("last").payload).expect("JSON");
    assert_eq!(reused["result"]["data"]["code"], "KEY_REUSED", "{reused}");
    assert_eq!(upstream.total(), 1);
    worker.stop().await;
}

#[tokio::test]
async fn a_results_stream_keeps_the_final_outcome_after_a_transient_answer() {
    let JsRig {
        server: _server,
        client: _client,
        upstream,
        worker,
        js,
        mut replies,
    } = rig(js_config(|js| js.max_deliver = 2), Some(FORWARD)).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "RESULTS".to_owned(),
        subjects: vec!["results.>".to_owned()],
        ..Default::default()
    })
    .await
    .expect("results stream");
    // 503 on both deliveries: answered with that transient error and
    // dead-lettered. Published again, it runs a third time and succeeds.
    let body = intent("twice", "fail_twice", json!(1));
    publish(&js, &body).await;
    let first = collect(&mut replies, 1, Duration::from_secs(15)).await;
    assert_eq!(first.len(), 1, "answered on its last delivery");
    assert_eq!(first[0]["result"]["data"]["code"], "503", "{first:?}");
    until_drained(&js).await;
    publish(&js, &body).await;
    let second = collect(&mut replies, 1, Duration::from_secs(15)).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0]["result"]["status"], "Success", "{second:?}");
    until_drained(&js).await;
    assert_eq!(upstream.total(), 3);

    // The stream keeps both answers, the stored outcome last (docs/contract.md
    // v1.2 §6): the transient answer did not take its message id.
    let mut stream = js.get_stream("RESULTS").await.expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 2);
    let last = stream
        .get_last_raw_message_by_subject("results.out")
        .await
        .expect("last");
    let last: Value = serde_json::from_slice(&last.payload).expect("JSON");
    assert_eq!(last["result"]["status"], "Success", "{last}");
    worker.stop().await;
}

#[tokio::test]
async fn an_invalid_intent_is_answered_dead_lettered_and_not_redelivered() {
    let JsRig {
        server: _server,
        client,
        worker,
        js,
        mut replies,
        ..
    } = rig(js_config(|js| js.ack_wait = Duration::from_secs(1)), None).await;
    let mut dead = client
        .subscribe("idemq.dlq.INTENTS")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");

    let mut headers = HeaderMap::new();
    headers.insert("Idem-Reply-To", "results.bad");
    headers.insert("Trace", "t-1");
    let body = r#"{"intent_id":"bad","episode":"ep"}"#;
    js.publish_with_headers("intents.work", headers, body.into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    let letter = tokio::time::timeout(Duration::from_secs(10), dead.next())
        .await
        .expect("a dead letter within 10s")
        .expect("subscription");
    let letter_headers = letter.headers.clone().expect("headers");
    assert_eq!(
        letter_headers.get("Idem-Dead-Reason").map(|v| v.as_str()),
        Some("INVALID_INTENT")
    );
    assert_eq!(letter_headers.get("Trace").map(|v| v.as_str()), Some("t-1"));
    assert_eq!(&letter.payload[..], body.as_bytes());
    let reply = collect(&mut replies, 1, Duration::from_secs(5)).await;
    assert_eq!(reply.len(), 1);
    assert_eq!(reply[0]["result"]["data"]["code"], "INVALID_INTENT");

    // Past several ack waits: no redelivery, no second dead letter.
    let again = tokio::time::timeout(Duration::from_secs(3), dead.next()).await;
    assert!(again.is_err(), "the invalid intent was redelivered");
    until_drained(&js).await;
    assert_eq!(worker.stats.snapshot().received, 1);
    worker.stop().await;
}

#[tokio::test]
async fn an_intent_out_of_deliveries_is_answered_once_and_dead_lettered() {
    let config = js_config(|js| js.max_deliver = 2);
    let JsRig {
        server: _server,
        client,
        worker,
        js,
        mut replies,
        ..
    } = rig(config, Some("nobody.{capability}")).await;
    let mut dead = client
        .subscribe("idemq.dlq.INTENTS")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");

    publish(&js, &intent("orphan", "ok", json!(null))).await;
    let letter = tokio::time::timeout(Duration::from_secs(15), dead.next())
        .await
        .expect("a dead letter within 15s")
        .expect("subscription");
    let reason = letter
        .headers
        .as_ref()
        .and_then(|h| h.get("Idem-Dead-Reason"))
        .map(|v| v.as_str().to_owned());
    assert_eq!(reason.as_deref(), Some("max_deliver"));
    let seen = collect(&mut replies, 2, Duration::from_secs(3)).await;
    assert_eq!(
        seen.len(),
        1,
        "answered once, on the last delivery: {seen:?}"
    );
    assert_eq!(seen[0]["result"]["data"]["code"], "NO_HANDLER");
    assert_eq!(worker.stats.snapshot().received, 2);
    until_drained(&js).await;
    worker.stop().await;
}

/// A worker process in JetStream mode.
fn spawn_worker(url: &str, extra: &[&str]) -> WorkerProcess {
    let mut args = vec![
        "--stream",
        STREAM,
        "--durable",
        DURABLE,
        "--forward",
        FORWARD,
    ];
    args.extend(["--ack-wait", "2s", "--lease", "2s"]);
    args.extend(extra);
    WorkerProcess::serve(url, &args)
}

#[tokio::test]
async fn a_worker_killed_mid_run_loses_nothing_and_repeats_at_most_its_in_flight() {
    const INTENTS: usize = 500;
    const CONCURRENCY: u32 = 4;
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let url = server.url();
    let concurrency = CONCURRENCY.to_string();
    let args = ["--concurrency", concurrency.as_str()];
    let mut doomed = spawn_worker(&url, &args);
    let _steady = spawn_worker(&url, &args);
    wait_for_workers(&client, 2).await;
    let js = jetstream::new(client.clone());
    let mut replies = results(&client).await;

    for i in 0..INTENTS {
        publish(
            &js,
            &intent(&format!("crash-{i}"), "slow", json!({"sleep_ms": 20})),
        )
        .await;
    }
    let mut seen = collect(&mut replies, 100, Duration::from_secs(30)).await;
    doomed.signal("-KILL");
    doomed.wait(Duration::from_secs(5)).await;
    let _restarted = spawn_worker(&url, &args);
    seen.extend(collect(&mut replies, INTENTS * 2, Duration::from_secs(20)).await);

    let answered: HashSet<&str> = seen
        .iter()
        .map(|r| r["idem_key"].as_str().expect("key"))
        .collect();
    assert_eq!(answered.len(), INTENTS, "every intent answered");
    assert!(seen.iter().all(|r| r["result"]["status"] == "Success"));
    let executions = upstream.total() as usize;
    println!(
        "killed worker mid-run: {INTENTS} intents, {executions} executions ({} repeated; bound {CONCURRENCY})",
        executions - INTENTS
    );
    assert!(executions >= INTENTS);
    assert!(
        executions - INTENTS <= CONCURRENCY as usize,
        "repeats {:?}",
        upstream.duplicates()
    );
    until_drained(&js).await;
}

#[tokio::test]
async fn an_intent_whose_last_delivery_died_is_dead_lettered_whoever_else_pulls() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let url = server.url();
    let args = ["--max-deliver", "2"];
    let js = jetstream::new(client.clone());
    let mut dead = client
        .subscribe("idemq.dlq.INTENTS")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");

    // Two deliveries, each to a worker killed while its handler hangs.
    let mut worker = spawn_worker(&url, &args);
    wait_for_workers(&client, 1).await;
    publish(&js, &intent("dies", "slow", json!({"sleep_ms": 60_000}))).await;
    for delivery in 1..=2 {
        eventually(
            Duration::from_secs(10),
            format!("delivery {delivery} executing"),
            async || upstream.total() >= delivery,
        )
        .await;
        assert_eq!(upstream.total(), delivery, "delivery {delivery} executing");
        worker.signal("-KILL");
        worker.wait(Duration::from_secs(5)).await;
        if delivery == 1 {
            worker = spawn_worker(&url, &args);
        }
    }
    // While no worker runs, another client holds a pull on the durable (as
    // `nats consumer next` does): the server gives it what it has, or
    // reaches max deliveries with nobody listening for the advisory.
    let taken = consumer(&js)
        .await
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(4))
        .messages()
        .await
        .expect("a pull")
        .count()
        .await;
    println!("the other client's pull got {taken} message(s)");
    let _restarted = spawn_worker(&url, &args);
    let letter = tokio::time::timeout(Duration::from_secs(30), dead.next())
        .await
        .expect("dead-lettered within 30 s of a worker running again")
        .expect("subscription");
    let reason = letter
        .headers
        .as_ref()
        .and_then(|h| h.get("Idem-Dead-Reason"))
        .map(|v| v.as_str().to_owned());
    assert_eq!(reason.as_deref(), Some("max_deliver"));
    eventually(
        Duration::from_secs(10),
        "the intent left its stream",
        async || {
            let stream = js.get_stream(STREAM).await.expect("stream");
            stream.get_info().await.expect("info").state.messages == 0
        },
    )
    .await;
    assert_eq!(upstream.total(), 2, "never executed past --max-deliver");
}

#[tokio::test]
async fn a_message_stays_protected_while_its_answer_is_slow_to_be_kept() {
    let JsRig {
        server: _server,
        client: _client,
        upstream,
        worker,
        js,
        ..
    } = rig(
        js_config(|js| js.ack_wait = Duration::from_secs(1)),
        Some(FORWARD),
    )
    .await;
    // A results stream that refuses every reply: keeping the answer takes
    // the worker its whole bound (5 s), five ack waits.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "RESULTS".to_owned(),
        subjects: vec!["results.>".to_owned()],
        max_messages: 1,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .expect("results stream");
    js.publish("results.filler", "x".into())
        .await
        .expect("publish")
        .await
        .expect("the stream is full now");
    publish(&js, &intent("slow-to-keep", "ok", json!(1))).await;
    eventually(Duration::from_secs(5), "the intent executing", async || {
        upstream.total() == 1
    })
    .await;
    // Progress acks while it is answered: no redelivery within the bound.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        worker.stats.snapshot().received,
        1,
        "redelivered while its answer was being kept"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_nats_server_restart_mid_run_loses_no_intent() {
    let mut server = NatsServer::start();
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    // Replies land in a stream, so none is lost while clients reconnect;
    // Nats-Msg-Id keeps one per key.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "RESULTS".to_owned(),
        subjects: vec!["results.>".to_owned()],
        ..Default::default()
    })
    .await
    .expect("results stream");
    let url = server.url();
    // A small in-flight bound keeps the worker busy across the restart. An
    // upstream request lost in the restart ends in Timeout after 3s: an
    // answer too.
    let _worker = spawn_worker(&url, &["--concurrency", "4", "--handler-timeout", "3s"]);
    let _first_upstream = Upstream::start(&client).await;
    wait_for_workers(&client, 1).await;

    for i in 0..100 {
        publish(
            &js,
            &intent(&format!("restart-{i}"), "slow", json!({"sleep_ms": 20})),
        )
        .await;
    }
    server.restart();
    let client = server.connect().await;
    let _upstream = Upstream::start(&client).await;
    let js = jetstream::new(client.clone());
    for i in 100..200 {
        publish(
            &js,
            &intent(&format!("restart-{i}"), "slow", json!({"sleep_ms": 20})),
        )
        .await;
    }
    let results = js.get_stream("RESULTS").await.expect("results stream");
    let stored = eventually(Duration::from_secs(30), "200 replies stored", async || {
        let stored = results.get_info().await.expect("info").state.messages;
        (stored >= 200).then_some(stored)
    })
    .await;
    assert_eq!(stored, 200, "one reply per intent, none lost");
    until_drained(&js).await;
}

/// Polls (10 s at most) until `stream` holds `count` messages.
async fn until_stream_holds(js: &jetstream::Context, stream: &str, count: u64) {
    let handle = js.get_stream(stream).await.expect("stream");
    eventually(
        Duration::from_secs(10),
        format!("{stream} holding {count} messages"),
        async || handle.get_info().await.expect("stream info").state.messages >= count,
    )
    .await;
}

#[tokio::test]
async fn a_dead_letter_with_the_intents_stream_headers_is_kept_in_the_dead_letter_stream() {
    let JsRig {
        server: _server,
        worker,
        js,
        mut replies,
        ..
    } = rig(js_config(|_| {}), None).await;
    js.create_stream(jetstream::stream::Config {
        name: "DLQ".to_owned(),
        subjects: vec!["idemq.dlq.INTENTS".to_owned()],
        ..Default::default()
    })
    .await
    .expect("dead-letter stream");

    // Headers meant for the intents' stream: the dead-letter stream would
    // refuse the first and could drop the second as a duplicate.
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Expected-Stream", STREAM);
    headers.insert("Nats-Msg-Id", "agent-msg-1");
    headers.insert("Idem-Reply-To", "results.bad");
    let body = r#"{"intent_id":"bad","episode":"ep"}"#;
    js.publish_with_headers("intents.work", headers, body.into())
        .await
        .expect("publish")
        .await
        .expect("the intents stream takes it");

    let reply = collect(&mut replies, 1, Duration::from_secs(10)).await;
    assert_eq!(reply.len(), 1, "the invalid intent is answered");
    until_stream_holds(&js, "DLQ", 1).await;
    let letter = js
        .get_stream("DLQ")
        .await
        .expect("stream")
        .get_raw_message(1)
        .await
        .expect("the dead letter");
    let header = |name: &str| letter.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(
        header("Idem-Dead-Reason").as_deref(),
        Some("INVALID_INTENT")
    );
    assert_eq!(
        header("Idem-Original-Nats-Expected-Stream").as_deref(),
        Some(STREAM)
    );
    assert_eq!(
        header("Idem-Original-Nats-Msg-Id").as_deref(),
        Some("agent-msg-1")
    );
    assert_eq!(header("Nats-Expected-Stream"), None);
    assert_eq!(&letter.payload[..], body.as_bytes());
    until_drained(&js).await;
    assert_eq!(worker.stats.snapshot().dead_lettered, 1);
    worker.stop().await;
}

#[tokio::test]
async fn a_ttl_shorter_than_a_held_copy_still_answers_it_with_the_one_outcome() {
    let JsRig {
        server: _server,
        upstream,
        worker,
        js,
        mut replies,
        ..
    } = rig(js_config(|_| {}), Some(FORWARD)).await;
    // Outlives --wait (5 s): the second copy is held (nak'ed) and comes
    // back after the outcome's own ttl_secs would have run out.
    let mut body = intent("short-ttl", "slow", json!({"sleep_ms": 6000}));
    body["ttl_secs"] = json!(1);
    publish(&js, &body).await;
    publish(&js, &body).await;

    let seen = collect(&mut replies, 2, Duration::from_secs(30)).await;
    assert_eq!(seen.len(), 2, "both copies answered: {seen:?}");
    assert_eq!(upstream.total(), 1, "executed once");
    assert_eq!(seen[0]["result"], seen[1]["result"]);
    assert_eq!(seen[0]["stored_at"], seen[1]["stored_at"]);
    let fresh = seen.iter().filter(|r| r["replayed"] == false).count();
    assert_eq!(fresh, 1, "one execution's own answer, one replay");
    until_drained(&js).await;
    worker.stop().await;
}

/// Each worker's `executed` counter, by instance id, from `idemq stats --json`.
async fn executed_by_worker(url: &str) -> HashMap<String, u64> {
    let output = common::workers::run_idemq(
        &["stats", "--json", "--nats-url", url, "--timeout", "500ms"],
        &[("RUST_LOG", Some("error"))],
    )
    .await;
    assert!(output.status.success(), "idemq stats: {output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("stats JSON");
    report["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| {
            let id = w["id"].as_str().expect("id").to_owned();
            (id, w["stats"]["executed"].as_u64().expect("executed"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_every_worker_takes_work_again_within_seconds() {
    let mut server = NatsServer::start();
    let url = server.url();
    // Two of the three reach the server through fault proxies, so they can
    // be made to reconnect after the first: by then the first one's pull
    // request waits on the consumer.
    let late = [
        FaultProxy::before(&server).await,
        FaultProxy::before(&server).await,
    ];
    let args = ["--handler-timeout", "3s"];
    let _workers = [
        spawn_worker(&url, &args),
        spawn_worker(&late[0].url(), &args),
        spawn_worker(&late[1].url(), &args),
    ];
    let client = server.connect().await;
    let first_upstream = Upstream::start(&client).await;
    wait_for_workers(&client, 3).await;
    // Busy at the restart.
    let js = jetstream::new(client.clone());
    for i in 0..30 {
        let body = intent(&format!("before-{i}"), "slow", json!({"sleep_ms": 200}));
        publish(&js, &body).await;
    }
    drop((first_upstream, js, client));

    for proxy in &late {
        proxy.set(Direction::Up, Mode::Hold);
        proxy.set(Direction::Down, Mode::Hold);
    }
    server.restart();
    let client = server.connect().await;
    let _upstream = Upstream::start(&client).await;
    let js = jetstream::new(client.clone());
    wait_for_workers(&client, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for proxy in &late {
        proxy.set(Direction::Up, Mode::Pass);
        proxy.set(Direction::Down, Mode::Pass);
    }
    // All three have reconnected once they answer discovery again.
    wait_for_workers(&client, 3).await;
    let before = executed_by_worker(&url).await;
    assert_eq!(before.len(), 3);

    // A steady load for 5 s.
    for i in 0..100 {
        let body = intent(&format!("after-{i}"), "slow", json!({"sleep_ms": 50}));
        publish(&js, &body).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = executed_by_worker(&url).await;
    assert_eq!(after.len(), 3);
    for (id, executed) in &after {
        let earlier = before.get(id).copied().unwrap_or(0);
        assert!(
            *executed > earlier,
            "worker {id} took no work in the 5 s after its reconnect: {before:?} -> {after:?}"
        );
    }
}

/// Intents of the bounded-intake test, and their handler's time: longer
/// than the ack wait, which progress acks cover only once an intent runs.
const BOUNDED_INTENTS: usize = 24;
const BOUNDED_SLEEP_MS: u64 = 1500;

#[tokio::test]
async fn a_worker_pulls_no_more_intents_than_it_has_free_permits() {
    let concurrency = 8;
    let config = WorkerConfig {
        concurrency,
        ..js_config(|js| js.ack_wait = Duration::from_secs(1))
    };
    let JsRig {
        server: _server,
        client: _client,
        upstream,
        worker,
        js,
        mut replies,
    } = rig(config, Some(FORWARD)).await;
    for i in 0..BOUNDED_INTENTS {
        let body = intent(
            &format!("bounded-{i}"),
            "slow",
            json!({ "sleep_ms": BOUNDED_SLEEP_MS }),
        );
        publish(&js, &body).await;
    }
    // A message pulled beyond the eight that run waits in the client for
    // a running one to end (1.5 s), past its 1 s ack wait with no progress
    // ack, and the server delivers it again. Pulled only for a free
    // permit, each one runs, with progress acks, from its delivery on.
    let mut consumer = consumer(&js).await;
    // Until the first intents end (1.5 s after they start) no ack is on
    // its way, so the server's count of delivered-and-unacked messages is
    // exactly what the worker pulled: at most one per permit. (Later, an
    // ack and the next pull cross inside the server, and the count runs
    // ahead by the acks still queued there.)
    for _ in 0..100 {
        if upstream.total() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_wave = tokio::time::Instant::now() + Duration::from_millis(1200);
    let mut most_unacked = 0;
    while tokio::time::Instant::now() < first_wave {
        let info = consumer.info().await.expect("consumer info");
        most_unacked = most_unacked.max(info.num_ack_pending);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("at most {most_unacked} delivered and unacked at once (bound {concurrency})");
    assert!(
        most_unacked <= concurrency,
        "{most_unacked} pulled with {concurrency} permits"
    );
    let mut redelivered = 0;
    for _ in 0..200 {
        let info = consumer.info().await.expect("consumer info");
        redelivered = redelivered.max(info.num_redelivered);
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = collect(&mut replies, BOUNDED_INTENTS, Duration::from_secs(30)).await;
    assert_eq!(seen.len(), BOUNDED_INTENTS);
    assert_eq!(
        redelivered, 0,
        "no intent aged past its ack wait in a local queue"
    );
    assert_eq!(upstream.total() as usize, BOUNDED_INTENTS);
    worker.stop().await;
}

/// Pull requests (`CONSUMER.MSG.NEXT`) seen on `api` until `bound` passes.
async fn pull_requests(api: &mut Subscriber, bound: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + bound;
    let mut seen = 0;
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, api.next()).await {
        seen += 1;
    }
    seen
}

#[tokio::test]
async fn workers_that_can_be_given_nothing_do_not_spin_on_pulls() {
    // The consumer may have 2 messages out; each worker could run 8. With
    // 2 running and 3 waiting on the server, neither worker can be given
    // anything for as long as the 2 run. A no-wait pull is then answered
    // at once with nothing ("requests pending": the other worker's pull
    // already covers them); a waiting pull waits out its expiry. Either
    // way the workers must not pull again and again.
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let args = ["--max-ack-pending", "2", "--concurrency", "8"];
    let _workers = [
        spawn_worker(&server.url(), &args),
        spawn_worker(&server.url(), &args),
    ];
    wait_for_workers(&client, 2).await;
    let js = jetstream::new(client.clone());
    for i in 0..5 {
        let body = intent(&format!("held-{i}"), "slow", json!({"sleep_ms": 3000}));
        publish(&js, &body).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut api = client
        .subscribe(format!("$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{DURABLE}"))
        .await
        .expect("subscribe");
    let pulls = pull_requests(&mut api, Duration::from_secs(2)).await;
    println!("{pulls} pull requests in 2 s from two workers given nothing");
    // A pull that waits its 1 s expiry, or one answered at once followed
    // by a 250 ms pause: at most about 10 in 2 s. Spinning is thousands.
    assert!(pulls <= 40, "{pulls} pull requests in 2 s");
    eventually(
        Duration::from_secs(20),
        "every intent still runs",
        async || upstream.total() == 5,
    )
    .await;
}

/// Stream lookups (`STREAM.NAMES`, `STREAM.LIST`) seen on `api` until `bound` passes.
async fn stream_lookups(api: &mut Subscriber, bound: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + bound;
    let mut seen = 0;
    while let Ok(Some(request)) = tokio::time::timeout_at(deadline, api.next()).await {
        if request.subject.ends_with("STREAM.NAMES") || request.subject.ends_with("STREAM.LIST") {
            seen += 1;
        }
    }
    seen
}

#[tokio::test]
async fn replies_cost_no_stream_lookup_each_and_a_new_results_stream_is_noticed() {
    let JsRig {
        server: _server,
        client,
        upstream: _upstream,
        worker,
        js,
        mut replies,
    } = rig(js_config(|_| {}), None).await;
    let mut api = client
        .subscribe("$JS.API.STREAM.>")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    // Thirty intents, each answered on a subject of its own.
    for i in 0..30 {
        let mut body = intent(&format!("routed-{i}"), "echo", json!(i));
        body["reply_to"] = json!(format!("results.own.{i}"));
        publish(&js, &body).await;
    }
    let seen = collect(&mut replies, 30, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 30);
    let lookups = stream_lookups(&mut api, Duration::from_millis(300)).await;
    assert!(
        lookups <= 1,
        "{lookups} stream lookups for 30 replies: one per reply subject"
    );

    // A stream created now that captures replies: listed again at once,
    // and the next reply to it is kept there.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "LATE".to_owned(),
        subjects: vec!["results.late.>".to_owned()],
        ..Default::default()
    })
    .await
    .expect("results stream");
    let lookups = stream_lookups(&mut api, Duration::from_secs(3)).await;
    assert!(lookups >= 1, "the new stream was not listed");
    let mut body = intent("routed-late", "echo", json!("late"));
    body["reply_to"] = json!("results.late.1");
    publish(&js, &body).await;
    assert_eq!(
        collect(&mut replies, 1, Duration::from_secs(10))
            .await
            .len(),
        1
    );
    until_drained(&js).await;
    let mut late = js.get_stream("LATE").await.expect("stream");
    assert_eq!(late.info().await.expect("info").state.messages, 1);
    worker.stop().await;
}

#[tokio::test]
async fn progress_acks_keep_pace_with_a_backoff_shorter_than_the_ack_wait() {
    // With a back-off the server puts its first step (1 s) in the ack
    // wait's place (30 s here) and times each redelivery by its step: a
    // worker that sent progress acks by the ack wait alone (every 10 s)
    // would see an intent of 3 s delivered again while it runs.
    let config = js_config(|js| {
        js.ack_wait = Duration::from_secs(30);
        js.backoff = vec![Duration::from_secs(1), Duration::from_secs(5)];
    });
    let JsRig {
        server: _server,
        client: _client,
        upstream,
        worker,
        js,
        mut replies,
    } = rig(config, Some(FORWARD)).await;
    publish(
        &js,
        &intent("backoff-1", "slow", json!({ "sleep_ms": 3000 })),
    )
    .await;
    let seen = collect(&mut replies, 1, Duration::from_secs(30)).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["result"]["status"], "Success", "{}", seen[0]);
    // A redelivery mid-run would be answered too: wait past it.
    let more = collect(&mut replies, 1, Duration::from_secs(2)).await;
    assert!(more.is_empty(), "one answer only: {more:?}");
    let info = consumer(&js)
        .await
        .info()
        .await
        .expect("consumer info")
        .clone();
    assert_eq!(
        info.config.ack_wait,
        Duration::from_secs(1),
        "the server's rule"
    );
    assert_eq!(info.num_redelivered, 0, "delivered once");
    assert_eq!(upstream.total(), 1);
    worker.stop().await;
}

#[tokio::test]
async fn two_intent_streams_replying_into_one_results_stream_keep_each_others_answers() {
    let JsRig {
        server,
        client: _client,
        upstream: _upstream,
        worker,
        js,
        mut replies,
    } = rig(js_config(|_| {}), Some(FORWARD)).await;
    let orders = WorkerConfig {
        subjects: vec!["orders.>".to_owned()],
        delivery: Delivery::JetStream(JetStreamConfig::new("ORDERS", "order-workers")),
        ..test_config()
    };
    let second = start_worker(&server, orders, Some(FORWARD)).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "RESULTS".to_owned(),
        subjects: vec!["results.>".to_owned()],
        ..Default::default()
    })
    .await
    .expect("results stream");
    // An intent with no actor is refused on either stream; each refusal
    // is the first message of its stream (sequence 1 in both).
    let refused = r#"{"intent_id":"bad","episode":"ep"}"#;
    for subject in ["intents.work", "orders.work"] {
        let mut headers = HeaderMap::new();
        headers.insert("Idem-Reply-To", "results.out");
        js.publish_with_headers(subject, headers, refused.into())
            .await
            .expect("publish")
            .await
            .expect("stream ack");
    }
    let seen = collect(&mut replies, 2, Duration::from_secs(15)).await;
    assert_eq!(seen.len(), 2, "both refusals answered: {seen:?}");
    let mut stream = js.get_stream("RESULTS").await.expect("stream");
    assert_eq!(
        stream.info().await.expect("info").state.messages,
        2,
        "neither refusal was taken for a duplicate of the other"
    );
    second.stop().await;
    worker.stop().await;
}

//! Reply targets the caller must not choose (docs/contract.md v1.1, "Reply
//! targets"): the worker publishes replies with its own credentials, so an
//! intent naming `$KV.<bucket>.<key>`, a JetStream API subject or the
//! worker's own intent subjects as its reply target is refused before
//! anything runs, and nothing is ever published there.

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_nats::{Client, HeaderMap, Subscriber};
use bytes::Bytes;
use common::intents::intent_for;
use common::poll::eventually;
use common::upstream::{Upstream, FORWARD};
use common::workers::{request, start_worker, test_config, RunningWorker};
use common::NatsServer;
use futures::StreamExt;
use idemq::config::{Delivery, JetStreamConfig};
use serde_json::{json, Value};

/// An `ok` intent whose params are its id.
fn intent(id: &str) -> Value {
    intent_for(id, "ok", json!(id))
}

/// A stored outcome another intent's reply must never touch: its key's
/// subject and the record's bytes as stored.
struct Victim {
    subject: String,
    key: String,
    bytes: Bytes,
}

async fn victim(client: &Client) -> Victim {
    let (reply, _) = request(
        client,
        "intents.work",
        intent("victim").to_string(),
        HeaderMap::new(),
    )
    .await;
    assert_eq!(reply["result"]["status"], "Success", "{reply}");
    let key = reply["idem_key"].as_str().expect("key").to_owned();
    Victim {
        subject: format!("$KV.IDEMPOTENCY.{key}"),
        bytes: stored_bytes(client, &key).await,
        key,
    }
}

async fn stored_bytes(client: &Client, key: &str) -> Bytes {
    let bucket: kv::Store = jetstream::new(client.clone())
        .get_key_value("IDEMPOTENCY")
        .await
        .expect("bucket");
    bucket.get(key).await.expect("get").expect("stored")
}

async fn spy(client: &Client, subject: &str) -> Subscriber {
    let spy = client.subscribe(subject.to_owned()).await.expect("spy");
    client.flush().await.expect("flush");
    spy
}

/// Nothing arrives on `spy` within half a second.
async fn saw_nothing(spy: &mut Subscriber, what: &str) {
    if let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(500), spy.next()).await {
        panic!("{what} received {:?}", message.payload);
    }
}

fn invalid_naming(reply: &Value, subject: &str) {
    assert_eq!(reply["result"]["data"]["code"], "INVALID_INTENT", "{reply}");
    let message = reply["result"]["data"]["message"]
        .as_str()
        .expect("message");
    assert!(
        message.contains(subject),
        "the refusal names {subject}: {message}"
    );
}

/// A fresh intent still runs and is answered.
async fn still_serving(client: &Client) {
    let (reply, _) = request(
        client,
        "intents.work",
        intent("after").to_string(),
        HeaderMap::new(),
    )
    .await;
    assert_eq!(reply["result"]["status"], "Success", "{reply}");
}

async fn core_rig() -> (NatsServer, Client, Upstream, RunningWorker, Victim) {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let worker = start_worker(&server, test_config(), Some(FORWARD)).await;
    let victim = victim(&client).await;
    (server, client, upstream, worker, victim)
}

#[tokio::test]
async fn core_mode_refuses_every_carrier_of_a_hostile_reply_target() {
    let (_server, client, upstream, worker, victim) = core_rig().await;
    let mut on_victim = spy(&client, &victim.subject).await;
    let mut on_intents = spy(&client, "intents.loop").await;

    // 1. The message's own reply subject: no reply at all.
    client
        .publish_with_reply(
            "intents.work",
            victim.subject.clone(),
            intent("own").to_string().into(),
        )
        .await
        .expect("publish");
    // 2. Idem-Reply-To, on a request: refused, answered on the request's inbox.
    let mut headers = HeaderMap::new();
    headers.insert("Idem-Reply-To", victim.subject.as_str());
    let (reply, _) = request(
        &client,
        "intents.work",
        intent("header").to_string(),
        headers,
    )
    .await;
    invalid_naming(&reply, &victim.subject);
    // 3. The body's reply_to, and the worker's own intent subjects.
    for target in [
        victim.subject.as_str(),
        "intents.loop",
        "$JS.API.STREAM.DELETE.KV_IDEMPOTENCY",
    ] {
        let mut body = intent("body");
        body["reply_to"] = json!(target);
        let (reply, _) = request(&client, "intents.work", body.to_string(), HeaderMap::new()).await;
        invalid_naming(&reply, target);
    }
    // The same targets on messages with no reply subject: nothing anywhere.
    let mut body = intent("fire-and-forget");
    body["reply_to"] = json!(victim.subject);
    client
        .publish("intents.work", body.to_string().into())
        .await
        .expect("publish");
    client.flush().await.expect("flush");

    saw_nothing(&mut on_victim, "the victim's key subject").await;
    saw_nothing(&mut on_intents, "the worker's own intent subject").await;
    assert_eq!(
        stored_bytes(&client, &victim.key).await,
        victim.bytes,
        "the victim record is byte-identical"
    );
    assert_eq!(upstream.total(), 1, "only the victim ever executed");
    assert_eq!(
        worker.stats.snapshot().invalid,
        6,
        "every refusal counted as invalid"
    );
    // Still serving.
    still_serving(&client).await;
    worker.stop().await;
}

#[tokio::test]
async fn reply_allow_narrows_where_replies_may_go() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let _upstream = Upstream::start(&client).await;
    let config = idemq::WorkerConfig {
        reply_allow: vec!["results.>".to_owned()],
        ..test_config()
    };
    let worker = start_worker(&server, config, Some(FORWARD)).await;
    let mut allowed = spy(&client, "results.ok").await;
    let mut elsewhere = spy(&client, "exec.elsewhere").await;
    for (id, target) in [("out", "exec.elsewhere"), ("in", "results.ok")] {
        let mut body = intent(id);
        body["reply_to"] = json!(target);
        client
            .publish("intents.work", body.to_string().into())
            .await
            .expect("publish");
    }
    client.flush().await.expect("flush");
    let answer = tokio::time::timeout(Duration::from_secs(10), allowed.next())
        .await
        .expect("an answer on the allowed subject")
        .expect("subscription");
    let answer: Value = serde_json::from_slice(&answer.payload).expect("JSON");
    assert_eq!(answer["intent_id"], "in");
    assert_eq!(answer["result"]["status"], "Success");
    saw_nothing(&mut elsewhere, "a subject outside --reply-allow").await;
    assert_eq!(worker.stats.snapshot().invalid, 1);
    worker.stop().await;
}

#[tokio::test]
async fn jetstream_mode_dead_letters_a_hostile_reply_target_and_never_answers_it() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let config = idemq::WorkerConfig {
        delivery: Delivery::JetStream(JetStreamConfig::new("INTENTS", "workers")),
        ..test_config()
    };
    let worker = start_worker(&server, config, Some(FORWARD)).await;
    let js = jetstream::new(client.clone());
    let mut results = spy(&client, "results.>").await;
    let mut body = intent("victim");
    body["reply_to"] = json!("results.victim");
    js.publish("intents.work", body.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let answer = tokio::time::timeout(Duration::from_secs(10), results.next())
        .await
        .expect("the victim answered")
        .expect("subscription");
    let answer: Value = serde_json::from_slice(&answer.payload).expect("JSON");
    let key = answer["idem_key"].as_str().expect("key").to_owned();
    let victim = Victim {
        subject: format!("$KV.IDEMPOTENCY.{key}"),
        bytes: stored_bytes(&client, &key).await,
        key,
    };
    let mut on_victim = spy(&client, &victim.subject).await;
    let mut dead = spy(&client, "idemq.dlq.INTENTS").await;

    let mut headers = HeaderMap::new();
    headers.insert("Idem-Reply-To", victim.subject.as_str());
    js.publish_with_headers("intents.work", headers, intent("header").to_string().into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let mut body = intent("body");
    body["reply_to"] = json!(victim.subject);
    js.publish("intents.work", body.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    for _ in 0..2 {
        let letter = tokio::time::timeout(Duration::from_secs(10), dead.next())
            .await
            .expect("a dead letter")
            .expect("subscription");
        let reason = letter
            .headers
            .as_ref()
            .and_then(|h| h.get("Idem-Dead-Reason"));
        assert_eq!(reason.map(|v| v.as_str()), Some("INVALID_INTENT"));
    }
    saw_nothing(&mut on_victim, "the victim's key subject").await;
    saw_nothing(&mut results, "the results subjects").await;
    assert_eq!(
        stored_bytes(&client, &victim.key).await,
        victim.bytes,
        "the victim record is byte-identical"
    );
    assert_eq!(upstream.total(), 1, "only the victim ever executed");
    assert_eq!(worker.stats.snapshot().invalid, 2);
    worker.stop().await;
}

#[tokio::test]
async fn the_workers_own_subjects_are_refused_as_reply_targets_by_every_carrier() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    // Inboxes of the worker's own, as `idemq serve` gives it.
    let worker_client = async_nats::ConnectOptions::new()
        .custom_inbox_prefix("_INBOX_worker")
        .connect(server.url())
        .await
        .expect("connect");
    let worker =
        common::workers::start_worker_on(worker_client, test_config(), Some(FORWARD)).await;
    // What the worker publishes to on its own behalf (docs/contract.md v1.2 §2):
    // the --forward subjects, purge notices, dead letters, status
    // endpoints, and its own inboxes.
    let targets = [
        "exec.charge",
        "idemq.purge.IDEMPOTENCY",
        "idemq.dlq.INTENTS",
        "idemq.status.someone",
        "_INBOX_worker.abc.1",
    ];
    let mut spies = Vec::new();
    for target in targets {
        spies.push((target, spy(&client, target).await));
    }
    for (n, target) in targets.into_iter().enumerate() {
        // 1. The request's own reply subject: no reply at all.
        client
            .publish_with_reply(
                "intents.work",
                target.to_owned(),
                intent(&format!("own-{n}")).to_string().into(),
            )
            .await
            .expect("publish");
        // 2. Idem-Reply-To, and 3. the body's reply_to: refused, answered
        // on the request's inbox, naming the target.
        let mut headers = HeaderMap::new();
        headers.insert("Idem-Reply-To", target);
        let body = intent(&format!("header-{n}")).to_string();
        let (reply, _) = request(&client, "intents.work", body, headers).await;
        invalid_naming(&reply, target);
        let mut body = intent(&format!("body-{n}"));
        body["reply_to"] = json!(target);
        let (reply, _) = request(&client, "intents.work", body.to_string(), HeaderMap::new()).await;
        invalid_naming(&reply, target);
    }
    client.flush().await.expect("flush");
    for (target, spy) in &mut spies {
        saw_nothing(spy, target).await;
    }
    assert_eq!(upstream.total(), 0, "nothing executed");
    assert_eq!(
        worker.stats.snapshot().invalid,
        15,
        "every refusal counted as invalid"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_reply_target_too_long_for_the_server_is_refused_and_the_worker_stays_connected() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let worker_client = server.connect().await;
    let worker =
        common::workers::start_worker_on(worker_client.clone(), test_config(), Some(FORWARD)).await;
    // Longer than the server's max_control_line (4 KiB by default): the
    // server cuts off a client that publishes to it, with everything in
    // flight on its connection (docs/contract.md v1.2, "Reply targets").
    let target = format!("results.{}", "x".repeat(5000));
    // 1. Idem-Reply-To on a message with no reply subject of its own:
    // where the reply would go.
    let mut headers = HeaderMap::new();
    headers.insert("Idem-Reply-To", target.as_str());
    client
        .publish_with_headers(
            "intents.work",
            headers,
            intent("long-header").to_string().into(),
        )
        .await
        .expect("publish");
    // 2. The body's reply_to, on a request: refused, answered on the
    // request's inbox, named by its start and length.
    let mut body = intent("long-body");
    body["reply_to"] = json!(target);
    let (reply, _) = request(&client, "intents.work", body.to_string(), HeaderMap::new()).await;
    invalid_naming(&reply, "(5008 bytes)");
    eventually(
        Duration::from_secs(10),
        "both refusals counted",
        async || (worker.stats.snapshot().invalid == 2).then_some(()),
    )
    .await;
    still_serving(&client).await;
    assert_eq!(
        upstream.total(),
        1,
        "only the intent with a fit reply target ran"
    );
    assert_eq!(
        worker_client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the server never cut the worker off"
    );
    worker.stop().await;
}

//! idemq on a 3-node JetStream cluster (bucket and stream at R3): a node
//! dies mid-run, and every intent is still answered and executed once.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::cluster::NatsCluster;
use common::upstream::{Upstream, FORWARD};
use common::workers::{request_within, stream_replies, wait_for_workers, WorkerProcess};
use serde_json::{json, Value};

const INTENTS: usize = 200;

async fn leader(js: &jetstream::Context, stream: &str) -> Option<String> {
    let mut stream = js.get_stream(stream).await.ok()?;
    let info = stream.info().await.ok()?;
    info.cluster.as_ref().and_then(|c| c.leader.clone())
}

/// Publishes into the stream, retrying (bounded) while a leader is elected.
async fn publish_with_retry(js: &jetstream::Context, body: String) {
    for _ in 0..100 {
        if let Ok(ack) = js.publish("intents.work", body.clone().into()).await {
            if ack.await.is_ok() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the stream did not accept an intent within ~20s");
}

#[tokio::test]
async fn a_node_lost_mid_run_loses_no_intent_and_repeats_none() {
    let mut cluster = NatsCluster::start(3);
    // The test's own connections stay on node 0; a node other than 0 dies.
    let client = cluster.connect_to(0).await;
    let js = jetstream::new(client.clone());
    let upstream = Upstream::start(&client).await;
    js.create_stream(jetstream::stream::Config {
        name: "RESULTS".to_owned(),
        subjects: vec!["results.>".to_owned()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .expect("results stream");
    let urls = cluster.urls();
    let args = [
        "--replicas",
        "3",
        "--stream",
        "INTENTS",
        "--durable",
        "workers",
        "--forward",
        FORWARD,
        "--concurrency",
        "8",
        "--handler-timeout",
        "5s",
        "--ack-wait",
        "5s",
    ];
    let spawn = || WorkerProcess::serve(&urls, &args);
    let _workers = [spawn(), spawn()];
    wait_for_workers(&client, 2).await;

    for name in ["KV_IDEMPOTENCY", "INTENTS"] {
        let mut stream = js.get_stream(name).await.expect("stream");
        let replicas = stream.info().await.expect("info").config.num_replicas;
        assert_eq!(replicas, 3, "{name} is R3");
    }
    let victim = match leader(&js, "KV_IDEMPOTENCY")
        .await
        .and_then(|l| cluster.index_of(&l))
    {
        Some(i) if i != 0 => i,
        _ => 2,
    };

    for i in 0..INTENTS {
        let body = json!({
            "intent_id": format!("c-{i}"), "actor": "agent", "episode": "ep",
            "capability": "slow", "params": {"sleep_ms": 20}, "reply_to": "results.out",
        });
        publish_with_retry(&js, body.to_string()).await;
        if i == INTENTS / 4 {
            cluster.kill(victim);
        }
    }

    let mut answered = 0;
    for _ in 0..300 {
        // JetStream API calls may time out while leaders move: keep asking.
        if let Ok(mut results) = js.get_stream("RESULTS").await {
            answered = results.info().await.map_or(answered, |i| i.state.messages);
        }
        if answered >= INTENTS as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(answered, INTENTS as u64, "every intent answered once");
    let replies = stream_replies(&js, "RESULTS").await;
    let mut keys = std::collections::HashSet::new();
    let mut timeouts = 0;
    for reply in &replies {
        let key = reply["idem_key"].as_str().expect("a key").to_owned();
        let executions = upstream.executions(&key);
        match reply["result"]["status"].as_str() {
            Some("Success") => assert_eq!(executions, 1, "{key}: answered Success"),
            // A forward request in flight on a worker's connection to the
            // node that died, or its answer, was lost with it: no answer
            // within --handler-timeout is stored as `Timeout` (PROTOCOL
            // §3), whether or not the upstream ran.
            Some("Timeout") => {
                timeouts += 1;
                assert!(executions <= 1, "{key}: {executions} executions");
            }
            _ => panic!("{key}: unexpected answer {reply}"),
        }
        keys.insert(key);
    }
    println!(
        "3-node cluster, node {victim} killed: {answered} answered ({timeouts} Timeout), {} executions",
        upstream.total()
    );
    assert_eq!(keys.len(), INTENTS, "one reply per intent");
    assert!(upstream.duplicates().is_empty());
    assert!(
        upstream.total() as usize >= INTENTS - timeouts,
        "every intent answered Success was executed"
    );
}

/// Keys and concurrent copies per key of the core-mode storm.
const STORM_KEYS: usize = 50;
const STORM_COPIES: usize = 10;
/// How long a storm copy waits for its reply: the workers' `--wait` (20 s)
/// and the execution's store round trips on a starved cluster.
const STORM_REPLY: Duration = Duration::from_secs(45);

#[tokio::test]
async fn a_core_storm_on_an_r3_bucket_answers_every_copy_with_the_stored_outcome() {
    let cluster = NatsCluster::start(3);
    let client = cluster.connect_to(0).await;
    let upstream = Upstream::start(&client).await;
    // Two workers whose first server differs, as a user scaling out would
    // run them: their writes reach the stream leader through different nodes.
    let urls = |first: usize| {
        let mut order: Vec<String> = (0..3).map(|i| cluster.url((first + i) % 3)).collect();
        order.dedup();
        order.join(",")
    };
    // Each worker holds as many copies as it may be sent (all 500) in
    // flight: a burst past its bound and buffer is dropped by design in
    // core mode (the senders would retry), which this test is not about.
    let args = [
        "--replicas",
        "3",
        "--forward",
        FORWARD,
        "--wait",
        "20s",
        "--concurrency",
        "512",
    ];
    let _workers = [
        WorkerProcess::serve(&urls(0), &args),
        WorkerProcess::serve(&urls(1), &args),
    ];
    wait_for_workers(&client, 2).await;

    let mut copies = Vec::new();
    for k in 0..STORM_KEYS {
        let body = json!({
            "intent_id": format!("storm-{k}"), "actor": "agent", "episode": "r3",
            "capability": "slow", "params": {"sleep_ms": 200, "k": k},
        })
        .to_string();
        for _ in 0..STORM_COPIES {
            let (client, body) = (client.clone(), body.clone());
            copies.push(tokio::spawn(async move {
                // Longer than the workers' --wait: a copy may wait that
                // long for the execution before it is answered.
                let (reply, _) = request_within(
                    &client,
                    "intents.work",
                    body,
                    Default::default(),
                    STORM_REPLY,
                )
                .await;
                (k, reply)
            }));
        }
    }
    let mut by_key: Vec<Vec<Value>> = vec![Vec::new(); STORM_KEYS];
    for copy in copies {
        let (k, reply) = copy.await.expect("copy task");
        by_key[k].push(reply);
    }

    let unavailable: Vec<&Value> = by_key
        .iter()
        .flatten()
        .filter(|r| r["result"]["status"] == "Error")
        .collect();
    assert!(
        unavailable.is_empty(),
        "{} of {} copies were refused, e.g. {}",
        unavailable.len(),
        STORM_KEYS * STORM_COPIES,
        unavailable[0]
    );
    for (k, replies) in by_key.iter().enumerate() {
        let fresh = replies.iter().filter(|r| r["replayed"] == false).count();
        assert_eq!(fresh, 1, "key {k}: exactly one copy is the execution's own");
        let first = &replies[0];
        for reply in replies {
            assert_eq!(reply["result"], first["result"], "key {k}: one outcome");
            assert_eq!(
                reply["stored_at"], first["stored_at"],
                "key {k}: one record"
            );
            assert!(reply["stored_at"].is_string(), "key {k}: stored: {reply}");
        }
    }
    assert_eq!(
        upstream.total() as usize,
        STORM_KEYS,
        "each key executed once"
    );
    assert!(upstream.duplicates().is_empty());
}

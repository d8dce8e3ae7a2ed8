//! idemq on a 3-node JetStream cluster (bucket and stream at R3): a node
//! dies mid-run, and every intent is still answered and executed once; a
//! follower applies writes late while it answers direct gets, and no copy
//! that waits for a running execution makes the key run twice.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::cluster::{Lagged, LaggingCluster, NatsCluster, StaleReads};
use common::intents::{intent_for, key_of};
use common::poll::eventually;
use common::upstream::{Upstream, FORWARD};
use common::workers::{
    publish_acked, request_within, stream_replies, wait_for_workers, WorkerProcess,
};
use serde_json::{json, Value};

const INTENTS: usize = 200;

/// Publishes into the stream, retrying (20 s at most) while a leader is elected.
async fn publish_with_retry(js: &jetstream::Context, body: String) {
    publish_acked(js, "intents.work", body.into(), Duration::from_secs(20)).await;
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
    let victim = match NatsCluster::leader_of(&js, "KV_IDEMPOTENCY")
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

    let answered = eventually(
        Duration::from_secs(60),
        "every intent answered",
        async || {
            // JetStream API calls may time out while leaders move: keep asking.
            let mut results = js.get_stream("RESULTS").await.map_err(|e| e.to_string())?;
            let answered = results
                .info()
                .await
                .map_err(|e| e.to_string())?
                .state
                .messages;
            if answered >= INTENTS as u64 {
                Ok(answered)
            } else {
                Err(format!("{answered} of {INTENTS} answered"))
            }
        },
    )
    .await;
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

/// How late the lagging follower (`n3`) applies the bucket's writes.
const FOLLOWER_LAG: Duration = Duration::from_millis(500);
/// Keys, one after another, and concurrent copies of each.
const LAG_KEYS: usize = 80;
const LAG_COPIES: usize = 10;
/// How long a copy waits for its reply (the workers' `--wait` is 5 s).
const LAG_REPLY: Duration = Duration::from_secs(20);
/// Writes and direct gets of each check of the fixture.
const PROBE_WRITES: usize = 3;
const PROBE_READS: usize = 20;
/// Bound on the fixture starting to answer stale: a follower subscribes to
/// direct gets up to 2 s after it is current.
const PROBE_PATIENCE: Duration = Duration::from_secs(10);

/// Checks the fixture until it answers a direct get stale, within
/// [`PROBE_PATIENCE`]; returns the last check.
async fn probe_until_stale(js: &jetstream::Context, bucket: &str) -> StaleReads {
    let deadline = tokio::time::Instant::now() + PROBE_PATIENCE;
    loop {
        let seen =
            LaggingCluster::probe_stale_reads(js, bucket, PROBE_WRITES, PROBE_READS, FOLLOWER_LAG)
                .await;
        if seen.stale > 0 || tokio::time::Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One copy of an intent as a core request; the reply JSON, or why none.
async fn send_copy(client: &async_nats::Client, body: String) -> Result<Value, String> {
    let request = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(LAG_REPLY));
    let reply = client
        .send_request("intents.x".to_owned(), request)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&reply.payload).map_err(|e| format!("reply is not JSON: {e}"))
}

/// A follower of the R3 bucket (`n3`) applies every write `FOLLOWER_LAG`
/// late but still answers direct gets at once from what it applied (only
/// the replication route to it is lagged), so a third of the reads or more
/// are stale: a key's claim is missing there for a while after the leader
/// acknowledged it, and then its outcome. Keys run one at a time with a fast
/// handler; of each key's copies, the ones on the workers that do not run
/// it wait in the store for the execution (claim lost, read, watch), and
/// their reads land on the lagging follower now and then. The contract
/// holds all the same: each key runs once, and every copy is answered
/// with the one stored outcome, exactly one as the execution's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_follower_never_makes_a_waiting_copy_run_a_key_twice() {
    use idemq::store::kv::{BucketConfig, KvStore, DEFAULT_BUCKET};

    let started = std::time::Instant::now();
    let cluster = LaggingCluster::start().await;
    // The test's connections stay on n1, the workers' on n1 and n2: their
    // writes are acknowledged over the healthy routes, while their direct
    // gets go to any replica, n3 among them.
    let client = cluster.connect_to(0).await;
    let js = jetstream::new(client.clone());
    let upstream = Upstream::start(&client).await;
    // The bucket exactly as a worker creates it, made here first so that
    // its leader is settled (not n3) and n3 is caught up before the lag.
    let bucket = BucketConfig {
        bucket: DEFAULT_BUCKET.to_owned(),
        replicas: 3,
    };
    KvStore::open(js.clone(), &bucket)
        .await
        .expect("create the R3 bucket");
    let stream = format!("KV_{DEFAULT_BUCKET}");
    let leader = cluster.keep_leader_off_lagging(&js, &stream).await;
    cluster.wait_lagging_current(&js, &stream).await;

    let urls = format!("{},{}", cluster.url(0), cluster.url(1));
    let args = [
        "--replicas",
        "3",
        "--forward",
        FORWARD,
        "--wait",
        "5s",
        "--lease",
        "5s",
    ];
    let _workers = [
        WorkerProcess::serve(&urls, &args),
        WorkerProcess::serve(&urls, &args),
        WorkerProcess::serve(&urls, &args),
    ];
    wait_for_workers(&client, 3).await;

    // The control: without the lag, the healthy follower and n3 alike
    // have applied a write by the time its next write is acknowledged.
    let unlagged = LaggingCluster::probe_stale_reads(
        &js,
        DEFAULT_BUCKET,
        PROBE_WRITES,
        PROBE_READS,
        FOLLOWER_LAG,
    )
    .await;
    let lagged = cluster.lag(Lagged::Replication, FOLLOWER_LAG);
    assert_eq!(
        lagged, 2,
        "one system-account route from n1 and one from n2 to n3 are lagged"
    );
    let before = probe_until_stale(&js, DEFAULT_BUCKET).await;
    println!(
        "lagging follower: {} routes to n3, all through the proxy; {stream} leader {leader}; \
         without lag: {unlagged}; replication to n3 {FOLLOWER_LAG:?} late: {before}",
        cluster.lagging_routes().await
    );
    assert!(before.stale > 0, "the fixture answers stale: {before}");

    let keys_started = std::time::Instant::now();
    let mut by_key: Vec<(String, Vec<Result<Value, String>>)> = Vec::new();
    for k in 0..LAG_KEYS {
        let intent_id = format!("lag-{k}");
        let key = idemq::IdempotencyKey::from_intent_metadata(&intent_id, "agent", "lagging", None);
        let body = json!({
            "intent_id": intent_id, "actor": "agent", "episode": "lagging",
            "capability": "ok", "params": {"k": k},
        })
        .to_string();
        let copies = (0..LAG_COPIES).map(|_| send_copy(&client, body.clone()));
        by_key.push((
            key.as_str().to_owned(),
            futures::future::join_all(copies).await,
        ));
    }
    let keys_took = keys_started.elapsed();
    let after = LaggingCluster::probe_stale_reads(
        &js,
        DEFAULT_BUCKET,
        PROBE_WRITES,
        PROBE_READS,
        FOLLOWER_LAG,
    )
    .await;
    let leader_after = NatsCluster::leader_of(&js, &stream).await;

    let mut violations = Vec::new();
    let (mut replies, mut fresh_total, mut replays, mut in_progress, mut lost) = (0, 0, 0, 0, 0);
    for (k, (key, copies)) in by_key.iter().enumerate() {
        let executions = upstream.executions(key);
        if executions != 1 {
            violations.push(format!("key {k}: executed {executions} times"));
        }
        let answered: Vec<&Value> = copies.iter().filter_map(|c| c.as_ref().ok()).collect();
        lost += copies.len() - answered.len();
        for error in copies.iter().filter_map(|c| c.as_ref().err()) {
            violations.push(format!("key {k}: a copy got no reply: {error}"));
        }
        replies += answered.len();
        let fresh = answered.iter().filter(|r| r["replayed"] == false).count();
        fresh_total += fresh;
        replays += answered.iter().filter(|r| r["replayed"] == true).count();
        let busy = answered
            .iter()
            .filter(|r| r["result"]["data"]["code"] == "IN_PROGRESS")
            .count();
        in_progress += busy;
        if busy > 0 {
            violations.push(format!("key {k}: {busy} copies answered IN_PROGRESS"));
        }
        if fresh != 1 {
            violations.push(format!(
                "key {k}: {fresh} copies answered as the execution's own (replayed: false)"
            ));
        }
        if let Some(first) = answered.first() {
            for reply in &answered {
                if reply["result"] != first["result"] || reply["stored_at"] != first["stored_at"] {
                    violations.push(format!(
                        "key {k}: two outcomes: {} stored at {} and {} stored at {}",
                        first["result"], first["stored_at"], reply["result"], reply["stored_at"]
                    ));
                    break;
                }
            }
            if !first["stored_at"].is_string() {
                violations.push(format!("key {k}: not a stored outcome: {first}"));
            }
        }
    }
    let broken_keys = {
        let mut keys: Vec<&str> = violations
            .iter()
            .filter_map(|v| v.split(':').next())
            .collect();
        keys.dedup();
        keys.len()
    };
    println!(
        "{LAG_KEYS} keys x {LAG_COPIES} copies in {keys_took:?}: {replies} replies ({lost} lost), \
         {} executions, {fresh_total} as the execution's own, {replays} replayed, \
         {in_progress} IN_PROGRESS; {broken_keys} keys broke the contract; \
         leader after: {leader_after:?}; after: {after}; whole test {:?}",
        upstream.total(),
        started.elapsed()
    );
    assert!(
        violations.is_empty(),
        "{broken_keys} of {LAG_KEYS} keys broke the contract with n3 {FOLLOWER_LAG:?} behind:\n{}",
        violations
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        upstream.total() as usize,
        LAG_KEYS,
        "each key executed once"
    );
}

/// A worker that starts while its cluster has no quorum (two of three
/// nodes down: no meta leader, the R3 bucket and stream cannot be made)
/// keeps trying its start-up calls, and takes intents once the nodes are
/// back, instead of exiting with "jetstream request timed out".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_its_cluster_has_quorum_waits_for_it() {
    let mut cluster = NatsCluster::start(3);
    cluster.kill(1);
    cluster.kill(2);
    // In a cell: the wait below says whether it exited.
    let worker = std::cell::RefCell::new(WorkerProcess::serve(
        &cluster.url(0),
        &[
            "--replicas",
            "3",
            "--stream",
            "INTENTS",
            "--durable",
            "workers",
        ],
    ));
    // Longer than the client's request timeout (5 s): the old worker gave
    // up and exited by now.
    tokio::time::sleep(Duration::from_secs(8)).await;
    cluster.restart(1);
    cluster.restart(2);
    let client = cluster.connect_to(0).await;
    // Room for sixty looks, each a 200 ms ping and a 500 ms pause.
    eventually(
        Duration::from_secs(42),
        "the worker taking intents once the cluster is back",
        async || {
            if common::workers::ping(&client).await.is_empty() {
                Err(format!("exited: {:?}", worker.borrow_mut().try_wait()))
            } else {
                Ok(())
            }
        },
    )
    .await;
    let js = jetstream::new(client.clone());
    let mut replies = client.subscribe("results.quorum").await.expect("subscribe");
    client.flush().await.expect("flush");
    let body = json!({
        "intent_id": "after-quorum", "actor": "agent", "episode": "ep",
        "capability": "echo", "params": 1, "reply_to": "results.quorum",
    });
    publish_with_retry(&js, body.to_string()).await;
    let reply = tokio::time::timeout(Duration::from_secs(20), {
        use futures::StreamExt;
        replies.next()
    })
    .await
    .expect("answered within 20 s")
    .expect("subscribed");
    let reply: Value = serde_json::from_slice(&reply.payload).expect("JSON");
    assert_eq!(reply["result"]["status"], "Success", "{reply}");
}

/// Keys whose copy waits in the store of an R3 bucket.
const WAITED_KEYS: usize = 20;

#[tokio::test]
async fn a_copy_waiting_on_an_r3_bucket_is_answered_once_the_outcome_is_stored() {
    let cluster = NatsCluster::start(3);
    let client = cluster.connect_to(0).await;
    let bucket = jetstream::new(client.clone());
    let upstream = Upstream::start(&client).await;
    // Two workers on subjects of their own, so that each copy waits in the
    // store (wake-ups and reads), not on the other worker's in-flight map.
    // A copy is sent once the key is claimed and waits 1.9 s for an
    // execution of 0.4 s. The outcome's wake-up reaches it before the
    // stream's leader has the outcome (a quorum must commit it first): a
    // follower that took the read before the commit for the answer would
    // look next at its poll (2 s), past --wait, and answer IN_PROGRESS.
    let serve = |subject: &str, first: usize| {
        let urls = format!("{},{}", cluster.url(first), cluster.url((first + 1) % 3));
        WorkerProcess::serve(
            &urls,
            &[
                "--replicas",
                "3",
                "--forward",
                FORWARD,
                "--wait",
                "1900ms",
                "--subject",
                subject,
            ],
        )
    };
    let _workers = [serve("intents.a.>", 0), serve("intents.b.>", 1)];
    wait_for_workers(&client, 2).await;
    let kv = eventually(Duration::from_secs(20), "the R3 bucket", async || {
        bucket.get_key_value("IDEMPOTENCY").await
    })
    .await;
    let mut answers = Vec::new();
    for k in 0..WAITED_KEYS {
        let id = format!("waited-{k}");
        let body = intent_for(&id, "slow", json!({"sleep_ms": 400})).to_string();
        let first = tokio::spawn({
            let (client, body) = (client.clone(), body.clone());
            async move {
                request_within(
                    &client,
                    "intents.a.slow",
                    body,
                    Default::default(),
                    STORM_REPLY,
                )
                .await
            }
        });
        let key = key_of(&id);
        eventually(
            Duration::from_secs(20),
            format!("{key} claimed"),
            async || kv.entry(&key).await.ok().flatten().map(drop),
        )
        .await;
        let (copy, _) = request_within(
            &client,
            "intents.b.slow",
            body,
            Default::default(),
            STORM_REPLY,
        )
        .await;
        let (first, _) = first.await.expect("the first request");
        answers.push((k, first, copy));
    }
    let in_progress = answers
        .iter()
        .filter(|(_, _, copy)| copy["result"]["data"]["code"] == "IN_PROGRESS")
        .count();
    println!("{in_progress} of {WAITED_KEYS} copies answered IN_PROGRESS");
    for (k, first, copy) in &answers {
        assert_eq!(first["replayed"], false, "key {k}: {first}");
        assert_eq!(copy["replayed"], true, "key {k}: {copy}");
        assert_eq!(copy["result"], first["result"], "key {k}");
    }
    assert_eq!(upstream.total() as usize, WAITED_KEYS);
}

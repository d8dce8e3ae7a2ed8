//! The `idemq` binary as operators run it: crash takeover, SIGTERM with an
//! intent in flight, a nats-server restart under a running worker, and the
//! command line's outputs and exit statuses.

mod common;

use std::process::Output;
use std::time::Duration;

use common::intents::{intent, intent_for, key_of};
use common::poll::eventually;
use common::upstream::{Upstream, FORWARD};
use common::workers::{
    run_idemq, send, start_worker, test_config, wait_for_workers, WorkerProcess,
};
use common::NatsServer;
use futures::StreamExt;
use serde_json::{json, Value};

/// Runs the CLI without blocking the test's runtime (in-process workers
/// share it).
async fn idemq(args: &[&str]) -> Output {
    run_idemq(args, &[("NATS_URL", None), ("RUST_LOG", Some("off"))]).await
}

#[tokio::test]
async fn a_killed_worker_is_taken_over_after_its_lease() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    // The lease outlives the restart below, so the retry finds the dead
    // worker's claim still held and must wait it out.
    let mut first = WorkerProcess::serve(&server.url(), &["--forward", FORWARD, "--lease", "4s"]);
    wait_for_workers(&client, 1).await;

    // The first attempt hangs in the upstream; the worker dies mid-execution.
    let body = intent("crash", json!({"sleep_ms": 30000, "first_only": true}));
    let pending = {
        let client = client.clone();
        let body = body.to_string();
        tokio::spawn(async move {
            let request = async_nats::Request::new()
                .payload(body.into())
                .timeout(Some(Duration::from_secs(2)));
            client.send_request("intents.slow", request).await
        })
    };
    eventually(
        Duration::from_secs(5),
        "first attempt started",
        async || upstream.executions(&key_of("crash")) == 1,
    )
    .await;
    first.signal("-KILL");
    first.wait(Duration::from_secs(5)).await;

    // The client retries; a surviving worker waits out the lease and takes over.
    let config = idemq::WorkerConfig {
        lease: Duration::from_secs(4),
        wait: Duration::from_secs(8),
        ..test_config()
    };
    let second = start_worker(&server, config, Some(FORWARD)).await;
    let reply = send(&client, "intents.slow", &body).await;
    assert_eq!(reply["result"]["status"], "Success", "{reply}");
    assert_eq!(reply["replayed"], false);
    assert_eq!(upstream.attempts(&key_of("crash")), vec![1, 2]);
    assert_eq!(second.stats.snapshot().takeovers, 1);
    let again = send(&client, "intents.slow", &body).await;
    assert_eq!(again["replayed"], true);
    assert_eq!(upstream.executions(&key_of("crash")), 2);
    assert!(
        pending.await.expect("task").is_err(),
        "the dead worker never replied"
    );
    second.stop().await;
}

#[tokio::test]
async fn an_intent_resent_long_after_its_dead_owners_lease_runs_as_attempt_2() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let args = ["--forward", FORWARD, "--lease", "3s"];
    let mut first = WorkerProcess::serve(&server.url(), &args);
    wait_for_workers(&client, 1).await;
    let body = intent("late", json!({"sleep_ms": 60_000, "first_only": true}));
    client
        .publish("intents.slow", body.to_string().into())
        .await
        .expect("publish");
    eventually(Duration::from_secs(5), "attempt 1 started", async || {
        upstream.executions(&key_of("late")) == 1
    })
    .await;
    first.signal("-KILL");
    first.wait(Duration::from_secs(5)).await;
    let _second = WorkerProcess::serve(&server.url(), &args);
    wait_for_workers(&client, 1).await;
    // Long after the dead owner's 3 s lease ran out (and its expiry left
    // the key): the next run must still say an earlier one started
    // (docs/contract.md v1.2 §4).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let resent = {
        let (client, body) = (client.clone(), body.clone());
        tokio::spawn(async move { send(&client, "intents.slow", &body).await })
    };
    eventually(Duration::from_secs(5), "attempt 2 started", async || {
        upstream.executions(&key_of("late")) == 2
    })
    .await;
    assert_eq!(upstream.attempts(&key_of("late")), vec![1, 2]);
    let reply = resent.await.expect("the resend");
    assert_eq!(reply["result"]["status"], "Success", "{reply}");
}

#[tokio::test]
async fn sigterm_with_an_intent_in_flight_still_replies_and_exits_zero() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let mut worker = WorkerProcess::serve(&server.url(), &["--forward", FORWARD, "--grace", "10s"]);
    wait_for_workers(&client, 1).await;

    let body = intent("in-flight", json!({"sleep_ms": 1500}));
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { send(&client, "intents.slow", &body).await })
    };
    eventually(Duration::from_secs(2), "the intent running", async || {
        upstream.executions(&key_of("in-flight")) == 1
    })
    .await;
    worker.signal("-TERM");
    let reply = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("reply within 10s")
        .expect("task");
    assert_eq!(
        reply["result"],
        json!({"status": "Success", "data": {"done": {"sleep_ms": 1500}}})
    );
    let status = worker.wait(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    assert_eq!(upstream.executions(&key_of("in-flight")), 1);
}

#[tokio::test]
async fn sigterm_past_the_grace_period_releases_the_claim() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let _upstream = Upstream::start(&client).await;
    let mut worker =
        WorkerProcess::serve(&server.url(), &["--forward", FORWARD, "--grace", "500ms"]);
    wait_for_workers(&client, 1).await;

    let body = intent("abandoned", json!({"sleep_ms": 20000}));
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { send(&client, "intents.slow", &body).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.signal("-TERM");
    let reply = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("reply within 10s")
        .expect("task");
    assert_eq!(reply["result"]["data"]["code"], "NO_HANDLER", "{reply}");
    assert_eq!(worker.wait(Duration::from_secs(15)).await.code(), Some(0));
    let kv = async_nats::jetstream::new(client.clone())
        .get_key_value("IDEMPOTENCY")
        .await
        .expect("bucket");
    let entry = kv.entry(key_of("abandoned")).await.expect("entry");
    let free = entry.is_none_or(|e| e.operation != async_nats::jetstream::kv::Operation::Put);
    assert!(free, "the claim was released on shutdown");
}

#[tokio::test]
async fn the_worker_survives_a_nats_server_restart() {
    let mut server = NatsServer::start();
    let _worker = WorkerProcess::serve(&server.url(), &[]);
    let client = server.connect().await;
    wait_for_workers(&client, 1).await;
    let before = send(&client, "intents.echo", &intent("before", json!(1))).await;
    assert_eq!(before["replayed"], false);

    server.restart();
    let client = server.connect().await;
    // The worker reconnects by itself; bounded retries until it answers.
    let after = eventually(
        Duration::from_secs(40),
        "the worker answering after the restart",
        async || {
            let request = async_nats::Request::new()
                .payload(intent("after", json!(2)).to_string().into())
                .timeout(Some(Duration::from_secs(1)));
            let reply = client.send_request("intents.echo", request).await.ok()?;
            (!reply.payload.is_empty())
                .then(|| serde_json::from_slice::<Value>(&reply.payload).expect("JSON"))
        },
    )
    .await;
    assert_eq!(
        after["result"],
        json!({"status": "Success", "data": {"echo": 2}}),
        "{after}"
    );
    let replay = send(&client, "intents.echo", &intent("before", json!(1))).await;
    assert_eq!(replay["replayed"], true, "outcomes survive the restart");
    assert_eq!(replay["stored_at"], before["stored_at"]);
}

#[tokio::test]
async fn key_prints_the_seed_key() {
    let out = idemq(&[
        "key",
        "--run-id",
        "run123",
        "--episode",
        "episode1",
        "--step",
        "5",
    ])
    .await;
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "idem_f52983c9c6e4fb21"
    );
    let out = idemq(&[
        "key",
        "--intent-id",
        "intent123",
        "--actor",
        "actor456",
        "--episode",
        "episode789",
    ])
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "idem_854f4f93c9bbea37"
    );
}

#[tokio::test]
async fn usage_errors_exit_two_with_a_reason() {
    for args in [
        &["serve", "--concurrency", "many"][..],
        &["serve", "--lease", "0s", "--nats-url", "nats://127.0.0.1:1"],
        &[
            "serve",
            "--forward",
            "exec.{nope}",
            "--nats-url",
            "nats://127.0.0.1:1",
        ],
        &["key", "--episode", "e"],
        &["get", "not-a-key"],
        // Durations past their bounds (docs/contract.md v1.2 §7): a usage
        // error, never a panic at the first intent.
        &["serve", "--lease", "5000000000y"],
        &["serve", "--ttl", "5000000000y"],
        &["serve", "--ttl", "11y"],
        &["serve", "--wait", "25h"],
        &["serve", "--handler-timeout", "2days"],
        &["serve", "--grace", "5000000000y"],
        &["serve", "--ack-wait", "2days"],
        &["serve", "--backoff", "1s,2days"],
        &["send", "intents.x", "{}", "--timeout", "5000000000y"],
    ] {
        let out = idemq(args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.is_empty(), "{args:?} says why");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn an_unreachable_server_exits_one_with_a_reason() {
    let out = idemq(&["serve", "--nats-url", "nats://127.0.0.1:1"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

#[tokio::test]
async fn get_prints_the_record_or_exits_one() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let worker = start_worker(&server, test_config(), None).await;
    send(&client, "intents.echo", &intent("stored", json!(7))).await;
    let key = key_of("stored");
    let url = server.url();

    let out = idemq(&["get", &key, "--nats-url", &url]).await;
    assert_eq!(out.status.code(), Some(0));
    let record: Value = serde_json::from_slice(&out.stdout).expect("record JSON");
    assert_eq!(record["state"], "done");
    assert_eq!(
        record["result"],
        json!({"status": "Success", "data": {"echo": 7}})
    );

    let absent = key_of("never-sent");
    let out = idemq(&["get", &absent, "--nats-url", &url]).await;
    assert_eq!(out.status.code(), Some(1));
    worker.stop().await;
}

#[tokio::test]
async fn a_bucket_without_per_message_ttl_is_a_startup_error() {
    let server = NatsServer::start();
    common::stores::bucket_without_ttl(&server, "OLD").await;
    let out = idemq(&["serve", "--bucket", "OLD", "--nats-url", &server.url()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("per-message TTL"));
}

#[tokio::test]
async fn send_retries_with_the_same_key_and_prints_the_reply() {
    let server = NatsServer::start();
    let worker = start_worker(&server, test_config(), None).await;
    let body = intent("cli-send", json!("hi")).to_string();
    let url = server.url();
    let first = idemq(&["send", "intents.echo", &body, "--nats-url", &url]).await;
    let second = idemq(&[
        "send",
        "intents.echo",
        &body,
        "--nats-url",
        &url,
        "--retries",
        "2",
    ])
    .await;
    assert_eq!(first.status.code(), Some(0));
    let first: Value = serde_json::from_slice(&first.stdout).expect("JSON");
    let second: Value = serde_json::from_slice(&second.stdout).expect("JSON");
    assert_eq!(first["replayed"], false);
    assert_eq!(second["replayed"], true);
    assert_eq!(second["result"], first["result"]);
    worker.stop().await;
}

/// Max-size intents in the flood below.
const FLOOD: usize = 300;
/// Flood intents on their way at once.
const FLOOD_OUTSTANDING: usize = 32;
/// The flood test's `--intake-bytes`.
const FLOOD_INTAKE: u64 = 16 << 20;
/// What a worker may hold beside its intake, as docs/operations.md states
/// it: 48 MiB (its own ~15 MiB, the client's read buffers, what the
/// allocator keeps) plus 8 x --max-payload per running intent (its
/// payload decoded, forwarded, answered and stored). Here 4 run: 80 MiB.
/// Measured on nats-server 2.15.1, 2 cores: 58-68 MiB.
const FLOOD_RSS_BEYOND_INTAKE: u64 = (48 << 20) + 4 * 8 * (1 << 20);

#[tokio::test]
async fn a_flood_of_max_size_intents_is_answered_in_full_within_the_intake_bound() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let _upstream = Upstream::start(&client).await;
    let logs = tempfile::NamedTempFile::new().expect("a log file");
    let intake = format!("{}B", FLOOD_INTAKE);
    let mut worker = WorkerProcess::serve_logging(
        &server.url(),
        &[
            "--forward",
            FORWARD,
            "--concurrency",
            "4",
            "--intake-bytes",
            &intake,
            "--handler-timeout",
            "5s",
        ],
        "warn",
        logs.reopen().expect("the log file"),
    );
    wait_for_workers(&client, 1).await;
    let before = worker.peak_rss();

    // Each just under the 1 MiB max payload, to a slow upstream: the
    // worker runs 4 at a time, and the rest arrive much faster than that.
    let filler = "x".repeat(1_000_000);
    let sends = (0..FLOOD).map(|i| {
        let params = json!({"sleep_ms": 200, "filler": filler});
        let body = intent_for(&format!("flood-{i}"), "slow", params).to_string();
        let client = &client;
        async move {
            let request = async_nats::Request::new()
                .payload(body.into())
                .timeout(Some(Duration::from_secs(60)));
            let reply = match client.send_request("intents.flood", request).await {
                Ok(reply) => reply,
                Err(error) => {
                    eprintln!("flood intent {i} not answered: {error}");
                    return None;
                }
            };
            let reply: Value = serde_json::from_slice(&reply.payload).expect("JSON");
            Some(reply)
        }
    });
    // At most FLOOD_OUTSTANDING on their way at once: the server's own
    // bound on what it buffers for a connection (64 MB) must not cut the
    // worker off as a slow consumer before it has read them.
    let replies: Vec<Option<Value>> = futures::stream::iter(sends)
        .buffer_unordered(FLOOD_OUTSTANDING)
        .collect()
        .await;
    let peak = worker.peak_rss();
    let unanswered = replies.iter().filter(|r| r.is_none()).count();
    let replies: Vec<Value> = replies.into_iter().flatten().collect();
    let overloaded = replies
        .iter()
        .filter(|r| r["result"]["data"]["code"] == "OVERLOADED")
        .count();
    let succeeded = replies
        .iter()
        .filter(|r| r["result"]["status"] == "Success")
        .count();
    println!(
        "worker peak RSS {} MiB before, {} MiB after {FLOOD} intents of 1 MB: \
         {succeeded} Success, {overloaded} OVERLOADED, {unanswered} unanswered",
        before >> 20,
        peak >> 20
    );
    assert_eq!(unanswered, 0, "every intent of the flood is answered");
    assert_eq!(succeeded + overloaded, FLOOD, "outcomes or OVERLOADED only");
    assert!(
        overloaded > 0,
        "16 MiB cannot hold 300 MB of waiting intents"
    );
    assert!(
        peak < FLOOD_INTAKE + FLOOD_RSS_BEYOND_INTAKE,
        "peak RSS {} MiB over --intake-bytes ({} MiB) + {} MiB",
        peak >> 20,
        FLOOD_INTAKE >> 20,
        FLOOD_RSS_BEYOND_INTAKE >> 20
    );
    worker.signal("-TERM");
    assert!(worker.wait(Duration::from_secs(30)).await.success());
    // Nothing was dropped inside the worker's client, and a full intake is
    // warned about, not once per refused intent.
    let logs = std::fs::read_to_string(logs.path()).expect("the worker's log");
    assert!(!logs.contains("the client dropped messages"), "{logs}");
    let warnings = logs
        .lines()
        .filter(|l| l.contains("the intake is full"))
        .count();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} intake warnings:\n{logs}"
    );
}

/// `--grace` in the shutdown test below.
const GRACE: Duration = Duration::from_secs(2);
/// What the contract allows a stop past `--grace`: releasing the claims
/// still running (5 s) and flushing the last replies (5 s).
const PAST_GRACE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_stop_past_grace_with_the_store_unreachable_still_exits_cleanly_in_bounded_time() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let proxy = common::proxy::FaultProxy::before(&server).await;
    let mut worker = WorkerProcess::serve(
        &proxy.url(),
        &[
            "--forward",
            FORWARD,
            "--grace",
            "2s",
            "--handler-timeout",
            "60s",
        ],
    );
    wait_for_workers(&client, 1).await;
    let body = intent_for("outlives-grace", "slow", json!({"sleep_ms": 30_000}));
    client
        .publish("intents.slow", body.to_string().into())
        .await
        .expect("publish");
    eventually(Duration::from_secs(5), "the handler runs", async || {
        upstream.total() == 1
    })
    .await;
    // The worker's traffic to the server stalls (its release, its reply),
    // and it is told to stop while the handler still runs.
    proxy.set(common::proxy::Direction::Up, common::proxy::Mode::Hold);
    let stopped = std::time::Instant::now();
    worker.signal("-TERM");
    let status = worker
        .wait(GRACE + PAST_GRACE + Duration::from_secs(5))
        .await;
    let took = stopped.elapsed();
    println!("stopped in {took:?}");
    assert!(
        status.success(),
        "exit 0 after a stop past grace: {status:?}"
    );
    assert!(
        took <= GRACE + PAST_GRACE + Duration::from_secs(1),
        "stopped in {took:?}"
    );
}

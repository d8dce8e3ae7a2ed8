//! Every core delivery is answered (docs/contract.md v1.2 §3, §6): a burst of
//! copies larger than any buffer of the client reaches the intake and is
//! answered in full, and past `--intake-bytes` a copy is answered
//! `OVERLOADED` at once, never dropped. Three `idemq serve` processes, a
//! real nats-server, a scripted upstream that counts executions.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use async_nats::Client;
use common::intents::{error_code, intent_for};
use common::upstream::{Upstream, FORWARD};
use common::workers::{wait_for_workers, WorkerProcess};
use common::NatsServer;
use serde_json::{json, Value};

/// Distinct intents in a burst.
const KEYS: usize = 300;
/// Copies of each, all sent at once.
const COPIES: usize = 20;
/// How long a copy waits for its reply: far past the burst's duration, so
/// a copy without a reply was not answered at all.
const REPLY_BOUND: Duration = Duration::from_secs(60);

/// Starts `count` workers with `args` (beside `--forward`), each logging
/// warnings into a file of its own.
fn workers(
    url: &str,
    count: usize,
    args: &[&str],
) -> Vec<(WorkerProcess, tempfile::NamedTempFile)> {
    (0..count)
        .map(|_| {
            let log = tempfile::NamedTempFile::new().expect("a log file");
            let mut all = vec!["--forward", FORWARD];
            all.extend_from_slice(args);
            let worker = WorkerProcess::serve_logging(
                url,
                &all,
                "warn",
                log.reopen().expect("the log file"),
            );
            (worker, log)
        })
        .collect()
}

/// The body of copy `copy` of intent `key`: the same bytes for every copy.
fn body(key: usize) -> String {
    intent_for(&format!("burst-{key}"), "ok", json!({ "n": key })).to_string()
}

/// One reply, or `None` when none came within [`REPLY_BOUND`].
async fn send(client: &Client, body: String) -> Option<Value> {
    let request = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(REPLY_BOUND));
    let reply = client.send_request("intents.burst", request).await.ok()?;
    Some(serde_json::from_slice(&reply.payload).expect("a JSON reply"))
}

/// Sends every copy of every intent at once (copies interleaved, so each
/// key's copies spread over the workers); the replies by intent.
async fn burst(client: &Client) -> Vec<(usize, Option<Value>)> {
    let sends = (0..COPIES)
        .flat_map(|_| 0..KEYS)
        .map(|key| async move { (key, send(client, body(key)).await) });
    futures::future::join_all(sends).await
}

/// Every worker's log, checked for drops inside its client.
fn assert_no_client_drops(workers: &[(WorkerProcess, tempfile::NamedTempFile)]) {
    for (_, log) in workers {
        let log = std::fs::read_to_string(log.path()).expect("the worker's log");
        assert!(
            !log.contains("the client dropped messages"),
            "a worker's client dropped messages:\n{log}"
        );
    }
}

/// Every `Success` of a key is the same outcome, and exactly one of them
/// is the execution's own (`replayed: false`).
fn assert_one_outcome_per_key(successes: &HashMap<usize, Vec<Value>>) {
    for (key, replies) in successes {
        let first = &replies[0];
        for reply in replies {
            assert_eq!(reply["result"], first["result"], "intent {key}");
            assert_eq!(reply["stored_at"], first["stored_at"], "intent {key}");
        }
        let fresh = replies.iter().filter(|r| r["replayed"] == false).count();
        assert_eq!(fresh, 1, "intent {key}: {fresh} answers not replayed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_6000_copies_over_three_default_workers_is_answered_in_full() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let workers = workers(&server.url(), 3, &[]);
    wait_for_workers(&client, 3).await;

    let replies = burst(&client).await;
    let unanswered = replies.iter().filter(|(_, r)| r.is_none()).count();
    let mut by_code: HashMap<String, usize> = HashMap::new();
    let mut successes: HashMap<usize, Vec<Value>> = HashMap::new();
    for (key, reply) in replies.into_iter() {
        let Some(reply) = reply else { continue };
        if reply["result"]["status"] == "Success" {
            successes.entry(key).or_default().push(reply);
        } else {
            *by_code
                .entry(error_code(&reply).unwrap_or_default().to_owned())
                .or_default() += 1;
        }
    }
    println!(
        "{} copies: {unanswered} unanswered, {} Success, others {by_code:?}",
        KEYS * COPIES,
        successes.values().map(Vec::len).sum::<usize>()
    );
    assert_eq!(unanswered, 0, "every copy is answered");
    assert!(
        by_code.is_empty(),
        "at default flags every copy gets the outcome: {by_code:?}"
    );
    assert_eq!(successes.len(), KEYS);
    assert_one_outcome_per_key(&successes);
    assert_eq!(upstream.total() as usize, KEYS, "each intent executed once");
    assert!(
        upstream.duplicates().is_empty(),
        "{:?}",
        upstream.duplicates()
    );
    assert_no_client_drops(&workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_a_small_intake_every_copy_is_answered_overloaded_and_its_retry_gets_the_outcome() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let workers = workers(&server.url(), 3, &["--intake-bytes", "64KiB"]);
    wait_for_workers(&client, 3).await;

    let replies = burst(&client).await;
    let unanswered = replies.iter().filter(|(_, r)| r.is_none()).count();
    assert_eq!(unanswered, 0, "every copy is answered, overloaded or not");
    let mut successes: HashMap<usize, Vec<Value>> = HashMap::new();
    let mut overloaded = Vec::new();
    let mut others = Vec::new();
    for (key, reply) in replies.into_iter().filter_map(|(k, r)| Some((k, r?))) {
        match (reply["result"]["status"].as_str(), error_code(&reply)) {
            (Some("Success"), _) => successes.entry(key).or_default().push(reply),
            (Some("Error"), Some("OVERLOADED")) => overloaded.push((key, reply)),
            _ => others.push(reply),
        }
    }
    println!(
        "{} copies: {} Success, {} OVERLOADED, {} others",
        KEYS * COPIES,
        successes.values().map(Vec::len).sum::<usize>(),
        overloaded.len(),
        others.len()
    );
    assert!(
        others.is_empty(),
        "only outcomes and OVERLOADED: {others:?}"
    );
    assert!(
        !overloaded.is_empty(),
        "a 64 KiB intake cannot hold a burst of 6000"
    );
    // An OVERLOADED copy: nothing stored, a retry hint, and a retry after
    // it gets the key's one outcome (the same bytes, sent again).
    for (key, reply) in &overloaded {
        assert_eq!(reply["stored_at"], Value::Null, "intent {key}: {reply}");
        assert_eq!(reply["replayed"], false);
        let after = reply["result"]["data"]["retry_after_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("OVERLOADED without retry_after_ms: {reply}"));
        assert!(after > 0);
    }
    let after = overloaded[0].1["result"]["data"]["retry_after_ms"]
        .as_u64()
        .unwrap_or(1000);
    tokio::time::sleep(Duration::from_millis(after)).await;
    let retries = overloaded.iter().map(|(key, _)| {
        let client = &client;
        async move {
            // Bounded: each retry waits at least its hint.
            for _ in 0..20 {
                let reply = send(client, body(*key)).await.expect("a reply");
                if error_code(&reply) != Some("OVERLOADED") {
                    return (*key, reply);
                }
                let after = reply["result"]["data"]["retry_after_ms"]
                    .as_u64()
                    .unwrap_or(1000);
                tokio::time::sleep(Duration::from_millis(after)).await;
            }
            panic!("intent {key} still OVERLOADED after 20 retries");
        }
    });
    for (key, reply) in futures::future::join_all(retries).await {
        assert_eq!(
            reply["result"]["status"], "Success",
            "intent {key}: {reply}"
        );
        successes.entry(key).or_default().push(reply);
    }
    assert_eq!(successes.len(), KEYS, "every intent has its outcome");
    assert_one_outcome_per_key(&successes);
    assert_eq!(upstream.total() as usize, KEYS, "each intent executed once");
    assert_no_client_drops(&workers);
}

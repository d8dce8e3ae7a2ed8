//! The worker end to end in core mode: in-process workers, a real
//! nats-server, a scripted upstream, and requests as an agent sends them.

mod common;

use std::time::Duration;

use async_nats::HeaderMap;
use common::intents::{code, intent, intent_key, key_of};
use common::poll::eventually;
use common::rig::Rig;
use common::upstream::FORWARD;
use common::workers::{request, send, start_worker, test_config, REPLY_TIMEOUT};
use common::NatsServer;
use futures::StreamExt;
use serde_json::{json, Value};

#[tokio::test]
async fn every_invalid_input_gets_its_code_and_nothing_executes() {
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    let config = idemq::WorkerConfig {
        max_payload: 2048,
        ..test_config()
    };
    let worker = start_worker(&server, config, Some(FORWARD)).await;

    let long = "x".repeat(257);
    let cases: Vec<(&str, Vec<u8>, Option<&str>, &str)> = vec![
        ("not utf-8", vec![0xff, 0xfe, 0x7b], None, "INVALID_INTENT"),
        ("not json", b"nope".to_vec(), None, "INVALID_INTENT"),
        ("not an object", b"[1,2]".to_vec(), None, "INVALID_INTENT"),
        (
            "missing intent_id",
            br#"{"actor":"a","episode":"e"}"#.to_vec(),
            None,
            "INVALID_INTENT",
        ),
        (
            "missing actor",
            br#"{"intent_id":"i","episode":"e"}"#.to_vec(),
            None,
            "INVALID_INTENT",
        ),
        (
            "missing episode",
            br#"{"intent_id":"i","actor":"a"}"#.to_vec(),
            None,
            "INVALID_INTENT",
        ),
        (
            "empty intent_id",
            br#"{"intent_id":"","actor":"a","episode":"e"}"#.to_vec(),
            None,
            "INVALID_INTENT",
        ),
        (
            "actor not a string",
            br#"{"intent_id":"i","actor":7,"episode":"e"}"#.to_vec(),
            None,
            "INVALID_INTENT",
        ),
        (
            "intent_id over 256 bytes",
            format!(r#"{{"intent_id":"{long}","actor":"a","episode":"e"}}"#).into_bytes(),
            None,
            "INVALID_INTENT",
        ),
        (
            "negative step",
            br#"{"intent_id":"i","actor":"a","episode":"e","step_idx":-1}"#.to_vec(),
            None,
            "INVALID_INTENT",
        ),
        (
            "step over u32",
            br#"{"intent_id":"i","actor":"a","episode":"e","step_idx":4294967296}"#.to_vec(),
            None,
            "INVALID_INTENT",
        ),
        (
            "step as string",
            br#"{"intent_id":"i","actor":"a","episode":"e","step_idx":"3"}"#.to_vec(),
            None,
            "INVALID_INTENT",
        ),
        (
            "empty run_id",
            br#"{"intent_id":"i","actor":"a","episode":"e","run_id":""}"#.to_vec(),
            None,
            "INVALID_INTENT",
        ),
        (
            "capability with a dot",
            br#"{"intent_id":"i","actor":"a","episode":"e","capability":"a.b"}"#.to_vec(),
            None,
            "INVALID_INTENT",
        ),
        (
            "capability wildcard",
            br#"{"intent_id":"i","actor":"a","episode":"e","capability":">"}"#.to_vec(),
            None,
            "INVALID_INTENT",
        ),
        (
            "ttl of zero",
            br#"{"intent_id":"i","actor":"a","episode":"e","ttl_secs":0}"#.to_vec(),
            None,
            "INVALID_INTENT",
        ),
        (
            "wildcard reply_to",
            br#"{"intent_id":"i","actor":"a","episode":"e","reply_to":"r.*"}"#.to_vec(),
            None,
            "INVALID_INTENT",
        ),
        (
            "malformed key header",
            br#"{"intent_id":"i","actor":"a","episode":"e"}"#.to_vec(),
            Some("idem_nothex!!nothex!"),
            "INVALID_KEY",
        ),
        (
            "payload over --max-payload",
            format!(
                r#"{{"intent_id":"i","actor":"a","episode":"e","params":"{}"}}"#,
                "p".repeat(3000)
            )
            .into_bytes(),
            None,
            "PAYLOAD_TOO_LARGE",
        ),
    ];
    for (name, payload, key, expected) in cases {
        let mut headers = HeaderMap::new();
        if let Some(key) = key {
            headers.insert("Idempotency-Key", key);
        }
        let (reply, reply_headers) = request(&client, "intents.ok", payload, headers).await;
        assert_eq!(code(&reply), expected, "{name}: {reply}");
        assert_eq!(reply["replayed"], false, "{name}");
        assert_eq!(reply["stored_at"], Value::Null, "{name}");
        assert_eq!(
            reply_headers.get("Idem-Error-Code").map(|v| v.as_str()),
            Some(expected),
            "{name}"
        );
        assert_eq!(
            reply_headers.get("Idem-Status").map(|v| v.as_str()),
            Some("Error")
        );
    }
    assert_eq!(upstream.total(), 0, "no invalid intent may execute");
    assert_eq!(worker.stats.snapshot().invalid, 19);

    // One bad message never stops the worker.
    let reply = send(&client, "intents.ok", &intent("after-bad", json!(1))).await;
    assert_eq!(
        reply["result"],
        json!({"status": "Success", "data": {"done": 1}})
    );
    worker.stop().await;
}

/// A capability is one plain token, so no intent can steer `--forward`
/// to a subject outside the template: every attempt is refused
/// `INVALID_INTENT` and nothing reaches any `exec.` subject.
#[tokio::test]
async fn a_capability_can_never_inject_subject_tokens_or_wildcards() {
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    // Sees everything under the template's prefix, also what `exec.*` misses.
    let mut spy = client.subscribe("exec.>").await.expect("subscribe");
    client.flush().await.expect("flush");
    let worker = start_worker(&server, test_config(), Some(FORWARD)).await;

    let too_long = "c".repeat(65);
    let capabilities = [
        "a.b", "a*", "*", ">", "a.>", "x y", "x\ty", "a\nb", "", "é", &too_long,
    ];
    for capability in capabilities {
        let mut body = intent(&format!("inject-{capability}"), json!(1));
        body["capability"] = json!(capability);
        let reply = send(&client, "intents.ok", &body).await;
        assert_eq!(code(&reply), "INVALID_INTENT", "{capability:?}: {reply}");
    }
    // The default capability is the subject's last token: checked the same way.
    for subject in ["intents.a$b", "intents.é", "intents.a%2Eb"] {
        let body = json!({"intent_id": subject, "actor": "agent", "episode": "ep"});
        let reply = send(&client, subject, &body).await;
        assert_eq!(code(&reply), "INVALID_INTENT", "{subject}: {reply}");
    }
    client.flush().await.expect("flush");
    assert_eq!(upstream.total(), 0, "no refused intent may execute");

    // The spy does see a valid forward, and nothing before it.
    let reply = send(&client, "intents.ok", &intent("valid", json!(1))).await;
    assert_eq!(reply["result"]["status"], "Success", "{reply}");
    let first = tokio::time::timeout(Duration::from_secs(5), spy.next())
        .await
        .expect("the valid forward arrives")
        .expect("subscription open");
    assert_eq!(first.subject.as_str(), "exec.ok");
    worker.stop().await;
}

/// `--concurrency` bounds the intents in flight: with 2, six slow intents
/// sent at once run at most two at a time, and all are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_bounds_the_intents_in_flight() {
    let Rig {
        server,
        client,
        upstream: _upstream,
    } = Rig::start().await;
    let config = idemq::WorkerConfig {
        concurrency: 2,
        ..test_config()
    };
    let worker = start_worker(&server, config, Some(FORWARD)).await;
    let sends: Vec<_> = (0..6)
        .map(|i| {
            let client = client.clone();
            let mut body = intent(&format!("bounded-{i}"), json!({"sleep_ms": 400}));
            body["capability"] = json!("slow");
            tokio::spawn(async move { send(&client, "intents.ok", &body).await })
        })
        .collect();
    let mut peak = 0;
    let watch = async {
        while !sends.iter().all(|send| send.is_finished()) {
            peak = peak.max(worker.stats.snapshot().in_flight);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(2 * REPLY_TIMEOUT, watch)
        .await
        .expect("the sends end within their own reply timeout");
    for send in sends {
        let reply = send.await.expect("send task");
        assert_eq!(reply["result"]["status"], "Success", "{reply}");
    }
    assert!(peak <= 2, "{peak} intents in flight with --concurrency 2");
    assert_eq!(peak, 2, "the bound was reached");
    worker.stop().await;
}

#[tokio::test]
async fn retry_storm_over_three_workers_executes_each_key_once() {
    const KEYS: usize = 20;
    const COPIES: usize = 8;
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(start_worker(&server, test_config(), Some(FORWARD)).await);
    }

    let requests = (0..KEYS)
        .flat_map(|k| (0..COPIES).map(move |_| k))
        .map(|k| {
            let client = client.clone();
            async move {
                let body = intent(&format!("storm-{k}"), json!({"sleep_ms": 200, "k": k}));
                (k, send(&client, "intents.slow", &body).await)
            }
        });
    let replies = futures::future::join_all(requests).await;

    for k in 0..KEYS {
        let key = key_of(&format!("storm-{k}"));
        assert_eq!(upstream.executions(&key), 1, "key {key} executed once");
        let copies: Vec<&Value> = replies
            .iter()
            .filter(|(i, _)| *i == k)
            .map(|(_, r)| r)
            .collect();
        assert_eq!(copies.len(), COPIES);
        let fresh = copies.iter().filter(|r| r["replayed"] == false).count();
        assert_eq!(fresh, 1, "exactly one copy of {key} is not a replay");
        for copy in &copies {
            assert_eq!(
                copy["result"],
                json!({"status": "Success", "data": {"done": {"sleep_ms": 200, "k": k}}})
            );
            assert_eq!(copy["stored_at"], copies[0]["stored_at"]);
            assert_eq!(copy["idem_key"], key.as_str());
        }
    }
    assert_eq!(upstream.total(), KEYS as u32);
    let executed: u64 = workers.iter().map(|w| w.stats.snapshot().executed).sum();
    assert_eq!(executed, KEYS as u64);
    for worker in workers {
        worker.stop().await;
    }
}

#[tokio::test]
async fn key_reuse_is_refused_including_the_seed_separator_collision() {
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    let worker = start_worker(&server, test_config(), Some(FORWARD)).await;

    let first = json!({"intent_id": "i1", "actor": "a", "run_id": "a::b", "episode": "c"});
    let collides = json!({"intent_id": "i2", "actor": "a", "run_id": "a", "episode": "b::c"});
    let a = send(&client, "intents.ok", &first).await;
    let b = send(&client, "intents.ok", &collides).await;
    assert_eq!(a["idem_key"], "idem_caa11b808f6cc558");
    assert_eq!(b["idem_key"], "idem_caa11b808f6cc558");
    assert_eq!(a["result"]["status"], "Success");
    assert_eq!(code(&b), "KEY_REUSED");
    assert_ne!(
        b["result"], a["result"],
        "a reused key never sees the first outcome"
    );

    let same_key_other_params = intent("p", json!({"v": 1}));
    send(&client, "intents.ok", &same_key_other_params).await;
    let other = send(&client, "intents.ok", &intent("p", json!({"v": 2}))).await;
    assert_eq!(code(&other), "KEY_REUSED");

    assert_eq!(upstream.total(), 2);
    assert_eq!(worker.stats.snapshot().key_reused, 2);
    worker.stop().await;
}

#[tokio::test]
async fn a_copy_waits_for_the_running_execution_or_gets_in_progress() {
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    // Two workers on subjects of their own: the copy reaches the one that
    // is not running the key, so it waits in the store (a losing claim, a
    // read, wake-ups), not on the other's in-flight map.
    let on = |subject: &str| idemq::WorkerConfig {
        subjects: vec![subject.to_owned()],
        wait: Duration::from_millis(800),
        ..test_config()
    };
    let runs = start_worker(&server, on("intents.a.>"), Some(FORWARD)).await;
    let waits = start_worker(&server, on("intents.b.>"), Some(FORWARD)).await;

    // Within --wait: the copy gets the outcome.
    let body = intent("waits", json!({"sleep_ms": 400}));
    let (first, copy) = tokio::join!(send(&client, "intents.a.slow", &body), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(&client, "intents.b.slow", &body).await
    });
    assert_eq!(first["replayed"], false);
    assert_eq!(copy["replayed"], true);
    assert_eq!(copy["result"], first["result"]);
    assert_eq!(copy["stored_at"], first["stored_at"]);
    assert_eq!(upstream.executions(&key_of("waits")), 1);
    assert_eq!(waits.stats.snapshot().waited, 1, "it waited in the store");

    // Past --wait: IN_PROGRESS with a retry hint; later copies replay.
    let body = intent("busy", json!({"sleep_ms": 2500}));
    let (first, copy) = tokio::join!(send(&client, "intents.a.slow", &body), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(&client, "intents.b.slow", &body).await
    });
    assert_eq!(code(&copy), "IN_PROGRESS");
    let retry_after = copy["result"]["data"]["retry_after_ms"]
        .as_u64()
        .expect("retry_after_ms");
    assert!(
        (100..=800).contains(&retry_after),
        "retry_after_ms {retry_after}"
    );
    assert_eq!(first["result"]["status"], "Success");
    let later = send(&client, "intents.b.slow", &body).await;
    assert_eq!(later["replayed"], true);
    assert_eq!(upstream.executions(&key_of("busy")), 1);
    assert_eq!(waits.stats.snapshot().in_progress, 1);
    runs.stop().await;
    waits.stop().await;
}

#[tokio::test]
async fn outcome_ttl_expiry_frees_the_key() {
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    let worker = start_worker(&server, test_config(), Some(FORWARD)).await;

    let mut body = intent("short-lived", json!(1));
    body["ttl_secs"] = json!(1);
    let first = send(&client, "intents.ok", &body).await;
    assert_eq!(first["replayed"], false);
    let replay = send(&client, "intents.ok", &body).await;
    assert_eq!(replay["replayed"], true);
    let stored =
        chrono::DateTime::parse_from_rfc3339(first["stored_at"].as_str().expect("stored_at"))
            .expect("timestamp");
    let expires =
        chrono::DateTime::parse_from_rfc3339(first["expires_at"].as_str().expect("expires_at"))
            .expect("timestamp");
    assert_eq!((expires - stored).num_seconds(), 1);

    let fresh = eventually(
        Duration::from_secs(10),
        "the key free again: a copy executes",
        async || {
            let reply = send(&client, "intents.ok", &body).await;
            (reply["replayed"] == false).then_some(reply)
        },
    )
    .await;
    assert_ne!(fresh["stored_at"], first["stored_at"]);
    assert_eq!(upstream.executions(&key_of("short-lived")), 2);
    worker.stop().await;
}

#[tokio::test]
async fn client_errors_are_stored_and_server_errors_released() {
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    let worker = start_worker(&server, test_config(), Some(FORWARD)).await;

    let body = intent("e422", json!(null));
    let first = send(&client, "intents.fail422", &body).await;
    let again = send(&client, "intents.fail422", &body).await;
    assert_eq!(
        first["result"],
        json!({"status": "Error", "data": {"code": "422", "message": "unprocessable"}})
    );
    assert_eq!(again["result"], first["result"]);
    assert_eq!(again["replayed"], true);
    assert_eq!(upstream.executions(&key_of("e422")), 1);

    let body = intent("e503", json!(null));
    let first = send(&client, "intents.fail503", &body).await;
    let again = send(&client, "intents.fail503", &body).await;
    assert_eq!(code(&first), "503");
    assert_eq!(first["stored_at"], Value::Null);
    assert_eq!(again["replayed"], false, "a transient error is not stored");
    assert_eq!(upstream.executions(&key_of("e503")), 2);

    let body = intent("flaky", json!("x"));
    let first = send(&client, "intents.flaky", &body).await;
    let retry = send(&client, "intents.flaky", &body).await;
    assert_eq!(code(&first), "503");
    assert_eq!(
        retry["result"],
        json!({"status": "Success", "data": {"done": "x"}})
    );
    assert_eq!(retry["replayed"], false);
    assert_eq!(upstream.executions(&key_of("flaky")), 2);
    assert_eq!(worker.stats.snapshot().transient, 3);
    worker.stop().await;
}

#[tokio::test]
async fn handler_timeout_is_stored_as_timeout() {
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    let config = idemq::WorkerConfig {
        handler_timeout: Duration::from_millis(500),
        ..test_config()
    };
    let worker = start_worker(&server, config, Some(FORWARD)).await;

    let body = intent("too-slow", json!({"sleep_ms": 3000}));
    let (first, first_headers) =
        request(&client, "intents.slow", body.to_string(), HeaderMap::new()).await;
    assert_eq!(first["result"], json!({"status": "Timeout"}));
    assert_eq!(
        first_headers.get("Idem-Status").map(|v| v.as_str()),
        Some("Timeout")
    );
    let again = send(&client, "intents.slow", &body).await;
    assert_eq!(again["result"], json!({"status": "Timeout"}));
    assert_eq!(again["replayed"], true);
    assert_eq!(upstream.executions(&key_of("too-slow")), 1);
    worker.stop().await;
}

#[tokio::test]
async fn no_responders_is_no_handler_and_nothing_is_stored() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let worker = start_worker(&server, test_config(), Some("nobody.{capability}")).await;

    let body = intent("orphan", json!(null));
    let reply = send(&client, "intents.ok", &body).await;
    assert_eq!(code(&reply), "NO_HANDLER");
    assert_eq!(reply["stored_at"], Value::Null);
    let js = async_nats::jetstream::new(client.clone());
    let kv = js.get_key_value("IDEMPOTENCY").await.expect("bucket");
    let entry = kv.entry(key_of("orphan")).await.expect("entry");
    let free = entry.is_none_or(|e| e.operation != async_nats::jetstream::kv::Operation::Put);
    assert!(free, "the claim was released");
    worker.stop().await;
}

#[tokio::test]
async fn upstream_replies_map_to_outcomes() {
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    let worker = start_worker(&server, test_config(), Some(FORWARD)).await;

    let bad = send(&client, "intents.badjson", &intent("bad", json!(null))).await;
    assert_eq!(code(&bad), "UPSTREAM_BAD_REPLY");
    assert_eq!(
        send(&client, "intents.badjson", &intent("bad", json!(null))).await["replayed"],
        true
    );
    let empty = send(&client, "intents.empty", &intent("empty", json!(null))).await;
    assert_eq!(empty["result"], json!({"status": "Success", "data": null}));
    let killed = send(&client, "intents.killed", &intent("killed", json!(null))).await;
    assert_eq!(killed["result"], json!({"status": "Killed"}));
    assert_eq!(
        send(&client, "intents.killed", &intent("killed", json!(null))).await["replayed"],
        true
    );
    let explicit =
        json!({"intent_id": "cap", "actor": "agent", "episode": "ep", "capability": "empty"});
    assert_eq!(
        send(&client, "intents.ok", &explicit).await["result"]["data"],
        Value::Null
    );
    assert_eq!(upstream.attempts(&key_of("bad")), vec![1]);
    assert_eq!(upstream.total(), 4);
    worker.stop().await;
}

#[tokio::test]
async fn replies_go_to_idem_reply_to_or_reply_to_when_the_message_has_none() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let worker = start_worker(&server, test_config(), None).await;
    let mut results = client.subscribe("results.>").await.expect("subscribe");
    client.flush().await.expect("flush");

    let mut headers = HeaderMap::new();
    headers.insert("Idem-Reply-To", "results.header");
    let body = intent("by-header", json!(1)).to_string();
    client
        .publish_with_headers("intents.echo", headers, body.into())
        .await
        .expect("publish");
    let mut body = intent("by-field", json!(2));
    body["reply_to"] = json!("results.field");
    client
        .publish("intents.echo", body.to_string().into())
        .await
        .expect("publish");

    let mut seen = Vec::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(Duration::from_secs(10), results.next())
            .await
            .expect("a reply within 10s")
            .expect("subscription open");
        let reply: Value = serde_json::from_slice(&message.payload).expect("JSON");
        seen.push((
            message.subject.to_string(),
            reply["result"]["data"]["echo"].clone(),
        ));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        vec![
            ("results.field".to_owned(), json!(2)),
            ("results.header".to_owned(), json!(1))
        ]
    );
    worker.stop().await;
}

#[tokio::test]
async fn the_worker_is_a_micro_service_with_its_counters() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let worker = start_worker(&server, test_config(), None).await;
    send(&client, "intents.echo", &intent("svc", json!(1))).await;
    send(&client, "intents.echo", &intent("svc", json!(1))).await;

    let info = client
        .request("$SRV.INFO.idemq", "".into())
        .await
        .expect("info");
    let info: Value = serde_json::from_slice(&info.payload).expect("JSON");
    assert_eq!(info["name"], "idemq");
    assert_eq!(info["metadata"]["subjects"], "intents.>");
    let stats = client
        .request("$SRV.STATS.idemq", "".into())
        .await
        .expect("stats");
    let stats: Value = serde_json::from_slice(&stats.payload).expect("JSON");
    let data = &stats["endpoints"][0]["data"];
    assert_eq!(data["received"], 2, "{stats}");
    assert_eq!(data["executed"], 1);
    assert_eq!(data["replayed"], 1);
    worker.stop().await;
}

#[tokio::test]
async fn a_purge_reaches_the_cache_of_every_worker_at_once() {
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    // Each worker on a subject of its own, so each copy goes where the
    // test says; the key is the body's, the same on both.
    let on = |subject: &str| idemq::WorkerConfig {
        subjects: vec![subject.to_owned()],
        ..test_config()
    };
    let workers = [
        start_worker(&server, on("intents.a.>"), Some(FORWARD)).await,
        start_worker(&server, on("intents.b.>"), Some(FORWARD)).await,
    ];
    let body = intent("purged", json!(1));
    let old = send(&client, "intents.a.ok", &body).await;
    assert_eq!(old["replayed"], false);
    // Each worker holds the outcome in its cache now.
    for subject in [
        "intents.a.ok",
        "intents.b.ok",
        "intents.a.ok",
        "intents.b.ok",
    ] {
        let copy = send(&client, subject, &body).await;
        assert_eq!(copy["stored_at"], old["stored_at"], "{subject}");
    }
    for worker in &workers {
        assert!(worker.stats.snapshot().replayed >= 2);
    }
    assert_eq!(upstream.executions(&key_of("purged")), 1);

    let store = idemq::store::kv::KvStore::open(
        async_nats::jetstream::new(client.clone()),
        &idemq::store::kv::BucketConfig::default(),
    )
    .await
    .expect("bucket");
    let key = intent_key("purged");
    let purged = idemq::admin::purge(&client, &store, "IDEMPOTENCY", &key, false)
        .await
        .expect("purge");
    assert!(
        matches!(purged, idemq::admin::Purged::Purged { .. }),
        "{purged:?}"
    );
    // Within a second, neither worker answers the purged outcome: each
    // copy runs again or gets the new one.
    let mut new_outcome = None;
    for subject in ["intents.a.ok", "intents.b.ok"] {
        let at = eventually(
            Duration::from_secs(1),
            format!("{subject}: the purged outcome no longer answered"),
            async || {
                let copy = send(&client, subject, &body).await;
                (copy["stored_at"] != old["stored_at"]).then(|| copy["stored_at"].clone())
            },
        )
        .await;
        assert_eq!(
            *new_outcome.get_or_insert(at.clone()),
            at,
            "one new outcome"
        );
    }
    assert_eq!(
        upstream.executions(&key_of("purged")),
        2,
        "executed again after the purge, once"
    );
    for worker in workers {
        worker.stop().await;
    }
}

#[tokio::test]
async fn an_outcome_too_large_to_store_is_stored_as_result_too_large_and_never_rerun() {
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    let worker = start_worker(&server, test_config(), Some(FORWARD)).await;
    // An answer the upstream can send (it fits the max payload), whose
    // record, with the claim's fields around it, cannot be stored.
    let max = client.server_info().max_payload;
    let mut body = intent("huge", json!({"bytes": max - 16}));
    body["capability"] = json!("big");

    let mut replies = Vec::new();
    for _ in 0..3 {
        replies.push(send(&client, "intents.work", &body).await);
    }
    assert_eq!(upstream.total(), 1, "the upstream ran once");
    for reply in &replies {
        assert_eq!(code(reply), "RESULT_TOO_LARGE", "{reply}");
        assert_eq!(reply["result"], replies[0]["result"]);
        assert_eq!(reply["stored_at"], replies[0]["stored_at"], "one record");
        assert!(reply["stored_at"].is_string(), "stored: {reply}");
    }
    let fresh = replies.iter().filter(|r| r["replayed"] == false).count();
    assert_eq!(fresh, 1);
    worker.stop().await;
}

/// Distinct keys held at once by a slow handler, and copies of each.
const WAITING_KEYS: usize = 1500;
const WAITING_COPIES: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_keys_waited_for_at_once_cost_no_server_consumer_each() {
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    let config = || idemq::WorkerConfig {
        concurrency: 4096,
        wait: Duration::from_secs(12),
        ..test_config()
    };
    let workers = [
        start_worker(&server, config(), Some(FORWARD)).await,
        start_worker(&server, config(), Some(FORWARD)).await,
        start_worker(&server, config(), Some(FORWARD)).await,
    ];
    let js = async_nats::jetstream::new(client.clone());

    let mut copies = tokio::task::JoinSet::new();
    for k in 0..WAITING_KEYS {
        let mut body = intent(&format!("held-{k}"), json!({"sleep_ms": 4000}));
        body["capability"] = json!("slow");
        let body = body.to_string();
        for _ in 0..WAITING_COPIES {
            let (client, body) = (client.clone(), body.clone());
            copies.spawn(async move {
                let request = async_nats::Request::new()
                    .payload(body.into())
                    .timeout(Some(Duration::from_secs(30)));
                let reply = client
                    .send_request("intents.held", request)
                    .await
                    .expect("a reply");
                serde_json::from_slice::<Value>(&reply.payload).expect("JSON")
            });
        }
    }
    // While the copies wait, the bucket's stream carries no consumer per key.
    let mut most_consumers = 0;
    let mut bucket = js.get_stream("KV_IDEMPOTENCY").await.expect("bucket");
    for _ in 0..20 {
        let consumers = bucket.info().await.expect("info").state.consumer_count;
        most_consumers = most_consumers.max(consumers);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut replies = Vec::new();
    while let Some(reply) = copies.join_next().await {
        replies.push(reply.expect("copy task"));
    }
    let failed: Vec<&Value> = replies
        .iter()
        .filter(|r| r["result"]["status"] != "Success")
        .collect();
    assert_eq!(replies.len(), WAITING_KEYS * WAITING_COPIES);
    assert!(
        failed.is_empty(),
        "{} copies not answered Success, e.g. {}",
        failed.len(),
        failed[0]
    );
    assert_eq!(upstream.total() as usize, WAITING_KEYS, "each key once");
    assert!(upstream.duplicates().is_empty());
    assert!(
        most_consumers <= 2 * workers.len(),
        "{most_consumers} consumers on the bucket"
    );
    for worker in workers {
        worker.stop().await;
    }
}

#[tokio::test]
async fn a_byte_identical_copy_is_replayed_by_its_digest_and_other_bytes_are_decoded() {
    let Rig {
        server,
        client,
        upstream,
    } = Rig::start().await;
    let worker = start_worker(&server, test_config(), Some(FORWARD)).await;
    let send_bytes = |bytes: &'static str, key: Option<&'static str>| {
        let client = client.clone();
        async move {
            let mut headers = HeaderMap::new();
            if let Some(key) = key {
                headers.insert("Idempotency-Key", key);
            }
            request(&client, "intents.ok", bytes, headers).await.0
        }
    };
    let by_digest = || worker.stats.replayed_by_digest.get();
    let bytes = r#"{"intent_id":"digest-1","actor":"agent","episode":"ep","params":{"a":1,"b":2}}"#;
    let first = send_bytes(bytes, None).await;
    assert_eq!(first["replayed"], false, "{first}");
    assert_eq!(by_digest(), 0);

    let copy = send_bytes(bytes, None).await;
    assert_eq!(copy["replayed"], true, "{copy}");
    assert_eq!(copy["result"], first["result"]);
    assert_eq!(copy["stored_at"], first["stored_at"]);
    assert_eq!(
        by_digest(),
        1,
        "the same bytes are answered by their digest"
    );

    // The same intent in other bytes (params reordered): decoded, and
    // replayed from the cache all the same.
    let reordered =
        r#"{"params":{"b":2,"a":1},"episode":"ep","actor":"agent","intent_id":"digest-1"}"#;
    let replayed = worker.stats.replayed.get();
    let other = send_bytes(reordered, None).await;
    assert_eq!(other["replayed"], true, "{other}");
    assert_eq!(other["stored_at"], first["stored_at"]);
    assert_eq!(worker.stats.replayed.get(), replayed + 1);
    assert_eq!(by_digest(), 1, "other bytes are decoded");

    // The same payload under an Idempotency-Key header is another key:
    // it executes, and only then do its copies replay by digest.
    let keyed = send_bytes(bytes, Some("idem_00000000000d1935")).await;
    assert_eq!(keyed["replayed"], false, "{keyed}");
    assert_eq!(keyed["idem_key"], "idem_00000000000d1935", "{keyed}");
    let keyed_copy = send_bytes(bytes, Some("idem_00000000000d1935")).await;
    assert_eq!(keyed_copy["replayed"], true);
    assert_eq!(keyed_copy["idem_key"], "idem_00000000000d1935");
    assert_eq!(by_digest(), 2);
    // The bare payload still replays its own key's outcome: decoded once,
    // since its entry's alias is now the reordered bytes' (one per entry,
    // the latest), then by digest again.
    assert_eq!(send_bytes(bytes, None).await["idem_key"], first["idem_key"]);
    assert_eq!(by_digest(), 2);
    assert_eq!(send_bytes(bytes, None).await["idem_key"], first["idem_key"]);
    assert_eq!(by_digest(), 3);

    // The same bytes on another subject (another capability's) decode anew.
    let elsewhere = request(&client, "intents.other", bytes, HeaderMap::new())
        .await
        .0;
    assert_eq!(code(&elsewhere), "KEY_REUSED", "{elsewhere}");
    assert_eq!(by_digest(), 3);
    assert_eq!(upstream.total(), 2);
    worker.stop().await;
}

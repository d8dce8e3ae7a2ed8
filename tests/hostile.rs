//! Slow and hostile peers (issue 11, item 4), against a real nats-server.
//!
//! A `--forward hostile.{capability}` worker talks to an upstream of this
//! file's own ([`Hostile`]) that misbehaves as each intent's script says.
//! The worker must run each key once, store one outcome and answer every
//! copy with it, never let a hostile answer change a stored outcome, and
//! keep answering other keys meanwhile, when the upstream
//!
//! * never answers (the request times out: `Timeout` is stored);
//! * answers twice or fifty times to one request (the first answer counts);
//! * answers late, after the handler timeout (the `Timeout` stays);
//! * answers with a payload of the server's `max_payload` (stored as
//!   `RESULT_TOO_LARGE`), of half of it (stored whole), or with malformed
//!   bodies and status headers (each mapped as `map_reply` says, stored
//!   once, replayed identically);
//! * answers so deeply nested a value that the stored record nests deeper
//!   than a JSON reader takes (the outcome must still replay from the store);
//! * faces a client that floods one key with 2000 copies, 200 in flight,
//!   while other keys are sent: the flooded key runs once, every copy gets
//!   the same stored outcome, no other key stalls, and the `idemq serve`
//!   process's peak RSS stays under a stated bound.
//!
//! Every wait is bounded; nothing asserts a duration (one test asserts an
//! order: other keys are answered before a held key's timeout fires).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, HeaderMap, Message, Subject};
use bytes::Bytes;
use common::intents::{code, intent, intent_key, key_of};
use common::workers::{start_worker, test_config, wait_for_workers, RunningWorker, WorkerProcess};
use common::NatsServer;
use futures::StreamExt;
use idemq::store::kv::{BucketConfig, KvStore};
use idemq::store::{IdempotencyStore, Slot, StoreError, Versioned};
use idemq::{Outcome, WorkerConfig};
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// The subject template the workers forward to.
const TEMPLATE: &str = "hostile.{capability}";
/// Bound on every single wait in this file.
const BOUND: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------
// The hostile upstream
// ---------------------------------------------------------------------

/// One answer message: headers and raw body bytes.
#[derive(Clone, Debug)]
struct Answer {
    headers: Vec<(&'static str, String)>,
    body: Bytes,
}

/// An answer with this body and no headers.
fn raw(body: impl Into<Bytes>) -> Answer {
    Answer {
        headers: Vec::new(),
        body: body.into(),
    }
}

/// An answer with this JSON body.
fn value(body: Value) -> Answer {
    raw(body.to_string())
}

/// An answer with these headers and body.
fn headed(headers: &[(&'static str, &str)], body: impl Into<Bytes>) -> Answer {
    Answer {
        headers: headers.iter().map(|(n, v)| (*n, (*v).to_owned())).collect(),
        body: body.into(),
    }
}

/// A micro-service error answer (`Nats-Service-Error-Code` and text).
fn service_error(code: &str, text: &str) -> Answer {
    headed(
        &[
            ("Nats-Service-Error-Code", code),
            ("Nats-Service-Error", text),
        ],
        "",
    )
}

/// What the hostile upstream does with a request, by the intent's id.
/// An intent without a script is answered `{"done": params}` at once.
#[derive(Clone, Debug)]
enum Script {
    /// Sends all of these, back to back, to the one request.
    Answers(Vec<Answer>),
    /// Never answers.
    Never,
    /// Holds the answer until the upstream's next request (of any key)
    /// arrives, and sends it then, before handling that request: an answer
    /// that is late by construction, not by a timer.
    Late(Answer),
    /// Waits this long, then answers.
    After(Duration, Answer),
}

#[derive(Default)]
struct State {
    /// Scripts by intent id.
    scripts: HashMap<String, Script>,
    /// Requests seen per `Idem-Key`.
    executions: HashMap<String, u32>,
    /// Late answers waiting for the next request.
    held: Vec<(Subject, Answer)>,
    /// Publish errors (an answer that did not go out is a broken test).
    failed: Vec<String>,
}

/// The hostile upstream on `hostile.*`, on its own connection; aborted on drop.
struct Hostile {
    state: Arc<Mutex<State>>,
    /// Requests received.
    received: watch::Receiver<u64>,
    /// Answer messages sent and flushed to the server.
    sent: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Hostile {
    async fn start(server: &NatsServer) -> Hostile {
        let client = server.connect().await;
        let mut requests = client
            .subscribe("hostile.*")
            .await
            .expect("subscribe hostile.*");
        client.flush().await.expect("flush");
        let state = Arc::new(Mutex::new(State::default()));
        let (received_tx, received) = watch::channel(0u64);
        let (sent_tx, sent) = watch::channel(0u64);
        let sent_tx = Arc::new(sent_tx);
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut timers = JoinSet::new();
            while let Some(message) = requests.next().await {
                let (script, held) = record(&shared, &message);
                received_tx.send_modify(|n| *n += 1);
                // Whatever was held goes out first: late for its request.
                if !held.is_empty() {
                    let n = held.len() as u64;
                    for (reply, answer) in held {
                        publish(&client, &shared, reply, &answer).await;
                    }
                    flush(&client, &shared).await;
                    sent_tx.send_modify(|sent| *sent += n);
                }
                let Some(reply) = message.reply.clone() else {
                    continue;
                };
                match script {
                    Script::Never => {}
                    Script::Late(answer) => {
                        shared.lock().expect("lock").held.push((reply, answer));
                    }
                    Script::Answers(answers) => {
                        let n = answers.len() as u64;
                        for answer in &answers {
                            publish(&client, &shared, reply.clone(), answer).await;
                        }
                        flush(&client, &shared).await;
                        sent_tx.send_modify(|sent| *sent += n);
                    }
                    Script::After(delay, answer) => {
                        let (client, shared) = (client.clone(), Arc::clone(&shared));
                        let sent_tx = Arc::clone(&sent_tx);
                        timers.spawn(async move {
                            tokio::time::sleep(delay).await;
                            publish(&client, &shared, reply, &answer).await;
                            flush(&client, &shared).await;
                            sent_tx.send_modify(|sent| *sent += 1);
                        });
                    }
                }
            }
        });
        Hostile {
            state,
            received,
            sent,
            task,
        }
    }

    /// Scripts the intent with this id.
    fn script(&self, intent_id: &str, script: Script) {
        let mut state = self.state.lock().expect("lock");
        state.scripts.insert(intent_id.to_owned(), script);
    }

    /// Requests seen for the intent with this id (by its key).
    fn executions(&self, intent_id: &str) -> u32 {
        let state = self.state.lock().expect("lock");
        state
            .executions
            .get(&key_of(intent_id))
            .copied()
            .unwrap_or(0)
    }

    /// Requests seen, all keys.
    fn total(&self) -> u32 {
        self.state.lock().expect("lock").executions.values().sum()
    }

    /// Publish errors so far.
    fn failed(&self) -> Vec<String> {
        self.state.lock().expect("lock").failed.clone()
    }

    /// Waits (bounded) until at least `n` requests arrived.
    async fn wait_received(&self, n: u64) {
        wait_count(&self.received, n, "requests received").await;
    }

    /// Waits (bounded) until at least `n` answers were sent and flushed.
    async fn wait_sent(&self, n: u64) {
        wait_count(&self.sent, n, "answers sent").await;
    }

    /// Answers sent and flushed so far.
    fn sent(&self) -> u64 {
        *self.sent.borrow()
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_count(counter: &watch::Receiver<u64>, n: u64, what: &str) {
    let mut counter = counter.clone();
    tokio::time::timeout(BOUND, counter.wait_for(|seen| *seen >= n))
        .await
        .unwrap_or_else(|_| panic!("fewer than {n} {what} within {BOUND:?}"))
        .expect("the upstream is running");
}

/// Counts the request under its `Idem-Key`; returns its script and the
/// held late answers, now due.
fn record(state: &Mutex<State>, message: &Message) -> (Script, Vec<(Subject, Answer)>) {
    let key = message
        .headers
        .as_ref()
        .and_then(|h| h.get("Idem-Key"))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    let intent: Value = serde_json::from_slice(&message.payload).unwrap_or(Value::Null);
    let mut state = state.lock().expect("lock");
    *state.executions.entry(key).or_default() += 1;
    let script = intent["intent_id"]
        .as_str()
        .and_then(|id| state.scripts.get(id).cloned())
        .unwrap_or_else(|| Script::Answers(vec![value(json!({ "done": intent["params"] }))]));
    (script, std::mem::take(&mut state.held))
}

async fn publish(client: &Client, state: &Mutex<State>, reply: Subject, answer: &Answer) {
    // Without headers as a plain PUB: an empty header block would count
    // against max_payload.
    let published = if answer.headers.is_empty() {
        client.publish(reply, answer.body.clone()).await
    } else {
        let mut headers = HeaderMap::new();
        for (name, text) in &answer.headers {
            headers.insert(*name, text.as_str());
        }
        client
            .publish_with_headers(reply, headers, answer.body.clone())
            .await
    };
    if let Err(error) = published {
        state.lock().expect("lock").failed.push(error.to_string());
    }
}

async fn flush(client: &Client, state: &Mutex<State>) {
    if let Err(error) = tokio::time::timeout(BOUND, client.flush()).await {
        state.lock().expect("lock").failed.push(error.to_string());
    }
}

// ---------------------------------------------------------------------
// Talking to the worker
// ---------------------------------------------------------------------

/// Sends a request and returns the reply message (bounded; panics on none).
async fn ask(client: &Client, subject: &str, payload: Bytes) -> Message {
    let request = async_nats::Request::new()
        .payload(payload)
        .timeout(Some(BOUND));
    tokio::time::timeout(
        BOUND + Duration::from_secs(1),
        client.send_request(subject.to_owned(), request),
    )
    .await
    .unwrap_or_else(|_| panic!("request to {subject} still unanswered after {BOUND:?}"))
    .unwrap_or_else(|e| panic!("request to {subject}: {e}"))
}

/// Sends an intent; returns the reply JSON.
async fn send(client: &Client, subject: &str, body: &Value) -> Value {
    let reply = ask(client, subject, body.to_string().into()).await;
    serde_json::from_slice(&reply.payload).expect("reply is JSON")
}

/// A reply with its `replayed` flag taken out: what every copy shares.
fn shared_part(reply: &Value) -> Value {
    let mut reply = reply.clone();
    if let Some(fields) = reply.as_object_mut() {
        fields.remove("replayed");
    }
    reply
}

/// The copies of one key carry one stored outcome: `expected` (when
/// given), stamped once, with exactly the first copy not a replay, and
/// otherwise identical.
fn assert_one_stored_outcome(name: &str, copies: &[Value], expected: Option<&Value>) {
    assert!(!copies.is_empty(), "{name}: no copies");
    let first = &copies[0];
    assert!(
        first["stored_at"].is_string(),
        "{name}: not stored: {first}"
    );
    let fresh = copies.iter().filter(|c| c["replayed"] == false).count();
    assert_eq!(fresh, 1, "{name}: copies not replayed");
    for copy in copies {
        if let Some(expected) = expected {
            assert_eq!(&copy["result"], expected, "{name}: {copy}");
        }
        assert_eq!(
            shared_part(copy),
            shared_part(first),
            "{name}: copies differ"
        );
    }
}

/// Sends `count` copies of an intent one after the other.
async fn copies(client: &Client, subject: &str, body: &Value, count: usize) -> Vec<Value> {
    let mut replies = Vec::with_capacity(count);
    for _ in 0..count {
        replies.push(send(client, subject, body).await);
    }
    replies
}

/// Reads the key's record straight from the bucket (no worker cache).
async fn read_record(client: &Client, id: &str) -> Result<Option<Versioned>, StoreError> {
    let js = async_nats::jetstream::new(client.clone());
    let store = tokio::time::timeout(BOUND, KvStore::open(js, &BucketConfig::default()))
        .await
        .expect("bucket opens in time")
        .expect("bucket");
    tokio::time::timeout(BOUND, store.read(&intent_key(id)))
        .await
        .expect("read in time")
}

/// The outcome stored under the intent's key, as the bucket has it.
async fn stored_outcome(client: &Client, id: &str) -> Outcome {
    match read_record(client, id).await {
        Ok(Some(Versioned {
            slot: Slot::Record(record),
            ..
        })) => record
            .result
            .unwrap_or_else(|| panic!("{id}: the record has no outcome")),
        other => panic!("{id}: no stored record: {other:?}"),
    }
}

fn outcome(result: &Value) -> Outcome {
    serde_json::from_value(result.clone()).expect("an outcome")
}

fn config(handler_timeout: Duration) -> WorkerConfig {
    WorkerConfig {
        handler_timeout,
        ..test_config()
    }
}

/// A server, a client, the hostile upstream, and a worker forwarding to it
/// with `handler_timeout`.
async fn rig(handler_timeout: Duration) -> (NatsServer, Client, Hostile, RunningWorker) {
    let server = NatsServer::start();
    let client = server.connect().await;
    let hostile = Hostile::start(&server).await;
    let worker = start_worker(&server, config(handler_timeout), Some(TEMPLATE)).await;
    (server, client, hostile, worker)
}

// ---------------------------------------------------------------------
// 1. An upstream that never answers
// ---------------------------------------------------------------------

/// Three keys whose upstream never answers, three copies each, held while
/// twenty other keys are sent: the others are all answered before the held
/// keys' timeout fires; each held key runs once and stores `Timeout`, and
/// every copy (and later ones) replays that one record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_stores_timeout_and_stalls_no_other_key() {
    const HELD: usize = 3;
    const COPIES: usize = 3;
    const OTHERS: usize = 20;
    let (_server, client, hostile, worker) = rig(Duration::from_secs(3)).await;

    let mut held = JoinSet::new();
    let finished = Arc::new(AtomicUsize::new(0));
    for k in 0..HELD {
        let id = format!("never-{k}");
        hostile.script(&id, Script::Never);
        for _ in 0..COPIES {
            let (client, body) = (client.clone(), intent(&id, json!({ "k": k })));
            let finished = Arc::clone(&finished);
            held.spawn(async move {
                let reply = send(&client, "intents.never", &body).await;
                finished.fetch_add(1, Ordering::SeqCst);
                (k, reply)
            });
        }
    }
    // Every held key is at the upstream, unanswered.
    hostile.wait_received(HELD as u64).await;

    let mut others = JoinSet::new();
    for k in 0..OTHERS {
        let (client, body) = (
            client.clone(),
            intent(&format!("other-{k}"), json!({ "k": k })),
        );
        others.spawn(async move { (k, send(&client, "intents.ok", &body).await) });
    }
    let others = tokio::time::timeout(BOUND, others.join_all())
        .await
        .expect("the other keys are answered");
    assert_eq!(
        finished.load(Ordering::SeqCst),
        0,
        "every other key is answered while the held keys still wait"
    );
    for (k, reply) in &others {
        assert_eq!(
            reply["result"],
            json!({"status": "Success", "data": {"done": {"k": k}}}),
            "other-{k}"
        );
        assert_eq!(reply["replayed"], false);
        assert_eq!(hostile.executions(&format!("other-{k}")), 1);
    }

    let held = tokio::time::timeout(BOUND, held.join_all())
        .await
        .expect("the held keys are answered");
    for k in 0..HELD {
        let id = format!("never-{k}");
        let mut replies: Vec<Value> = held
            .iter()
            .filter(|(i, _)| *i == k)
            .map(|(_, r)| r.clone())
            .collect();
        replies.sort_by_key(|r| r["replayed"] == true);
        replies.extend(copies(&client, "intents.never", &intent(&id, json!({ "k": k })), 2).await);
        assert_one_stored_outcome(&id, &replies, Some(&json!({"status": "Timeout"})));
        assert_eq!(hostile.executions(&id), 1, "{id} ran once");
        assert_eq!(stored_outcome(&client, &id).await, Outcome::Timeout);
    }
    assert_eq!(hostile.total() as usize, HELD + OTHERS);
    assert_eq!(worker.stats.snapshot().executed as usize, HELD + OTHERS);
    assert!(hostile.failed().is_empty(), "{:?}", hostile.failed());
    worker.stop().await;
}

// ---------------------------------------------------------------------
// 2. An upstream that answers twice (or fifty times)
// ---------------------------------------------------------------------

/// Extra answers to one request are ignored: the first one is the stored
/// outcome, the key runs once, later copies replay it, and no extra answer
/// reaches the next request (a probe sent right after gets its own).
#[tokio::test]
async fn an_upstream_that_answers_twice_is_heard_once() {
    let (_server, client, hostile, worker) = rig(Duration::from_secs(2)).await;

    let many: Vec<Answer> = (1..=50).map(|n| value(json!({ "answer": n }))).collect();
    let cases: Vec<(&str, Vec<Answer>, Value)> = vec![
        (
            "twice-values",
            vec![value(json!({"answer": 1})), value(json!({"answer": 2}))],
            json!({"status": "Success", "data": {"answer": 1}}),
        ),
        (
            "twice-value-then-error",
            vec![value(json!({"answer": 1})), service_error("422", "second")],
            json!({"status": "Success", "data": {"answer": 1}}),
        ),
        (
            "twice-error-then-value",
            vec![service_error("422", "first"), value(json!({"answer": 2}))],
            json!({"status": "Error", "data": {"code": "422", "message": "first"}}),
        ),
        (
            "twice-killed-then-value",
            vec![
                headed(&[("Idem-Status", "Killed")], ""),
                value(json!({"answer": 2})),
            ],
            json!({"status": "Killed"}),
        ),
        (
            "fifty-answers",
            many,
            json!({"status": "Success", "data": {"answer": 1}}),
        ),
    ];
    for (n, (id, answers, expected)) in cases.into_iter().enumerate() {
        let count = answers.len() as u64;
        let before = hostile.sent();
        hostile.script(id, Script::Answers(answers));
        let body = intent(id, json!(null));
        let first = send(&client, "intents.twice", &body).await;
        // All its answers are at the server before the probe is sent: the
        // worker's connection gets them before the probe's answer.
        hostile.wait_sent(before + count).await;
        let probe = format!("probe-{n}");
        let reply = send(&client, "intents.ok", &intent(&probe, json!({ "n": n }))).await;
        assert_eq!(
            reply["result"],
            json!({"status": "Success", "data": {"done": {"n": n}}}),
            "{id}: an extra answer reached the next request"
        );
        let mut replies = vec![first];
        replies.extend(copies(&client, "intents.twice", &body, 3).await);
        assert_one_stored_outcome(id, &replies, Some(&expected));
        assert_eq!(hostile.executions(id), 1, "{id} ran once");
        assert_eq!(
            stored_outcome(&client, id).await,
            outcome(&expected),
            "{id}"
        );
    }
    assert!(hostile.failed().is_empty(), "{:?}", hostile.failed());
    worker.stop().await;
}

// ---------------------------------------------------------------------
// 3. An upstream that answers late
// ---------------------------------------------------------------------

/// An answer after the handler timeout changes nothing: `Timeout` is
/// stored, stays stored, and every copy replays it. The held answers go
/// out as the next request (a probe) reaches the upstream, so they reach
/// the worker while that probe is in flight, before its own answer: the
/// probe still gets its own. One late answer comes by a timer instead.
#[tokio::test]
async fn a_late_answer_never_changes_a_stored_timeout() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let hostile = Hostile::start(&server).await;
    let timeout = Duration::from_secs(1);
    let worker = start_worker(&server, config(timeout), Some(TEMPLATE)).await;

    let cases: Vec<(&str, Script)> = vec![
        ("late-value", Script::Late(value(json!({"late": true})))),
        ("late-error", Script::Late(service_error("422", "late"))),
        (
            "late-killed",
            Script::Late(headed(&[("Idem-Status", "Killed")], "")),
        ),
        (
            "late-by-timer",
            Script::After(timeout * 2, value(json!({"late": true}))),
        ),
    ];
    for (n, (id, script)) in cases.into_iter().enumerate() {
        let before = hostile.sent();
        hostile.script(id, script);
        let body = intent(id, json!(null));
        let first = send(&client, "intents.late", &body).await;
        assert_eq!(first["result"], json!({"status": "Timeout"}), "{id}");
        let probe = format!("late-probe-{n}");
        let reply = send(&client, "intents.ok", &intent(&probe, json!({ "n": n }))).await;
        assert_eq!(
            reply["result"],
            json!({"status": "Success", "data": {"done": {"n": n}}}),
            "{id}: the late answer reached the next request"
        );
        // The late answer and the probe's are both out.
        hostile.wait_sent(before + 2).await;
        // A second probe: the worker has read everything sent before it.
        let again = send(&client, "intents.ok", &intent(&probe, json!({ "n": n }))).await;
        assert_eq!(again["result"], reply["result"]);
        let mut replies = vec![first];
        replies.extend(copies(&client, "intents.late", &body, 3).await);
        assert_one_stored_outcome(id, &replies, Some(&json!({"status": "Timeout"})));
        assert_eq!(hostile.executions(id), 1, "{id} ran once");
        assert_eq!(stored_outcome(&client, id).await, Outcome::Timeout, "{id}");
    }
    assert!(hostile.failed().is_empty(), "{:?}", hostile.failed());
    worker.stop().await;
}

// ---------------------------------------------------------------------
// 4. Huge and malformed answers
// ---------------------------------------------------------------------

/// A JSON string answer of `bytes` bytes, quotes included.
fn json_string_of(bytes: usize) -> Bytes {
    format!("\"{}\"", "x".repeat(bytes - 2)).into()
}

/// Answers of the server's whole `max_payload`: a JSON string (its record
/// cannot be stored: `RESULT_TOO_LARGE`), a body that is not JSON
/// (`UPSTREAM_BAD_REPLY`), and a JSON string of half of it (fits: stored
/// whole). Each runs once and every copy gets the same reply.
#[tokio::test]
async fn huge_answers_are_stored_once_whole_or_as_result_too_large() {
    let (_server, client, hostile, worker) = rig(Duration::from_secs(5)).await;
    let max = client.server_info().max_payload;

    hostile.script("huge-json", Script::Answers(vec![raw(json_string_of(max))]));
    let replies = copies(&client, "intents.huge", &intent("huge-json", json!(1)), 3).await;
    assert_eq!(code(&replies[0]), "RESULT_TOO_LARGE", "{}", replies[0]);
    assert_one_stored_outcome("huge-json", &replies, None);
    let stored = stored_outcome(&client, "huge-json").await;
    assert_eq!(stored, outcome(&replies[0]["result"]));

    hostile.script("huge-not-json", Script::Answers(vec![raw(vec![b'x'; max])]));
    let replies = copies(
        &client,
        "intents.huge",
        &intent("huge-not-json", json!(2)),
        3,
    )
    .await;
    assert_eq!(code(&replies[0]), "UPSTREAM_BAD_REPLY", "{}", replies[0]);
    assert_one_stored_outcome("huge-not-json", &replies, None);

    let half = max / 2;
    hostile.script(
        "huge-fits",
        Script::Answers(vec![raw(json_string_of(half))]),
    );
    let replies = copies(&client, "intents.huge", &intent("huge-fits", json!(3)), 3).await;
    let expected = json!({"status": "Success", "data": "x".repeat(half - 2)});
    assert_one_stored_outcome("huge-fits", &replies, Some(&expected));
    assert_eq!(
        stored_outcome(&client, "huge-fits").await,
        outcome(&expected)
    );

    for id in ["huge-json", "huge-not-json", "huge-fits"] {
        assert_eq!(hostile.executions(id), 1, "{id} ran once");
    }
    assert!(hostile.failed().is_empty(), "{:?}", hostile.failed());
    worker.stop().await;
}

/// Every malformed body and odd status header maps as `map_reply` says,
/// is stored once, and every copy replays it identically.
#[tokio::test]
async fn malformed_answers_are_stored_once_and_replayed_identically() {
    let (_server, client, hostile, worker) = rig(Duration::from_secs(5)).await;

    let bad = json!({"status": "Error", "data": {
        "code": "UPSTREAM_BAD_REPLY", "message": "the upstream reply is not JSON"}});
    let error = |code: &str, message: &str| json!({"status": "Error", "data": {"code": code, "message": message}});
    let success = |data: Value| json!({"status": "Success", "data": data});
    let too_deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let cases: Vec<(&str, Answer, Value)> = vec![
        ("not-json", raw("this is not json"), bad.clone()),
        ("not-utf8", raw(vec![0xff, 0xfe, 0xfd]), bad.clone()),
        (
            "not-utf8-in-a-string",
            raw(b"\"\xff\xfe\"".to_vec()),
            bad.clone(),
        ),
        ("lone-surrogate", raw(r#""\ud800""#), bad.clone()),
        ("truncated", raw(r#"{"a":"#), bad.clone()),
        ("trailing-garbage", raw(r#"{"a":1} x"#), bad.clone()),
        ("whitespace-only", raw("   "), bad.clone()),
        ("byte-order-mark", raw("\u{feff}{}"), bad.clone()),
        ("number-out-of-range", raw("1e400"), bad.clone()),
        ("nested-200-deep", raw(too_deep), bad.clone()),
        ("an-array", raw("[1,2,3]"), success(json!([1, 2, 3]))),
        (
            "a-string",
            raw(r#""just text""#),
            success(json!("just text")),
        ),
        ("a-number", raw("42"), success(json!(42))),
        ("a-boolean", raw("true"), success(json!(true))),
        ("json-null", raw("null"), success(Value::Null)),
        ("empty-body", raw(""), success(Value::Null)),
        (
            "duplicate-fields",
            raw(r#"{"a":1,"a":2}"#),
            success(json!({"a": 2})),
        ),
        (
            "a-non-numeric-code",
            service_error("abc", "weird"),
            error("abc", "weird"),
        ),
        (
            "a-negative-code",
            service_error("-503", "negative"),
            error("-503", "negative"),
        ),
        (
            "a-code-without-text",
            headed(&[("Nats-Service-Error-Code", "499")], r#"{"ignored":1}"#),
            error("499", ""),
        ),
        (
            "lowercase-killed",
            headed(&[("Idem-Status", "killed")], ""),
            success(Value::Null),
        ),
        (
            "killed-with-a-body",
            headed(&[("Idem-Status", "Killed")], r#"{"x":1}"#),
            json!({"status": "Killed"}),
        ),
        (
            "status-timeout-with-a-body",
            headed(&[("Idem-Status", "Timeout")], r#"{"x":1}"#),
            success(json!({"x": 1})),
        ),
        (
            "killed-and-an-error-code",
            headed(
                &[
                    ("Idem-Status", "Killed"),
                    ("Nats-Service-Error-Code", "422"),
                    ("Nats-Service-Error", "both"),
                ],
                "",
            ),
            error("422", "both"),
        ),
    ];
    let count = cases.len();
    for (id, answer, expected) in cases {
        hostile.script(id, Script::Answers(vec![answer]));
        let replies = copies(&client, "intents.malformed", &intent(id, json!(null)), 3).await;
        assert_one_stored_outcome(id, &replies, Some(&expected));
        assert_eq!(hostile.executions(id), 1, "{id} ran once");
        assert_eq!(
            stored_outcome(&client, id).await,
            outcome(&expected),
            "{id}"
        );
    }
    assert_eq!(hostile.total() as usize, count);
    assert_eq!(worker.stats.snapshot().executed as usize, count);
    assert!(hostile.failed().is_empty(), "{:?}", hostile.failed());
    worker.stop().await;
}

/// README: an upstream error code "500 or above" is transient (not
/// stored; the next copy runs again). A code above `u32::MAX` is above
/// 500 too.
#[tokio::test]
async fn an_error_code_above_u32_is_transient_as_documented() {
    let (_server, client, hostile, worker) = rig(Duration::from_secs(5)).await;

    for (id, code_text) in [("code-503", "503"), ("code-5000000000", "5000000000")] {
        hostile.script(
            id,
            Script::Answers(vec![service_error(code_text, "try later")]),
        );
        let replies = copies(&client, "intents.malformed", &intent(id, json!(null)), 2).await;
        for reply in &replies {
            assert_eq!(code(reply), code_text, "{id}: {reply}");
            assert_eq!(reply["stored_at"], Value::Null, "{id}: stored: {reply}");
            assert_eq!(reply["replayed"], false, "{id}");
        }
        assert_eq!(hostile.executions(id), 2, "{id}: each copy runs again");
    }
    worker.stop().await;
}

/// The deepest answer a JSON reader takes at the top level (127 nested
/// arrays: serde_json's limit is 128) is valid, but its record would wrap
/// it two levels deeper, past what any worker (or client) can read back.
/// Such an outcome is stored as `RESULT_TOO_LARGE` (an outcome nested over
/// `MAX_OUTCOME_DEPTH`), and one at that depth as the value itself: either
/// way a second worker, whose cache is empty, replays it from the store,
/// and the key runs once.
#[tokio::test]
async fn a_deeply_nested_answer_is_stored_readably_and_replayed_from_the_store() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let hostile = Hostile::start(&server).await;
    let cases = [
        ("deep", 127, Some("RESULT_TOO_LARGE")),
        ("deep-ok", idemq::outcome::MAX_OUTCOME_DEPTH, None),
    ];
    for (id, depth, _) in &cases {
        let nested = format!("{}{}", "[".repeat(*depth), "]".repeat(*depth));
        assert!(
            serde_json::from_str::<Value>(&nested).is_ok(),
            "a valid reply"
        );
        hostile.script(id, Script::Answers(vec![raw(nested)]));
    }
    let status = |reply: &Message| {
        let headers = reply.headers.clone().unwrap_or_default();
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        (
            get("Idem-Status"),
            get("Idem-Replayed"),
            get("Idem-Error-Code"),
        )
    };
    let expected = |code: Option<&str>, replayed: &str| {
        let status = if code.is_some() { "Error" } else { "Success" };
        (
            Some(status.to_owned()),
            Some(replayed.to_owned()),
            code.map(str::to_owned),
        )
    };
    let first_worker = start_worker(&server, config(Duration::from_secs(5)), Some(TEMPLATE)).await;
    for (id, _, code) in &cases {
        let body: Bytes = intent(id, json!(null)).to_string().into();
        let first = ask(&client, &format!("intents.{id}"), body).await;
        assert_eq!(
            status(&first),
            expected(*code, "false"),
            "{id}: the first copy runs: {}",
            String::from_utf8_lossy(&first.payload)
        );
    }
    first_worker.stop().await;

    // A worker that never saw the keys: it has only the store to go by.
    let second_worker = start_worker(&server, config(Duration::from_secs(5)), Some(TEMPLATE)).await;
    for (id, _, code) in &cases {
        let body: Bytes = intent(id, json!(null)).to_string().into();
        let copy = ask(&client, &format!("intents.{id}"), body).await;
        let read = read_record(&client, id).await;
        assert_eq!(hostile.executions(id), 1, "{id}: the key ran once");
        assert_eq!(
            status(&copy),
            expected(*code, "true"),
            "{id}: a copy on another worker replays the stored outcome; got {}\n(the bucket read: {read:?})",
            String::from_utf8_lossy(&copy.payload)
        );
        assert!(
            matches!(
                read,
                Ok(Some(Versioned {
                    slot: Slot::Record(_),
                    ..
                }))
            ),
            "{id}: the stored record reads back: {read:?}"
        );
    }
    second_worker.stop().await;
}

// ---------------------------------------------------------------------
// 5. A client that floods one key
// ---------------------------------------------------------------------

/// 2000 copies of one key (64 KiB each, so 125 MiB in all), at most 200 in
/// flight, against `idemq serve`; the upstream holds that key for a second
/// while 50 other keys are sent in between. The flooded key runs once and
/// every copy gets the one stored outcome; every other key is answered
/// (bounded waits), once each; and the worker's peak RSS stays under
/// 128 MiB (keeping every copy would take more than that alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_key_runs_once_stalls_no_other_key_and_memory_stays_bounded() {
    const COPIES: usize = 2000;
    const IN_FLIGHT: usize = 200;
    const OTHERS: usize = 50;
    const PAD: usize = 64 * 1024;
    const RSS_BOUND: u64 = 128 << 20;
    let server = NatsServer::start();
    let client = server.connect().await;
    let hostile = Hostile::start(&server).await;
    hostile.script(
        "flood",
        Script::After(Duration::from_secs(1), value(json!({"flooded": true}))),
    );
    let mut worker = WorkerProcess::serve(
        &server.url(),
        &["--forward", TEMPLATE, "--handler-timeout", "5s"],
    );
    wait_for_workers(&client, 1).await;
    let started_rss = worker.rss();

    let flood: Bytes = intent("flood", json!({ "pad": "p".repeat(PAD) }))
        .to_string()
        .into();
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let every = COPIES / OTHERS;
    let mut flooded = JoinSet::new();
    let mut others = JoinSet::new();
    let sending = async {
        for i in 0..COPIES {
            let permit = Arc::clone(&permits)
                .acquire_owned()
                .await
                .expect("semaphore open");
            let (copy_client, body) = (client.clone(), flood.clone());
            flooded.spawn(async move {
                let reply = ask(&copy_client, "intents.flood", body).await;
                drop(permit);
                serde_json::from_slice::<Value>(&reply.payload).expect("reply is JSON")
            });
            if i % every == every / 2 {
                let k = i / every;
                let (client, body) = (
                    client.clone(),
                    intent(&format!("other-{k}"), json!({ "k": k })),
                );
                others.spawn(async move { (k, send(&client, "intents.ok", &body).await) });
            }
        }
    };
    tokio::time::timeout(BOUND * 3, sending)
        .await
        .expect("every copy is sent");
    let flooded = tokio::time::timeout(BOUND, flooded.join_all())
        .await
        .expect("every copy is answered");
    let others = tokio::time::timeout(BOUND, others.join_all())
        .await
        .expect("every other key is answered");
    let peak = worker.peak_rss();
    eprintln!(
        "idemq serve RSS: {} KiB after start, peak {} KiB (bound {} KiB)",
        started_rss >> 10,
        peak >> 10,
        RSS_BOUND >> 10
    );

    assert_eq!(flooded.len(), COPIES);
    assert_one_stored_outcome(
        "flood",
        &flooded,
        Some(&json!({"status": "Success", "data": {"flooded": true}})),
    );
    assert_eq!(hostile.executions("flood"), 1, "the flooded key ran once");
    assert_eq!(others.len(), OTHERS);
    for (k, reply) in &others {
        assert_eq!(
            reply["result"],
            json!({"status": "Success", "data": {"done": {"k": k}}}),
            "other-{k}"
        );
        assert_eq!(hostile.executions(&format!("other-{k}")), 1, "other-{k}");
    }
    assert_eq!(hostile.total() as usize, 1 + OTHERS, "one run per key");
    assert!(hostile.failed().is_empty(), "{:?}", hostile.failed());
    assert!(
        peak < RSS_BOUND,
        "idemq serve peaked at {} KiB, over {} KiB",
        peak >> 10,
        RSS_BOUND >> 10
    );
    worker.signal("-TERM");
    let status = worker.wait(BOUND).await;
    assert!(status.success(), "idemq serve exits cleanly: {status}");
}

// ---------------------------------------------------------------------
// 6. Random discovery and status requests
// ---------------------------------------------------------------------

/// `$SRV.PING|INFO|STATS` (bare, by name, by name and id) and the status
/// endpoint, each asked with random payloads and headers: every answer is a
/// JSON object, the worker keeps its registration, and intents are still
/// executed afterwards.
#[tokio::test]
async fn random_service_requests_get_json_and_stop_nothing() {
    let (_server, client, _hostile, worker) = rig(Duration::from_secs(2)).await;
    let pong = request_json(&client, "$SRV.PING.idemq", Bytes::new(), HeaderMap::new()).await;
    let id = pong["id"].as_str().expect("service id").to_owned();
    let info = request_json(
        &client,
        &format!("$SRV.INFO.idemq.{id}"),
        Bytes::new(),
        HeaderMap::new(),
    )
    .await;
    let status = format!(
        "idemq.status.{}",
        info["metadata"]["instance"].as_str().expect("instance")
    );
    let subjects = [
        "$SRV.PING".to_owned(),
        "$SRV.INFO".to_owned(),
        "$SRV.STATS".to_owned(),
        "$SRV.PING.idemq".to_owned(),
        "$SRV.INFO.idemq".to_owned(),
        "$SRV.STATS.idemq".to_owned(),
        format!("$SRV.PING.idemq.{id}"),
        format!("$SRV.INFO.idemq.{id}"),
        format!("$SRV.STATS.idemq.{id}"),
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..300u64 {
        let len = next(600) as usize;
        let payload: Vec<u8> = (0..len).map(|_| next(256) as u8).collect();
        let mut headers = HeaderMap::new();
        if next(2) == 0 {
            headers.insert("Nats-Service-Error-Code", "500");
            headers.insert("Idempotency-Key", format!("junk-{round}").as_str());
        }
        let subject = if next(10) == 0 {
            status.clone()
        } else {
            subjects[next(subjects.len() as u64) as usize].clone()
        };
        let answer = request_json(&client, &subject, payload.into(), headers).await;
        assert!(answer.is_object(), "{subject}: {answer}");
    }
    let after = request_json(
        &client,
        &format!("$SRV.PING.idemq.{id}"),
        Bytes::new(),
        HeaderMap::new(),
    )
    .await;
    assert_eq!(after["id"], id, "still registered");
    let reply = send(&client, "intents.ok", &intent("after-srv", json!(1))).await;
    assert_eq!(reply["result"]["status"], "Success", "{reply}");
    worker.stop().await;
}

/// A request answered with JSON (bounded); panics on anything else.
async fn request_json(client: &Client, subject: &str, payload: Bytes, headers: HeaderMap) -> Value {
    let request = async_nats::Request::new()
        .payload(payload)
        .headers(headers)
        .timeout(Some(Duration::from_secs(5)));
    let reply = client
        .send_request(subject.to_owned(), request)
        .await
        .unwrap_or_else(|e| panic!("{subject}: {e}"));
    serde_json::from_slice(&reply.payload)
        .unwrap_or_else(|e| panic!("{subject}: not JSON ({e}): {:?}", reply.payload))
}

//! The examples run: `examples/embed.rs` and `examples/run_once.rs` as
//! built binaries, and `examples/python/agent.py` against an in-process
//! worker.
//!
//! `cargo test` builds the examples before it runs the tests, so the embed
//! binary sits in `target/<profile>/examples/`, beside the `deps/` directory
//! that holds this test binary. `cargo test --test examples` alone does not
//! build examples: the test refuses an embed binary older than its sources
//! rather than run a stale one (`cargo build --example embed` first).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use common::intents::code;
use common::workers::{send, start_worker, test_config};
use common::NatsServer;
use idemq::IdempotencyKey;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// How long the embed example may take to print its `ready` line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one run of the Python agent may take.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// What to run when Python or nats-py is missing.
const PYTHON_HINT: &str = "pip install -r examples/python/requirements.txt";

/// The built `embed` example, with its stdout read line by line; killed on drop.
struct EmbedExample {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl EmbedExample {
    /// Starts the example against `url` and waits for its `ready` line.
    async fn start(url: &str) -> EmbedExample {
        let mut child = spawn_example("embed", &["--nats-url", url]);
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut example = EmbedExample {
            child,
            stdout: BufReader::new(stdout).lines(),
        };
        let ready = example.event("ready", READY_TIMEOUT).await;
        assert_eq!(ready["subject"], "intents.>", "{ready}");
        example
    }

    /// Reads stdout until a JSON line with `"event": event`, at most `bound`.
    async fn event(&mut self, event: &str, bound: Duration) -> Value {
        let read = async {
            while let Some(line) = self.stdout.next_line().await.expect("read stdout") {
                let parsed: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"));
                if parsed["event"] == event {
                    return parsed;
                }
            }
            panic!("the embed example closed stdout before printing {event:?}");
        };
        tokio::time::timeout(bound, read)
            .await
            .unwrap_or_else(|_| panic!("no {event:?} line from the embed example within {bound:?}"))
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    async fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().expect("the example is still running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid}");
        tokio::time::timeout(EXIT_TIMEOUT, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!("the embed example still runs {EXIT_TIMEOUT:?} after SIGTERM")
            })
            .expect("wait for the embed example")
    }
}

/// Starts the built example `name` with `args`, stdout piped; killed on drop.
fn spawn_example(name: &str, args: &[&str]) -> Child {
    let bin = example_bin(name);
    let level = std::env::var("IDEMQ_TEST_LOG").unwrap_or_else(|_| "error".to_owned());
    Command::new(&bin)
        .args(args)
        .env("RUST_LOG", level)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()))
}

/// `target/<profile>/examples/<name>`, found from this test binary's path
/// (`target/<profile>/deps/examples-<hash>`).
fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps/");
    let bin = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "{} is missing ({e}): run `cargo test`, or `cargo build --example {name}` before `cargo test --test examples`",
                bin.display()
            )
        });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = [
        root.join("examples").join(format!("{name}.rs")),
        root.join("src"),
        root.join("Cargo.toml"),
    ];
    let newest = sources.iter().filter_map(|p| newest_mtime(p)).max();
    assert!(
        newest.is_none_or(|newest| newest <= built),
        "{} is older than its sources: run `cargo test`, or `cargo build --example {name}` before `cargo test --test examples`",
        bin.display()
    );
    bin
}

/// The latest modification time of a file, or of any file under a directory.
fn newest_mtime(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter_map(|entry| newest_mtime(&entry.path()))
        .max()
}

/// A `charge` intent for the embed example's ledger.
fn charge(intent_id: &str, params: Value) -> Value {
    json!({
        "intent_id": intent_id,
        "actor": "billing-agent",
        "episode": "ep-examples",
        "params": params,
    })
}

/// What every copy of one intent must agree on.
fn stored_view(reply: &Value) -> Value {
    json!({
        "idem_key": reply["idem_key"],
        "intent_id": reply["intent_id"],
        "result": reply["result"],
        "stored_at": reply["stored_at"],
        "expires_at": reply["expires_at"],
    })
}

/// Asserts that the copies of one intent got one execution and one answer:
/// exactly one `replayed: false`, the others `true`, all else identical.
fn assert_one_execution(replies: &[Value]) {
    let fresh = replies.iter().filter(|r| r["replayed"] == false).count();
    let replayed = replies.iter().filter(|r| r["replayed"] == true).count();
    assert_eq!(
        (fresh, replayed),
        (1, replies.len() - 1),
        "one execution, the rest replays: {replies:#?}"
    );
    assert!(!replies[0]["stored_at"].is_null(), "stored: {}", replies[0]);
    for reply in replies {
        assert_eq!(
            stored_view(reply),
            stored_view(&replies[0]),
            "every copy gets the same answer"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_example_runs_each_key_once_and_stops_on_sigterm() {
    const KEYS: usize = 4;
    const COPIES: usize = 3;
    let server = NatsServer::start();
    let mut example = EmbedExample::start(&server.url()).await;
    let client = server.connect().await;

    // Every intent sent COPIES times at once: duplicates racing each other.
    let intents: Vec<Value> = (0..KEYS)
        .map(|i| {
            let params = json!({"account": format!("acct-{}", i % 2), "amount": 10 * (i + 1)});
            charge(&format!("charge-{i}"), params)
        })
        .collect();
    let copies = intents
        .iter()
        .flat_map(|intent| std::iter::repeat_n(intent, COPIES))
        .map(|intent| send(&client, "intents.charge", intent));
    let replies = futures::future::join_all(copies).await;
    let mut charge_nos = BTreeSet::new();
    let mut balances: HashMap<String, i64> = HashMap::new();
    for (intent, replies) in intents.iter().zip(replies.chunks(COPIES)) {
        assert_one_execution(replies);
        let result = &replies[0]["result"];
        assert_eq!(result["status"], "Success", "{result}");
        let data = &result["data"];
        assert_eq!(data["amount"], intent["params"]["amount"], "{data}");
        charge_nos.insert(data["charge_no"].as_u64().expect("charge_no"));
        let account = data["account"].as_str().expect("account").to_owned();
        let balance = data["balance"].as_i64().expect("balance");
        let highest = balances.entry(account).or_default();
        *highest = (*highest).max(balance);
    }
    // One charge applied per key: numbers 1..=KEYS, and each account's last
    // balance is the sum of its amounts, once each.
    assert_eq!(charge_nos, (1..=KEYS as u64).collect::<BTreeSet<_>>());
    let expected: HashMap<String, i64> = HashMap::from([
        ("acct-0".to_owned(), 10 + 30),
        ("acct-1".to_owned(), 20 + 40),
    ]);
    assert_eq!(balances, expected);

    // A later client retry of an answered intent: a replay, not a charge.
    let late = send(&client, "intents.charge", &intents[0]).await;
    assert_eq!(late["replayed"], true, "{late}");
    assert_eq!(stored_view(&late), stored_view(&replies[0]));

    // Bad params: a definite error, stored and replayed like a value.
    let bad = charge("charge-bad", json!({"account": "acct-0", "amount": -5}));
    let first = send(&client, "intents.charge", &bad).await;
    let second = send(&client, "intents.charge", &bad).await;
    assert_eq!(code(&first), "BAD_PARAMS", "{first}");
    assert_one_execution(&[first, second]);

    // A transient failure: not stored, so the retry with the same key runs again.
    let flaky = charge(
        "charge-flaky",
        json!({"account": "acct-2", "amount": 7, "flaky": true}),
    );
    let failed = send(&client, "intents.charge", &flaky).await;
    assert_eq!(code(&failed), "503", "{failed}");
    assert_eq!(failed["replayed"], false, "{failed}");
    assert!(failed["stored_at"].is_null(), "not stored: {failed}");
    let retried = send(&client, "intents.charge", &flaky).await;
    let again = send(&client, "intents.charge", &flaky).await;
    assert_eq!(
        retried["result"]["data"]["charge_no"],
        KEYS + 1,
        "{retried}"
    );
    assert_eq!(retried["result"]["data"]["balance"], 7, "{retried}");
    assert_one_execution(&[retried, again]);

    // A capability the ledger does not have: retry later, nothing stored.
    let refund = send(&client, "intents.refund", &charge("refund-1", json!({}))).await;
    assert_eq!(code(&refund), "NO_HANDLER", "{refund}");

    let status = example.terminate().await;
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    let stopped = example.event("stopped", EXIT_TIMEOUT).await;
    let stats = &stopped["stats"];
    // KEYS charges, the bad-params error and the flaky charge's second try.
    assert_eq!(stats["executed"], KEYS + 2, "{stopped}");
    // The 503 and the NO_HANDLER: both released, neither stored.
    assert_eq!(stats["transient"], 2, "{stopped}");
}

/// One `POST /charge` to the run-once example: status, `Idempotent-Replayed`, body.
fn post_charge(addr: &str, key: &str, body: &Value) -> (u16, Option<String>, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .post(format!("http://{addr}/charge"))
        .header("Idempotency-Key", key)
        .send(body.to_string())
        .expect("POST /charge");
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.body_mut().read_to_string().expect("body");
    (response.status().as_u16(), replayed, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_example_charges_once_per_http_idempotency_key() {
    const COPIES: usize = 8;
    let server = NatsServer::start();
    let url = server.url();
    let mut child = spawn_example("run_once", &["--nats-url", &url, "--listen", "127.0.0.1:0"]);
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let ready = tokio::time::timeout(READY_TIMEOUT, lines.next_line())
        .await
        .expect("a ready line in time")
        .expect("read stdout")
        .expect("a line");
    let ready: Value = serde_json::from_str(&ready).expect("JSON");
    assert_eq!(ready["event"], "ready", "{ready}");
    let addr = ready["addr"].as_str().expect("addr").to_owned();

    // COPIES concurrent duplicates of one request, from blocking clients.
    let body = json!({"account": "acme", "amount": 42});
    let copies: Vec<_> = (0..COPIES)
        .map(|_| {
            let (addr, body) = (addr.clone(), body.clone());
            tokio::task::spawn_blocking(move || post_charge(&addr, "order-7", &body))
        })
        .collect();
    let mut answers = Vec::new();
    for copy in copies {
        answers.push(copy.await.expect("client thread"));
    }
    for (status, _, text) in &answers {
        assert_eq!(*status, 200, "{text}");
        assert_eq!(text, &answers[0].2, "every copy gets the same bytes");
    }
    let fresh = answers
        .iter()
        .filter(|(_, replayed, _)| replayed.as_deref() == Some("false"))
        .count();
    assert_eq!(
        fresh, 1,
        "one copy executed, the rest replayed: {answers:?}"
    );
    let charged: Value = serde_json::from_str(&answers[0].2).expect("JSON");
    assert_eq!(charged["result"]["data"]["charge_no"], 1, "{charged}");

    // The same key with another body: refused, not charged.
    let (addr2, other) = (addr.clone(), json!({"account": "acme", "amount": 43}));
    let (status, _, text) =
        tokio::task::spawn_blocking(move || post_charge(&addr2, "order-7", &other))
            .await
            .expect("client thread");
    assert_eq!(status, 422, "{text}");
    let stats = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        agent
            .get(format!("http://{addr}/stats"))
            .call()
            .expect("GET /stats")
            .body_mut()
            .read_to_string()
            .expect("body")
    })
    .await
    .expect("client thread");
    let stats: Value = serde_json::from_str(&stats).expect("JSON");
    assert_eq!(stats["charges"], 1, "executions: {stats}");

    let pid = child.id().expect("running");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let status = tokio::time::timeout(EXIT_TIMEOUT, child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "clean exit: {status}");
}

/// Fails with an install hint unless `python3` can import nats-py.
async fn require_python() {
    let check = Command::new("python3")
        .args(["-c", "import nats"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(Duration::from_secs(30), check).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(_)) => panic!("nats-py is not installed for python3: {PYTHON_HINT}"),
        Ok(Err(e)) => panic!("cannot run python3 ({e}): install Python 3, then {PYTHON_HINT}"),
        Err(_) => panic!("`python3 -c 'import nats'` took over 30s: check {PYTHON_HINT}"),
    }
}

/// Runs `examples/python/agent.py` with `args`; returns its JSON summary.
async fn run_agent(url: &str, args: &[&str]) -> Value {
    let agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/agent.py");
    let run = Command::new("python3")
        .arg(&agent)
        .args(["--url", url])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(AGENT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("agent.py still runs after {AGENT_TIMEOUT:?}"))
        .expect("run python3 agent.py");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "agent.py {args:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {stdout}"))
}

/// Checks an agent summary: `count` intents, each executed once and
/// answered identically, with the echo handler's result.
fn assert_summary(summary: &Value, count: usize, copies: usize, episode: &str) {
    assert_eq!(summary["ok"], true, "{summary}");
    let intents = summary["intents"].as_array().expect("intents");
    assert_eq!(intents.len(), count, "{summary}");
    let mut keys = BTreeMap::new();
    for (i, intent) in intents.iter().enumerate() {
        let step = u32::try_from(i).expect("small index");
        let intent_id = intent["intent_id"].as_str().expect("intent_id");
        // The agent derives the key as the contract (and idemq) does.
        let key =
            IdempotencyKey::from_intent_metadata(intent_id, "python-agent", episode, Some(step));
        assert_eq!(intent["key"], key.as_str(), "{intent}");
        keys.insert(key.as_str().to_owned(), intent_id.to_owned());
        assert_eq!(intent["identical"], true, "{intent}");
        assert_eq!(intent["attempts"], json!(vec![1; copies]), "{intent}");
        let replayed = intent["replayed"].as_array().expect("replayed");
        assert_eq!(replayed.len(), copies, "{intent}");
        let fresh = replayed.iter().filter(|r| **r == false).count();
        assert_eq!(fresh, 1, "one execution per key: {intent}");
        assert!(replayed.iter().all(Value::is_boolean), "{intent}");
        let params = json!({"account": format!("acct-{}", i % 2), "amount": i + 1});
        assert_eq!(
            intent["result"],
            json!({"status": "Success", "data": {"echo": params}}),
            "{intent}"
        );
    }
    assert_eq!(keys.len(), count, "distinct keys: {summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_agent_gets_one_execution_and_identical_answers_per_key() {
    require_python().await;
    let server = NatsServer::start();
    let worker = start_worker(&server, test_config(), None).await;
    let url = server.url();

    // Each intent sent twice in a row: the second is a client retry.
    let summary = run_agent(
        &url,
        &["--count", "3", "--episode", "ep-seq", "--timeout", "5"],
    )
    .await;
    assert_summary(&summary, 3, 2, "ep-seq");
    for intent in summary["intents"].as_array().expect("intents") {
        assert_eq!(intent["replayed"], json!([false, true]), "{intent}");
    }

    // Three copies at once, the key also in the Idempotency-Key header.
    let summary = run_agent(
        &url,
        &[
            "--count",
            "2",
            "--copies",
            "3",
            "--concurrent",
            "--key-header",
            "--episode",
            "ep-concurrent",
            "--timeout",
            "5",
        ],
    )
    .await;
    assert_summary(&summary, 2, 3, "ep-concurrent");

    let stats = worker.stats.snapshot();
    assert_eq!(stats.executed, 3 + 2, "{stats:?}");
    assert_eq!(stats.replayed, 3 + 2 * 2, "{stats:?}");
    worker.stop().await;
}

//! The permission sets in `deploy/nats-auth/`, included by the server's
//! configuration as they are shipped: a worker (core or JetStream mode)
//! with exactly those permissions does all its work without a single
//! violation, one under an older set stops and names what it lacks, and an
//! agent reads only its own replies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common;
use crate::common::poll::eventually;
use crate::common::upstream::{Upstream, FORWARD};
use crate::common::workers::WorkerProcess;
use crate::common::{include_path, NatsServer};
use crate::{idemq, intent, send, send_when_ready, stderr, EXIT_BOUND, READY_BOUND};

/// The file of the permission set, as shipped.
fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/nats-auth")
        .join(name)
}

/// The worker's user, with the private inbox its shipped permissions allow.
const WORKER: [&str; 6] = [
    "--user",
    "idemq",
    "--password",
    "worker-pw",
    "--inbox-prefix",
    "_INBOX_idemq",
];
/// An agent, likewise.
const AGENT: [&str; 6] = [
    "--user",
    "agent",
    "--password",
    "agent-pw",
    "--inbox-prefix",
    "_INBOX_agent",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_permission_set_is_all_the_worker_needs() {
    let server = NatsServer::start_with_config_for(|dir| {
        format!(
            r#"
            include "{worker}"
            include "{agent}"
            authorization {{
              users: [
                {{ user: idemq, password: "worker-pw", permissions: $IDEMQ_WORKER }}
                {{ user: agent, password: "agent-pw", permissions: $IDEMQ_AGENT }}
                {{ user: upstream, password: "upstream-pw",
                   permissions: {{ subscribe: "exec.>", allow_responses: true }} }}
              ]
            }}"#,
            worker = include_path(dir, &deploy_file("worker-permissions.conf")),
            agent = include_path(dir, &deploy_file("agent-permissions.conf")),
        )
    });
    let url = server.url();
    let upstream_client = async_nats::ConnectOptions::with_user_and_password(
        "upstream".to_owned(),
        "upstream-pw".to_owned(),
    )
    .connect(url.as_str())
    .await
    .expect("upstream connects");
    let upstream = Upstream::start(&upstream_client).await;

    // Two workers, so copies of one key meet on different workers and
    // wait through a KV watch; a short lease, so the owner renews.
    let mut args: Vec<&str> = WORKER.to_vec();
    args.extend(["--forward", FORWARD, "--lease", "3s"]);
    let mut workers = [
        WorkerProcess::serve(&url, &args),
        WorkerProcess::serve(&url, &args),
    ];

    // Executed once, then replayed.
    let body = intent("perm-1", "ok", json!({"n": 1}));
    let first = send_when_ready(&url, &AGENT, &body).await;
    assert_eq!(
        first["result"],
        json!({"status": "Success", "data": {"done": {"n": 1}}}),
        "{first}"
    );
    assert_eq!(first["replayed"], false);
    let copy = send(&url, &AGENT, &body).await;
    assert_eq!(copy["replayed"], true, "{copy}");
    let key = first["idem_key"].as_str().expect("idem_key").to_owned();
    assert_eq!(upstream.executions(&key), 1);

    // Copies of a slow intent, at once: one runs (renewing its lease), the
    // others wait for its outcome, on either worker.
    let slow = intent("perm-slow", "slow", json!({"sleep_ms": 2500}));
    let copies: Vec<_> = (0..8)
        .map(|_| {
            let (url, slow) = (url.clone(), slow.clone());
            tokio::spawn(async move { send(&url, &AGENT, &slow).await })
        })
        .collect();
    let mut replies = Vec::new();
    for copy in copies {
        replies.push(copy.await.expect("copy task"));
    }
    let executed: Vec<&Value> = replies.iter().filter(|r| r["replayed"] == false).collect();
    assert_eq!(executed.len(), 1, "{replies:?}");
    for reply in &replies {
        assert_eq!(reply["result"]["status"], "Success", "{reply}");
        assert_eq!(reply["stored_at"], executed[0]["stored_at"]);
    }
    let slow_key = replies[0]["idem_key"].as_str().expect("idem_key");
    assert_eq!(upstream.executions(slow_key), 1);

    // `idemq get` works as the worker's user.
    let mut get = vec!["get", key.as_str(), "--nats-url", url.as_str()];
    get.extend(WORKER);
    let output = idemq(&get, &[]).await;
    assert!(output.status.success(), "get: {}", stderr(&output));

    for worker in &mut workers {
        worker.signal("-TERM");
    }
    for worker in &mut workers {
        assert!(worker.wait(EXIT_BOUND).await.success(), "clean exit");
    }
    no_violations(&server, "the worker");

    // A user without those permissions (an agent) cannot run a worker: it
    // stops at once, saying why.
    let mut refused = vec!["serve", "--nats-url", url.as_str()];
    refused.extend(AGENT);
    let output = idemq(&refused, &[]).await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("refused a permission") && text.contains("Permissions Violation"),
        "{text}"
    );
    // The server logs that refusal: the clean-log check above can fire.
    assert!(
        !violations(&server.log()).is_empty(),
        "the refused worker left no violation in the server log"
    );
    // The agent may publish intents, but nothing serves them now.
    let mut probe = vec!["send", "intents.echo", "{}", "--nats-url", url.as_str()];
    probe.extend(AGENT);
    let output = idemq(&probe, &[]).await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("no worker is listening"), "{text}");
}

/// The server's log lines for refused permissions. Clients are told
/// "Permissions Violation"; the server logs "Publish Violation - ..." and
/// "Subscription Violation - ...".
/// Asserts the server refused nothing `who` (a worker, a path) did: it
/// needed no more than `deploy/nats-auth/` allows.
fn no_violations(server: &NatsServer, who: &str) {
    let refused = violations(&server.log());
    assert!(
        refused.is_empty(),
        "{who} needed more than deploy/nats-auth/ allows:\n{refused}"
    );
}

fn violations(log: &str) -> String {
    log.lines()
        .filter(|line| line.contains(" Violation - "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jetstream_permission_set_is_all_a_jetstream_worker_needs() {
    let server = NatsServer::start_with_config_for(|dir| {
        format!(
            r#"
            include "{worker}"
            authorization {{
              users: [
                {{ user: idemq, password: "worker-pw", permissions: $IDEMQ_WORKER_JS }}
                {{ user: agent, password: "agent-pw",
                   permissions: {{ publish: ["intents.>", "$SRV.PING.idemq"],
                                   subscribe: ["results.>", "_INBOX.>"] }} }}
                {{ user: upstream, password: "upstream-pw",
                   permissions: {{ subscribe: "exec.>", allow_responses: true }} }}
              ]
            }}"#,
            worker = include_path(dir, &deploy_file("worker-jetstream-permissions.conf")),
        )
    });
    let url = server.url();
    let connect = |user: &str, password: &str| {
        async_nats::ConnectOptions::with_user_and_password(user.to_owned(), password.to_owned())
            .connect(url.clone())
    };
    let upstream_client = connect("upstream", "upstream-pw")
        .await
        .expect("upstream connects");
    let upstream = Upstream::start(&upstream_client).await;
    let agent = connect("agent", "agent-pw").await.expect("agent connects");
    let mut results = agent
        .subscribe("results.agent")
        .await
        .expect("subscribe results");
    agent.flush().await.expect("flush");

    let mut args: Vec<&str> = WORKER.to_vec();
    args.extend([
        "--forward",
        FORWARD,
        "--stream",
        "INTENTS",
        "--durable",
        "workers",
        // Short, so the slow intent below gets progress acks before its ack.
        "--ack-wait",
        "3s",
    ]);
    let mut worker = WorkerProcess::serve(&url, &args);
    // The worker registers once its stream and consumer exist; intents
    // published before that would reach no stream.
    common::workers::wait_for_workers(&agent, 1).await;

    // Three intents, each published twice (no Nats-Msg-Id: both copies
    // reach the stream), answered on results.agent; one runs long enough
    // to need progress acks.
    let ids = ["js-1", "js-2", "js-slow"];
    for id in ids {
        let (capability, params) = match id {
            "js-slow" => ("slow", json!({ "sleep_ms": 2500 })),
            _ => ("ok", json!({ "id": id })),
        };
        let mut body: Value =
            serde_json::from_str(&intent(id, capability, params)).expect("intent");
        body["reply_to"] = json!("results.agent");
        for _ in 0..2 {
            agent
                .publish("intents.ok", body.to_string().into())
                .await
                .expect("publish intent");
        }
    }
    agent.flush().await.expect("flush");
    let mut replies = Vec::new();
    let deadline = tokio::time::Instant::now() + READY_BOUND;
    while replies.len() < 2 * ids.len() {
        match tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut results)).await {
            Ok(Some(message)) => {
                replies.push(serde_json::from_slice::<Value>(&message.payload).expect("reply"));
            }
            _ => panic!(
                "{} of {} replies before the deadline; server log:\n{}",
                replies.len(),
                2 * ids.len(),
                violations(&server.log())
            ),
        }
    }
    for id in ids {
        let answers: Vec<&Value> = replies.iter().filter(|r| r["intent_id"] == id).collect();
        assert_eq!(answers.len(), 2, "{replies:?}");
        let executed = answers.iter().filter(|r| r["replayed"] == false).count();
        assert_eq!(executed, 1, "{answers:?}");
        assert_eq!(answers[0]["result"], answers[1]["result"]);
        let key = answers[0]["idem_key"].as_str().expect("idem_key");
        assert_eq!(upstream.executions(key), 1);
    }

    worker.signal("-TERM");
    assert!(worker.wait(EXIT_BOUND).await.success(), "clean exit");
    no_violations(&server, "a JetStream-mode worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_worker_under_the_older_permission_set_stops_and_names_what_it_lacks() {
    // The JetStream permission set as shipped before reply routes were
    // listed: `$JS.API.STREAM.NAMES`, no `STREAM.LIST`, no stream advisories.
    let server = NatsServer::start_with_config_for(|dir| {
        let shipped = std::fs::read_to_string(deploy_file("worker-jetstream-permissions.conf"))
            .expect("the shipped permissions");
        let older: Vec<&str> = shipped
            .lines()
            .filter(|line| !line.contains("$JS.EVENT.ADVISORY.STREAM."))
            .collect();
        let older = older
            .join("\n")
            .replace("\"$JS.API.STREAM.LIST\"", "\"$JS.API.STREAM.NAMES\"");
        assert!(older.contains("STREAM.NAMES") && !older.contains("STREAM.LIST"));
        let path = dir.join("older-worker-jetstream-permissions.conf");
        std::fs::write(&path, older).expect("write the older permissions");
        format!(
            r#"
            include "{worker}"
            authorization {{
              users: [
                {{ user: idemq, password: "worker-pw", permissions: $IDEMQ_WORKER_JS }}
              ]
            }}"#,
            worker = include_path(dir, &path),
        )
    });
    let url = server.url();
    let mut args = vec!["serve", "--nats-url", url.as_str()];
    args.extend(WORKER);
    args.extend(["--stream", "INTENTS", "--durable", "workers"]);
    let output = idemq(&args, &[]).await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("refused a permission") && text.contains("$JS.API.STREAM.LIST"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_jetstream_permission_set_a_worker_killed_on_the_last_delivery_leaves_a_dead_letter(
) {
    let server = NatsServer::start_with_config_for(|dir| {
        format!(
            r#"
            include "{worker}"
            authorization {{
              users: [
                {{ user: idemq, password: "worker-pw", permissions: $IDEMQ_WORKER_JS }}
                {{ user: admin, password: "admin-pw" }}
                {{ user: upstream, password: "upstream-pw",
                   permissions: {{ subscribe: "exec.>", allow_responses: true }} }}
              ]
            }}"#,
            worker = include_path(dir, &deploy_file("worker-jetstream-permissions.conf")),
        )
    });
    let url = server.url();
    let connect = |user: &str, password: &str| {
        async_nats::ConnectOptions::with_user_and_password(user.to_owned(), password.to_owned())
            .connect(url.clone())
    };
    let upstream =
        Upstream::start(&connect("upstream", "upstream-pw").await.expect("upstream")).await;
    let admin = connect("admin", "admin-pw").await.expect("admin connects");
    let js = async_nats::jetstream::new(admin.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "DLQ".to_owned(),
        subjects: vec!["idemq.dlq.INTENTS".to_owned()],
        ..Default::default()
    })
    .await
    .expect("dead-letter stream");

    let mut args: Vec<&str> = WORKER.to_vec();
    args.extend([
        "--forward",
        FORWARD,
        "--stream",
        "INTENTS",
        "--durable",
        "workers",
        "--ack-wait",
        "2s",
        // Every delivery is the last.
        "--max-deliver",
        "1",
    ]);
    let doomed = WorkerProcess::serve(&url, &args);
    common::workers::wait_for_workers(&admin, 1).await;
    let body = intent("last-delivery", "slow", json!({ "sleep_ms": 60_000 }));
    js.publish("intents.work", body.into())
        .await
        .expect("publish")
        .await
        .expect("the stream takes it");
    eventually(
        Duration::from_secs(5),
        "the first worker running it",
        async || upstream.total() == 1,
    )
    .await;
    // A second worker, then the first dies holding the intent's only delivery.
    let survivor = WorkerProcess::serve(&url, &args);
    common::workers::wait_for_workers(&admin, 2).await;
    doomed.signal("-KILL");
    drop(doomed);

    let dlq = js.get_stream("DLQ").await.expect("DLQ");
    let held = eventually(Duration::from_secs(15), "a dead letter", async || match dlq
        .get_info()
        .await
        .expect("DLQ info")
        .state
        .messages
    {
        0 => Err(format!("server log:\n{}", violations(&server.log()))),
        held => Ok(held),
    })
    .await;
    assert_eq!(
        held,
        1,
        "the dead letter is kept; server log:\n{}",
        violations(&server.log())
    );
    let letter = dlq.get_raw_message(1).await.expect("dead letter");
    assert_eq!(
        letter.headers.get("Idem-Dead-Reason").map(|v| v.as_str()),
        Some("max_deliver")
    );
    let intents = js.get_stream("INTENTS").await.expect("INTENTS");
    eventually(
        Duration::from_secs(5),
        "the dead-lettered intent removed from its stream",
        async || {
            intents
                .get_info()
                .await
                .expect("INTENTS info")
                .state
                .messages
                == 0
        },
    )
    .await;
    survivor.signal("-TERM");
    no_violations(&server, "the max-deliveries path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_shipped_permissions_an_agent_reads_only_its_own_replies() {
    let server = NatsServer::start_with_config_for(|dir| {
        format!(
            r#"
            include "{worker}"
            include "{agent}"
            authorization {{
              users: [
                {{ user: idemq, password: "worker-pw", permissions: $IDEMQ_WORKER }}
                {{ user: agent, password: "agent-pw", permissions: $IDEMQ_AGENT }}
                {{ user: other, password: "other-pw",
                   permissions: {{ publish: "intents.>", subscribe: "_INBOX_other.>" }} }}
              ]
            }}"#,
            worker = include_path(dir, &deploy_file("worker-permissions.conf")),
            agent = include_path(dir, &deploy_file("agent-permissions.conf")),
        )
    });
    let url = server.url();
    let mut worker = WorkerProcess::serve(&url, &WORKER);
    // The agent's own replies arrive on its private inbox.
    let body = intent("private-inbox", "echo", json!(1));
    let reply = send_when_ready(&url, &AGENT, &body).await;
    assert_eq!(reply["result"]["status"], "Success", "{reply}");

    // Another agent's replies, and everyone's: not the agent's to read.
    let connect = |user: &str, password: &str, prefix: &str| {
        async_nats::ConnectOptions::with_user_and_password(user.to_owned(), password.to_owned())
            .custom_inbox_prefix(prefix.to_owned())
            .connect(url.clone())
    };
    let agent = connect("agent", "agent-pw", "_INBOX_agent")
        .await
        .expect("agent");
    let mut snooping = agent.subscribe("_INBOX_other.>").await.expect("subscribe");
    let mut everyone = agent.subscribe("_INBOX.>").await.expect("subscribe");
    agent.flush().await.expect("flush");
    let other = connect("other", "other-pw", "_INBOX_other")
        .await
        .expect("other");
    let request = async_nats::Request::new()
        .payload(intent("other-agent", "echo", json!(2)).into())
        .timeout(Some(Duration::from_secs(10)));
    let answer = other
        .send_request("intents.echo", request)
        .await
        .expect("the other agent's own reply");
    assert!(!answer.payload.is_empty());
    for (what, sub) in [
        ("_INBOX_other.>", &mut snooping),
        ("_INBOX.>", &mut everyone),
    ] {
        let seen =
            tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(sub)).await;
        assert!(
            !matches!(seen, Ok(Some(_))),
            "the agent read another agent's reply through {what}"
        );
    }
    let log = server.log();
    for subject in ["_INBOX_other.>", "_INBOX.>"] {
        assert!(
            log.lines()
                .any(|l| l.contains("Subscription Violation") && l.contains(subject)),
            "the server refused the agent's subscription to {subject}:\n{}",
            violations(&log)
        );
    }
    worker.signal("-TERM");
    assert!(worker.wait(EXIT_BOUND).await.success(), "clean exit");
}

//! NATS authentication and the least-privilege permission set, through the
//! real binary against a real auth-enabled nats-server.
//!
//! Each authentication method runs end to end: a server that demands it,
//! `idemq serve` with that method's flags, `idemq send` with the same, and
//! the reply checked. The permission set in `deploy/nats-auth/` is included
//! by the server config as it is shipped; a worker with exactly those
//! permissions executes, replays, watches, forwards and stops without a
//! single permission violation, and a user without them is refused.
//!
//! The files:
//!
//! * `methods.rs`: each way to authenticate (token, user and password,
//!   nkey seed, `.creds` in operator mode, TLS with a client certificate),
//!   and the refusals (wrong secrets, unusable flags);
//! * `url_credentials.rs`: credentials typed into `--nats-url`;
//! * `permissions.rs`: the shipped permission sets (`deploy/nats-auth/`);
//! * `secrets.rs`: no secret ever printed, even at `trace`;
//! * this file: running `idemq` and sending through it, as they all do.

#[path = "../common/mod.rs"]
mod common;

mod methods;
mod permissions;
mod secrets;
mod url_credentials;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::intents::intent_for;
use common::poll::eventually;
use common::workers::{run_idemq, WorkerProcess};
use serde_json::{json, Value};

/// Bound on a worker becoming ready (answering its first intent).
const READY_BOUND: Duration = Duration::from_secs(20);
/// Bound on a worker's exit (refused, or after SIGTERM).
const EXIT_BOUND: Duration = Duration::from_secs(20);

/// Runs `idemq ARGS` (bounded) with `env` set and only warnings logged.
async fn idemq(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut vars = vec![("RUST_LOG", Some("warn"))];
    vars.extend(env.iter().map(|&(name, value)| (name, Some(value))));
    run_idemq(args, &vars).await
}

/// Runs `idemq ARGS` expecting exit status 1 with `needle` in stderr;
/// returns the stderr.
async fn refused(args: &[&str], needle: &str) -> String {
    let output = idemq(args, &[]).await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "idemq {args:?}: {text}");
    assert!(
        text.contains(needle),
        "idemq {args:?}: no {needle:?} in {text}"
    );
    text
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// An intent of this suite's own episode (`ep-auth`), as text.
fn intent(id: &str, capability: &str, params: Value) -> String {
    let mut body = intent_for(id, capability, params);
    body["episode"] = json!("ep-auth");
    body.to_string()
}

/// `idemq send` with `auth` until a worker answers (no responders while it
/// starts); the reply.
async fn send_when_ready(url: &str, auth: &[&str], intent: &str) -> Value {
    let mut args = vec!["send", "intents.echo", intent, "--nats-url", url];
    args.extend_from_slice(auth);
    eventually(READY_BOUND, "a worker answering", async || {
        let output = idemq(&args, &[]).await;
        if output.status.success() {
            Ok(serde_json::from_slice::<Value>(&output.stdout).expect("reply JSON"))
        } else {
            Err(stderr(&output))
        }
    })
    .await
}

/// `idemq send` once; the reply.
async fn send(url: &str, auth: &[&str], intent: &str) -> Value {
    let mut args = vec!["send", "intents.echo", intent, "--nats-url", url];
    args.extend_from_slice(auth);
    let output = idemq(&args, &[]).await;
    assert!(output.status.success(), "send: {}", stderr(&output));
    serde_json::from_slice(&output.stdout).expect("reply JSON")
}

/// Runs a worker with `worker_auth`, sends one intent with `agent_auth`
/// (twice: the copy is a replay), and stops the worker cleanly.
async fn echo_round_trip(url: &str, worker_auth: &[&str], agent_auth: &[&str]) {
    let mut worker = WorkerProcess::serve(url, worker_auth);
    let body = intent("auth-1", "echo", json!({"n": 1}));
    let first = send_when_ready(url, agent_auth, &body).await;
    assert_eq!(
        first["result"],
        json!({"status": "Success", "data": {"echo": {"n": 1}}}),
        "{first}"
    );
    assert_eq!(first["replayed"], false, "{first}");
    let copy = send(url, agent_auth, &body).await;
    assert_eq!(copy["replayed"], true, "{copy}");
    assert_eq!(copy["stored_at"], first["stored_at"]);
    worker.signal("-TERM");
    assert!(worker.wait(EXIT_BOUND).await.success(), "clean exit");
}

/// Writes `text` into `dir/name`; the path.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.display().to_string()
}

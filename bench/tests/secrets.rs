//! `idemq-bench` connects with idemq's authentication flags, and its
//! secrets (URL credentials, `--password`, `IDEMQ_PASSWORD`) never reach
//! its output at `trace` (the checks `tests/auth/secrets.rs` makes of `idemq`).

#[path = "../../tests/common/server.rs"]
mod common;

use std::process::Stdio;
use std::time::Duration;

use common::NatsServer;

/// Bound on one tiny bench run.
const RUN_BOUND: Duration = Duration::from_secs(120);

/// Runs `idemq-bench ARGS` at tiny counts with `env`, logging at trace:
/// whether it succeeded, and everything it printed.
async fn bench(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_idemq-bench"));
    command
        .args(args)
        .args(["--count", "4", "--concurrency", "2"])
        .args(["--rss-concurrency", "2", "--copies", "2"])
        .env("RUST_LOG", "trace")
        .env_remove("NATS_URL")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(RUN_BOUND, command.output())
        .await
        .unwrap_or_else(|_| panic!("idemq-bench {args:?} still running after {RUN_BOUND:?}"))
        .expect("run idemq-bench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// What a run shows, its arguments and its environment.
type Run<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_by_url_flag_and_env_work_and_never_print() {
    const SECRET: &str = "pw-bench-5e71c0";
    let server = NatsServer::start_with_config(&format!(
        r#"authorization {{ users: [ {{ user: idemq, password: "{SECRET}" }} ] }}"#
    ));
    let url = server.url();
    let port = server.port();
    let in_url = format!("nats://idemq:{SECRET}@127.0.0.1:{port}");
    let runs: [Run<'_>; 3] = [
        ("URL credentials", vec!["--nats-url", &in_url], vec![]),
        (
            "--password",
            vec!["--nats-url", &url, "--user", "idemq", "--password", SECRET],
            vec![],
        ),
        (
            "IDEMQ_PASSWORD",
            vec!["--nats-url", &url],
            vec![("IDEMQ_USER", "idemq"), ("IDEMQ_PASSWORD", SECRET)],
        ),
    ];
    for (what, args, env) in &runs {
        let (ok, text) = bench(args, env).await;
        assert!(ok, "idemq-bench with {what}:\n{text}");
        assert!(
            !text.contains(SECRET),
            "idemq-bench with {what} printed the secret:\n{text}"
        );
    }
    // A refused connection names the URL, masked.
    let wrong = format!("nats://idemq:wrong-{SECRET}@127.0.0.1:{port}");
    let (ok, text) = bench(&["--nats-url", &wrong], &[]).await;
    assert!(!ok, "a wrong password fails:\n{text}");
    assert!(!text.contains(SECRET), "printed the secret:\n{text}");
}

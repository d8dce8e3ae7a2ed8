//! No secret ever printed: from flags, the environment or a configuration
//! file, by any command, even at `trace`.

use serde_json::json;

use crate::common;
use crate::common::workers::{run_idemq, WorkerProcess};
use crate::common::NatsServer;
use crate::{intent, send_when_ready, write, EXIT_BOUND};

/// Runs `idemq ARGS` at `RUST_LOG=trace` and returns (status ok, stdout + stderr).
pub async fn traced(args: &[&str], env: &[(&str, Option<&str>)]) -> (bool, String) {
    let mut vars = vec![("RUST_LOG", Some("trace")), ("NATS_URL", None)];
    vars.extend_from_slice(env);
    let output = run_idemq(args, &vars).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Fails if `text` shows `secret`, or, for a secret with characters a URL
/// parser might cut it at, any piece of it between them (5 or more long).
pub fn never_shows(secret: &str, what: &str, text: &str) {
    assert!(!text.contains(secret), "{what} printed the secret:\n{text}");
    let cuts = |c: char| "/,?#@+=%:".contains(c);
    if !secret.contains(cuts) {
        return;
    }
    for piece in secret.split(cuts).filter(|piece| piece.len() >= 5) {
        assert!(
            !text.contains(piece),
            "{what} printed a piece of the secret ({piece}):\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_from_flags_env_and_config_files_never_print_at_trace() {
    const SECRET: &str = "pw-carried-9d21";
    let server = NatsServer::start_with_config(&format!(
        r#"authorization {{ users: [ {{ user: idemq, password: "{SECRET}" }} ] }}"#
    ));
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let by_flag = ["--user", "idemq", "--password", SECRET];

    // serve, its password from a config file, logging at trace.
    let config = write(
        dir.path(),
        "idemq.toml",
        &format!("user = \"idemq\"\npassword = \"{SECRET}\"\n"),
    );
    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut worker = WorkerProcess::spawn(
        std::process::Command::new(common::workers::BIN)
            .args(["serve", "--nats-url", &url, "--config", &config])
            .env("RUST_LOG", "trace")
            .stdout(std::process::Stdio::null())
            .stderr(log),
    );
    let body = intent("carried", "echo", json!(1));
    let reply = send_when_ready(&url, &by_flag, &body).await;
    let key = reply["idem_key"].as_str().expect("key").to_owned();

    let commands: Vec<(&str, Vec<&str>)> = vec![
        (
            "send",
            vec!["send", "intents.echo", &body, "--nats-url", &url],
        ),
        ("get", vec!["get", &key, "--nats-url", &url]),
        ("stats", vec!["stats", "--nats-url", &url]),
        ("purge", vec!["purge", &key, "--nats-url", &url, "--force"]),
    ];
    for (what, args) in &commands {
        // By flag, and by environment variable.
        let mut flagged = args.clone();
        flagged.extend(by_flag);
        let (ok, text) = traced(&flagged, &[]).await;
        assert!(ok, "{what} with --password:\n{text}");
        never_shows(SECRET, what, &text);
        let (_, text) = traced(
            args,
            &[
                ("IDEMQ_USER", Some("idemq")),
                ("IDEMQ_PASSWORD", Some(SECRET)),
            ],
        )
        .await;
        never_shows(SECRET, what, &text);
        // A wrong secret: the failed connection does not print it either.
        let wrong = format!("wrong-{what}-51c7");
        let mut failing = args.clone();
        failing.extend(["--user", "idemq", "--password", &wrong]);
        let (ok, text) = traced(&failing, &[]).await;
        assert!(!ok, "{what} with a wrong password must fail");
        never_shows(&wrong, what, &text);
    }
    let (ok, text) = traced(&["serve", "--config", &config, "--print-config"], &[]).await;
    assert!(ok, "{text}");
    never_shows(SECRET, "--print-config", &text);

    worker.signal("-TERM");
    assert!(worker.wait(EXIT_BOUND).await.success(), "clean exit");
    let served = std::fs::read_to_string(&log_path).expect("serve log");
    never_shows(SECRET, "serve at trace", &served);
}

//! Credentials typed into `--nats-url` (user and password, a token), with
//! every character a URL parser might stop at: they authenticate every
//! command, and never print.

use serde_json::{json, Value};

use crate::common;
use crate::common::poll::eventually;
use crate::common::workers::WorkerProcess;
use crate::common::NatsServer;
use crate::secrets::{never_shows, traced};
use crate::{intent, send_when_ready, EXIT_BOUND, READY_BOUND};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_urls_work_for_every_command_and_never_print() {
    url_credentials_work_and_never_print("pw-in-url-7f3a91", "wrong-in-url-c2d4e8", None).await;
}

/// Passwords with every character a URL parser might stop at, typed into
/// --nats-url as they are (docs/contract.md v1.2 §7), and one percent-encoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_with_url_characters_in_urls_work_and_never_print() {
    url_credentials_work_and_never_print(
        "Pw7f3a/91x2kq,c2d4e8?zz81bb#b5a1q9+xx77yy=pp44%qq",
        "Wr6c2d/4e8yy,aa91bb?cc12dd#ee34ff",
        None,
    )
    .await;
    url_credentials_work_and_never_print(
        "Enc7f3a/91x2kq,c2d4e8",
        "Bad7f3a/91x2kq,c2d4e8",
        Some("Enc7f3a%2F91x2kq%2Cc2d4e8"),
    )
    .await;
}

/// Runs every command with `secret` as the password in its URL (typed
/// `as_typed`, or as it is), and `wrong` for the failures: they
/// authenticate, and neither ever prints.
async fn url_credentials_work_and_never_print(secret: &str, wrong: &str, as_typed: Option<&str>) {
    let secret_typed = as_typed.unwrap_or(secret);
    let server = NatsServer::start_with_config(&format!(
        r#"authorization {{ users: [ {{ user: idemq, password: "{secret}" }} ] }}"#
    ));
    let port = server.port();
    let good = format!("nats://idemq:{secret_typed}@127.0.0.1:{port}");
    // A cluster list: the credentials ride on one entry, the other has none.
    let listed = format!("{good},nats://127.0.0.1:{port}");
    let bad = format!("nats://idemq:{wrong}@127.0.0.1:{port}");

    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut worker = WorkerProcess::spawn(
        std::process::Command::new(common::workers::BIN)
            .args(["serve", "--nats-url", &listed])
            .env("RUST_LOG", "trace")
            .env_remove("NATS_URL")
            .stdout(std::process::Stdio::null())
            .stderr(log),
    );
    let body = intent("url-creds", "echo", json!(1));
    let sent = eventually(READY_BOUND, "a worker answering", async || {
        let (ok, text) = traced(&["send", "intents.echo", &body, "--nats-url", &good], &[]).await;
        never_shows(secret, "send", &text);
        ok.then(|| {
            text.lines()
                .find_map(|l| serde_json::from_str::<Value>(l).ok())
        })
    })
    .await;
    let reply = sent.expect("send through URL credentials");
    assert_eq!(reply["result"]["status"], "Success", "{reply}");
    let key = reply["idem_key"].as_str().expect("key");

    for (what, args) in [
        ("get", vec!["get", key, "--nats-url", &good]),
        ("stats", vec!["stats", "--nats-url", &listed]),
        ("purge", vec!["purge", key, "--nats-url", &good]),
    ] {
        let (ok, text) = traced(&args, &[]).await;
        assert!(ok, "{what} through URL credentials:\n{text}");
        never_shows(secret, what, &text);
    }
    // Failed connections name the URL, masked.
    for (what, args) in [
        (
            "send",
            vec!["send", "intents.echo", &body, "--nats-url", &bad],
        ),
        ("get", vec!["get", key, "--nats-url", &bad]),
        ("stats", vec!["stats", "--nats-url", &bad]),
    ] {
        let (ok, text) = traced(&args, &[]).await;
        assert!(!ok, "{what} with a wrong password in the URL must fail");
        never_shows(wrong, what, &text);
        assert!(
            text.contains("idemq:***@"),
            "{what} shows the URL masked:\n{text}"
        );
    }
    // NATS_URL, and a URL credential beside an auth flag (a usage error).
    let (ok, text) = traced(&["serve", "--print-config"], &[("NATS_URL", Some(&good))]).await;
    assert!(ok, "{text}");
    never_shows(secret, "--print-config", &text);
    assert!(text.contains("idemq:***@127.0.0.1"), "{text}");
    let (ok, text) = traced(
        &[
            "send",
            "intents.echo",
            &body,
            "--nats-url",
            &good,
            "--token",
            "t",
        ],
        &[],
    )
    .await;
    assert!(!ok && text.contains("two ways to authenticate"), "{text}");
    never_shows(secret, "a conflicting send", &text);

    worker.signal("-TERM");
    assert!(worker.wait(EXIT_BOUND).await.success(), "clean exit");
    let served = std::fs::read_to_string(&log_path).expect("serve log");
    assert!(served.contains("idemq:***@"), "serve logs its URL masked");
    never_shows(secret, "serve at trace", &served);
    never_shows(secret_typed, "serve at trace", &served);
}

#[tokio::test]
async fn a_token_in_the_url_authenticates() {
    const TOKEN: &str = "url/token,5be0#x";
    let server = NatsServer::start_with_config(&format!(r#"authorization {{ token: "{TOKEN}" }}"#));
    let url = format!("nats://{TOKEN}@127.0.0.1:{}", server.port());
    let mut worker = WorkerProcess::serve(&url, &[]);
    let reply = send_when_ready(&url, &[], &intent("url-token", "echo", json!(1))).await;
    assert_eq!(reply["result"]["status"], "Success", "{reply}");
    worker.signal("-TERM");
    assert!(worker.wait(EXIT_BOUND).await.success());
}

/// A password or token with a comma, in a URL without a scheme, where the
/// text before the comma reads as `host:port` or `host`: it never prints
/// (docs/contract.md v1.2 §7). It printed as a host in front of the masked
/// rest.
#[tokio::test]
async fn credentials_with_a_comma_in_a_url_without_a_scheme_never_print() {
    for (typed, secret) in [
        ("adm7x:98761,pw9qz@127.0.0.1:4222", "98761,pw9qz"),
        ("Tk7f3a,q9x2b@127.0.0.1:4222", "Tk7f3a,q9x2b"),
    ] {
        let (ok, text) = traced(&["serve", "--print-config", "--nats-url", typed], &[]).await;
        assert!(ok, "{text}");
        never_shows(secret, "--print-config", &text);
        assert!(text.contains("***@127.0.0.1:4222"), "masked:\n{text}");
    }
}

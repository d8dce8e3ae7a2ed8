//! NATS authentication and the least-privilege permission set, through the
//! real binary against a real auth-enabled nats-server.
//!
//! Each authentication method runs end to end: a server that demands it,
//! `idemq serve` with that method's flags, `idemq send` with the same, and
//! the reply checked. The permission set in `deploy/nats-auth/` is included
//! by the server config as it is shipped; a worker with exactly those
//! permissions executes, replays, watches, forwards and stops without a
//! single permission violation, and a user without them is refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::upstream::{Upstream, FORWARD};
use common::workers::{run_idemq, WorkerProcess};
use common::{include_path, NatsServer};
use nkeys::KeyPair;
use serde_json::{json, Value};
use sha2::Digest as _;

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

fn intent(id: &str, capability: &str, params: Value) -> String {
    json!({
        "intent_id": id,
        "actor": "agent",
        "episode": "ep-auth",
        "capability": capability,
        "params": params,
    })
    .to_string()
}

/// `idemq send` with `auth` until a worker answers (no responders while it
/// starts); the reply.
async fn send_when_ready(url: &str, auth: &[&str], intent: &str) -> Value {
    let deadline = tokio::time::Instant::now() + READY_BOUND;
    loop {
        let mut args = vec!["send", "intents.echo", intent, "--nats-url", url];
        args.extend_from_slice(auth);
        let output = idemq(&args, &[]).await;
        if output.status.success() {
            return serde_json::from_slice(&output.stdout).expect("reply JSON");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no worker answered within {READY_BOUND:?}: {}",
            stderr(&output)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.display().to_string()
}

#[tokio::test]
async fn token() {
    let server = NatsServer::start_with_config(r#"authorization { token: "s3cret-token" }"#);
    let url = server.url();
    echo_round_trip(
        &url,
        &["--token", "s3cret-token"],
        &["--token", "s3cret-token"],
    )
    .await;
}

#[tokio::test]
async fn user_and_password_also_from_the_environment() {
    let server = NatsServer::start_with_config(
        r#"authorization { users: [
            { user: idemq, password: "worker-pw" }
            { user: agent, password: "agent-pw" }
        ] }"#,
    );
    let url = server.url();
    echo_round_trip(
        &url,
        &["--user", "idemq", "--password", "worker-pw"],
        &["--user", "agent", "--password", "agent-pw"],
    )
    .await;

    // The same through IDEMQ_USER and IDEMQ_PASSWORD.
    let mut worker = WorkerProcess::serve_with_env(
        &url,
        &[],
        &[("IDEMQ_USER", "idemq"), ("IDEMQ_PASSWORD", "worker-pw")],
    );
    let reply = send_when_ready(
        &url,
        &["--user", "agent", "--password", "agent-pw"],
        &intent("auth-env", "echo", json!(2)),
    )
    .await;
    assert_eq!(reply["result"]["status"], "Success", "{reply}");
    worker.signal("-TERM");
    assert!(worker.wait(EXIT_BOUND).await.success());
}

#[tokio::test]
async fn nkey_seed_file() {
    let secrets = tempfile::TempDir::new().expect("temp dir");
    let worker = KeyPair::new_user();
    let agent = KeyPair::new_user();
    let worker_seed = write(secrets.path(), "worker.nk", &worker.seed().expect("seed"));
    let agent_seed = write(secrets.path(), "agent.nk", &agent.seed().expect("seed"));
    let server = NatsServer::start_with_config(&format!(
        r#"authorization {{ users: [ {{ nkey: {} }}, {{ nkey: {} }} ] }}"#,
        worker.public_key(),
        agent.public_key()
    ));
    echo_round_trip(
        &server.url(),
        &["--nkey", &worker_seed],
        &["--nkey", &agent_seed],
    )
    .await;
}

/// A NATS JWT (v2) signed with an nkey, as `nsc` writes them: header and
/// claims base64url without padding, `jti` the base32 SHA-512/256 of the
/// claims, signature ed25519 over `header.claims`.
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let mut claims = json!({
        "jti": "",
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let digest = sha2::Sha512_256::digest(claims.to_string().as_bytes());
    claims["jti"] = Value::String(data_encoding::BASE32_NOPAD.encode(&digest));
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
    let signature = issuer.sign(input.as_bytes()).expect("sign");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// Waits (at most 10s) until the account of `creds` can create a stream.
///
/// In operator mode the server sets up an account's JetStream storage when
/// the account is first used; a stream created in that moment can fail
/// ("could not create storage directory"). A deployment's account is long in
/// use when idemq starts; this test's is brand new.
async fn wait_for_account_jetstream(url: &str, creds: &str) {
    let client = async_nats::ConnectOptions::with_credentials_file(creds)
        .await
        .expect("read creds")
        .connect(url)
        .await
        .expect("connect with creds");
    let js = async_nats::jetstream::new(client);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let config = async_nats::jetstream::stream::Config {
            name: "WARMUP".to_owned(),
            subjects: vec!["warmup".to_owned()],
            ..Default::default()
        };
        match js.create_stream(config).await {
            Ok(_) => break,
            Err(error) => assert!(
                tokio::time::Instant::now() < deadline,
                "the account cannot create a stream: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    js.delete_stream("WARMUP").await.expect("delete WARMUP");
}

/// A `.creds` file: the user JWT and the user's seed, in nsc's layout.
fn creds(jwt: &str, user: &KeyPair) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n",
        user.seed().expect("seed")
    )
}

#[tokio::test]
async fn credentials_file_in_operator_mode() {
    let operator = KeyPair::new_operator();
    let account = KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "idemq-test-operator",
        json!({"type": "operator", "version": 2}),
    );
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        // JetStream is on for an account with storage.
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "IDEMQ",
        json!({"limits": unlimited, "type": "account", "version": 2}),
    );
    // JetStream needs a system account in operator mode.
    let system = KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        json!({"type": "account", "version": 2}),
    );
    let user_claims = json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                             "type": "user", "version": 2});
    let secrets = tempfile::TempDir::new().expect("temp dir");
    let mut files = Vec::new();
    for name in ["worker", "agent"] {
        let user = KeyPair::new_user();
        let token = jwt(&account, &user.public_key(), name, user_claims.clone());
        files.push(write(
            secrets.path(),
            &format!("{name}.creds"),
            &creds(&token, &user),
        ));
    }
    let server = NatsServer::start_with_config(&format!(
        "operator: {operator_jwt}\nsystem_account: {system}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {system}: {system_jwt}\n  {account}: {account_jwt}\n}}\n",
        system = system.public_key(),
        account = account.public_key()
    ));
    wait_for_account_jetstream(&server.url(), &files[0]).await;
    echo_round_trip(
        &server.url(),
        &["--creds", &files[0]],
        &["--creds", &files[1]],
    )
    .await;

    // A user the account did not sign is refused.
    let stranger = KeyPair::new_user();
    let forged = jwt(
        &KeyPair::new_account(),
        &stranger.public_key(),
        "x",
        user_claims,
    );
    let path = write(secrets.path(), "forged.creds", &creds(&forged, &stranger));
    let url = server.url();
    let send = ["send", "intents.echo", "{}", "--nats-url", &url];
    refused(&[&send[..], &["--creds", &path]].concat(), "authorization").await;
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as
/// PEM files in `dir`.
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "idemq test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
        "nats-server",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(Vec::new(), "idemq", ExtendedKeyUsagePurpose::ClientAuth);
    Pki {
        ca: write(dir, "ca.pem", &ca.pem()),
        server_cert: write(dir, "server.pem", &server_cert),
        server_key: write(dir, "server-key.pem", &server_key),
        client_cert: write(dir, "client.pem", &client_cert),
        client_key: write(dir, "client-key.pem", &client_key),
    }
}

#[tokio::test]
async fn tls_with_a_ca_and_a_client_certificate() {
    let secrets = tempfile::TempDir::new().expect("temp dir");
    let pki = pki(secrets.path());
    let server = NatsServer::start_with_config(&format!(
        r#"tls {{
            cert_file: "{}"
            key_file: "{}"
            ca_file: "{}"
            verify: true
            timeout: 5
        }}"#,
        pki.server_cert, pki.server_key, pki.ca
    ));
    let url = format!("nats://127.0.0.1:{}", server.port());
    let tls = [
        "--tls-ca",
        pki.ca.as_str(),
        "--tls-cert",
        pki.client_cert.as_str(),
        "--tls-key",
        pki.client_key.as_str(),
    ];
    echo_round_trip(&url, &tls, &tls).await;

    // Without a client certificate the server refuses the handshake.
    let send = ["send", "intents.echo", "{}", "--nats-url", &url];
    refused(
        &[&send[..], &["--tls-ca", &pki.ca]].concat(),
        "cannot connect",
    )
    .await;
}

#[tokio::test]
async fn a_wrong_password_or_token_is_refused_with_status_1() {
    let server = NatsServer::start_with_config(
        r#"authorization { users: [ { user: idemq, password: "worker-pw" } ] }"#,
    );
    let url = server.url();
    let password = "not-the-worker-pw-7f3a";
    let serve = [
        "serve",
        "--nats-url",
        &url,
        "--user",
        "idemq",
        "--password",
        password,
    ];
    let text = refused(&serve, "authorization violation").await;
    assert!(
        !text.contains(password),
        "the password is never printed: {text}"
    );

    let server = NatsServer::start_with_config(r#"authorization { token: "right" }"#);
    let url = server.url();
    let send = [
        "send",
        "intents.echo",
        "{}",
        "--nats-url",
        &url,
        "--token",
        "wrong",
    ];
    refused(&send, "authorization violation").await;
}

#[tokio::test]
async fn unusable_auth_flags_are_usage_errors_naming_flag_and_file() {
    let secrets = tempfile::TempDir::new().expect("temp dir");
    let junk = write(secrets.path(), "junk.txt", "not a key\n");
    let missing = secrets.path().join("missing.nk").display().to_string();
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (vec!["--nkey", &missing], "--nkey", &missing),
        (vec!["--nkey", &junk], "--nkey", &junk),
        (vec!["--creds", &junk], "--creds", &junk),
        (vec!["--tls-ca", &junk], "--tls-ca", &junk),
        (
            vec!["--tls-cert", &junk, "--tls-key", &junk],
            "--tls-cert",
            &junk,
        ),
        (vec!["--token", "t", "--creds", &junk], "--creds", "--token"),
        (vec!["--user", "u"], "--user", "--password"),
    ];
    // Port 1: nothing listens; a usage error comes before any connection.
    for command in [
        vec!["send", "intents.echo", "{}"],
        vec!["serve"],
        vec!["get", "idem_0123456789abcdef"],
    ] {
        for (flags, flag, named) in &cases {
            let mut args = command.clone();
            args.extend(["--nats-url", "nats://127.0.0.1:1"]);
            args.extend(flags.iter().copied());
            let output = idemq(&args, &[]).await;
            let text = stderr(&output);
            assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
            assert!(
                text.contains(flag) && text.contains(named),
                "{args:?}: {text}"
            );
        }
    }
}

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
    let refused = violations(&server.log());
    assert!(
        refused.is_empty(),
        "the worker needed more than deploy/nats-auth/ allows:\n{refused}"
    );

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
    let refused = violations(&server.log());
    assert!(
        refused.is_empty(),
        "a JetStream-mode worker needed more than deploy/nats-auth/ allows:\n{refused}"
    );
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
    for _ in 0..100 {
        if upstream.total() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(upstream.total(), 1, "the first worker runs it");
    // A second worker, then the first dies holding the intent's only delivery.
    let survivor = WorkerProcess::serve(&url, &args);
    common::workers::wait_for_workers(&admin, 2).await;
    doomed.signal("-KILL");
    drop(doomed);

    let mut dlq = js.get_stream("DLQ").await.expect("DLQ");
    let mut held = 0;
    for _ in 0..150 {
        held = dlq.info().await.expect("DLQ info").state.messages;
        if held > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let mut intents = js.get_stream("INTENTS").await.expect("INTENTS");
    let mut left = u64::MAX;
    for _ in 0..50 {
        left = intents.info().await.expect("INTENTS info").state.messages;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        left, 0,
        "the dead-lettered intent is removed from its stream"
    );
    survivor.signal("-TERM");
    let refused = violations(&server.log());
    assert!(
        refused.is_empty(),
        "the max-deliveries path needed more than deploy/nats-auth/ allows:\n{refused}"
    );
}

/// Runs `idemq ARGS` at `RUST_LOG=trace` and returns (status ok, stdout + stderr).
async fn traced(args: &[&str], env: &[(&str, Option<&str>)]) -> (bool, String) {
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
fn never_shows(secret: &str, what: &str, text: &str) {
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
    let mut reply = None;
    for _ in 0..100 {
        let (ok, text) = traced(&["send", "intents.echo", &body, "--nats-url", &good], &[]).await;
        never_shows(secret, "send", &text);
        if ok {
            reply = text
                .lines()
                .find_map(|l| serde_json::from_str::<Value>(l).ok());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = reply.expect("send through URL credentials");
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

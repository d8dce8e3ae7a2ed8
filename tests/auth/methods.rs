//! Each authentication method end to end (token, user and password, nkey
//! seed, `.creds` in operator mode, TLS with a client certificate), and
//! what is refused: a wrong secret (exit status 1), an unusable flag or
//! file (a usage error naming it).

use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use nkeys::KeyPair;
use serde_json::{json, Value};
use sha2::Digest as _;

use crate::common::poll::eventually;
use crate::common::workers::WorkerProcess;
use crate::common::NatsServer;
use crate::{echo_round_trip, idemq, intent, refused, send_when_ready, stderr, write, EXIT_BOUND};

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
    eventually(
        Duration::from_secs(10),
        "the account creating a stream",
        async || {
            let config = async_nats::jetstream::stream::Config {
                name: "WARMUP".to_owned(),
                subjects: vec!["warmup".to_owned()],
                ..Default::default()
            };
            js.create_stream(config).await.map(drop)
        },
    )
    .await;
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

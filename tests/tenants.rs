//! Tenant-scoped keys (docs/contract.md v1.1 §5): with `--tenant-token N` the
//! N-th subject token names the tenant, and its KV key is
//! `<tenant>.<idem_key>`, so tenants sending identical intents never share
//! an outcome or a `KEY_REUSED`.

mod common;

use std::time::Duration;

use async_nats::HeaderMap;
use common::intents::{code, intent_key};
use common::poll::eventually;
use common::upstream::{Upstream, FORWARD};
use common::workers::{request, run_idemq, start_worker, test_config, WorkerProcess};
use common::{include_path, NatsServer};
use idemq::IdempotencyKey;
use serde_json::{json, Value};

/// The `Idempotency-Key` whose bits, scoped to `tenant`, are `target`'s
/// (the tenant hash is FNV-1a, run backwards here): what a tenant could
/// craft against another's key.
fn colliding_key(target: &IdempotencyKey, tenant: &str) -> IdempotencyKey {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    // PRIME's inverse modulo 2^64, by Newton's iteration from PRIME itself.
    let mut inverse = PRIME;
    for _ in 0..6 {
        inverse = inverse.wrapping_mul(2u64.wrapping_sub(PRIME.wrapping_mul(inverse)));
    }
    let mut bits = target.bits();
    for byte in tenant.bytes().rev() {
        bits = bits.wrapping_mul(inverse) ^ u64::from(byte);
    }
    let key = IdempotencyKey::parse(&format!("idem_{:016x}", bits ^ OFFSET)).expect("a key");
    let scoped = key.in_tenant(tenant).expect("a tenant");
    assert_eq!(scoped.bits(), target.bits(), "a collision");
    assert_ne!(scoped, *target);
    key
}

/// The intent every tenant sends (`same`), with `params`, as text.
fn intent(params: Value) -> String {
    common::intents::intent("same", params).to_string()
}

async fn ask(client: &async_nats::Client, subject: &str, body: String) -> Value {
    request(client, subject, body, HeaderMap::new()).await.0
}

#[tokio::test]
async fn tenants_sending_identical_intents_each_execute_once_and_never_see_each_other() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let config = idemq::WorkerConfig {
        tenant_token: Some(2),
        ..test_config()
    };
    let worker = start_worker(&server, config, Some(FORWARD)).await;
    let bare = intent_key("same");

    // The very same intent from two tenants: each runs it (replayed:
    // false), neither is answered with the other's outcome.
    let acme = ask(&client, "intents.acme.ok", intent(json!("same params"))).await;
    let globex = ask(&client, "intents.globex.ok", intent(json!("same params"))).await;
    for reply in [&acme, &globex] {
        assert_eq!(reply["result"]["status"], "Success", "{reply}");
        assert_eq!(reply["result"]["data"]["done"], "same params", "{reply}");
        assert_eq!(reply["replayed"], false, "its own execution: {reply}");
        assert_eq!(
            reply["idem_key"],
            bare.as_str(),
            "replies carry the bare key"
        );
    }
    // Copies replay their own tenant's outcome.
    for (subject, first) in [("intents.acme.ok", &acme), ("intents.globex.ok", &globex)] {
        let again = ask(&client, subject, intent(json!("same params"))).await;
        assert_eq!(again["replayed"], true);
        assert_eq!(again["stored_at"], first["stored_at"], "{subject}");
    }
    // Same key fields, another fingerprint, another tenant: no KEY_REUSED.
    let other = ask(&client, "intents.initech.ok", intent(json!("initech's"))).await;
    assert_eq!(other["replayed"], false, "{other}");
    assert_eq!(other["result"]["data"]["done"], "initech's", "{other}");
    let reused = ask(&client, "intents.acme.ok", intent(json!("changed"))).await;
    assert_eq!(
        code(&reused),
        "KEY_REUSED",
        "within a tenant the key is still one intent's"
    );
    for tenant in ["acme", "globex", "initech"] {
        let scoped = bare.in_tenant(tenant).expect("tenant");
        assert_eq!(
            upstream.executions(scoped.as_str()),
            1,
            "{tenant} executed once"
        );
    }
    assert_eq!(upstream.total(), 3);

    // A subject whose tenant token is not a KV key token.
    let refused = ask(&client, "intents.ac+me.ok", intent(json!(1))).await;
    assert_eq!(code(&refused), "INVALID_INTENT", "{refused}");
    assert!(refused["result"]["data"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("tenant")));
    assert_eq!(upstream.total(), 3, "nothing ran for it");

    // get and purge take --tenant; stats counts keys per tenant.
    let url = server.url();
    let env = [("NATS_URL", None), ("RUST_LOG", Some("off"))];
    let got = run_idemq(
        &["get", bare.as_str(), "--tenant", "acme", "--nats-url", &url],
        &env,
    )
    .await;
    assert!(got.status.success(), "{got:?}");
    let record: Value = serde_json::from_slice(&got.stdout).expect("record");
    assert_eq!(record["result"]["data"]["done"], "same params");
    assert_eq!(
        record["idem_key"],
        bare.in_tenant("acme").expect("tenant").as_str(),
        "the record keeps the scoped key (v1.2 §5)"
    );
    let unscoped = run_idemq(&["get", bare.as_str(), "--nats-url", &url], &env).await;
    assert_eq!(unscoped.status.code(), Some(1), "no bare key was stored");
    let stats = run_idemq(&["stats", "--json", "--tenants", "--nats-url", &url], &env).await;
    assert!(stats.status.success(), "{stats:?}");
    let report: Value = serde_json::from_slice(&stats.stdout).expect("stats");
    assert_eq!(
        report["tenants"],
        json!({"acme": 1, "globex": 1, "initech": 1}),
        "{report}"
    );
    let purged = run_idemq(
        &[
            "purge",
            bare.as_str(),
            "--tenant",
            "globex",
            "--nats-url",
            &url,
        ],
        &env,
    )
    .await;
    assert!(purged.status.success(), "{purged:?}");
    let after = ask(&client, "intents.globex.ok", intent(json!("same params"))).await;
    assert_eq!(
        after["replayed"], false,
        "globex's key was purged: it runs again"
    );
    let kept = ask(&client, "intents.acme.ok", intent(json!("same params"))).await;
    assert_eq!(kept["replayed"], true, "acme's outcome is untouched");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_shipped_tenant_permissions_a_tenant_cannot_publish_another_tenants_intents() {
    let server = NatsServer::start_with_config_for(|dir| {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/nats-auth/tenant-agent-permissions.conf");
        format!(
            r#"
            include "{tenants}"
            authorization {{
              users: [
                {{ user: worker, password: "worker-pw" }}
                {{ user: acme, password: "acme-pw", permissions: $IDEMQ_TENANT_ACME }}
                {{ user: globex, password: "globex-pw", permissions: $IDEMQ_TENANT_GLOBEX }}
              ]
            }}"#,
            tenants = include_path(dir, &file),
        )
    });
    let url = server.url();
    let mut worker = WorkerProcess::serve(
        &url,
        &[
            "--user",
            "worker",
            "--password",
            "worker-pw",
            "--tenant-token",
            "2",
        ],
    );
    let acme = async_nats::ConnectOptions::with_user_and_password("acme".into(), "acme-pw".into())
        .custom_inbox_prefix("_INBOX_acme")
        .connect(url.clone())
        .await
        .expect("acme connects");
    let body = intent(json!(1));
    let own = eventually(
        Duration::from_secs(10),
        "acme's own intent answered",
        async || {
            let request = async_nats::Request::new()
                .payload(body.clone().into())
                .timeout(Some(Duration::from_secs(2)));
            // No responders yet: the worker process is still starting.
            acme.send_request("intents.acme.echo", request).await
        },
    )
    .await;
    let own: Value = serde_json::from_slice(&own.payload).expect("reply");
    assert_eq!(own["result"]["status"], "Success", "{own}");

    // Into globex's subjects: refused by the server, never reaches the worker.
    acme.publish("intents.globex.echo", body.into())
        .await
        .expect("publish");
    acme.flush().await.expect("flush");
    eventually(
        Duration::from_millis(2500),
        "the server refusing acme's publish into intents.globex.>",
        async || {
            server
                .log()
                .lines()
                .any(|l| l.contains("Publish Violation") && l.contains("intents.globex.echo"))
        },
    )
    .await;
    worker.signal("-TERM");
    assert!(worker.wait(Duration::from_secs(20)).await.success());
}

/// Sends one intent as a core request, or publishes it into the stream
/// (`Idem-Reply-To: results.<tenant>`) and reads its reply.
async fn send_as_tenant(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    replies: &mut async_nats::Subscriber,
    jetstream: bool,
    subject: &'static str,
    body: String,
    key: Option<IdempotencyKey>,
) -> Value {
    use futures::StreamExt;
    let mut headers = HeaderMap::new();
    if let Some(key) = key {
        headers.insert("Idempotency-Key", key.as_str());
    }
    if !jetstream {
        return request(client, subject, body, headers).await.0;
    }
    let tenant = subject.split('.').nth(1).expect("a tenant token");
    headers.insert("Idem-Reply-To", format!("results.{tenant}").as_str());
    js.publish_with_headers(subject, headers, body.into())
        .await
        .expect("publish")
        .await
        .expect("stream ack");
    let reply = tokio::time::timeout(Duration::from_secs(15), replies.next())
        .await
        .expect("a reply within 15 s")
        .expect("subscribed");
    serde_json::from_slice(&reply.payload).expect("JSON")
}

/// A tenant sends an intent under a key it crafted so that its bits equal
/// another tenant's key (docs/contract.md v1.2 §5); then that tenant's own
/// intent must run, in core mode and in JetStream mode.
async fn a_crafted_key_cannot_touch_another_tenants_intent(jetstream: bool) {
    let server = NatsServer::start();
    let client = server.connect().await;
    let upstream = Upstream::start(&client).await;
    let mut config = idemq::WorkerConfig {
        tenant_token: Some(2),
        ..test_config()
    };
    if jetstream {
        config.delivery = idemq::config::Delivery::JetStream(idemq::config::JetStreamConfig::new(
            "INTENTS", "workers",
        ));
    }
    let worker = start_worker(&server, config, Some(FORWARD)).await;
    let mut replies = client.subscribe("results.>").await.expect("subscribe");
    let victim = intent_key("same").in_tenant("acme").expect("tenant");
    let crafted = colliding_key(&victim, "evil");
    let js = async_nats::jetstream::new(client.clone());
    let (js, r) = (&js, &mut replies);
    let evil = send_as_tenant(
        &client,
        js,
        r,
        jetstream,
        "intents.evil.ok",
        intent(json!("evil's")),
        Some(crafted),
    )
    .await;
    assert_eq!(evil["result"]["status"], "Success", "{evil}");
    for copy in 0..2 {
        let acme = send_as_tenant(
            &client,
            js,
            r,
            jetstream,
            "intents.acme.ok",
            intent(json!("acme's")),
            None,
        )
        .await;
        assert_eq!(acme["result"]["status"], "Success", "copy {copy}: {acme}");
        assert_eq!(acme["result"]["data"]["done"], "acme's", "{acme}");
        assert_eq!(acme["replayed"], copy == 1, "{acme}");
    }
    assert_eq!(upstream.executions(victim.as_str()), 1, "acme's intent ran");
    worker.stop().await;
}

#[tokio::test]
async fn a_crafted_key_cannot_make_another_tenants_intent_reused_in_core_mode() {
    a_crafted_key_cannot_touch_another_tenants_intent(false).await;
}

#[tokio::test]
async fn a_crafted_key_cannot_make_another_tenants_intent_reused_in_jetstream_mode() {
    a_crafted_key_cannot_touch_another_tenants_intent(true).await;
}

//! Tenant-scoped keys (PROTOCOL.md v1.1 §5): with `--tenant-token N` the
//! N-th subject token names the tenant, and its KV key is
//! `<tenant>.<idem_key>`, so tenants sending identical intents never share
//! an outcome or a `KEY_REUSED`.

mod common;

use async_nats::HeaderMap;
use common::upstream::{Upstream, FORWARD};
use common::workers::{code, request, run_idemq, start_worker, test_config, WorkerProcess};
use common::{include_path, NatsServer};
use idemq::IdempotencyKey;
use serde_json::{json, Value};

fn intent(params: Value) -> String {
    json!({ "intent_id": "same", "actor": "agent", "episode": "ep", "params": params }).to_string()
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
    let bare = IdempotencyKey::from_intent_metadata("same", "agent", "ep", None);

    let acme = ask(&client, "intents.acme.ok", intent(json!("acme's"))).await;
    // Same key fields, another fingerprint: no KEY_REUSED across tenants.
    let globex = ask(&client, "intents.globex.ok", intent(json!("globex's"))).await;
    for (reply, data) in [(&acme, "acme's"), (&globex, "globex's")] {
        assert_eq!(reply["result"]["status"], "Success", "{reply}");
        assert_eq!(
            reply["result"]["data"]["done"], data,
            "its own outcome: {reply}"
        );
        assert_eq!(reply["replayed"], false);
        assert_eq!(
            reply["idem_key"],
            bare.as_str(),
            "replies carry the bare key"
        );
    }
    // Copies replay their own tenant's outcome.
    let again = ask(&client, "intents.acme.ok", intent(json!("acme's"))).await;
    assert_eq!(again["replayed"], true);
    assert_eq!(again["stored_at"], acme["stored_at"]);
    let reused = ask(&client, "intents.acme.ok", intent(json!("changed"))).await;
    assert_eq!(
        code(&reused),
        "KEY_REUSED",
        "within a tenant the key is still one intent's"
    );
    for tenant in ["acme", "globex"] {
        let scoped = bare.in_tenant(tenant).expect("tenant");
        assert_eq!(
            upstream.executions(scoped.as_str()),
            1,
            "{tenant} executed once"
        );
    }
    assert_eq!(upstream.total(), 2);

    // A subject whose tenant token is not a KV key token.
    let refused = ask(&client, "intents.ac+me.ok", intent(json!(1))).await;
    assert_eq!(code(&refused), "INVALID_INTENT", "{refused}");
    assert!(refused["result"]["data"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("tenant")));
    assert_eq!(upstream.total(), 2, "nothing ran for it");

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
    assert_eq!(record["result"]["data"]["done"], "acme's");
    let unscoped = run_idemq(&["get", bare.as_str(), "--nats-url", &url], &env).await;
    assert_eq!(unscoped.status.code(), Some(1), "no bare key was stored");
    let stats = run_idemq(&["stats", "--json", "--tenants", "--nats-url", &url], &env).await;
    assert!(stats.status.success(), "{stats:?}");
    let report: Value = serde_json::from_slice(&stats.stdout).expect("stats");
    assert_eq!(
        report["tenants"],
        json!({"acme": 1, "globex": 1}),
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
    let after = ask(&client, "intents.globex.ok", intent(json!("globex's"))).await;
    assert_eq!(
        after["replayed"], false,
        "globex's key was purged: it runs again"
    );
    let kept = ask(&client, "intents.acme.ok", intent(json!("acme's"))).await;
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
    let mut own = None;
    for _ in 0..100 {
        let request = async_nats::Request::new()
            .payload(body.clone().into())
            .timeout(Some(std::time::Duration::from_secs(2)));
        if let Ok(reply) = acme.send_request("intents.acme.echo", request).await {
            own = Some(reply);
            break;
        }
        // No responders yet: the worker process is still starting.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let own: Value = serde_json::from_slice(&own.expect("acme's own intent is answered").payload)
        .expect("reply");
    assert_eq!(own["result"]["status"], "Success", "{own}");

    // Into globex's subjects: refused by the server, never reaches the worker.
    acme.publish("intents.globex.echo", body.into())
        .await
        .expect("publish");
    acme.flush().await.expect("flush");
    let mut refused = false;
    for _ in 0..50 {
        if server
            .log()
            .lines()
            .any(|l| l.contains("Publish Violation") && l.contains("intents.globex.echo"))
        {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        refused,
        "the server refuses acme's publish into intents.globex.>"
    );
    worker.signal("-TERM");
    assert!(worker
        .wait(std::time::Duration::from_secs(20))
        .await
        .success());
}

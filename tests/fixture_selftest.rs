//! Self-test of the shared `nats-server` fixture: pub/sub, JetStream KV, and
//! KV data surviving `restart()` on the same port.

mod common;

use std::time::Duration;

use futures::StreamExt;

const T: Duration = Duration::from_secs(5);

async fn roundtrip(client: &async_nats::Client) {
    let mut sub = client.subscribe("selftest").await.expect("subscribe");
    client
        .publish("selftest", "ping".into())
        .await
        .expect("publish");
    client.flush().await.expect("flush");
    let msg = tokio::time::timeout(T, sub.next())
        .await
        .expect("message within timeout")
        .expect("subscription open");
    assert_eq!(msg.payload.as_ref(), b"ping");
}

#[tokio::test]
async fn fixture_starts_restarts_and_keeps_jetstream_data() {
    let mut server = common::NatsServer::start();
    assert!(server.url().ends_with(&format!(":{}", server.port())));

    let client = server.connect().await;
    roundtrip(&client).await;

    let kv = async_nats::jetstream::new(client)
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "T".into(),
            ..Default::default()
        })
        .await
        .expect("create KV bucket");
    kv.put("k", "v1".into()).await.expect("kv put");
    assert_eq!(
        kv.get("k").await.expect("kv get").as_deref(),
        Some(&b"v1"[..])
    );

    let port = server.port();
    server.restart();
    assert_eq!(server.port(), port);

    let client = server.connect().await;
    roundtrip(&client).await;
    let kv = async_nats::jetstream::new(client)
        .get_key_value("T")
        .await
        .expect("KV bucket survives restart");
    assert_eq!(
        kv.get("k").await.expect("kv get after restart").as_deref(),
        Some(&b"v1"[..])
    );
}

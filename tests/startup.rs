//! Start-up and admin failures come back as typed kinds, not text: what
//! `Server::start` (the one start-up path) and `idemq::admin` return, each
//! matched by variant against a real nats-server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::workers::{ping, test_config};
use common::NatsServer;
use idemq::admin::{AdminError, Purged};
use idemq::config::{Delivery, JetStreamConfig};
use idemq::handler::Echo;
use idemq::server::{ServeError, Server, ServerConfig};
use idemq::store::kv::{BucketConfig, KvStore};
use idemq::store::{Acquire, ClaimProtocol, ClaimRequest, StoreError};
use idemq::worker::WorkerError;
use idemq::{DeliveryError, IdempotencyKey, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// Starts a server with `config`, bounded.
async fn start(server: &NatsServer, config: ServerConfig) -> Result<Server, ServeError> {
    tokio::time::timeout(
        Duration::from_secs(20),
        Server::start(
            server.connect().await,
            Arc::new(Echo),
            config,
            CancellationToken::new(),
        ),
    )
    .await
    .expect("start-up ends within 20s")
}

#[tokio::test]
async fn an_invalid_configuration_is_every_problem_at_once() {
    let server = NatsServer::start();
    let config = ServerConfig {
        worker: WorkerConfig {
            concurrency: 0,
            lease: Duration::from_millis(10),
            ..test_config()
        },
        ..ServerConfig::default()
    };
    match start(&server, config).await {
        Err(ServeError::Config(problems)) => assert_eq!(problems.len(), 2, "{problems:?}"),
        other => panic!("expected Config, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn a_bucket_without_per_message_ttl_is_a_store_setup_error() {
    let server = NatsServer::start();
    common::stores::bucket_without_ttl(&server, "OLD").await;
    let config = ServerConfig {
        worker: test_config(),
        bucket: BucketConfig {
            bucket: "OLD".to_owned(),
            replicas: 1,
        },
        metrics_addr: None,
    };
    match start(&server, config).await {
        Err(ServeError::Store(StoreError::Setup(reason))) => {
            assert!(reason.contains("per-message TTL"), "{reason}");
        }
        other => panic!("expected Store(Setup), got {:?}", other.err()),
    }
}

#[tokio::test]
async fn a_taken_metrics_address_fails_before_any_worker_starts() {
    let server = NatsServer::start();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let config = ServerConfig {
        worker: test_config(),
        metrics_addr: Some(addr),
        ..ServerConfig::default()
    };
    match start(&server, config).await {
        Err(ServeError::Bind { addr: refused, .. }) => assert_eq!(refused, addr),
        other => panic!("expected Bind, got {:?}", other.err()),
    }
    assert!(
        ping(&server.connect().await).await.is_empty(),
        "no worker was left registered"
    );
}

#[tokio::test]
async fn a_stream_over_taken_subjects_is_a_delivery_error() {
    let server = NatsServer::start();
    let js = async_nats::jetstream::new(server.connect().await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "OTHER".to_owned(),
        subjects: vec!["intents.>".to_owned()],
        ..Default::default()
    })
    .await
    .expect("a stream that owns the intent subjects");
    let config = ServerConfig {
        worker: WorkerConfig {
            delivery: Delivery::JetStream(JetStreamConfig::new("INTENTS", "workers")),
            ..test_config()
        },
        ..ServerConfig::default()
    };
    match start(&server, config).await {
        Err(ServeError::Worker(WorkerError::Delivery(DeliveryError::Stream {
            stream, ..
        }))) => {
            assert_eq!(stream, "INTENTS");
        }
        other => panic!("expected Worker(Delivery(Stream)), got {:?}", other.err()),
    }
}

#[tokio::test]
async fn purge_refuses_a_running_claim_and_says_when_nothing_is_stored() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    let store = KvStore::open(js, &BucketConfig::default())
        .await
        .expect("bucket");
    let absent = IdempotencyKey::generate("startup", "ep", 1);
    let purged = idemq::admin::purge(&client, &store, "IDEMPOTENCY", &absent, false)
        .await
        .expect("purge");
    assert_eq!(purged, Purged::Absent);

    let running = IdempotencyKey::generate("startup", "ep", 2);
    let request = ClaimRequest {
        key: running.clone(),
        intent_id: "i".to_owned(),
        fingerprint: "fp".to_owned(),
        owner: "owner".to_owned(),
        lease: Duration::from_secs(30),
    };
    let acquired = store
        .acquire(&request, Duration::ZERO)
        .await
        .expect("claim");
    assert!(matches!(acquired, Acquire::Owner(_)), "{acquired:?}");
    match idemq::admin::purge(&client, &store, "IDEMPOTENCY", &running, false).await {
        Err(AdminError::Running { key, .. }) => assert_eq!(key, running.to_string()),
        other => panic!("expected Running, got {other:?}"),
    }
    let forced = idemq::admin::purge(&client, &store, "IDEMPOTENCY", &running, true)
        .await
        .expect("forced purge");
    assert!(matches!(forced, Purged::Purged { .. }), "{forced:?}");
}

//! Self-test of the 3-node cluster fixture: R3 KV bucket and R3 stream work,
//! keep working through a failover client when the stream leader is killed,
//! and the killed node rejoins after `restart()`.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use common::cluster::NatsCluster;
use common::poll::eventually;

/// Bound on one JetStream call.
const CALL: Duration = Duration::from_secs(5);
/// Bound on recovering after a node is killed or restarted.
const RECOVERY: Duration = Duration::from_secs(20);

/// Retries `op` (each call bounded by `CALL`) until it succeeds or
/// `RECOVERY` has passed; panics with the last error then. Returns the
/// value and how long it took.
async fn retry<T, F, Fut>(what: &str, mut op: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    let value = eventually(RECOVERY, what, || {
        let call = tokio::time::timeout(CALL, op());
        async move {
            call.await
                .unwrap_or_else(|_| Err(format!("timed out after {CALL:?}")))
        }
    })
    .await;
    (value, start.elapsed())
}

/// Puts `value` under `key` and reads it back.
async fn kv_roundtrip(kv: &kv::Store, key: &str, value: &'static str) -> Result<(), String> {
    kv.put(key, value.into())
        .await
        .map_err(|e| format!("kv put: {e}"))?;
    let got = kv.get(key).await.map_err(|e| format!("kv get: {e}"))?;
    match got.as_deref() {
        Some(v) if v == value.as_bytes() => Ok(()),
        other => Err(format!("kv get {key}: expected {value:?}, got {other:?}")),
    }
}

/// Publishes `payload` to `subject`, waits for the ack, reads the message back.
async fn stream_roundtrip(
    js: &jetstream::Context,
    stream: &stream::Stream,
    subject: &'static str,
    payload: &'static str,
) -> Result<u64, String> {
    let ack = js
        .publish(subject, payload.into())
        .await
        .map_err(|e| format!("publish: {e}"))?
        .await
        .map_err(|e| format!("publish ack: {e}"))?;
    let msg = stream
        .get_raw_message(ack.sequence)
        .await
        .map_err(|e| format!("get message {}: {e}", ack.sequence))?;
    if msg.payload.as_ref() != payload.as_bytes() || msg.subject.as_str() != subject {
        return Err(format!("read back {msg:?}, expected {subject} {payload:?}"));
    }
    Ok(ack.sequence)
}

#[tokio::test]
async fn cluster_replicates_and_fails_over_when_the_stream_leader_dies() {
    let t0 = Instant::now();
    let mut cluster = NatsCluster::start(3);
    eprintln!(
        "cluster of {} ready in {:?}: {}",
        cluster.len(),
        t0.elapsed(),
        cluster.urls()
    );
    assert_eq!(cluster.urls().split(',').count(), 3);
    assert_eq!(cluster.server_name(0), "n1");

    let js = jetstream::new(cluster.connect().await);
    let kv = js
        .create_key_value(kv::Config {
            bucket: "CLUSTER_SELFTEST".into(),
            num_replicas: 3,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("create R3 KV bucket");
    let mut events = js
        .create_stream(stream::Config {
            name: "EVENTS".into(),
            subjects: vec!["events.>".into()],
            num_replicas: 3,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("create R3 stream");

    kv_roundtrip(&kv, "k", "v1").await.expect("kv before kill");
    stream_roundtrip(&js, &events, "events.a", "e1")
        .await
        .expect("stream before kill");

    let info = events.info().await.expect("stream info").clone();
    assert_eq!(info.config.num_replicas, 3);
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("R3 stream has a leader");
    let victim = cluster
        .index_of(&leader)
        .unwrap_or_else(|| panic!("stream leader {leader:?} is not a node of the cluster"));

    let t_kill = Instant::now();
    cluster.kill(victim);
    assert!(!cluster.is_running(victim));
    eprintln!("killed stream leader {leader} (node {victim})");

    let ((), kv_took) = retry("kv after kill", || kv_roundtrip(&kv, "k", "v2")).await;
    let (seq, stream_took) = retry("stream after kill", || {
        stream_roundtrip(&js, &events, "events.b", "e2")
    })
    .await;
    assert!(seq >= 2, "sequence {seq} after e1");
    eprintln!(
        "after kill: kv ok in {kv_took:?}, stream ok in {stream_took:?} ({:?} since kill)",
        t_kill.elapsed()
    );

    let (info, _) = retry("stream info after kill", || async {
        let info = events.get_info().await.map_err(|e| e.to_string())?;
        let cluster_info = info.cluster.clone().ok_or("no cluster info")?;
        match cluster_info.leader.as_deref() {
            Some(l) if l != leader => Ok(info),
            other => Err(format!("leader is still {other:?}")),
        }
    })
    .await;
    assert_eq!(info.config.num_replicas, 3, "3 replicas configured");
    let peers = info.cluster.expect("cluster info").replicas;
    assert_eq!(peers.len(), 2, "leader + 2 peers: {peers:?}");
    assert!(
        peers.iter().any(|p| p.name == leader),
        "killed node {leader} is still a peer: {peers:?}"
    );

    // The killed node comes back on the same ports and store and catches up.
    let t_restart = Instant::now();
    cluster.restart(victim);
    assert!(cluster.is_running(victim));
    let (_, caught_up) = retry("killed node catches up", || async {
        let info = events.get_info().await.map_err(|e| e.to_string())?;
        let peers = info.cluster.ok_or("no cluster info")?.replicas;
        if peers.len() == 2 && peers.iter().all(|p| p.current && !p.offline) {
            Ok(())
        } else {
            Err(format!("peers not all current: {peers:?}"))
        }
    })
    .await;
    cluster.wait_ready().await;
    let only_victim = jetstream::new(cluster.connect_to(victim).await);
    let kv_on_victim = only_victim
        .get_key_value("CLUSTER_SELFTEST")
        .await
        .expect("bucket via restarted node");
    let ((), _) = retry("kv via restarted node", || async {
        match kv_on_victim
            .get("k")
            .await
            .map_err(|e| e.to_string())?
            .as_deref()
        {
            Some(b"v2") => Ok(()),
            other => Err(format!("expected v2, got {other:?}")),
        }
    })
    .await;
    eprintln!(
        "restarted {leader}: caught up in {caught_up:?}, ready in {:?}; total {:?}",
        t_restart.elapsed(),
        t0.elapsed()
    );
}

//! Both stores for one suite: [`kv_store`] opens JetStream KV on a test
//! server, and [`both_stores!`](crate::both_stores) runs each named test
//! function once on the in-memory store and once on JetStream KV.

use std::sync::Arc;

use idemq::store::kv::{BucketConfig, KvStore};
use idemq::store::IdempotencyStore;

use super::NatsServer;

/// A store as the suites take it.
pub type Store = Arc<dyn IdempotencyStore>;

/// The default bucket on `server`.
pub async fn kv_store(server: &NatsServer) -> Store {
    let js = async_nats::jetstream::new(server.connect().await);
    let store = KvStore::open(js, &BucketConfig::default())
        .await
        .expect("open bucket");
    Arc::new(store)
}

/// Creates the bucket `name` as a pre-idemq tool would: history 1, no
/// per-message TTLs (which idemq refuses).
pub async fn bucket_without_ttl(server: &NatsServer, name: &str) {
    async_nats::jetstream::new(server.connect().await)
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: name.to_owned(),
            history: 1,
            ..Default::default()
        })
        .await
        .expect("plain bucket");
}

/// `both_stores!(a, b)`: for each `async fn a(store: Store)` of the test
/// file, `memory::a` on a fresh in-memory store and `jetstream_kv::a` on
/// a fresh nats-server's bucket.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(std::sync::Arc::new(idemq::store::memory::MemoryStore::new())).await;
                }
            )*
        }
        mod jetstream_kv {
            $(
                #[tokio::test]
                async fn $name() {
                    let server = $crate::common::NatsServer::start();
                    super::$name($crate::common::stores::kv_store(&server).await).await;
                }
            )*
        }
    };
}

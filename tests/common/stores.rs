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

/// A store whose plain reads, once armed, are held after they read: each
/// waits for [`HeldReads::release`] before it returns what it read (a
/// worker paused between reading a record and acting on it), and
/// [`HeldReads::until_held`] tells the test one is waiting.
pub struct HeldReads {
    inner: Store,
    armed: std::sync::atomic::AtomicBool,
    held: tokio::sync::Notify,
    released: tokio::sync::Notify,
}

impl HeldReads {
    /// Wraps `inner`, disarmed.
    pub fn new(inner: Store) -> Arc<HeldReads> {
        Arc::new(HeldReads {
            inner,
            armed: Default::default(),
            held: tokio::sync::Notify::new(),
            released: tokio::sync::Notify::new(),
        })
    }

    /// Holds the next plain read.
    pub fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits (10 s at most) until a read is held.
    pub async fn until_held(&self) {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.held.notified())
            .await
            .expect("a read held within 10 s");
    }

    /// Lets the held read return.
    pub fn release(&self) {
        self.released.notify_one();
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for HeldReads {
    async fn read(
        &self,
        key: &idemq::IdempotencyKey,
    ) -> Result<Option<idemq::store::Versioned>, idemq::store::StoreError> {
        let read = self.inner.read(key).await;
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let released = self.released.notified();
            self.held.notify_one();
            released.await;
        }
        read
    }
    async fn read_leader(
        &self,
        key: &idemq::IdempotencyKey,
    ) -> Result<Option<idemq::store::Versioned>, idemq::store::StoreError> {
        self.inner.read_leader(key).await
    }
    async fn write(
        &self,
        key: &idemq::IdempotencyKey,
        expected: u64,
        record: &idemq::outcome::Record,
        ttl: std::time::Duration,
    ) -> Result<u64, idemq::store::StoreError> {
        self.inner.write(key, expected, record, ttl).await
    }
    async fn remove(
        &self,
        key: &idemq::IdempotencyKey,
        expected: u64,
    ) -> Result<(), idemq::store::StoreError> {
        self.inner.remove(key, expected).await
    }
    async fn purge(
        &self,
        key: &idemq::IdempotencyKey,
        expected: u64,
    ) -> Result<(), idemq::store::StoreError> {
        self.inner.purge(key, expected).await
    }
    async fn wakeups(
        &self,
        key: &idemq::IdempotencyKey,
    ) -> Result<idemq::store::Wakeups, idemq::store::StoreError> {
        self.inner.wakeups(key).await
    }
    fn bucket(&self) -> Option<&str> {
        self.inner.bucket()
    }
}

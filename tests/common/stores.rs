//! Both stores for one suite: [`kv_store`] opens JetStream KV on a test
//! server, and [`both_stores!`](crate::both_stores) runs each named test
//! function once on the in-memory store and once on JetStream KV;
//! [`FaultyStore`] puts faults under either.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idemq::outcome::Record;
use idemq::store::kv::{BucketConfig, KvStore};
use idemq::store::{IdempotencyStore, StoreError, Versioned, Wakeups};
use idemq::IdempotencyKey;
use tokio::sync::Notify;

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

/// A store over another one with the faults the tests inject, each off
/// until a test turns it on: it counts the reads it serves
/// ([`FaultyStore::reads`]), holds a plain read after it read
/// ([`FaultyStore::hold_next_read`]: a worker paused between reading a
/// record and acting on it), fails every read ([`FaultyStore::fail_reads`]),
/// and lets writes land but loses their acknowledgements
/// ([`FaultyStore::lose_next_acks`]: what an owner sees when the network
/// drops the answers to its writes). Everything else is the inner store's.
pub struct FaultyStore {
    inner: Store,
    reads: AtomicU32,
    hold: AtomicBool,
    held: Notify,
    released: Notify,
    reads_fail: AtomicBool,
    lose_acks: AtomicU32,
    /// How long a writer whose ack is lost waits to hear so, in ms.
    lost_ack_after_ms: AtomicU64,
}

impl FaultyStore {
    /// Wraps `inner`, with no fault on.
    pub fn new(inner: Store) -> Arc<FaultyStore> {
        Arc::new(FaultyStore {
            inner,
            reads: AtomicU32::new(0),
            hold: AtomicBool::new(false),
            held: Notify::new(),
            released: Notify::new(),
            reads_fail: AtomicBool::new(false),
            lose_acks: AtomicU32::new(0),
            lost_ack_after_ms: AtomicU64::new(0),
        })
    }

    /// The reads served so far (plain and the leader's, failed or not).
    pub fn reads(&self) -> u32 {
        self.reads.load(Ordering::SeqCst)
    }

    /// Holds the next plain read once it has read, until [`release`](Self::release).
    pub fn hold_next_read(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    /// Waits (10 s at most) until a read is held.
    pub async fn until_held(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.held.notified())
            .await
            .expect("a read held within 10 s");
    }

    /// Lets the held read return.
    pub fn release(&self) {
        self.released.notify_one();
    }

    /// Every read (plain and the leader's) fails `Unavailable` while `fail` holds.
    pub fn fail_reads(&self, fail: bool) {
        self.reads_fail.store(fail, Ordering::SeqCst);
    }

    /// The next `n` writes and removes land, and their callers are told
    /// they timed out (`Unacknowledged`).
    pub fn lose_next_acks(&self, n: u32) {
        self.lose_next_acks_after(n, Duration::ZERO);
    }

    /// Like [`lose_next_acks`](Self::lose_next_acks), the writer hearing
    /// so only `after` the write landed: a publish that waits out its
    /// timeout for an acknowledgement that never comes.
    pub fn lose_next_acks_after(&self, n: u32, after: Duration) {
        let after = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        self.lost_ack_after_ms.store(after, Ordering::SeqCst);
        self.lose_acks.store(n, Ordering::SeqCst);
    }

    /// A read as served: counted, and failed if reads fail.
    fn serve_read(&self) -> Result<(), StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.reads_fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("reads fail".to_owned()));
        }
        Ok(())
    }

    /// What the writer of a landed write hears: its result, or a lost ack.
    async fn acked<T>(&self, landed: T) -> Result<T, StoreError> {
        let lost = self
            .lose_acks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lost {
            let after = self.lost_ack_after_ms.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(after)).await;
            return Err(StoreError::Unacknowledged("ack lost".to_owned()));
        }
        Ok(landed)
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for FaultyStore {
    async fn read(&self, key: &IdempotencyKey) -> Result<Option<Versioned>, StoreError> {
        self.serve_read()?;
        let read = self.inner.read(key).await;
        if self.hold.swap(false, Ordering::SeqCst) {
            let released = self.released.notified();
            self.held.notify_one();
            // A test that never releases it fails here, not by hanging.
            tokio::time::timeout(Duration::from_secs(60), released)
                .await
                .expect("a held read released within 60 s");
        }
        read
    }

    async fn read_leader(&self, key: &IdempotencyKey) -> Result<Option<Versioned>, StoreError> {
        self.serve_read()?;
        self.inner.read_leader(key).await
    }

    async fn write(
        &self,
        key: &IdempotencyKey,
        expected: u64,
        record: &Record,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        let revision = self.inner.write(key, expected, record, ttl).await?;
        self.acked(revision).await
    }

    async fn remove(&self, key: &IdempotencyKey, expected: u64) -> Result<(), StoreError> {
        self.inner.remove(key, expected).await?;
        self.acked(()).await
    }

    async fn purge(&self, key: &IdempotencyKey, expected: u64) -> Result<(), StoreError> {
        self.inner.purge(key, expected).await
    }

    async fn wakeups(&self, key: &IdempotencyKey) -> Result<Wakeups, StoreError> {
        self.inner.wakeups(key).await
    }

    fn bucket(&self) -> Option<&str> {
        self.inner.bucket()
    }
}

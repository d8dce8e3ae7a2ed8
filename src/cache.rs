//! A bounded in-process cache of stored outcomes.
//!
//! An outcome never changes once stored: until it expires (or an operator
//! purges it) every copy of the intent gets exactly that record. So a
//! worker that has seen an outcome can answer later copies without a KV
//! round trip. Two things keep that honest:
//!
//! * entries live no longer than [`MAX_AGE`] and stop [`EXPIRY_MARGIN`]
//!   before the record's own expiry (computed from this host's monotonic
//!   clock at insertion), so a clock skew between workers or a missed purge
//!   notice costs at most that long;
//! * a purge is announced on `idemq.purge.<bucket>` and every worker evicts
//!   the key at once ([`purge_subject`]).
//!
//! The cache is bounded by entry count; the oldest insertion goes first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::key::IdempotencyKey;
use crate::outcome::Record;
use crate::store::{IdempotencyStore, StoreError};

/// Longest time an entry is served from the cache.
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// How long before the record's expiry an entry stops being served.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(2);

/// The subject on which purges of `bucket` are announced (payload: the key).
pub fn purge_subject(bucket: &str) -> String {
    format!("idemq.purge.{bucket}")
}

/// Removes a stored outcome so the next copy executes again, and tells
/// every worker to forget it (the announcement is flushed before returning).
pub async fn purge(
    client: &async_nats::Client,
    store: &dyn IdempotencyStore,
    bucket: &str,
    key: &IdempotencyKey,
) -> Result<(), StoreError> {
    store.purge(key).await?;
    let notice = bytes::Bytes::copy_from_slice(key.as_str().as_bytes());
    client
        .publish(purge_subject(bucket), notice)
        .await
        .map_err(|e| StoreError::Unavailable(format!("purge notice: {e}")))?;
    match tokio::time::timeout(NOTICE_FLUSH_BOUND, client.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(StoreError::Unavailable(format!("purge notice: {e}"))),
        Err(_) => Err(StoreError::Unavailable(
            "purge notice: not flushed in time".to_owned(),
        )),
    }
}

/// How long a purge waits for its notice to reach the server.
const NOTICE_FLUSH_BOUND: Duration = Duration::from_secs(5);

/// What the cache knows about a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// A stored outcome with the same fingerprint.
    Stored(Arc<Record>),
    /// A stored outcome with another fingerprint: `KEY_REUSED`.
    Reused,
    /// Nothing (or nothing fresh enough).
    Miss,
}

struct Entry {
    record: Arc<Record>,
    until: Instant,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<IdempotencyKey, Entry>,
    order: VecDeque<IdempotencyKey>,
}

/// The outcome cache.
pub struct OutcomeCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl OutcomeCache {
    /// A cache of at most `capacity` outcomes (0 disables it).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Only a cache: a panic while holding it leaves it usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Looks a key up for an intent with `fingerprint`.
    pub fn lookup(&self, key: &IdempotencyKey, fingerprint: &str) -> Lookup {
        let mut inner = self.lock();
        let Some(entry) = inner.entries.get(key) else {
            return Lookup::Miss;
        };
        if entry.until <= Instant::now() {
            inner.entries.remove(key);
            return Lookup::Miss;
        }
        if entry.record.fingerprint == fingerprint {
            Lookup::Stored(Arc::clone(&entry.record))
        } else {
            Lookup::Reused
        }
    }

    /// Remembers a stored outcome (records without one are ignored) and
    /// hands the record back shared, so callers need no copy of their own.
    pub fn insert(&self, record: Record) -> Arc<Record> {
        let record = Arc::new(record);
        if self.capacity == 0 || record.result.is_none() {
            return record;
        }
        let left = (record.expires_at - chrono::Utc::now())
            .to_std()
            .unwrap_or_default();
        let Some(left) = left.checked_sub(EXPIRY_MARGIN) else {
            return record;
        };
        let until = Instant::now() + left.min(MAX_AGE);
        let mut inner = self.lock();
        let key = record.idem_key.clone();
        let entry = Entry {
            record: Arc::clone(&record),
            until,
        };
        if inner.entries.insert(key.clone(), entry).is_none() {
            inner.order.push_back(key);
        }
        while inner.entries.len() > self.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.entries.remove(&oldest);
        }
        // Keys evicted by lookup or purge leave stale names in `order`;
        // drop them once they outnumber live entries.
        if inner.order.len() > 2 * self.capacity.max(1) {
            let Inner { entries, order } = &mut *inner;
            order.retain(|key| entries.contains_key(key));
        }
        drop(inner);
        record
    }

    /// Forgets a key (purged).
    pub fn remove(&self, key: &IdempotencyKey) {
        self.lock().entries.remove(key);
    }
}

/// Keys this worker is working on right now.
///
/// The first delivery of a key leads: it claims (or waits in the store) as
/// usual. Copies of the same key that reach this worker meanwhile follow:
/// they wait for the leader to finish and then read its outcome from the
/// [`OutcomeCache`], instead of each claiming, reading and watching the key
/// in the store. In a retry storm that turns K store round trips and up to
/// K JetStream watch consumers per key into one.
#[derive(Default)]
pub struct InFlightKeys {
    keys: Mutex<HashMap<IdempotencyKey, watch::Receiver<()>>>,
}

/// This delivery's turn on a key.
pub enum Turn<'a> {
    /// Do the work; dropping the guard releases the followers.
    Lead(LeadGuard<'a>),
    /// Wait for the leader: `changed()` returns (with an error) when it is done.
    Follow(watch::Receiver<()>),
}

/// Held by the leading delivery of a key.
pub struct LeadGuard<'a> {
    keys: &'a InFlightKeys,
    key: IdempotencyKey,
    // Dropped after `Drop::drop` has removed the entry: followers wake to
    // find the key no longer in flight and the outcome (if any) cached.
    _done: watch::Sender<()>,
}

impl InFlightKeys {
    fn lock(&self) -> MutexGuard<'_, HashMap<IdempotencyKey, watch::Receiver<()>>> {
        // A plain map with single inserts and removes: usable after a panic.
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Leads on `key`, or follows the delivery that already does.
    pub fn enter(&self, key: &IdempotencyKey) -> Turn<'_> {
        let mut keys = self.lock();
        if let Some(done) = keys.get(key) {
            return Turn::Follow(done.clone());
        }
        let (sender, receiver) = watch::channel(());
        keys.insert(key.clone(), receiver);
        Turn::Lead(LeadGuard {
            keys: self,
            key: key.clone(),
            _done: sender,
        })
    }
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        self.keys.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{Outcome, RecordState, RECORD_VERSION};

    fn record(step: u32, fingerprint: &str, ttl_secs: i64) -> Record {
        let now = chrono::Utc::now();
        Record {
            v: RECORD_VERSION,
            idem_key: IdempotencyKey::generate("cache", "ep", step),
            intent_id: "i".to_owned(),
            fingerprint: fingerprint.to_owned(),
            state: RecordState::Done,
            owner: "o".to_owned(),
            attempt: 1,
            result: Some(Outcome::Timeout),
            stored_at: now,
            expires_at: now + chrono::Duration::seconds(ttl_secs),
        }
    }

    #[test]
    fn serves_same_fingerprint_and_refuses_another() {
        let cache = OutcomeCache::new(10);
        let stored = record(1, "fp", 60);
        cache.insert(stored.clone());
        assert_eq!(
            cache.lookup(&stored.idem_key, "fp"),
            Lookup::Stored(Arc::new(stored.clone()))
        );
        assert_eq!(cache.lookup(&stored.idem_key, "other"), Lookup::Reused);
        cache.remove(&stored.idem_key);
        assert_eq!(cache.lookup(&stored.idem_key, "fp"), Lookup::Miss);
    }

    #[test]
    fn outcomes_about_to_expire_are_not_cached() {
        let cache = OutcomeCache::new(10);
        let stored = record(2, "fp", 1);
        cache.insert(stored.clone());
        assert_eq!(cache.lookup(&stored.idem_key, "fp"), Lookup::Miss);
    }

    #[tokio::test]
    async fn followers_wake_when_the_leader_is_done() {
        let keys = InFlightKeys::default();
        let key = IdempotencyKey::generate("inflight", "ep", 1);
        let Turn::Lead(guard) = keys.enter(&key) else {
            panic!("the first delivery leads");
        };
        let Turn::Follow(mut done) = keys.enter(&key) else {
            panic!("a second delivery follows");
        };
        drop(guard);
        assert!(
            done.changed().await.is_err(),
            "the leader's end wakes followers"
        );
        assert!(
            matches!(keys.enter(&key), Turn::Lead(_)),
            "the key is free again"
        );
    }

    #[test]
    fn the_oldest_entry_goes_first_at_capacity() {
        let cache = OutcomeCache::new(2);
        let records: Vec<Record> = (0..3).map(|i| record(i, "fp", 60)).collect();
        for r in &records {
            cache.insert(r.clone());
        }
        assert_eq!(cache.lookup(&records[0].idem_key, "fp"), Lookup::Miss);
        assert!(matches!(
            cache.lookup(&records[2].idem_key, "fp"),
            Lookup::Stored(_)
        ));
    }
}

//! The in-memory store: the same semantics as the KV store, in one process.
//!
//! For tests and for embedding idemq where one process is the only worker.
//! It models JetStream KV closely enough that the shared store suite passes
//! unchanged on both: one global sequence of revisions, history 1, TTLs that
//! turn an entry into an expiry marker (which itself lives for
//! [`MARKER_TTL`]), and wake-ups at expiries as well as writes.
//! Time is tokio's, so tests can pause it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{IdempotencyStore, Slot, StoreError, Versioned, Wakeup, Wakeups};
use crate::key::IdempotencyKey;
use crate::outcome::Record;

pub use super::MARKER_TTL;

#[derive(Debug, Clone)]
struct Entry {
    revision: u64,
    slot: Slot,
    expires: Instant,
    /// When it was written, as a JetStream message's timestamp says.
    written: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Default)]
struct Inner {
    sequence: u64,
    entries: HashMap<IdempotencyKey, Entry>,
}

impl Inner {
    /// Applies expiry to `key` as the server would at `now`: a value past its
    /// TTL becomes an expiry marker, a marker past its TTL disappears.
    fn expire(&mut self, key: &IdempotencyKey, now: Instant) -> bool {
        let Some(entry) = self.entries.get(key) else {
            return false;
        };
        if entry.expires > now {
            return false;
        }
        match entry.slot {
            Slot::Record(_) => {
                let expires = entry.expires + MARKER_TTL;
                self.put(key, Slot::Free { expired: true }, expires);
            }
            Slot::Free { .. } => {
                self.entries.remove(key);
            }
        }
        true
    }

    fn put(&mut self, key: &IdempotencyKey, slot: Slot, expires: Instant) -> u64 {
        self.sequence += 1;
        let entry = Entry {
            revision: self.sequence,
            slot,
            expires,
            written: chrono::Utc::now(),
        };
        self.entries.insert(key.clone(), entry);
        self.sequence
    }

    fn latest(&mut self, key: &IdempotencyKey) -> Option<&Entry> {
        let now = Instant::now();
        // An entry can be two steps behind (value expired, then its marker).
        while self.expire(key, now) {}
        self.entries.get(key)
    }

    fn check(&mut self, key: &IdempotencyKey, expected: u64) -> Result<(), StoreError> {
        let latest = self.latest(key).map_or(0, |entry| entry.revision);
        if latest == expected {
            Ok(())
        } else {
            Err(StoreError::Conflict)
        }
    }
}

/// The largest record the in-memory store takes by default: nats-server's
/// default max payload, so both stores refuse the same outcomes.
pub const DEFAULT_MAX_RECORD: usize = 1024 * 1024;

/// An idempotency store held in this process's memory.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    /// Largest record (its JSON) a write takes, like a server's max payload.
    max_record: usize,
    /// Bumped on every write, so watchers wake without polling.
    changed: watch::Sender<u64>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::with_max_record(DEFAULT_MAX_RECORD)
    }

    /// An empty store that refuses records over `max_record` bytes of JSON
    /// with [`StoreError::TooLarge`].
    pub fn with_max_record(max_record: usize) -> Self {
        Self {
            max_record,
            inner: Arc::default(),
            changed: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a panic while holding it; the map itself is
        // still consistent (every mutation is a single insert or remove).
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_slot(
        &self,
        key: &IdempotencyKey,
        expected: Option<u64>,
        slot: Slot,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        let revision = {
            let mut inner = self.lock();
            if let Some(expected) = expected {
                inner.check(key, expected)?;
            }
            let ttl = Duration::from_secs(super::ttl_secs(ttl));
            let now = Instant::now();
            // A TTL no clock can add keeps the record as long as one can.
            let expires = now.checked_add(ttl).unwrap_or(now + crate::config::MAX_TTL);
            inner.put(key, slot, expires)
        };
        self.changed.send_replace(revision);
        Ok(revision)
    }

    fn snapshot(&self, key: &IdempotencyKey) -> Option<Entry> {
        self.lock().latest(key).cloned()
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn read(&self, key: &IdempotencyKey) -> Result<Option<Versioned>, StoreError> {
        Ok(self.snapshot(key).map(|entry| {
            let slot = match entry.slot {
                Slot::Record(mut record) => {
                    record.written = Some(entry.written);
                    Slot::Record(record)
                }
                free => free,
            };
            Versioned {
                revision: entry.revision,
                slot,
            }
        }))
    }

    async fn write(
        &self,
        key: &IdempotencyKey,
        expected: u64,
        record: &Record,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        // Serialising a record cannot fail (strings, numbers, timestamps, values).
        let size = serde_json::to_vec(record).map_or(0, |json| json.len());
        if size > self.max_record {
            return Err(StoreError::TooLarge {
                size,
                max: self.max_record,
            });
        }
        self.write_slot(key, Some(expected), Slot::Record(record.clone()), ttl)
    }

    async fn remove(&self, key: &IdempotencyKey, expected: u64) -> Result<(), StoreError> {
        self.write_slot(
            key,
            Some(expected),
            Slot::Free { expired: false },
            MARKER_TTL,
        )
        .map(drop)
    }

    async fn purge(&self, key: &IdempotencyKey, expected: u64) -> Result<(), StoreError> {
        self.write_slot(
            key,
            Some(expected),
            Slot::Free { expired: true },
            MARKER_TTL,
        )
        .map(drop)
    }

    /// Wakes on every write to the store, and at the instant the key's
    /// value (or marker) expires: a follower sees an expiry exactly when
    /// it happens, as tests with paused time need.
    async fn wakeups(&self, key: &IdempotencyKey) -> Result<Wakeups, StoreError> {
        let state = (self.clone(), key.clone(), self.changed.subscribe());
        let stream = futures::stream::unfold(state, |(store, key, mut changed)| async move {
            let expires = store.snapshot(&key).map(|entry| entry.expires);
            let expiry = async {
                match expires {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = changed.changed() => changed.ok()?,
                () = expiry => {}
            }
            // Reads here see every write at once: nothing to wait for.
            Some((Wakeup::default(), (store, key, changed)))
        });
        Ok(Box::pin(stream))
    }
}

//! The store under the claim protocol: [`Faulty`] delegates to a real
//! store, injects the step's faults into its primitive writes and reads,
//! and logs every write that lands ([`Landed`]) into the state it shares
//! with the model ([`Shared`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use idemq::outcome::{Record, RecordState};
use idemq::store::{IdempotencyStore, Slot, StoreError, Versioned, Wakeups};
use idemq::IdempotencyKey;
use tokio::time::Instant;

use crate::clock::{at_revision, whole_secs};
use crate::context::Coverage;
use crate::schedule::{Fault, FaultKind};

tokio::task_local! {
    /// The owner token a call is made for (a remove carries no record).
    pub static ACTOR: String;
}

/// A write that landed in the store.
#[derive(Debug, Clone)]
pub struct Landed {
    pub key: usize,
    pub owner: String,
    /// What was written; `None` for a delete (a release).
    pub record: Option<Record>,
    pub expected: u64,
    pub revision: u64,
    pub ttl: Duration,
    /// When the write was sent and when its answer came: it landed between.
    pub start: Instant,
    pub end: Instant,
    pub acked: bool,
    pub step: usize,
}

impl Landed {
    pub fn is_done(&self) -> bool {
        matches!(&self.record, Some(r) if r.state == RecordState::Done)
    }

    pub fn is_claim(&self) -> bool {
        matches!(&self.record, Some(r) if r.state == RecordState::InProgress)
    }

    /// The earliest the store may expire it: its TTL from when it was sent.
    pub fn earliest_expiry(&self) -> Instant {
        self.start + whole_secs(self.ttl)
    }
}

/// What a key held from `at` on, for stale reads: a write that landed, or
/// what a read found.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub view: Option<Versioned>,
    /// When a record in it may expire, if known.
    pub until: Option<Instant>,
}

pub struct Shared {
    /// When the case started: trace lines say how long after.
    pub origin: Instant,
    pub keys: HashMap<IdempotencyKey, usize>,
    pub log: Vec<Landed>,
    pub fault: Option<Fault>,
    pub writes: u8,
    pub reads_fail: bool,
    /// How far behind this step's plain reads are.
    pub stale: Option<Duration>,
    /// Per key, what it held over time (see [`Seen`]).
    pub timeline: HashMap<usize, Vec<Seen>>,
    pub step: usize,
    pub trace: Vec<String>,
    /// Writes sent and not yet answered.
    pub in_flight: usize,
}

impl Shared {
    pub fn trace(&mut self, line: String) {
        let at = self.origin.elapsed().as_secs_f64();
        self.trace.push(format!("{at:>8.3}s {line}"));
    }
}

pub fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A store that delegates to a real one, injecting the step's faults into
/// its primitive writes and reads, and logging every write that lands.
#[derive(Clone)]
pub struct Faulty {
    pub inner: Arc<dyn IdempotencyStore>,
    pub shared: Arc<Mutex<Shared>>,
    pub coverage: Arc<Coverage>,
}

impl Faulty {
    /// Runs a primitive write to its end even if its caller gives up on it
    /// (a crash, an owner's timeout): a write once sent may still land, and
    /// then it is logged.
    pub async fn detached<T: Send + 'static>(
        &self,
        write: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        lock(&self.shared).in_flight += 1;
        let shared = Arc::clone(&self.shared);
        let task = tokio::spawn(async move {
            let written = write.await;
            lock(&shared).in_flight -= 1;
            written
        });
        task.await
            .map_err(|error| StoreError::Unavailable(format!("the write's task failed: {error}")))?
    }

    /// What the writer of a write that went through hears.
    pub fn acked<T>(&self, written: Result<T, StoreError>, acked: bool) -> Result<T, StoreError> {
        match written {
            Ok(_) if !acked => {
                self.coverage
                    .hit("store: a write landed, its ack lost (injected)");
                Err(lost_ack())
            }
            written => written,
        }
    }

    /// The fault for this write, if it is the step's `nth` one.
    pub fn write_fault(&self) -> Option<FaultKind> {
        let mut shared = lock(&self.shared);
        let n = shared.writes;
        shared.writes = shared.writes.saturating_add(1);
        match shared.fault {
            Some(fault) if fault.nth == n => {
                shared.fault = None;
                Some(fault.kind)
            }
            _ => None,
        }
    }

    pub fn note(&self, line: String) {
        let mut shared = lock(&self.shared);
        let step = shared.step;
        shared.trace(format!("    [{step}] {line}"));
    }

    pub fn key_index(&self, key: &IdempotencyKey) -> usize {
        lock(&self.shared)
            .keys
            .get(key)
            .copied()
            .unwrap_or(usize::MAX)
    }

    pub fn reads_fail(&self, what: &str, key: &IdempotencyKey) -> Result<(), StoreError> {
        if lock(&self.shared).reads_fail {
            self.coverage.hit("store: a read failed (injected)");
            self.note(format!(
                "{what} k{} -> injected Unavailable",
                self.key_index(key)
            ));
            return Err(StoreError::Unavailable("injected: reads fail".to_owned()));
        }
        Ok(())
    }

    /// Remembers what `key` held from now on, as a read found it.
    pub fn observe(&self, key: &IdempotencyKey, view: &Option<Versioned>) {
        let index = self.key_index(key);
        let mut shared = lock(&self.shared);
        let until = view.as_ref().and_then(|v| match v.slot {
            Slot::Record(_) => {
                at_revision(&shared.log, index, v.revision).map(Landed::earliest_expiry)
            }
            Slot::Free { .. } => None,
        });
        let line = shared.timeline.entry(index).or_default();
        if line.last().map(|seen| &seen.view) != Some(view) {
            line.push(Seen {
                at: Instant::now(),
                view: view.clone(),
                until,
            });
        }
    }

    /// What `key` held `lag` ago, by what landed and what reads found: a
    /// record that had run out by then reads as no message.
    pub fn as_of(&self, key: &IdempotencyKey, lag: Duration) -> Option<Versioned> {
        let index = self.key_index(key);
        let shared = lock(&self.shared);
        let then = Instant::now().checked_sub(lag).unwrap_or(shared.origin);
        let seen = shared
            .timeline
            .get(&index)?
            .iter()
            .rev()
            .find(|seen| seen.at <= then)?;
        match seen.until {
            Some(until) if until <= then => None,
            _ => seen.view.clone(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn landed(
        &self,
        key: &IdempotencyKey,
        owner: String,
        record: Option<Record>,
        expected: u64,
        revision: u64,
        ttl: Duration,
        start: Instant,
        acked: bool,
    ) {
        let key = self.key_index(key);
        let mut shared = lock(&self.shared);
        let step = shared.step;
        let what = match &record {
            Some(r) => format!("{:?} attempt {}", r.state, r.attempt),
            None => "delete".to_owned(),
        };
        let ack = if acked { "" } else { " [ack lost]" };
        shared.trace(format!(
            "    [{step}] {owner} wrote k{key} {what} over rev {expected} -> rev {revision}{ack}"
        ));
        let end = Instant::now();
        let seen = Seen {
            at: end,
            until: record.as_ref().map(|_| start + whole_secs(ttl)),
            view: Some(Versioned {
                revision,
                slot: match &record {
                    Some(record) => Slot::Record(record.clone()),
                    None => Slot::Free { expired: false },
                },
            }),
        };
        shared.timeline.entry(key).or_default().push(seen);
        shared.log.push(Landed {
            key,
            owner,
            record,
            expected,
            revision,
            ttl,
            start,
            end,
            acked,
            step,
        });
    }

    pub fn refused(&self, owner: &str, key: &IdempotencyKey, expected: u64, error: &StoreError) {
        self.note(format!(
            "{owner} write k{} over rev {expected} -> {error:?}",
            self.key_index(key)
        ));
    }
}

pub fn injected(kind: FaultKind) -> Option<StoreError> {
    match kind {
        FaultKind::LoseAck => None,
        FaultKind::FailUnacknowledged => Some(StoreError::Unacknowledged(
            "injected: timed out, not stored".to_owned(),
        )),
        FaultKind::FailUnavailable => Some(StoreError::Unavailable(
            "injected: refused, not stored".to_owned(),
        )),
    }
}

pub fn lost_ack() -> StoreError {
    StoreError::Unacknowledged("injected: stored, ack lost".to_owned())
}

#[async_trait::async_trait]
impl IdempotencyStore for Faulty {
    async fn read(&self, key: &IdempotencyKey) -> Result<Option<Versioned>, StoreError> {
        self.reads_fail("read", key)?;
        let current = self.inner.read(key).await?;
        self.observe(key, &current);
        let Some(lag) = lock(&self.shared).stale else {
            return Ok(current);
        };
        let then = self.as_of(key, lag);
        if then != current {
            self.coverage.hit("store: a stale read (injected)");
            let brief = |view: &Option<Versioned>| match view {
                None => "no message".to_owned(),
                Some(Versioned {
                    revision,
                    slot: Slot::Free { .. },
                }) => format!("a marker at rev {revision}"),
                Some(Versioned {
                    revision,
                    slot: Slot::Record(r),
                }) => {
                    format!("{}'s {:?} at rev {revision}", r.owner, r.state)
                }
            };
            self.note(format!(
                "read k{} -> {} (stale; the key holds {})",
                self.key_index(key),
                brief(&then),
                brief(&current)
            ));
        }
        Ok(then)
    }

    /// The leader's answer is never stale.
    async fn read_leader(&self, key: &IdempotencyKey) -> Result<Option<Versioned>, StoreError> {
        self.reads_fail("read_leader", key)?;
        let current = self.inner.read_leader(key).await?;
        self.observe(key, &current);
        Ok(current)
    }

    async fn write(
        &self,
        key: &IdempotencyKey,
        expected: u64,
        record: &Record,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        let fault = self.write_fault();
        if let Some(error) = fault.and_then(injected) {
            self.coverage
                .hit("store: a write failed without landing (injected)");
            self.refused(&record.owner, key, expected, &error);
            return Err(error);
        }
        let acked = fault != Some(FaultKind::LoseAck);
        let (this, key, record) = (self.clone(), key.clone(), record.clone());
        let written = self
            .detached(async move {
                let start = Instant::now();
                let written = this.inner.write(&key, expected, &record, ttl).await;
                match &written {
                    Ok(revision) => {
                        let owner = record.owner.clone();
                        this.landed(
                            &key,
                            owner,
                            Some(record),
                            expected,
                            *revision,
                            ttl,
                            start,
                            acked,
                        );
                    }
                    Err(error) => this.refused(&record.owner, &key, expected, error),
                }
                written
            })
            .await;
        self.acked(written, acked)
    }

    async fn remove(&self, key: &IdempotencyKey, expected: u64) -> Result<(), StoreError> {
        let owner = ACTOR
            .try_with(Clone::clone)
            .unwrap_or_else(|_| "?".to_owned());
        let fault = self.write_fault();
        if let Some(error) = fault.and_then(injected) {
            self.coverage
                .hit("store: a write failed without landing (injected)");
            self.refused(&owner, key, expected, &error);
            return Err(error);
        }
        let acked = fault != Some(FaultKind::LoseAck);
        let (this, key) = (self.clone(), key.clone());
        let removed = self
            .detached(async move {
                let start = Instant::now();
                let removed = this.inner.remove(&key, expected).await;
                match &removed {
                    Ok(()) => {
                        // The delete's revision, for the model (nothing else
                        // writes the key between the two calls).
                        let revision = match this.inner.read(&key).await {
                            Ok(Some(Versioned {
                                revision,
                                slot: Slot::Free { .. },
                            })) => revision,
                            _ => 0,
                        };
                        let ttl = idemq::store::memory::MARKER_TTL;
                        this.landed(&key, owner, None, expected, revision, ttl, start, acked);
                    }
                    Err(error) => this.refused(&owner, &key, expected, error),
                }
                removed
            })
            .await;
        self.acked(removed, acked)
    }

    async fn purge(&self, key: &IdempotencyKey, expected: u64) -> Result<(), StoreError> {
        self.inner.purge(key, expected).await
    }

    async fn wakeups(&self, key: &IdempotencyKey) -> Result<Wakeups, StoreError> {
        self.inner.wakeups(key).await
    }
}

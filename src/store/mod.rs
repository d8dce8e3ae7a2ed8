//! The idempotency store: where claims and outcomes live.
//!
//! [`IdempotencyStore`] is what a backend provides: a read (and a read from
//! the writes' authority), a compare-and-swap write with a TTL, a
//! compare-and-swap delete, a purge, and wake-ups when a key may have
//! changed. The claim protocol runs over them once, in `claim.rs`
//! ([`ClaimProtocol`]: claim, acquire, renew, complete, release), so that the
//! JetStream KV store ([`kv::KvStore`]) and the in-memory one
//! ([`memory::MemoryStore`]) cannot drift apart: they differ only in how a
//! revision is kept.
//!
//! The invariants (see `docs/claim.md`): a claim exists only as the key's latest
//! revision and every write is a compare-and-swap on the revision the writer
//! last saw; the revision is the fencing token of the lease; leases and
//! outcome lifetimes are TTLs enforced by the store, never by worker clocks.

mod claim;
pub mod kv;
pub mod memory;

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use tokio::time::Instant;

use crate::key::IdempotencyKey;
use crate::outcome::Record;

pub use claim::ClaimProtocol;

/// How long the marker that an expiry, a release or a purge leaves under a
/// key is kept, at least (the bucket's limit-marker TTL and the TTL of the
/// markers idemq writes). While it is there, a claim over it knows the key
/// ran before, and its attempt number is at least 2 (docs/contract.md v1.2 §4:
/// an upstream can rely on `Idem-Attempt: 1` meaning that no earlier
/// execution of the key started within this window). Watchers see it, and
/// a freed key costs the bucket one small message for this long.
pub const MARKER_TTL: Duration = Duration::from_secs(300);

/// The key readiness checks read (`/readyz`, a starting worker): any key
/// would do, since a read changes nothing; this one names its purpose.
pub fn probe_key() -> IdempotencyKey {
    IdempotencyKey::generate("idemq", "readiness-probe", 0)
}

/// What the latest revision of a key holds.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "a slot is read and matched at once, never kept in numbers"
)]
pub enum Slot {
    /// A claim or an outcome.
    Record(Record),
    /// A delete marker: the key is free. `expired` tells a marker left by
    /// the server's TTL expiry (or a purge) from a release by its owner.
    Free {
        /// True when the previous value expired rather than being released.
        expired: bool,
    },
}

/// A key's latest revision and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    /// The revision (the stream sequence, in JetStream KV).
    pub revision: u64,
    /// The content.
    pub slot: Slot,
}

/// Errors of the store. Callers match on the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A compare-and-swap write found another revision than expected.
    #[error("the key changed since it was read")]
    Conflict,
    /// A write's acknowledgement did not arrive: it may or may not be stored.
    #[error("the write was not acknowledged in time: {0}")]
    Unacknowledged(String),
    /// The lease is no longer ours: someone else wrote the key.
    #[error("the lease was lost to another owner")]
    LeaseLost,
    /// The bucket could not be read or written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The key holds a value that is not an idempotency record.
    #[error("the value under {key} is not an idempotency record: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why it did not decode.
        reason: String,
    },
    /// The record is larger than the store can hold in one message.
    #[error("the record is {size} bytes, over the {max} bytes the store takes in one message")]
    TooLarge {
        /// The record's size.
        size: usize,
        /// The most the store takes.
        max: usize,
    },
    /// The bucket cannot be used as configured (start-up only).
    #[error("{0}")]
    Setup(String),
}

/// Wake-ups of a key's follower: an item whenever the key may have changed
/// (see [`IdempotencyStore::wakeups`]).
pub type Wakeups = BoxStream<'static, Wakeup>;

/// One wake-up: a write attempt on the key, seen as it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Wakeup {
    /// The revision the write was made against, when the store can tell
    /// (a compare-and-swap write). A write against the revision a follower
    /// holds is the holder's (a renewal, its outcome, a release) or a
    /// takeover: it is about to land, and a replica that does not show it
    /// yet, the leader included, soon will.
    pub against: Option<u64>,
}

/// What a worker asks for when it claims a key.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The key to claim.
    pub key: IdempotencyKey,
    /// The intent's id, recorded for readers.
    pub intent_id: String,
    /// The intent's fingerprint.
    pub fingerprint: String,
    /// A token unique to this claim attempt, so a write whose
    /// acknowledgement was lost can be recognised as ours.
    pub owner: String,
    /// The lease: how long the claim lives unless renewed.
    pub lease: Duration,
}

/// A held claim: the revision that fences every later write of its owner.
///
/// The owner's writes update it in place ([`ClaimProtocol::renew`],
/// [`complete`](ClaimProtocol::complete), [`release`](ClaimProtocol::release)
/// take it by `&mut`), because a write whose acknowledgement was lost
/// leaves an uncertainty that must outlive the call: see `unsettled`.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The revision our last write produced.
    pub revision: u64,
    /// A write of ours may have landed after `revision` without our
    /// knowing (its acknowledgement was lost and no read settled it). Until
    /// settled, a conflict is read: our own owner token at a newer revision
    /// is our write, adopted; only another owner, a marker or no message
    /// means the lease is lost. Without this an owner would drop a lease it
    /// still holds, and the key would run twice when that lease expired.
    pub unsettled: bool,
    /// When the lease ends at the latest, by this worker's clock: the start
    /// of our last acknowledged write plus the lease. How long an outcome
    /// is worth retrying for.
    pub held_until: Instant,
    /// The claim record as stored.
    pub record: Record,
    /// The lease length.
    pub ttl: Duration,
    /// True when this claim took the key over from an owner whose lease expired.
    pub takeover: bool,
}

/// The result of one claim round.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The key is ours.
    Acquired(Lease),
    /// Someone holds the key, or an outcome is stored: the latest revision.
    Taken {
        /// Its revision.
        revision: u64,
        /// The record there.
        record: Record,
    },
}

/// The result of [`ClaimProtocol::acquire`]: claim, or wait for the holder.
#[derive(Debug, Clone, PartialEq)]
pub enum Acquire {
    /// We hold the key: execute.
    Owner(Lease),
    /// An outcome with the same fingerprint is stored: replay it.
    Stored {
        /// The stored record.
        record: Record,
        /// Whether another execution held the key and this copy waited for it.
        waited: bool,
    },
    /// The key is claimed or done with another fingerprint.
    Reused(Record),
    /// Another execution still holds the key after the wait.
    Busy(Record),
}

/// What a backend provides: storage primitives, nothing of the protocol
/// (which [`ClaimProtocol`] runs over them, the same for every backend).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Reads the latest revision of `key`; `None` when the key has no message at all.
    async fn read(&self, key: &IdempotencyKey) -> Result<Option<Versioned>, StoreError>;

    /// Writes `record` with a TTL if the key's latest revision is `expected`
    /// (0: the key has no message). Returns the new revision, or
    /// [`StoreError::Conflict`].
    async fn write(
        &self,
        key: &IdempotencyKey,
        expected: u64,
        record: &Record,
        ttl: Duration,
    ) -> Result<u64, StoreError>;

    /// Deletes `key` (leaves a delete marker) if its latest revision is `expected`.
    async fn remove(&self, key: &IdempotencyKey, expected: u64) -> Result<(), StoreError>;

    /// Purges `key` (administrative) if its latest revision is still
    /// `expected`, the one the operator's read saw: a claim made since is
    /// never removed unseen. [`StoreError::Conflict`] otherwise.
    async fn purge(&self, key: &IdempotencyKey, expected: u64) -> Result<(), StoreError>;

    /// Wakes a follower of `key` whenever the key may have changed: an item
    /// per write attempt (spurious ones are fine), and ends only when the
    /// store goes away. A write made after this returns always wakes it,
    /// possibly before a read can see it: a store whose reads may lag its
    /// writes says what each write was made against ([`Wakeup::against`]).
    /// Expiries may go unannounced: a follower also reads when the record
    /// it saw must have run out, and every `FOLLOW_POLL` (2 s).
    async fn wakeups(&self, key: &IdempotencyKey) -> Result<Wakeups, StoreError>;

    /// The JetStream KV bucket this store lives in, if it is one: `idemq
    /// purge` announces purges on the bucket's purge subject, and the
    /// worker listens there.
    fn bucket(&self) -> Option<&str> {
        None
    }

    /// Reads `key` from the authority that orders its writes (a stream's
    /// leader), where [`read`](Self::read) may be served by a replica. The
    /// default is `read`, for stores whose reads are always current.
    async fn read_leader(&self, key: &IdempotencyKey) -> Result<Option<Versioned>, StoreError> {
        self.read(key).await
    }
}

/// Rounds a duration up to whole seconds, at least one: the unit of
/// JetStream's per-message TTL. Both stores use it so they expire alike.
pub fn ttl_secs(ttl: Duration) -> u64 {
    let secs = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0));
    secs.max(1)
}

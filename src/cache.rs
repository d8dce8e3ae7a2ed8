//! A bounded in-process cache of stored outcomes.
//!
//! An outcome never changes once stored: until it expires (or an operator
//! purges it) every copy of the intent gets exactly that record. So a
//! worker that has seen an outcome can answer later copies without a KV
//! round trip. Two things keep that honest:
//!
//! * entries live no longer than [`MAX_AGE`], and stop [`EXPIRY_MARGIN`]
//!   before the record's own lifetime (`expires_at - stored_at`, both of
//!   the writer's clock) counted from when this worker saw it, or before
//!   its expiry by this host's clock if that is sooner: no writer's clock,
//!   fast or slow, makes a worker replay an expired outcome, and a missed
//!   purge notice costs at most [`MAX_AGE`];
//! * a purge is announced on `idemq.purge.<bucket>` and every worker evicts
//!   the key at once (`purge.rs`); an outcome read before a notice is not
//!   let in after it.
//!
//! The cache is bounded by memory (`--cache`, counted from each entry's
//! encoded reply, key, fingerprint and alias); the oldest insertion goes
//! first, and a full cache lets in no outcome stored before every one it
//! holds. It keeps each outcome as the encoded bytes of its replay
//! ([`EncodedReply`]), so a cached copy is answered without building or
//! serialising a reply, and an entry costs about what it sends. An entry's
//! alias is the digest of the last message it answered
//! ([`crate::intent::copy_digest`]): a byte-identical copy finds it
//! before it is decoded ([`OutcomeCache::lookup_copy`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use async_nats::Subject;

use crate::intent::{fingerprint_bits, CopyDigest, Fingerprint};
use crate::key::IdempotencyKey;
use crate::outcome::Record;
use crate::reply::EncodedReply;

/// Longest time an entry is served from the cache.
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// How long before the record's expiry an entry stops being served.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(2);

/// What the cache knows about a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// A stored outcome with the same fingerprint, as its encoded replay.
    Stored(Arc<EncodedReply>),
    /// A stored outcome with another fingerprint: `KEY_REUSED`.
    Reused,
    /// Nothing (or nothing fresh enough).
    Miss,
}

/// What an entry keeps of a SHA-256 (an intent's fingerprint, a copy's
/// digest) to compare with: its first 128 bits. Matching another's intent
/// or message takes a second preimage of 128 bits of SHA-256; a sender who
/// makes both of two messages needs a collision (about 2^64 work), and
/// gains only confusion between its own: a copy's digest covers its
/// subject (with a tenant's token) and key, and every hit compares the
/// whole scoped key.
type Half = [u64; 2];

/// A fingerprint's first 128 bits.
fn fingerprint_half(fingerprint: &Fingerprint) -> Half {
    [fingerprint[0], fingerprint[1]]
}

/// A copy digest's first 128 bits.
fn digest_half(digest: &CopyDigest) -> Half {
    let word = |at: usize| {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&digest[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    [word(0), word(8)]
}

/// An entry: keyed by the key's 64 bits, so the key's text lives once
/// (in the reply) and the entry allocates nothing beyond its reply (an
/// alias may keep a reply target). The bits find it; the key in its
/// reply, the whole scoped key, is what a hit is compared with.
struct Entry {
    fingerprint: Half,
    replay: Arc<EncodedReply>,
    /// When it stops being served, in tenths of a second since the cache
    /// was made (rounded down: an entry never lives longer than asked).
    until: u32,
    /// When the outcome was stored, in whole seconds of the writer's
    /// clock since [`STORED_EPOCH`]: when the cache is full, an outcome
    /// stored before the oldest one held is not let in.
    stored: u32,
    /// The digest of the last message answered with it, if any: its one
    /// alias, held in the aliases' slot of its first 64 bits.
    alias: Option<Half>,
}

/// A message's bytes answered with an entry, in the slot of its digest's
/// first 64 bits: the entry's key bits and where the message asked to be
/// answered (already vetted by the reply policy). A hit needs the entry
/// to name the digest's 128 bits back: an alias whose entry was replaced
/// or evicted, or whose slot another digest took, finds nothing.
struct Alias {
    bits: u64,
    /// Kept as a boxed str, half a `Subject`'s size: a hit that uses it
    /// copies it into a `Subject` (only targets named in a body are kept).
    reply_to: Option<Box<str>>,
}

/// A replay found by a message's digest ([`OutcomeCache::lookup_copy`]).
#[derive(Debug, Clone)]
pub struct CopyHit {
    /// The encoded replay.
    pub replay: Arc<EncodedReply>,
    /// The reply target the alias keeps (see [`OutcomeCache::alias`]).
    pub reply_to: Option<Subject>,
    /// The first 64 bits of the intent's fingerprint.
    pub fingerprint: u64,
}

/// What [`Entry::stored`] counts from: 2020-01-01T00:00:00Z.
const STORED_EPOCH: i64 = 1_577_836_800;

/// `at` in whole seconds since [`STORED_EPOCH`], saturating at both ends.
fn stored_seconds(at: chrono::DateTime<chrono::Utc>) -> u32 {
    u32::try_from((at.timestamp() - STORED_EPOCH).max(0)).unwrap_or(u32::MAX)
}

/// A hash map's slot of `size` bytes, as what it costs per entry: the
/// slot and its control byte, at the table's mean load. hashbrown keeps
/// a table between 7/16 and 7/8 full; over the sizes a cache grows
/// through, that is 8 / (7 ln 2), about 1.65 slots per entry.
const fn table_slot(size: usize) -> usize {
    (size + 1) * 33 / 20
}

/// What an entry costs: its reply's allocations (see
/// [`EncodedReply::size`]), its map slot and its eviction order's (a
/// growing deque, which also keeps names of entries gone until it is
/// swept).
fn entry_cost(replay: &EncodedReply) -> usize {
    const SLOTS: usize = table_slot(8 + std::mem::size_of::<Entry>()) + 16;
    replay.size() + SLOTS
}

/// What an alias costs: its map slot and the reply subject it keeps.
fn alias_cost(reply_to: Option<&str>) -> usize {
    const SLOT: usize = table_slot(8 + std::mem::size_of::<Alias>());
    SLOT + reply_to.map_or(0, str::len)
}

/// What the cache holds. Every alias in `aliases` is named back by its
/// entry, and `bytes` counts each entry and each alias in the map.
#[derive(Default)]
struct Inner {
    entries: HashMap<u64, Entry>,
    aliases: HashMap<u64, Alias>,
    order: VecDeque<u64>,
    bytes: usize,
}

impl Inner {
    fn evict(&mut self, bits: u64) {
        if let Some(entry) = self.entries.remove(&bits) {
            self.bytes -= entry_cost(&entry.replay);
            if let Some(alias) = entry.alias {
                self.free_alias_slot(alias[0]);
            }
        }
    }

    /// Empties the aliases' slot `slot` (a digest's first 64 bits), and
    /// the entry whose alias it held forgets it.
    fn free_alias_slot(&mut self, slot: u64) {
        let Some(alias) = self.aliases.remove(&slot) else {
            return;
        };
        self.bytes -= alias_cost(alias.reply_to.as_deref());
        if let Some(entry) = self.entries.get_mut(&alias.bits) {
            if entry.alias.is_some_and(|named| named[0] == slot) {
                entry.alias = None;
            }
        }
    }

    /// When the oldest entry's outcome was stored (names of entries
    /// already gone are dropped from the front on the way).
    fn oldest_stored(&mut self) -> Option<u32> {
        while let Some(bits) = self.order.front() {
            if let Some(entry) = self.entries.get(bits) {
                return Some(entry.stored);
            }
            self.order.pop_front();
        }
        None
    }

    fn trim(&mut self, budget: usize) {
        while self.bytes > budget {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.evict(oldest);
        }
    }
}

/// The cache's lock, held: what it holds is shown on the gauges when it
/// is let go, whatever was done with it.
struct Held<'a> {
    inner: MutexGuard<'a, Inner>,
    gauges: &'a (Gauge, Gauge),
}

impl std::ops::Deref for Held<'_> {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let (entries, bytes) = self.gauges;
        entries.set(i64::try_from(self.inner.entries.len()).unwrap_or(i64::MAX));
        bytes.set(i64::try_from(self.inner.bytes).unwrap_or(i64::MAX));
    }
}

/// The outcome cache, bounded by the memory its entries hold.
pub struct OutcomeCache {
    budget: usize,
    /// What it holds, shown as metrics: entries and their cost.
    gauges: (Gauge, Gauge),
    /// Purge notices so far: an outcome read before one is not let in
    /// after it (see [`OutcomeCache::insert`]).
    purges: std::sync::atomic::AtomicU64,
    /// What entries' lifetimes count from.
    epoch: Instant,
    inner: Mutex<Inner>,
}

impl OutcomeCache {
    /// A cache holding at most about `budget` bytes of outcomes (0 disables it).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            gauges: (Gauge::default(), Gauge::default()),
            purges: std::sync::atomic::AtomicU64::new(0),
            epoch: Instant::now(),
            inner: Mutex::default(),
        }
    }

    /// Shows what it holds on these gauges (entries, bytes).
    pub(crate) fn shown_on(mut self, entries: Gauge, bytes: Gauge) -> Self {
        self.gauges = (entries, bytes);
        self
    }

    /// Tenths of a second from the epoch to `at` (saturating).
    fn tick(&self, at: Instant) -> u32 {
        u32::try_from(at.duration_since(self.epoch).as_millis() / 100).unwrap_or(u32::MAX)
    }

    fn lock(&self) -> Held<'_> {
        // Only a cache: a panic while holding it leaves it usable.
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Held {
            inner,
            gauges: &self.gauges,
        }
    }

    /// Whether the cache keeps anything (`--cache` above 0).
    pub fn is_enabled(&self) -> bool {
        self.budget > 0
    }

    /// The replay for a message byte-identical to one already answered
    /// from a live entry ([`alias`](Self::alias)): found by its digest,
    /// before it is decoded. Expiry, purges and the budget apply as to
    /// the entry itself, which the alias goes with.
    pub fn lookup_copy(&self, digest: &CopyDigest) -> Option<CopyHit> {
        let half = digest_half(digest);
        let mut inner = self.lock();
        let alias = inner.aliases.get(&half[0])?;
        let (bits, reply_to) = (alias.bits, alias.reply_to.as_deref().map(Subject::from));
        let entry = inner.entries.get(&bits)?;
        if entry.alias != Some(half) {
            return None;
        }
        if entry.until <= self.tick(Instant::now()) {
            inner.evict(bits);
            return None;
        }
        Some(CopyHit {
            replay: Arc::clone(&entry.replay),
            reply_to,
            fingerprint: entry.fingerprint[0],
        })
    }

    /// Remembers that the message with `digest` decoded to an intent of
    /// `key` and `fingerprint` answered from the cache, with `reply_to` to
    /// keep for its copies (the pipeline passes only a target named in the
    /// body: one in a header is read from the copy's own header), so that
    /// its byte-identical copies are answered by
    /// [`lookup_copy`](Self::lookup_copy). Nothing happens when no live
    /// entry of that key and fingerprint is held. An entry keeps one
    /// alias, the latest.
    pub fn alias(
        &self,
        digest: CopyDigest,
        key: &IdempotencyKey,
        fingerprint: &Fingerprint,
        reply_to: Option<&str>,
    ) {
        let (half, fingerprint) = (digest_half(&digest), fingerprint_half(fingerprint));
        let bits = key.bits();
        let mut inner = self.lock();
        let old = match inner.entries.get(&bits) {
            Some(entry)
                if entry.fingerprint == fingerprint
                    && entry.replay.idem_key.as_ref() == Some(key) =>
            {
                if entry.alias == Some(half) {
                    return;
                }
                entry.alias
            }
            _ => return,
        };
        if let Some(old) = old {
            inner.free_alias_slot(old[0]);
        }
        // The slot may hold another entry's alias (the same bytes under
        // 64-bit keys that collide, or digests alike in 64 bits): this one
        // takes it, and that one is then answered after decoding.
        inner.free_alias_slot(half[0]);
        inner.bytes += alias_cost(reply_to);
        inner.aliases.insert(
            half[0],
            Alias {
                bits,
                reply_to: reply_to.map(Into::into),
            },
        );
        if let Some(entry) = inner.entries.get_mut(&bits) {
            entry.alias = Some(half);
        }
        inner.trim(self.budget);
    }

    /// Looks a key up for an intent with `fingerprint` (its bits, from
    /// [`fingerprint_bits`]; `None` matches no entry).
    pub fn lookup(&self, key: &IdempotencyKey, fingerprint: Option<&Fingerprint>) -> Lookup {
        let bits = key.bits();
        let mut inner = self.lock();
        let Some(entry) = inner.entries.get(&bits) else {
            return Lookup::Miss;
        };
        // The bits are a map key, not an identity: another tenant can make
        // any key's bits (docs/contract.md v1.2 §5). Only the whole key is.
        if entry.replay.idem_key.as_ref() != Some(key) {
            return Lookup::Miss;
        }
        if entry.until <= self.tick(Instant::now()) {
            inner.evict(bits);
            return Lookup::Miss;
        }
        if fingerprint.map(fingerprint_half) == Some(entry.fingerprint) {
            Lookup::Stored(Arc::clone(&entry.replay))
        } else {
            Lookup::Reused
        }
    }

    /// How many purge notices came so far: take it before reading the
    /// store, and give it to [`insert`](Self::insert).
    pub fn purges(&self) -> u64 {
        self.purges.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Remembers a stored record's `replay` (its encoding with
    /// `replayed: true`, [`EncodedReply::of_record`]), to answer its copies
    /// with.
    ///
    /// `purges_before` is [`purges`](Self::purges) as it was before the
    /// record was read: when a purge notice came since, the record may be
    /// the purged one, evicted before it got here, and it is not let in.
    pub fn insert(&self, record: &Record, replay: &Arc<EncodedReply>, purges_before: u64) {
        if self.budget == 0 {
            return;
        }
        // The record's own lifetime is a difference of two stamps of one
        // clock, the writer's: whatever that clock's skew, the outcome
        // expires no later than that long after this worker saw it. The
        // expiry read against this host's clock is shorter for an old
        // record; a writer whose clock runs fast would make it longer, so
        // it only ever shortens the entry's life.
        let lifetime = (record.expires_at - record.stored_at)
            .to_std()
            .unwrap_or_default();
        let now = chrono::Utc::now();
        let by_this_clock = (record.expires_at - now).to_std().unwrap_or_default();
        // As the bucket counts it: from when the store wrote it, by the
        // store's clock. A record read long after it was written, from a
        // writer whose clock runs fast, would otherwise outlive its expiry.
        let by_the_bucket = record.written.map_or(lifetime, |written| {
            (written + lifetime - now).to_std().unwrap_or_default()
        });
        let left = lifetime.min(by_this_clock).min(by_the_bucket);
        let Some(left) = left.checked_sub(EXPIRY_MARGIN) else {
            return;
        };
        let cost = entry_cost(replay);
        let Some(fingerprint) = fingerprint_bits(&record.fingerprint) else {
            return;
        };
        if cost > self.budget {
            return;
        }
        let stored = stored_seconds(record.stored_at);
        let entry = Entry {
            fingerprint: fingerprint_half(&fingerprint),
            replay: Arc::clone(replay),
            until: self.tick(Instant::now() + left.min(MAX_AGE)),
            stored,
            alias: None,
        };
        let bits = record.idem_key.bits();
        let mut inner = self.lock();
        // Under the lock: a purge counted before it is seen here, and one
        // counted after it evicts this entry once the lock is free
        // ([`remove`](Self::remove) counts, then locks). Checked before
        // the lock, a purge could count and evict in between, and the
        // purged outcome would be let in after its eviction.
        if self.purges() != purges_before {
            return;
        }
        // Full: the oldest entry makes room, unless this outcome is older
        // still. Then it stays out: it would push out a newer one, and a
        // run of replays longer than the cache holds (each read from the
        // store, in the order they were stored) would evict every entry
        // just before it is asked for.
        if inner.bytes + cost > self.budget && !inner.entries.contains_key(&bits) {
            if let Some(oldest) = inner.oldest_stored() {
                if stored < oldest {
                    return;
                }
            }
        }
        inner.bytes += cost;
        match inner.entries.insert(bits, entry) {
            Some(old) => {
                inner.bytes -= entry_cost(&old.replay);
                if let Some(alias) = old.alias {
                    inner.free_alias_slot(alias[0]);
                }
            }
            None => inner.order.push_back(bits),
        }
        inner.trim(self.budget);
        // Keys evicted by lookup or purge leave stale names in `order`;
        // drop them once they outnumber live entries.
        if inner.order.len() > 2 * inner.entries.len().max(16) {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|key| entries.contains_key(key));
        }
    }

    /// Forgets a key (purged).
    pub fn remove(&self, key: &IdempotencyKey) {
        self.purges
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let mut inner = self.lock();
        let bits = key.bits();
        if inner
            .entries
            .get(&bits)
            .is_some_and(|entry| entry.replay.idem_key.as_ref() == Some(key))
        {
            inner.evict(bits);
        }
    }

    /// Entries held and the bytes they are counted at.
    #[cfg(test)]
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.entries.len(), inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{Outcome, RecordState, RECORD_VERSION};

    const FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const OTHER: &str = "1123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn record(step: u32, fingerprint: &str, ttl_secs: i64) -> Record {
        // Whole seconds, so every record encodes to the same length.
        let now = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 0);
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
            written: None,
        }
    }

    #[test]
    fn serves_same_fingerprint_and_refuses_another() {
        let cache = OutcomeCache::new(1 << 20);
        let stored = record(1, FP, 60);
        let replay = put(&cache, &stored, 0);
        assert_eq!(
            cache.lookup(&stored.idem_key, Some(&bits(FP))),
            Lookup::Stored(replay)
        );
        assert_eq!(
            cache.lookup(&stored.idem_key, Some(&bits(OTHER))),
            Lookup::Reused
        );
        cache.remove(&stored.idem_key);
        assert_eq!(
            cache.lookup(&stored.idem_key, Some(&bits(FP))),
            Lookup::Miss
        );
    }

    /// Encodes a record's replay and inserts it, as the pipeline does.
    fn put(cache: &OutcomeCache, record: &Record, purges: u64) -> Arc<EncodedReply> {
        let replay = EncodedReply::of_record(record, true).expect("an outcome");
        cache.insert(record, &replay, purges);
        replay
    }

    fn bits(hex: &str) -> Fingerprint {
        fingerprint_bits(hex).expect("a SHA-256 hex")
    }

    fn digest(text: &str) -> CopyDigest {
        crate::intent::copy_digest("intents.echo", None, text.as_bytes())
    }

    #[test]
    fn a_copy_is_found_by_its_digest_while_its_entry_lives() {
        let cache = OutcomeCache::new(1 << 20);
        let stored = record(11, FP, 60);
        let replay = put(&cache, &stored, 0);
        let copy = digest("copy");
        assert!(cache.lookup_copy(&copy).is_none(), "not aliased yet");
        // Another fingerprint is not this entry's: nothing is aliased.
        cache.alias(copy, &stored.idem_key, &bits(OTHER), None);
        assert!(cache.lookup_copy(&copy).is_none());
        cache.alias(copy, &stored.idem_key, &bits(FP), Some("results.a"));
        let hit = cache.lookup_copy(&copy).expect("a hit");
        assert_eq!(hit.replay, replay);
        assert_eq!(hit.reply_to.as_deref(), Some("results.a"));
        assert_eq!(hit.fingerprint, 0x0123_4567_89ab_cdef);
        assert!(cache.lookup_copy(&digest("other bytes")).is_none());
        // Purged: the alias goes with the entry, and so does its cost.
        cache.remove(&stored.idem_key);
        assert!(cache.lookup_copy(&copy).is_none());
        assert_eq!(cache.usage(), (0, 0));
    }

    #[test]
    fn a_new_outcome_under_the_key_drops_the_old_bytes_alias() {
        let cache = OutcomeCache::new(1 << 20);
        let first = record(12, FP, 60);
        put(&cache, &first, 0);
        let copy = digest("first intent");
        cache.alias(copy, &first.idem_key, &bits(FP), None);
        // The key purged elsewhere and stored again by another intent: the
        // first intent's bytes must not replay the second's outcome.
        let second = record(12, OTHER, 60);
        put(&cache, &second, 0);
        assert!(cache.lookup_copy(&copy).is_none());
        let (entries, bytes) = cache.usage();
        let alone = OutcomeCache::new(1 << 20);
        put(&alone, &second, 0);
        assert_eq!((entries, bytes), alone.usage(), "the alias's cost went too");
    }

    #[test]
    fn an_entry_keeps_one_alias_and_aliases_count_against_the_budget() {
        let cache = OutcomeCache::new(1 << 20);
        let stored = record(13, FP, 60);
        put(&cache, &stored, 0);
        let bare = cache.usage().1;
        cache.alias(digest("a"), &stored.idem_key, &bits(FP), None);
        let one = cache.usage().1;
        assert!(one > bare);
        cache.alias(digest("b"), &stored.idem_key, &bits(FP), None);
        assert_eq!(cache.usage().1, one, "the latest alias replaced the first");
        assert!(cache.lookup_copy(&digest("a")).is_none());
        assert!(cache.lookup_copy(&digest("b")).is_some());
        // A budget with room for the entry but not its alias.
        let tight = OutcomeCache::new(bare);
        put(&tight, &stored, 0);
        tight.alias(digest("a"), &stored.idem_key, &bits(FP), None);
        assert!(tight.usage().1 <= bare, "{:?}", tight.usage());
    }

    #[test]
    fn digests_alike_in_their_first_64_bits_take_turns_and_never_answer_for_each_other() {
        let cache = OutcomeCache::new(1 << 20);
        let (first, second) = (record(15, FP, 60), record(16, OTHER, 60));
        let first_replay = put(&cache, &first, 0);
        let second_replay = put(&cache, &second, 0);
        let bare = cache.usage();
        // Two messages whose digests share the aliases' slot (first 64
        // bits) and differ after it, one per entry.
        let a = digest("a");
        let mut b = a;
        b[8] ^= 1;
        cache.alias(a, &first.idem_key, &bits(FP), None);
        let one_alias = cache.usage();
        assert_eq!(
            cache.lookup_copy(&a).map(|hit| hit.replay),
            Some(first_replay)
        );
        assert!(cache.lookup_copy(&b).is_none(), "b is not a's copy");
        // b takes the slot: a is answered after decoding from now on, and
        // the first entry's alias and its cost are gone.
        cache.alias(b, &second.idem_key, &bits(OTHER), None);
        assert!(cache.lookup_copy(&a).is_none());
        assert_eq!(
            cache.lookup_copy(&b).map(|hit| hit.replay),
            Some(second_replay)
        );
        assert_eq!(cache.usage(), one_alias);
        // Differing past 128 bits is the same copy as far as the cache
        // knows (a second preimage of 128 bits of SHA-256 away).
        let mut far = b;
        far[20] ^= 1;
        assert!(cache.lookup_copy(&far).is_some());
        cache.remove(&second.idem_key);
        assert!(cache.lookup_copy(&b).is_none());
        assert_eq!(cache.usage().0, 1);
        assert_eq!(
            cache.usage().1,
            bare.1 / 2,
            "the second entry and b's alias went"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_is_not_replayed_past_its_entrys_life() {
        let cache = OutcomeCache::new(1 << 20);
        let stored = record(14, FP, 10);
        put(&cache, &stored, 0);
        cache.alias(digest("c"), &stored.idem_key, &bits(FP), None);
        assert!(cache.lookup_copy(&digest("c")).is_some());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(cache.lookup_copy(&digest("c")).is_none());
        assert_eq!(cache.usage(), (0, 0));
    }

    #[test]
    fn a_full_cache_lets_in_no_outcome_older_than_all_it_holds() {
        let records: Vec<Record> = (20..23).map(|i| record(i, FP, 60)).collect();
        let one = {
            let probe = OutcomeCache::new(1 << 20);
            put(&probe, &records[0], 0);
            probe.usage().1
        };
        let cache = OutcomeCache::new(3 * one);
        for r in &records {
            put(&cache, r, 0);
        }
        assert_eq!(cache.usage().0, 3);
        // Read back from the store: stored a minute before anything held.
        let mut old = record(23, FP, 3600);
        old.stored_at -= chrono::Duration::seconds(60);
        put(&cache, &old, 0);
        assert_eq!(cache.lookup(&old.idem_key, Some(&bits(FP))), Lookup::Miss);
        for r in &records {
            assert!(matches!(
                cache.lookup(&r.idem_key, Some(&bits(FP))),
                Lookup::Stored(_)
            ));
        }
        // A new outcome still pushes out the oldest.
        let new = record(24, FP, 60);
        put(&cache, &new, 0);
        assert!(matches!(
            cache.lookup(&new.idem_key, Some(&bits(FP))),
            Lookup::Stored(_)
        ));
        assert_eq!(
            cache.lookup(&records[0].idem_key, Some(&bits(FP))),
            Lookup::Miss
        );
    }

    #[test]
    fn outcomes_about_to_expire_are_not_cached() {
        let cache = OutcomeCache::new(1 << 20);
        let stored = record(2, FP, 1);
        put(&cache, &stored, 0);
        assert_eq!(
            cache.lookup(&stored.idem_key, Some(&bits(FP))),
            Lookup::Miss
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_clock_running_fast_cannot_keep_an_outcome_past_its_lifetime() {
        let cache = OutcomeCache::new(1 << 20);
        // Written by a host an hour ahead, to be kept 10 s.
        let mut stored = record(5, FP, 10);
        stored.stored_at += chrono::Duration::hours(1);
        stored.expires_at += chrono::Duration::hours(1);
        put(&cache, &stored, 0);
        assert!(matches!(
            cache.lookup(&stored.idem_key, Some(&bits(FP))),
            Lookup::Stored(_)
        ));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            cache.lookup(&stored.idem_key, Some(&bits(FP))),
            Lookup::Miss,
            "10 s after it was seen, the outcome is gone from the store"
        );
        // The same, read 7 s after the store wrote it (its own clock): the
        // bucket expires it 3 s from now, and so does the cache (less its
        // margin), not 10 s from now.
        let mut late = record(7, FP, 10);
        late.stored_at += chrono::Duration::hours(1);
        late.expires_at += chrono::Duration::hours(1);
        late.written = Some(chrono::Utc::now() - chrono::Duration::seconds(7));
        put(&cache, &late, 0);
        assert!(matches!(
            cache.lookup(&late.idem_key, Some(&bits(FP))),
            Lookup::Stored(_)
        ));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            cache.lookup(&late.idem_key, Some(&bits(FP))),
            Lookup::Miss,
            "gone a margin before the bucket's expiry"
        );
    }

    #[test]
    fn an_outcome_read_before_a_purge_notice_is_not_let_in_after_it() {
        let cache = OutcomeCache::new(1 << 20);
        let stored = record(8, FP, 60);
        let before = cache.purges();
        // The notice comes while the delivery that read it is under way.
        cache.remove(&stored.idem_key);
        put(&cache, &stored, before);
        assert_eq!(
            cache.lookup(&stored.idem_key, Some(&bits(FP))),
            Lookup::Miss,
            "the purged outcome is not served"
        );
        put(&cache, &stored, cache.purges());
        assert!(matches!(
            cache.lookup(&stored.idem_key, Some(&bits(FP))),
            Lookup::Stored(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_clock_running_slow_shortens_the_entry_to_its_own_expiry() {
        let cache = OutcomeCache::new(1 << 20);
        // Written by a host 50 s behind, to be kept 60 s: by this clock it
        // expires in 10 s, and the store may well agree.
        let mut stored = record(6, FP, 60);
        stored.stored_at -= chrono::Duration::seconds(50);
        stored.expires_at -= chrono::Duration::seconds(50);
        put(&cache, &stored, 0);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(
            cache.lookup(&stored.idem_key, Some(&bits(FP))),
            Lookup::Miss
        );
    }

    #[test]
    fn the_oldest_entries_go_first_past_the_budget() {
        let records: Vec<Record> = (0..10).map(|i| record(i, FP, 60)).collect();
        let one = {
            let probe = OutcomeCache::new(1 << 20);
            put(&probe, &records[0], 0);
            probe.usage().1
        };
        assert!(one > 0);
        // Room for three entries of this size, not four.
        let cache = OutcomeCache::new(3 * one + one / 2);
        for r in &records {
            put(&cache, r, 0);
        }
        let (entries, bytes) = cache.usage();
        assert_eq!(entries, 3);
        assert!(bytes <= 3 * one + one / 2, "{bytes}");
        for r in &records[..7] {
            assert_eq!(cache.lookup(&r.idem_key, Some(&bits(FP))), Lookup::Miss);
        }
        for r in &records[7..] {
            assert!(matches!(
                cache.lookup(&r.idem_key, Some(&bits(FP))),
                Lookup::Stored(_)
            ));
        }
        cache.remove(&records[9].idem_key);
        assert_eq!(cache.usage(), (2, 2 * one));
    }

    #[test]
    fn the_gauges_show_what_the_cache_holds_after_each_change() {
        let (entries, bytes) = (Gauge::default(), Gauge::default());
        let records: Vec<Record> = (0..4).map(|i| record(i, FP, 60)).collect();
        let one = {
            let probe = OutcomeCache::new(1 << 20);
            put(&probe, &records[0], 0);
            probe.usage().1
        };
        let cache = OutcomeCache::new(2 * one).shown_on(entries.clone(), bytes.clone());
        let shown = || (entries.get(), bytes.get());
        let one = i64::try_from(one).expect("small");
        put(&cache, &records[0], 0);
        assert_eq!(shown(), (1, one));
        // Past the budget: the oldest goes, the gauges follow.
        for r in &records[1..] {
            put(&cache, r, 0);
        }
        assert_eq!(shown(), (2, 2 * one));
        cache.remove(&records[3].idem_key);
        assert_eq!(shown(), (1, one));
        cache.remove(&records[2].idem_key);
        assert_eq!(shown(), (0, 0));
    }

    #[test]
    fn a_fingerprint_that_is_not_sha256_hex_is_never_served() {
        let cache = OutcomeCache::new(1 << 20);
        let stored = record(4, "not-hex", 60);
        put(&cache, &stored, 0);
        let unparsed = fingerprint_bits("not-hex");
        assert_eq!(unparsed, None);
        assert_eq!(
            cache.lookup(&stored.idem_key, unparsed.as_ref()),
            Lookup::Miss
        );
    }

    #[test]
    fn a_zero_budget_caches_nothing() {
        let cache = OutcomeCache::new(0);
        let stored = record(3, FP, 60);
        put(&cache, &stored, 0);
        assert_eq!(
            cache.lookup(&stored.idem_key, Some(&bits(FP))),
            Lookup::Miss
        );
        assert_eq!(cache.usage(), (0, 0));
    }
}

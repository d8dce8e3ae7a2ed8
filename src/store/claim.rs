//! The claim protocol (`docs/claim.md`, docs/contract.md §4), written once over the
//! backend's primitives: claim, acquire (claim or wait for the holder),
//! renew, complete, release, and the reads they settle conflicts with.
//!
//! [`ClaimProtocol`] is implemented for every [`IdempotencyStore`] and for
//! nothing else, so a backend provides storage only and cannot change a
//! step of the protocol that both stores share.

use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::time::Instant;

use super::{
    Acquire, Claim, ClaimRequest, IdempotencyStore, Lease, Slot, StoreError, Versioned, Wakeups,
};
use crate::codes::RESULT_TOO_LARGE;
use crate::config::{MAX_DURATION, MAX_TTL};
use crate::key::IdempotencyKey;
use crate::outcome::{now, Outcome, Record, RecordState, RECORD_VERSION};

/// How often a claim is retried when the key changes under it (the
/// create/delete race, an expiry between two calls) before giving up.
const MAX_CLAIM_ROUNDS: usize = 8;
/// First pause before retrying an owner's write on an unavailable store.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between such retries.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Least time one owner's write attempt is given, however little patience is left.
const MIN_WRITE_BOUND: Duration = Duration::from_millis(200);
/// Longest a follower of a key goes without reading it.
pub const FOLLOW_POLL: Duration = Duration::from_secs(2);
/// Past a record's lifetime, when a follower looks for its expiry.
const EXPIRY_MARGIN: Duration = Duration::from_millis(100);
/// After a wake-up for a write on the record a follower holds that no
/// read shows yet, the first pause before it reads again; each further
/// pause doubles, up to the poll.
const FIRST_REREAD: Duration = Duration::from_millis(10);
/// Reads after a conflict before the view is taken as it is (see [`IdempotencyStore::read_past`]).
const READ_PAST_TRIES: u32 = 4;
/// First pause between those reads; it doubles.
const READ_PAST_PAUSE: Duration = Duration::from_millis(5);

/// The claim protocol over a store's primitives: see the module docs.
#[async_trait]
pub trait ClaimProtocol: IdempotencyStore {
    /// Reads the record stored under `key`, if any.
    async fn get(&self, key: &IdempotencyKey) -> Result<Option<Record>, StoreError> {
        Ok(match self.read(key).await? {
            Some(Versioned {
                slot: Slot::Record(record),
                ..
            }) => Some(record),
            _ => None,
        })
    }

    /// One claim: a bounded series of compare-and-swap writes of an
    /// `in_progress` record, each answered by a read when it loses.
    ///
    /// `attempt` is the execution attempt to record (1, or one more than the
    /// attempt of an owner we saw lose its lease; at least 2 over a marker,
    /// which says the key ran within [`MARKER_TTL`](super::MARKER_TTL)); `expected` the
    /// revision we believe is latest (0: none).
    async fn claim(
        &self,
        request: &ClaimRequest,
        attempt: u32,
        mut expected: u64,
    ) -> Result<Claim, StoreError> {
        // Bounded (docs/contract.md v1.2 §7): no lease a caller passes may
        // overflow a clock below.
        let lease_for = request.lease.min(MAX_DURATION);
        let now = now();
        let mut record = Record {
            v: RECORD_VERSION,
            idem_key: request.key.clone(),
            intent_id: request.intent_id.clone(),
            fingerprint: request.fingerprint.clone(),
            state: RecordState::InProgress,
            owner: request.owner.clone(),
            attempt,
            result: None,
            stored_at: now,
            expires_at: now + lease_for,
            written: None,
        };
        for _ in 0..MAX_CLAIM_ROUNDS {
            let started = Instant::now();
            let lease = |revision, record| {
                Claim::Acquired(Lease {
                    revision,
                    unsettled: false,
                    held_until: started + lease_for,
                    record,
                    ttl: lease_for,
                    takeover: false,
                })
            };
            match self.write(&request.key, expected, &record, lease_for).await {
                Ok(revision) => return Ok(lease(revision, record)),
                // Lost the race, or unsure whether the write landed: the read
                // below tells which.
                Err(StoreError::Conflict | StoreError::Unacknowledged(_)) => {}
                Err(other) => return Err(other),
            }
            match self.read_past(&request.key, expected).await? {
                None => expected = 0,
                // The key ran before (MARKER_TTL): attempt 2 at least.
                Some(Versioned {
                    revision,
                    slot: Slot::Free { .. },
                }) => {
                    expected = revision;
                    record.attempt = record.attempt.max(2);
                }
                Some(Versioned {
                    revision,
                    slot: Slot::Record(found),
                }) => {
                    if found.owner == record.owner && found.state == RecordState::InProgress {
                        return Ok(lease(revision, found));
                    }
                    return Ok(Claim::Taken {
                        revision,
                        record: found,
                    });
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "claim of {} did not settle after {MAX_CLAIM_ROUNDS} rounds",
            request.key
        )))
    }

    /// Claims `key`, or waits up to `wait` for its holder's outcome.
    ///
    /// The wait follows the key's revisions with a watch that starts just
    /// after the revision last read, so no change between the read and the
    /// watch is missed and nothing polls. A renewal of the holder's lease
    /// keeps us waiting; an outcome ends the wait; a delete or expiry marker
    /// means the key is free and we claim it (an expiry after seeing a claim
    /// is a takeover, and the attempt number goes up by one).
    async fn acquire(&self, request: &ClaimRequest, wait: Duration) -> Result<Acquire, StoreError> {
        self.acquire_from(request, wait, None).await
    }

    /// [`acquire`](Self::acquire), starting from the key's latest revision
    /// as the caller just read it (`None`: the key had no message, or it was
    /// not read). A stored outcome or a running claim is then decided or
    /// followed from that read, and a free key is claimed at its revision,
    /// with no losing claim and second read first.
    fn acquire_from<'a>(
        &'a self,
        request: &'a ClaimRequest,
        wait: Duration,
        seen: Option<Versioned>,
    ) -> BoxFuture<'a, Result<Acquire, StoreError>> {
        // Decided here, not inside the future: a record kept by value in
        // every claim's future would take it past 1 KiB.
        let (expected, attempt, taken) = match seen {
            None => (0, 1, None),
            // The key ran before (MARKER_TTL): attempt 2 at least.
            Some(Versioned {
                revision,
                slot: Slot::Free { .. },
            }) => (revision, 2, None),
            Some(Versioned {
                revision,
                slot: Slot::Record(record),
            }) => (revision, 1, Some((revision, Box::new(record)))),
        };
        Box::pin(acquire(
            self,
            request,
            Instant::now() + wait.min(MAX_DURATION),
            (expected, attempt),
            taken,
        ))
    }

    /// Extends a lease by its length. Fails with [`StoreError::LeaseLost`]
    /// when anyone else wrote the key since our last write; any other error
    /// leaves the lease possibly alive (try again at the next tick).
    async fn renew(&self, lease: &mut Lease) -> Result<(), StoreError> {
        let ttl = lease.ttl;
        let mut record = lease.record.clone();
        record.expires_at = now() + ttl;
        // A renewal that cannot land within a third of the lease is retried
        // at the next tick instead.
        match self.write_as_owner(lease, &record, ttl, ttl / 3).await? {
            // An outcome of ours whose ack was lost is there: the lease
            // holds it now, untouched.
            Some(done) => lease.record = done,
            None => lease.record = record,
        }
        Ok(())
    }

    /// Stores the outcome in place of the claim, kept for `ttl`, and returns
    /// the record as stored. Fails with [`StoreError::LeaseLost`] when the
    /// lease was taken over: the new owner's record is never overwritten;
    /// with the last failure ([`StoreError::Unavailable`], or
    /// [`StoreError::Conflict`] when a write of ours may have landed but
    /// could not be read back) when nothing settled within the lease.
    ///
    /// Until the lease is surely lost nobody else can write the key, so
    /// the outcome is retried that long through an unavailable store
    /// (`outcome_patience`). An outcome whose
    /// record the store cannot hold is stored as the definite
    /// `Error{code: RESULT_TOO_LARGE}`: it must never be retried until the
    /// lease runs out and then executed again. A `ttl` past
    /// [`MAX_TTL`] is held to it.
    async fn complete(
        &self,
        lease: &mut Lease,
        outcome: Outcome,
        ttl: Duration,
    ) -> Result<Record, StoreError> {
        let ttl = ttl.min(MAX_TTL);
        let done = |lease: &Lease, outcome| {
            let now = now();
            Record {
                state: RecordState::Done,
                result: Some(outcome),
                stored_at: now,
                expires_at: now + ttl,
                written: None,
                ..lease.record.clone()
            }
        };
        let record = done(lease, outcome);
        match self
            .write_as_owner(lease, &record, ttl, outcome_patience(lease))
            .await
        {
            Ok(landed) => Ok(landed.unwrap_or(record)),
            Err(too_large @ StoreError::TooLarge { .. }) => {
                let outcome = Outcome::error(RESULT_TOO_LARGE, too_large.to_string());
                let record = done(lease, outcome);
                let patience = outcome_patience(lease);
                let landed = self.write_as_owner(lease, &record, ttl, patience).await?;
                Ok(landed.unwrap_or(record))
            }
            Err(other) => Err(other),
        }
    }

    /// Gives the key up (transient failure, shutdown). Returns false when
    /// someone else already holds it, or it holds our stored outcome, which
    /// leaves nothing to do.
    async fn release(&self, lease: &mut Lease) -> Result<bool, StoreError> {
        // The lease ended in an outcome of ours (a renewal found it): an
        // outcome is never released.
        if lease.record.state == RecordState::Done {
            return Ok(false);
        }
        let key = &lease.record.idem_key.clone();
        for _ in 0..MAX_CLAIM_ROUNDS {
            match self.remove(key, lease.revision).await {
                Ok(()) => return Ok(true),
                Err(StoreError::Conflict) if !lease.unsettled => return Ok(false),
                Err(StoreError::Conflict | StoreError::Unacknowledged(_)) => {}
                Err(other) => return Err(other),
            }
            lease.unsettled = true;
            match self.read_past(key, lease.revision).await? {
                // Our outcome landed (its ack lost): it stays.
                Some(Versioned {
                    slot: Slot::Record(found),
                    ..
                }) if found.owner == lease.record.owner && found.state == RecordState::Done => {
                    return Ok(false)
                }
                // A write of ours landed (a renewal, or this delete's
                // retry found its own record gone): delete over it.
                Some(Versioned {
                    revision,
                    slot: Slot::Record(found),
                }) if revision > lease.revision && found.owner == lease.record.owner => {
                    lease.revision = revision;
                }
                // Unchanged: the delete did not land; try it again.
                Some(Versioned { revision, .. }) if revision == lease.revision => {}
                // Free (our delete landed, or the lease ran out) or
                // someone else's: nothing of ours is left.
                Some(Versioned {
                    slot: Slot::Free { .. },
                    ..
                })
                | None => return Ok(true),
                Some(_) => return Ok(false),
            }
        }
        Err(StoreError::Unavailable(format!(
            "release of {key} did not settle after {MAX_CLAIM_ROUNDS} rounds"
        )))
    }

    /// Reads `key` after a write expected `seen` to be its latest revision
    /// and failed: until the view has moved past `seen`, up to
    /// `READ_PAST_TRIES` times, the later ones paused.
    ///
    /// A plain read (which a replica may answer) counts only when it shows
    /// a revision newer than `seen`: a replica behind the writes may show
    /// an older revision or no message at all, and neither is evidence
    /// (`docs/claim.md`, "Stale replicas"). Anything else is asked of the
    /// writes' authority ([`read_leader`](IdempotencyStore::read_leader)), whose answer
    /// is the key's state, "no message" included. A cluster answers a
    /// conflict while the winning write is still being proposed (error
    /// 10164), so while the authority still shows `seen`, it is asked
    /// again after a pause.
    async fn read_past(
        &self,
        key: &IdempotencyKey,
        seen: u64,
    ) -> Result<Option<Versioned>, StoreError> {
        let mut view = self.read_current(key, seen).await?;
        let mut pause = READ_PAST_PAUSE;
        for _ in 1..READ_PAST_TRIES {
            if view.as_ref().map_or(0, |v| v.revision) != seen {
                break;
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
            view = self.read_leader(key).await?;
        }
        Ok(view)
    }

    /// The key's state as of now, for one who has seen revision `seen`: a
    /// plain read when it shows something newer, else the authority's
    /// answer (see [`read_past`](Self::read_past)).
    async fn read_current(
        &self,
        key: &IdempotencyKey,
        seen: u64,
    ) -> Result<Option<Versioned>, StoreError> {
        match self.read(key).await? {
            Some(newer) if newer.revision > seen => Ok(Some(newer)),
            _ => self.read_leader(key).await,
        }
    }

    /// A fenced write by the lease's owner, patient with a store that is
    /// briefly unavailable (a leader election) for up to `patience`, each
    /// attempt bounded by what is left of it. Updates the lease's revision.
    ///
    /// Retrying is safe because every attempt is a compare-and-swap on the
    /// same revision. A write whose acknowledgement was lost marks the lease
    /// unsettled, and is settled by reading the key: our owner token at a
    /// newer revision is a write of ours. An outcome of ours is this very
    /// write: it is returned as found. A renewal of ours is adopted and
    /// written over at once, so the lease ends with an acknowledged write.
    async fn write_as_owner(
        &self,
        lease: &mut Lease,
        record: &Record,
        ttl: Duration,
        patience: Duration,
    ) -> Result<Option<Record>, StoreError> {
        let key = &record.idem_key;
        let deadline = Instant::now() + patience;
        let mut pause = RETRY_PAUSE;
        loop {
            let started = Instant::now();
            let bound = deadline
                .saturating_duration_since(started)
                .max(MIN_WRITE_BOUND);
            // Unsettled while the write is in flight: should this call be
            // dropped mid-write, the lease remembers that it may have landed.
            let prior = std::mem::replace(&mut lease.unsettled, true);
            let written = tokio::time::timeout(bound, self.write(key, lease.revision, record, ttl))
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Unacknowledged(
                        "no acknowledgement within the owner's patience".to_owned(),
                    ))
                });
            let failure = match written {
                Ok(revision) => {
                    lease.revision = revision;
                    lease.unsettled = false;
                    lease.held_until = started + lease.ttl;
                    return Ok(None);
                }
                // Nothing of ours in flight: someone else wrote.
                Err(StoreError::Conflict) if !prior => {
                    lease.unsettled = false;
                    return Err(StoreError::LeaseLost);
                }
                // Someone wrote, or an earlier write of ours did: look.
                Err(StoreError::Conflict) => StoreError::Conflict,
                Err(StoreError::Unacknowledged(reason)) => StoreError::Unavailable(reason),
                // Refused before it was sent: no new uncertainty.
                Err(error) => {
                    lease.unsettled = prior;
                    match error {
                        StoreError::Unavailable(_) => error,
                        other => return Err(other),
                    }
                }
            };
            if lease.unsettled {
                let bound = deadline
                    .saturating_duration_since(Instant::now())
                    .max(MIN_WRITE_BOUND);
                let view = tokio::time::timeout(bound, self.read_past(key, lease.revision)).await;
                match view {
                    Ok(Ok(Some(Versioned {
                        revision,
                        slot: Slot::Record(found),
                    }))) if revision > lease.revision && found.owner == lease.record.owner => {
                        lease.revision = revision;
                        lease.unsettled = false;
                        // Our outcome landed: the lease is over, and
                        // nothing (a late renewal) may write over it.
                        if found.state == RecordState::Done {
                            return Ok(Some(found));
                        }
                        // A renewal of ours landed, at a time we do not
                        // know, so its lease may be nearly spent: write
                        // over it at once (a renewal, or the outcome).
                        continue;
                    }
                    Ok(Ok(Some(Versioned { revision, .. }))) if revision != lease.revision => {
                        return Err(StoreError::LeaseLost)
                    }
                    Ok(Ok(None)) => return Err(StoreError::LeaseLost),
                    // Unchanged (ours has not landed, or not yet) or unreadable.
                    _ => {}
                }
            }
            // The last try is made at the deadline, not a pause before it.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(failure);
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    }
}

impl<S: IdempotencyStore + ?Sized> ClaimProtocol for S {}

/// The rounds of [`IdempotencyStore::acquire_from`]: claim at `expected`
/// (unless `taken` already says who holds the key), follow a holder until
/// it finishes or frees the key, claim again. Small by design: the common
/// case (a fresh key, one claim) carries no record, and following is a
/// future of its own, boxed.
async fn acquire<S: IdempotencyStore + ?Sized>(
    store: &S,
    request: &ClaimRequest,
    deadline: Instant,
    (mut expected, mut attempt): (u64, u32),
    mut taken: Option<(u64, Box<Record>)>,
) -> Result<Acquire, StoreError> {
    let mut takeover = false;
    for _ in 0..MAX_CLAIM_ROUNDS {
        let (revision, record) = match taken.take() {
            Some(seen) => seen,
            None => match store.claim(request, attempt, expected).await? {
                Claim::Acquired(mut lease) => {
                    lease.takeover = takeover;
                    return Ok(Acquire::Owner(lease));
                }
                Claim::Taken { revision, record } => (revision, Box::new(record)),
            },
        };
        match Box::pin(follow(store, request, deadline, revision, *record)).await? {
            Followed::Decided(acquire) => return Ok(acquire),
            Followed::Freed {
                revision,
                expired,
                attempt: next,
            } => {
                takeover |= expired;
                attempt = next;
                expected = revision;
            }
        }
    }
    Err(StoreError::Unavailable(format!(
        "key {} kept changing hands",
        request.key
    )))
}

/// How following a key's holder ended.
#[allow(
    clippy::large_enum_variant,
    reason = "returned once per follow and consumed at once, never kept across an await"
)]
enum Followed {
    /// With an answer: stored, reused, or still busy at the deadline.
    Decided(Acquire),
    /// The key was freed at `revision` (by expiry when `expired`): claim it
    /// with attempt `attempt`.
    Freed {
        revision: u64,
        expired: bool,
        attempt: u32,
    },
}

/// Follows the holder of a key, last seen as `record` at `revision`, until
/// it finishes, frees the key, or `deadline` passes.
///
/// No server consumer and no polling loop: the store's [`wakeups`]
/// start before the first read, so a write after that read cannot be
/// missed, and each wake-up is answered by a read. Expiries are not
/// always announced, so the key is also read just after the record seen
/// must have run out, and at least every [`FOLLOW_POLL`].
///
/// Every read is [`read_current`](IdempotencyStore::read_current): a
/// replica behind the writes is never taken at its word when it shows
/// the holder's revision or older, or no message. A key the authority
/// holds no message for (the holder's expiry marker aged out before the
/// follower looked) is free at revision 0; no revision is ever made up
/// (`docs/claim.md`, "Stale replicas": the holder's revision + 1 could be its
/// very next write, and a claim there would overwrite it).
///
/// [`wakeups`]: IdempotencyStore::wakeups
async fn follow<S: IdempotencyStore + ?Sized>(
    store: &S,
    request: &ClaimRequest,
    deadline: Instant,
    mut revision: u64,
    mut record: Record,
) -> Result<Followed, StoreError> {
    let mut wakeups: Option<Wakeups> = None;
    // When to look again before the poll: a write is on its way.
    let mut soon: Option<Duration> = None;
    loop {
        if record.fingerprint != request.fingerprint {
            // A final refusal (in JetStream mode the intent is acked away):
            // never on a replica's word, which may show an earlier lifetime
            // of the key, claimed by another intent.
            match store.read_leader(&request.key).await? {
                Some(latest) if latest.revision == revision => {
                    return Ok(Followed::Decided(Acquire::Reused(record)))
                }
                Some(Versioned {
                    revision: latest,
                    slot: Slot::Record(found),
                }) => {
                    revision = latest;
                    record = found;
                    if record.fingerprint != request.fingerprint {
                        return Ok(Followed::Decided(Acquire::Reused(record)));
                    }
                    continue;
                }
                // Free: the record seen was an earlier lifetime's, no
                // holder of ours whose lease ran out (no takeover).
                latest => {
                    return Ok(Followed::Freed {
                        revision: latest.map_or(0, |free| free.revision),
                        expired: false,
                        attempt: record.attempt + 1,
                    })
                }
            }
        }
        if record.state == RecordState::Done {
            return Ok(Followed::Decided(Acquire::Stored {
                record,
                waited: wakeups.is_some(),
            }));
        }
        if Instant::now() >= deadline {
            return Ok(Followed::Decided(Acquire::Busy(record)));
        }
        let view = match wakeups.as_mut() {
            None => {
                wakeups = Some(store.wakeups(&request.key).await?);
                store.read_current(&request.key, revision).await?
            }
            Some(wakeups) => {
                let lifetime = (record.expires_at - record.stored_at)
                    .to_std()
                    .map_or(FOLLOW_POLL, |lifetime| lifetime + EXPIRY_MARGIN);
                let poll = lifetime.min(FOLLOW_POLL);
                let mut coming = false;
                tokio::select! {
                    woken = wakeups.next() => match woken {
                        Some(wakeup) => coming = wakeup.against == Some(revision),
                        None => return Err(StoreError::Unavailable(format!(
                            "the wake-ups of {} ended",
                            request.key
                        ))),
                    },
                    () = tokio::time::sleep(soon.map_or(poll, |soon| soon.min(poll))) => {}
                    () = tokio::time::sleep_until(deadline) => continue,
                }
                let view = store.read_current(&request.key, revision).await?;
                let shown = !matches!(&view, Some(seen) if seen.revision <= revision);
                // A write on the record we hold is on its way, and its
                // wake-up came first: on a cluster even the leader shows
                // it only once a quorum has it. Look again soon, then less
                // and less often: missed, it would be a poll away (2 s),
                // past many a --wait.
                soon = match (shown, coming) {
                    (true, _) => None,
                    (false, true) => Some(FIRST_REREAD),
                    (false, false) => soon.map(|soon| (soon * 2).min(FOLLOW_POLL)),
                };
                view
            }
        };
        match view {
            Some(next) if next.revision > revision => {
                revision = next.revision;
                match next.slot {
                    Slot::Record(found) => record = found,
                    Slot::Free { expired } => {
                        return Ok(Followed::Freed {
                            revision,
                            expired,
                            attempt: record.attempt + 1,
                        })
                    }
                }
            }
            // The authority holds nothing: free, to be claimed at 0.
            None => {
                return Ok(Followed::Freed {
                    revision: 0,
                    expired: true,
                    attempt: record.attempt + 1,
                })
            }
            Some(_) => {}
        }
    }
}

/// How long an owner keeps writing its outcome (docs/contract.md v1.2 §4):
/// until its lease is surely lost, one lease past the end of the last one
/// acknowledged. Every try is fenced by the claim's revision, so one that
/// lands is the owner's to make, however late; one of ours that landed
/// unheard (its acknowledgement lost with the connection) is found once
/// the store answers again; and a lease the store let expire meanwhile is
/// reported as lost. Giving up at the lease's end by this worker's clock
/// answered outcomes that had landed, or that the store would still have
/// taken, as unstored.
fn outcome_patience(lease: &Lease) -> Duration {
    (lease.held_until + lease.ttl)
        .saturating_duration_since(Instant::now())
        .max(MIN_WRITE_BOUND)
}

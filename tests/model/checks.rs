//! The invariants (see the crate docs) and the checks that hold the store
//! to them: after each acquire and owner call, on every write that landed,
//! and after every step.

use std::fmt;

use idemq::outcome::{Record, RecordState};
use idemq::store::{Acquire, ClaimRequest, StoreError, Versioned};
use tokio::time::Instant;

use crate::clock::{at_revision, describe, latest, Alive, Clock, View};
use crate::context::Ctx;
use crate::faulty::Landed;
use crate::schedule::Step;
use crate::steps::{Before, Grant, Held, Model};

pub const INVARIANTS: [&str; 7] = [
    "the store answers with what it stores",
    "at most one live execution per key",
    "a stored outcome is replayed until it expires",
    "a fenced-out owner never writes",
    "an owner whose write landed is not told it lost the lease",
    "a free or expired key is taken over",
    "a key runs again only after a lost or released lease",
];

/// The message of a failed check: invariant 1-6, or 0 for the plain
/// consistency of what a call returns with what the log says landed.
pub fn violation(invariant: usize, step: usize, detail: impl fmt::Display) -> String {
    let which = match invariant {
        0 => "consistency".to_owned(),
        n => format!("invariant {n}"),
    };
    format!(
        "{which} ({}) violated at step {step}: {detail}",
        INVARIANTS[invariant]
    )
}

/// A call's result in a few words.
pub fn outcome_of<T>(result: &Result<T, StoreError>) -> String {
    match result {
        Ok(_) => "Ok".to_owned(),
        Err(error) => format!("{error:?}"),
    }
}

/// An acquire's result in a few words.
pub fn brief(acquired: &Result<Acquire, StoreError>) -> String {
    match acquired {
        Ok(Acquire::Owner(lease)) => format!(
            "Owner(rev {}, attempt {}, takeover {})",
            lease.revision, lease.record.attempt, lease.takeover
        ),
        Ok(Acquire::Stored { record, waited }) => {
            format!("Stored(by {}, waited {waited})", record.owner)
        }
        Ok(Acquire::Reused(record)) => format!("Reused({})", record.fingerprint),
        Ok(Acquire::Busy(record)) => format!("Busy(held by {})", record.owner),
        Err(error) => format!("{error:?}"),
    }
}

impl Model {
    #[allow(clippy::too_many_arguments)]
    pub fn check_acquire(
        &mut self,
        ctx: &Ctx,
        i: usize,
        step: &Step,
        w: usize,
        key: usize,
        request: &ClaimRequest,
        before: &Before,
        acquired: Result<Acquire, StoreError>,
    ) -> Result<(), String> {
        let now = Instant::now();
        let log = ctx.log();
        let clock = &ctx.clock;
        let pre = clock.view(&log[..before.log_len], key, before.at);
        let who = format!("w{w} ({})", request.owner);
        // With stale reads an acquire may see the key as it was up to `lag`
        // before: it may answer an outcome stored (and alive) then, or be
        // busy where it could have decided; it never takes a key that is
        // not free (1, 3) nor answers anything else (2).
        let lag = step.stale.map(|lag| ctx.timing().lag[lag as usize]);
        let recently_stored = |record: &Record| {
            lag.is_some_and(|lag| {
                let since = before.at.checked_sub(lag).unwrap_or(before.at);
                log.iter().any(|e| {
                    e.key == key
                        && e.is_done()
                        && e.record.as_ref() == Some(record)
                        && !clock.surely_gone(e, since)
                })
            })
        };

        // 2: an outcome alive throughout is what the acquire answers.
        if let View::Live(stored) = pre {
            if stored.is_done() && clock.surely_live(stored, now) {
                let expected = stored.record.as_ref();
                let fine = match &acquired {
                    Ok(Acquire::Stored { record, .. }) => {
                        Some(record) == expected || recently_stored(record)
                    }
                    Ok(Acquire::Reused(_)) => {
                        expected.is_some_and(|r| r.fingerprint != request.fingerprint)
                    }
                    Ok(Acquire::Busy(_)) => lag.is_some(),
                    Err(_) => step.may_fail_acquire(),
                    _ => false,
                };
                if !fine {
                    return Err(violation(
                        2,
                        i,
                        format!(
                            "{who} acquired k{key} while {} was stored and alive, and got {}",
                            describe(stored),
                            brief(&acquired)
                        ),
                    ));
                }
            }
        }
        // 5: a free key is claimed (unless the other of two took it).
        if matches!(pre, View::Free)
            && !before.joined
            && lag.is_none()
            && !step.may_fail_acquire()
            && !matches!(acquired, Ok(Acquire::Owner(_)))
        {
            return Err(violation(
                5,
                i,
                format!(
                    "k{key} was free, and {who}'s acquire got {}",
                    brief(&acquired)
                ),
            ));
        }
        // 5: a lease seen running and expiring within the wait is taken over.
        let mut expect_takeover = None;
        if let View::Live(holder) = pre {
            let deadline = before.at + before.wait;
            if holder.is_claim()
                && holder.owner != request.owner
                && holder
                    .record
                    .as_ref()
                    .is_some_and(|r| r.fingerprint == request.fingerprint)
                && !before.joined
                && lag.is_none()
                && !step.may_fail_acquire()
                && clock.latest_expiry(holder) + ctx.timing().watch_lag < deadline
            {
                expect_takeover = Some(holder);
            }
        }

        ctx.hit(match &acquired {
            Ok(Acquire::Owner(lease)) if lease.takeover => "acquire: Owner, takeover",
            Ok(Acquire::Owner(_)) => "acquire: Owner",
            Ok(Acquire::Stored { waited: true, .. }) => "acquire: Stored, after waiting",
            Ok(Acquire::Stored { .. }) => "acquire: Stored",
            Ok(Acquire::Reused(_)) => "acquire: Reused",
            Ok(Acquire::Busy(_)) => "acquire: Busy",
            Err(_) => "acquire: error",
        });
        if expect_takeover.is_some() {
            ctx.hit("acquire: waits across a lease's expiry");
        }
        match acquired {
            Err(error) => {
                if !step.may_fail_acquire() {
                    return Err(violation(
                        5,
                        i,
                        format!("{who}'s acquire of k{key} failed with no fault to explain it: {error:?}"),
                    ));
                }
            }
            Ok(Acquire::Owner(lease)) => {
                let Some(claim) = at_revision(&log, key, lease.revision) else {
                    return Err(violation(
                        0,
                        i,
                        format!(
                            "{who} got k{key} at rev {} that no write produced",
                            lease.revision
                        ),
                    ));
                };
                if claim.owner != request.owner
                    || claim.record.as_ref() != Some(&lease.record)
                    || lease.unsettled
                    || lease.record.fingerprint != request.fingerprint
                {
                    return Err(violation(
                        0,
                        i,
                        format!(
                            "{who} got a lease at rev {} on the record of {} (attempt {}, unsettled {}), but rev {} is {}",
                            lease.revision,
                            lease.record.owner,
                            lease.record.attempt,
                            lease.unsettled,
                            lease.revision,
                            describe(claim)
                        ),
                    ));
                }
                // 1: nobody else still believes it holds the key.
                for (other, held) in self.holders(key) {
                    if held.lease.held_until > claim.end + ctx.timing().tolerance {
                        return Err(violation(
                            1,
                            i,
                            format!(
                                "{who} got k{key} while w{other} ({}) holds its lease for {:?} more",
                                held.owner,
                                held.lease.held_until - claim.end
                            ),
                        ));
                    }
                }
                let previous = log
                    .iter()
                    .filter(|e| e.key == key && e.revision < claim.revision)
                    .max_by_key(|e| e.revision);
                if lease.takeover && !previous.is_some_and(Landed::is_claim) {
                    return Err(violation(
                        6,
                        i,
                        format!(
                            "{who}'s lease says takeover, but k{key} held {} before",
                            previous.map_or("nothing".to_owned(), describe)
                        ),
                    ));
                }
                if let Some(holder) = expect_takeover {
                    let attempt = holder.record.as_ref().map_or(0, |r| r.attempt) + 1;
                    if !lease.takeover || lease.record.attempt != attempt {
                        return Err(violation(
                            5,
                            i,
                            format!(
                                "{who} waited across the expiry of {} and got k{key} with takeover {} attempt {} (expected a takeover, attempt {attempt})",
                                describe(holder),
                                lease.takeover,
                                lease.record.attempt
                            ),
                        ));
                    }
                }
                let grant = self.grants.len();
                self.grants.push(Grant {
                    key,
                    generation: self.epochs[key].generation,
                    owner: request.owner.clone(),
                    ran: false,
                    ended: false,
                });
                self.workers[w].held = Some(Held {
                    key,
                    owner: request.owner.clone(),
                    lease,
                    grant,
                    completing: false,
                });
                return Ok(());
            }
            Ok(Acquire::Stored { record, .. }) => {
                let stored = latest(&log, key).filter(|e| e.is_done());
                let fine = record.fingerprint == request.fingerprint
                    && (stored.is_some_and(|d| {
                        d.record.as_ref() == Some(&record) && !clock.surely_gone(d, before.at)
                    }) || recently_stored(&record));
                if !fine {
                    return Err(violation(
                        2,
                        i,
                        format!(
                            "{who} was answered with the outcome {record:?}, but k{key} holds {}",
                            latest(&log, key).map_or("nothing".to_owned(), describe)
                        ),
                    ));
                }
            }
            Ok(Acquire::Reused(record)) => {
                if record.fingerprint == request.fingerprint {
                    return Err(violation(
                        0,
                        i,
                        format!(
                            "{who} was told k{key} is reused by its own fingerprint: {record:?}"
                        ),
                    ));
                }
            }
            Ok(Acquire::Busy(record)) => {
                if record.fingerprint != request.fingerprint
                    || record.state != RecordState::InProgress
                    || record.owner == request.owner
                {
                    return Err(violation(
                        0,
                        i,
                        format!("{who} was told k{key} is busy with {record:?}"),
                    ));
                }
            }
        }
        if let Some(holder) = expect_takeover {
            return Err(violation(
                5,
                i,
                format!(
                    "{who} waited {:?} across the expiry of {} and did not take k{key} over",
                    before.wait,
                    describe(holder)
                ),
            ));
        }
        Ok(())
    }

    /// Checks common to an owner's renew and complete.
    #[allow(clippy::too_many_arguments)]
    pub fn check_owner_call<T: fmt::Debug>(
        &self,
        ctx: &Ctx,
        i: usize,
        step: &Step,
        w: usize,
        held: &Held,
        what: &str,
        alive: Alive,
        log_len: usize,
        unchanged: Option<(&Option<Versioned>, &Option<Versioned>)>,
        result: &Result<T, StoreError>,
    ) -> Result<(), String> {
        let now = Instant::now();
        let log = ctx.log();
        let key = held.key;
        let who = format!("w{w} ({})", held.owner);
        let landed_now: Vec<&Landed> = log[log_len..]
            .iter()
            .filter(|e| e.owner == held.owner)
            .collect();
        let renewal = what == "renewal";
        ctx.hit(match (renewal, result) {
            (true, Ok(_)) => "renew: Ok",
            (true, Err(StoreError::LeaseLost)) => "renew: LeaseLost",
            (true, Err(_)) => "renew: other error",
            (false, Ok(_)) => "complete: Ok",
            (false, Err(StoreError::LeaseLost)) => "complete: LeaseLost",
            (false, Err(_)) => "complete: other error",
        });
        if alive == Alive::No {
            ctx.hit(if renewal {
                "renew: lease gone"
            } else {
                "complete: lease gone"
            });
        }
        if result.is_ok() && landed_now.iter().any(|e| !e.acked) {
            ctx.hit("owner: a write whose ack was lost, settled in the same call");
        }
        // A completion that finds its own outcome, landed in an earlier call
        // (its ack lost) and run out since, reports it: it was stored.
        let own_outcome_found = !renewal
            && result.is_ok()
            && landed_now.is_empty()
            && log[..log_len]
                .iter()
                .any(|e| e.key == key && e.owner == held.owner && e.is_done());
        match alive {
            Alive::No if own_outcome_found => {
                ctx.hit("complete: finds its own outcome, run out since");
            }
            Alive::No => {
                // 3: a fenced or expired owner's call fails and writes nothing.
                if result.is_ok() || !landed_now.is_empty() {
                    return Err(violation(
                        3,
                        i,
                        format!(
                            "{who}'s lease on k{key} was gone (k{key} holds {}), yet its {what} returned {} and landed [{}]",
                            latest(&log[..log_len], key).map_or("nothing".to_owned(), describe),
                            outcome_of(result),
                            landed_now.iter().map(|e| describe(e)).collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
                if let Some((before, after)) = unchanged {
                    if before != after {
                        return Err(violation(
                            3,
                            i,
                            format!(
                                "{who}'s fenced {what} changed k{key} from {before:?} to {after:?}"
                            ),
                        ));
                    }
                }
            }
            Alive::Yes if !step.faulty() && result.is_err() => {
                return Err(violation(
                    0,
                    i,
                    format!("{who} holds k{key}, no fault, and its {what} failed: {result:?}"),
                ));
            }
            _ => {}
        }
        if matches!(result, Err(StoreError::LeaseLost)) {
            // 4: LeaseLost only when the lease is gone.
            if alive == Alive::Yes
                || ctx.clock.alive(&log, key, &held.owner, now, now) == Alive::Yes
            {
                return Err(violation(
                    4,
                    i,
                    format!(
                        "{who}'s {what} was told LeaseLost, but k{key} holds {}, alive",
                        latest(&log, key).map_or("nothing".to_owned(), describe)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The key's current record if it is surely alive until `until`.
    pub fn stable(ctx: &Ctx, key: usize, view: &Option<Versioned>, until: Instant) -> bool {
        let log = ctx.log();
        match view {
            Some(v) => at_revision(&log, key, v.revision)
                .is_some_and(|e| e.record.is_some() && ctx.clock.surely_live(e, until)),
            None => false,
        }
    }

    /// The handler of this grant ran: count it against the key's epoch (6).
    pub fn ran(&mut self, ctx: &Ctx, i: usize, held: &Held) -> Result<(), String> {
        let grant = &mut self.grants[held.grant];
        if grant.ran {
            return Ok(());
        }
        grant.ran = true;
        let runs = self.runs.entry((grant.key, grant.generation)).or_default();
        runs.runs += 1;
        if runs.runs > 1 {
            ctx.hit("a key runs again after a lost or released lease");
        }
        if runs.runs > 1 + runs.spare {
            return Err(violation(
                6,
                i,
                format!(
                    "{} is run {} of k{} in one outcome's lifetime, with {} lease(s) lost or released before",
                    held.owner, runs.runs, held.key, runs.spare
                ),
            ));
        }
        Ok(())
    }

    /// Checks after every step: each landed write was legal (1, 2, 3), no
    /// two beliefs overlap (1), and the epochs' bookkeeping (6).
    pub fn after_step(&mut self, ctx: &Ctx, i: usize, log_len: usize) -> Result<(), String> {
        let now = Instant::now();
        let log = ctx.log();
        let clock = &ctx.clock;
        for entry in &log[log_len..] {
            check_landing(clock, &log, entry)?;
        }
        for key in 0..self.epochs.len() {
            let believers: Vec<String> = self
                .holders(key)
                .filter(|(_, held)| held.lease.held_until > now + ctx.timing().tolerance)
                .map(|(w, held)| {
                    format!(
                        "w{w} ({}) for {:?}",
                        held.owner,
                        held.lease.held_until - now
                    )
                })
                .collect();
            if believers.len() > 1 {
                return Err(violation(
                    1,
                    i,
                    format!(
                        "several workers believe they hold k{key}: {}",
                        believers.join(", ")
                    ),
                ));
            }
            // An outcome's lifetime ends when it expires or is replaced.
            let top = latest(&log, key);
            let epoch = &mut self.epochs[key];
            if let Some(done) = top.filter(|e| e.is_done()) {
                if !epoch.closed.contains(&done.revision) {
                    epoch.outcome = Some(done.revision);
                }
            }
            if let Some(revision) = epoch.outcome {
                let gone = at_revision(&log, key, revision)
                    .is_none_or(|done| clock.surely_gone(done, now))
                    || top.is_some_and(|t| t.revision != revision);
                if gone {
                    epoch.generation += 1;
                    epoch.outcome = None;
                    epoch.closed.insert(revision);
                }
            }
        }
        for grant in self.grants.iter_mut().filter(|g| !g.ended) {
            let Some(top) = latest(&log, grant.key) else {
                continue;
            };
            if top.owner == grant.owner && !clock.surely_gone(top, now) {
                continue;
            }
            grant.ended = true;
            let last = log
                .iter()
                .filter(|e| e.key == grant.key && e.owner == grant.owner)
                .max_by_key(|e| e.revision);
            ctx.hit(match last {
                Some(e) if e.is_done() => "grant ended: outcome stored",
                Some(e) if e.record.is_none() => "grant ended: released",
                _ => "grant ended: lease lost (expired or taken over)",
            });
            if !last.is_some_and(Landed::is_done) {
                // Lost (expired, taken over) or released: one more run is allowed.
                let runs = self.runs.entry((grant.key, grant.generation)).or_default();
                runs.spare += 1;
            }
        }
        Ok(())
    }
}

/// Whether one landed write was allowed, given everything that landed
/// before it on its key.
pub fn check_landing(clock: &Clock, log: &[Landed], entry: &Landed) -> Result<(), String> {
    let key = entry.key;
    let step = entry.step;
    let earlier = || {
        log.iter()
            .filter(move |e| e.key == key && e.revision < entry.revision)
    };
    let previous = earlier().max_by_key(|e| e.revision);
    let replaced = at_revision(log, key, entry.expected).filter(|e| e.revision != entry.revision);
    match (&entry.record, replaced) {
        // Over a record: only the owner's own next revision of its claim.
        (_, Some(over)) if over.record.is_some() => {
            if over.owner != entry.owner {
                return Err(violation(
                    3,
                    step,
                    format!("{} overwrote {}", describe(entry), describe(over)),
                ));
            }
            if over.is_done() {
                return Err(violation(
                    2,
                    step,
                    format!(
                        "{} was written over its own stored outcome {}",
                        describe(entry),
                        describe(over)
                    ),
                ));
            }
        }
        (None, _) => {
            return Err(violation(
                3,
                step,
                format!(
                    "{} deleted what was not its own record (expected rev {})",
                    describe(entry),
                    entry.expected
                ),
            ));
        }
        // Over nothing or a marker: a fresh claim of a free key.
        (Some(record), _) => {
            if record.state != RecordState::InProgress || earlier().any(|e| e.owner == entry.owner)
            {
                return Err(violation(
                    3,
                    step,
                    format!(
                        "{} landed on a free key after its lease had ended (expected rev {})",
                        describe(entry),
                        entry.expected
                    ),
                ));
            }
            if let Some(previous) = previous.filter(|p| p.record.is_some()) {
                // The store cannot have expired it before its TTL from when it was sent.
                if entry.end + clock.timing.tolerance < previous.earliest_expiry() {
                    let (invariant, what) = if previous.is_done() {
                        (2, "the outcome")
                    } else {
                        (1, "the lease")
                    };
                    return Err(violation(
                        invariant,
                        step,
                        format!(
                            "{} claimed the key while {what} {} had {:?} to live",
                            describe(entry),
                            describe(previous),
                            previous.earliest_expiry() - entry.end
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

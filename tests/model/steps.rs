//! The model's workers and what they hold, and each step of a schedule
//! run against the store: claims (alone, two at once, or during an owner's
//! call), an owner's renew, complete and release as the worker makes them,
//! crashes and time jumps. Each call is checked as it returns (`checks`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use idemq::outcome::Outcome;
use idemq::store::{Acquire, ClaimProtocol, ClaimRequest, Lease, StoreError};
use serde_json::json;
use tokio::time::Instant;

use crate::checks::{brief, violation};
use crate::clock::{describe, latest, Alive, View};
use crate::context::Ctx;
use crate::faulty::ACTOR;
use crate::schedule::{Action, Midway, Step};

pub const FINGERPRINT: &str = "fp-main";
pub const OTHER_FINGERPRINT: &str = "fp-other";

/// What a step does with a claim whose completion is being retried.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Completing {
    /// Skip the step (renew, release).
    Skip,
    /// Take the claim all the same (complete, crash).
    Take,
}

pub struct Held {
    pub key: usize,
    pub owner: String,
    pub lease: Lease,
    pub grant: usize,
    /// A completion was tried and failed (not `LeaseLost`): like the
    /// worker, it only retries the completion now, never renews or releases.
    pub completing: bool,
}

#[derive(Default)]
pub struct Worker {
    pub claims: u32,
    pub held: Option<Held>,
}

pub struct Grant {
    pub key: usize,
    pub generation: u32,
    pub owner: String,
    /// The handler ran: its owner proceeded to complete.
    pub ran: bool,
    pub ended: bool,
}

/// One key's executions within the lifetime of one outcome: from the
/// expiry of the previous outcome (or the start) to the expiry of the next.
#[derive(Default)]
pub struct Epoch {
    /// Which lifetime of the key this is, from 0.
    pub generation: u32,
    /// The outcome (its revision) whose lifetime this is.
    pub outcome: Option<u64>,
    pub closed: HashSet<u64>,
}

/// Runs and spare runs of one lifetime of one key.
#[derive(Debug, Default, Clone, Copy)]
pub struct Runs {
    pub runs: u32,
    /// Grants that ended without storing an outcome: lost or released.
    pub spare: u32,
}

pub struct Model {
    pub workers: Vec<Worker>,
    pub grants: Vec<Grant>,
    pub epochs: Vec<Epoch>,
    /// Per key and lifetime: a grant counts in the lifetime it was made in.
    pub runs: HashMap<(usize, u32), Runs>,
}

/// What an acquire started from, for checking what it returned.
pub struct Before {
    pub at: Instant,
    pub log_len: usize,
    pub wait: Duration,
    pub joined: bool,
}

impl Model {
    pub fn new(workers: usize, keys: usize) -> Model {
        Model {
            workers: (0..workers).map(|_| Worker::default()).collect(),
            grants: Vec::new(),
            epochs: (0..keys).map(|_| Epoch::default()).collect(),
            runs: HashMap::new(),
        }
    }

    pub fn request(&mut self, ctx: &Ctx, w: usize, key: usize, other_fp: bool) -> ClaimRequest {
        let worker = &mut self.workers[w];
        worker.claims += 1;
        let fingerprint = if other_fp {
            OTHER_FINGERPRINT
        } else {
            FINGERPRINT
        };
        ClaimRequest {
            key: ctx.keys[key].clone(),
            intent_id: format!("intent-{key}"),
            fingerprint: fingerprint.to_owned(),
            owner: format!("{}-w{w}.{}", ctx.run, worker.claims),
            lease: ctx.timing().lease,
        }
    }

    pub fn holders(&self, key: usize) -> impl Iterator<Item = (usize, &Held)> {
        self.workers
            .iter()
            .enumerate()
            .filter_map(move |(w, worker)| worker.held.as_ref().map(|held| (w, held)))
            .filter(move |(_, held)| held.key == key)
    }

    /// The worker that does a step meant for `w`: `w` if it `can`, else
    /// the next one (in turn) that can.
    pub fn pick(&self, w: usize, can: impl Fn(&Worker) -> bool) -> Option<usize> {
        let n = self.workers.len();
        (0..n).map(|j| (w + j) % n).find(|&v| can(&self.workers[v]))
    }

    /// The step's action as done: a claim by a worker that holds a lease,
    /// or an owner's call by one that holds none, passes to the next
    /// worker that can; `None` when none can.
    pub fn effective(&self, action: Action) -> Option<Action> {
        let idle = |worker: &Worker| worker.held.is_none();
        let holds = |worker: &Worker| worker.held.is_some();
        let owns = |worker: &Worker| worker.held.as_ref().is_some_and(|h| !h.completing);
        Some(match action {
            Action::Claim {
                w,
                key,
                wait,
                other_fp,
            } => Action::Claim {
                w: self.pick(w, idle)?,
                key,
                wait,
                other_fp,
            },
            Action::ClaimBoth { a, b, key, wait } => {
                let a = self.pick(a, idle)?;
                let b = self
                    .pick(b, |worker| idle(worker))
                    .filter(|&b| b != a)
                    .or_else(|| self.pick(a + 1, idle).filter(|&b| b != a))?;
                Action::ClaimBoth { a, b, key, wait }
            }
            Action::ClaimDuring {
                w,
                key,
                wait,
                owner,
                call,
                after_ms,
            } => {
                let owns_key = |worker: &Worker| {
                    worker.held.as_ref().is_some_and(|held| {
                        held.key == key && (call == Midway::Complete || !held.completing)
                    })
                };
                let w = self.pick(w, idle)?;
                match self.pick(owner, owns_key) {
                    Some(owner) => Action::ClaimDuring {
                        w,
                        key,
                        wait,
                        owner,
                        call,
                        after_ms,
                    },
                    None => Action::Claim {
                        w,
                        key,
                        wait,
                        other_fp: false,
                    },
                }
            }
            Action::Renew { w } => Action::Renew {
                w: self.pick(w, owns)?,
            },
            Action::Release { w } => Action::Release {
                w: self.pick(w, owns)?,
            },
            Action::Complete { w, ttl } => Action::Complete {
                w: self.pick(w, holds)?,
                ttl,
            },
            Action::Crash { w, midway } => Action::Crash {
                w: self.pick(w, holds)?,
                midway,
            },
            Action::Advance(jump) => Action::Advance(jump),
        })
    }

    pub async fn step(&mut self, ctx: &Ctx, i: usize, step: &Step) -> Result<(), String> {
        let Some(action) = self.effective(step.action) else {
            ctx.note(format!(
                "  {i}: no worker can do {:?}: skipped",
                step.action
            ));
            ctx.hit("step skipped");
            return Ok(());
        };
        if action != step.action {
            ctx.note(format!("  {i}: done as {action:?}"));
        }
        match action {
            Action::Claim {
                w,
                key,
                wait,
                other_fp,
            } => {
                if self.workers[w].held.is_some() {
                    ctx.note(format!("  {i}: w{w} holds a lease: skipped"));
                    ctx.hit("step skipped");
                    return Ok(());
                }
                let request = self.request(ctx, w, key, other_fp);
                let before = Before {
                    at: Instant::now(),
                    log_len: ctx.log_len(),
                    wait: ctx.timing().wait[wait as usize],
                    joined: false,
                };
                let acquired = ACTOR
                    .scope(
                        request.owner.clone(),
                        ctx.store.acquire(&request, before.wait),
                    )
                    .await;
                ctx.note(format!(
                    "  {i}: w{w} {} -> {}",
                    request.owner,
                    brief(&acquired)
                ));
                self.check_acquire(ctx, i, step, w, key, &request, &before, acquired)
            }
            Action::ClaimBoth { a, b, key, wait } => {
                if self.workers[a].held.is_some() || self.workers[b].held.is_some() {
                    ctx.note(format!("  {i}: w{a} or w{b} holds a lease: skipped"));
                    ctx.hit("step skipped");
                    return Ok(());
                }
                let first = self.request(ctx, a, key, false);
                let second = self.request(ctx, b, key, false);
                let before = Before {
                    at: Instant::now(),
                    log_len: ctx.log_len(),
                    wait: ctx.timing().wait[wait as usize],
                    joined: true,
                };
                let (one, two) = tokio::join!(
                    ACTOR.scope(first.owner.clone(), ctx.store.acquire(&first, before.wait)),
                    ACTOR.scope(
                        second.owner.clone(),
                        ctx.store.acquire(&second, before.wait)
                    ),
                );
                ctx.note(format!("  {i}: w{a} {} -> {}", first.owner, brief(&one)));
                ctx.note(format!("  {i}: w{b} {} -> {}", second.owner, brief(&two)));
                let owners = [&one, &two]
                    .iter()
                    .filter(|r| matches!(r, Ok(Acquire::Owner(_))))
                    .count();
                let log = ctx.log();
                let pre = ctx.clock.view(&log[..before.log_len], key, before.at);
                if matches!(pre, View::Free)
                    && owners == 0
                    && !step.may_fail_acquire()
                    && step.stale.is_none()
                {
                    return Err(violation(
                        5,
                        i,
                        format!("k{key} was free and neither of two concurrent acquires took it"),
                    ));
                }
                // Register the earlier owner first, so the later one is
                // checked against it.
                let revision = |r: &Result<Acquire, StoreError>| match r {
                    Ok(Acquire::Owner(lease)) => lease.revision,
                    _ => u64::MAX,
                };
                let mut both = [(a, first, one), (b, second, two)];
                both.sort_by_key(|(_, _, r)| revision(r));
                for (w, request, acquired) in both {
                    self.check_acquire(ctx, i, step, w, key, &request, &before, acquired)?;
                }
                Ok(())
            }
            Action::ClaimDuring {
                w,
                key,
                wait,
                owner,
                call,
                after_ms,
            } => {
                let request = self.request(ctx, w, key, false);
                let before = Before {
                    at: Instant::now(),
                    log_len: ctx.log_len(),
                    wait: ctx.timing().wait[wait as usize],
                    joined: true,
                };
                let acquire = ACTOR.scope(
                    request.owner.clone(),
                    ctx.store.acquire(&request, before.wait),
                );
                let owner_call = async {
                    tokio::time::sleep(Duration::from_millis(after_ms)).await;
                    match call {
                        Midway::Renew => self.renew(ctx, i, step, owner).await,
                        Midway::Complete => {
                            let ttl = ctx.timing().outcome_ttl[0];
                            self.complete(ctx, i, step, owner, ttl).await
                        }
                    }
                };
                let (acquired, called) = tokio::join!(acquire, owner_call);
                ctx.hit("acquire: during an owner's call");
                ctx.note(format!(
                    "  {i}: w{w} {} (during w{owner}'s {call:?}) -> {}",
                    request.owner,
                    brief(&acquired)
                ));
                called?;
                self.check_acquire(ctx, i, step, w, key, &request, &before, acquired)
            }
            Action::Renew { w } => self.renew(ctx, i, step, w).await,
            Action::Complete { w, ttl } => {
                let ttl = ctx.timing().outcome_ttl[ttl as usize];
                self.complete(ctx, i, step, w, ttl).await
            }
            Action::Release { w } => self.release(ctx, i, step, w).await,
            Action::Crash { w, midway } => self.crash(ctx, i, w, midway).await,
            Action::Advance(jump) => {
                let by = ctx.timing().jump[jump as usize];
                if ctx.timing().paused {
                    tokio::time::advance(by).await;
                } else {
                    tokio::time::sleep(by).await;
                }
                ctx.note(format!("  {i}: time + {by:?}"));
                Ok(())
            }
        }
    }

    /// Worker `w`'s held claim, taken for step `i`; `None`, noted as a
    /// skipped step, when it holds none, or when it is completing and
    /// `completing` says to skip it (a completing worker only retries its
    /// completion: it never renews or releases).
    fn take_held(&mut self, ctx: &Ctx, i: usize, w: usize, completing: Completing) -> Option<Held> {
        let Some(held) = self.workers[w].held.take() else {
            ctx.note(format!("  {i}: w{w} holds nothing: skipped"));
            ctx.hit("step skipped");
            return None;
        };
        if held.completing && completing == Completing::Skip {
            ctx.note(format!("  {i}: w{w} is completing: skipped"));
            ctx.hit("step skipped");
            self.workers[w].held = Some(held);
            return None;
        }
        Some(held)
    }

    pub async fn renew(
        &mut self,
        ctx: &Ctx,
        i: usize,
        step: &Step,
        w: usize,
    ) -> Result<(), String> {
        let Some(mut held) = self.take_held(ctx, i, w, Completing::Skip) else {
            return Ok(());
        };
        let key = held.key;
        let (start, log_len) = (Instant::now(), ctx.log_len());
        let pre_log = ctx.log();
        if held.lease.unsettled {
            ctx.hit("owner: unsettled from an earlier call");
        }
        let before = ctx.inner.read(&ctx.keys[key]).await.ok().flatten();
        let result = ACTOR
            .scope(held.owner.clone(), ctx.store.renew(&mut held.lease))
            .await;
        let after = ctx.inner.read(&ctx.keys[key]).await.ok().flatten();
        let alive = ctx
            .clock
            .alive(&pre_log, key, &held.owner, start, Instant::now());
        ctx.note(format!("  {i}: w{w} {} renew -> {result:?}", held.owner));
        let unchanged =
            Self::stable(ctx, key, &before, Instant::now()).then_some((&before, &after));
        self.check_owner_call(
            ctx, i, step, w, &held, "renewal", alive, log_len, unchanged, &result,
        )?;
        match result {
            Ok(()) => {
                let log = ctx.log();
                let fine = latest(&log, key).is_some_and(|e| {
                    e.owner == held.owner
                        && e.revision == held.lease.revision
                        && e.is_claim()
                        && e.record.as_ref() == Some(&held.lease.record)
                }) && !held.lease.unsettled;
                if !fine {
                    return Err(violation(
                        0,
                        i,
                        format!(
                            "w{w}'s renewal succeeded, but its lease {:?} is not k{key}'s latest {:?}",
                            held.lease,
                            latest(&log, key)
                        ),
                    ));
                }
                self.workers[w].held = Some(held);
            }
            Err(StoreError::LeaseLost) => {}
            Err(_) => self.workers[w].held = Some(held),
        }
        Ok(())
    }

    pub fn outcome(owner: &str) -> Outcome {
        Outcome::Success(json!({ "by": owner }))
    }

    pub async fn complete(
        &mut self,
        ctx: &Ctx,
        i: usize,
        step: &Step,
        w: usize,
        ttl: Duration,
    ) -> Result<(), String> {
        let Some(mut held) = self.take_held(ctx, i, w, Completing::Take) else {
            return Ok(());
        };
        self.ran(ctx, i, &held)?;
        let key = held.key;
        let (start, log_len) = (Instant::now(), ctx.log_len());
        let pre_log = ctx.log();
        if held.lease.unsettled {
            ctx.hit("owner: unsettled from an earlier call");
        }
        let before = ctx.inner.read(&ctx.keys[key]).await.ok().flatten();
        let outcome = Self::outcome(&held.owner);
        let result = ACTOR
            .scope(
                held.owner.clone(),
                ctx.store.complete(&mut held.lease, outcome.clone(), ttl),
            )
            .await;
        let after = ctx.inner.read(&ctx.keys[key]).await.ok().flatten();
        let alive = ctx
            .clock
            .alive(&pre_log, key, &held.owner, start, Instant::now());
        ctx.note(format!(
            "  {i}: w{w} {} complete -> {}",
            held.owner,
            match &result {
                Ok(r) => format!("Ok(rev {}, {:?})", held.lease.revision, r.state),
                Err(e) => format!("{e:?}"),
            }
        ));
        let unchanged =
            Self::stable(ctx, key, &before, Instant::now()).then_some((&before, &after));
        self.check_owner_call(
            ctx,
            i,
            step,
            w,
            &held,
            "completion",
            alive,
            log_len,
            unchanged,
            &result,
        )?;
        match result {
            Ok(record) => {
                let log = ctx.log();
                let fine = latest(&log, key).is_some_and(|e| {
                    e.owner == held.owner && e.is_done() && e.record.as_ref() == Some(&record)
                }) && record.result.as_ref() == Some(&outcome);
                if !fine {
                    return Err(violation(
                        0,
                        i,
                        format!(
                            "w{w}'s completion returned {record:?}, but k{key} holds {:?}",
                            latest(&log, key)
                        ),
                    ));
                }
            }
            Err(StoreError::LeaseLost) => {}
            Err(_) => {
                held.completing = true;
                self.workers[w].held = Some(held);
            }
        }
        Ok(())
    }

    pub async fn release(
        &mut self,
        ctx: &Ctx,
        i: usize,
        step: &Step,
        w: usize,
    ) -> Result<(), String> {
        let Some(mut held) = self.take_held(ctx, i, w, Completing::Skip) else {
            return Ok(());
        };
        let key = held.key;
        let (start, log_len) = (Instant::now(), ctx.log_len());
        let pre_log = ctx.log();
        let result = ACTOR
            .scope(held.owner.clone(), ctx.store.release(&mut held.lease))
            .await;
        let alive = ctx
            .clock
            .alive(&pre_log, key, &held.owner, start, Instant::now());
        ctx.note(format!("  {i}: w{w} {} release -> {result:?}", held.owner));
        let now = Instant::now();
        let log = ctx.log();
        let who = format!("w{w} ({})", held.owner);
        let removed = log[log_len..]
            .iter()
            .any(|e| e.owner == held.owner && e.record.is_none());
        ctx.hit(match result {
            Ok(true) => "release: freed",
            Ok(false) => "release: someone else's",
            Err(_) => "release: error",
        });
        match result {
            Ok(true) => {
                if ctx.clock.alive(&log, key, &held.owner, now, now) == Alive::Yes
                    || (alive == Alive::Yes && !removed)
                {
                    return Err(violation(
                        0,
                        i,
                        format!(
                            "{who}'s release said the key is free, but k{key} holds {}",
                            latest(&log, key).map_or("nothing".to_owned(), describe)
                        ),
                    ));
                }
            }
            Ok(false) => {
                if alive == Alive::Yes {
                    return Err(violation(
                        4,
                        i,
                        format!(
                            "{who}'s release was told someone else holds k{key}, but it holds {}",
                            latest(&log[..log_len], key).map_or("nothing".to_owned(), describe)
                        ),
                    ));
                }
            }
            Err(ref error) => {
                if !step.faulty() {
                    return Err(violation(
                        0,
                        i,
                        format!("{who}'s release failed with no fault: {error:?}"),
                    ));
                }
            }
        }
        if alive == Alive::No && !log[log_len..].iter().all(|e| e.owner != held.owner) {
            return Err(violation(
                3,
                i,
                format!("{who}'s lease was gone, yet its release landed a write"),
            ));
        }
        Ok(())
    }

    pub async fn crash(
        &mut self,
        ctx: &Ctx,
        i: usize,
        w: usize,
        midway: Option<(Midway, u64)>,
    ) -> Result<(), String> {
        let Some(mut held) = self.take_held(ctx, i, w, Completing::Take) else {
            return Ok(());
        };
        let cut = |ms| Duration::from_millis(ms);
        match midway {
            None => {
                ctx.hit("crash");
                ctx.note(format!("  {i}: w{w} {} crashes", held.owner));
            }
            Some((Midway::Renew, ms)) if !held.completing => {
                let call = ACTOR.scope(held.owner.clone(), ctx.store.renew(&mut held.lease));
                let result = tokio::time::timeout(cut(ms), call).await;
                ctx.hit("crash in a renewal");
                ctx.note(format!(
                    "  {i}: w{w} {} crashes in a renewal: {result:?}",
                    held.owner
                ));
            }
            Some((_, ms)) => {
                self.ran(ctx, i, &held)?;
                let outcome = Self::outcome(&held.owner);
                let ttl = ctx.timing().outcome_ttl[0];
                let call = ACTOR.scope(
                    held.owner.clone(),
                    ctx.store.complete(&mut held.lease, outcome, ttl),
                );
                let result = tokio::time::timeout(cut(ms), call)
                    .await
                    .map(|r| r.map(|_| ()));
                ctx.hit("crash in a completion");
                ctx.note(format!(
                    "  {i}: w{w} {} crashes in a completion: {result:?}",
                    held.owner
                ));
            }
        }
        Ok(())
    }
}

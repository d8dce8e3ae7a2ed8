//! Run any async closure once per key: the claim protocol as one call.
//!
//! [`Idempotent::run`] is what the worker does for one intent, for any Rust
//! service that has a key and a fingerprint rather than a NATS message (an
//! HTTP handler, its own JetStream consumer, a batch job):
//!
//! 1. claim the key atomically in the store (a JetStream KV bucket, or
//!    memory), or wait (bounded by [`RunOptions::wait`]) for an execution
//!    that holds it, and replay what it stored;
//! 2. refuse a key already used with another fingerprint
//!    ([`RunError::KeyReused`]);
//! 3. run the closure at most once per claim, within
//!    [`RunOptions::timeout`] (then the stored outcome is `Timeout`),
//!    renewing the lease every third of it while the closure runs;
//! 4. store what the closure returned (a value or a definite error; an
//!    outcome the store cannot hold becomes `RESULT_TOO_LARGE`), and give
//!    the claim back on a transient failure ([`HandlerError::Transient`]:
//!    nothing is stored, a retry runs the closure again);
//! 5. after a lost lease, never store over the new owner: answer with what
//!    it stored, or `IN_PROGRESS`.
//!
//! The worker's pipeline runs every intent through this same code
//! (`pipeline.rs` adds only the NATS side: decoding, the outcome cache,
//! replies and verdicts).
//!
//! # Cancellation
//!
//! Dropping a `run` future mid-way never leaves the key blocked for longer
//! than the lease: the claim is not renewed any more and the store's TTL
//! frees the key, for the next caller to take over (attempt + 1). The
//! worker, which must give keys back at once on shutdown, cancels through
//! a token instead, and the claim is released.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use idemq::run_once::{fingerprint_of, Idempotent, RunOptions};
//! use idemq::store::memory::MemoryStore;
//! use idemq::{IdempotencyKey, Outcome};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let once = Idempotent::new(Arc::new(MemoryStore::new()), RunOptions::default());
//! let key = IdempotencyKey::generate("run-1", "ep-7", 3);
//! let request = serde_json::json!({"account": "acme", "amount": 42});
//! let fingerprint = fingerprint_of(&request)?;
//! let done = once
//!     .run(&key, &fingerprint, |_attempt| async {
//!         // Runs once per key while the outcome is kept.
//!         Ok(Outcome::Success(serde_json::json!({"charged": 42})))
//!     })
//!     .await?;
//! println!("{:?} (replayed: {})", done.outcome(), done.replayed);
//! # Ok(())
//! # }
//! ```

use std::fmt::Write as _;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::handler::HandlerError;
use crate::key::IdempotencyKey;
use crate::outcome::{nests_deeper_than, Outcome, Record, MAX_OUTCOME_DEPTH};
use crate::stats::Stats;
use crate::store::{
    Acquire, ClaimProtocol, ClaimRequest, IdempotencyStore, Lease, StoreError, Versioned,
};

/// Shortest `retry_after` suggested with [`RunError::InProgress`].
pub const MIN_RETRY_AFTER: Duration = Duration::from_millis(100);

/// How one [`Idempotent`] claims and runs. The defaults are the worker's
/// (`idemq serve --lease 30s --wait 5s --handler-timeout 30s --ttl 24h`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// The claim's lease, renewed every third of it while the closure runs.
    /// Whole seconds, from 1 s (TTLs in JetStream KV are whole seconds) to a
    /// day (see [`RunOptions::bounded`]).
    pub lease: Duration,
    /// How long a caller waits for an execution that holds the key before
    /// [`RunError::InProgress`].
    pub wait: Duration,
    /// How long the closure may run; then its outcome is `Timeout`, stored.
    pub timeout: Duration,
    /// How long an outcome is kept (and replayed).
    pub ttl: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            lease: Duration::from_secs(30),
            wait: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl RunOptions {
    /// These options within the bounds the store and the timers can hold
    /// (docs/contract.md v1.2 §7): a lease of whole seconds from 1 s to a day,
    /// a wait and a timeout of at most a day, a TTL from 1 s to ten years.
    /// [`Idempotent::new`] takes them so: no setting can make it panic or
    /// overflow.
    pub fn bounded(self) -> RunOptions {
        use crate::config::{MAX_DURATION, MAX_TTL};
        let second = Duration::from_secs(1);
        RunOptions {
            lease: self.lease.clamp(second, MAX_DURATION),
            wait: self.wait.min(MAX_DURATION),
            timeout: self.timeout.clamp(Duration::from_millis(1), MAX_DURATION),
            ttl: self.ttl.clamp(second, MAX_TTL),
        }
    }
}

/// How [`Idempotent::supervise`]'s wait for a closure ended.
enum Ended {
    /// The closure returned (`None`: past its timeout).
    Ran(Option<Result<Outcome, HandlerError>>),
    /// A renewal found the lease taken over.
    LeaseLost,
    /// The run was cancelled.
    Cancelled,
}

/// One call's identity: the key, the fingerprint of what is asked under
/// it, and what to record.
#[derive(Debug, Clone, Copy)]
pub struct RunRequest<'a> {
    /// The idempotency key.
    pub key: &'a IdempotencyKey,
    /// What the caller asks under the key (see [`fingerprint_of`]): a
    /// caller with another fingerprint gets [`RunError::KeyReused`].
    pub fingerprint: &'a str,
    /// An id recorded with the claim and the outcome, for readers
    /// (`idemq get`); may be empty.
    pub intent_id: &'a str,
    /// How long this outcome is kept: [`RunOptions::ttl`] when `None`.
    pub ttl: Option<Duration>,
}

/// What the closure is told about its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The attempt number, from 1; one more after each takeover.
    pub number: u32,
    /// True when this run took the key over from an owner whose lease ran
    /// out (it may have done part of the work).
    pub takeover: bool,
}

/// One run of the closure, as it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Execution {
    /// The attempt number.
    pub attempt: u32,
    /// How long the closure took.
    pub took: Duration,
}

/// The outcome every caller of a key gets while it is kept: the stored
/// record, whole, as it goes on to be answered and cached.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    /// The stored record; it holds an outcome (see [`Done::stored`]).
    record: Record,
    /// False only for the call whose own closure produced the outcome.
    pub replayed: bool,
    /// Whether this call waited for another execution of the key.
    pub waited: bool,
    /// This call's own run of the closure; `None` for a replay.
    pub execution: Option<Execution>,
}

/// What [`Done::outcome`] answers for a record without one; never seen,
/// since a `Done` is only made of a record that holds an outcome.
static NO_OUTCOME: Outcome = Outcome::Timeout;

impl Done {
    /// A done record as stored; `None` when it holds no outcome.
    fn stored(record: Record, waited: bool) -> Option<Done> {
        record.result.as_ref()?;
        Some(Done {
            record,
            replayed: true,
            waited,
            execution: None,
        })
    }

    /// The outcome.
    pub fn outcome(&self) -> &Outcome {
        self.record.result.as_ref().unwrap_or(&NO_OUTCOME)
    }

    /// The outcome, owned.
    pub fn into_outcome(self) -> Outcome {
        self.record.result.unwrap_or(Outcome::Timeout)
    }

    /// When the outcome was stored.
    pub fn stored_at(&self) -> chrono::DateTime<chrono::Utc> {
        self.record.stored_at
    }

    /// When the stored outcome expires.
    pub fn expires_at(&self) -> chrono::DateTime<chrono::Utc> {
        self.record.expires_at
    }

    /// The record as stored under the key (outcome included).
    pub fn record(&self) -> &Record {
        &self.record
    }
}

/// Why a call did not end in a stored outcome.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunError {
    /// The key is claimed or done with another fingerprint.
    #[error("idempotency key already used by a different request")]
    KeyReused,
    /// Another execution still holds the key after the wait.
    #[error("another execution holds this key")]
    InProgress {
        /// When to retry: when the holder's lease ends, at most the wait.
        retry_after: Duration,
    },
    /// The closure failed in a way a retry may fix ([`HandlerError`]: a
    /// transient error, or nothing that can run it now): nothing was
    /// stored and the claim was released, so the next call runs it again.
    #[error("{error}; the claim was released")]
    Released {
        /// What the closure said.
        error: HandlerError,
        /// The run.
        execution: Execution,
    },
    /// The closure ran, but the store did not take its outcome while the
    /// lease could hold (docs/contract.md v1.2 §4: the owner kept writing it
    /// until the store said the lease was lost, or until a lease past its
    /// last acknowledged one). Nothing is settled: a retry finds the key
    /// free once the lease ends, and runs again. The worker answers it with
    /// `Idem-Stored: false`.
    #[error("executed, but the outcome could not be stored: {error}")]
    Unstored {
        /// What the closure returned.
        outcome: Outcome,
        /// Why it was not stored.
        error: StoreError,
        /// The run.
        execution: Execution,
    },
    /// The run was cancelled (the worker's shutdown) and the claim released.
    #[error("cancelled; the claim was released")]
    Cancelled,
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs closures once per key over one store: see the module docs.
pub struct Idempotent {
    store: Arc<dyn IdempotencyStore>,
    options: RunOptions,
    stats: Arc<Stats>,
    /// Unique per `Idempotent`; prefixes claim owner tokens.
    instance: String,
    /// Claims made so far: numbers each claim's owner token.
    claims: AtomicU64,
}

/// What [`Idempotent::claim`] decided.
pub(crate) enum Claimed {
    /// We hold the key: run.
    Owner(Lease),
    /// Another execution's outcome.
    Stored(Done),
}

impl Idempotent {
    /// Runs over `store` with `options`.
    pub fn new(store: Arc<dyn IdempotencyStore>, options: RunOptions) -> Idempotent {
        Idempotent::with_stats(store, options, Arc::default(), nuid::next().to_string())
    }

    /// Counting executions into `stats`, with owner tokens under `instance`.
    pub(crate) fn with_stats(
        store: Arc<dyn IdempotencyStore>,
        options: RunOptions,
        stats: Arc<Stats>,
        instance: String,
    ) -> Idempotent {
        Idempotent {
            store,
            options: options.bounded(),
            stats,
            instance,
            claims: AtomicU64::new(0),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn IdempotencyStore> {
        &self.store
    }

    /// The options.
    pub fn options(&self) -> &RunOptions {
        &self.options
    }

    /// The execution counters (takeovers, handler time, executions, transient
    /// failures, outcomes not stored).
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Runs `f` once per `key` (while its outcome is kept) and returns the
    /// outcome, or replays the one stored by an earlier call; see the
    /// module docs. `fingerprint` names what is asked under the key.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use idemq::run_once::{fingerprint_of, Idempotent, RunOptions};
    /// use idemq::store::memory::MemoryStore;
    /// use idemq::{IdempotencyKey, Outcome};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let once = Idempotent::new(Arc::new(MemoryStore::new()), RunOptions::default());
    /// let key = IdempotencyKey::generate("order-7", "checkout", 0);
    /// let fingerprint = fingerprint_of(&serde_json::json!({"amount": 42}))?;
    /// let charge = || async { Ok(Outcome::Success(serde_json::json!({"charged": 42}))) };
    /// let first = once.run(&key, &fingerprint, |_| charge()).await?;
    /// let again = once.run(&key, &fingerprint, |_| charge()).await?;
    /// assert!(!first.replayed && again.replayed);
    /// assert_eq!(first.outcome(), again.outcome());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn run<F, Fut>(
        &self,
        key: &IdempotencyKey,
        fingerprint: &str,
        f: F,
    ) -> Result<Done, RunError>
    where
        F: FnOnce(Attempt) -> Fut + Send,
        Fut: Future<Output = Result<Outcome, HandlerError>> + Send,
    {
        let request = RunRequest {
            key,
            fingerprint,
            intent_id: "",
            ttl: None,
        };
        self.run_request(&request, &CancellationToken::new(), f)
            .await
    }

    /// [`run`](Self::run) with an intent id and TTL of its own, cancelled by
    /// `cancel`: a closure still running then is dropped and the claim
    /// released ([`RunError::Cancelled`]).
    pub async fn run_request<F, Fut>(
        &self,
        request: &RunRequest<'_>,
        cancel: &CancellationToken,
        f: F,
    ) -> Result<Done, RunError>
    where
        F: FnOnce(Attempt) -> Fut + Send,
        Fut: Future<Output = Result<Outcome, HandlerError>> + Send,
    {
        match self.claim(request, None).await? {
            Claimed::Stored(done) => Ok(done),
            Claimed::Owner(lease) => self.execute(request, lease, cancel, f).await,
        }
    }

    /// Claims the key, or waits for its holder's outcome; `seen` is the
    /// key's latest revision when the caller just read it (see
    /// [`IdempotencyStore::acquire_from`]).
    pub(crate) async fn claim(
        &self,
        request: &RunRequest<'_>,
        seen: Option<Versioned>,
    ) -> Result<Claimed, RunError> {
        let claim = ClaimRequest {
            key: request.key.clone(),
            intent_id: request.intent_id.to_owned(),
            fingerprint: request.fingerprint.to_owned(),
            owner: self.owner_token(),
            lease: self.options.lease,
        };
        let acquired = self
            .store
            .acquire_from(&claim, self.options.wait, seen)
            .await?;
        match acquired {
            Acquire::Owner(lease) => Ok(Claimed::Owner(lease)),
            Acquire::Stored { record, waited } => Done::stored(record, waited)
                .map(Claimed::Stored)
                .ok_or_else(|| corrupt(request.key)),
            Acquire::Reused(_) => Err(RunError::KeyReused),
            Acquire::Busy(record) => Err(self.in_progress(&record)),
        }
    }

    /// Runs `f` under the held `lease`, renewing it, then stores the
    /// outcome.
    ///
    /// An `async move` block rather than an `async fn`, which would keep the
    /// lease twice in its future: it is part of every intent's task.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would hold the lease twice"
    )]
    pub(crate) fn execute<'a, F, Fut>(
        &'a self,
        request: &'a RunRequest<'a>,
        mut lease: Lease,
        cancel: &'a CancellationToken,
        f: F,
    ) -> impl Future<Output = Result<Done, RunError>> + Send + 'a
    where
        F: FnOnce(Attempt) -> Fut + Send + 'a,
        Fut: Future<Output = Result<Outcome, HandlerError>> + Send + 'a,
    {
        async move {
            if lease.takeover {
                self.stats.takeovers.inc();
                tracing::warn!(attempt = lease.record.attempt, "took over an expired claim");
            }
            let attempt = Attempt {
                number: lease.record.attempt,
                takeover: lease.takeover,
            };
            let started = std::time::Instant::now();
            let mut work = pin!(f(attempt));
            // A closure done at its first poll (echo, an answer held in
            // memory) needs neither the timeout nor the renewal timer.
            let result = match futures::poll!(work.as_mut()) {
                Poll::Ready(result) => Some(result),
                // Boxed, so the timers and renewals take room only while a
                // closure waits, not in every intent's task.
                Poll::Pending => {
                    match Box::pin(self.supervise(request, work, &mut lease, cancel)).await {
                        Ok(ran) => ran,
                        Err(ended) => return ended,
                    }
                }
            };
            let execution = Execution {
                attempt: attempt.number,
                took: started.elapsed(),
            };
            Stats::observe(&self.stats.handler_seconds, execution.took);
            let outcome = match result {
                None => Outcome::Timeout,
                Some(Ok(outcome)) => outcome,
                Some(Err(error)) => {
                    if let HandlerError::Transient { code, .. } = &error {
                        executed(&execution, "Error", Some(code), true);
                        self.stats.transient.inc();
                    }
                    self.release(&mut lease).await;
                    return Err(RunError::Released { error, execution });
                }
            };
            let outcome = storable(outcome);
            executed(&execution, outcome.status(), outcome.error_code(), false);
            let ttl = request.ttl.unwrap_or(self.options.ttl);
            let error = match self.store.complete(&mut lease, outcome.clone(), ttl).await {
                Ok(record) => {
                    self.stats.executed.inc();
                    let mut done =
                        Done::stored(record, false).ok_or_else(|| corrupt(request.key))?;
                    done.replayed = false;
                    done.execution = Some(execution);
                    return Ok(done);
                }
                // Another owner's outcome is the key's answer, if it has one.
                Err(StoreError::LeaseLost) => match self.store.get(request.key).await {
                    Ok(Some(record))
                        if record.result.is_some() && record.fingerprint == request.fingerprint =>
                    {
                        tracing::warn!(
                            "lease lost before the outcome was stored; answering the new owner's"
                        );
                        return Done::stored(record, false).ok_or_else(|| corrupt(request.key));
                    }
                    _ => StoreError::LeaseLost,
                },
                Err(error) => error,
            };
            // The store did not take it while the lease could hold: the
            // outcome is answered as it is, marked unstored (docs/contract.md
            // v1.2 §3, §4), and a retry may run the key again.
            self.stats.unstored.inc();
            tracing::warn!(%error, "the outcome was executed but not stored; answered unstored");
            Err(RunError::Unstored {
                outcome,
                error,
                execution,
            })
        }
    }

    /// Waits for a closure that did not finish at once, within the timeout
    /// (`Ok(None)` past it), renewing the lease every third of its length.
    /// `Err` holds the call's end when the lease is lost or the run is
    /// cancelled.
    async fn supervise<Fut>(
        &self,
        request: &RunRequest<'_>,
        work: Pin<&mut Fut>,
        lease: &mut Lease,
        cancel: &CancellationToken,
    ) -> Result<Option<Result<Outcome, HandlerError>>, Result<Done, RunError>>
    where
        Fut: Future<Output = Result<Outcome, HandlerError>>,
    {
        let ran = tokio::time::timeout(self.options.timeout, work);
        tokio::pin!(ran);
        let every = lease.ttl / 3;
        // Due a third of a lease after the lease's start, which may be
        // long past: an owner that learned only late (a lost ack, then a
        // read) that its claim landed renews at once.
        let now = tokio::time::Instant::now();
        let first = lease
            .held_until
            .checked_sub(lease.ttl - every)
            .map_or(now, |due| due.max(now));
        let mut renewals = tokio::time::interval_at(first, every);
        // The closure is polled while a renewal waits for the store: a slow
        // store must not stall it. A renewal still in flight when the
        // closure ends is dropped; the lease remembers that it may have
        // landed (`Lease::unsettled`), and the outcome's write settles it.
        let end = {
            let renewing = async {
                loop {
                    renewals.tick().await;
                    match self.store.renew(lease).await {
                        Ok(()) => {}
                        Err(StoreError::LeaseLost) => return,
                        // The lease may still be alive; try again at the next tick.
                        Err(error) => tracing::warn!(%error, "lease renewal failed"),
                    }
                }
            };
            tokio::pin!(renewing);
            tokio::select! {
                ran = &mut ran => Ended::Ran(ran.ok()),
                () = &mut renewing => Ended::LeaseLost,
                () = cancel.cancelled() => Ended::Cancelled,
            }
        };
        match end {
            Ended::Ran(ran) => Ok(ran),
            Ended::LeaseLost => {
                tracing::warn!("lease lost while the handler ran; its outcome is dropped");
                Err(self.after_lost_lease(request).await)
            }
            Ended::Cancelled => {
                self.release(lease).await;
                Err(Err(RunError::Cancelled))
            }
        }
    }

    /// After losing the lease, answer with what the new owner stored, if
    /// anything. The new owner counts the takeover; this side logs it.
    async fn after_lost_lease(&self, request: &RunRequest<'_>) -> Result<Done, RunError> {
        match self.store.get(request.key).await? {
            Some(record)
                if record.result.is_some() && record.fingerprint == request.fingerprint =>
            {
                Done::stored(record, false).ok_or_else(|| corrupt(request.key))
            }
            _ => Err(RunError::InProgress {
                retry_after: self.options.wait.max(MIN_RETRY_AFTER),
            }),
        }
    }

    async fn release(&self, lease: &mut Lease) {
        if let Err(error) = self.store.release(lease).await {
            // The lease's TTL frees the key anyway.
            tracing::warn!(%error, "claim not released; it frees itself when the lease expires");
        }
    }

    /// `IN_PROGRESS`, suggesting a retry when the holder's lease ends (at most the wait).
    fn in_progress(&self, record: &Record) -> RunError {
        let until_expiry = (record.expires_at - chrono::Utc::now())
            .to_std()
            .unwrap_or_default();
        RunError::InProgress {
            retry_after: until_expiry.min(self.options.wait).max(MIN_RETRY_AFTER),
        }
    }

    /// A token unique to one claim attempt: the instance, a dot, and the
    /// number of claims it made before.
    fn owner_token(&self) -> String {
        let n = self.claims.fetch_add(1, Ordering::Relaxed);
        let mut owner = String::with_capacity(self.instance.len() + 21);
        owner.push_str(&self.instance);
        // Writing to a `String` cannot fail.
        let _ = write!(owner, ".{n}");
        owner
    }
}

/// The outcome to store: a `Success` nested deeper than
/// [`MAX_OUTCOME_DEPTH`] becomes the definite `RESULT_TOO_LARGE`, which
/// every worker and client can read back.
fn storable(outcome: Outcome) -> Outcome {
    match &outcome {
        Outcome::Success(value) if nests_deeper_than(value, MAX_OUTCOME_DEPTH) => Outcome::error(
            crate::codes::RESULT_TOO_LARGE,
            format!(
                "the result nests deeper than the {MAX_OUTCOME_DEPTH} levels a record can hold readably"
            ),
        ),
        _ => outcome,
    }
}

/// A done record without its outcome.
fn corrupt(key: &IdempotencyKey) -> RunError {
    RunError::Store(StoreError::Corrupt {
        key: key.to_string(),
        reason: "done record without a result".to_owned(),
    })
}

/// The execution log line (docs/contract.md v1.1 §7): one `info` event per
/// closure run, never per replay, inside the caller's span (the worker's
/// carries `idem_key`, `intent_id` and `capability`). It names the
/// outcome, not its content: params, results and payloads never reach a log.
fn executed(execution: &Execution, status: &str, code: Option<&str>, transient: bool) {
    let handler_ms = u64::try_from(execution.took.as_millis()).unwrap_or(u64::MAX);
    let attempt = execution.attempt;
    match code {
        Some(code) => {
            tracing::info!(status, code, attempt, handler_ms, transient, "executed");
        }
        None => tracing::info!(status, attempt, handler_ms, "executed"),
    }
}

/// The fingerprint of any serializable request: SHA-256 (hex) of its
/// canonical JSON (object keys sorted, no whitespace), the form intents'
/// fingerprints take. Two requests with the same fingerprint are the same
/// request; one under a key with another fingerprint is `KEY_REUSED`.
pub fn fingerprint_of<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_json::Error> {
    // Through `Value`, whose maps are sorted: canonical whatever the
    // struct's field order or a map's iteration order.
    let canonical = serde_json::to_value(value)?;
    Ok(crate::intent::sha256_hex_of_json(&canonical))
}

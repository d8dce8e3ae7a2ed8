//! The seed's helpers, on idemq's claim protocol: the migration path.
//!
//! The seed design (`helpers::check_idempotency`, `helpers::execute_idempotent`)
//! read the store, ran the operation when nothing was there, and wrote the
//! result: two callers of one key could both read "nothing" and both run.
//! These functions keep the seed's names, argument order and result types,
//! and run on [`Idempotent`] instead: the key is claimed atomically first,
//! so the operation runs once however many callers race.
//!
//! Moving from the seed:
//!
//! ```text
//! seed:  helpers::execute_idempotent(&store, key, intent_id, 24, || op()).await
//! idemq: idemq::seed::execute_idempotent(&once, key, intent_id, 24, || op()).await
//! ```
//!
//! where `once` is an [`Idempotent`] over a JetStream KV bucket
//! ([`crate::store::kv::KvStore`]) or memory. New code should call
//! [`Idempotent::run`] directly: it also tells a replay from a fresh run,
//! refuses a key reused for another request, and lets a transient failure
//! be retried instead of stored.

use std::future::Future;
use std::time::Duration;

use serde_json::Value;

use crate::key::IdempotencyKey;
use crate::outcome::Outcome;
use crate::run_once::{fingerprint_of, Idempotent, RunError, RunRequest};
use crate::store::{ClaimProtocol, IdempotencyStore};

/// The seed's errors, under its names. (The seed's `InvalidFormat` is
/// [`IdempotencyKey::parse`]'s error here: a key is checked when it is
/// made, not when it is used.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdempotencyError {
    /// Another execution holds the key (still running after the wait), or
    /// the key was used for another request.
    #[error("Duplicate execution detected for key: {key}")]
    DuplicateExecution {
        /// The key.
        key: String,
    },
    /// The store could not be read or written, or the outcome not stored.
    #[error("Idempotency store error: {0}")]
    StoreError(String),
}

/// The stored outcome under `idem_key`, if an execution finished; `None`
/// when nothing is stored or an execution still runs.
///
/// A read, as in the seed: acting on its `None` is the seed's race. To run
/// something once, call [`execute_idempotent`] (or [`Idempotent::run`]).
pub async fn check_idempotency(
    store: &dyn IdempotencyStore,
    idem_key: &IdempotencyKey,
) -> Result<Option<Outcome>, IdempotencyError> {
    let record = store
        .get(idem_key)
        .await
        .map_err(|e| IdempotencyError::StoreError(e.to_string()))?;
    Ok(record.and_then(|record| record.result))
}

/// Runs `operation` once per `idem_key` and returns its outcome, or the
/// outcome an earlier call stored (kept `ttl_hours`). `Err((code,
/// message))` from the operation is a definite error, stored and replayed
/// like a value, as in the seed.
///
/// Every call under one key is the same request here (the seed had no
/// fingerprint), so any later call replays the stored outcome.
pub async fn execute_idempotent<F, Fut>(
    once: &Idempotent,
    idem_key: IdempotencyKey,
    intent_id: String,
    ttl_hours: u32,
    operation: F,
) -> Result<Outcome, IdempotencyError>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<Value, (String, String)>> + Send,
{
    let fingerprint = fingerprint_of(idem_key.as_str())
        .map_err(|e| IdempotencyError::StoreError(e.to_string()))?;
    let request = RunRequest {
        key: &idem_key,
        fingerprint: &fingerprint,
        intent_id: &intent_id,
        ttl: Some(Duration::from_secs(u64::from(ttl_hours.max(1)) * 3600)),
    };
    let run = |_attempt| async move {
        Ok(match operation().await {
            Ok(value) => Outcome::Success(value),
            Err((code, message)) => Outcome::error(code, message),
        })
    };
    let never = tokio_util::sync::CancellationToken::new();
    match once.run_request(&request, &never, run).await {
        Ok(done) => Ok(done.into_outcome()),
        Err(RunError::KeyReused | RunError::InProgress { .. }) => {
            Err(IdempotencyError::DuplicateExecution {
                key: idem_key.to_string(),
            })
        }
        Err(other) => Err(IdempotencyError::StoreError(other.to_string())),
    }
}

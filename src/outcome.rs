//! Outcomes, the stored record, and the reply every copy of an intent gets.
//!
//! [`Outcome`] keeps the seed's tagged form (`{"status": ..., "data": ...}`)
//! so stored values stay readable by seed-era tools. [`Record`] is the one
//! JSON value per KV key; [`Reply`] is what goes back on the wire.

use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::key::IdempotencyKey;

/// Reply header: the idempotency key.
pub const KEY_HEADER: &str = "Idem-Key";
/// Reply header: `true` when the outcome came from the store.
pub const REPLAYED_HEADER: &str = "Idem-Replayed";
/// Reply header (and upstream reply header): the outcome's status.
pub const STATUS_HEADER: &str = "Idem-Status";
/// Reply header: the error code of an `Error` outcome.
pub const ERROR_CODE_HEADER: &str = "Idem-Error-Code";

/// Version of the stored record layout.
pub const RECORD_VERSION: u32 = 1;

/// The result of executing an intent, in the seed's tagged form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", content = "data")]
pub enum Outcome {
    /// The handler produced a value.
    Success(Value),
    /// The handler, upstream or worker reported an error.
    Error {
        /// A stable code: one of the worker's codes, an upstream's code
        /// (numeric codes as decimal strings), or `UPSTREAM_BAD_REPLY`.
        code: String,
        /// Human-readable text.
        message: String,
        /// For `IN_PROGRESS`: when to retry, in milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// The handler did not answer within `--handler-timeout`.
    Timeout,
    /// The upstream reported that the execution was killed.
    Killed,
}

impl Outcome {
    /// An `Error` outcome without a retry hint.
    pub fn error(code: impl Into<String>, message: impl Into<String>) -> Self {
        Outcome::Error {
            code: code.into(),
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// The `status` tag as text.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Success(_) => "Success",
            Outcome::Error { .. } => "Error",
            Outcome::Timeout => "Timeout",
            Outcome::Killed => "Killed",
        }
    }

    /// The error code, for `Error` outcomes.
    pub fn error_code(&self) -> Option<&str> {
        match self {
            Outcome::Error { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The lifecycle state of a stored record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Claimed: one worker holds the lease and is executing.
    InProgress,
    /// Executed: `result` holds the outcome until it expires.
    Done,
}

/// The value stored under an idempotency key.
///
/// A claim and an outcome are the same record in two states, so that moving
/// from one to the other is a single compare-and-swap on the key's revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Layout version ([`RECORD_VERSION`]).
    pub v: u32,
    /// The key this record lives under.
    pub idem_key: IdempotencyKey,
    /// The intent id of the execution that claimed the key.
    pub intent_id: String,
    /// Fingerprint of the intent; a copy with another one is `KEY_REUSED`.
    pub fingerprint: String,
    /// Claimed or done.
    pub state: RecordState,
    /// Token of the claim that wrote this record. A write whose fate is
    /// unknown (timed-out publish) is recognised as ours by this token.
    pub owner: String,
    /// Execution attempt, from 1; a takeover after a lost lease adds one.
    pub attempt: u32,
    /// The outcome, once done.
    pub result: Option<Outcome>,
    /// When the claim (in progress) or the outcome (done) was written.
    pub stored_at: DateTime<Utc>,
    /// When the lease (in progress) or the outcome (done) expires; the
    /// server enforces it, this copy is for readers.
    pub expires_at: DateTime<Utc>,
}

/// The reply published for one delivery of an intent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The key, or `null` when it could not be derived.
    pub idem_key: Option<IdempotencyKey>,
    /// The intent id, or `null` when it could not be read.
    pub intent_id: Option<String>,
    /// False only for the delivery whose own execution produced the outcome.
    pub replayed: bool,
    /// The outcome.
    pub result: Outcome,
    /// When the outcome was stored; `null` when it was not stored.
    pub stored_at: Option<DateTime<Utc>>,
    /// When the stored outcome expires; `null` when it was not stored.
    pub expires_at: Option<DateTime<Utc>>,
}

impl Reply {
    /// The reply that carries a stored record's outcome.
    ///
    /// Returns `None` for a record that holds no outcome yet.
    pub fn from_record(record: &Record, replayed: bool) -> Option<Reply> {
        let result = record.result.clone()?;
        Some(Reply {
            idem_key: Some(record.idem_key.clone()),
            intent_id: Some(record.intent_id.clone()),
            replayed,
            result,
            stored_at: Some(record.stored_at),
            expires_at: Some(record.expires_at),
        })
    }

    /// A reply carrying an outcome that was not stored.
    pub fn unstored(
        idem_key: Option<IdempotencyKey>,
        intent_id: Option<String>,
        result: Outcome,
    ) -> Reply {
        Reply {
            idem_key,
            intent_id,
            replayed: false,
            result,
            stored_at: None,
            expires_at: None,
        }
    }

    /// The reply headers: `Idem-Key`, `Idem-Replayed`, `Idem-Status`, and
    /// `Idem-Error-Code` on errors.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(key) = &self.idem_key {
            headers.insert(KEY_HEADER, key.as_str());
        }
        headers.insert(
            REPLAYED_HEADER,
            if self.replayed { "true" } else { "false" },
        );
        headers.insert(STATUS_HEADER, self.result.status());
        if let Some(code) = self.result.error_code() {
            headers.insert(ERROR_CODE_HEADER, code);
        }
        headers
    }

    /// The reply as JSON bytes.
    pub fn to_bytes(&self) -> bytes::Bytes {
        // A `Reply` holds only strings, numbers, booleans, timestamps and
        // `Value`s: serialising it cannot fail.
        serde_json::to_vec(self).unwrap_or_default().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outcome_uses_the_seed_tagged_form() {
        let success = serde_json::to_value(Outcome::Success(json!({"echo": 1}))).expect("json");
        assert_eq!(success, json!({"status": "Success", "data": {"echo": 1}}));
        let timeout = serde_json::to_value(Outcome::Timeout).expect("json");
        assert_eq!(timeout, json!({"status": "Timeout"}));
        let error = serde_json::to_value(Outcome::error("422", "bad")).expect("json");
        assert_eq!(
            error,
            json!({"status": "Error", "data": {"code": "422", "message": "bad"}})
        );
    }

    #[test]
    fn seed_error_outcome_still_decodes() {
        let seed = json!({"status": "Error", "data": {"code": "E", "message": "m"}});
        let outcome: Outcome = serde_json::from_value(seed).expect("decode");
        assert_eq!(outcome, Outcome::error("E", "m"));
    }
}

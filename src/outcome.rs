//! Outcomes, the stored record, and the reply every copy of an intent gets.
//!
//! [`Outcome`] keeps the seed's tagged form (`{"status": ..., "data": ...}`)
//! so stored values stay readable by seed-era tools. [`Record`] is the one
//! JSON value per KV key; what goes back on the wire is in `reply.rs`.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::key::IdempotencyKey;

/// The deepest a `Success` value may nest and be stored. A record wraps
/// the value two levels deeper, a reply too, and JSON readers stop at 128
/// (serde_json's limit): a deeper value would be stored but unreadable,
/// by other workers and by clients. It is stored as `RESULT_TOO_LARGE`.
pub const MAX_OUTCOME_DEPTH: usize = 100;

/// Whether `value` nests deeper than `limit` levels (a scalar: 0 levels,
/// `[]`: 1). It allocates nothing and looks at most `limit + 1` levels
/// down, so a handler's value of any depth cannot overflow the stack.
pub fn nests_deeper_than(value: &Value, limit: usize) -> bool {
    let deeper = |child: &Value| limit == 0 || nests_deeper_than(child, limit - 1);
    match value {
        Value::Array(items) => limit == 0 || items.iter().any(deeper),
        Value::Object(fields) => limit == 0 || fields.values().any(deeper),
        _ => false,
    }
}

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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    #[serde(serialize_with = "rfc3339::serialize")]
    pub stored_at: DateTime<Utc>,
    /// When the lease (in progress) or the outcome (done) expires; the
    /// server enforces it, this copy is for readers.
    #[serde(serialize_with = "rfc3339::serialize")]
    pub expires_at: DateTime<Utc>,
    /// When the store wrote this record, by the store's own clock (a
    /// JetStream message's timestamp), for a record read from a store; not
    /// part of the stored JSON. The bucket counts the record's lifetime
    /// from here: the outcome cache serves it no longer than that.
    #[serde(skip)]
    pub written: Option<DateTime<Utc>>,
}

/// Two records are equal when they hold the same: `written` says when a
/// copy was read, not what it holds.
impl PartialEq for Record {
    fn eq(&self, other: &Record) -> bool {
        let Record {
            v,
            idem_key,
            intent_id,
            fingerprint,
            state,
            owner,
            attempt,
            result,
            stored_at,
            expires_at,
            written: _,
        } = self;
        *v == other.v
            && *idem_key == other.idem_key
            && *intent_id == other.intent_id
            && *fingerprint == other.fingerprint
            && *state == other.state
            && *owner == other.owner
            && *attempt == other.attempt
            && *result == other.result
            && *stored_at == other.stored_at
            && *expires_at == other.expires_at
    }
}

/// The time a record is stamped with: now, to the millisecond (records
/// are read by people and tools; finer digits only lengthen every copy).
pub(crate) fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// Timestamps as chrono's own `Serialize` writes them (RFC 3339, `Z`, as
/// many fraction digits as the value needs: 0, 3, 6 or 9), formatted by
/// chrono into one string first: serde_json escapes what it is handed,
/// and a timestamp written a few characters at a time cost a tenth of a
/// fresh intent's instructions (callgrind). Reading is chrono's.
pub(crate) mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn serialize_option<S: Serializer>(
        at: &Option<DateTime<Utc>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => serialize(at, serializer),
            None => serializer.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(depth: usize) -> Value {
        (0..depth).fold(json!(1), |inner, i| {
            if i % 2 == 0 {
                json!([inner])
            } else {
                json!({ "k": inner })
            }
        })
    }

    #[test]
    fn nesting_is_measured_to_the_limit_and_no_further() {
        assert!(!nests_deeper_than(&json!(1), 0));
        assert!(nests_deeper_than(&json!([]), 0));
        assert!(!nests_deeper_than(&json!([]), 1));
        assert!(!nests_deeper_than(
            &nested(MAX_OUTCOME_DEPTH),
            MAX_OUTCOME_DEPTH
        ));
        assert!(nests_deeper_than(
            &nested(MAX_OUTCOME_DEPTH + 1),
            MAX_OUTCOME_DEPTH
        ));
        // Far deeper than the limit: looked at only to the limit.
        assert!(nests_deeper_than(
            &nested(3 * MAX_OUTCOME_DEPTH),
            MAX_OUTCOME_DEPTH
        ));
        // The deepest branch counts, wherever it is.
        assert!(nests_deeper_than(
            &json!({"a": 1, "b": [nested(MAX_OUTCOME_DEPTH)]}),
            MAX_OUTCOME_DEPTH
        ));
    }

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

    #[test]
    fn timestamps_are_written_as_chrono_writes_them() {
        let cases = [
            "2026-11-30T13:00:00Z",
            "2026-11-30T13:00:00.120Z",
            "2026-02-28T23:59:59.000001Z",
            "2024-02-29T00:00:00.123456789Z",
            "1970-01-01T00:00:00Z",
            "1969-12-31T23:59:59.5Z",
            "9999-12-31T23:59:59.999Z",
        ];
        let year_10000 = DateTime::from_timestamp(253_402_300_800, 7).expect("in range");
        let parsed = cases.map(|case| case.parse::<DateTime<Utc>>().expect(case));
        for at in parsed.into_iter().chain([year_10000]) {
            let case = &at.to_string();
            let mut ours = Vec::new();
            rfc3339::serialize(&at, &mut serde_json::Serializer::new(&mut ours)).expect(case);
            let chrono = serde_json::to_vec(&at).expect(case);
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&chrono)
            );
            let back: DateTime<Utc> = serde_json::from_slice(&ours).expect(case);
            assert_eq!(back, at, "{case} reads back");
        }
        let stamped = now();
        assert_eq!(stamped.timestamp_subsec_nanos() % 1_000_000, 0);
    }
}

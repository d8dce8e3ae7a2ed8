//! Outcomes, the stored record, and the reply every copy of an intent gets.
//!
//! [`Outcome`] keeps the seed's tagged form (`{"status": ..., "data": ...}`)
//! so stored values stay readable by seed-era tools. [`Record`] is the one
//! JSON value per KV key; [`Reply`] is what goes back on the wire.

use async_nats::header::HeaderName;
use async_nats::HeaderMap;
use chrono::{DateTime, SubsecRound, Utc};
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
/// Reply header, `false` on an executed outcome the store did not take
/// before the lease was lost (PROTOCOL.md v1.2 §3): a retry may run the
/// key again.
pub const STORED_HEADER: &str = "Idem-Stored";

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

/// The reply published for one delivery of an intent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    /// An executed outcome the store did not take (`Idem-Stored: false`);
    /// false for stored outcomes and for refusals, which never run anything.
    #[serde(skip)]
    pub executed_unstored: bool,
}

/// The wire layout of a [`Reply`], over borrowed parts. A `Reply` and a
/// stored [`Record`] both serialise through it, so the layout is written
/// once and a record's outcome is encoded without being copied first.
#[derive(Serialize)]
struct ReplyView<'a> {
    /// Bare: a tenant's scope is the worker's business, not the caller's.
    idem_key: Option<&'a str>,
    intent_id: Option<&'a str>,
    replayed: bool,
    result: &'a Outcome,
    #[serde(serialize_with = "rfc3339::serialize_option")]
    stored_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "rfc3339::serialize_option")]
    expires_at: Option<DateTime<Utc>>,
}

impl<'a> ReplyView<'a> {
    /// A stored record's reply; `None` for a record without an outcome.
    fn of_record(record: &'a Record, replayed: bool) -> Option<ReplyView<'a>> {
        Some(ReplyView {
            idem_key: Some(record.idem_key.bare()),
            intent_id: Some(&record.intent_id),
            replayed,
            result: record.result.as_ref()?,
            stored_at: Some(record.stored_at),
            expires_at: Some(record.expires_at),
        })
    }
}

impl Serialize for Reply {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ReplyView {
            idem_key: self.idem_key.as_ref().map(IdempotencyKey::bare),
            intent_id: self.intent_id.as_deref(),
            replayed: self.replayed,
            result: &self.result,
            stored_at: self.stored_at,
            expires_at: self.expires_at,
        }
        .serialize(serializer)
    }
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
            executed_unstored: false,
        })
    }

    /// An executed outcome the store did not take before the lease was
    /// lost: answered as it is, with `Idem-Stored: false`.
    pub fn executed_unstored(
        idem_key: Option<IdempotencyKey>,
        intent_id: Option<String>,
        result: Outcome,
    ) -> Reply {
        Reply {
            executed_unstored: true,
            ..Reply::unstored(idem_key, intent_id, result)
        }
    }

    /// A reply carrying an outcome that was not stored: a refusal, or a
    /// transient error.
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
            executed_unstored: false,
        }
    }

    /// The reply headers: `Idem-Key`, `Idem-Replayed`, `Idem-Status`,
    /// `Idem-Error-Code` on errors, and `Idem-Stored: false` on an
    /// executed outcome that was not stored.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = reply_headers(
            self.idem_key.as_ref(),
            self.replayed,
            self.result.status(),
            self.result.error_code(),
        );
        if self.executed_unstored {
            headers.insert(HeaderName::from_static(STORED_HEADER), "false");
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

fn reply_headers(
    key: Option<&IdempotencyKey>,
    replayed: bool,
    status: &str,
    code: Option<&str>,
) -> HeaderMap {
    // Names from `from_static` are neither validated nor copied per reply.
    let mut headers = HeaderMap::new();
    if let Some(key) = key {
        headers.insert(HeaderName::from_static(KEY_HEADER), key.bare());
    }
    let replayed = if replayed { "true" } else { "false" };
    headers.insert(HeaderName::from_static(REPLAYED_HEADER), replayed);
    headers.insert(HeaderName::from_static(STATUS_HEADER), status);
    if let Some(code) = code {
        headers.insert(HeaderName::from_static(ERROR_CODE_HEADER), code);
    }
    headers
}

/// The reply of a stored outcome, encoded once: the executing delivery
/// answers with it (`replayed: false`) and the outcome cache keeps its
/// replay form (`replayed: true`), so every cached copy sends the same
/// bytes without building or serialising anything, and a cached outcome
/// costs memory about its encoded size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedReply {
    /// The key (`Idem-Key`).
    pub idem_key: IdempotencyKey,
    /// `Idem-Replayed`.
    pub replayed: bool,
    /// `Idem-Status`.
    pub status: &'static str,
    /// `Idem-Error-Code`, for `Error` outcomes.
    pub code: Option<Box<str>>,
    /// The reply JSON.
    pub body: bytes::Bytes,
}

/// Room for a reply's JSON without regrowing, for outcomes of a few
/// hundred bytes.
const REPLY_CAPACITY: usize = 512;

/// What `replayed` looks like in an encoded reply. serde_json writes a
/// struct's fields in order and escapes every `"` inside strings, so the
/// first occurrence of this (with its bare quotes) is the field itself.
const REPLAYED_TRUE: &[u8] = b",\"replayed\":true,";

impl EncodedReply {
    /// Encodes a stored record's outcome as its replay (`replayed: true`);
    /// `None` for a record without one.
    pub fn replay_of(record: &Record) -> Option<EncodedReply> {
        let reply = ReplyView::of_record(record, true)?;
        let mut body = Vec::with_capacity(REPLY_CAPACITY);
        serde_json::to_writer(&mut body, &reply).unwrap_or_default();
        // Kept for minutes: no spare capacity.
        body.shrink_to_fit();
        Some(EncodedReply {
            idem_key: record.idem_key.clone(),
            replayed: true,
            status: reply.result.status(),
            code: reply.result.error_code().map(Into::into),
            body: body.into(),
        })
    }

    /// The same reply with `replayed: false`, for the delivery that
    /// executed: one copy of the bytes instead of a second serialisation.
    pub fn as_executed(&self) -> EncodedReply {
        let body = match find(&self.body, REPLAYED_TRUE) {
            Some(at) if self.replayed => {
                let flag = at + REPLAYED_TRUE.len() - 5; // "true,"
                let mut body = Vec::with_capacity(self.body.len() + 1);
                body.extend_from_slice(&self.body[..flag]);
                body.extend_from_slice(b"false");
                body.extend_from_slice(&self.body[flag + 4..]);
                body.into()
            }
            _ => self.body.clone(),
        };
        EncodedReply {
            replayed: false,
            body,
            ..self.clone()
        }
    }

    /// The reply headers, as [`Reply::headers`] writes them.
    pub fn headers(&self) -> HeaderMap {
        reply_headers(
            Some(&self.idem_key),
            self.replayed,
            self.status,
            self.code.as_deref(),
        )
    }

    /// About how much memory this reply holds, for the cache's budget.
    pub fn size(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.body.len()
            + self.idem_key.as_str().len()
            + self.code.as_ref().map_or(0, |code| code.len())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// What a delivery is answered with: a reply built for it, or one encoded
/// once and shared.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Built for this delivery (refusals, unstored outcomes).
    Reply(Reply),
    /// A stored outcome's reply, encoded once.
    Encoded(std::sync::Arc<EncodedReply>),
}

impl Answer {
    /// The headers to publish.
    pub fn headers(&self) -> HeaderMap {
        match self {
            Answer::Reply(reply) => reply.headers(),
            Answer::Encoded(encoded) => encoded.headers(),
        }
    }

    /// The body to publish.
    pub fn to_bytes(&self) -> bytes::Bytes {
        match self {
            Answer::Reply(reply) => reply.to_bytes(),
            Answer::Encoded(encoded) => encoded.body.clone(),
        }
    }

    /// The key, when one could be derived.
    pub fn idem_key(&self) -> Option<&IdempotencyKey> {
        match self {
            Answer::Reply(reply) => reply.idem_key.as_ref(),
            Answer::Encoded(encoded) => Some(&encoded.idem_key),
        }
    }

    /// The outcome's status (`Success`, `Error`, ...).
    pub fn status(&self) -> &'static str {
        match self {
            Answer::Reply(reply) => reply.result.status(),
            Answer::Encoded(encoded) => encoded.status,
        }
    }

    /// The error code, for `Error` outcomes.
    pub fn error_code(&self) -> Option<&str> {
        match self {
            Answer::Reply(reply) => reply.result.error_code(),
            Answer::Encoded(encoded) => encoded.code.as_deref(),
        }
    }

    /// Whether this answer carries a stored outcome (not a refusal, a
    /// transient error or an outcome the store did not take).
    pub fn is_stored(&self) -> bool {
        matches!(self, Answer::Encoded(_))
    }

    /// Whether this copy is answered with an outcome it did not execute.
    pub fn replayed(&self) -> bool {
        match self {
            Answer::Reply(reply) => reply.replayed,
            Answer::Encoded(encoded) => encoded.replayed,
        }
    }
}

impl From<Reply> for Answer {
    fn from(reply: Reply) -> Self {
        Answer::Reply(reply)
    }
}

/// The time a record is stamped with: now, to the millisecond (records
/// are read by people and tools; finer digits only lengthen every copy).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// Timestamps written exactly as chrono's own `Serialize` writes them
/// (RFC 3339, `Z`, as many fraction digits as the value needs: 0, 3, 6 or
/// 9), but in one piece. chrono's `Display` writes a timestamp a few
/// characters at a time and serde_json escapes each piece as it comes: with
/// two timestamps in every record and reply, that was about a tenth of the
/// instructions a fresh intent cost (callgrind). Reading is chrono's.
mod rfc3339 {
    use std::time::{Duration, SystemTime};

    use chrono::{DateTime, Utc};
    use serde::{Serialize, Serializer};

    /// First second humantime cannot write (year 10000).
    const YEAR_10000: i64 = 253_402_300_800;

    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        let secs = at.timestamp();
        let nanos = at.timestamp_subsec_nanos();
        // Before 1970, from year 10000, or a leap second: chrono's way.
        let (Ok(whole), true) = (
            u64::try_from(secs),
            secs < YEAR_10000 && nanos < 1_000_000_000,
        ) else {
            return at.serialize(serializer);
        };
        let time = SystemTime::UNIX_EPOCH + Duration::new(whole, nanos);
        let text = if nanos == 0 {
            humantime::format_rfc3339_seconds(time)
        } else if nanos.is_multiple_of(1_000_000) {
            humantime::format_rfc3339_millis(time)
        } else if nanos.is_multiple_of(1_000) {
            humantime::format_rfc3339_micros(time)
        } else {
            humantime::format_rfc3339_nanos(time)
        };
        serializer.collect_str(&text)
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
    fn an_encoded_replay_and_its_executed_form_match_the_built_replies() {
        let now = Utc::now();
        let record = Record {
            v: RECORD_VERSION,
            idem_key: IdempotencyKey::generate("enc", "ep", 1),
            // Text that looks like the field must not fool the splice.
            intent_id: r#"x","replayed":true,"y"#.to_owned(),
            fingerprint: "fp".to_owned(),
            state: RecordState::Done,
            owner: "o".to_owned(),
            attempt: 1,
            result: Some(Outcome::error("422", "no")),
            stored_at: now,
            expires_at: now,
            written: None,
        };
        let replay = EncodedReply::replay_of(&record).expect("an outcome");
        let executed = replay.as_executed();
        for (encoded, replayed) in [(&replay, true), (&executed, false)] {
            let built = Reply::from_record(&record, replayed).expect("an outcome");
            let decoded: Reply = serde_json::from_slice(&encoded.body).expect("JSON");
            assert_eq!(decoded, built);
            assert_eq!(encoded.headers(), built.headers());
            assert_eq!(encoded.replayed, replayed);
        }
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

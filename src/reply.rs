//! What goes back on the wire: the [`Reply`] every delivery of an intent
//! gets (docs/contract.md §3), its headers, and `EncodedReply`, a reply
//! encoded once for sending, the one place replies are serialised.

use std::sync::Arc;

use async_nats::header::HeaderName;
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::key::IdempotencyKey;
use crate::outcome::{rfc3339, Outcome, Record};

/// Reply header: the idempotency key.
pub const KEY_HEADER: &str = "Idem-Key";
/// Reply header: `true` when the outcome came from the store.
pub const REPLAYED_HEADER: &str = "Idem-Replayed";
/// Reply header (and upstream reply header): the outcome's status.
pub const STATUS_HEADER: &str = "Idem-Status";
/// Reply header: the error code of an `Error` outcome.
pub const ERROR_CODE_HEADER: &str = "Idem-Error-Code";
/// Reply header, `false` on an executed outcome the store did not take
/// before the lease was lost (docs/contract.md v1.2 §3): a retry may run the
/// key again.
pub const STORED_HEADER: &str = "Idem-Stored";

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

/// The wire layout of a reply, over borrowed parts. A [`Reply`] and a
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

    fn of_reply(reply: &'a Reply) -> ReplyView<'a> {
        ReplyView {
            idem_key: reply.idem_key.as_ref().map(IdempotencyKey::bare),
            intent_id: reply.intent_id.as_deref(),
            replayed: reply.replayed,
            result: &reply.result,
            stored_at: reply.stored_at,
            expires_at: reply.expires_at,
        }
    }

    /// The JSON bytes. A view holds only strings, numbers, booleans,
    /// timestamps and `Value`s: serialising it cannot fail.
    fn to_bytes(&self) -> Bytes {
        self.encode().into()
    }

    /// [`to_bytes`](Self::to_bytes) for a reply the outcome cache may keep
    /// for minutes: without the room its buffer did not use (shrinking in
    /// place may keep the whole block).
    fn to_kept_bytes(&self) -> Bytes {
        let body = self.encode();
        if body.capacity() - body.len() > body.len() / 8 {
            return Bytes::copy_from_slice(&body);
        }
        body.into()
    }

    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(REPLY_CAPACITY);
        serde_json::to_writer(&mut body, self).unwrap_or_default();
        body
    }
}

/// Room for a reply's JSON without regrowing, for outcomes of a few
/// hundred bytes.
const REPLY_CAPACITY: usize = 512;

impl Serialize for Reply {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ReplyView::of_reply(self).serialize(serializer)
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
        EncodedReply::of_reply(self).headers()
    }

    /// The reply as JSON bytes.
    pub fn to_bytes(&self) -> Bytes {
        ReplyView::of_reply(self).to_bytes()
    }
}

/// A reply encoded for sending: its JSON and what its headers say. Every
/// answer a worker publishes is one; a stored outcome's replay form
/// (`replayed: true`) is what the outcome cache keeps and sends to every
/// copy without building or serialising anything, and it costs memory
/// about its encoded size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EncodedReply {
    /// `Idem-Key`, when a key could be derived.
    pub(crate) idem_key: Option<IdempotencyKey>,
    /// `Idem-Replayed`.
    pub(crate) replayed: bool,
    /// `Idem-Status`, and `Idem-Error-Code` for an `Error`.
    pub(crate) status: Status,
    /// Whether it carries a stored outcome (not a refusal, a transient
    /// error or an outcome the store did not take).
    pub(crate) stored: bool,
    /// `Idem-Stored: false`: an executed outcome the store did not take.
    pub(crate) executed_unstored: bool,
    /// The reply JSON.
    pub(crate) body: Bytes,
}

impl EncodedReply {
    /// A stored record's outcome as one delivery's answer: `replayed`
    /// false for the delivery that executed it, true for every other copy.
    /// `None` for a record without an outcome.
    pub(crate) fn of_record(record: &Record, replayed: bool) -> Option<Arc<EncodedReply>> {
        let view = ReplyView::of_record(record, replayed)?;
        Some(Arc::new(EncodedReply {
            idem_key: Some(record.idem_key.clone()),
            replayed,
            status: Status::of(view.result),
            stored: true,
            executed_unstored: false,
            body: view.to_kept_bytes(),
        }))
    }

    /// A reply built for one delivery (a refusal, an unstored outcome).
    pub(crate) fn of_reply(reply: &Reply) -> EncodedReply {
        EncodedReply {
            idem_key: reply.idem_key.clone(),
            replayed: reply.replayed,
            status: Status::of(&reply.result),
            stored: false,
            executed_unstored: reply.executed_unstored,
            body: ReplyView::of_reply(reply).to_bytes(),
        }
    }

    /// The reply headers.
    pub(crate) fn headers(&self) -> HeaderMap {
        // Names from `from_static` are neither validated nor copied per reply.
        let mut headers = HeaderMap::new();
        if let Some(key) = &self.idem_key {
            headers.insert(HeaderName::from_static(KEY_HEADER), key.bare());
        }
        let replayed = if self.replayed { "true" } else { "false" };
        headers.insert(HeaderName::from_static(REPLAYED_HEADER), replayed);
        headers.insert(HeaderName::from_static(STATUS_HEADER), self.status.as_str());
        if let Some(code) = self.status.code() {
            headers.insert(HeaderName::from_static(ERROR_CODE_HEADER), code);
        }
        if self.executed_unstored {
            headers.insert(HeaderName::from_static(STORED_HEADER), "false");
        }
        headers
    }

    /// The memory this reply holds in an `Arc`, for the cache's budget:
    /// the `Arc`'s allocation, the body's (and the header `Bytes` adds to
    /// it once shared), the key's and the error code's (the allocator's
    /// rounding to its size classes aside).
    pub(crate) fn size(&self) -> usize {
        /// An `Arc`'s two counts.
        const ARC_COUNTS: usize = 16;
        /// What `Bytes` allocates when a vector's bytes are first shared.
        const BYTES_SHARED: usize = 24;
        ARC_COUNTS
            + std::mem::size_of::<Self>()
            + self.body.len()
            + BYTES_SHARED
            + self.idem_key.as_ref().map_or(0, |key| key.as_str().len())
            + self.status.code().map_or(0, str::len)
    }
}

/// `Idem-Status`, with `Idem-Error-Code` for an `Error`: one field, the
/// size of the code's pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Status {
    /// `Success`.
    Success,
    /// `Error`, with its code.
    Error(Box<str>),
    /// `Timeout`.
    Timeout,
    /// `Killed`.
    Killed,
}

impl Status {
    /// An outcome's status.
    pub(crate) fn of(outcome: &crate::outcome::Outcome) -> Status {
        use crate::outcome::Outcome;
        match outcome {
            Outcome::Success(_) => Status::Success,
            Outcome::Error { code, .. } => Status::Error(code.as_str().into()),
            Outcome::Timeout => Status::Timeout,
            Outcome::Killed => Status::Killed,
        }
    }

    /// The `status` tag as text (as [`Outcome::status`](crate::outcome::Outcome::status)).
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Status::Success => "Success",
            Status::Error(_) => "Error",
            Status::Timeout => "Timeout",
            Status::Killed => "Killed",
        }
    }

    /// The error code, for an `Error`.
    pub(crate) fn code(&self) -> Option<&str> {
        match self {
            Status::Error(code) => Some(code),
            _ => None,
        }
    }
}

impl From<Reply> for Arc<EncodedReply> {
    fn from(reply: Reply) -> Self {
        Arc::new(EncodedReply::of_reply(&reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{RecordState, RECORD_VERSION};

    #[test]
    fn a_records_encodings_are_its_built_replies() {
        let now = Utc::now();
        let record = Record {
            v: RECORD_VERSION,
            idem_key: IdempotencyKey::generate("enc", "ep", 1),
            intent_id: r#"x","replayed":true,"y"#.to_owned(),
            fingerprint: "fp".to_owned(),
            state: RecordState::Done,
            owner: "o".to_owned(),
            attempt: 1,
            result: Some(Outcome::error("E", "m")),
            stored_at: now,
            expires_at: now,
            written: None,
        };
        for replayed in [true, false] {
            let encoded = EncodedReply::of_record(&record, replayed).expect("an outcome");
            let built = Reply::from_record(&record, replayed).expect("an outcome");
            assert_eq!(encoded.body, built.to_bytes(), "replayed {replayed}");
            assert_eq!(encoded.headers(), built.headers(), "replayed {replayed}");
            assert!(encoded.stored);
            let back: Reply = serde_json::from_slice(&encoded.body).expect("JSON");
            assert_eq!(back, built);
        }
        let unstored = Reply::executed_unstored(None, None, Outcome::Timeout);
        let headers = EncodedReply::of_reply(&unstored).headers();
        assert_eq!(
            headers.get(STORED_HEADER).map(|v| v.as_str()),
            Some("false")
        );
    }
}

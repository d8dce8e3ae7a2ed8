//! The intent envelope: decode, validate, derive the key, fingerprint.
//!
//! Everything here is pure: a message's subject, headers and payload go in,
//! a validated [`Intent`] or an [`Invalid`] explaining why comes out. Limits
//! are enforced before anything is stored, so a bad message costs one parse
//! and never a KV write.

use async_nats::HeaderMap;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::key::{push_hex, IdempotencyKey, KeyError};

/// Header that overrides the derived key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";
/// Header that names the reply subject when the message has none.
pub const REPLY_TO_HEADER: &str = "Idem-Reply-To";

/// Longest accepted value of a string field, in bytes.
pub const MAX_FIELD_BYTES: usize = 256;
/// Longest accepted capability, in bytes.
pub const MAX_CAPABILITY_BYTES: usize = 64;

/// One validated intent, with its key and fingerprint already derived.
#[derive(Debug, Clone, PartialEq)]
pub struct Intent {
    /// The idempotency key: the header's, or derived from the body.
    pub key: IdempotencyKey,
    /// The caller's id for this intent.
    pub intent_id: String,
    /// Who asks.
    pub actor: String,
    /// The episode or session.
    pub episode: String,
    /// Step within the episode (0 when absent).
    pub step_idx: u32,
    /// Run id; when present the key derives from it instead of intent id and actor.
    pub run_id: Option<String>,
    /// What to run: the body's field, else the subject's last token.
    pub capability: String,
    /// The handler's input (`null` when absent).
    pub params: Value,
    /// Requested outcome lifetime in seconds, before clamping to the worker's `--ttl`.
    pub ttl_secs: Option<u64>,
    /// Where to reply when the message itself has no reply subject
    /// (`Idem-Reply-To` header, else the body's `reply_to`).
    pub reply_to: Option<String>,
    /// Hex SHA-256 of the canonical `{capability, key_inputs, params}`.
    pub fingerprint: String,
}

/// Why an intent was refused. Tests and the worker match on the variant;
/// [`IntentError::code`] is its wire code (the worker's other refusals map
/// in `Rejection::code`, `verdict.rs`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntentError {
    /// The payload exceeds `--max-payload`.
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Payload size in bytes.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The payload is not UTF-8.
    #[error("payload is not UTF-8")]
    NotUtf8,
    /// The payload is not JSON.
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    /// The payload is JSON but not an object.
    #[error("payload is not a JSON object")]
    NotObject,
    /// A required field is absent.
    #[error("required field `{0}` is missing")]
    Missing(&'static str),
    /// A field has the wrong JSON type.
    #[error("field `{field}` must be {expected}")]
    WrongType {
        /// The field's name.
        field: &'static str,
        /// What was expected, in words.
        expected: &'static str,
    },
    /// A field's value is outside its range.
    #[error("field `{field}` is out of range: {reason}")]
    OutOfRange {
        /// The field's name.
        field: &'static str,
        /// Why, in words.
        reason: &'static str,
    },
    /// The `Idempotency-Key` header is malformed.
    #[error(transparent)]
    InvalidKey(#[from] KeyError),
    /// `--tenant-token` names no tenant in this subject: the token is
    /// missing or not a valid KV key token.
    #[error(
        "token {token} of subject `{subject}` is not a tenant name (1 or more of [A-Za-z0-9_=-])"
    )]
    InvalidTenant {
        /// The `--tenant-token` position.
        token: usize,
        /// The intent's subject.
        subject: String,
    },
    /// A reply target the worker must not publish to (see `reply_policy`).
    #[error("reply target `{subject}` refused: {reason}")]
    ReplyTargetRefused {
        /// The refused subject.
        subject: String,
        /// Why, in words.
        reason: &'static str,
    },
}

impl IntentError {
    /// The wire code of this refusal: `PAYLOAD_TOO_LARGE`, `INVALID_KEY`, or
    /// `INVALID_INTENT` for everything else wrong with a message.
    pub fn code(&self) -> &'static str {
        match self {
            IntentError::PayloadTooLarge { .. } => crate::codes::PAYLOAD_TOO_LARGE,
            IntentError::InvalidKey(_) => crate::codes::INVALID_KEY,
            _ => crate::codes::INVALID_INTENT,
        }
    }
}

/// A refused intent, with whatever could still be read for the reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    /// Why it was refused.
    pub error: IntentError,
    /// The intent id, if it could be read.
    pub intent_id: Option<String>,
    /// The key, if it could be derived.
    pub idem_key: Option<IdempotencyKey>,
    /// Where to reply when the message has no reply subject, if readable.
    pub reply_to: Option<String>,
}

/// Decoding limits taken from the worker's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted payload in bytes (`--max-payload`).
    pub max_payload: usize,
    /// `--tenant-token N`: the N-th subject token (1-based) names the
    /// intent's tenant, and scopes its key (docs/contract.md v1.1 §5).
    pub tenant_token: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tenant_token: None,
            max_payload: 1024 * 1024,
        }
    }
}

/// A hex SHA-256 fingerprint as numbers; `None` for anything else (never
/// cached, never matched).
pub(crate) type Fingerprint = [u64; 4];

/// The fingerprint's hex digits as [`Fingerprint`] bits.
pub(crate) fn fingerprint_bits(hex: &str) -> Option<Fingerprint> {
    if hex.len() != 64 {
        return None;
    }
    let mut bits = [0; 4];
    for (i, part) in bits.iter_mut().enumerate() {
        *part = u64::from_str_radix(hex.get(i * 16..(i + 1) * 16)?, 16).ok()?;
    }
    Some(bits)
}

/// The reply target a message names, read without decoding the intent:
/// `Idem-Reply-To`, else the body's `reply_to` (its other fields are only
/// skipped over). For answering a message refused before it is decoded
/// (`OVERLOADED`); the caller vets the target as for any intent.
pub(crate) fn named_reply_target(headers: Option<&HeaderMap>, payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named<'a> {
        #[serde(borrow, default)]
        reply_to: Option<std::borrow::Cow<'a, str>>,
    }
    if let Some(header) = headers.and_then(|h| h.get(REPLY_TO_HEADER)) {
        return Some(header.as_str().to_owned());
    }
    let named: Named<'_> = serde_json::from_slice(payload).ok()?;
    named.reply_to.map(std::borrow::Cow::into_owned)
}

impl Intent {
    /// Decodes and validates one message into an intent.
    pub fn decode(
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &[u8],
        limits: Limits,
    ) -> Result<Intent, Box<Invalid>> {
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        let header_reply_to = header(REPLY_TO_HEADER).map(str::to_owned);
        let header_reply_to_ok = header_reply_to.clone().filter(|s| is_publish_subject(s));
        let invalid = |error, intent_id, reply_to| {
            Box::new(Invalid {
                error,
                intent_id,
                idem_key: None,
                reply_to,
            })
        };
        if payload.len() > limits.max_payload {
            let error = IntentError::PayloadTooLarge {
                size: payload.len(),
                max: limits.max_payload,
            };
            return Err(invalid(error, None, header_reply_to_ok));
        }
        let text = std::str::from_utf8(payload)
            .map_err(|_| invalid(IntentError::NotUtf8, None, header_reply_to_ok.clone()))?;
        let value: Value = serde_json::from_str(text).map_err(|e| {
            invalid(
                IntentError::NotJson(e.to_string()),
                None,
                header_reply_to_ok.clone(),
            )
        })?;
        let Value::Object(mut body) = value else {
            return Err(invalid(IntentError::NotObject, None, header_reply_to_ok));
        };

        // Read what a reply needs first, so even a refused intent is answered
        // where it asked to be.
        let intent_id = string_field(&body, "intent_id", 1).ok().flatten();
        let reply_to = match header_reply_to {
            Some(subject) => Some(subject),
            None => optional_string(&body, "reply_to")
                .ok()
                .flatten()
                .map(str::to_owned),
        };
        let header_key = header(IDEMPOTENCY_KEY_HEADER).map(IdempotencyKey::parse);
        let mut partial = Invalid {
            error: IntentError::NotObject,
            intent_id: intent_id.map(str::to_owned),
            idem_key: header_key.clone().and_then(Result::ok),
            reply_to: reply_to.clone().filter(|s| is_publish_subject(s)),
        };

        let result = Self::validate(subject, &mut body, header_key, reply_to);
        let mut intent = result.map_err(|error| {
            partial.error = error;
            Box::new(partial)
        })?;
        if let Some(token) = limits.tenant_token {
            let tenant = token
                .checked_sub(1)
                .and_then(|index| subject.split('.').nth(index));
            match tenant.and_then(|tenant| intent.key.in_tenant(tenant)) {
                Some(scoped) => intent.key = scoped,
                None => {
                    return Err(Box::new(Invalid {
                        error: IntentError::InvalidTenant {
                            token,
                            subject: subject.to_owned(),
                        },
                        intent_id: Some(intent.intent_id),
                        idem_key: Some(intent.key),
                        reply_to: intent.reply_to,
                    }))
                }
            }
        }
        Ok(intent)
    }

    fn validate(
        subject: &str,
        body: &mut Map<String, Value>,
        header_key: Option<Result<IdempotencyKey, KeyError>>,
        reply_to: Option<String>,
    ) -> Result<Intent, IntentError> {
        let intent_id = required(string_field(body, "intent_id", 1)?, "intent_id")?.to_owned();
        let actor = required(string_field(body, "actor", 1)?, "actor")?.to_owned();
        let episode = required(string_field(body, "episode", 0)?, "episode")?.to_owned();
        let run_id = string_field(body, "run_id", 1)?.map(str::to_owned);
        let step_idx = match present(body, "step_idx") {
            None => 0,
            Some(value) => {
                let n = value.as_u64().ok_or(IntentError::WrongType {
                    field: "step_idx",
                    expected: "an integer from 0 to 4294967295",
                })?;
                u32::try_from(n).map_err(|_| IntentError::OutOfRange {
                    field: "step_idx",
                    reason: "must be at most 4294967295",
                })?
            }
        };
        let ttl_secs = match present(body, "ttl_secs") {
            None => None,
            Some(value) => {
                let n = value.as_u64().ok_or(IntentError::WrongType {
                    field: "ttl_secs",
                    expected: "a positive integer",
                })?;
                if n == 0 {
                    return Err(IntentError::OutOfRange {
                        field: "ttl_secs",
                        reason: "must be at least 1",
                    });
                }
                Some(n)
            }
        };
        let capability = match present(body, "capability") {
            Some(Value::String(capability)) => capability.clone(),
            Some(_) => {
                return Err(IntentError::WrongType {
                    field: "capability",
                    expected: "a string",
                })
            }
            None => subject.rsplit('.').next().unwrap_or_default().to_owned(),
        };
        if !is_token(&capability) {
            return Err(IntentError::OutOfRange {
                field: "capability",
                reason: "must be 1 to 64 of [A-Za-z0-9_-]",
            });
        }
        if let Some(subject) = &reply_to {
            if !is_publish_subject(subject) {
                return Err(IntentError::OutOfRange {
                    field: "reply_to",
                    reason: "must be a NATS subject without wildcards",
                });
            }
        }
        let params = body.remove("params").unwrap_or(Value::Null);

        let (key, key_inputs) = match header_key {
            Some(parsed) => {
                let key = parsed?;
                (
                    key.clone(),
                    KeyInputs::Header {
                        idempotency_key: key,
                    },
                )
            }
            None => match &run_id {
                Some(run_id) => (
                    IdempotencyKey::generate(run_id, &episode, step_idx),
                    KeyInputs::Run {
                        episode: &episode,
                        run_id,
                        step_idx,
                    },
                ),
                None => (
                    IdempotencyKey::from_intent_metadata(
                        &intent_id,
                        &actor,
                        &episode,
                        Some(step_idx),
                    ),
                    KeyInputs::Metadata {
                        actor: &actor,
                        episode: &episode,
                        intent_id: &intent_id,
                        step_idx,
                    },
                ),
            },
        };
        let fingerprint = fingerprint(&Canonical {
            capability: &capability,
            key_inputs,
            params: &params,
        });

        Ok(Intent {
            key,
            intent_id,
            actor,
            episode,
            step_idx,
            run_id,
            capability,
            params,
            ttl_secs,
            reply_to,
            fingerprint,
        })
    }
}

/// What the fingerprint covers: `{capability, key_inputs, params}`.
///
/// The canonical JSON is sorted by key with no white space. Fields are
/// declared in sorted order, so serde writes them sorted; `params` is a
/// `Value` whose maps are sorted already (serde_json without
/// `preserve_order`). Borrowing avoids copying the params per message.
#[derive(Serialize)]
struct Canonical<'a> {
    capability: &'a str,
    key_inputs: KeyInputs<'a>,
    params: &'a Value,
}

/// Exactly the fields the key was derived from, with defaults applied.
#[derive(Serialize)]
#[serde(untagged)]
enum KeyInputs<'a> {
    Header {
        idempotency_key: IdempotencyKey,
    },
    Metadata {
        actor: &'a str,
        episode: &'a str,
        intent_id: &'a str,
        step_idx: u32,
    },
    Run {
        episode: &'a str,
        run_id: &'a str,
        step_idx: u32,
    },
}

/// A digest of everything [`Intent::decode`] reads of a message: the
/// subject, the headers that feed the key and the reply target, and the
/// payload, each length-prefixed (and absent headers told apart from
/// empty ones). Messages with equal digests decode to the same intent, so
/// a copy of one already answered can be answered before it is decoded.
pub fn copy_digest(subject: &str, headers: Option<&HeaderMap>, payload: &[u8]) -> CopyDigest {
    let mut hash = Sha256::new();
    let mut part = |bytes: Option<&[u8]>| match bytes {
        None => hash.update([0]),
        Some(bytes) => {
            hash.update([1]);
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        }
    };
    part(Some(subject.as_bytes()));
    for name in [IDEMPOTENCY_KEY_HEADER, REPLY_TO_HEADER] {
        part(
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().as_bytes()),
        );
    }
    part(Some(payload));
    hash.finalize().into()
}

/// What [`copy_digest`] returns: SHA-256, whole.
pub type CopyDigest = [u8; 32];

/// SHA-256 (hex) of the canonical JSON.
fn fingerprint(canonical: &Canonical<'_>) -> String {
    sha256_hex_of_json(canonical)
}

/// SHA-256 (hex) of `value`'s JSON, which goes straight into the hash,
/// never into a buffer. For values that cannot fail to serialise
/// (strings, numbers, `Value`s): a failure would hash what was written.
pub(crate) fn sha256_hex_of_json<T: Serialize + ?Sized>(value: &T) -> String {
    let mut hasher = Sha256::new();
    serde_json::to_writer(&mut hasher, value).unwrap_or_default();
    let digest = hasher.finalize();
    let mut hex = String::with_capacity(2 * digest.len());
    for byte in digest {
        push_hex(&mut hex, byte);
    }
    hex
}

/// A field that is present and not `null`.
fn present<'a>(body: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    body.get(field).filter(|v| !v.is_null())
}

fn required<T>(value: Option<T>, field: &'static str) -> Result<T, IntentError> {
    value.ok_or(IntentError::Missing(field))
}

fn optional_string<'a>(
    body: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, IntentError> {
    match present(body, field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(IntentError::WrongType {
            field,
            expected: "a string",
        }),
    }
}

/// A string field of `min..=256` bytes, or `None` when absent.
fn string_field<'a>(
    body: &'a Map<String, Value>,
    field: &'static str,
    min: usize,
) -> Result<Option<&'a str>, IntentError> {
    let Some(s) = optional_string(body, field)? else {
        return Ok(None);
    };
    if s.len() < min {
        return Err(IntentError::OutOfRange {
            field,
            reason: "must not be empty",
        });
    }
    if s.len() > MAX_FIELD_BYTES {
        return Err(IntentError::OutOfRange {
            field,
            reason: "must be at most 256 bytes",
        });
    }
    Ok(Some(s))
}

/// A NATS token as the contract defines a capability: `[A-Za-z0-9_-]{1,64}`.
///
/// Because a capability is substituted into the `--forward` template, this
/// check is what keeps a caller from injecting subject tokens or wildcards.
pub fn is_token(text: &str) -> bool {
    (1..=MAX_CAPABILITY_BYTES).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A subject one can publish to: non-empty tokens, no wildcards, no white space.
pub fn is_publish_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.bytes().any(|b| b.is_ascii_whitespace() || b == 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The contract's definition, written out with `json!`: SHA-256 over the
    /// sorted, compact JSON of `{capability, key_inputs, params}`.
    fn reference(capability: &str, key_inputs: Value, params: Value) -> String {
        let canonical =
            json!({"capability": capability, "key_inputs": key_inputs, "params": params});
        let digest = Sha256::digest(serde_json::to_vec(&canonical).expect("json"));
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn fingerprint_is_the_canonical_json_of_the_contract() {
        let params = json!({"z": [1, {"b": 2, "a": 1}], "a": null});
        let meta = Intent::decode(
            "intents.x",
            None,
            json!({"intent_id":"i","actor":"a","episode":"e","step_idx":3,"params":params})
                .to_string()
                .as_bytes(),
            Limits::default(),
        )
        .expect("valid");
        let inputs = json!({"intent_id":"i","actor":"a","episode":"e","step_idx":3});
        assert_eq!(meta.fingerprint, reference("x", inputs, params.clone()));

        let run =
            decode(r#"{"intent_id":"i","actor":"a","episode":"e","run_id":"r"}"#).expect("valid");
        let inputs = json!({"run_id":"r","episode":"e","step_idx":0});
        assert_eq!(run.fingerprint, reference("echo", inputs, Value::Null));

        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_KEY_HEADER, "idem_F52983C9C6E4FB21");
        let body = br#"{"intent_id":"i","actor":"a","episode":"e"}"#;
        let keyed =
            Intent::decode("intents.echo", Some(&headers), body, Limits::default()).expect("valid");
        let inputs = json!({"idempotency_key": "idem_f52983c9c6e4fb21"});
        assert_eq!(keyed.fingerprint, reference("echo", inputs, Value::Null));
    }

    fn decode(payload: &str) -> Result<Intent, Box<Invalid>> {
        Intent::decode("intents.echo", None, payload.as_bytes(), Limits::default())
    }

    #[test]
    fn absent_and_zero_step_idx_are_the_same_intent() {
        let a = decode(r#"{"intent_id":"i","actor":"a","episode":"e"}"#).expect("valid");
        let b = decode(r#"{"intent_id":"i","actor":"a","episode":"e","step_idx":0,"x":1}"#)
            .expect("valid");
        assert_eq!(a.key, b.key);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.capability, "echo");
    }

    #[test]
    fn params_order_does_not_change_the_fingerprint() {
        let a = decode(r#"{"intent_id":"i","actor":"a","episode":"e","params":{"x":1,"y":2}}"#)
            .expect("valid");
        let b = decode(r#"{"intent_id":"i","actor":"a","episode":"e","params":{"y":2,"x":1}}"#)
            .expect("valid");
        assert_eq!(a.fingerprint, b.fingerprint);
    }

    #[test]
    fn wildcard_reply_to_is_refused() {
        let err = decode(r#"{"intent_id":"i","actor":"a","episode":"e","reply_to":"x.>"}"#)
            .expect_err("invalid");
        assert!(matches!(
            err.error,
            IntentError::OutOfRange {
                field: "reply_to",
                ..
            }
        ));
        assert_eq!(err.intent_id.as_deref(), Some("i"));
    }
}

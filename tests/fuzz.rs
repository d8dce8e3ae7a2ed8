//! Property fuzzing of every input decoder, on stable Rust (proptest):
//! intent payloads and the headers the worker reads, stored records read
//! back from a bucket anyone may write to, upstream replies, purge
//! notices, and the reply encoder. Properties: no panic on any input; a
//! valid intent decodes to the same key and fingerprint however its JSON
//! is written; every encoded reply is JSON that reads back to the same
//! reply. `tests/data/fuzz-corpus/` holds the interesting cases found or
//! known, each named by the code it must get (`ok-` when valid).
//!
//! No NATS here: these are the pure decoders the worker runs per message.

use std::path::Path;

use async_nats::HeaderMap;
use bytes::Bytes;
use idemq::intent::{Intent, IntentError, Limits};
use idemq::outcome::Record;
use idemq::{IdempotencyKey, Outcome, Reply};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Cases per property; each is cheap (microseconds), so thousands run in
/// well under a second per property.
const CASES: u32 = 3000;

fn limits(tenant_token: Option<usize>) -> Limits {
    Limits {
        max_payload: 4096,
        tenant_token,
    }
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// An intent-shaped object whose fields are sometimes right, sometimes of
/// the wrong type or out of range, sometimes missing.
fn near_intent() -> impl Strategy<Value = Value> {
    let field = |valid: BoxedStrategy<Value>| {
        prop_oneof![
            3 => valid.prop_map(Some),
            1 => json_value().prop_map(Some),
            1 => Just(None),
        ]
    };
    let text = |max: usize| {
        proptest::string::string_regex(&format!("[a-z0-9:]{{0,{max}}}"))
            .expect("regex")
            .prop_map(Value::String)
            .boxed()
    };
    (
        field(text(300)),
        field(text(300)),
        field(text(300)),
        field(any::<u32>().prop_map(Value::from).boxed()),
        field(text(70)),
        field(json_value().boxed()),
        field((0u64..100_000).prop_map(Value::from).boxed()),
        field("[a-z.>*]{0,12}".prop_map(Value::String).boxed()),
        field(text(300)),
    )
        .prop_map(
            |(intent_id, actor, episode, step_idx, capability, params, ttl, reply_to, run_id)| {
                let mut object = Map::new();
                for (name, value) in [
                    ("intent_id", intent_id),
                    ("actor", actor),
                    ("episode", episode),
                    ("step_idx", step_idx),
                    ("capability", capability),
                    ("params", params),
                    ("ttl_secs", ttl),
                    ("reply_to", reply_to),
                    ("run_id", run_id),
                ] {
                    if let Some(value) = value {
                        object.insert(name.to_owned(), value);
                    }
                }
                Value::Object(object)
            },
        )
}

/// The headers the worker reads, with arbitrary printable values.
fn headers() -> impl Strategy<Value = Option<HeaderMap>> {
    proptest::option::of(vec(
        (
            prop_oneof![
                Just("Idempotency-Key"),
                Just("Idem-Reply-To"),
                Just("Nats-Msg-Id"),
                Just("X-Other"),
            ],
            prop_oneof!["idem_[0-9a-fA-F]{16}".boxed(), "[ -~]{0,40}".boxed(),],
        ),
        0..4,
    ))
    .prop_map(|pairs| {
        pairs.map(|pairs| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(name, value.as_str());
            }
            headers
        })
    })
}

fn subject() -> impl Strategy<Value = String> {
    "intents(\\.[a-zA-Z0-9_+=-]{1,6}){1,3}"
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        json_value().prop_map(Outcome::Success),
        ("[A-Z_0-9]{1,12}", ".{0,20}").prop_map(|(code, message)| Outcome::error(code, message)),
        Just(Outcome::Timeout),
        Just(Outcome::Killed),
    ]
}

/// Writes a JSON object with its keys in reverse order and white space:
/// the same intent, other bytes.
fn rewritten(value: &Value) -> String {
    let Value::Object(map) = value else {
        return value.to_string();
    };
    let fields: Vec<String> = map
        .iter()
        .rev()
        .map(|(k, v)| format!("\n  {} : {}", Value::String(k.clone()), v))
        .collect();
    format!("{{{} }}", fields.join(" ,"))
}

proptest! {
    // Failures shrink to a readable case printed by the test; interesting
    // ones go into the corpus by hand, not into files proptest writes.
    #![proptest_config(ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_bytes_with_any_headers_decode_without_panic(
        payload in vec(any::<u8>(), 0..600),
        subject in subject(),
        headers in headers(),
        tenant in proptest::option::of(0usize..5),
    ) {
        let _ = Intent::decode(&subject, headers.as_ref(), &payload, limits(tenant));
    }

    #[test]
    fn near_valid_intents_decode_without_panic_and_the_same_however_written(
        intent in near_intent(),
        subject in subject(),
        headers in headers(),
    ) {
        let compact = intent.to_string();
        let first = Intent::decode(&subject, headers.as_ref(), compact.as_bytes(), limits(None));
        let again = Intent::decode(&subject, headers.as_ref(), rewritten(&intent).as_bytes(), limits(None));
        match (first, again) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(&a.key, &b.key);
                prop_assert_eq!(&a.fingerprint, &b.fingerprint);
                prop_assert_eq!(a.fingerprint.len(), 64);
            }
            (Err(a), Err(b)) => prop_assert_eq!(a.error, b.error),
            (a, b) => prop_assert!(false, "one encoding decoded, the other not: {:?} / {:?}", a.is_ok(), b.is_ok()),
        }
    }

    #[test]
    fn a_valid_intent_keys_as_the_contract_derives_it(
        intent_id in "[a-z0-9]{1,20}",
        actor in "[a-z0-9]{1,20}",
        episode in "[a-z0-9]{0,20}",
        step in any::<u32>(),
        params in json_value(),
    ) {
        let body = json!({
            "intent_id": intent_id, "actor": actor, "episode": episode,
            "step_idx": step, "params": params,
        });
        let intent = Intent::decode("intents.ok", None, body.to_string().as_bytes(), limits(None))
            .map_err(|invalid| invalid.error)
            .expect("a valid intent");
        let expected = IdempotencyKey::from_intent_metadata(&intent_id, &actor, &episode, Some(step));
        prop_assert_eq!(intent.key, expected);
        prop_assert_eq!(intent.capability, "ok");
    }

    #[test]
    fn stored_values_anyone_wrote_read_back_without_panic(
        bytes in vec(any::<u8>(), 0..400),
        value in json_value(),
    ) {
        let _ = serde_json::from_slice::<Record>(&bytes);
        let _ = serde_json::from_value::<Record>(value);
    }

    #[test]
    fn replies_encode_to_json_that_reads_back_the_same(
        outcome in outcome(),
        intent_id in proptest::option::of(".{0,20}"),
        keyed in any::<bool>(),
    ) {
        let key = keyed.then(|| IdempotencyKey::generate("fuzz", "ep", 1));
        let reply = Reply::unstored(key, intent_id, outcome);
        let back: Reply = serde_json::from_slice(&reply.to_bytes()).expect("reply JSON");
        prop_assert_eq!(back, reply);
    }

    #[test]
    fn a_stored_outcome_encodes_to_its_reply(outcome in outcome(), tenant in proptest::option::of("[a-z]{1,6}")) {
        let now = chrono::Utc::now();
        let key = IdempotencyKey::generate("fuzz", "ep", 2);
        let key = match &tenant {
            Some(tenant) => key.in_tenant(tenant).expect("tenant"),
            None => key,
        };
        let record = Record {
            v: idemq::outcome::RECORD_VERSION,
            idem_key: key.clone(),
            intent_id: "i".to_owned(),
            fingerprint: "0".repeat(64),
            state: idemq::outcome::RecordState::Done,
            owner: "o".to_owned(),
            attempt: 1,
            result: Some(outcome.clone()),
            stored_at: now,
            expires_at: now + chrono::Duration::seconds(60),
            written: None,
        };
        // The record as a bucket holds it reads back unchanged.
        let stored: Record = serde_json::from_slice(&serde_json::to_vec(&record).expect("record"))
            .expect("record JSON");
        prop_assert_eq!(&stored.idem_key, &record.idem_key);
        prop_assert_eq!(&stored.result, &record.result);
        let encoded = Reply::from_record(&record, true).expect("an outcome").to_bytes();
        let reply: Reply = serde_json::from_slice(&encoded).expect("reply JSON");
        prop_assert_eq!(reply.result, outcome);
        prop_assert!(reply.replayed);
        // Replies carry the bare key, whatever the tenant.
        prop_assert_eq!(reply.idem_key.as_ref().map(IdempotencyKey::as_str), Some(key.bare()));
    }

    #[test]
    fn upstream_replies_map_without_panic(
        payload in vec(any::<u8>(), 0..300),
        json in json_value(),
        use_json in any::<bool>(),
        code in proptest::option::of("[ -~]{0,8}"),
        status in proptest::option::of(prop_oneof![Just("Killed".to_owned()), "[ -~]{0,8}".boxed()]),
    ) {
        let mut headers = HeaderMap::new();
        if let Some(code) = &code {
            headers.insert(idemq::handler::SERVICE_ERROR_CODE_HEADER, code.as_str());
        }
        if let Some(status) = &status {
            headers.insert("Idem-Status", status.as_str());
        }
        let payload = if use_json { Bytes::from(json.to_string()) } else { Bytes::from(payload) };
        let message = async_nats::Message {
            subject: "_INBOX.x".into(),
            reply: None,
            length: payload.len(),
            payload,
            headers: Some(headers),
            status: None,
            description: None,
        };
        let _ = idemq::handler::map_reply(&message);
    }

    #[test]
    fn keys_and_purge_notices_parse_without_panic(text in any::<String>(), bytes in vec(any::<u8>(), 0..40)) {
        let _ = IdempotencyKey::parse(&text);
        let _ = IdempotencyKey::parse_scoped(&text);
        if let Ok(notice) = std::str::from_utf8(&bytes) {
            if let Ok(key) = IdempotencyKey::parse_scoped(notice) {
                prop_assert_eq!(IdempotencyKey::parse_scoped(key.as_str()), Ok(key.clone()));
            }
        }
    }
}

#[test]
fn nesting_deeper_than_the_parser_takes_is_refused_not_overflowed() {
    for depth in [127, 129, 10_000, 100_000] {
        let params = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let body = format!(r#"{{"intent_id":"i","actor":"a","episode":"e","params":{params}}}"#);
        let decoded = Intent::decode(
            "intents.ok",
            None,
            body.as_bytes(),
            Limits {
                max_payload: 1 << 20,
                tenant_token: None,
            },
        );
        match decoded {
            Ok(_) => assert!(depth < 128, "depth {depth} accepted"),
            Err(invalid) => assert!(
                matches!(invalid.error, IntentError::NotJson(_)),
                "depth {depth}: {:?}",
                invalid.error
            ),
        }
    }
}

#[test]
fn every_corpus_case_gets_the_code_its_name_says() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-corpus");
    let mut cases = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_owned();
        let payload = std::fs::read(&path).expect("case");
        let decoded = Intent::decode("intents.ok", None, &payload, limits(None).with_max(1 << 20));
        let code = match &decoded {
            Ok(_) => "ok",
            Err(invalid) => invalid.error.code(),
        };
        assert!(name.starts_with(&format!("{code}-")), "{name}: got {code}");
        cases += 1;
    }
    assert!(cases >= 10, "the corpus is there: {cases} cases");
}

/// `Limits` with another payload bound.
trait WithMax {
    fn with_max(self, max_payload: usize) -> Self;
}

impl WithMax for Limits {
    fn with_max(self, max_payload: usize) -> Self {
        Limits {
            max_payload,
            ..self
        }
    }
}

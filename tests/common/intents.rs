//! The intents the tests send, the keys they derive, and what a reply
//! says: one actor (`agent`) in one episode (`ep`) unless a test says
//! otherwise.

use idemq::IdempotencyKey;
use serde_json::{json, Value};

/// The actor of the tests' intents.
pub const ACTOR: &str = "agent";
/// The episode of the tests' intents.
pub const EPISODE: &str = "ep";

/// An intent `id` from [`ACTOR`] in [`EPISODE`] with `params` and no
/// capability (a worker takes it from the subject's last token).
pub fn intent(id: &str, params: Value) -> Value {
    json!({ "intent_id": id, "actor": ACTOR, "episode": EPISODE, "params": params })
}

/// [`intent`] naming its `capability` in the body.
pub fn intent_for(id: &str, capability: &str, params: Value) -> Value {
    let mut body = intent(id, params);
    body["capability"] = json!(capability);
    body
}

/// The key of [`intent`]`(id, ..)`: `id`, [`ACTOR`], [`EPISODE`], no step.
pub fn intent_key(id: &str) -> IdempotencyKey {
    IdempotencyKey::from_intent_metadata(id, ACTOR, EPISODE, None)
}

/// [`intent_key`] as text, as replies and logs show it.
pub fn key_of(id: &str) -> String {
    intent_key(id).to_string()
}

/// The `data.code` of an error reply, if it is one.
pub fn error_code(reply: &Value) -> Option<&str> {
    reply["result"]["data"]["code"].as_str()
}

/// The `data.code` of an error reply; panics on any other reply.
pub fn code(reply: &Value) -> &str {
    error_code(reply).unwrap_or_else(|| panic!("not an error reply: {reply}"))
}

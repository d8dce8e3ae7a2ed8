//! Every key vector of the contract (`tests/data/key-vectors.json`, copied
//! from the spec), reproduced byte for byte.

use idemq::IdempotencyKey;
use serde_json::Value;

fn vectors() -> Value {
    serde_json::from_str(include_str!("data/key-vectors.json")).expect("vectors are JSON")
}

fn rows<'a>(vectors: &'a Value, name: &str) -> &'a Vec<Value> {
    let rows = vectors[name].as_array().expect("array of rows");
    assert!(!rows.is_empty(), "{name} has rows");
    rows
}

fn text<'a>(row: &'a Value, field: &str) -> &'a str {
    row[field].as_str().expect("string field")
}

fn step(row: &Value) -> Option<u32> {
    row["step_idx"]
        .as_u64()
        .map(|n| u32::try_from(n).expect("step fits u32"))
}

#[test]
fn generate_reproduces_every_vector() {
    let vectors = vectors();
    for row in rows(&vectors, "generate") {
        let key = IdempotencyKey::generate(
            text(row, "run_id"),
            text(row, "episode"),
            step(row).expect("step"),
        );
        assert_eq!(key.to_string(), text(row, "key"), "row {row}");
    }
}

#[test]
fn from_intent_metadata_reproduces_every_vector() {
    let vectors = vectors();
    for row in rows(&vectors, "from_intent_metadata") {
        let key = IdempotencyKey::from_intent_metadata(
            text(row, "intent_id"),
            text(row, "actor"),
            text(row, "episode"),
            step(row),
        );
        assert_eq!(key.as_str(), text(row, "key"), "row {row}");
    }
}

#[test]
fn separator_collision_rows_share_one_key() {
    let vectors = vectors();
    let colliding: Vec<&str> = rows(&vectors, "generate")
        .iter()
        .filter(|row| row["separator_collision"] == true)
        .map(|row| text(row, "key"))
        .collect();
    assert_eq!(colliding.len(), 2);
    assert_eq!(colliding[0], colliding[1]);
}

#[test]
fn valid_keys_parse_to_lower_case() {
    let vectors = vectors();
    for row in rows(&vectors, "parse_valid") {
        let input = row.as_str().expect("string");
        let key = IdempotencyKey::parse(input).expect("valid key");
        assert_eq!(key.as_str(), input.to_ascii_lowercase());
    }
}

#[test]
fn invalid_keys_are_refused() {
    let vectors = vectors();
    for row in rows(&vectors, "parse_invalid") {
        let input = row.as_str().expect("string");
        let error = IdempotencyKey::parse(input).expect_err(input);
        assert_eq!(error.0, input);
    }
}

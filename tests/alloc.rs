//! What decoding one input may allocate: a stated bound, checked over
//! generated inputs with a counting allocator (`stats_alloc`). The inputs
//! are the ones a peer controls: an intent's bytes (any JSON, deep, wide,
//! or not JSON at all), a record read from the bucket, an upstream's reply.
//!
//! The bound: at most [`PER_BYTE`] bytes per input byte plus [`FIXED`],
//! summed over every allocation the decode makes.
//! JSON trees cost more than their text (a 2-byte `1,` becomes a 32-byte
//! value in a growing vector), so the factor is not small; what matters is
//! that it is linear: `--max-payload` then bounds what one message costs.
//!
//! One test in its own binary: the allocator's counters are global, and a
//! second test running beside it would be counted too.

use std::alloc::System;

use async_nats::{HeaderMap, Message};
use idemq::handler::map_reply;
use idemq::intent::{Intent, Limits};
use idemq::outcome::Record;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes a decoder may allocate per input byte, counted as the sum of every
/// allocation (an upper bound on its peak). Measured: up to about 85 for
/// arrays of small objects (a one-entry map costs a B-tree node).
const PER_BYTE: usize = 128;
/// And on top, whatever the input.
const FIXED: usize = 64 * 1024;

/// Inputs that are cheap to write and dear to decode, and random ones.
fn input() -> impl Strategy<Value = Vec<u8>> {
    let unit = prop_oneof![
        Just("1,".to_owned()),
        Just("[],".to_owned()),
        Just("{},".to_owned()),
        Just("\"\",".to_owned()),
        Just("{\"a\":1},".to_owned()),
        "[a-z]{1,3}".prop_map(|k| format!("{{\"{k}\":[1]}},")),
    ];
    let wide = (unit, 1usize..4000).prop_map(|(unit, n)| {
        let body = unit.repeat(n);
        format!("[{}0]", body).into_bytes()
    });
    let deep = (1usize..140)
        .prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes());
    let intent = (1usize..2000).prop_map(|n| {
        format!(
            r#"{{"intent_id":"i","actor":"a","episode":"e","params":[{}0]}}"#,
            "{\"k\":[1,2]},".repeat(n)
        )
        .into_bytes()
    });
    prop_oneof![wide, deep, intent, vec(any::<u8>(), 0..2000)]
}

/// What `f` allocated, in bytes.
fn allocated(f: impl FnOnce()) -> usize {
    let region = Region::new(GLOBAL);
    f();
    region.change().bytes_allocated
}

#[test]
fn decoding_any_input_allocates_at_most_a_linear_bound() {
    let mut runner = TestRunner::new(Config {
        cases: 1500,
        failure_persistence: None,
        ..Config::default()
    });
    let worst = std::cell::Cell::new(0.0f64);
    let limits = Limits {
        max_payload: 1 << 20,
        tenant_token: None,
    };
    let result = runner.run(&input(), |bytes| {
        let bound = PER_BYTE * bytes.len() + FIXED;
        let intent = allocated(|| {
            let _ = Intent::decode("intents.work", None, &bytes, limits);
        });
        let record = allocated(|| {
            let _ = serde_json::from_slice::<Record>(&bytes);
        });
        let reply = Message {
            subject: "_INBOX.x".into(),
            reply: None,
            payload: bytes.clone().into(),
            headers: Some(HeaderMap::new()),
            status: None,
            description: None,
            length: bytes.len(),
        };
        let upstream = allocated(|| {
            let _ = map_reply(&reply);
        });
        for (what, used) in [
            ("intent", intent),
            ("record", record),
            ("upstream reply", upstream),
        ] {
            worst.set(worst.get().max(used as f64 / (bytes.len().max(1)) as f64));
            prop_assert!(
                used <= bound,
                "decoding {} bytes as {what} allocated {used} bytes, over {bound}",
                bytes.len()
            );
        }
        Ok(())
    });
    println!("worst bytes allocated per input byte: {:.1}", worst.get());
    if let Err(error) = result {
        panic!("{error}");
    }
}

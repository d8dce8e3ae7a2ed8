//! Every error code idemq itself puts on the wire (docs/contract.md §3), in one
//! table. `Rejection::code` (`verdict.rs`) maps the
//! worker's typed refusals to them; the two codes that are stored outcomes
//! come from where those outcomes are made (the store, the forward handler).

/// The message is not a valid intent.
pub const INVALID_INTENT: &str = "INVALID_INTENT";
/// The `Idempotency-Key` header is not a key.
pub const INVALID_KEY: &str = "INVALID_KEY";
/// The message is over `--max-payload`.
pub const PAYLOAD_TOO_LARGE: &str = "PAYLOAD_TOO_LARGE";
/// The key is taken by an intent with another fingerprint.
pub const KEY_REUSED: &str = "KEY_REUSED";
/// Another execution holds the key.
pub const IN_PROGRESS: &str = "IN_PROGRESS";
/// No handler can run the intent now (or the worker is stopping).
pub const NO_HANDLER: &str = "NO_HANDLER";
/// The bucket could not be read or written.
pub const STORE_UNAVAILABLE: &str = "STORE_UNAVAILABLE";
/// The core intake already holds `--intake-bytes` of waiting intents (v1.2).
pub const OVERLOADED: &str = "OVERLOADED";
/// Stored: the outcome was too large for the store (docs/contract.md v1.1).
pub const RESULT_TOO_LARGE: &str = "RESULT_TOO_LARGE";
/// Stored: the upstream's reply could not be read as an outcome.
pub const UPSTREAM_BAD_REPLY: &str = "UPSTREAM_BAD_REPLY";

/// The codes an invalid message is refused with, one counter each.
pub const INVALID_CODES: [&str; 3] = [INVALID_INTENT, INVALID_KEY, PAYLOAD_TOO_LARGE];

//! Idempotency keys, byte-compatible with the seed design.
//!
//! A key is `idem_` followed by the first 16 lowercase hex digits of
//! `SHA-256(run_id + "::" + episode + "::" + decimal(step_idx))`. The format
//! is kept exactly as the seed had it so that keys minted by older agents
//! still match; its one weakness (the `::` separator lets `a::b`/`c` and
//! `a`/`b::c` collide) is closed by the intent fingerprint, not here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// The fixed prefix of every key.
const PREFIX: &str = "idem_";
/// Number of hex digits after the prefix.
const HEX_LEN: usize = 16;

/// A validated idempotency key (`idem_` + 16 lowercase hex digits),
/// optionally scoped to a tenant (`<tenant>.idem_...`, docs/contract.md v1.1 §5).
///
/// Its text ([`as_str`](Self::as_str)) is the JetStream KV key under which
/// the intent's claim and outcome live; [`bare`](Self::bare) is the key
/// replies carry. Every character is valid in a NATS subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(String);

/// Why a string is not an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid idempotency key {0:?}: expected `idem_` followed by 16 hex digits")]
pub struct KeyError(pub String);

impl IdempotencyKey {
    /// Derives the key of one step of one run: the seed's `generate`.
    pub fn generate(run_id: &str, episode: &str, step_idx: u32) -> Self {
        Self::hash(&[run_id], episode, step_idx)
    }

    /// Derives the key from intent metadata: the seed's
    /// `from_intent_metadata`, i.e. `generate(intent_id + ":" + actor, episode, step_idx or 0)`.
    pub fn from_intent_metadata(
        intent_id: &str,
        actor: &str,
        episode: &str,
        step_idx: Option<u32>,
    ) -> Self {
        Self::hash(&[intent_id, ":", actor], episode, step_idx.unwrap_or(0))
    }

    /// `generate` with the run id given in pieces, hashed as they come
    /// instead of joined first.
    fn hash(run_id: &[&str], episode: &str, step_idx: u32) -> Self {
        let mut hasher = Sha256::new();
        for piece in run_id {
            hasher.update(piece.as_bytes());
        }
        hasher.update(b"::");
        hasher.update(episode.as_bytes());
        hasher.update(b"::");
        hasher.update(step_idx.to_string().as_bytes());
        let digest = hasher.finalize();
        let mut key = String::with_capacity(PREFIX.len() + HEX_LEN);
        key.push_str(PREFIX);
        for byte in &digest[..HEX_LEN / 2] {
            push_hex(&mut key, *byte);
        }
        Self(key)
    }

    /// Parses a key, accepting upper-case hex and normalising it to lower case.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let hex = text
            .strip_prefix(PREFIX)
            .filter(|hex| hex.len() == HEX_LEN && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| KeyError(text.to_owned()))?;
        Ok(Self(format!("{PREFIX}{}", hex.to_ascii_lowercase())))
    }

    /// The key as text: with its tenant in front when scoped (the KV key).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key without its tenant: `idem_` + 16 hex digits.
    pub fn bare(&self) -> &str {
        self.0.rsplit('.').next().unwrap_or(&self.0)
    }

    /// The tenant the key is scoped to, if any.
    pub fn tenant(&self) -> Option<&str> {
        self.0.rsplit_once('.').map(|(tenant, _)| tenant)
    }

    /// This key in `tenant`'s scope; `None` when `tenant` is not a valid
    /// KV key token (`[A-Za-z0-9_=-]`, one or more).
    pub fn in_tenant(&self, tenant: &str) -> Option<IdempotencyKey> {
        is_tenant(tenant).then(|| Self(format!("{tenant}.{}", self.bare())))
    }

    /// Parses a key as stored: bare, or `<tenant>.` in front.
    pub fn parse_scoped(text: &str) -> Result<Self, KeyError> {
        match text.rsplit_once('.') {
            None => Self::parse(text),
            Some((tenant, bare)) => Self::parse(bare)?
                .in_tenant(tenant)
                .ok_or_else(|| KeyError(text.to_owned())),
        }
    }

    /// The key's 64 bits (its hex digits as a number, mixed with the
    /// tenant's hash when scoped): a compact map key.
    pub fn bits(&self) -> u64 {
        // Every constructor leaves exactly PREFIX + HEX_LEN hex digits, so
        // the fallback is never taken; it only keeps this free of panics.
        let bits = self
            .bare()
            .get(PREFIX.len()..)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .unwrap_or_default();
        match self.tenant() {
            None => bits,
            // FNV-1a: fixed, so every worker agrees; a tenant's keys then
            // never share bits with another's but by a 2^-64 chance.
            Some(tenant) => tenant.bytes().fold(bits ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            }),
        }
    }
}

/// Appends a byte as two lowercase hex digits.
pub(crate) fn push_hex(out: &mut String, byte: u8) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.push(char::from(DIGITS[usize::from(byte >> 4)]));
    out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for IdempotencyKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl AsRef<str> for IdempotencyKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for IdempotencyKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for IdempotencyKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse_scoped(&text).map_err(serde::de::Error::custom)
    }
}

/// Whether `tenant` can stand in front of a key: one KV key token.
pub fn is_tenant(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scoped_key_keeps_its_tenant_apart() {
        let key = IdempotencyKey::parse("idem_710f82ad09b890d9").expect("key");
        let a = key.in_tenant("acme").expect("scoped");
        let b = key.in_tenant("globex").expect("scoped");
        assert_eq!(a.as_str(), "acme.idem_710f82ad09b890d9");
        assert_eq!(a.bare(), key.as_str());
        assert_eq!(a.tenant(), Some("acme"));
        assert_eq!(key.tenant(), None);
        assert_ne!(a.bits(), b.bits());
        assert_ne!(a.bits(), key.bits());
        assert_eq!(IdempotencyKey::parse_scoped(a.as_str()), Ok(a.clone()));
        assert!(
            IdempotencyKey::parse(a.as_str()).is_err(),
            "headers stay bare"
        );
        for bad in ["", "a.b", "a b", "a*", ">", "ü"] {
            assert_eq!(key.in_tenant(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parse_normalises_upper_case_hex() {
        let key = IdempotencyKey::parse("idem_F52983C9C6E4FB21").expect("valid key");
        assert_eq!(key.as_str(), "idem_f52983c9c6e4fb21");
    }

    #[test]
    fn parse_rejects_multibyte_characters_without_panicking() {
        assert!(IdempotencyKey::parse("idem_f52983c9c6e4fb2é").is_err());
        assert!(IdempotencyKey::parse("idem_éééééééé").is_err());
    }

    #[test]
    fn display_round_trips_through_serde() {
        let key = IdempotencyKey::generate("run123", "episode1", 5);
        let json = serde_json::to_string(&key).expect("serialize");
        assert_eq!(json, "\"idem_f52983c9c6e4fb21\"");
        let back: IdempotencyKey = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, key);
    }

    #[test]
    fn bits_are_the_hex_digits() {
        let key = IdempotencyKey::parse("idem_710F82AD09B890D9").expect("key");
        assert_eq!(key.bits(), 0x710f_82ad_09b8_90d9);
    }
}

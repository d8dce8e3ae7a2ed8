//! What became of one delivery: a [`Verdict`], and the [`Rejection`]s
//! that refuse an intent, each mapped to its wire code in one place
//! ([`Rejection::code`], over the table in [`crate::codes`]).

use std::time::Duration;

use crate::codes;
use crate::intent::IntentError;
use std::sync::Arc;

use crate::outcome::Outcome;
use crate::reply::EncodedReply;
use crate::store::StoreError;

/// Why the worker refused to execute an intent. Each variant is one wire
/// error code; [`Rejection::code`] is the only place that mapping lives.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum Rejection {
    /// The intent failed validation.
    #[error(transparent)]
    Invalid(#[from] IntentError),
    /// The key is taken by an intent with another fingerprint.
    #[error("idempotency key already used by a different intent")]
    KeyReused,
    /// Another execution holds the key.
    #[error("another execution holds this key")]
    InProgress {
        /// When to retry.
        retry_after: Duration,
    },
    /// Core mode: the intake already holds `--intake-bytes` of waiting
    /// intents; nothing was decoded, claimed or run.
    #[error("the worker's intake is full; retry later")]
    Overloaded {
        /// When to retry.
        retry_after: Duration,
    },
    /// The handler declined: nothing can run the intent now (no upstream
    /// responders, `HandlerError::NoHandler`).
    #[error(transparent)]
    Declined(crate::handler::HandlerError),
    /// The worker is stopping and gave the intent's claim back.
    #[error("the worker is shutting down; retry")]
    ShuttingDown,
    /// The bucket could not be read or written.
    #[error(transparent)]
    StoreUnavailable(#[from] StoreError),
}

impl Rejection {
    /// The wire error code.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Rejection::Invalid(invalid) => invalid.code(),
            Rejection::KeyReused => codes::KEY_REUSED,
            Rejection::InProgress { .. } => codes::IN_PROGRESS,
            Rejection::Overloaded { .. } => codes::OVERLOADED,
            Rejection::Declined(_) | Rejection::ShuttingDown => codes::NO_HANDLER,
            Rejection::StoreUnavailable(_) => codes::STORE_UNAVAILABLE,
        }
    }

    /// The `Error` outcome that carries this rejection.
    pub(crate) fn outcome(&self) -> Outcome {
        let retry_after_ms = match self {
            Rejection::InProgress { retry_after } | Rejection::Overloaded { retry_after } => {
                Some(u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX))
            }
            _ => None,
        };
        Outcome::Error {
            code: self.code().to_owned(),
            message: self.to_string(),
            retry_after_ms,
        }
    }
}

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Settled: an outcome (fresh or replayed) or a final refusal. Answer it.
    Settled(Arc<EncodedReply>),
    /// The message itself is bad. Answer it; JetStream mode also dead-letters it.
    Invalid(Arc<EncodedReply>),
    /// Worth another try later: core mode answers it; JetStream mode naks
    /// the delivery (after `after`) and answers only the last one.
    Retry {
        /// The reply, should this be the last word.
        reply: Arc<EncodedReply>,
        /// How long to wait before the next try.
        after: Duration,
    },
}

impl Verdict {
    /// The answer this verdict carries.
    pub(crate) fn answer(&self) -> &Arc<EncodedReply> {
        match self {
            Verdict::Settled(reply) | Verdict::Invalid(reply) | Verdict::Retry { reply, .. } => {
                reply
            }
        }
    }
}

/// A handled delivery: the verdict and where the intent may be answered.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Handled {
    /// What became of it.
    pub verdict: Verdict,
    /// Whether the message's own reply subject may be answered (core
    /// mode): false when it was refused, and then nothing is answered.
    pub answer_own: bool,
    /// `Idem-Reply-To` or `reply_to`, for messages without a reply
    /// subject; `None` when absent or refused.
    pub reply_to: Option<async_nats::Subject>,
    /// The first 64 bits of the intent's fingerprint; `None` for a message
    /// that is not a valid intent. With the key it names one intent's
    /// answer across copies.
    pub fingerprint: Option<u64>,
}

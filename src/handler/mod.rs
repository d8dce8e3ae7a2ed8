//! Handlers: what an intent's execution actually does.
//!
//! The worker calls a [`Handler`] only while it holds the key's lease, at
//! most once per claim. A handler returns the [`Outcome`] to store (a value,
//! a definite error, `Killed`), or a [`HandlerError`] for failures that must
//! not be stored because a retry may well succeed. Timeouts are the worker's
//! business: it stops waiting after `--handler-timeout` and stores `Timeout`.

mod echo;
mod forward;

use async_trait::async_trait;
use bytes::Bytes;

pub use echo::Echo;
pub use forward::{
    map_reply, Forward, ForwardError, SERVICE_ERROR_CODE_HEADER, SERVICE_ERROR_HEADER,
};

use crate::intent::Intent;
use crate::outcome::Outcome;

/// One execution of one intent.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The validated intent.
    pub intent: &'a Intent,
    /// The intent exactly as it arrived (JSON), for handlers that pass it on.
    pub payload: &'a Bytes,
    /// The claim's attempt number, from 1; more after a takeover.
    pub attempt: u32,
}

/// Failures that are not stored: the claim is released and a retry executes again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// A temporary failure (an upstream error code of 500 or more).
    #[error("transient error {code}: {message}")]
    Transient {
        /// The error code, passed on to the caller.
        code: String,
        /// Human-readable text.
        message: String,
    },
    /// Nothing can run this capability now (no upstream responders, no route).
    #[error("no handler: {0}")]
    NoHandler(String),
}

/// What executes intents. Implement it to embed idemq with your own logic.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Executes one intent and returns the outcome to store.
    async fn handle(&self, call: Call<'_>) -> Result<Outcome, HandlerError>;

    /// The subjects this handler publishes to with the worker's
    /// credentials, as a NATS pattern (`exec.*` for `--forward
    /// 'exec.{capability}'`): the worker never accepts them as reply
    /// targets (docs/contract.md v1.2 §2). `None` for a handler that publishes
    /// nothing.
    fn publishes_to(&self) -> Option<String> {
        None
    }
}

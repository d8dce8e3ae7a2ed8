//! The built-in `echo` handler.

use async_trait::async_trait;
use serde_json::json;

use super::{Call, Handler, HandlerError};
use crate::outcome::Outcome;

/// Serves every capability with `{"echo": params}`: the default when no
/// `--forward` is given, handy for trying idemq out and for benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

#[async_trait]
impl Handler for Echo {
    async fn handle(&self, call: Call<'_>) -> Result<Outcome, HandlerError> {
        Ok(Outcome::Success(json!({ "echo": call.intent.params })))
    }
}

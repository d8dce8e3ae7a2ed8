//! The `--forward TEMPLATE` handler: a NATS request to the upstream service.

use std::time::Duration;

use async_nats::{Client, HeaderMap, Message, RequestErrorKind};
use async_trait::async_trait;

use super::{Call, Handler, HandlerError};
use crate::intent::is_publish_subject;
use crate::outcome::Outcome;
use crate::reply::{KEY_HEADER, STATUS_HEADER};

/// The NATS micro-service error code header.
pub const SERVICE_ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";
/// The NATS micro-service error text header.
pub const SERVICE_ERROR_HEADER: &str = "Nats-Service-Error";
/// Request header: the claim's attempt number.
pub const ATTEMPT_HEADER: &str = "Idem-Attempt";
/// The template's one placeholder.
const CAPABILITY_PLACEHOLDER: &str = "{capability}";

/// Why a `--forward` template is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --forward template {template:?}: {reason}")]
pub struct ForwardError {
    /// The template as given.
    pub template: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Forwards each intent (its original JSON, with `Idem-Key` and
/// `Idem-Attempt` headers) as a request to the subject made from the
/// template, and maps the reply to an outcome as the contract says.
#[derive(Debug, Clone)]
pub struct Forward {
    client: Client,
    template: String,
    timeout: Duration,
}

impl Forward {
    /// A forward handler. `timeout` bounds each upstream request; the worker
    /// applies `--handler-timeout` around it as well.
    ///
    /// The template may use `{capability}`, nothing else in braces. Since a
    /// capability is always a plain token, the resulting subject can never
    /// gain tokens or wildcards from a caller.
    pub fn new(client: Client, template: &str, timeout: Duration) -> Result<Forward, ForwardError> {
        Self::check_template(template)?;
        Ok(Forward {
            client,
            template: template.to_owned(),
            timeout,
        })
    }

    /// Checks a template without a connection (start-up validation).
    pub fn check_template(template: &str) -> Result<(), ForwardError> {
        let invalid = |reason| ForwardError {
            template: template.to_owned(),
            reason,
        };
        let sample = template.replace(CAPABILITY_PLACEHOLDER, "x");
        if sample.contains(['{', '}']) {
            return Err(invalid("the only placeholder is {capability}"));
        }
        if !is_publish_subject(&sample) {
            return Err(invalid("not a NATS subject without wildcards"));
        }
        Ok(())
    }

    /// The upstream subject for a capability.
    pub fn subject(&self, capability: &str) -> String {
        self.template.replace(CAPABILITY_PLACEHOLDER, capability)
    }

    /// Every subject the template can produce, as a pattern: each token
    /// that holds the placeholder becomes `*` (a capability is one token).
    pub fn pattern(&self) -> String {
        self.template
            .split('.')
            .map(|token| {
                if token.contains(CAPABILITY_PLACEHOLDER) {
                    "*"
                } else {
                    token
                }
            })
            .collect::<Vec<_>>()
            .join(".")
    }
}

#[async_trait]
impl Handler for Forward {
    async fn handle(&self, call: Call<'_>) -> Result<Outcome, HandlerError> {
        let subject = self.subject(&call.intent.capability);
        let mut headers = HeaderMap::new();
        headers.insert(KEY_HEADER, call.intent.key.as_str());
        headers.insert(ATTEMPT_HEADER, call.attempt.to_string().as_str());
        let request = async_nats::Request::new()
            .payload(call.payload.clone())
            .headers(headers)
            .timeout(Some(self.timeout));
        // Boxed, so this handler's future stays under the 1 KiB that glibc
        // serves from its per-thread cache.
        let sent = Box::pin(self.client.send_request(subject.clone(), request));
        match sent.await {
            Ok(reply) => map_reply(&reply),
            Err(error) => match error.kind() {
                RequestErrorKind::TimedOut => Ok(Outcome::Timeout),
                RequestErrorKind::NoResponders => Err(HandlerError::NoHandler(format!(
                    "no responders on {subject}"
                ))),
                // A payload over the server's limit is a property of the
                // intent: retrying cannot help, so it is stored.
                RequestErrorKind::MaxPayloadExceeded => Ok(Outcome::error(
                    crate::codes::PAYLOAD_TOO_LARGE,
                    format!("the intent is too large to forward to {subject}"),
                )),
                _ => Err(HandlerError::NoHandler(format!(
                    "request to {subject} failed: {error}"
                ))),
            },
        }
    }

    fn publishes_to(&self) -> Option<String> {
        Some(self.pattern())
    }
}

/// Whether a service error code is transient: a number of 500 or more, of
/// any length (`5000000000` too, which no integer type of ours need hold).
fn is_transient_code(code: &str) -> bool {
    let digits = code.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let significant = digits.trim_start_matches('0');
    significant.len() > 3 || significant.parse::<u32>().is_ok_and(|n| n >= 500)
}

/// Maps an upstream reply: service-error headers to `Error` (transient from
/// code 500 up), `Idem-Status: Killed` to `Killed`, JSON to `Success`, an
/// empty payload to `Success(null)`, anything else to `UPSTREAM_BAD_REPLY`.
pub fn map_reply(reply: &Message) -> Result<Outcome, HandlerError> {
    let header = |name: &str| {
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    if let Some(code) = header(SERVICE_ERROR_CODE_HEADER) {
        let message = header(SERVICE_ERROR_HEADER).unwrap_or_default();
        let transient = is_transient_code(&code);
        return if transient {
            Err(HandlerError::Transient { code, message })
        } else {
            Ok(Outcome::error(code, message))
        };
    }
    if header(STATUS_HEADER).as_deref() == Some("Killed") {
        return Ok(Outcome::Killed);
    }
    if reply.payload.is_empty() {
        return Ok(Outcome::Success(serde_json::Value::Null));
    }
    match serde_json::from_slice(&reply.payload) {
        Ok(value) => Ok(Outcome::Success(value)),
        Err(_) => Ok(Outcome::error(
            crate::codes::UPSTREAM_BAD_REPLY,
            "the upstream reply is not JSON",
        )),
    }
}

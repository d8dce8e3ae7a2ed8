//! Dead letters: an intent that is invalid, or out of deliveries, goes to
//! the dead-letter subject with its payload and headers and the reason
//! (docs/contract.md v1.1 §6), published before the intent is terminated:
//! acknowledged by the stream that captures it (the dead-letter stream
//! does), or else a core publish ahead of the terminate.

use async_nats::HeaderMap;
use bytes::Bytes;

use super::reply_routes::ReplyRoutes;
use crate::pipeline::Pipeline;

/// Header on dead letters: the error code, or `max_deliver`.
pub const DEAD_REASON_HEADER: &str = "Idem-Dead-Reason";
/// The reason of an intent that ran out of deliveries.
pub const MAX_DELIVER_REASON: &str = "max_deliver";

/// Publishes a dead letter to `subject` before the intent is terminated
/// ([`ReplyRoutes::publish_before_settling`]): the intent's payload and headers, plus
/// [`DEAD_REASON_HEADER`]. The intent's `Nats-` headers, which the
/// dead-letter stream would act on (an expected stream or sequence meant
/// for the intent's stream, a `Nats-Msg-Id` it may have seen, a TTL, a
/// roll-up), travel renamed as `Idem-Original-<name>`; `id` is the dead
/// letter's own `Nats-Msg-Id`, so that one published again (its
/// acknowledgement lost, the intent redelivered) is kept once. An `Err`
/// leaves the intent to be redelivered.
pub(crate) async fn send(
    routes: &ReplyRoutes,
    pipeline: &Pipeline,
    subject: &str,
    original: Option<&HeaderMap>,
    payload: Bytes,
    reason: &str,
    id: Option<&str>,
) -> Result<(), String> {
    let headers = dead_letter_headers(original, reason, id);
    routes
        .publish_before_settling(&pipeline.client, subject, headers, payload)
        .await
        .map_err(|error| format!("dead letter: {error}"))?;
    pipeline.stats.dead_lettered.inc();
    Ok(())
}

/// Prefix of the headers a dead letter carries in place of those its
/// stream would act on.
pub const ORIGINAL_HEADER_PREFIX: &str = "Idem-Original-";

/// A dead letter's headers: the intent's, with every `Nats-` one renamed
/// (see [`ORIGINAL_HEADER_PREFIX`]), the reason, and its own `id`.
fn dead_letter_headers(original: Option<&HeaderMap>, reason: &str, id: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in original.into_iter().flat_map(HeaderMap::iter) {
        let name: &str = name.as_ref();
        let acted_on = name
            .get(..5)
            .is_some_and(|head| head.eq_ignore_ascii_case("Nats-"));
        for value in values {
            if acted_on {
                headers.append(format!("{ORIGINAL_HEADER_PREFIX}{name}"), value.as_str());
            } else {
                headers.append(name, value.as_str());
            }
        }
    }
    headers.insert(DEAD_REASON_HEADER, reason);
    if let Some(id) = id {
        headers.insert("Nats-Msg-Id", id);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_carry_acted_on_headers_renamed() {
        let mut original = HeaderMap::new();
        original.insert("Nats-Expected-Stream", "INTENTS");
        original.insert("nats-expected-last-sequence", "7");
        original.insert("Nats-Msg-Id", "m-1");
        original.insert("Idempotency-Key", "k");
        original.insert("Nats-TTL", "1s");
        original.insert("nats-rollup", "sub");
        let headers =
            dead_letter_headers(Some(&original), "INVALID_INTENT", Some("dead-INTENTS-7"));
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(get("Nats-Expected-Stream"), None);
        assert_eq!(get("Nats-Msg-Id").as_deref(), Some("dead-INTENTS-7"));
        assert_eq!(get("Nats-TTL"), None);
        assert_eq!(get("nats-rollup"), None);
        assert_eq!(get("Idem-Original-Nats-TTL").as_deref(), Some("1s"));
        assert_eq!(get("Idem-Original-nats-rollup").as_deref(), Some("sub"));
        assert_eq!(get("nats-expected-last-sequence"), None);
        assert_eq!(
            get("Idem-Original-Nats-Expected-Stream").as_deref(),
            Some("INTENTS")
        );
        assert_eq!(
            get("Idem-Original-nats-expected-last-sequence").as_deref(),
            Some("7")
        );
        assert_eq!(get("Idem-Original-Nats-Msg-Id").as_deref(), Some("m-1"));
        assert_eq!(get("Idempotency-Key").as_deref(), Some("k"));
        assert_eq!(get(DEAD_REASON_HEADER).as_deref(), Some("INVALID_INTENT"));
    }
}

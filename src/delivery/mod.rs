//! Where intents come from, and what happens with each verdict: core
//! request/reply ([`core`]) or a durable JetStream pull consumer
//! ([`jetstream`]), which publishes replies and dead letters through
//! `reply_routes` (kept by a stream when one captures the subject) and
//! `dead_letter`. Both take messages through the same permit-bounded
//! [`Intake`](crate::intake::Intake) and hand each to the
//! [`Pipeline`](crate::pipeline::Pipeline).

pub(crate) mod core;
mod dead_letter;
pub(crate) mod jetstream;
mod reply_routes;

/// Why a delivery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// A subscription to an intent subject was refused.
    #[error("subscribe to {subject}: {source}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// The client's error.
        #[source]
        source: async_nats::SubscribeError,
    },
    /// The stream could not be found or created.
    #[error("stream {stream}: {reason}")]
    Stream {
        /// The stream's name.
        stream: String,
        /// The server's or the client's reason.
        reason: String,
    },
    /// The durable consumer could not be created or updated.
    #[error("consumer {durable}: {reason}")]
    Consumer {
        /// The consumer's name.
        durable: String,
        /// The server's or the client's reason.
        reason: String,
    },
}

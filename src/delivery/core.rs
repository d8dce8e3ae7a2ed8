//! Core delivery: queue-group subscriptions on the intent subjects.
//!
//! Every delivery is answered on its reply subject (else on
//! `Idem-Reply-To`/`reply_to`), whatever the verdict: a core-mode client
//! retries on its own, so nothing is redelivered here.
//!
//! The server pushes deliveries whether or not the worker keeps up, and a
//! subscription whose buffer is full drops messages inside the client,
//! silently for the sender until its timeout. So the subscriptions are
//! read as fast as messages arrive, by a reader that does nothing else,
//! into an intake queue bounded by bytes ([`IntakeBytes`], `--intake-bytes`):
//! what fits waits there for a permit of the in-flight bound, what does
//! not is answered `OVERLOADED` at once (docs/contract.md v1.2 §6, `docs/claim.md`
//! "Overload"). The in-flight bound limits work; the byte bound limits
//! what waits for it.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Message, Subscriber};
use futures::StreamExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::DeliveryError;
use crate::config::INTAKE_OVERHEAD;
use crate::intake::Intake;
use crate::pipeline::{Incoming, Pipeline};
use crate::stats::{Stats, Throttle};
use crate::verdict::{Handled, Rejection};

/// `retry_after_ms` of an `OVERLOADED` answer: about how long a full
/// intake takes to drain at the rates a worker runs at.
pub(crate) const OVERLOADED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How often, at most, a full intake is warned about.
const OVERLOADED_WARNED_EVERY: Duration = Duration::from_secs(10);

/// How long shutdown reads what the server had already sent when the
/// subscriptions were drained, answering each so its sender retries.
const DRAIN_BOUND: Duration = Duration::from_secs(2);

/// Subscribes to every intent subject in the queue group.
pub(crate) async fn subscribe(pipeline: &Pipeline) -> Result<Vec<Subscriber>, DeliveryError> {
    let mut subscriptions = Vec::with_capacity(pipeline.config.subjects.len());
    for subject in &pipeline.config.subjects {
        let subscription = pipeline
            .client
            .queue_subscribe(subject.clone(), pipeline.config.queue_group.clone())
            .await
            .map_err(|source| DeliveryError::Subscribe {
                subject: subject.clone(),
                source,
            })?;
        subscriptions.push(subscription);
    }
    Ok(subscriptions)
}

/// The bytes of the messages waiting in the intake, against their bound.
#[derive(Debug)]
pub(crate) struct IntakeBytes {
    held: AtomicUsize,
    bound: usize,
}

/// One waiting message's share of [`IntakeBytes`], given back on drop
/// (when its intent starts, or is answered without starting).
#[derive(Debug)]
pub(crate) struct Charge {
    bytes: Arc<IntakeBytes>,
    size: usize,
}

impl IntakeBytes {
    pub(crate) fn new(bound: usize) -> Arc<IntakeBytes> {
        Arc::new(IntakeBytes {
            held: AtomicUsize::new(0),
            bound,
        })
    }

    /// Takes `size` bytes for a waiting message, or `None` when they do
    /// not fit. An empty intake takes any one message, so a message larger
    /// than the bound is still served: what waits stays under the bound
    /// plus one message.
    pub(crate) fn charge(self: &Arc<Self>, size: usize) -> Option<Charge> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                let fits = held.checked_add(size).is_some_and(|sum| sum <= self.bound);
                (held == 0 || fits).then(|| held.saturating_add(size))
            })
            .ok()?;
        Some(Charge {
            bytes: Arc::clone(self),
            size,
        })
    }

    /// Bytes held now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.bytes.held.fetch_sub(self.size, Ordering::AcqRel);
    }
}

/// What holding `message` in the intake costs.
fn cost(message: &Message) -> usize {
    message.length.saturating_add(INTAKE_OVERHEAD)
}

/// A message waiting for a permit, with its share of the intake.
type Waiting = (Message, Charge);

/// Core intake: a reader that takes every delivery off the subscriptions
/// at once (into the byte-bounded queue, or answered `OVERLOADED`), and a
/// dispatcher that starts each waiting one when a permit of the in-flight
/// bound is free. Returns on shutdown, once the reader has drained the
/// subscriptions and the dispatcher has answered what still waited.
pub(crate) async fn take(
    pipeline: &Arc<Pipeline>,
    subscriptions: Vec<Subscriber>,
    intake: &Intake,
) {
    let bytes = IntakeBytes::new(pipeline.config.intake_bytes);
    // Unbounded in messages, bounded by `bytes`: every message in it holds
    // its charge.
    let (queue, waiting) = mpsc::unbounded_channel();
    tokio::join!(
        read(pipeline, subscriptions, &bytes, queue, intake),
        dispatch(pipeline, waiting, intake),
    );
}

/// Reads every subscription until shutdown, then drains them: the server
/// stops sending, and what it had sent is answered `NO_HANDLER` (the
/// worker is stopping) so its senders retry with another worker.
async fn read(
    pipeline: &Arc<Pipeline>,
    mut subscriptions: Vec<Subscriber>,
    bytes: &Arc<IntakeBytes>,
    queue: mpsc::UnboundedSender<Waiting>,
    intake: &Intake,
) {
    let overloaded = Throttle::new(OVERLOADED_WARNED_EVERY);
    {
        let mut source = futures::stream::select_all(subscriptions.iter_mut());
        while let Some(Some(message)) = intake.shutdown.run_until_cancelled(source.next()).await {
            match bytes.charge(cost(&message)) {
                // The dispatcher ends only after this sender is dropped.
                Some(charge) => {
                    // Closed only after shutdown: answered, never dropped.
                    if let Err(mpsc::error::SendError((message, _))) = queue.send((message, charge))
                    {
                        refuse(pipeline, message, Rejection::ShuttingDown).await;
                    }
                }
                None => {
                    if let Some(refused) = overloaded.count() {
                        tracing::warn!(
                            refused,
                            held = bytes.held(),
                            "the intake is full (--intake-bytes): answering OVERLOADED"
                        );
                    }
                    let rejection = Rejection::Overloaded {
                        retry_after: OVERLOADED_RETRY_AFTER,
                    };
                    refuse(pipeline, message, rejection).await;
                }
            }
        }
    }
    drop(queue);
    // Unsubscribing leaves what the client had buffered to be read: the
    // queue group sends new intents to the other workers meanwhile.
    for subscription in &mut subscriptions {
        if let Err(error) = subscription.drain().await {
            tracing::warn!(%error, "draining an intent subscription failed");
        }
    }
    let mut rest = futures::stream::select_all(subscriptions);
    let drained = tokio::time::timeout(DRAIN_BOUND, async {
        while let Some(message) = rest.next().await {
            refuse(pipeline, message, Rejection::ShuttingDown).await;
        }
    });
    if drained.await.is_err() {
        tracing::warn!("intent subscriptions still delivering after the drain bound");
    }
}

/// Starts each waiting message once a permit is free, in the intake's
/// tracker; after shutdown, answers what still waits `NO_HANDLER`.
async fn dispatch(
    pipeline: &Arc<Pipeline>,
    mut waiting: mpsc::UnboundedReceiver<Waiting>,
    intake: &Intake,
) {
    {
        let mut queue = futures::stream::poll_fn(|cx| waiting.poll_recv(cx));
        while let Some((permit, (message, charge))) = intake.next(&mut queue).await {
            // Started: it no longer waits.
            drop(charge);
            let answer = answer(
                Arc::clone(pipeline),
                message,
                intake.abandon.clone(),
                permit,
            );
            intake.tracker.spawn(answer);
        }
    }
    waiting.close();
    while let Some((message, _charge)) = waiting.recv().await {
        refuse(pipeline, message, Rejection::ShuttingDown).await;
    }
}

/// Answers one core-mode delivery. A function returning an `async move`
/// block rather than an `async fn`: an async fn keeps each by-value
/// parameter twice in its future, and this future is every intent's task.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold the message twice"
)]
fn answer(
    pipeline: Arc<Pipeline>,
    message: Message,
    abandon: CancellationToken,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> {
    async move {
        let _permit = permit;
        let started = std::time::Instant::now();
        let incoming = Incoming {
            subject: &message.subject,
            own_reply: message.reply.as_deref(),
            headers: message.headers.as_ref(),
            payload: &message.payload,
        };
        let handled = pipeline.handle(incoming, &abandon).await;
        publish(&pipeline, message, handled).await;
        Stats::observe(&pipeline.stats.intent_seconds, started.elapsed());
    }
}

/// Answers a delivery refused before it was decoded (`OVERLOADED`, or
/// the worker stopping).
async fn refuse(pipeline: &Pipeline, message: Message, rejection: Rejection) {
    let handled = pipeline.refuse_undecoded(
        message.reply.as_deref(),
        message.headers.as_ref(),
        &message.payload,
        rejection,
    );
    publish(pipeline, message, handled).await;
}

/// Publishes a handled delivery's answer: on the message's own reply
/// subject as it came (no copy), else on the target the intent names;
/// neither once the reply policy refused one.
async fn publish(pipeline: &Pipeline, message: Message, handled: Handled) {
    let own = message.reply.filter(|_| handled.answer_own);
    match own.or(handled.reply_to) {
        Some(reply_to) => {
            let reply = handled.verdict.answer();
            // Boxed: inline, the publish would double every task's size.
            let published = Box::pin(pipeline.client.publish_with_headers(
                reply_to,
                reply.headers(),
                reply.body.clone(),
            ));
            if let Err(error) = published.await {
                tracing::warn!(%error, "reply not sent");
            }
        }
        None => tracing::debug!("intent has nowhere to reply to"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_intake_holds_up_to_its_bound_and_one_message_past_it_when_empty() {
        let bytes = IntakeBytes::new(100);
        let big = bytes
            .charge(150)
            .expect("an empty intake takes any one message");
        assert!(bytes.charge(1).is_none(), "nothing more fits");
        drop(big);
        assert_eq!(bytes.held(), 0, "a charge is given back on drop");
        let a = bytes.charge(60).expect("fits");
        let b = bytes.charge(40).expect("fits exactly");
        assert!(bytes.charge(1).is_none(), "full");
        drop(a);
        let c = bytes.charge(60).expect("room again");
        assert_eq!(bytes.held(), 100);
        drop((b, c));
        assert_eq!(bytes.held(), 0);
    }
}

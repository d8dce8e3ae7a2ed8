//! Core delivery: queue-group subscriptions on the intent subjects.
//!
//! Every delivery is answered on its reply subject (else on
//! `Idem-Reply-To`/`reply_to`), whatever the verdict: a core-mode client
//! retries on its own, so nothing is redelivered here.

use std::future::Future;
use std::sync::Arc;

use async_nats::Message;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::DeliveryError;
use crate::intake::Intake;
use crate::pipeline::Pipeline;
use crate::stats::Stats;

/// Subscribes to every intent subject in the queue group.
pub(crate) async fn subscribe(
    pipeline: &Pipeline,
) -> Result<Vec<async_nats::Subscriber>, DeliveryError> {
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

/// Core intake: every delivery is answered on its reply subject (else on
/// `Idem-Reply-To`/`reply_to`), whatever the verdict.
pub(crate) async fn take(
    pipeline: &Arc<Pipeline>,
    subscriptions: Vec<async_nats::Subscriber>,
    intake: &Intake,
) {
    let mut source = futures::stream::select_all(subscriptions);
    while let Some((permit, message)) = intake.next(&mut source).await {
        let abandon = intake.abandon.clone();
        let answer = answer(Arc::clone(pipeline), message, abandon, permit);
        intake.tracker.spawn(answer);
    }
    // Dropping the subscriptions unsubscribes: the queue group routes new
    // intents to the other workers while ours finish.
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
        let handled = pipeline
            .handle(
                &message.subject,
                message.reply.as_deref(),
                message.headers.as_ref(),
                &message.payload,
                &abandon,
            )
            .await;
        // The message's own reply subject as it came (no copy), else the
        // one the intent names; neither once the policy refused one.
        let own = message.reply.filter(|_| handled.answer_own);
        match own.or(handled.reply_to) {
            Some(reply_to) => {
                let reply = handled.verdict.answer();
                // Boxed: inline, the publish would double every task's size.
                let published = Box::pin(pipeline.client.publish_with_headers(
                    reply_to,
                    reply.headers(),
                    reply.to_bytes(),
                ));
                if let Err(error) = published.await {
                    tracing::warn!(%error, "reply not sent");
                }
            }
            None => tracing::debug!("intent has nowhere to reply to"),
        }
        Stats::observe(&pipeline.stats.intent_seconds, started.elapsed());
    }
}

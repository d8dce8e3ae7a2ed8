//! Intake: the permit-bounded reading both delivery modes share.
//!
//! A permit of the in-flight bound is taken *before* the next message is
//! read and moves into the message's task, so at the bound intake simply
//! stops reading: nothing queues inside idemq, and the server (JetStream's
//! max-ack-pending, core subscriptions' capped buffers) holds the rest.
//! Every task belongs to one [`TaskTracker`], so shutdown knows exactly
//! what is still running.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What intake needs besides the pipeline: the bound, the owner of every
/// task, and the two stop signals.
pub struct Intake {
    /// The in-flight bound.
    pub(crate) permits: Arc<Semaphore>,
    /// The owner of every intent's task.
    pub(crate) tracker: TaskTracker,
    /// Stop taking intents.
    pub(crate) shutdown: CancellationToken,
    /// Stop waiting for running handlers: release their claims.
    pub(crate) abandon: CancellationToken,
}

impl Intake {
    /// An intake of at most `concurrency` messages in flight, stopped by `shutdown`.
    pub fn new(concurrency: usize, shutdown: CancellationToken) -> Intake {
        Intake {
            permits: Arc::new(Semaphore::new(concurrency)),
            tracker: TaskTracker::new(),
            shutdown,
            abandon: CancellationToken::new(),
        }
    }

    /// The owner of every task started for a message: close and wait on it
    /// to stop cleanly.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// The next message of `source` with its permit (see [`next_with_permit`]).
    pub async fn next<S: Stream + Unpin>(
        &self,
        source: &mut S,
    ) -> Option<(OwnedSemaphorePermit, S::Item)> {
        next_with_permit(source, &self.permits, &self.shutdown).await
    }

    /// Waits for a free permit, then takes every other free one too, up to
    /// `most` in all: the permits for the messages of one pull, so that
    /// each message pulled starts at once. `None` on shutdown.
    pub async fn free_permits(&self, most: usize) -> Option<OwnedSemaphorePermit> {
        let mut held = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return None,
            first = Arc::clone(&self.permits).acquire_owned() => first.ok()?,
        };
        let more = self.permits.available_permits().min(most.saturating_sub(1));
        if let Some(more) = u32::try_from(more)
            .ok()
            .filter(|n| *n > 0)
            .and_then(|n| Arc::clone(&self.permits).try_acquire_many_owned(n).ok())
        {
            held.merge(more);
        }
        Some(held)
    }
}

/// Takes the next message only once a permit is free, so at the in-flight
/// bound intake simply stops reading: nothing queues inside idemq. Returns
/// `None` on shutdown or when the source ends.
pub async fn next_with_permit<S: Stream + Unpin>(
    source: &mut S,
    permits: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<(OwnedSemaphorePermit, S::Item)> {
    let permit = tokio::select! {
        biased;
        () = shutdown.cancelled() => return None,
        permit = Arc::clone(permits).acquire_owned() => permit.ok()?,
    };
    let item = tokio::select! {
        biased;
        () = shutdown.cancelled() => return None,
        item = source.next() => item?,
    };
    Some((permit, item))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_pull_takes_every_free_permit_up_to_its_most() {
        let intake = Intake::new(4, CancellationToken::new());
        let busy = Arc::clone(&intake.permits)
            .acquire_owned()
            .await
            .expect("a permit");
        let pull = intake.free_permits(8).await.expect("permits");
        assert_eq!(pull.num_permits(), 3, "every free permit, no more");
        drop(pull);
        let pull = intake.free_permits(2).await.expect("permits");
        assert_eq!(pull.num_permits(), 2, "at most `most`");
        assert_eq!(intake.permits.available_permits(), 1);
        drop((pull, busy));
        assert_eq!(intake.permits.available_permits(), 4, "all given back");
    }

    #[tokio::test]
    async fn a_pull_waits_for_a_free_permit_and_stops_on_shutdown() {
        let shutdown = CancellationToken::new();
        let intake = Intake::new(1, shutdown.clone());
        let busy = Arc::clone(&intake.permits)
            .acquire_owned()
            .await
            .expect("a permit");
        let waited = tokio::time::timeout(Duration::from_millis(50), intake.free_permits(4)).await;
        assert!(waited.is_err(), "no permit is free: the pull waits");
        drop(busy);
        let pull = intake.free_permits(4).await.expect("the released permit");
        assert_eq!(pull.num_permits(), 1);
        drop(pull);
        shutdown.cancel();
        assert!(intake.free_permits(4).await.is_none());
    }
}

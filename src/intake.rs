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
    pub permits: Arc<Semaphore>,
    /// The owner of every intent's task.
    pub tracker: TaskTracker,
    /// Stop taking intents.
    pub shutdown: CancellationToken,
    /// Stop waiting for running handlers: release their claims.
    pub abandon: CancellationToken,
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

    /// The next message of `source` with its permit (see [`next_with_permit`]).
    pub async fn next<S: Stream + Unpin>(
        &self,
        source: &mut S,
    ) -> Option<(OwnedSemaphorePermit, S::Item)> {
        next_with_permit(source, &self.permits, &self.shutdown).await
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

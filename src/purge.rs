//! Purges: an operator's `idemq purge` removes a stored outcome and
//! announces it on `idemq.purge.<bucket>`; every worker listens there and
//! evicts the key from its outcome cache at once.

use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::cache::OutcomeCache;
use crate::key::IdempotencyKey;
use crate::store::{IdempotencyStore, StoreError};

/// The subject on which purges of `bucket` are announced (payload: the key).
pub fn purge_subject(bucket: &str) -> String {
    format!("idemq.purge.{bucket}")
}

/// Removes a stored outcome so the next copy executes again, and tells
/// every worker to forget it (the announcement is flushed before returning).
pub async fn purge(
    client: &async_nats::Client,
    store: &dyn IdempotencyStore,
    bucket: &str,
    key: &IdempotencyKey,
    expected: u64,
) -> Result<(), StoreError> {
    store.purge(key, expected).await?;
    let notice = bytes::Bytes::copy_from_slice(key.as_str().as_bytes());
    client
        .publish(purge_subject(bucket), notice)
        .await
        .map_err(|e| StoreError::Unavailable(format!("purge notice: {e}")))?;
    match tokio::time::timeout(NOTICE_FLUSH_BOUND, client.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(StoreError::Unavailable(format!("purge notice: {e}"))),
        Err(_) => Err(StoreError::Unavailable(
            "purge notice: not flushed in time".to_owned(),
        )),
    }
}

/// How long a purge waits for its notice to reach the server.
const NOTICE_FLUSH_BOUND: Duration = Duration::from_secs(5);

/// Evicts purged keys from `cache` as their notices arrive on `notices`,
/// until `shutdown`. Every worker subscribes (no queue group): each has
/// its own cache.
pub(crate) async fn evict_purged(
    cache: &OutcomeCache,
    mut notices: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    while let Some(Some(notice)) = shutdown.run_until_cancelled(notices.next()).await {
        match std::str::from_utf8(&notice.payload).map(IdempotencyKey::parse_scoped) {
            Ok(Ok(key)) => cache.remove(&key),
            _ => tracing::debug!("ignored a malformed purge notice"),
        }
    }
}

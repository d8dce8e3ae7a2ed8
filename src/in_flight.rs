//! Keys this worker is working on right now, so that local copies of a
//! key wait for the delivery at work on it instead of racing it to the
//! store.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

use crate::key::IdempotencyKey;

/// Keys this worker is working on right now.
///
/// The first delivery of a key leads: it claims (or waits in the store) as
/// usual. Copies of the same key that reach this worker meanwhile follow:
/// they wait for the leader to finish and then read its outcome from the
/// [`OutcomeCache`](crate::cache::OutcomeCache), instead of each claiming, reading and watching the key
/// in the store. In a retry storm that turns K store round trips and up to
/// K JetStream watch consumers per key into one.
#[derive(Default)]
pub struct InFlightKeys {
    /// By [`IdempotencyKey::bits`], as the outcome cache keys its entries,
    /// with the whole key each is compared with.
    keys: Mutex<HashMap<u64, (IdempotencyKey, watch::Receiver<()>)>>,
}

/// This delivery's turn on a key.
pub enum Turn<'a> {
    /// Do the work; dropping the guard releases the followers.
    Lead(LeadGuard<'a>),
    /// Wait for the leader: `changed()` returns (with an error) when it is done.
    Follow(watch::Receiver<()>),
}

/// Held by the leading delivery of a key.
pub struct LeadGuard<'a> {
    keys: &'a InFlightKeys,
    /// The slot this guard holds in the map; `None` when another key with
    /// the same bits holds it (this delivery then leads alone).
    key: Option<u64>,
    // Dropped after `Drop::drop` has removed the entry: followers wake to
    // find the key no longer in flight and the outcome (if any) cached.
    _done: watch::Sender<()>,
}

impl InFlightKeys {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (IdempotencyKey, watch::Receiver<()>)>> {
        // A plain map with single inserts and removes: usable after a panic.
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Leads on `key`, or follows the delivery that already does.
    pub fn enter(&self, key: &IdempotencyKey) -> Turn<'_> {
        let bits = key.bits();
        let mut keys = self.lock();
        let (sender, receiver) = watch::channel(());
        let slot = match keys.get(&bits) {
            Some((held, done)) if held == key => return Turn::Follow(done.clone()),
            // Another key with the same bits (another tenant's, perhaps
            // crafted): no waiting on it; this one goes to the store.
            Some(_) => None,
            None => {
                keys.insert(bits, (key.clone(), receiver));
                Some(bits)
            }
        };
        Turn::Lead(LeadGuard {
            keys: self,
            key: slot,
            _done: sender,
        })
    }
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        if let Some(bits) = self.key {
            self.keys.lock().remove(&bits);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_wake_when_the_leader_is_done() {
        let keys = InFlightKeys::default();
        let key = IdempotencyKey::generate("inflight", "ep", 1);
        let Turn::Lead(guard) = keys.enter(&key) else {
            panic!("the first delivery leads");
        };
        let Turn::Follow(mut done) = keys.enter(&key) else {
            panic!("a second delivery follows");
        };
        drop(guard);
        assert!(
            done.changed().await.is_err(),
            "the leader's end wakes followers"
        );
        assert!(
            matches!(keys.enter(&key), Turn::Lead(_)),
            "the key is free again"
        );
    }
}

//! What one case runs on ([`Ctx`]): the faulty store over the real one,
//! the keys, the model's clock and the trace; and how often each path was
//! taken over all cases of a property ([`Coverage`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use idemq::store::IdempotencyStore;
use idemq::IdempotencyKey;
use tokio::time::Instant;

use crate::clock::{Clock, Timing};
use crate::faulty::{lock, Faulty, Landed, Seen, Shared};
use crate::schedule::Step;

/// How often each interesting path was taken, over all cases of a property.
#[derive(Default)]
pub struct Coverage(Mutex<std::collections::BTreeMap<&'static str, u64>>);

impl Coverage {
    pub fn hit(&self, what: &'static str) {
        *self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(what)
            .or_default() += 1;
    }

    pub fn count(&self, what: &str) -> u64 {
        let counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        counts.get(what).copied().unwrap_or(0)
    }

    pub fn summary(&self) -> String {
        let counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        counts
            .iter()
            .map(|(what, n)| format!("  {n:>7}  {what}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

pub struct Ctx {
    pub store: Faulty,
    pub coverage: Arc<Coverage>,
    pub inner: Arc<dyn IdempotencyStore>,
    pub shared: Arc<Mutex<Shared>>,
    pub keys: Vec<IdempotencyKey>,
    pub clock: Clock,
    /// Names owner tokens apart across cases on a shared store.
    pub run: String,
}

impl Ctx {
    pub fn new(
        inner: Arc<dyn IdempotencyStore>,
        keys: Vec<IdempotencyKey>,
        timing: Timing,
        coverage: Arc<Coverage>,
    ) -> Ctx {
        let origin = Instant::now();
        let shared = Arc::new(Mutex::new(Shared {
            origin,
            keys: keys.iter().cloned().zip(0..).collect(),
            log: Vec::new(),
            fault: None,
            writes: 0,
            reads_fail: false,
            stale: None,
            // Every key starts with no message.
            timeline: (0..keys.len())
                .map(|key| {
                    let seen = Seen {
                        at: origin,
                        view: None,
                        until: None,
                    };
                    (key, vec![seen])
                })
                .collect(),
            step: 0,
            trace: Vec::new(),
            in_flight: 0,
        }));
        Ctx {
            coverage: Arc::clone(&coverage),
            store: Faulty {
                inner: Arc::clone(&inner),
                shared: Arc::clone(&shared),
                coverage: Arc::clone(&coverage),
            },
            inner,
            shared,
            keys,
            clock: Clock { timing },
            run: nuid::next().to_string()[..6].to_owned(),
        }
    }

    pub fn hit(&self, what: &'static str) {
        self.coverage.hit(what);
    }

    pub fn timing(&self) -> &Timing {
        &self.clock.timing
    }

    pub fn log(&self) -> Vec<Landed> {
        lock(&self.shared).log.clone()
    }

    pub fn log_len(&self) -> usize {
        lock(&self.shared).log.len()
    }

    pub fn note(&self, line: String) {
        lock(&self.shared).trace(line);
    }

    pub fn arm(&self, index: usize, step: &Step) {
        let mut shared = lock(&self.shared);
        shared.step = index;
        shared.fault = step.fault;
        shared.writes = 0;
        shared.reads_fail = step.reads_fail;
        shared.stale = step.stale.map(|lag| self.clock.timing.lag[lag as usize]);
    }

    pub fn disarm(&self) {
        let mut shared = lock(&self.shared);
        shared.fault = None;
        shared.reads_fail = false;
        shared.stale = None;
    }

    /// Waits (bounded) until every write a step sent has landed or
    /// failed, so that the step's checks see them.
    pub async fn settle(&self) {
        for _ in 0..5000 {
            if lock(&self.shared).in_flight == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.note("  writes still in flight after 5 s".to_owned());
    }

    pub fn trace(&self) -> String {
        lock(&self.shared).trace.join("\n")
    }
}

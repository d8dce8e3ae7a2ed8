//! The life of one delivery: decode -> key -> claim -> handle -> complete.
//!
//! [`Pipeline::handle`] is the whole path of one message in one place; it
//! ends in a [`Verdict`] that says what to answer and whether the delivery
//! is settled or should be tried again. The two delivery modes differ only
//! in what they do with a verdict: core mode answers every one, JetStream
//! mode answers settled ones and naks the rest (`delivery/jetstream.rs`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{field, Instrument};

use crate::cache::{Lookup, OutcomeCache};
use crate::config::{Delivery, WorkerConfig};
use crate::handler::{Call, Handler, HandlerError};
use crate::in_flight::{InFlightKeys, Turn};
use crate::intent::{
    copy_digest, fingerprint_bits, is_publish_subject, named_reply_target, CopyDigest, Fingerprint,
    Intent, IntentError, Limits, REPLY_TO_HEADER,
};
use crate::key::IdempotencyKey;
use crate::outcome::{Outcome, Record};
use crate::reply::{EncodedReply, Reply};
use crate::reply_policy::ReplyPolicy;
use crate::run_once::{Attempt, Claimed, Done, Idempotent, RunError, RunRequest, MIN_RETRY_AFTER};
use crate::stats::Stats;
use crate::store::{IdempotencyStore, StoreError};
use crate::verdict::{Handled, Rejection, Verdict};
use prometheus_client::metrics::counter::Counter;

/// Suggested retry delay after a transient failure.
const TRANSIENT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Everything the per-intent path needs, shared by all in-flight intents.
pub struct Pipeline {
    /// The connection replies go out on.
    pub(crate) client: async_nats::Client,
    /// Claims, runs and stores: the same path as [`Idempotent::run`].
    once: Idempotent,
    /// What executes intents.
    handler: Arc<dyn Handler>,
    /// The worker's settings.
    pub(crate) config: WorkerConfig,
    /// Counters.
    pub(crate) stats: Arc<Stats>,
    /// Unique per worker process; prefixes claim owner tokens.
    pub(crate) instance: String,
    /// Outcomes this worker has seen, to answer replays without the store.
    pub(crate) cache: OutcomeCache,
    /// Keys being worked on here, so local copies wait instead of racing.
    in_flight: InFlightKeys,
    /// Whether to read before claiming, from how claims have gone lately.
    odds: ReplayOdds,
    /// Where replies may go.
    replies: ReplyPolicy,
}

impl Pipeline {
    /// The path of every intent of a worker over `store`, executing with
    /// `handler`, publishing on `client`.
    pub fn new(
        client: async_nats::Client,
        store: Arc<dyn IdempotencyStore>,
        handler: Arc<dyn Handler>,
        config: WorkerConfig,
    ) -> Pipeline {
        let stats = Arc::<Stats>::default();
        let instance = nuid::next().to_string();
        let options = config.run_options();
        let replies = reply_policy(&client, handler.as_ref(), &config);
        let cache = OutcomeCache::new(config.cache_bytes)
            .shown_on(stats.cache_entries.clone(), stats.cache_bytes.clone());
        Pipeline {
            client,
            once: Idempotent::with_stats(
                Arc::clone(&store),
                options,
                Arc::clone(&stats),
                instance.clone(),
            ),
            stats,
            instance,
            cache,
            in_flight: InFlightKeys::default(),
            odds: ReplayOdds::default(),
            replies,
            handler,
            config,
        }
    }

    /// The store claims and outcomes go to.
    pub fn store(&self) -> &Arc<dyn IdempotencyStore> {
        self.once.store()
    }
}

/// The subjects idemq itself publishes under: `idemq.purge.<bucket>`,
/// `idemq.status.<instance>`, `idemq.dlq.<stream>`.
const OWN_NAMESPACE: &str = "idemq.>";

/// Where this worker's replies may go (docs/contract.md v1.2 §2): never to a
/// subject it takes intents from or publishes to on its own behalf: what
/// the handler calls, the dead-letter subject, purge notices, the status
/// endpoints (all of `idemq.>`), and its own inboxes (when they have a prefix of their own:
/// `idemq serve` gives them one, `_INBOX.<id>`; with the shared default
/// `_INBOX` every client's inboxes would be refused with it).
fn reply_policy(
    client: &async_nats::Client,
    handler: &dyn Handler,
    config: &WorkerConfig,
) -> ReplyPolicy {
    let mut policy = ReplyPolicy::new(&config.subjects, &config.reply_allow);
    if let Some(pattern) = handler.publishes_to() {
        policy.reserve(&pattern, "it is one of the subjects the handler sends to");
    }
    if let Delivery::JetStream(js) = &config.delivery {
        policy.reserve(&js.dead_letter_subject, "it is the dead-letter subject");
    }
    // Purge notices, status endpoints and the default dead-letter subjects.
    policy.reserve(
        OWN_NAMESPACE,
        "it is in the workers' own namespace (purge notices, status, dead letters)",
    );
    let inbox = client.new_inbox();
    if let Some((prefix, _)) = inbox.rsplit_once('.').filter(|(p, _)| *p != "_INBOX") {
        policy.reserve(
            &format!("{prefix}.>"),
            "it is one of the worker's own inboxes",
        );
    }
    policy
}

/// How often claims lately found their key already stored or claimed: a
/// copy the outcome cache did not know (another worker's outcome, or one
/// evicted). When most did, reading first answers such a copy in one
/// store round trip instead of a losing claim and then a read; when few
/// did, claiming first spares fresh keys the read. Either order is
/// correct (a read decides nothing a claim would not), so a wrong guess
/// costs one round trip, never an extra execution.
#[derive(Debug, Default)]
pub struct ReplayOdds {
    tries: AtomicU32,
    taken: AtomicU32,
}

impl ReplayOdds {
    /// Outcomes remembered, about (older ones count half, then less).
    const WINDOW: u32 = 256;

    /// Whether the last tries mostly found the key taken.
    pub fn read_first(&self) -> bool {
        let tries = self.tries.load(Ordering::Relaxed);
        tries >= 16 && 2 * self.taken.load(Ordering::Relaxed) > tries
    }

    /// Remembers one try. Racing updates may lose a count: only a guess.
    pub fn record(&self, taken: bool) {
        let tries = self.tries.fetch_add(1, Ordering::Relaxed) + 1;
        let found = if taken {
            self.taken.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.taken.load(Ordering::Relaxed)
        };
        if tries >= Self::WINDOW {
            self.tries.store(tries / 2, Ordering::Relaxed);
            self.taken.store(found / 2, Ordering::Relaxed);
        }
    }
}

/// Decrements the in-flight gauge however the task ends.
struct InFlight(Arc<Stats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// One delivery as it reaches the pipeline: what the message carries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Incoming<'a> {
    /// The subject it was published on.
    pub(crate) subject: &'a str,
    /// Its reply subject when that is a reply target (core mode; in
    /// JetStream mode it is the ack subject, and `None` here).
    pub(crate) own_reply: Option<&'a str>,
    /// Its headers.
    pub(crate) headers: Option<&'a HeaderMap>,
    /// Its payload, the intent's JSON.
    pub(crate) payload: &'a Bytes,
}

impl Pipeline {
    /// Handles one delivery: a byte-identical copy of one answered from the
    /// cache is answered at once; anything else is decoded and its reply
    /// targets vetted, then claimed (or waited for) and run. `abandon` is
    /// cancelled when shutdown gives up waiting: a running handler is then
    /// dropped and its claim released.
    pub(crate) async fn handle(
        &self,
        incoming: Incoming<'_>,
        abandon: &CancellationToken,
    ) -> Handled {
        self.stats.received.inc();
        self.stats.in_flight.inc();
        let _in_flight = InFlight(Arc::clone(&self.stats));
        // Every reply target is vetted before anything runs: a refused one
        // makes the intent invalid and is never published to.
        let own_refused = incoming
            .own_reply
            .and_then(|own| self.replies.check(own).err());
        let digest = self.digest_of(&incoming);
        if let Some(hit) = digest
            .as_ref()
            .filter(|_| own_refused.is_none())
            .and_then(|digest| self.replay_by_digest(digest, &incoming))
        {
            return hit;
        }
        let (intent, answer_own) = match self.decode_and_vet(&incoming, own_refused) {
            Ok(vetted) => vetted,
            Err(refused) => return *refused,
        };
        // The fingerprint's bits, read once for the cache's lookups, the
        // alias and the reply's `Nats-Msg-Id`.
        let fingerprint = fingerprint_bits(&intent.fingerprint);
        let verdict = self
            .execute_in_span(&intent, fingerprint.as_ref(), incoming.payload, abandon)
            .await;
        // A stored outcome's answer: later byte-identical copies of this
        // message find it by its digest.
        if let (Some(digest), Some(fingerprint), Verdict::Settled(reply)) =
            (digest, &fingerprint, &verdict)
        {
            if reply.stored {
                let in_header = incoming
                    .headers
                    .is_some_and(|h| h.get(REPLY_TO_HEADER).is_some());
                let named_in_body = intent.reply_to.as_deref().filter(|_| !in_header);
                self.cache
                    .alias(digest, &intent.key, fingerprint, named_in_body);
            }
        }
        Handled {
            verdict,
            answer_own,
            fingerprint: fingerprint.map(|bits| bits[0]),
            reply_to: intent.reply_to.map(Subject::from),
        }
    }

    /// The digest of a delivery's bytes, when a cached answer could be
    /// found by it. At debug level every copy is decoded instead, so that
    /// its span and "answered" event carry every field.
    fn digest_of(&self, incoming: &Incoming<'_>) -> Option<CopyDigest> {
        (self.cache.is_enabled() && !tracing::enabled!(tracing::Level::DEBUG))
            .then(|| copy_digest(incoming.subject, incoming.headers, incoming.payload))
    }

    /// The fast path: a copy byte-identical to one answered from a live
    /// cache entry is answered undecoded, since the same bytes decode to the
    /// same intent, key, fingerprint and named reply target (vetted then).
    fn replay_by_digest(&self, digest: &CopyDigest, incoming: &Incoming<'_>) -> Option<Handled> {
        let hit = self.cache.lookup_copy(digest)?;
        self.stats.replayed_by_digest.inc();
        // A target named in the header is read from it again (the same
        // bytes); the alias keeps only one named in the body.
        let reply_to = hit.reply_to.or_else(|| {
            incoming
                .headers
                .and_then(|h| h.get(REPLY_TO_HEADER))
                .map(|v| Subject::from(v.as_str()))
        });
        Some(Handled {
            verdict: self.replayed(hit.replay),
            answer_own: incoming.own_reply.is_some(),
            reply_to,
            fingerprint: Some(hit.fingerprint),
        })
    }

    /// Decodes the intent and vets where it may be answered: the intent and
    /// whether its own reply subject may be answered, or the delivery as
    /// refused (`INVALID_INTENT` and its kin). A refused reply target
    /// outranks what else is wrong: it is the one thing the caller must not
    /// try again; a refused own reply subject means no answer at all, and a
    /// refused named target is never answered on.
    fn decode_and_vet(
        &self,
        incoming: &Incoming<'_>,
        own_refused: Option<IntentError>,
    ) -> Result<(Intent, bool), Box<Handled>> {
        let limits = Limits {
            max_payload: self.config.max_payload,
            tenant_token: self.config.tenant_token,
        };
        let decoded = Intent::decode(incoming.subject, incoming.headers, incoming.payload, limits);
        let named = match &decoded {
            Ok(intent) => intent.reply_to.as_deref(),
            Err(invalid) => invalid.reply_to.as_deref(),
        };
        let named_refused = named.and_then(|named| self.replies.check(named).err());
        let answer_own = incoming.own_reply.is_some() && own_refused.is_none();
        let named_ok = own_refused.is_none() && named_refused.is_none();
        let (idem_key, intent_id, reply_to, error) = match (decoded, own_refused.or(named_refused))
        {
            (Ok(intent), None) => return Ok((intent, answer_own)),
            (Ok(intent), Some(refused)) => (
                Some(intent.key),
                Some(intent.intent_id),
                intent.reply_to,
                refused,
            ),
            (Err(invalid), refused) => (
                invalid.idem_key,
                invalid.intent_id,
                invalid.reply_to,
                refused.unwrap_or(invalid.error),
            ),
        };
        tracing::debug!(subject = %incoming.subject, "invalid intent");
        Err(Box::new(Handled {
            verdict: self.refusal(idem_key, intent_id, Rejection::Invalid(error)),
            answer_own,
            reply_to: reply_to.filter(|_| named_ok).map(Subject::from),
            fingerprint: None,
        }))
    }

    /// [`execute`](Self::execute) in the intent's span, which the debug
    /// "answered" event closes with the outcome.
    async fn execute_in_span(
        &self,
        intent: &Intent,
        fingerprint: Option<&Fingerprint>,
        payload: &Bytes,
        abandon: &CancellationToken,
    ) -> Verdict {
        let span = tracing::info_span!(
            "intent",
            idem_key = %intent.key,
            intent_id = %intent.intent_id,
            capability = %intent.capability,
            outcome = field::Empty,
            code = field::Empty,
            replayed = field::Empty,
        );
        // The claim and the execution are boxed in two pieces (here, and
        // `Idempotent::execute`): each then fits glibc's per-thread cache of
        // small blocks, where one task of over 2 KiB took the allocator's
        // slow, consolidating path for every intent.
        let verdict = Box::pin(self.execute(intent, fingerprint, payload, abandon))
            .instrument(span.clone())
            .await;
        // Only the debug event reads these fields; recording them costs a
        // formatting pass per field even when nothing is printed.
        if tracing::enabled!(tracing::Level::DEBUG) {
            let answer = verdict.answer();
            span.record("outcome", answer.status.as_str());
            span.record("replayed", answer.replayed);
            if let Some(code) = answer.status.code() {
                span.record("code", code);
            }
            span.in_scope(|| tracing::debug!("answered"));
        }
        verdict
    }

    /// The answer to a delivery refused before it is decoded (core mode's
    /// `OVERLOADED`, a delivery that reached a stopping worker): its reply
    /// targets are vetted as any intent's (a refused own reply subject
    /// means no answer at all), and the named one is read from the header,
    /// else from the body's `reply_to` alone.
    pub(crate) fn refuse_undecoded(
        &self,
        own_reply: Option<&str>,
        headers: Option<&HeaderMap>,
        payload: &[u8],
        rejection: Rejection,
    ) -> Handled {
        self.stats.received.inc();
        let vetted =
            |target: &str| is_publish_subject(target) && self.replies.check(target).is_ok();
        let (answer_own, reply_to) = match own_reply {
            Some(own) => (vetted(own), None),
            None => (
                false,
                named_reply_target(headers, payload).filter(|named| vetted(named)),
            ),
        };
        Handled {
            verdict: self.refusal(None, None, rejection),
            answer_own,
            reply_to: reply_to.map(Subject::from),
            fingerprint: None,
        }
    }

    /// Claims the key (or waits for its holder) and decides.
    async fn execute(
        &self,
        intent: &Intent,
        fingerprint: Option<&Fingerprint>,
        payload: &Bytes,
        abandon: &CancellationToken,
    ) -> Verdict {
        if let Some(verdict) = self.cached(intent, fingerprint) {
            return verdict;
        }
        // Before anything is read: a purge notice from now on keeps what
        // is read out of the cache.
        let purges = self.cache.purges();
        // Held until this delivery is done; `None` for a follower that
        // goes on to the store itself.
        let _lead = match self.in_flight.enter(&intent.key) {
            Turn::Lead(guard) => Some(guard),
            Turn::Follow(mut done) => {
                self.stats.waited.inc();
                // Another delivery of this key is at work here: wait for it,
                // then answer from what it left in the cache.
                if tokio::time::timeout(self.config.wait, done.changed())
                    .await
                    .is_err()
                {
                    let retry_after = self.config.wait.max(MIN_RETRY_AFTER);
                    return self.refuse(intent, Rejection::InProgress { retry_after });
                }
                if let Some(verdict) = self.cached(intent, fingerprint) {
                    return verdict;
                }
                // It ended without a stored outcome (a transient failure, a
                // refusal, nothing cacheable): this copy asks the store.
                None
            }
        };
        // When recent claims mostly found their key taken, read first: the
        // claim protocol then decides from that read (a stored outcome in
        // one round trip, a running claim followed from the revision seen).
        // A failed read leaves it all to the claim.
        let seen = if self.odds.read_first() {
            self.once.store().read(&intent.key).await.ok().flatten()
        } else {
            None
        };
        let request = RunRequest {
            key: &intent.key,
            fingerprint: &intent.fingerprint,
            intent_id: &intent.intent_id,
            ttl: Some(self.config.outcome_ttl(intent.ttl_secs)),
        };
        let claimed = self.once.claim(&request, seen).await;
        match &claimed {
            Ok(Claimed::Owner(_)) => self.odds.record(false),
            Ok(Claimed::Stored(_)) | Err(RunError::KeyReused | RunError::InProgress { .. }) => {
                self.odds.record(true);
            }
            Err(_) => {}
        }
        let done = match claimed {
            Ok(Claimed::Owner(lease)) => {
                let run = |attempt: Attempt| {
                    self.handler.handle(Call {
                        intent,
                        payload,
                        attempt: attempt.number,
                    })
                };
                Box::pin(self.once.execute(&request, lease, abandon, run)).await
            }
            Ok(Claimed::Stored(done)) => Ok(done),
            Err(error) => Err(error),
        };
        self.verdict(intent, done, purges)
    }

    /// The verdict on how the claim and the run ended; `purges` as the
    /// cache counted them before the store was read.
    fn verdict(&self, intent: &Intent, done: Result<Done, RunError>, purges: u64) -> Verdict {
        let rejection = match done {
            Ok(done) => {
                if done.waited {
                    self.stats.waited.inc();
                }
                let fresh = done.execution.is_some();
                return self.answer_stored(intent, done.record(), fresh, purges);
            }
            Err(RunError::Released {
                error: HandlerError::Transient { code, message },
                ..
            }) => {
                let reply = self.unstored(intent, Outcome::error(code, message));
                return Verdict::Retry {
                    reply: reply.into(),
                    after: TRANSIENT_RETRY_AFTER,
                };
            }
            // The handler ran: its outcome is the answer, but nothing is
            // settled. JetStream mode naks, so the intent stays in its
            // stream; its redelivery finds the key free and executes again
            // (the documented window of a lost lease), or finds an outcome
            // after all.
            Err(RunError::Unstored { outcome, .. }) => {
                let reply = Reply::executed_unstored(
                    Some(intent.key.clone()),
                    Some(intent.intent_id.clone()),
                    outcome,
                );
                return Verdict::Retry {
                    reply: reply.into(),
                    after: TRANSIENT_RETRY_AFTER,
                };
            }
            Err(RunError::Released { error, .. }) => Rejection::Declined(error),
            Err(RunError::KeyReused) => Rejection::KeyReused,
            Err(RunError::InProgress { retry_after }) => {
                if !self.config.wait.is_zero() {
                    self.stats.waited.inc();
                }
                Rejection::InProgress { retry_after }
            }
            Err(RunError::Cancelled) => Rejection::ShuttingDown,
            Err(RunError::Store(error)) => Rejection::StoreUnavailable(error),
        };
        self.refuse(intent, rejection)
    }

    /// A stored record answered: its one encoding for this delivery
    /// (`replayed: false` when this delivery executed it), and its replay
    /// encoding kept by the cache for later copies (unless a purge notice
    /// came since `purges`).
    fn answer_stored(&self, intent: &Intent, record: &Record, fresh: bool, purges: u64) -> Verdict {
        let Some(answer) = EncodedReply::of_record(record, !fresh) else {
            let corrupt = StoreError::Corrupt {
                key: intent.key.to_string(),
                reason: "done record without a result".to_owned(),
            };
            return self.refuse(intent, Rejection::StoreUnavailable(corrupt));
        };
        if self.cache.is_enabled() {
            let replay = if fresh {
                EncodedReply::of_record(record, true)
            } else {
                Some(Arc::clone(&answer))
            };
            if let Some(replay) = replay {
                self.cache.insert(record, &replay, purges);
            }
        }
        if fresh {
            Verdict::Settled(answer)
        } else {
            self.replayed(answer)
        }
    }

    /// The verdict the cache already knows, if any.
    fn cached(&self, intent: &Intent, fingerprint: Option<&Fingerprint>) -> Option<Verdict> {
        match self.cache.lookup(&intent.key, fingerprint) {
            Lookup::Stored(replay) => Some(self.replayed(replay)),
            Lookup::Reused => Some(self.refuse(intent, Rejection::KeyReused)),
            Lookup::Miss => None,
        }
    }

    fn replayed(&self, replay: Arc<EncodedReply>) -> Verdict {
        self.stats.replayed.inc();
        Verdict::Settled(replay)
    }

    fn unstored(&self, intent: &Intent, outcome: Outcome) -> Reply {
        Reply::unstored(
            Some(intent.key.clone()),
            Some(intent.intent_id.clone()),
            outcome,
        )
    }

    /// The verdict for refusing a valid intent.
    fn refuse(&self, intent: &Intent, rejection: Rejection) -> Verdict {
        self.refusal(
            Some(intent.key.clone()),
            Some(intent.intent_id.clone()),
            rejection,
        )
    }

    /// The verdict for a refusal, answered under what could be read of the
    /// message: invalid ones are dead-lettered, final ones settle, the rest
    /// are retried.
    fn refusal(
        &self,
        idem_key: Option<IdempotencyKey>,
        intent_id: Option<String>,
        rejection: Rejection,
    ) -> Verdict {
        // An overloaded worker refuses many at once: counted, not a line each.
        if matches!(rejection, Rejection::Overloaded { .. }) {
            tracing::debug!(code = rejection.code(), "intent refused");
        } else {
            tracing::info!(code = rejection.code(), reason = %rejection, "intent refused");
        }
        let reply: Arc<EncodedReply> =
            Reply::unstored(idem_key, intent_id, rejection.outcome()).into();
        let retry = |counter: &Counter, after| {
            counter.inc();
            Verdict::Retry {
                reply: Arc::clone(&reply),
                after,
            }
        };
        match &rejection {
            Rejection::Invalid(_) => {
                self.stats.count_invalid(rejection.code());
                Verdict::Invalid(reply)
            }
            Rejection::KeyReused => {
                self.stats.key_reused.inc();
                Verdict::Settled(reply)
            }
            Rejection::InProgress { retry_after } => retry(&self.stats.in_progress, *retry_after),
            Rejection::Overloaded { retry_after } => retry(&self.stats.overloaded, *retry_after),
            Rejection::StoreUnavailable(_) => {
                retry(&self.stats.store_errors, TRANSIENT_RETRY_AFTER)
            }
            Rejection::Declined(_) | Rejection::ShuttingDown => {
                retry(&self.stats.transient, TRANSIENT_RETRY_AFTER)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_odds_follow_how_claims_went() {
        let odds = ReplayOdds::default();
        assert!(!odds.read_first(), "fresh workers claim first");
        for _ in 0..40 {
            odds.record(true);
        }
        assert!(odds.read_first(), "mostly taken: read first");
        for _ in 0..600 {
            odds.record(false);
        }
        assert!(!odds.read_first(), "mostly fresh again: claim first");
        for i in 0..600 {
            odds.record(i % 3 == 0);
        }
        assert!(!odds.read_first(), "a third taken is not most");
    }
}

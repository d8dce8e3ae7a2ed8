//! What answers the load: the baseline responders, and idemq itself.
//!
//! Every responder takes requests the way the worker does: a subscription
//! (or, in JetStream mode, a durable pull consumer's message stream) read
//! through the worker's [`Intake`], one task per message holding a permit
//! of the same in-flight bound. So a baseline differs from idemq only in
//! the work done per message, which is what the ratios compare.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, kv};
use async_nats::{Client, HeaderMap, Message, Request, RequestErrorKind, Subject};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::report::CacheUse;
use super::BenchError;
use idemq::config::{Delivery, JetStreamConfig, WorkerConfig};
use idemq::handler::{Call, Echo, Handler, HandlerError};
use idemq::intake::Intake;
use idemq::intent::REPLY_TO_HEADER;
use idemq::key::IdempotencyKey;
use idemq::outcome::Outcome;
use idemq::reply::{Reply, ERROR_CODE_HEADER, STATUS_HEADER};
use idemq::server::{Server, ServerConfig};
use idemq::store::kv::BucketConfig;

/// How long a stopping responder waits for its in-flight messages, and a
/// stopping worker for its shutdown (its grace, releases and flush).
const STOP_BOUND: Duration = Duration::from_secs(15);
/// The benchmarked worker's shutdown grace: the load has ended by then.
const WORKER_GRACE: Duration = Duration::from_secs(2);
/// How long a responder may take to answer its first probe.
const READY_BOUND: Duration = Duration::from_secs(10);
/// How long an external worker has to answer `$SRV.STATS.idemq`.
const STATS_WINDOW: Duration = Duration::from_millis(500);
/// Timeout of one readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between probes that found no responder yet.
const PROBE_PAUSE: Duration = Duration::from_millis(50);
/// The error code of a baseline's failed request.
const BASELINE_ERROR: &str = "BENCH_BASELINE_FAILED";
/// The durable consumer of every stream the bench consumes.
pub(super) const DURABLE: &str = "bench";
/// A plain pull consumer's pull requests: a continuous pull with this
/// expiry and idle heartbeat, in batches of half the in-flight bound, at
/// most [`MAX_PULL_BATCH`]. (idemq's worker pulls only as many as it has
/// free permits instead; see src/delivery/jetstream.rs.)
const PULL_EXPIRES: Duration = Duration::from_secs(30);
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);
const MAX_PULL_BATCH: usize = 256;

/// Counts handler executions per key, to find duplicates.
///
/// Keys are held as the 64-bit number their 16 hex digits spell, not as
/// strings: the count lives in the process whose peak RSS is measured.
#[derive(Debug, Default)]
pub(super) struct Executions {
    per_key: Mutex<HashMap<u64, u32>>,
}

/// Executions counted since the last [`Executions::take`].
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Tally {
    /// Handler executions.
    pub executions: u64,
    /// Executions beyond the first of their key.
    pub duplicates: u64,
}

impl Executions {
    fn record(&self, key: &IdempotencyKey) {
        let hex = key.as_str().trim_start_matches("idem_");
        // A valid key is `idem_` and 16 hex digits, so this cannot fail;
        // were it to, all such keys would count as one (never as fewer
        // duplicates than there are).
        let number = u64::from_str_radix(hex, 16).unwrap_or(u64::MAX);
        // A poisoned lock only means a counting thread panicked; the map
        // itself is still a valid count.
        let mut per_key = self.per_key.lock().unwrap_or_else(PoisonError::into_inner);
        *per_key.entry(number).or_default() += 1;
    }

    /// Returns the count so far and starts a new one.
    pub fn take(&self) -> Tally {
        let per_key =
            std::mem::take(&mut *self.per_key.lock().unwrap_or_else(PoisonError::into_inner));
        per_key.values().fold(Tally::default(), |tally, &n| Tally {
            executions: tally.executions + u64::from(n),
            duplicates: tally.duplicates + u64::from(n.saturating_sub(1)),
        })
    }
}

/// The echo handler, counting its executions per key.
struct CountingEcho {
    executions: Arc<Executions>,
}

#[async_trait]
impl Handler for CountingEcho {
    async fn handle(&self, call: Call<'_>) -> Result<Outcome, HandlerError> {
        self.executions.record(&call.intent.key);
        Echo.handle(call).await
    }
}

/// The baselines: what each does per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Baseline {
    /// (a) Reply with the payload.
    Echo,
    /// (b) Create the key, run the handler, update the key with the outcome, reply.
    CreateUpdate,
    /// (c) Get the key, reply with what is stored.
    Get,
    /// (d) Get the key; reply with it if stored, else run the handler, put
    /// the outcome, reply. No claim: concurrent copies can all execute.
    Naive,
}

/// The fields a seed-era worker reads from an intent.
#[derive(Deserialize)]
struct SeedIntent {
    intent_id: String,
    actor: String,
    episode: String,
    step_idx: Option<u32>,
    #[serde(default)]
    params: serde_json::Value,
}

/// A baseline's per-message work.
struct Work {
    client: Client,
    baseline: Baseline,
    kv: Option<kv::Store>,
    executions: Arc<Executions>,
}

impl Work {
    /// A core request: answered on its own reply subject.
    async fn answer(&self, message: Message) {
        let Some(reply_to) = message.reply else {
            return;
        };
        self.respond(reply_to, &message.payload).await;
    }

    /// A pull consumer's delivery: answered on its `Idem-Reply-To`, then
    /// acked (the reply is published first, on the same connection).
    async fn answer_delivery(&self, message: jetstream::Message) {
        let reply_to = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(REPLY_TO_HEADER))
            .map(|value| Subject::from(value.as_str()));
        if let Some(reply_to) = reply_to {
            self.respond(reply_to, &message.payload).await;
        }
        if let Err(error) = message.ack().await {
            tracing::debug!(%error, "baseline ack not sent");
        }
    }

    /// Does the baseline's work on `payload` and publishes the reply (or
    /// an `Idem-Status: Error` reply) to `reply_to`.
    async fn respond(&self, reply_to: Subject, payload: &Bytes) {
        let published = match self.reply(payload).await {
            Ok(body) => self.client.publish(reply_to, body).await,
            Err(problem) => {
                let mut headers = HeaderMap::new();
                headers.insert(STATUS_HEADER, "Error");
                headers.insert(ERROR_CODE_HEADER, BASELINE_ERROR);
                self.client
                    .publish_with_headers(reply_to, headers, problem.into())
                    .await
            }
        };
        if let Err(error) = published {
            tracing::debug!(%error, "baseline reply not sent");
        }
    }

    async fn reply(&self, payload: &Bytes) -> Result<Bytes, String> {
        match self.baseline {
            Baseline::Echo => Ok(payload.clone()),
            Baseline::CreateUpdate => {
                let (kv, key, intent) = self.decode(payload)?;
                let claim = Bytes::from_static(br#"{"state":"in_progress"}"#);
                let revision = kv
                    .create(key.as_str(), claim)
                    .await
                    .map_err(|e| format!("create: {e}"))?;
                let reply = self.execute(&key, intent);
                kv.update(key.as_str(), reply.clone(), revision)
                    .await
                    .map_err(|e| format!("update: {e}"))?;
                Ok(reply)
            }
            Baseline::Get => {
                let (kv, key, _) = self.decode(payload)?;
                kv.get(key.as_str())
                    .await
                    .map_err(|e| format!("get: {e}"))?
                    .ok_or_else(|| format!("{key} is not stored"))
            }
            Baseline::Naive => {
                let (kv, key, intent) = self.decode(payload)?;
                let stored = kv
                    .get(key.as_str())
                    .await
                    .map_err(|e| format!("get: {e}"))?;
                if let Some(stored) = stored {
                    return Ok(stored);
                }
                let reply = self.execute(&key, intent);
                kv.put(key.as_str(), reply.clone())
                    .await
                    .map_err(|e| format!("put: {e}"))?;
                Ok(reply)
            }
        }
    }

    /// The bucket, and the intent and its key as a seed-era worker reads them.
    fn decode(&self, payload: &Bytes) -> Result<(&kv::Store, IdempotencyKey, SeedIntent), String> {
        let kv = self.kv.as_ref().ok_or("no bucket")?;
        let intent: SeedIntent =
            serde_json::from_slice(payload).map_err(|e| format!("not an intent: {e}"))?;
        let key = IdempotencyKey::from_intent_metadata(
            &intent.intent_id,
            &intent.actor,
            &intent.episode,
            intent.step_idx,
        );
        Ok((kv, key, intent))
    }

    /// The handler: idemq's echo, as a reply.
    fn execute(&self, key: &IdempotencyKey, intent: SeedIntent) -> Bytes {
        self.executions.record(key);
        let outcome = Outcome::Success(json!({ "echo": intent.params }));
        Reply::unstored(Some(key.clone()), Some(intent.intent_id), outcome).to_bytes()
    }
}

/// A running responder: a baseline, an in-process idemq worker, or an
/// external worker that only needs a subject.
pub(super) struct Responder {
    /// Where requests go.
    pub subject: Subject,
    /// Handler executions per key, where they can be counted in process.
    pub executions: Option<Arc<Executions>>,
    /// True when the responder runs in this process (its CPU and memory
    /// are this process's, less the load generator's).
    pub in_process: bool,
    /// True when requests go into a stream the responder consumes
    /// (JetStream mode), false for core request/reply.
    pub jetstream: bool,
    /// An idemq worker in process: its counters and gauges.
    stats: Option<Arc<idemq::stats::Stats>>,
    shutdown: CancellationToken,
    /// The responder's task; it ends with an error only if it could not start.
    task: Option<JoinHandle<Result<(), String>>>,
}

impl Responder {
    /// Starts a baseline on `subject`, with `kv` for those that use a bucket.
    pub async fn baseline(
        client: &Client,
        baseline: Baseline,
        subject: String,
        kv: Option<kv::Store>,
        concurrency: usize,
    ) -> Result<Responder, BenchError> {
        let subscriber =
            client
                .subscribe(subject.clone())
                .await
                .map_err(|e| BenchError::Setup {
                    what: format!("subscription to {subject}"),
                    reason: e.to_string(),
                })?;
        Ok(Responder::taking(
            client.clone(),
            baseline,
            subject,
            kv,
            concurrency,
            subscriber,
            false,
        ))
    }

    /// Starts a baseline consuming a new work-queue stream `stream` over
    /// `subject` (file storage) through a durable pull consumer with
    /// explicit acks, with `kv` for those that use a bucket. It answers
    /// every message on its `Idem-Reply-To`, then acks it.
    pub async fn pull_baseline(
        js: &jetstream::Context,
        baseline: Baseline,
        stream: &str,
        subject: String,
        kv: Option<kv::Store>,
        concurrency: usize,
        replicas: usize,
    ) -> Result<Responder, BenchError> {
        let setup = |what: &str, reason: String| BenchError::Setup {
            what: format!("{what} for {subject}"),
            reason,
        };
        let created = js
            .create_stream(stream::Config {
                name: stream.to_owned(),
                subjects: vec![subject.clone()],
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| setup(&format!("stream {stream}"), e.to_string()))?;
        // The consumer idemq's worker makes, with its defaults.
        let defaults = JetStreamConfig::new(stream, DURABLE);
        let consumer = created
            .create_consumer(pull::Config {
                durable_name: Some(DURABLE.to_owned()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: defaults.ack_wait,
                max_deliver: i64::from(defaults.max_deliver),
                max_ack_pending: i64::from(defaults.max_ack_pending),
                ..Default::default()
            })
            .await
            .map_err(|e| setup(&format!("consumer {DURABLE}"), e.to_string()))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch((concurrency / 2).clamp(1, MAX_PULL_BATCH))
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await
            .map_err(|e| setup("pulling", e.to_string()))?;
        Ok(Responder::taking(
            js.client(),
            baseline,
            subject,
            kv,
            concurrency,
            messages,
            true,
        ))
    }

    /// A baseline taking the messages of `source`.
    fn taking<S>(
        client: Client,
        baseline: Baseline,
        subject: String,
        kv: Option<kv::Store>,
        concurrency: usize,
        source: S,
        jetstream: bool,
    ) -> Responder
    where
        S: Stream + Unpin + Send + 'static,
        S::Item: Taken,
    {
        let executions = Arc::new(Executions::default());
        let work = Arc::new(Work {
            client,
            baseline,
            kv,
            executions: Arc::clone(&executions),
        });
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            take(source, work, concurrency, stop).await;
            Ok(())
        });
        // The echo and the get run no handler: nothing to count.
        let runs_handler = matches!(baseline, Baseline::CreateUpdate | Baseline::Naive);
        Responder {
            subject: Subject::from(subject),
            executions: runs_handler.then_some(executions),
            in_process: true,
            jetstream,
            stats: None,
            shutdown,
            task: Some(task),
        }
    }

    /// Starts an idemq worker with the counting echo handler on
    /// `<prefix>.>`, its claims and outcomes in a new bucket, taking
    /// intents as `delivery` says (in JetStream mode the worker creates
    /// the stream over its subjects, and the durable consumer).
    pub async fn idemq(
        client: &Client,
        bucket: &str,
        prefix: &str,
        concurrency: usize,
        delivery: Delivery,
        replicas: usize,
        cache_bytes: u64,
    ) -> Result<Responder, BenchError> {
        let jetstream = matches!(delivery, Delivery::JetStream(_));
        let executions = Arc::new(Executions::default());
        let handler = CountingEcho {
            executions: Arc::clone(&executions),
        };
        let config = ServerConfig {
            worker: WorkerConfig {
                subjects: vec![format!("{prefix}.>")],
                concurrency,
                grace: WORKER_GRACE,
                delivery,
                cache_bytes: usize::try_from(cache_bytes).unwrap_or(usize::MAX),
                ..WorkerConfig::default()
            },
            bucket: BucketConfig {
                bucket: bucket.to_owned(),
                replicas,
            },
            metrics_addr: None,
        };
        // The worker as `idemq serve` starts it.
        let shutdown = CancellationToken::new();
        let server = Server::start(client.clone(), Arc::new(handler), config, shutdown.clone())
            .await
            .map_err(|e| BenchError::Setup {
                what: format!("idemq worker on bucket {bucket}"),
                reason: e.to_string(),
            })?;
        let stats = Some(server.stats());
        let task = tokio::spawn(async move { server.wait().await.map_err(|e| e.to_string()) });
        Ok(Responder {
            subject: Subject::from(format!("{prefix}.echo")),
            executions: Some(executions),
            in_process: true,
            jetstream,
            stats,
            shutdown,
            task: Some(task),
        })
    }

    /// A worker running elsewhere, taking intents on `subject`.
    pub fn external(subject: String) -> Responder {
        Responder {
            subject: Subject::from(subject),
            executions: None,
            in_process: false,
            jetstream: false,
            stats: None,
            shutdown: CancellationToken::new(),
            task: None,
        }
    }

    /// What an idemq worker's outcome cache holds now: read in process,
    /// or from the one external worker answering `$SRV.STATS.idemq`
    /// (`None` when none or several answer). `None` for a baseline.
    pub async fn cache_use(&self, client: &Client) -> Option<CacheUse> {
        let snapshot = match (&self.stats, self.in_process) {
            (Some(stats), _) => stats.snapshot(),
            (None, true) => return None,
            (None, false) => {
                let workers = idemq::admin::worker_stats(client, STATS_WINDOW)
                    .await
                    .ok()?;
                match workers.as_slice() {
                    [one] => one.stats,
                    _ => return None,
                }
            }
        };
        Some(CacheUse {
            entries: snapshot.cache_entries,
            bytes: snapshot.cache_bytes,
        })
    }

    /// Waits until `probe` gets a reply, whatever it says: as a core
    /// request, or published into the stream with `Idem-Reply-To`.
    pub async fn ready(&mut self, js: &jetstream::Context, probe: Bytes) -> Result<(), BenchError> {
        let client = js.client();
        let deadline = Instant::now() + READY_BOUND;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            if let Some(task) = self.task.take_if(|task| task.is_finished()) {
                let reason = match task.await {
                    Ok(Err(error)) => error,
                    Ok(Ok(())) => "it stopped".to_owned(),
                    Err(error) => error.to_string(),
                };
                return Err(BenchError::Setup {
                    what: format!("the responder on {}", self.subject),
                    reason,
                });
            }
            if self.jetstream {
                match probe_stream(js, &self.subject, probe.clone()).await {
                    Ok(()) => return Ok(()),
                    Err(error) => last = error,
                }
                continue;
            }
            let request = Request::new()
                .payload(probe.clone())
                .timeout(Some(PROBE_TIMEOUT));
            match client.send_request(self.subject.clone(), request).await {
                Ok(_) => return Ok(()),
                Err(error) => {
                    if error.kind() == RequestErrorKind::NoResponders {
                        tokio::time::sleep(PROBE_PAUSE).await;
                    }
                    last = error.to_string();
                }
            }
        }
        Err(BenchError::NotReady {
            subject: self.subject.to_string(),
            reason: last,
        })
    }

    /// Stops taking requests and waits (bounded) for the ones in flight.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(STOP_BOUND, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => tracing::warn!(%error, "a responder stopped with an error"),
                Ok(Err(error)) => tracing::warn!(%error, "a responder task failed"),
                Err(_elapsed) => {
                    tracing::warn!(subject = %self.subject, "a responder did not stop in time")
                }
            }
        }
    }
}

/// A responder dropped without [`Responder::stop`] (a run ending in an
/// error) still stops, unwaited.
impl Drop for Responder {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// One probe published into the stream over `subject`, its reply awaited
/// on a fresh inbox.
async fn probe_stream(
    js: &jetstream::Context,
    subject: &Subject,
    probe: Bytes,
) -> Result<(), String> {
    let client = js.client();
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| e.to_string())?;
    let mut headers = HeaderMap::new();
    headers.insert(REPLY_TO_HEADER, inbox.as_str());
    let published = async {
        js.publish_with_headers(subject.clone(), headers, probe)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(PROBE_TIMEOUT, published).await {
        Ok(Ok(_ack)) => {}
        Ok(Err(error)) => {
            // No stream over the subject yet, most likely.
            tokio::time::sleep(PROBE_PAUSE).await;
            return Err(error);
        }
        Err(_elapsed) => return Err("no PubAck in time".to_owned()),
    }
    match tokio::time::timeout(PROBE_TIMEOUT, replies.next()).await {
        Ok(Some(_reply)) => Ok(()),
        Ok(None) => Err("the reply subscription ended".to_owned()),
        Err(_elapsed) => Err("no reply in time".to_owned()),
    }
}

/// What a baseline takes: a core request, or a pull consumer's delivery.
trait Taken: Send + 'static {
    /// Does the baseline's work on it and answers.
    fn answer(self, work: Arc<Work>) -> impl Future<Output = ()> + Send;
}

impl Taken for Message {
    async fn answer(self, work: Arc<Work>) {
        work.answer(self).await;
    }
}

impl Taken for Result<jetstream::Message, pull::MessagesError> {
    async fn answer(self, work: Arc<Work>) {
        match self {
            Ok(message) => work.answer_delivery(message).await,
            Err(error) => tracing::warn!(%error, "baseline pull consumer hiccup"),
        }
    }
}

/// A baseline's intake: the worker's, bound and all.
async fn take<S>(mut source: S, work: Arc<Work>, concurrency: usize, shutdown: CancellationToken)
where
    S: Stream + Unpin,
    S::Item: Taken,
{
    let intake = Intake::new(concurrency, shutdown);
    while let Some((permit, message)) = intake.next(&mut source).await {
        let work = Arc::clone(&work);
        intake.tracker().spawn(async move {
            let _permit = permit;
            message.answer(work).await;
        });
    }
    intake.tracker().close();
    if tokio::time::timeout(STOP_BOUND, intake.tracker().wait())
        .await
        .is_err()
    {
        tracing::warn!("baseline requests still running at stop");
    }
}

/// Creates a bucket as a baseline would: history 1, file storage, no TTLs.
pub(super) async fn plain_bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<kv::Store, BenchError> {
    js.create_key_value(kv::Config {
        bucket: name.to_owned(),
        history: 1,
        num_replicas: replicas,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| BenchError::Setup {
        what: format!("bucket {name}"),
        reason: e.to_string(),
    })
}

/// Deletes a stream (and its consumers); a failure is only logged, as for
/// [`delete_bucket`].
pub(super) async fn delete_stream(js: &jetstream::Context, name: &str) {
    match tokio::time::timeout(STOP_BOUND, js.delete_stream(name)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(%error, stream = name, "stream not deleted"),
        Err(_elapsed) => tracing::warn!(stream = name, "deleting the stream timed out"),
    }
}

/// Deletes a bucket; a failure is only logged (it is the bench's litter,
/// not its result).
pub(super) async fn delete_bucket(js: &async_nats::jetstream::Context, name: &str) {
    match tokio::time::timeout(STOP_BOUND, js.delete_key_value(name)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(%error, bucket = name, "bucket not deleted"),
        Err(_elapsed) => tracing::warn!(bucket = name, "deleting the bucket timed out"),
    }
}

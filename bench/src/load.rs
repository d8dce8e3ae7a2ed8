//! The load generator: a fixed set of requests, at most C in flight.
//!
//! A request is a core request/reply ([`Via::Request`]) or, in JetStream
//! mode, a JetStream publish into the responder's stream, awaiting its
//! PubAck, with `Idem-Reply-To` naming a reply subject of its own; the
//! replies arrive on one wildcard subscription and are matched to their
//! requests by subject ([`Via::Stream`]).
//!
//! It runs on a thread of its own with a single-threaded runtime and its
//! own NATS connection, the way a separate client process would: the
//! responders and the worker never share a task queue with it, and the
//! thread's CPU time ([`usage::thread_cpu`]) is the client's share of the
//! process's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Client, HeaderMap, Message, Request, RequestErrorKind, Subject, Subscriber};
use bytes::Bytes;
use futures::future::Either;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use super::{connect, usage, BenchError, Intents};
use idemq::intent::REPLY_TO_HEADER;
use idemq::nats::NatsArgs;
use idemq::reply::{ERROR_CODE_HEADER, REPLAYED_HEADER, STATUS_HEADER};

/// Highest latency the histogram holds, in microseconds; slower replies
/// are counted at this value (they are timeouts well before it).
const MAX_LATENCY_US: u64 = 60_000_000;
/// How much of an error reply's body the report keeps.
const ERROR_TEXT_CHARS: usize = 400;
/// How often a paced pass releases the requests that have fallen due.
const PACING_TICK: Duration = Duration::from_millis(1);

/// How a pass's requests reach the responder.
#[derive(Debug, Clone)]
pub(super) enum Via {
    /// Core request/reply: the reply comes to the request's own inbox.
    Request,
    /// A JetStream publish into the stream over the subject, awaiting its
    /// PubAck, with `Idem-Reply-To: <replies>.<n>` (`n` new for every
    /// request of the run); replies arrive on a subscription to
    /// `<replies>.>`.
    Stream {
        /// The prefix of the reply subjects.
        replies: String,
    },
}

/// One pass: what to send, how, and until when.
pub(super) struct Job {
    /// Where the requests go.
    pub subject: Subject,
    /// How they get there.
    pub via: Via,
    /// One intent per key.
    pub intents: Intents,
    /// Concurrent copies sent of each key (1, or the storm's `--copies`).
    pub copies: usize,
    /// Most requests in flight; keys in flight are this divided by `copies`.
    pub concurrency: usize,
    /// Keys started per second, or `None` to keep `concurrency` busy.
    pub rate: Option<f64>,
    /// No key is started after this.
    pub deadline: Instant,
    /// How long each request waits for its reply.
    pub timeout: Duration,
}

/// What one pass measured, from the client's side.
pub(super) struct Measured {
    /// Requests sent.
    pub requests: u64,
    /// Replies that carried a successful outcome.
    pub ok: u64,
    /// Replies that carried an error outcome.
    pub error_replies: u64,
    /// Requests without a reply within the timeout.
    pub timeouts: u64,
    /// Requests that failed otherwise (no responders, connection loss).
    pub failures: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
    /// Bytes of the successful replies: headers and payload, as the
    /// server carried them.
    pub ok_bytes: u64,
    /// Successful replies marked `Idem-Replayed: false`: executions, as
    /// an external worker reports them.
    pub fresh_replies: u64,
    /// Fresh replies beyond the first for one key: duplicate executions.
    pub duplicate_fresh_replies: u64,
    /// From the first request to the last reply.
    pub wall: Duration,
    /// Latency of successful replies, in microseconds.
    pub latency: Histogram<u64>,
    /// CPU time of the load generator's thread during the pass.
    pub client_cpu: Option<Duration>,
    /// True when the deadline stopped the pass before every key was sent.
    pub truncated: bool,
}

type Answer = oneshot::Sender<Result<Measured, BenchError>>;

/// A handle on the load generator's thread; dropping it ends the thread.
pub(super) struct LoadGenerator {
    jobs: mpsc::Sender<(Job, Answer)>,
    completed: Arc<AtomicU64>,
}

impl LoadGenerator {
    /// Starts the thread and connects it to the servers of `nats`.
    pub async fn start(nats: &NatsArgs) -> Result<LoadGenerator, BenchError> {
        let (jobs, queue) = mpsc::channel(1);
        let (ready, started) = oneshot::channel();
        let completed = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&completed);
        let nats = nats.clone();
        std::thread::Builder::new()
            .name("idemq-bench-load".to_owned())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(serve(nats, queue, ready, counter)),
                    Err(error) => {
                        // The receiver is waiting in `start`; if it has gone
                        // there is nobody left to tell.
                        let _ = ready.send(Err(BenchError::LoadGenerator(error.to_string())));
                    }
                }
            })
            .map_err(|e| BenchError::LoadGenerator(e.to_string()))?;
        started.await.map_err(|_| {
            BenchError::LoadGenerator("its thread ended while starting".to_owned())
        })??;
        Ok(LoadGenerator { jobs, completed })
    }

    /// Requests answered (or failed) so far in the current pass.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Runs one pass to its end.
    pub async fn run(&self, job: Job) -> Result<Measured, BenchError> {
        let (answer, measured) = oneshot::channel();
        let gone = || BenchError::LoadGenerator("its thread has ended".to_owned());
        self.jobs.send((job, answer)).await.map_err(|_| gone())?;
        measured.await.map_err(|_| gone())?
    }
}

async fn serve(
    nats: NatsArgs,
    mut queue: mpsc::Receiver<(Job, Answer)>,
    ready: oneshot::Sender<Result<(), BenchError>>,
    completed: Arc<AtomicU64>,
) {
    let client = match connect(&nats, "idemq-bench-load").await {
        Ok(client) => client,
        Err(error) => {
            // `start` is waiting for this; if it has gone, so has the bench.
            let _ = ready.send(Err(error));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    let js = jetstream::new(client.clone());
    // Numbers the reply subjects of the whole run: a late reply to an
    // earlier pass's request can never be taken for a later one's.
    let mut replies_sent = 0u64;
    while let Some((job, answer)) = queue.recv().await {
        completed.store(0, Ordering::Relaxed);
        let measured = execute(&client, &js, job, &completed, &mut replies_sent).await;
        // The caller stopped waiting only if the bench itself is ending.
        let _ = answer.send(measured);
    }
}

/// What became of one request.
enum Sample {
    Ok {
        latency: Duration,
        fresh: bool,
        bytes: usize,
    },
    ErrorReply(String),
    TimedOut,
    Failed(String),
}

/// A reply that arrived, and when.
type Arrival = (Message, Instant);

/// The replies of a pass in JetStream mode: one wildcard subscription, and
/// the requests still waiting, by the number ending their reply subject.
struct Replies {
    prefix: String,
    subscriber: Subscriber,
    waiting: HashMap<u64, oneshot::Sender<Arrival>>,
}

impl Replies {
    async fn open(client: &Client, prefix: &str) -> Result<Replies, BenchError> {
        let setup = |e: &dyn std::fmt::Display| {
            BenchError::LoadGenerator(format!("subscription to {prefix}.>: {e}"))
        };
        let subscriber = client
            .subscribe(format!("{prefix}.>"))
            .await
            .map_err(|e| setup(&e))?;
        // The server has the subscription before the first intent goes out.
        client.flush().await.map_err(|e| setup(&e))?;
        Ok(Replies {
            prefix: prefix.to_owned(),
            subscriber,
            waiting: HashMap::new(),
        })
    }

    /// A fresh reply subject, and where its reply will be handed over.
    fn expect(&mut self, sent: &mut u64) -> (Subject, oneshot::Receiver<Arrival>) {
        let number = *sent;
        *sent += 1;
        let (arrived, arrival) = oneshot::channel();
        self.waiting.insert(number, arrived);
        (Subject::from(format!("{}.{number}", self.prefix)), arrival)
    }

    /// Hands a reply to its request; one nobody waits for any more (its
    /// request timed out) is dropped.
    fn arrived(&mut self, reply: Message) {
        let number = reply
            .subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|number| number.parse::<u64>().ok());
        if let Some(waiting) = number.and_then(|number| self.waiting.remove(&number)) {
            // The request stops waiting only when it timed out.
            let _ = waiting.send((reply, Instant::now()));
        }
    }
}

/// The next reply, or never when the pass sends core requests.
async fn next_reply(replies: &mut Option<Replies>) -> Option<Message> {
    match replies {
        Some(replies) => replies.subscriber.next().await,
        None => std::future::pending().await,
    }
}

/// Sends every key (paced or as fast as `concurrency` allows) and tallies the replies.
async fn execute(
    client: &Client,
    js: &jetstream::Context,
    job: Job,
    completed: &AtomicU64,
    replies_sent: &mut u64,
) -> Result<Measured, BenchError> {
    let mut replies = match &job.via {
        Via::Request => None,
        Via::Stream { replies } => Some(Replies::open(client, replies).await?),
    };
    let latency = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .map_err(|e| BenchError::LoadGenerator(format!("histogram: {e}")))?;
    let mut measured = Measured {
        requests: 0,
        ok: 0,
        error_replies: 0,
        timeouts: 0,
        failures: 0,
        first_error: None,
        ok_bytes: 0,
        fresh_replies: 0,
        duplicate_fresh_replies: 0,
        wall: Duration::ZERO,
        latency,
        client_cpu: None,
        truncated: false,
    };
    let cpu_before = usage::thread_cpu();
    let keys_in_flight = (job.concurrency / job.copies).max(1);
    let total = job.intents.count;
    let mut in_flight = FuturesUnordered::new();
    let mut launched = 0usize;
    let mut stopped = false;
    let mut ticks = tokio::time::interval(PACING_TICK);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let deadline = tokio::time::sleep_until(job.deadline);
    tokio::pin!(deadline);
    let start = Instant::now();
    loop {
        if !stopped {
            let due = match job.rate {
                None => total,
                // Rounding down keeps the pace at or below the rate.
                Some(rate) => ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(total),
            };
            while launched < due && in_flight.len() < keys_in_flight {
                let payload = job.intents.get(launched);
                // Every copy is a request of its own, as a retrying client's are.
                let copies = (0..job.copies).map(|_| match &mut replies {
                    None => Either::Left(send(
                        client,
                        job.subject.clone(),
                        payload.clone(),
                        job.timeout,
                    )),
                    Some(replies) => {
                        let (reply_to, arrival) = replies.expect(replies_sent);
                        Either::Right(publish(
                            js,
                            job.subject.clone(),
                            reply_to,
                            payload.clone(),
                            arrival,
                            job.timeout,
                        ))
                    }
                });
                in_flight.push(futures::future::join_all(copies));
                launched += 1;
            }
        }
        if in_flight.is_empty() && (stopped || launched == total) {
            break;
        }
        tokio::select! {
            Some(samples) = in_flight.next() => {
                completed.fetch_add(samples.len() as u64, Ordering::Relaxed);
                tally(&mut measured, samples);
            }
            Some(reply) = next_reply(&mut replies) => {
                if let Some(replies) = replies.as_mut() {
                    replies.arrived(reply);
                }
            }
            _ = ticks.tick(), if job.rate.is_some() && !stopped && launched < total => {}
            () = &mut deadline, if !stopped => stopped = true,
            else => break,
        }
    }
    measured.wall = start.elapsed();
    measured.truncated = launched < total;
    measured.client_cpu = cpu_before
        .zip(usage::thread_cpu())
        .map(|(before, after)| after.saturating_sub(before));
    Ok(measured)
}

fn tally(measured: &mut Measured, samples: Vec<Sample>) {
    let mut fresh_for_key = 0;
    for sample in samples {
        measured.requests += 1;
        let error = match sample {
            Sample::Ok {
                latency,
                fresh,
                bytes,
            } => {
                measured.ok += 1;
                measured.ok_bytes += bytes as u64;
                fresh_for_key += u64::from(fresh);
                let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                measured.latency.saturating_record(micros.max(1));
                continue;
            }
            Sample::ErrorReply(code) => {
                measured.error_replies += 1;
                format!("error reply {code}")
            }
            Sample::TimedOut => {
                measured.timeouts += 1;
                "no reply in time".to_owned()
            }
            Sample::Failed(reason) => {
                measured.failures += 1;
                reason
            }
        };
        measured.first_error.get_or_insert(error);
    }
    measured.fresh_replies += fresh_for_key;
    measured.duplicate_fresh_replies += fresh_for_key.saturating_sub(1);
}

async fn send(client: &Client, subject: Subject, payload: Bytes, timeout: Duration) -> Sample {
    let started = Instant::now();
    let request = Request::new().payload(payload).timeout(Some(timeout));
    match client.send_request(subject, request).await {
        Ok(reply) => classify(&reply, started.elapsed()),
        Err(error) if error.kind() == RequestErrorKind::TimedOut => Sample::TimedOut,
        Err(error) => Sample::Failed(error.to_string()),
    }
}

/// Publishes one intent into the stream over `subject`, waits for the
/// stream's PubAck, then for the reply on `reply_to`; the latency runs from
/// the publish to the reply's arrival.
async fn publish(
    js: &jetstream::Context,
    subject: Subject,
    reply_to: Subject,
    payload: Bytes,
    arrival: oneshot::Receiver<Arrival>,
    timeout: Duration,
) -> Sample {
    let started = Instant::now();
    let mut headers = HeaderMap::new();
    headers.insert(REPLY_TO_HEADER, reply_to.as_str());
    let answered = async {
        js.publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| format!("publish: {e}"))?
            .await
            .map_err(|e| format!("no PubAck: {e}"))?;
        arrival.await.map_err(|_| "the pass ended first".to_owned())
    };
    match tokio::time::timeout_at(started + timeout, answered).await {
        Ok(Ok((reply, at))) => classify(&reply, at.duration_since(started)),
        Ok(Err(reason)) => Sample::Failed(reason),
        Err(_elapsed) => Sample::TimedOut,
    }
}

/// A reply succeeds unless it says otherwise in `Idem-Status` (idemq and
/// the baselines' error replies set it; successful baseline replies don't).
fn classify(reply: &Message, latency: Duration) -> Sample {
    let header = |name| {
        reply
            .headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .map(|value| value.as_str())
    };
    match header(STATUS_HEADER) {
        None | Some("Success") => Sample::Ok {
            latency,
            fresh: header(REPLAYED_HEADER) == Some("false"),
            // The client counts the subjects in too.
            bytes: reply
                .length
                .saturating_sub(reply.subject.len())
                .saturating_sub(reply.reply.as_ref().map_or(0, |r| r.len())),
        },
        Some(status) => {
            let code = header(ERROR_CODE_HEADER).unwrap_or(status);
            let body = String::from_utf8_lossy(&reply.payload);
            let body: String = body.chars().take(ERROR_TEXT_CHARS).collect();
            Sample::ErrorReply(format!("{code}: {body}"))
        }
    }
}

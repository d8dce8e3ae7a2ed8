//! Starting in-process workers against a test server, and talking to them.

use std::collections::HashSet;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap};
use futures::StreamExt;
use idemq::handler::{Echo, Forward, Handler};
use idemq::server::{Server, ServerConfig};
use idemq::stats::Stats;
use idemq::WorkerConfig;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::poll::eventually;
use super::NatsServer;

/// How long a test request waits for its reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// The configuration tests start from: the contract's defaults with a
/// short grace period.
pub fn test_config() -> WorkerConfig {
    WorkerConfig {
        grace: Duration::from_secs(2),
        handler_timeout: Duration::from_secs(10),
        ..WorkerConfig::default()
    }
}

/// A worker running in this process; stopped on drop.
pub struct RunningWorker {
    shutdown: CancellationToken,
    server: Option<Server>,
    /// Its counters.
    pub stats: Arc<Stats>,
}

impl RunningWorker {
    /// Stops the worker and waits (bounded) for a clean exit.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(20), server.wait())
                .await
                .expect("worker stops within 20s")
                .expect("worker exits cleanly");
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts a worker on its own connection; `forward` selects the forward
/// handler (else echo). Returns once it answers `$SRV.PING.idemq`.
pub async fn start_worker(
    server: &NatsServer,
    config: WorkerConfig,
    forward: Option<&str>,
) -> RunningWorker {
    start_worker_on(server.connect().await, config, forward).await
}

/// Like [`start_worker`], on a connection of the test's own (through a
/// fault proxy, say).
pub async fn start_worker_on(
    client: Client,
    config: WorkerConfig,
    forward: Option<&str>,
) -> RunningWorker {
    let handler: Arc<dyn Handler> = match forward {
        Some(template) => Arc::new(
            Forward::new(client.clone(), template, config.handler_timeout).expect("template"),
        ),
        None => Arc::new(Echo),
    };
    let config = ServerConfig {
        worker: config,
        ..ServerConfig::default()
    };
    let shutdown = CancellationToken::new();
    // The start-up `idemq serve` uses; it returns once the worker takes intents.
    let server = tokio::time::timeout(
        Duration::from_secs(20),
        Server::start(client, handler, config, shutdown.clone()),
    )
    .await
    .expect("the worker starts within 20s")
    .expect("the worker starts");
    RunningWorker {
        shutdown,
        stats: server.stats(),
        server: Some(server),
    }
}

/// The ids of the idemq services that answer a ping within 200ms.
pub async fn ping(client: &Client) -> HashSet<String> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply("$SRV.PING.idemq", inbox, "".into())
        .await
        .expect("ping");
    let mut ids = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, replies.next()).await {
        if reply.payload.is_empty() {
            // A no-responders status: nobody registered yet.
            break;
        }
        let body: Value = serde_json::from_slice(&reply.payload).expect("ping reply JSON");
        ids.insert(body["id"].as_str().expect("id").to_owned());
    }
    ids
}

/// Waits until `count` idemq services answer a ping: at most a minute,
/// idemq's own start-up patience, for workers on a cluster that is still
/// electing the leaders of their bucket, stream and consumer (three R3
/// assets each) on two loaded cores.
pub async fn wait_for_workers(client: &Client, count: usize) {
    eventually(
        Duration::from_secs(60),
        format!("{count} idemq workers answering $SRV.PING.idemq"),
        async || ping(client).await.len() >= count,
    )
    .await;
}

/// Sends an intent as a request; returns the reply JSON and headers.
pub async fn request(
    client: &Client,
    subject: &str,
    payload: impl Into<bytes::Bytes>,
    headers: HeaderMap,
) -> (Value, HeaderMap) {
    request_within(client, subject, payload, headers, REPLY_TIMEOUT).await
}

/// [`request`], waiting at most `timeout` for the reply: longer than a
/// worker's `--wait` where copies may wait that long for an execution.
pub async fn request_within(
    client: &Client,
    subject: &str,
    payload: impl Into<bytes::Bytes>,
    headers: HeaderMap,
    timeout: Duration,
) -> (Value, HeaderMap) {
    let request = async_nats::Request::new()
        .payload(payload.into())
        .headers(headers)
        .timeout(Some(timeout));
    let reply = client
        .send_request(subject.to_owned(), request)
        .await
        .unwrap_or_else(|e| panic!("request to {subject}: {e}"));
    let body = serde_json::from_slice(&reply.payload).expect("reply is JSON");
    (body, reply.headers.unwrap_or_default())
}

/// Sends an intent JSON value without headers.
pub async fn send(client: &Client, subject: &str, intent: &Value) -> Value {
    request(client, subject, intent.to_string(), HeaderMap::new())
        .await
        .0
}

/// The `idemq` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_idemq");

/// Every message `stream` holds, from sequence 1, as JSON (a sequence that
/// cannot be read is skipped): the replies a results stream captured.
pub async fn stream_replies(js: &async_nats::jetstream::Context, stream: &str) -> Vec<Value> {
    let mut stream = js.get_stream(stream).await.expect("the stream");
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let mut replies = Vec::new();
    for sequence in 1..=last {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            replies.push(serde_json::from_slice(&message.payload).expect("reply JSON"));
        }
    }
    replies
}

/// Publishes `payload` into a stream on `subject` until the stream acks
/// it (at most `bound`): a leader may be elected, a server restarted.
pub async fn publish_acked(
    js: &async_nats::jetstream::Context,
    subject: &str,
    payload: bytes::Bytes,
    bound: Duration,
) {
    eventually(
        bound,
        format!("a stream taking a message on {subject}"),
        async || match js.publish(subject.to_owned(), payload.clone()).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        },
    )
    .await;
}

/// Bound on one `idemq` one-shot command in a test.
pub const COMMAND_BOUND: Duration = Duration::from_secs(30);

/// Runs `idemq ARGS` to completion without blocking the test's runtime,
/// with `env` applied (`None` removes a variable); killed and a panic past
/// [`COMMAND_BOUND`].
pub async fn run_idemq(args: &[&str], env: &[(&str, Option<&str>)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(BIN);
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for (name, value) in env {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    tokio::time::timeout(COMMAND_BOUND, command.output())
        .await
        .unwrap_or_else(|_| panic!("idemq {args:?} still running after {COMMAND_BOUND:?}"))
        .expect("run idemq")
}

/// An `idemq serve` process; killed on drop if still running.
pub struct WorkerProcess(Child);

impl WorkerProcess {
    /// Starts `idemq serve --nats-url URL ARGS...`. Its logs go to the test's
    /// stderr at the level of `IDEMQ_TEST_LOG` (default `error`).
    pub fn serve(url: &str, args: &[&str]) -> WorkerProcess {
        WorkerProcess::serve_with_env(url, args, &[])
    }

    /// Like [`WorkerProcess::serve`], with extra environment variables
    /// (e.g. `IDEMQ_PASSWORD`).
    pub fn serve_with_env(url: &str, args: &[&str], env: &[(&str, &str)]) -> WorkerProcess {
        let level = std::env::var("IDEMQ_TEST_LOG").unwrap_or_else(|_| "error".to_owned());
        WorkerProcess::spawn(
            Self::serve_command(url, args)
                .envs(env.iter().copied())
                .env("RUST_LOG", level)
                .stderr(Stdio::inherit()),
        )
    }

    /// Like [`WorkerProcess::serve`], logging at `level` into `log`.
    pub fn serve_logging(
        url: &str,
        args: &[&str],
        level: &str,
        log: std::fs::File,
    ) -> WorkerProcess {
        WorkerProcess::spawn(
            Self::serve_command(url, args)
                .env("RUST_LOG", level)
                .stderr(log),
        )
    }

    /// `idemq serve --nats-url URL ARGS...`, its stdout discarded.
    fn serve_command(url: &str, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--nats-url", url])
            .args(args)
            .stdout(Stdio::null());
        command
    }

    /// Starts a prepared `idemq` command (for tests that set its
    /// environment or capture its output).
    pub fn spawn(command: &mut Command) -> WorkerProcess {
        WorkerProcess(command.spawn().expect("spawn idemq"))
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Peak resident set size so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        proc_status_kib(self.id(), "VmHWM").expect("VmHWM in /proc/<pid>/status") * 1024
    }

    /// Resident set size now (`VmRSS`), in bytes.
    pub fn rss(&self) -> u64 {
        proc_status_kib(self.id(), "VmRSS").expect("VmRSS in /proc/<pid>/status") * 1024
    }

    /// Sends a signal (`-TERM`, `-KILL`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal}");
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().expect("try_wait")
    }

    /// Waits (at most `bound`) for the process to exit.
    pub async fn wait(&mut self, bound: Duration) -> ExitStatus {
        eventually(bound, "the worker exiting", || {
            std::future::ready(self.0.try_wait().expect("try_wait"))
        })
        .await
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`) in KiB; `None`
/// once the process is gone (or the field is not there).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // Already exited in most tests; an error here only means that.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

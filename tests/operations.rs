//! What an operator runs and watches: metrics and health endpoints, the
//! config file and its precedence, JSON logs, `idemq stats`, `idemq purge`
//! and `idemq healthcheck`, all against the real binary and a real
//! nats-server.

mod common;

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use async_nats::HeaderMap;
use common::intents::{code, intent, key_of};
use common::poll::eventually;
use common::stores::FaultyStore;
use common::workers::{request, run_idemq, send, WorkerProcess, BIN};
use common::NatsServer;
use serde_json::{json, Value};

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
}

/// GET `url`: the status (0 when nothing answers) and the body.
async fn http_get(url: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build()
            .into();
        match agent.get(&url).call() {
            Ok(mut response) => {
                let status = response.status().as_u16();
                (
                    status,
                    response.body_mut().read_to_string().unwrap_or_default(),
                )
            }
            Err(_) => (0, String::new()),
        }
    })
    .await
    .expect("http task")
}

/// Polls `url` until it answers `status` (at most `bound`); the answer.
async fn wait_for_status(url: &str, status: u16, bound: Duration) -> (u16, String) {
    eventually(bound, format!("{url} answering {status}"), async || {
        let answer = http_get(url.to_owned()).await;
        if answer.0 == status {
            Ok(answer)
        } else {
            Err(format!("{} {}", answer.0, answer.1))
        }
    })
    .await
}

/// Runs `idemq ARGS...` to completion (bounded), at its default log level.
async fn idemq(args: Vec<String>) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_idemq(&args, &[("RUST_LOG", None)]).await
}

/// A worker process with its endpoints on a free port, ready to serve.
async fn worker_with_metrics(server: &NatsServer, extra: &[&str]) -> (WorkerProcess, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--metrics-addr", &addr];
    args.extend_from_slice(extra);
    let worker = WorkerProcess::serve(&server.url(), &args);
    let base = format!("http://{addr}");
    let (status, body) =
        wait_for_status(&format!("{base}/readyz"), 200, Duration::from_secs(15)).await;
    assert_eq!(status, 200, "worker never became ready: {body}");
    (worker, base)
}

/// Every sample of a Prometheus scrape, by name and sorted labels.
fn samples(text: &str) -> HashMap<String, f64> {
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("exposition parses");
    let mut out = HashMap::new();
    for sample in scrape.samples {
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        labels.sort();
        let name = if labels.is_empty() {
            sample.metric.clone()
        } else {
            format!("{}{{{}}}", sample.metric, labels.join(","))
        };
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.last().map_or(0.0, |bucket| bucket.count)
            }
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert(name, value);
    }
    out
}

fn sample(samples: &HashMap<String, f64>, name: &str) -> f64 {
    *samples
        .get(name)
        .unwrap_or_else(|| panic!("no sample {name} in {:?}", samples.keys()))
}

#[tokio::test]
async fn metrics_count_what_the_worker_did_and_match_its_service_stats() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let (_worker, base) = worker_with_metrics(&server, &[]).await;

    let body = intent("metered", json!({"n": 1}));
    assert_eq!(
        send(&client, "intents.echo", &body).await["replayed"],
        false
    );
    assert_eq!(send(&client, "intents.echo", &body).await["replayed"], true);
    let (reply, _) = request(&client, "intents.echo", "nope", HeaderMap::new()).await;
    assert_eq!(code(&reply), "INVALID_INTENT");
    let mut bad_key = HeaderMap::new();
    bad_key.insert("Idempotency-Key", "not-a-key");
    let (reply, _) = request(&client, "intents.echo", body.to_string(), bad_key).await;
    assert_eq!(code(&reply), "INVALID_KEY");

    // The end-to-end histogram is observed just after each reply is
    // published, so the scrape may briefly lag the last reply.
    let metrics = eventually(
        Duration::from_secs(5),
        "the histogram counting all four replies",
        async || {
            let (status, text) = http_get(format!("{base}/metrics")).await;
            assert_eq!(status, 200);
            let metrics = samples(&text);
            let count = metrics.get("idemq_intent_duration_seconds_count").copied();
            match count {
                Some(4.0) => Ok(metrics),
                count => Err(format!("count {count:?}")),
            }
        },
    )
    .await;
    assert_eq!(sample(&metrics, "idemq_intents_received_total"), 4.0);
    assert_eq!(sample(&metrics, "idemq_intents_executed_total"), 1.0);
    assert_eq!(sample(&metrics, "idemq_intents_replayed_total"), 1.0);
    assert_eq!(
        sample(&metrics, "idemq_intents_invalid_total{code=INVALID_INTENT}"),
        1.0
    );
    assert_eq!(
        sample(&metrics, "idemq_intents_invalid_total{code=INVALID_KEY}"),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "idemq_intents_invalid_total{code=PAYLOAD_TOO_LARGE}"
        ),
        0.0
    );
    assert_eq!(sample(&metrics, "idemq_intents_in_flight"), 0.0);
    // The one executed outcome is cached; its cost is counted.
    assert_eq!(sample(&metrics, "idemq_cache_entries"), 1.0);
    let cached = sample(&metrics, "idemq_cache_bytes");
    assert!(
        cached > body.to_string().len() as f64 && cached < 64.0 * 1024.0,
        "cache bytes {cached}"
    );
    assert_eq!(
        sample(&metrics, "idemq_handler_duration_seconds_count"),
        1.0
    );
    assert_eq!(sample(&metrics, "idemq_intent_duration_seconds_count"), 4.0);
    for zero in [
        "idemq_intents_waited_total",
        "idemq_intents_in_progress_total",
        "idemq_intents_key_reused_total",
        "idemq_transient_failures_total",
        "idemq_store_errors_total",
        "idemq_takeovers_total",
        "idemq_dead_lettered_total",
    ] {
        assert_eq!(sample(&metrics, zero), 0.0, "{zero}");
    }

    // The same counters are the custom data of the micro service's stats.
    let reply = client
        .request("$SRV.STATS.idemq", "".into())
        .await
        .expect("$SRV.STATS.idemq");
    let stats: Value = serde_json::from_slice(&reply.payload).expect("stats JSON");
    let data = &stats["endpoints"][0]["data"];
    assert_eq!(data["received"], 4, "{stats}");
    assert_eq!(data["executed"], 1);
    assert_eq!(data["replayed"], 1);
    assert_eq!(data["invalid"], 2);

    // And `idemq stats` shows them, as JSON and as a table.
    let url = server.url();
    let out = idemq(vec![
        "stats".into(),
        "--nats-url".into(),
        url.clone(),
        "--json".into(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("stats --json");
    assert_eq!(
        report["workers"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert_eq!(report["total"]["executed"], 1);
    assert_eq!(report["total"]["invalid"], 2);
    assert_eq!(report["bucket"]["bucket"], "IDEMPOTENCY");
    assert!(report["bucket"]["keys"].as_u64() >= Some(1), "{report}");
    let out = idemq(vec!["stats".into(), "--nats-url".into(), url]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        table.contains("EXECUTED") && table.contains("Bucket IDEMPOTENCY"),
        "{table}"
    );
    let worker_id = report["workers"][0]["id"].as_str().expect("worker id");
    assert!(table.contains(worker_id), "{table}");
}

#[tokio::test]
async fn readiness_follows_the_nats_connection_while_liveness_stays() {
    let mut server = NatsServer::start();
    let (_worker, base) = worker_with_metrics(&server, &[]).await;
    let metrics_addr = base.trim_start_matches("http://").to_owned();
    let healthcheck = |ready: bool| {
        let mut args = vec![
            "healthcheck".to_owned(),
            "--metrics-addr".to_owned(),
            metrics_addr.clone(),
        ];
        if ready {
            args.push("--ready".to_owned());
        }
        idemq(args)
    };
    assert!(healthcheck(true).await.status.success());

    server.stop();
    let (status, body) =
        wait_for_status(&format!("{base}/readyz"), 503, Duration::from_secs(15)).await;
    assert_eq!(status, 503, "still ready without NATS: {body}");
    assert!(body.contains("not ready"), "{body}");
    assert_eq!(http_get(format!("{base}/healthz")).await.0, 200);
    assert!(
        healthcheck(false).await.status.success(),
        "alive without NATS"
    );
    let out = healthcheck(true).await;
    assert_eq!(out.status.code(), Some(1), "ready without NATS");

    server.restart();
    let (status, body) =
        wait_for_status(&format!("{base}/readyz"), 200, Duration::from_secs(20)).await;
    assert_eq!(status, 200, "not ready again after NATS came back: {body}");
}

#[tokio::test]
async fn healthcheck_fails_when_no_worker_answers() {
    let addr = format!("127.0.0.1:{}", free_port());
    let out = idemq(vec!["healthcheck".into(), "--metrics-addr".into(), addr]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("healthz"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_config_file_sits_under_env_and_flags() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("idemq.toml");
    std::fs::write(
        &path,
        format!(
            "nats-url = \"{}\"\nsubject = [\"jobs.>\"]\nconcurrency = 3\nttl = \"1h\"\nwait = \"1s\"\n",
            server.url()
        ),
    )
    .expect("write config");
    let path = path.to_string_lossy().into_owned();

    // --print-config shows every value with where it came from.
    let out = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            Command::new(BIN)
                .args([
                    "serve",
                    "--config",
                    &path,
                    "--print-config",
                    "--concurrency",
                    "7",
                ])
                .env("IDEMQ_TTL", "2h")
                .env_remove("IDEMQ_WAIT")
                .output()
                .expect("print-config")
        }
    })
    .await
    .expect("task");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let printed: toml::Table = text.parse().expect("--print-config is TOML");
    assert_eq!(
        printed["concurrency"].as_integer(),
        Some(7),
        "flag wins:\n{text}"
    );
    assert_eq!(
        printed["ttl"].as_str(),
        Some("2h"),
        "env beats the file:\n{text}"
    );
    assert_eq!(
        printed["wait"].as_str(),
        Some("1s"),
        "the file beats the default"
    );
    assert_eq!(printed["lease"].as_str(), Some("30s"), "the default");
    for (key, source) in [
        ("concurrency", "# flag"),
        ("ttl", "# env"),
        ("wait", "# file"),
        ("lease", "# default"),
    ] {
        let line = text
            .lines()
            .find(|line| line.starts_with(&format!("{key} =")))
            .expect("line");
        assert!(line.ends_with(source), "{line}");
    }

    // Secrets are masked, wherever they came from.
    let out = tokio::task::spawn_blocking(|| {
        Command::new(BIN)
            .args(["serve", "--print-config", "--user", "worker"])
            .env("IDEMQ_PASSWORD", "hunter2-secret")
            .output()
            .expect("print-config")
    })
    .await
    .expect("task");
    let masked = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!masked.contains("hunter2-secret"), "{masked}");
    assert!(
        masked.contains("# password = \"********\"  # env, masked"),
        "{masked}"
    );
    assert!(masked.contains("user = \"worker\"  # flag"), "{masked}");

    // The printed configuration reads back as a config file.
    let again = dir.path().join("printed.toml");
    std::fs::write(&again, text.as_bytes()).expect("write");
    let out = idemq(vec![
        "serve".into(),
        "--config".into(),
        again.to_string_lossy().into_owned(),
        "--print-config".into(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A worker configured by the file alone takes intents on its subject.
    let mut worker = WorkerProcess::spawn(
        Command::new(BIN)
            .args(["serve", "--config", &path])
            .env_remove("IDEMQ_NATS_URL")
            .env_remove("NATS_URL")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null()),
    );
    common::workers::wait_for_workers(&client, 1).await;
    let reply = send(&client, "jobs.run", &intent("from-file", json!(1))).await;
    assert_eq!(reply["result"]["status"], "Success", "{reply}");
    worker.signal("-TERM");
    assert!(worker.wait(Duration::from_secs(15)).await.success());
}

#[tokio::test]
async fn a_bad_config_file_is_refused_with_one_line_per_problem() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "nats-urll = \"x\"\nttl = \"5 bananas\"\nconcurrency = \"many\"\nwait = [\"1s\"]\n",
    )
    .expect("write");
    let out = idemq(vec![
        "serve".into(),
        "--config".into(),
        path.to_string_lossy().into_owned(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "unknown key \"nats-urll\"",
        "ttl: invalid value '5 bananas'",
        "concurrency: invalid value 'many'",
        "wait: takes one value",
    ] {
        assert!(
            stderr.contains(needle),
            "{needle:?} missing from:\n{stderr}"
        );
    }
    let out = idemq(vec![
        "serve".into(),
        "--config".into(),
        "/nonexistent/idemq.toml".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

#[tokio::test]
async fn json_logs_carry_the_intent_span_and_never_the_payload() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let dir = tempfile::TempDir::new().expect("temp dir");
    let log_path = dir.path().join("worker.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut worker = WorkerProcess::spawn(
        Command::new(BIN)
            .args(["serve", "--nats-url", &server.url(), "--log-format", "json"])
            .env("RUST_LOG", "idemq=debug")
            .stdout(Stdio::null())
            .stderr(log),
    );
    common::workers::wait_for_workers(&client, 1).await;
    let secret = "PAYLOAD-SECRET-7731";
    let body = intent("logged", json!({ "card": secret }));
    send(&client, "intents.pay", &body).await;
    send(&client, "intents.pay", &body).await;
    worker.signal("-TERM");
    assert!(worker.wait(Duration::from_secs(15)).await.success());

    let text = std::fs::read_to_string(&log_path).expect("read log");
    assert!(
        !text.contains(secret),
        "a payload reached the logs:\n{text}"
    );
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let answered: Vec<&Value> = lines
        .iter()
        .filter(|line| line["fields"]["message"] == "answered")
        .collect();
    assert_eq!(answered.len(), 2, "one span event per intent:\n{text}");
    for (line, replayed) in answered.iter().zip([false, true]) {
        let span = &line["span"];
        assert_eq!(span["name"], "intent");
        assert_eq!(span["idem_key"], key_of("logged"));
        assert_eq!(span["intent_id"], "logged");
        assert_eq!(span["capability"], "pay");
        assert_eq!(span["outcome"], "Success");
        assert_eq!(span["replayed"], replayed);
    }
}

#[tokio::test]
async fn purge_from_the_command_line_makes_the_next_copy_execute() {
    let server = NatsServer::start();
    let client = server.connect().await;
    let _worker = WorkerProcess::serve(&server.url(), &[]);
    common::workers::wait_for_workers(&client, 1).await;
    let body = intent("purge-me", json!(1));
    assert_eq!(
        send(&client, "intents.echo", &body).await["replayed"],
        false
    );
    assert_eq!(send(&client, "intents.echo", &body).await["replayed"], true);

    let url = server.url();
    let purge = |key: String| idemq(vec!["purge".into(), key, "--nats-url".into(), url.clone()]);
    let out = purge(key_of("purge-me")).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The worker's cache forgets it within a second: a copy executes again.
    eventually(
        Duration::from_secs(1),
        "the purge reaching the worker: a copy executes again",
        async || send(&client, "intents.echo", &body).await["replayed"] == false,
    )
    .await;
    assert_eq!(send(&client, "intents.echo", &body).await["replayed"], true);

    let out = purge(key_of("never-sent")).await;
    assert_eq!(out.status.code(), Some(1), "no record: exit 1");
    let out = purge("not-a-key".to_owned()).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed key is a usage error"
    );
}

#[tokio::test]
async fn an_outcome_read_just_before_a_purge_is_not_served_from_the_cache_after_it() {
    let server = NatsServer::start();
    let client = server.connect().await;
    // One worker stores the outcome; another, whose reads the test can
    // hold, answers copies on a subject of its own.
    let _first = WorkerProcess::serve(&server.url(), &["--subject", "intents.first.>"]);
    common::workers::wait_for_workers(&client, 1).await;
    let store = FaultyStore::new(common::stores::kv_store(&server).await);
    let config = idemq::WorkerConfig {
        subjects: vec!["intents.second.>".to_owned()],
        ..common::workers::test_config()
    };
    let second = idemq::server::Server::start_on(
        server.connect().await,
        store.clone(),
        std::sync::Arc::new(idemq::handler::Echo),
        config,
        None,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("the second worker starts");
    let body = intent("purged-mid-read", json!(1));
    let stored = send(&client, "intents.first.echo", &body).await;
    assert_eq!(stored["replayed"], false);

    // The second worker reads the record; before it acts on what it read,
    // the key is purged and every worker told.
    store.hold_next_read();
    let copy = {
        let (client, body) = (client.clone(), body.clone());
        tokio::spawn(async move { send(&client, "intents.second.echo", &body).await })
    };
    store.until_held().await;
    let out = idemq(vec![
        "purge".into(),
        key_of("purged-mid-read"),
        "--nats-url".into(),
        server.url(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Past the purge notice's way to the worker.
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.release();
    let read_before = copy.await.expect("the copy");
    assert_eq!(
        read_before["replayed"], true,
        "it read the outcome before the purge"
    );

    // The purged outcome must not be answered from the second worker's
    // cache: the next copy runs again.
    let after = send(&client, "intents.second.echo", &body).await;
    assert_eq!(
        after["replayed"], false,
        "the purged outcome was served: {after}"
    );
    assert_ne!(after["stored_at"], stored["stored_at"]);
    drop(second);
}

#[tokio::test]
async fn readiness_reads_the_bucket_at_most_once_a_second_and_still_sees_nats_go() {
    let mut server = NatsServer::start();
    let client = server.connect().await;
    let store = FaultyStore::new(std::sync::Arc::new(idemq::store::memory::MemoryStore::new()));
    let readiness = idemq::http::Readiness::new(
        client.clone(),
        store.clone(),
        tokio_util::sync::CancellationToken::new(),
    );
    let started = std::time::Instant::now();
    for _ in 0..500 {
        assert_eq!(readiness.check().await, Ok(()));
    }
    let reads = store.reads();
    let seconds = u32::try_from(started.elapsed().as_secs()).unwrap_or(u32::MAX);
    assert!(
        reads <= seconds + 1,
        "{reads} bucket reads for 500 checks in {seconds}s"
    );

    server.stop();
    eventually(
        Duration::from_secs(2),
        "not ready once NATS went away",
        async || readiness.check().await.is_err(),
    )
    .await;
}

/// Runs a worker at the default log level in `format`, sends one intent
/// twice (an execution and a replay) and one that ends in a stored error,
/// all with `secret` in their params; returns the worker's log.
async fn default_level_log(format: &str, secret: &str) -> String {
    let server = NatsServer::start();
    let client = server.connect().await;
    let _upstream = common::upstream::Upstream::start(&client).await;
    let dir = tempfile::TempDir::new().expect("temp dir");
    let log_path = dir.path().join("worker.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut worker = WorkerProcess::spawn(
        Command::new(BIN)
            .args(["serve", "--nats-url", &server.url(), "--log-format", format])
            .args(["--forward", common::upstream::FORWARD])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log),
    );
    common::workers::wait_for_workers(&client, 1).await;
    let body = intent("exec-log", json!({ "card": secret }));
    send(&client, "intents.ok", &body).await;
    send(&client, "intents.ok", &body).await;
    let failing = intent("exec-log-422", json!({ "card": secret }));
    send(&client, "intents.fail422", &failing).await;
    worker.signal("-TERM");
    assert!(worker.wait(Duration::from_secs(15)).await.success());
    std::fs::read_to_string(&log_path).expect("read log")
}

#[tokio::test]
async fn one_execution_log_line_per_execution_at_the_default_level() {
    let secret = "EXEC-LOG-SECRET-4410";
    // JSON: the event's fields and its intent span.
    let text = default_level_log("json", secret).await;
    assert!(!text.contains(secret), "params reached the log:\n{text}");
    let executed: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .filter(|line| line["fields"]["message"] == "executed")
        .collect();
    assert_eq!(
        executed.len(),
        2,
        "two executions, the replay logs none:\n{text}"
    );
    let (ok, failed) = (&executed[0], &executed[1]);
    assert_eq!(ok["level"], "INFO");
    assert_eq!(ok["span"]["idem_key"], key_of("exec-log"));
    assert_eq!(ok["span"]["intent_id"], "exec-log");
    assert_eq!(ok["span"]["capability"], "ok");
    assert_eq!(ok["fields"]["status"], "Success");
    assert_eq!(ok["fields"]["attempt"], 1);
    assert!(ok["fields"]["handler_ms"].is_u64(), "{ok}");
    assert_eq!(failed["span"]["intent_id"], "exec-log-422");
    assert_eq!(failed["fields"]["status"], "Error");
    assert_eq!(failed["fields"]["code"], "422");

    // Pretty: the same line, fields as key=value.
    let text = default_level_log("pretty", secret).await;
    assert!(!text.contains(secret), "params reached the log:\n{text}");
    let executed: Vec<&str> = text.lines().filter(|l| l.contains(" executed ")).collect();
    assert_eq!(executed.len(), 2, "{text}");
    for field in [
        "idem_key=",
        "intent_id=exec-log",
        "capability=ok",
        "status=\"Success\"",
        "attempt=1",
        "handler_ms=",
    ] {
        assert!(executed[0].contains(field), "{field} in {}", executed[0]);
    }
    assert!(executed[1].contains("code=\"422\""), "{}", executed[1]);
}

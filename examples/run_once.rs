//! The run-once API in an HTTP service: charge once per `Idempotency-Key`.
//!
//! `POST /charge` with an `Idempotency-Key` header and a JSON body
//! (`{"account": "acme", "amount": 42}`) charges the account once per key,
//! however many times the request arrives and at however many replicas of
//! this service: the key is claimed in a JetStream KV bucket by
//! [`Idempotent::run`], and every copy gets the first copy's answer,
//! byte for byte (`Idempotent-Replayed: true` tells the copies apart).
//!
//! * `200`: the charge (fresh or replayed);
//! * `422`: the key was already used with another body;
//! * `409` with `Retry-After`: another request with this key still runs;
//! * `400`: no key, or a body that is not a charge (nothing is stored);
//! * `503`: the bucket is unreachable.
//!
//! `GET /stats` returns `{"charges": N}`: charges applied by this process.
//!
//! Run it against a nats-server 2.11+ with JetStream:
//!
//! ```sh
//! nats-server -js &
//! cargo run --example run_once -- --listen 127.0.0.1:8080
//! curl -s -XPOST localhost:8080/charge -H 'Idempotency-Key: order-7' -d '{"account":"acme","amount":42}'
//! ```
//!
//! It prints one JSON `ready` line with its address on stdout, and stops
//! cleanly on Ctrl-C or SIGTERM.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use idemq::run_once::{fingerprint_of, Idempotent, RunError, RunOptions, RunRequest};
use idemq::server::cancel_on_signal;
use idemq::store::kv::{check_server_version, BucketConfig, KvStore};
use idemq::{IdempotencyKey, Outcome};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// How long one charge takes: long enough for duplicates to overlap it.
const CHARGE_TAKES: Duration = Duration::from_millis(300);

/// Command line of the example.
#[derive(Debug, Parser)]
#[command(about = "An HTTP service that charges once per Idempotency-Key")]
struct Args {
    /// Where NATS is and how to authenticate: idemq's own flags, reused.
    #[command(flatten)]
    nats: idemq::nats::NatsArgs,
    /// Address to serve HTTP on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// KV bucket holding claims and outcomes.
    #[arg(long, default_value = "CHARGES")]
    bucket: String,
}

/// What every request shares.
struct App {
    once: Idempotent,
    /// Charges applied by this process: "once" made visible.
    charges: AtomicU64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("run_once: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let client = idemq::nats::connect(&args.nats, "idemq-run-once").await?;
    check_server_version(&client)?;
    let bucket = BucketConfig {
        bucket: args.bucket.clone(),
        ..BucketConfig::default()
    };
    let store = KvStore::open(async_nats::jetstream::new(client), &bucket).await?;
    let app = Arc::new(App {
        once: Idempotent::new(Arc::new(store), RunOptions::default()),
        charges: AtomicU64::new(0),
    });
    let router = Router::new()
        .route("/charge", post(charge))
        .route("/stats", get(stats))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    // The line a supervisor (or a test) waits for.
    println!("{}", json!({"event": "ready", "addr": addr.to_string()}));
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    signals.abort();
    Ok(())
}

/// `POST /charge`.
async fn charge(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(given) = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty())
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            "an Idempotency-Key header is needed",
        );
    };
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return problem(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let (Some(account), Some(amount)) = (
        request["account"].as_str().map(str::to_owned),
        request["amount"].as_i64().filter(|amount| *amount > 0),
    ) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "the body needs an account and a positive amount",
        );
    };
    // Any client string becomes an idemq key; the body is what is asked
    // under it, so the same key with another body is refused.
    let key = IdempotencyKey::generate(given, "http-charge", 0);
    let Ok(fingerprint) = fingerprint_of(&request) else {
        return problem(StatusCode::BAD_REQUEST, "the body cannot be fingerprinted");
    };
    let run = RunRequest {
        key: &key,
        fingerprint: &fingerprint,
        intent_id: given,
        ttl: None,
    };
    let never = CancellationToken::new();
    let done = app
        .once
        .run_request(&run, &never, |_attempt| async {
            // The side effect: runs once per key.
            tokio::time::sleep(CHARGE_TAKES).await;
            let charge_no = app.charges.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Outcome::Success(
                json!({"account": account, "amount": amount, "charge_no": charge_no}),
            ))
        })
        .await;
    match done {
        Ok(done) => {
            let body = json!({
                "result": done.outcome(),
                "stored_at": done.stored_at().to_rfc3339(),
            });
            let mut response = (StatusCode::OK, body.to_string()).into_response();
            let replayed = HeaderValue::from_static(if done.replayed { "true" } else { "false" });
            response
                .headers_mut()
                .insert("idempotent-replayed", replayed);
            response
        }
        Err(RunError::KeyReused) => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "this Idempotency-Key was used with another body",
        ),
        Err(RunError::InProgress { retry_after }) => {
            let mut response = problem(StatusCode::CONFLICT, "a request with this key is running");
            let secs = retry_after.as_secs().max(1).to_string();
            if let Ok(value) = HeaderValue::from_str(&secs) {
                response.headers_mut().insert("retry-after", value);
            }
            response
        }
        Err(error) => problem(StatusCode::SERVICE_UNAVAILABLE, &error.to_string()),
    }
}

/// `GET /stats`.
async fn stats(State(app): State<Arc<App>>) -> String {
    json!({"charges": app.charges.load(Ordering::SeqCst)}).to_string()
}

fn problem(status: StatusCode, message: &str) -> Response {
    (status, json!({"error": message}).to_string()).into_response()
}

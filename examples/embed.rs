//! Embedding idemq: a worker with your own [`Handler`], in your own binary.
//!
//! The handler is a tiny in-memory ledger with one capability, `charge`
//! (`params: {"account": "acme", "amount": 42}`). It shows the three ways a
//! handler can end:
//!
//! * a value: the charge is applied and the new balance returned; idemq
//!   stores it, so every copy of the intent gets this same answer and the
//!   account is charged once;
//! * a definite error (`BAD_PARAMS`): bad params will not get better by
//!   retrying, so the error is stored and replayed like a value;
//! * a transient failure (`503`): not stored, the claim is released, and the
//!   client's retry with the same key runs the handler again. Here it is
//!   simulated with `"flaky": true`, which fails the first attempt of a key.
//!
//! Run it against a nats-server 2.11+ with JetStream:
//!
//! ```sh
//! nats-server -js &
//! cargo run --example embed -- --nats-url nats://127.0.0.1:4222
//! idemq send intents.charge '{"intent_id":"c-1","actor":"billing","episode":"ep-1","params":{"account":"acme","amount":42}}'
//! ```
//!
//! It prints one `ready` line on stdout once it takes intents, stops cleanly
//! on Ctrl-C or SIGTERM, and prints a `stopped` line with its counters.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use idemq::server::{cancel_on_signal, Server, ServerConfig};
use idemq::store::kv::BucketConfig;
use idemq::{Call, Handler, HandlerError, IdempotencyKey, Outcome, WorkerConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Command line of the example.
#[derive(Debug, Parser)]
#[command(about = "An idemq worker with a custom ledger handler")]
struct Args {
    /// Where NATS is and how to authenticate: idemq's own `--nats-url`,
    /// `--creds`, `--tls-*`... flags, reused.
    #[command(flatten)]
    nats: idemq::nats::NatsArgs,
    /// Subject to take intents from; the last token is the capability.
    #[arg(long, default_value = "intents.>")]
    subject: String,
    /// KV bucket holding claims and outcomes.
    #[arg(long, default_value = "IDEMPOTENCY")]
    bucket: String,
}

/// The ledger: balances per account, and a counter of applied charges.
///
/// The counter makes "executed once" visible from outside: every charge
/// that is applied gets the next number, so two copies of one intent that
/// both executed would carry different numbers.
#[derive(Debug, Default)]
struct Ledger {
    state: Mutex<LedgerState>,
}

#[derive(Debug, Default)]
struct LedgerState {
    balances: HashMap<String, i64>,
    charges: u64,
    /// Keys of `flaky` intents that already failed once.
    failed_once: HashSet<IdempotencyKey>,
}

/// The params of a `charge`, once checked.
struct Charge {
    account: String,
    amount: i64,
    flaky: bool,
}

impl Charge {
    /// Reads the params, or says what is wrong with them.
    fn parse(params: &Value) -> Result<Charge, String> {
        let account = params["account"]
            .as_str()
            .filter(|a| !a.is_empty())
            .ok_or("params.account must be a non-empty string")?;
        let amount = params["amount"]
            .as_i64()
            .filter(|a| *a > 0)
            .ok_or("params.amount must be a positive integer")?;
        Ok(Charge {
            account: account.to_owned(),
            amount,
            flaky: params["flaky"].as_bool().unwrap_or(false),
        })
    }
}

#[async_trait]
impl Handler for Ledger {
    async fn handle(&self, call: Call<'_>) -> Result<Outcome, HandlerError> {
        let intent = call.intent;
        if intent.capability != "charge" {
            // Not stored: another worker (or a later version) may serve it.
            return Err(HandlerError::NoHandler(format!(
                "the ledger has no capability {:?}",
                intent.capability
            )));
        }
        let charge = match Charge::parse(&intent.params) {
            Ok(charge) => charge,
            // A definite error: stored and replayed, the params won't improve.
            Err(message) => return Ok(Outcome::error("BAD_PARAMS", message)),
        };
        // A poisoned lock only means another handler panicked mid-update of
        // plain counters; the data is still usable.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if charge.flaky && state.failed_once.insert(intent.key.clone()) {
            // Transient: the claim is released and nothing is stored.
            return Err(HandlerError::Transient {
                code: "503".to_owned(),
                message: "ledger busy; retry with the same key".to_owned(),
            });
        }
        state.charges += 1;
        let charge_no = state.charges;
        let balance = state.balances.entry(charge.account.clone()).or_insert(0);
        *balance += charge.amount;
        tracing::info!(idem_key = %intent.key, account = %charge.account, charge_no, "charged");
        Ok(Outcome::Success(json!({
            "account": charge.account,
            "amount": charge.amount,
            "balance": *balance,
            "charge_no": charge_no,
            "attempt": call.attempt,
        })))
    }
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
            eprintln!("embed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let client = idemq::nats::connect(&args.nats, "idemq-embed").await?;
    let config = ServerConfig {
        worker: WorkerConfig {
            subjects: vec![args.subject.clone()],
            handler_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(5),
            ..WorkerConfig::default()
        },
        bucket: BucketConfig {
            bucket: args.bucket.clone(),
            ..BucketConfig::default()
        },
        metrics_addr: None,
    };
    let ledger = Arc::new(Ledger::default());
    let shutdown = CancellationToken::new();
    // The start-up `idemq serve` uses: checks the server, opens the bucket,
    // and returns once the worker takes intents.
    let server = Server::start(client, ledger, config, shutdown.clone()).await?;
    let signals = tokio::spawn(cancel_on_signal(shutdown));
    let stats = server.stats();
    // The line a supervisor (or a test) waits for.
    println!(
        "{}",
        json!({"event": "ready", "subject": args.subject, "bucket": args.bucket})
    );
    let result = server.wait().await;
    signals.abort();
    result?;
    println!("{}", json!({"event": "stopped", "stats": stats.snapshot()}));
    Ok(())
}

//! idemq: an idempotent intent worker for NATS.
//!
//! Agents publish *intents* ("do this step of this run") on NATS. Networks
//! fail and clients retry, so the same intent arrives more than once. idemq
//! derives an idempotency key per message, claims it atomically in a
//! JetStream key-value bucket with a lease, runs the handler once, stores
//! the outcome with a TTL, and answers every copy with the same outcome.
//!
//! # Layout
//!
//! The modules in the order an intent meets them; each uses only those
//! above it. Public ones are the API; the rest are internals. `docs/`
//! holds the contract (`docs/contract.md`) and the claim protocol
//! (`docs/claim.md`) that the code cites.
//!
//! * [`codes`]: every wire error code idemq puts on the wire, one table.
//! * [`key`]: the seed-compatible [`IdempotencyKey`]: derive, parse, display.
//! * [`intent`]: the envelope: decode, validate, fingerprint ([`Intent`]).
//! * `reply_policy`: where a reply may go: never where the caller could
//!   turn the worker's credentials against the bucket, the JetStream API or
//!   the worker's own subjects.
//! * [`outcome`]: [`Outcome`] and the stored [`Record`].
//! * [`reply`]: the [`Reply`] on the wire and its headers; every answer
//!   encoded once.
//! * [`store`]: the backend trait [`IdempotencyStore`] (storage only) and
//!   the claim protocol over it, [`store::ClaimProtocol`];
//!   [`store::kv`] on JetStream KV, [`store::memory`] in process.
//! * [`handler`]: the [`Handler`] trait; [`handler::Echo`] and
//!   [`handler::Forward`].
//! * [`stats`]: what the worker did: Prometheus metrics, also shown by the service.
//! * [`run_once`]: [`Idempotent::run`], the claim protocol as one call:
//!   claim, run a closure under a renewed lease, store, replay.
//! * [`seed`]: the seed's helpers on [`Idempotent`] (the migration path).
//! * [`auth`]: NATS authentication flags (token, user/password, nkey,
//!   credentials, TLS) applied to every connection.
//! * [`nats`]: [`nats::NatsArgs`], `connect`, credentials in URLs, and
//!   telling a refused permission or a cluster not ready yet from other
//!   server errors.
//! * [`config`]: [`WorkerConfig`] with the contract's defaults, bounds and validation.
//! * `config_file`: the optional TOML file under the flags; `--print-config`.
//! * `service`: the `idemq` NATS micro service (discovery, stats).
//! * `cache`: stored outcomes kept in memory for replays.
//! * `in_flight`: the keys this worker is working on, so local copies wait.
//! * `purge`: purging a stored outcome, and the notices every worker acts on.
//! * `verdict`: what became of a delivery, and the refusals, each mapped to
//!   its wire code in one place.
//! * `pipeline`: one delivery's path, decode to verdict, the execution
//!   step through [`run_once`].
//! * `intake`: the permit-bounded intake both delivery modes (and the
//!   benchmark's baselines) share.
//! * `delivery`: core request/reply with its byte-bounded intake, and the
//!   JetStream pull consumer (acks, naks), its reply routes and dead letters.
//! * [`worker`]: a [`Worker`]: the pipeline, a delivery, registration and shutdown.
//! * [`http`]: `/metrics`, `/healthz`, `/readyz` on `--metrics-addr`.
//! * [`server`]: the one start-up path ([`server::Server::start`]): what
//!   `idemq serve`, the tests, the benchmark and `examples/embed.rs` call.
//! * [`admin`]: the data behind `idemq stats` and what `idemq purge` does.
//! * `cli`: the `idemq` command line, one file per command; it renders
//!   what the library returns (public for the binary, not an API).
//!
//! The benchmark is the workspace's other crate, `bench/` (`idemq-bench`).
//!
//! # Run once, without a worker
//!
//! Any Rust service with a key (an HTTP handler, its own consumer, a batch
//! job) runs a closure once per key with [`Idempotent::run`], on the same
//! claim protocol and store as the worker (whose pipeline calls it):
//!
//! ```no_run
//! use std::sync::Arc;
//! use idemq::run_once::{fingerprint_of, Idempotent, RunError, RunOptions};
//! use idemq::store::kv::{BucketConfig, KvStore};
//! use idemq::{HandlerError, IdempotencyKey, Outcome};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let store = KvStore::open(async_nats::jetstream::new(client), &BucketConfig::default()).await?;
//! let once = Idempotent::new(Arc::new(store), RunOptions::default());
//! let request = serde_json::json!({"account": "acme", "amount": 42});
//! let key = IdempotencyKey::generate("order-7", "checkout", 0);
//! match once
//!     .run(&key, &fingerprint_of(&request)?, |_attempt| async {
//!         // Stored and replayed to every later caller of the key; a
//!         // `HandlerError::Transient` is not stored, and the next call runs again.
//!         Ok::<_, HandlerError>(Outcome::Success(serde_json::json!({"charged": 42})))
//!     })
//!     .await
//! {
//!     Ok(done) => println!("{:?}, replayed: {}", done.outcome(), done.replayed),
//!     Err(RunError::KeyReused) => println!("this key was used for another request"),
//!     Err(RunError::InProgress { retry_after }) => println!("running elsewhere; retry in {retry_after:?}"),
//!     Err(other) => println!("not done: {other}"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! `examples/run_once.rs` is an HTTP service built on it.
//!
//! # Embedding
//!
//! Bring your own [`Handler`]. The worker claims each intent's key, calls
//! the handler at most once per claim, stores what it returns and answers
//! every copy of the intent with it. A handler returns
//!
//! * [`Outcome::Success`] with a value, or [`Outcome::error`] for a definite
//!   error (bad params): both are stored and replayed to every copy;
//! * [`HandlerError::Transient`] for a failure a retry may fix: nothing is
//!   stored, the claim is released, and the client's retry with the same
//!   key runs the handler again.
//!
//! A complete program is `examples/embed.rs` (`cargo run --example embed --
//! --nats-url URL`): a ledger handler that keeps state and shows all three
//! endings, a [`WorkerConfig`], [`store::kv::KvStore`], and a clean shutdown
//! on Ctrl-C or SIGTERM. `tests/examples.rs` runs it against a real
//! nats-server. `examples/python/` has the other side: an agent (nats-py)
//! that publishes intents and retries with the same key.
//!
//! ```no_run
//! use std::sync::Arc;
//! use async_trait::async_trait;
//! use idemq::{Call, Handler, HandlerError, Outcome, Worker, WorkerConfig};
//! use idemq::store::kv::{BucketConfig, KvStore};
//! use tokio_util::sync::CancellationToken;
//!
//! struct Charge;
//!
//! #[async_trait]
//! impl Handler for Charge {
//!     async fn handle(&self, call: Call<'_>) -> Result<Outcome, HandlerError> {
//!         // Runs at most once per key while the outcome is kept.
//!         let Some(amount) = call.intent.params["amount"].as_u64() else {
//!             return Ok(Outcome::error("BAD_PARAMS", "params.amount must be a number"));
//!         };
//!         if amount > 1_000 {
//!             return Err(HandlerError::Transient {
//!                 code: "503".into(),
//!                 message: "needs approval; retry later".into(),
//!             });
//!         }
//!         Ok(Outcome::Success(serde_json::json!({ "charged": amount })))
//!     }
//! }
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let store = KvStore::open(async_nats::jetstream::new(client.clone()), &BucketConfig::default()).await?;
//! let config = WorkerConfig { subjects: vec!["intents.charge".into()], ..WorkerConfig::default() };
//! let worker = Worker::new(client, Arc::new(store), Arc::new(Charge), config);
//! let shutdown = CancellationToken::new();
//! let on_ctrl_c = shutdown.clone();
//! tokio::spawn(async move {
//!     // An error means no signal handler could be installed: run until killed.
//!     if tokio::signal::ctrl_c().await.is_ok() {
//!         on_ctrl_c.cancel();
//!     }
//! });
//! // Returns after a clean shutdown: intake stopped, in-flight intents done.
//! worker.run(shutdown).await?;
//! # Ok(())
//! # }
//! ```

pub mod codes;
pub mod key;
pub mod intent;
mod reply_policy;
pub mod outcome;
pub mod reply;
pub mod store;
pub mod handler;
pub mod stats;
pub mod run_once;
pub mod seed;
pub mod auth;
pub mod nats;
pub mod config;
mod config_file;
mod service;
mod cache;
mod in_flight;
mod purge;
mod verdict;
mod pipeline;
#[doc(hidden)]
pub mod intake;
mod delivery;
pub mod worker;
pub mod http;
pub mod server;
pub mod admin;
#[doc(hidden)]
pub mod cli;

pub use config::WorkerConfig;
pub use delivery::DeliveryError;
pub use handler::{Call, Handler, HandlerError};
pub use intent::Intent;
pub use key::IdempotencyKey;
pub use outcome::{Outcome, Record};
pub use reply::Reply;
pub use run_once::Idempotent;
pub use store::IdempotencyStore;
pub use worker::Worker;

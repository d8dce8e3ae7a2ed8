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
//! above it.
//!
//! * [`key`]: the seed-compatible [`IdempotencyKey`]: derive, parse, display.
//! * [`intent`]: the envelope: decode, validate, fingerprint ([`Intent`]).
//! * [`outcome`]: [`Outcome`], the stored [`Record`], the [`Reply`].
//! * [`store`]: the [`IdempotencyStore`] trait and the claim protocol;
//!   [`store::kv`] on JetStream KV, [`store::memory`] in process.
//! * [`handler`]: the [`Handler`] trait; [`handler::Echo`] and
//!   [`handler::Forward`].
//! * [`auth`]: NATS authentication flags (token, user/password, nkey,
//!   credentials, TLS) applied to every connection.
//! * [`config`]: [`WorkerConfig`] with the contract's defaults; the shared
//!   NATS flags and `connect`.
//! * [`stats`]: counters shared by the worker and the service.
//! * [`service`]: the `idemq` NATS micro service (discovery, stats).
//! * [`cache`]: stored outcomes kept in memory for replays; purge notices.
//! * [`pipeline`]: one delivery's path, decode to verdict ([`Verdict`]).
//! * [`jetstream`]: JetStream delivery: pull consumer, acks, dead letters.
//! * [`worker`]: intake, the in-flight bound and shutdown ([`Worker`]).
//! * [`bench`]: `idemq bench`, idemq measured beside baselines in one run.
//! * [`cli`]: the `idemq` command line (`serve`, `send`, `key`, `get`, `bench`).
//!
//! # Embedding
//!
//! ```no_run
//! use std::sync::Arc;
//! use async_trait::async_trait;
//! use idemq::{Call, Handler, HandlerError, Outcome, Worker, WorkerConfig};
//! use idemq::store::kv::{BucketConfig, KvStore};
//!
//! struct Charge;
//!
//! #[async_trait]
//! impl Handler for Charge {
//!     async fn handle(&self, call: Call<'_>) -> Result<Outcome, HandlerError> {
//!         // Runs at most once per key while the outcome is kept.
//!         Ok(Outcome::Success(serde_json::json!({ "charged": call.intent.params })))
//!     }
//! }
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let store = KvStore::open(async_nats::jetstream::new(client.clone()), &BucketConfig::default()).await?;
//! let worker = Worker::new(client, Arc::new(store), Arc::new(Charge), WorkerConfig::default());
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! worker.run(shutdown).await?;
//! # Ok(())
//! # }
//! ```

pub mod key;
pub mod intent;
pub mod outcome;
pub mod store;
pub mod handler;
pub mod auth;
pub mod config;
pub mod stats;
pub mod service;
pub mod cache;
pub mod pipeline;
pub mod jetstream;
pub mod worker;
pub mod bench;
pub mod cli;

pub use config::WorkerConfig;
pub use handler::{Call, Handler, HandlerError};
pub use intent::Intent;
pub use key::IdempotencyKey;
pub use outcome::{Outcome, Record, Reply};
pub use pipeline::{Rejection, Verdict};
pub use store::IdempotencyStore;
pub use worker::Worker;

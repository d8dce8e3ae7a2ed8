//! Shared integration-test fixtures. Each test binary includes this module
//! (`mod common;`); `bench/tests/` include `server.rs` alone by path.
//!
//! * [`server`]: a real nats-server per test (re-exported here);
//! * [`cluster`]: three of them routed into a JetStream cluster;
//! * [`intents`]: the intents tests send, their keys, a reply's code;
//! * [`poll`]: [`eventually`](poll::eventually), waiting (bounded) for a condition;
//! * [`proxy`]: a TCP fault proxy (hold, drop, delay, lag, sever);
//! * [`rig`]: a server, a client and an upstream, as most tests start;
//! * [`stores`]: both stores for one suite, and a store with faults under it;
//! * [`upstream`]: a scripted `--forward` upstream;
//! * [`workers`]: starting and calling workers, in process or as the binary
//!   (and reading a process's `/proc/<pid>/status`).

#![allow(dead_code)]

pub mod cluster;
pub mod intents;
pub mod poll;
pub mod proxy;
pub mod rig;
pub mod server;
pub mod stores;
pub mod upstream;
pub mod workers;

pub use server::*;

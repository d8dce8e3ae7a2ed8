//! The set-up most end-to-end tests start from: a fresh nats-server, a
//! client on it, and the scripted upstream a `--forward` worker calls.

use async_nats::Client;

use super::upstream::Upstream;
use super::NatsServer;

/// A server, a client, an upstream (see the module docs).
pub struct Rig {
    /// The test's own nats-server.
    pub server: NatsServer,
    /// A client on it, for the test's requests and spies.
    pub client: Client,
    /// The scripted upstream on `exec.>`.
    pub upstream: Upstream,
}

impl Rig {
    /// Starts the three.
    pub async fn start() -> Rig {
        let server = NatsServer::start();
        let client = server.connect().await;
        let upstream = Upstream::start(&client).await;
        Rig {
            server,
            client,
            upstream,
        }
    }
}

//! A small TCP fault proxy between a NATS client and its server, on
//! loopback: real network faults without faking the client.
//!
//! Every accepted connection is piped to the server in both directions.
//! Each direction can be *held* (bytes read are kept until released: a
//! stalled network, where late bytes still arrive), *dropped* (bytes read
//! are discarded: the protocol stream breaks, as on a lossy middlebox),
//! or *delayed* (each chunk waits before it is written); and all current
//! connections can be *severed* at once. Dropping the proxy stops it and
//! closes every connection it carries.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// One direction of the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server (publishes, requests).
    Up,
    /// Server to client (deliveries, acks, replies).
    Down,
}

/// What happens to one direction's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Passed on.
    Pass,
    /// Kept until the mode changes back.
    Hold,
    /// Discarded.
    Drop,
}

struct Faults {
    up: watch::Sender<Mode>,
    down: watch::Sender<Mode>,
    delay: Mutex<Duration>,
    /// Bumped to sever every open connection.
    severed: watch::Sender<u64>,
}

impl Faults {
    fn mode(&self, direction: Direction) -> &watch::Sender<Mode> {
        match direction {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }
}

/// A running proxy; stopped on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    faults: Arc<Faults>,
    tasks: JoinSet<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `server`.
    pub async fn start(server: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let faults = Arc::new(Faults {
            up: watch::Sender::new(Mode::Pass),
            down: watch::Sender::new(Mode::Pass),
            delay: Mutex::new(Duration::ZERO),
            severed: watch::Sender::new(0),
        });
        let mut tasks = JoinSet::new();
        let shared = Arc::clone(&faults);
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(server).await else {
                    continue;
                };
                connections.spawn(carry(client, upstream, Arc::clone(&shared)));
            }
        });
        FaultProxy {
            addr,
            faults,
            tasks,
        }
    }

    /// A proxy in front of the test's `server`.
    pub async fn before(server: &super::NatsServer) -> FaultProxy {
        FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], server.port()))).await
    }

    /// `nats://127.0.0.1:<port>` of the proxy.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Sets what happens to `direction`'s bytes from now on.
    pub fn set(&self, direction: Direction, mode: Mode) {
        self.faults.mode(direction).send_replace(mode);
    }

    /// Delays every chunk in both directions by `delay` (zero: none).
    pub fn delay(&self, delay: Duration) {
        *self.faults.delay.lock().expect("delay lock") = delay;
    }

    /// Closes every connection open now; new ones are accepted as before.
    pub fn sever(&self) {
        self.faults.severed.send_modify(|n| *n += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Pipes one connection both ways until either side closes or it is severed.
async fn carry(client: TcpStream, upstream: TcpStream, faults: Arc<Faults>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = upstream.into_split();
    let mut severed = faults.severed.subscribe();
    severed.borrow_and_update();
    let up = pipe(
        client_read,
        server_write,
        Direction::Up,
        Arc::clone(&faults),
    );
    let down = pipe(server_read, client_write, Direction::Down, faults);
    tokio::select! {
        () = up => {}
        () = down => {}
        _ = severed.changed() => {}
    }
    // Both halves of both sockets drop here: the connection is closed.
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    direction: Direction,
    faults: Arc<Faults>,
) {
    let mut mode = faults.mode(direction).subscribe();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Held bytes wait here; the sender's own buffers fill behind them.
        if mode.wait_for(|m| *m != Mode::Hold).await.is_err() {
            return;
        }
        if *mode.borrow() == Mode::Drop {
            continue;
        }
        let delay = *faults.delay.lock().expect("delay lock");
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

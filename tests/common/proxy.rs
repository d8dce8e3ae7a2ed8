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
//!
//! A delay stalls the reading side while it waits (backpressure: the
//! sender's writes stall too). A *lag* does not: bytes are read at once
//! and written, in order, `lag` after they arrived, as over a long link.
//! A lag can apply to every connection or only to those whose client
//! opened with a given marker (say, a NATS route's `INFO` naming the
//! account the route is dedicated to).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

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

/// How many of the first bytes a client sends are kept as its opening.
pub const OPENING_BYTES: usize = 4096;

/// A lag on one direction: how long, and on which connections.
#[derive(Debug, Clone, Default)]
struct Lag {
    lag: Duration,
    /// Only connections whose opening contains this (`None`: all).
    marker: Option<Vec<u8>>,
}

impl Lag {
    fn of(&self, connection: &Connection) -> Duration {
        match &self.marker {
            _ if self.lag.is_zero() => Duration::ZERO,
            None => self.lag,
            Some(marker) if connection.opened_with(marker) => self.lag,
            Some(_) => Duration::ZERO,
        }
    }
}

/// What the proxy knows of one connection.
#[derive(Default)]
struct Connection {
    /// The first [`OPENING_BYTES`] the client sent.
    opening: Mutex<Vec<u8>>,
}

impl Connection {
    fn record(&self, bytes: &[u8]) {
        let mut opening = self.opening.lock().expect("opening lock");
        let room = OPENING_BYTES.saturating_sub(opening.len());
        opening.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn opened_with(&self, marker: &[u8]) -> bool {
        let opening = self.opening.lock().expect("opening lock");
        !marker.is_empty() && opening.windows(marker.len()).any(|w| w == marker)
    }
}

struct Faults {
    up: watch::Sender<Mode>,
    down: watch::Sender<Mode>,
    delay: Mutex<Duration>,
    up_lag: Mutex<Lag>,
    down_lag: Mutex<Lag>,
    /// Every connection accepted (dropped ones no longer upgrade).
    connections: Mutex<Vec<Weak<Connection>>>,
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

    fn lag(&self, direction: Direction) -> &Mutex<Lag> {
        match direction {
            Direction::Up => &self.up_lag,
            Direction::Down => &self.down_lag,
        }
    }

    fn lag_of(&self, direction: Direction, connection: &Connection) -> Duration {
        self.lag(direction).lock().expect("lag lock").of(connection)
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
            up_lag: Mutex::default(),
            down_lag: Mutex::default(),
            connections: Mutex::default(),
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
                let connection = Arc::new(Connection::default());
                {
                    let mut all = shared.connections.lock().expect("connections lock");
                    all.retain(|c| c.strong_count() > 0);
                    all.push(Arc::downgrade(&connection));
                }
                connections.spawn(carry(client, upstream, Arc::clone(&shared), connection));
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

    /// The proxy's own address (clients connect here).
    pub fn addr(&self) -> SocketAddr {
        self.addr
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

    /// Lags `direction`'s bytes on every connection by `lag` (zero: none):
    /// they are read as soon as they come (no backpressure; the sender's
    /// writes never stall) and written in order once `lag` has passed.
    /// A [`Mode::Hold`] stops the reading as without a lag (bytes already
    /// lagged still arrive); a [`Mode::Drop`] discards what is read.
    pub fn lag(&self, direction: Direction, lag: Duration) {
        *self.faults.lag(direction).lock().expect("lag lock") = Lag { lag, marker: None };
    }

    /// [`FaultProxy::lag`], only on the connections whose client's first
    /// [`OPENING_BYTES`] contain `marker`; the others pass unlagged.
    pub fn lag_marked(&self, direction: Direction, marker: &str, lag: Duration) {
        *self.faults.lag(direction).lock().expect("lag lock") = Lag {
            lag,
            marker: Some(marker.as_bytes().to_vec()),
        };
    }

    /// The opening (first bytes sent by the client, lossily as text) of
    /// every connection open now, oldest first.
    pub fn openings(&self) -> Vec<String> {
        let all = self.faults.connections.lock().expect("connections lock");
        all.iter()
            .filter_map(Weak::upgrade)
            .map(|c| String::from_utf8_lossy(&c.opening.lock().expect("opening lock")).into_owned())
            .collect()
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
async fn carry(
    client: TcpStream,
    upstream: TcpStream,
    faults: Arc<Faults>,
    connection: Arc<Connection>,
) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = upstream.into_split();
    let mut severed = faults.severed.subscribe();
    severed.borrow_and_update();
    let up = pipe(
        client_read,
        server_write,
        Direction::Up,
        Arc::clone(&faults),
        Arc::clone(&connection),
    );
    let down = pipe(
        server_read,
        client_write,
        Direction::Down,
        faults,
        connection,
    );
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
    connection: Arc<Connection>,
) {
    let mut mode = faults.mode(direction).subscribe();
    let mut buffer = vec![0u8; 64 * 1024];
    // Lagged chunks, each with the time it may be written.
    let mut lagged: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    loop {
        let lag = faults.lag_of(direction, &connection);
        if !lag.is_zero() || !lagged.is_empty() {
            let due = lagged.front().map(|(at, _)| *at);
            let reading = *mode.borrow_and_update() != Mode::Hold;
            tokio::select! {
                () = sleep_until_some(due) => {
                    let (_, chunk) = lagged.pop_front().expect("a due chunk");
                    if to.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                read = from.read(&mut buffer), if reading => {
                    let n = match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if direction == Direction::Up {
                        connection.record(&buffer[..n]);
                    }
                    if *mode.borrow() == Mode::Drop {
                        continue;
                    }
                    // Never before a chunk read earlier: the order holds
                    // when the lag shrinks.
                    let at = lagged.back().map_or(Instant::now(), |(at, _)| *at);
                    let at = at.max(Instant::now() + lag);
                    lagged.push_back((at, buffer[..n].to_vec()));
                }
                changed = mode.changed() => if changed.is_err() {
                    return;
                },
            }
            continue;
        }
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if direction == Direction::Up {
            connection.record(&buffer[..n]);
        }
        // A lag set while this read waited applies to what it read.
        let lag = faults.lag_of(direction, &connection);
        if !lag.is_zero() && *mode.borrow() == Mode::Pass {
            lagged.push_back((Instant::now() + lag, buffer[..n].to_vec()));
            continue;
        }
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
    // The sender closed: what is still on the way arrives, then the close.
    for (at, chunk) in lagged {
        tokio::time::sleep_until(at).await;
        if to.write_all(&chunk).await.is_err() {
            return;
        }
    }
}

/// Sleeps until `at`; forever when there is none.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

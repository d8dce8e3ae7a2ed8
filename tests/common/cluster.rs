//! A real JetStream cluster of `nats-server` processes on loopback, for tests
//! of replicated buckets and of failover (kill a node, keep working).
//!
//! Each node is spawned exactly like the single-server fixture
//! ([`super::NatsServer`]): same binary lookup, `-a 127.0.0.1 -js -sd <dir>/js`,
//! log in `<dir>/server.log`, client port chosen by the server (`-p -1`) and
//! read back from its ports file. On top of that each node gets a small
//! config file, `<dir>/node.conf`, with its `server_name` (`n1`, `n2`, ...),
//! the cluster name [`CLUSTER_NAME`], its route listener and routes to every
//! node (a node ignores the route to itself).
//!
//! Route ports have to be known before any node starts (every node's config
//! lists them all), so they are picked by binding `127.0.0.1:0` and closing
//! the listener. That is racy: another process can take the port before the
//! node binds it. The node then exits at once ("Error listening on router
//! port"), and [`NatsCluster::start`] throws the whole attempt away and starts
//! over with fresh ports and a fresh store, up to [`START_ATTEMPTS`] times.
//!
//! `start` returns only once JetStream is usable cluster-wide: the account
//! info answers and an R3 stream (`READY_CHECK`) can be created and deleted,
//! i.e. a meta leader is elected and every node is a JetStream peer.
//!
//! [`LaggingCluster`] is the same cluster with node `n3` reached only
//! through a [`FaultProxy`], so that it can be made a follower that applies
//! writes late while it answers direct gets at once (stale reads).

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::poll::eventually;
use super::proxy::{Direction, FaultProxy};
use super::server::{
    check_alive, find_nats_server, log_tail, port_from_url, respawn, spawn, wait_for_ports_file,
    wait_for_tcp, CONNECT_TIMEOUT, POLL_STEP, RESTART_ATTEMPTS,
};

/// The `cluster.name` every node is configured with.
pub const CLUSTER_NAME: &str = "idemq-test";
/// Whole-cluster start attempts (each with fresh ports) before giving up.
pub const START_ATTEMPTS: u32 = 3;
/// Bound on waiting for JetStream to be usable cluster-wide after the nodes
/// are up (meta leader election takes a few seconds).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one JetStream API call while probing readiness.
const PROBE_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between readiness probes.
const PROBE_STEP: Duration = Duration::from_millis(200);
/// The R3 stream created and deleted to prove the cluster can place replicas.
const READY_STREAM: &str = "READY_CHECK";

/// One `nats-server` process of the cluster.
struct Node {
    /// `server_name`: `n1`, `n2`, ...
    name: String,
    /// Store dir, config, ports file and log of this node.
    dir: PathBuf,
    /// `<dir>/node.conf`.
    conf: PathBuf,
    client_port: u16,
    route_port: u16,
    child: Option<Child>,
}

impl Node {
    /// Node `n<i+1>` in a directory of its own under `root`, with the
    /// configuration `config` writes for its name; not started yet.
    fn create(root: &Path, i: usize, route_port: u16, config: impl FnOnce(&str) -> String) -> Node {
        let name = format!("n{}", i + 1);
        let dir = root.join(&name);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let conf = dir.join("node.conf");
        fs::write(&conf, config(&name)).unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
        Node {
            name,
            dir,
            conf,
            client_port: 0,
            route_port,
            child: None,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    fn extra_args(&self) -> Vec<String> {
        vec!["-c".to_owned(), self.conf.display().to_string()]
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean the process already exited; either way it is gone.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running JetStream cluster; dropping it kills every node, then removes
/// the temp dir holding all stores and logs.
pub struct NatsCluster {
    nodes: Vec<Node>,
    bin: PathBuf,
    // Declared last so it is dropped after `Drop::drop` has killed the nodes.
    root: tempfile::TempDir,
}

/// The failed attempts to start a cluster, for the panic once all failed.
struct FailedStarts {
    what: String,
    failures: Vec<String>,
}

impl FailedStarts {
    fn new(what: String) -> FailedStarts {
        FailedStarts {
            what,
            failures: Vec::new(),
        }
    }

    /// Notes attempt `attempt`'s failure, and says so at once (visible
    /// with --nocapture): a retry is normal after a lost port race,
    /// frequent ones are worth a look.
    fn note(&mut self, attempt: u32, msg: String) {
        let first = msg.lines().next().unwrap_or_default();
        eprintln!(
            "{} start attempt {attempt}/{START_ATTEMPTS} failed: {first}",
            self.what
        );
        self.failures.push(format!("attempt {attempt}: {msg}"));
    }

    /// Panics with every attempt's failure.
    fn give_up(self) -> ! {
        panic!(
            "{} failed to start:\n{}",
            self.what,
            self.failures.join("\n")
        );
    }
}

impl NatsCluster {
    /// The stream's leader, as its info says (`None`: unknown now).
    pub async fn leader_of(js: &async_nats::jetstream::Context, stream: &str) -> Option<String> {
        let mut stream = js.get_stream(stream).await.ok()?;
        let info = stream.info().await.ok()?;
        info.cluster.as_ref()?.leader.clone()
    }

    /// Starts an `n`-node cluster (n = 3 for R3 streams) with empty stores and
    /// returns once JetStream accepts an R3 stream. Panics, with the tail of
    /// every node's log, if that fails [`START_ATTEMPTS`] times.
    ///
    /// Blocking; may be called from inside a tokio runtime (the readiness
    /// probe runs on a runtime of its own in a helper thread).
    pub fn start(n: usize) -> NatsCluster {
        assert!(n >= 1, "a cluster needs at least one node");
        let bin = find_nats_server();
        let mut failed = FailedStarts::new(format!("{n}-node nats-server cluster"));
        for attempt in 1..=START_ATTEMPTS {
            match NatsCluster::try_start(&bin, n) {
                Ok(cluster) => return cluster,
                Err(msg) => failed.note(attempt, msg),
            }
        }
        failed.give_up()
    }

    /// One attempt; on failure every node of it is killed (by `Drop`) and the
    /// error carries the logs.
    fn try_start(bin: &Path, n: usize) -> Result<NatsCluster, String> {
        let root = tempfile::TempDir::new().expect("create temp dir for nats cluster");
        let route_ports = free_ports(n);
        let routes = route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");

        let nodes = route_ports
            .iter()
            .enumerate()
            .map(|(i, &route_port)| {
                Node::create(root.path(), i, route_port, |name| {
                    node_config(name, route_port, &routes)
                })
            })
            .collect();
        let mut cluster = NatsCluster {
            nodes,
            bin: bin.to_owned(),
            root,
        };

        for i in 0..n {
            if let Err(msg) = cluster.first_spawn(i) {
                return Err(cluster.failure(&msg));
            }
        }
        match cluster.wait_ready_blocking() {
            Ok(()) => Ok(cluster),
            Err(msg) => Err(cluster.failure(&msg)),
        }
    }

    /// Spawns node `i` on a server-chosen client port and records the port.
    fn first_spawn(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        let mut child = spawn(&self.bin, &node.dir, "-1", &node.extra_args());
        let result = wait_for_ports_file(&mut child, &node.dir).and_then(|url| {
            node.client_port = port_from_url(&url);
            wait_for_tcp(&mut child, node.client_port)
        });
        // Kept even on error, so that `Drop` kills it.
        node.child = Some(child);
        result.map_err(|msg| format!("{}: {msg}", node.name))
    }

    /// Runs the readiness probe in a helper thread (own runtime) while this
    /// thread watches the nodes; a node dying (e.g. its route port was taken)
    /// cuts the wait short.
    fn wait_ready_blocking(&mut self) -> Result<(), String> {
        let urls = self.url_list();
        let abort = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let probe = scope.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build tokio runtime for readiness probe")
                    .block_on(probe_jetstream(
                        &urls,
                        Instant::now() + READY_TIMEOUT,
                        &abort,
                    ))
            });
            let mut dead = None;
            while !probe.is_finished() {
                if dead.is_none() {
                    dead = self.nodes.iter_mut().find_map(|node| {
                        let child = node.child.as_mut()?;
                        check_alive(child)
                            .err()
                            .map(|msg| format!("{}: {msg}", node.name))
                    });
                    if dead.is_some() {
                        abort.store(true, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(POLL_STEP);
            }
            let probed = probe
                .join()
                .unwrap_or_else(|_| Err("readiness probe panicked".to_owned()));
            match dead {
                Some(msg) => Err(msg),
                None => probed,
            }
        })
    }

    /// `msg` plus the log tail of every node.
    fn failure(&self, msg: &str) -> String {
        let logs: Vec<String> = self.nodes.iter().map(|n| log_tail(&n.dir)).collect();
        format!("{msg}\n{}", logs.join("\n"))
    }

    fn url_list(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false (a cluster has at least one node); for clippy.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// All client URLs, comma-separated (`nats://127.0.0.1:p1,nats://...`),
    /// the form idemq's `--nats-url` takes.
    pub fn urls(&self) -> String {
        self.url_list().join(",")
    }

    /// Client URL of node `i` (0-based).
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// Client port of node `i`.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].client_port
    }

    /// Route (cluster) port of node `i`.
    pub fn route_port(&self, i: usize) -> u16 {
        self.nodes[i].route_port
    }

    /// `server_name` of node `i`: `n{i+1}`. This is what stream info reports
    /// as `cluster.leader` and in `cluster.replicas[].name`.
    pub fn server_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Index of the node with this `server_name`, e.g. of a stream leader.
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == server_name)
    }

    /// Directory of node `i`: `js/` store, `node.conf`, `server.log`.
    pub fn dir(&self, i: usize) -> &Path {
        &self.nodes[i].dir
    }

    /// Root temp dir holding every node's dir.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Whether node `i` is running (not killed, not exited).
    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .child
            .as_mut()
            .is_some_and(|c| check_alive(c).is_ok())
    }

    /// Kills node `i` (SIGKILL, a crash) and waits for it. Its store is kept
    /// for [`NatsCluster::restart`]. No-op if already stopped.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Kills node `i` if running, then starts it again with the same client
    /// and route ports, config and store dir. Returns once it accepts client
    /// connections; it may take a few more seconds to catch up as a
    /// JetStream peer (see [`NatsCluster::wait_ready`]).
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].kill();
        let node = &mut self.nodes[i];
        match respawn(&self.bin, &node.dir, node.client_port, &node.extra_args()) {
            Ok(child) => node.child = Some(child),
            Err(last_err) => panic!(
                "restart of {} (client port {}, route port {}) failed after {RESTART_ATTEMPTS} attempts: {last_err}\n{}",
                node.name,
                node.client_port,
                node.route_port,
                log_tail(&node.dir)
            ),
        }
    }

    /// Waits (bounded by [`READY_TIMEOUT`]) until JetStream can place an R3
    /// stream again, e.g. after [`NatsCluster::restart`]. Needs every node
    /// running: with one down, an R3 stream cannot be placed.
    pub async fn wait_ready(&self) {
        let abort = AtomicBool::new(false);
        if let Err(msg) =
            probe_jetstream(&self.url_list(), Instant::now() + READY_TIMEOUT, &abort).await
        {
            panic!("nats cluster not ready: {}", self.failure(&msg));
        }
    }

    /// Connects a client that knows every node (and so fails over to the
    /// others when its server dies); panics after 5 s or on error.
    pub async fn connect(&self) -> async_nats::Client {
        let urls = self.url_list();
        match tokio::time::timeout(CONNECT_TIMEOUT, async_nats::connect(urls.clone())).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!("connect to nats cluster {urls:?} failed: {e}"),
            Err(_) => {
                panic!("connect to nats cluster {urls:?} timed out after {CONNECT_TIMEOUT:?}")
            }
        }
    }

    /// Connects a client to node `i` only; panics after 5 s or on error.
    pub async fn connect_to(&self, i: usize) -> async_nats::Client {
        let url = self.url(i);
        match tokio::time::timeout(CONNECT_TIMEOUT, async_nats::connect(url.as_str())).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!("connect to {} at {url} failed: {e}", self.nodes[i].name),
            Err(_) => panic!(
                "connect to {} at {url} timed out after {CONNECT_TIMEOUT:?}",
                self.nodes[i].name
            ),
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

/// The per-node config; listen address, client port and JetStream (with
/// its store dir) come from the command line, as for the single server.
fn node_config(name: &str, route_port: u16, routes: &str) -> String {
    format!(
        "# Written by tests/common/cluster.rs.\n\
         server_name: {name}\n\
         cluster {{\n  \
           name: {CLUSTER_NAME}\n  \
           listen: 127.0.0.1:{route_port}\n  \
           routes: [{routes}]\n\
         }}\n"
    )
}

/// `n` distinct ports that were free a moment ago (all listeners are held
/// until every port is picked, so they differ). Racy, see the module docs.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to pick a port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr of picked port").port())
        .collect()
}

/// Polls until JetStream answers account info and can create and delete an
/// R3 memory stream, or `deadline` passes, or `abort` is set.
async fn probe_jetstream(
    urls: &[String],
    deadline: Instant,
    abort: &AtomicBool,
) -> Result<(), String> {
    use async_nats::jetstream;

    let expired = |step: &str, last: &str| -> Option<String> {
        if abort.load(Ordering::Relaxed) {
            Some(format!(
                "readiness probe aborted at {step} (last error: {last})"
            ))
        } else if Instant::now() >= deadline {
            Some(format!(
                "JetStream not ready after {READY_TIMEOUT:?}: {step} failed, last error: {last}"
            ))
        } else {
            None
        }
    };
    let mut last: String;

    let client = loop {
        match tokio::time::timeout(PROBE_CALL_TIMEOUT, async_nats::connect(urls.to_vec())).await {
            Ok(Ok(client)) => break client,
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".to_owned(),
        }
        if let Some(msg) = expired("connect", &last) {
            return Err(msg);
        }
        tokio::time::sleep(PROBE_STEP).await;
    };
    let js = jetstream::new(client);

    loop {
        match tokio::time::timeout(PROBE_CALL_TIMEOUT, js.query_account()).await {
            Ok(Ok(_)) => break,
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".to_owned(),
        }
        if let Some(msg) = expired("account info ($JS.API.INFO)", &last) {
            return Err(msg);
        }
        tokio::time::sleep(PROBE_STEP).await;
    }

    let replicas = urls.len();
    let config = jetstream::stream::Config {
        name: READY_STREAM.to_owned(),
        subjects: vec!["ready.check".to_owned()],
        storage: jetstream::stream::StorageType::Memory,
        num_replicas: replicas,
        ..Default::default()
    };
    loop {
        // Creating a stream with an identical config is idempotent, so a
        // create that timed out but went through is fine to repeat.
        match tokio::time::timeout(PROBE_CALL_TIMEOUT, js.create_stream(config.clone())).await {
            Ok(Ok(_)) => break,
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".to_owned(),
        }
        if let Some(msg) = expired(
            &format!("creating R{replicas} stream {READY_STREAM}"),
            &last,
        ) {
            return Err(msg);
        }
        tokio::time::sleep(PROBE_STEP).await;
    }

    loop {
        match tokio::time::timeout(PROBE_CALL_TIMEOUT, js.delete_stream(READY_STREAM)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => {
                if let jetstream::context::DeleteStreamErrorKind::JetStream(inner) = e.kind() {
                    if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND {
                        return Ok(());
                    }
                }
                last = e.to_string();
            }
            Err(_) => last = "timed out".to_owned(),
        }
        if let Some(msg) = expired(&format!("deleting stream {READY_STREAM}"), &last) {
            return Err(msg);
        }
        tokio::time::sleep(PROBE_STEP).await;
    }
}

// ---------------------------------------------------------------------------
// A cluster with a lagging follower.

/// Index of the node that [`LaggingCluster`] makes lag (`n3`).
pub const LAGGING: usize = 2;

/// What a soliciting server's first `INFO` on the route dedicated to the
/// system account says. JetStream replicates (its NRG traffic) in the
/// system account unless account NRG is turned on, so over that route,
/// while every other account's traffic (a client's direct get, say) runs
/// over the pooled routes. [`LaggingCluster::probe_stale_reads`] shows
/// whether lagging it does make reads stale.
pub const SYSTEM_ROUTE_MARKER: &str = r#""route_account":"$SYS""#;

/// Bound on the lagging cluster's own waits (routes, leaders, catch-up).
const LAGGING_WAIT: Duration = Duration::from_secs(20);
/// Bound on one monitoring HTTP call.
const MONITOR_CALL: Duration = Duration::from_secs(2);

/// Which traffic toward the lagging node is lagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lagged {
    /// Only replication (the system account's route): the node applies
    /// writes late but answers requests at once, from what it applied.
    Replication,
    /// Every byte toward the node: requests to it are late as well, by as
    /// much as the writes they would miss, which hides most of its lag.
    Everything,
}

/// A 3-node JetStream cluster whose node `n3` ([`LAGGING`]) is reached only
/// through a [`FaultProxy`] on its route port, so that what the others send
/// it can be made late, e.g. to make it a follower that applies writes late
/// while it still answers direct gets.
///
/// `n1` and `n2` route to each other and to the proxy; `n3` advertises the
/// proxy as its cluster address and routes only to that (itself: dropped
/// as a route to self, but JetStream needs a configured route to run
/// clustered), so it dials nobody and nobody dials it directly. `n1` and
/// `n2` start first and route to each other; `n3` joins once they do (a
/// node gossips only routes it adds, so `n3` never learns `n2`'s real
/// address). Every route connection is then dialed by `n1` or `n2` into the
/// proxy, and "toward `n3`" is the proxy's [`Direction::Up`].
/// [`LaggingCluster::start`] checks this on every node's `/routez`.
///
/// Needs a multi-threaded runtime (`#[tokio::test(flavor =
/// "multi_thread")]`): the proxy runs on it while nodes are spawned.
/// Dropping it kills every node and stops the proxy.
pub struct LaggingCluster {
    cluster: NatsCluster,
    proxy: FaultProxy,
    /// Monitoring (HTTP) port of each node.
    monitor_ports: Vec<u16>,
}

impl std::ops::Deref for LaggingCluster {
    type Target = NatsCluster;

    fn deref(&self) -> &NatsCluster {
        &self.cluster
    }
}

/// What [`LaggingCluster::probe_stale_reads`] saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct StaleReads {
    /// Writes probed.
    pub writes: usize,
    /// Direct gets sent right after them.
    pub reads: usize,
    /// Of those, answered without the write (no message: each probe key
    /// is written once).
    pub stale: usize,
    /// Of those, slower than the lag (answered through the lagging link).
    pub slow: usize,
}

impl std::fmt::Display for StaleReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} direct gets after {} writes were stale ({} answered slower than the lag)",
            self.stale, self.reads, self.writes, self.slow
        )
    }
}

impl LaggingCluster {
    /// Starts the cluster (no lag yet) and returns once JetStream accepts
    /// an R3 stream and every route of `n3` runs through the proxy. Panics
    /// with every node's log tail after [`START_ATTEMPTS`] failures.
    pub async fn start() -> LaggingCluster {
        let bin = find_nats_server();
        let mut failed =
            FailedStarts::new("3-node nats-server cluster with a proxied n3".to_owned());
        for attempt in 1..=START_ATTEMPTS {
            match LaggingCluster::try_start(&bin).await {
                Ok(cluster) => return cluster,
                Err(msg) => failed.note(attempt, msg),
            }
        }
        failed.give_up()
    }

    async fn try_start(bin: &Path) -> Result<LaggingCluster, String> {
        let root = tempfile::TempDir::new().expect("create temp dir for nats cluster");
        let route_ports = free_ports(3);
        let proxy = FaultProxy::start(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            route_ports[LAGGING],
        )))
        .await;
        let route = |port: u16| format!("nats-route://127.0.0.1:{port}");
        let through_proxy = format!("nats-route://{}", proxy.addr());
        let healthy_routes = format!(
            "{}, {}, {through_proxy}",
            route(route_ports[0]),
            route(route_ports[1])
        );
        let nodes = route_ports
            .iter()
            .enumerate()
            .map(|(i, &route_port)| {
                Node::create(root.path(), i, route_port, |name| {
                    if i == LAGGING {
                        lagging_node_config(name, route_port, &through_proxy, Some(proxy.addr()))
                    } else {
                        lagging_node_config(name, route_port, &healthy_routes, None)
                    }
                })
            })
            .collect();
        let mut lagging = LaggingCluster {
            cluster: NatsCluster {
                nodes,
                bin: bin.to_owned(),
                root,
            },
            proxy,
            monitor_ports: Vec::new(),
        };
        match lagging.bring_up().await {
            Ok(()) => Ok(lagging),
            Err(msg) => Err(lagging.cluster.failure(&msg)),
        }
    }

    async fn bring_up(&mut self) -> Result<(), String> {
        for i in [0, 1] {
            self.spawn_node(i)?;
        }
        // n3 joins only once n1 and n2 are routed to each other.
        self.wait_routes(0, |routes| {
            routes
                .iter()
                .any(|r| r["remote_name"] == self.server_name(1))
        })
        .await?;
        self.spawn_node(LAGGING)?;
        let abort = AtomicBool::new(false);
        probe_jetstream(
            &self.cluster.url_list(),
            Instant::now() + READY_TIMEOUT,
            &abort,
        )
        .await?;
        self.check_alive()?;
        self.check_routes_through_proxy().await
    }

    /// Spawns node `i` (blocking, outside the runtime's way) and reads its
    /// monitoring port.
    fn spawn_node(&mut self, i: usize) -> Result<(), String> {
        tokio::task::block_in_place(|| self.cluster.first_spawn(i))?;
        let dir = self.cluster.dir(i).to_owned();
        let port = read_ports(&dir)
            .and_then(|ports| ports["monitoring"][0].as_str().map(port_from_url))
            .ok_or_else(|| {
                format!(
                    "{}: no monitoring port in its ports file",
                    self.server_name(i)
                )
            })?;
        if self.monitor_ports.len() <= i {
            self.monitor_ports.resize(i + 1, 0);
        }
        self.monitor_ports[i] = port;
        Ok(())
    }

    fn check_alive(&mut self) -> Result<(), String> {
        for node in &mut self.cluster.nodes {
            if let Some(child) = node.child.as_mut() {
                check_alive(child).map_err(|msg| format!("{}: {msg}", node.name))?;
            }
        }
        Ok(())
    }

    /// Node `i`'s `/routez` (`routes`, as JSON).
    pub async fn routez(&self, i: usize) -> Result<Vec<serde_json::Value>, String> {
        let body = monitor_get(self.monitor_ports[i], "/routez").await?;
        Ok(body["routes"].as_array().cloned().unwrap_or_default())
    }

    /// Polls node `i`'s `/routez` until `done` holds, within [`LAGGING_WAIT`].
    async fn wait_routes(
        &self,
        i: usize,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Result<Vec<serde_json::Value>, String> {
        let deadline = tokio::time::Instant::now() + LAGGING_WAIT;
        loop {
            let last = match self.routez(i).await {
                Ok(routes) if done(&routes) => return Ok(routes),
                Ok(routes) => format!("routes: {routes:?}"),
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{}: routes not as expected after {LAGGING_WAIT:?}; {last}",
                    self.server_name(i)
                ));
            }
            tokio::time::sleep(PROBE_STEP).await;
        }
    }

    /// Every route of `n3` was dialed by its peer (none by `n3`), both
    /// peers are among them, and every route `n1` and `n2` hold to `n3`
    /// goes to the proxy's port.
    async fn check_routes_through_proxy(&self) -> Result<(), String> {
        let peers = [self.server_name(0), self.server_name(1)];
        let lagging = self
            .wait_routes(LAGGING, |routes| {
                peers
                    .iter()
                    .all(|peer| routes.iter().any(|r| r["remote_name"] == *peer))
            })
            .await?;
        if let Some(route) = lagging.iter().find(|r| r["did_solicit"] != false) {
            return Err(format!("n3 dialed a route itself, past the proxy: {route}"));
        }
        let proxy_port = u64::from(self.proxy.addr().port());
        for i in [0, 1] {
            for route in self.routez(i).await? {
                if route["remote_name"] == self.server_name(LAGGING) && route["port"] != proxy_port
                {
                    return Err(format!(
                        "{} reaches n3 past the proxy: {route}",
                        self.server_name(i)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Number of route connections between `n3` and its peers (from `n3`'s
    /// `/routez`), all through the proxy.
    pub async fn lagging_routes(&self) -> usize {
        self.routez(LAGGING).await.map_or(0, |routes| routes.len())
    }

    /// Lags what `n1` and `n2` send `n3` by `lag` (zero: none), on the
    /// routes `lagged` selects. Returns how many open connections that
    /// selects.
    pub fn lag(&self, lagged: Lagged, lag: Duration) -> usize {
        match lagged {
            Lagged::Replication => {
                self.proxy
                    .lag_marked(Direction::Up, SYSTEM_ROUTE_MARKER, lag);
                self.proxy
                    .openings()
                    .iter()
                    .filter(|o| o.contains(SYSTEM_ROUTE_MARKER))
                    .count()
            }
            Lagged::Everything => {
                self.proxy.lag(Direction::Up, lag);
                self.proxy.openings().len()
            }
        }
    }

    /// Makes sure `stream`'s leader is not `n3` (asking it to step down in
    /// favour of `n1` while it is) and returns the leader's name.
    pub async fn keep_leader_off_lagging(
        &self,
        js: &async_nats::jetstream::Context,
        stream: &str,
    ) -> String {
        let what = format!("{stream}: its leader off {}", self.server_name(LAGGING));
        eventually(LAGGING_WAIT, what, async || {
            let leader = NatsCluster::leader_of(js, stream).await;
            match leader.as_deref() {
                Some(name) if name != self.server_name(LAGGING) => return Ok(name.to_owned()),
                Some(_) => {
                    let request =
                        serde_json::json!({"placement": {"preferred": self.server_name(0)}});
                    // The answer does not matter: the leader is read again.
                    let _ = tokio::time::timeout(
                        PROBE_CALL_TIMEOUT,
                        js.client().request(
                            format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                            request.to_string().into(),
                        ),
                    )
                    .await;
                }
                None => {}
            }
            Err(format!("leader {leader:?}"))
        })
        .await
    }

    /// Waits until `n3` is a current replica of `stream`, caught up.
    pub async fn wait_lagging_current(&self, js: &async_nats::jetstream::Context, stream: &str) {
        let name = self.server_name(LAGGING);
        let what = format!("{stream}: {name} a current replica");
        eventually(LAGGING_WAIT, what, async || {
            let mut replicas = None;
            if let Ok(handle) = js.get_stream(stream).await {
                if let Ok(info) = handle.get_info().await {
                    replicas = info.cluster.as_ref().map(|c| c.replicas.clone());
                }
            }
            let current = replicas.iter().flatten().any(|peer| {
                peer.name == name && peer.current && !peer.offline && peer.lag.unwrap_or(0) == 0
            });
            if current {
                Ok(())
            } else {
                Err(format!("{replicas:?}"))
            }
        })
        .await;
    }

    /// The fixture's own check: `writes` times, writes a fresh key of
    /// `bucket`, then another (whose append tells the healthy follower the
    /// first is committed, so it applies it), then sends `reads` direct
    /// gets of the first key at once, as a KV client reads
    /// (`Store::entry`). Only a replica that has not applied the write
    /// answers without it: with the lag on, `n3`, about one get in three.
    pub async fn probe_stale_reads(
        js: &async_nats::jetstream::Context,
        bucket: &str,
        writes: usize,
        reads: usize,
        lag: Duration,
    ) -> StaleReads {
        let kv = js.get_key_value(bucket).await.expect("open the bucket");
        assert!(
            kv.stream.cached_info().config.allow_direct,
            "{bucket} answers direct gets"
        );
        let mut seen = StaleReads::default();
        let tag = std::process::id();
        for w in 0..writes {
            let key = format!("lag-probe.{tag}.{w}");
            let revision = kv.put(&key, "fresh".into()).await.expect("probe write");
            kv.put(format!("lag-probe.{tag}.next"), "next".into())
                .await
                .expect("probe's second write");
            let gets = (0..reads).map(|_| {
                let (kv, key) = (kv.clone(), key.clone());
                async move {
                    let started = tokio::time::Instant::now();
                    let entry = tokio::time::timeout(PROBE_CALL_TIMEOUT + lag, kv.entry(key))
                        .await
                        .expect("a direct get within its bound")
                        .expect("a direct get");
                    (entry.map(|e| e.revision), started.elapsed())
                }
            });
            for (got, took) in futures::future::join_all(gets).await {
                seen.reads += 1;
                if got.is_none_or(|r| r < revision) {
                    seen.stale += 1;
                    if took >= lag {
                        seen.slow += 1;
                    }
                }
            }
            seen.writes += 1;
        }
        seen
    }
}

/// The config of one node of a [`LaggingCluster`]: an HTTP monitoring
/// port of the server's choosing (in its ports file), routes as given,
/// and for `n3` the proxy as its advertised cluster address.
fn lagging_node_config(
    name: &str,
    route_port: u16,
    routes: &str,
    advertise: Option<std::net::SocketAddr>,
) -> String {
    let advertise = advertise.map_or(String::new(), |a| format!("  advertise: \"{a}\"\n"));
    format!(
        "# Written by tests/common/cluster.rs (LaggingCluster).\n\
         server_name: {name}\n\
         http: \"127.0.0.1:-1\"\n\
         cluster {{\n  \
           name: {CLUSTER_NAME}\n  \
           listen: 127.0.0.1:{route_port}\n\
         {advertise}  \
           routes: [{routes}]\n\
         }}\n"
    )
}

/// The ports file a node wrote into `dir`, as JSON.
fn read_ports(dir: &Path) -> Option<serde_json::Value> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|e| e == "ports"))
        .and_then(|path| fs::read_to_string(path).ok())
        .and_then(|text| serde_json::from_str(&text).ok())
}

/// `GET path` on a monitoring port of loopback, as JSON.
async fn monitor_get(port: u16, path: &str) -> Result<serde_json::Value, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let call = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect to monitoring port {port}: {e}"))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send GET {path}: {e}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("read GET {path}: {e}"))?;
        let text = String::from_utf8_lossy(&response);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body)
            .ok_or_else(|| format!("GET {path}: no body in {text:?}"))?;
        serde_json::from_str(body).map_err(|e| format!("GET {path}: {e} in {body:?}"))
    };
    tokio::time::timeout(MONITOR_CALL, call)
        .await
        .unwrap_or_else(|_| Err(format!("GET {path} on port {port}: timed out")))
}

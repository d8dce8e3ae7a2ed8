//! Chaos soak: a steady mixed load over three `idemq serve` processes while
//! a driver SIGKILLs and restarts workers, restarts the nats-server (or, on
//! a 3-node cluster at R3, kills and restarts a node), and injects network
//! faults through a TCP fault proxy in front of each worker (hold, drop,
//! delay, sever). Three runs: JetStream mode, core mode (clients retry), and
//! JetStream mode on a cluster. Then it checks what the contract promises
//! (docs/contract.md §4):
//!
//! * every intent is answered: in JetStream mode its reply lands in a
//!   stream, one per intent; in core mode a client retrying with the same
//!   key gets a settled answer;
//! * every settled answer is exactly the key's stored outcome (in core mode,
//!   every one a client got, retries and duplicates included);
//! * an intent runs more than once only around a fault that can cost its
//!   worker the lease: every execution whose outcome was not the one
//!   stored is the first try of a `flaky` intent (a transient failure,
//!   released by design) or falls in the window of a fault of its worker
//!   (a kill, a fault on its proxy, a server restart). Worker 0 is spared
//!   every fault but the one server restart, so its executions are held to
//!   that alone: a claim race between healthy workers would show there;
//! * the RSS of worker 0 stays flat (the last third of its samples within
//!   10 % of the middle third's peak);
//! * no server consumer leaks (the durable is the intent stream's only
//!   consumer; the bucket has none).
//!
//! Bounded and loopback only: each run's chaos lasts `IDEMQ_CHAOS_SECS`
//! seconds (default 25, so CI spends about two minutes here). The runs'
//! choices come from a seed: CI uses the recorded [`RECORDED_SEED`];
//! `IDEMQ_CHAOS_SEED=N` replays a run, `IDEMQ_CHAOS_SEED=random` draws one
//! (every run prints its seed). A long soak:
//! `IDEMQ_CHAOS_SECS=1800 cargo test --release --test chaos -- --nocapture`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Client, HeaderMap};
use common::cluster::NatsCluster;
use common::intents::error_code;
use common::poll::eventually;
use common::proxy::{Direction, FaultProxy, Mode};
use common::workers::{
    proc_status_kib, publish_acked, stream_replies, wait_for_workers, WorkerProcess,
};
use common::NatsServer;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;

const STREAM: &str = "INTENTS";
const DURABLE: &str = "workers";
/// How far an execution may be from a fault and still be explained by it:
/// the workers' handler timeout (5 s) and lease (2 s), with a margin.
const FAULT_WINDOW: Duration = Duration::from_secs(8);
/// Bound on answering every intent once the chaos stops.
const SETTLE_BOUND: Duration = Duration::from_secs(120);

/// A small xorshift generator: the run's choices, replayable by seed.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// One execution the upstream saw.
#[derive(Debug, Clone)]
struct Execution {
    id: u64,
    key: String,
    worker: Option<usize>,
    at: Instant,
}

/// The upstream: numbers every execution, and behaves by capability.
#[derive(Default)]
struct Upstream {
    executions: Mutex<Vec<Execution>>,
}

impl Upstream {
    async fn serve(self: Arc<Self>, client: Client) {
        let mut requests = client.subscribe("exec.*").await.expect("subscribe exec.*");
        client.flush().await.expect("flush");
        tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let this = Arc::clone(&self);
                let client = client.clone();
                tokio::spawn(async move { this.answer(&client, request).await });
            }
        });
    }

    async fn answer(&self, client: &Client, request: async_nats::Message) {
        let Some(reply) = request.reply.clone() else {
            return;
        };
        let key = request
            .headers
            .as_ref()
            .and_then(|h| h.get("Idem-Key"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        // Each worker runs with `--inbox-prefix _INBOX_w<i>`.
        let worker = reply
            .strip_prefix("_INBOX_w")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse().ok());
        let (id, first) = {
            let mut executions = self.executions.lock().expect("lock");
            let first = !executions.iter().any(|e| e.key == key);
            let id = executions.len() as u64 + 1;
            executions.push(Execution {
                id,
                key,
                worker,
                at: Instant::now(),
            });
            (id, first)
        };
        let capability = request.subject.rsplit('.').next().unwrap_or_default();
        let mut headers = HeaderMap::new();
        let body = json!({ "exec": id });
        match capability {
            "slow" => tokio::time::sleep(Duration::from_millis(600)).await,
            "fail" => {
                headers.insert("Nats-Service-Error-Code", "422");
                headers.insert("Nats-Service-Error", format!("exec {id}").as_str());
            }
            "flaky" if first => {
                headers.insert("Nats-Service-Error-Code", "503");
                headers.insert("Nats-Service-Error", format!("exec {id}").as_str());
            }
            _ => {}
        }
        // A reply lost to a fault is the worker's problem, as in life.
        let _ = client
            .publish_with_headers(reply, headers, body.to_string().into())
            .await;
    }

    fn executions(&self) -> Vec<Execution> {
        self.executions.lock().expect("lock").clone()
    }
}

/// A fault the driver injected: when, and which worker (`None`: all of
/// them, a server restart).
#[derive(Debug, Clone)]
struct Fault {
    at: Instant,
    worker: Option<usize>,
    what: String,
}

/// How a run delivers intents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// A stream and a durable consumer; replies captured in a stream.
    JetStream,
    /// Queue-group request/reply; clients retry.
    Core,
}

/// Where the workers run: one server, or a 3-node cluster at R3.
enum Servers {
    One(NatsServer),
    Cluster(NatsCluster),
}

impl Servers {
    /// The address worker `i`'s proxy forwards to.
    fn node_port(&self, i: usize) -> u16 {
        match self {
            Servers::One(server) => server.port(),
            Servers::Cluster(cluster) => cluster.port(i),
        }
    }

    /// The other nodes' URLs, for a worker to fail over to.
    fn others(&self, i: usize) -> Vec<String> {
        match self {
            Servers::One(_) => Vec::new(),
            Servers::Cluster(cluster) => (0..cluster.len())
                .filter(|&j| j != i)
                .map(|j| cluster.url(j))
                .collect(),
        }
    }

    async fn connect(&self) -> Client {
        match self {
            Servers::One(server) => server.connect().await,
            Servers::Cluster(cluster) => cluster.connect().await,
        }
    }

    /// Restarts the server, or kills and restarts node 1 of the cluster.
    async fn restart(&mut self) {
        match self {
            Servers::One(server) => server.restart(),
            Servers::Cluster(cluster) => {
                cluster.kill(1);
                tokio::time::sleep(Duration::from_secs(2)).await;
                cluster.restart(1);
                cluster.wait_ready().await;
            }
        }
    }
}

/// What a run starts its workers with.
struct Workers {
    delivery: Delivery,
    replicas: &'static str,
    /// Worker `i`'s URL list: its proxy first.
    urls: Vec<String>,
}

impl Workers {
    fn start(&self, i: usize) -> WorkerProcess {
        let mut args = vec![
            "--forward",
            "exec.{capability}",
            "--lease",
            "2s",
            "--handler-timeout",
            "5s",
            "--wait",
            "1s",
            "--concurrency",
            "16",
            "--grace",
            "2s",
            "--replicas",
            self.replicas,
            // Full early, so the steady worker's memory is flat after a while.
            "--cache",
            "1MiB",
        ];
        if self.delivery == Delivery::JetStream {
            args.extend([
                "--stream",
                STREAM,
                "--durable",
                DURABLE,
                "--ack-wait",
                "2s",
                "--max-deliver",
                "100",
            ]);
        }
        let prefix = format!("_INBOX_w{i}");
        args.extend(["--inbox-prefix", &prefix]);
        WorkerProcess::serve(&self.urls[i], &args)
    }
}

/// Publishes into the stream until the server takes it (60 s at most).
async fn publish(js: &jetstream::Context, body: &Value) {
    publish_acked(
        js,
        "intents.work",
        body.to_string().into(),
        Duration::from_secs(60),
    )
    .await;
}

/// Error codes that leave an intent unsettled: the client retries.
const UNSETTLED: [&str; 5] = [
    "IN_PROGRESS",
    "NO_HANDLER",
    "STORE_UNAVAILABLE",
    "503",
    "504",
];

/// A reply as its client saw it: the body, and whether the worker marked
/// it an executed outcome it could not store (`Idem-Stored: false`).
type Answer = (Value, bool);

/// Whether a reply is a settled answer (an outcome to compare with the
/// store). An outcome marked unstored is not: the client retries it
/// (docs/contract.md v1.2 §3).
fn settled((reply, unstored): &Answer) -> bool {
    let code = error_code(reply).unwrap_or_default();
    let refused = reply["result"]["status"] == "Error" && UNSETTLED.contains(&code);
    !(*unstored || refused)
}

/// Sends one intent as a core request until a settled answer (bounded),
/// recording every reply.
async fn request(client: &Client, body: &Value, seen: &Mutex<Vec<Answer>>) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        let request = async_nats::Request::new()
            .payload(body.to_string().into())
            .timeout(Some(Duration::from_secs(3)));
        if let Ok(reply) = client.send_request("intents.work", request).await {
            let unstored = reply
                .headers
                .as_ref()
                .and_then(|h| h.get("Idem-Stored"))
                .is_some_and(|v| v.as_str() == "false");
            if let Ok(body) = serde_json::from_slice::<Value>(&reply.payload) {
                let answer = (body, unstored);
                let done = settled(&answer);
                seen.lock().expect("lock").push(answer);
                if done {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no settled answer within 90 s: {body}");
}

fn settings() -> (u64, u64) {
    let secs = std::env::var("IDEMQ_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let seed = match std::env::var("IDEMQ_CHAOS_SEED").ok().as_deref() {
        None | Some("") => RECORDED_SEED,
        Some("random") => u64::from(std::process::id()) * 2_654_435_761 + 1,
        Some(seed) => seed
            .parse()
            .unwrap_or_else(|_| panic!("IDEMQ_CHAOS_SEED={seed}: a number, or random")),
    };
    (secs, seed)
}

/// The seed CI runs, so that a run can be replayed: the one with which
/// `./scripts/test.sh` failed "answered but nothing is stored" on
/// 2026-12-06 (an owner that gave up writing its outcome when its lease
/// ended by its own clock, and answered it as if stored). Seeds that
/// failed the same way on that code, to replay by hand:
/// 53059516426630, 65094728167004. `IDEMQ_CHAOS_SEED=random` draws one
/// (printed), and a seed that fails is a bug to fix, not to retry.
const RECORDED_SEED: u64 = 69_105_580_601_875;

/// The runs take turns: each is three workers and their servers on two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One soak run (see the module docs).
async fn soak(delivery: Delivery, mut servers: Servers) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (secs, seed) = settings();
    let t0 = Instant::now();
    println!("chaos {delivery:?}: {secs} s, IDEMQ_CHAOS_SEED={seed}");
    let cluster = matches!(servers, Servers::Cluster(_));
    // The three runs of one seed make different choices.
    let salt = u64::from(delivery == Delivery::Core) + 2 * u64::from(cluster);
    let mut dice = Dice((seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)).max(1));

    let client = servers.connect().await;
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: "RESULTS".to_owned(),
        subjects: vec!["results.>".to_owned()],
        duplicate_window: Duration::from_secs(600),
        num_replicas: if cluster { 3 } else { 1 },
        ..Default::default()
    })
    .await
    .expect("results stream");
    let upstream = Arc::new(Upstream::default());
    Arc::clone(&upstream).serve(client.clone()).await;

    let mut proxies = Vec::new();
    let mut urls = Vec::new();
    for i in 0..3 {
        let proxy = FaultProxy::start(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            servers.node_port(i),
        )))
        .await;
        let mut list = vec![proxy.url()];
        list.extend(servers.others(i));
        urls.push(list.join(","));
        proxies.push(proxy);
    }
    let spec = Workers {
        delivery,
        replicas: if cluster { "3" } else { "1" },
        urls,
    };
    let mut workers: Vec<WorkerProcess> = (0..3).map(|i| spec.start(i)).collect();
    wait_for_workers(&client, 3).await;
    let steady = workers[0].id();

    // The load: fresh keys, some sent again later, a mix of capabilities.
    let sent: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let stop_load = tokio_util::sync::CancellationToken::new();
    let load = {
        let (js, client, sent, answers, stop) = (
            js.clone(),
            client.clone(),
            Arc::clone(&sent),
            Arc::clone(&answers),
            stop_load.clone(),
        );
        let mut dice = Dice(seed.wrapping_mul(31).max(1));
        tokio::spawn(async move {
            let mut clients = tokio::task::JoinSet::new();
            let mut n = 0u64;
            let mut again: Vec<Value> = Vec::new();
            while !stop.is_cancelled() {
                n += 1;
                let capability = match dice.below(10) {
                    0 => "slow",
                    1 => "fail",
                    2 => "flaky",
                    _ => "ok",
                };
                let id = format!("chaos-{n}");
                let body = json!({
                    "intent_id": id, "actor": "chaos", "episode": "soak",
                    "capability": capability, "params": {"n": n}, "reply_to": "results.chaos",
                });
                let key = idemq::IdempotencyKey::from_intent_metadata(&id, "chaos", "soak", None);
                sent.lock()
                    .expect("lock")
                    .insert(key.to_string(), body.clone());
                let mut bodies = vec![body.clone()];
                if dice.below(3) == 0 {
                    again.push(body);
                }
                if dice.below(4) == 0 {
                    bodies.extend(again.pop());
                }
                for body in bodies {
                    match delivery {
                        Delivery::JetStream => publish(&js, &body).await,
                        Delivery::Core => {
                            let (client, answers) = (client.clone(), Arc::clone(&answers));
                            clients.spawn(async move { request(&client, &body, &answers).await });
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            // Core clients finish their retries (each bounded).
            while let Some(done) = clients.join_next().await {
                done.expect("a client's retries end in a settled answer");
            }
        })
    };

    // The chaos, while the load runs, on workers 1 and 2 (and one server
    // restart or node kill, a quarter of the way in).
    let mut faults = Vec::new();
    let mut rss = Vec::new();
    let mut restarted = false;
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let pause = dice.millis(500, 2500);
        let until = Instant::now() + pause;
        while Instant::now() < until {
            // The resident set in KiB (0 once the worker is gone).
            rss.push(proc_status_kib(steady, "VmRSS").unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let worker = 1 + dice.below(2) as usize;
        let fault = |what: String, worker| Fault {
            at: Instant::now(),
            worker,
            what,
        };
        // Worker 0's later executions are then held to no repeat at all.
        let quarter = Instant::now() + Duration::from_secs(secs * 3 / 4) >= deadline;
        if quarter && !restarted {
            restarted = true;
            faults.push(fault("server restart".into(), None));
            servers.restart().await;
            faults.push(fault("server back".into(), None));
            continue;
        }
        match dice.below(8) {
            0..=2 => {
                workers[worker].signal("-KILL");
                faults.push(fault("kill".into(), Some(worker)));
                tokio::time::sleep(dice.millis(200, 1500)).await;
                workers[worker] = spec.start(worker);
            }
            3 | 4 => {
                let direction = if dice.below(2) == 0 {
                    Direction::Up
                } else {
                    Direction::Down
                };
                // Held bytes arrive late; dropped ones never do (and the
                // connection's protocol stream breaks, so it reconnects).
                let mode = if dice.below(3) == 0 {
                    Mode::Drop
                } else {
                    Mode::Hold
                };
                let held = dice.millis(300, 4000);
                faults.push(fault(
                    format!("{mode:?} {direction:?} {held:?}"),
                    Some(worker),
                ));
                proxies[worker].set(direction, mode);
                tokio::time::sleep(held).await;
                proxies[worker].set(direction, Mode::Pass);
                faults.push(fault("released".into(), Some(worker)));
            }
            5 => {
                faults.push(fault("delay".into(), Some(worker)));
                proxies[worker].delay(dice.millis(20, 200));
                tokio::time::sleep(Duration::from_secs(2)).await;
                proxies[worker].delay(Duration::ZERO);
            }
            _ => {
                faults.push(fault("sever".into(), Some(worker)));
                proxies[worker].sever();
            }
        }
    }
    stop_load.cancel();
    tokio::time::timeout(Duration::from_secs(150), load)
        .await
        .expect("the load stops")
        .expect("load task");
    println!(
        "chaos {delivery:?}: {} faults: {:?}",
        faults.len(),
        faults.iter().map(|f| &f.what).collect::<Vec<_>>()
    );

    // Every intent answered, within a bound.
    let sent = sent.lock().expect("lock").clone();
    let answers: Vec<Answer> = match delivery {
        Delivery::Core => answers.lock().expect("lock").clone(),
        Delivery::JetStream => {
            let what = format!("every intent answered after the chaos (seed {seed})");
            eventually(SETTLE_BOUND, what, async || {
                let replies = stream_replies(&js, "RESULTS").await;
                let answered: std::collections::HashSet<&str> = replies
                    .iter()
                    .filter_map(|r| r["idem_key"].as_str())
                    .collect();
                let missing = sent
                    .keys()
                    .filter(|k| !answered.contains(k.as_str()))
                    .count();
                if missing > 0 {
                    return Err(format!("{missing} of {} intents unanswered", sent.len()));
                }
                // JetStream mode never answers an unstored outcome: it
                // naks it, and the redelivery settles.
                Ok(replies.into_iter().map(|r| (r, false)).collect())
            })
            .await
        }
    };

    // What a failure below needs to be understood: the key's executions
    // and the faults, in ms since the start.
    let upstream_seen = upstream.executions();
    let explain = |key: &str| {
        let ms = |at: Instant| at.saturating_duration_since(t0).as_millis();
        let runs: Vec<String> = upstream_seen
            .iter()
            .filter(|e| e.key == key)
            .map(|e| format!("exec {} on {:?} at {}", e.id, e.worker, ms(e.at)))
            .collect();
        let faults: Vec<String> = faults
            .iter()
            .map(|f| format!("{} on {:?} at {}", f.what, f.worker, ms(f.at)))
            .collect();
        format!("seed {seed}; executions {runs:?}; faults {faults:?}")
    };
    // Every settled answer is the stored outcome.
    let store = idemq::store::kv::KvStore::existing(js.clone(), "IDEMPOTENCY")
        .await
        .expect("bucket");
    let mut stored_exec = HashMap::new();
    for key in sent.keys() {
        let parsed = idemq::IdempotencyKey::parse(key).expect("key");
        let record = idemq::store::ClaimProtocol::get(&store, &parsed)
            .await
            .expect("get")
            .unwrap_or_else(|| {
                panic!("{key} was answered but nothing is stored; {}", explain(key))
            });
        let outcome = serde_json::to_value(record.result.as_ref().expect("done")).expect("json");
        let exec = outcome["data"]["exec"].as_u64().or_else(|| {
            outcome["data"]["message"]
                .as_str()
                .and_then(|m| m.strip_prefix("exec "))
                .and_then(|n| n.parse().ok())
        });
        stored_exec.insert(key.clone(), (outcome, record.stored_at, exec));
    }
    let mut compared = 0;
    // An outcome answered unstored says so in its body too, and was
    // retried by its client until a settled answer came.
    let unstored = answers.iter().filter(|(_, unstored)| *unstored).count();
    for (reply, _) in answers.iter().filter(|(_, unstored)| *unstored) {
        assert_eq!(reply["stored_at"], Value::Null, "{reply}");
        assert_eq!(reply["replayed"], false, "{reply}");
    }
    for (reply, _) in answers.iter().filter(|answer| settled(answer)) {
        let key = reply["idem_key"].as_str().expect("idem_key");
        let (outcome, stored_at, _) = &stored_exec[key];
        assert_eq!(
            &reply["result"],
            outcome,
            "{key}: the answer {reply} is not the stored outcome; {}",
            explain(key)
        );
        let at = reply["stored_at"]
            .as_str()
            .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok());
        assert_eq!(
            at,
            Some((*stored_at).into()),
            "{key}: {reply}; {}",
            explain(key)
        );
        compared += 1;
    }
    assert!(compared >= sent.len(), "every intent has a settled answer");

    // Executions beyond the stored one: a flaky first try, or near a fault.
    let executions = upstream.executions();
    let mut unexplained = Vec::new();
    let mut repeated = 0;
    for execution in &executions {
        let Some((_, _, stored)) = stored_exec.get(&execution.key) else {
            continue;
        };
        if *stored == Some(execution.id) {
            continue;
        }
        repeated += 1;
        let flaky = sent[&execution.key]["capability"] == "flaky"
            && executions
                .iter()
                .find(|e| e.key == execution.key)
                .is_some_and(|first| first.id == execution.id);
        // Worker 0 sees only the server restart; workers 1 and 2 see
        // faults every few seconds, so for them this is a loose bound.
        let near_fault = faults.iter().any(|fault| {
            (fault.worker.is_none() || fault.worker == execution.worker)
                && fault.at <= execution.at + FAULT_WINDOW
                && execution.at <= fault.at + FAULT_WINDOW
        });
        if !flaky && !near_fault {
            unexplained.push(execution.clone());
        }
    }
    let on_steady = executions.iter().filter(|e| e.worker == Some(0)).count();
    println!(
        "chaos {delivery:?}: {} intents, {} answers compared, {unstored} answered unstored, {} executions ({on_steady} on worker 0), {repeated} not the stored one",
        sent.len(),
        compared,
        executions.len()
    );
    assert!(on_steady > 0, "worker 0 took part");
    assert!(
        unexplained.is_empty(),
        "executions repeated with no fault near them (seed {seed}): {unexplained:?}\nfaults: {faults:?}"
    );

    // The steady worker's memory is flat.
    let third = rss.len() / 3;
    assert!(third > 0, "RSS sampled");
    let middle = rss[third..2 * third].iter().max().copied().unwrap_or(0);
    let last = rss[2 * third..].iter().max().copied().unwrap_or(0);
    assert!(
        last * 10 <= middle * 11,
        "the steady worker's RSS grew: middle third peak {middle} KiB, last third peak {last} KiB"
    );

    // No consumer leaked.
    let bucket = js
        .get_stream("KV_IDEMPOTENCY")
        .await
        .expect("bucket stream")
        .info()
        .await
        .expect("info")
        .state
        .consumer_count;
    assert_eq!(bucket, 0, "no watch consumer left on the bucket");
    if delivery == Delivery::JetStream {
        let intents = js
            .get_stream(STREAM)
            .await
            .expect("stream")
            .info()
            .await
            .expect("info")
            .state
            .consumer_count;
        assert_eq!(
            intents, 1,
            "the durable is the intent stream's only consumer"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_mode_keeps_the_contract_through_kills_a_restart_and_network_faults() {
    soak(Delivery::JetStream, Servers::One(NatsServer::start())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_mode_keeps_the_contract_through_kills_a_restart_and_network_faults() {
    soak(Delivery::Core, Servers::One(NatsServer::start())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_cluster_keeps_the_contract_through_a_node_kill_and_network_faults() {
    soak(Delivery::JetStream, Servers::Cluster(NatsCluster::start(3))).await;
}

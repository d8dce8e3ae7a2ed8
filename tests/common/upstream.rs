//! A scripted upstream service for `--forward exec.{capability}`: it counts
//! executions per idempotency key and behaves by capability, so tests can
//! assert exactly how often idemq called it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, HeaderMap, Message};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::task::JoinSet;

/// The subject template the workers forward to.
pub const FORWARD: &str = "exec.{capability}";

/// What the upstream saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Executions per `Idem-Key`.
    pub executions: HashMap<String, u32>,
    /// `Idem-Attempt` of every execution, per key, in order.
    pub attempts: HashMap<String, Vec<u32>>,
}

/// A running upstream; aborted on drop.
pub struct Upstream {
    seen: Arc<Mutex<Seen>>,
    tasks: JoinSet<()>,
}

impl Upstream {
    /// Serves `exec.*` on `client`.
    ///
    /// Capabilities: `ok` replies `{"done": params}`; `slow` does too after
    /// `params.sleep_ms` (only on attempt 1 when `params.first_only`);
    /// `fail422`/`fail503` reply service errors; `flaky` fails with 503 on
    /// its first execution per key, then succeeds, and `fail_twice` on its
    /// first two; `badjson`, `empty` and
    /// `killed` reply what they say; `big` replies a JSON string of
    /// `params.bytes` bytes.
    pub async fn start(client: &Client) -> Upstream {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut subscription = client.subscribe("exec.*").await.expect("subscribe exec.*");
        client.flush().await.expect("flush");
        let mut tasks = JoinSet::new();
        let (state, client) = (Arc::clone(&seen), client.clone());
        tasks.spawn(async move {
            let mut requests = JoinSet::new();
            while let Some(message) = subscription.next().await {
                let execution = record(&state, &message);
                requests.spawn(respond(client.clone(), message, execution));
            }
        });
        Upstream { seen, tasks }
    }

    /// Executions of one key.
    pub fn executions(&self, key: &str) -> u32 {
        let seen = self.seen.lock().expect("lock");
        seen.executions.get(key).copied().unwrap_or(0)
    }

    /// Executions of all keys.
    pub fn total(&self) -> u32 {
        self.seen.lock().expect("lock").executions.values().sum()
    }

    /// The attempts seen for one key.
    pub fn attempts(&self, key: &str) -> Vec<u32> {
        let seen = self.seen.lock().expect("lock");
        seen.attempts.get(key).cloned().unwrap_or_default()
    }

    /// Every key executed more than once.
    pub fn duplicates(&self) -> Vec<(String, u32)> {
        let seen = self.seen.lock().expect("lock");
        let mut twice: Vec<(String, u32)> = seen
            .executions
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        twice.sort();
        twice
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Records one execution; returns (execution number for the key, attempt).
fn record(seen: &Mutex<Seen>, message: &Message) -> (u32, u32) {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let key = header("Idem-Key").unwrap_or_default();
    let attempt = header("Idem-Attempt")
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let mut seen = seen.lock().expect("lock");
    seen.attempts.entry(key.clone()).or_default().push(attempt);
    let count = seen.executions.entry(key).or_default();
    *count += 1;
    (*count, attempt)
}

async fn respond(client: Client, message: Message, (execution, attempt): (u32, u32)) {
    let Some(reply) = message.reply.clone() else {
        return;
    };
    let capability = message
        .subject
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let intent: Value = serde_json::from_slice(&message.payload).unwrap_or(Value::Null);
    let params = intent["params"].clone();
    let ok = || json!({ "done": params }).to_string();
    let error = |code: &str, text: &str| {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Service-Error-Code", code);
        headers.insert("Nats-Service-Error", text);
        headers
    };
    let (headers, body) = match capability.as_str() {
        "slow" => {
            let first_only = params["first_only"].as_bool().unwrap_or(false);
            if !first_only || attempt <= 1 {
                let ms = params["sleep_ms"].as_u64().unwrap_or(1000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            (HeaderMap::new(), ok())
        }
        "fail422" => (error("422", "unprocessable"), String::new()),
        "fail503" => (error("503", "try later"), String::new()),
        "flaky" if execution == 1 => (error("503", "warming up"), String::new()),
        "fail_twice" if execution <= 2 => (error("503", "not yet"), String::new()),
        "badjson" => (HeaderMap::new(), "this is not json".to_owned()),
        "empty" => (HeaderMap::new(), String::new()),
        // A JSON string of exactly `params.bytes` bytes, quotes included.
        "big" => {
            let bytes = params["bytes"].as_u64().unwrap_or(2).max(2);
            let fill = "x".repeat(usize::try_from(bytes - 2).unwrap_or(0));
            (HeaderMap::new(), format!("\"{fill}\""))
        }
        "killed" => {
            let mut headers = HeaderMap::new();
            headers.insert("Idem-Status", "Killed");
            (headers, String::new())
        }
        _ => (HeaderMap::new(), ok()),
    };
    // The requester may have given up; nothing to do then.
    let _ = client
        .publish_with_headers(reply, headers, body.into())
        .await;
}

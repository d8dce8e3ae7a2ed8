//! The worker's configuration: plain structs with the contract's defaults.
//!
//! The command line (`cli/`) fills these from flags and `IDEMQ_*`
//! variables; embedders fill them directly. [`WorkerConfig::validate`] is the
//! one place where a bad combination is refused.

use std::time::Duration;

use crate::intent::is_publish_subject;

/// How the worker takes and executes intents.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    /// Subjects to take intents from (wildcards allowed).
    pub subjects: Vec<String>,
    /// `--reply-allow`: when not empty, the only subjects replies may go
    /// to (on top of the fixed refusals of `reply_policy`).
    pub reply_allow: Vec<String>,
    /// `--tenant-token N`: the N-th token (1-based) of an intent's subject
    /// is its tenant, put in front of its KV key.
    pub tenant_token: Option<usize>,
    /// Queue group shared by all workers (core mode).
    pub queue_group: String,
    /// Longest outcome lifetime; an intent's `ttl_secs` is clamped to it.
    pub ttl: Duration,
    /// How long a handler may run before its outcome is `Timeout`.
    pub handler_timeout: Duration,
    /// How long a copy waits for a running execution before `IN_PROGRESS`.
    pub wait: Duration,
    /// The claim's lease, renewed every third of it while the handler runs.
    pub lease: Duration,
    /// Most intents in flight at once; what arrives past it waits in the
    /// intake (core mode) or in the stream (JetStream mode).
    pub concurrency: usize,
    /// Core mode: bytes of waiting intents the intake holds (`--intake-bytes`,
    /// docs/contract.md v1.2 §6). A delivery that does not fit is answered
    /// `OVERLOADED` at once, never dropped. Counted per message as its
    /// subject, reply subject, headers and payload, plus
    /// [`INTAKE_OVERHEAD`] for what holding it costs.
    pub intake_bytes: usize,
    /// Largest accepted payload in bytes.
    pub max_payload: usize,
    /// How long shutdown waits for in-flight intents.
    pub grace: Duration,
    /// Where intents come from.
    pub delivery: Delivery,
    /// Memory, in bytes, for stored outcomes kept to answer replays without
    /// a KV read (0 turns the cache off). The default, 64 MiB, holds about
    /// 90 000 outcomes whose replies are about 480 bytes (each with the
    /// digest of a copy answered with it): memory the operator chooses to
    /// spend, on top of the worker's own (docs/performance.md).
    pub cache_bytes: usize,
}

/// Where the worker takes intents from.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Delivery {
    /// Queue-group subscriptions; clients use request/reply and retry.
    #[default]
    Core,
    /// A durable pull consumer on a stream: nothing is lost when a requester gives up.
    JetStream(JetStreamConfig),
}

/// JetStream delivery settings (`--stream`, `--durable` and the consumer flags).
#[derive(Debug, Clone, PartialEq)]
pub struct JetStreamConfig {
    /// The stream to consume; created over the subjects when missing.
    pub stream: String,
    /// The durable consumer shared by all workers.
    pub durable: String,
    /// Where invalid and undeliverable intents go (`idemq.dlq.<stream>` by default).
    pub dead_letter_subject: String,
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Deliveries before an intent is dead-lettered.
    pub max_deliver: u32,
    /// Redelivery delays after ack-wait expiries (the consumer's back-off), if any.
    pub backoff: Vec<Duration>,
    /// Unacknowledged messages the consumer may have out, across all workers.
    pub max_ack_pending: u32,
    /// Replicas of a stream created by idemq.
    pub replicas: usize,
}

impl JetStreamConfig {
    /// The defaults for a stream and durable name.
    pub fn new(stream: &str, durable: &str) -> Self {
        Self {
            stream: stream.to_owned(),
            durable: durable.to_owned(),
            dead_letter_subject: format!("idemq.dlq.{stream}"),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            backoff: Vec::new(),
            max_ack_pending: 1000,
            replicas: 1,
        }
    }

    /// The shortest time the server gives a delivery before it delivers
    /// the message again: `--ack-wait`, or with `--backoff` the shortest
    /// step, since the server then puts the first step in the ack wait's
    /// place and times each redelivery by its own step. Progress acks
    /// must come more often than this.
    pub fn shortest_ack_wait(&self) -> Duration {
        self.backoff.iter().copied().min().unwrap_or(self.ack_wait)
    }

    /// The longest a message can keep being redelivered: every delivery's
    /// ack wait (or back-off step, when longer) plus the longest nak delay
    /// idemq uses. An outcome must outlive it, or a late redelivery would
    /// find the key free and execute a second time.
    ///
    /// Saturating, and without a step per delivery: the flags are user
    /// input, and `--max-deliver 4294967295` or a `--ack-wait` of ages
    /// must give a usage error, not a panic or a minute of arithmetic.
    pub fn redelivery_horizon(&self) -> Duration {
        let delivery = |wait: Duration| wait.max(self.ack_wait).saturating_add(NAK_DELAY_CAP);
        let deliveries = self.max_deliver as usize;
        let stepped = self.backoff.iter().take(deliveries);
        let rest = deliveries - stepped.len();
        let stepped = stepped.fold(Duration::ZERO, |sum, &wait| {
            sum.saturating_add(delivery(wait))
        });
        let rest = u32::try_from(rest).unwrap_or(u32::MAX);
        stepped.saturating_add(delivery(self.ack_wait).saturating_mul(rest))
    }
}

/// The longest `--ttl` (docs/contract.md v1.2 §7): ten years, as `10y` reads.
pub const MAX_TTL: Duration = Duration::from_secs(315_576_000);
/// The longest of every other duration setting (`--lease`, `--wait`,
/// `--handler-timeout`, `--grace`, `--ack-wait`, `--backoff` steps, the
/// commands' `--timeout`): one day. Past it a duration is a configuration
/// error, never an overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Parses a duration flag (`500ms`, `30s`, `24h`) of at most [`MAX_DURATION`].
pub fn duration_up_to_a_day(text: &str) -> Result<Duration, String> {
    bounded_duration(text, MAX_DURATION, "1 day")
}

/// Parses a duration flag of at most [`MAX_TTL`] (`--ttl`).
pub fn duration_up_to_ten_years(text: &str) -> Result<Duration, String> {
    bounded_duration(text, MAX_TTL, "10 years")
}

fn bounded_duration(text: &str, most: Duration, named: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration > most {
        return Err(format!("{text} is longer than the most allowed, {named}"));
    }
    Ok(duration)
}

/// What the intake counts for holding one message beside its bytes: the
/// message's own struct, its allocations and its queue slot, so that a
/// flood of tiny intents is bounded too.
pub const INTAKE_OVERHEAD: usize = 256;

impl WorkerConfig {
    /// The claim's settings, as the run-once API takes them.
    pub fn run_options(&self) -> crate::run_once::RunOptions {
        crate::run_once::RunOptions {
            lease: self.lease,
            wait: self.wait,
            timeout: self.handler_timeout,
            ttl: self.ttl,
        }
    }

    /// How long an outcome is kept: the intent's `ttl_secs`, capped by
    /// `--ttl`. In JetStream mode it is at least the redelivery horizon
    /// (docs/contract.md v1.1 §6): a copy held for the outcome, or a late
    /// redelivery, must never find its key expired and run it again.
    pub fn outcome_ttl(&self, ttl_secs: Option<u64>) -> Duration {
        let requested = ttl_secs.map_or(self.ttl, |secs| Duration::from_secs(secs).min(self.ttl));
        match &self.delivery {
            Delivery::Core => requested,
            Delivery::JetStream(js) => requested.max(js.redelivery_horizon().min(self.ttl)),
        }
    }
}

/// The longest delay idemq asks for when it naks a message.
pub const NAK_DELAY_CAP: Duration = Duration::from_secs(30);

impl Default for WorkerConfig {
    fn default() -> Self {
        // The claim's settings are the run-once API's: one declaration.
        let run = crate::run_once::RunOptions::default();
        Self {
            subjects: vec!["intents.>".to_owned()],
            reply_allow: Vec::new(),
            tenant_token: None,
            queue_group: "idemq".to_owned(),
            ttl: run.ttl,
            handler_timeout: run.timeout,
            wait: run.wait,
            lease: run.lease,
            concurrency: 256,
            intake_bytes: 64 << 20,
            max_payload: 1024 * 1024,
            grace: Duration::from_secs(10),
            delivery: Delivery::Core,
            cache_bytes: 64 << 20,
        }
    }
}

/// A configuration problem, reported at start-up (exit status 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Every problem's text, `separator` apart.
pub(crate) fn join_problems(problems: &[ConfigError], separator: &str) -> String {
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    text.join(separator)
}

impl WorkerConfig {
    /// Checks every setting; returns every problem at once.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut problems = Vec::new();
        let mut problem = |text: String| problems.push(ConfigError(text));
        if self.subjects.is_empty() {
            problem("at least one --subject is needed".to_owned());
        }
        for subject in &self.subjects {
            if !is_subscribe_subject(subject) {
                problem(format!("--subject {subject:?} is not a valid NATS subject"));
            }
        }
        if self.tenant_token == Some(0) {
            problem("--tenant-token counts subject tokens from 1".to_owned());
        }
        for pattern in &self.reply_allow {
            if !is_subscribe_subject(pattern) {
                problem(format!(
                    "--reply-allow {pattern:?} is not a valid NATS subject pattern"
                ));
            }
        }
        if !crate::intent::is_token(&self.queue_group) {
            problem(format!(
                "--queue-group {:?} must be a plain token",
                self.queue_group
            ));
        }
        if self.ttl < Duration::from_secs(1) {
            problem("--ttl must be at least 1s (TTLs are whole seconds)".to_owned());
        }
        if self.ttl > MAX_TTL {
            problem("--ttl may be at most 10 years".to_owned());
        }
        for (flag, duration) in [
            ("--lease", self.lease),
            ("--wait", self.wait),
            ("--handler-timeout", self.handler_timeout),
            ("--grace", self.grace),
        ] {
            if duration > MAX_DURATION {
                problem(format!("{flag} may be at most 1 day"));
            }
        }
        if self.lease < Duration::from_secs(1) {
            problem("--lease must be at least 1s (TTLs are whole seconds)".to_owned());
        }
        if self.handler_timeout.is_zero() {
            problem("--handler-timeout must be positive".to_owned());
        }
        if self.concurrency == 0 {
            problem("--concurrency must be at least 1".to_owned());
        }
        if self.intake_bytes == 0 {
            problem("--intake-bytes must be at least 1".to_owned());
        }
        if self.max_payload == 0 {
            problem("--max-payload must be at least 1".to_owned());
        }
        if let Delivery::JetStream(js) = &self.delivery {
            for (flag, name) in [("--stream", &js.stream), ("--durable", &js.durable)] {
                if !crate::intent::is_token(name) {
                    problem(format!("{flag} {name:?} must be a plain token"));
                }
            }
            if !is_publish_subject(&js.dead_letter_subject) {
                problem(format!(
                    "--dead-letter-subject {:?} is not a subject without wildcards",
                    js.dead_letter_subject
                ));
            }
            if js.ack_wait < Duration::from_secs(1) {
                problem("--ack-wait must be at least 1s".to_owned());
            }
            if js.backoff.iter().any(|step| *step < Duration::from_secs(1)) {
                // The server puts the first step in --ack-wait's place.
                problem("--backoff steps must be at least 1s".to_owned());
            }
            if js.ack_wait > MAX_DURATION || js.backoff.iter().any(|step| *step > MAX_DURATION) {
                problem("--ack-wait and --backoff steps may be at most 1 day".to_owned());
            }
            if js.max_deliver < 1 {
                problem("--max-deliver must be at least 1".to_owned());
            }
            if js.backoff.len() > js.max_deliver as usize {
                problem("--backoff may not have more steps than --max-deliver".to_owned());
            }
            let horizon = js.redelivery_horizon();
            if self.ttl < horizon {
                problem(format!(
                    "--ttl {} is shorter than the redelivery horizon {} (ack wait, back-off and \
                     nak delays over --max-deliver deliveries): a late redelivery would execute twice",
                    humantime::format_duration(self.ttl),
                    humantime::format_duration(horizon)
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// A subject one can subscribe to: tokens non-empty, `>` only last.
pub fn is_subscribe_subject(subject: &str) -> bool {
    let tokens: Vec<&str> = subject.split('.').collect();
    let last = tokens.len() - 1;
    tokens.iter().enumerate().all(|(i, token)| match *token {
        ">" => i == last,
        "*" => true,
        token => is_publish_subject(token),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_contract_defaults_and_valid() {
        let config = WorkerConfig::default();
        assert_eq!(config.subjects, ["intents.>"]);
        assert_eq!(config.lease, Duration::from_secs(30));
        assert!(config.validate().is_ok());
    }

    #[test]
    fn every_problem_is_reported() {
        let config = WorkerConfig {
            subjects: vec!["a.>.b".to_owned()],
            concurrency: 0,
            lease: Duration::from_millis(500),
            ..WorkerConfig::default()
        };
        let problems = config.validate().expect_err("invalid");
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn a_backoff_step_is_the_ack_wait_progress_acks_must_beat() {
        let mut js = JetStreamConfig::new("INTENTS", "workers");
        assert_eq!(js.shortest_ack_wait(), js.ack_wait);
        js.backoff = vec![Duration::from_secs(5), Duration::from_secs(2)];
        assert_eq!(js.shortest_ack_wait(), Duration::from_secs(2));
        js.backoff = vec![Duration::from_millis(500)];
        let config = WorkerConfig {
            delivery: Delivery::JetStream(js),
            ..WorkerConfig::default()
        };
        let problems = config.validate().expect_err("invalid");
        assert!(
            problems
                .iter()
                .any(|p| p.0.contains("--backoff steps must be at least 1s")),
            "{problems:?}"
        );
    }

    #[test]
    fn an_outcome_ttl_shorter_than_redelivery_is_refused() {
        let mut js = JetStreamConfig::new("INTENTS", "workers");
        js.ack_wait = Duration::from_secs(60);
        js.max_deliver = 10;
        let config = WorkerConfig {
            ttl: Duration::from_secs(600),
            delivery: Delivery::JetStream(js),
            ..WorkerConfig::default()
        };
        let problems = config.validate().expect_err("invalid");
        assert_eq!(problems.len(), 1);
        assert!(problems[0].0.contains("redelivery horizon"), "{problems:?}");
    }

    #[test]
    fn the_redelivery_horizon_adds_each_delivery_and_saturates() {
        let mut js = JetStreamConfig::new("INTENTS", "workers");
        js.ack_wait = Duration::from_secs(10);
        js.max_deliver = 3;
        js.backoff = vec![Duration::from_secs(1), Duration::from_secs(60)];
        // max(1, 10) + max(60, 10) + 10, each plus the nak cap.
        assert_eq!(
            js.redelivery_horizon(),
            Duration::from_secs(80) + 3 * NAK_DELAY_CAP
        );

        js.max_deliver = u32::MAX;
        js.ack_wait = Duration::MAX;
        assert_eq!(js.redelivery_horizon(), Duration::MAX);
        let config = WorkerConfig {
            delivery: Delivery::JetStream(js),
            ..WorkerConfig::default()
        };
        let problems = config
            .validate()
            .expect_err("an outcome cannot outlive that");
        assert!(
            problems.iter().any(|p| p.0.contains("redelivery horizon")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.0.contains("at most 1 day")),
            "{problems:?}"
        );
    }
}

//! The worker's configuration: plain structs with the contract's defaults.
//!
//! The command line (`cli.rs`) fills these from flags and `IDEMQ_*`
//! variables; embedders fill them directly. [`WorkerConfig::validate`] is the
//! one place where a bad combination is refused.

use std::time::Duration;

use crate::intent::is_publish_subject;

/// How the worker takes and executes intents.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Subjects to take intents from (wildcards allowed).
    pub subjects: Vec<String>,
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
    /// Most intents in flight at once; intake pauses at the bound.
    pub concurrency: usize,
    /// Largest accepted payload in bytes.
    pub max_payload: usize,
    /// How long shutdown waits for in-flight intents.
    pub grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            subjects: vec!["intents.>".to_owned()],
            queue_group: "idemq".to_owned(),
            ttl: Duration::from_secs(24 * 3600),
            handler_timeout: Duration::from_secs(30),
            wait: Duration::from_secs(5),
            lease: Duration::from_secs(30),
            concurrency: 256,
            max_payload: 1024 * 1024,
            grace: Duration::from_secs(10),
        }
    }
}

/// A configuration problem, reported at start-up (exit status 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

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
        if !crate::intent::is_token(&self.queue_group) {
            problem(format!(
                "--queue-group {:?} must be a plain token",
                self.queue_group
            ));
        }
        if self.ttl < Duration::from_secs(1) {
            problem("--ttl must be at least 1s (TTLs are whole seconds)".to_owned());
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
        if self.max_payload == 0 {
            problem("--max-payload must be at least 1".to_owned());
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
}

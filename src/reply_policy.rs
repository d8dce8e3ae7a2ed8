//! Where the worker may publish a reply (docs/contract.md v1.1, "Reply targets").
//!
//! A reply goes out with the worker's own NATS credentials, so the caller
//! must not be able to choose where it lands: a reply subject of
//! `$KV.<bucket>.<key>` would overwrite another intent's stored record, one
//! under `$JS.API` would drive the JetStream API, one on the worker's own
//! intent subjects would feed it intents, one on its `--forward` subjects
//! would call an upstream, one on its purge, dead-letter or status
//! subjects or its own inboxes would speak for the worker (v1.2). Every
//! reply target (a core message's own reply subject, `Idem-Reply-To`,
//! `reply_to`) is checked here before anything runs; a refused one is
//! `INVALID_INTENT` and is never published to.

use crate::intent::IntentError;

/// The longest reply target, in bytes (docs/contract.md v1.2, "Reply
/// targets"): far above any inbox, far below the server's control-line
/// limit.
pub const MAX_REPLY_TARGET: usize = 1024;

/// A refused subject as a refusal names it: whole, unless it is past
/// [`MAX_REPLY_TARGET`], then its first 64 bytes (on a character
/// boundary) and its length.
fn named(subject: &str) -> String {
    if subject.len() <= MAX_REPLY_TARGET {
        return subject.to_owned();
    }
    // `str::floor_char_boundary` is newer than the crate's MSRV (1.89).
    let mut end = 64;
    while !subject.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &subject[..end], subject.len())
}

/// The reply targets a worker accepts.
#[derive(Debug, Clone, Default)]
pub struct ReplyPolicy {
    /// Subjects the worker takes from or publishes to on its own behalf
    /// (patterns), each with why: never reply targets.
    reserved: Vec<(String, &'static str)>,
    /// `--reply-allow`: when not empty, a target must match one of these.
    allow: Vec<String>,
}

impl ReplyPolicy {
    /// A policy for a worker on `own` subjects, narrowed to `allow` when
    /// that is not empty.
    pub fn new(own: &[String], allow: &[String]) -> ReplyPolicy {
        let mut policy = ReplyPolicy {
            reserved: Vec::new(),
            allow: allow.to_vec(),
        };
        for subject in own {
            policy.reserve(subject, "it is one of the worker's own intent subjects");
        }
        policy
    }

    /// Refuses every subject matching `pattern` as a reply target, saying
    /// `why` (a subject the worker publishes to on its own behalf).
    pub fn reserve(&mut self, pattern: &str, why: &'static str) {
        self.reserved.push((pattern.to_owned(), why));
    }

    /// Whether the worker may publish a reply to `subject`; the error says
    /// which subject was refused and why.
    pub fn check(&self, subject: &str) -> Result<(), IntentError> {
        let refuse = |reason| {
            Err(IntentError::ReplyTargetRefused {
                subject: named(subject),
                reason,
            })
        };
        if subject.len() > MAX_REPLY_TARGET {
            // A server closes a connection that sends it a protocol line
            // past its max_control_line (4 KiB by default): one such reply
            // would cut the worker off, with everything in flight on it.
            return refuse("a reply target is at most 1024 bytes");
        }
        if subject.starts_with('$') {
            return refuse("system subjects ($KV, $JS, $SYS, $SRV, ...) are never reply targets");
        }
        if subject.is_empty() || subject.chars().any(char::is_whitespace) {
            return refuse("a subject has no whitespace");
        }
        if subject.split('.').any(|token| token == "*" || token == ">") {
            return refuse("a reply target has no wildcards");
        }
        if subject.split('.').any(str::is_empty) {
            return refuse("a subject has no empty tokens");
        }
        if let Some((_, why)) = self
            .reserved
            .iter()
            .find(|(pattern, _)| subject_matches(pattern, subject))
        {
            return refuse(why);
        }
        if !self.allow.is_empty()
            && !self
                .allow
                .iter()
                .any(|allow| subject_matches(allow, subject))
        {
            return refuse("it is outside --reply-allow");
        }
        Ok(())
    }
}

/// Whether the NATS subject `pattern` (`*` one token, `>` one or more
/// trailing tokens) matches the literal `subject`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for wanted in pattern.split('.') {
        match (wanted, tokens.next()) {
            (">", Some(_)) => return true,
            (_, None) => return false,
            ("*", Some(_)) => {}
            (wanted, Some(token)) if wanted == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_nats_does() {
        assert!(subject_matches("intents.>", "intents.a"));
        assert!(subject_matches("intents.>", "intents.a.b"));
        assert!(!subject_matches("intents.>", "intents"));
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*.c", "a.b.d"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.bc"));
        assert!(!subject_matches("a.b.c", "a.b"));
    }

    #[test]
    fn system_wildcard_whitespace_and_own_subjects_are_refused() {
        let policy = ReplyPolicy::new(&["intents.>".to_owned()], &[]);
        for refused in [
            "$KV.IDEMPOTENCY.idem_0123456789abcdef",
            "$JS.API.STREAM.DELETE.INTENTS",
            "$SYS.REQ.SERVER.PING",
            "results.*",
            "results.>",
            "a b",
            "a\tb",
            "",
            "a..b",
            "intents.work",
        ] {
            assert!(
                matches!(
                    policy.check(refused),
                    Err(IntentError::ReplyTargetRefused { ref subject, .. }) if subject == refused
                ),
                "{refused:?}"
            );
        }
        for allowed in ["_INBOX.abc.def", "results.agent-1", "exec_results"] {
            assert_eq!(policy.check(allowed), Ok(()), "{allowed}");
        }
    }

    #[test]
    fn a_target_past_1024_bytes_is_refused_and_named_by_its_start() {
        let policy = ReplyPolicy::new(&["intents.>".to_owned()], &[]);
        let longest = format!("r.{}", "x".repeat(MAX_REPLY_TARGET - 2));
        assert_eq!(policy.check(&longest), Ok(()));
        // Multi-byte characters straddle the 64-byte cut.
        let too_long = format!("r.{}", "é".repeat(MAX_REPLY_TARGET));
        match policy.check(&too_long) {
            Err(IntentError::ReplyTargetRefused { subject, reason }) => {
                assert!(reason.contains("1024 bytes"), "{reason}");
                assert!(subject.starts_with("r.é"), "{subject}");
                assert!(subject.ends_with(&format!("({} bytes)", too_long.len())));
                assert!(subject.len() < 100, "{subject}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reply_allow_narrows_the_targets() {
        let policy = ReplyPolicy::new(
            &["intents.>".to_owned()],
            &["results.>".to_owned(), "_INBOX.>".to_owned()],
        );
        assert_eq!(policy.check("results.a"), Ok(()));
        assert_eq!(policy.check("_INBOX.x.y"), Ok(()));
        assert!(policy.check("exec.charge").is_err());
        assert!(policy.check("$KV.B.k").is_err(), "the floor still holds");
    }
}

#[cfg(test)]
mod reserved {
    use super::*;

    #[test]
    fn reserved_subjects_are_refused_with_their_reason() {
        let mut policy = ReplyPolicy::new(&["intents.>".to_owned()], &["exec.>".to_owned()]);
        policy.reserve("exec.*", "it is one of the subjects --forward sends to");
        assert!(
            matches!(
                policy.check("exec.charge"),
                Err(IntentError::ReplyTargetRefused { reason, .. }) if reason.contains("--forward")
            ),
            "reserved outranks --reply-allow"
        );
        assert!(
            policy.check("exec.a.b").is_ok(),
            "only what the pattern matches"
        );
    }
}

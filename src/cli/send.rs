//! `idemq send`: one intent, its reply printed.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use async_nats::{HeaderMap, RequestErrorKind};
use clap::Args;

use super::{connect, CliError};
use crate::intent::IDEMPOTENCY_KEY_HEADER;
use crate::key::IdempotencyKey;
use crate::nats::NatsArgs;

/// `idemq send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Subject to send the intent to (e.g. `intents.echo`).
    pub subject: String,
    /// The intent JSON, or `-` to read it from standard input.
    pub json: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub nats: NatsArgs,
    /// Send this Idempotency-Key header.
    #[arg(long, env = "IDEMQ_KEY")]
    pub key: Option<String>,
    /// How long to wait for each reply.
    #[arg(long, env = "IDEMQ_TIMEOUT", default_value = "10s", value_parser = crate::config::duration_up_to_a_day)]
    pub timeout: Duration,
    /// Resend the same intent (same key) this many times after a timeout.
    #[arg(long, env = "IDEMQ_RETRIES", default_value_t = 0)]
    pub retries: u32,
}

/// Runs `idemq send`.
pub(super) async fn run(args: SendArgs) -> Result<ExitCode, CliError> {
    let payload = match args.json.as_deref() {
        None => "{}".to_owned(),
        Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::Usage(format!("cannot read the intent from stdin: {e}")))?;
            text
        }
        Some(json) => json.to_owned(),
    };
    let mut headers = HeaderMap::new();
    if let Some(key) = &args.key {
        let key = IdempotencyKey::parse(key).map_err(|e| CliError::Usage(e.to_string()))?;
        headers.insert(IDEMPOTENCY_KEY_HEADER, key.as_str());
    }
    let client = connect(&args.nats).await?;
    for attempt in 0..=args.retries {
        let request = async_nats::Request::new()
            .payload(payload.clone().into())
            .headers(headers.clone())
            .timeout(Some(args.timeout));
        match client.send_request(args.subject.clone(), request).await {
            Ok(reply) => {
                println!("{}", String::from_utf8_lossy(&reply.payload));
                return Ok(ExitCode::SUCCESS);
            }
            Err(error) if error.kind() == RequestErrorKind::TimedOut => {
                eprintln!(
                    "no reply within {} (attempt {} of {})",
                    humantime::format_duration(args.timeout),
                    attempt + 1,
                    u64::from(args.retries) + 1
                );
            }
            Err(error) if error.kind() == RequestErrorKind::NoResponders => {
                return Err(CliError::NoReply(format!(
                    "no worker is listening on {}",
                    args.subject
                )));
            }
            Err(error) => return Err(CliError::NoReply(format!("request failed: {error}"))),
        }
    }
    Err(CliError::NoReply("no reply; gave up".to_owned()))
}

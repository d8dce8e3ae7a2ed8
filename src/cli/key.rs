//! `idemq key`: the key of some inputs, derived without a server.

use std::process::ExitCode;

use clap::Args;

use super::CliError;
use crate::key::IdempotencyKey;

/// `idemq key`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["run_id", "intent_id"])))]
pub struct KeyArgs {
    /// Derive from a run id: generate(run_id, episode, step).
    #[arg(long, env = "IDEMQ_RUN_ID", conflicts_with_all = ["intent_id", "actor"])]
    pub run_id: Option<String>,
    /// Derive from intent metadata (with --actor).
    #[arg(long, env = "IDEMQ_INTENT_ID", requires = "actor")]
    pub intent_id: Option<String>,
    /// The actor (with --intent-id).
    #[arg(long, env = "IDEMQ_ACTOR", requires = "intent_id")]
    pub actor: Option<String>,
    /// The episode.
    #[arg(long, env = "IDEMQ_EPISODE")]
    pub episode: String,
    /// The step index.
    #[arg(long, env = "IDEMQ_STEP", default_value_t = 0)]
    pub step: u32,
}

/// Runs `idemq key`.
pub(super) fn run(args: &KeyArgs) -> Result<ExitCode, CliError> {
    let key = match (&args.run_id, &args.intent_id, &args.actor) {
        (Some(run_id), _, _) => IdempotencyKey::generate(run_id, &args.episode, args.step),
        (None, Some(intent_id), Some(actor)) => {
            IdempotencyKey::from_intent_metadata(intent_id, actor, &args.episode, Some(args.step))
        }
        _ => {
            return Err(CliError::Usage(
                "give --run-id, or --intent-id with --actor".to_owned(),
            ))
        }
    };
    println!("{key}");
    Ok(ExitCode::SUCCESS)
}

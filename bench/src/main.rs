//! The `idemq-bench` binary: idemq measured beside baselines, in one run.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use idemq_bench::{BenchArgs, BenchError};
use tracing_subscriber::EnvFilter;

/// idemq-bench: idemq's worker measured beside raw NATS baselines on one nats-server.
#[derive(Debug, Parser)]
#[command(name = "idemq-bench", version, about)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The in-process worker runs at `warn`, as operators' workers need not.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match idemq_bench::command(&cli.bench).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("idemq-bench: {error}");
            match error {
                BenchError::Usage(_) => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}

//! The `idemq` binary: parse the command line, set up logging, run.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = idemq::cli::Cli::parse();
    // The worker reports what it does; one-shot commands only what went wrong.
    let default_level = match cli.command {
        idemq::cli::Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match idemq::cli::run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("idemq: {error}");
            error.exit_code()
        }
    }
}

//! The `idemq` binary: parse the command line, set up logging, run.

use std::io::IsTerminal;
use std::process::ExitCode;

use idemq::cli::{CliError, Command, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match idemq::cli::parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(error) => return report(error),
    };
    // The worker reports what it does; one-shot commands only what went wrong.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Pretty => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    idemq::cli::run(cli).await.unwrap_or_else(report)
}

/// Reports a failed command: clap prints its own text (help and version
/// too, with their status); anything else is one line on stderr.
fn report(error: CliError) -> ExitCode {
    match error {
        CliError::Clap(error) => error.exit(),
        error => {
            eprintln!("idemq: {error}");
            error.exit_code()
        }
    }
}

//! The `revboot` command: parses arguments, installs logging, runs, maps errors to exit codes.
#![forbid(unsafe_code)]

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;

use clap::Parser as _;
use revboot::cli::Cli;
use revboot::outcome::Outcome;
use revboot::run::run;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        revboot::cli::Command::Serve(_) | revboot::cli::Command::Demo(_) => "info",
        _ => "warn",
    };
    // Colour codes only for a person at a terminal: a log file or a pipe gets plain text.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
    // The daemon's main thread is the parent of every instance, so that an upgrade in
    // place (an exec from that thread) keeps them running (revboot_sandbox::parent).
    let daemon = matches!(
        cli.command,
        revboot::cli::Command::Serve(_) | revboot::cli::Command::Demo(_)
    );
    let result = if daemon {
        revboot_sandbox::parent::serve(move || run(cli))
    } else {
        run(cli)
    };
    match result {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Exit(code)) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Ok(Outcome::Failed(error)) => {
            let _ = writeln!(std::io::stderr(), "revboot: {error}");
            ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(1))
        }
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "revboot: {error:#}");
            ExitCode::FAILURE
        }
    }
}

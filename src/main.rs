//! The `revboot` command: parses arguments, installs logging, runs, maps errors to exit codes.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use revboot::cli::Cli;
use revboot::outcome::{finish, usage};
use revboot::run::{log_filter, run};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage(error),
    };
    let filter = match log_filter(&cli) {
        Some(filter) => EnvFilter::new(filter),
        None => EnvFilter::from_default_env(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(revboot::output::colour(&std::io::stderr()))
        .init();
    // The daemon's main thread is the parent of every instance, so that an upgrade in
    // place (an exec from that thread) keeps them running (revboot_sandbox::parent).
    let daemon = matches!(
        cli.command,
        revboot::cli::Command::Serve(_) | revboot::cli::Command::Demo(_)
    );
    let json = cli.json;
    let result = if daemon {
        revboot_sandbox::parent::serve(move || run(cli))
    } else {
        run(cli)
    };
    finish(result, json)
}

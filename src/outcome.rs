//! What a finished command leaves for `main`, and how it ends the process: the exit code,
//! and the error printed (as JSON on stdout under `--json`, see [`crate::cli::AFTER_HELP`]).

use std::io::Write as _;
use std::process::ExitCode;

use crate::action::ActionError;

/// What `main` does with a finished command.
#[derive(Debug)]
pub enum Outcome {
    /// Success.
    Done,
    /// An action failed; print it and exit with its code.
    Failed(ActionError),
    /// A command that maps its own exit code (bisect steps).
    Exit(i32),
}

/// The exit code of a bad command line.
pub const USAGE: u8 = 2;

/// Ends a command: prints its error, if any, and gives its exit code.
pub fn finish(result: anyhow::Result<Outcome>, json: bool) -> ExitCode {
    match result {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Exit(code)) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Ok(Outcome::Failed(error)) => {
            if json {
                let text = serde_json::to_string(&error).expect("errors are plain data");
                let _ = writeln!(std::io::stdout(), "{text}");
            } else {
                say_error(&error.to_string());
            }
            ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(1))
        }
        Err(error) => {
            if json {
                let _ = writeln!(
                    std::io::stdout(),
                    "{}",
                    json_error("failed", &format!("{error:#}"))
                );
            } else {
                say_error(&format!("{error:#}"));
            }
            ExitCode::FAILURE
        }
    }
}

/// Ends a command line clap refused: help and version as clap prints them; a usage error as
/// JSON under `--json` (told by the raw arguments, as nothing was parsed), else as clap
/// prints it.
pub fn usage(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let json = std::env::args_os().any(|arg| arg == "--json");
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = error.print();
            ExitCode::SUCCESS
        }
        _ if json => {
            let message = error.render().to_string();
            let _ = writeln!(std::io::stdout(), "{}", json_error("usage", message.trim()));
            ExitCode::from(USAGE)
        }
        _ => {
            let _ = error.print();
            ExitCode::from(USAGE)
        }
    }
}

fn json_error(kind: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "error": kind, "message": message })
}

/// `revboot: <message>` on stderr, the prefix in red on a terminal.
fn say_error(message: &str) {
    let stderr = std::io::stderr();
    let prefix = if crate::output::colour(&stderr) {
        let red = anstyle::AnsiColor::Red.on_default().bold();
        format!("{red}revboot:{red:#}")
    } else {
        "revboot:".to_owned()
    };
    let _ = writeln!(stderr.lock(), "{prefix} {message}");
}

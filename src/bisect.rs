//! `revboot bisect`: `git bisect run` over a service's deployment branch.
//!
//! 1. Resolve `--good` and `--bad` to deployment commits (any label works).
//! 2. Clone the deployment repository's branch into a temporary bare repository (the real
//!    one never carries bisect state) and `git bisect start --no-checkout <bad> <good>`.
//! 3. `git bisect run revboot bisect-step <service> -- <check>`: each step reads
//!    `BISECT_HEAD`; a failed build (no image) is skipped (exit 125); otherwise the step
//!    summons the revision through the daemon and runs the check with `REVBOOT_NAME`,
//!    `REVBOOT_ADDR`, `REVBOOT_PORT` and `REVBOOT_REVISION` set, passing its exit code on
//!    (0 good, 1–124 and 126–127 bad, 125 skip).
//! 4. The first bad commit is named with its source commit and subject.

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::action::{Action, Reply};
use crate::cli::{BisectArgs, BisectStepArgs};
use crate::client::Client;
use crate::config::Config;
use crate::run::Outcome;

/// Exit code that tells `git bisect run` to skip a commit.
const SKIP: i32 = 125;
/// Exit code that makes `git bisect run` stop (a broken step, not a bad revision).
const ABORT: i32 = 128;

fn show(client: &Client, service: &str, label: &str) -> anyhow::Result<crate::action::ShowView> {
    match client.execute(Action::Show {
        service: service.to_owned(),
        label: label.to_owned(),
    }) {
        Ok(Reply::Show(show)) => Ok(*show),
        Ok(other) => bail!("Unexpected reply {other:?}"),
        Err(error) => Err(error.into()),
    }
}

/// Runs the whole bisection and prints the first bad deployment.
pub fn bisect(client: &Client, config: &Config, args: &BisectArgs) -> anyhow::Result<Outcome> {
    let good = show(client, &args.service, &args.good)?.deployment;
    let bad = show(client, &args.service, &args.bad)?.deployment;
    let repository = config.data.join("deploy.git");
    let work = tempfile::Builder::new()
        .prefix("revboot-bisect-")
        .tempdir()
        .context("Cannot make a temporary directory")?;
    let clone = work.path().join("deploy.git");
    run_git(
        None,
        &[
            "clone",
            "--quiet",
            "--bare",
            "--single-branch",
            "--branch",
            &args.service,
            &repository.to_string_lossy(),
            &clone.to_string_lossy(),
        ],
    )?;
    run_git(
        Some(&clone),
        &[
            "bisect",
            "start",
            "--no-checkout",
            &bad.revision,
            &good.revision,
        ],
    )?;
    let exe = std::env::current_exe().context("Cannot find the revboot executable")?;
    let mut command = Command::new("git");
    command
        .current_dir(&clone)
        .args(["bisect", "run"])
        .arg(&exe)
        .arg("--url")
        .arg(client.url())
        .arg("--data")
        .arg(&config.data)
        .args(["bisect-step", &args.service, "--"])
        .args(&args.check)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let progress = indicatif::ProgressBar::new_spinner();
    progress.enable_steady_tick(std::time::Duration::from_millis(120));
    progress.set_message(format!("bisecting {}", args.service));
    let mut child = command.spawn().context("Cannot run git bisect run")?;
    let mut text = String::new();
    if let Some(stdout) = child.stdout.take() {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.context("Cannot read git bisect run's output")?;
            if let Some(rest) = line.strip_prefix("Bisecting: ") {
                progress.set_message(format!("bisecting {}: {rest}", args.service));
            }
            progress.suspend(|| {
                let _ = writeln!(std::io::stderr(), "{line}");
            });
            text.push_str(&line);
            text.push('\n');
        }
    }
    let status = child.wait().context("Cannot wait for git bisect run")?;
    progress.finish_and_clear();
    let first_bad = text
        .lines()
        .find_map(|line| line.strip_suffix(" is the first bad commit"))
        .map(str::trim)
        .map(str::to_owned);
    let Some(first_bad) = first_bad else {
        bail!("git bisect run did not name a first bad deployment ({status}); its output is above");
    };
    let found = show(client, &args.service, &first_bad)?.deployment;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "first bad deployment: {} ({})\n  source {} {}\n  built {}",
        found.revision,
        found.dns_name,
        found.source_commit,
        found.subject,
        crate::output::time(found.time)
    );
    Ok(Outcome::Done)
}

/// One step, run by `git bisect run` inside the temporary clone.
pub fn step(client: &Client, config: &Config, args: &BisectStepArgs) -> anyhow::Result<Outcome> {
    let _ = config;
    let head = run_git(None, &["rev-parse", "BISECT_HEAD"]);
    let revision = match head {
        Ok(revision) => revision,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "revboot bisect-step: {error:#}");
            return Ok(Outcome::Exit(ABORT));
        }
    };
    let shown = match show(client, &args.service, &revision) {
        Ok(shown) => shown,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "revboot bisect-step: {error:#}");
            return Ok(Outcome::Exit(ABORT));
        }
    };
    if shown.deployment.image_size.is_none() {
        let _ = writeln!(
            std::io::stderr(),
            "revboot bisect-step: {} is a {} build with no image: skipping",
            &revision[..12],
            shown.deployment.status
        );
        return Ok(Outcome::Exit(SKIP));
    }
    let summoned = match client.execute(Action::Summon {
        service: args.service.clone(),
        label: Some(revision.clone()),
        client: None,
    }) {
        Ok(Reply::Summoned(summoned)) => summoned,
        Ok(other) => {
            let _ = writeln!(
                std::io::stderr(),
                "revboot bisect-step: unexpected {other:?}"
            );
            return Ok(Outcome::Exit(ABORT));
        }
        Err(error) => {
            let _ = writeln!(
                std::io::stderr(),
                "revboot bisect-step: cannot boot: {error}"
            );
            return Ok(Outcome::Exit(ABORT));
        }
    };
    let Some((program, rest)) = args.check.split_first() else {
        return Ok(Outcome::Exit(ABORT));
    };
    let status = Command::new(program)
        .args(rest)
        .env("REVBOOT_NAME", &summoned.dns_name)
        .env("REVBOOT_ADDR", &summoned.address)
        .env("REVBOOT_PORT", summoned.port.to_string())
        .env("REVBOOT_REVISION", &summoned.revision)
        .stdin(Stdio::null())
        .status();
    let code = match status {
        Ok(status) => status.code().unwrap_or(ABORT),
        Err(error) => {
            let _ = writeln!(
                std::io::stderr(),
                "revboot bisect-step: cannot run {program}: {error}"
            );
            ABORT
        }
    };
    let _ = writeln!(
        std::io::stderr(),
        "revboot bisect-step: {} ({}) -> {}",
        &revision[..12],
        shown.deployment.subject,
        match code {
            0 => "good",
            SKIP => "skip",
            1..=127 => "bad",
            _ => "abort",
        }
    );
    Ok(Outcome::Exit(code))
}

fn run_git(dir: Option<&std::path::Path>, args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new("git");
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let output = command
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("Cannot run git")?;
    if !output.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

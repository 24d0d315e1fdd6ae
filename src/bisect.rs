//! `revboot bisect`: `git bisect run` over a service's deployments, or over its source
//! history (`--source`), on the daemon the CLI talks to.
//!
//! 1. Resolve `--good` and `--bad`: deployment labels through the API; with `--source`,
//!    source commits (any prefix or ref) in the clone of step 2.
//! 2. Clone over git smart HTTP from the daemon (`<url>/git/-/deploy.git`, the service's
//!    branch; with `--source`, `<url>/git/<service>.git`) into a temporary bare repository,
//!    with the CLI's token in an `Authorization` header (never in a URL or on a command
//!    line), and `git bisect start --no-checkout <bad> <good>` there. No data directory is
//!    read: the bisection is of the daemon at `--url`.
//! 3. `git bisect run revboot bisect-step <service> -- <check>`: each step reads
//!    `BISECT_HEAD` and summons it through the API (a source commit that has no deployment
//!    yet is built first, on demand); a revision without an image (its build failed) is
//!    skipped (exit 125); otherwise the step runs the check with `REVBOOT_NAME`,
//!    `REVBOOT_ADDR`, `REVBOOT_PORT` and `REVBOOT_REVISION` set, passing its exit code on
//!    (0 good, 1–124 and 126–127 bad, 125 skip).
//! 4. The first bad deployment (or source commit) is named with its source commit and
//!    subject.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::action::{Action, ActionError, Reply};
use crate::cli::{BisectArgs, BisectStepArgs};
use crate::client::Client;
use crate::outcome::Outcome;

/// Exit code that tells `git bisect run` to skip a commit.
const SKIP: i32 = 125;
/// Exit code that makes `git bisect run` stop (a broken step, not a bad revision).
const ABORT: i32 = 128;
/// How long a step waits for an on-demand build of its source commit.
const BUILD_WAIT: Duration = Duration::from_secs(3600);

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

/// Runs `git` with the client's token as an `Authorization` header (through the
/// environment, so that it is in no URL and on no command line).
fn git_with_token(client: &Client) -> Command {
    let mut command = Command::new("git");
    command.env("GIT_TERMINAL_PROMPT", "0").stdin(Stdio::null());
    if let Some(token) = client.token() {
        command
            .env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env(
                "GIT_CONFIG_VALUE_0",
                format!("Authorization: Bearer {token}"),
            );
    }
    command
}

/// Runs the whole bisection and prints the first bad deployment or source commit.
pub fn bisect(client: &Client, service: &str, args: &BisectArgs) -> anyhow::Result<Outcome> {
    let work = tempfile::Builder::new()
        .prefix("revboot-bisect-")
        .tempdir()
        .context("Cannot make a temporary directory")?;
    let clone = work.path().join("repository.git");
    let (url, ends) = if args.source {
        (format!("{}/git/{service}.git", client.url()), None)
    } else {
        let good = show(client, service, &args.good)?.deployment.revision;
        let bad = show(client, service, &args.bad)?.deployment.revision;
        (
            format!("{}/git/-/deploy.git", client.url()),
            Some((good, bad)),
        )
    };
    let mut command = git_with_token(client);
    command.args(["clone", "--quiet", "--bare"]);
    if !args.source {
        command.args(["--single-branch", "--branch", service]);
    }
    let output = command
        .arg(&url)
        .arg(&clone)
        .output()
        .context("Cannot run git clone")?;
    if !output.status.success() {
        bail!(
            "Cannot clone {url}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let (good, bad) = match ends {
        Some(ends) => ends,
        None => {
            let commit = |label: &str| {
                run_git(
                    Some(&clone),
                    &[
                        "rev-parse",
                        "--verify",
                        "--end-of-options",
                        &format!("{label}^{{commit}}"),
                    ],
                )
                .with_context(|| format!("`{label}` is not a commit of the source of `{service}`"))
            };
            (commit(&args.good)?, commit(&args.bad)?)
        }
    };
    run_git(
        Some(&clone),
        &["bisect", "start", "--no-checkout", &bad, &good],
    )?;
    let exe = std::env::current_exe().context("Cannot find the revboot executable")?;
    let mut command = Command::new("git");
    command
        .current_dir(&clone)
        .args(["bisect", "run"])
        .arg(&exe)
        .arg("--url")
        .arg(client.url())
        .args(["bisect-step", service]);
    if let Some(token) = client.token() {
        command.env("REVBOOT_TOKEN", token);
    }
    command
        .arg("--")
        .args(&args.check)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let progress = indicatif::ProgressBar::new_spinner();
    progress.enable_steady_tick(Duration::from_millis(120));
    progress.set_message(format!("bisecting {service}"));
    let mut child = command.spawn().context("Cannot run git bisect run")?;
    let mut text = String::new();
    if let Some(stdout) = child.stdout.take() {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.context("Cannot read git bisect run's output")?;
            if let Some(rest) = line.strip_prefix("Bisecting: ") {
                progress.set_message(format!("bisecting {service}: {rest}"));
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
        // git's words when the check passed on the revision it was told is bad.
        if text.contains(" was both good and bad") {
            bail!(
                "The check passed on `{}`, given as --bad: by this check nothing between --good \
                 and --bad is bad (it must fail, exit 1-124, on a bad revision); its output is above",
                args.bad
            );
        }
        bail!("git bisect run did not name a first bad revision ({status}); its output is above");
    };
    let found = show(client, service, &first_bad)?.deployment;
    let mut out = std::io::stdout().lock();
    if args.source {
        let _ = writeln!(
            out,
            "first bad source commit: {first_bad}\n  {}\n  deployment {} ({}), built {}",
            found.subject,
            found.revision,
            found.dns_name,
            crate::output::time(found.time)
        );
    } else {
        let _ = writeln!(
            out,
            "first bad deployment: {} ({})\n  source {} {}\n  built {}",
            found.revision,
            found.dns_name,
            found.source_commit,
            found.subject,
            crate::output::time(found.time)
        );
    }
    Ok(Outcome::Done)
}

/// Summons `label` of `service`, waiting while its source commit is built on demand.
fn summon(client: &Client, service: &str, label: &str) -> Result<Reply, ActionError> {
    let deadline = Instant::now() + BUILD_WAIT;
    loop {
        let answer = client.execute(Action::Summon {
            service: service.to_owned(),
            label: Some(label.to_owned()),
            client: None,
        });
        match answer {
            Err(ActionError::Building(message)) if Instant::now() < deadline => {
                let _ = writeln!(std::io::stderr(), "revboot bisect-step: {message}");
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// One step, run by `git bisect run` inside the temporary clone.
pub fn step(client: &Client, args: &BisectStepArgs) -> anyhow::Result<Outcome> {
    let say = |text: String| {
        let _ = writeln!(std::io::stderr(), "revboot bisect-step: {text}");
    };
    let revision = match run_git(None, &["rev-parse", "BISECT_HEAD"]) {
        Ok(revision) => revision,
        Err(error) => {
            say(format!("{error:#}"));
            return Ok(Outcome::Exit(ABORT));
        }
    };
    let short = &revision[..revision.len().min(12)];
    let summoned = match summon(client, &args.service, &revision) {
        Ok(Reply::Summoned(summoned)) => summoned,
        Ok(other) => {
            say(format!("unexpected {other:?}"));
            return Ok(Outcome::Exit(ABORT));
        }
        // A revision with no image: its build failed.
        Err(ActionError::Conflict(message)) => {
            say(format!("{short}: {message}: skipping"));
            return Ok(Outcome::Exit(SKIP));
        }
        Err(error) => {
            say(format!("cannot boot {short}: {error}"));
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
            say(format!("cannot run {program}: {error}"));
            ABORT
        }
    };
    say(format!(
        "{short} ({}) -> {}",
        summoned.dns_name,
        match code {
            0 => "good",
            SKIP => "skip",
            1..=127 => "bad",
            _ => "abort",
        }
    ));
    Ok(Outcome::Exit(code))
}

fn run_git(dir: Option<&Path>, args: &[&str]) -> anyhow::Result<String> {
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

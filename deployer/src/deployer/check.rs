//! Health checks of promotions: a new revision is booted and checked before live moves.
//!
//! 1. The caller summons the revision (through the proxy, so that its service address has
//!    a listener like any other) and hands the answer to [`Deployer::check`].
//! 2. The check waits for the instance to serve, then runs the manifest's `[deploy] check`
//!    against its socket: `http` (`GET path`, a 2xx or 3xx status; other answers are
//!    retried, since an application may answer 503 while it warms up), `tcp` (a connection
//!    is accepted) or `console` (a line containing the text); all within `within_ms` of the
//!    call.
//! 3. Passed: the instance stays up, ready for the traffic live brings it. Failed: it is
//!    stopped (its record says `stopped: failed its health check`), unless it is the live
//!    revision's and so serves already; the reason names what was seen last.

use std::time::{Duration, Instant};

use revboot_store::manifest::{Check, CheckProbe};

use super::Deployer;
use super::table::{Command, StopReason};
use crate::summon::{InstanceState, Summoned};
use crate::tender::{status_is_ok, status_line, tcp_connects};

/// Pause between two tries of a probe that failed.
const RETRY: Duration = Duration::from_millis(20);

/// A passed health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckPassed {
    /// From the call to the pass (the boot included, when the instance was cold).
    pub after: Duration,
    /// What passed, e.g. `GET /health answered HTTP/1.1 200 OK`.
    pub detail: String,
}

/// A failed health check: why, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CheckFailed(pub String);

impl Deployer {
    /// Checks the summoned instance by `check` (module doc); a failure stops it.
    pub async fn check(
        &self,
        summoned: &Summoned,
        check: &Check,
    ) -> Result<CheckPassed, CheckFailed> {
        let started = Instant::now();
        let within = Duration::from_millis(check.within_ms);
        let deadline = tokio::time::Instant::from_std(started + within);
        let result = self.run_check(summoned, check, deadline).await;
        match result {
            Ok(detail) => Ok(CheckPassed {
                after: started.elapsed(),
                detail,
            }),
            Err(reason) => {
                let key = &summoned.key;
                let live = self.store.live(&key.service).ok().flatten();
                if live != Some(key.revision)
                    && let Some(entry) = self.entry(key)
                {
                    entry.order(Command::Stop(StopReason::CheckFailed));
                }
                tracing::warn!(instance = %key, reason, "health check failed");
                Err(CheckFailed(reason))
            }
        }
    }

    async fn run_check(
        &self,
        summoned: &Summoned,
        check: &Check,
        deadline: tokio::time::Instant,
    ) -> Result<String, String> {
        let within = check.within_ms;
        let probe = check
            .probe()
            .ok_or_else(|| "the check names no probe".to_owned())?;
        let mut state = summoned.state.clone();
        let settled = tokio::time::timeout_at(
            deadline,
            state.wait_for(|state| state.is_serving() || state.is_final()),
        )
        .await
        .map(|waited| waited.map(|state| state.clone()));
        match settled {
            Err(_) => return Err(format!("not ready within {within} ms")),
            Ok(Err(_)) => return Err("the instance went away".to_owned()),
            Ok(Ok(state)) => {
                if let Some(why) = ended(&state) {
                    return Err(format!("{why} before it was ready"));
                }
            }
        }
        let Some(backend) = summoned.backend.get() else {
            return Err("its address is not known".to_owned());
        };
        match probe {
            CheckProbe::Http(path) => loop {
                let last = match status_line(backend, path).await {
                    Ok(line) if status_is_ok(&line) => {
                        return Ok(format!("GET {path} answered {line}"));
                    }
                    Ok(line) => format!("answered `{line}`"),
                    Err(error) => format!("did not answer ({error})"),
                };
                if let Some(why) = ended(&summoned.state.borrow()) {
                    return Err(format!("GET {path} {last}, then the instance {why}"));
                }
                if tokio::time::Instant::now() + RETRY >= deadline {
                    return Err(format!("GET {path} {last} (within {within} ms)"));
                }
                tokio::time::sleep(RETRY).await;
            },
            CheckProbe::Tcp => loop {
                if tcp_connects(backend).await {
                    return Ok(format!("a TCP connection to {backend} was accepted"));
                }
                if let Some(why) = ended(&summoned.state.borrow()) {
                    return Err(format!("no TCP connection to {backend} accepted: it {why}"));
                }
                if tokio::time::Instant::now() + RETRY >= deadline {
                    return Err(format!(
                        "no TCP connection to {backend} accepted within {within} ms"
                    ));
                }
                tokio::time::sleep(RETRY).await;
            },
            CheckProbe::Console(line) => {
                let console = self
                    .entry(&summoned.key)
                    .and_then(|entry| entry.console.get().cloned())
                    .ok_or_else(|| "the instance has no console".to_owned())?;
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if console.wait_for(line, left).await {
                    Ok(format!("the console printed `{line}`"))
                } else {
                    Err(format!(
                        "the console did not print `{line}` within {within} ms"
                    ))
                }
            }
        }
    }
}

/// How an instance in a final state ended (`crashed: …`, `stopped`); `None` while it lives.
fn ended(state: &InstanceState) -> Option<String> {
    match state {
        InstanceState::Crashed { reason } => Some(format!("crashed: {reason}")),
        state if state.is_final() => Some("stopped".to_owned()),
        _ => None,
    }
}

//! The hook endpoint, `POST /git/-/hook/<service>`, called by the source repositories'
//! `proc-receive` hook.
//!
//! 1. `Authorization: Bearer <hook token>`; the body has `ref <old> <new> <refname>` and
//!    `option <push option>` lines. An unknown `revboot.*` option refuses the whole push.
//! 2. Each updated branch's new commits are queued, oldest first, the tip last (at most
//!    `max_commits_per_push`, the newest; the answer says how many were left out). The
//!    answer streams, as plain text lines, each build's start and result (deployment
//!    commit, DNS name, whether live moved), the tip's log as it is written, and the last
//!    lines of the log of an older commit whose build failed.
//! 3. Then one `revboot-verdict ok|ng <ref> [reason]` line per branch: `ng` when the tip's
//!    build failed or was superseded, and the hook then leaves the branch where it was.
//!    In a cluster, a branch moves there first and its push is refused (`ng`) when another
//!    node moved it meanwhile (see [`crate::coordinate`]); once it moved there, a
//!    `revboot-taken <ref>` line tells the hook that it may move the branch here.
//!    With `-o revboot.wait=false` the verdicts come as soon as the builds are queued.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use tokio::sync::mpsc;

use super::reply::text;
use crate::auth::token_matches;
use crate::log::Progress;
use crate::name::validate_service_name;
use crate::push::queue_push;
use crate::queue::Ticket;
use crate::shared::Shared;
use crate::state::{Outcome, Phase};

/// The largest hook request body.
const MAX_HOOK_BODY: usize = 256 * 1024;
/// The most refs built from one push.
const MAX_REFS_PER_PUSH: usize = 32;

/// A push as the hook reports it.
#[derive(Debug, Default, PartialEq, Eq)]
struct HookBody {
    refs: Vec<(String, String, String)>,
    options: Vec<String>,
}

fn parse_hook_body(body: &str) -> Result<HookBody, String> {
    let mut parsed = HookBody::default();
    for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("ref ") {
            let mut parts = rest.split(' ');
            let (Some(old), Some(new), Some(refname), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("Bad ref line `{line}`"));
            };
            let is_id = |s: &str| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit());
            if !is_id(old) || !is_id(new) || refname.is_empty() {
                return Err(format!("Bad ref line `{line}`"));
            }
            if parsed.refs.len() >= MAX_REFS_PER_PUSH {
                return Err(format!("More than {MAX_REFS_PER_PUSH} refs in one push"));
            }
            parsed
                .refs
                .push((old.to_owned(), new.to_lowercase(), refname.to_owned()));
        } else if let Some(option) = line.strip_prefix("option ") {
            parsed.options.push(option.to_owned());
        } else {
            return Err(format!("Bad line `{line}`"));
        }
    }
    Ok(parsed)
}

/// The push options revboot reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PushOptions {
    /// `revboot.deploy`: `Some(false)` keeps live where it is.
    pub(super) deploy: Option<bool>,
    /// `revboot.wait`: whether the push waits for its builds (default) or only queues them.
    pub(super) wait: bool,
}

/// The `revboot.*` push options; an error for an unknown one.
pub(super) fn push_options(options: &[String]) -> Result<PushOptions, String> {
    let mut parsed = PushOptions {
        deploy: None,
        wait: true,
    };
    for option in options {
        match option.as_str() {
            "revboot.deploy=false" | "revboot.deploy=no" => parsed.deploy = Some(false),
            "revboot.deploy=true" | "revboot.deploy=yes" => parsed.deploy = Some(true),
            "revboot.wait=false" | "revboot.wait=no" => parsed.wait = false,
            "revboot.wait=true" | "revboot.wait=yes" => parsed.wait = true,
            other if other.starts_with("revboot.") => {
                return Err(format!(
                    "unknown push option `{other}` (known: revboot.deploy=true|false, revboot.wait=true|false)"
                ));
            }
            _ => {}
        }
    }
    Ok(parsed)
}

/// The line that tells the `proc-receive` hook what to do with a ref (see
/// [`crate::repos::hook_script`]): `ok`, or `ng` with a reason on one line.
fn verdict(refname: &str, refusal: Option<&str>) -> Bytes {
    Bytes::from(match refusal {
        None => format!("revboot-verdict ok {refname}\n"),
        Some(reason) => {
            let reason: String = reason
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(400)
                .collect();
            format!("revboot-verdict ng {refname} {reason}\n")
        }
    })
}

/// The refusal of a hook call without the daemon's hook token.
pub(super) fn hook_caller(inner: &Shared, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if token_matches(std::slice::from_ref(&inner.hook_token), presented) {
        return Ok(());
    }
    tracing::warn!("hook call with a wrong token");
    Err(Box::new(text(
        StatusCode::UNAUTHORIZED,
        "revboot: wrong hook token",
    )))
}

/// The body of a hook call as text, or the refusal of one over [`MAX_HOOK_BODY`] or cut off.
pub(super) async fn hook_body(body: Body) -> Result<String, Box<Response>> {
    match axum::body::to_bytes(body, MAX_HOOK_BODY).await {
        Ok(body) => Ok(String::from_utf8_lossy(&body).into_owned()),
        Err(error) => Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            format!("revboot: bad hook request: {error}"),
        ))),
    }
}

pub(super) async fn hook(
    State(inner): State<Arc<Shared>>,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(refused) = hook_caller(&inner, &headers) {
        return *refused;
    }
    if validate_service_name(&service).is_err() || !inner.repos.exists(&service) {
        return text(
            StatusCode::NOT_FOUND,
            format!("revboot: no service `{service}`"),
        );
    }
    let body = match hook_body(body).await {
        Ok(body) => body,
        Err(refused) => return *refused,
    };
    let parsed = match parse_hook_body(&body) {
        Ok(parsed) => parsed,
        Err(error) => {
            tracing::warn!(service, error, "bad hook request");
            return text(StatusCode::BAD_REQUEST, format!("revboot: {error}"));
        }
    };
    let options = match push_options(&parsed.options) {
        Ok(options) => options,
        Err(error) => {
            // Bad input changes nothing: every update of the push is refused.
            tracing::warn!(service, error, "bad push option");
            let mut answer = format!("revboot: {error}; the push is refused, nothing was built\n");
            for (_, _, refname) in &parsed.refs {
                answer.push_str(&String::from_utf8_lossy(&verdict(refname, Some(&error))));
            }
            return text(StatusCode::OK, answer.trim_end());
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let wait = Duration::from_secs(inner.config.push_wait_secs);
    let zone = inner.config.zone.clone();
    let shared = Arc::clone(&inner);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + wait;
        let say = |line: String| {
            let tx = tx.clone();
            async move {
                tx.send(Bytes::from(format!("revboot: {line}\n")))
                    .await
                    .is_ok()
            }
        };
        let mut pushes = Vec::new();
        let mut tags = Vec::new();
        for (old, new, refname) in parsed.refs {
            // Rule 1 of crate::coordinate: the branch moves in the cluster first.
            if let Some(coordinator) = &shared.config.coordinator
                && let Err(reason) = coordinator.move_ref(&service, &refname, &old, &new).await
            {
                tracing::warn!(service, refname, reason, "push refused by the cluster");
                say(format!("{refname}: {reason}")).await;
                let _ = tx.send(verdict(&refname, Some(&reason))).await;
                continue;
            }
            if shared.config.coordinator.is_some() {
                // The hook may move it now whatever follows (see crate::repos::hook_script).
                let _ = tx
                    .send(Bytes::from(format!("revboot-taken {refname}\n")))
                    .await;
            }
            if new.bytes().all(|b| b == b'0') {
                say(format!("{refname} deleted; nothing to build")).await;
                let _ = tx.send(verdict(&refname, None)).await;
                continue;
            }
            if !refname.starts_with("refs/heads/") {
                if refname.starts_with("refs/tags/") {
                    tags.push((refname.clone(), new.clone()));
                }
                say(format!("{refname} is not a branch; not built")).await;
                let _ = tx.send(verdict(&refname, None)).await;
                continue;
            }
            match queue_push(&shared, &service, &old, &new, &refname, options.deploy).await {
                Ok(pushed) => {
                    for line in pushed.lines(&service, &refname, &zone) {
                        say(line).await;
                    }
                    if !options.wait {
                        let _ = tx.send(verdict(&refname, None)).await;
                    }
                    pushes.push((refname, old, new, pushed.queued));
                }
                Err(error) => {
                    tracing::warn!(%error, service, refname, "build not queued");
                    say(format!(
                        "{refname}: {error}; the push is stored and will be built when the daemon next starts"
                    ))
                    .await;
                    let _ = tx.send(verdict(&refname, None)).await;
                }
            }
        }
        if !options.wait {
            say("not waiting for the builds (push option revboot.wait=false)".into()).await;
            crate::tags::name_deployments(&shared.repos, &shared.config.store, &service, &tags)
                .await;
            return;
        }
        for (refname, old, new, queued) in pushes {
            let count = queued.tickets.len();
            let mut end = Followed::TimedOut;
            for (n, ticket) in queued.tickets.iter().enumerate() {
                let tip = n + 1 == count;
                end = follow(ticket, &tx, deadline, &service, &zone, !tip).await;
                match end {
                    Followed::Gone => return,
                    Followed::TimedOut => break,
                    _ => {}
                }
            }
            let refusal = match &end {
                // A build that runs again by itself once there is disk space keeps the push.
                Followed::Done(outcome)
                    if outcome.state == crate::state::BuildState::Failed
                        && outcome.retry_when_free_bytes.is_none() =>
                {
                    Some(outcome.summary.clone())
                }
                // Built, but its health check failed: live stayed, and so does the branch.
                Followed::Done(outcome) if outcome.refused.is_some() => outcome.refused.clone(),
                Followed::Superseded { by, .. } => Some(format!(
                    "superseded by build #{by} of a newer push of {refname} before it started"
                )),
                Followed::TimedOut => continue,
                _ => None,
            };
            // Rule 2 of crate::coordinate: the branch stays, here and in the cluster.
            if refusal.is_some()
                && let Some(coordinator) = &shared.config.coordinator
                && let Err(reason) = coordinator.move_ref(&service, &refname, &new, &old).await
            {
                tracing::warn!(
                    service,
                    refname,
                    reason,
                    "cannot move a refused branch back in the cluster"
                );
            }
            if tx
                .send(verdict(&refname, refusal.as_deref()))
                .await
                .is_err()
            {
                return;
            }
        }
        // The hook moves the pushed tags once this answer ends: they are named from here.
        crate::tags::name_deployments(&shared.repos, &shared.config.store, &service, &tags).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<Bytes, Infallible>(bytes), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// How following a build ended.
#[derive(Debug)]
enum Followed {
    Done(Arc<Outcome>),
    Superseded {
        by: u64,
    },
    /// The push stopped following (the build goes on).
    TimedOut,
    /// The pusher went away.
    Gone,
}

/// How many lines of a failed build's log a pusher is shown when the log was not streamed.
const LAST_LINES: usize = 10;

/// Streams one build's progress to `tx` until it ends: its log as it is written, or, when
/// `quiet`, only its start and result (and the last lines of the log if it failed).
async fn follow(
    ticket: &Ticket,
    tx: &mpsc::Sender<Bytes>,
    deadline: tokio::time::Instant,
    service: &str,
    zone: &str,
    quiet: bool,
) -> Followed {
    let tracker = &ticket.tracker;
    let id = tracker.id;
    let mut progress = tracker.subscribe();
    let mut offset = 0;
    let mut announced = false;
    loop {
        let Progress { log_len, phase } = progress.borrow_and_update().clone();
        if !announced && !matches!(phase, Phase::Queued) {
            announced = true;
            if tx
                .send(Bytes::from(format!("revboot: build #{id} started\n")))
                .await
                .is_err()
            {
                return Followed::Gone;
            }
        }
        if !quiet && log_len > offset {
            let chunk = tracker.log_from(offset);
            offset += chunk.len();
            if !chunk.is_empty() && tx.send(Bytes::from(chunk)).await.is_err() {
                return Followed::Gone;
            }
        }
        let (last, end) = match phase {
            Phase::Done(outcome) => {
                let mut text = String::new();
                if quiet && outcome.state == crate::state::BuildState::Failed {
                    let log = String::from_utf8_lossy(&tracker.log_from(0)).into_owned();
                    let lines: Vec<&str> = log.lines().collect();
                    text.push_str(&format!("revboot: the last lines of build #{id}'s log:\n"));
                    for line in &lines[lines.len().saturating_sub(LAST_LINES)..] {
                        text.push_str(line);
                        text.push('\n');
                    }
                }
                for line in &outcome.result_lines {
                    text.push_str(&format!("revboot: {line}\n"));
                }
                (Some(text), Followed::Done(outcome))
            }
            Phase::Superseded { by, commit } => (
                Some(format!(
                    "revboot: build #{id} was superseded by build #{by} ({service} at {}) before it started\n",
                    &commit[..commit.len().min(12)]
                )),
                Followed::Superseded { by },
            ),
            Phase::Queued | Phase::Running => (None, Followed::TimedOut),
        };
        if let Some(last) = last {
            if tx.send(Bytes::from(last)).await.is_err() {
                return Followed::Gone;
            }
            return end;
        }
        match tokio::time::timeout_at(deadline, progress.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Followed::Gone,
            Err(_) => {
                let _ = tx
                    .send(Bytes::from(format!(
                        "revboot: stopped following build #{id}; it goes on (see its log in {service}.{zone}'s history)\n",
                    )))
                    .await;
                return Followed::TimedOut;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hook_body() {
        let zero = "0".repeat(40);
        let new = "a".repeat(40);
        let body = format!("ref {zero} {new} refs/heads/main\noption revboot.deploy=false\n\n");
        let parsed = parse_hook_body(&body).expect("valid");
        assert_eq!(
            parsed.refs,
            vec![(zero.clone(), new.clone(), "refs/heads/main".to_owned())]
        );
        let options = push_options(&parsed.options).expect("known");
        assert_eq!((options.deploy, options.wait), (Some(false), true));
        assert!(parse_hook_body("ref x y z").is_err());
        assert!(parse_hook_body("hello").is_err());
        assert!(push_options(&["revboot.depoly=false".to_owned()]).is_err());
        let options = push_options(&["ci.skip".to_owned(), "revboot.wait=false".to_owned()]);
        assert_eq!(
            options,
            Ok(PushOptions {
                deploy: None,
                wait: false
            })
        );
    }
}

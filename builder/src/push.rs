//! Queuing the builds of a push (step 4 of [the push protocol](crate#the-push-protocol)).
//!
//! 1. The push's new commits of the branch are listed, oldest first, the tip last, at most
//!    `max_commits_per_push` of them (the newest).
//! 2. Older commits that have a deployment of the service already are not built again; the
//!    tip always is.
//! 3. Queued builds of the branch whose commits are not in the new tip's history are
//!    superseded (the queue's rule 1).
//! 4. The pusher is told what was queued, what was left out and why.

use crate::queue;
use crate::shared::Shared;

/// What a push queued, for its pusher.
#[derive(Debug)]
pub(crate) struct Pushed {
    pub(crate) queued: queue::Queued,
    /// New commits in all.
    pub(crate) total: usize,
    /// Commits left out by `max_commits_per_push`.
    pub(crate) over_limit: usize,
    /// Older commits that have a deployment of the service already.
    pub(crate) built: usize,
    pub(crate) limit: usize,
}

impl Pushed {
    /// What the pusher is told about it.
    pub(crate) fn lines(&self, service: &str, refname: &str, zone: &str) -> Vec<String> {
        let tickets = &self.queued.tickets;
        let mut lines = Vec::new();
        if self.total > 1 {
            lines.push(format!(
                "{refname}: {} new commits; {} builds queued, oldest first, the tip last (live moves to the tip only)",
                self.total,
                tickets.len()
            ));
        }
        let left = self.over_limit + self.queued.left_out;
        if self.over_limit > 0 {
            lines.push(format!(
                "{refname}: building the newest {} commits ([builds] max_commits_per_push = {})",
                self.limit, self.limit
            ));
        }
        if self.queued.left_out > 0 {
            lines.push(format!(
                "{refname}: the build queue has room for {} of them",
                tickets.len()
            ));
        }
        if left > 0 {
            lines.push(format!(
                "{refname}: the {left} older commits are built on demand: ask for <source commit prefix>.{service}.{zone}"
            ));
        }
        if self.built + self.queued.already > 0 {
            lines.push(format!(
                "{refname}: {} older commits are built or being built already",
                self.built + self.queued.already
            ));
        }
        for ticket in tickets {
            let mut line = format!("build #{} queued: {service} {refname}", ticket.tracker.id);
            if ticket.ahead > 0 {
                line.push_str(&format!(" ({} ahead of it)", ticket.ahead));
            }
            lines.push(line);
        }
        lines
    }
}

/// Queues the builds of a push of `refname` from `old` to `new`: its new commits, oldest
/// first, the tip last, at most `max_commits_per_push` of them (the newest). Older
/// commits that have a deployment of the service already are not built again; queued
/// builds of the branch that are not in `new`'s history are superseded.
pub(crate) async fn queue_push(
    inner: &Shared,
    service: &str,
    old: &str,
    new: &str,
    refname: &str,
    deploy_option: Option<bool>,
) -> Result<Pushed, String> {
    let limit = inner.config.max_commits_per_push;
    let (mut commits, total) = inner
        .repos
        .new_commits(service, old, new, refname, limit)
        .await
        .map_err(|error| format!("cannot list the pushed commits: {error}"))?;
    if commits.last().map(String::as_str) != Some(new) {
        // A push that brings no commit of its own (a branch moved to a known commit).
        commits.push(new.to_owned());
    }
    let store = inner.config.store.clone();
    let owned = service.to_owned();
    let deployed: std::collections::HashSet<String> = tokio::task::spawn_blocking(move || {
        store
            .history(&owned)
            .map(|history| history.into_iter().map(|d| d.source_commit).collect())
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default();
    let listed = commits.len();
    let tip = commits.pop().expect("the tip was pushed above");
    commits.retain(|commit| !deployed.contains(commit));
    let built = listed - 1 - commits.len();
    commits.push(tip);
    let mut outdated = Vec::new();
    for queued in inner.queue.queued_commits(service, refname).await {
        match inner.repos.in_history(service, &queued, new).await {
            Ok(true) => {}
            Ok(false) => outdated.push(queued),
            Err(error) => {
                tracing::warn!(%error, service, queued, "cannot tell whether a queued build is in the pushed history; it stays queued");
            }
        }
    }
    let request = queue::Request {
        service: service.to_owned(),
        refname: refname.to_owned(),
        commits,
        deploy_option,
        tip: true,
        outdated,
        rerun_of: None,
    };
    let queued = inner
        .queue
        .enqueue(request)
        .await
        .map_err(|error| error.to_string())?;
    Ok(Pushed {
        queued,
        total: total.max(1),
        over_limit: total.saturating_sub(limit),
        built,
        limit,
    })
}

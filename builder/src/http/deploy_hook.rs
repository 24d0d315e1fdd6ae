//! The deployment repository's hook endpoints, `POST /git/-/deploy-hook/<phase>`: the
//! `pre-receive` check and the `post-receive` announcement of [`crate::deploy`].
//!
//! 1. The hook token is checked, and the push options, as for the source hook.
//! 2. The pushed updates are checked with [`revboot_store::Store::check_push`] against the
//!    push's quarantine: `409` with the reason refuses the push.
//! 3. `pre-receive` answers how many new deployments were checked; `post-receive` names
//!    each one and moves live by the rules of a local build.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::hook::{hook_body, hook_caller, push_options};
use super::reply::text;
use crate::shared::Shared;

/// The deployment repository's hooks (see [`crate::deploy`]).
pub(super) async fn deploy_hook(
    State(inner): State<Arc<Shared>>,
    Path(phase): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(refused) = hook_caller(&inner, &headers) {
        return *refused;
    }
    let body = match hook_body(body).await {
        Ok(body) => body,
        Err(refused) => return *refused,
    };
    let call = match crate::deploy::parse(&body) {
        Ok(call) => call,
        Err(error) => return text(StatusCode::BAD_REQUEST, format!("revboot: {error}")),
    };
    let options = match push_options(&call.options) {
        Ok(options) => options,
        Err(error) => return text(StatusCode::CONFLICT, format!("revboot: {error}")),
    };
    let store = inner.config.store.clone();
    let checked = tokio::task::spawn_blocking(move || {
        store.check_push(call.quarantine.as_deref(), &call.updates)
    })
    .await;
    let pushed = match checked {
        Ok(Ok(pushed)) => pushed,
        Ok(Err(refused)) => {
            tracing::info!(%refused, "refused a push to the deployment repository");
            return text(StatusCode::CONFLICT, format!("revboot: refused: {refused}"));
        }
        Err(error) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("revboot: the check failed: {error}"),
            );
        }
    };
    match phase.as_str() {
        "pre-receive" => {
            let count: usize = pushed.iter().map(|p| p.commits.len()).sum();
            text(
                StatusCode::OK,
                format!("revboot: {count} new deployments checked"),
            )
        }
        "post-receive" => {
            let mut lines = Vec::new();
            for branch in pushed {
                let commits: Vec<revboot_store::Revision> = branch
                    .commits
                    .into_iter()
                    .map(revboot_store::Revision::new)
                    .collect();
                for line in
                    crate::deploy::announce(&inner, &branch.service, &commits, options.deploy).await
                {
                    lines.push(format!("revboot: {line}"));
                }
            }
            text(StatusCode::OK, lines.join("\n"))
        }
        other => text(StatusCode::NOT_FOUND, format!("revboot: no hook `{other}`")),
    }
}

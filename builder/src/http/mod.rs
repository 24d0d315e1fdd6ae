//! The push path over HTTP: git smart HTTP, the hook endpoints, and the deployment
//! repository's hook endpoints.
//!
//! 1. `/git/<service>.git/<path>` and `/git/-/deploy.git/<path>`: git smart HTTP, checked
//!    and authorised in `smart`, served by `git http-backend` through `cgi`.
//! 2. `POST /git/-/hook/<service>`: the source repositories' `proc-receive` hook, which
//!    queues a push's builds and streams them to the pusher (`hook`).
//! 3. `POST /git/-/deploy-hook/<phase>`: the deployment repository's `pre-receive` and
//!    `post-receive` hooks (`deploy_hook`, see [`crate::deploy`]).
//!
//! The handlers get the builder's [`Shared`] state.

mod cgi;
mod deploy_hook;
mod hook;
mod reply;
mod smart;

use std::sync::Arc;

use axum::Router;
use axum::routing::{any, post};

use crate::shared::Shared;
use deploy_hook::deploy_hook;
use hook::hook;
use smart::smart_http;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/git/-/hook/{service}", post(hook))
        .route("/git/-/deploy-hook/{phase}", post(deploy_hook))
        .route("/git/{repo}/{*path}", any(smart_http))
        .with_state(shared)
}

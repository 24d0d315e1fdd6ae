//! The HTTP API: every CLI action as JSON, under `/api/v1`, plus `/metrics`.
//!
//! 1. A route parses its path, query and JSON body into an [`Action`]; a body that does not
//!    parse is a 400 with a JSON error, and nothing runs.
//! 2. Writes need the token (`Authorization: Bearer <token>`, or HTTP basic auth with the
//!    token as password, as git sends it); so do reads and `/metrics` unless the daemon is
//!    set up with `[http] public_reads = true`. A missing or wrong token is a 401. The
//!    OpenAPI document is public: it describes the routes and holds no data.
//! 3. The engine runs the action on a blocking thread (the store is synchronous).
//! 4. The reply is JSON; an [`ActionError`] is `{"error": kind, "message": text}` with the
//!    status of [`ActionError::status`].
//!
//! The routes are listed once, in [`ROUTES`]; `openapi.json` at the repository root
//! describes them and a test checks the two agree. Its schemas are written by hand and
//! checked against the reply types (`crate::action`) in a test: every field a reply sends is
//! documented with its type and nullability, and every documented field is sent.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;

use revboot_builder::auth::{parse_basic, token_matches};

use crate::action::{Action, ActionError, Deployments, MoveReason, Reply};
use crate::engine::Engine;

/// Renders Prometheus text for `/metrics`.
pub trait Metrics: Send + Sync + 'static {
    /// The whole exposition, in Prometheus text format.
    fn render(&self) -> String;
}

/// What the API routes share.
#[derive(Clone)]
pub struct ApiState {
    engine: Engine,
    token: Arc<str>,
    public_reads: bool,
    metrics: Option<Arc<dyn Metrics>>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("engine", &self.engine)
            .field("public_reads", &self.public_reads)
            .finish_non_exhaustive()
    }
}

/// Every route: method and path, as `openapi.json` must list them.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/v1/services"),
    ("post", "/api/v1/services"),
    ("delete", "/api/v1/services/{service}"),
    ("post", "/api/v1/services/{service}/rename"),
    ("get", "/api/v1/services/{service}/deployments"),
    ("get", "/api/v1/services/{service}/deployments/{label}"),
    ("get", "/api/v1/services/{service}/diff"),
    ("post", "/api/v1/services/{service}/live"),
    ("get", "/api/v1/services/{service}/logs/build"),
    ("get", "/api/v1/services/{service}/logs/console"),
    ("post", "/api/v1/services/{service}/summon"),
    ("get", "/api/v1/services/{service}/logs/console/follow"),
    ("get", "/api/v1/builds"),
    ("get", "/api/v1/builds/{id}/log/follow"),
    ("get", "/api/v1/instances"),
    ("post", "/api/v1/instances/stop"),
    ("get", "/api/v1/services/{service}/config"),
    ("post", "/api/v1/services/{service}/config"),
    ("get", "/api/v1/daemon"),
    ("post", "/api/v1/daemon/upgrade"),
    ("get", "/api/v1/nodes"),
    ("get", "/api/v1/token"),
    ("get", "/api/v1/openapi.json"),
    ("get", "/metrics"),
];

/// The OpenAPI document of the API.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The API router. With `public_reads`, reads and `/metrics` need no token.
pub fn router(
    engine: Engine,
    token: &str,
    public_reads: bool,
    metrics: Option<Arc<dyn Metrics>>,
) -> Router {
    let state = ApiState {
        engine,
        token: Arc::from(token),
        public_reads,
        metrics,
    };
    Router::new()
        .route("/api/v1/services", get(list_services).post(add_service))
        .route("/api/v1/services/{service}", delete(delete_service))
        .route("/api/v1/services/{service}/rename", post(rename_service))
        .route("/api/v1/services/{service}/deployments", get(history))
        .route("/api/v1/services/{service}/deployments/{label}", get(show))
        .route("/api/v1/services/{service}/diff", get(diff))
        .route("/api/v1/services/{service}/live", post(move_live))
        .route("/api/v1/services/{service}/logs/build", get(build_log))
        .route("/api/v1/services/{service}/logs/console", get(console_logs))
        .route("/api/v1/services/{service}/summon", post(summon))
        .route("/api/v1/builds", get(builds))
        .route("/api/v1/instances", get(instances))
        .route("/api/v1/instances/stop", post(stop))
        .route(
            "/api/v1/services/{service}/config",
            get(config).post(change_config),
        )
        .route("/api/v1/daemon", get(daemon))
        .route("/api/v1/daemon/upgrade", post(upgrade))
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/token", get(check_token))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

/// An API failure as a response.
#[derive(Debug)]
pub struct ApiError(ActionError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %self.0, "API request failed");
        } else {
            tracing::info!(error = %self.0, %status, "API request refused");
        }
        (status, Json(self.0)).into_response()
    }
}

impl From<ActionError> for ApiError {
    fn from(error: ActionError) -> Self {
        ApiError(error)
    }
}

type ApiResult = Result<Json<Reply>, ApiError>;

async fn run(state: &ApiState, headers: &HeaderMap, action: Action) -> ApiResult {
    state.admit(headers, Some(&action))?;
    let engine = state.engine.clone();
    let reply = tokio::task::spawn_blocking(move || engine.execute(action))
        .await
        .map_err(|error| {
            ApiError(ActionError::Internal(format!(
                "Request task failed: {error}"
            )))
        })??;
    Ok(Json(reply))
}

impl ApiState {
    /// Refuses a request without the token, unless it is a read and reads are public.
    /// `action` is `None` for `/metrics`; writes and the token check (`revboot login`)
    /// always need the token.
    fn admit(&self, headers: &HeaderMap, action: Option<&Action>) -> Result<(), ApiError> {
        if matches!(action, Some(Action::CheckToken)) && !authorized(headers, &self.token) {
            return Err(ApiError(ActionError::Unauthorized(
                "This request checks the token: give it as `Authorization: Bearer <token>`"
                    .to_owned(),
            )));
        }
        let write = action.is_some_and(Action::needs_token);
        admit(headers, &self.token, self.public_reads, write)
    }
}

/// Refuses a request without the token, unless it is a read and reads are public: the one
/// rule of every API route.
pub fn admit(
    headers: &HeaderMap,
    token: &str,
    public_reads: bool,
    write: bool,
) -> Result<(), ApiError> {
    if (public_reads && !write) || authorized(headers, token) {
        return Ok(());
    }
    let what = if write {
        "This request changes state"
    } else {
        "Reads need the token on this daemon"
    };
    Err(ApiError(ActionError::Unauthorized(format!(
        "{what}: give the token as `Authorization: Bearer <token>`"
    ))))
}

/// Whether the headers carry the token, as a bearer token or a basic-auth password (the
/// same parsing and constant-time comparison as git pushes get).
pub fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let tokens = [token.to_owned()];
    if let Some(given) = value.strip_prefix("Bearer ") {
        return token_matches(&tokens, given.trim());
    }
    parse_basic(value).is_some_and(|credentials| token_matches(&tokens, &credentials.password))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddService {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    deployments: Deployments,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameBody {
    to: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveLive {
    label: String,
    #[serde(default = "default_reason")]
    reason: MoveReason,
    #[serde(default = "default_check")]
    check: bool,
}

fn default_check() -> bool {
    true
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ShowQuery {
    #[serde(default)]
    show: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigBody {
    #[serde(default)]
    set: crate::action::Values,
    #[serde(default)]
    unset: Vec<String>,
    #[serde(default)]
    restart: bool,
}

fn default_reason() -> MoveReason {
    MoveReason::Deploy
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffQuery {
    a: String,
    b: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LabelQuery {
    label: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConsoleQuery {
    label: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServiceQuery {
    service: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SummonBody {
    label: Option<String>,
    client: Option<IpAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopBody {
    service: String,
    label: Option<String>,
    client: Option<IpAddr>,
    #[serde(default)]
    replica: u16,
    #[serde(default)]
    kill: bool,
}

/// A JSON body that turns a parse failure into our 400 with a JSON error.
struct Body<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) => Err(ApiError(ActionError::Invalid(rejection.body_text()))),
        }
    }
}

/// A query string that turns a parse failure into our 400 with a JSON error.
struct Q<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Q(value)),
            Err(rejection) => Err(ApiError(ActionError::Invalid(rejection.body_text()))),
        }
    }
}

async fn list_services(State(state): State<ApiState>, headers: HeaderMap) -> ApiResult {
    run(&state, &headers, Action::ListServices).await
}

async fn add_service(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Body(body): Body<AddService>,
) -> ApiResult {
    run(&state, &headers, Action::AddService { name: body.name }).await
}

async fn delete_service(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Q(query): Q<DeleteQuery>,
) -> ApiResult {
    let action = Action::DeleteService {
        service,
        deployments: query.deployments,
    };
    run(&state, &headers, action).await
}

async fn rename_service(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Body(body): Body<RenameBody>,
) -> ApiResult {
    let action = Action::RenameService {
        service,
        to: body.to,
    };
    run(&state, &headers, action).await
}

async fn check_token(State(state): State<ApiState>, headers: HeaderMap) -> ApiResult {
    run(&state, &headers, Action::CheckToken).await
}

async fn history(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(service): Path<String>,
) -> ApiResult {
    run(&state, &headers, Action::History { service }).await
}

async fn show(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((service, label)): Path<(String, String)>,
) -> ApiResult {
    run(&state, &headers, Action::Show { service, label }).await
}

async fn diff(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Q(query): Q<DiffQuery>,
) -> ApiResult {
    let action = Action::Diff {
        service,
        a: query.a,
        b: query.b,
    };
    run(&state, &headers, action).await
}

async fn move_live(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Body(body): Body<MoveLive>,
) -> ApiResult {
    let action = Action::MoveLive {
        service,
        label: body.label,
        reason: body.reason,
        check: body.check,
    };
    run(&state, &headers, action).await
}

async fn build_log(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Q(query): Q<LabelQuery>,
) -> ApiResult {
    let action = Action::BuildLog {
        service,
        label: query.label,
    };
    run(&state, &headers, action).await
}

async fn console_logs(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Q(query): Q<ConsoleQuery>,
) -> ApiResult {
    let action = Action::ConsoleLogs {
        service,
        label: query.label,
        limit: query.limit,
    };
    run(&state, &headers, action).await
}

async fn builds(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Q(query): Q<ServiceQuery>,
) -> ApiResult {
    let action = Action::ListBuilds {
        service: query.service,
    };
    run(&state, &headers, action).await
}

async fn summon(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Body(body): Body<SummonBody>,
) -> ApiResult {
    let action = Action::Summon {
        service,
        label: body.label,
        client: body.client,
    };
    run(&state, &headers, action).await
}

async fn instances(State(state): State<ApiState>, headers: HeaderMap) -> ApiResult {
    run(&state, &headers, Action::ListInstances).await
}

async fn stop(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Body(body): Body<StopBody>,
) -> ApiResult {
    let action = Action::StopInstance {
        service: body.service,
        label: body.label,
        client: body.client,
        replica: body.replica,
        kill: body.kill,
    };
    run(&state, &headers, action).await
}

async fn config(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Q(query): Q<ShowQuery>,
) -> ApiResult {
    let action = Action::Config {
        service,
        show: query.show,
    };
    run(&state, &headers, action).await
}

async fn change_config(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Body(body): Body<ConfigBody>,
) -> ApiResult {
    let action = Action::ConfigChange {
        service,
        set: body.set,
        unset: body.unset,
        restart: body.restart,
    };
    run(&state, &headers, action).await
}

async fn daemon(State(state): State<ApiState>, headers: HeaderMap) -> ApiResult {
    run(&state, &headers, Action::Daemon).await
}

async fn nodes(State(state): State<ApiState>, headers: HeaderMap) -> ApiResult {
    run(&state, &headers, Action::Nodes).await
}

async fn upgrade(State(state): State<ApiState>, headers: HeaderMap) -> ApiResult {
    run(&state, &headers, Action::Upgrade).await
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics_text(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Err(refused) = state.admit(&headers, None) {
        return refused.into_response();
    }
    let text = match state.metrics.clone() {
        // Collecting reads part state synchronously: keep it off the async workers.
        Some(metrics) => tokio::task::spawn_blocking(move || metrics.render())
            .await
            .unwrap_or_default(),
        None => String::new(),
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests;

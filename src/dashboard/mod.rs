//! The dashboard: server-rendered pages of the daemon's services, deployments, instances,
//! builds, figures and TLS certificates, at `/` of the HTTP server, with live consoles and build logs.
//!
//! 1. Pages are HTML from askama templates (`templates/`), escaped as they are rendered;
//!    a little plain JavaScript (`static/dashboard.js`, no build step) follows the live
//!    feeds of [`crate::feeds`] with `EventSource` and appends their text as text.
//! 2. Reading needs a session (sign-in with the daemon's token, [`session`]) unless the
//!    daemon serves reads publicly (`[http] public_reads`); then pages are read-only for
//!    whoever is not signed in.
//! 3. Every change is a `POST` of a form that carries the session's CSRF token, checked
//!    with the session cookie and the request's `Origin` ([`session::Sessions::check_write`]);
//!    it becomes the same [`Action`] the API and the CLI send ([`crate::engine::Engine`]),
//!    then the browser is sent back to a page (303).
//!    A service's rename and delete are forms of its page too (the `lifecycle` module).
//! 4. Pages answer with `Content-Security-Policy: default-src 'self'` (no inline script),
//!    `X-Frame-Options: DENY` and `nosniff`; long lists are paginated (50 deployments, 100
//!    instances a page).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tracing::{info, warn};

use crate::action::{Action, ActionError, MoveReason, Reply};
use crate::engine::Engine;
use crate::feeds::FeedState;

mod certificates;
pub mod figures;
mod lifecycle;
mod pages;
pub mod session;

pub use figures::{BootRate, Figures};

/// Where the dashboard reads its figures (the daemon's counters).
pub trait FigureSource: Send + Sync + 'static {
    /// The figures now; called off the async workers.
    fn figures(&self) -> Figures;
}

/// What the dashboard's routes share.
#[derive(Clone)]
pub struct Dashboard {
    engine: Engine,
    feeds: FeedState,
    sessions: Arc<session::Sessions>,
    token: Arc<str>,
    public_reads: bool,
    /// The daemon speaks HTTPS: the session cookie is `Secure`.
    https: bool,
    figures: Option<Arc<dyn FigureSource>>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("public_reads", &self.public_reads)
            .finish_non_exhaustive()
    }
}

impl Dashboard {
    /// A dashboard over the engine and the live feeds, signed into with `token`.
    pub fn new(
        engine: Engine,
        feeds: FeedState,
        token: &str,
        public_reads: bool,
        https: bool,
        figures: Option<Arc<dyn FigureSource>>,
    ) -> Dashboard {
        Dashboard {
            engine,
            feeds,
            sessions: Arc::default(),
            token: Arc::from(token),
            public_reads,
            https,
            figures,
        }
    }

    /// The dashboard's routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/", get(pages::overview))
            .route("/login", get(login_page).post(login))
            .route("/logout", post(logout))
            .route("/services/{service}", get(pages::service))
            .route("/services/{service}/rollback", get(pages::confirm))
            .route("/services/{service}/live", post(make_live))
            .route("/services/{service}/rename", post(lifecycle::rename))
            .route(
                "/services/{service}/delete",
                get(lifecycle::confirm_delete).post(lifecycle::delete),
            )
            .route(
                "/services/{service}/deployments/{revision}",
                get(pages::revision),
            )
            .route(
                "/services/{service}/deployments/{revision}/boot",
                post(boot),
            )
            .route("/instances", get(pages::instances))
            .route("/instances/stop", post(stop))
            .route("/builds", get(pages::builds))
            .route("/certificates", get(certificates::page))
            .route("/builds/{id}", get(pages::build))
            .route("/feeds/services/{service}/console", get(console_feed))
            .route("/feeds/builds/{id}", get(build_feed))
            .route("/static/dashboard.js", get(script))
            .route("/static/dashboard.css", get(style))
            .layer(axum::middleware::map_response(secure_headers))
            .with_state(self)
    }

    /// Who reads: `Ok(Some)` signed in, `Ok(None)` a public reader, `Err` a redirect to
    /// the sign-in page.
    fn reader(
        &self,
        headers: &HeaderMap,
        here: &str,
    ) -> Result<Option<session::SignedIn>, Redirect> {
        match self.sessions.signed_in(headers) {
            Some(signed_in) => Ok(Some(signed_in)),
            None if self.public_reads => Ok(None),
            None => Err(Redirect::to(&format!("/login?next={}", encode(here)))),
        }
    }

    /// Who may see a confirmation page at `here` (it leads to a write): a signed-in reader;
    /// a public reader gets `403` with a link `back`, nobody the sign-in page.
    fn confirmer(
        &self,
        headers: &HeaderMap,
        here: &str,
        back: &str,
    ) -> Result<session::SignedIn, Box<Response>> {
        match self.reader(headers, here) {
            Ok(Some(reader)) => Ok(reader),
            Ok(None) => Err(Box::new(pages::failure_with(
                StatusCode::FORBIDDEN,
                "Not allowed",
                session::Refusal::NotSignedIn.message(),
                None,
                back,
            ))),
            Err(redirect) => Err(Box::new(redirect.into_response())),
        }
    }

    /// Runs an action off the async workers.
    async fn execute(&self, action: Action) -> Result<Reply, ActionError> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.execute(action))
            .await
            .map_err(|error| ActionError::Internal(format!("Request task failed: {error}")))?
    }
}

async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

#[derive(Debug, Deserialize, Default)]
struct NextQuery {
    next: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

#[derive(Debug, Deserialize)]
struct BootForm {
    #[serde(default)]
    csrf: String,
    /// The client a per-client service's instance is for (empty for any other service).
    #[serde(default)]
    client: String,
}

#[derive(Debug, Deserialize)]
struct LiveForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    to: String,
}

#[derive(Debug, Deserialize)]
struct StopForm {
    #[serde(default)]
    csrf: String,
    service: String,
    revision: String,
    #[serde(default)]
    client: String,
    #[serde(default)]
    replica: u16,
    #[serde(default)]
    kill: bool,
}

/// Only a path of this site may be where sign-in leads (no `//host`, no scheme).
fn local_path(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

async fn login_page(Query(query): Query<NextQuery>) -> Response {
    let next = local_path(query.next.as_deref().unwrap_or("/")).to_owned();
    pages::render(&pages::Login { error: None, next }, StatusCode::OK)
}

async fn login(State(dashboard): State<Dashboard>, Form(form): Form<LoginForm>) -> Response {
    let next = local_path(&form.next).to_owned();
    let tokens = [dashboard.token.to_string()];
    if form.token.is_empty() || !revboot_builder::auth::token_matches(&tokens, &form.token) {
        warn!("dashboard sign-in refused: wrong token");
        let page = pages::Login {
            error: Some("That is not the daemon's token.".to_owned()),
            next,
        };
        return pages::render(&page, StatusCode::UNAUTHORIZED);
    }
    match dashboard.sessions.open() {
        Ok((id, _)) => {
            info!("dashboard sign-in");
            let mut response = Redirect::to(&next).into_response();
            response.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_str(&session::set_cookie(&id, dashboard.https))
                    .expect("hex is a header value"),
            );
            response
        }
        Err(error) => pages::failure(
            &ActionError::Internal(format!("Cannot open a session: {error}")),
            None,
            "/login",
        ),
    }
}

async fn logout(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(refusal) = dashboard.sessions.check_write(&headers, &form.csrf) {
        return refused(refusal, "/logout");
    }
    dashboard.sessions.close(&headers);
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&session::clear_cookie(dashboard.https)).expect("a header value"),
    );
    response
}

/// A write refused: 403 with what to do, logged without anything secret.
fn refused(refusal: session::Refusal, path: &str) -> Response {
    warn!(?refusal, path, "dashboard write refused");
    pages::failure_with(
        StatusCode::FORBIDDEN,
        "Not allowed",
        refusal.message(),
        None,
        "/",
    )
}

async fn make_live(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Form(form): Form<LiveForm>,
) -> Response {
    let signed_in = match dashboard.sessions.check_write(&headers, &form.csrf) {
        Ok(signed_in) => signed_in,
        Err(refusal) => return refused(refusal, "/services/…/live"),
    };
    let action = Action::MoveLive {
        service: service.clone(),
        label: form.to,
        reason: MoveReason::Rollback,
        // As `revboot rollback` does: a revision whose manifest has a `[deploy] check` is
        // booted and checked first, and a failed check leaves live where it was.
        check: true,
    };
    let back = format!("/services/{}", encode(&service));
    match dashboard.execute(action).await {
        Ok(Reply::Moved(moved)) => {
            info!(
                service,
                to = moved.to.short,
                "live moved from the dashboard"
            );
            Redirect::to(&format!("{back}?moved={}", moved.to.short)).into_response()
        }
        Ok(_) => Redirect::to(&back).into_response(),
        Err(error) => pages::failure(&error, Some(&signed_in), &back),
    }
}

async fn boot(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Path((service, revision)): Path<(String, String)>,
    Form(form): Form<BootForm>,
) -> Response {
    let signed_in = match dashboard.sessions.check_write(&headers, &form.csrf) {
        Ok(signed_in) => signed_in,
        Err(refusal) => return refused(refusal, "/services/…/boot"),
    };
    let back = format!(
        "/services/{}/deployments/{}",
        encode(&service),
        encode(&revision)
    );
    let client = match client_field(&form.client) {
        Ok(client) => client,
        Err(error) => return pages::failure(&error, Some(&signed_in), &back),
    };
    let action = Action::Summon {
        service,
        label: Some(revision),
        client,
    };
    match dashboard.execute(action).await {
        Ok(_) => Redirect::to(&format!("{back}?booted=1")).into_response(),
        Err(error) => pages::failure(&error, Some(&signed_in), &back),
    }
}

/// A form's client address: none when empty.
fn client_field(text: &str) -> Result<Option<std::net::IpAddr>, ActionError> {
    match text.trim() {
        "" => Ok(None),
        text => text
            .parse()
            .map(Some)
            .map_err(|_| ActionError::Invalid(format!("`{text}` is not a client address"))),
    }
}

async fn stop(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Form(form): Form<StopForm>,
) -> Response {
    let signed_in = match dashboard.sessions.check_write(&headers, &form.csrf) {
        Ok(signed_in) => signed_in,
        Err(refusal) => return refused(refusal, "/instances/stop"),
    };
    let client = match client_field(&form.client) {
        Ok(client) => client,
        Err(error) => return pages::failure(&error, Some(&signed_in), "/instances"),
    };
    let action = Action::StopInstance {
        service: form.service,
        label: Some(form.revision),
        client,
        replica: form.replica,
        kill: form.kill,
    };
    match dashboard.execute(action).await {
        Ok(_) => Redirect::to("/instances?stopped=1").into_response(),
        Err(error) => pages::failure(&error, Some(&signed_in), "/instances"),
    }
}

async fn console_feed(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Path(service): Path<String>,
    query: Result<Query<crate::feeds::ConsoleQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if dashboard.sessions.signed_in(&headers).is_none() && !dashboard.public_reads {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match query {
        Ok(Query(query)) => dashboard.feeds.console_response(&service, &query),
        Err(rejection) => (StatusCode::BAD_REQUEST, rejection.body_text()).into_response(),
    }
}

async fn build_feed(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    if dashboard.sessions.signed_in(&headers).is_none() && !dashboard.public_reads {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    dashboard.feeds.build_log_response(id).await
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../static/dashboard.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../static/dashboard.css"),
    )
        .into_response()
}

/// Percent-encodes a path segment or query value.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_leads_only_to_this_site() {
        assert_eq!(local_path("/services/hello"), "/services/hello");
        assert_eq!(local_path("//evil.example/"), "/");
        assert_eq!(local_path("http://evil.example/"), "/");
        assert_eq!(local_path("/\\evil.example"), "/");
    }
}

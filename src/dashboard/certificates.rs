//! The dashboard's certificates page (`/certificates`), read-only: what `revboot certs`
//! shows, per certificate its names, issuer, end of validity, source (ACME or files), the
//! last error while it stands, and the next renewal or attempt.

use askama::Template;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::Dashboard;
use super::pages::{PageCtx, failure, render};
use crate::action::{Action, CertView, Reply};
use crate::output::time;

/// One certificate as the page shows it.
struct CertRow {
    id: String,
    source: String,
    state: String,
    names: Vec<String>,
    issuer: String,
    not_after: String,
    next: String,
    error: Option<String>,
}

impl CertRow {
    fn new(view: CertView) -> CertRow {
        let at = |ms: Option<i64>| ms.map(|ms| format!("{} UTC", time(ms / 1000)));
        // After failures, the next attempt; else the renewal planned (ACME).
        let next = match (at(view.retry_at_ms), at(view.renew_at_ms)) {
            (Some(retry), _) => format!("retry at {retry}"),
            (None, Some(renew)) => format!("renewal at {renew}"),
            (None, None) if view.source == "files" => "when its files change".to_owned(),
            (None, None) => "–".to_owned(),
        };
        CertRow {
            id: if view.id == crate::tls::DAEMON {
                "daemon (HTTPS)".to_owned()
            } else {
                view.id
            },
            source: if view.source == "acme" {
                "ACME".to_owned()
            } else {
                view.source
            },
            state: view.state,
            names: view.names,
            issuer: view.issuer.unwrap_or_else(|| "–".to_owned()),
            not_after: at(view.not_after_ms).unwrap_or_else(|| "–".to_owned()),
            next,
            error: view.error,
        }
    }
}

#[derive(Template)]
#[template(path = "certificates.html")]
struct Certificates {
    page: PageCtx,
    rows: Vec<CertRow>,
}

pub(super) async fn page(State(dashboard): State<Dashboard>, headers: HeaderMap) -> Response {
    let reader = match dashboard.reader(&headers, "/certificates") {
        Ok(reader) => reader,
        Err(redirect) => return redirect.into_response(),
    };
    let rows = match dashboard.execute(Action::Daemon).await {
        Ok(Reply::Daemon(daemon)) => daemon.certificates.into_iter().map(CertRow::new).collect(),
        Ok(_) => Vec::new(),
        Err(error) => return failure(&error, reader.as_ref(), "/"),
    };
    let page = Certificates {
        page: PageCtx::new("Certificates", reader.as_ref()),
        rows,
    };
    render(&page, StatusCode::OK)
}

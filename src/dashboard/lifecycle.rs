//! A service's rename and delete from its dashboard page: the same actions as
//! `revboot service rename|delete` and the API's.
//!
//! 1. The service page has a rename form (the new name) and a "Delete…" link; both are
//!    shown to a signed-in reader only, and every `POST` carries the session's CSRF token
//!    ([`super::session::Sessions::check_write`]).
//! 2. "Delete…" leads to a confirmation page that asks what becomes of the deployments:
//!    kept (under `refs/revboot/deleted/<service>/…`) or removed. Neither is chosen for
//!    the reader; a form without a choice is refused and changes nothing.
//! 3. A rename leads to the service's page under its new name, a delete to the services;
//!    a refusal (a taken or bad name, builds running, an unknown service) is a page that
//!    says why, and nothing changed.

use askama::Template;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tracing::info;

use super::pages::{PageCtx, failure, render};
use super::{Dashboard, encode, refused};
use crate::action::{Action, ActionError, Deployments, Reply};

#[derive(Debug, Deserialize)]
pub(super) struct RenameForm {
    csrf: String,
    to: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct DeleteForm {
    csrf: String,
    #[serde(default)]
    deployments: String,
}

#[derive(Template)]
#[template(path = "delete.html")]
struct DeleteConfirm {
    page: PageCtx,
    service: String,
    dns_name: String,
    deployments: usize,
}

/// The delete confirmation page (rule 2).
pub(super) async fn confirm_delete(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Path(service): Path<String>,
) -> Response {
    let here = format!("/services/{}", encode(&service));
    let reader = match dashboard.confirmer(&headers, &format!("{here}/delete"), &here) {
        Ok(reader) => reader,
        Err(response) => return *response,
    };
    let deployments = match dashboard
        .execute(Action::History {
            service: service.clone(),
        })
        .await
    {
        Ok(Reply::History(history)) => history.len(),
        Ok(_) => 0,
        Err(error) => return failure(&error, Some(&reader), "/"),
    };
    let page = DeleteConfirm {
        page: PageCtx::new(format!("Delete {service}"), Some(&reader)),
        dns_name: format!("{service}.{}", dashboard.engine.zone()),
        service,
        deployments,
    };
    render(&page, StatusCode::OK)
}

/// `POST /services/{service}/delete` (rules 2 and 3).
pub(super) async fn delete(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Form(form): Form<DeleteForm>,
) -> Response {
    let signed_in = match dashboard.sessions.check_write(&headers, &form.csrf) {
        Ok(signed_in) => signed_in,
        Err(refusal) => return refused(refusal, "/services/…/delete"),
    };
    let back = format!("/services/{}/delete", encode(&service));
    let deployments = match form.deployments.as_str() {
        "keep" => Deployments::Keep,
        "remove" => Deployments::Remove,
        _ => {
            let error = ActionError::Invalid(
                "Say whether the deployments are kept or removed: nothing was deleted".into(),
            );
            return failure(&error, Some(&signed_in), &back);
        }
    };
    match dashboard
        .execute(Action::DeleteService {
            service: service.clone(),
            deployments,
        })
        .await
    {
        Ok(Reply::ServiceDeleted(deleted)) => {
            info!(
                service,
                kept = deleted.kept,
                "service deleted from the dashboard"
            );
            Redirect::to(&format!("/?deleted={}", encode(&service))).into_response()
        }
        Ok(_) => Redirect::to("/").into_response(),
        Err(error) => failure(&error, Some(&signed_in), &back),
    }
}

/// `POST /services/{service}/rename` (rules 1 and 3).
pub(super) async fn rename(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Form(form): Form<RenameForm>,
) -> Response {
    let signed_in = match dashboard.sessions.check_write(&headers, &form.csrf) {
        Ok(signed_in) => signed_in,
        Err(refusal) => return refused(refusal, "/services/…/rename"),
    };
    let back = format!("/services/{}", encode(&service));
    match dashboard
        .execute(Action::RenameService {
            service: service.clone(),
            to: form.to.trim().to_owned(),
        })
        .await
    {
        Ok(Reply::ServiceRenamed(renamed)) => {
            info!(
                service,
                to = renamed.to,
                "service renamed from the dashboard"
            );
            Redirect::to(&format!(
                "/services/{}?renamed={}",
                encode(&renamed.to),
                encode(&service)
            ))
            .into_response()
        }
        Ok(_) => Redirect::to(&back).into_response(),
        Err(error) => failure(&error, Some(&signed_in), &back),
    }
}

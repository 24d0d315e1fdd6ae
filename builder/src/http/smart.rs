//! Git smart HTTP, `/git/<service>.git/<path>` and `/git/-/deploy.git/<path>`.
//!
//! 1. Only the smart protocol paths are served: `GET info/refs?service=…`, `POST
//!    git-upload-pack`, `POST git-receive-pack`; anything else is `404`. The query is read
//!    the way `git http-backend` reads it (names and values percent-decoded); one that names
//!    a parameter twice (`service=git-upload-pack&service=git-receive-pack`, or
//!    `serv%69ce=…`) is refused with `400` before anything else, because git would run the
//!    last one and an authorisation that read the first would guard the wrong service.
//!    `git http-backend` is handed only the service that was checked, never the raw query.
//! 2. Push (`git-receive-pack`) needs a push token (basic auth with the token as password,
//!    or `Authorization: Bearer <token>`), fetch needs it unless anonymous fetch is
//!    configured; otherwise `401` with `WWW-Authenticate: Basic`. The deployment
//!    repository, `/git/-/deploy.git`, is served the same way (see [`crate::deploy`]) and
//!    also takes the deploy tokens.
//! 3. The first authenticated push to an unknown service creates its source repository
//!    (the name must be a valid service name), unless a service had that name before a
//!    rename: then the push is refused with `404` and a message that names the new name
//!    (see `renamed`), and nothing is created.
//! 4. The request is handed to `git http-backend` (see `cgi`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;

use super::cgi::{Cgi, run_cgi};
use super::reply::{text, unauthorized};
use crate::auth::{parse_basic, token_matches};
use crate::name::validate_service_name;
use crate::shared::Shared;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Upload,
    Receive,
}

pub(super) async fn smart_http(
    State(inner): State<Arc<Shared>>,
    Path((repo, path)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // The deployment repository, or a service's source repository.
    let deploy_path = crate::deploy::smart_path(&repo, &path);
    let (service, path) = match (&deploy_path, repo.strip_suffix(".git")) {
        (Some(rest), _) => ("-", rest.clone()),
        (None, Some(service)) => (service, path),
        (None, None) => {
            return text(
                StatusCode::NOT_FOUND,
                "Not a repository path: use /git/<service>.git or /git/-/deploy.git",
            );
        }
    };
    let deploy = deploy_path.is_some();
    let asked = match query_service(query.as_deref().unwrap_or_default()) {
        Ok(asked) => asked,
        Err(message) => {
            tracing::warn!(service, message, "ambiguous git query");
            return text(StatusCode::BAD_REQUEST, message);
        }
    };
    let kind = match (method.clone(), path.as_str()) {
        (Method::GET, "info/refs") => match asked.as_deref() {
            Some(b"git-upload-pack") => Service::Upload,
            Some(b"git-receive-pack") => Service::Receive,
            _ => {
                return text(
                    StatusCode::FORBIDDEN,
                    "Only the smart HTTP protocol is served (git 1.6.6 or newer)",
                );
            }
        },
        (Method::POST, "git-upload-pack") => Service::Upload,
        (Method::POST, "git-receive-pack") => Service::Receive,
        _ => return text(StatusCode::NOT_FOUND, format!("Not found: {method} {path}")),
    };
    // Basic auth with the token as password, as git asks for it; or a bearer token (as
    // `git -c http.extraHeader='Authorization: Bearer …'` sends it, keeping it out of URLs).
    let user = match headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|value| match value.strip_prefix("Bearer ") {
            Some(token) => Some(crate::auth::BasicCredentials {
                user: "bearer".to_owned(),
                password: token.trim().to_owned(),
            }),
            None => parse_basic(value),
        }) {
        Some(credentials) if token_matches(&inner.config.push_tokens, &credentials.password) => {
            Some(credentials.user)
        }
        // A deploy token opens the deployment repository only.
        Some(credentials)
            if deploy && token_matches(&inner.config.deploy_tokens, &credentials.password) =>
        {
            Some(credentials.user)
        }
        Some(credentials) => {
            tracing::warn!(service, user = credentials.user, "rejected push token");
            return unauthorized("Wrong token");
        }
        None => None,
    };
    if user.is_none() && (kind == Service::Receive || !inner.config.anonymous_fetch) {
        tracing::info!(service, ?kind, "asking for credentials");
        return unauthorized("A push token is needed (use https://user:TOKEN@host/…)");
    }
    if deploy {
        // Served as it is: nothing to create.
    } else if let Err(error) = validate_service_name(service) {
        tracing::warn!(%error, "bad service name in git URL");
        return text(StatusCode::BAD_REQUEST, error.to_string());
    } else if inner.closed.contains(service) {
        return text(
            StatusCode::CONFLICT,
            format!("Service `{service}` is being renamed or deleted; try again once that is done"),
        );
    } else if !inner.repos.exists(service) {
        if let Some(to) = inner.renamed.new_name(service) {
            tracing::info!(
                service,
                to,
                "refused a request to a renamed service's old name"
            );
            return text(
                StatusCode::NOT_FOUND,
                format!(
                    "Service `{service}` was renamed to `{to}`: use /git/{to}.git \
                     (git remote set-url <remote> <daemon>/git/{to}.git), or create a new \
                     `{service}` on purpose with `revboot service add {service}`"
                ),
            );
        }
        if kind == Service::Upload {
            return text(StatusCode::NOT_FOUND, format!("No service `{service}`"));
        }
        if let Some(coordinator) = &inner.config.coordinator
            && let Err(reason) = coordinator.may_create(service).await
        {
            tracing::info!(
                service,
                reason,
                "refused a push that would create a service"
            );
            return text(StatusCode::NOT_FOUND, reason);
        }
        if let Err(error) = inner.repos.create(service).await {
            tracing::error!(%error, service, "cannot create source repository on push");
            return text(StatusCode::INTERNAL_SERVER_ERROR, error.to_string());
        }
    }
    // git reads only what was checked: the service of an advertisement, nothing for a POST.
    let query = match (&method, kind) {
        (&Method::GET, Service::Upload) => "service=git-upload-pack",
        (&Method::GET, Service::Receive) => "service=git-receive-pack",
        _ => "",
    };
    let (root, path_info) = if deploy {
        let (root, name) = crate::deploy::project_root(&inner.config.store);
        (root.to_owned(), format!("/{name}/{path}"))
    } else {
        (
            inner.repos.root().to_owned(),
            format!("/{service}.git/{path}"),
        )
    };
    let cgi = Cgi {
        root: &root,
        path_info,
        query,
        method: &method,
        headers: &headers,
        user,
    };
    match run_cgi(&inner, service, cgi, body).await {
        Ok(response) => response,
        Err(message) => {
            tracing::error!(service, message, "git http-backend failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, message)
        }
    }
}

/// The `service` parameter of a query as `git http-backend` reads it: split at `&`, the
/// name up to the first `=`, `%XX` and `+` decoded in both. A name given twice (any name)
/// is refused: git would take the last value, so no single reading is safe.
fn query_service(query: &str) -> Result<Option<Vec<u8>>, String> {
    let mut names = Vec::new();
    let mut service = None;
    for part in query.split('&').filter(|part| !part.is_empty()) {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        let name = url_decode(name);
        if names.contains(&name) {
            return Err(format!(
                "Ambiguous query: the parameter `{}` is given more than once",
                String::from_utf8_lossy(&name)
            ));
        }
        if name == b"service" {
            service = Some(url_decode(value));
        }
        names.push(name);
    }
    Ok(service)
}

/// Percent-decoding as git does it: `%XX` with two hex digits is a byte, `+` a space, any
/// other `%` stays.
fn url_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
        match bytes[i] {
            b'%' => {
                if let (Some(high), Some(low)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                    out.push((high * 16 + low) as u8);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_are_decoded_and_may_not_repeat() {
        let service = |query: &str| {
            query_service(query).map(|value| value.map(|v| String::from_utf8(v).expect("utf8")))
        };
        assert_eq!(
            service("service=git-upload-pack"),
            Ok(Some("git-upload-pack".into()))
        );
        assert_eq!(
            service("x=1&service=git%2dreceive-pack&"),
            Ok(Some("git-receive-pack".into()))
        );
        assert_eq!(service(""), Ok(None));
        assert_eq!(url_decode("a+b%zz%4"), b"a b%zz%4");
        for ambiguous in [
            "service=git-upload-pack&service=git-receive-pack",
            "service=git-receive-pack&service=git-upload-pack",
            "service=git-upload-pack&serv%69ce=git-receive-pack",
            "service=git-upload-pack&service",
        ] {
            let error = service(ambiguous).expect_err(ambiguous);
            assert!(
                error.contains("`service` is given more than once"),
                "{error}"
            );
        }
    }
}

//! The push path over HTTP: git smart HTTP and the hook endpoint.
//!
//! Smart HTTP, `/git/<service>.git/<path>`:
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
//!    (the name must be a valid service name).
//! 4. The request runs `git http-backend` (CGI) with `GIT_PROJECT_ROOT`, `PATH_INFO`,
//!    `REMOTE_USER` and `GIT_HTTP_EXPORT_ALL`; the request body is streamed to its stdin
//!    while its stdout is read: the CGI header block is parsed, the rest is streamed back
//!    unchanged. No pack is ever held in memory whole.
//!
//! Hook endpoint, `POST /git/-/hook/<service>` (called by the `proc-receive` hook):
//! 1. `Authorization: Bearer <hook token>`; the body has `ref <old> <new> <refname>` and
//!    `option <push option>` lines. An unknown `revboot.*` option refuses the whole push.
//! 2. Each updated branch's new commits are queued, oldest first, the tip last (at most
//!    `max_commits_per_push`, the newest; the answer says how many were left out). The
//!    answer streams, as plain text lines, each build's start and result (deployment
//!    commit, DNS name, whether live moved), the tip's log as it is written, and the last
//!    lines of the log of an older commit whose build failed.
//! 3. Then one `revboot-verdict ok|ng <ref> [reason]` line per branch: `ng` when the tip's
//!    build failed or was superseded, and the hook then leaves the branch where it was.
//!    With `-o revboot.wait=false` the verdicts come as soon as the builds are queued.

use std::convert::Infallible;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::io::ReaderStream;

use crate::auth::{parse_basic, token_matches};
use crate::log::Progress;
use crate::name::validate_service_name;
use crate::push::queue_push;
use crate::queue::Ticket;
use crate::shared::Shared;
use crate::state::{Outcome, Phase};

/// The largest CGI header block accepted from `git http-backend`.
const MAX_CGI_HEAD: usize = 64 * 1024;
/// How long `git http-backend` has to send its headers.
const CGI_HEAD_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest hook request body.
const MAX_HOOK_BODY: usize = 256 * 1024;
/// The most refs built from one push.
const MAX_REFS_PER_PUSH: usize = 32;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/git/-/hook/{service}", post(hook))
        .route("/git/-/deploy-hook/{phase}", post(deploy_hook))
        .route("/git/{repo}/{*path}", any(smart_http))
        .with_state(shared)
}

fn text(status: StatusCode, message: impl Into<String>) -> Response {
    let mut body = message.into();
    body.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn unauthorized(message: &str) -> Response {
    let mut response = text(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"revboot\", charset=\"UTF-8\""),
    );
    response
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Upload,
    Receive,
}

async fn smart_http(
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
    } else if !inner.repos.exists(service) {
        if kind == Service::Upload {
            return text(StatusCode::NOT_FOUND, format!("No service `{service}`"));
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

/// What `git http-backend` is run for.
struct Cgi<'a> {
    /// `GIT_PROJECT_ROOT`.
    root: &'a std::path::Path,
    /// `PATH_INFO`: the repository below the root and the smart HTTP path.
    path_info: String,
    query: &'a str,
    method: &'a Method,
    headers: &'a HeaderMap,
    user: Option<String>,
}

async fn run_cgi(
    inner: &Shared,
    service: &str,
    cgi: Cgi<'_>,
    body: Body,
) -> Result<Response, String> {
    let Cgi {
        root,
        path_info,
        query,
        method,
        headers,
        user,
    } = cgi;
    let header_text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut command = crate::git::command(None);
    command
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", path_info)
        .env("REQUEST_METHOD", method.as_str())
        .env("QUERY_STRING", query)
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(user) = &user {
        command.env("REMOTE_USER", user);
    }
    if let Some(value) = header_text(header::CONTENT_TYPE) {
        command.env("CONTENT_TYPE", value);
    }
    if let Some(value) = header_text(header::CONTENT_LENGTH) {
        command.env("CONTENT_LENGTH", value);
    }
    if let Some(value) = header_text(header::CONTENT_ENCODING) {
        command.env("HTTP_CONTENT_ENCODING", value);
    }
    if let Some(value) = headers.get("git-protocol").and_then(|v| v.to_str().ok()) {
        command.env("GIT_PROTOCOL", value);
    }
    let Ok(permit) = inner.git_processes.clone().try_acquire_owned() else {
        tracing::warn!(service, "too many git requests at once");
        return Ok(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many git requests at once; try again shortly",
        ));
    };
    let mut child = command
        .spawn()
        .map_err(|e| format!("Cannot start git http-backend: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("No stdin for git http-backend")?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or("No stdout for git http-backend")?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or("No stderr for git http-backend")?;
    let max_push = inner.config.max_push_bytes;
    tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        let mut total: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else {
                tracing::warn!("push request body ended with an error");
                break;
            };
            total += chunk.len() as u64;
            if total > max_push {
                tracing::warn!(total, max_push, "push request body too large; cut off");
                break;
            }
            if stdin.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = stdin.shutdown().await;
    });
    let limit = Duration::from_secs(inner.config.push_wait_secs + 300);
    let service_name = service.to_owned();
    tokio::spawn(async move {
        let _permit = permit;
        let mut errors = Vec::new();
        let read_errors = async {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                if errors.len() < 16 * 1024 {
                    errors.extend_from_slice(&chunk[..n]);
                }
            }
        };
        let waited = tokio::time::timeout(limit, async {
            read_errors.await;
            child.wait().await
        })
        .await;
        let errors = String::from_utf8_lossy(&errors);
        match waited {
            Ok(Ok(status)) if status.success() => {
                if !errors.trim().is_empty() {
                    tracing::debug!(service = service_name, stderr = %errors.trim(), "git http-backend");
                }
            }
            Ok(Ok(status)) => {
                tracing::warn!(service = service_name, %status, stderr = %errors.trim(), "git http-backend failed")
            }
            Ok(Err(error)) => tracing::warn!(%error, "cannot wait for git http-backend"),
            Err(_) => {
                tracing::warn!(
                    service = service_name,
                    "git http-backend ran too long; killed"
                );
                let _ = child.kill().await;
            }
        }
    });
    let (status, response_headers, rest) =
        tokio::time::timeout(CGI_HEAD_TIMEOUT, read_cgi_head(&mut stdout))
            .await
            .map_err(|_| "git http-backend sent no headers in time".to_owned())??;
    let first =
        futures::stream::once(async move { Ok::<Bytes, std::io::Error>(Bytes::from(rest)) });
    let body = Body::from_stream(first.chain(ReaderStream::with_capacity(stdout, 64 * 1024)));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = response_headers;
    Ok(response)
}

/// Reads the CGI header block; returns the status, headers and bytes read past it.
async fn read_cgi_head(
    stdout: &mut tokio::process::ChildStdout,
) -> Result<(StatusCode, HeaderMap, Vec<u8>), String> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = find_head_end(&buffer) {
            break end;
        }
        if buffer.len() > MAX_CGI_HEAD {
            return Err("git http-backend sent an oversized header block".into());
        }
        let n = stdout
            .read(&mut chunk)
            .await
            .map_err(|e| format!("Cannot read git http-backend: {e}"))?;
        if n == 0 {
            return Err("git http-backend ended before its headers".into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let (head, body_start) = end;
    let head = String::from_utf8_lossy(&buffer[..head]).into_owned();
    let (status, headers) = parse_cgi_head(&head)?;
    Ok((status, headers, buffer[body_start..].to_vec()))
}

/// Where the header block ends: (end of headers, start of body).
fn find_head_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    let lf = buffer
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn parse_cgi_head(head: &str) -> Result<(StatusCode, HeaderMap), String> {
    let mut status = StatusCode::OK;
    let mut headers = HeaderMap::new();
    for line in head.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("Bad CGI header line `{line}`"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or("");
            status = code
                .parse::<u16>()
                .ok()
                .and_then(|code| StatusCode::from_u16(code).ok())
                .ok_or_else(|| format!("Bad CGI status `{value}`"))?;
            continue;
        }
        let name = header::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("Bad CGI header name `{name}`"))?;
        let value =
            HeaderValue::from_str(value).map_err(|_| format!("Bad CGI header value `{value}`"))?;
        headers.append(name, value);
    }
    Ok((status, headers))
}

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
struct PushOptions {
    /// `revboot.deploy`: `Some(false)` keeps live where it is.
    deploy: Option<bool>,
    /// `revboot.wait`: whether the push waits for its builds (default) or only queues them.
    wait: bool,
}

/// The `revboot.*` push options; an error for an unknown one.
fn push_options(options: &[String]) -> Result<PushOptions, String> {
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
fn hook_caller(inner: &Shared, headers: &HeaderMap) -> Result<(), Box<Response>> {
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

async fn hook(
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
    let body = match axum::body::to_bytes(body, MAX_HOOK_BODY).await {
        Ok(body) => body,
        Err(error) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("revboot: bad hook request: {error}"),
            );
        }
    };
    let parsed = match parse_hook_body(&String::from_utf8_lossy(&body)) {
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
        for (old, new, refname) in parsed.refs {
            if new.bytes().all(|b| b == b'0') {
                say(format!("{refname} deleted; nothing to build")).await;
                let _ = tx.send(verdict(&refname, None)).await;
                continue;
            }
            if !refname.starts_with("refs/heads/") {
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
                    pushes.push((refname, pushed.queued));
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
            return;
        }
        for (refname, queued) in pushes {
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
                Followed::Superseded { by, .. } => Some(format!(
                    "superseded by build #{by} of a newer push of {refname} before it started"
                )),
                Followed::TimedOut => continue,
                _ => None,
            };
            if tx
                .send(verdict(&refname, refusal.as_deref()))
                .await
                .is_err()
            {
                return;
            }
        }
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

/// The deployment repository's hooks (see [`crate::deploy`]).
async fn deploy_hook(
    State(inner): State<Arc<Shared>>,
    Path(phase): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(refused) = hook_caller(&inner, &headers) {
        return *refused;
    }
    let body = match axum::body::to_bytes(body, MAX_HOOK_BODY).await {
        Ok(body) => body,
        Err(error) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("revboot: bad hook request: {error}"),
            );
        }
    };
    let call = match crate::deploy::parse(&String::from_utf8_lossy(&body)) {
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
    fn parses_cgi_head() {
        let raw = b"Status: 403 Forbidden\r\nContent-Type: text/plain\r\n\r\nbody";
        let (head, start) = find_head_end(raw).expect("complete");
        let (status, headers) =
            parse_cgi_head(std::str::from_utf8(&raw[..head]).expect("utf8")).expect("valid");
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain");
        assert_eq!(&raw[start..], b"body");
        assert!(parse_cgi_head("no colon here").is_err());
        assert!(find_head_end(b"Content-Type: x\r\n").is_none());
    }

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

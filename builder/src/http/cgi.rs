//! The bridge to `git http-backend` (CGI): step 4 of smart HTTP.
//!
//! 1. `git http-backend` runs with `GIT_PROJECT_ROOT`, `PATH_INFO`, `REMOTE_USER`,
//!    `GIT_HTTP_EXPORT_ALL`, the checked service as its only query, and the request's
//!    content headers; at most [`crate::MAX_GIT_PROCESSES`] run at once, more requests get
//!    `503`.
//! 2. The request body is streamed to its stdin (cut off past `max_push_bytes`) while its
//!    stdout is read: the CGI header block (at most [`MAX_CGI_HEAD`], within
//!    [`CGI_HEAD_TIMEOUT`]) becomes the response's status and headers, the rest is streamed
//!    back unchanged. No pack is ever held in memory whole.
//! 3. Its stderr is kept (16 KiB) for the log; it is killed if it runs longer than the push
//!    wait and five minutes.

use std::process::Stdio;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use super::reply::text;
use crate::shared::Shared;

/// The largest CGI header block accepted from `git http-backend`.
const MAX_CGI_HEAD: usize = 64 * 1024;
/// How long `git http-backend` has to send its headers.
const CGI_HEAD_TIMEOUT: Duration = Duration::from_secs(120);

/// What `git http-backend` is run for.
pub(super) struct Cgi<'a> {
    /// `GIT_PROJECT_ROOT`.
    pub(super) root: &'a std::path::Path,
    /// `PATH_INFO`: the repository below the root and the smart HTTP path.
    pub(super) path_info: String,
    pub(super) query: &'a str,
    pub(super) method: &'a Method,
    pub(super) headers: &'a HeaderMap,
    pub(super) user: Option<String>,
}

pub(super) async fn run_cgi(
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
}

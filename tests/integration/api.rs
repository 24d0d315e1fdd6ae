//! The HTTP API refuses bad requests with a 4xx and a JSON error, and changes nothing.

use std::process::Command;

use crate::support::{Daemon, TOKEN, hello_source, history, push};

/// (status, body) of a curl request.
fn request(
    daemon: &Daemon,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: bool,
) -> (u16, String) {
    let mut command = Command::new("curl");
    command
        .args([
            "-sS",
            "--max-time",
            "30",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!("http://{}{path}", daemon.http));
    if let Some(body) = body {
        command.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ]);
    }
    if token {
        command.args(["-H", &format!("authorization: Bearer {TOKEN}")]);
    }
    let output = command.output().expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').expect("status line");
    (status.trim().parse().expect("status code"), body.to_owned())
}

fn error_kind(body: &str) -> String {
    let value: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert!(
        value["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    value["error"].as_str().expect("error kind").to_owned()
}

#[test]
fn invalid_requests_get_json_errors_and_change_nothing() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let work = hello_source(temp.path());
    push(&daemon, &work);
    let before = history(&daemon, "hello");
    let live = before[0]["revision"].as_str().expect("revision").to_owned();

    // (method, path, body, with token, status, error kind)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, bool, u16, &'a str);
    let cases: &[Case<'_>] = &[
        (
            "POST",
            "/api/v1/services/hello/live",
            Some(r#"{"label":"deadbeef"}"#),
            false,
            401,
            "unauthorized",
        ),
        (
            "POST",
            "/api/v1/services/hello/live",
            Some(r#"{"lable":"x"}"#),
            true,
            400,
            "invalid",
        ),
        (
            "POST",
            "/api/v1/services/hello/live",
            Some("{not json"),
            true,
            400,
            "invalid",
        ),
        (
            "POST",
            "/api/v1/services/hello/live",
            Some(r#"{"label":"deadbeef"}"#),
            true,
            404,
            "not_found",
        ),
        (
            "POST",
            "/api/v1/services/hello/live",
            Some(r#"{"label":"../../etc"}"#),
            true,
            400,
            "invalid",
        ),
        (
            "GET",
            "/api/v1/services/nope/deployments",
            None,
            false,
            404,
            "not_found",
        ),
        (
            "GET",
            "/api/v1/services/hello/diff",
            None,
            false,
            400,
            "invalid",
        ),
        (
            "POST",
            "/api/v1/services",
            Some(r#"{"name":"Bad_Name!"}"#),
            true,
            400,
            "invalid",
        ),
        (
            "POST",
            "/api/v1/services",
            Some(r#"{"name":"x"}"#),
            false,
            401,
            "unauthorized",
        ),
        (
            "POST",
            "/api/v1/services",
            Some(r#"{"name":"hello"}"#),
            true,
            409,
            "conflict",
        ),
        (
            "POST",
            "/api/v1/instances/stop",
            Some(r#"{"service":"hello"}"#),
            true,
            404,
            "not_found",
        ),
    ];
    for (method, path, body, token, status, kind) in cases {
        let (got, text) = request(&daemon, method, path, *body, *token);
        assert_eq!(got, *status, "{method} {path} {body:?}: {text}");
        assert_eq!(error_kind(&text), *kind, "{method} {path}: {text}");
    }

    let after = history(&daemon, "hello");
    assert_eq!(after, before, "a refused request changed the history");
    assert_eq!(after[0]["revision"], live.as_str());
    assert_eq!(after[0]["live"], true);

    let (status, metrics) = request(&daemon, "GET", "/metrics", None, false);
    assert_eq!(status, 200);
    assert!(
        metrics.contains("revboot_dns_responses_total{rcode=\"noerror\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("revboot_builds_total{result=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("revboot_boots_total "), "{metrics}");
    assert!(
        metrics.contains("revboot_boot_duration_seconds_bucket{le=\"+Inf\"}"),
        "{metrics}"
    );
    let (status, openapi) = request(&daemon, "GET", "/api/v1/openapi.json", None, false);
    assert_eq!(status, 200);
    assert!(openapi.contains("\"openapi\""));
}

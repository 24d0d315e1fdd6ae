//! The HTTP API refuses bad requests with a 4xx and a JSON error, and changes nothing.

use std::process::Command;

use crate::support::{Daemon, Setup, git, hello_source, history, push, request};

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
            true,
            404,
            "not_found",
        ),
        (
            "GET",
            "/api/v1/services/hello/diff",
            None,
            true,
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

    let (status, metrics) = request(&daemon, "GET", "/metrics", None, true);
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

/// Every GET route of the API with this service and revision filled in but the live feeds
/// (`…/follow`, which never end by themselves; tests/integration/follow.rs reads them).
fn read_paths(service: &str, revision: &str) -> Vec<String> {
    revboot::api::ROUTES
        .iter()
        .filter(|(method, path)| {
            *method == "get" && *path != "/api/v1/openapi.json" && !path.ends_with("/follow")
        })
        .map(|(_, path)| {
            let path = path
                .replace("{service}", service)
                .replace("{label}", revision)
                .replace("{id}", "1");
            if path.ends_with("/diff") {
                format!("{path}?a={revision}&b={revision}")
            } else {
                path
            }
        })
        .collect()
}

/// `git clone` of a source repository without a prompt for credentials; true if it worked.
fn clone(dir: &std::path::Path, url: &str, into: &str) -> bool {
    Command::new("git")
        .args(["clone", "-q", url, into])
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run git")
        .status
        .success()
}

#[test]
fn anonymous_reads_of_api_metrics_and_sources_need_the_token() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let work = hello_source(temp.path());
    push(&daemon, &work);
    let revision = history(&daemon, "hello")[0]["revision"]
        .as_str()
        .expect("revision")
        .to_owned();
    let anonymous = format!("http://{}/git/hello.git", daemon.http);

    let paths = read_paths("hello", &revision[..7]);
    assert!(paths.len() >= 8, "{paths:?}");
    for path in &paths {
        let (status, body) = request(&daemon, "GET", path, None, false);
        assert_eq!(status, 401, "anonymous GET {path}: {body}");
        let (status, body) = request(&daemon, "GET", path, None, true);
        assert_eq!(status, 200, "GET {path} with the token: {body}");
    }
    let (status, body) = request(&daemon, "GET", "/metrics", None, false);
    assert_eq!(status, 401, "anonymous /metrics: {body}");
    for feed in [
        "/api/v1/services/hello/logs/console/follow",
        "/api/v1/builds/1/log/follow",
    ] {
        let (status, body) = request(&daemon, "GET", feed, None, false);
        assert_eq!(status, 401, "anonymous GET {feed}: {body}");
    }
    let (status, _) = request(&daemon, "GET", "/api/v1/openapi.json", None, false);
    assert_eq!(status, 200, "the API's description stays public");

    assert!(!clone(temp.path(), &anonymous, "anonymous"));
    assert!(!temp.path().join("anonymous/revboot.toml").exists());
    assert!(clone(temp.path(), &daemon.remote("hello"), "authed"));
    assert!(temp.path().join("authed/revboot.toml").exists());

    // The CLI's most verbose log (-vvv, trace) never shows the token it sends, not even in
    // a hex dump of the request.
    let traced = daemon.cli(&["-vvv", "ps"]);
    assert!(traced.status.success());
    let trace = String::from_utf8_lossy(&traced.stderr);
    assert!(trace.contains("TRACE"), "{trace}");
    assert!(!trace.contains(&daemon.token), "{trace}");
    assert!(!trace.contains("ureq_proto::util"), "{trace}");

    // The CLI sends the token it has; without one it is told what is missing.
    for args in [
        &["ps"][..],
        &["log", "hello"],
        &["logs", "hello", "--build"],
    ] {
        let output = daemon.cli(args);
        assert!(
            output.status.success(),
            "revboot {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let without = Command::new(env!("CARGO_BIN_EXE_revboot"))
        .args(["--url", &format!("http://{}", daemon.http)])
        .args(["--data", &temp.path().join("elsewhere").to_string_lossy()])
        .arg("ps")
        .env_remove("REVBOOT_TOKEN")
        .output()
        .expect("run revboot");
    assert_eq!(without.status.code(), Some(2));
    let said = String::from_utf8_lossy(&without.stderr);
    assert!(said.contains("Reads need the token"), "{said}");
    // It says where the CLI looks for a token, and a wrong one is called wrong.
    assert!(said.contains("the CLI found no token"), "{said}");
    assert!(said.contains("REVBOOT_TOKEN"), "{said}");
    assert!(said.contains("revboot login http://"), "{said}");
    let wrong = Command::new(env!("CARGO_BIN_EXE_revboot"))
        .args(["--url", &format!("http://{}", daemon.http)])
        .args(["--data", &temp.path().join("elsewhere").to_string_lossy()])
        .arg("ps")
        .env("REVBOOT_TOKEN", "not-the-token")
        .output()
        .expect("run revboot");
    assert_eq!(wrong.status.code(), Some(2));
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(said.contains("is not this daemon's"), "{said}");
    assert!(!said.contains("not-the-token"), "{said}");
    drop(daemon);

    // `public_reads = true` is the open daemon of before; writes still need the token.
    let open = Daemon::start_setup(
        &temp.path().join("open"),
        &Setup {
            config: "[http]\npublic_reads = true\n",
            ..Setup::default()
        },
    );
    git(&work, &["commit", "-q", "--allow-empty", "-m", "again"]);
    push(&open, &work);
    let revision = history(&open, "hello")[0]["revision"]
        .as_str()
        .expect("revision")
        .to_owned();
    for path in read_paths("hello", &revision[..7]) {
        let (status, body) = request(&open, "GET", &path, None, false);
        // The token check (`revboot login`) needs the token everywhere.
        let expected = if path == "/api/v1/token" { 401 } else { 200 };
        assert_eq!(status, expected, "anonymous GET {path}: {body}");
    }
    let (status, _) = request(&open, "GET", "/metrics", None, false);
    assert_eq!(status, 200);
    let (status, body) = request(
        &open,
        "POST",
        "/api/v1/services",
        Some(r#"{"name":"other"}"#),
        false,
    );
    assert_eq!(status, 401, "{body}");
    let anonymous = format!("http://{}/git/hello.git", open.http);
    assert!(clone(temp.path(), &anonymous, "open-anonymous"));
}

//! A service's whole life: rename and delete through the CLI and the API, and what they do
//! to DNS names, the live pointer, history, instances and the source repository; bad names
//! and unknown services are refused and change nothing.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::{
    Daemon, commit_revision, curl, dig_ok, eventually, git, hello_source, history, push,
    push_refused, push_service, request, run,
};

const ZONE: &str = "revboot.test";

/// `git` in the deployment repository; its stdout.
fn deploy_git(daemon: &Daemon, args: &[&str]) -> String {
    let output = run(Command::new("git")
        .arg("-C")
        .arg(daemon.data.join("deploy.git"))
        .args(args));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `dig`'s status word (NOERROR, NXDOMAIN…) for `name`.
pub(super) fn dig_status(daemon: &Daemon, name: &str) -> String {
    let output = daemon.dig_from("127.0.0.1", name);
    output
        .split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no status in {output}"))
        .to_owned()
}

/// The CLI with `--json`: exit code and parsed stdout.
pub(super) fn cli_json(daemon: &Daemon, args: &[&str]) -> (i32, serde_json::Value) {
    let output = daemon.cli(&[&["--json"], args].concat());
    let value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "{args:?}: {error}: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().expect("an exit code"), value)
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// (status, JSON body) of an API request with the token.
fn api(daemon: &Daemon, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let (status, body) = request(daemon, method, path, body, true);
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, value)
}

/// Everything a rename or delete could change: every ref with its target, and the source
/// repositories.
fn state(daemon: &Daemon) -> String {
    let refs = deploy_git(
        daemon,
        &["for-each-ref", "--format=%(refname) %(objectname)"],
    );
    let mut sources: Vec<String> = std::fs::read_dir(daemon.data.join("src"))
        .expect("src")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    sources.sort();
    format!("{refs}\n{sources:?}")
}

fn revisions(entries: &[serde_json::Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["revision"].as_str().expect("revision").to_owned())
        .collect()
}

#[test]
fn rename_moves_names_live_history_instances_and_source() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let work = hello_source(temp.path());
    push(&daemon, &work);
    commit_revision(&work, "v2", "hello");
    push(&daemon, &work);
    let before = history(&daemon, "hello");
    let (v2, v1) = (&before[0], &before[1]);
    let v1_short = v1["short"].as_str().expect("short");
    deploy_git(
        &daemon,
        &[
            "tag",
            "-a",
            "-m",
            "stable",
            "hello/stable",
            v1["revision"].as_str().expect("rev"),
        ],
    );

    // An instance runs, and its names are in the DNS answer cache.
    let live = format!("hello.{ZONE}");
    let address = dig_ok(&daemon, &live, false);
    assert!(curl(&live, &address, 8080).starts_with("hello from v2"));
    dig_ok(&daemon, &format!("{v1_short}.hello.{ZONE}"), false);
    dig_ok(&daemon, &format!("stable.hello.{ZONE}"), false);
    assert!(daemon.instances().iter().any(|i| i["service"] == "hello"));
    ok(&daemon.cli(&["config", "set", "hello", "API_KEY=sk-rename-0123456789"]));

    let (code, renamed) = cli_json(&daemon, &["service", "rename", "hello", "greet"]);
    assert_eq!(code, 0, "{renamed}");
    assert_eq!(renamed["to"], "greet");
    assert_eq!(renamed["live"], v2["revision"]);
    assert_eq!(renamed["deployments"], 2);
    assert!(renamed["stopped"].as_u64() >= Some(1), "{renamed}");
    assert_eq!(renamed["variables"], 1, "{renamed}");

    // The configuration variables moved with it, sealed under the new name.
    let (code, config) = cli_json(&daemon, &["config", "list", "greet", "--show"]);
    assert_eq!(code, 0, "{config}");
    assert_eq!(config["vars"][0]["name"], "API_KEY", "{config}");
    assert_eq!(config["vars"][0]["value"], "sk-rename-0123456789");
    assert!(daemon.data.join("deployer/vars/greet.vars").is_file());
    assert!(!daemon.data.join("deployer/vars/hello.vars").exists());

    // DNS: every old name is gone at once (the cache too); the same labels answer under
    // the new name, with the same revisions.
    for label in ["", &format!("{v1_short}."), "stable."] {
        assert_eq!(
            dig_status(&daemon, &format!("{label}hello.{ZONE}")),
            "NXDOMAIN"
        );
        dig_ok(&daemon, &format!("{label}greet.{ZONE}"), false);
    }
    let new_live = format!("greet.{ZONE}");
    let address = dig_ok(&daemon, &new_live, true);
    assert!(curl(&new_live, &address, 8080).starts_with("hello from v2"));
    let old = dig_ok(&daemon, &format!("{v1_short}.greet.{ZONE}"), false);
    assert!(curl(&format!("{v1_short}.greet.{ZONE}"), &old, 8080).starts_with("hello from v1"));
    assert!(daemon.instances().iter().all(|i| i["service"] != "hello"));

    // History and the live pointer's trail go on under the new name.
    let after = history(&daemon, "greet");
    assert_eq!(revisions(&after), revisions(&before));
    assert_eq!(after[0]["live"], true);
    let reflog = deploy_git(&daemon, &["reflog", "show", "refs/live/greet"]);
    assert!(reflog.contains("renamed from hello"), "{reflog}");
    assert!(reflog.lines().count() >= 3, "{reflog}");
    let (code, error) = cli_json(&daemon, &["log", "hello"]);
    assert_eq!(
        (code, error["error"].as_str()),
        (3, Some("not_found")),
        "{error}"
    );
    // A checkout whose remote still names the old service: the CLI names the new one, as
    // a push to the old URL does.
    crate::support::git(&work, &["remote", "add", "origin", &daemon.remote("hello")]);
    for args in [&["log"][..], &["logs"]] {
        let output = daemon
            .cli_command(&format!("http://{}", daemon.http), &[], args)
            .current_dir(&work)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run revboot");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(
            stderr.contains("Service `hello` was renamed to `greet`")
                && stderr.contains("/git/greet.git"),
            "{args:?}: {stderr}"
        );
    }
    crate::support::git(&work, &["remote", "remove", "origin"]);

    // The stopped instance's record went with the service.
    let stopped = eventually(|| {
        let (_, records) = cli_json(&daemon, &["logs", "greet", "--console"]);
        records.as_array().is_some_and(|records| {
            records
                .iter()
                .any(|r| r["outcome"] == "stopped: service renamed or deleted")
        })
    });
    assert!(stopped, "no record of the stopped instance");

    // The source repository moved: pushes to the new name build and go live.
    assert!(daemon.data.join("src/greet.git/HEAD").is_file());
    assert!(!daemon.data.join("src/hello.git").exists());
    commit_revision(&work, "v3", "hello");
    push_service(&daemon, &work, "greet");
    let latest = history(&daemon, "greet");
    assert_eq!(latest.len(), 3);
    assert_eq!(latest[0]["live"], true);
    let address = dig_ok(&daemon, &new_live, false);
    assert!(curl(&new_live, &address, 8080).starts_with("hello from v3"));
    deploy_git(&daemon, &["fsck", "--no-dangling"]);
}

#[test]
fn delete_keeps_or_removes_deployments_through_the_api_and_the_cli() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let work = hello_source(temp.path());
    push(&daemon, &work);
    push_service(&daemon, &work, "other");
    let kept_revision = history(&daemon, "hello")[0]["revision"].clone();
    dig_ok(&daemon, &format!("hello.{ZONE}"), false);
    ok(&daemon.cli(&["config", "set", "hello", "API_KEY=sk-delete-0123456789"]));

    // Kept, through the API: the service is gone, its deployments are in an archive.
    let (status, deleted) = api(
        &daemon,
        "DELETE",
        "/api/v1/services/hello?deployments=keep",
        None,
    );
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(
        (deleted["kept"].as_bool(), deleted["deployments"].as_u64()),
        (Some(true), Some(1))
    );
    // Its secrets went with it, even though its deployments are kept.
    assert_eq!(deleted["variables"], 1, "{deleted}");
    assert!(!daemon.data.join("deployer/vars/hello.vars").exists());
    let archive = deleted["archive"].as_str().expect("an archive").to_owned();
    assert!(
        archive.starts_with("refs/revboot/deleted/hello/"),
        "{archive}"
    );
    assert_eq!(dig_status(&daemon, &format!("hello.{ZONE}")), "NXDOMAIN");
    let (_, services) = cli_json(&daemon, &["service", "list"]);
    let names: Vec<&str> = services
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["other"]);
    let log = deploy_git(&daemon, &["log", "--format=%H", &format!("{archive}heads")]);
    assert_eq!(log.trim(), kept_revision.as_str().expect("revision"));
    let source = deleted["source_archive"]
        .as_str()
        .expect("a source archive");
    assert!(Path::new(source).join("HEAD").is_file(), "{source}");
    assert!(!daemon.data.join("src/hello.git").exists());
    dig_ok(&daemon, &format!("other.{ZONE}"), false);

    // The name is free: a push creates the service anew, with a history of its own and
    // no configuration variables.
    push(&daemon, &work);
    assert_eq!(history(&daemon, "hello").len(), 1);
    let (code, config) = cli_json(&daemon, &["config", "list", "hello"]);
    assert_eq!(
        (code, config["vars"].as_array().map(Vec::len)),
        (0, Some(0)),
        "{config}"
    );
    // Removed, through the CLI: no ref of it is left, the first archive stays.
    let (code, removed) = cli_json(
        &daemon,
        &["service", "delete", "hello", "--remove-deployments"],
    );
    assert_eq!(code, 0, "{removed}");
    assert_eq!(
        (removed["kept"].as_bool(), removed["archive"].as_str()),
        (Some(false), None)
    );
    let left = deploy_git(&daemon, &["for-each-ref", "--format=%(refname)"]);
    assert!(
        left.lines()
            .all(|r| !r.ends_with("/hello") && !r.contains("tags/hello/")),
        "{left}"
    );
    assert!(left.contains(&format!("{archive}heads")), "{left}");
    assert!(!daemon.data.join("src/hello.git").exists());
    assert_eq!(dig_status(&daemon, &format!("hello.{ZONE}")), "NXDOMAIN");
    let text = ok(&daemon.cli(&["service", "list"]));
    assert!(text.contains("other") && !text.contains("hello."), "{text}");
    deploy_git(&daemon, &["fsck", "--no-dangling"]);
}

#[test]
fn bad_names_unknown_services_and_busy_builds_are_refused_and_change_nothing() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let work = hello_source(temp.path());
    push(&daemon, &work);
    push_service(&daemon, &work, "other");
    let before = state(&daemon);

    // (arguments, exit code, error kind)
    let cli_cases: &[(&[&str], i32, &str)] = &[
        (&["service", "rename", "hello", "Bad_Name"], 2, "invalid"),
        (&["service", "rename", "hello", "hello"], 2, "invalid"),
        (&["service", "rename", "../x", "y"], 2, "invalid"),
        (&["service", "rename", "nope", "y"], 3, "not_found"),
        (&["service", "rename", "hello", "other"], 3, "conflict"),
        (
            &["service", "delete", "nope", "--keep-deployments"],
            3,
            "not_found",
        ),
        (
            &["service", "delete", "a.b", "--remove-deployments"],
            2,
            "invalid",
        ),
        (&["service", "delete", "hello"], 2, "usage"),
        (
            &[
                "service",
                "delete",
                "hello",
                "--keep-deployments",
                "--remove-deployments",
            ],
            2,
            "usage",
        ),
    ];
    for (args, code, kind) in cli_cases {
        let (got, error) = cli_json(&daemon, args);
        assert_eq!(
            (got, error["error"].as_str()),
            (*code, Some(*kind)),
            "{args:?}: {error}"
        );
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{error}"
        );
    }
    // (method, path, body, status, error kind)
    let api_cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("DELETE", "/api/v1/services/hello", None, 400, "invalid"),
        (
            "DELETE",
            "/api/v1/services/hello?deployments=maybe",
            None,
            400,
            "invalid",
        ),
        (
            "DELETE",
            "/api/v1/services/nope?deployments=remove",
            None,
            404,
            "not_found",
        ),
        (
            "POST",
            "/api/v1/services/hello/rename",
            Some(r#"{"to":"UPPER"}"#),
            400,
            "invalid",
        ),
        (
            "POST",
            "/api/v1/services/hello/rename",
            Some(r#"{"too":"x"}"#),
            400,
            "invalid",
        ),
        (
            "POST",
            "/api/v1/services/nope/rename",
            Some(r#"{"to":"x"}"#),
            404,
            "not_found",
        ),
        (
            "POST",
            "/api/v1/services/hello/rename",
            Some(r#"{"to":"other"}"#),
            409,
            "conflict",
        ),
    ];
    for (method, path, body, status, kind) in api_cases {
        let (got, error) = api(&daemon, method, path, *body);
        assert_eq!(
            (got, error["error"].as_str()),
            (*status, Some(*kind)),
            "{method} {path}: {error}"
        );
    }
    let path = "/api/v1/services/hello?deployments=remove";
    let (status, _) = request(&daemon, "DELETE", path, None, false);
    assert_eq!(status, 401);
    assert_eq!(state(&daemon), before);

    // A build of the service that runs (for 30 s at least: the machine cannot leave that
    // state early) keeps it from being renamed or deleted.
    let recipe = work.join("revboot.toml");
    let text = std::fs::read_to_string(&recipe).expect("recipe");
    let slow = text.replacen("command = [", "command = [\"sleep\", \"30\"]\n# was: [", 1);
    std::fs::write(&recipe, slow).expect("write recipe");
    git(&work, &["commit", "-qam", "slow"]);
    run(Command::new("git")
        .args([
            "push",
            "-o",
            "revboot.wait=false",
            &daemon.remote("hello"),
            "main",
        ])
        .current_dir(&work));
    let before = state(&daemon);
    let (code, error) = cli_json(&daemon, &["service", "rename", "hello", "greet"]);
    assert_eq!(
        (code, error["error"].as_str()),
        (3, Some("conflict")),
        "{error}"
    );
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("builds"),
        "{error}"
    );
    let (code, error) = cli_json(
        &daemon,
        &["service", "delete", "hello", "--remove-deployments"],
    );
    assert_eq!(
        (code, error["error"].as_str()),
        (3, Some("conflict")),
        "{error}"
    );
    assert_eq!(state(&daemon), before);
    // Once it has ended (it fails: no artifact), the rename goes through. Its failed
    // deployment is recorded a moment before the queue counts the build finished, so the
    // rename is asked until then; each refusal is for the build, and changes nothing.
    assert!(eventually(|| history(&daemon, "hello").len() == 2));
    let renamed = eventually(|| {
        let (code, reply) = cli_json(&daemon, &["service", "rename", "hello", "greet"]);
        if code != 0 {
            assert_eq!(
                (code, reply["error"].as_str()),
                (3, Some("conflict")),
                "{reply}"
            );
        }
        code == 0
    });
    assert!(renamed, "the rename is still refused");
    assert_eq!(history(&daemon, "greet").len(), 2);
}

#[test]
fn a_push_to_a_renamed_services_old_url_is_refused_with_the_new_name_even_after_a_restart() {
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("data");
    let daemon = Daemon::start(&data);
    let work = hello_source(temp.path());
    push(&daemon, &work);
    ok(&daemon.cli(&["service", "rename", "hello", "greet"]));
    commit_revision(&work, "v2", "hello");

    // Refused, naming the new name; nothing is created or built.
    let refused = |daemon: &Daemon| {
        let before = state(daemon);
        let said = push_refused(daemon, &work);
        assert!(
            said.contains("Service `hello` was renamed to `greet`")
                && said.contains("/git/greet.git"),
            "{said}"
        );
        assert_eq!(state(daemon), before);
        assert!(!daemon.data.join("src/hello.git").exists());
        let (code, error) = cli_json(daemon, &["log", "hello"]);
        assert_eq!((code, error["error"].as_str()), (3, Some("not_found")));
    };
    refused(&daemon);

    // The daemon remembers it after a restart.
    daemon.stop();
    let daemon = Daemon::start(&data);
    refused(&daemon);
    assert_eq!(history(&daemon, "greet").len(), 1);

    // `service add` takes the old name on purpose: pushes go to the new service then.
    ok(&daemon.cli(&["service", "add", "hello"]));
    push(&daemon, &work);
    // Both commits of the branch are new to this service.
    assert_eq!(history(&daemon, "hello").len(), 2);
    assert_eq!(history(&daemon, "greet").len(), 1);
}

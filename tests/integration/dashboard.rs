//! The dashboard in a real headless Chromium: sign in, a service's history and live
//! revision, a rollback from the page that DNS then answers, a running instance's console
//! line appearing live, a failed build's log; and, without the token, no write succeeds.

use std::path::PathBuf;
use std::process::Command;

use crate::browser::Browser;
use crate::support::{
    Daemon, commit_revision, curl, curl_path, dig_ok, eventually, git, hello_source, history, push,
    run,
};

const ZONE: &str = "revboot.test";

/// Where screenshots go: `REVBOOT_SCREENSHOTS` if set (the README's come from there),
/// else the test's temporary target directory.
fn screenshots() -> PathBuf {
    std::env::var_os("REVBOOT_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots"))
}

/// A hostile subject: markup that would run if a page did not escape it.
const SUBJECT: &str = "<img src=x onerror=\"window.pwned=1\"> hello v2 & <b>more</b>";

#[test]
fn dashboard_sign_in_rollback_live_console_and_failed_build_in_chromium() {
    let temp = tempfile::tempdir().expect("temp dir");
    // A certificate for hello from files, for the certificates page.
    let ca = crate::https::TestCa::new(temp.path());
    let (cert, key) = (temp.path().join("hello.pem"), temp.path().join("hello.key"));
    ca.issue(&[&format!("*.hello.{ZONE}")], (2000, 2090), &cert, &key);
    let config = format!(
        "[tls.services.hello]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let daemon = Daemon::start_configured(&temp.path().join("data"), &config);
    let work = hello_source(temp.path());
    push(&daemon, &work);
    commit_revision(&work, "v2", "hello");
    git(&work, &["commit", "-q", "--amend", "-m", SUBJECT]);
    push(&daemon, &work);
    let deployments = history(&daemon, "hello");
    let (v2, v1) = (&deployments[0], &deployments[1]);
    assert_eq!(v2["live"], true);
    let v1_revision = v1["revision"].as_str().expect("revision").to_owned();
    let v1_short = v1["short"].as_str().expect("short").to_owned();

    // A build that fails, its log holding markup too.
    let broken = hello_source(&temp.path().join("broken"));
    std::fs::write(
        broken.join("revboot.toml"),
        "[build]\ncommand = [\"sh\", \"-c\", \"echo '<script>window.pwned=2</script> the build broke'; exit 1\"]\nartifacts = [\"none\"]\n\n[run]\ntender = \"process\"\nport = 8080\n",
    )
    .expect("write revboot.toml");
    git(&broken, &["commit", "-q", "-am", "break the build"]);
    let _ = Command::new("git")
        .args(["push", &daemon.remote("broken"), "main"])
        .current_dir(&broken)
        .output();
    let failed = history(&daemon, "broken");
    assert_eq!(failed[0]["status"], "failed", "{failed:?}");
    let failed_revision = failed[0]["revision"].as_str().expect("revision").to_owned();

    let browser = Browser::start();
    let site = format!("http://{}", daemon.http);
    let shots = screenshots();

    // Unsigned, every page leads to the sign-in form; a wrong token is refused.
    browser.open(&format!("{site}/services/hello"));
    browser.wait_until("the sign-in form", |b| b.url().contains("/login"));
    browser.type_into("#token", "not-the-token");
    browser.click("#sign-in");
    browser.wait_until("the refusal", |b| {
        b.text().contains("not the daemon's token")
    });
    browser.type_into("#token", &daemon.token);
    browser.click("#sign-in");
    browser.wait_until("the service page", |b| {
        b.url().ends_with("/services/hello") && b.text().contains("History")
    });

    // The service: v2 is live, the subject shown as text, never run as markup.
    let live = browser.script("return document.querySelector('#history tr.live .rev').textContent");
    assert_eq!(live, v2["short"], "{}", browser.text());
    assert!(browser.text().contains(SUBJECT), "{}", browser.text());
    assert_eq!(browser.script("return window.pwned === undefined"), true);
    browser.screenshot(&shots.join("service.png"));

    // Roll back from the page, through its confirmation.
    browser.click(&format!("tr[data-revision='{v1_revision}'] a.rollback"));
    browser.wait_until("the confirmation", |b| {
        b.text().contains("Yes, make it live")
    });
    browser.screenshot(&shots.join("rollback.png"));
    browser.click("#confirm");
    browser.wait_until("the moved note", |b| {
        b.text().contains(&format!("Live is now {v1_short}"))
    });
    let live = browser.script("return document.querySelector('#history tr.live .rev').textContent");
    assert_eq!(live, v1_short.as_str());
    // DNS answers the older revision for the bare name.
    let bare = format!("hello.{ZONE}");
    let address = dig_ok(&daemon, &bare, false);
    assert!(curl(&bare, &address, 8080).starts_with("hello from v1"));

    // The revision's page: boot it, and watch a console line appear while it runs.
    browser.open(&format!("{site}/services/hello/deployments/{v1_revision}"));
    browser.wait_until("the revision page", |b| b.text().contains("Manifest"));
    let text = browser.text();
    assert!(text.contains(&format!("{v1_short}.hello.{ZONE}")), "{text}");
    assert!(text.contains("hello.revboot.test"), "{text}");
    browser.click("#boot-it");
    browser.wait_until("the feed following", |b| {
        b.script("return document.querySelector('#live-console.following') !== null") == true
            && b.script("return document.getElementById('live-console').textContent")
                .as_str()
                .is_some_and(|t| t.contains("hello v1 ready"))
    });
    let name = format!("{v1_short}.hello.{ZONE}");
    let address = dig_ok(&daemon, &name, false);
    curl_path(&name, &address, 8080, "/from-the-browser-test?<b>x</b>");
    browser.wait_until("the console line", |b| {
        b.script("return document.getElementById('live-console').textContent")
            .as_str()
            .is_some_and(|t| t.contains("hello: GET /from-the-browser-test?<b>x</b>"))
    });
    assert_eq!(
        browser.script("return document.querySelector('#live-console b') === null"),
        true
    );
    browser.screenshot(&shots.join("revision.png"));

    // Instances now, with stop and kill.
    browser.open(&format!("{site}/instances"));
    browser.wait_until("the instance", |b| b.text().contains(&address));
    browser.screenshot(&shots.join("instances.png"));
    browser.click("#instances button[value='false']");
    browser.wait_until("the instance stopped", |b| {
        b.text().contains("Stopped.") && !b.text().contains(&address)
    });
    assert!(
        !daemon
            .instances()
            .iter()
            .any(|i| i["address"] == address.as_str()),
        "still running: {:?}",
        daemon.instances()
    );

    // A failed build's log, as text.
    browser.open(&format!(
        "{site}/services/broken/deployments/{failed_revision}"
    ));
    browser.wait_until("the failed build's log", |b| {
        b.text()
            .contains("<script>window.pwned=2</script> the build broke")
    });
    assert_eq!(browser.script("return window.pwned === undefined"), true);
    browser.screenshot(&shots.join("failed-build.png"));

    // The certificates: names, issuer, end of validity, source, and what comes next.
    browser.click("header nav a[href='/certificates']");
    browser.wait_until("the certificates page", |b| {
        b.text().contains(&format!("*.hello.{ZONE}"))
    });
    let row = browser.script("return document.querySelector('#certificates tbody tr').textContent");
    let row = row.as_str().unwrap_or_default();
    for shown in [
        "hello",
        "files",
        "valid",
        "CN=revboot test CA",
        "2090-01-01 00:00:00 UTC",
        "when its files change",
    ] {
        assert!(row.contains(shown), "{shown}: {row}");
    }
    assert_eq!(
        browser.script("return document.querySelector('#certificates form') === null"),
        true
    );
    browser.screenshot(&shots.join("certificates.png"));

    // The overview with its figures.
    browser.open(&format!("{site}/"));
    browser.wait_until("the figures", |b| b.text().contains("DNS answers by rcode"));
    assert_eq!(
        browser.script("return document.querySelectorAll('svg.chart').length"),
        4
    );
    browser.screenshot(&shots.join("overview.png"));
    // The figures move without a reload: a boot shows in the caption of the open page.
    let caption = "return document.querySelector('#charts figcaption').textContent";
    let before = browser.script(caption);
    browser.script("window.notReloaded = true; return true");
    let v2_name = format!("{}.hello.{ZONE}", v2["short"].as_str().expect("short"));
    let v2_address = dig_ok(&daemon, &v2_name, false);
    assert!(curl(&v2_name, &v2_address, 8080).starts_with("hello from v2"));
    browser.wait_until("the boot counted on the open page", |b| {
        b.script(caption) != before
    });
    assert_eq!(browser.script("return window.notReloaded === true"), true);

    // A build's log, live: this recipe writes a line every fifth of a second until the
    // daemon stops (its shutdown kills the build), so the page is open while it runs.
    let ticker = hello_source(&temp.path().join("ticker"));
    std::fs::write(
        ticker.join("revboot.toml"),
        "[build]\ncommand = [\"sh\", \"-c\", \"i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.2; done\"]\nartifacts = [\"none\"]\ntimeout_secs = 600\n\n[run]\ntender = \"process\"\nport = 8080\n",
    )
    .expect("write revboot.toml");
    // One commit, so one build: the ticking one.
    git(&ticker, &["commit", "-q", "--amend", "-am", "tick forever"]);
    // The push waits for its builds: it runs in the background, ended with the daemon.
    let mut pushing = Command::new("git")
        .args(["push", "-q", &daemon.remote("ticker"), "main"])
        .current_dir(&ticker)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("git push");
    browser.open(&format!("{site}/builds"));
    browser.wait_until("the running build", |b| {
        b.open(&format!("{site}/builds"));
        b.text().contains("running")
            && b.script("return document.querySelector('#build-list tr.running a') !== null")
                == true
    });
    browser.click("#build-list tr.running a");
    browser.wait_until("ticks coming live", |b| {
        b.script("return document.getElementById('build-log').textContent")
            .as_str()
            .is_some_and(|t| t.contains("tick 3\n"))
    });
    browser.screenshot(&shots.join("build-live.png"));
    drop(browser);
    daemon.stop();
    let _ = pushing.kill();
    let _ = pushing.wait();
}

#[test]
fn public_reads_show_pages_without_write_forms() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon =
        Daemon::start_configured(&temp.path().join("data"), "[http]\npublic_reads = true\n");
    let work = hello_source(temp.path());
    push(&daemon, &work);
    let site = format!("http://{}", daemon.http);
    let (status, page) = curl_form(&[&format!("{site}/services/hello")]);
    assert_eq!(status, "200", "{page}");
    assert!(
        page.contains("History") && page.contains("read-only"),
        "{page}"
    );
    assert!(!page.contains("name=\"csrf\""), "{page}");
    let v1 = history(&daemon, "hello")[0]["revision"]
        .as_str()
        .expect("revision")
        .to_owned();
    let (status, page) = curl_form(&[&format!("{site}/services/hello/deployments/{v1}")]);
    assert_eq!(status, "200");
    assert!(!page.contains("boot-it"), "{page}");
    let (status, _) = curl_form(&[
        "--data",
        &format!("to={v1}"),
        &format!("{site}/services/hello/live"),
    ]);
    assert_eq!(status, "403");
}

#[test]
fn without_the_token_no_write_succeeds() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let work = hello_source(temp.path());
    push(&daemon, &work);
    commit_revision(&work, "v2", "hello");
    push(&daemon, &work);
    let deployments = history(&daemon, "hello");
    let v1 = deployments[1]["revision"]
        .as_str()
        .expect("revision")
        .to_owned();
    let site = format!("http://{}", daemon.http);
    let live_is_v2 = || history(&daemon, "hello")[0]["live"] == true;

    // A real session, to forge around.
    let jar = temp.path().join("cookies");
    let (csrf, _) = sign_in(&daemon, &jar, &format!("{site}/services/hello"));

    let to = format!("to={v1}");
    let move_live = format!("{site}/services/hello/live");
    let jar_text = jar.to_string_lossy().into_owned();
    let forged: [(&str, Vec<&str>); 5] = [
        ("no cookie, no token", vec!["--data", &to, &move_live]),
        (
            "no cookie, a guessed token",
            vec!["--data", &to, "--data", "csrf=00", &move_live],
        ),
        (
            "the cookie without the CSRF token",
            vec!["-b", &jar_text, "--data", &to, &move_live],
        ),
        (
            "a wrong cookie with the CSRF token",
            vec![
                "-b",
                "revboot_session=0123456789abcdef",
                "--data",
                &to,
                "--data-urlencode",
                &csrf,
                &move_live,
            ],
        ),
        (
            "the cookie and token from another site's page",
            vec![
                "-b",
                &jar_text,
                "-H",
                "Origin: http://evil.example",
                "--data",
                &to,
                "--data-urlencode",
                &csrf,
                &move_live,
            ],
        ),
    ];
    let csrf_field = format!("csrf={csrf}");
    for (what, mut args) in forged {
        for arg in &mut args {
            if *arg == csrf {
                *arg = &csrf_field;
            }
        }
        let (status, body) = curl_form(&args);
        assert_eq!(status, "403", "{what}: {body}");
        assert!(live_is_v2(), "{what} moved live");
    }
    let stop = curl_form(&[
        "--data",
        &format!("service=hello&revision={v1}"),
        &format!("{site}/instances/stop"),
    ]);
    assert_eq!(stop.0, "403");
    // The same form with the session's cookie and token goes through.
    let (status, _) = curl_form(&[
        "-b",
        &jar_text,
        "--data",
        &to,
        "--data-urlencode",
        &csrf_field,
        &move_live,
    ]);
    assert_eq!(status, "303");
    assert!(eventually(|| history(&daemon, "hello")[1]["live"] == true));
    let log = daemon.log();
    assert!(log.contains("dashboard write refused"), "{log}");
    assert!(!log.contains(&csrf), "a CSRF token reached the log");
    assert!(!log.contains(&daemon.token), "the token reached the log");
}

#[test]
fn a_per_client_revision_boots_from_its_page_for_the_client_given() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let work = hello_source(temp.path());
    let manifest = work.join("revboot.toml");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(&manifest, format!("{text}per_client = true\n")).expect("write manifest");
    git(&work, &["commit", "-q", "-am", "hello per client"]);
    push(&daemon, &work);
    let revision = history(&daemon, "hello")[0]["revision"]
        .as_str()
        .expect("revision")
        .to_owned();
    let page_url = format!(
        "http://{}/services/hello/deployments/{revision}",
        daemon.http
    );
    let jar = temp.path().join("cookies");
    let (csrf, page) = sign_in(&daemon, &jar, &page_url);
    assert!(page.contains("id=\"boot-client\""), "{page}");
    let jar = jar.to_string_lossy().into_owned();
    let boot = format!("{page_url}/boot");
    let csrf = format!("csrf={csrf}");

    // Not an address: refused, nothing boots.
    let bad = curl_form(&[
        "-b",
        &jar,
        "--data",
        &csrf,
        "--data",
        "client=not-an-address",
        &boot,
    ]);
    assert_eq!(bad.0, "400", "{bad:?}");
    assert!(bad.1.contains("is not a client address"), "{}", bad.1);
    assert!(daemon.instances().is_empty(), "{:?}", daemon.instances());

    // An address: that client's own instance, which the page then shows.
    let booted = curl_form(&[
        "-b",
        &jar,
        "--data",
        &csrf,
        "--data",
        "client=127.0.0.61",
        &boot,
    ]);
    assert_eq!(booted.0, "303", "{booted:?}");
    let instances = daemon.instances();
    assert!(
        instances.iter().any(|i| i["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.61"))),
        "{instances:?}"
    );
    let page = curl_form(&["-b", &jar, &page_url]);
    assert!(page.1.contains("for 127.0.0.61"), "{}", page.1);
}

#[test]
fn a_service_is_renamed_and_deleted_through_its_page_in_chromium() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let work = hello_source(temp.path());
    push(&daemon, &work);
    let site = format!("http://{}", daemon.http);
    let services = || -> Vec<String> {
        let output = daemon.cli(&["--json", "service", "list"]);
        let listed: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
        listed
            .as_array()
            .expect("a list")
            .iter()
            .map(|s| s["name"].as_str().expect("name").to_owned())
            .collect()
    };

    // Without a session, neither form does anything.
    for (path, body) in [
        ("rename", "to=greet&csrf=00"),
        ("delete", "deployments=remove&csrf=00"),
    ] {
        let (status, _) = curl_form(&["--data", body, &format!("{site}/services/hello/{path}")]);
        assert_eq!(status, "403");
    }
    assert_eq!(services(), ["hello"]);

    let browser = Browser::start();
    browser.open(&format!("{site}/services/hello"));
    browser.wait_until("the sign-in form", |b| b.url().contains("/login"));
    browser.type_into("#token", &daemon.token);
    browser.click("#sign-in");
    browser.wait_until("the service page", |b| {
        b.url().ends_with("/services/hello") && b.text().contains("Rename or delete")
    });

    // A bad name is refused with the reason, and nothing changes.
    browser.type_into("#rename-to", "Not_A_Name");
    browser.click("#rename");
    browser.wait_until("the refusal", |b| b.text().contains("That did not work"));
    let said = browser.text();
    assert!(said.contains("Not_A_Name"), "{said}");
    assert_eq!(services(), ["hello"]);

    // Renamed: the page of the new name, which DNS answers.
    browser.open(&format!("{site}/services/hello"));
    browser.wait_until("the service page", |b| {
        b.text().contains("Rename or delete")
    });
    browser.type_into("#rename-to", "greet");
    browser.click("#rename");
    browser.wait_until("the renamed service's page", |b| {
        b.url().contains("/services/greet") && b.text().contains("Renamed from hello")
    });
    assert_eq!(services(), ["greet"]);
    dig_ok(&daemon, &format!("greet.{ZONE}"), false);

    // Delete asks what becomes of the deployments; no choice, no delete.
    browser.click("#delete");
    browser.wait_until("the confirmation", |b| {
        b.text().contains("Yes, delete greet")
    });
    browser.screenshot(&screenshots().join("delete.png"));
    // The browser itself insists on a choice; without its check the daemon refuses too.
    browser.script("document.getElementById('keep').required = false; return true");
    browser.click("#confirm-delete");
    browser.wait_until("the refusal", |b| {
        b.text()
            .contains("Say whether the deployments are kept or removed")
    });
    assert_eq!(services(), ["greet"]);

    // Kept: gone from the services, its deployments under refs/revboot/deleted/.
    browser.open(&format!("{site}/services/greet/delete"));
    browser.wait_until("the confirmation", |b| {
        b.text().contains("Yes, delete greet")
    });
    browser.click("#keep");
    browser.click("#confirm-delete");
    browser.wait_until("the services", |b| b.text().contains("Deleted greet."));
    assert!(services().is_empty());
    let kept = run(Command::new("git")
        .arg("-C")
        .arg(daemon.data.join("deploy.git"))
        .args(["for-each-ref", "refs/revboot/deleted/greet/"]));
    assert!(!kept.stdout.is_empty(), "no kept refs");
}

/// Signs in with the daemon's token, cookies in `jar`; the CSRF token of `page` and its body.
fn sign_in(daemon: &Daemon, jar: &std::path::Path, page: &str) -> (String, String) {
    let signed = curl_form(&[
        "-c",
        &jar.to_string_lossy(),
        "--data-urlencode",
        &format!("token={}", daemon.token),
        &format!("http://{}/login", daemon.http),
    ]);
    assert_eq!(signed.0, "303", "{signed:?}");
    let (status, body) = curl_form(&["-b", &jar.to_string_lossy(), page]);
    assert_eq!(status, "200", "{body}");
    let csrf = body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF token in the page")
        .to_owned();
    (csrf, body)
}

/// curl with the arguments; (status, body).
fn curl_form(args: &[&str]) -> (String, String) {
    let output = run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').expect("a status line");
    (status.to_owned(), body.to_owned())
}

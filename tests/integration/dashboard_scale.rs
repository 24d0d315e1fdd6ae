//! The dashboard with a long history: 1,000 deployments of one service, written straight
//! into the deployment repository, are paged 50 at a time; and the figures of the issue
//! (page render time, console line → visible in the browser), measured by
//! `bench/dashboard.sh`, which runs the ignored test here in a release build.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use revboot_store::{BuildStatus, ImageInput, NewDeployment, Store};

use crate::browser::Browser;
use crate::support::{Daemon, PATIENCE, dig_ok, hello_source, history, push};

const DEPLOYMENTS: u32 = 1000;
/// Instances the instances page is measured with.
const INSTANCES: u32 = 200;
/// examples/hello's run table, under the artifact name the deployments use.
const HELLO: &str = "[build]\ncommand = [\"make\"]\nartifacts = [\"app\"]\n\n[run]\ntender = \"process\"\nport = 8080\nmemory_mib = 32\nready = { probe = \"socket\" }\nidle_timeout_secs = 600\n";
const MANIFEST: &str = "[build]\ncommand = [\"make\"]\nartifacts = [\"app\"]\n\n[run]\ntender = \"process\"\nport = 8080\n";

/// Writes `count` small deployments of `service` into the data directory's repository
/// (every tenth a failed build); their revisions, oldest first.
fn long_history(data: &Path, service: &str, count: u32) -> Vec<revboot_store::Revision> {
    history_of(data, service, count, None)
}

/// As [`long_history`], each with `image` (all succeeded) when given.
fn history_of(
    data: &Path,
    service: &str,
    count: u32,
    image: Option<&[u8]>,
) -> Vec<revboot_store::Revision> {
    std::fs::create_dir_all(data).expect("data dir");
    let store = Store::init(data.join("deploy.git")).expect("init the store");
    let mut revisions = Vec::new();
    for n in 0..count {
        let failed = image.is_none() && n % 10 == 9;
        let bytes = image.map_or_else(|| format!("image {n}").into_bytes(), <[u8]>::to_vec);
        let source = format!("{n:08x}").repeat(5);
        let subject = format!("change number {n} <of {count}>");
        let revision = store
            .write_deployment(NewDeployment {
                service,
                status: if failed {
                    BuildStatus::Failed
                } else {
                    BuildStatus::Succeeded
                },
                manifest: Some(if image.is_some() { HELLO } else { MANIFEST }),
                images: if failed {
                    Vec::new()
                } else {
                    vec![ImageInput {
                        name: "app".into(),
                        reader: Box::new(std::io::Cursor::new(bytes)),
                    }]
                },
                build_log: format!("build {n}\n").as_bytes(),
                source_commit: &source,
                source_repo: service,
                source_ref: Some("refs/heads/main"),
                subject: &subject,
            })
            .expect("write a deployment");
        revisions.push(revision);
    }
    revisions
}

/// A plain HTTP/1.1 GET with a cookie; (status, body).
fn get(daemon: &Daemon, path: &str, cookie: &str) -> (u16, String) {
    request(daemon, "GET", path, &format!("Cookie: {cookie}"), "")
}

/// A plain HTTP/1.1 request with one header line and a body; (status, body).
fn request(daemon: &Daemon, method: &str, path: &str, header: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(daemon.http).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\n{header}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        daemon.http,
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// Signs in over HTTP; the session cookie (`name=value`).
fn sign_in(daemon: &Daemon) -> String {
    let mut stream = TcpStream::connect(daemon.http).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let body = format!("token={}&next=%2F", daemon.token);
    write!(
        stream,
        "POST /login HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        daemon.http,
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    answer
        .lines()
        .find_map(|line| line.strip_prefix("set-cookie: "))
        .and_then(|cookie| cookie.split(';').next())
        .unwrap_or_else(|| panic!("no session cookie: {answer}"))
        .to_owned()
}

#[test]
fn a_thousand_deployments_are_paged_fifty_at_a_time() {
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("data");
    long_history(&data, "long", DEPLOYMENTS);
    let daemon = Daemon::start(&data);
    let cookie = sign_in(&daemon);

    let (status, first) = get(&daemon, "/services/long", &cookie);
    assert_eq!(status, 200, "{first}");
    assert_eq!(first.matches("<tr class=").count(), 50);
    assert!(first.contains("Page 1 of 20 (1000 deployments)"), "{first}");
    assert!(first.contains("change number 999 &#60;of 1000&#62;"));
    assert!(first.contains("/services/long?page=2"));
    let (status, last) = get(&daemon, "/services/long?page=20", &cookie);
    assert_eq!(status, 200);
    assert_eq!(last.matches("<tr class=").count(), 50);
    assert!(last.contains("change number 0 &#60;of 1000&#62;"));
    // Past the end: the last page, not an error.
    let (status, beyond) = get(&daemon, "/services/long?page=99", &cookie);
    assert_eq!(status, 200);
    assert!(beyond.contains("Page 20 of 20"));
    // Not signed in: the sign-in page, nothing of the history.
    let (status, _) = get(&daemon, "/services/long", "revboot_session=none");
    assert_eq!(status, 303);
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
        * 1000.0
}

/// The figures, printed (never asserted): the history page of a service with
/// 1,000 deployments, rendered by the daemon (p50, p90 over 50 requests, the API's JSON of
/// the same history beside it), and the time from an instance writing a console line to
/// the line being in the page of a headless Chromium (p50, p90 over 30 lines).
#[test]
#[ignore = "a benchmark: bench/dashboard.sh runs it in a release build"]
#[allow(clippy::print_stdout)]
fn dashboard_figures() {
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("data");
    long_history(&data, "long", DEPLOYMENTS);
    let image = std::fs::read(revboot_testkit::hello_image()).expect("the hello image");
    let many = history_of(&data, "many", INSTANCES, Some(&image));
    let daemon = Daemon::start_configured(&data, "[instances]\nmax_per_service = 256\n");
    let cookie = sign_in(&daemon);
    let mut page = Vec::new();
    let mut api = Vec::new();
    let bearer = format!("Authorization: Bearer {}", daemon.token);
    for _ in 0..50 {
        let started = Instant::now();
        let (status, _) = get(&daemon, "/services/long", &cookie);
        page.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 200);
        let started = Instant::now();
        let (status, _) = request(
            &daemon,
            "GET",
            "/api/v1/services/long/deployments",
            &bearer,
            "",
        );
        api.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 200);
    }
    println!(
        "history page, {DEPLOYMENTS} deployments: p50 {:.1} ms, p90 {:.1} ms (the API's JSON of the same history: p50 {:.1} ms, p90 {:.1} ms)",
        percentile(&mut page, 0.5),
        percentile(&mut page, 0.9),
        percentile(&mut api, 0.5),
        percentile(&mut api, 0.9),
    );

    // 200 instances running: the instances page (100 a page) beside the API's list.
    for revision in &many {
        let body = format!("{{\"label\": \"{revision}\"}}");
        let (status, answer) = request(
            &daemon,
            "POST",
            "/api/v1/services/many/summon",
            &bearer,
            &body,
        );
        assert_eq!(status, 200, "{answer}");
    }
    let (mut page, mut api) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let started = Instant::now();
        let (status, body) = get(&daemon, "/instances", &cookie);
        page.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 200);
        assert!(body.contains(&format!("({INSTANCES} instances)")), "{body}");
        let started = Instant::now();
        let (status, _) = request(&daemon, "GET", "/api/v1/instances", &bearer, "");
        api.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 200);
    }
    println!(
        "instances page, {INSTANCES} running: p50 {:.1} ms, p90 {:.1} ms (the API's JSON list: p50 {:.1} ms, p90 {:.1} ms)",
        percentile(&mut page, 0.5),
        percentile(&mut page, 0.9),
        percentile(&mut api, 0.5),
        percentile(&mut api, 0.9),
    );

    let work = hello_source(temp.path());
    push(&daemon, &work);
    let revision = history(&daemon, "hello")[0]["revision"]
        .as_str()
        .expect("revision")
        .to_owned();
    let name = format!("{}.hello.revboot.test", &revision[..7]);
    let address = dig_ok(&daemon, &name, false);
    let browser = Browser::start();
    let site = format!("http://{}", daemon.http);
    browser.open(&format!("{site}/login"));
    browser.type_into("#token", &daemon.token);
    browser.click("#sign-in");
    browser.wait_until("signed in", |b| b.text().contains("Services"));
    browser.open(&format!("{site}/services/hello/deployments/{revision}"));
    browser.wait_until("the live console", |b| {
        b.script("return document.getElementById('live-console').textContent")
            .as_str()
            .is_some_and(|t| t.contains("hello v1 ready"))
    });
    // The page notes (Date.now(), the same clock as the test's) when each marker appears.
    browser.script(
        "window.seen = {}; const c = document.getElementById('live-console');
         new MutationObserver(() => { const t = c.textContent;
           for (const m of (t.match(/mark-[0-9]+/g) || [])) if (!(m in window.seen)) window.seen[m] = Date.now();
         }).observe(c, {childList: true, subtree: true, characterData: true});
         return true;",
    );
    let mut latency = Vec::new();
    for n in 0..30 {
        let marker = format!("mark-{n}");
        let sent = unix_ms();
        let mut stream = TcpStream::connect((address.as_str(), 8080)).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        write!(stream, "GET /{marker} HTTP/1.1\r\nHost: {name}\r\n\r\n").expect("send");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        let mut seen = None;
        let deadline = Instant::now() + PATIENCE;
        while seen.is_none() && Instant::now() < deadline {
            seen = browser
                .script(&format!("return window.seen['{marker}'] || null"))
                .as_f64();
            std::thread::sleep(Duration::from_millis(5));
        }
        let seen = seen.unwrap_or_else(|| panic!("{marker} never appeared"));
        latency.push(seen - sent);
    }
    println!(
        "console line → visible in Chromium: p50 {:.0} ms, p90 {:.0} ms (30 lines; the page clock has 1 ms steps)",
        percentile(&mut latency, 0.5),
        percentile(&mut latency, 0.9),
    );
}

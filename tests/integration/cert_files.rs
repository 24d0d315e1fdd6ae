//! Certificates from files for services that end TLS at the front door
//! (`[tls.services.<name>]`), and the rules every file certificate follows: a change is
//! taken without a restart (polled, or at once on SIGHUP), a bad file is reported and not
//! served, a certificate that expires while served is withdrawn and reported.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::https::{TestCa, certificate_in, curl_resolved, says, write_atomically};
use crate::support::{Daemon, eventually, git, hello_source, history, push, write_manifest};

const ZONE: &str = "revboot.test";

/// Unix seconds now.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

impl TestCa {
    /// A certificate for `names` valid from an hour ago for `seconds` more, written to
    /// `cert` and `key`.
    pub fn issue_short(&self, names: &[&str], seconds: u64, cert: &Path, key: &Path) {
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let now = unix_now();
        self.issue_with(names, cert, key, |params| {
            params.not_before = epoch + std::time::Duration::from_secs(now - 3600);
            params.not_after = epoch + std::time::Duration::from_secs(now + seconds);
        });
    }
}

/// The end of validity of the certificate presented for `name` at `at` (openssl's
/// `notAfter=…`), or openssl's complaint when the handshake fails.
fn presented(at: std::net::SocketAddr, name: &str) -> String {
    let shown = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {at} -servername {name} </dev/null 2>&1 \
             | openssl x509 -noout -enddate 2>/dev/null || true"
        ))
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    String::from_utf8_lossy(&shown.stdout).trim().to_owned()
}

/// Certificate `id` as `revboot certs --json` shows it (over `url`, with `options`).
fn cert_status(
    daemon: &Daemon,
    url: &str,
    options: &[&std::ffi::OsStr],
    id: &str,
) -> serde_json::Value {
    let output = daemon.cli_at(url, options, &["--json", "certs"]);
    let Ok(view) = serde_json::from_slice::<serde_json::Value>(&output.stdout) else {
        return serde_json::Value::Null;
    };
    certificate_in(&view, id)
}

/// Sends SIGHUP to the daemon.
fn hup(daemon: &Daemon) {
    let sent = Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
}

/// Waits until the daemon says it withdrew a certificate whose validity ended.
fn wait_for_withdrawal(daemon: &Daemon) {
    let said = || {
        daemon
            .log()
            .contains("certificate expired: no longer served")
    };
    assert!(eventually(said), "{}", daemon.log());
}

#[test]
fn a_service_certificate_from_files_is_presented_at_the_front_door_and_withdrawn_when_it_expires() {
    let temp = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new(temp.path());
    let (cert, key) = (temp.path().join("hello.pem"), temp.path().join("hello.key"));
    let hello_names = [&*format!("*.hello.{ZONE}"), &*format!("hello.{ZONE}")];
    ca.issue(&hello_names, (2000, 2090), &cert, &key);
    let config = format!(
        "[front]\ntls = \"127.0.0.1:0\"\n[tls]\nreload_ms = 100\n\
         [tls.services.hello]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let daemon = Daemon::start_configured(&temp.path().join("data"), &config);
    let front = daemon.front("front_tls=");
    let url = format!("http://{}", daemon.http);
    let status = |id: &str| cert_status(&daemon, &url, &[], id);

    let work = hello_source(temp.path());
    write_manifest(&work, "reach = \"front\"\ntls = \"terminate\"\n");
    git(
        &work,
        &["commit", "-q", "-am", "TLS ended at the front door"],
    );
    push(&daemon, &work);
    let hello = status("hello");
    assert_eq!(hello["source"], "files", "{hello}");
    assert_eq!(hello["state"], "valid", "{hello}");
    assert!(says(&hello, "issuer", "revboot test CA"), "{hello}");
    // The revision's name and the service's, verified with the test's CA.
    let short = history(&daemon, "hello")[0]["short"]
        .as_str()
        .expect("short")
        .to_owned();
    let revision = format!("{short}.hello.{ZONE}");
    for name in [&revision, &format!("hello.{ZONE}")] {
        let (ok, said) = curl_resolved(front, name, &ca.pem, "/");
        assert!(
            ok && said.contains("hello from"),
            "{name}: {said}\n{}",
            daemon.log()
        );
    }

    // A new pair of files is presented from the next handshake.
    ca.issue(&hello_names, (2000, 2080), &cert, &key);
    assert!(
        eventually(|| presented(front, &revision).contains("2080")),
        "{}",
        daemon.log()
    );
    // Tampered, expired, or for names of another service: reported, and the one served stays.
    let mut tampered = std::fs::read(&cert).expect("read cert");
    let at = tampered.len() / 2;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    write_atomically(&cert, &tampered);
    assert!(eventually(|| status("hello")["error"].is_string()));
    ca.issue(&hello_names, (2000, 2001), &cert, &key);
    assert!(eventually(|| says(&status("hello"), "error", "expired")));
    ca.issue(&[&format!("*.other.{ZONE}")], (2000, 2090), &cert, &key);
    assert!(eventually(|| says(
        &status("hello"),
        "error",
        "covers no name of hello.revboot.test"
    )));
    assert_eq!(status("hello")["state"], "valid");
    assert!(presented(front, &revision).contains("2080"));
    assert!(curl_resolved(front, &revision, &ca.pem, "/").0);

    // A certificate that lives 20 s: loaded, then withdrawn when it ends (the withdrawal is
    // only ever logged for a certificate that was served). The client is then refused the
    // handshake (rustls' access_denied alert), never shown the certificate of another name.
    ca.issue_short(&hello_names, 20, &cert, &key);
    wait_for_withdrawal(&daemon);
    let hello = status("hello");
    assert_eq!(hello["state"], "failed", "{hello}");
    assert!(says(&hello, "error", "no longer served"), "{hello}");
    let (ok, said) = curl_resolved(front, &revision, &ca.pem, "/");
    assert!(!ok, "{said}");
    assert!(said.contains("alert access denied"), "{said}");
    let metrics = daemon.metrics();
    assert!(
        !metrics.contains("revboot_certificate_expiry_timestamp_seconds{certificate=\"hello\""),
        "{metrics}"
    );

    // A good pair again: served again, no restart.
    ca.issue(&hello_names, (2000, 2090), &cert, &key);
    assert!(eventually(
        || curl_resolved(front, &revision, &ca.pem, "/").0
    ));
    assert_eq!(status("hello")["state"], "valid");
    daemon.stop();
}

#[test]
fn sighup_loads_certificate_files_at_once_and_an_expired_https_certificate_is_withdrawn() {
    let temp = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new(temp.path());
    let (cert, key) = (temp.path().join("cert.pem"), temp.path().join("key.pem"));
    let (hello, hello_key) = (temp.path().join("hello.pem"), temp.path().join("hello.key"));
    ca.issue(&["127.0.0.1"], (2000, 2090), &cert, &key);
    ca.issue(
        &[&format!("hello.{ZONE}")],
        (2000, 2090),
        &hello,
        &hello_key,
    );
    // Polled once an hour: within this test, only SIGHUP (or an end of validity) makes the
    // daemon look at the files.
    let config = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nreload_ms = 3600000\n\
         [tls.services.hello]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display(),
        hello.display(),
        hello_key.display()
    );
    let daemon = Daemon::start_configured(&temp.path().join("data"), &config);
    let url = format!("https://{}", daemon.http);
    let ca_option = [std::ffi::OsStr::new("--ca"), ca.pem.as_os_str()];
    let status = |id: &str| cert_status(&daemon, &url, &ca_option, id);
    // The year of the end of validity (each one here ends on a 1 January).
    let year = |id: &str| {
        (status(id)["not_after_ms"].as_i64().unwrap_or_default() / 1000 + 2 * 86_400) / 31_557_600
            + 1970
    };
    assert_eq!(year("_daemon"), 2090);
    assert_eq!(year("hello"), 2090);

    ca.issue(&["127.0.0.1"], (2000, 2080), &cert, &key);
    ca.issue(
        &[&format!("hello.{ZONE}")],
        (2000, 2070),
        &hello,
        &hello_key,
    );
    hup(&daemon);
    assert!(
        eventually(|| year("_daemon") == 2080 && year("hello") == 2070),
        "{}",
        daemon.log()
    );
    assert!(
        daemon
            .log()
            .contains("SIGHUP: certificate files loaded again")
    );

    // The daemon's own certificate, 20 s long: withdrawn when it ends (the watcher looks
    // then, not an hour later), and HTTPS clients are refused the handshake.
    ca.issue_short(&["127.0.0.1"], 20, &cert, &key);
    hup(&daemon);
    wait_for_withdrawal(&daemon);
    let (ok, said) = curl_resolved(daemon.http, "127.0.0.1", &ca.pem, "/api/v1/daemon");
    assert!(!ok && said.contains("alert access denied"), "{said}");
    // A good one again: served at the next SIGHUP.
    ca.issue(&["127.0.0.1"], (2000, 2090), &cert, &key);
    hup(&daemon);
    assert!(eventually(|| year("_daemon") == 2090), "{}", daemon.log());
    daemon.stop();
}

#[test]
fn sighup_without_certificate_files_leaves_the_daemon_serving() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    hup(&daemon);
    assert!(
        eventually(|| daemon
            .log()
            .contains("SIGHUP: no certificate files to load")),
        "{}",
        daemon.log()
    );
    let listed = daemon.cli(&["service", "list"]);
    assert!(listed.status.success(), "{listed:?}");
    daemon.stop();
}

//! HTTPS with certificates from files: stock git pushes over https, curl and the CLI verify
//! the daemon with a CA of the test's, a new certificate is taken without a restart, and a
//! bad one is reported and never served.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::{
    Daemon, TOKEN, commit_revision, eventually, hello_source, run, serve_refused,
};

/// A test CA and certificates it signs, written as PEM files.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA's certificate.
    pub pem: PathBuf,
}

impl TestCa {
    /// A new CA, its certificate written to `dir/ca.pem`.
    pub fn new(dir: &Path) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "revboot test CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed");
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, cert.pem()).expect("write ca.pem");
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate for `names` (DNS names or IP addresses), valid over the years given,
    /// written to `cert` and `key`.
    pub fn issue(&self, names: &[&str], years: (i32, i32), cert: &Path, key: &Path) {
        self.issue_with(names, cert, key, |params| {
            params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
            params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
        });
    }

    /// A certificate for `names`, its parameters set by `set`, written to `cert` and `key`.
    pub fn issue_with(
        &self,
        names: &[&str],
        cert: &Path,
        key: &Path,
        set: impl FnOnce(&mut rcgen::CertificateParams),
    ) {
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("names");
        set(&mut params);
        let pair = rcgen::KeyPair::generate().expect("key");
        let signed = params.signed_by(&pair, &self.issuer).expect("sign");
        write_atomically(cert, signed.pem().as_bytes());
        write_atomically(key, pair.serialize_pem().as_bytes());
    }
}

/// Writes a file as a certificate tool does, whole or not at all (write then rename): the
/// daemon polls these files and must never be shown a half-written one by the test.
pub fn write_atomically(path: &Path, bytes: &[u8]) {
    let next = path.with_extension("next");
    std::fs::write(&next, bytes).expect("write");
    std::fs::rename(&next, path).expect("rename");
}

/// curl over https to `name` at `at` (`--resolve`), verified with `ca`, with the token:
/// (success, the body then curl's complaint).
pub fn curl_resolved(
    at: std::net::SocketAddr,
    name: &str,
    ca: &Path,
    path: &str,
) -> (bool, String) {
    let output = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "30", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{name}:{}:{}", at.port(), at.ip())])
        .args(["-H", &format!("authorization: Bearer {TOKEN}")])
        .arg(format!("https://{name}:{}{path}", at.port()))
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// `curl` over https to the daemon, verified with `ca`; (exit success, body).
fn curl_https(daemon: &Daemon, ca: &Path, path: &str) -> (bool, String) {
    curl_resolved(daemon.http, &daemon.http.ip().to_string(), ca, path)
}

/// Certificate `id` of a daemon's view (`GET /api/v1/daemon`, `revboot certs --json`);
/// null when it has none such.
pub fn certificate_in(view: &serde_json::Value, id: &str) -> serde_json::Value {
    view["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|cert| cert["id"] == id)
        .cloned()
        .unwrap_or_default()
}

/// Whether the string `field` of `value` contains `text`.
pub fn says(value: &serde_json::Value, field: &str, text: &str) -> bool {
    value[field]
        .as_str()
        .is_some_and(|said| said.contains(text))
}

/// The end of validity of the certificate the daemon presents, as openssl reads it.
fn served_not_after(daemon: &Daemon) -> String {
    let shown = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {} </dev/null 2>/dev/null | openssl x509 -noout -enddate",
            daemon.http
        ))
        .output()
        .expect("run openssl");
    String::from_utf8_lossy(&shown.stdout).trim().to_owned()
}

/// The daemon's certificate status, as `revboot certs --json` prints it over HTTPS.
fn certs(daemon: &Daemon, ca: &Path) -> serde_json::Value {
    let output = daemon.cli_https(ca, &["--json", "certs"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let view: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    view["certificates"][0].clone()
}

impl Daemon {
    /// Runs the CLI against this daemon over https, verified with `ca`.
    pub fn cli_https(&self, ca: &Path, args: &[&str]) -> std::process::Output {
        let url = format!("https://{}", self.http);
        self.cli_at(&url, &["--ca".as_ref(), ca.as_os_str()], args)
    }
}

#[test]
fn https_carries_git_the_api_and_metrics_and_takes_a_new_certificate_without_a_restart() {
    let temp = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new(temp.path());
    let (cert, key) = (temp.path().join("cert.pem"), temp.path().join("key.pem"));
    ca.issue(&["127.0.0.1", "localhost"], (2000, 2090), &cert, &key);
    let config = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nreload_ms = 100\n",
        cert.display(),
        key.display()
    );
    let daemon = Daemon::start_configured(&temp.path().join("data"), &config);

    // Stock git pushes over https, verifying with the CA.
    let work = hello_source(temp.path());
    let remote = format!("https://git:{TOKEN}@{}/git/hello.git", daemon.http);
    let pushed = run(Command::new("git")
        .args(["push", &remote, "main"])
        .env("GIT_SSL_CAINFO", &ca.pem)
        .current_dir(&work));
    assert!(
        String::from_utf8_lossy(&pushed.stderr).contains("hello"),
        "{pushed:?}"
    );
    // Without the CA, git refuses the daemon.
    let refused = Command::new("git")
        .args(["push", &remote, "main"])
        .env("GIT_SSL_CAINFO", temp.path().join("no-such-ca.pem"))
        .env("GIT_SSL_CAPATH", temp.path())
        .current_dir(&work)
        .stdin(Stdio::null())
        .output()
        .expect("run git");
    assert!(!refused.status.success());

    // After `revboot --ca … login`, stock git with nothing but PATH and a private HOME
    // pushes to the URL without a token: the CA and the token both come from the login.
    let home = temp.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let bare = |program: &str| {
        let mut command = Command::new(program);
        command
            .current_dir(&work)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").expect("PATH"))
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("GIT_CONFIG_GLOBAL", home.join(".gitconfig"))
            .env("GIT_TERMINAL_PROMPT", "0");
        command
    };
    let url = format!("https://{}", daemon.http);
    let mut login = bare(env!("CARGO_BIN_EXE_revboot"));
    login
        .arg("--ca")
        .arg(&ca.pem)
        .args(["login", &url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = login.spawn().expect("revboot login");
    {
        use std::io::Write as _;
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(TOKEN.as_bytes()).expect("token");
    }
    let logged = child.wait_with_output().expect("revboot login ends");
    assert!(logged.status.success(), "{logged:?}");
    commit_revision(&work, "v2", "hello");
    let pushed = bare("git")
        .args(["push", &format!("{url}/git/hello.git"), "main"])
        .stdin(Stdio::null())
        .output()
        .expect("git push");
    let said = String::from_utf8_lossy(&pushed.stderr);
    assert!(pushed.status.success(), "{said}");
    assert!(said.contains("now answers with"), "{said}");

    // The API, /metrics and the dashboard over https.
    let (ok, builds) = curl_https(&daemon, &ca.pem, "/api/v1/builds");
    assert!(ok && builds.contains("\"service\":\"hello\""), "{builds}");
    let (ok, metrics) = curl_https(&daemon, &ca.pem, "/metrics");
    assert!(ok, "{metrics}");
    assert!(
        metrics.contains(
            "revboot_certificate_issued_total{certificate=\"_daemon\",source=\"files\"} 1"
        ),
        "{metrics}"
    );
    // The dashboard answers (its sign-in, without a session), and its session cookie is
    // `Secure`: a browser never sends it over plain http.
    let (ok, page) = curl_https(&daemon, &ca.pem, "/");
    assert!(ok, "{page}");
    let sign_in = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "--cacert",
        ])
        .arg(&ca.pem)
        .args(["--data-urlencode", &format!("token={TOKEN}")])
        .arg(format!("https://{}/login", daemon.http))
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let headers = String::from_utf8_lossy(&sign_in.stdout).to_ascii_lowercase();
    let cookie = headers
        .lines()
        .find(|line| line.starts_with("set-cookie: revboot_session="))
        .unwrap_or_else(|| panic!("no session cookie: {headers}"));
    assert!(
        cookie.contains("; secure") && cookie.contains("; httponly"),
        "{cookie}"
    );
    // Plain http on the same port is no longer answered as HTTP.
    let plain = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{}/api/v1/services", daemon.http))
        .output()
        .expect("run curl");
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("hello"));

    // The CLI verifies with --ca; without it, the daemon's certificate is refused and the
    // CLI says so rather than reading the data directory behind the daemon's back.
    let listed = certs(&daemon, &ca.pem);
    assert_eq!(listed["state"], "valid", "{listed}");
    assert_eq!(listed["source"], "files", "{listed}");
    let untrusted = daemon
        .command(env!("CARGO_BIN_EXE_revboot"))
        .args(["--url", &format!("https://{}", daemon.http), "log", "hello"])
        .args(["--data", &daemon.data.to_string_lossy()])
        .env("REVBOOT_TOKEN", TOKEN)
        .env("XDG_CONFIG_HOME", daemon.data.with_extension("config"))
        .env_remove("REVBOOT_CA")
        .stdin(Stdio::null())
        .output()
        .expect("run revboot");
    assert!(!untrusted.status.success());
    let said = String::from_utf8_lossy(&untrusted.stderr);
    assert!(said.contains("TLS") && said.contains("--ca"), "{said}");

    // A service name no certificate authority would issue *.<service>.<zone> for.
    let refused = daemon.cli_https(&ca.pem, &["service", "add", "ab--cd"]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("no certificate authority"), "{said}");

    // A new certificate in the files is served at the next handshake.
    let before = served_not_after(&daemon);
    assert!(before.contains("2090"), "{before}");
    ca.issue(&["127.0.0.1", "localhost"], (2000, 2080), &cert, &key);
    assert!(
        eventually(|| served_not_after(&daemon).contains("2080")),
        "the new certificate is not served; log:\n{}",
        daemon.log()
    );
    assert!(eventually(|| certs(&daemon, &ca.pem)["issued"] == 2));

    // A tampered file is refused, reported, and the certificate served stays.
    let mut tampered = std::fs::read(&cert).expect("read cert");
    let at = tampered.len() / 2;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    write_atomically(&cert, &tampered);
    assert!(
        eventually(|| certs(&daemon, &ca.pem)["error"].is_string()),
        "the tampered file is not reported"
    );
    assert!(served_not_after(&daemon).contains("2080"));
    assert!(daemon.log().contains("certificate file refused"));
    let shown = daemon.cli_https(&ca.pem, &["certs"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("certificate daemon (files): valid"),
        "{shown}"
    );
    // (A failure may have come before, from the new certificate seen beside the old key.)
    assert!(shown.contains("failure(s)"), "{shown}");
    // An expired one too.
    ca.issue(&["127.0.0.1"], (2000, 2001), &cert, &key);
    assert!(eventually(|| {
        certs(&daemon, &ca.pem)["error"]
            .as_str()
            .is_some_and(|error| error.contains("expired"))
    }));
    assert!(served_not_after(&daemon).contains("2080"));
    daemon.stop();
}

#[test]
fn an_expired_certificate_file_stops_the_start_with_an_error_that_names_it() {
    let temp = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new(temp.path());
    let (cert, key) = (temp.path().join("cert.pem"), temp.path().join("key.pem"));
    ca.issue(&["127.0.0.1"], (2000, 2001), &cert, &key);
    let config = temp.path().join("revbootd.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .expect("write config");
    let (status, stderr) = serve_refused(&config, &temp.path().join("data"), "127.89.251.0/24");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(&cert.display().to_string()), "{stderr}");
    assert!(stderr.contains("expired"), "{stderr}");
}

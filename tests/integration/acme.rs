//! Certificates by ACME from pebble (the ACME test server, Debian's package), which checks
//! every DNS-01 challenge by asking revboot's own DNS server: the daemon's certificate and
//! a service wildcard; stock git over https and curl to a revision's name at the front door,
//! verified with pebble's root; a CA that refuses, or is down, is retried with backoff and
//! reported while what is served stays; a short lifetime is renewed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::https::TestCa;
use crate::support::{
    Daemon, Setup, TOKEN, eventually, fresh_pool, git, hello_source, run, write_manifest,
};

const ZONE: &str = "revboot.test";

/// A pebble process on `address` (ACME on port 14000, management on 15000), resolving
/// through `dns`; killed when dropped.
struct Pebble {
    child: Child,
    address: String,
    tls_ca: PathBuf,
}

impl Pebble {
    /// Starts pebble; `validity`: the lifetime of the certificates it issues, in seconds;
    /// `refuse`: it refuses every request (each nonce is "bad").
    fn start(
        dir: &Path,
        ca: &TestCa,
        address: &str,
        dns: SocketAddr,
        validity: u64,
        refuse: bool,
    ) -> Pebble {
        let (cert, key) = (dir.join("pebble.pem"), dir.join("pebble.key"));
        ca.issue(&[address, "localhost"], (2000, 2090), &cert, &key);
        let config = dir.join(format!("pebble-{validity}-{refuse}.json"));
        let text = serde_json::json!({
            "pebble": {
                "listenAddress": format!("{address}:14000"),
                "managementListenAddress": format!("{address}:15000"),
                "certificate": cert,
                "privateKey": key,
                // Ports of http-01 and tls-alpn-01 checks, which DNS-01 never makes.
                "httpPort": 5002,
                "tlsPort": 5001,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity,
            }
        });
        std::fs::write(&config, text.to_string()).expect("write pebble config");
        let log = std::fs::File::create(dir.join(format!("pebble-{validity}-{refuse}.log")))
            .expect("log");
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&config)
            .args(["-dnsserver", &dns.to_string()])
            // No random wait before each check, and no nonce refused at random (or all).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", if refuse { "100" } else { "0" })
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start pebble (apt-get install pebble)");
        let pebble = Pebble {
            child,
            address: address.to_owned(),
            tls_ca: ca.pem.clone(),
        };
        assert!(
            eventually(|| pebble.get(14000, "/dir").is_some()),
            "pebble does not answer"
        );
        pebble
    }

    /// A GET of pebble's (verified with the test CA), if it answers.
    fn get(&self, port: u16, path: &str) -> Option<String> {
        let at = SocketAddr::new(self.address.parse().expect("an address"), port);
        curl_name("localhost", at, &self.tls_ca, path)
    }

    /// The root its certificates chain to (a new one at every start), written to `path`.
    fn root(&self, path: &Path) -> PathBuf {
        let pem = self.get(15000, "/roots/0").expect("pebble's root");
        std::fs::write(path, pem).expect("write root");
        path.to_owned()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl over https to `name` at `at`, verified with `root`; the body, if it answered.
fn curl_name(name: &str, at: SocketAddr, root: &Path, path: &str) -> Option<String> {
    let (ok, body) = crate::https::curl_resolved(at, name, root, path);
    ok.then_some(body)
}

/// The status of certificate `id`, as the API shows it over https.
fn certificate(daemon: &Daemon, root: &Path, id: &str) -> serde_json::Value {
    let Some(text) = curl_name(ZONE, daemon.http, root, "/api/v1/daemon") else {
        return serde_json::Value::Null;
    };
    let view: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    crate::https::certificate_in(&view, id)
}

/// Adds a service through the API over https.
fn add_service(daemon: &Daemon, root: &Path, name: &str) {
    run(Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "30", "--cacert"])
        .arg(root)
        .args([
            "--resolve",
            &format!("{ZONE}:{}:{}", daemon.http.port(), daemon.http.ip()),
        ])
        .args(["-H", &format!("authorization: Bearer {TOKEN}")])
        .args(["-H", "content-type: application/json"])
        .args(["-d", &format!("{{\"name\":\"{name}\"}}")])
        .arg(format!(
            "https://{ZONE}:{}/api/v1/services",
            daemon.http.port()
        )));
}

/// A daemon whose certificates come from pebble, serving hello with TLS ended at the front
/// door.
struct Served {
    pebble: Pebble,
    pebble_address: String,
    dns: SocketAddr,
    daemon: Daemon,
    /// Pebble's root.
    root: PathBuf,
    front: SocketAddr,
    /// hello's deployment, as its DNS label.
    short: String,
}

/// Pebble, and a daemon that gets its own certificate and hello's from it; hello pushed with
/// stock git over https to the daemon's name, ending TLS at the front door.
fn serve_hello_over_tls(temp: &Path, ca: &TestCa) -> Served {
    // DNS and pebble on addresses of this test's own loopback /24, at fixed ports.
    let pool = fresh_pool();
    let base = pool.trim_end_matches(".0/24");
    let dns: SocketAddr = format!("{base}.253:5353").parse().expect("address");
    let pebble_address = format!("{base}.252");
    let pebble = Pebble::start(temp, ca, &pebble_address, dns, 157_766_400, false);
    let root = pebble.root(&temp.join("root-a.pem"));
    let config = format!(
        "[front]\ntls = \"127.0.0.1:0\"\n[tls]\nacme = true\n[acme]\n\
         directory = \"https://{pebble_address}:14000/dir\"\nca = \"{}\"\n\
         check_ms = 200\nretry_min_ms = 500\nretry_max_ms = 4000\n",
        ca.pem.display()
    );
    let daemon = Daemon::start_setup(
        &temp.join("data"),
        &Setup {
            config: &config,
            dns: Some(dns),
            pools: &[&pool],
            ..Setup::default()
        },
    );
    let front = daemon.front("front_tls=");

    // The daemon's own certificate, for the zone's name.
    assert!(
        eventually(|| certificate(&daemon, &root, "_daemon")["state"] == "valid"),
        "no certificate for the daemon; log:\n{}",
        daemon.log()
    );
    // Stock git pushes over https to the daemon's name; the service ends TLS at the front.
    let work = hello_source(temp);
    write_manifest(&work, "reach = \"front\"\ntls = \"terminate\"\n");
    git(
        &work,
        &["commit", "-q", "-am", "served over TLS at the front door"],
    );
    let port = daemon.http.port();
    run(Command::new("git")
        .args([
            "-c",
            &format!("http.curloptResolve={ZONE}:{port}:127.0.0.1"),
        ])
        .args([
            "push",
            &format!("https://git:{TOKEN}@{ZONE}:{port}/git/hello.git"),
            "main",
        ])
        .env("GIT_SSL_CAINFO", &root)
        .current_dir(&work));
    assert!(
        eventually(|| certificate(&daemon, &root, "hello")["state"] == "valid"),
        "no certificate for hello; log:\n{}",
        daemon.log()
    );
    let deployments = curl_name(
        ZONE,
        daemon.http,
        &root,
        "/api/v1/services/hello/deployments",
    )
    .expect("deployments");
    let deployments: serde_json::Value = serde_json::from_str(&deployments).expect("JSON");
    let short = deployments[0]["short"].as_str().expect("short").to_owned();
    Served {
        pebble,
        pebble_address,
        dns,
        daemon,
        root,
        front,
        short,
    }
}

#[test]
fn pebble_issues_through_revboots_own_dns_and_revisions_are_served_over_https_at_the_front_door() {
    let temp = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new(temp.path());
    let Served {
        pebble,
        pebble_address,
        dns,
        daemon,
        root,
        front,
        short,
    } = serve_hello_over_tls(temp.path(), &ca);

    // The keys are the daemon's alone, and never logged.
    let key = daemon.data.join("tls/_daemon.key");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&key).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    let key_text = std::fs::read_to_string(&key).expect("key");
    let body = key_text
        .lines()
        .find(|line| !line.starts_with("-----"))
        .expect("a key line");
    assert!(!daemon.log().contains(body), "a key reached the log");

    let hello = certificate(&daemon, &root, "hello");
    let mut names: Vec<&str> = hello["names"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|name| name.as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, [format!("*.hello.{ZONE}"), format!("hello.{ZONE}")]);
    // Its issuer and its next renewal, a third of its lifetime before its end.
    assert!(crate::https::says(&hello, "issuer", "Pebble"), "{hello}");
    let (renew, end) = (
        hello["renew_at_ms"].as_i64(),
        hello["not_after_ms"].as_i64(),
    );
    assert!(renew.is_some() && renew < end, "{hello}");

    // curl verifies the revision's name with pebble's root; the instance boots on it.
    for name in [format!("{short}.hello.{ZONE}"), format!("hello.{ZONE}")] {
        let answer = curl_name(&name, front, &root, "/");
        assert!(
            answer.as_deref().is_some_and(|a| a.contains("hello from")),
            "{name}: {answer:?}; log:\n{}",
            daemon.log()
        );
    }
    assert!(
        daemon
            .metrics_https(&root)
            .contains("outcome=\"front_terminated\"} 2")
    );

    // A CA that refuses every request: a new service's certificate is reported failed and
    // tried again later and later.
    drop(pebble);
    let refusing = Pebble::start(temp.path(), &ca, &pebble_address, dns, 157_766_400, true);
    add_service(&daemon, &root, "late");
    assert!(eventually(|| {
        let late = certificate(&daemon, &root, "late");
        late["failures"].as_u64() >= Some(2) && late["retry_at_ms"].is_i64()
    }));
    let late = certificate(&daemon, &root, "late");
    assert_eq!(late["state"], "failed", "{late}");
    assert!(
        late["error"]
            .as_str()
            .is_some_and(|e| e.contains("badNonce")),
        "{late}"
    );

    // The CA down: still reported and tried again; what is served stays.
    drop(refusing);
    let before = certificate(&daemon, &root, "late")["failures"].as_u64();
    assert!(eventually(
        || certificate(&daemon, &root, "late")["failures"].as_u64() > before
    ));
    let late = certificate(&daemon, &root, "late");
    assert!(late["error"].is_string(), "{late}");
    let shown = curl_name(&format!("{short}.hello.{ZONE}"), front, &root, "/");
    assert!(shown.is_some_and(|a| a.contains("hello from")));
    assert!(certificate(&daemon, &root, "hello")["state"] == "valid");

    // The CA back, issuing certificates that live 20 s: the one it issues is renewed.
    let pebble = Pebble::start(temp.path(), &ca, &pebble_address, dns, 20, false);
    assert!(
        eventually(|| certificate(&daemon, &root, "late")["issued"].as_u64() >= Some(2)),
        "no renewal; log:\n{}",
        daemon.log()
    );
    let late = certificate(&daemon, &root, "late");
    assert_eq!(late["state"], "valid", "{late}");
    assert_eq!(late["failures"], 0, "{late}");
    drop(pebble);
    daemon.stop();
}

impl Daemon {
    /// `/metrics` over https to the daemon's name, verified with `root`.
    fn metrics_https(&self, root: &Path) -> String {
        curl_name(ZONE, self.http, root, "/metrics").unwrap_or_default()
    }
}

#[test]
fn an_upgrade_in_place_keeps_https_and_the_front_door_serving_with_no_new_order() {
    let temp = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new(temp.path());
    let served = serve_hello_over_tls(temp.path(), &ca);
    let (daemon, root, front) = (&served.daemon, &served.root, served.front);
    let revision = format!("{}.hello.{ZONE}", served.short);
    assert!(curl_name(&revision, front, root, "/").is_some_and(|a| a.contains("hello from")));
    let issued = |daemon: &Daemon| daemon.log().matches("certificate issued").count();
    assert_eq!(issued(daemon), 2, "{}", daemon.log());
    let orders = || pebble_orders(temp.path());
    let before = orders();
    assert!(before >= 2, "pebble's log shows no orders");

    // The upgrade, asked over https to the daemon's name.
    let port = daemon.http.port();
    let upgraded = run(Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "--max-time",
            "60",
            "-X",
            "POST",
            "--cacert",
        ])
        .arg(root)
        .args(["--resolve", &format!("{ZONE}:{port}:127.0.0.1")])
        .args(["-H", &format!("authorization: Bearer {TOKEN}")])
        .arg(format!("https://{ZONE}:{port}/api/v1/daemon/upgrade")));
    let view: serde_json::Value = serde_json::from_slice(&upgraded.stdout).expect("JSON");
    let pid = view["pid"].clone();
    // It answers at once; the new program then serves, same pid, over https again.
    let upgrades = || {
        let view = curl_name(ZONE, daemon.http, root, "/api/v1/daemon").unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&view).unwrap_or_default()
    };
    assert!(
        eventually(|| upgrades()["upgrades"] == 1),
        "{}",
        daemon.log()
    );
    assert_eq!(upgrades()["pid"], pid);
    // The front door kept its socket (configured with port 0, it would not get it back).
    let serving = daemon.log();
    let last = serving
        .lines()
        .rfind(|line| line.contains("revboot is serving"))
        .expect("serving");
    assert!(last.contains(&format!("front_tls={front} ")), "{last}");

    // HTTPS and the front door serve on, with the certificates issued before (read from the
    // data directory): no new order.
    assert!(
        eventually(|| {
            certificate(daemon, root, "_daemon")["state"] == "valid"
                && certificate(daemon, root, "hello")["state"] == "valid"
        }),
        "{}",
        daemon.log()
    );
    assert!(
        curl_name(&revision, front, root, "/").is_some_and(|a| a.contains("hello from")),
        "{}",
        daemon.log()
    );
    let log = daemon.log();
    assert_eq!(
        log.matches("certificate read from the data directory")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(issued(daemon), 2, "{log}");
    assert_eq!(orders(), before);
    let Served { pebble, daemon, .. } = served;
    daemon.stop();
    drop(pebble);
}

/// Orders pebble received, as its logs say.
fn pebble_orders(dir: &Path) -> usize {
    let mut orders = 0;
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("pebble-") && name.ends_with(".log") {
            let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
            orders += log.matches("order-plz").count();
        }
    }
    orders
}

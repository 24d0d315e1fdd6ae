//! The front door with the real deployer and the real hello image: curl and openssl as the
//! clients, over loopback TCP.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use revboot_deployer::Instances;
use revboot_proxy::FrontConfig;
use tokio::io::AsyncReadExt;

use crate::support::{
    HELLO_RUN, PATIENCE, World, connect, deploy, eventually, hello_image, manifest,
};

/// A front door for `revboot.test` on an address of `127.78.<index>.0/24` (outside the
/// world's pool), on ports the kernel picks.
fn front(index: u8, http: bool, tls: bool) -> FrontConfig {
    let mut front = FrontConfig::new("revboot.test");
    let address = |port| SocketAddr::from(([127, 78, index, 1], port));
    front.http = http.then(|| address(0));
    front.tls = tls.then(|| address(0));
    front
}

/// Runs a client program to its end (bounded) and returns its stdout and stderr together.
async fn run(program: &str, args: &[&str]) -> String {
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} {args:?} did not end in time"))
    .unwrap_or_else(|error| panic!("{program} runs: {error}"));
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    text
}

/// `curl -i` of `url` with extra arguments; the status line, headers and body.
async fn curl(extra: &[&str], url: &str) -> String {
    let mut args = vec!["-sS", "-i", "--max-time", "30"];
    args.extend_from_slice(extra);
    args.push(url);
    run("curl", &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_routes_each_host_name_to_its_revision_and_boots_it() {
    // Kernel steering on (as the daemon runs it): neither the proxy nor the kernel serves
    // a front-door service's own address.
    let world = World::with_front(16, front(16, true, false), |_, _| {});
    let run = format!("{HELLO_RUN}\nreach = \"front\"");
    let image = hello_image();
    let first = deploy(&world.store, "hello", &image, &manifest(&run));
    let second = deploy(&world.store, "hello", &image, &manifest(&run));
    let http = world
        .proxy
        .front_addresses()
        .http
        .expect("an HTTP front door");
    assert!(
        world.deployer.list().is_empty(),
        "nothing runs before a request"
    );

    // curl --resolve: the name in the URL, and so in Host, with the front door's address.
    for revision in [&second, &first] {
        let name = format!("{}.hello.revboot.test", revision.short(7));
        let resolve = format!("{name}:{}:{}", http.port(), http.ip());
        let url = format!("http://{name}:{}/", http.port());
        let answer = curl(&["--resolve", &resolve], &url).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.contains(&revision.to_hex()), "{revision}: {answer}");
    }
    // -H Host, in another case and with a trailing dot: the same revision.
    let host = format!(
        "Host: {}.HELLO.revboot.test.",
        first.short(9).to_uppercase()
    );
    let answer = curl(&["-H", &host], &format!("http://{http}/again")).await;
    assert!(answer.contains(&first.to_hex()), "{answer}");

    let instances = world.deployer.list();
    assert_eq!(
        instances.len(),
        2,
        "one instance per revision: {instances:?}"
    );
    for info in &instances {
        // Reached through the front door only: nothing listens on its own address.
        for address in info.addresses.iter() {
            let refused = connect(SocketAddr::new(address, 8080), None).await;
            assert_eq!(
                refused.expect_err("no listener of its own").kind(),
                io::ErrorKind::ConnectionRefused
            );
        }
    }
    let metrics = world.proxy.metrics();
    assert_eq!(metrics.front_routed, 3, "{metrics:?}");
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_answers_unknown_names_with_404_and_an_unrecognized_name_alert() {
    let mut config = front(17, true, true);
    config.head_timeout = Duration::from_millis(500);
    let world = World::with_front(17, config, |_, _| {});
    let image = hello_image();
    let own = deploy(&world.store, "own", &image, &manifest(HELLO_RUN));
    let addresses = world.proxy.front_addresses();
    let (http, tls) = (addresses.http.expect("http"), addresses.tls.expect("tls"));

    for (host, says) in [
        ("nosuch.hello.revboot.test", "`hello`"),
        ("example.com", "not a revision name"),
        (
            &format!("{}.own.revboot.test", own.short(7)),
            "not by the front door",
        ),
    ] {
        let answer = curl(
            &["-H", &format!("Host: {host}")],
            &format!("http://{http}/"),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 404 Not Found"),
            "{host}: {answer}"
        );
        assert!(answer.contains(says), "{host}: {answer}");
    }
    let answer = curl(&["-H", "Host:"], &format!("http://{http}/")).await;
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request"), "{answer}");

    // A real TLS client with a server name nobody serves: a fatal alert, not a hang.
    let answer = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &tls.to_string(),
            "-servername",
            "nosuch.hello.revboot.test",
        ],
    )
    .await;
    assert!(
        answer.contains("unrecognized name") || answer.contains("alert number 112"),
        "{answer}"
    );

    // A client that sends nothing is answered 408 once the head timeout passes.
    let mut silent = connect(http, None).await.expect("connect");
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, silent.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    assert!(world.deployer.list().is_empty(), "nothing was booted");
    let metrics = world.proxy.metrics();
    assert_eq!(metrics.front_unknown, 4, "{metrics:?}");
    assert_eq!(metrics.front_bad, 2, "{metrics:?}");
    eventually("every refused connection closed", || {
        world.proxy.metrics().open_now == 0
    })
    .await;
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_hands_connections_to_an_instance_that_takes_them_and_relays_no_byte() {
    let idle = Duration::from_secs(1);
    let world = World::with_front(18, front(18, true, false), |deployer, _| {
        deployer.idle_timeout_override_ms = Some(idle.as_millis() as u64);
    });
    let image = hello_image();
    let run = format!("{HELLO_RUN}\nreach = \"front\"");
    let handed = deploy(
        &world.store,
        "hello",
        &image,
        &manifest(&format!("{run}\nhandoff = true")),
    );
    let relayed = deploy(&world.store, "plain", &image, &manifest(&run));
    let http = world.proxy.front_addresses().http.expect("http");
    let name = format!("{}.hello.revboot.test", handed.short(7));
    let host = format!("Host: {name}");

    // Cold: the connection is held through the boot (nothing read), then handed over; warm,
    // handed over at once. The instance reads the request the client sent, untouched.
    for path in ["/cold", "/warm"] {
        let answer = curl(&["-H", &host], &format!("http://{http}{path}")).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.contains(&handed.to_hex()), "{answer}");
    }
    let metrics = world.proxy.metrics();
    assert_eq!(metrics.handed_off, 2, "{metrics:?}");
    // (The warm one too, on a machine slow enough for the idle timeout to pass between.)
    assert!(
        metrics.held >= 1,
        "the cold one waited for the boot: {metrics:?}"
    );
    assert_eq!(metrics.spliced, 0, "{metrics:?}");
    assert_eq!(
        metrics.bytes_from_clients, 0,
        "no byte relayed: {metrics:?}"
    );
    assert_eq!(metrics.bytes_to_clients, 0, "no byte relayed: {metrics:?}");

    // A service without the opt-in is still relayed.
    let plain = format!("Host: {}.plain.revboot.test", relayed.short(7));
    let answer = curl(&["-H", &plain], &format!("http://{http}/")).await;
    assert!(answer.contains(&relayed.to_hex()), "{answer}");
    let metrics = world.proxy.metrics();
    assert_eq!(metrics.handed_off, 2, "{metrics:?}");
    assert_eq!(metrics.spliced, 1, "{metrics:?}");
    assert!(metrics.bytes_to_clients > 0, "{metrics:?}");

    // Idle reaping waits for a handed connection to close: a request whose body has not
    // come keeps the instance reading it, well past the idle timeout.
    let mut quiet = connect(http, None).await.expect("connect");
    let head = format!("POST /body HTTP/1.1\r\n{host}\r\ncontent-length: 4\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut quiet, head.as_bytes())
        .await
        .expect("head");
    eventually("the connection handed over", || {
        world.proxy.metrics().handed_off == 3
    })
    .await;
    // The instance that has it, and keeps it open.
    let mut state = world
        .deployer
        .summon("hello", &handed, None)
        .expect("the running instance")
        .state;
    crate::support::still_serving_after_idle(&state, idle).await;
    assert_eq!(world.proxy.metrics().open_now, 1, "counted open");
    tokio::io::AsyncWriteExt::write_all(&mut quiet, b"body")
        .await
        .expect("body");
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, quiet.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    let key = revboot_deployer::InstanceKey {
        service: "hello".into(),
        revision: handed,
        client: None,
        replica: 0,
    };
    let console = world.deployer.console(&key).unwrap_or_default();
    let console = String::from_utf8_lossy(&console);
    assert!(
        answer.contains(&handed.to_hex()),
        "{answer} (console: {console})"
    );
    drop(quiet);
    let stopped = tokio::time::timeout(PATIENCE, state.wait_for(|state| state.is_final()))
        .await
        .expect("reaped once the handed connection closed")
        .map(|state| state.clone());
    assert!(stopped.is_ok(), "{stopped:?}");
    eventually("the handed connection counted closed", || {
        world.proxy.metrics().open_now == 0
    })
    .await;
    world.shutdown().await;
}

/// A TLS connection routed by its server name (passed through, not ended at the front door)
/// is handed to the real `examples/hello-tls`, which ends TLS with its own certificate
/// (from its variables): curl, through the front door's TLS port, gets the instance's answer
/// for that name, and the proxy relayed no byte of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_hands_tls_routed_by_server_name_to_hello_tls_which_ends_it() {
    let dir = tempfile::tempdir().expect("dir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (cert_path, key_path) = (cert.to_string_lossy(), key.to_string_lossy());
    let made = run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=hello-tls.revboot.test",
            "-addext",
            "subjectAltName=DNS:*.hello-tls.revboot.test",
            "-keyout",
            &key_path,
            "-out",
            &cert_path,
        ],
    )
    .await;
    assert!(cert.exists() && key.exists(), "{made}");
    let world = World::with_front(20, front(20, false, true), |_, _| {});
    let image = revboot_testkit::build_image(
        &revboot_testkit::workspace().join("examples/hello-tls"),
        "hello-tls",
    );
    let run_table = "port = 8443\nmemory_mib = 64\nready = { probe = \"socket\" }\n\
                     reach = \"front\"\nhandoff = true";
    let revision = deploy(&world.store, "hello-tls", &image, &manifest(run_table));
    let pem = |path: &std::path::Path| std::fs::read_to_string(path).expect("PEM");
    let change = revboot_deployer::vars::Change {
        set: vec![
            ("TLS_CERT".into(), pem(&cert)),
            ("TLS_KEY".into(), pem(&key)),
        ],
        unset: Vec::new(),
    };
    world
        .deployer
        .vars()
        .change("hello-tls", &change)
        .expect("variables set");
    let tls = world.proxy.front_addresses().tls.expect("a TLS front door");
    let name = format!("{}.hello-tls.revboot.test", revision.short(7));
    let resolve = format!("{name}:{}:{}", tls.port(), tls.ip());
    let url = format!("https://{name}:{}/tls", tls.port());
    let answer = curl(&["--cacert", &cert_path, "--resolve", &resolve], &url).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    let body = format!("hello-tls from v1 ({}) for {name}", revision.to_hex());
    assert!(answer.contains(&body), "{answer}");
    let metrics = world.proxy.metrics();
    assert_eq!(metrics.front_routed, 1, "{metrics:?}");
    assert_eq!(metrics.handed_off, 1, "{metrics:?}");
    assert_eq!(metrics.spliced, 0, "{metrics:?}");
    assert_eq!(
        metrics.bytes_from_clients, 0,
        "no byte relayed: {metrics:?}"
    );
    assert_eq!(metrics.bytes_to_clients, 0, "no byte relayed: {metrics:?}");
    world.shutdown().await;
}

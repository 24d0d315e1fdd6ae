//! Upstream grants: a sandboxed gatekeeper reaches exactly its manifest's upstream.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use revboot_deployer::{InstanceState, Instances};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, World, build_image, deploy, manifest, source};

fn gatekeeper_image() -> PathBuf {
    build_image(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gatekeeper"),
        "gatekeeper",
    )
}

/// A backend that answers every request with `upstream saw <request line> <x-forwarded-for>`.
fn backend() -> (SocketAddr, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let (seen, requests) = std::sync::mpsc::sync_channel(16);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let line = head.lines().next().unwrap_or_default().to_owned();
            let forwarded = head
                .lines()
                .find_map(|l| l.strip_prefix("X-Forwarded-For: "))
                .unwrap_or("-")
                .to_owned();
            let body = format!("upstream saw {line} for {forwarded}\n");
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = seen.try_send(line);
        }
    });
    (address, requests)
}

/// `GET path` from `source` (a per-client instance admits only its client and itself).
async fn get_from(source: IpAddr, backend: SocketAddr, path: &str) -> std::io::Result<String> {
    let exchange = async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let mut stream = socket.connect(backend).await?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    };
    tokio::time::timeout(support::PATIENCE, exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("no answer in time")))
}

fn gatekeeper_run(upstreams: &[SocketAddr], env: &str) -> String {
    let upstreams: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "port = 8080\nmemory_mib = 16\nper_client = true\nupstreams = [{}]\nready = {{ probe = \"console\", line = \"gatekeeper ready\" }}\n[run.env]\nGATEKEEPER_PATHS = \"/\"\n{env}",
        upstreams.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gatekeeper_reaches_its_granted_upstream_and_the_grant_ends_with_it() {
    let world = World::new(40, |_| {});
    let (upstream, requests) = backend();
    let revision = deploy(
        &world.store,
        "gatekeeper",
        &gatekeeper_image(),
        &manifest("gatekeeper", &gatekeeper_run(&[upstream], "")),
        &source(40),
    );
    let client: IpAddr = "127.0.0.41".parse().expect("client");
    let summoned = world
        .deployer
        .summon("gatekeeper", &revision, Some(client))
        .expect("summon");
    let mut state = summoned.state.clone();
    let ready = support::wait_state(&mut state, |s| s.is_serving() || s.is_final()).await;
    assert!(ready.is_serving(), "{ready:?}");
    let console = world.deployer.console(&summoned.key).expect("console");
    let console = String::from_utf8_lossy(&console).into_owned();
    assert!(
        console.contains("gatekeeper ready for 127.0.0.41"),
        "{console}"
    );
    let granted = console
        .split("upstream unix:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the gatekeeper names its granted socket");
    // Inside, the scratch directory is bound read-only at /upstream; outside, the socket is
    // in it.
    assert_eq!(granted, "/upstream/upstream-0.sock", "{console}");
    let socket = std::fs::read_dir(world.dir.path().join("state/scratch"))
        .expect("scratch directories")
        .map(|entry| entry.expect("entry").path().join("upstream-0.sock"))
        .find(|path| path.exists())
        .expect("the socket is in the instance's scratch directory");

    // Its socket admits nobody but its client (and its own address): not even the host.
    let stranger = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(support::backend_of(&summoned)),
    )
    .await;
    assert!(
        !matches!(stranger, Ok(Ok(_))),
        "a connection from 127.0.0.1 completed"
    );
    let answer = get_from(client, support::backend_of(&summoned), "/api/x")
        .await
        .expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("upstream saw GET /api/x HTTP/1.1 for 127.0.0.41"),
        "{answer}"
    );
    assert_eq!(
        requests
            .recv_timeout(support::PATIENCE)
            .expect("the upstream got it"),
        "GET /api/x HTTP/1.1"
    );

    let mut stopped = world.deployer.stop(&summoned.key).expect("stop");
    support::wait_state(&mut stopped, InstanceState::is_final).await;
    assert!(
        support::eventually(|| !socket.exists()).await,
        "the grant is revoked with the instance"
    );
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_grant_there_is_no_way_out() {
    let world = World::new(41, |_| {});
    let (upstream, requests) = backend();
    // No `upstreams`: the gatekeeper tries the backend over TCP itself.
    let revision = deploy(
        &world.store,
        "gatekeeper",
        &gatekeeper_image(),
        &manifest(
            "gatekeeper",
            &gatekeeper_run(&[], &format!("GATEKEEPER_UPSTREAM = \"tcp:{upstream}\"\n")),
        ),
        &source(41),
    );
    let client: IpAddr = "127.0.0.42".parse().expect("ip");
    let summoned = world
        .deployer
        .summon("gatekeeper", &revision, Some(client))
        .expect("summon");
    let mut state = summoned.state.clone();
    let ready = support::wait_state(&mut state, |s| s.is_serving() || s.is_final()).await;
    assert!(ready.is_serving(), "{ready:?}");
    let answer = get_from(client, support::backend_of(&summoned), "/api/x")
        .await
        .expect("answer");
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(requests.try_recv().is_err(), "nothing reached the backend");
    // The console is read on its own task: the line may land a moment after the answer.
    let console = || {
        String::from_utf8_lossy(&world.deployer.console(&summoned.key).unwrap_or_default())
            .into_owned()
    };
    assert!(
        support::eventually(
            || console().contains("upstream tcp:") && console().contains("unreachable")
        )
        .await,
        "{}",
        console()
    );
    world.deployer.shutdown().await;
}

/// Regression: landlock (ABI 7 here) does not govern `connect` on pathname unix sockets, so
/// while the instance saw the host's tree it could connect to any unix socket on the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cannot_reach_a_unix_socket_outside_its_scratch() {
    let world = World::new(42, |_| {});
    let outside = world.dir.path().join("outside.sock");
    let listener = std::os::unix::net::UnixListener::bind(&outside).expect("bind outside");
    listener.set_nonblocking(true).expect("nonblocking");
    let revision = deploy(
        &world.store,
        "gatekeeper",
        &gatekeeper_image(),
        &manifest(
            "gatekeeper",
            &gatekeeper_run(
                &[],
                &format!("GATEKEEPER_UPSTREAM = \"unix:{}\"\n", outside.display()),
            ),
        ),
        &source(42),
    );
    let client: IpAddr = "127.0.0.43".parse().expect("ip");
    let summoned = world
        .deployer
        .summon("gatekeeper", &revision, Some(client))
        .expect("summon");
    let mut state = summoned.state.clone();
    let ready = support::wait_state(&mut state, |s| s.is_serving() || s.is_final()).await;
    assert!(ready.is_serving(), "{ready:?}");
    let answer = get_from(client, support::backend_of(&summoned), "/api/x")
        .await
        .expect("answer");
    let console = world.deployer.console(&summoned.key).expect("console");
    let console = String::from_utf8_lossy(&console);
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}\n{console}");
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing reached the host socket"
    );
    world.deployer.shutdown().await;
}

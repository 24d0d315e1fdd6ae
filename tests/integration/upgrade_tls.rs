//! `revboot upgrade` with connections whose TLS the front door ended (`tls = "terminate"`):
//! they are handed over with their TLS session, and the new program's record layer carries
//! them on, byte for byte, both TLS 1.3 and TLS 1.2.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;

use crate::https::TestCa;
use crate::support::{PATIENCE, git, hello_source, push, write_manifest};
use crate::upgrade::{pids, replace_binary, upgradable, upgrade};

const ZONE: &str = "revboot.test";

/// A rustls client trusting `ca` only, speaking `version`.
fn client_config(
    ca: &TestCa,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read_to_string(&ca.pem).expect("ca.pem");
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM body");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.into()).expect("the CA");
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to `name` at the front door, `GET /echo` sent and its head read:
/// hello sends back every byte after it, on this one connection.
fn echo_connection(front: SocketAddr, name: &str, config: Arc<rustls::ClientConfig>) -> Tls {
    let tcp = TcpStream::connect_timeout(&front, PATIENCE).expect("connect");
    tcp.set_read_timeout(Some(PATIENCE)).expect("timeout");
    tcp.set_write_timeout(Some(PATIENCE)).expect("timeout");
    let server = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let connection = rustls::ClientConnection::new(config, server).expect("client");
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    let request = format!("GET /echo HTTP/1.1\r\nhost: {name}\r\n\r\n");
    tls.write_all(request.as_bytes()).expect("request");
    let head = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n";
    let mut read = vec![0u8; head.len()];
    tls.read_exact(&mut read).expect("the head");
    assert_eq!(read, head);
    tls
}

/// Sends `sent` on `tls` and reads as many bytes back: hello's echo, byte for byte.
fn echoed(tls: &mut Tls, sent: &[u8]) {
    tls.write_all(sent).expect("send");
    let mut back = vec![0u8; sent.len()];
    tls.read_exact(&mut back).expect("the echo");
    assert!(back == sent, "the echo differs from what was sent");
}

/// A daemon with a front door ending TLS for hello with a certificate of the test's CA.
fn hello_terminated(temp: &Path) -> (crate::support::Daemon, std::path::PathBuf, TestCa) {
    let ca = TestCa::new(temp);
    let (cert, key) = (temp.join("hello.pem"), temp.join("hello.key"));
    let names = [&*format!("*.hello.{ZONE}"), &*format!("hello.{ZONE}")];
    ca.issue(&names, (2000, 2090), &cert, &key);
    let config = format!(
        "[front]\ntls = \"127.0.0.1:0\"\n[tls.services.hello]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let (daemon, binary) = upgradable(temp, &config);
    let work = hello_source(temp);
    write_manifest(&work, "reach = \"front\"\ntls = \"terminate\"\n");
    git(
        &work,
        &["commit", "-q", "-am", "TLS ended at the front door"],
    );
    push(&daemon, &work);
    (daemon, binary, ca)
}

/// Ends `tls` as a client does (close_notify, then its writing): hello ends too, and its
/// end arrives as a close_notify (rustls reads a clean end, not a truncation).
fn end(mut tls: Tls) {
    tls.conn.send_close_notify();
    tls.flush().expect("close_notify");
    tls.sock
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).expect("a clean end");
    assert!(rest.is_empty());
}

/// The last "proxy handed over" line of the log.
fn last_hand_over(daemon: &crate::support::Daemon) -> String {
    let log = daemon.log();
    let line = log.lines().rfind(|line| line.contains("proxy handed over"));
    line.unwrap_or_else(|| panic!("{log}")).to_owned()
}

#[test]
fn tls_ended_at_the_front_door_is_handed_over_with_its_session_and_goes_on_after_the_upgrade() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (daemon, binary, ca) = hello_terminated(temp.path());
    let front = daemon.front("front_tls=");
    let name = format!("hello.{ZONE}");
    let long: Vec<u8> = (0..64 * 1024u32).map(|n| (n % 251) as u8).collect();
    replace_binary(&binary);
    // One connection of each version in turn (hello serves one at a time), each answered
    // before an upgrade and after it on the same connection.
    let mut upgrades = 0;
    let mut before = None;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let mut tls = echo_connection(front, &name, client_config(&ca, version));
        echoed(&mut tls, b"before the upgrade");
        let serving = pids(&daemon);
        assert_eq!(*before.get_or_insert_with(|| serving.clone()), serving);

        let view = upgrade(&daemon);
        upgrades += 1;
        assert_eq!(view["upgrades"], upgrades, "{view}");
        // Handed over with its session, not left to the drain.
        let handed = last_hand_over(&daemon);
        assert!(handed.contains("tls=1"), "{handed}");
        assert!(handed.contains("left=0"), "{handed}");

        // The same connection, carried by the new program's record layer: several records
        // each way, byte for byte; then past one more upgrade.
        echoed(&mut tls, &long);
        let view = upgrade(&daemon);
        upgrades += 1;
        assert_eq!(view["upgrades"], upgrades, "{view}");
        assert!(last_hand_over(&daemon).contains("tls=1"));
        echoed(&mut tls, b"after two upgrades");
        end(tls);
        assert_eq!(pids(&daemon), serving);
    }
    let log = daemon.log();
    assert!(!log.contains("TLS record not followed"), "{log}");
}

/// New TLS connections made all through an upgrade in place are all answered: the new
/// program's front door, listening at once on the sockets handed over, has the services'
/// certificates before it reads its first handshake (they were loaded after it started
/// accepting, and handshakes that came in between were refused with `access_denied`).
#[test]
fn new_tls_connections_made_through_an_upgrade_are_all_answered() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (daemon, binary, ca) = hello_terminated(temp.path());
    let front = daemon.front("front_tls=");
    let name = format!("hello.{ZONE}");
    let config = client_config(&ca, &rustls::version::TLS13);
    replace_binary(&binary);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (done, name) = (done.clone(), name.clone());
        std::thread::spawn(move || {
            let (mut answered, mut failed) = (0u32, Vec::new());
            // Until the upgrades are over, then a few more.
            let mut after = 0;
            while after < 5 {
                if done.load(std::sync::atomic::Ordering::Acquire) {
                    after += 1;
                }
                match get(front, &name, config.clone()) {
                    Ok(answer) if answer.starts_with("HTTP/1.1 200") => answered += 1,
                    Ok(answer) => failed.push(answer),
                    Err(error) => failed.push(error.to_string()),
                }
            }
            (answered, failed)
        })
    };
    for expected in 1..=3 {
        let view = upgrade(&daemon);
        assert_eq!(view["upgrades"], expected, "{view}");
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let (answered, failed) = client.join().expect("client thread");
    assert!(failed.is_empty(), "{failed:?}\n{}", daemon.log());
    assert!(answered >= 5, "{answered}");
}

/// `GET /` on a new TLS connection: the answer's text, or how it failed.
fn get(
    front: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<String> {
    let tcp = TcpStream::connect_timeout(&front, PATIENCE)?;
    tcp.set_read_timeout(Some(PATIENCE))?;
    tcp.set_write_timeout(Some(PATIENCE))?;
    let server = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let connection = rustls::ClientConnection::new(config, server).expect("client");
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    tls.write_all(format!("GET / HTTP/1.1\r\nhost: {name}\r\n\r\n").as_bytes())?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer)?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

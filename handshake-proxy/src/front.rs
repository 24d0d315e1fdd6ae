//! The front door: one shared address for every service that chooses it, routing each
//! connection by the name it asks for.
//!
//! Hosts with a single public IPv4 address cannot give each revision an address of its own;
//! the front door listens on configured addresses (an HTTP port and a TLS port) and reads
//! which revision a connection is for from the connection itself.
//!
//! 1. At start, bind each configured address (the `door` module); one the host does not own is an error that
//!    names it ([`FrontError::NotLocal`]). The listeners close at shutdown; at an upgrade
//!    in place they go to the next daemon, open ([`crate::Proxy::hand_over_front`]).
//! 2. Accept at once. Over `max_connections` (the proxy's bound, shared with its own
//!    listeners) or over `max_pending` connections still reading their head: reset.
//! 3. Peek at the head within `head_timeout`, at most `max_head` bytes (the private `sniff`
//!    module; `MSG_PEEK`, nothing consumed): an HTTP/1.x request's `Host`, or a TLS
//!    ClientHello's server name. The bytes are read (consumed) once the connection is to be
//!    relayed, and replayed untouched; TLS is terminated here only for a service whose
//!    manifest says `tls = "terminate"` (the private `terminate` module), with the
//!    certificates of [`FrontConfig::terminate`].
//! 4. The name designates a revision as DNS reads it (`revboot_store::name`):
//!    `<label>.<service>.<zone>`, or `<service>.<zone>` for the live revision. Names are
//!    resolved through what [`crate::Proxy::resolve_names_through`] set (the daemon's builds
//!    on demand), else the proxy's inner instances. A label for a source commit with no
//!    deployment yet is then being built: the connection waits, its head kept, counted
//!    against `max_pending`, until the label resolves or `build_wait` passes (then 503 /
//!    `internal_error`). It asks again whenever the resolver's generation moves (a build
//!    recorded), and at least every [`BUILD_RETRY`].
//! 5. Refuse, with an HTTP answer or a TLS alert, never a hang: a head too slow (408), too
//!    large (431), not HTTP or TLS (400 / `decode_error`), without a name (400 /
//!    `unrecognized_name`), or a name that designates no revision served here (404 /
//!    `unrecognized_name`): outside the zone, an unknown service or label, a service whose
//!    manifest keeps it off the front door (`reach = "address"`), or a per-client service
//!    (one shared address cannot tell clients apart).
//! 6. Otherwise summon the revision through the proxy and hold, replay and splice exactly as
//!    the proxy's own listeners do (the private `connection` module, steps 3–8), the head
//!    being the early bytes. A boot that fails or times out answers 503 / `internal_error`.
//!    A revision whose instance takes hand-offs (`[run] handoff = true`, TLS not ended
//!    here) gets the connection itself instead, its head still unread, once it is ready
//!    (the private `handoff` module): no relay at all.
//! 7. A connection is routed once, by its first head: later requests on a kept-alive
//!    connection go to the same revision (clients open one connection per host name).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use revboot_deployer::{Instances, ResolveError, TlsMode};
use revboot_store::name::{self, Shape};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::connection::{self, Arrival, Open};
use crate::door::{Bound, Front, INTERNAL_ERROR, alert, http_answer, write_and_close};
pub use crate::door::{
    DEFAULT_BUILD_WAIT, DEFAULT_HEAD_TIMEOUT, DEFAULT_MAX_HEAD, DEFAULT_MAX_PENDING,
    FrontAddresses, FrontConfig, FrontError,
};
use crate::metrics::bump;
use crate::relays::Failure;
use crate::shared::Shared;
use crate::sniff::{self, Protocol, Sniffed};

/// The TLS alert `decode_error` (RFC 8446 §6.2).
const DECODE_ERROR: u8 = 50;
/// The TLS alert `unrecognized_name` (RFC 6066 §3).
const UNRECOGNIZED_NAME: u8 = 112;
/// How often a connection waiting for a build looks at the resolver's generation: the
/// `Instances` contract offers a counter, not a watch, and reading it is a load.
const BUILD_LOOK: Duration = Duration::from_millis(50);
/// A connection waiting for a build asks again at least this often, generation or not.
pub const BUILD_RETRY: Duration = Duration::from_secs(2);

/// Starts the accept loops of `bound` on the proxy's runtime.
pub(crate) fn start(shared: &Arc<Shared>, bound: Bound) {
    let Some(front) = &shared.front else { return };
    for (protocol, address, listener) in bound {
        let me = Arc::clone(shared);
        let cancel = front.stop.clone();
        shared.runtime.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => {
                    info!(%address, ?protocol, "front door listening");
                    accepting(me, listener, protocol, cancel).await;
                }
                Err(error) => warn!(%error, %address, "cannot watch the front door listener"),
            }
        });
    }
}

async fn accepting(
    shared: Arc<Shared>,
    listener: TcpListener,
    protocol: Protocol,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => admit(&shared, stream, peer, protocol),
            Err(error) => {
                warn!(%error, ?protocol, "front door accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Step 2.
fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr, protocol: Protocol) {
    let Some(front) = &shared.front else { return };
    let metrics = &shared.metrics;
    let over = metrics.open_now.load(Ordering::Relaxed) >= shared.config.max_connections as u64;
    let permit = Arc::clone(&front.pending).try_acquire_owned().ok();
    let Some(permit) = permit.filter(|_| !over) else {
        bump(&metrics.refused);
        bump(&metrics.refused_overload);
        warn!(%peer, ?protocol, "front door connection bound reached; refused");
        let _ = stream.set_zero_linger();
        return;
    };
    bump(&metrics.accepted);
    metrics.open_now.fetch_add(1, Ordering::Relaxed);
    let open = Open::new(Arc::clone(shared));
    tokio::spawn(async move {
        let _ = stream.set_nodelay(true);
        route(open, stream, peer, protocol, permit).await;
    });
}

/// Why a connection is not routed (step 5).
enum Refusal {
    Slow,
    TooLarge,
    Malformed(&'static str),
    NoName,
    Unknown(String),
    Unavailable(String),
    /// Being built on demand: waited for (step 4), then unavailable.
    Building(String),
}

/// Steps 3–6.
async fn route(
    mut open: Open,
    stream: TcpStream,
    peer: SocketAddr,
    protocol: Protocol,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let shared = Arc::clone(open.shared());
    let Some(front) = &shared.front else { return };
    let mut head = Vec::new();
    let sniffed = tokio::select! {
        () = shared.cancel.cancelled() => return,
        sniffed = tokio::time::timeout(
            front.config.head_timeout,
            sniff::peek(&stream, protocol, front.config.max_head, &mut head),
        ) => sniffed,
    };
    let name = match sniffed {
        Err(_) => Err(Refusal::Slow),
        Ok(Err(error)) => {
            debug!(%error, %peer, "front door client gone before its head");
            return;
        }
        Ok(Ok(Sniffed::Name(name))) => Ok(name),
        Ok(Ok(Sniffed::NoName)) => Err(Refusal::NoName),
        Ok(Ok(Sniffed::TooLarge)) => Err(Refusal::TooLarge),
        Ok(Ok(Sniffed::Malformed(why))) => Err(Refusal::Malformed(why)),
    };
    let target = match name {
        Ok(name) => tokio::select! {
            () = shared.cancel.cancelled() => return,
            target = built(&shared, front, &name) => target.map(|target| (name, target)),
        },
        Err(refusal) => Err(refusal),
    };
    drop(permit);
    let routed = target.and_then(|(name, (service, label, tls))| {
        let terminate = match (protocol, tls) {
            (Protocol::Tls, TlsMode::Terminate) => match &front.config.terminate {
                Some(terminate) => Some(terminate.clone()),
                None => {
                    return Err(Refusal::Unknown(format!(
                        "`{service}` ends TLS at the front door, which has no certificates"
                    )));
                }
            },
            _ => None,
        };
        let summoned = connection::summon(&shared, &service, &label, None)
            .map_err(|error| Refusal::Unavailable(error.to_string()))?;
        Ok((name, summoned, terminate))
    });
    let (name, summoned, terminate) = match routed {
        Ok(routed) => routed,
        Err(refusal) => return refuse(&shared, stream, peer, protocol, refusal).await,
    };
    bump(&shared.metrics.front_routed);
    debug!(%peer, name, key = %summoned.key, "front door routed");
    open.set_key(summoned.key.clone());
    let failure = match protocol {
        Protocol::Http => Failure::Http,
        Protocol::Tls => Failure::Tls,
    };
    let arrival = |head, peeked| Arrival {
        early: head,
        client_done: false,
        failure,
        peeked,
    };
    if terminate.is_none() && shared.inner.handoff(&summoned.key).is_some() {
        // Step 6: the head stays queued, for the instance to read (the `handoff` module).
        return connection::serve(open, stream, peer, summoned, arrival(head, true)).await;
    }
    let stream = match sniff::consume(stream, head.len()).await {
        Ok(stream) => stream,
        Err(error) => {
            debug!(%error, %peer, "front door client gone after its head");
            return;
        }
    };
    if let Some(terminate) = terminate {
        let timeout = front.config.head_timeout;
        return crate::terminate::serve(open, stream, peer, summoned, head, terminate, timeout)
            .await;
    }
    connection::serve(open, stream, peer, summoned, arrival(head, false)).await;
}

/// What a name designates: the service, its revision, how TLS goes.
type Target = (String, revboot_store::Revision, TlsMode);

/// Step 4, waiting for a build on demand (at most `build_wait`) while the resolver says the
/// revision is being built.
async fn built(shared: &Shared, front: &Front, name: &str) -> Result<Target, Refusal> {
    let resolver = front
        .names
        .get()
        .and_then(std::sync::Weak::upgrade)
        .unwrap_or_else(|| Arc::clone(&shared.inner));
    let deadline = tokio::time::Instant::now() + front.config.build_wait;
    loop {
        let generation = resolver.generation();
        let why = match target(resolver.as_ref(), front, name) {
            Err(Refusal::Building(why)) => why,
            other => return other,
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(Refusal::Unavailable(format!(
                "{why}; not built within {} s",
                front.config.build_wait.as_secs()
            )));
        }
        debug!(name, why, "front door waits for a build on demand");
        let retry = (now + BUILD_RETRY).min(deadline);
        while resolver.generation() == generation && tokio::time::Instant::now() < retry {
            tokio::time::sleep(BUILD_LOOK).await;
        }
    }
}

/// Step 4: the service and revision `name` designates, if the front door serves it.
fn target(resolver: &dyn Instances, front: &Front, name: &str) -> Result<Target, Refusal> {
    let mut scratch = String::new();
    let (service, label) = match name::classify_host(name, &front.zone, &mut scratch) {
        Shape::Live { service } => (service, None),
        Shape::Label { label, service } => (service, Some(label)),
        Shape::Outside | Shape::Apex | Shape::Nothing => {
            return Err(Refusal::Unknown(format!(
                "`{name}` is not a revision name of zone `{}`",
                front.config.zone
            )));
        }
    };
    let resolved = resolver
        .resolve(service, label)
        .map_err(|error| match error {
            ResolveError::Building(why) => Refusal::Building(why),
            ResolveError::Store(_) => Refusal::Unavailable(error.to_string()),
            other => Refusal::Unknown(other.to_string()),
        })?;
    if resolved.per_client {
        return Err(Refusal::Unknown(format!(
            "`{service}` has an instance per client, which the shared front door cannot \
             tell apart: reach it at its own address"
        )));
    }
    if !resolved.reach.front_door() {
        return Err(Refusal::Unknown(format!(
            "`{service}` is served at addresses of its own, not by the front door (its \
             manifest's reach is \"address\")"
        )));
    }
    Ok((service.to_owned(), resolved.revision, resolved.tls))
}

/// Step 5: answers and closes.
async fn refuse(
    shared: &Shared,
    mut stream: TcpStream,
    peer: SocketAddr,
    protocol: Protocol,
    refusal: Refusal,
) {
    let metrics = &shared.metrics;
    let (status, alert_code, reason) = match refusal {
        Refusal::Slow => (
            "408 Request Timeout",
            None,
            "the head was not sent in time".into(),
        ),
        Refusal::TooLarge => (
            "431 Request Header Fields Too Large",
            Some(DECODE_ERROR),
            "the head is too large".into(),
        ),
        Refusal::Malformed(why) => ("400 Bad Request", Some(DECODE_ERROR), why.to_owned()),
        Refusal::NoName => (
            "400 Bad Request",
            Some(UNRECOGNIZED_NAME),
            "no host name to route by".to_owned(),
        ),
        Refusal::Unknown(why) => ("404 Not Found", Some(UNRECOGNIZED_NAME), why),
        Refusal::Unavailable(why) | Refusal::Building(why) => {
            ("503 Service Unavailable", Some(INTERNAL_ERROR), why)
        }
    };
    if status.starts_with("404") {
        bump(&metrics.front_unknown);
    } else if status.starts_with("503") {
        bump(&metrics.boot_failures);
    } else {
        bump(&metrics.front_bad);
    }
    debug!(%peer, ?protocol, status, reason, "front door refused a connection");
    let answer = match (protocol, alert_code) {
        (Protocol::Http, _) => http_answer(status, &reason),
        (Protocol::Tls, Some(code)) => alert(code),
        (Protocol::Tls, None) => Vec::new(),
    };
    write_and_close(&mut stream, &answer).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::door::bind;
    use crate::{Proxy, ProxyConfig};
    use revboot_deployer::{InstanceKey, Instances, Reach};
    use revboot_testkit::instances::{
        Addresses, Backend, Behaviour, Boot, Fake, FakeRevision, FakeService, revision, unique_ip,
    };
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

    /// Bound on a step that should take milliseconds: a bug fails the test, never hangs it.
    const STEP: Duration = Duration::from_secs(30);

    /// `hello` with two revisions, reached through the front door only.
    fn fake(backend: Backend) -> Arc<Fake> {
        let fake = Fake::new(Behaviour {
            cap: 8,
            boot: Boot::After(Duration::from_millis(200)),
            backend,
            addresses: Addresses::Unique,
            boot_timeout: Duration::from_secs(20),
            idle_timeout: None,
        });
        let revisions = [revision(1), revision(2)].map(|revision| FakeRevision {
            revision,
            tags: Vec::new(),
            bootable: true,
        });
        fake.add_service(
            "hello",
            FakeService {
                reach: Reach::Front,
                revisions: revisions.to_vec(),
                live: Some(revision(1)),
                ..FakeService::one(8443, revision(1))
            },
        );
        fake
    }

    fn key(n: u64) -> InstanceKey {
        InstanceKey {
            service: "hello".into(),
            revision: revision(n),
            client: None,
            replica: 0,
        }
    }

    /// A real TLS server (`openssl s_server -www`) on `address`, with a throwaway
    /// certificate in `dir`; returned once it accepts.
    async fn tls_server(dir: &std::path::Path, address: SocketAddr) -> tokio::process::Child {
        let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
        let made = tokio::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=revboot.test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .await
            .expect("openssl runs");
        assert!(made.status.success(), "{made:?}");
        let mut server = tokio::process::Command::new("openssl")
            .args(["s_server", "-www", "-accept", &address.to_string(), "-key"])
            .arg(&key)
            .arg("-cert")
            .arg(&cert)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("openssl s_server starts");
        let stdout = server.stdout.take().expect("piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        tokio::time::timeout(STEP, async {
            while let Some(line) = lines.next_line().await.expect("read") {
                if line.starts_with("ACCEPT") {
                    return;
                }
            }
            panic!("s_server ended before accepting");
        })
        .await
        .expect("s_server accepts in time");
        // Keep reading its output so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        server
    }

    #[tokio::test]
    async fn tls_is_routed_by_server_name_and_passed_through_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = SocketAddr::new(unique_ip(), 8443);
        let _server = tls_server(dir.path(), backend).await;
        let fake = fake(Backend::At(backend));
        let mut config = FrontConfig::new("revboot.test");
        config.tls = Some(SocketAddr::new(unique_ip(), 0));
        let inner: Arc<dyn Instances> = fake.clone();
        let proxy = Proxy::with_front(ProxyConfig::default(), config, inner).expect("opens");
        let tls = proxy.front_addresses().tls.expect("a TLS front door");
        let name = format!("{}.hello.revboot.test", revision(2).short(8));
        // curl sends the URL's host as the server name and checks nothing of the
        // throwaway certificate (-k); the handshake is the instance's own.
        let output = tokio::time::timeout(
            STEP,
            tokio::process::Command::new("curl")
                .args(["-sS", "-k", "--max-time", "20", "--connect-to"])
                .arg(format!("{name}:443:{}:{}", tls.ip(), tls.port()))
                .arg(format!("https://{name}/"))
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("curl ends in time")
        .expect("curl runs");
        let answer = String::from_utf8_lossy(&output.stdout);
        assert!(answer.contains("s_server"), "{output:?}");
        assert_eq!(fake.boots(&key(2)), 1, "the revision the name designates");
        assert_eq!(fake.boots(&key(1)), 0);
        assert_eq!(proxy.metrics().front_routed, 1);
        assert_eq!(proxy.metrics().held, 1, "held while it booted");
        proxy.shutdown();
    }

    /// The stand-in instance's side of a hand-off: the next connection handed over on
    /// `theirs`.
    fn handed(theirs: &std::os::unix::net::UnixStream) -> std::net::TcpStream {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        let mut slices = [std::io::IoSliceMut::new(&mut byte)];
        recvmsg(theirs, &mut slices, &mut control, RecvFlags::empty()).expect("recvmsg");
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(mut fds) = message
                && let Some(fd) = fds.next()
            {
                return std::net::TcpStream::from(fd);
            }
        }
        panic!("a byte without a descriptor");
    }

    #[tokio::test]
    async fn tls_routed_by_server_name_is_handed_over_with_its_client_hello_unread() {
        use std::io::Read;
        let fake = fake(Backend::Echo);
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        fake.set_handoff("hello", revboot_deployer::Handoff::from_fd(ours.into()));
        let mut config = FrontConfig::new("revboot.test");
        config.tls = Some(SocketAddr::new(unique_ip(), 0));
        let inner: Arc<dyn Instances> = fake.clone();
        let proxy = Proxy::with_front(ProxyConfig::default(), config, inner).expect("opens");
        let tls = proxy.front_addresses().tls.expect("a TLS front door");
        let name = format!("{}.hello.revboot.test", revision(2).short(8));
        // A real TLS client; it waits for a ServerHello that the stand-in never sends.
        let _client = tokio::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &tls.to_string(),
                "-servername",
                &name,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("openssl s_client starts");
        let hello = tokio::task::spawn_blocking(move || {
            let mut stream = handed(&theirs);
            stream.set_read_timeout(Some(STEP)).expect("timeout");
            let mut header = [0u8; 5];
            stream.read_exact(&mut header).expect("the record header");
            let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
            let mut body = vec![0u8; length];
            stream.read_exact(&mut body).expect("the ClientHello");
            (header, body)
        });
        let (header, body) = tokio::time::timeout(STEP, hello)
            .await
            .expect("handed over in time")
            .expect("received");
        assert_eq!(header[0], 22, "a handshake record, from its first byte");
        assert_eq!(body[0], 1, "a ClientHello");
        let named = body
            .windows(name.len())
            .any(|window| window == name.as_bytes());
        assert!(named, "the server name it was routed by is in it");
        let metrics = proxy.metrics();
        assert_eq!(metrics.handed_off, 1, "{metrics:?}");
        assert_eq!(metrics.bytes_from_clients, 0, "{metrics:?}");
        assert_eq!(fake.boots(&key(2)), 1, "the revision the name designates");
        proxy.shutdown();
    }

    #[tokio::test]
    async fn an_instance_that_takes_no_hand_off_gets_the_connection_relayed_instead() {
        let fake = fake(Backend::Echo);
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        // The instance has exited: its end is closed.
        drop(theirs);
        fake.set_handoff("hello", revboot_deployer::Handoff::from_fd(ours.into()));
        let mut config = FrontConfig::new("revboot.test");
        config.http = Some(SocketAddr::new(unique_ip(), 0));
        let inner: Arc<dyn Instances> = fake.clone();
        let proxy = Proxy::with_front(ProxyConfig::default(), config, inner).expect("opens");
        let http = proxy.front_addresses().http.expect("http");
        let mut stream = TcpStream::connect(http).await.expect("connect");
        stream
            .write_all(b"GET /relayed HTTP/1.1\r\nHost: hello.revboot.test\r\n\r\n")
            .await
            .expect("send");
        stream.shutdown().await.expect("end of the request");
        let answer = answer(stream).await;
        assert!(answer.contains("answer to GET /relayed "), "{answer}");
        let metrics = proxy.metrics();
        assert_eq!(metrics.handoff_failures, 1, "{metrics:?}");
        assert_eq!(metrics.handed_off, 0, "{metrics:?}");
        assert_eq!(metrics.spliced, 1, "relayed: {metrics:?}");
        proxy.shutdown();
    }

    #[tokio::test]
    async fn a_boot_that_fails_is_answered_503_not_a_hang() {
        let fake = Fake::new(Behaviour {
            boot: Boot::CrashAfter(Duration::from_millis(100)),
            backend: Backend::Echo,
            addresses: Addresses::Unique,
            ..Behaviour::default()
        });
        fake.add_service(
            "hello",
            FakeService {
                reach: Reach::Both,
                ..FakeService::one(8080, revision(1))
            },
        );
        let mut config = FrontConfig::new("revboot.test");
        config.http = Some(SocketAddr::new(unique_ip(), 0));
        let inner: Arc<dyn Instances> = fake.clone();
        let proxy = Proxy::with_front(ProxyConfig::default(), config, inner).expect("opens");
        let http = proxy.front_addresses().http.expect("http");
        let mut stream = TcpStream::connect(http).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: hello.revboot.test\r\n\r\n")
            .await
            .expect("send");
        let mut answer = String::new();
        tokio::time::timeout(STEP, stream.read_to_string(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        assert!(
            answer.starts_with("HTTP/1.1 503 Service Unavailable"),
            "{answer}"
        );
        assert!(answer.contains("failed to boot"), "{answer}");
        assert_eq!(proxy.metrics().boot_failures, 1);
        proxy.shutdown();
    }

    #[tokio::test]
    async fn connections_over_the_pending_bound_are_reset() {
        let fake = fake(Backend::Echo);
        let mut config = FrontConfig::new("revboot.test");
        config.http = Some(SocketAddr::new(unique_ip(), 0));
        config.max_pending = 1;
        let inner: Arc<dyn Instances> = fake.clone();
        let proxy = Proxy::with_front(ProxyConfig::default(), config, inner).expect("opens");
        let http = proxy.front_addresses().http.expect("http");
        let silent = TcpStream::connect(http).await.expect("connect");
        let deadline = tokio::time::Instant::now() + STEP;
        while proxy.metrics().accepted < 1 {
            assert!(tokio::time::Instant::now() < deadline, "never accepted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut second = TcpStream::connect(http).await.expect("connect");
        let mut answer = Vec::new();
        let read = tokio::time::timeout(STEP, second.read_to_end(&mut answer))
            .await
            .expect("closed in time");
        if read.is_ok() {
            assert!(answer.is_empty(), "answered: {answer:?}");
        }
        assert_eq!(proxy.metrics().refused_overload, 1);
        drop(silent);
        proxy.shutdown();
    }

    #[tokio::test]
    async fn a_front_door_handed_over_keeps_its_port_and_the_connections_waiting() {
        let fake = fake(Backend::Echo);
        let mut config = FrontConfig::new("revboot.test");
        config.http = Some(SocketAddr::new(unique_ip(), 0));
        let inner: Arc<dyn Instances> = fake.clone();
        let old = Proxy::with_front(ProxyConfig::default(), config.clone(), inner.clone())
            .expect("opens");
        let http = old.front_addresses().http.expect("http");
        let handed = old.hand_over_front();
        assert_eq!(handed.len(), 1);
        drop(old);
        // Between the two: the connection waits in the socket's queue.
        let mut waiting = TcpStream::connect(http).await.expect("connect");
        waiting
            .write_all(b"GET / HTTP/1.1\r\nhost: nothing.revboot.test\r\n\r\n")
            .await
            .expect("write");
        let new = Proxy::with_front_inheriting(ProxyConfig::default(), config, inner, handed)
            .expect("opens");
        assert_eq!(new.front_addresses().http, Some(http));
        let mut answer = Vec::new();
        tokio::time::timeout(STEP, waiting.read_to_end(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        new.shutdown();
        // Shut down, the socket closes (its accept loop ends): no second descriptor keeps it.
        let deadline = tokio::time::Instant::now() + STEP;
        while TcpStream::connect(http).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "still listening");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The daemon's builds on demand, as the front door sees them: the label `0123abc` of
    /// `hello` is being built until `built`, then it is the live revision; the generation
    /// moves when it is built.
    #[derive(Debug)]
    struct OnDemand {
        inner: Arc<Fake>,
        built: std::sync::atomic::AtomicBool,
        asked: std::sync::atomic::AtomicU64,
    }

    impl Instances for OnDemand {
        fn resolve(
            &self,
            service: &str,
            label: Option<&str>,
        ) -> Result<revboot_deployer::Resolved, ResolveError> {
            if label != Some("0123abc") {
                return self.inner.resolve(service, label);
            }
            self.asked.fetch_add(1, Ordering::SeqCst);
            if self.built.load(Ordering::SeqCst) {
                self.inner.resolve(service, None)
            } else {
                Err(ResolveError::Building(
                    "source commit 0123abc of `hello` is being built".into(),
                ))
            }
        }

        fn summon(
            &self,
            service: &str,
            revision: &revboot_store::Revision,
            client: Option<std::net::IpAddr>,
        ) -> Result<revboot_deployer::Summoned, revboot_deployer::SummonError> {
            self.inner.summon(service, revision, client)
        }

        fn by_address(&self, address: std::net::IpAddr) -> Option<revboot_deployer::Summoned> {
            self.inner.by_address(address)
        }

        fn activity(&self, key: &InstanceKey, activity: revboot_deployer::Activity) {
            self.inner.activity(key, activity);
        }

        fn generation(&self) -> u64 {
            self.inner.generation() + u64::from(self.built.load(Ordering::SeqCst))
        }
    }

    /// A front door whose names go through an [`OnDemand`] with `build_wait`; the request
    /// for the label being built, sent; the stream to read the answer from.
    async fn asking_for_a_build(build_wait: Duration) -> (Arc<Proxy>, Arc<OnDemand>, TcpStream) {
        let fake = fake(Backend::Echo);
        let mut config = FrontConfig::new("revboot.test");
        config.http = Some(SocketAddr::new(unique_ip(), 0));
        config.build_wait = build_wait;
        let inner: Arc<dyn Instances> = fake.clone();
        let proxy = Proxy::with_front(ProxyConfig::default(), config, inner).expect("opens");
        let on_demand = Arc::new(OnDemand {
            inner: fake,
            built: false.into(),
            asked: 0.into(),
        });
        let names: Arc<dyn Instances> = on_demand.clone();
        proxy.resolve_names_through(&names);
        let http = proxy.front_addresses().http.expect("http");
        let mut stream = TcpStream::connect(http).await.expect("connect");
        stream
            .write_all(b"GET /built HTTP/1.1\r\nHost: 0123abc.hello.revboot.test\r\n\r\n")
            .await
            .expect("send");
        (proxy, on_demand, stream)
    }

    async fn answer(mut stream: TcpStream) -> String {
        let mut answer = String::new();
        tokio::time::timeout(STEP, stream.read_to_string(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        answer
    }

    #[tokio::test]
    async fn a_name_being_built_on_demand_waits_for_the_build_then_is_served() {
        let (proxy, on_demand, stream) = asking_for_a_build(STEP).await;
        let deadline = tokio::time::Instant::now() + STEP;
        while on_demand.asked.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never asked");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        on_demand.built.store(true, Ordering::SeqCst);
        let answer = answer(stream).await;
        assert!(answer.contains("answer to GET /built "), "{answer}");
        assert_eq!(proxy.metrics().front_routed, 1);
        proxy.shutdown();
    }

    #[tokio::test]
    async fn a_build_longer_than_the_wait_is_answered_503_not_a_hang() {
        let (proxy, on_demand, stream) = asking_for_a_build(Duration::from_millis(300)).await;
        let answer = answer(stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 503 Service Unavailable"),
            "{answer}"
        );
        assert!(answer.contains("being built; not built within"), "{answer}");
        assert!(on_demand.asked.load(Ordering::SeqCst) >= 1);
        assert_eq!(proxy.metrics().front_routed, 0);
        proxy.shutdown();
    }

    #[test]
    fn an_address_the_host_does_not_own_is_named() {
        let mut config = FrontConfig::new("revboot.test");
        // A documentation address: never local, and binding it sends nothing.
        config.http = Some("192.0.2.1:0".parse().expect("address"));
        let error = bind(&config, 16, Vec::new())
            .expect_err("not local")
            .to_string();
        assert!(error.contains("192.0.2.1"), "{error}");
        assert!(error.contains("not an address of this host"), "{error}");
    }

    #[test]
    fn answers_are_complete() {
        let answer = String::from_utf8(http_answer("404 Not Found", "no such name")).expect("text");
        assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
        assert!(
            answer.ends_with("\r\n\r\nrevboot front door: no such name\n"),
            "{answer}"
        );
        assert_eq!(alert(UNRECOGNIZED_NAME), [21, 3, 3, 0, 2, 2, 112]);
    }
}

//! Upgrades in place, the daemon's side: a new program takes over the process, its sockets
//! and its running instances, and nothing a client holds is dropped.
//!
//! 1. `revboot upgrade` (`POST /api/v1/daemon/upgrade`) answers at once and sets it going;
//!    the binary the daemon was started from (replaced by the new version, or not) must be
//!    an executable file, else the request is refused and nothing stops.
//! 2. HTTP and DNS stop reading, their sockets open (requests and queries wait in the
//!    kernel's queues); running builds are interrupted (the new program runs them again);
//!    the proxy hands its listeners and the front door's over, open, its relayed
//!    connections, paused with the bytes they had in flight, and the connections it holds
//!    while their instance boots, with what it read of them (those whose TLS the front door
//!    ended go with their TLS session's keys; those it cannot hand over, over a bound or
//!    caught mid-record, get [`DRAIN`] to end; warm connections go
//!    straight to the instances and never notice); the deployer hands its instances over
//!    (`revboot_deployer`'s `handover` module), booting ones too.
//! 3. The state — the sockets' descriptor numbers, the instances, the relayed connections
//!    (descriptors, instance, bytes in flight, a TLS session's keys: [`Secret`]), the held ones (descriptor, instance, bytes
//!    read), the connections handed to instances (their two ends and instance, to count
//!    open), the pids of the children it did not hand over, when the upgrade began, the
//!    count of upgrades — goes to a sealed memfd, never to the disk. The daemon's main
//!    thread, the parent of every instance, executes the binary with the same arguments and
//!    `REVBOOT_HANDOVER=fd:<n>` naming the memfd, keeping it and those descriptors open
//!    ([`revboot_sandbox::parent::exec`], which blocks SIGHUP, SIGTERM and SIGINT across
//!    the `execve`: the new program unblocks them once it handles them; from just before
//!    the state is written, any thread that takes one passes it to the main thread, where
//!    it stays pending). A SIGTERM or SIGINT that came during the upgrade until then is in
//!    the state too (`stop`, looked at once they are held): the new program sends itself
//!    SIGTERM, handled once it serves. On a node of a cluster the state holds its etcd
//!    lease, not revoked but kept alive until the exec and renewed right before it: the new
//!    program keeps the same lease ([`crate::cluster`] step 8). The pid stays; so do the
//!    instances' pids.
//! 4. The new program reads the memfd and closes it (a path instead of `fd:<n>` is the
//!    `<data>/handover.json` of an older program, read and removed), serves on the sockets
//!    it names, takes the instances back, listens again on the proxy's sockets, relays on
//!    the connections handed over, holds again the held ones, watches again those handed to
//!    instances, and answers what waited. It reaps, by pid, the children the old program
//!    left ([`reap_left`]: a waiting qemu killed at the hand-over), never any other.
//! 5. If the exec fails, the daemon executes `/proc/self/exe` (the program it runs now,
//!    even when its file was replaced) the same way. If that fails too, it exits, and the
//!    instances die with it, as they do when the daemon is killed: a restart cleans up.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use revboot_deployer::{ClientNet, HandedInstance, InstanceKey};
use revboot_proxy::{Failure, HandedConnection, HandedHeld, HandedRelay, Proxy, TlsSession};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

/// The environment variable that names the state file to the new program.
pub const ENV: &str = "REVBOOT_HANDOVER";
/// How long the connections the proxy cannot hand over (over a bound, TLS caught
/// mid-record or mid-handshake) are given to end before the exec; the others are kept at
/// once.
pub const DRAIN: Duration = Duration::from_secs(2);
/// How long the instances' tasks are given to hand over.
pub const HAND_OVER_LIMIT: Duration = Duration::from_secs(20);
/// How long the HTTP server is given to finish the requests it reads.
pub const HTTP_GRACE: Duration = Duration::from_secs(5);

/// What the old program leaves the new one (rule 3).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// The HTTP listener's descriptor.
    pub http: i32,
    /// The DNS server's UDP socket and TCP listener of each address, `listen`'s first.
    pub dns: Vec<(i32, i32)>,
    /// The proxy's listeners: service address and port, descriptor.
    pub listeners: Vec<(SocketAddr, i32)>,
    /// The front door's listeners (none from a program older than this field).
    #[serde(default)]
    pub front: Vec<i32>,
    /// The instances.
    pub instances: Vec<HandedInstance>,
    /// The relayed connections (none from a program older than this field).
    #[serde(default)]
    pub relays: Vec<Relay>,
    /// The connections handed to instances (none from a program older than this field).
    #[serde(default)]
    pub handed: Vec<Handed>,
    /// The connections held while their instance booted (none from a program older than
    /// this field).
    #[serde(default)]
    pub held: Vec<Held>,
    /// The children of the process that were not handed over, to reap: pid and start time
    /// (none from a program older than this field).
    #[serde(default)]
    pub children: Vec<(u32, u64)>,
    /// Upgrades in place before this one.
    pub upgrades: u64,
    /// When the upgrade was asked for, unix ms.
    pub requested_at_ms: u64,
    /// SIGTERM or SIGINT came during the upgrade: the new program stops once it serves.
    #[serde(default)]
    pub stop: bool,
    /// The node's etcd lease on a node of a cluster, not revoked: the new program keeps it
    /// alive, so that the node's record and its claims never leave etcd (none from a
    /// program older than this field, or on a single host).
    #[serde(default)]
    pub lease: Option<i64>,
}

/// A relayed connection in the state: [`HandedRelay`] with descriptor numbers, its
/// instance's key spelt out, and the bytes in flight in base64.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Relay {
    /// The client's socket.
    pub client: i32,
    /// The instance's socket.
    pub backend: i32,
    /// The client's address.
    pub peer: SocketAddr,
    /// Its instance.
    #[serde(flatten)]
    pub key: Key,
    /// Bytes for the instance, base64.
    pub to_backend: String,
    /// Bytes for the client, base64.
    pub to_client: String,
    /// The client's writing ended.
    pub client_done: bool,
    /// The instance's writing ended.
    pub backend_done: bool,
    /// The TLS session the front door ended, keys included (none for a plain relay, or
    /// from a program older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Secret>,
}

/// A TLS session's state, keys included, base64: it reaches no log, no `Debug` print and no
/// error message.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    fn new(session: &TlsSession) -> Secret {
        Secret(BASE64.encode(session.to_bytes()))
    }

    /// The session; the error says nothing of the bytes.
    fn take(&self) -> anyhow::Result<TlsSession> {
        let bytes = BASE64
            .decode(&self.0)
            .map_err(|_| anyhow::anyhow!("A TLS session that is not base64"))?;
        TlsSession::from_bytes(&bytes).context("A TLS session that does not read")
    }
}

impl Relay {
    /// `handed` as the state keeps it.
    pub fn new(handed: &HandedRelay) -> Relay {
        Relay {
            client: handed.client.as_raw_fd(),
            backend: handed.backend.as_raw_fd(),
            peer: handed.peer,
            key: Key::new(&handed.key),
            to_backend: BASE64.encode(&handed.to_backend),
            to_client: BASE64.encode(&handed.to_client),
            client_done: handed.client_done,
            backend_done: handed.backend_done,
            tls: handed.tls.as_ref().map(Secret::new),
        }
    }

    /// Takes the connection back: its descriptors and the rest.
    fn take(&self) -> anyhow::Result<HandedRelay> {
        let take = |fd: i32| revboot_sandbox::parent::take_fd(fd).map(std::net::TcpStream::from);
        let bytes = |text: &str| {
            BASE64
                .decode(text)
                .context("Bytes in flight that are not base64")
        };
        Ok(HandedRelay {
            client: take(self.client).context("Its client's socket")?,
            backend: take(self.backend).context("Its instance's socket")?,
            peer: self.peer,
            key: self.key.take()?,
            to_backend: bytes(&self.to_backend)?,
            to_client: bytes(&self.to_client)?,
            client_done: self.client_done,
            backend_done: self.backend_done,
            tls: self.tls.as_ref().map(Secret::take).transpose()?,
        })
    }
}

/// A held connection in the state: [`HandedHeld`] with its descriptor number, its
/// instance's key spelt out and the bytes read of it in base64.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Held {
    /// The client's socket.
    pub client: i32,
    /// The client's address.
    pub peer: SocketAddr,
    /// Its instance.
    #[serde(flatten)]
    pub key: Key,
    /// Bytes the client sent already, base64.
    pub early: String,
    /// `early` is still queued in the socket (peeked at, not read).
    pub peeked: bool,
    /// The client ended its writing.
    pub client_done: bool,
    /// What it is told if its instance fails: `close`, `http` or `tls`.
    pub failure: String,
}

impl Held {
    /// `handed` as the state keeps it.
    pub fn new(handed: &HandedHeld) -> Held {
        let failure = match handed.failure {
            Failure::Http => "http",
            Failure::Tls => "tls",
            _ => "close",
        };
        Held {
            client: handed.client.as_raw_fd(),
            peer: handed.peer,
            key: Key::new(&handed.key),
            early: BASE64.encode(&handed.early),
            peeked: handed.peeked,
            client_done: handed.client_done,
            failure: failure.to_owned(),
        }
    }

    /// Takes the connection back.
    fn take(&self) -> anyhow::Result<HandedHeld> {
        let client = revboot_sandbox::parent::take_fd(self.client).context("Its socket")?;
        Ok(HandedHeld {
            client: std::net::TcpStream::from(client),
            peer: self.peer,
            key: self.key.take()?,
            early: BASE64
                .decode(&self.early)
                .context("Bytes read that are not base64")?,
            peeked: self.peeked,
            client_done: self.client_done,
            failure: match self.failure.as_str() {
                "http" => Failure::Http,
                "tls" => Failure::Tls,
                _ => Failure::Close,
            },
        })
    }
}

/// An instance's key spelt out in the state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Key {
    /// The instance's service.
    pub service: String,
    /// The instance's revision.
    pub revision: String,
    /// A per-client instance's client network and prefix length.
    pub client_net: Option<(std::net::IpAddr, u8)>,
    /// Which replica of its revision (0 in the state of programs older than replicas).
    #[serde(default)]
    pub replica: u16,
}

impl Key {
    /// `key` as the state keeps it.
    pub fn new(key: &InstanceKey) -> Key {
        Key {
            service: key.service.clone(),
            revision: key.revision.to_string(),
            client_net: key.client.map(|net| (net.network(), net.len())),
            replica: key.replica,
        }
    }

    fn take(&self) -> anyhow::Result<InstanceKey> {
        Ok(InstanceKey {
            service: self.service.clone(),
            revision: self.revision.parse().ok().context("Not a revision")?,
            client: self.client_net.map(|(net, len)| ClientNet::new(net, len)),
            replica: self.replica,
        })
    }
}

/// A connection handed to an instance, as the state keeps it: [`HandedConnection`] with
/// its instance's key spelt out (no descriptor: the instance holds the connection).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handed {
    /// The connection's local end.
    pub local: SocketAddr,
    /// The client's end.
    pub peer: SocketAddr,
    /// Its instance.
    #[serde(flatten)]
    pub key: Key,
}

impl Handed {
    /// `handed` as the state keeps it.
    pub fn new(handed: &HandedConnection) -> Handed {
        Handed {
            local: handed.local,
            peer: handed.peer,
            key: Key::new(&handed.key),
        }
    }
}

/// The sockets a daemon keeps a second descriptor of, to hand them over.
#[derive(Debug)]
pub struct Sockets {
    /// HTTP.
    pub http: std::net::TcpListener,
    /// DNS over UDP and TCP, per address, `listen`'s first.
    pub dns: Vec<(std::net::UdpSocket, std::net::TcpListener)>,
}

impl Sockets {
    /// The DNS sockets' descriptor numbers, for the state.
    pub fn dns_numbers(&self) -> Vec<(i32, i32)> {
        let numbers = |(udp, tcp): &(std::net::UdpSocket, std::net::TcpListener)| {
            (udp.as_raw_fd(), tcp.as_raw_fd())
        };
        self.dns.iter().map(numbers).collect()
    }
}

/// What the proxy hands over (rule 2) and takes back (rule 4), but the front door's
/// listeners.
#[derive(Debug, Default)]
pub struct TakenOver {
    /// The proxy's listeners.
    pub listeners: Vec<(SocketAddr, std::net::TcpListener)>,
    /// The relayed connections.
    pub relays: Vec<HandedRelay>,
    /// The connections held while their instance booted.
    pub held: Vec<HandedHeld>,
    /// The connections handed to instances.
    pub handed: Vec<HandedConnection>,
}

impl TakenOver {
    /// The old program's proxy hands over (rule 2).
    pub async fn hand_over(proxy: &Proxy) -> TakenOver {
        let listeners = proxy.hand_over(DRAIN).await;
        TakenOver {
            listeners,
            relays: proxy.take_relays(),
            held: proxy.take_held(),
            handed: proxy.take_handed(),
        }
    }

    /// The new program's proxy takes it back (rule 4), once the deployer has adopted the
    /// instances.
    pub fn adopt(self, proxy: &Proxy) {
        for (address, listener) in self.listeners {
            proxy.adopt(address, listener);
        }
        proxy.adopt_relays(self.relays);
        proxy.adopt_held(self.held);
        proxy.adopt_handed(self.handed);
    }
}

/// What a daemon started by an upgrade got from its predecessor.
#[derive(Debug)]
pub struct Inherited {
    /// The sockets.
    pub sockets: Sockets,
    /// The front door's listeners.
    pub front: Vec<std::net::TcpListener>,
    /// The instances.
    pub instances: Vec<HandedInstance>,
    /// What the proxy takes back.
    pub proxy: TakenOver,
    /// Upgrades in place so far, this one included.
    pub upgrades: u64,
    /// When this upgrade was asked for, unix ms.
    pub requested_at_ms: u64,
    /// The node's etcd lease, to keep ([`State::lease`]).
    pub lease: Option<i64>,
}

/// The name of the memfd that carries the state (rule 3), as `/proc/self/fd` shows it.
const MEMFD_NAME: &str = "revboot-handover";

/// The state in a sealed memfd (rule 3): written whole, then sealed against any change.
fn state_memfd(state: &State) -> anyhow::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let text = serde_json::to_vec(state).expect("the state serialises");
    let fd = memfd_create(
        MEMFD_NAME,
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .context("Cannot create the hand-over memfd")?;
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, &text).context("Cannot write the hand-over memfd")?;
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_SEAL;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).context("Cannot seal the hand-over memfd")?;
    Ok(OwnedFd::from(file))
}

/// The state a previous program left: in the memfd `fd:<n>` names (rule 3), or, from an
/// older program, in the file the value names, removed once read. `None` when there is
/// nothing to take (a value left in the environment by an earlier upgrade of this process).
fn read_state(value: &std::ffi::OsStr) -> anyhow::Result<Option<State>> {
    use std::io::{Read as _, Seek as _};
    let text = match value.to_str().and_then(|value| value.strip_prefix("fd:")) {
        Some(number) => {
            let fd: i32 = number.parse().context("Not a descriptor number")?;
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
            if !link
                .to_string_lossy()
                .starts_with(&format!("/memfd:{MEMFD_NAME}"))
            {
                return Ok(None);
            }
            let mut file = std::fs::File::from(
                revboot_sandbox::parent::take_fd(fd).context("The hand-over memfd")?,
            );
            let mut text = String::new();
            file.rewind()
                .and_then(|()| file.read_to_string(&mut text))
                .context("Cannot read the hand-over memfd")?;
            text
        }
        None => {
            let file = Path::new(value);
            match std::fs::read_to_string(file) {
                Ok(text) => {
                    let _ = std::fs::remove_file(file);
                    text
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(error) => {
                    return Err(error).with_context(|| format!("Cannot read {}", file.display()));
                }
            }
        }
    };
    let state = serde_json::from_str(&text).context("Not a hand-over state")?;
    Ok(Some(state))
}

/// The inheritance of a program started by an upgrade in place (`REVBOOT_HANDOVER` names
/// the state, rule 4); `None` for a fresh start.
pub fn inherit() -> anyhow::Result<Option<Inherited>> {
    let Some(value) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    let Some(state) = read_state(&value)? else {
        return Ok(None);
    };
    let take = |fd: i32, what: &str| -> anyhow::Result<OwnedFd> {
        revboot_sandbox::parent::take_fd(fd).with_context(|| format!("The {what} handed over"))
    };
    let http = std::net::TcpListener::from(take(state.http, "HTTP listener")?);
    let mut dns = Vec::new();
    for &(udp, tcp) in &state.dns {
        dns.push((
            std::net::UdpSocket::from(take(udp, "DNS UDP socket")?),
            std::net::TcpListener::from(take(tcp, "DNS TCP listener")?),
        ));
    }
    let mut listeners = Vec::new();
    for (address, fd) in &state.listeners {
        match take(*fd, "proxy listener") {
            Ok(fd) => listeners.push((*address, std::net::TcpListener::from(fd))),
            Err(error) => warn!(%address, error = format!("{error:#}"), "proxy listener lost"),
        }
    }
    let mut front = Vec::new();
    for &fd in &state.front {
        match take(fd, "front door listener") {
            Ok(fd) => front.push(std::net::TcpListener::from(fd)),
            Err(error) => warn!(error = format!("{error:#}"), "front door listener lost"),
        }
    }
    let mut relays = Vec::new();
    for relay in &state.relays {
        match relay.take() {
            Ok(relay) => relays.push(relay),
            Err(error) => {
                warn!(peer = %relay.peer, error = format!("{error:#}"), "relayed connection lost")
            }
        }
    }
    let mut held = Vec::new();
    for connection in state.held.iter().take(revboot_proxy::MAX_RELAYS) {
        match connection.take() {
            Ok(connection) => held.push(connection),
            Err(error) => {
                warn!(peer = %connection.peer, error = format!("{error:#}"), "held connection lost")
            }
        }
    }
    let mut handed = Vec::new();
    for connection in state
        .handed
        .iter()
        .take(revboot_proxy::MAX_HANDED_CONNECTIONS)
    {
        match connection.key.take() {
            Ok(key) => handed.push(HandedConnection {
                local: connection.local,
                peer: connection.peer,
                key,
            }),
            Err(error) => {
                warn!(peer = %connection.peer, error = format!("{error:#}"), "handed connection not counted open")
            }
        }
    }
    info!(
        instances = state.instances.len(),
        listeners = listeners.len(),
        front = front.len(),
        relays = relays.len(),
        held = held.len(),
        handed = handed.len(),
        "taking over from the previous program (upgrade in place)"
    );
    reap_left(state.children);
    if state.stop {
        // Pending (blocked since the exec, rule 3) until this program handles it.
        info!("SIGTERM came during the upgrade: this program stops once it serves");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGTERM);
    }
    Ok(Some(Inherited {
        sockets: Sockets { http, dns },
        front,
        instances: state.instances,
        proxy: TakenOver {
            listeners,
            relays,
            held,
            handed,
        },
        upgrades: state.upgrades + 1,
        requested_at_ms: state.requested_at_ms,
        lease: state.lease,
    }))
}

/// Why an upgrade cannot start: `binary` is not an executable file.
pub fn check_binary(binary: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::metadata(binary) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(format!("{} is not an executable file", binary.display())),
        Err(error) => Err(format!("{}: {error}", binary.display())),
    }
}

/// Puts the state in a sealed memfd (rule 3) and executes `binary`, then `/proc/self/exe`
/// (rule 5), keeping `fds` and the memfd. Returns only if both failed.
pub fn exec(binary: &Path, state: &State, fds: &[BorrowedFd<'_>]) -> anyhow::Error {
    // From here a SIGHUP, SIGTERM or SIGINT stays pending across the exec, whichever thread
    // takes it; one taken before is seen now, the state's last look.
    if let Err(error) = revboot_sandbox::parent::hold_signals() {
        warn!(%error, "cannot hold SIGHUP, SIGTERM and SIGINT for the exec");
    }
    let mut state = state.clone();
    state.stop |= revboot_sandbox::parent::stop_signalled();
    let memfd = match state_memfd(&state) {
        Ok(memfd) => memfd,
        Err(error) => return error,
    };
    let mut fds = fds.to_vec();
    fds.push(memfd.as_fd());
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let env = [(ENV.into(), format!("fd:{}", memfd.as_raw_fd()).into())];
    info!(binary = %binary.display(), fds = fds.len(), "executing the new program");
    let first = revboot_sandbox::parent::exec(binary, &args, &env, &fds);
    error!(binary = %binary.display(), error = %first, "cannot execute the new program; executing the running one again");
    let second = revboot_sandbox::parent::exec(Path::new("/proc/self/exe"), &args, &env, &fds);
    anyhow::anyhow!(
        "Cannot execute {} ({first}) nor /proc/self/exe ({second})",
        binary.display()
    )
}

/// The descriptor numbers of what is handed over, for the state, and the descriptors to
/// keep open.
pub fn numbers<'a>(
    sockets: &'a Sockets,
    proxy: &'a TakenOver,
    front: &'a [std::net::TcpListener],
    consoles: &'a [OwnedFd],
) -> (Vec<(SocketAddr, i32)>, Vec<BorrowedFd<'a>>) {
    let mut keep = vec![sockets.http.as_fd()];
    keep.extend(front.iter().map(AsFd::as_fd));
    for (udp, tcp) in &sockets.dns {
        keep.push(udp.as_fd());
        keep.push(tcp.as_fd());
    }
    let mut numbered = Vec::new();
    for (address, listener) in &proxy.listeners {
        numbered.push((*address, listener.as_raw_fd()));
        keep.push(listener.as_fd());
    }
    keep.extend(consoles.iter().map(AsFd::as_fd));
    for relay in &proxy.relays {
        keep.push(relay.client.as_fd());
        keep.push(relay.backend.as_fd());
    }
    keep.extend(proxy.held.iter().map(|held| held.client.as_fd()));
    (numbered, keep)
}

/// Children of this process listed at most (rule 3).
const MAX_CHILDREN: usize = 4096;
/// How long [`reap_left`] waits for the children left to end.
const REAP_WITHIN: Duration = Duration::from_secs(60);
/// Pause between two looks at the children left.
const REAP_LOOK: Duration = Duration::from_millis(50);

/// The parent and start time (clock ticks after boot) of process `pid`, from its stat.
fn parent_and_start(pid: u32) -> Option<(u32, u64)> {
    revboot_sandbox::stat::read(pid).map(|stat| (stat.parent, stat.start_time))
}

/// This process's children but the instances `handed` (rule 3), each a pid and its start
/// time (a pid alone could be another process's by the time it is reaped): what it started
/// and does not hand over (a waiting qemu killed at the hand-over, not yet reaped).
pub fn children(handed: &[HandedInstance]) -> Vec<(u32, u64)> {
    let except: Vec<u32> = handed
        .iter()
        .filter_map(|instance| instance.record.footprint.pid)
        .collect();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !except.contains(pid))
        .filter_map(|pid| match parent_and_start(pid)? {
            (parent, start) if parent == me => Some((pid, start)),
            _ => None,
        })
        .take(MAX_CHILDREN)
        .collect()
}

/// Reaps, on a thread of its own, the children the previous program left (rule 4), by pid
/// and never any other (`waitpid(-1)` would take a child another part waits for; a pid
/// whose process has another start time is another process now): each as it ends, within
/// a minute (the start-up clean-up ends what is left in spare cgroups, a waiting qemu
/// still starting at the exec among them). One still running then is left, logged, never
/// killed: it could be an instance handed over without its pid.
pub fn reap_left(children: Vec<(u32, u64)>) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use nix::unistd::Pid;
    if children.is_empty() {
        return;
    }
    let me = std::process::id();
    let reap = move || {
        let mut left: Vec<(Pid, u64)> = children
            .iter()
            .take(MAX_CHILDREN)
            .map(|&(pid, start)| (Pid::from_raw(pid as i32), start))
            .collect();
        // Still the child it was (not reaped elsewhere, its pid not taken since).
        let same =
            |&(pid, start): &(Pid, u64)| parent_and_start(pid.as_raw() as u32) == Some((me, start));
        let start = std::time::Instant::now();
        while !left.is_empty() {
            if start.elapsed() >= REAP_WITHIN {
                warn!(children = ?left, "children the previous program left still run; not reaped");
                return;
            }
            left.retain(same);
            left.retain(|&(pid, _)| match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => true,
                Ok(_) => {
                    info!(%pid, "reaped a process the previous program left");
                    false
                }
                // Not a child (any more): nothing to reap.
                Err(_) => false,
            });
            std::thread::sleep(REAP_LOOK);
        }
    };
    if let Err(error) = std::thread::Builder::new()
        .name("revboot-reap".into())
        .spawn(reap)
    {
        warn!(%error, "cannot reap what the previous program left");
    }
}

/// Now, unix ms.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_from_a_program_without_handed_connections_reads_and_keys_keep_their_fields() {
        let old = r#"{"http":3,"dns":[],"listeners":[],"instances":[],"relays":[{"client":7,
            "backend":8,"peer":"127.0.0.1:4000","service":"hello","revision":"v1",
            "client_net":null,"to_backend":"","to_client":"","client_done":false,
            "backend_done":false}],"upgrades":0,"requested_at_ms":1}"#;
        let state: State = serde_json::from_str(old).expect("an older state");
        assert!(state.handed.is_empty());
        assert_eq!(state.relays[0].key.service, "hello");
        let text = serde_json::to_value(&state).expect("serialises");
        assert_eq!(text["relays"][0]["revision"], "v1");
        assert_eq!(text["handed"], serde_json::json!([]));
        // A plain relay's state says nothing of TLS; a TLS session's bytes never print.
        assert!(state.relays[0].tls.is_none());
        assert!(text["relays"][0].get("tls").is_none());
        let mut relay = state.relays[0].clone();
        relay.tls = Some(Secret("c2VjcmV0IGtleXM=".to_owned()));
        let printed = format!("{relay:?}");
        assert!(!printed.contains("c2VjcmV0"), "{printed}");
        let error = format!(
            "{:#}",
            relay.tls.as_ref().expect("set").take().expect_err("no")
        );
        assert!(
            !error.contains("secret") && !error.contains("c2VjcmV0"),
            "{error}"
        );
    }

    #[test]
    #[allow(clippy::zombie_processes)] // Reaped by `reap_left`: what is tested.
    fn the_children_left_are_reaped_by_pid_and_start_time_and_no_other() {
        let zombie = |child: &std::process::Child| {
            let pid = child.id();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let stat = revboot_sandbox::stat::read(pid).expect("stat");
                if stat.state == 'Z' {
                    return (pid, stat.start_time);
                }
                assert!(std::time::Instant::now() < deadline, "{pid} did not end");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let left = std::process::Command::new("true").spawn().expect("true");
        let mine = std::process::Command::new("true").spawn().expect("true");
        let (left_pid, left_start) = zombie(&left);
        let (mine_pid, mine_start) = zombie(&mine);
        // The second one's start time is not the one listed: another process's, not reaped.
        reap_left(vec![(left_pid, left_start), (mine_pid, mine_start + 1)]);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::path::Path::new(&format!("/proc/{left_pid}")).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{left_pid} not reaped"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut mine = mine;
        assert!(mine.wait().expect("its status is still there").success());
    }

    #[test]
    fn the_state_goes_through_a_sealed_memfd_and_an_older_programs_file_still_reads() {
        use std::io::Write as _;
        use std::os::fd::IntoRawFd as _;
        let held = Held {
            client: 9,
            peer: "127.0.0.1:4000".parse().expect("an address"),
            key: Key {
                service: "hello".into(),
                revision: "v1".into(),
                client_net: None,
                replica: 0,
            },
            early: BASE64.encode(b"GET / HTTP/1.1\r\n"),
            peeked: false,
            client_done: false,
            failure: "http".into(),
        };
        let state = State {
            http: 3,
            dns: Vec::new(),
            listeners: Vec::new(),
            front: Vec::new(),
            instances: Vec::new(),
            relays: Vec::new(),
            handed: Vec::new(),
            held: vec![held],
            children: vec![(42, 7)],
            upgrades: 1,
            requested_at_ms: 5,
            stop: false,
            lease: Some(7_587_883_422_519_000_001),
        };
        let memfd = state_memfd(&state).expect("a memfd");
        let mut writer = std::fs::File::from(memfd.try_clone().expect("a second descriptor"));
        assert!(writer.write_all(b"{}").is_err(), "the memfd is sealed");
        let value = format!("fd:{}", memfd.into_raw_fd());
        let read = read_state(value.as_ref())
            .expect("it reads")
            .expect("a state");
        assert_eq!((read.children, read.upgrades), (vec![(42, 7)], 1));
        assert_eq!(read.lease, Some(7_587_883_422_519_000_001));
        assert_eq!(read.held[0].key.service, "hello");
        assert_eq!(read.held[0].failure, "http");
        // A descriptor that is not the state's memfd (standard input) is nothing to take.
        assert!(read_state("fd:0".as_ref()).expect("no error").is_none());

        // The file an older program wrote: read and removed.
        let dir = tempfile::tempdir().expect("a directory");
        let file = dir.path().join("handover.json");
        std::fs::write(&file, serde_json::to_string(&state).expect("JSON")).expect("write");
        let read = read_state(file.as_os_str())
            .expect("it reads")
            .expect("a state");
        assert_eq!(read.requested_at_ms, 5);
        assert!(!file.exists());
        assert!(read_state(file.as_os_str()).expect("no error").is_none());
    }
}

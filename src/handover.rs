//! Upgrades in place, the daemon's side: a new program takes over the process, its sockets
//! and its running instances, and nothing a client holds is dropped.
//!
//! 1. `revboot upgrade` (`POST /api/v1/daemon/upgrade`) answers at once and sets it going;
//!    the binary the daemon was started from (replaced by the new version, or not) must be
//!    an executable file, else the request is refused and nothing stops.
//! 2. HTTP and DNS stop reading, their sockets open (requests and queries wait in the
//!    kernel's queues); running builds are interrupted (the new program runs them again);
//!    the proxy hands its listeners and the front door's over, open, and its relayed
//!    connections, paused with the bytes they had in flight (those it cannot hand over get
//!    [`DRAIN`] to end; warm connections go straight to the instances and never notice);
//!    the deployer hands its instances over (`revboot_deployer`'s `handover` module).
//! 3. The state goes to `<data>/handover.json` (mode 0600): the sockets' descriptor numbers,
//!    the instances, the relayed connections (descriptors, instance, bytes in flight), the
//!    connections handed to instances (their two ends and instance, to count open), when
//!    the upgrade began, the count of upgrades. The daemon's main
//!    thread, the parent of every instance, executes the binary with the same arguments and
//!    `REVBOOT_HANDOVER` naming the file, keeping those descriptors open
//!    ([`revboot_sandbox::parent::exec`]). The pid stays; so do the instances' pids.
//! 4. The new program reads and removes the file, serves on the sockets it names, takes
//!    the instances back, listens again on the proxy's sockets, relays on the connections
//!    handed over, watches again those handed to instances, and answers what waited.
//! 5. If the exec fails, the daemon executes `/proc/self/exe` (the program it runs now,
//!    even when its file was replaced) the same way. If that fails too, it exits, and the
//!    instances die with it, as they do when the daemon is killed: a restart cleans up.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use revboot_deployer::{ClientNet, HandedInstance, InstanceKey};
use revboot_proxy::{HandedConnection, HandedRelay};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

/// The environment variable that names the state file to the new program.
pub const ENV: &str = "REVBOOT_HANDOVER";
/// How long relayed connections are given to end before the exec.
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
    /// Upgrades in place before this one.
    pub upgrades: u64,
    /// When the upgrade was asked for, unix ms.
    pub requested_at_ms: u64,
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
}

impl Key {
    /// `key` as the state keeps it.
    pub fn new(key: &InstanceKey) -> Key {
        Key {
            service: key.service.clone(),
            revision: key.revision.to_string(),
            client_net: key.client.map(|net| (net.network(), net.len())),
        }
    }

    fn take(&self) -> anyhow::Result<InstanceKey> {
        Ok(InstanceKey {
            service: self.service.clone(),
            revision: self.revision.parse().ok().context("Not a revision")?,
            client: self.client_net.map(|(net, len)| ClientNet::new(net, len)),
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

/// What a daemon started by an upgrade got from its predecessor.
#[derive(Debug)]
pub struct Inherited {
    /// The sockets.
    pub sockets: Sockets,
    /// The proxy's listeners.
    pub listeners: Vec<(SocketAddr, std::net::TcpListener)>,
    /// The front door's listeners.
    pub front: Vec<std::net::TcpListener>,
    /// The instances.
    pub instances: Vec<HandedInstance>,
    /// The relayed connections.
    pub relays: Vec<HandedRelay>,
    /// The connections handed to instances.
    pub handed: Vec<HandedConnection>,
    /// Upgrades in place so far, this one included.
    pub upgrades: u64,
    /// When this upgrade was asked for, unix ms.
    pub requested_at_ms: u64,
}

/// The state file in `data`.
pub fn state_file(data: &Path) -> PathBuf {
    data.join("handover.json")
}

/// The inheritance of a program started by an upgrade in place (`REVBOOT_HANDOVER` names
/// a state file that exists); `None` for a fresh start. The file is removed.
pub fn inherit() -> anyhow::Result<Option<Inherited>> {
    let Some(file) = std::env::var_os(ENV).map(PathBuf::from) else {
        return Ok(None);
    };
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        // Left in the environment by an earlier upgrade of this process: nothing to take.
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("Cannot read {}", file.display())),
    };
    let _ = std::fs::remove_file(&file);
    let state: State = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a hand-over state", file.display()))?;
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
        handed = handed.len(),
        "taking over from the previous program (upgrade in place)"
    );
    Ok(Some(Inherited {
        sockets: Sockets { http, dns },
        listeners,
        front,
        instances: state.instances,
        relays,
        handed,
        upgrades: state.upgrades + 1,
        requested_at_ms: state.requested_at_ms,
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

/// Writes the state (rule 3) and executes `binary`, then `/proc/self/exe` (rule 5),
/// keeping `fds`. Returns only if both failed.
pub fn exec(data: &Path, binary: &Path, state: &State, fds: &[BorrowedFd<'_>]) -> anyhow::Error {
    let file = state_file(data);
    let text = serde_json::to_string(state).expect("the state serialises");
    if let Err(error) = revboot_sandbox::secret::write_private(&file, &text) {
        return anyhow::Error::new(error).context(format!("Cannot write {}", file.display()));
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let env = [(ENV.into(), file.clone().into_os_string())];
    info!(binary = %binary.display(), fds = fds.len(), "executing the new program");
    let first = revboot_sandbox::parent::exec(binary, &args, &env, fds);
    error!(binary = %binary.display(), error = %first, "cannot execute the new program; executing the running one again");
    let second = revboot_sandbox::parent::exec(Path::new("/proc/self/exe"), &args, &env, fds);
    let _ = std::fs::remove_file(&file);
    anyhow::anyhow!(
        "Cannot execute {} ({first}) nor /proc/self/exe ({second})",
        binary.display()
    )
}

/// The descriptor numbers of what is handed over, for the state, and the descriptors to
/// keep open.
pub fn numbers<'a>(
    sockets: &'a Sockets,
    listeners: &'a [(SocketAddr, std::net::TcpListener)],
    front: &'a [std::net::TcpListener],
    consoles: &'a [OwnedFd],
    relays: &'a [HandedRelay],
) -> (Vec<(SocketAddr, i32)>, Vec<BorrowedFd<'a>>) {
    let mut keep = vec![sockets.http.as_fd()];
    keep.extend(front.iter().map(AsFd::as_fd));
    for (udp, tcp) in &sockets.dns {
        keep.push(udp.as_fd());
        keep.push(tcp.as_fd());
    }
    let mut numbered = Vec::new();
    for (address, listener) in listeners {
        numbered.push((*address, listener.as_raw_fd()));
        keep.push(listener.as_fd());
    }
    keep.extend(consoles.iter().map(AsFd::as_fd));
    for relay in relays {
        keep.push(relay.client.as_fd());
        keep.push(relay.backend.as_fd());
    }
    (numbered, keep)
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
    }
}

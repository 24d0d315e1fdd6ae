//! Network namespaces a test makes for itself, joined by veth pairs: where a test may use
//! addresses of the documentation prefixes (`2001:db8::/32`, `192.0.2.0/24`, …) and add
//! routes without touching the host's network.
//!
//! A [`Netns`] is held by a child process (`unshare --net sleep`): it lives while the child
//! and the processes started in it do. Dropping it kills the child, which removes the
//! namespace with everything in it, interfaces and routes included, once the processes the
//! test started in it are gone too; a test killed outright leaves it for at most the
//! child's `sleep`. Commands enter it with `nsenter --net=/proc/<holder>/ns/net`. The tools
//! are `ip` (iproute2), `unshare` and `nsenter` (util-linux): the ones an operator uses.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The longest a namespace lives: its holder's `sleep`, so a test killed outright leaves
/// nothing behind for longer than this.
const LIFETIME_S: u32 = 900;

/// A network namespace held by a child process; removed when dropped.
#[derive(Debug)]
pub struct Netns {
    holder: Child,
}

impl Netns {
    /// A new network namespace with `lo` up. Panics if it cannot be made (tests run as root).
    pub fn new() -> Netns {
        let holder = Command::new("unshare")
            .args(["--net", "--", "sleep", &LIFETIME_S.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare --net (util-linux) runs");
        let netns = Netns { holder };
        // The child enters its namespace before it runs `sleep`: wait until its namespace is
        // not ours any more (bounded).
        let ours = std::fs::read_link("/proc/self/ns/net").expect("our netns");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(netns.path()).ok().as_ref() == Some(&ours)
            || std::fs::read_link(netns.path()).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "unshare --net did not take effect"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// The namespace's file, for `nsenter --net=` and `ip link set … netns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.holder.id()))
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        enter(&self.path(), program)
    }

    /// Runs `ip <args>` inside the namespace; panics with its output if it fails.
    pub fn ip(&self, args: &[&str]) {
        let output = self
            .command("ip")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ip (iproute2) runs");
        assert!(
            output.status.success(),
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Adds `address/len` to `device`, usable at once (no duplicate address detection).
    pub fn add_address(&self, device: &str, cidr: &str) {
        if cidr.contains(':') {
            self.ip(&["-6", "addr", "add", cidr, "dev", device, "nodad"]);
        } else {
            self.ip(&["addr", "add", cidr, "dev", device]);
        }
    }

    /// Routes `prefix` through `gateway`.
    pub fn add_route(&self, prefix: &str, gateway: &str) {
        self.ip(&["route", "add", prefix, "via", gateway]);
    }

    /// Joins `self` and `peer` with a veth pair, `name` here and `peer_name` there, both up.
    pub fn veth(&self, name: &str, peer: &Netns, peer_name: &str) {
        let peer_path = peer.path();
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            peer_name,
            "netns",
            &peer_path.to_string_lossy(),
        ]);
        self.ip(&["link", "set", name, "up"]);
        peer.ip(&["link", "set", peer_name, "up"]);
    }
}

/// A command that runs `program` inside the network namespace at `netns` (a
/// [`Netns::path`], kept by a caller that outlives the borrow of its [`Netns`]).
pub fn enter(netns: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(program);
    command
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

//! A real etcd cluster for a test: `etcd` (Debian `etcd-server`) members on loopback.
//!
//! 1. Each cluster gets addresses of its own: `127.<a>.<b>.<member>` with `a` from the
//!    process id and `b` from a counter of the process, on ports no default etcd uses
//!    (client 32379, peer 32380), so two test runs, two tests of one run, and an etcd with
//!    its defaults on the host never meet. Nothing is bound to find a port: etcd binds, and
//!    a cluster that does not become healthy (an address taken after all) is stopped and
//!    started again on the next addresses, a bounded number of times.
//! 2. Every member runs under `timeout -s KILL` ([`LIFETIME_S`]): a test killed outright
//!    leaves no etcd behind for longer than that. Dropping the cluster kills the members and
//!    removes their data.
//! 3. [`EtcdCluster::kill`] kills one member with SIGKILL (etcd keeps working with 2 of 3,
//!    refuses writes with 1 of 3); [`EtcdCluster::restart`] starts it again on its data.
//! 4. [`EtcdCluster::start_in`] runs the members in a network namespace the test made, on
//!    addresses the test gives (documentation prefixes there), on etcd's default ports, which
//!    nothing else in that namespace uses; its health is asked from inside with curl.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The longest a member lives.
pub const LIFETIME_S: u32 = 1200;
/// The client port of every member (on its own address).
const CLIENT_PORT: u16 = 32379;
/// The peer port of every member.
const PEER_PORT: u16 = 32380;
/// How long a new cluster may take to become healthy.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// One member.
#[derive(Debug)]
struct Member {
    name: String,
    ip: String,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// An etcd cluster of a test.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    initial: String,
    token: String,
    /// The network namespace the members run in (a [`crate::netns::Netns::path`]).
    netns: Option<PathBuf>,
    client_port: u16,
    peer_port: u16,
}

impl EtcdCluster {
    /// Starts `size` members in `dir` and waits (bounded) until every one is healthy.
    /// Panics when it cannot (tests only).
    pub fn start(size: usize, dir: &std::path::Path) -> EtcdCluster {
        for _ in 0..5 {
            let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
            let a = 30 + std::process::id() % 50;
            let b = 1 + n % 250;
            let ips: Vec<String> = (1..=size).map(|i| format!("127.{a}.{b}.{i}")).collect();
            let mut cluster = EtcdCluster::spawn(&ips, dir, &format!("{a}-{b}"), None);
            if cluster.wait_healthy() {
                return cluster;
            }
            cluster.stop_all();
        }
        panic!("etcd did not start healthy in {}", dir.display());
    }

    /// Starts one member on each of `ips` in the network namespace at `netns` (rule 4), its
    /// data in `dir`, and waits (bounded) until every one is healthy. Panics when it cannot.
    pub fn start_in(netns: &std::path::Path, ips: &[&str], dir: &std::path::Path) -> EtcdCluster {
        let ips: Vec<String> = ips.iter().map(|ip| (*ip).to_owned()).collect();
        let mut cluster = EtcdCluster::spawn(&ips, dir, "ns", Some(netns.to_owned()));
        assert!(
            cluster.wait_healthy(),
            "etcd did not start healthy in {}",
            dir.display()
        );
        cluster
    }

    fn spawn(
        ips: &[String],
        dir: &std::path::Path,
        tag: &str,
        netns: Option<PathBuf>,
    ) -> EtcdCluster {
        let token = format!("revboot-test-{}-{tag}", std::process::id());
        let members: Vec<Member> = (1..=ips.len())
            .map(|i| Member {
                name: format!("m{i}"),
                ip: ips[i - 1].clone(),
                data: dir.join(format!("etcd-{tag}-m{i}")),
                log: dir.join(format!("etcd-{tag}-m{i}.log")),
                child: None,
            })
            .collect();
        let (client_port, peer_port) = match netns {
            Some(_) => (2379, 2380),
            None => (CLIENT_PORT, PEER_PORT),
        };
        let initial = members
            .iter()
            .map(|m| format!("{}=http://{}:{peer_port}", m.name, m.ip))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial,
            token,
            netns,
            client_port,
            peer_port,
        };
        for i in 0..ips.len() {
            cluster.launch(i, "new");
        }
        cluster
    }

    fn launch(&mut self, i: usize, state: &str) {
        let member = &self.members[i];
        let client = format!("http://{}:{}", member.ip, self.client_port);
        let peer = format!("http://{}:{}", member.ip, self.peer_port);
        let log = std::fs::File::create(&member.log).expect("etcd log");
        let mut command = match &self.netns {
            Some(netns) => crate::netns::enter(netns, "timeout"),
            None => Command::new("timeout"),
        };
        let child = command
            .args(["-s", "KILL", &LIFETIME_S.to_string(), "etcd"])
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&member.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .expect("etcd (etcd-server) runs under timeout");
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&mut self) -> bool {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        while Instant::now() < deadline {
            let exited = self.members.iter_mut().any(|m| {
                m.child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_some()))
            });
            if exited {
                return false;
            }
            if (0..self.members.len()).all(|i| self.healthy(i)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// True when member `i` answers `/health` with a leader.
    pub fn healthy(&self, i: usize) -> bool {
        if let Some(netns) = &self.netns {
            let url = format!("http://{}:{}/health", self.members[i].ip, self.client_port);
            let output = crate::netns::enter(netns, "curl")
                .args(["-s", "--max-time", "3", &url])
                .stdin(Stdio::null())
                .output();
            return output
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\""));
        }
        let address: SocketAddr = format!("{}:{}", self.members[i].ip, self.client_port)
            .parse()
            .expect("an address");
        let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_secs(2)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
        if stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }

    /// The client URLs, for `[cluster] etcd`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}:{}", m.ip, self.client_port))
            .collect()
    }

    /// `[cluster] etcd = [...]` as TOML.
    pub fn toml_endpoints(&self) -> String {
        let quoted: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        format!("[{}]", quoted.join(", "))
    }

    /// Kills member `i` with SIGKILL and waits for it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            kill_tree(&mut child);
        }
    }

    /// Starts member `i` again on its data, and waits (bounded) until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.launch(i, "existing");
        let deadline = Instant::now() + HEALTHY_WITHIN;
        while !self.healthy(i) {
            assert!(
                Instant::now() < deadline,
                "etcd member {i} did not come back"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The log of member `i`.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
            let _ = std::fs::remove_dir_all(&self.members[i].data);
        }
    }
}

/// SIGKILL for `timeout`'s child (etcd) and then `timeout` itself, which SIGKILL does not
/// pass on.
fn kill_tree(child: &mut Child) {
    let pid = child.id();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for etcd in children.split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", etcd]).status();
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

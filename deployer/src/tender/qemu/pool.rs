//! qemu processes started ahead, waiting for a snapshot: a restore then pays for loading the
//! guest's state and resuming it, not for qemu's own start-up (tens of milliseconds).
//!
//! 1. An [`Incoming`] is qemu started with the machine of an instance of `memory_mib` but no
//!    kernel, no port forward and `-incoming defer`, in the same sandbox as every qemu
//!    instance (the `jail` module) under a uid of its own (leased from the deployer's uids)
//!    and cgroups named `pool-…`; its QMP session is up and migration events are on. It may
//!    bind one TCP port: the manifest port when instances listen on it directly, else port
//!    0, the kernel's pick as it binds its forward (the `forward` module).
//! 2. [`Pool`] keeps at most `size` of them, all of the shape of the last snapshot saved
//!    or restored (memory, port), and with that snapshot loaded ahead (paused); one refill
//!    runs at a time, on the deployer's runtime, after each restore.
//!    [`super::QemuTender::prepare`] takes one for a revision known to have a snapshot:
//!    loaded with it if there is one, else one that loaded nothing.
//! 3. [`Incoming::load`]: `migrate-incoming` on a unix socket in its scratch directory, the
//!    daemon streams the snapshot in, waits for the `MIGRATION` event `completed`; the guest
//!    stays paused. A qemu of another version than the snapshot's refuses it before anything
//!    is sent. [`Incoming::resume`]: its cgroup limits, the instance's port forward
//!    (`hostfwd_add`), `cont`, then the port the forward bound (`info usernet`, while the
//!    guest runs). A summon that finds its snapshot loaded ahead pays only for the resume.
//! 4. A dropped [`Incoming`] is killed; its cgroups, scratch directory and uid go back once
//!    it is reaped (on a thread of its own: the reap is a blocking wait).
//!
//! Every qemu gets a fresh 32-byte seed in fw_cfg (`opt/org.revboot/seed`, from a file in
//! its scratch directory, so it is in no argument list): a restored guest finds another seed
//! than the one it read at boot, and reseeds (the rules for image authors are in the crate
//! docs).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Read as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use revboot_sandbox::spawn;
use revboot_sandbox::uids::{Lease, UidPool};
use tracing::{debug, info, warn};

use super::forward::Forward;
use super::jail::{self, Cell, Jail, Jailed};
use super::qmp::{Qmp, qmp_connect};
use super::snapshot::Found;
use crate::tender::BootError;
use revboot_store::Revision;

/// The most qemu processes a pool may keep waiting.
pub const MAX_POOL: usize = 16;
/// How long a waiting qemu may take to bring QMP up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a restore may take, from `migrate-incoming` to `cont`.
pub(super) const RESTORE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a refill waits before it starts each qemu.
const REFILL_PAUSE: Duration = Duration::from_millis(30);
/// The fw_cfg file of the seed.
pub(super) const SEED_FILE: &str = "opt/org.revboot/seed";
/// The fw_cfg file of the instance's variables.
pub(super) const ENV_FILE: &str = "opt/org.revboot/env";

/// What a waiting qemu is made for: a guest memory size and, when instances listen on the
/// manifest port, that port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Shape {
    pub(super) memory_mib: u64,
    pub(super) port: Option<u16>,
}

/// A qemu waiting for a snapshot (module doc, step 1).
#[derive(Debug)]
pub(super) struct Incoming {
    pub(super) jailed: Option<Jailed>,
    pub(super) qmp: Option<Qmp>,
    /// Its scratch directory on the host, bound at [`jail::RUN`].
    pub(super) scratch: PathBuf,
    /// True when the scratch directory is its own (a pool's), removed with it.
    pub(super) owns_scratch: bool,
    /// Its uid, when it is its own (a pool's).
    pub(super) lease: Option<Lease>,
    /// The one port it may bind (0: the kernel's pick).
    pub(super) port: u16,
    pub(super) shape: Shape,
    /// The snapshot it has loaded (paused), if any.
    pub(super) loaded: Option<Found>,
}

/// Writes a fresh seed for a qemu into `scratch` (module doc): 64 hex digits, readable by
/// `uid` alone.
pub(super) fn write_seed(scratch: &Path, uid: u32) -> std::io::Result<()> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    write_for(&scratch.join("seed"), uid, hex::encode(bytes).as_bytes())
}

/// Writes `bytes` to a new file at `path` that `uid` alone may read.
fn write_for(path: &Path, uid: u32, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)?;
    file.write_all(bytes)?;
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
}

/// The `-fw_cfg` argument that hands the seed of [`write_seed`] to the guest.
pub(super) fn seed_arg() -> String {
    format!("name={SEED_FILE},file={}/seed", jail::RUN)
}

/// The instance's variables as the guest reads them in fw_cfg ([`ENV_FILE`]): `NAME=value`
/// entries, each ended by a NUL byte (an entry holding one is left out: no environment
/// could hold it either).
pub(super) fn env_bytes(variables: &std::collections::BTreeMap<&str, &str>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (name, value) in variables {
        if name.contains('\0') || value.contains('\0') {
            continue;
        }
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(b'=');
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
    }
    bytes
}

/// Writes the variables of [`env_bytes`] for a qemu into `scratch`, readable by `uid`
/// alone: qemu reads it as it starts, and it is removed once qemu's QMP session is up
/// ([`forget_env`]), so that no secret stays in a file.
pub(super) fn write_env(scratch: &Path, uid: u32, env: &[u8]) -> std::io::Result<()> {
    write_for(&scratch.join("env"), uid, env)
}

/// Removes the variables' file of a qemu whose QMP socket is `qmp`: once QMP answers, qemu
/// has read it.
pub(super) fn forget_env(qmp: &Path) {
    let _ = std::fs::remove_file(qmp.with_file_name("env"));
}

/// The `-fw_cfg` argument that hands the variables of [`write_env`] to the guest.
pub(super) fn env_arg() -> String {
    format!("name={ENV_FILE},file={}/env", jail::RUN)
}

impl Incoming {
    /// Starts qemu with `args` (an incoming machine) in `cell`, and its QMP session.
    /// The guest's variables are `env` ([`env_bytes`]; none for a pool's).
    pub(super) async fn start(
        jail: &Arc<Jail>,
        cell: &Cell<'_>,
        args: Vec<OsString>,
        shape: Shape,
        env: &[u8],
    ) -> Result<Incoming, BootError> {
        let setup = |what: &str, message: String| BootError::Setup {
            what: what.to_owned(),
            source: std::io::Error::other(message),
        };
        write_seed(cell.scratch, cell.uid)
            .map_err(|error| setup("the guest's seed", error.to_string()))?;
        write_env(cell.scratch, cell.uid, env)
            .map_err(|error| setup("the guest's variables", error.to_string()))?;
        let socket = cell.scratch.join("qmp.sock");
        let _ = std::fs::remove_file(&socket);
        let jailed = jail.start(cell, args).await?;
        let mut incoming = Incoming {
            jailed: Some(jailed),
            qmp: None,
            scratch: cell.scratch.to_owned(),
            owns_scratch: false,
            lease: None,
            port: cell.port,
            shape,
            loaded: None,
        };
        let connected = tokio::time::timeout(START_TIMEOUT, async {
            let mut qmp = qmp_connect(socket.clone())
                .await
                .map_err(|e| e.to_string())?;
            forget_env(&socket);
            qmp.migration_events().await.map_err(|e| e.to_string())?;
            Ok::<Qmp, String>(qmp)
        })
        .await
        .unwrap_or_else(|_| Err("QMP did not come up".into()))
        .map_err(|message| setup("a qemu waiting for a snapshot", message))?;
        incoming.qmp = Some(connected);
        Ok(incoming)
    }

    /// qemu's version.
    pub(super) fn version(&self) -> &str {
        self.qmp.as_ref().map_or("", Qmp::version)
    }

    /// Loads `snapshot`; the guest stays paused (module doc, step 3). Once only.
    pub(super) async fn load(&mut self, snapshot: &Found) -> Result<(), String> {
        if snapshot.meta.qemu != self.version() {
            return Err(format!(
                "it was made by qemu {}, this is {}",
                snapshot.meta.qemu,
                self.version()
            ));
        }
        if self.loaded.is_some() {
            return Err("this qemu has loaded a snapshot already".into());
        }
        let qmp = self.qmp.as_mut().ok_or("no QMP session")?;
        let socket = self.scratch.join("restore.sock");
        let _ = std::fs::remove_file(&socket);
        let steps = async {
            qmp.call(
                "migrate-incoming",
                Some(serde_json::json!({ "uri": format!("unix:{}/restore.sock", jail::RUN) })),
            )
            .await
            .map_err(|e| e.to_string())?;
            let mut file = tokio::fs::File::open(&snapshot.stream)
                .await
                .map_err(|e| format!("open {}: {e}", snapshot.stream.display()))?;
            let mut stream = tokio::net::UnixStream::connect(&socket)
                .await
                .map_err(|e| format!("connect to qemu: {e}"))?;
            tokio::io::copy(&mut file, &mut stream)
                .await
                .map_err(|e| format!("stream the snapshot: {e}"))?;
            drop(stream);
            if !qmp.migrated().await {
                return Err("qemu did not load the snapshot".to_owned());
            }
            Ok(())
        };
        let loaded = tokio::time::timeout(RESTORE_TIMEOUT, steps)
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        let _ = std::fs::remove_file(&socket);
        loaded?;
        self.loaded = Some(snapshot.clone());
        Ok(())
    }

    /// Resumes the loaded guest with the port forward `forward` and the instance's cgroup
    /// `limits`; where the forward listens.
    pub(super) async fn resume(
        &mut self,
        forward: &Forward,
        limits: revboot_sandbox::cgroup::Limits,
    ) -> Result<std::net::SocketAddr, String> {
        if self.loaded.is_none() {
            return Err("no snapshot loaded".into());
        }
        if let Some(groups) = self.jailed.as_mut().and_then(|j| j.groups.as_mut()) {
            groups
                .limit(limits)
                .map_err(|e| format!("set the cgroup limits: {e}"))?;
        }
        let qmp = self.qmp.as_mut().ok_or("no QMP session")?;
        let steps = async {
            let said = qmp
                .call(
                    "human-monitor-command",
                    Some(serde_json::json!({
                        "command-line": format!("hostfwd_add net0 {}", forward.arg())
                    })),
                )
                .await
                .map_err(|e| e.to_string())?;
            let said = said.as_str().unwrap_or("").trim();
            if !said.is_empty() {
                return Err(format!("the port forward was refused: {said}"));
            }
            // The guest runs while the forward's port is learnt: nothing reaches it before
            // that (the instance is not ready until its backend is known), and the round
            // trip is then off the boot's path.
            qmp.execute("cont").await.map_err(|e| e.to_string())?;
            match forward.known() {
                Some(backend) => Ok(backend),
                None => super::forward::learn(qmp, forward.host).await,
            }
        };
        tokio::time::timeout(RESTORE_TIMEOUT, steps)
            .await
            .unwrap_or_else(|_| Err("timed out".into()))
    }

    /// The process, its session, and what must go once it has ended, for the supervisor.
    pub(super) fn into_parts(mut self) -> (Jailed, Qmp, Option<PathBuf>, Option<Lease>) {
        let jailed = self
            .jailed
            .take()
            .expect("an incoming qemu has its process");
        let qmp = self
            .qmp
            .take()
            .expect("an incoming qemu has its QMP session");
        let scratch = self.owns_scratch.then(|| self.scratch.clone());
        (jailed, qmp, scratch, self.lease.take())
    }
}

impl Incoming {
    /// Kills the qemu and waits (bounded) until it is reaped and its resources are gone.
    pub(super) async fn discard(mut self) {
        let Some(jailed) = self.jailed.take() else {
            return;
        };
        let scratch = self.owns_scratch.then(|| self.scratch.clone());
        let lease = self.lease.take();
        spawn::send_signal(jailed.pidfd.as_raw_fd(), libc::SIGKILL);
        let reap = tokio::task::spawn_blocking(move || reap(jailed, scratch, lease));
        if tokio::time::timeout(RESTORE_TIMEOUT, reap).await.is_err() {
            warn!("a killed qemu was not reaped in time");
        }
    }
}

/// After SIGKILL: waits for qemu's end, then frees what it held.
fn reap(jailed: Jailed, scratch: Option<PathBuf>, lease: Option<Lease>) {
    let _ = spawn::reap_blocking(jailed.pidfd.as_raw_fd());
    if let Some(groups) = jailed.groups {
        groups.remove();
    }
    if let Some(scratch) = scratch {
        let _ = std::fs::remove_dir_all(scratch);
    }
    drop::<(OwnedFd, Option<Lease>)>((jailed.console, lease));
}

impl Drop for Incoming {
    /// Kills a qemu nobody restored into; its resources go once it is reaped.
    fn drop(&mut self) {
        let Some(jailed) = self.jailed.take() else {
            return;
        };
        spawn::send_signal(jailed.pidfd.as_raw_fd(), libc::SIGKILL);
        let scratch = self.owns_scratch.then(|| self.scratch.clone());
        let lease = self.lease.take();
        if let Err(error) = std::thread::Builder::new()
            .name("revboot-qemu-reap".into())
            .spawn(move || reap(jailed, scratch, lease))
        {
            warn!(%error, "cannot start a thread to reap a waiting qemu");
        }
    }
}

/// The waiting qemu processes of a tender (module doc, step 2).
#[derive(Debug)]
pub(super) struct Pool {
    me: Weak<Pool>,
    size: usize,
    jail: Arc<Jail>,
    uids: UidPool,
    /// Where pool entries make their scratch directories.
    scratch: PathBuf,
    runtime: tokio::runtime::Handle,
    accel: super::Accel,
    ready: Mutex<VecDeque<Incoming>>,
    /// What to keep waiting: the shape, and the snapshot to load ahead.
    wanted: Mutex<Option<(Shape, Option<Found>)>>,
    filling: AtomicBool,
    next: AtomicU64,
    prefix: String,
}

impl Pool {
    pub(super) fn new(
        size: usize,
        jail: Arc<Jail>,
        host: &crate::tender::TenderHost,
        accel: super::Accel,
    ) -> Arc<Pool> {
        Arc::new_cyclic(|me| Pool {
            me: me.clone(),
            size,
            jail,
            uids: host.uids.clone(),
            scratch: host.scratch.clone(),
            runtime: host.runtime.clone(),
            accel,
            ready: Mutex::new(VecDeque::with_capacity(size)),
            wanted: Mutex::new(None),
            filling: AtomicBool::new(false),
            next: AtomicU64::new(0),
            // The pid and the time: a daemon upgraded in place keeps its pid, and may have
            // adopted restored instances in the cgroups and directories of its predecessor's.
            prefix: format!(
                "{:x}-{:x}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_millis() % 0xff_ffff_ffff)
            ),
        })
    }

    /// The uids qemu processes of their own lease from (the deployer's).
    pub(super) fn uids(&self) -> &UidPool {
        &self.uids
    }

    /// The deployer's runtime.
    pub(super) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// A waiting qemu of `shape` for `revision`: one that loaded its snapshot ahead, else one
    /// that loaded none. The refill comes once the restore is done ([`Pool::want`]): a qemu
    /// starting meanwhile would compete with it for the CPU.
    pub(super) fn take(&self, shape: Shape, revision: &Revision) -> Option<Incoming> {
        let mut ready = self.ready.lock().expect("pool lock is never poisoned");
        let loaded = |entry: &Incoming| {
            entry.shape == shape
                && entry
                    .loaded
                    .as_ref()
                    .is_some_and(|f| f.revision == *revision)
        };
        let at = ready.iter().position(loaded).or_else(|| {
            ready
                .iter()
                .position(|entry| entry.shape == shape && entry.loaded.is_none())
        });
        at.and_then(|at| ready.remove(at))
    }

    /// Keeps qemu processes of `shape` waiting from now on, with `snapshot` loaded ahead
    /// (those of another shape or snapshot go).
    pub(super) fn want(&self, shape: Shape, snapshot: Option<Found>) {
        if self.size == 0 {
            return;
        }
        *self.wanted.lock().expect("pool lock is never poisoned") = Some((shape, snapshot));
        if self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.me.clone();
        self.runtime.spawn(async move {
            if let Some(pool) = me.upgrade() {
                pool.fill().await;
                pool.filling.store(false, Ordering::Release);
            }
        });
    }

    /// Kills the waiting qemu processes, reaps them and removes what they held, and keeps
    /// none from now on (a shutdown, or a hand-over: they are not handed over, and a reap
    /// left to a thread of its own would not outlive the exec, leaving zombies and cgroups).
    /// Blocks for as long as killed processes take to end: milliseconds.
    pub(super) fn clear(&self) {
        *self.wanted.lock().expect("pool lock is never poisoned") = None;
        let waiting: Vec<Incoming> = self
            .ready
            .lock()
            .expect("pool lock is never poisoned")
            .drain(..)
            .collect();
        let mut killed = Vec::new();
        for mut incoming in waiting {
            if let Some(jailed) = incoming.jailed.take() {
                spawn::send_signal(jailed.pidfd.as_raw_fd(), libc::SIGKILL);
                let scratch = incoming.owns_scratch.then(|| incoming.scratch.clone());
                killed.push((jailed, scratch, incoming.lease.take()));
            }
        }
        for (jailed, scratch, lease) in killed {
            reap(jailed, scratch, lease);
        }
    }

    async fn fill(&self) {
        loop {
            let Some((shape, snapshot)) = self
                .wanted
                .lock()
                .expect("pool lock is never poisoned")
                .clone()
            else {
                return;
            };
            {
                let mut ready = self.ready.lock().expect("pool lock is never poisoned");
                ready.retain(|entry| entry.shape == shape && entry.loaded == snapshot);
                if ready.len() >= self.size {
                    return;
                }
            }
            // The guest just restored answers its first request in a few milliseconds; a
            // qemu starting meanwhile (tens of milliseconds of CPU) would slow it down.
            tokio::time::sleep(REFILL_PAUSE).await;
            let started = match self.start(shape).await {
                Ok(mut entry) => match &snapshot {
                    Some(found) => entry.load(found).await.map(|()| entry),
                    None => Ok(entry),
                },
                Err(error) => Err(error),
            };
            match started {
                Ok(entry) => {
                    info!(
                        port = entry.port,
                        loaded = entry.loaded.is_some(),
                        "a qemu waits for a snapshot"
                    );
                    let mut ready = self.ready.lock().expect("pool lock is never poisoned");
                    if ready.len() < self.size {
                        ready.push_back(entry);
                    }
                }
                Err(error) => {
                    warn!(%error, "cannot start a qemu to wait for snapshots");
                    return;
                }
            }
        }
    }

    async fn start(&self, shape: Shape) -> Result<Incoming, String> {
        let args = super::incoming_args(self.accel, shape.memory_mib);
        let lease = self.uids.lease().ok_or("every uid is in use")?;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("pool-{}-{n}", self.prefix);
        let scratch = self.scratch.join(format!("qemu-{id}"));
        std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
        let port = shape.port.unwrap_or(0);
        let cell = Cell {
            id: &id,
            scratch: &scratch,
            uid: lease.uid(),
            memory_mib: shape.memory_mib,
            cpu_percent: 100,
            image: None,
            port,
        };
        let started = Incoming::start(&self.jail, &cell, args, shape, &[]).await;
        match started {
            Ok(mut entry) => {
                entry.owns_scratch = true;
                entry.lease = Some(lease);
                debug!(id, port, "a qemu waits for a snapshot");
                Ok(entry)
            }
            Err(error) => {
                let _ = std::fs::remove_dir_all(&scratch);
                Err(format!("{error}: {}", crate::errors::error_chain(&error)))
            }
        }
    }
}

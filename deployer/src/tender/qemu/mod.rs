//! The qemu tender: kernel images booted in a `microvm`, or restored from a snapshot of a
//! ready guest.
//!
//! 1. [`Tender::prepare`] checks the manifest (memory, kernel arguments) and sets the
//!    backend endpoint: the host side of qemu's user-mode port forward, on the instance's
//!    IPv4 address, or loopback for one on IPv6 alone, at the manifest port or at one the
//!    kernel picks as qemu binds it, learnt once qemu runs (the `forward` module). For a
//!    revision known to have a snapshot, it takes a qemu already started and waiting (the
//!    `pool` module).
//! 2. [`Prepared::boot`] restores when it can: a stored snapshot of this revision that
//!    matches this qemu, these settings and this image (the `snapshot` module) is streamed
//!    into the waiting qemu (or one started now), the forward added, the guest resumed. A
//!    snapshot that does not match, or a restore that fails, is said on the console and in
//!    the log, and the instance boots cold.
//! 3. A cold boot spawns `qemu-system-x86_64 -M microvm` with no option ROMs, no default
//!    devices, no user config: the image is the `-kernel` (an ELF with a PVH note), the
//!    command line is the manifest's `args` plus `revboot.revision=<deployment commit>`, one
//!    virtio-net device (modern virtio-mmio) on `-netdev user,restrict=on` forwarding
//!    `<service address>:<port>` to the guest port. COM1 is qemu's stdout: the console.
//!    `-no-reboot`: a guest that resets (a triple fault) stops the VM. Every qemu gets a
//!    fresh seed in fw_cfg (`opt/org.revboot/seed`), and the instance's variables
//!    (`opt/org.revboot/env`: `[run.env]` and `revboot config`, `NAME=value` entries each
//!    ended by a NUL byte; empty for a waiting qemu, so an instance with variables is
//!    restored into a qemu started for it), both from files in its scratch directory, never
//!    arguments; the variables' file is removed once qemu answers on QMP. qemu runs in the sandbox of the `jail`
//!    module (its own namespaces but the network, a tmpfs root with `/usr`, the kernel and
//!    its scratch directory only, the instance's uid without capabilities, cgroup limits,
//!    landlock and seccomp) and under its own seccomp sandbox (`-sandbox on`, no spawning
//!    or privilege changes), with an environment of `PATH` only.
//! 4. Once a cold-booted instance with restore on passed its readiness probe, before any
//!    client's connection goes in, its snapshot is saved (when none matching is stored);
//!    the pool then keeps qemu processes of its shape waiting.
//! 5. The accelerator is hardware KVM when `/proc/cpuinfo` shows `vmx` or `svm` and
//!    `/dev/kvm` opens, TCG otherwise; [`QemuConfig::accel`] or `REVBOOT_QEMU_ACCEL`
//!    (`kvm`, `tcg`, `auto`) override the guess.
//! 6. A supervisor task owns the child through its pidfd (the `supervise` module): QMP
//!    events, stop (`quit`, or SIGTERM without QMP), kill, the snapshot, the exit report
//!    once qemu is reaped and its cgroups removed.
//!
//! Readiness with user networking: qemu accepts forwarded connections on the host side
//! before the guest listens, so a `tcp` probe proves only that qemu runs. `console` (a line
//! the guest prints once it listens) or `http` prove the guest is serving. A restored guest
//! was ready when its snapshot was taken: a `console` probe is met at once, others are run.
//!
//! # Rules for images that are restored
//!
//! Every instance restored from one snapshot starts from the same memory: the same random
//! state, the same keys, the same TCP sequence numbers, unless the guest notices. With
//! `restore` on, an image must:
//!
//! 1. read the fw_cfg file `opt/org.revboot/seed` (64 hex digits) at boot and seed every
//!    random generator from it (mixed with its own sources if it likes);
//! 2. read the seed again before it draws anything random that leaves the guest (a TCP
//!    initial sequence number, a token, a nonce) after being idle — `examples/hello-vm`
//!    does it before every network poll, nine port reads — and when it changed, reseed every
//!    generator from the new seed, and forget what was derived from the old one (session
//!    keys, cached nonces, TCP connections it had open);
//! 3. generate no secret before it is ready (before its readiness probe passes): what
//!    exists at snapshot time exists in every restored instance;
//! 4. expect its clock to jump: time stood still between the snapshot and the restore;
//! 5. read its variables (`opt/org.revboot/env`) when it needs them, or again once the seed
//!    changed, and keep no copy from before it is ready: a restored instance's are those
//!    of its own qemu process, which may be newer than the snapshot.
//!
//! The MAC address and the guest's IP address stay the same in every instance: each has a
//! user-mode network of its own, so they never meet.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use revboot_store::manifest::{Ready, TenderKind};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

mod accel;
mod forward;
mod jail;
mod pool;
mod qmp;
mod running;
mod snapshot;
mod supervise;

pub use accel::{Accel, AccelChoice, kvm_usable};
use accel::{accel_from_env, resolve_accel};
use forward::Forward;
use jail::{Cell, Jail};
pub use pool::MAX_POOL;
use pool::{Incoming, Pool, Shape};
use running::{Launch, Save, launch};
use snapshot::{Found, Known, SavePlan};

use super::{BootError, BootSpec, BoxFuture, Prepared, Running, Tender, TenderHost};
use crate::config::BackendPort;
use crate::console::Console;

/// The environment variable that overrides the accelerator: `kvm`, `tcg` or `auto`.
pub const ACCEL_ENV: &str = "REVBOOT_QEMU_ACCEL";
/// The qemu binary used unless configured otherwise.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";
/// The longest kernel command line passed to a guest.
pub const MAX_CMDLINE: usize = 2048;
/// Guest memory bounds, MiB.
pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = 8..=16 * 1024;
/// qemu processes kept waiting for a snapshot unless configured otherwise.
pub const DEFAULT_POOL: usize = 2;

/// How long a QMP command may take to answer.
const QMP_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for QMP events still in flight after qemu exited.
const QMP_DRAIN: Duration = Duration::from_millis(300);
/// How long console readers may take to drain after qemu exited.
const CONSOLE_DRAIN: Duration = Duration::from_secs(1);
/// Pending stop/kill/snapshot requests per instance.
const CONTROL_QUEUE: usize = 4;
/// Longest `unix:` socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Settings of the qemu tender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// The qemu binary (a path, or a name looked up in `PATH`).
    pub binary: PathBuf,
    /// The accelerator; `REVBOOT_QEMU_ACCEL` overrides it.
    pub accel: AccelChoice,
    /// Start instances from a snapshot of a ready guest of their revision, saved after the
    /// first cold boot (images must follow the module doc's rules).
    pub restore: bool,
    /// qemu processes kept started and waiting for a snapshot, at most [`MAX_POOL`]; 0
    /// starts one at each restore (no faster than a cold boot).
    pub pool: usize,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from(DEFAULT_BINARY),
            accel: AccelChoice::Auto,
            restore: true,
            pool: DEFAULT_POOL,
        }
    }
}

/// Why the qemu tender cannot be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QemuSetupError {
    /// `REVBOOT_QEMU_ACCEL` holds something else than `kvm`, `tcg` or `auto`.
    #[error("`{ACCEL_ENV}` must be `kvm`, `tcg` or `auto`, not `{0}`")]
    BadAccel(String),
    /// KVM was asked for and is not usable.
    #[error("Hardware KVM was asked for but is not usable: {0}")]
    NoKvm(String),
    /// qemu's sandbox cannot be set up (the binary is missing, no thread…).
    #[error("Cannot set up qemu's sandbox: {0}")]
    Sandbox(String),
    /// The pool is larger than [`MAX_POOL`].
    #[error("A pool of {0} waiting qemu processes is more than {MAX_POOL}")]
    Pool(usize),
}

/// The qemu tender with `config`, as [`crate::Deployer::with_tenders`] takes it.
pub fn make(config: QemuConfig) -> super::MakeTender {
    Box::new(move |host: &TenderHost| {
        QemuTender::new(config, host)
            .map(|tender| std::sync::Arc::new(tender) as std::sync::Arc<dyn Tender>)
            .map_err(|error| super::TenderSetupError {
                kind: TenderKind::Qemu,
                source: Box::new(error),
            })
    })
}

/// Boots kernel images in qemu microvms, or restores them from snapshots.
#[derive(Debug, Clone)]
pub struct QemuTender {
    accel: Accel,
    jail: Arc<Jail>,
    restore: bool,
    pool: Arc<Pool>,
    /// Revisions known to have a snapshot.
    known: Arc<Known>,
    /// qemu's version, once a QMP greeting said it.
    version: Arc<OnceLock<String>>,
}

impl QemuTender {
    /// A tender with `config`, the accelerator overridden by `REVBOOT_QEMU_ACCEL`, for the
    /// deployer whose host is `host`.
    pub fn new(config: QemuConfig, host: &TenderHost) -> Result<QemuTender, QemuSetupError> {
        if config.pool > MAX_POOL {
            return Err(QemuSetupError::Pool(config.pool));
        }
        let choice = match std::env::var(ACCEL_ENV) {
            Ok(value) => accel_from_env(&value)?,
            Err(_) => config.accel,
        };
        let accel = resolve_accel(choice)?;
        let jail = Arc::new(
            Jail::new(host, &config.binary, accel)
                .map_err(|error| QemuSetupError::Sandbox(error.to_string()))?,
        );
        info!(
            accel = accel.as_arg(),
            binary = %config.binary.display(),
            restore = config.restore,
            pool = config.pool,
            "qemu tender ready"
        );
        Ok(QemuTender {
            accel,
            pool: Pool::new(config.pool, Arc::clone(&jail), host, accel),
            jail,
            restore: config.restore,
            known: Arc::default(),
            version: Arc::default(),
        })
    }

    /// The accelerator instances run with.
    pub fn accel(&self) -> Accel {
        self.accel
    }
}

/// The kernel command line of an instance: the manifest's arguments, then the deployment.
fn kernel_cmdline(spec: &BootSpec) -> Result<String, String> {
    let mut parts = Vec::with_capacity(spec.run.args.len() + 1);
    for arg in &spec.run.args {
        if arg.is_empty() || arg.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "kernel argument {arg:?} is empty or holds whitespace or control characters"
            ));
        }
        if arg.starts_with("revboot.") {
            return Err(format!(
                "kernel argument {arg:?}: `revboot.` arguments are set by revboot"
            ));
        }
        parts.push(arg.clone());
    }
    parts.push(format!("revboot.revision={}", spec.revision.to_hex()));
    let cmdline = parts.join(" ");
    if cmdline.len() > MAX_CMDLINE {
        return Err(format!(
            "kernel command line is {} bytes, at most {MAX_CMDLINE}",
            cmdline.len()
        ));
    }
    Ok(cmdline)
}

fn invalid(what: &str, message: String) -> BootError {
    BootError::Setup {
        what: what.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, message),
    }
}

/// The machine every qemu of the tender runs, cold or waiting for a snapshot: what a
/// snapshot's stream depends on (and so part of its key), without per-instance parts.
fn machine_args(accel: Accel, memory_mib: u64) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-M".into(),
        "microvm,x-option-roms=off,rtc=off".into(),
        "-accel".into(),
        accel.as_arg().into(),
    ];
    if accel == Accel::Kvm {
        args.extend(["-cpu".into(), "host".into()]);
    }
    args.extend([
        "-smp".into(),
        "1".into(),
        "-m".into(),
        format!("{memory_mib}M"),
    ]);
    for arg in [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        // qemu's own seccomp filter: no spawning, no privilege changes, no obsolete calls.
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-serial",
        "stdio",
        "-global",
        "virtio-mmio.force-legacy=false",
        "-device",
        "virtio-net-device,netdev=net0",
    ] {
        args.push(arg.into());
    }
    args
}

/// The arguments every qemu of the tender shares after the machine: its seed, its
/// variables, its QMP.
fn common_args(args: &mut Vec<OsString>) {
    args.push("-fw_cfg".into());
    args.push(pool::seed_arg().into());
    args.push("-fw_cfg".into());
    args.push(pool::env_arg().into());
    args.push("-qmp".into());
    args.push(format!("unix:{}/qmp.sock,server=on,wait=off", jail::RUN).into());
}

/// The argv of a qemu that waits for a snapshot: the machine, a network without forwards
/// (added at restore), no kernel.
fn incoming_args(accel: Accel, memory_mib: u64) -> Vec<OsString> {
    let mut args: Vec<OsString> = machine_args(accel, memory_mib)
        .into_iter()
        .map(OsString::from)
        .collect();
    args.push("-netdev".into());
    args.push("user,id=net0,restrict=on".into());
    common_args(&mut args);
    args.push("-incoming".into());
    args.push("defer".into());
    args
}

/// Both families, the default: IPv6 through the proxy (`forward::host`).
impl Tender for QemuTender {
    fn kind(&self) -> TenderKind {
        TenderKind::Qemu
    }

    fn sweep_orphans(&self, keep: &[PathBuf]) {
        self.jail.sweep(keep);
    }

    fn adopt(&self, adopted: super::Adopted) -> Result<Box<dyn Running>, BootError> {
        running::adopt(self, adopted)
    }

    /// The waiting qemu processes go: the deployer shuts down or hands over.
    fn shutdown(&self) {
        self.pool.clear();
    }

    fn prepare(&self, spec: BootSpec) -> Result<Box<dyn Prepared>, BootError> {
        if !MEMORY_MIB.contains(&spec.run.memory_mib) {
            return Err(invalid(
                "guest memory",
                format!(
                    "memory_mib = {} is outside {}..={}",
                    spec.run.memory_mib,
                    MEMORY_MIB.start(),
                    MEMORY_MIB.end()
                ),
            ));
        }
        let cmdline =
            kernel_cmdline(&spec).map_err(|message| invalid("kernel command line", message))?;
        if matches!(spec.run.ready, Ready::Socket | Ready::Tcp) {
            warn!(
                service = spec.service,
                "qemu: a `socket` or `tcp` probe only shows that qemu runs (user networking \
                 accepts for the guest); use `console` or `http` to know the guest serves"
            );
        }
        let host = forward::host(&spec)?;
        let qmp = spec.scratch.join("qmp.sock");
        if qmp.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(invalid(
                "QMP socket",
                format!("{} is longer than a unix socket path may be", qmp.display()),
            ));
        }
        let shape = Shape {
            memory_mib: spec.run.memory_mib,
            port: match spec.backend_port {
                BackendPort::Same => Some(spec.run.port),
                BackendPort::Ephemeral => None,
            },
        };
        // The manifest port on the instance's own address is checked; no port is picked
        // here for the others: qemu binds port 0 (the `forward` module).
        if let Some(port) = shape.port {
            forward::claim(host, port)?;
        }
        let forward = Forward {
            host,
            port: shape.port.unwrap_or(0),
            guest: spec.run.guest_port.unwrap_or(spec.run.port),
        };
        // A waiting qemu, for a revision with a snapshot: it may bind the forward's port.
        // Not for an instance with variables: a waiting qemu has none in its fw_cfg.
        let waiting = (self.restore
            && self.known.contains(&spec.revision)
            && super::variables(&spec).is_empty())
        .then(|| self.pool.take(shape, &spec.revision))
        .flatten();
        Ok(Box::new(QemuPrepared {
            tender: self.clone(),
            accel: self.accel,
            cmdline,
            qmp,
            forward,
            shape,
            waiting,
            spec,
        }))
    }
}

/// A qemu instance with its port forward set.
#[derive(Debug)]
struct QemuPrepared {
    tender: QemuTender,
    accel: Accel,
    cmdline: String,
    qmp: PathBuf,
    forward: Forward,
    shape: Shape,
    /// A qemu waiting for a snapshot, taken from the pool.
    waiting: Option<Incoming>,
    spec: BootSpec,
}

impl QemuPrepared {
    /// The qemu argv of a cold boot (without the binary), with the paths as qemu sees them
    /// in its sandbox: the QMP socket and seed in [`jail::RUN`], the kernel at
    /// [`jail::KERNEL`].
    fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = machine_args(self.accel, self.spec.run.memory_mib)
            .into_iter()
            .map(OsString::from)
            .collect();
        args.push("-append".into());
        args.push(self.cmdline.clone().into());
        args.push("-netdev".into());
        args.push(format!("user,id=net0,restrict=on,hostfwd={}", self.forward.arg()).into());
        common_args(&mut args);
        args.push("-kernel".into());
        args.push(jail::KERNEL.into());
        args
    }

    /// What a snapshot of this instance depends on besides qemu and the image: its key.
    fn settings(&self) -> String {
        format!(
            "{} -append {} guest-port={}",
            machine_args(self.accel, self.spec.run.memory_mib).join(" "),
            self.cmdline,
            self.forward.guest
        )
    }

    /// A line on the console and in the log about the snapshot.
    fn note(&self, console: &Console, line: &str) {
        warn!(
            id = self.spec.id,
            service = self.spec.service,
            revision = %self.spec.revision.short(12),
            "{line}"
        );
        console.push_line(&format!("[revboot] {line}"));
    }

    /// Restores `found` into the waiting qemu (or one started now): loads it unless the
    /// waiting one loaded it ahead, then resumes.
    async fn restore(
        &mut self,
        found: &Found,
        console: &Console,
    ) -> Result<Box<dyn Running>, String> {
        let waiting = self.waiting.take().filter(|incoming| {
            // Loaded ahead with another snapshot (replaced since): no use.
            incoming
                .loaded
                .as_ref()
                .is_none_or(|loaded| loaded == found)
        });
        let mut incoming = match waiting {
            Some(incoming) => incoming,
            None => {
                let cell = Cell::of(&self.spec, None, self.forward.port);
                Incoming::start(
                    &self.tender.jail,
                    &cell,
                    incoming_args(self.accel, self.spec.run.memory_mib),
                    self.shape,
                    &pool::env_bytes(&super::variables(&self.spec)),
                )
                .await
                .map_err(|error| format!("{error}: {}", crate::errors::error_chain(&error)))?
            }
        };
        let _ = self.tender.version.set(incoming.version().to_owned());
        let limits = Cell::of(&self.spec, None, self.forward.port).limits();
        let ahead = incoming.loaded.is_some();
        let restored = match incoming.loaded {
            Some(_) => incoming.resume(&self.forward, limits).await,
            None => match incoming.load(found).await {
                Ok(()) => incoming.resume(&self.forward, limits).await,
                Err(error) => Err(error),
            },
        };
        let backend = match restored {
            Ok(backend) => backend,
            Err(reason) => {
                // Gone before a cold boot takes its cgroups, port and scratch directory.
                incoming.discard().await;
                return Err(reason);
            }
        };
        let qmp_path = incoming.scratch.join("qmp.sock");
        let (jailed, qmp, scratch, lease) = incoming.into_parts();
        self.tender.pool.want(self.shape, Some(found.clone()));
        info!(
            id = self.spec.id,
            service = self.spec.service,
            revision = %self.spec.revision.short(12),
            loaded_ahead = ahead,
            "qemu instance restored from its snapshot"
        );
        console.push_line(if ahead {
            "[revboot] restored from the snapshot of a ready guest (loaded ahead)"
        } else {
            "[revboot] restored from the snapshot of a ready guest"
        });
        launch(
            self,
            &self.tender.jail,
            Launch {
                jailed,
                qmp: Some(qmp),
                qmp_path,
                scratch,
                lease,
                console: console.clone(),
                backend: Some(backend),
                restored: true,
                save: None,
                version: Arc::clone(&self.tender.version),
            },
        )
        .map_err(|error| format!("{error}: {}", crate::errors::error_chain(&error)))
    }
}

impl Prepared for QemuPrepared {
    fn backend(&self) -> Option<SocketAddr> {
        self.forward.known()
    }

    fn boot(
        mut self: Box<Self>,
        image: PathBuf,
    ) -> BoxFuture<'static, Result<Box<dyn Running>, BootError>> {
        Box::pin(async move {
            super::make_scratch(&self.spec)?;
            let console = Console::new(self.spec.console_bytes);
            let save = if self.tender.restore {
                self.snapshot(&image, &console).await
            } else {
                Ok(None)
            };
            let save = match save {
                Err(running) => return Ok(running),
                Ok(save) => save,
            };
            // A waiting qemu cannot boot cold: it goes.
            self.waiting = None;
            let _ = std::fs::remove_file(&self.qmp);
            pool::write_seed(&self.spec.scratch, self.spec.uid).map_err(|source| {
                BootError::Setup {
                    what: "the guest's seed".into(),
                    source,
                }
            })?;
            let env = pool::env_bytes(&super::variables(&self.spec));
            pool::write_env(&self.spec.scratch, self.spec.uid, &env).map_err(|source| {
                BootError::Setup {
                    what: "the guest's variables".into(),
                    source,
                }
            })?;
            let cell = Cell::of(&self.spec, Some(&image), self.forward.port);
            let jailed = self.tender.jail.start(&cell, self.args()).await?;
            launch(
                &self,
                &self.tender.jail,
                Launch {
                    jailed,
                    qmp: None,
                    qmp_path: self.qmp.clone(),
                    scratch: None,
                    lease: None,
                    console,
                    backend: self.forward.known(),
                    restored: false,
                    version: Arc::clone(&self.tender.version),
                    save: save.map(|plan| Save {
                        plan,
                        pool: Arc::clone(&self.tender.pool),
                        known: Arc::clone(&self.tender.known),
                        shape: self.shape,
                    }),
                },
            )
        })
    }
}

impl QemuPrepared {
    /// Restores the instance when a matching snapshot is stored (`Err` with the instance);
    /// otherwise says why not, and returns the plan to save one after a cold boot.
    async fn snapshot(
        &mut self,
        image: &Path,
        console: &Console,
    ) -> Result<Option<SavePlan>, Box<dyn Running>> {
        let settings = self.settings();
        let revision = self.spec.revision;
        let found = {
            let (image, settings) = (image.to_owned(), settings.clone());
            let version = self.tender.version.get().cloned();
            tokio::task::spawn_blocking(move || {
                snapshot::find(&image, &revision, &settings, version.as_deref())
            })
            .await
            .unwrap_or_else(|_| Err("the snapshot lookup panicked".into()))
        };
        match found {
            Ok(Some(found)) => match self.restore(&found, console).await {
                Ok(running) => {
                    self.tender.known.insert(revision);
                    return Err(running);
                }
                Err(reason) => {
                    self.note(
                        console,
                        &format!("snapshot not restored: {reason}; booting cold"),
                    );
                    self.tender.known.forget(&revision);
                    snapshot::remove(image, &revision);
                }
            },
            Ok(None) => {}
            Err(reason) => {
                self.note(
                    console,
                    &format!("snapshot refused: {reason}; booting cold"),
                );
                self.tender.known.forget(&revision);
                snapshot::remove(image, &revision);
            }
        }
        Ok(Some(SavePlan {
            image: image.to_owned(),
            revision,
            settings,
            scratch: self.spec.scratch.clone(),
            uid: self.spec.uid,
            memory_mib: self.spec.run.memory_mib,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use revboot_store::Revision;
    use revboot_store::manifest::Run;

    fn spec(args: &[&str]) -> BootSpec {
        BootSpec {
            id: "t1".into(),
            service: "hello-vm".into(),
            revision: "0123456789abcdef0123456789abcdef01234567"
                .parse::<Revision>()
                .expect("a revision"),
            run: Run {
                tender: TenderKind::Qemu,
                args: args.iter().map(|arg| (*arg).to_owned()).collect(),
                memory_mib: 32,
                guest_port: Some(8080),
                ..Run::default()
            },
            addresses: crate::ServiceAddresses::one("127.0.0.1".parse().expect("an address")),
            client: None,
            backend_port: BackendPort::Ephemeral,
            scratch: std::env::temp_dir(),
            console_bytes: 4096,
            vars: Default::default(),
            uid: 2_050_000_000,
        }
    }

    fn test_runtime() -> tokio::runtime::Handle {
        static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        RUNTIME
            .get_or_init(|| {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("a runtime")
            })
            .handle()
            .clone()
    }

    /// A TCG tender on a root of its own (`dir`), as a deployer would make it.
    fn tender(dir: &std::path::Path) -> QemuTender {
        let host = TenderHost {
            name: format!("qemu-unit-{}", std::process::id()),
            root: dir.to_owned(),
            sandbox: crate::config::SandboxConfig::default(),
            // The qemu tender starts its VMs from a thread of its own, not on the runtime.
            runtime: test_runtime(),
            uids: revboot_sandbox::uids::UidPool::new(revboot_sandbox::uids::UidRange {
                base: 2_050_000_000,
                count: 16,
            }),
            scratch: dir.join("scratch"),
        };
        let config = QemuConfig {
            accel: AccelChoice::Tcg,
            ..QemuConfig::default()
        };
        QemuTender::new(config, &host).expect("a qemu tender")
    }

    #[test]
    fn command_line_appends_the_revision_and_refuses_what_would_split() {
        let line = kernel_cmdline(&spec(&["quiet", "loglevel=3"])).expect("valid");
        assert_eq!(
            line,
            "quiet loglevel=3 revboot.revision=0123456789abcdef0123456789abcdef01234567"
        );
        assert!(kernel_cmdline(&spec(&["two words"])).is_err());
        assert!(kernel_cmdline(&spec(&["line\nbreak"])).is_err());
        assert!(kernel_cmdline(&spec(&["revboot.revision=forged"])).is_err());
        let long = "x".repeat(MAX_CMDLINE);
        assert!(kernel_cmdline(&spec(&[&long])).is_err());
    }

    #[test]
    fn prepare_forwards_the_service_address_to_the_guest_port_qemu_picking_the_host_port() {
        let dir = tempfile::tempdir().expect("dir");
        let tender = tender(dir.path());
        let prepared = tender.prepare(spec(&[])).expect("prepared");
        // No port is picked ahead: qemu binds port 0, and the backend is known once it runs.
        assert_eq!(prepared.backend(), None);
        let debug = format!("{prepared:?}");
        assert!(
            debug.contains("host: 127.0.0.1, port: 0, guest: 8080"),
            "{debug}"
        );
    }

    #[test]
    fn argv_keeps_the_guest_on_loopback_and_boots_the_image_directly() {
        let dir = tempfile::tempdir().expect("dir");
        let tender = tender(dir.path());
        let spec = spec(&["quiet"]);
        let prepared = QemuPrepared {
            tender: tender.clone(),
            shape: Shape {
                memory_mib: 32,
                port: None,
            },
            waiting: None,
            accel: tender.accel,
            cmdline: kernel_cmdline(&spec).expect("valid"),
            qmp: spec.scratch.join("qmp.sock"),
            forward: Forward {
                host: std::net::Ipv4Addr::new(127, 77, 0, 9),
                port: 41000,
                guest: 8080,
            },
            spec,
        };
        let args: Vec<String> = prepared
            .args()
            .into_iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| {
            let at = args.iter().position(|arg| arg == flag).expect(flag);
            args[at + 1].clone()
        };
        assert!(after("-M").starts_with("microvm,"));
        assert_eq!(after("-accel"), "tcg");
        assert_eq!(after("-m"), "32M");
        // Paths as qemu sees them in its sandbox.
        assert_eq!(after("-kernel"), jail::KERNEL);
        assert_eq!(after("-qmp"), "unix:/run/qemu/qmp.sock,server=on,wait=off");
        // The seed comes from a file, never from the argument list.
        assert_eq!(
            after("-fw_cfg"),
            "name=opt/org.revboot/seed,file=/run/qemu/seed"
        );
        // So do the variables: `NAME=value` entries ended by NUL bytes.
        let env = "name=opt/org.revboot/env,file=/run/qemu/env";
        assert!(args.windows(2).any(|w| w[0] == "-fw_cfg" && w[1] == env));
        let variables = [("A", "1"), ("B", "x\ny"), ("C", "no\0")]
            .into_iter()
            .collect();
        assert_eq!(pool::env_bytes(&variables), b"A=1\0B=x\ny\0");
        assert_eq!(
            after("-netdev"),
            "user,id=net0,restrict=on,hostfwd=tcp:127.77.0.9:41000-:8080"
        );
        assert!(
            after("-append").ends_with("revboot.revision=0123456789abcdef0123456789abcdef01234567")
        );
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert!(args.iter().any(|arg| arg == flag), "{flag} in {args:?}");
        }
        assert!(
            !args.iter().any(|arg| arg == "-cpu"),
            "no -cpu host under TCG"
        );
    }

    #[test]
    fn prepare_refuses_bad_memory_and_ipv6_with_no_proxy_in_front() {
        let dir = tempfile::tempdir().expect("dir");
        let tender = tender(dir.path());
        let mut tiny = spec(&[]);
        tiny.run.memory_mib = 1;
        let error = tender.prepare(tiny).expect_err("too little memory");
        assert!(error.to_string().contains("guest memory"), "{error}");
        // On IPv6 alone, the forward listens on loopback, for the proxy to relay to; with
        // no proxy in front, no client could reach it.
        let mut v6 = spec(&[]);
        v6.addresses = crate::ServiceAddresses::one("::1".parse().expect("ip"));
        let prepared = tender.prepare(v6.clone()).expect("prepared");
        let debug = format!("{prepared:?}");
        assert!(debug.contains("host: 127.0.0.1, port: 0"), "{debug}");
        v6.backend_port = BackendPort::Same;
        let error = tender.prepare(v6).expect_err("no proxy in front");
        assert!(error.to_string().contains("port forward"), "{error}");
    }

    #[test]
    fn a_waiting_qemu_has_the_machine_of_a_cold_one_but_no_kernel_and_no_forward() {
        let args: Vec<String> = incoming_args(Accel::Tcg, 32)
            .into_iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        let machine = machine_args(Accel::Tcg, 32);
        assert_eq!(args[..machine.len()], machine[..]);
        assert!(!args.iter().any(|arg| arg == "-kernel" || arg == "-append"));
        assert!(args.iter().any(|arg| arg == "user,id=net0,restrict=on"));
        assert_eq!(args[args.len() - 2..], ["-incoming", "defer"]);
    }
}

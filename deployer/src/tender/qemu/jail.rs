//! The qemu process's sandbox: a VM's monitor is pushed code's first neighbour.
//!
//! The guest is confined by the virtual machine; qemu itself is confined as a process
//! instance is, with what a VMM needs added ([`revboot_sandbox`] does the work):
//!
//! 1. its own mount, pid, ipc, uts and cgroup namespaces; the host's network namespace,
//!    since the port forward listens on the instance's service address (and warm
//!    connections are steered to that socket), with landlock allowing it to bind that one
//!    TCP port and to connect nowhere (`restrict=on` keeps the guest off the network too);
//! 2. a tmpfs root with the host's `/usr` and libraries read-only, `/dev/null`,
//!    `/dev/urandom` and friends, `/dev/kvm` when the accelerator is KVM, a read-only
//!    `/proc` of its own processes, the kernel image read-only at [`KERNEL`] (none for a
//!    qemu that waits for a snapshot: the snapshot comes over a socket), and the instance's
//!    scratch directory (its QMP socket, its seed, the migration sockets) at [`RUN`]: not
//!    the data directory, not the image cache, nothing else of the host;
//! 3. the instance's own unprivileged uid, no capability, no new privileges, the seccomp
//!    deny-list of every sandbox under qemu's own (`-sandbox on`);
//! 4. memory (the guest's and qemu's own), pids and CPU limited through cgroups
//!    (`revboot/<name>-qemu/…`, swept at start-up);
//! 5. started from the tender's own long-lived thread, so that it dies with the daemon.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use landlock::{ABI, Access, AccessNet, NetPort, Ruleset, RulesetAttr, RulesetCreatedAttr};
use revboot_sandbox::cgroup::{Cgroups, InstanceGroups, Limits};
use revboot_sandbox::creds::Identity;
use revboot_sandbox::root::{Access as Mount, Layout, Quota};
use revboot_sandbox::seccomp::{self, Filters};
use revboot_sandbox::spawn::{self, Namespaces, Plan, Program};
use revboot_sandbox::worker::Worker;
use tokio::sync::oneshot;
use tracing::warn;

use super::Accel;
use crate::tender::{BootError, BootSpec, TenderHost};

/// Where the instance's scratch directory (its QMP socket) is inside.
pub(super) const RUN: &str = "/run/qemu";
/// Where the kernel image is inside.
pub(super) const KERNEL: &str = "/run/image/kernel";
/// qemu's own memory beside the guest's: TCG's translation cache, devices, threads.
const OVERHEAD_MIB: u64 = 256;
/// qemu's threads (vCPU, I/O, RCU, workers).
const PIDS: u64 = 64;
/// Spawns waiting for the tender's thread.
const QUEUE: usize = 64;
/// `/etc` entries the dynamic loader needs.
const ETC: &[&str] = &["ld.so.cache", "ld.so.conf", "ld.so.conf.d"];

/// Starts qemu processes in their sandbox (see the module doc).
#[derive(Debug)]
pub(super) struct Jail {
    worker: Worker,
    cgroups: Option<Cgroups>,
    filters: Filters,
    root: PathBuf,
    program: CString,
    /// The binary's directory when it is not below `/usr`, bound read-only.
    program_dir: Option<PathBuf>,
    accel: Accel,
    last_cap: u32,
}

/// Who a qemu process runs as, and with what: an instance's, or a pre-started restore
/// target's own (the `pool` module).
#[derive(Debug, Clone)]
pub(super) struct Cell<'a> {
    /// The cgroup name.
    pub(super) id: &'a str,
    /// Bound at [`RUN`]: the QMP socket, the seed, migration sockets.
    pub(super) scratch: &'a Path,
    pub(super) uid: u32,
    pub(super) memory_mib: u64,
    pub(super) cpu_percent: u32,
    /// The kernel image, bound at [`KERNEL`]; none for a VM that waits for a snapshot.
    pub(super) image: Option<&'a Path>,
    /// The one TCP port qemu may bind (its port forward).
    pub(super) port: u16,
}

impl<'a> Cell<'a> {
    /// The cell of the instance `spec`, booted from `image`, forwarding from `port`.
    pub(super) fn of(spec: &'a BootSpec, image: Option<&'a Path>, port: u16) -> Cell<'a> {
        Cell {
            id: &spec.id,
            scratch: &spec.scratch,
            uid: spec.uid,
            memory_mib: spec.run.memory_mib,
            cpu_percent: spec.run.cpu_percent,
            image,
            port,
        }
    }

    /// The cgroup limits of the cell.
    pub(super) fn limits(&self) -> Limits {
        Limits {
            memory_bytes: (self.memory_mib + OVERHEAD_MIB) * 1024 * 1024,
            pids: PIDS,
            cpu_percent: self.cpu_percent,
        }
    }
}

/// A started qemu.
#[derive(Debug)]
pub(super) struct Jailed {
    pub(super) pid: u32,
    pub(super) pidfd: OwnedFd,
    /// qemu's stdout and stderr.
    pub(super) console: OwnedFd,
    pub(super) groups: Option<InstanceGroups>,
}

impl Jail {
    /// Sets the sandbox up for `binary` (a path, or a name along `PATH`).
    pub(super) fn new(host: &TenderHost, binary: &Path, accel: Accel) -> io::Result<Jail> {
        let program = resolve(binary).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not an executable along PATH", binary.display()),
            )
        })?;
        let program_dir = program
            .parent()
            .filter(|dir| !dir.starts_with("/usr"))
            .map(Path::to_owned);
        std::fs::create_dir_all(&host.root)?;
        // What an earlier daemon left is swept by [`Jail::sweep`], once the deployer knows
        // which VMs were handed over to this one.
        let cgroups = match Cgroups::detect(&format!("{}-qemu", host.name)) {
            Ok(cgroups) => Some(cgroups),
            Err(error) => {
                warn!(%error, "cgroups unusable: VMs run WITHOUT memory, pids and cpu limits");
                None
            }
        };
        Ok(Jail {
            worker: Worker::start("revboot-qemu-spawner", QUEUE)?,
            cgroups,
            filters: seccomp::compile().map_err(io::Error::other)?,
            root: std::path::absolute(&host.root)?,
            program: CString::new(program.as_os_str().as_bytes())
                .map_err(|_| io::Error::other("the qemu path holds a NUL byte"))?,
            program_dir,
            accel,
            last_cap: Identity::new(0).last_cap,
        })
    }

    /// Starts qemu with `args` in `cell`.
    pub(super) async fn start(
        self: &std::sync::Arc<Self>,
        cell: &Cell<'_>,
        args: Vec<OsString>,
    ) -> Result<Jailed, BootError> {
        let setup = |what: &str| {
            let what = what.to_owned();
            move |source| BootError::Setup { what, source }
        };
        // qemu makes its QMP socket in the scratch directory, as the instance's uid.
        std::os::unix::fs::chown(cell.scratch, Some(cell.uid), Some(cell.uid))
            .map_err(setup("scratch directory"))?;
        let layout = self.layout(cell).map_err(|error| BootError::Setup {
            what: "the VM's root".into(),
            source: io::Error::other(error),
        })?;
        let landlock = landlock_ruleset(cell.port).map_err(|error| BootError::Setup {
            what: "landlock ruleset".into(),
            source: io::Error::other(error),
        })?;
        let (console_read, console_write) = spawn::pipe(0).map_err(setup("console pipe"))?;
        let mut argv = vec![self.program.clone()];
        for arg in args {
            argv.push(CString::new(arg.as_bytes()).map_err(|_| {
                setup("qemu arguments")(io::Error::other("an argument holds a NUL byte"))
            })?);
        }
        let groups = match &self.cgroups {
            Some(cgroups) => {
                let mut groups = cgroups.create(cell.id).map_err(setup("cgroups"))?;
                if let Err(error) = groups.limit(cell.limits()) {
                    groups.remove();
                    return Err(setup("cgroup limits")(error));
                }
                Some(groups)
            }
            None => None,
        };
        let (reply, answer) = oneshot::channel();
        let jail = std::sync::Arc::clone(self);
        let uid = cell.uid;
        let job = move || {
            let procs: Vec<_> = groups
                .as_ref()
                .map(|g| g.procs.iter().map(AsRawFd::as_raw_fd).collect())
                .unwrap_or_default();
            let result = jail.spawn(&argv, &layout, &procs, console_write, landlock, uid);
            let result = result.map(|started| (started, groups));
            if let Err(Ok((started, groups))) = reply.send(result) {
                // Nobody waits for it any more (the boot timed out): end it here.
                spawn::send_signal(started.pidfd.as_raw_fd(), libc::SIGKILL);
                let _ = spawn::reap_blocking(started.pidfd.as_raw_fd());
                if let Some(groups) = groups {
                    groups.remove();
                }
            }
        };
        let worker = self.worker.clone();
        tokio::task::spawn_blocking(move || worker.submit(job))
            .await
            .map_err(|_| setup("qemu spawner")(io::Error::other("gone")))?
            .map_err(|error| setup("qemu spawner")(io::Error::other(error)))?;
        let (started, groups) = answer
            .await
            .map_err(|_| setup("qemu spawner")(io::Error::other("gone")))??;
        Ok(Jailed {
            pid: started.pid,
            pidfd: started.pidfd,
            console: console_read,
            groups,
        })
    }

    /// On the tender's thread: the clone.
    fn spawn(
        &self,
        argv: &[CString],
        layout: &Layout,
        procs: &[std::os::fd::RawFd],
        console: OwnedFd,
        landlock: Option<OwnedFd>,
        uid: u32,
    ) -> Result<spawn::Started, BootError> {
        let own = layout.after().proc().map_err(|error| BootError::Setup {
            what: "the VM's root".into(),
            source: io::Error::other(error),
        })?;
        let devnull = std::fs::File::open("/dev/null").map_err(|source| BootError::Setup {
            what: "/dev/null".into(),
            source,
        })?;
        let mountpoint =
            CString::new(self.root.as_os_str().as_bytes()).map_err(|_| BootError::Setup {
                what: "the VM's root".into(),
                source: io::Error::other("the mount point holds a NUL byte"),
            })?;
        let envp = [CString::from(c"PATH=/usr/bin:/bin")];
        let plan = Plan {
            program: Program::Path(&self.program),
            argv,
            envp: &envp,
            cgroup_procs: procs,
            namespaces: Namespaces::Fresh { host_network: true },
            base: layout,
            own: &own,
            mountpoint: &mountpoint,
            hostname: c"revboot-vm",
            loopback: false,
            cwd: c"/",
            rlimits: &[(libc::RLIMIT_CORE, 0), (libc::RLIMIT_NOFILE, 1024)],
            fds: &[
                devnull.as_raw_fd(),
                console.as_raw_fd(),
                console.as_raw_fd(),
            ],
            new_session: true,
            identity: Identity {
                uid,
                last_cap: self.last_cap,
            },
            die_with_parent: true,
            landlock: landlock.as_ref().map(AsRawFd::as_raw_fd),
            filters: &[&self.filters.deny, &self.filters.clone3],
        };
        spawn::spawn(&plan).map_err(BootError::from)
    }

    /// The VM's root (module doc, step 2).
    fn layout(&self, cell: &Cell<'_>) -> Result<Layout, revboot_sandbox::root::LayoutError> {
        let mut layout = Layout::new(
            &self.root,
            Quota {
                bytes: 16 << 20,
                inodes: 1024,
                exec: false,
            },
        )?
        .devices()?
        .host_system(ETC)?
        .bind(cell.scratch, Path::new(RUN), Mount::Writable)?;
        if let Some(image) = cell.image {
            layout = layout.bind(image, Path::new(KERNEL), Mount::ReadOnlyNoExec)?;
        }
        if let Some(dir) = &self.program_dir {
            layout = layout.bind(dir, dir, Mount::ReadOnly)?;
        }
        if self.accel == Accel::Kvm {
            layout = layout.bind(Path::new("/dev/kvm"), Path::new("/dev/kvm"), Mount::Device)?;
        }
        Ok(layout)
    }

    /// Removes the VM cgroups an earlier daemon left but those in `keep` (VMs handed over to
    /// this daemon), killing what runs in them.
    pub(super) fn sweep(&self, keep: &[PathBuf]) {
        if let Some(cgroups) = &self.cgroups {
            let removed = cgroups.sweep(keep);
            if removed > 0 {
                warn!(removed, "removed the cgroups of VMs an earlier daemon left");
            }
        }
    }

    /// The cgroups of a VM handed over by the previous daemon, from their directories.
    pub(super) fn adopt_groups(&self, dirs: &[PathBuf]) -> Option<InstanceGroups> {
        self.cgroups.as_ref().map(|cgroups| cgroups.adopt(dirs))
    }

    /// The cgroup directories of `groups`, for the footprint.
    pub(super) fn dirs(groups: Option<&InstanceGroups>) -> Vec<PathBuf> {
        groups.map(InstanceGroups::dirs).unwrap_or_default()
    }
}

impl Drop for Jail {
    /// Every VM is gone with the jail (they hold it while they run): its cgroup parents go.
    fn drop(&mut self) {
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove_parents();
        }
    }
}

/// A path to `binary`: itself if it has a slash, else the first executable along `PATH`.
fn resolve(binary: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if binary.as_os_str().as_bytes().contains(&b'/') {
        return std::path::absolute(binary).ok().filter(|p| executable(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_absolute() && executable(candidate))
}

/// Landlock for qemu: bind the forward's port, connect nowhere. `None` without landlock.
fn landlock_ruleset(
    port: u16,
) -> Result<Option<OwnedFd>, Box<dyn std::error::Error + Send + Sync>> {
    let ruleset = Ruleset::default()
        .handle_access(AccessNet::from_all(ABI::V5))?
        .create()?
        .add_rule(NetPort::new(port, AccessNet::BindTcp))?;
    let fd: Option<OwnedFd> = ruleset.into();
    Ok(fd)
}

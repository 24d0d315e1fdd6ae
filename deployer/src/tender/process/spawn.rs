//! The spawn path: from a prepared instance to a running, sandboxed image.
//!
//! Runs on the spawner thread: the image file, the landlock ruleset, the instance's part of
//! its root, argv, environment, rlimits and descriptors are prepared here, then
//! [`revboot_sandbox::spawn`] clones the child and executes the image (see the module doc
//! of [`super`] for the numbered start-up).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Once};

use landlock::{
    ABI, Access, AccessFs, AccessNet, PathBeneath, Ruleset, RulesetAttr, RulesetCreatedAttr,
};
use revboot_sandbox::creds::Identity;
use revboot_sandbox::root::{self, Layout};
use revboot_sandbox::seccomp::Filters;
use revboot_sandbox::spawn::{self, Namespaces, Plan, Program, fd_above, pipe};
use tracing::{debug, warn};

use super::namespaces::{HOSTNAME, NamespacePool};
use crate::config::SandboxConfig;
use crate::tender::{BootError, BootSpec};
use crate::upstream;

/// Landlock ABI the ruleset is written for (best effort on older kernels).
const LANDLOCK_ABI: ABI = ABI::V5;
/// Where an instance finds its upstream grants (the scratch directory, bound read-only).
pub(super) const UPSTREAM_DIR: &str = "/upstream";

/// What every spawn shares: compiled filters, the root's shared part, the namespace pool.
#[derive(Debug)]
pub(super) struct Spawner {
    pub(super) filters: Filters,
    pub(super) sandbox: SandboxConfig,
    /// The part of every root that does not depend on the instance.
    pub(super) base: Arc<Layout>,
    /// The mount point the root is assembled on, as the child needs it.
    pub(super) mountpoint: CString,
    pub(super) namespaces: Arc<NamespacePool>,
    pub(super) devnull: OwnedFd,
    pub(super) last_cap: u32,
}

/// One spawn's inputs beyond the shared ones.
#[derive(Debug)]
pub(super) struct Launch<'a> {
    pub(super) spec: &'a BootSpec,
    pub(super) image: &'a Path,
    pub(super) listener: RawFd,
    /// The instance's end of its hand-off socket, placed at fd 4 (`crate::handoff`).
    pub(super) handoff: Option<RawFd>,
    /// `tasks`/`cgroup.procs` files of the instance's groups, to join.
    pub(super) cgroup_procs: Vec<RawFd>,
    /// False: no memory controller, so the heap is bounded by `RLIMIT_DATA` instead.
    pub(super) memory_enforced: bool,
    pub(super) uid: u32,
}

/// A started image.
#[derive(Debug)]
pub(super) struct Started {
    pub(super) pid: u32,
    pub(super) pid_start: Option<u64>,
    pub(super) pidfd: OwnedFd,
    pub(super) console: OwnedFd,
}

impl Spawner {
    /// Clones the child into its namespaces and waits until it has executed the image (or
    /// failed to).
    pub(super) fn spawn(&self, launch: Launch<'_>) -> Result<Started, BootError> {
        let spec = launch.spec;
        let setup = |what: &str| {
            let what = what.to_owned();
            move |source| BootError::Setup { what, source }
        };
        // The image is executed through this fd, so that the file landlock allows is the file
        // that runs, even if the cache path is replaced meanwhile.
        let image_fd = File::options()
            .read(true)
            .open(launch.image)
            .map_err(setup("image"))?;
        let image_fd = fd_above(image_fd.into()).map_err(setup("image"))?;
        let landlock = landlock_ruleset(&image_fd).map_err(|error| BootError::Setup {
            what: "landlock ruleset".into(),
            source: io::Error::other(error),
        })?;
        if landlock.is_none() {
            static WARN: Once = Once::new();
            WARN.call_once(|| {
                warn!("landlock unavailable: instances may execute files and use TCP beyond their socket")
            });
        }
        let own = self
            .own_layout(spec, launch.uid)
            .map_err(|error| BootError::Setup {
                what: "the instance's root".into(),
                source: io::Error::other(error),
            })?;
        let namespaces = self.namespaces.take();
        let (console_read, console_write) = pipe(0).map_err(setup("console pipe"))?;
        let name = launch.image.file_name().unwrap_or(OsStr::new("image"));
        let mut argv = vec![cstring(name.as_bytes(), "argv")?];
        for arg in &spec.run.args {
            argv.push(cstring(arg.as_bytes(), "argv")?);
        }
        let mut fds = vec![self.devnull.as_raw_fd(), console_write.as_raw_fd()];
        fds.extend([console_write.as_raw_fd(), launch.listener]);
        fds.extend(launch.handoff);
        let env: Vec<CString> = environment(spec)
            .iter()
            .map(|entry| cstring(entry.as_bytes(), "environment"))
            .collect::<Result<_, _>>()?;
        let mut rlimits = vec![
            (libc::RLIMIT_NOFILE, self.sandbox.nofile),
            (libc::RLIMIT_CORE, 0),
            (libc::RLIMIT_FSIZE, self.sandbox.file_size_mib * 1024 * 1024),
            (libc::RLIMIT_MEMLOCK, 64 * 1024),
        ];
        if !launch.memory_enforced {
            // Without the memory controller, bound the heap at least.
            rlimits.push((libc::RLIMIT_DATA, spec.run.memory_mib * 1024 * 1024));
        }
        let plan = Plan {
            program: Program::Fd(image_fd.as_raw_fd()),
            argv: &argv,
            envp: &env,
            cgroup_procs: &launch.cgroup_procs,
            namespaces: match &namespaces {
                Some(set) => Namespaces::Enter(set.raw()),
                None => Namespaces::Fresh {
                    host_network: false,
                },
            },
            base: &self.base,
            own: &own,
            mountpoint: &self.mountpoint,
            hostname: HOSTNAME,
            loopback: false,
            cwd: c"/",
            rlimits: &rlimits,
            fds: &fds,
            new_session: false,
            identity: Identity {
                uid: launch.uid,
                last_cap: self.last_cap,
            },
            die_with_parent: self.sandbox.die_with_daemon,
            landlock: landlock.as_ref().map(AsRawFd::as_raw_fd),
            filters: &[&self.filters.deny, &self.filters.clone3],
        };
        let started = spawn::spawn(&plan)?;
        drop(console_write);
        Ok(Started {
            pid: started.pid,
            pid_start: super::pid_start_time(started.pid),
            pidfd: started.pidfd,
            console: console_read,
        })
    }

    /// The steps of the root that depend on the instance: its root is its uid's, its
    /// upstream grants (the scratch directory, read-only), its `/proc`.
    fn own_layout(&self, spec: &BootSpec, uid: u32) -> Result<Layout, root::LayoutError> {
        let mut own = self.base.after().own(Path::new("/"), uid)?;
        if !spec.run.upstreams.is_empty() {
            own = own.bind(
                &spec.scratch,
                Path::new(UPSTREAM_DIR),
                root::Access::ReadOnlyNoExec,
            )?;
        }
        if spec.run.proc {
            own = own.proc()?;
        }
        Ok(own)
    }
}

/// The instance's environment: the socket hand-off, who it is, its grants, the manifest's.
fn environment(spec: &BootSpec) -> Vec<String> {
    let mut env = vec![
        "LISTEN_FDS=1".to_owned(),
        "LISTEN_PID=1".to_owned(),
        "LISTEN_FDNAMES=http".to_owned(),
        format!("REVBOOT_SERVICE={}", spec.service),
        format!("REVBOOT_REVISION={}", spec.revision),
        format!("REVBOOT_INSTANCE={}", spec.id),
        "PATH=/".to_owned(),
    ];
    // Before the manifest's entries: the first of two equal keys wins in getenv.
    if let Some(client) = spec.client {
        env.push(format!("REVBOOT_CLIENT={client}"));
    }
    if spec.run.handoff {
        env.push(format!("{}=4", crate::handoff::HANDOFF_ENV));
    }
    env.extend(upstream::environment(
        Path::new(UPSTREAM_DIR),
        spec.run.upstreams.len(),
    ));
    // The operator's configuration (`revboot config`) over the manifest's entry of a name.
    for (key, value) in crate::tender::variables(spec) {
        env.push(format!("{key}={value}"));
    }
    env
}

/// Every instance holds a few descriptors in the daemon (pidfd, console pipe, the proxy's
/// listener): lift the open-file limit so that tens of thousands of instances fit. As root,
/// the hard limit too, up to the kernel's `fs.nr_open` (at most 2^20); otherwise the soft
/// limit to the hard one.
pub(super) fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(1 << 20);
    let wanted = hard.max(nr_open);
    if wanted > soft && setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        debug!(from = soft, to = wanted, "raised the open-file limit");
    } else if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        debug!(from = soft, to = hard, "raised the open-file limit");
    }
}

fn cstring(bytes: &[u8], what: &str) -> Result<CString, BootError> {
    CString::new(bytes).map_err(|_| BootError::Setup {
        what: what.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"),
    })
}

/// The landlock ruleset. The mount namespace already decides what exists for an instance;
/// landlock adds: nothing executes but its image, no device node is made anywhere, no
/// ioctl on a device, no TCP bind or connect at all. `None` where the kernel has no
/// landlock.
fn landlock_ruleset(
    image: &OwnedFd,
) -> Result<Option<OwnedFd>, Box<dyn std::error::Error + Send + Sync>> {
    let handled = AccessFs::Execute | AccessFs::MakeChar | AccessFs::MakeBlock | AccessFs::IoctlDev;
    let ruleset = Ruleset::default()
        .handle_access(handled)?
        .handle_access(AccessNet::from_all(LANDLOCK_ABI))?
        .create()?
        .add_rule(PathBeneath::new(image, AccessFs::Execute))?;
    let fd: Option<OwnedFd> = ruleset.into();
    fd.map(fd_above).transpose().map_err(Into::into)
}

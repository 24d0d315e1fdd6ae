//! The build sandbox: a recipe is pushed code and runs as such.
//!
//! A build runs in new mount, pid, ipc, uts, cgroup and (unless the recipe says
//! `build.network = true`) network namespaces, as an unprivileged uid with no capability,
//! under the seccomp filter instances have ([`revboot_sandbox`]). Its file system:
//!
//! 1. a tmpfs root (`[builds] scratch_mib`, executables allowed: build scripts run there)
//!    with a sticky `/tmp`, `/dev/null`, `/dev/zero`, `/dev/urandom`, `/dev/random`, and a
//!    read-only `/proc` of its own processes;
//! 2. the host's `/usr` (and `/bin`, `/lib*` as the host has them) and a short list of
//!    `/etc` entries (the loader cache, alternatives, certificates, time zone; the resolver
//!    only with the network), all read-only, and an `/etc/passwd` naming its uid;
//! 3. the toolchain, read-only: the daemon's `CARGO_HOME` and `RUSTUP_HOME` and
//!    `[builds] readonly_paths`, at the paths the host has them;
//! 4. its checkout and its service's cache (`HOME`, `CARGO_TARGET_DIR`), writable, at the
//!    paths the host has them (so the checkout's `target` link works on both sides).
//!
//! Nothing else is there: not the data directory, not the token, not other services'
//! sources or caches. Limits: memory and pids through cgroups, the wall-clock limit of
//! the recipe, `RLIMIT_FSIZE`, and a disk quota over checkout and cache checked every few
//! seconds (`[builds] disk_mib`), and the build is stopped if the data directory's file
//! system runs below `[builds] disk_reserve_mib` free.
//!
//! Builds are cloned by one long-lived thread, so that the parent-death signal means "the
//! daemon died": a `kill -9` of the daemon kills the build's first process, and with it,
//! the kernel kills every process of its pid namespace.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};

use revboot_sandbox::cgroup::{Cgroups, InstanceGroups, Limits};
use revboot_sandbox::creds::Identity;
use revboot_sandbox::root::{Access, Layout, Quota};
use revboot_sandbox::seccomp::{self, Filters};
use revboot_sandbox::spawn::{self, Namespaces, Plan, Program, SpawnError};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::warn;

/// The `/etc` entries a build sees (read-only), besides its own `passwd` and `group`.
const ETC: &[&str] = &[
    "alternatives",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "nsswitch.conf",
    "hosts",
    "protocols",
    "services",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
];
/// Added with `build.network = true`.
const ETC_NETWORK: &[&str] = &["resolv.conf", "gai.conf"];
/// Spawns waiting for the spawner thread.
const QUEUE: usize = 16;

/// The limits and identity of builds (`[builds]` of the daemon's configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// The host uid (and gid) builds run as; no account of the host may use it.
    pub uid: u32,
    /// Memory of one build (its processes and its tmpfs), MiB.
    pub memory_mib: u64,
    /// Processes and threads of one build.
    pub pids: u64,
    /// The build's tmpfs root (`/tmp` and the rest), MiB.
    pub scratch_mib: u64,
    /// Checkout and cache of one service together, MiB; also the largest file.
    pub disk_mib: u64,
    /// A build is stopped when the data directory's file system has less free, MiB.
    pub disk_reserve_mib: u64,
    /// More host directories a build may read (toolchains beyond `/usr` and the daemon's
    /// `CARGO_HOME` and `RUSTUP_HOME`), at the same paths inside.
    pub readonly_paths: Vec<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            // Just below the block instance uids come from.
            uid: revboot_sandbox::uids::UidRange::DEFAULT.base - 1,
            memory_mib: 4096,
            pids: 1024,
            scratch_mib: 512,
            disk_mib: 8192,
            disk_reserve_mib: 512,
            readonly_paths: Vec::new(),
        }
    }
}

impl SandboxConfig {
    /// Checks the values; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.uid < 65_536 || self.uid == u32::MAX {
            return Err(("uid", "must be an unused uid at 65536 or above".into()));
        }
        for (key, value, low) in [
            ("memory_mib", self.memory_mib, 64),
            ("pids", self.pids, 16),
            ("scratch_mib", self.scratch_mib, 1),
            ("disk_mib", self.disk_mib, 1),
        ] {
            if value < low {
                return Err((key, format!("must be at least {low}")));
            }
        }
        if let Some(path) = self.readonly_paths.iter().find(|p| !p.is_absolute()) {
            return Err((
                "readonly_paths",
                format!("{} is not absolute", path.display()),
            ));
        }
        Ok(())
    }
}

/// One build to start.
#[derive(Debug)]
pub(crate) struct Launch {
    pub(crate) id: u64,
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, OsString)>,
    pub(crate) checkout: PathBuf,
    pub(crate) cache: PathBuf,
    pub(crate) network: bool,
    /// stdout and stderr.
    pub(crate) output: OwnedFd,
}

/// A build's first process, running.
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) pidfd: OwnedFd,
    pub(crate) groups: Option<InstanceGroups>,
}

struct Request {
    launch: Launch,
    reply: oneshot::Sender<Result<Running, String>>,
}

/// Starts builds in their sandbox (see the module doc).
#[derive(Debug)]
pub(crate) struct Sandbox {
    requests: SyncSender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("id", &self.launch.id)
            .finish()
    }
}

/// What the spawner thread owns.
struct Spawner {
    config: SandboxConfig,
    cgroups: Option<Cgroups>,
    filters: Filters,
    mountpoint: PathBuf,
    toolchain: Vec<PathBuf>,
    path_env: OsString,
    last_cap: u32,
}

impl Sandbox {
    /// Starts the spawner thread. `name` names the builds' cgroups
    /// (`revboot/<name>-builds/…`); `mountpoint` is an empty directory the roots are
    /// assembled on; `toolchain` the host directories builds may read besides the system's.
    pub(crate) fn start(
        name: &str,
        config: SandboxConfig,
        mountpoint: PathBuf,
        toolchain: Vec<PathBuf>,
        path_env: OsString,
    ) -> io::Result<Sandbox> {
        std::fs::create_dir_all(&mountpoint)?;
        let cgroups = match Cgroups::detect(&format!("{name}-builds")) {
            Ok(cgroups) => {
                let removed = cgroups.sweep(&[]);
                if removed > 0 {
                    warn!(
                        removed,
                        "removed the cgroups of builds an earlier daemon left"
                    );
                }
                Some(cgroups)
            }
            Err(error) => {
                warn!(%error, "cgroups unusable: builds run WITHOUT memory and pids limits");
                None
            }
        };
        let filters = seccomp::compile().map_err(io::Error::other)?;
        let mut toolchain = toolchain;
        toolchain.extend(config.readonly_paths.iter().cloned());
        let spawner = Spawner {
            config,
            cgroups,
            filters,
            mountpoint,
            toolchain,
            path_env,
            last_cap: Identity::new(0).last_cap,
        };
        let (requests, queue) = std::sync::mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("revboot-build-spawner".into())
            .spawn(move || spawner.serve(queue))?;
        Ok(Sandbox { requests })
    }

    /// Starts one build; the answer says why it could not start.
    pub(crate) async fn launch(&self, launch: Launch) -> Result<Running, String> {
        let (reply, answer) = oneshot::channel();
        let requests = self.requests.clone();
        tokio::task::spawn_blocking(move || requests.send(Request { launch, reply }))
            .await
            .map_err(|_| "the build spawner is gone".to_owned())?
            .map_err(|_| "the build spawner is gone".to_owned())?;
        answer
            .await
            .map_err(|_| "the build spawner is gone".to_owned())?
    }
}

impl Spawner {
    fn serve(self, queue: Receiver<Request>) {
        self.serve_requests(queue);
        // The builder is gone, and every build with it.
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove_parents();
        }
    }

    fn serve_requests(&self, queue: Receiver<Request>) {
        while let Ok(request) = queue.recv() {
            let id = request.launch.id;
            let result = self.spawn(request.launch);
            if let Err(Ok(running)) = request.reply.send(result) {
                // Nobody waits for it any more: end it here.
                warn!(build = id, "build abandoned while starting: killing it");
                spawn::send_signal(running.pidfd.as_raw_fd(), libc::SIGKILL);
                let _ = spawn::reap_blocking(running.pidfd.as_raw_fd());
                if let Some(groups) = running.groups {
                    groups.remove();
                }
            }
        }
    }

    fn spawn(&self, launch: Launch) -> Result<Running, String> {
        let uid = self.config.uid;
        for dir in [&launch.checkout, &launch.cache] {
            give(dir, uid)
                .map_err(|e| format!("cannot give {} to the build: {e}", dir.display()))?;
        }
        let layout = self
            .layout(&launch, uid)
            .map_err(|e| format!("cannot lay out the build's root: {e}"))?;
        let own = layout.after().proc_full().map_err(|e| e.to_string())?;
        let program = self.resolve(&launch.argv[0])?;
        let argv: Vec<CString> = launch
            .argv
            .iter()
            .map(|arg| CString::new(arg.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| "the build command has a NUL byte".to_owned())?;
        let mut envp = Vec::with_capacity(launch.env.len() + 1);
        envp.push(c_env("PATH", &self.path_env)?);
        for (key, value) in &launch.env {
            envp.push(c_env(key, value)?);
        }
        let groups = match &self.cgroups {
            Some(cgroups) => {
                let mut groups = cgroups
                    .create(&format!("build-{}", launch.id))
                    .map_err(|e| format!("cannot create the build's cgroups: {e}"))?;
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
                let limits = Limits {
                    memory_bytes: self.config.memory_mib * 1024 * 1024,
                    pids: self.config.pids,
                    cpu_percent: 100 * cores,
                };
                if let Err(error) = groups.limit(limits) {
                    groups.remove();
                    return Err(format!("cannot limit the build: {error}"));
                }
                Some(groups)
            }
            None => None,
        };
        let procs: Vec<_> = groups
            .as_ref()
            .map(|g| g.procs.iter().map(AsRawFd::as_raw_fd).collect())
            .unwrap_or_default();
        let devnull = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
        let mountpoint = c_path(&self.mountpoint)?;
        let cwd = c_path(&launch.checkout)?;
        let output = launch.output.as_raw_fd();
        let rlimits = [
            (libc::RLIMIT_CORE, 0),
            (libc::RLIMIT_FSIZE, self.config.disk_mib * 1024 * 1024),
        ];
        let plan = Plan {
            program: Program::Path(&program),
            argv: &argv,
            envp: &envp,
            cgroup_procs: &procs,
            namespaces: Namespaces::Fresh {
                host_network: launch.network,
            },
            base: &layout,
            own: &own,
            mountpoint: &mountpoint,
            hostname: c"build",
            loopback: true,
            cwd: &cwd,
            rlimits: &rlimits,
            fds: &[devnull.as_raw_fd(), output, output],
            new_session: true,
            identity: Identity {
                uid,
                last_cap: self.last_cap,
            },
            die_with_parent: true,
            landlock: None,
            filters: &[&self.filters.deny, &self.filters.clone3],
        };
        match spawn::spawn(&plan) {
            Ok(started) => Ok(Running {
                pidfd: started.pidfd,
                groups,
            }),
            Err(error) => {
                if let Some(groups) = groups {
                    groups.remove();
                }
                Err(match error {
                    SpawnError::Step { step, source } => {
                        format!("cannot start the build in its sandbox: {step}: {source}")
                    }
                    other => format!("{other}"),
                })
            }
        }
    }

    /// The root of one build (module doc, steps 1 to 4).
    fn layout(
        &self,
        launch: &Launch,
        uid: u32,
    ) -> Result<Layout, revboot_sandbox::root::LayoutError> {
        let mut etc: Vec<&str> = ETC.to_vec();
        if launch.network {
            etc.extend(ETC_NETWORK);
        }
        let passwd = format!(
            "root:x:0:0::/:/usr/sbin/nologin\nbuild:x:{uid}:{uid}:revboot build:{}:/bin/sh\n",
            launch.cache.join("home").display()
        );
        let group = format!("root:x:0:\nbuild:x:{uid}:\n");
        let mut layout = Layout::new(
            &self.mountpoint,
            Quota {
                bytes: self.config.scratch_mib * 1024 * 1024,
                inodes: self.config.scratch_mib * 256,
                exec: true,
            },
        )?
        .devices()?
        .symlink(Path::new("/proc/self/fd"), Path::new("/dev/fd"))?
        .symlink(Path::new("/proc/self/fd/0"), Path::new("/dev/stdin"))?
        .symlink(Path::new("/proc/self/fd/1"), Path::new("/dev/stdout"))?
        .symlink(Path::new("/proc/self/fd/2"), Path::new("/dev/stderr"))?
        .dir_with_mode(Path::new("/tmp"), 0o1777)?
        .host_system(&etc)?
        .file(Path::new("/etc/passwd"), passwd.as_bytes(), 0o644)?
        .file(Path::new("/etc/group"), group.as_bytes(), 0o644)?;
        for path in &self.toolchain {
            if path.is_dir() {
                layout = layout.bind(path, path, Access::ReadOnly)?;
            }
        }
        layout
            .bind(&launch.checkout, &launch.checkout, Access::WritableExec)?
            .bind(&launch.cache, &launch.cache, Access::WritableExec)
    }

    /// The program of `name` as the build will see it: a path inside one of the read-only
    /// directories, or found along `PATH` in one of them.
    fn resolve(&self, name: &str) -> Result<CString, String> {
        let visible = |path: &Path| {
            ["/usr", "/bin", "/sbin", "/lib", "/lib64"]
                .iter()
                .map(Path::new)
                .chain(self.toolchain.iter().map(PathBuf::as_path))
                .any(|root| path.starts_with(root))
        };
        let candidates: Vec<PathBuf> = if name.contains('/') {
            vec![PathBuf::from(name)]
        } else {
            std::env::split_paths(&self.path_env)
                .map(|dir| dir.join(name))
                .collect()
        };
        let found = candidates
            .into_iter()
            .find(|path| path.is_absolute() && visible(path) && is_executable(path))
            .ok_or_else(|| {
                format!(
                    "`{name}` is not found in the build sandbox (only /usr, the toolchain and \
                     [builds] readonly_paths are there; a program in the checkout is run as \
                     `./name` or with `shell`)"
                )
            })?;
        c_path(&found)
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{} has a NUL byte", path.display()))
}

fn c_env(key: &str, value: &OsStr) -> Result<CString, String> {
    let mut entry = key.as_bytes().to_vec();
    entry.push(b'=');
    entry.extend_from_slice(value.as_bytes());
    CString::new(entry).map_err(|_| format!("the environment entry {key} has a NUL byte"))
}

/// Gives `dir` and everything below it to `uid` (and its gid), unless it is `uid`'s
/// already (a cache made by an earlier build is).
fn give(dir: &Path, uid: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::symlink_metadata(dir)?.uid() == uid {
        return Ok(());
    }
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        std::os::unix::fs::lchown(&path, Some(uid), Some(uid))?;
        if std::fs::symlink_metadata(&path)?.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Bytes used below `dirs`, counting at most `limit` entries; `None` past that.
pub(crate) fn usage(dirs: &[&Path], limit: usize) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut pending: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
    let mut bytes = 0u64;
    let mut seen = 0usize;
    while let Some(path) = pending.pop() {
        seen += 1;
        if seen > limit {
            return None;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        bytes += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            pending.extend(entries.flatten().map(|e| e.path()));
        }
    }
    Some(bytes)
}

/// Free bytes (for an unprivileged writer) of the file system holding `path`.
pub(crate) fn free_bytes(path: &Path) -> Result<u64, nix::Error> {
    let stat = nix::sys::statvfs::statvfs(path)?;
    Ok(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_are_named() {
        assert!(SandboxConfig::default().validate().is_ok());
        let mut bad = SandboxConfig {
            uid: 0,
            ..SandboxConfig::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.0), Err("uid"));
        bad = SandboxConfig {
            readonly_paths: vec!["relative".into()],
            ..SandboxConfig::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.0), Err("readonly_paths"));
    }

    #[test]
    fn usage_counts_and_gives_up_past_its_bound() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("a"), vec![1u8; 64 * 1024]).expect("write");
        let used = usage(&[dir.path()], 100).expect("counted");
        assert!(used >= 64 * 1024, "{used}");
        for n in 0..10 {
            std::fs::write(dir.path().join(format!("f{n}")), b"x").expect("write");
        }
        assert_eq!(usage(&[dir.path()], 5), None);
    }
}

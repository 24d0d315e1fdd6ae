//! Where a daemon's cgroups go: below the cgroup systemd delegated to it (a unit with
//! `Delegate=yes`), else at the root of each hierarchy.
//!
//! 1. `/proc/self/cgroup` gives this process's cgroup in each hierarchy: `0::/path` on v2,
//!    `N:controllers:/path` on v1 (`N:name=systemd:/path` for systemd's own), paths relative
//!    to the root of the cgroup namespace, as the mounts' are.
//! 2. A cgroup is delegated when its `trusted.delegate` (or `user.delegate`) extended
//!    attribute is `1`: systemd (since v251) sets it on the cgroup of a unit with
//!    `Delegate=yes`, in its own hierarchy: the v2 one (pure v2, or the `unified` tree of a
//!    hybrid host) or `name=systemd`, looked at in that order. The nearest such cgroup at or above this process's
//!    is the delegated one; none (no systemd, no `Delegate=yes`, a systemd that could not set
//!    the attribute): every hierarchy's root is used, as by a daemon started by hand.
//! 3. On v2, the groups go below the delegated cgroup. On v1 they go below it in each
//!    hierarchy where this process's cgroup lies at or below the delegated path (systemd
//!    makes the unit's cgroup in the v1 hierarchy of every controller it delegates, which for
//!    a unit that runs as root is all of them); in a hierarchy where it does not, at that
//!    hierarchy's root, with a warning.
//! 4. v2 lets no cgroup with processes give controllers to its children: before the daemon
//!    enables them in the delegated cgroup, the processes in it (the daemon itself) move to
//!    its leaf [`DAEMON_LEAF`]. v1 has no such rule: nothing moves there.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The leaf of a delegated v2 cgroup the daemon's own processes move to (rule 4).
pub const DAEMON_LEAF: &str = "daemon";

/// This process's cgroups, from `/proc/self/cgroup` (rule 1).
#[derive(Debug, Default)]
pub(super) struct OwnCgroups {
    v2: Option<PathBuf>,
    v1: Vec<(Vec<String>, PathBuf)>,
}

impl OwnCgroups {
    pub(super) fn parse(text: &str) -> OwnCgroups {
        let mut own = OwnCgroups::default();
        for line in text.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if id == "0" && controllers.is_empty() {
                own.v2 = Some(PathBuf::from(path));
            } else {
                let names = controllers.split(',').map(str::to_owned).collect();
                own.v1.push((names, PathBuf::from(path)));
            }
        }
        own
    }

    /// The v2 cgroup.
    pub(super) fn v2(&self) -> Option<&Path> {
        self.v2.as_deref()
    }

    /// The cgroup in the v1 hierarchy of `controller` (`memory`, `name=systemd`…).
    pub(super) fn v1(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(names, _)| names.iter().any(|name| name == controller))
            .map(|(_, path)| path.as_path())
    }
}

/// `path` (absolute within its hierarchy) below `mount`.
pub(super) fn under(mount: &Path, path: &Path) -> PathBuf {
    mount.join(path.strip_prefix("/").unwrap_or(path))
}

/// The nearest cgroup at or above `own` in the hierarchy mounted at `mount` that `marked`
/// says is delegated (rule 2), as a path within the hierarchy.
pub(super) fn delegated(
    mount: &Path,
    own: &Path,
    marked: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    own.ancestors()
        .filter(|path| *path != Path::new("/") && !path.as_os_str().is_empty())
        .find(|path| marked(&under(mount, path)))
        .map(Path::to_path_buf)
}

/// Whether the cgroup directory `dir` carries systemd's delegation mark (rule 2).
pub(super) fn marked(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    for name in [c"trusted.delegate", c"user.delegate"] {
        let mut value = [0u8; 8];
        // SAFETY: `path` and `name` are NUL-terminated strings that outlive the call, and
        // `value` is a writable buffer of `value.len()` bytes.
        let read = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if read == 1 && value[0] == b'1' {
            return true;
        }
    }
    false
}

/// Moves the processes of the v2 cgroup `dir` into its leaf [`DAEMON_LEAF`] (rule 4).
pub(super) fn leave(dir: &Path) -> io::Result<()> {
    let procs = fs::read_to_string(dir.join("cgroup.procs"))?;
    if procs.trim().is_empty() {
        return Ok(());
    }
    let leaf = dir.join(DAEMON_LEAF);
    super::create_dir(&leaf)?;
    for pid in procs.lines().map(str::trim).filter(|pid| !pid.is_empty()) {
        match fs::write(leaf.join("cgroup.procs"), pid) {
            Ok(()) => {}
            // A process that ended since the list was read.
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => {}
            Err(error) => {
                return Err(io::Error::new(
                    error.kind(),
                    format!("moving {pid} to {}: {error}", leaf.display()),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroups_and_the_nearest_delegated_one() {
        let own = OwnCgroups::parse(
            "12:pids:/system.slice/revboot.service\n\
             4:cpu,cpuacct:/system.slice/revboot.service\n\
             1:name=systemd:/system.slice/revboot.service\n\
             0::/system.slice/revboot.service/daemon\n",
        );
        assert_eq!(
            own.v2(),
            Some(Path::new("/system.slice/revboot.service/daemon"))
        );
        assert_eq!(
            own.v1("cpuacct"),
            Some(Path::new("/system.slice/revboot.service"))
        );
        assert_eq!(own.v1("memory"), None);
        let mount = Path::new("/sys/fs/cgroup/unified");
        let found = delegated(mount, own.v2().expect("v2"), |dir| {
            dir == Path::new("/sys/fs/cgroup/unified/system.slice/revboot.service")
        });
        assert_eq!(
            found.as_deref(),
            Some(Path::new("/system.slice/revboot.service"))
        );
        // The root is never a delegated cgroup.
        assert_eq!(delegated(mount, Path::new("/"), |_| true), None);
        assert_eq!(delegated(mount, own.v2().expect("v2"), |_| false), None);
    }

    #[test]
    fn an_unmarked_directory_is_not_delegated() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(!marked(dir.path()));
        assert!(!marked(&dir.path().join("absent")));
    }
}

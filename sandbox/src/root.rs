//! The file system a sandbox sees: a fresh tmpfs root with only what it is given.
//!
//! A [`Layout`] is a list of mount steps prepared (paths as C strings) before the clone; the
//! child runs them with [`Layout::apply`], system calls only, in its own mount namespace,
//! then makes the tmpfs its root with [`enter`]:
//!
//! 1. a tmpfs at the layout's mount point, limited in bytes and inodes, `nosuid`, `nodev`
//!    and (unless asked otherwise) `noexec`: the sandbox's only writable place, its quota;
//! 2. directories and empty files in it, as mount points;
//! 3. bind mounts of the host's paths it may use (`/dev/null`, a toolchain, the image),
//!    read-only unless said otherwise, made read-only recursively (`mount_setattr`);
//! 4. a `proc` with only the sandbox's own processes (`subset=pid`), read-only: no
//!    `/proc/sys`, no `/proc/kcore`, nothing of other processes;
//! 5. [`enter`]: the tmpfs becomes `/`, over the host's tree, so nothing else of the host
//!    stays reachable, not even through a path to a unix socket.
//!
//! Nothing the sandbox writes reaches the host's disk: the tmpfs lives in memory (charged to
//! the sandbox's memory cgroup) and vanishes with its mount namespace.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One step of a layout.
#[derive(Debug)]
enum Step {
    Tmpfs {
        target: CString,
        options: CString,
        flags: libc::c_ulong,
    },
    Dir {
        path: CString,
        mode: libc::mode_t,
    },
    File {
        path: CString,
    },
    Bind {
        source: CString,
        target: CString,
        /// `MOUNT_ATTR_*` set on the bind mount (and below it).
        attributes: u64,
        recursive: bool,
    },
    Proc {
        target: CString,
        subset: bool,
    },
    Own {
        path: CString,
        uid: u32,
    },
    Symlink {
        target: CString,
        path: CString,
    },
    Write {
        path: CString,
        contents: Vec<u8>,
        mode: libc::mode_t,
    },
}

/// How a bind mount may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-only, no set-uid, no devices.
    ReadOnly,
    /// Read-only and no executables.
    ReadOnlyNoExec,
    /// Read-only device node (`/dev/urandom`).
    ReadOnlyDevice,
    /// Writable device node (`/dev/null`: writes vanish).
    Device,
    /// Writable, no set-uid, no devices, no executables (a work directory).
    Writable,
    /// Writable, no set-uid, no devices; executables allowed (a build's output).
    WritableExec,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const AT_RECURSIVE: libc::c_uint = 0x8000;

impl Access {
    fn attributes(self) -> u64 {
        match self {
            Access::ReadOnly => MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            Access::ReadOnlyNoExec => {
                MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
            }
            Access::ReadOnlyDevice => MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
            Access::Device => MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
            Access::Writable => MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
            Access::WritableExec => MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        }
    }
}

/// A sandbox's root file system, ready to be assembled in a child.
#[derive(Debug)]
pub struct Layout {
    root: PathBuf,
    steps: Vec<Step>,
}

/// A path did not make a C string, or was not absolute.
#[derive(Debug, thiserror::Error)]
#[error("Cannot use {path:?} in a sandbox layout: {why}")]
pub struct LayoutError {
    /// The path.
    pub path: PathBuf,
    /// What is wrong with it.
    pub why: &'static str,
}

fn c_path(path: &Path) -> Result<CString, LayoutError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| LayoutError {
        path: path.to_owned(),
        why: "it contains a NUL byte",
    })
}

/// The bounds of a layout's tmpfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Bytes.
    pub bytes: u64,
    /// Files and directories.
    pub inodes: u64,
    /// Allow executing files written there (a build runs what it compiles).
    pub exec: bool,
}

impl Layout {
    /// A layout whose root is a tmpfs mounted at `mountpoint` (an existing directory; the
    /// mount is made in the child's own mount namespace, so one mount point serves any
    /// number of sandboxes) with `quota`, mode 0755.
    pub fn new(mountpoint: &Path, quota: Quota) -> Result<Layout, LayoutError> {
        if !mountpoint.is_absolute() {
            return Err(LayoutError {
                path: mountpoint.to_owned(),
                why: "the mount point is not absolute",
            });
        }
        let options = format!(
            "size={},nr_inodes={},mode=0755",
            quota.bytes.max(4096),
            quota.inodes.max(16)
        );
        let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
        if !quota.exec {
            flags |= libc::MS_NOEXEC;
        }
        Ok(Layout {
            root: mountpoint.to_owned(),
            steps: vec![Step::Tmpfs {
                target: c_path(mountpoint)?,
                options: CString::new(options).expect("no NUL in numbers"),
                flags,
            }],
        })
    }

    /// The host path where the root is assembled.
    pub fn mountpoint(&self) -> &Path {
        &self.root
    }

    /// The host path (in the child's mount namespace) of `inside`, a path as the sandbox
    /// will see it.
    fn at(&self, inside: &Path) -> Result<PathBuf, LayoutError> {
        let relative = inside.strip_prefix("/").map_err(|_| LayoutError {
            path: inside.to_owned(),
            why: "a path inside the sandbox must be absolute",
        })?;
        if relative
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(LayoutError {
                path: inside.to_owned(),
                why: "a path inside the sandbox may not have `..` or `.`",
            });
        }
        Ok(self.root.join(relative))
    }

    /// Makes directory `inside` and any missing parents (mode 0755, owned by root).
    pub fn dir(self, inside: &Path) -> Result<Layout, LayoutError> {
        self.dir_with_mode(inside, 0o755)
    }

    /// Makes directory `inside` with `mode` (`0o1777` for a `/tmp`) and any missing parents
    /// (mode 0755).
    pub fn dir_with_mode(
        mut self,
        inside: &Path,
        mode: libc::mode_t,
    ) -> Result<Layout, LayoutError> {
        self.at(inside)?;
        let mut path = PathBuf::from("/");
        for part in inside.components().skip(1) {
            path.push(part);
            let target = c_path(&self.at(&path)?)?;
            let known = self
                .steps
                .iter()
                .any(|step| matches!(step, Step::Dir { path, .. } if *path == target));
            if !known {
                let last = path.as_path() == inside;
                self.steps.push(Step::Dir {
                    path: target,
                    mode: if last { mode } else { 0o755 },
                });
            }
        }
        Ok(self)
    }

    /// A symbolic link at `inside` whose content is `target` (as the host has `/bin` →
    /// `usr/bin`).
    pub fn symlink(self, target: &Path, inside: &Path) -> Result<Layout, LayoutError> {
        let mut layout = self.dir(inside.parent().unwrap_or(Path::new("/")))?;
        let path = c_path(&layout.at(inside)?)?;
        layout.steps.push(Step::Symlink {
            target: c_path(target)?,
            path,
        });
        Ok(layout)
    }

    /// A file at `inside` with `contents` and `mode`, owned by root (an `/etc/passwd` that
    /// names the sandbox's uid).
    pub fn file(
        self,
        inside: &Path,
        contents: &[u8],
        mode: libc::mode_t,
    ) -> Result<Layout, LayoutError> {
        let mut layout = self.dir(inside.parent().unwrap_or(Path::new("/")))?;
        let path = c_path(&layout.at(inside)?)?;
        layout.steps.push(Step::Write {
            path,
            contents: contents.to_vec(),
            mode,
        });
        Ok(layout)
    }

    /// The host's system directories, read-only: `/usr`, and `/bin`, `/sbin`, `/lib*` as
    /// the host has them (symbolic links into `/usr` on a merged-`/usr` system, bound
    /// directories otherwise); then the entries of `/etc` named in `etc` that exist (not
    /// all of `/etc`: it may hold secrets of the host's other services).
    pub fn host_system(self, etc: &[&str]) -> Result<Layout, LayoutError> {
        let mut layout = self;
        for top in [
            "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
        ] {
            let path = Path::new(top);
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = std::fs::read_link(path).map_err(|_| LayoutError {
                        path: path.to_owned(),
                        why: "its link cannot be read",
                    })?;
                    layout = layout.symlink(&target, path)?;
                }
                Ok(meta) if meta.is_dir() => {
                    layout = layout.bind(path, path, Access::ReadOnly)?;
                }
                _ => {}
            }
        }
        for entry in etc {
            let path = Path::new("/etc").join(entry);
            if std::fs::metadata(&path).is_ok() {
                layout = layout.bind(&path, &path, Access::ReadOnly)?;
            }
        }
        Ok(layout)
    }

    /// Binds the host's `source` (a file or a directory, with what is mounted below it) at
    /// `inside`.
    pub fn bind(self, source: &Path, inside: &Path, access: Access) -> Result<Layout, LayoutError> {
        let is_dir = std::fs::metadata(source).is_ok_and(|m| m.is_dir());
        let parent = inside.parent().unwrap_or(Path::new("/"));
        let mut layout = self.dir(parent)?;
        let target = c_path(&layout.at(inside)?)?;
        layout.steps.push(if is_dir {
            Step::Dir {
                path: target.clone(),
                mode: 0o755,
            }
        } else {
            Step::File {
                path: target.clone(),
            }
        });
        layout.steps.push(Step::Bind {
            source: c_path(source)?,
            target,
            attributes: access.attributes(),
            recursive: is_dir,
        });
        Ok(layout)
    }

    /// `/dev/null` (writable: writes vanish), `/dev/zero`, `/dev/urandom` and `/dev/random`
    /// (read-only), bound from the host's nodes; nothing else in `/dev`.
    pub fn devices(self) -> Result<Layout, LayoutError> {
        let mut layout = self.bind(
            Path::new("/dev/null"),
            Path::new("/dev/null"),
            Access::Device,
        )?;
        for node in ["/dev/zero", "/dev/urandom", "/dev/random"] {
            layout = layout.bind(Path::new(node), Path::new(node), Access::ReadOnlyDevice)?;
        }
        Ok(layout)
    }

    /// A read-only `proc` at `/proc` with the sandbox's own processes only (`subset=pid`:
    /// no `/proc/sys`, no `/proc/cpuinfo`). Must be applied by a process inside the
    /// sandbox's pid namespace.
    pub fn proc(self) -> Result<Layout, LayoutError> {
        self.proc_with(true)
    }

    /// A read-only `proc` at `/proc` with the sandbox's own processes and the kernel's
    /// read-only views (`/proc/cpuinfo`, `/proc/meminfo`, `/proc/sys` to read), for
    /// compilers and build tools that look at them.
    pub fn proc_full(self) -> Result<Layout, LayoutError> {
        self.proc_with(false)
    }

    fn proc_with(self, subset: bool) -> Result<Layout, LayoutError> {
        let mut layout = self.dir(Path::new("/proc"))?;
        let target = c_path(&layout.at(Path::new("/proc"))?)?;
        layout.steps.push(Step::Proc { target, subset });
        Ok(layout)
    }

    /// Gives `inside` (`/` for the root) to `uid` (and its gid).
    pub fn own(mut self, inside: &Path, uid: u32) -> Result<Layout, LayoutError> {
        let path = c_path(&self.at(inside)?)?;
        self.steps.push(Step::Own { path, uid });
        Ok(self)
    }

    /// Appends the steps of `more` (built on the same mount point) after these.
    pub fn then(mut self, more: Layout) -> Layout {
        // The second layout's tmpfs is the same root: skip it.
        self.steps.extend(
            more.steps
                .into_iter()
                .filter(|s| !matches!(s, Step::Tmpfs { .. })),
        );
        self
    }

    /// A layout on the same mount point with no step at all (not even the tmpfs), for
    /// steps that follow a root assembled earlier.
    pub fn after(&self) -> Layout {
        Layout {
            root: self.root.clone(),
            steps: Vec::new(),
        }
    }

    /// What step `index` does, for an error message.
    pub fn describe(&self, index: usize) -> String {
        match self.steps.get(index) {
            Some(Step::Tmpfs {
                target, options, ..
            }) => {
                format!(
                    "tmpfs ({}) at {}",
                    options.to_string_lossy(),
                    target.to_string_lossy()
                )
            }
            Some(Step::Dir { path, .. }) => format!("directory {}", path.to_string_lossy()),
            Some(Step::File { path }) => format!("mount point {}", path.to_string_lossy()),
            Some(Step::Bind { source, target, .. }) => format!(
                "bind {} at {}",
                source.to_string_lossy(),
                target.to_string_lossy()
            ),
            Some(Step::Proc { target, .. }) => format!("proc at {}", target.to_string_lossy()),
            Some(Step::Own { path, uid }) => {
                format!("owner {uid} of {}", path.to_string_lossy())
            }
            Some(Step::Symlink { target, path }) => format!(
                "link {} -> {}",
                path.to_string_lossy(),
                target.to_string_lossy()
            ),
            Some(Step::Write { path, .. }) => format!("file {}", path.to_string_lossy()),
            None => "an unknown step".into(),
        }
    }

    /// Runs the steps in order. System calls only, so it may run in a `CLONE_VM` child.
    /// On failure: the index of the failing step (see [`Layout::describe`]); `errno` holds
    /// the cause.
    ///
    /// # Safety
    /// Mounts on the host paths of the layout: the caller must be in a mount namespace of
    /// its own whose mounts do not propagate to the host's.
    pub unsafe fn apply(&self) -> Result<(), usize> {
        for (index, step) in self.steps.iter().enumerate() {
            // SAFETY: each step is a system call on C strings owned by the layout.
            let ok = unsafe { run(step) };
            if !ok {
                return Err(index);
            }
        }
        Ok(())
    }
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// One step; false (with `errno` set) when it failed.
unsafe fn run(step: &Step) -> bool {
    // SAFETY (whole block): system calls on NUL-terminated strings and stack values.
    unsafe {
        match step {
            Step::Tmpfs {
                target,
                options,
                flags,
            } => {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    target.as_ptr(),
                    c"tmpfs".as_ptr(),
                    *flags,
                    options.as_ptr().cast(),
                ) == 0
            }
            Step::Dir { path, mode } => {
                (libc::mkdir(path.as_ptr(), *mode) == 0 || *libc::__errno_location() == libc::EEXIST)
                    // The umask may have taken bits away (the sticky 1777 of a /tmp).
                    && (*mode == 0o755 || libc::chmod(path.as_ptr(), *mode) == 0)
            }
            Step::File { path } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    0o644,
                );
                fd >= 0 && libc::close(fd) == 0
            }
            Step::Bind {
                source,
                target,
                attributes,
                recursive,
            } => {
                let mut flags = libc::MS_BIND;
                if *recursive {
                    flags |= libc::MS_REC;
                }
                if libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                ) != 0
                {
                    return false;
                }
                let attr = MountAttr {
                    attr_set: *attributes,
                    attr_clr: 0,
                    propagation: 0,
                    userns_fd: 0,
                };
                let recursive = if *recursive { AT_RECURSIVE } else { 0 };
                libc::syscall(
                    libc::SYS_mount_setattr,
                    libc::AT_FDCWD,
                    target.as_ptr(),
                    recursive,
                    &raw const attr,
                    std::mem::size_of::<MountAttr>(),
                ) == 0
            }
            Step::Proc { target, subset } => {
                let options = if *subset {
                    c"subset=pid,hidepid=invisible"
                } else {
                    c"hidepid=invisible"
                };
                libc::mount(
                    c"proc".as_ptr(),
                    target.as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    options.as_ptr().cast(),
                ) == 0
            }
            Step::Own { path, uid } => libc::chown(path.as_ptr(), *uid, *uid) == 0,
            Step::Symlink { target, path } => libc::symlink(target.as_ptr(), path.as_ptr()) == 0,
            Step::Write {
                path,
                contents,
                mode,
            } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_WRONLY
                        | libc::O_CLOEXEC
                        | libc::O_NOFOLLOW,
                    *mode,
                );
                if fd < 0 {
                    return false;
                }
                let mut written = 0;
                while written < contents.len() {
                    let n = libc::write(
                        fd,
                        contents[written..].as_ptr().cast(),
                        contents.len() - written,
                    );
                    if n <= 0 {
                        libc::close(fd);
                        return false;
                    }
                    written += n as usize;
                }
                libc::fchmod(fd, *mode) == 0 && libc::close(fd) == 0
            }
        }
    }
}

/// Stops mounts of the calling process's mount namespace from propagating to the host's
/// (and back): the first step in a new mount namespace. System calls only; on failure
/// `errno` holds the cause.
///
/// # Safety
/// Changes the propagation of every mount of the caller's mount namespace: call it only in
/// a mount namespace of its own.
pub unsafe fn make_private() -> bool {
    // SAFETY: mount with a NUL-terminated path and null pointers.
    unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) == 0
    }
}

/// Makes `root` (a mount point) the calling process's `/`: moves the mount onto `/`, over
/// the old root, and changes the process's root to it (`switch_root`'s way). System calls
/// only. On failure `errno` holds the cause.
///
/// Not `pivot_root`: the kernel's `pivot_root` walks every thread of the host to move
/// the ones rooted in the old root, so with thousands of sandboxes running each new one
/// took longer. Here the old root stays mounted, covered by the new one in the sandbox's
/// own mount namespace: no path leads to it (`..` of `/` is `/`), `/proc/self/mountinfo`
/// lists no mount outside the root, and undoing the cover would take capabilities and
/// system calls (`umount`, `chroot`, `open_tree`…) the sandbox does not have.
///
/// # Safety
/// Changes the root of the calling process: call it in a child, in a mount namespace of its
/// own with private propagation.
pub unsafe fn enter(root: &CStr) -> bool {
    // SAFETY: system calls on NUL-terminated strings.
    unsafe {
        libc::chdir(root.as_ptr()) == 0
            && libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            ) == 0
            && libc::chroot(c".".as_ptr()) == 0
            && libc::chdir(c"/".as_ptr()) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota() -> Quota {
        Quota {
            bytes: 1 << 20,
            inodes: 64,
            exec: false,
        }
    }

    #[test]
    fn paths_inside_are_checked() {
        let layout = Layout::new(Path::new("/x/root"), quota()).expect("layout");
        assert!(layout.dir(Path::new("relative")).is_err());
        let layout = Layout::new(Path::new("/x/root"), quota()).expect("layout");
        assert!(layout.dir(Path::new("/a/../b")).is_err());
        assert!(Layout::new(Path::new("root"), quota()).is_err());
    }

    #[test]
    fn parents_are_made_once_and_described() {
        let layout = Layout::new(Path::new("/x/root"), quota())
            .and_then(|l| l.dir(Path::new("/a/b")))
            .and_then(|l| l.dir(Path::new("/a/c")))
            .expect("layout");
        let described: Vec<String> = (0..layout.steps.len())
            .map(|i| layout.describe(i))
            .collect();
        assert_eq!(
            described,
            [
                "tmpfs (size=1048576,nr_inodes=64,mode=0755) at /x/root",
                "directory /x/root/a",
                "directory /x/root/a/b",
                "directory /x/root/a/c",
            ]
        );
    }
}

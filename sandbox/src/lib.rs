//! The revboot sandbox: what pushed code runs inside, instances and builds alike.
//!
//! Pushed code is hostile: a service (or its build recipe) may be written to escape. This
//! crate holds the pieces both the deployer's tenders and the builder put around it, each
//! usable between `clone` and `exec` (system calls only, no allocation):
//!
//! - [`root`]: a fresh tmpfs root with a byte and inode quota, only the host paths the
//!   sandbox is given (read-only unless said otherwise), `/dev/null`, `/dev/zero` and
//!   `/dev/urandom`, a read-only `proc` with only its own processes; entering it.
//! - [`creds`]: an unprivileged host uid per sandbox, every capability dropped for good.
//! - [`uids`]: the block of host uids sandboxes run as, one per sandbox at a time.
//! - [`seccomp`]: the system-call filter (what is refused, and why the rest is allowed).
//! - [`cgroup`]: memory, pids and CPU limits on cgroup v1, v2 or a hybrid.
//! - [`spawn`]: the clone that puts them together and executes the program.
//! - [`worker`]: the long-lived thread spawns run on, so that sandboxes die with the daemon.
//! - [`parent`]: the daemon's main thread as the parent of every sandbox, and the re-exec
//!   of an upgrade in place that keeps them running.
//!
//! Beside them, [`secret`] keeps what sandboxes must never see: the daemon's tokens on
//! disk, random and readable by the daemon alone; [`stat`] reads what `/proc/<pid>/stat`
//! says of a process (its parent, its start time), to tell the processes it started apart.
//!
//! The order a child applies them in, with the reason for each position:
//!
//! 1. join the cgroups (while still root: the cgroup files are root's);
//! 2. enter fresh mount, pid, net, ipc, uts and cgroup namespaces (the clone's flags);
//! 3. assemble the root ([`root::Layout::apply`]) and enter it ([`root::enter`]);
//! 4. set rlimits and place file descriptors;
//! 5. become the sandbox's uid with no capabilities ([`creds::drop_to`]);
//! 6. set the parent-death signal (a credential change clears it) and `no_new_privs`;
//! 7. landlock, then seccomp (last: it forbids calls the steps above make), then `exec`.
//!
//! # Limits
//!
//! Linux only, x86_64 for the seccomp filter; assembling a root and changing uids needs root
//! (the daemon runs as root; the sandboxed code never does). Landlock is applied by the
//! callers (its rules name their own paths).
//!
//! # Example
//!
//! ```no_run
//! use std::path::Path;
//! use revboot_sandbox::root::{Access, Layout, Quota};
//!
//! // A root with 16 MiB of scratch, /dev and /proc, and the host's /usr read-only.
//! let layout = Layout::new(Path::new("/var/lib/revboot/root"), Quota {
//!     bytes: 16 << 20,
//!     inodes: 4096,
//!     exec: false,
//! })?
//! .devices()?
//! .bind(Path::new("/usr"), Path::new("/usr"), Access::ReadOnly)?
//! .proc()?;
//! // In the child, in its own mount and pid namespaces:
//! // unsafe { layout.apply() }?; unsafe { revboot_sandbox::root::enter(c"/var/lib/revboot/root") };
//! # Ok::<(), revboot_sandbox::root::LayoutError>(())
//! ```

#![deny(missing_docs)]

pub mod cgroup;
pub mod creds;
pub mod parent;
pub mod root;
pub mod seccomp;
pub mod secret;
pub mod spawn;
pub mod stat;
pub mod uids;
pub mod worker;

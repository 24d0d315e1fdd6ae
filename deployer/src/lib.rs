//! The revboot deployer: it owns every instance.
//!
//! It boots images from the deployment repository on demand through a [`Tender`] backend,
//! watches them, reaps them when idle, and writes their story back to the store. The DNS
//! front end and the handshake proxy reach it through the [`Instances`] trait; the root
//! binary builds a [`Deployer`] from a [`DeployerConfig`] and uses [`Deployer::list`],
//! [`Deployer::stop`], [`Deployer::kill`] and [`Deployer::shutdown`].
//!
//! # The life of an instance
//!
//! An instance is (service, deployment commit, optional client address).
//!
//! 1. **cold** — nothing runs. A [`Instances::summon`] (a DNS query, a connection at the
//!    proxy) checks the crash-loop back-off and the caps (global, per service, clients per
//!    per-client service), takes a service address from the pool and lets the tender claim
//!    the backend socket (a VM's forward is bound by qemu itself, and its port known once
//!    qemu runs: [`Backend`]); it returns at once. Concurrent summons of one instance get the
//!    same one. When a per-client service's client slots are full, a new client gets the
//!    slot of the client instance quiet longest with no connection open, which is stopped
//!    (`stopped: client slot reclaimed for a new client`); with none such, the summon is
//!    refused. Lasting refusals (caps, back-off) are logged once per service per 10 s.
//! 2. **booting** — the image is materialised from the store's cache and started; the
//!    listening socket already exists, so a connection made now waits in the kernel. A VM
//!    of a revision whose ready guest was saved is restored instead (the qemu tender's
//!    snapshots, [`tender::qemu`]). Behind the proxy, a process instance's connections go
//!    straight to that socket from here on, handed over by the kernel ([`steer`]): they
//!    wait in its queue, not in the proxy's relay.
//! 3. **ready** — the manifest's probe passed (`socket`: at exec; `tcp`; `http` GET path;
//!    `console` line), all within `run.boot_timeout_ms`; a miss is a crash with the reason.
//!    Behind the proxy, new connections to its service address now go straight to its
//!    socket (a VM's too), handed over by the kernel ([`steer`]); the route goes when it
//!    stops serving.
//! 4. **idle** — no open connection and no query for half the idle timeout; activity makes
//!    it ready again.
//! 5. **stopped** — quiet for the whole idle timeout (`run.idle_timeout_secs`), or stopped by
//!    an operator or the shutdown: SIGTERM, SIGKILL after the grace. Its record says why the
//!    deployer stopped it (`stopped: idle for 60s`), whichever of the two signals ended it.
//! 6. **crashed** — it exited on its own, was killed at its memory limit, or never became
//!    ready. The next summon boots it again; quick crashes in a row back off exponentially
//!    (capped) and summons fail with [`SummonError::Backoff`] meanwhile.
//! 7. After stopped or crashed: the address returns to the pool, the cgroups, scratch
//!    directory and durable record go, and the outcome, boot time, lifetime and console tail
//!    are written to the store's log ref for the service.
//!
//! A restarted daemon kills what the durable state (redb) says an earlier one left running
//! (checking that each pid still is that process), removes orphaned cgroups and scratch
//! directories, and boots instances again on demand: it does not re-adopt them.
//!
//! An upgrade in place is the exception: [`Deployer::hand_over`] gives the running process
//! and qemu instances (their console pipes, records, uids, addresses; a VM's QMP socket)
//! to the daemon's next program,
//! executed in the same process, which takes them back with [`Deployer::with_handover`]
//! and tends them from where they were (the `handover` module states the protocol).
//!
//! A service being renamed or deleted is retired ([`Deployer::retire`]): its instances are
//! stopped (`stopped: service renamed or deleted`, their records written under the old
//! name) and summons of it are refused ([`SummonError::Retiring`]) until the returned
//! [`Retirement`] is dropped.
//!
//! # Running for months
//!
//! - Configuration variables and secrets ([`vars`]): sealed on disk, copied into the
//!   environment of each process instance at its boot, never logged; [`Deployer::restart`]
//!   replaces the running instances of a service after a change.
//! - Health checks ([`Deployer::check`]): the manifest's `[deploy] check` run against a
//!   summoned instance before live moves to its revision; a failed one stops it.
//! - Warm services ([`Deployer::keep_warm`]): `[run] min_instances = N` keeps N replicas
//!   of a service's live revision booted (replica `n` of [`InstanceKey::replica`]), idle
//!   reaping passes them by; they share one service address, and [`Instances::summon`] and
//!   [`Instances::by_address`] give each caller the serving replica with the fewest open
//!   connections (the `warm` module's rules).
//!
//! # The process sandbox
//!
//! The process tender (solo5-spt is the model) runs a static ELF so (the pieces come from
//! `revboot-sandbox`, shared with builds):
//!
//! 1. Its own pid namespace (the image is pid 1 and sees only its own processes), mount
//!    namespace whose root is a tmpfs of `[sandbox] scratch_mib` (its only writable place:
//!    its scratch space and its disk quota, counted in its memory too), and its own net,
//!    ipc, uts and cgroup namespaces. The network namespace is empty: no interface is up, so
//!    nothing leaves; the instance serves on the socket it inherits.
//! 2. In that root: `/dev/null`, `/dev/zero`, `/dev/urandom`, `/dev/random` (bound from the
//!    host, read-only but `/dev/null`), a read-only `/proc` with only its own processes
//!    (`subset=pid`: no `/proc/sys`) if its manifest asks (`run.proc`; each is a file
//!    system the kernel keeps per instance, and every memory cgroup pays for every file
//!    system alive, so none by default), no `/sys`, no other device; `nodev`, `nosuid`,
//!    `noexec`. Nothing of the host's tree is reachable (the root is moved over `/` and entered).
//! 3. It runs as an unprivileged host uid of its own (`[sandbox] uids`, one per instance),
//!    with no capability at all: the bounding set is emptied and the secure bits locked
//!    before the uid change, so no exec can gain one.
//! 4. Net, ipc, uts and mount namespaces (with the root's shared part assembled) are made
//!    ahead of time by a helper thread (a small pool), one set per instance, never shared;
//!    an empty pool falls back to making them in the clone.
//! 5. Limits through cgroups on v1, v2 or a hybrid: memory (no swap), pids, cpu quota; a
//!    missing controller is reported once. rlimits: open files, core size 0, file size,
//!    locked memory.
//! 6. No new privileges; the parent-death signal kills it with the daemon (configurable).
//! 7. Landlock: nothing executes but its image, no device node is made, no ioctl on a
//!    device, no TCP bind or connect at all.
//! 8. Seccomp: a deny-list (ptrace, mount, namespaces, modules, kexec, bpf, perf, keyrings,
//!    userfaultfd, swap, clocks, reboot, io_uring, device nodes…), namespaced `clone`
//!    refused, `clone3` reported missing so that libc falls back to the checked `clone`
//!    (`revboot_sandbox::seccomp` names every refused call and why the rest is allowed).
//! 9. The listening socket is fd 3 (`LISTEN_FDS=1`, `LISTEN_PID=1`); stdin is `/dev/null`;
//!    stdout and stderr go to the console ring (the last 64 KiB by default), followed live
//!    by [`Deployer::follow`] (as a qemu instance's serial console is).
//! 10. Upstreams the manifest names are reached only through unix sockets the deployer
//!     grants in the scratch directory, bound read-only at `/upstream` ([`upstream`]).
//!
//! # Limits
//!
//! Linux only; the process tender needs root (namespaces, cgroups, uids). Images must be
//! static (nothing of the host's libraries is in an instance's root). Service addresses
//! are IPv4 loopback addresses.
//!
//! At ten thousand instances the kernel sets the pace: each instance holds one descriptor
//! of the daemon (the open-file limit is raised to `fs.nr_open` when the daemon may), a
//! memory cgroup, and a tmpfs, and every new memory cgroup is given room for every file
//! system mounted on the host (the kernel's per-cgroup shrinker maps), so memory per
//! instance grows slowly with the number of instances; a cpu quota is written only when it
//! differs from the spares' default, since each write walks every cpu group. Stopping
//! thousands at once leaves the kernel tearing down their namespaces for a while.

//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use revboot_deployer::{Deployer, DeployerConfig, InstanceState, Instances};
//! use revboot_store::Store;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Store::open("/var/lib/revboot/deploy.git")?;
//! let config = DeployerConfig::new("/var/lib/revboot/deployer");
//! let deployer: Arc<Deployer> = Deployer::new(config, store, tokio::runtime::Handle::current())?;
//! let resolved = deployer.resolve("hello", None)?;
//! let summoned = deployer.summon("hello", &resolved.revision, None)?;
//! let mut state = summoned.state.clone();
//! state.wait_for(InstanceState::is_serving).await?;
//! // Known once the instance is ready (a VM's port forward: once qemu bound it).
//! if let Some(backend) = summoned.backend.get() {
//!     println!("hello serves on {backend}");
//! }
//! deployer.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod addresses;
pub mod config;
#[allow(unsafe_code)] // sock_diag over a netlink socket: raw system calls.
mod conntrack;
pub mod console;
mod deployer;
mod errors;
pub mod handoff;
pub mod local_routes;
pub mod metrics;
pub mod pool;
mod refusals;
pub mod state;
#[allow(unsafe_code)] // BPF programs and maps, pidfd_getfd: raw system calls.
pub mod steer;
pub mod summon;
pub mod tender;
pub mod upstream;
pub mod vars;

pub use addresses::{ClientNet, ClientPrefixes, Family, ServiceAddresses};
pub use config::{BackendPort, DeployerConfig, SandboxConfig};
pub use deployer::{
    CheckFailed, CheckPassed, ConsoleFollower, ControlError, Deployer, FollowEvent, FollowFilter,
    HandedInstance, Handover, InstanceInfo, NewError, Retirement,
};
pub use handoff::{Handoff, HandoffError};
pub use revboot_store::manifest::{Reach, Tls as TlsMode};
pub use summon::{
    Activity, Backend, InstanceKey, InstanceState, Instances, LaunchScope, ResolveError, Resolved,
    SummonError, Summoned,
};
pub use tender::{Tender, Tenders};

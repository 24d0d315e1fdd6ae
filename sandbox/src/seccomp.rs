//! The seccomp filter of sandboxed code: a deny-list.
//!
//! An image is an ordinary static program (libc, threads, sockets, files, `fork`), and a
//! build runs compilers and shells, so the filter allows every call except those that reach
//! beyond the sandbox. solo5-spt allows seven calls because its guests are unikernels
//! linked against solo5; revboot runs ordinary Linux programs, so it names what it refuses
//! instead, and relies on the other layers (no capabilities, an unprivileged uid, empty
//! namespaces, a tmpfs root) for the rest:
//!
//! - the kernel: modules, kexec, reboot, bpf, `perf_event_open`, keyrings (`keyctl`,
//!   `add_key`, `request_key`), swap, clocks, `syslog`, `acct`, quotas, `iopl`/`ioperm`;
//! - other processes: `ptrace`, `process_vm_*`, `kcmp`, `pidfd_getfd`;
//! - the sandbox itself: every mount call, `pivot_root`, `chroot`, `unshare`, `setns`,
//!   namespaced `clone`, `userfaultfd` (a tool for kernel races), `open_by_handle_at`
//!   (opens files by inode, around the mount tree), io_uring (its operations bypass
//!   seccomp), `personality`, host names;
//! - device nodes: `mknod`/`mknodat` of a character or block device (FIFOs and sockets
//!   stay allowed; an unprivileged uid could not make a device anyway, and `nodev` mounts
//!   would not open one: three layers).
//!
//! 1. Filter one answers `EPERM` to the deny-list, to `clone` with any `CLONE_NEW*` flag and
//!    to `mknod`/`mknodat` of a device.
//! 2. Filter two answers `ENOSYS` to `clone3` (its flags live in memory, where seccomp cannot
//!    look), so that libc falls back to `clone`, which filter one checks.
//! 3. `socket(AF_INET…)` stays allowed: an instance serves on its inherited socket and may
//!    make sockets, but its network namespace is empty (loopback down, no routes) and
//!    landlock forbids TCP `connect`/`bind`, so nothing leaves; raw and packet sockets need
//!    `CAP_NET_RAW`, which no sandbox has.
//!
//! Both filters are compiled once and installed in the child right before `execve`, after
//! every step that needs a refused call. Limit: the x32 syscall ABI is not filtered
//! separately (most kernels have it off).

use std::collections::BTreeMap;

pub use seccompiler::BpfProgram;
use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// System calls that always get `EPERM`.
const DENIED: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_pidfd_getfd,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_mount_setattr,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_syslog,
    libc::SYS_vhangup,
    libc::SYS_uselib,
    libc::SYS_personality,
    libc::SYS_lookup_dcookie,
    libc::SYS_fanotify_init,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_fanotify_mark,
    libc::SYS_quotactl_fd,
];

/// Namespace flags a `clone` may not carry.
const CLONE_NAMESPACES: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

/// The compiled filters, installed in order.
#[derive(Debug, Clone)]
pub struct Filters {
    /// The deny-list (`EPERM`).
    pub deny: BpfProgram,
    /// `clone3` → `ENOSYS`.
    pub clone3: BpfProgram,
}

/// Why the filter could not be compiled.
#[derive(Debug, thiserror::Error)]
#[error("Cannot compile the seccomp filter")]
pub struct FilterError(#[from] seccompiler::BackendError);

/// Compiles both filters for x86_64.
pub fn compile() -> Result<Filters, FilterError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .map(|&syscall| (syscall, Vec::new()))
        .collect();
    let clone_rules = CLONE_NAMESPACES
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|condition| SeccompRule::new(vec![condition]))
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    // mknod(path, mode, dev) and mknodat(dirfd, path, mode, dev): the mode's file type.
    for (syscall, mode_arg) in [(libc::SYS_mknod, 1), (libc::SYS_mknodat, 2)] {
        let devices = [libc::S_IFCHR, libc::S_IFBLK]
            .iter()
            .map(|&kind| {
                SeccompCondition::new(
                    mode_arg,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(u64::from(libc::S_IFMT)),
                    u64::from(kind),
                )
                .and_then(|condition| SeccompRule::new(vec![condition]))
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(syscall, devices);
    }
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?;
    Ok(Filters {
        deny: deny.try_into()?,
        clone3: clone3.try_into()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles() {
        let filters = compile().expect("compiles");
        assert!(filters.deny.len() > DENIED.len());
        assert!(!filters.clone3.is_empty());
    }
}

//! The seccomp filter of process-tender instances: a deny-list.
//!
//! An image is an ordinary static program (libc, threads, sockets, files), so the filter
//! allows everything except the system calls that reach beyond the instance: the kernel
//! (modules, kexec, reboot, bpf, perf, keyrings, swap, clocks), other processes (ptrace,
//! process_vm_*), the sandbox itself (mount, pivot_root, chroot, unshare, setns, namespaced
//! clones, io_uring which bypasses seccomp for its operations).
//!
//! 1. Filter one answers `EPERM` to the deny-list and to `clone` with any `CLONE_NEW*` flag.
//! 2. Filter two answers `ENOSYS` to `clone3` (its flags live in memory, where seccomp cannot
//!    look), so that libc falls back to `clone`, which filter one checks.
//! 3. `socket(AF_INET…)` stays allowed: the instance serves on its inherited socket and may
//!    make sockets, but its network namespace is empty (loopback down, no routes) and
//!    landlock forbids TCP `connect`/`bind`, so nothing leaves.
//!
//! Both filters are compiled once, in the deployer, and installed in the child right before
//! `execve`. Limit: the x32 syscall ABI is not filtered separately (most kernels have it off).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
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

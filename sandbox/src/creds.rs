//! Becoming unprivileged for good, between `clone` and `exec`.
//!
//! 1. Drop every capability from the bounding set (no exec can ever gain one back).
//! 2. Lock the secure bits: root gets no capabilities at exec (`SECBIT_NOROOT`), and
//!    neither "keep capabilities" nor ambient capabilities can be turned on again.
//! 3. Clear the supplementary groups, then set the real, effective and saved gid and uid.
//!    Leaving uid 0 clears the permitted, effective and ambient sets (the kernel's
//!    set*uid "fix-up", which step 2 locks on).
//! 4. Check: the effective set must now be empty, or the step fails.
//!
//! The credential change clears the parent-death signal, so callers set it afterwards.

/// Which step failed, with the `errno` of the failing call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Failure {
    /// Dropping a capability from the bounding set.
    Bounding,
    /// Locking the secure bits.
    SecureBits,
    /// Clearing the supplementary groups.
    Groups,
    /// Setting the gids.
    Gid,
    /// Setting the uids.
    Uid,
    /// A capability survived.
    Survived,
}

impl Failure {
    /// Every failure, in the order of their numbers.
    pub const ALL: [Failure; 6] = [
        Failure::Bounding,
        Failure::SecureBits,
        Failure::Groups,
        Failure::Gid,
        Failure::Uid,
        Failure::Survived,
    ];

    /// What was being done.
    pub fn what(self) -> &'static str {
        match self {
            Failure::Bounding => "the capability bounding set",
            Failure::SecureBits => "the secure bits",
            Failure::Groups => "the supplementary groups",
            Failure::Gid => "the gid",
            Failure::Uid => "the uid",
            Failure::Survived => "a capability survived the uid change",
        }
    }
}

/// The identity a sandbox runs as, and how many capabilities the kernel knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// uid (and gid) on the host.
    pub uid: u32,
    /// The highest capability number (`/proc/sys/kernel/cap_last_cap`).
    pub last_cap: u32,
}

impl Identity {
    /// `uid`, with the kernel's last capability read now (63 if it cannot be read: the
    /// bounding-set drop skips numbers the kernel does not know).
    pub fn new(uid: u32) -> Identity {
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(63);
        Identity { uid, last_cap }
    }
}

const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;

/// Becomes `identity` with no capability at all. Only system calls and stack memory, so it
/// may run in a `CLONE_VM` child.
///
/// # Safety
/// Changes the credentials of the calling thread: call it in a child between `clone` and
/// `exec`, after every step that needs privileges.
pub unsafe fn drop_to(identity: Identity) -> Result<(), Failure> {
    // SAFETY (whole block): plain system calls with integer arguments or stack pointers.
    unsafe {
        for cap in 0..=identity.last_cap {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return Err(Failure::Bounding);
            }
        }
        let bits = SECBIT_NOROOT
            | SECBIT_NOROOT_LOCKED
            | SECBIT_NO_SETUID_FIXUP_LOCKED
            | SECBIT_KEEP_CAPS_LOCKED
            | SECBIT_NO_CAP_AMBIENT_RAISE
            | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
        if libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) != 0 {
            return Err(Failure::SecureBits);
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(Failure::Groups);
        }
        let id = identity.uid;
        if libc::setresgid(id, id, id) != 0 {
            return Err(Failure::Gid);
        }
        if libc::setresuid(id, id, id) != 0 {
            return Err(Failure::Uid);
        }
        // capget, version 3: two 32-bit words per set.
        let mut header = CapHeader {
            version: 0x2008_0522,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) != 0
            || data.iter().any(|d| d.effective != 0 || d.permitted != 0)
        {
            return Err(Failure::Survived);
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_the_kernels_capabilities() {
        let identity = Identity::new(100_000);
        assert!(identity.last_cap >= 36, "{identity:?}");
    }

    /// In a forked child (system calls only): drop, then try to get root back.
    #[test]
    fn a_dropped_process_cannot_become_root_again() {
        if unsafe { libc::geteuid() } != 0 {
            return; // Only root can change its uid; the suite runs as root.
        }
        let identity = Identity::new(100_123);
        // SAFETY: the child makes system calls only and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: in the forked child.
            unsafe {
                let code = match drop_to(identity) {
                    Err(_) => 10,
                    Ok(()) if libc::getuid() != 100_123 || libc::getgid() != 100_123 => 11,
                    Ok(()) if libc::setuid(0) == 0 => 12,
                    Ok(()) if libc::setgid(0) == 0 => 13,
                    Ok(()) if libc::prctl(libc::PR_CAPBSET_READ, 21, 0, 0, 0) != 0 => 14,
                    Ok(()) => 0,
                };
                libc::_exit(code)
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "{status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "see the codes in the child");
    }
}

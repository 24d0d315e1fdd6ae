//! Memory, pids and cpu limits through cgroups, on v1, v2 or a hybrid of both.
//!
//! 1. [`Cgroups::detect`] reads `/proc/self/mountinfo` and picks, per controller, the v2
//!    hierarchy when it offers the controller, else the v1 hierarchy that has it; a controller
//!    found nowhere is reported once as a warning and its limit is not enforced.
//! 2. The parent `revboot/<name>` is created once in every hierarchy used (v2: controllers
//!    are enabled in `cgroup.subtree_control` on the way down), at the hierarchy's root, or
//!    below the cgroup systemd delegated to the daemon when it runs in one
//!    ([`delegation`]: a unit with `Delegate=yes`).
//! 3. Each instance gets a group `revboot/<name>/<group>` in each hierarchy (made ahead of
//!    time, a few spare), its limits written before the child starts; the child joins by
//!    writing `0` to the pre-opened `tasks` (v1) or `cgroup.procs` (v2).
//! 4. After the exit the OOM counter is read (v1 `memory.oom_control`, v2 `memory.events`)
//!    and the groups are removed, killing stragglers if a group is not empty.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, info, warn};

pub mod delegation;

/// The limits of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// CPU, percent of one core.
    pub cpu_percent: u32,
}

/// A controller the deployer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    /// `memory`.
    Memory,
    /// `pids`.
    Pids,
    /// `cpu`.
    Cpu,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

/// Which cgroup version serves a controller, and where its hierarchy is mounted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Hierarchy {
    V1(PathBuf),
    V2(PathBuf),
}

impl Hierarchy {
    fn mount(&self) -> &Path {
        match self {
            Hierarchy::V1(path) | Hierarchy::V2(path) => path,
        }
    }
}

/// The cgroup layout of the host, as far as the deployer uses it.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// Hierarchy → the controllers it serves for us.
    hierarchies: BTreeMap<Hierarchy, Vec<Controller>>,
    /// `revboot/<name>` below each hierarchy's top.
    parent: PathBuf,
    missing: Vec<Controller>,
    layout: &'static str,
    /// Where systemd's own hierarchy may be mounted: the v2 one, then `name=systemd`.
    systemd_mounts: Vec<(PathBuf, bool)>,
    /// The cgroup systemd delegated to this process (a path within each hierarchy), if any.
    delegated: Option<PathBuf>,
    /// Hierarchies whose groups go below the delegated cgroup, not at their root.
    below_delegated: Vec<Hierarchy>,
}

/// One instance's groups.
#[derive(Debug)]
pub struct InstanceGroups {
    /// Directory, whether it is v2, the controllers it serves.
    dirs: Vec<(PathBuf, bool, Vec<Controller>)>,
    /// Opened `tasks` (v1) or `cgroup.procs` (v2) files, one per group, for the child to
    /// join with.
    pub procs: Vec<File>,
    /// The limits written last: a limit that did not change is not written again (a cpu
    /// quota write walks every cpu group of the host).
    applied: Option<Limits>,
}

impl Cgroups {
    /// Finds the hierarchies and creates `revboot/<name>` in each.
    pub fn detect(name: &str) -> io::Result<Cgroups> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let mut cgroups = Cgroups::from_mountinfo(&mountinfo, name, |path| {
            fs::read_to_string(path.join("cgroup.controllers")).unwrap_or_default()
        });
        let own = fs::read_to_string("/proc/self/cgroup")?;
        cgroups.place(&delegation::OwnCgroups::parse(&own), delegation::marked);
        if let Some(delegated) = &cgroups.delegated {
            info!(
                cgroup = %delegated.display(),
                below = ?cgroups.below_delegated,
                "cgroups go below the cgroup systemd delegated"
            );
        }
        for missing in &cgroups.missing {
            warn!(
                controller = missing.name(),
                layout = cgroups.layout,
                "cgroup controller not available: instances run WITHOUT a {} limit",
                missing.name()
            );
        }
        cgroups.create_parents()?;
        debug!(layout = cgroups.layout, ?cgroups.hierarchies, "cgroups detected");
        Ok(cgroups)
    }

    fn from_mountinfo(
        mountinfo: &str,
        name: &str,
        v2_controllers: impl Fn(&Path) -> String,
    ) -> Cgroups {
        let mut v1: BTreeMap<Controller, PathBuf> = BTreeMap::new();
        let mut v2: Option<(PathBuf, String)> = None;
        let mut systemd_v1 = None;
        for line in mountinfo.lines() {
            // `id parent major:minor root mount-point options [optional…] - fstype source super`
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount = left.split(' ').nth(4).map(PathBuf::from);
            let mut right = right.split(' ');
            let (fstype, _source, options) = (right.next(), right.next(), right.next());
            let Some(mount) = mount else { continue };
            match fstype {
                Some("cgroup2") if v2.is_none() => {
                    let controllers = v2_controllers(&mount);
                    v2 = Some((mount, controllers));
                }
                Some("cgroup") => {
                    let options = options.unwrap_or_default();
                    if options.split(',').any(|option| option == "name=systemd") {
                        systemd_v1.get_or_insert_with(|| mount.clone());
                    }
                    for controller in Controller::ALL {
                        if options.split(',').any(|option| option == controller.name()) {
                            v1.entry(controller).or_insert_with(|| mount.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        let layout = match (&v2, v1.is_empty()) {
            (Some(_), true) => "v2",
            (Some(_), false) => "hybrid",
            (None, false) => "v1",
            (None, true) => "none",
        };
        let mut hierarchies: BTreeMap<Hierarchy, Vec<Controller>> = BTreeMap::new();
        let mut missing = Vec::new();
        for controller in Controller::ALL {
            let in_v2 = v2.as_ref().filter(|(_, controllers)| {
                controllers
                    .split_whitespace()
                    .any(|c| c == controller.name())
            });
            if let Some((mount, _)) = in_v2 {
                hierarchies
                    .entry(Hierarchy::V2(mount.clone()))
                    .or_default()
                    .push(controller);
            } else if let Some(mount) = v1.get(&controller) {
                hierarchies
                    .entry(Hierarchy::V1(mount.clone()))
                    .or_default()
                    .push(controller);
            } else {
                missing.push(controller);
            }
        }
        let systemd_mounts = v2
            .map(|(mount, _)| (mount, true))
            .into_iter()
            .chain(systemd_v1.map(|mount| (mount, false)))
            .collect();
        Cgroups {
            hierarchies,
            parent: Path::new("revboot").join(name),
            missing,
            layout,
            systemd_mounts,
            delegated: None,
            below_delegated: Vec::new(),
        }
    }

    /// Finds the cgroup systemd delegated to this process, and which hierarchies put their
    /// groups below it ([`delegation`], rules 2 and 3).
    fn place(&mut self, own: &delegation::OwnCgroups, marked: impl Fn(&Path) -> bool) {
        let Some(delegated) = self.systemd_mounts.iter().find_map(|(mount, v2)| {
            let path = if *v2 {
                own.v2()
            } else {
                own.v1("name=systemd")
            }?;
            delegation::delegated(mount, path, &marked)
        }) else {
            return;
        };
        for (hierarchy, controllers) in &self.hierarchies {
            let inside = match hierarchy {
                Hierarchy::V2(_) => true,
                Hierarchy::V1(_) => controllers.iter().any(|controller| {
                    own.v1(controller.name())
                        .is_some_and(|path| path.starts_with(&delegated))
                }),
            };
            if inside {
                self.below_delegated.push(hierarchy.clone());
            } else {
                warn!(
                    hierarchy = %hierarchy.mount().display(),
                    delegated = %delegated.display(),
                    "systemd did not make the delegated cgroup in this hierarchy: its groups go at its root"
                );
            }
        }
        self.delegated = Some(delegated);
    }

    /// The directory `revboot/<name>` goes in: the delegated cgroup in `hierarchy`, or its
    /// root.
    fn top(&self, hierarchy: &Hierarchy) -> PathBuf {
        match &self.delegated {
            Some(delegated) if self.below_delegated.contains(hierarchy) => {
                delegation::under(hierarchy.mount(), delegated)
            }
            _ => hierarchy.mount().to_path_buf(),
        }
    }

    /// The cgroup systemd delegated to this process, if it runs in one (a path within each
    /// hierarchy).
    pub fn delegated(&self) -> Option<&Path> {
        self.delegated.as_deref()
    }

    /// `v1`, `v2`, `hybrid` or `none`.
    pub fn layout(&self) -> &'static str {
        self.layout
    }

    /// Controllers that are not available.
    pub fn missing(&self) -> &[Controller] {
        &self.missing
    }

    /// True if the memory limit is enforced.
    pub fn has(&self, controller: Controller) -> bool {
        !self.missing.contains(&controller)
    }

    fn create_parents(&self) -> io::Result<()> {
        for (hierarchy, controllers) in &self.hierarchies {
            let mut dir = self.top(hierarchy);
            if let Hierarchy::V2(_) = hierarchy {
                if dir != hierarchy.mount() {
                    delegation::leave(&dir)?;
                }
                let enable: Vec<String> = controllers
                    .iter()
                    .map(|c| format!("+{}", c.name()))
                    .collect();
                let enable = enable.join(" ");
                for component in self.parent.components() {
                    write_file(&dir.join("cgroup.subtree_control"), &enable)?;
                    dir.push(component);
                    create_dir(&dir)?;
                }
                write_file(&dir.join("cgroup.subtree_control"), &enable)?;
            } else {
                dir.push(&self.parent);
                fs::create_dir_all(&dir)?;
            }
        }
        Ok(())
    }

    /// The parent directories (`<mount>/revboot/<name>`).
    pub fn parents(&self) -> Vec<PathBuf> {
        self.hierarchies
            .keys()
            .map(|hierarchy| self.top(hierarchy).join(&self.parent))
            .collect()
    }

    /// Removes the parents (`revboot/<name>` in each hierarchy) if they hold no group any
    /// more: what an owner that stops leaves behind is nothing. Best effort.
    pub fn remove_parents(&self) {
        for parent in self.parents() {
            let _ = fs::remove_dir(parent);
        }
    }

    /// Creates the groups named `name` (no limits yet: see [`InstanceGroups::limit`]).
    /// Creating a memory cgroup takes a while, so the process tender keeps a few spare.
    pub fn create(&self, name: &str) -> io::Result<InstanceGroups> {
        let mut groups = InstanceGroups {
            dirs: Vec::new(),
            procs: Vec::new(),
            applied: None,
        };
        for (hierarchy, controllers) in &self.hierarchies {
            let dir = self.top(hierarchy).join(&self.parent).join(name);
            if let Err(error) = create_dir(&dir) {
                groups.remove();
                return Err(error);
            }
            let v2 = matches!(hierarchy, Hierarchy::V2(_));
            groups.dirs.push((dir.clone(), v2, controllers.clone()));
            // v1: the child moves itself through `tasks` (one thread: it is single-threaded
            // until exec). Moving a single thread that is the caller skips the global
            // threadgroup lock, whose write side waits for an RCU grace period; through
            // `cgroup.procs` that wait was 5-20 ms of a boot. v2 has only `cgroup.procs`.
            let join = if v2 { "cgroup.procs" } else { "tasks" };
            match OpenOptions::new().write(true).open(dir.join(join)) {
                Ok(procs) => groups.procs.push(procs),
                Err(error) => {
                    groups.remove();
                    return Err(error);
                }
            }
        }
        Ok(groups)
    }

    /// The groups of an instance an earlier daemon started and handed over (an upgrade in
    /// place), from the directories [`InstanceGroups::dirs`] listed.
    pub fn adopt(&self, dirs: &[PathBuf]) -> InstanceGroups {
        let mut groups = InstanceGroups {
            dirs: Vec::new(),
            procs: Vec::new(),
            applied: None,
        };
        for (hierarchy, controllers) in &self.hierarchies {
            let parent = self.top(hierarchy).join(&self.parent);
            if let Some(dir) = dirs
                .iter()
                .find(|dir| dir.parent() == Some(parent.as_path()))
            {
                let v2 = matches!(hierarchy, Hierarchy::V2(_));
                groups.dirs.push((dir.clone(), v2, controllers.clone()));
            }
        }
        groups
    }

    /// Removes every instance group under the parents (an earlier daemon's) but those in
    /// `keep` (handed over to this one), killing whatever still runs in them and reaping
    /// those that are this process's children (an earlier program of a daemon upgraded in
    /// place started them). Returns how many groups were removed.
    pub fn sweep(&self, keep: &[PathBuf]) -> usize {
        let mut removed = 0;
        for parent in self.parents() {
            let Ok(entries) = fs::read_dir(&parent) else {
                continue;
            };
            // Spare groups this process made are not orphans.
            let own = format!("spare-{}-", std::process::id());
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&own)
                    || keep.contains(&entry.path())
                {
                    continue;
                }
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let dir = entry.path();
                    warn!(cgroup = %dir.display(), "removing an orphaned instance cgroup");
                    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    if remove_group(&dir).is_ok() {
                        removed += 1;
                    }
                    reap_children(&procs);
                }
            }
        }
        removed
    }
}

impl InstanceGroups {
    /// Writes the limits of the instance that will run in these groups: those that differ
    /// from the limits written before (a spare's defaults), or all of them.
    pub fn limit(&mut self, limits: Limits) -> io::Result<()> {
        let before = self.applied.take();
        for (dir, v2, controllers) in &self.dirs {
            for &controller in controllers {
                let same = before.is_some_and(|before| match controller {
                    Controller::Memory => before.memory_bytes == limits.memory_bytes,
                    Controller::Pids => before.pids == limits.pids,
                    Controller::Cpu => before.cpu_percent == limits.cpu_percent,
                });
                if !same {
                    write_limit(dir, controller, *v2, limits)?;
                }
            }
        }
        self.applied = Some(limits);
        Ok(())
    }

    /// Closes the files the child joined with: once it has joined, they only hold
    /// descriptors (three per instance on a hybrid host).
    pub fn joined(&mut self) {
        self.procs = Vec::new();
    }

    /// The group directories.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(dir, _, _)| dir.clone()).collect()
    }

    /// True if the kernel killed a process of the group at its memory limit.
    pub fn oom_killed(&self) -> bool {
        self.dirs.iter().any(|(dir, v2, _)| {
            let (file, key) = if *v2 {
                ("memory.events", "oom_kill")
            } else {
                ("memory.oom_control", "oom_kill")
            };
            fs::read_to_string(dir.join(file)).is_ok_and(|text| counter(&text, key) > 0)
        })
    }

    /// Removes the groups (killing stragglers); closes the join files first.
    pub fn remove(mut self) {
        self.procs.clear();
        for (dir, _, _) in &self.dirs {
            if let Err(error) = remove_group(dir) {
                warn!(cgroup = %dir.display(), %error, "cannot remove instance cgroup");
            }
        }
    }
}

/// Instance groups made ahead of time, with default limits, by a thread of their own.
///
/// 1. The thread keeps up to `keep` groups ready (`spare-<pid>-<n>`), each limited to the
///    defaults, so that a spawn only has to write the limits that differ (and a cpu quota,
///    whose write walks every cpu group of the host, seldom does).
/// 2. [`Spares::take`] hands one out, or makes one on the spot when none is ready.
/// 3. After a take the thread waits [`Spares::REFILL_PAUSE`] before making more, so that
///    it does not compete with the instance that is starting, unless fewer than half are
///    left (a storm of boots): then it makes them at once, on the other core.
/// 4. [`Spares::close`] removes the ready ones and stops the thread.
#[derive(Debug, Clone)]
pub struct Spares {
    inner: std::sync::Arc<SparesInner>,
}

#[derive(Debug)]
struct SparesInner {
    cgroups: Cgroups,
    defaults: Limits,
    keep: usize,
    ready: std::sync::Mutex<Vec<InstanceGroups>>,
    wanted: std::sync::Condvar,
    closed: std::sync::atomic::AtomicBool,
    serial: std::sync::atomic::AtomicU64,
    /// Tells this program's spares apart from those of the program this process ran before
    /// an upgrade in place (same pid), whose instances may still use theirs.
    image: String,
}

impl Spares {
    /// How long the thread waits after a take before it makes more (rule 3).
    pub const REFILL_PAUSE: Duration = Duration::from_millis(20);

    /// Starts the thread that keeps `keep` groups of `cgroups` ready with `defaults`.
    pub fn start(cgroups: Cgroups, defaults: Limits, keep: usize) -> io::Result<Spares> {
        let inner = std::sync::Arc::new(SparesInner {
            cgroups,
            defaults,
            keep,
            ready: std::sync::Mutex::new(Vec::with_capacity(keep)),
            wanted: std::sync::Condvar::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
            serial: std::sync::atomic::AtomicU64::new(0),
            image: format!(
                "{:x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_micros() % 0xffff_ffff)
            ),
        });
        let weak = std::sync::Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("revboot-cgroups".into())
            .spawn(move || {
                while let Some(inner) = weak.upgrade() {
                    if !inner.refill_one() {
                        return;
                    }
                }
            })?;
        Ok(Spares { inner })
    }

    /// A group set for `name`: a spare (limited to the defaults), or a new one (no limits).
    pub fn take(&self, name: &str) -> io::Result<InstanceGroups> {
        let spare = self.inner.lock().pop();
        self.inner.wanted.notify_one();
        match spare {
            Some(groups) => Ok(groups),
            None => self.inner.cgroups.create(name),
        }
    }

    /// The hierarchies the groups are made in.
    pub fn cgroups(&self) -> &Cgroups {
        &self.inner.cgroups
    }

    /// Removes the ready groups and makes no more.
    pub fn close(&self) {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.inner.wanted.notify_all();
        for groups in std::mem::take(&mut *self.inner.lock()) {
            groups.remove();
        }
        self.inner.cgroups.remove_parents();
    }
}

impl SparesInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<InstanceGroups>> {
        self.ready
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until a group is wanted, makes it; false once closed.
    fn refill_one(&self) -> bool {
        let closed = || self.closed.load(std::sync::atomic::Ordering::Acquire);
        let mut ready = self.lock();
        let mut woken = false;
        while ready.len() >= self.keep && !closed() {
            // The timeout notices a dropped owner.
            let (guard, wait) = self
                .wanted
                .wait_timeout(ready, Duration::from_secs(1))
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            ready = guard;
            woken |= !wait.timed_out();
        }
        let low = ready.len() < self.keep / 2;
        drop(ready);
        if closed() {
            return false;
        }
        if woken && !low {
            std::thread::sleep(Spares::REFILL_PAUSE);
        }
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let made = self
            .cgroups
            .create(&format!(
                "spare-{}-{}-{serial}",
                std::process::id(),
                self.image
            ))
            .and_then(|mut groups| match groups.limit(self.defaults) {
                Ok(()) => Ok(groups),
                Err(error) => {
                    groups.remove();
                    Err(error)
                }
            });
        match made {
            Ok(groups) if !closed() => self.lock().push(groups),
            Ok(groups) => groups.remove(),
            Err(error) => {
                debug!(%error, "cannot make a spare cgroup");
                // Do not spin on a hierarchy that refuses.
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        !closed()
    }
}

fn counter(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(name, _)| *name == key)
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

fn write_limit(dir: &Path, controller: Controller, v2: bool, limits: Limits) -> io::Result<()> {
    const PERIOD_US: u64 = 100_000;
    let quota_us = PERIOD_US * u64::from(limits.cpu_percent) / 100;
    match (controller, v2) {
        (Controller::Memory, false) => write_file(
            &dir.join("memory.limit_in_bytes"),
            &limits.memory_bytes.to_string(),
        ),
        (Controller::Memory, true) => {
            write_file(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
            // No swap: the limit is the limit. Absent when swap accounting is off.
            let _ = write_file(&dir.join("memory.swap.max"), "0");
            Ok(())
        }
        (Controller::Pids, _) => write_file(&dir.join("pids.max"), &limits.pids.to_string()),
        // The period is the kernel's default (100 ms) in a new group; each write of either
        // walks every cpu group of the host to check the bandwidth, so only the quota is
        // written.
        (Controller::Cpu, false) => {
            write_file(&dir.join("cpu.cfs_quota_us"), &quota_us.to_string())
        }
        (Controller::Cpu, true) => {
            write_file(&dir.join("cpu.max"), &format!("{quota_us} {PERIOD_US}"))
        }
    }
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", path.display())))
}

fn create_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other
            .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", dir.display()))),
    }
}

/// Reaps the processes of `procs` (a `cgroup.procs` listing, killed since) that are this
/// process's children, each waited for a bounded time; the others are not, and `waitpid`
/// says so at once.
fn reap_children(procs: &str) {
    for pid in procs
        .lines()
        .filter_map(|line| line.trim().parse::<libc::pid_t>().ok())
    {
        for _ in 0..200 {
            // SAFETY: waitpid with a null status pointer writes nothing.
            let waited = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            // Reaped, or not a child of this process: done. 0: a child still ending.
            if waited != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Removes one group: kills its processes, then `rmdir`, retrying for a bounded time while
/// the kernel finishes tearing the processes down.
pub fn remove_group(dir: &Path) -> io::Result<()> {
    let mut last = None;
    for attempt in 0..200u32 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) => last = Some(error),
        }
        if attempt % 10 == 0 {
            for pid in fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|line| line.trim().parse::<libc::pid_t>().ok())
            {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(last.unwrap_or_else(|| io::Error::other("cgroup not removable")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
35 30 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_with_empty_v2_uses_v1() {
        let cgroups = Cgroups::from_mountinfo(HYBRID, "t", |_| String::new());
        assert_eq!(cgroups.layout(), "hybrid");
        assert!(cgroups.missing().is_empty());
        let parents = cgroups.parents();
        assert!(parents.contains(&PathBuf::from("/sys/fs/cgroup/memory/revboot/t")));
        assert!(parents.contains(&PathBuf::from("/sys/fs/cgroup/cpu/revboot/t")));
        assert_eq!(parents.len(), 3);
    }

    #[test]
    fn v2_controllers_win_and_missing_ones_are_listed() {
        let v2 = "35 30 0:31 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n";
        let cgroups = Cgroups::from_mountinfo(v2, "t", |_| "cpuset memory pids".into());
        assert_eq!(cgroups.layout(), "v2");
        assert_eq!(cgroups.missing(), &[Controller::Cpu]);
        assert_eq!(
            cgroups.parents(),
            vec![PathBuf::from("/sys/fs/cgroup/revboot/t")]
        );
    }

    #[test]
    fn a_delegated_cgroup_holds_the_groups_where_systemd_made_it() {
        let mut cgroups = Cgroups::from_mountinfo(HYBRID, "t", |_| String::new());
        let own = delegation::OwnCgroups::parse(
            "5:pids:/system.slice/revboot.service\n\
             4:memory:/system.slice/revboot.service\n\
             2:cpuacct:/\n1:cpu:/\n0::/system.slice/revboot.service\n",
        );
        let service = Path::new("/sys/fs/cgroup/unified/system.slice/revboot.service");
        cgroups.place(&own, |dir| dir == service);
        assert_eq!(
            cgroups.delegated(),
            Some(Path::new("/system.slice/revboot.service"))
        );
        let parents = cgroups.parents();
        for parent in [
            "/sys/fs/cgroup/memory/system.slice/revboot.service/revboot/t",
            "/sys/fs/cgroup/pids/system.slice/revboot.service/revboot/t",
            // systemd made none in this hierarchy: its root, as before.
            "/sys/fs/cgroup/cpu/revboot/t",
        ] {
            assert!(parents.contains(&PathBuf::from(parent)), "{parents:?}");
        }

        // Not delegated: every hierarchy's root.
        let mut cgroups = Cgroups::from_mountinfo(HYBRID, "t", |_| String::new());
        cgroups.place(&own, |_| false);
        assert_eq!(cgroups.delegated(), None);
        assert!(
            cgroups
                .parents()
                .contains(&PathBuf::from("/sys/fs/cgroup/memory/revboot/t"))
        );

        // v2: below the delegated cgroup, whichever leaf the daemon is in now.
        let v2 = "35 30 0:31 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n";
        let mut cgroups = Cgroups::from_mountinfo(v2, "t", |_| "memory pids cpu".into());
        let own = delegation::OwnCgroups::parse("0::/system.slice/revboot.service/daemon\n");
        cgroups.place(&own, |dir| {
            dir == Path::new("/sys/fs/cgroup/system.slice/revboot.service")
        });
        assert_eq!(
            cgroups.parents(),
            vec![PathBuf::from(
                "/sys/fs/cgroup/system.slice/revboot.service/revboot/t"
            )]
        );
    }

    #[test]
    fn reads_oom_counter() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(counter(text, "oom_kill"), 2);
        assert_eq!(counter("low 0\n", "oom_kill"), 0);
    }
}

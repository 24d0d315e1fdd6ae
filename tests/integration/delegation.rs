//! A daemon that runs in a cgroup systemd delegated to it, as the packaged unit
//! (`Delegate=yes`) runs it: its instances' cgroups go below that cgroup, not at the root of
//! each hierarchy. The test makes what systemd makes for a unit that runs as root: a cgroup
//! of the same name in each hierarchy the daemon uses, marked `trusted.delegate=1` (by
//! `setfattr`) in systemd's own hierarchy, the daemon's process put in all of them before
//! revboot runs; then it boots an instance and looks where its cgroup is.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{Daemon, Setup, curl, dig_ok, eventually, hello_source, push, run};

/// Where each hierarchy of this host is mounted, by its `/proc/self/cgroup` controllers
/// field (`""` for v2), as systemd mounts them.
fn mount_of(controllers: &str) -> PathBuf {
    let root = Path::new("/sys/fs/cgroup");
    match controllers {
        "" if root.join("unified").is_dir() => root.join("unified"),
        "" => root.to_path_buf(),
        "name=systemd" => root.join("systemd"),
        v1 => root.join(v1.split(',').next().unwrap_or(v1)),
    }
}

/// The cgroups a test made: removed, deepest first, once nothing runs in them (bounded).
struct Groups(Vec<PathBuf>);

impl Drop for Groups {
    fn drop(&mut self) {
        fn remove(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        remove(&entry.path());
                    }
                }
            }
            for _ in 0..300 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        for group in &self.0 {
            remove(group);
        }
    }
}

#[test]
fn in_a_delegated_cgroup_instances_get_their_cgroups_below_it() {
    let name = format!("revboot-delegation-test-{}", std::process::id());
    // One group at the root of the v2 hierarchy (systemd's own, marked delegated), of
    // name=systemd, and of each v1 hierarchy of memory, pids or cpu.
    let mut groups = Groups(Vec::new());
    let mut procs = Vec::new();
    let mut marked = None;
    let mut memory = None;
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    for line in own.lines() {
        let Some((_, rest)) = line.split_once(':') else {
            continue;
        };
        let Some((controllers, _)) = rest.split_once(':') else {
            continue;
        };
        let names: Vec<&str> = controllers.split(',').collect();
        let wanted = controllers.is_empty()
            || names
                .iter()
                .any(|c| ["name=systemd", "memory", "pids", "cpu"].contains(c));
        let mount = mount_of(controllers);
        if !wanted || !mount.is_dir() {
            continue;
        }
        let group = mount.join(&name);
        std::fs::create_dir(&group).expect("make the cgroup");
        groups.0.push(group.clone());
        let v2 = controllers.is_empty();
        procs.push(group.join(if v2 { "cgroup.procs" } else { "tasks" }));
        if v2 || (controllers == "name=systemd" && marked.is_none()) {
            marked = Some(group.clone());
        }
        if names.contains(&"memory") || (v2 && !Path::new("/sys/fs/cgroup/memory").is_dir()) {
            memory = Some(group);
        }
    }
    let marked = marked.expect("a v2 or name=systemd hierarchy");
    let memory = memory.expect("a hierarchy with the memory controller");
    run(Command::new("setfattr")
        .args(["-n", "trusted.delegate", "-v", "1"])
        .arg(&marked));

    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start_setup(
        &temp.path().join("data"),
        &Setup {
            cgroups: &procs,
            ..Setup::default()
        },
    );
    let log = daemon.log();
    assert!(
        log.contains("cgroups go below the cgroup systemd delegated"),
        "{log}"
    );

    // An instance: its process is in a group below the delegated cgroup, in the memory
    // hierarchy as in the others.
    let work = hello_source(temp.path());
    push(&daemon, &work);
    let live = "hello.revboot.test";
    let address = dig_ok(&daemon, live, false);
    assert!(curl(live, &address, 8080).starts_with("hello from"));
    let pid = daemon
        .instances()
        .iter()
        .find_map(|instance| instance["pid"].as_u64())
        .expect("the instance's pid");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("its cgroups");
    let expected = format!("/{name}/revboot/");
    let memory_line = cgroups
        .lines()
        .find(|line| {
            let controllers = line.split(':').nth(1).unwrap_or_default();
            controllers.split(',').any(|c| c == "memory")
                || (controllers.is_empty() && memory.starts_with(mount_of("")))
        })
        .unwrap_or_else(|| panic!("no memory cgroup in {cgroups}"));
    assert!(memory_line.contains(&expected), "{cgroups}");
    assert!(memory.join("revboot").is_dir());

    // Stopped, the daemon leaves nothing of its own below the delegated cgroup but the
    // empty `revboot` folder.
    daemon.stop();
    assert!(eventually(|| {
        std::fs::read_dir(memory.join("revboot"))
            .map(|entries| entries.flatten().all(|e| !e.path().is_dir()))
            .unwrap_or(true)
    }));
}

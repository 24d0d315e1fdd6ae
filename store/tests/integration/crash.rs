//! Crash safety: a writer killed with SIGKILL leaves a repository that fscks clean, with each
//! deployment on the branch completely or not at all, and the next writer copes with the
//! locks the dead one left.
//!
//! The writers are this test binary re-run as a child (`crash::child`, ignored unless the
//! environment asks for it), so they are real processes that die without unwinding.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use revboot_store::{BuildStatus, ImageInput, NewDeployment, Revision, Store};
use sha2::{Digest, Sha256};

use crate::support::{assert_fsck_clean, binary, deploy, source, store};

const REPO_ENV: &str = "REVBOOT_CRASH_REPO";
const MODE_ENV: &str = "REVBOOT_CRASH_MODE";
/// Bytes per image the child writes: big enough that kills land mid-image.
const IMAGE_BYTES: usize = 2 << 20;

/// The child: `write` writes deployments forever, printing each revision once it is on the
/// branch; `lock` takes the branch's ref lock the way gix does and waits to be killed.
#[test]
#[ignore = "run as a child process by the crash tests"]
fn child() {
    let (Ok(repo), Ok(mode)) = (std::env::var(REPO_ENV), std::env::var(MODE_ENV)) else {
        return;
    };
    match mode.as_str() {
        "write" => {
            let store = Store::open(&repo).expect("child opens store");
            for n in 0..10_000u32 {
                let image = binary(
                    IMAGE_BYTES,
                    u64::from(n) + u64::from(std::process::id()) * 1000,
                );
                let revision = store
                    .write_deployment(NewDeployment {
                        service: "crash",
                        status: BuildStatus::Succeeded,
                        manifest: Some(crate::support::MANIFEST),
                        images: vec![ImageInput {
                            name: "hello".into(),
                            reader: Box::new(std::io::Cursor::new(image)),
                        }],
                        build_log: b"log\n",
                        source_commit: &source(n),
                        source_repo: "crash",
                        source_ref: Some("refs/heads/main"),
                        subject: "Crash test build",
                    })
                    .expect("child writes");
                println!("REV {revision}");
            }
        }
        "lock" => {
            let path = Path::new(&repo).join("refs/heads/crash");
            let _lock = gix::lock::File::acquire_to_update_resource(
                &path,
                gix::lock::acquire::Fail::Immediately,
                None,
                Default::default(),
            )
            .expect("child takes the ref lock");
            println!("LOCKED");
            std::thread::sleep(Duration::from_secs(60));
        }
        other => panic!("unknown mode {other}"),
    }
}

fn spawn_child(repo: &Path, mode: &str) -> (Child, mpsc::Receiver<String>) {
    let mut child = revboot_testkit::test_child("crash::child")
        .env(REPO_ENV, repo)
        .env(MODE_ENV, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child starts");
    let lines = revboot_testkit::stdout_lines(&mut child);
    (child, lines)
}

/// A kill point in 0..max: from the clock's nanoseconds, so runs differ.
fn random_millis(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .subsec_nanos();
    u64::from(nanos) % max
}

fn leftover_locks(repo: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![repo.join("refs")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "lock") {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

fn assert_whole(store: &Store, revision: &Revision) {
    let deployment = store
        .deployment("crash", revision)
        .expect("deployment on branch");
    let info = deployment.image.expect("image");
    let mut bytes = Vec::new();
    store
        .open_image(revision, None)
        .expect("image readable")
        .read_to_end(&mut bytes)
        .expect("read");
    assert_eq!(bytes.len() as u64, info.size);
    assert_eq!(hex::encode(Sha256::digest(&bytes)), info.sha256);
}

#[test]
fn sigkill_mid_deployment_leaves_all_or_nothing() {
    let (_dir, store) = store();
    let first = deploy(&store, "crash", 0, Some(b"seed".to_vec()));
    let mut acknowledged = vec![first];
    for round in 0..4 {
        let (mut child, lines) = spawn_child(store.path(), "write");
        // Wait for one whole deployment to learn how long one takes, then kill the child at a
        // random point of the next one (image spool, blob, tree, commit or ref update).
        let started = std::time::Instant::now();
        let mut revisions: Vec<Revision> = Vec::new();
        while revisions.is_empty() {
            let line = lines
                .recv_timeout(Duration::from_secs(300))
                .expect("child writes a deployment");
            if let Some(revision) = line.strip_prefix("REV ") {
                revisions.push(revision.parse().expect("revision"));
            }
        }
        let one = started.elapsed().as_millis() as u64;
        std::thread::sleep(Duration::from_millis(random_millis(one.max(2))));
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        revisions.extend(lines.try_iter().filter_map(|l| {
            l.strip_prefix("REV ")
                .map(|r| r.parse::<Revision>().expect("revision"))
        }));
        let locks = leftover_locks(store.path());
        let temporaries = std::fs::read_dir(store.path().join("objects"))
            .expect("objects")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .count();
        eprintln!(
            "round {round}: one deployment took {one} ms; child acknowledged {} before SIGKILL; left locks: {locks:?}, temporary objects: {temporaries}",
            revisions.len()
        );
        acknowledged.extend(revisions);

        assert_fsck_clean(store.path());
        let reopened = Store::open(store.path()).expect("reopen after crash");
        let history = reopened.history("crash").expect("history");
        // Every acknowledged deployment is there, and everything there is whole: a kill
        // between the ref update and the acknowledgement may add one unacknowledged one.
        for revision in &acknowledged {
            assert!(
                history.iter().any(|d| d.revision == *revision),
                "{revision} lost"
            );
        }
        assert!(history.len() <= acknowledged.len() + round + 1);
        for deployment in history.iter().take(3) {
            assert_whole(&reopened, &deployment.revision);
        }
        // The next writer copes with whatever the dead one left.
        let next = deploy(
            &reopened,
            "crash",
            9_000 + round as u32,
            Some(b"after".to_vec()),
        );
        acknowledged.push(next);
        assert_eq!(
            reopened.history("crash").expect("history")[0].revision,
            next
        );
        acknowledged = reopened
            .history("crash")
            .expect("history")
            .into_iter()
            .map(|d| d.revision)
            .collect();
    }
    let spools = std::fs::read_dir(store.path().join("revboot/tmp"))
        .expect("spool dir")
        .count();
    assert_eq!(spools, 0, "spools of killed writers are swept on open");

    // Temporary objects of killed writers are swept once untouched for ten minutes; age the
    // ones this test left (if the kills landed mid-object) and open again.
    let temporaries = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(store.path().join("objects"))
            .expect("objects")
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".tmp"))
            })
            .collect()
    };
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for path in temporaries() {
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(hour_ago))
            .expect("age temporary");
    }
    Store::open(store.path()).expect("reopen");
    assert!(temporaries().is_empty(), "{:?}", temporaries());
    assert_fsck_clean(store.path());
}

#[test]
fn ref_lock_of_a_killed_writer_is_recovered() {
    let (_dir, store) = store();
    let before = deploy(&store, "crash", 0, Some(b"one".to_vec()));
    let (mut child, lines) = spawn_child(store.path(), "lock");
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("child reports the lock");
        if line.contains("LOCKED") {
            break;
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let lock = store.path().join("refs/heads/crash.lock");
    assert!(lock.exists(), "SIGKILL leaves the ref lock behind");

    // The next writer finds no live owner and takes over after the stale-lock grace period.
    let after = deploy(&store, "crash", 1, Some(b"two".to_vec()));
    assert!(!lock.exists());
    let history = store.history("crash").expect("history");
    assert_eq!(history[0].revision, after);
    assert_eq!(history[0].parent, Some(before));
    assert_fsck_clean(store.path());
}

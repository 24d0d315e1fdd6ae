//! A full disk while a build's deployment is written: the build fails with the reason, which
//! the pusher sees and the builder records, the deployment repository keeps no object of
//! it, and it builds again by itself once space is free.
//!
//! The daemon's data directory is a small tmpfs, mounted by this test binary run again as a
//! child in a mount namespace of its own (`full::child`), so the mount never outlives the
//! test. The recipes fill the disk themselves, right after they have made their images, the
//! first time they run.

use std::path::{Path, PathBuf};

use revboot_builder::{BuildRecord, BuildState};
use revboot_store::BuildStatus;
use revboot_testkit::{
    assert_child_passes, assert_fsck_clean, assert_no_leftovers, mount_tmpfs,
    test_child_with_own_mounts,
};

use crate::support::*;

const DISK_ENV: &str = "REVBOOT_TEST_FULL_DISK";
const DISK_BYTES: u64 = 64 << 20;
const NO_SPACE: &str = "no space left on device while writing the deployment";

/// A recipe making a 2 MiB boot image and an 8 MiB data image of random bytes, then, the
/// first time only (`mark` is made), filling `disk` but for `room` bytes (`None`: all of it).
fn recipe(disk: &Path, mark: &Path, room: Option<u64>) -> String {
    let fill = match room {
        Some(room) => format!(
            "avail=$(df --output=avail -B1 {disk} | tail -n 1 | tr -d ' '); head -c $((avail - {room})) /dev/zero > {disk}/filler",
            disk = disk.display()
        ),
        None => format!("cat /dev/zero > {}/filler 2>/dev/null", disk.display()),
    };
    format!(
        "[build]\nshell = '''\nmkdir -p out\nhead -c 2097152 /dev/urandom > out/boot\nhead -c 8388608 /dev/urandom > out/data\nif [ ! -e {mark} ]; then touch {mark}; {fill}; fi\ntrue\n'''\nartifacts = [\"out/boot\", \"out/data\"]\n",
        mark = mark.display()
    )
}

/// Pushes `service`, whose build fills the disk; checks what the pusher and the builder
/// say, frees the disk and returns the failed record and the re-run's.
async fn push_onto_a_full_disk(
    daemon: &Daemon,
    work: &Path,
    disk: &Path,
    expected: &str,
) -> (BuildRecord, BuildRecord) {
    let service = work.file_name().and_then(|n| n.to_str()).expect("name");
    let (ok, stderr) = push(work, &daemon.url(service), &[]).await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains(&format!("failed: {NO_SPACE}")), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
    assert!(
        stderr.contains("builds again by itself once the deployment repository has"),
        "{stderr}"
    );
    let failed = wait_finished(&daemon.builder, &head(work).await).await;
    assert_eq!(failed.state, BuildState::Failed, "{failed:#?}");
    assert_eq!(
        failed.message.as_deref(),
        Some(&*format!("failed: {NO_SPACE}"))
    );
    assert!(failed.retry_when_free_bytes.is_some(), "{failed:#?}");
    assert_eq!(
        failed.requeued_as, None,
        "retried before the space came back"
    );
    assert_no_leftovers(daemon.store.path());

    std::fs::remove_file(disk.join("filler")).expect("free the disk");
    let rerun = wait_record(&daemon.builder, "the retry", |r| {
        r.rerun_of == Some(failed.id) && r.state.is_finished()
    })
    .await;
    assert_eq!(rerun.state, BuildState::Succeeded, "{rerun:#?}");
    assert!(rerun.made_live);
    let failed = wait_record(&daemon.builder, "the failed build", |r| r.id == failed.id).await;
    assert_eq!(failed.requeued_as, Some(rerun.id));
    assert_eq!(failed.retry_when_free_bytes, None);
    assert_fsck_clean(daemon.store.path());
    assert_no_leftovers(daemon.store.path());
    (failed, rerun)
}

/// The child: a daemon on a 64 MiB tmpfs, two services whose builds fill it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process in its own mount namespace"]
async fn child() {
    let Some(root) = std::env::var_os(DISK_ENV).map(PathBuf::from) else {
        return;
    };
    let disk = root.join("disk");
    mount_tmpfs(&disk, DISK_BYTES);
    let daemon = daemon(&disk.join("data"), |c| c.space_check_secs = 1).await;

    // Near the top: room for the boot image's blob, the data image's spool and half of its
    // blob. The failed build, a log and no image, still fits.
    let room = (2 + 8 + 4) << 20;
    let near = recipe(&disk, &root.join("near-filled"), Some(room));
    let work = recipe_fixture(&root, "near", &near).await;
    let (failed, rerun) =
        push_onto_a_full_disk(&daemon, &work, &disk, "failed build recorded as").await;
    let history = daemon.store.history("near").expect("history");
    assert_eq!(history.len(), 2, "{history:#?}");
    assert_eq!(
        history[0].revision.to_hex(),
        rerun.revision.expect("revision")
    );
    assert_eq!(history[1].status, BuildStatus::Failed);
    assert_eq!(Some(history[1].revision.to_hex()), failed.revision);
    let log = daemon.store.build_log(&history[1].revision).expect("log");
    assert!(String::from_utf8_lossy(&log).contains(NO_SPACE));

    // Full to the last byte: not even the failed build can be written; the pusher is told,
    // and the builder's records keep it.
    let full = recipe(&disk, &root.join("full-filled"), None);
    let work = recipe_fixture(&root, "full", &full).await;
    let expected = "the failed build could not be recorded in the deployment repository (no space left on device); only the builder's build records keep it";
    let (failed, rerun) = push_onto_a_full_disk(&daemon, &work, &disk, expected).await;
    assert_eq!(failed.revision, None);
    let history = daemon.store.history("full").expect("history");
    assert_eq!(history.len(), 1, "{history:#?}");
    assert_eq!(Some(history[0].revision.to_hex()), rerun.revision);
    daemon.stop().await;
}

#[test]
fn disk_full_while_storing_a_build_records_the_failure_leaves_no_objects_and_retries() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_child_passes(test_child_with_own_mounts("full::child").env(DISK_ENV, dir.path()));
}

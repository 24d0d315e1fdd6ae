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

/// A recipe making a 2 MiB boot image (a static ELF and random bytes) and an 8 MiB data
/// image of random bytes, then, the first time only (`$HOME/mark` is made), filling the disk
/// but for `room` bytes (`None`: all of it). The build's `HOME` is in its service's cache,
/// on the data directory's file system: the build fills the disk through the one place of
/// it the sandbox lets it write.
fn recipe(room: Option<u64>) -> String {
    let fill = match room {
        Some(room) => format!(
            "avail=$(df --output=avail -B1 $HOME | tail -n 1 | tr -d ' '); head -c $((avail - {room})) /dev/zero > $HOME/filler"
        ),
        None => "cat /dev/zero > $HOME/filler 2>/dev/null".to_owned(),
    };
    format!(
        "[build]\nshell = '''\nmkdir -p out\ncp exit0 out/boot\nhead -c 2097152 /dev/urandom >> out/boot\nhead -c 8388608 /dev/urandom > out/data\nif [ ! -e $HOME/mark ]; then touch $HOME/mark; {fill}; fi\ntrue\n'''\nartifacts = [\"out/boot\", \"out/data\"]\n"
    )
}

/// Pushes `service`, whose build fills the disk; checks what the pusher and the builder
/// say, frees the disk and returns the failed record and the re-run's.
async fn push_onto_a_full_disk(
    daemon: &Daemon,
    work: &Path,
    data: &Path,
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

    std::fs::remove_file(data.join("cache").join(service).join("home/filler"))
        .expect("free the disk");
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
    let data = disk.join("data");
    let daemon = daemon(&data, |c| {
        c.space_check_secs = 1;
        // The recipes fill the disk on purpose; the sandbox's reserve would stop them first.
        c.sandbox.disk_reserve_mib = 0;
    })
    .await;

    // Near the top: room for the boot image's blob, the data image's spool and half of its
    // blob. The failed build, a log and no image, still fits.
    let room = (2 + 8 + 4) << 20;
    let work = recipe_fixture(&root, "near", &recipe(Some(room))).await;
    let (failed, rerun) =
        push_onto_a_full_disk(&daemon, &work, &data, "failed build recorded as").await;
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
    let work = recipe_fixture(&root, "full", &recipe(None)).await;
    let expected = "the failed build could not be recorded in the deployment repository (no space left on device); only the builder's build records keep it";
    let (failed, rerun) = push_onto_a_full_disk(&daemon, &work, &data, expected).await;
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

//! Writes that fail half way, because the disk is full, the branch cannot move or the
//! writer's own check refuses right before it moves: the error
//! says why, the repository keeps no object of the write, and the same write succeeds once
//! the cause is gone.
//!
//! The full disk is a small tmpfs, mounted by this test binary run again as a child in a
//! mount namespace of its own (`full::child`), so the mount never outlives the test.

use std::path::Path;

use revboot_store::{BuildStatus, ImageInput, NewDeployment};
use revboot_testkit::{
    assert_child_passes, assert_no_leftovers, available_bytes, mount_tmpfs,
    test_child_with_own_mounts,
};

use crate::support::{
    MANIFEST, assert_fsck_clean, binary, deploy, git, source, store, try_deploy_from,
};

const DISK_ENV: &str = "REVBOOT_TEST_FULL_DISK";
const DISK_BYTES: u64 = 32 << 20;
const MIB: usize = 1 << 20;

/// The child: on a nearly full tmpfs, a deployment whose second image does not fit.
#[test]
#[ignore = "run as a child process in its own mount namespace"]
fn child() {
    let Some(dir) = std::env::var_os(DISK_ENV) else {
        return;
    };
    let disk = Path::new(&dir).join("disk");
    mount_tmpfs(&disk, DISK_BYTES);
    let store = revboot_store::Store::init(disk.join("deploy.git")).expect("init");
    let seed = deploy(&store, "full", 0, Some(b"seed".to_vec()));
    // Two incompressible images, each spooled, then written as a blob: room for the first
    // image's blob, the second's spool and half of its blob.
    let (boot, data) = (binary(2 * MIB, 7), binary(8 * MIB, 8));
    let filler = disk.join("filler");
    let room = u64::try_from(2 * MIB + 8 * MIB + 4 * MIB).expect("small");
    let fill = available_bytes(&disk) - room;
    std::fs::write(&filler, vec![0u8; usize::try_from(fill).expect("fits")]).expect("fill");
    let write = || {
        let images = [("hello", &boot), ("data", &data)]
            .into_iter()
            .map(|(name, bytes)| ImageInput {
                name: name.into(),
                reader: Box::new(std::io::Cursor::new(bytes.clone())),
            })
            .collect();
        store.write_deployment(NewDeployment {
            service: "full",
            status: BuildStatus::Succeeded,
            manifest: Some(MANIFEST),
            images,
            build_log: b"built\n",
            source_commit: &source(1),
            source_repo: "full",
            source_ref: Some("refs/heads/main"),
            subject: "Two images",
        })
    };

    let error = write().expect_err("the second image does not fit");
    assert!(error.is_out_of_space(), "{error:?}");
    let history = store.history("full").expect("history");
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].revision, seed);
    assert_no_leftovers(store.path());

    std::fs::remove_file(&filler).expect("free the space");
    let revision = write().expect("it fits now");
    assert_eq!(
        store.history("full").expect("history")[0].revision,
        revision
    );
    assert_fsck_clean(store.path());
    assert_no_leftovers(store.path());
}

#[test]
fn disk_full_while_writing_the_second_image_leaves_no_objects_and_the_write_fits_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_child_passes(test_child_with_own_mounts("full::child").env(DISK_ENV, dir.path()));
}

#[test]
fn a_write_whose_branch_cannot_move_takes_its_objects_back() {
    let (_dir, store) = store();
    let seed = deploy(&store, "blocked", 0, Some(b"seed".to_vec()));
    // The branch's reflog cannot be appended to: a directory holding a file is in its place.
    let reflog = store.path().join("logs/refs/heads/blocked");
    std::fs::remove_file(&reflog).expect("reflog");
    std::fs::create_dir_all(&reflog).expect("directory");
    std::fs::write(reflog.join("in-the-way"), "x").expect("file");
    let image = Some(b"second".to_vec());
    let write = || {
        try_deploy_from(
            &store,
            "blocked",
            &source(1),
            "refs/heads/main",
            image.clone(),
        )
    };

    write().expect_err("the branch cannot move");
    assert_eq!(store.history("blocked").expect("history")[0].revision, seed);
    assert_no_leftovers(store.path());

    std::fs::remove_dir_all(&reflog).expect("clear the way");
    let revision = write().expect("the branch moves now");
    assert_eq!(
        git(store.path(), &["rev-parse", "refs/heads/blocked"]).trim(),
        revision.to_hex()
    );
    assert_fsck_clean(store.path());
    assert_no_leftovers(store.path());
}

#[test]
fn a_write_its_check_refuses_right_before_the_branch_moves_leaves_nothing() {
    let (_dir, store) = store();
    let seed = deploy(&store, "fenced", 0, Some(b"seed".to_vec()));
    let commit = source(1);
    let refused = store
        .write_deployment_checked(
            NewDeployment {
                service: "fenced",
                status: BuildStatus::Succeeded,
                manifest: Some(MANIFEST),
                images: vec![ImageInput {
                    name: "hello".into(),
                    reader: Box::new(std::io::Cursor::new(b"second".to_vec())),
                }],
                build_log: b"built\n",
                source_commit: &commit,
                source_repo: "fenced",
                source_ref: Some("refs/heads/main"),
                subject: "Build",
            },
            || Err("the build lock is another node's".to_owned()),
        )
        .expect_err("refused");
    assert_eq!(
        refused.to_string(),
        "The deployment of `fenced` was not written: the build lock is another node's"
    );
    assert_eq!(store.history("fenced").expect("history")[0].revision, seed);
    assert_fsck_clean(store.path());
    assert_no_leftovers(store.path());
}

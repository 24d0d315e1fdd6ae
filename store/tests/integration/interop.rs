//! The repository is plain git: fsck, clone, log, bisect, and live-ref updates by stock git.

use std::fs;
use std::time::Duration;

use revboot_store::{Revision, Store};

use crate::support::{assert_fsck_clean, binary, deploy, git, git_output, store};

/// Five builds: three good images, a failed build, then a bad image and one more bad.
fn five_builds(store: &Store) -> Vec<Revision> {
    let image = |n: u32, marker: &str| {
        let mut bytes = binary(64 << 10, u64::from(n));
        bytes.extend_from_slice(marker.as_bytes());
        Some(bytes)
    };
    vec![
        deploy(store, "hello", 1, image(1, "GOOD")),
        deploy(store, "hello", 2, image(2, "GOOD")),
        deploy(store, "hello", 3, None),
        deploy(store, "hello", 4, image(4, "GOOD")),
        deploy(store, "hello", 5, image(5, "BAD")),
        deploy(store, "hello", 6, image(6, "BAD")),
    ]
}

#[test]
fn fsck_clone_and_log_see_every_deployment() {
    let (dir, store) = store();
    let written = five_builds(&store);
    store
        .set_live("hello", &written[3], "deploy")
        .expect("live");
    store.tag("hello", "v1", &written[0]).expect("tag");
    assert_fsck_clean(store.path());

    let log = git(store.path(), &["log", "--format=%H", "hello"]);
    let logged: Vec<&str> = log.lines().collect();
    let expected: Vec<String> = written.iter().rev().map(|r| r.to_hex()).collect();
    assert_eq!(logged, expected);

    let trailers = git(
        store.path(),
        &[
            "log",
            "-1",
            "--format=%(trailers:key=Source-Commit,valueonly)",
            "hello",
        ],
    );
    assert_eq!(trailers.trim(), crate::support::source(6));

    let clone = dir.path().join("clone");
    let output = git_output(
        dir.path(),
        &[
            "clone",
            "--quiet",
            store.path().to_str().expect("utf-8"),
            "clone",
        ],
    );
    assert!(output.status.success(), "{output:?}");
    let cloned = git(&clone, &["log", "--format=%H", "origin/hello"]);
    assert_eq!(cloned.lines().collect::<Vec<_>>(), expected);
    git(&clone, &["checkout", "--quiet", "origin/hello"]);
    assert!(clone.join("image/hello").exists());
    assert!(clone.join("revboot.toml").exists());
    assert!(clone.join("build.log").exists());
    git(&clone, &["fsck", "--strict", "--no-progress"]);
}

#[test]
fn bisect_run_finds_the_first_bad_build() {
    let (dir, store) = store();
    let written = five_builds(&store);
    let clone = dir.path().join("clone");
    git(
        dir.path(),
        &[
            "clone",
            "--quiet",
            store.path().to_str().expect("utf-8"),
            "clone",
        ],
    );
    git(
        &clone,
        &["checkout", "--quiet", "-b", "work", "origin/hello"],
    );
    git(
        &clone,
        &[
            "bisect",
            "start",
            &written[5].to_hex(),
            &written[0].to_hex(),
        ],
    );
    // Exit 125 skips builds without an image (the failed one).
    let output = git(
        &clone,
        &[
            "bisect",
            "run",
            "sh",
            "-c",
            "test -f image/hello || exit 125; ! grep -q BAD image/hello",
        ],
    );
    assert!(
        output.contains(&format!("{} is the first bad commit", written[4].to_hex())),
        "{output}"
    );
}

#[test]
fn live_moves_by_stock_git_are_honoured() {
    let (dir, store) = store();
    let written = five_builds(&store);
    store
        .set_live("hello", &written[5], "deploy")
        .expect("live");
    assert_eq!(store.resolve("hello", None).expect("live"), written[5]);
    let generation = store.generation();

    // Right after a write the index does not trust mtimes yet; wait until it does, so the
    // next call must notice the change through the fingerprint alone.
    std::thread::sleep(Duration::from_millis(700));
    store.resolve("hello", None).expect("settle");
    git(
        store.path(),
        &[
            "update-ref",
            "-m",
            "manual rollback",
            "refs/live/hello",
            &written[1].to_hex(),
        ],
    );
    assert_eq!(store.live("hello").expect("live"), Some(written[1]));
    assert_eq!(store.resolve("hello", None).expect("live"), written[1]);
    assert_ne!(store.generation(), generation);

    // A push from a clone is a rollback too.
    let clone = dir.path().join("clone");
    git(
        dir.path(),
        &[
            "clone",
            "--quiet",
            store.path().to_str().expect("utf-8"),
            "clone",
        ],
    );
    git(
        &clone,
        &[
            "push",
            "--quiet",
            "origin",
            &format!("+{}:refs/live/hello", written[0].to_hex()),
        ],
    );
    assert_eq!(store.resolve("hello", None).expect("live"), written[0]);
    let deployment = store.deployment("hello", &written[0]).expect("deployment");
    assert!(deployment.live);

    // Stock git shows the whole trail.
    let reflog = git(
        store.path(),
        &["reflog", "show", "--format=%H %gs", "refs/live/hello"],
    );
    let lines: Vec<&str> = reflog.lines().collect();
    assert_eq!(lines.len(), 3, "{reflog}");
    assert!(lines[0].starts_with(&written[0].to_hex()), "{reflog}");
    assert!(lines[1].contains("manual rollback"), "{reflog}");
    assert!(
        lines[2].contains("revboot: live") && lines[2].contains("deploy"),
        "{reflog}"
    );
}

#[test]
fn refs_packed_by_git_are_read() {
    let (_dir, store) = store();
    let written = five_builds(&store);
    store.set_live("hello", &written[2], "x").expect("live");
    git(store.path(), &["pack-refs", "--all", "--prune"]);
    let reopened = Store::open(store.path()).expect("open");
    assert_eq!(reopened.resolve("hello", None).expect("live"), written[2]);
    assert_eq!(reopened.history("hello").expect("history").len(), 6);
    // And the running store sees the same after the refs moved into packed-refs.
    assert_eq!(store.resolve("hello", None).expect("live"), written[2]);
}

#[test]
fn repack_deltifies_and_keeps_readers_working() {
    let (_dir, store) = store();
    let base = binary(2 << 20, 7);
    let mut written = Vec::new();
    for n in 0..6u32 {
        let mut image = base.clone();
        let at = 1000 + n as usize * 4096;
        image[at..at + 8].copy_from_slice(&u64::from(n).to_le_bytes());
        written.push(deploy(&store, "hello", n, Some(image)));
    }
    let reader_store = store.clone();
    let revisions = written.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_reader = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut reads = 0u32;
        while !stop_reader.load(std::sync::atomic::Ordering::Relaxed) || reads < 12 {
            let revision = &revisions[reads as usize % revisions.len()];
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(
                &mut reader_store
                    .open_image(revision, None)
                    .expect("image readable during repack"),
                &mut bytes,
            )
            .expect("read");
            assert_eq!(bytes.len(), 2 << 20);
            reads += 1;
        }
        reads
    });
    let report = store.repack().expect("repack");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().expect("reader") >= 12);
    assert_eq!(report.packs_after, 1);
    assert!(
        report.bytes_after * 3 < report.bytes_before,
        "six near-identical 2 MiB images should pack well below a third: {report:?}"
    );
    assert_fsck_clean(store.path());
    let loose = fs::read_dir(store.path().join("objects"))
        .expect("objects")
        .flatten()
        .filter(|e| e.file_name().len() == 2)
        .count();
    assert_eq!(loose, 0, "packed objects are pruned from the loose store");
    for revision in &written {
        assert!(store.open_image(revision, None).is_ok());
    }
}

//! Many writers and readers at once: no commit is lost, readers always see whole deployments.

use std::collections::HashSet;

use revboot_store::{Revision, Store};

use crate::support::{assert_fsck_clean, binary, deploy, store};

#[test]
fn two_writers_on_one_service_lose_nothing() {
    let (_dir, store) = store();
    // A second handle opened separately shares nothing in memory, like another process.
    let other = Store::open(store.path()).expect("second handle");
    let writers: Vec<_> = [store.clone(), other]
        .into_iter()
        .enumerate()
        .map(|(w, handle)| {
            std::thread::spawn(move || {
                (0..8u32)
                    .map(|n| {
                        deploy(
                            &handle,
                            "hello",
                            w as u32 * 100 + n,
                            Some(binary(4096, u64::from(n))),
                        )
                    })
                    .collect::<Vec<Revision>>()
            })
        })
        .collect();
    let reader = {
        let store = store.clone();
        std::thread::spawn(move || {
            for _ in 0..50 {
                if let Ok(history) = store.history("hello") {
                    for deployment in history.iter().take(2) {
                        store
                            .open_image(&deployment.revision, None)
                            .expect("whole deployment");
                    }
                }
            }
        })
    };
    let mut written = HashSet::new();
    for writer in writers {
        written.extend(writer.join().expect("writer"));
    }
    reader.join().expect("reader");
    let history: HashSet<Revision> = store
        .history("hello")
        .expect("history")
        .into_iter()
        .map(|d| d.revision)
        .collect();
    assert_eq!(written.len(), 16);
    assert_eq!(
        history, written,
        "every commit a writer got back is on the branch"
    );
    assert_fsck_clean(store.path());
}

#[test]
fn a_commit_by_stock_git_in_between_becomes_the_parent() {
    let (_dir, store) = store();
    let first = deploy(&store, "hello", 1, Some(b"one".to_vec()));
    // Another writer (stock git) moves the branch behind the store's back.
    let tree = crate::support::git(store.path(), &["rev-parse", &format!("{first}^{{tree}}")]);
    let message = format!(
        "Manual\n\nBuild-Status: failed\nSource-Commit: {}\nSource-Repo: hello\n",
        "f".repeat(40)
    );
    let output = std::process::Command::new(crate::support::GIT)
        .current_dir(store.path())
        .args([
            "commit-tree",
            tree.trim(),
            "-p",
            &first.to_hex(),
            "-m",
            &message,
        ])
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@localhost")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@localhost")
        .output()
        .expect("commit-tree");
    let manual = String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();
    crate::support::git(store.path(), &["update-ref", "refs/heads/hello", &manual]);
    let next = deploy(&store, "hello", 2, Some(b"two".to_vec()));
    let history = store.history("hello").expect("history");
    assert_eq!(history[0].revision, next);
    assert_eq!(history[0].parent.map(|p| p.to_hex()), Some(manual));
    assert_eq!(history.len(), 3);
}

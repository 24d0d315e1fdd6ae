//! Every label rule, on a repository made by stock git (`tests/fixtures/resolve.sh`).

use std::collections::HashMap;
use std::process::Command;

use revboot_store::{BuildStatus, ResolveError, Revision, Store};

use crate::support::{assert_fsck_clean, fixtures, git};

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    ids: HashMap<String, String>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = Command::new("bash")
            .arg(fixtures().join("resolve.sh"))
            .arg(dir.path())
            .env(
                "PATH",
                format!(
                    "/usr/local/bin:{}",
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .output()
            .expect("fixture script runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let ids: HashMap<String, String> = String::from_utf8(output.stdout)
            .expect("utf-8")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let store = Store::open(&ids["repo"]).expect("open fixture");
        Fixture {
            _dir: dir,
            store,
            ids,
        }
    }

    fn rev(&self, name: &str) -> Revision {
        self.ids[name].parse().expect("commit id")
    }

    fn resolve(&self, label: &str) -> Result<Revision, ResolveError> {
        self.store.resolve("web", Some(label))
    }
}

#[test]
fn deployment_commit_prefixes() {
    let f = Fixture::new();
    for name in ["d2", "d3", "d4", "d5", "d6"] {
        let hex = &f.ids[name];
        assert_eq!(f.resolve(&hex[..7]).expect("7 hex"), f.rev(name), "{name}");
        assert_eq!(f.resolve(hex).expect("40 hex"), f.rev(name), "{name}");
        assert_eq!(
            f.resolve(&hex[..10].to_ascii_uppercase())
                .expect("upper case"),
            f.rev(name)
        );
    }
    // A failed build is still named by its commit (callers see it has no image).
    let failed = f.store.deployment("web", &f.rev("d2")).expect("deployment");
    assert_eq!(failed.status, BuildStatus::Failed);
    assert_eq!(failed.image, None);
}

#[test]
fn source_commit_prefix_names_newest_successful_build() {
    let f = Fixture::new();
    // s2 was built twice: failed (d2), then succeeded (d3).
    assert_eq!(f.resolve("2222222").expect("s2"), f.rev("d3"));
    // s1 succeeded (d1), then failed (d4): the successful one.
    assert_eq!(f.resolve("1111111aaa").expect("s1"), f.rev("d1"));
    assert_eq!(f.resolve("ABCDEF0").expect("s5"), f.rev("d5"));
    // Per service: the same source in `api` names a1 there.
    assert_eq!(
        f.store.resolve("api", Some("1111111")).expect("api"),
        f.rev("a1")
    );
}

#[test]
fn tags_and_branches() {
    let f = Fixture::new();
    assert_eq!(f.resolve("v1").expect("annotated tag"), f.rev("d1"));
    assert_eq!(
        f.resolve("STABLE").expect("tag, case-insensitive"),
        f.rev("d3")
    );
    assert_eq!(f.resolve("release-1-0").expect("branch"), f.rev("d6"));
    assert_eq!(f.resolve("v2-0").expect("tag made DNS-safe"), f.rev("d6"));
    assert_eq!(f.resolve("main").expect("branch main"), f.rev("d1"));
    assert_eq!(f.store.resolve("web", None).expect("live"), f.rev("d3"));
    assert_eq!(
        f.store.resolve("api", Some("main")).expect("api main"),
        f.rev("a1")
    );
}

#[test]
fn ambiguous_labels_list_candidates() {
    let f = Fixture::new();
    // feature/x and Feature_X both become `feature-x`.
    match f.resolve("feature-x") {
        Err(ResolveError::Ambiguous { candidates, .. }) => {
            assert_eq!(candidates.len(), 2, "{candidates:?}");
            assert!(candidates.iter().any(|c| c.starts_with(&f.ids["d3"][..12])));
            assert!(candidates.iter().any(|c| c.starts_with(&f.ids["d5"][..12])));
            assert!(
                candidates
                    .iter()
                    .any(|c| c.contains("refs/heads/Feature_X"))
            );
        }
        other => panic!("expected ambiguity, got {other:?}"),
    }
    // d1's first 8 hex are also the start of d6's source commit.
    match f.resolve(&f.ids["d1"][..8]) {
        Err(ResolveError::Ambiguous {
            candidates, label, ..
        }) => {
            assert_eq!(label, f.ids["d1"][..8]);
            assert_eq!(candidates.len(), 2, "{candidates:?}");
            assert!(candidates.iter().any(|c| c.contains("deployment")));
            assert!(candidates.iter().any(|c| c.contains("source commit")));
        }
        other => panic!("expected ambiguity, got {other:?}"),
    }
    // A longer prefix is no longer ambiguous.
    assert_eq!(f.resolve(&f.ids["d1"][..9]).expect("9 hex"), f.rev("d1"));
    let message = f.resolve("feature-x").expect_err("ambiguous").to_string();
    assert!(
        message.starts_with("Label `feature-x` of `web` is ambiguous"),
        "{message}"
    );
}

#[test]
fn unknown_and_invalid_labels() {
    let f = Fixture::new();
    assert!(matches!(
        f.resolve("0000000"),
        Err(ResolveError::UnknownLabel { .. })
    ));
    assert!(matches!(
        f.resolve("nosuch"),
        Err(ResolveError::UnknownLabel { .. })
    ));
    // Six hex digits are too short to be a commit prefix.
    assert!(matches!(
        f.resolve(&f.ids["d3"][..6]),
        Err(ResolveError::UnknownLabel { .. })
    ));
    assert!(matches!(
        f.resolve(&"a".repeat(64)),
        Err(ResolveError::InvalidLabel { .. })
    ));
    assert!(matches!(
        f.resolve("a_b"),
        Err(ResolveError::InvalidLabel { .. })
    ));
    assert!(matches!(
        f.resolve(""),
        Err(ResolveError::InvalidLabel { .. })
    ));
    assert!(matches!(
        f.store.resolve("nosuch", Some("main")),
        Err(ResolveError::UnknownService(_))
    ));
    assert!(matches!(
        f.store.resolve("api", None),
        Err(ResolveError::NoLive { .. })
    ));
    assert!(matches!(
        f.store.resolve("Web!", None),
        Err(ResolveError::InvalidService(_))
    ));
}

#[test]
fn history_and_labels_of_a_git_made_repository() {
    let f = Fixture::new();
    let history = f.store.history("web").expect("history");
    let order: Vec<Revision> = history.iter().map(|d| d.revision).collect();
    let expected: Vec<Revision> = ["d6", "d5", "d4", "d3", "d2", "d1"]
        .iter()
        .map(|n| f.rev(n))
        .collect();
    assert_eq!(order, expected);
    assert!(history[3].live);
    assert_eq!(
        history[0].source_ref.as_deref(),
        Some("refs/heads/release/1.0")
    );
    assert_eq!(history[0].image.as_ref().map(|i| i.size), Some(9));
    for deployment in &history {
        let labels = f.store.labels("web", &deployment.revision).expect("labels");
        assert!(!labels.is_empty());
        for label in labels {
            assert_eq!(
                f.resolve(&label).expect("handed-out label"),
                deployment.revision,
                "{label}"
            );
        }
    }
    // The store writes next to what git made, and git still agrees.
    let next = crate::support::deploy(&f.store, "web", 7, Some(b"seven".to_vec()));
    assert_eq!(
        git(f.store.path(), &["rev-parse", "web~1"]).trim(),
        f.ids["d6"]
    );
    assert_eq!(f.resolve(&next.short(7)).expect("new"), next);
    assert_fsck_clean(f.store.path());
}

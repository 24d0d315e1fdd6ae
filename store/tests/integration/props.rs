//! Property: every label the store hands out for a revision resolves back to it.

use proptest::prelude::*;

use revboot_store::Revision;

use crate::support::{deploy_from, store};

/// Source commits drawn from a small pool whose members share long prefixes.
const SOURCES: [&str; 5] = [
    "abcdef0123456789abcdef0123456789abcdef01",
    "abcdef0123456789abcdef0123456789abcdef02",
    "abcdef0999999999999999999999999999999999",
    "1234567000000000000000000000000000000000",
    "1234567800000000000000000000000000000000",
];
/// Refs that collide once made DNS-safe.
const REFS: [&str; 5] = [
    "refs/heads/main",
    "refs/heads/feature/x",
    "refs/heads/feature-x",
    "refs/heads/Feature_X",
    "refs/heads/release/1.0",
];
/// Tags, some named like branch labels or hex prefixes.
const TAGS: [&str; 4] = ["v1", "main", "feature-x", "abcdef0"];

#[derive(Debug, Clone)]
enum Op {
    Deploy {
        source: usize,
        reference: usize,
        ok: bool,
    },
    Tag {
        tag: usize,
        target: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SOURCES.len(), 0..REFS.len(), any::<bool>())
            .prop_map(|(source, reference, ok)| Op::Deploy { source, reference, ok }),
        1 => (0..TAGS.len(), 0..8usize).prop_map(|(tag, target)| Op::Tag { tag, target }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_handed_out_label_resolves_back(ops in proptest::collection::vec(op(), 1..10)) {
        let (_dir, store) = store();
        let mut written: Vec<Revision> = Vec::new();
        for (n, op) in ops.iter().enumerate() {
            match *op {
                Op::Deploy { source, reference, ok } => {
                    let image = ok.then(|| format!("image {n}").into_bytes());
                    written.push(deploy_from(&store, "svc", SOURCES[source], REFS[reference], image));
                }
                Op::Tag { tag, target } => {
                    if let Some(revision) = written.get(target % written.len().max(1)) {
                        // An existing tag pointing elsewhere is refused; that is fine here.
                        let _ = store.tag("svc", TAGS[tag], revision);
                    }
                }
            }
        }
        for revision in &written {
            let labels = store.labels("svc", revision).expect("labels");
            prop_assert!(!labels.is_empty(), "{revision} has no label");
            for label in labels {
                prop_assert_eq!(store.resolve("svc", Some(&label)).expect("resolves"), *revision, "label {}", label);
                prop_assert_eq!(
                    store.resolve("svc", Some(&label.to_ascii_uppercase())).expect("resolves"),
                    *revision
                );
            }
        }
    }
}

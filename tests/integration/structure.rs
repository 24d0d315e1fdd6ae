//! The house rules that keep the code a place a newcomer can move into, checked on the sources:
//! no file of library code over 900 lines, and no import loops between the top-level modules of
//! any crate of the workspace.
//!
//! A module's imports are the `crate::<module>` paths it names outside comments and outside its
//! tests (the text after its first `#[cfg(test)]`, and files named `tests.rs`), grouped imports
//! (`use crate::{a, b::c}`) included. Two modules are in a loop when each reaches the other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest a file of library code may be.
const MAX_LINES: usize = 900;

/// The workspace's crates: the root and its members.
const CRATES: &[&str] = &[
    ".",
    "store",
    "sandbox",
    "builder",
    "deployer",
    "dns-frontend",
    "handshake-proxy",
    "testkit",
];

#[test]
fn no_library_file_is_over_900_lines() {
    let mut long = Vec::new();
    for krate in CRATES {
        for file in sources(&root().join(krate).join("src")) {
            let lines = std::fs::read_to_string(&file)
                .expect("read a source")
                .lines()
                .count();
            if lines > MAX_LINES {
                long.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:#?}");
}

#[test]
fn no_crate_has_an_import_loop() {
    let mut loops = Vec::new();
    for krate in CRATES {
        let edges = edges(&root().join(krate).join("src"));
        for (from, tos) in &edges {
            for to in tos {
                if from < to && reaches(&edges, to, from) {
                    loops.push(format!("{krate}: {from} <-> {to}"));
                }
            }
        }
    }
    assert!(
        loops.is_empty(),
        "modules that reach each other: {loops:#?}"
    );
}

#[test]
fn the_import_reader_sees_plain_grouped_and_nested_paths_but_not_comments_or_tests() {
    let text = "//! see crate::alpha\nuse crate::beta::X;\nuse crate::{gamma, delta::Y, epsilon::{Z, W}};\n\
                fn f() { crate::zeta::g(); }\n/// crate::eta\n#[cfg(test)]\nmod tests { use crate::theta; }\n";
    let found: BTreeSet<String> = imports(text).into_iter().collect();
    let expected: BTreeSet<String> = ["beta", "gamma", "delta", "epsilon", "zeta"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, expected);
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read a source directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Top-level module → the top-level modules it imports, for the crate whose sources are `src`.
fn edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(src) {
        let relative = file.strip_prefix(src).expect("under src");
        let first = relative
            .components()
            .next()
            .expect("a path")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if matches!(first.as_str(), "lib" | "main")
            || file.file_name().is_some_and(|n| n == "tests.rs")
        {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read a source");
        for module in imports(&text) {
            if module != first {
                edges.entry(first.clone()).or_default().insert(module);
            }
        }
    }
    edges
}

/// The top-level modules `text` names as `crate::<module>`, outside comments and tests.
fn imports(text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .take_while(|line| !line.contains("#[cfg(test)]"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first identifier of each item at the group's top level.
            let mut depth = 0usize;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        found.push(identifier(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.push(identifier(rest));
        }
    }
    found.retain(|m| !m.is_empty() && m.chars().next().is_some_and(char::is_lowercase));
    found
}

fn identifier(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// True when `from` reaches `to` along `edges`.
fn reaches(edges: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut pending = vec![from.to_owned()];
    while let Some(module) = pending.pop() {
        for next in edges.get(&module).into_iter().flatten() {
            if next == to {
                return true;
            }
            if seen.insert(next.clone()) {
                pending.push(next.clone());
            }
        }
    }
    false
}

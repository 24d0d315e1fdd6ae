//! A small line diff for manifests (unified format, 3 lines of context).

/// The most lines per side diffed line by line; beyond it the whole text is replaced.
const MAX_LINES: usize = 4_000;
const CONTEXT: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Keep(usize, usize),
    Remove(usize),
    Add(usize),
}

/// A unified diff from `a` to `b`; empty when they are equal.
pub fn unified(a: &str, b: &str, name_a: &str, name_b: &str) -> String {
    if a == b {
        return String::new();
    }
    let left: Vec<&str> = a.lines().collect();
    let right: Vec<&str> = b.lines().collect();
    let ops = if left.len() > MAX_LINES || right.len() > MAX_LINES {
        (0..left.len())
            .map(Op::Remove)
            .chain((0..right.len()).map(Op::Add))
            .collect()
    } else {
        lcs_ops(&left, &right)
    };
    let mut out = format!("--- {name_a}\n+++ {name_b}\n");
    let changed: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, op)| !matches!(op, Op::Keep(..)))
        .map(|(i, _)| i)
        .collect();
    let mut i = 0;
    while i < changed.len() {
        let start = changed[i].saturating_sub(CONTEXT);
        let mut end = changed[i];
        while i < changed.len() && changed[i] <= end + 2 * CONTEXT + 1 {
            end = changed[i];
            i += 1;
        }
        let end = (end + CONTEXT + 1).min(ops.len());
        let hunk = &ops[start..end];
        let (mut a_start, mut b_start) = (None, None);
        let (mut a_len, mut b_len) = (0, 0);
        let mut body = String::new();
        for op in hunk {
            match *op {
                Op::Keep(x, y) => {
                    a_start.get_or_insert(x);
                    b_start.get_or_insert(y);
                    a_len += 1;
                    b_len += 1;
                    body.push_str(&format!(" {}\n", left[x]));
                }
                Op::Remove(x) => {
                    a_start.get_or_insert(x);
                    a_len += 1;
                    body.push_str(&format!("-{}\n", left[x]));
                }
                Op::Add(y) => {
                    b_start.get_or_insert(y);
                    b_len += 1;
                    body.push_str(&format!("+{}\n", right[y]));
                }
            }
        }
        let position = |start: Option<usize>, len: usize| match (start, len) {
            (_, 0) => format!("{},0", start.unwrap_or(0)),
            (Some(s), l) => format!("{},{l}", s + 1),
            (None, l) => format!("0,{l}"),
        };
        out.push_str(&format!(
            "@@ -{} +{} @@\n{body}",
            position(a_start, a_len),
            position(b_start, b_len)
        ));
    }
    out
}

fn lcs_ops(a: &[&str], b: &[&str]) -> Vec<Op> {
    // lengths[i][j]: LCS of a[i..] and b[j..].
    let width = b.len() + 1;
    let mut lengths = vec![0u32; (a.len() + 1) * width];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lengths[i * width + j] = if a[i] == b[j] {
                lengths[(i + 1) * width + j + 1] + 1
            } else {
                lengths[(i + 1) * width + j].max(lengths[i * width + j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut ops = Vec::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push(Op::Keep(i, j));
            i += 1;
            j += 1;
        } else if i < a.len()
            && (j == b.len() || lengths[(i + 1) * width + j] >= lengths[i * width + j + 1])
        {
            ops.push(Op::Remove(i));
            i += 1;
        } else {
            ops.push(Op::Add(j));
            j += 1;
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_have_no_diff() {
        assert_eq!(unified("a\nb\n", "a\nb\n", "a", "b"), "");
    }

    #[test]
    fn one_changed_line() {
        let a = "[run]\nport = 8080\nmemory_mib = 64\n";
        let b = "[run]\nport = 9090\nmemory_mib = 64\n";
        assert_eq!(
            unified(a, b, "a/revboot.toml", "b/revboot.toml"),
            "--- a/revboot.toml\n+++ b/revboot.toml\n@@ -1,3 +1,3 @@\n [run]\n-port = 8080\n+port = 9090\n memory_mib = 64\n"
        );
    }

    #[test]
    fn distant_changes_make_two_hunks() {
        let a: String = (0..20).map(|i| format!("{i}\n")).collect();
        let b = a.replace("1\n", "one\n").replace("18\n", "eighteen\n");
        let diff = unified(&a, &b, "a", "b");
        assert_eq!(diff.matches("@@ -").count(), 2, "{diff}");
    }
}

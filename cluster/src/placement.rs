//! Placement: which node runs an instance, computed the same way on every node.
//!
//! 1. An instance's key is a string (`service/revision[/client]`).
//! 2. Each live node scores `sha256(node id, key)` read as a number, weighted by its
//!    capacity (weighted rendezvous hashing: `-capacity / ln(score)`); the highest score
//!    owns the instance.
//! 3. A node joining or leaving moves only the instances it wins or owned: every other
//!    key keeps its owner.
//!
//! No state, no I/O: the same membership gives the same owner on every node.

use sha2::{Digest as _, Sha256};

/// A candidate: its id and capacity (instances it holds at most; 0 counts as 1).
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The node id.
    pub id: &'a str,
    /// Its capacity.
    pub capacity: u64,
}

/// The score of `node` for `key`, in (0, ∞): higher wins.
fn score(node: &Candidate<'_>, key: &str) -> f64 {
    let mut hash = Sha256::new();
    hash.update(node.id.as_bytes());
    hash.update([0]);
    hash.update(key.as_bytes());
    let digest = hash.finalize();
    let mut top = [0u8; 8];
    top.copy_from_slice(&digest[..8]);
    // 53 bits of hash as a uniform number in (0, 1).
    let bits = u64::from_be_bytes(top) >> 11;
    let unit = (bits as f64 + 0.5) / (1u64 << 53) as f64;
    let weight = node.capacity.max(1) as f64;
    -weight / unit.ln()
}

/// The owner of `key` among `nodes`: the highest score, ties (which sha-256 makes
/// vanishingly rare) broken by the smaller id. `None` when there is no node.
pub fn owner<'a>(nodes: &[Candidate<'a>], key: &str) -> Option<&'a str> {
    nodes
        .iter()
        .map(|node| (score(node, key), node.id))
        .max_by(|a, b| a.0.total_cmp(&b.0).then_with(|| b.1.cmp(a.1)))
        .map(|(_, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes<'a>(ids: &[&'a str]) -> Vec<Candidate<'a>> {
        ids.iter()
            .map(|id| Candidate { id, capacity: 64 })
            .collect()
    }

    #[test]
    fn the_owner_does_not_depend_on_the_order_of_nodes() {
        let a = nodes(&["n1", "n2", "n3"]);
        let b = nodes(&["n3", "n1", "n2"]);
        for i in 0..500 {
            let key = format!("hello/{i:040x}");
            assert_eq!(owner(&a, &key), owner(&b, &key));
        }
    }

    #[test]
    fn keys_spread_over_nodes_and_only_a_leavers_keys_move() {
        let three = nodes(&["n1", "n2", "n3"]);
        let two = nodes(&["n1", "n3"]);
        let mut counts = std::collections::HashMap::new();
        for i in 0..3000 {
            let key = format!("svc/{i}");
            let before = owner(&three, &key).expect("owner");
            *counts.entry(before).or_insert(0) += 1;
            let after = owner(&two, &key).expect("owner");
            if before != "n2" {
                assert_eq!(before, after, "{key} moved though its owner stayed");
            }
        }
        for id in ["n1", "n2", "n3"] {
            assert!(counts[id] > 700, "{id} got {} of 3000", counts[id]);
        }
    }

    #[test]
    fn no_node_no_owner() {
        assert_eq!(owner(&[], "svc/x"), None);
    }
}

//! revboot's cluster coordination: several revboot nodes serve one zone together, and agree
//! through **etcd** (never a consensus of revboot's own).
//!
//! What lives in etcd, under `<prefix>/` (the prefix defaults to `/revboot/<zone>`):
//!
//! 1. `nodes/<id>` — each node's [`NodeInfo`] (id, HTTP URL, DNS address, pools, capacity),
//!    written under a lease of `ttl_s` seconds that the node keeps alive. A node whose lease
//!    expires is gone: etcd deletes the key, and every node's view drops it. A node whose
//!    lease expired while it was cut off grants itself a new one and registers again. An
//!    upgrade in place hands the lease to the node's next program ([`Cluster::hand_over`],
//!    [`Cluster::join_with`]): not revoked, kept alive by the next program, so that the
//!    node's record and its claims never leave etcd.
//! 2. `live/<service>` — the one truth of the live pointer: a [`LiveRecord`] (revision,
//!    node, reason). A move is a compare-and-swap ([`Cluster::move_live`]): it succeeds only
//!    if the record still names the revision the mover believed was live; otherwise the
//!    mover gets [`LiveCasError::Conflict`] naming what is live now and who moved it.
//! 3. `heads/<service>` — the newest deployment a node wrote ([`HeadRecord`]): the others
//!    fetch it from that node's git (replication is git's own, see the daemon).
//! 4. `sources/<service>` — each branch and tag of the service's source repository and the
//!    node that took its push, and the refs deleted by a push ([`SourceRecord`]); a push
//!    moves a ref by compare-and-swap ([`Cluster::move_ref`]), and the other nodes fetch it
//!    from that node's git, or delete it.
//! 5. `builds/<service>` — the service's build lock ([`Cluster::lock_builds`]), under a
//!    lease of its own: one node at a time writes a service's deployment branch.
//! 6. `claims/<key>` — placement: [`placement::owner`] hashes an instance's key over the
//!    live nodes (rendezvous hashing, weighted by capacity), so every node computes the same
//!    owner from the same membership; the node that then runs the instance claims it
//!    ([`ClaimRecord`], under its lease), and every node answers from the claim while its
//!    node is live ([`Cluster::owner`]). A node joining or leaving does not move an instance
//!    that runs elsewhere; a claim goes with its node's lease. Both are read from memory:
//!    etcd stays off the query path (see [`claim`]'s rules).
//! 7. `retired/<service>` — a service renamed or deleted ([`RetiredRecord`]), written by
//!    compare-and-swap with the service's other records moved or removed in the same
//!    transaction ([`Cluster::retire`]); while it stands, no write brings the service
//!    back, and every node renames or deletes it too (see the `retire` module's rules).
//!
//! Every prefix a node reads is mirrored in memory by a get-then-watch loop
//! ([`Cluster::nodes`], [`Cluster::live`], [`Cluster::heads`], [`Cluster::sources`],
//! [`Cluster::claim_of`]); readers never wait for etcd. Every call to etcd has a timeout
//! ([`OP_TIMEOUT`]); the mirrors hold at most [`MAX_KEYS`] keys each.
//!
//! [`Cluster::connected`] is false once the node's lease has not been renewed for a whole
//! TTL: the node is cut off, its view may be stale, and it must stop answering for others.
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use revboot_cluster::{Cluster, ClusterConfig, NodeInfo};
//! let config = ClusterConfig::from_toml(r#"etcd = ["http://127.0.0.1:2379"]
//! node = "n1""#)?;
//! let node = NodeInfo::new("n1", "http://127.0.0.1:8080", "127.0.0.1:5353".parse()?);
//! let (_stop, stop) = tokio::sync::watch::channel(false);
//! let cluster = Cluster::join(&config, "revboot.test", node, stop).await?;
//! for node in cluster.nodes() {
//!     println!("{} at {}", node.id, node.http);
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod claim;
mod config;
mod coord;
mod mirror;
pub mod placement;
mod retire;
mod sources;

pub use claim::{ClaimRecord, Claimed};
pub use config::{ClusterConfig, ConfigError};
pub use coord::{
    Cluster, HeadRecord, JoinError, LiveCasError, LiveRecord, MOVE_PATIENCE, NodeInfo,
};
pub use retire::{MAX_RETIRED, RetireError};
pub use sources::{BuildLock, MAX_DELETED, RefCasError, RefRecord, RetiredRecord, SourceRecord};

use std::time::Duration;

/// The longest any single call to etcd may take.
pub const OP_TIMEOUT: Duration = Duration::from_secs(3);

/// The most keys a mirrored prefix holds; more are left out, with a warning.
pub const MAX_KEYS: usize = 65_536;

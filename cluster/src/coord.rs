//! The node's membership and its reads and writes of the cluster's state (see the crate
//! docs for the keys).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::mirror::{self, Map};
use crate::placement::{self, Candidate};
use crate::{ClusterConfig, OP_TIMEOUT};

/// A node as it registers itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its id (`[cluster] node`).
    pub id: String,
    /// Its HTTP base URL (git, API): `http://host:port`.
    pub http: String,
    /// Its DNS address.
    pub dns: SocketAddr,
    /// The addresses its name server answers on for the world (port 53, the NS record's
    /// glue): every node publishes the live nodes' as the zone's NS set. Empty: none.
    #[serde(default)]
    pub ns: Vec<IpAddr>,
    /// Its address pools.
    #[serde(default)]
    pub pools: Vec<String>,
    /// How many instances it holds at most.
    #[serde(default)]
    pub capacity: u64,
    /// When it registered (Unix milliseconds).
    #[serde(default)]
    pub since_ms: u64,
}

impl NodeInfo {
    /// A node with no pools and a capacity of 1, registering now.
    pub fn new(id: &str, http: &str, dns: SocketAddr) -> NodeInfo {
        NodeInfo {
            id: id.to_owned(),
            http: http.to_owned(),
            dns,
            ns: Vec::new(),
            pools: Vec::new(),
            capacity: 1,
            since_ms: unix_ms(),
        }
    }
}

/// The live pointer of a service as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRecord {
    /// The deployment commit (hex).
    pub revision: String,
    /// The node that moved it.
    pub node: String,
    /// Why (one line: `rollback to c63dc27`, `build #3 of refs/heads/main at 9d2f0aa`).
    pub reason: String,
}

/// The newest deployment of a service a node wrote: where to fetch it from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadRecord {
    /// The tip of the service's deployment branch (hex).
    pub commit: String,
    /// The node that has it.
    pub node: String,
}

/// Why the node could not join.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// etcd did not answer or refused.
    #[error("etcd at {endpoints} did not let node `{node}` register: {reason}")]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// The node.
        node: String,
        /// What went wrong.
        reason: String,
    },
    /// Another live node registered the same id.
    #[error("node id `{0}` is registered by another live node: ids must be unique")]
    Taken(String),
}

/// Why a live move was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LiveCasError {
    /// Live moved meanwhile: the mover's idea of it is stale.
    #[error(
        "Live of `{service}` moved meanwhile: it is {} (moved by node {}: {}), not {} as node {node} had it; nothing changed",
        short(&live.revision), live.node, live.reason, expected.as_deref().map_or("unset", short)
    )]
    Conflict {
        /// The service.
        service: String,
        /// What the mover believed was live.
        expected: Option<String>,
        /// What is live.
        live: LiveRecord,
        /// The node that tried.
        node: String,
    },
    /// The service was renamed or deleted in the cluster (see [`Cluster::retire`](crate::Cluster::retire)).
    #[error("{reason}; nothing changed")]
    Retired {
        /// The service.
        service: String,
        /// What became of it.
        reason: String,
    },
    /// etcd did not answer: the node is cut off, or etcd has lost its quorum.
    #[error(
        "Cannot move live of `{service}`: etcd did not answer ({reason}); live moves are refused while the cluster's etcd is unreachable"
    )]
    Unavailable {
        /// The service.
        service: String,
        /// What went wrong.
        reason: String,
    },
}

/// How long a live move retries while etcd is unavailable.
pub const MOVE_PATIENCE: Duration = Duration::from_secs(5);

fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A node in the cluster: its registration kept alive, and the cluster's state mirrored.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) client: Client,
    /// `<prefix>/` with the trailing slash.
    pub(crate) prefix: String,
    pub(crate) me: NodeInfo,
    zone: String,
    /// The node's current membership lease (a new one once it registers again).
    lease: Arc<AtomicI64>,
    /// The lease goes to the next program of this node (an upgrade in place): kept alive
    /// after `stop`, never revoked ([`Cluster::hand_over`]).
    handing_over: Arc<AtomicBool>,
    pub(crate) ttl: Duration,
    /// When the last lease renewal that succeeded was sent.
    renewed: watch::Receiver<Instant>,
    nodes: watch::Receiver<Map>,
    live: watch::Receiver<Map>,
    heads: watch::Receiver<Map>,
    pub(crate) sources: watch::Receiver<Map>,
    /// Placement claims, by placement key (see [`crate::claim`]).
    pub(crate) claims: watch::Receiver<Map>,
    /// Services renamed or deleted (see [`Cluster::retire`](crate::Cluster::retire)).
    pub(crate) retired: watch::Receiver<Map>,
    /// Per service, etcd's revision of the last live move this node made or followed.
    followed: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    /// The services this node is moving live of right now (not to be followed meanwhile:
    /// etcd's event of the move can arrive before the move returns).
    moving: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("prefix", &self.prefix)
            .field("me", &self.me.id)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects to etcd, registers `me` under a lease and keeps it alive until `stop`
    /// turns true (then the lease is revoked: the node leaves at once, unless it was handed
    /// over, [`Cluster::hand_over`]).
    pub async fn join(
        config: &ClusterConfig,
        zone: &str,
        me: NodeInfo,
        stop: watch::Receiver<bool>,
    ) -> Result<Cluster, JoinError> {
        Cluster::join_with(config, zone, me, None, stop).await
    }

    /// As [`Cluster::join`], keeping `handed`, the lease the previous program of this node
    /// handed over ([`Cluster::hand_over`], an upgrade in place): the node's record and its
    /// claims, under that lease, never leave etcd. A lease that expired meanwhile (a very
    /// slow start), or whose TTL is not `ttl_s` any more, is left to expire, logged, and the
    /// node joins anew as [`Cluster::join`] does.
    pub async fn join_with(
        config: &ClusterConfig,
        zone: &str,
        me: NodeInfo,
        handed: Option<i64>,
        stop: watch::Receiver<bool>,
    ) -> Result<Cluster, JoinError> {
        let fail = |reason: String| JoinError::Etcd {
            endpoints: config.etcd.join(","),
            node: me.id.clone(),
            reason,
        };
        // Requests fail when the member reached has no leader (it is cut off from the
        // others), instead of answering from a minority.
        let options = ConnectOptions::new()
            .with_connect_timeout(OP_TIMEOUT)
            .with_timeout(OP_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), OP_TIMEOUT)
            .with_require_leader(true);
        let client = tokio::time::timeout(OP_TIMEOUT, Client::connect(&config.etcd, Some(options)))
            .await
            .map_err(|_| fail("timed out".to_owned()))?
            .map_err(|error| fail(error.to_string()))?;
        let prefix = format!("{}/", config.prefix_for(zone));
        let ttl = Duration::from_secs(config.ttl_s);
        let sent = Instant::now();
        let kept = match handed {
            Some(lease) => match keep_lease(&client, &prefix, &me, ttl, lease).await {
                Ok(()) => {
                    info!(
                        node = me.id,
                        lease, "kept the lease the previous program handed over"
                    );
                    Some(lease)
                }
                Err(reason) => {
                    warn!(
                        node = me.id,
                        lease,
                        reason,
                        "cannot keep the lease the previous program handed over: joining anew"
                    );
                    None
                }
            },
            None => None,
        };
        let lease = match kept {
            Some(lease) => lease,
            None => register(&client, &prefix, &me, ttl)
                .await
                .map_err(|error| match error {
                    Register::Taken => JoinError::Taken(me.id.clone()),
                    Register::Etcd(reason) => fail(reason),
                })?,
        };
        info!(
            node = me.id,
            lease,
            ttl_s = config.ttl_s,
            "joined the cluster"
        );
        let (renewed_tx, renewed) = watch::channel(sent);
        let nodes = mirror::spawn(client.clone(), format!("{prefix}nodes/"), stop.clone());
        let live = mirror::spawn(client.clone(), format!("{prefix}live/"), stop.clone());
        let heads = mirror::spawn(client.clone(), format!("{prefix}heads/"), stop.clone());
        let sources = mirror::spawn(client.clone(), format!("{prefix}sources/"), stop.clone());
        let claims = mirror::spawn(client.clone(), format!("{prefix}claims/"), stop.clone());
        let retired = mirror::spawn(client.clone(), format!("{prefix}retired/"), stop.clone());
        // A node answers from its mirrors once it has joined: their first reads come first
        // (bounded), so that it does not place by the hash what another node claims.
        // The same for renames and deletes: a node that was down applies them first.
        for mirror in [&nodes, &claims, &retired, &sources] {
            let mut first = mirror.clone();
            let _ = tokio::time::timeout(OP_TIMEOUT, first.changed()).await;
        }
        let lease = Arc::new(AtomicI64::new(lease));
        let handing_over = Arc::new(AtomicBool::new(false));
        tokio::spawn(keep_alive(
            Keeper {
                client: client.clone(),
                prefix: prefix.clone(),
                me: me.clone(),
                ttl,
                current: lease.clone(),
                handing_over: handing_over.clone(),
            },
            renewed_tx,
            stop,
        ));
        Ok(Cluster {
            inner: Arc::new(Inner {
                client,
                prefix,
                me,
                zone: zone.to_owned(),
                lease,
                handing_over,
                ttl,
                renewed,
                nodes,
                live,
                heads,
                sources,
                claims,
                retired,
                followed: std::sync::Mutex::default(),
                moving: std::sync::Mutex::default(),
            }),
        })
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// This node.
    pub fn me(&self) -> &NodeInfo {
        &self.inner.me
    }

    /// The zone the cluster serves.
    pub fn zone(&self) -> &str {
        &self.inner.zone
    }

    /// The membership lease's TTL.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// True while this node's lease is renewed: false once a whole TTL has passed since the
    /// last renewal that succeeded was sent, which is no later than etcd lets the lease
    /// expire and the others take over this node's instances.
    pub fn connected(&self) -> bool {
        self.inner.renewed.borrow().elapsed() < self.inner.ttl
    }

    /// The live nodes as last seen, by id.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let map = self.inner.nodes.borrow().clone();
        map.values()
            .filter_map(|(value, _)| serde_json::from_slice(value).ok())
            .collect()
    }

    /// A watch that changes whenever membership changes.
    pub fn nodes_changed(&self) -> watch::Receiver<Map> {
        self.inner.nodes.clone()
    }

    /// The node's current membership lease.
    pub(crate) fn lease(&self) -> i64 {
        self.inner.lease.load(Ordering::Relaxed)
    }

    /// Hands the node's membership lease to the next program of this node (an upgrade in
    /// place): from now on it is kept alive until this process ends (the `execve`), even
    /// after `stop`, and never revoked, so that the node's record and its claims stay in
    /// etcd while the next program starts and keeps the same lease
    /// ([`Cluster::join_with`]). Returns the lease.
    pub fn hand_over(&self) -> i64 {
        self.inner.handing_over.store(true, Ordering::Relaxed);
        let lease = self.lease();
        info!(node = self.inner.me.id, lease, "handing the lease over");
        lease
    }

    /// Renews the node's lease once now (right before an upgrade's `execve`, so that the
    /// next program has a whole TTL to keep it alive).
    pub async fn renew(&self) -> Result<(), String> {
        renew_once(&self.inner.client, self.lease()).await.map(drop)
    }

    /// The node that owns `key`: the live node its claim names, else the winner of the
    /// rendezvous hash among the live nodes (see [`placement`] and [`crate::claim`]).
    pub fn owner(&self, key: &str) -> Option<NodeInfo> {
        let nodes = self.nodes();
        if let Some(claimant) = self.claim_of(key)
            && let Some(node) = nodes.iter().find(|node| node.id == claimant)
        {
            return Some(node.clone());
        }
        let candidates: Vec<Candidate<'_>> = nodes
            .iter()
            .map(|node| Candidate {
                id: &node.id,
                capacity: node.capacity,
            })
            .collect();
        let id = placement::owner(&candidates, key)?.to_owned();
        nodes.into_iter().find(|node| node.id == id)
    }

    /// Live pointers as etcd holds them, by service, with etcd's revision of each move.
    pub fn live(&self) -> Vec<(String, LiveRecord, i64)> {
        records_with_revision(&self.inner.live)
    }

    /// The live moves this node has not followed yet: newer (by etcd's revision) than the
    /// last one it made or followed. A mirror that lags behind (its watch reconnecting)
    /// never takes live back to an older move.
    pub fn live_to_follow(&self) -> Vec<(String, LiveRecord, i64)> {
        let known = self
            .inner
            .followed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let moving = self
            .inner
            .moving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.live()
            .into_iter()
            .filter(|(service, _, revision)| {
                !moving.contains_key(service) && known.get(service).is_none_or(|k| revision > k)
            })
            .collect()
    }

    /// Notes that this node's live of `service` is etcd's move at `revision`.
    pub fn followed(&self, service: &str, revision: i64) {
        let mut known = self
            .inner
            .followed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if known.len() < crate::MAX_KEYS || known.contains_key(service) {
            let entry = known.entry(service.to_owned()).or_insert(revision);
            *entry = (*entry).max(revision);
        }
    }

    /// A watch that changes whenever a live pointer moves.
    pub fn live_changed(&self) -> watch::Receiver<Map> {
        self.inner.live.clone()
    }

    /// The newest deployment announced per service.
    pub fn heads(&self) -> Vec<(String, HeadRecord)> {
        records(&self.inner.heads)
    }

    /// A watch that changes whenever a deployment is announced.
    pub fn heads_changed(&self) -> watch::Receiver<Map> {
        self.inner.heads.clone()
    }

    /// Announces that this node holds `commit` as the tip of `service`'s deployments.
    pub async fn announce_head(&self, service: &str, commit: &str) -> Result<(), String> {
        let record = HeadRecord {
            commit: commit.to_owned(),
            node: self.inner.me.id.clone(),
        };
        let value = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
        let key = format!("{}heads/{service}", self.inner.prefix);
        let mut client = self.inner.client.clone();
        let txn = Txn::new()
            .when([self.not_retired(service)])
            .and_then([TxnOp::put(key, value, None)]);
        if timed(client.txn(txn)).await?.succeeded() {
            Ok(())
        } else {
            Err(format!("`{service}` is renamed or deleted in the cluster"))
        }
    }

    /// Moves the live pointer of `service` from `expected` (what this node believes is
    /// live; `None`: unset) to `to`, by compare-and-swap in etcd. Moving to what is live
    /// already succeeds; a service etcd has no record of yet takes any `expected`. etcd
    /// unavailable is retried for up to [`MOVE_PATIENCE`] (an election after a member died
    /// takes a moment); a conflict is not.
    pub async fn move_live(
        &self,
        service: &str,
        expected: Option<&str>,
        to: &str,
        reason: &str,
    ) -> Result<(), LiveCasError> {
        let deadline = Instant::now() + MOVE_PATIENCE;
        let _moving = Moving::new(&self.inner, service);
        loop {
            match self.try_move_live(service, expected, to, reason).await {
                Err(LiveCasError::Unavailable { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                other => return other,
            }
        }
    }

    async fn try_move_live(
        &self,
        service: &str,
        expected: Option<&str>,
        to: &str,
        reason: &str,
    ) -> Result<(), LiveCasError> {
        let key = format!("{}live/{service}", self.inner.prefix);
        let unavailable = |reason: String| LiveCasError::Unavailable {
            service: service.to_owned(),
            reason,
        };
        let mut client = self.inner.client.clone();
        let got = tokio::time::timeout(OP_TIMEOUT, client.get(key.as_str(), None))
            .await
            .map_err(|_| unavailable("timed out".to_owned()))?
            .map_err(|error| unavailable(error.to_string()))?;
        let current = got.kvs().first().and_then(|kv| {
            let record: LiveRecord = serde_json::from_slice(kv.value()).ok()?;
            Some((record, kv.mod_revision()))
        });
        let compare = match &current {
            Some((record, revision)) if record.revision == to => {
                self.followed(service, *revision);
                return Ok(());
            }
            Some((record, _)) if Some(record.revision.as_str()) != expected => {
                return Err(self.conflict(service, expected, record.clone()));
            }
            Some((_, mod_revision)) => {
                Compare::mod_revision(key.as_str(), CompareOp::Equal, *mod_revision)
            }
            None => Compare::version(key.as_str(), CompareOp::Equal, 0),
        };
        let record = LiveRecord {
            revision: to.to_owned(),
            node: self.inner.me.id.clone(),
            reason: reason.to_owned(),
        };
        let value = serde_json::to_vec(&record).map_err(|e| unavailable(e.to_string()))?;
        let txn = Txn::new()
            .when([compare, self.not_retired(service)])
            .and_then([TxnOp::put(key.as_str(), value, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let done = tokio::time::timeout(OP_TIMEOUT, client.txn(txn))
            .await
            .map_err(|_| unavailable("timed out".to_owned()))?
            .map_err(|error| unavailable(error.to_string()))?;
        if !done.succeeded()
            && let Some(retired) = self.retired_now(service).await
        {
            return Err(LiveCasError::Retired {
                service: service.to_owned(),
                reason: retired,
            });
        }
        if done.succeeded() {
            info!(service, to, reason, "live moved in the cluster");
            if let Some(header) = done.header() {
                self.followed(service, header.revision());
            }
            return Ok(());
        }
        let now = done
            .op_responses()
            .into_iter()
            .find_map(|response| match response {
                etcd_client::TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .and_then(|kv| serde_json::from_slice::<LiveRecord>(kv.value()).ok()),
                _ => None,
            })
            .unwrap_or(record);
        Err(self.conflict(service, expected, now))
    }

    fn conflict(&self, service: &str, expected: Option<&str>, live: LiveRecord) -> LiveCasError {
        warn!(
            service,
            live = live.revision,
            by = live.node,
            "live move lost a race"
        );
        LiveCasError::Conflict {
            service: service.to_owned(),
            expected: expected.map(str::to_owned),
            live,
            node: self.inner.me.id.clone(),
        }
    }
}

/// The records of a mirrored prefix, by key (those that do not parse are left out).
pub(crate) fn records<T: serde::de::DeserializeOwned>(
    mirror: &watch::Receiver<Map>,
) -> Vec<(String, T)> {
    let map = mirror.borrow().clone();
    map.iter()
        .filter_map(|(key, (value, _))| Some((key.clone(), serde_json::from_slice(value).ok()?)))
        .collect()
}

/// The records of a mirror, by key, with etcd's revision of each one's last change.
pub(crate) fn records_with_revision<T: serde::de::DeserializeOwned>(
    mirror: &watch::Receiver<Map>,
) -> Vec<(String, T, i64)> {
    let map = mirror.borrow().clone();
    map.iter()
        .filter_map(|(key, (value, revision))| {
            Some((key.clone(), serde_json::from_slice(value).ok()?, *revision))
        })
        .collect()
}

/// A transaction that puts `key` under `lease` if it does not exist, else reads it.
pub(crate) fn create_or_get(key: &str, value: Vec<u8>, lease: i64) -> Txn {
    Txn::new()
        .when([Compare::version(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(key, None)])
}

/// A call to etcd within [`OP_TIMEOUT`], its error as text.
pub(crate) async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// Marks a service as being moved by this node while it lives.
struct Moving<'a> {
    inner: &'a Inner,
    service: String,
}

impl<'a> Moving<'a> {
    fn new(inner: &'a Inner, service: &str) -> Moving<'a> {
        let mut moving = inner.moving.lock().unwrap_or_else(|e| e.into_inner());
        *moving.entry(service.to_owned()).or_insert(0) += 1;
        Moving {
            inner,
            service: service.to_owned(),
        }
    }
}

impl Drop for Moving<'_> {
    fn drop(&mut self) {
        let mut moving = self.inner.moving.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = moving.get_mut(&self.service) {
            *count -= 1;
            if *count == 0 {
                moving.remove(&self.service);
            }
        }
    }
}

enum Register {
    Taken,
    Etcd(String),
}

/// Grants a lease and writes `nodes/<id>` under it, unless another lease holds the id.
async fn register(
    client: &Client,
    prefix: &str,
    me: &NodeInfo,
    ttl: Duration,
) -> Result<i64, Register> {
    let mut client = client.clone();
    let etcd = |error: etcd_client::Error| Register::Etcd(error.to_string());
    let timed = |_| Register::Etcd("timed out".to_owned());
    let ttl_s = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let lease = tokio::time::timeout(OP_TIMEOUT, client.lease_grant(ttl_s, None))
        .await
        .map_err(timed)?
        .map_err(etcd)?
        .id();
    let key = format!("{prefix}nodes/{}", me.id);
    let value = serde_json::to_vec(me).map_err(|e| Register::Etcd(e.to_string()))?;
    // Free, or already ours from an earlier lease of this node that has not expired yet
    // (a restart within the TTL): a node with the same id and the same HTTP URL.
    let txn = create_or_get(&key, value.clone(), lease);
    let done = tokio::time::timeout(OP_TIMEOUT, client.txn(txn))
        .await
        .map_err(timed)?
        .map_err(etcd)?;
    if done.succeeded() {
        return Ok(lease);
    }
    let holder = done.op_responses().into_iter().find_map(|r| match r {
        etcd_client::TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<NodeInfo>(kv.value()).ok()),
        _ => None,
    });
    if holder.is_some_and(|holder| holder.http != me.http) {
        return Err(Register::Taken);
    }
    tokio::time::timeout(
        OP_TIMEOUT,
        client.put(key, value, Some(PutOptions::new().with_lease(lease))),
    )
    .await
    .map_err(timed)?
    .map_err(etcd)?;
    Ok(lease)
}

/// Renews `lease` once; its TTL left, in seconds (0: it expired).
pub(crate) async fn renew_once(client: &Client, lease: i64) -> Result<i64, String> {
    let mut client = client.clone();
    let round = async {
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
        keeper.keep_alive().await?;
        responses.message().await
    };
    match timed(round).await? {
        Some(response) if response.ttl() > 0 => Ok(response.ttl()),
        _ => Err("the lease expired".to_owned()),
    }
}

/// Takes `lease`, handed over by the previous program of this node: alive, of the TTL
/// configured, and the one `nodes/<id>` is under; renewed at once, and the node's record
/// written again under it.
async fn keep_lease(
    client: &Client,
    prefix: &str,
    me: &NodeInfo,
    ttl: Duration,
    lease: i64,
) -> Result<(), String> {
    let ttl_s = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let mut client = client.clone();
    let alive = timed(client.lease_time_to_live(lease, None)).await?;
    if alive.ttl() <= 0 {
        return Err("it expired".to_owned());
    }
    if alive.granted_ttl() != ttl_s {
        return Err(format!(
            "its TTL is {}s, not ttl_s = {ttl_s}",
            alive.granted_ttl()
        ));
    }
    renew_once(&client, lease).await?;
    let key = format!("{prefix}nodes/{}", me.id);
    let value = serde_json::to_vec(me).map_err(|e| e.to_string())?;
    let txn = Txn::new()
        .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
        .and_then([TxnOp::put(
            key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )]);
    if timed(client.txn(txn)).await?.succeeded() {
        Ok(())
    } else {
        Err("the node's record is not under it".to_owned())
    }
}

/// What [`keep_alive`] keeps: the node's registration.
struct Keeper {
    client: Client,
    prefix: String,
    me: NodeInfo,
    ttl: Duration,
    /// The lease, a new one once the node registers again.
    current: Arc<AtomicI64>,
    /// Set by [`Cluster::hand_over`].
    handing_over: Arc<AtomicBool>,
}

/// Renews the lease every third of the TTL; registers again with a new lease when it
/// expired (the node was cut off longer than the TTL); revokes it on stop, unless it is
/// handed over: then it is renewed until the process ends.
async fn keep_alive(
    keeper: Keeper,
    renewed: watch::Sender<Instant>,
    mut stop: watch::Receiver<bool>,
) {
    let Keeper {
        client,
        prefix,
        me,
        ttl,
        current,
        handing_over,
    } = keeper;
    let period = ttl / 3;
    let mut lease = current.load(Ordering::Relaxed);
    let mut stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    let mut expired = false;
    let mut stopped = false;
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop), if !stopped => {
                stopped = true;
                if !handing_over.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            }
            () = tokio::time::sleep(period) => {}
        }
        let sent = Instant::now();
        if expired {
            match register(&client, &prefix, &me, ttl).await {
                Ok(new) => {
                    info!(node = me.id, lease = new, "registered again in the cluster");
                    lease = new;
                    current.store(new, Ordering::Relaxed);
                    expired = false;
                    renewed.send_replace(sent);
                }
                Err(Register::Taken) => warn!(node = me.id, "node id taken by another node"),
                Err(Register::Etcd(reason)) => {
                    warn!(node = me.id, reason, "cannot register in the cluster")
                }
            }
            continue;
        }
        if stream.is_none() {
            let mut client = client.clone();
            match tokio::time::timeout(OP_TIMEOUT, client.lease_keep_alive(lease)).await {
                Ok(Ok(pair)) => stream = Some(pair),
                // The client's word for a lease etcd no longer has (it answered TTL 0).
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => {
                    warn!(node = me.id, "the lease expired: registering again");
                    expired = true;
                    continue;
                }
                _ => {
                    warn!(node = me.id, "cannot reach etcd to renew the lease");
                    continue;
                }
            }
        }
        let Some((keeper, responses)) = stream.as_mut() else {
            continue;
        };
        let round = async {
            keeper.keep_alive().await?;
            responses.message().await
        };
        match tokio::time::timeout(OP_TIMEOUT, round).await {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {
                renewed.send_replace(sent);
            }
            Ok(Ok(Some(_))) => {
                warn!(node = me.id, "the lease expired: registering again");
                expired = true;
                stream = None;
            }
            _ => {
                warn!(node = me.id, "lease renewal failed");
                stream = None;
            }
        }
    }
    let mut client = client;
    let _ = tokio::time::timeout(OP_TIMEOUT, client.lease_revoke(lease)).await;
    info!(node = me.id, "left the cluster");
}

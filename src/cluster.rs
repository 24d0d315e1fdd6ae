//! The daemon as a node of a cluster (`[cluster]`): joins etcd through `revboot-cluster`,
//! and keeps this node's deployment repository in step with the others'.
//!
//! 1. Joining registers the node (id, HTTP URL, DNS address, pools, capacity) under a
//!    lease; `revboot nodes` and `GET /api/v1/nodes` list the live nodes.
//! 2. The store asks etcd before every live move here (`EtcdAuthority`): a
//!    compare-and-swap from the revision live here, refused with a conflict that names the
//!    winner when another node moved it first, refused when etcd does not answer.
//! 3. Announce: when this node's deployment branch of a service is ahead of what etcd
//!    announces (a build or a pushed deployment here), it announces its tip.
//! 4. Replicate: when another node announces a tip this node lacks, it fetches the
//!    service's branch from that node's git (`/git/-/deploy.git`) with stock git,
//!    fast-forward only, one fetch at a time, each within [`FETCH_TIMEOUT`].
//! 5. Mirror live: when etcd's live pointer of a service differs from `refs/live/<service>`
//!    here, and the revision is here (step 4 fetched it), the ref moves, with the reason and
//!    the node that moved it in its reflog. A node never points live at objects it lacks.
//! 6. Sources: every branch of every service's source repository is in etcd, moved by
//!    compare-and-swap when a push is taken, and fetched by the other nodes; a service
//!    added on one node gets a source repository on every node; builds run under a build
//!    lock per service ([`crate::replicate`]). Any node takes a push and builds. A
//!    service renamed or deleted on any node is renamed or deleted on every node (etcd
//!    first, see the `lifecycle` module; then each node, [`crate::replicate`]'s step 6).
//!
//! 7. DNS places instances over the live nodes, sticky by claims in etcd
//!    ([`crate::placed`]); the owner of a revision it has not fetched yet fetches it first.
//! 8. An upgrade in place hands the node's lease to the new program (in the upgrade state,
//!    [`crate::handover`]), which keeps it alive: the node's record and its claims never
//!    leave etcd, so no other node places its instances meanwhile. A lease that expired
//!    before the new program took it (a very slow start) is logged, and the node joins
//!    anew; its instances are claimed again (step 7).
//!
//! The nodes of a cluster share one token (`[http] token`): they fetch from each other
//! with it. Steps 3 to 6 run on every change etcd reports and every [`TICK`] besides
//! (step 4 only every `[cluster] replicate_every_ms` when that is set: a node asked for a
//! revision before then fetches it first, step 7); a fetch that failed is tried again
//! after a delay that grows (see [`crate::replicate`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use revboot_cluster::{Cluster, NodeInfo};
use revboot_deployer::Instances;
use revboot_store::{LiveAuthority, Revision, Store};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::action::{ActionError, NodeView, NodesView};
use crate::config::Config;
use crate::placed::Placed;
use crate::replicate::{self, Backoff, Coordinated};

pub use crate::replicate::{FETCH_TIMEOUT, TICK};

/// Instances as DNS or the API sees them.
type Answers = Arc<dyn Instances>;

/// Placement in front of the node's instances when `[cluster]` is set (none on a single
/// host), the instances DNS answers from (the placement, or the node's own), and those the
/// API answers from (on a node of a cluster, [`crate::placed::Resolving`]).
pub(crate) fn placement(
    config: &Config,
    front: &Arc<dyn Instances>,
    store: &Store,
    token: &str,
) -> (Option<Arc<Placed>>, Answers, Answers) {
    let placed = (config.cluster.as_ref()).map(|_| {
        Arc::new(Placed::new(
            front.clone(),
            store.clone(),
            token,
            config.instances.client_prefixes,
        ))
    });
    let answers = placed
        .clone()
        .map_or(front.clone(), |p| p as Arc<dyn Instances>);
    let api = placed.clone().map_or(front.clone(), |p| {
        Arc::new(crate::placed::Resolving(p)) as Arc<dyn Instances>
    });
    (placed, answers, api)
}

/// What the keeper of warm services summons through: in a cluster the placement, so that
/// a warm service boots on the node that owns it and not on every node; else `front`.
pub(crate) fn warm_front(placed: Option<&Arc<Placed>>, front: Answers) -> Answers {
    placed.map_or(front, |placed| placed.clone() as Answers)
}

/// The node as the daemon started it, joining.
pub(crate) struct Node<'a> {
    /// Its HTTP base URL.
    pub http: String,
    /// Its DNS address.
    pub dns: std::net::SocketAddr,
    /// Its deployment repository.
    pub store: &'a Store,
    /// The cluster's token.
    pub token: &'a str,
    /// The placement DNS answers from.
    pub placed: Option<&'a Arc<Placed>>,
    /// Its instances.
    pub deployer: &'a Arc<revboot_deployer::Deployer>,
    /// Its builder, and the builder's part in the cluster ([`Coordinated::new`]).
    pub builder: (&'a revboot_builder::Builder, Option<&'a Arc<Coordinated>>),
    /// The lease the previous program handed over (an upgrade in place), to keep.
    pub lease: Option<i64>,
}

/// Joins the cluster when `[cluster]` is set (else `None`: a single host) and starts the
/// node's tasks until `stop` turns true.
pub(crate) async fn join(
    config: &Config,
    node: Node<'_>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<Cluster>> {
    let Some(settings) = &config.cluster else {
        return Ok(None);
    };
    let Node {
        http,
        dns,
        store,
        token,
        placed,
        deployer,
        builder: (builder, coordinated),
        lease,
    } = node;
    let mut me = NodeInfo::new(&settings.node, &http, dns);
    me.pools = config
        .instances
        .pools
        .iter()
        .map(ToString::to_string)
        .collect();
    me.capacity = u64::try_from(config.instances.max_total).unwrap_or(u64::MAX);
    // The name server's addresses for the zone's NS set: where DNS listens, when that is an
    // address of its own (a wildcard listener names none).
    me.ns = (config.dns.listen.iter())
        .map(|listen| listen.ip())
        .filter(|ip| !ip.is_unspecified())
        .collect();
    me.ns.dedup();
    let cluster = Cluster::join_with(settings, &config.zone, me, lease, stop.clone())
        .await
        .context("Cannot join the cluster")?;
    store.set_authority(Arc::new(EtcdAuthority {
        cluster: cluster.clone(),
        handle: tokio::runtime::Handle::current(),
    }));
    if let Some(placed) = placed {
        crate::placed::joined(placed, &cluster, stop.clone());
        crate::placed::reconcile(deployer.clone(), placed, cluster.clone(), stop.clone());
    }
    if let Some(coordinated) = coordinated {
        coordinated.joined(&cluster);
    }
    tokio::spawn(replicate::keep_sources_in_step(
        cluster.clone(),
        (builder.clone(), deployer.clone()),
        store.clone(),
        token.to_owned(),
        stop.clone(),
    ));
    tokio::spawn(keep_in_step(
        cluster.clone(),
        store.clone(),
        token.to_owned(),
        settings.replicate_every_ms.map(Duration::from_millis),
        stop,
    ));
    Ok(Some(cluster))
}

/// Renews the node's lease once, right before an upgrade's `execve` (its lease is handed
/// over, [`Cluster::hand_over`]): the next program has a whole TTL to keep it.
pub(crate) async fn renew(cluster: Option<&Cluster>) {
    if let Some(cluster) = cluster
        && let Err(error) = cluster.renew().await
    {
        warn!(error, "cannot renew the lease before the upgrade's exec");
    }
}

/// `revboot nodes`.
pub(crate) fn nodes_view(cluster: Option<&Cluster>) -> Result<NodesView, ActionError> {
    let Some(cluster) = cluster else {
        return Ok(NodesView {
            node: None,
            connected: true,
            nodes: Vec::new(),
        });
    };
    let mut nodes: Vec<NodeView> = cluster
        .nodes()
        .into_iter()
        .map(|node| NodeView {
            id: node.id,
            http: node.http,
            dns: node.dns.to_string(),
            pools: node.pools,
            capacity: node.capacity,
            since_ms: node.since_ms,
        })
        .collect();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(NodesView {
        node: Some(cluster.me().id.clone()),
        connected: cluster.connected(),
        nodes,
    })
}

/// Live moves go through etcd first (rule 2).
#[derive(Debug)]
struct EtcdAuthority {
    cluster: Cluster,
    handle: tokio::runtime::Handle,
}

impl LiveAuthority for EtcdAuthority {
    fn propose(
        &self,
        service: &str,
        from: Option<&Revision>,
        to: &Revision,
        reason: &str,
    ) -> Result<(), String> {
        let from = from.map(Revision::to_hex);
        self.handle
            .block_on(
                self.cluster
                    .move_live(service, from.as_deref(), &to.to_hex(), reason),
            )
            .map_err(|error| error.to_string())
    }
}

/// Steps 3 to 5, until `stop` (step 6 runs beside it, [`replicate::keep_sources_in_step`]).
///
/// With `replicate_every` (`[cluster] replicate_every_ms`), step 4 runs only that often,
/// the first time one interval after the start; DNS fetches what it is asked for first.
async fn keep_in_step(
    cluster: Cluster,
    store: Store,
    token: String,
    replicate_every: Option<Duration>,
    mut stop: watch::Receiver<bool>,
) {
    let mut heads = cluster.heads_changed();
    let mut live = cluster.live_changed();
    let mut backoff = Backoff::default();
    let mut next_replication = replicate_every.map(|every| Instant::now() + every);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            _ = heads.changed() => {}
            _ = live.changed() => {}
            () = tokio::time::sleep(TICK) => {}
        }
        announce(&cluster, &store).await;
        let due = next_replication.is_none_or(|next| Instant::now() >= next);
        if due {
            replicate(&cluster, &store, &token, &mut backoff).await;
            next_replication = replicate_every.map(|every| Instant::now() + every);
        }
        mirror_live(&cluster, &store).await;
    }
}

/// Step 3.
async fn announce(cluster: &Cluster, store: &Store) {
    let announced = cluster.heads();
    for service in store.services().unwrap_or_default() {
        let Ok(Some(tip)) = store.tip(&service) else {
            continue;
        };
        // Deployments of an earlier service of the name, not yet deleted here, are not its.
        if crate::lifecycle::stale(cluster, store, &service).is_some() {
            continue;
        }
        let ahead = match announced.iter().find(|(name, _)| *name == service) {
            None => true,
            Some((_, head)) => {
                head.commit != tip.to_hex()
                    && head
                        .commit
                        .parse::<Revision>()
                        .is_ok_and(|theirs| store.has_deployment(&service, &theirs))
            }
        };
        if ahead {
            match cluster.announce_head(&service, &tip.to_hex()).await {
                Ok(()) => info!(service, tip = %tip, "announced a deployment to the cluster"),
                Err(error) => debug!(%error, service, "cannot announce a deployment"),
            }
        }
    }
}

/// Step 4, with the delays of [`crate::replicate`] after a failure.
async fn replicate(cluster: &Cluster, store: &Store, token: &str, backoff: &mut Backoff) {
    for (service, head) in cluster.heads() {
        if head.node == cluster.me().id || revboot_store::protocol::check_label(&service).is_err() {
            continue;
        }
        let key = format!("deploy/{service}");
        if !backoff.ready(&key) {
            continue;
        }
        match replicate::fetch_deployments(cluster, store, &service, token).await {
            Ok(_) => backoff.succeeded(&key),
            Err(error) => {
                let delay = backoff.failed(&key);
                warn!(
                    service,
                    error,
                    ?delay,
                    "cannot fetch deployments from a peer"
                );
            }
        }
    }
}

/// Step 5.
async fn mirror_live(cluster: &Cluster, store: &Store) {
    for (service, record, etcd_revision) in cluster.live_to_follow() {
        let Ok(revision) = record.revision.parse::<Revision>() else {
            continue;
        };
        if store.live(&service).ok().flatten() == Some(revision) {
            cluster.followed(&service, etcd_revision);
            continue;
        }
        if !store.has_deployment(&service, &revision) {
            continue;
        }
        let reason = format!("{} (node {})", record.reason, record.node);
        let (store, name, view) = (store.clone(), service.clone(), cluster.clone());
        let moved = tokio::task::spawn_blocking(move || {
            // Still to follow: this node has not moved it itself meanwhile.
            let still = view
                .live_to_follow()
                .iter()
                .any(|(s, _, r)| *s == name && *r == etcd_revision);
            still.then(|| store.mirror_live(&name, &revision, &reason))
        })
        .await;
        match moved {
            Ok(None) => {}
            Ok(Some(Ok(_))) => {
                cluster.followed(&service, etcd_revision);
                info!(service, revision = %revision, by = record.node, "live follows the cluster");
            }
            Ok(Some(Err(error))) => {
                warn!(%error, service, "cannot follow the cluster's live pointer")
            }
            Err(error) => warn!(%error, service, "cannot follow the cluster's live pointer"),
        }
    }
}

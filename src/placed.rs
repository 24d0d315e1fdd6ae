//! Placement in a cluster: which node runs an instance, as DNS sees it.
//!
//! [`Placed`] stands between the DNS server and the node's own instances (the same
//! [`Instances`] contract), once the node has joined a cluster:
//!
//! 1. An instance's key is `service/revision` (`service/revision/client-network` for a
//!    per-client instance); its owner is the live node whose claim names it (rule 6), else
//!    the live node that wins the rendezvous hash of that key
//!    (`revboot_cluster::placement`): the same on every node, so every node's DNS gives the
//!    same answer, and etcd stays off the query path.
//! 2. Owned here: summoned here, as a single host does.
//! 3. Owned by another node: that node is asked to summon it (`POST
//!    /api/v1/services/<service>/summon`, within [`ASK_TIMEOUT`]) and its answer — the
//!    instance's addresses in the owner's pool — is what this node answers too. The answer
//!    is kept for [`REMOTE_TTL`], then asked again (which also keeps the instance from
//!    being reaped while this node is queried). An owner that cannot be asked: SERVFAIL.
//! 4. A node cut off from etcd (its lease not renewed for a TTL) answers only for what it
//!    owns and SERVFAIL for the rest, so resolvers ask another name server rather than get a
//!    stale placement; the owners' answers it kept end within a second.
//! 5. Membership changes end every kept answer whose owner changed (its state turns
//!    stopped, which ends the DNS cache's entry), and move [`Instances::generation`].
//! 6. The node that runs an instance nobody claims claims it in etcd (`revboot_cluster`'s
//!    claims, under its lease), right after the summon here and on every round of
//!    [`reconcile`] (instances summoned through the API, booted before a membership change,
//!    or handed over by an upgrade); from then on every node answers from the claim, so a
//!    node joining or leaving does not move it. It releases the claim once the instance
//!    stopped (reaped idle); a node that dies takes its claims with its lease. The replicas
//!    of a warm service (`[run] min_instances` above 1) each claim a key of their own
//!    (`<key>#<replica>` past the first) but all run on the node of the first: the keeper
//!    boots them only next to it, and this rule keeps them where it stays.
//! 7. A label unknown here, of a service another node has announced deployments of that
//!    this node has not fetched yet, is fetched first: at most [`MAX_FETCHING`] services at
//!    once, one fetch per service, each within [`FETCH_FIRST_TIMEOUT`], and the label is
//!    resolved again. Until then, or when the fetch fails (logged), it is "not ready"
//!    (SERVFAIL), not NXDOMAIN: a resolver would cache the negative answer of a revision
//!    that exists. So an owner asked for a revision it has not replicated yet fetches it
//!    before it boots it, rather than refusing.
//! 8. An instance this node runs but that another node owns now (the other claimed it while
//!    this node was cut off, or won a race) is stopped when no connection is open to it
//!    ([`reconcile`]), so that two nodes do not keep running the same instance. This holds
//!    for per-client instances too: their key names the client's network
//!    (`[instances] client_prefixes`), as the deployer's does.
//!
//! Without a cluster (not joined, or a single host), every call goes to the node's own.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use revboot_cluster::{Cluster, NodeInfo};
use revboot_deployer::{
    Activity, ClientPrefixes, InstanceKey, InstanceState, Instances, ResolveError, Resolved,
    ServiceAddresses, SummonError, Summoned,
};
use revboot_store::Revision;
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

use crate::action::SummonView;

/// The longest a node waits for the owner of an instance to answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an owner's answer is kept.
pub const REMOTE_TTL: Duration = Duration::from_secs(5);
/// The most owners' answers kept.
const MAX_REMOTE: usize = 4096;
/// The most services whose deployments DNS fetches at once (rule 7).
pub const MAX_FETCHING: usize = 4;
/// The longest DNS waits for a fetch of deployments (rule 7); the fetch goes on after it.
pub const FETCH_FIRST_TIMEOUT: Duration = Duration::from_secs(10);

/// An owner's answer, kept.
struct Remote {
    owner: String,
    summoned: Summoned,
    state: watch::Sender<InstanceState>,
    at: Instant,
}

/// The node's instances, with placement over the cluster (see the module docs).
pub struct Placed {
    inner: Arc<dyn Instances>,
    store: revboot_store::Store,
    cluster: OnceLock<Cluster>,
    token: String,
    agent: ureq::Agent,
    remote: Mutex<HashMap<String, Remote>>,
    /// Moves when membership changes (rule 5).
    epoch: AtomicU64,
    /// The runtime the fetches of rule 7 run on, and the services being fetched.
    handle: OnceLock<tokio::runtime::Handle>,
    fetching: Arc<Mutex<std::collections::HashSet<String>>>,
    /// The client a per-client instance is for.
    clients: ClientPrefixes,
    /// Wakes [`reconcile`] to claim an instance just summoned here (rule 6).
    claim_now: Arc<Notify>,
    /// The zone's name servers: the live nodes ([`publish_nameservers`]).
    nameservers: revboot_dns::Nameservers,
}

impl std::fmt::Debug for Placed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placed")
            .field("joined", &self.cluster.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Placed {
    /// Placement once [`joined`]; the node's own `inner` until then. `token` is the
    /// cluster's (the nodes share it).
    /// `clients` is the deployer's `[instances] client_prefixes`.
    pub fn new(
        inner: Arc<dyn Instances>,
        store: revboot_store::Store,
        token: &str,
        clients: ClientPrefixes,
    ) -> Placed {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(ASK_TIMEOUT))
            .build()
            .new_agent();
        Placed {
            inner,
            store,
            cluster: OnceLock::new(),
            token: token.to_owned(),
            agent,
            remote: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            handle: OnceLock::new(),
            fetching: Arc::default(),
            clients,
            claim_now: Arc::new(Notify::new()),
            nameservers: revboot_dns::Nameservers::new(),
        }
    }

    /// The zone's name servers as this node publishes them: every live node's.
    pub fn nameservers(&self) -> &revboot_dns::Nameservers {
        &self.nameservers
    }

    /// Rule 1: the placement key of a summon, a per-client one by its client's network.
    fn key_of(&self, service: &str, revision: &Revision, client: Option<IpAddr>) -> String {
        let network = client.map(|client| self.clients.client_of(client).network());
        placement_key(service, revision, network)
    }

    /// Ends the kept answers whose owner changed or that are older than [`REMOTE_TTL`]
    /// (rule 5), and all of them while the node is cut off (rule 4); called on every
    /// membership change and every second.
    pub fn sweep(&self, membership_changed: bool) {
        let Some(cluster) = self.cluster.get() else {
            return;
        };
        if membership_changed {
            self.epoch.fetch_add(1, Ordering::Relaxed);
        }
        // Cut off, nothing is answered for another node (rule 4), kept answers included.
        let connected = cluster.connected();
        let mut remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        remote.retain(|key, entry| {
            let keep = connected
                && entry.at.elapsed() < REMOTE_TTL
                && cluster
                    .owner(key)
                    .is_some_and(|owner| owner.id == entry.owner);
            if !keep {
                entry.state.send_replace(InstanceState::Stopped);
            }
            keep
        });
    }

    /// Rule 3: asks `owner` to summon, and keeps its answer.
    fn ask(
        &self,
        owner: &NodeInfo,
        key: String,
        service: &str,
        revision: &Revision,
        client: Option<IpAddr>,
    ) -> Result<Summoned, SummonError> {
        let failed = |reason: String| SummonError::Start {
            key: format!("{service}@{}", revision.short(12)),
            reason: format!("its owner, node {}, {reason}", owner.id),
        };
        let url = format!("{}/api/v1/services/{service}/summon", owner.http);
        let body = serde_json::json!({ "label": revision.to_hex(), "client": client });
        let call = || {
            self.agent
                .post(&url)
                .header("authorization", &format!("Bearer {}", self.token))
                .send_json(&body)
        };
        // A DNS worker thread may block; a task on the runtime moves off it first.
        let response = if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(call)
        } else {
            call()
        };
        let mut response = response.map_err(|error| failed(format!("did not answer: {error}")))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .map_err(|error| failed(format!("answered unreadably: {error}")))?;
        if status != 200 {
            return Err(failed(format!("refused ({status}): {}", text.trim())));
        }
        let view: SummonView = serde_json::from_str(&text)
            .map_err(|error| failed(format!("answered unreadably: {error}")))?;
        let mut addresses: Option<ServiceAddresses> = None;
        for address in view.addresses.iter().chain([&view.address]) {
            if let Ok(ip) = address.parse::<IpAddr>() {
                addresses = Some(match addresses {
                    None => ServiceAddresses::one(ip),
                    Some(known) if known.iter().any(|a| a == ip) => known,
                    Some(known) => known.with(ip),
                });
            }
        }
        let addresses = addresses.ok_or_else(|| failed("answered no address".to_owned()))?;
        let first = addresses.iter().next().expect("one address at least");
        let (state, receiver) = watch::channel(InstanceState::Ready);
        let summoned = Summoned {
            key: InstanceKey {
                service: service.to_owned(),
                revision: *revision,
                client: client.map(|client| self.clients.client_of(client)),
                replica: 0,
            },
            addresses,
            port: view.port,
            backend: revboot_deployer::Backend::known(SocketAddr::new(first, view.port)),
            boot_timeout: ASK_TIMEOUT,
            reach: revboot_store::manifest::Reach::Address,
            state: receiver,
        };
        let mut remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        let entry = Remote {
            owner: owner.id.clone(),
            summoned: summoned.clone(),
            state,
            at: Instant::now(),
        };
        if (remote.len() < MAX_REMOTE || remote.contains_key(&key))
            && let Some(old) = remote.insert(key, entry)
        {
            old.state.send_replace(InstanceState::Stopped);
        }
        Ok(summoned)
    }
}

impl Placed {
    /// Rule 7: fetches `service`'s announced deployments, waiting at most
    /// [`FETCH_FIRST_TIMEOUT`].
    fn fetch_first(&self, cluster: &Cluster, service: &str) -> Result<(), String> {
        let handle = self.handle.get().ok_or("not joined yet")?;
        {
            let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
            if fetching.contains(service) {
                return Err("a fetch is under way".to_owned());
            }
            if fetching.len() >= MAX_FETCHING {
                return Err(format!("{MAX_FETCHING} other fetches are under way"));
            }
            fetching.insert(service.to_owned());
        }
        let (cluster, store, token) = (cluster.clone(), self.store.clone(), self.token.clone());
        let (name, fetching) = (service.to_owned(), self.fetching.clone());
        // The fetch runs to its end (bounded by its own timeout) even when DNS stops waiting.
        let task = handle.spawn(async move {
            let fetched =
                crate::replicate::fetch_deployments(&cluster, &store, &name, &token).await;
            fetching
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
            if let Err(error) = &fetched {
                warn!(
                    service = name,
                    error, "cannot fetch deployments asked for by DNS"
                );
            }
            fetched.map(|_| ())
        });
        let wait = async {
            match tokio::time::timeout(FETCH_FIRST_TIMEOUT, task).await {
                Ok(Ok(fetched)) => fetched,
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err(format!("not done within {FETCH_FIRST_TIMEOUT:?}")),
            }
        };
        // A DNS worker thread may block; a task on the runtime moves off it first.
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(|| handle.block_on(wait))
        } else {
            handle.block_on(wait)
        }
    }
}

/// Rule 1: `client` is the network of a per-client instance's client.
pub fn placement_key(service: &str, revision: &Revision, client: Option<IpAddr>) -> String {
    match client {
        Some(network) => format!("{service}/{}/{network}", revision.to_hex()),
        None => format!("{service}/{}", revision.to_hex()),
    }
}

impl Instances for Placed {
    fn resolve(&self, service: &str, label: Option<&str>) -> Result<Resolved, ResolveError> {
        let resolved = self.inner.resolve(service, label);
        let (
            Err(ResolveError::UnknownService(_) | ResolveError::UnknownLabel { .. }),
            Some(cluster),
        ) = (&resolved, self.cluster.get())
        else {
            return resolved;
        };
        // Rule 7.
        let behind = cluster.heads().into_iter().find(|(name, head)| {
            name == service
                && head.node != cluster.me().id
                && head
                    .commit
                    .parse::<Revision>()
                    .is_ok_and(|tip| !self.store.has_deployment(service, &tip))
        });
        let Some((_, head)) = behind else {
            return resolved;
        };
        match self.fetch_first(cluster, service) {
            Ok(()) => self.inner.resolve(service, label),
            Err(why) => Err(ResolveError::Building(format!(
                "deployments of `{service}` are being fetched from node {}: {why}; ask again shortly",
                head.node
            ))),
        }
    }

    fn summon(
        &self,
        service: &str,
        revision: &Revision,
        client: Option<IpAddr>,
    ) -> Result<Summoned, SummonError> {
        let Some(cluster) = self.cluster.get() else {
            return self.inner.summon(service, revision, client);
        };
        let key = self.key_of(service, revision, client);
        let owner = match cluster.owner(&key) {
            Some(owner) if owner.id != cluster.me().id => owner,
            // Owned here, or no membership known yet.
            _ => {
                let summoned = self.inner.summon(service, revision, client)?;
                if cluster.claim_of(&key).is_none() {
                    self.claim_now.notify_one();
                }
                return Ok(summoned);
            }
        };
        if !cluster.connected() {
            debug!(
                service,
                owner = owner.id,
                "cut off from etcd: not answering for another node"
            );
            return Err(SummonError::Start {
                key: format!("{service}@{}", revision.short(12)),
                reason: format!(
                    "this node is cut off from the cluster's etcd; node {} may own it: ask another name server",
                    owner.id
                ),
            });
        }
        {
            let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = remote.get(&key)
                && entry.owner == owner.id
                && entry.at.elapsed() < REMOTE_TTL
            {
                return Ok(entry.summoned.clone());
            }
        }
        self.ask(&owner, key, service, revision, client)
            .inspect_err(|error| warn!(%error, service, "cannot place an instance on its owner"))
    }

    fn by_address(&self, address: IpAddr) -> Option<Summoned> {
        self.inner.by_address(address)
    }

    fn activity(&self, key: &InstanceKey, activity: Activity) {
        self.inner.activity(key, activity);
    }

    fn generation(&self) -> u64 {
        self.inner
            .generation()
            .wrapping_add(self.epoch.load(Ordering::Relaxed) << 32)
    }
}

/// The API's instances on a node of a cluster: labels resolve as DNS resolves them (rule
/// 7: deployments announced but not here are fetched first), and instances are summoned
/// here (the API's summon is how another node asks this one, the owner, to boot).
#[derive(Debug)]
pub struct Resolving(pub Arc<Placed>);

impl Instances for Resolving {
    fn resolve(&self, service: &str, label: Option<&str>) -> Result<Resolved, ResolveError> {
        self.0.resolve(service, label)
    }

    fn summon(
        &self,
        service: &str,
        revision: &Revision,
        client: Option<IpAddr>,
    ) -> Result<Summoned, SummonError> {
        self.0.inner.summon(service, revision, client)
    }

    fn by_address(&self, address: IpAddr) -> Option<Summoned> {
        self.0.inner.by_address(address)
    }

    fn activity(&self, key: &InstanceKey, activity: Activity) {
        self.0.inner.activity(key, activity);
    }

    fn generation(&self) -> u64 {
        self.0.inner.generation()
    }
}

/// Places over `cluster` from now on, and runs [`Placed::sweep`] and
/// [`publish_nameservers`] on membership changes and every second, until `stop`.
pub fn joined(placed: &Arc<Placed>, cluster: &Cluster, mut stop: watch::Receiver<bool>) {
    let _ = placed.handle.set(tokio::runtime::Handle::current());
    let _ = placed.cluster.set(cluster.clone());
    let mut nodes = cluster.nodes_changed();
    let placed = placed.clone();
    publish_nameservers(&placed.nameservers, cluster);
    tokio::spawn(async move {
        loop {
            let changed = tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                _ = nodes.changed() => true,
                () = tokio::time::sleep(Duration::from_secs(1)) => false,
            };
            if changed && let Some(cluster) = placed.cluster.get() {
                publish_nameservers(&placed.nameservers, cluster);
            }
            placed.sweep(changed);
        }
    });
}

/// The zone's NS set from membership: `<id>.ns.<zone>` for every live node that registered
/// name-server addresses, by id, those addresses as glue. The DNS server answers it unless
/// `[dns] nameservers` names them by hand.
pub fn publish_nameservers(nameservers: &revboot_dns::Nameservers, cluster: &Cluster) {
    let mut nodes = cluster.nodes();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    let set: Vec<revboot_dns::Nameserver> = nodes
        .into_iter()
        .filter(|node| !node.ns.is_empty())
        .take(revboot_dns::MAX_NAMESERVERS)
        .map(|node| revboot_dns::Nameserver {
            name: format!("{}.ns.{}", node.id, cluster.zone()),
            addresses: node
                .ns
                .into_iter()
                .take(revboot_dns::MAX_ADDRESSES)
                .collect(),
        })
        .collect();
    if let Err(error) = nameservers.set(&set) {
        warn!(%error, "cannot publish the cluster's name servers");
    }
}

/// Rules 6 and 8, every second (and at once after a summon here) until `stop`, while the
/// node is connected to etcd.
pub fn reconcile(
    deployer: Arc<revboot_deployer::Deployer>,
    placed: &Placed,
    cluster: Cluster,
    mut stop: watch::Receiver<bool>,
) {
    let claim_now = placed.claim_now.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                () = claim_now.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if cluster.connected() {
                reconcile_once(&deployer, &cluster).await;
            }
        }
    });
}

/// One round of [`reconcile`].
async fn reconcile_once(deployer: &revboot_deployer::Deployer, cluster: &Cluster) {
    let me = cluster.me().id.clone();
    // Read before the instances: a claim seen here was written after its summon, so its
    // instance is listed below unless it has stopped.
    let held = cluster.my_claims();
    let mut running = std::collections::HashSet::new();
    // First replicas first: the others follow where they stay.
    let mut list = deployer.list();
    list.sort_by_key(|info| info.key.replica);
    for info in list {
        if info.state.is_final() {
            continue;
        }
        let network = info.key.client.map(|client| client.network());
        let first = placement_key(&info.key.service, &info.key.revision, network);
        // A replica other than the first claims a key of its own (`<key>#<replica>`), but
        // stays where the first is placed: all the replicas of a revision run on one node.
        let key = match info.key.replica {
            0 => first.clone(),
            replica => format!("{first}#{replica}"),
        };
        // An instance running here that nobody claims is claimed here, whatever the hash
        // says (it was booted before a membership change, or handed over by an upgrade):
        // the claim, not the hash, decides where a running instance stays.
        if cluster.claim_of(&key).is_none() {
            match cluster.claim(&key).await {
                Ok(revboot_cluster::Claimed::Mine) if info.key.replica == 0 => {
                    running.insert(key);
                    continue;
                }
                Ok(revboot_cluster::Claimed::Mine) => {}
                Ok(revboot_cluster::Claimed::Theirs(node)) => {
                    debug!(instance = %info.key, node, "another node claimed it first");
                }
                Ok(_) => {}
                Err(error) => debug!(%error, instance = %info.key, "cannot claim"),
            }
        }
        if info.key.replica > 0 && running.contains(&first) {
            running.insert(key);
            continue;
        }
        let Some(owner) = cluster.owner(&first) else {
            continue;
        };
        if owner.id == me {
            running.insert(key);
        } else if info.connections == 0 && deployer.stop(&info.key).is_ok() {
            tracing::info!(instance = %info.key, owner = owner.id, "stopped an instance another node owns now");
        }
    }
    for key in held {
        if !running.contains(&key)
            && let Err(error) = cluster.release(&key).await
        {
            debug!(%error, key, "cannot release a claim");
        }
    }
}

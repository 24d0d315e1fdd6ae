//! What a node of a cluster fetches from the others, with stock git, and how the builder
//! takes part (see [`crate::cluster`] for the whole).
//!
//! 1. Sources: etcd holds each branch and tag of each service and the node that took its
//!    push (`revboot_cluster::SourceRecord`). A ref here that differs from etcd's is fetched
//!    from that node's git (`/git/<service>.git`), into the same ref; a ref etcd notes as
//!    deleted by a push is deleted here (one that etcd records nowhere is left alone: a
//!    branch from before the node joined); a service etcd records
//!    that has no source repository here gets one first (with the hooks, so that it takes
//!    pushes). A source repository here that etcd does not record yet is recorded. A
//!    source tag names its deployment here as on the node that took its push, once both
//!    are here (the builder's tag rules), looked at again whenever either changed.
//! 2. Deployments: a service's announced tip that is not here is fetched from the node that
//!    announced it (`/git/-/deploy.git`), fast-forward only.
//! 3. A fetch that did not bring what etcd names yet (the peer moves its branch once the
//!    push's build is done) is tried again on the next round. A fetch that failed is tried
//!    again after a delay that doubles with each failure, from [`BACKOFF_BASE`] up to [`BACKOFF_CAP`], each drawn between half and all
//!    of it (jitter), so that the nodes do not ask a failing peer in step.
//! 4. Builds: [`Coordinated`] is the builder's [`Coordinator`]: a push moves its branch
//!    through etcd first, and a build runs under the service's build lock, after this node
//!    has fetched the service's announced deployments (step 2, at once); when the build
//!    ends, its tip is announced before the lock is released, so that the next holder
//!    builds on top of it. Right before the deployment is written the lock is checked in
//!    etcd (`revboot_cluster::Cluster::check_build_lock`): a node that stalled past the
//!    lock's TTL writes and announces nothing, its build is recorded interrupted, and it
//!    fetches the line the other node wrote meanwhile (step 2).
//!
//! 5. A round is cheap when nothing changed: a service's refs here are listed
//!    (`for-each-ref`) only when etcd's record of it changed since a round that left them
//!    as etcd has them (etcd's revision of the record says so, from the watch's mirror),
//!    and every service's at least every [`FULL_ROUND`].
//!
//! 6. Renames and deletes: a service another node renamed or deleted (etcd's `retired/`
//!    records, `revboot_cluster::RetiredRecord`) is renamed or deleted here as that node
//!    did (`lifecycle::follow`), at start, whenever a record changes, and again every
//!    `FOLLOW_AGAIN` (5 s) while one could not be applied (a build of it runs here). Until
//!    a rename is applied here, nothing of the new name is made or fetched here, and a push
//!    never creates a renamed or deleted service ([`Coordinated`]'s `may_create`).
//!
//! Every fetch runs within [`FETCH_TIMEOUT`]; the token goes in git's environment, never on
//! a command line or in a log.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use revboot_builder::Builder;
use revboot_builder::coordinate::{Coordinator, CoordinatorFuture, Held};
use revboot_cluster::{BuildLock, Cluster};
use revboot_store::{Revision, Store};
use tracing::{debug, info, warn};

/// How often the cluster's steps run when etcd reports nothing (see [`crate::cluster`]).
pub const TICK: Duration = Duration::from_secs(1);
/// The longest one fetch from a peer may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// The first delay after a failed fetch.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// The longest delay between two tries of a failing fetch.
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// The most fetches a node remembers failures of.
const MAX_BACKOFF: usize = 4096;
/// How long a build waits for another node's build of the same service.
const LOCK_PATIENCE: Duration = Duration::from_secs(600);
/// How long a build started before the node joined the cluster waits for it.
const JOIN_PATIENCE: Duration = Duration::from_secs(60);

/// Step 3: when each failing fetch may be tried again.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    failing: HashMap<String, (u32, Instant)>,
}

impl Backoff {
    /// Whether `key` may be tried now.
    pub(crate) fn ready(&self, key: &str) -> bool {
        self.failing
            .get(key)
            .is_none_or(|(_, next)| Instant::now() >= *next)
    }

    /// Notes a failure of `key`; returns the delay before its next try.
    pub(crate) fn failed(&mut self, key: &str) -> Duration {
        if self.failing.len() >= MAX_BACKOFF && !self.failing.contains_key(key) {
            // Full: the oldest-due entry goes (it would have been tried first anyway).
            if let Some(oldest) = (self.failing.iter())
                .min_by_key(|(_, (_, next))| *next)
                .map(|(key, _)| key.clone())
            {
                self.failing.remove(&oldest);
            }
        }
        let failures = self.failing.get(key).map_or(0, |(n, _)| *n) + 1;
        let delay = backoff_delay(failures, jitter());
        self.failing
            .insert(key.to_owned(), (failures, Instant::now() + delay));
        delay
    }

    /// Notes a success of `key`.
    pub(crate) fn succeeded(&mut self, key: &str) {
        self.failing.remove(key);
    }
}

/// The delay after `failures` failures in a row, `jitter` in [0, 1) picking it between half
/// and all of `BACKOFF_BASE * 2^(failures-1)`, capped at [`BACKOFF_CAP`].
fn backoff_delay(failures: u32, jitter: f64) -> Duration {
    let full = BACKOFF_BASE
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// A number in [0, 1) that differs between nodes and calls: the clock's nanoseconds are
/// enough to keep retries out of step (no randomness of quality is needed here).
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1_000_000) / 1_000_000.0
}

/// Fetches `refspecs` from `url` into the repository at `repo` with stock git, within
/// [`FETCH_TIMEOUT`], authenticated by the cluster's `token`.
pub(crate) async fn fetch(
    repo: &Path,
    url: &str,
    refspecs: &[String],
    token: &str,
) -> Result<(), String> {
    use base64::Engine as _;
    let header = format!(
        "Authorization: Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("git:{token}"))
    );
    // The token goes in git's environment, not its command line, which others can read.
    let mut command = tokio::process::Command::new("git");
    command
        .arg("-C")
        .arg(repo)
        .args(["fetch", "--quiet", "--no-tags", "--no-write-fetch-head"])
        .arg(url)
        .args(refspecs)
        .env("GIT_TERMINAL_PROMPT", "0")
        // Its messages are read (a branch the peer has not made yet): in English.
        .env("LC_ALL", "C")
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "http.extraHeader")
        .env("GIT_CONFIG_VALUE_0", header)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(FETCH_TIMEOUT, command.output())
        .await
        .map_err(|_| format!("git fetch took longer than {FETCH_TIMEOUT:?}"))?
        .map_err(|error| format!("cannot run git: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// Fetches `service`'s deployment branch from the node that announced its tip, when this
/// node does not have that tip (step 2). `Ok(false)`: nothing to fetch.
pub(crate) async fn fetch_deployments(
    cluster: &Cluster,
    store: &Store,
    service: &str,
    token: &str,
) -> Result<bool, String> {
    let me = cluster.me().id.clone();
    let Some((_, head)) = cluster
        .heads()
        .into_iter()
        .find(|(name, _)| name == service)
    else {
        return Ok(false);
    };
    let Ok(revision) = head.commit.parse::<Revision>() else {
        return Ok(false);
    };
    if head.node == me || store.has_deployment(service, &revision) {
        return Ok(false);
    }
    // A rename this node has not applied yet (step 6): its deployments come with it.
    let renamed_from = (cluster.sources().into_iter())
        .find_map(|(name, record, _)| (name == service).then_some(record.renamed_from))
        .flatten();
    if renamed_from.is_some_and(|old| store.tip(&old).ok().flatten().is_some()) {
        return Ok(false);
    }
    let Some(peer) = cluster.nodes().into_iter().find(|n| n.id == head.node) else {
        return Err(format!(
            "node {} announced its deployments but is gone",
            head.node
        ));
    };
    let refspec = format!("refs/heads/{service}:refs/heads/{service}");
    let url = format!("{}/git/-/deploy.git", peer.http);
    fetch(store.path(), &url, &[refspec], token)
        .await
        .map_err(|error| format!("from node {}: {error}", peer.id))?;
    info!(service, from = peer.id, revision = %revision, "fetched deployments from a peer");
    Ok(true)
}

/// The branches and tags of a source repository (`refs/heads/…`, `refs/tags/…` → the
/// object they name).
async fn branches(repo: &Path) -> BTreeMap<String, String> {
    let output = tokio::time::timeout(
        FETCH_TIMEOUT,
        tokio::process::Command::new("git")
            .arg("-C")
            .arg(repo)
            .args([
                "for-each-ref",
                "--format=%(refname) %(objectname)",
                "refs/heads/",
                "refs/tags/",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let Ok(Ok(output)) = output else {
        return BTreeMap::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (name, commit) = line.split_once(' ')?;
            Some((name.to_owned(), commit.to_owned()))
        })
        .collect()
}

/// Step 1 on every change of etcd's source records and every [`TICK`]
/// besides, until `stop`; apart from the deployments' steps, so that a slow fetch of
/// sources never holds up a deployment's.
pub(crate) async fn keep_sources_in_step(
    cluster: Cluster,
    (builder, deployer): (Builder, Arc<revboot_deployer::Deployer>),
    store: Store,
    token: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let parts = crate::lifecycle::Parts {
        store: &store,
        builder: &builder,
        deployer: &deployer,
        zone: cluster.zone(),
        cluster: None,
    };
    let mut retired = cluster.retired_changed();
    // Step 6 first, at once: a node that was down renames and deletes what it missed.
    let mut unapplied = crate::lifecycle::follow(&parts, &cluster).await;
    let mut follow_again = Instant::now() + FOLLOW_AGAIN;
    let mut sources = cluster.sources_changed();
    // A build ends with its deployment announced, and its branch moves on its node then.
    let mut heads = cluster.heads_changed();
    let mut rounds = Rounds::default();
    let mut pending = false;
    loop {
        let wait = if pending { PENDING_POLL } else { TICK };
        let mut follow = false;
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            _ = sources.changed() => {}
            _ = heads.changed() => {}
            _ = retired.changed() => follow = true,
            () = tokio::time::sleep(wait) => {}
        }
        // Step 6 when a record changed, and again a while after one could not be applied.
        if follow || (unapplied > 0 && Instant::now() >= follow_again) {
            unapplied = crate::lifecycle::follow(&parts, &cluster).await;
            follow_again = Instant::now() + FOLLOW_AGAIN;
        }
        if rounds.since_full.elapsed() >= FULL_ROUND {
            rounds.in_step.clear();
            rounds.since_full = Instant::now();
        }
        let changed;
        (pending, changed) = replicate_sources(&cluster, &builder, &token, &mut rounds).await;
        name_tags(&builder, &store, &changed, &mut rounds.tips).await;
    }
}

/// How soon a rename or delete that could not be applied here is tried again (step 6).
const FOLLOW_AGAIN: Duration = Duration::from_secs(5);

/// How soon a branch that its node has not moved yet (its build runs) is asked for again.
const PENDING_POLL: Duration = Duration::from_millis(200);

/// How often step 1 looks at every service's refs even though etcd's record did not change
/// (a ref changed here by hand).
pub const FULL_ROUND: Duration = Duration::from_secs(60);

/// What step 1 remembers between rounds.
#[derive(Debug)]
struct Rounds {
    /// Step 3's delays.
    backoff: Backoff,
    /// By service: etcd's revision of its source record when a round left the service's
    /// refs here as etcd has them. Until the record changes, the service is not looked at
    /// again (no `for-each-ref`), except at each [`FULL_ROUND`].
    in_step: HashMap<String, i64>,
    since_full: Instant,
    /// By service: its deployment tip when its source tags last named deployments.
    tips: HashMap<String, Option<Revision>>,
}

impl Default for Rounds {
    fn default() -> Self {
        Rounds {
            backoff: Backoff::default(),
            in_step: HashMap::new(),
            since_full: Instant::now(),
            tips: HashMap::new(),
        }
    }
}

/// Step 1's tags: a service's source tags name their deployments (the builder's `tags`
/// rules) on this node too, once both are here: looked at when a round `changed` its refs
/// here or its deployment tip moved.
async fn name_tags(
    builder: &Builder,
    store: &Store,
    changed: &[String],
    tips: &mut HashMap<String, Option<Revision>>,
) {
    let services = builder.services().unwrap_or_default();
    tips.retain(|service, _| services.contains(service));
    for service in services {
        let tip = store.tip(&service).ok().flatten();
        if tips.get(&service) != Some(&tip) || changed.contains(&service) {
            builder.name_tagged_deployments(&service).await;
            tips.insert(service, tip);
        }
    }
}

/// Step 1 (with step 3's delays): whether a peer's ref is not where etcd has it yet, and
/// the services whose refs changed here.
async fn replicate_sources(
    cluster: &Cluster,
    builder: &Builder,
    token: &str,
    rounds: &mut Rounds,
) -> (bool, Vec<String>) {
    let mut pending = false;
    let mut changed = Vec::new();
    let me = cluster.me().id.clone();
    let recorded = cluster.sources();
    for service in builder.services().unwrap_or_default() {
        if !recorded.iter().any(|(name, _, _)| *name == service)
            && let Err(error) = cluster.add_source(&service).await
        {
            debug!(error, service, "cannot record a service in the cluster");
        }
    }
    rounds
        .in_step
        .retain(|service, _| recorded.iter().any(|(name, _, _)| name == service));
    for (service, record, revision) in recorded {
        if rounds.in_step.get(&service) == Some(&revision) {
            continue;
        }
        let Ok(repo) = builder.source_repo(&service) else {
            continue;
        };
        if !repo.join("HEAD").is_file() {
            if renaming_here(&record, builder) {
                continue;
            }
            match builder.add_service(&service).await {
                Ok(_) => info!(
                    service,
                    "made the source repository of a service added on another node"
                ),
                Err(error) => {
                    warn!(%error, service, "cannot make the source repository of a service");
                    continue;
                }
            }
        }
        let here = branches(&repo).await;
        let (deleted, mut settled) = delete_refs(&me, &service, &repo, &record, &here).await;
        if deleted {
            changed.push(service.clone());
        }
        let mut by_node: BTreeMap<&str, Vec<(&String, &String)>> = BTreeMap::new();
        for (refname, branch) in &record.refs {
            if branch.node != me
                && (refname.starts_with("refs/heads/") || refname.starts_with("refs/tags/"))
                && here.get(refname) != Some(&branch.commit)
            {
                by_node
                    .entry(&branch.node)
                    .or_default()
                    .push((refname, &branch.commit));
            }
        }
        for (node, wanted) in by_node {
            let key = format!("src/{service}/{node}");
            let peer = cluster.nodes().into_iter().find(|n| n.id == node);
            let Some(peer) = peer.filter(|_| rounds.backoff.ready(&key)) else {
                settled = false;
                continue;
            };
            let refspecs: Vec<String> = wanted
                .iter()
                .map(|(refname, _)| format!("+{refname}:{refname}"))
                .collect();
            let url = format!("{}/git/{service}.git", peer.http);
            let fetched = fetch(&repo, &url, &refspecs, token).await;
            let now = branches(&repo).await;
            let complete = wanted
                .iter()
                .all(|(refname, commit)| now.get(*refname) == Some(*commit));
            if now != here && !changed.contains(&service) {
                changed.push(service.clone());
            }
            // A branch the peer has not made yet (its first build runs) is not a failure.
            let fetched = match fetched {
                Err(error) if error.contains("couldn't find remote ref") => Ok(()),
                other => other,
            };
            match fetched {
                Ok(()) if complete => {
                    rounds.backoff.succeeded(&key);
                    info!(service, from = node, "fetched sources from a peer");
                }
                // The peer moves its branch once the push's build is done: not a failure,
                // asked again on the next round.
                Ok(()) => {
                    pending = true;
                    settled = false;
                    debug!(
                        service,
                        from = node,
                        "a peer's branch is not where etcd has it yet"
                    );
                }
                Err(error) => {
                    settled = false;
                    let delay = rounds.backoff.failed(&key);
                    warn!(
                        service,
                        from = node,
                        error,
                        ?delay,
                        "cannot fetch sources from a peer"
                    );
                }
            }
        }
        if settled {
            rounds.in_step.insert(service, revision);
        } else {
            rounds.in_step.remove(&service);
        }
    }
    (pending, changed)
}

/// Whether `record` is of a service renamed in the cluster that this node still has under
/// its old name (step 6 renames it here: nothing of the new name is made meanwhile).
fn renaming_here(record: &revboot_cluster::SourceRecord, builder: &Builder) -> bool {
    record
        .renamed_from
        .as_deref()
        .is_some_and(|old| builder.has_source(old))
}

/// Deletes the refs of `repo` (whose refs are `here`) that a push deleted on a node of the
/// cluster (step 1): those etcd notes as deleted and records nowhere else. Whether it
/// deleted any, and whether every deletion it tried was made.
async fn delete_refs(
    me: &str,
    service: &str,
    repo: &Path,
    record: &revboot_cluster::SourceRecord,
    here: &BTreeMap<String, String>,
) -> (bool, bool) {
    let (mut deleted, mut done) = (false, true);
    for (refname, gone) in &record.deleted {
        // A deletion this node took is the hook's to make (after etcd agreed).
        if gone.node == me || record.refs.contains_key(refname) || !here.contains_key(refname) {
            continue;
        }
        // Deleted only from where it is now, so that a push taken here meanwhile stays.
        let output = tokio::time::timeout(
            FETCH_TIMEOUT,
            tokio::process::Command::new("git")
                .arg("-C")
                .arg(repo)
                .args(["update-ref", "-d", refname, &here[refname]])
                .kill_on_drop(true)
                .output(),
        )
        .await;
        match output {
            Ok(Ok(output)) if output.status.success() => {
                deleted = true;
                info!(
                    service,
                    refname,
                    by = gone.node,
                    "deleted a ref a push deleted on a peer"
                );
                continue;
            }
            Ok(Ok(output)) => warn!(
                service,
                refname,
                error = %String::from_utf8_lossy(&output.stderr).trim(),
                "cannot delete a ref a push deleted on a peer"
            ),
            Ok(Err(error)) => warn!(%error, service, refname, "cannot run git"),
            Err(_) => warn!(service, refname, "git update-ref took too long"),
        }
        done = false;
    }
    (deleted, done)
}

/// The builder's part in the cluster (step 4); set once the node has joined.
#[derive(Debug)]
pub struct Coordinated {
    cluster: OnceLock<Cluster>,
    store: Store,
    token: String,
}

impl Coordinated {
    /// A coordinator for `store`, with the cluster's `token`, when `[cluster]` is set.
    pub fn new(config: &crate::config::Config, store: &Store, token: &str) -> Option<Arc<Self>> {
        config.cluster.as_ref().map(|_| {
            Arc::new(Coordinated {
                cluster: OnceLock::new(),
                store: store.clone(),
                token: token.to_owned(),
            })
        })
    }

    /// The node joined `cluster`.
    pub(crate) fn joined(&self, cluster: &Cluster) {
        let _ = self.cluster.set(cluster.clone());
    }

    /// The cluster, once joined (waiting at most [`JOIN_PATIENCE`]).
    async fn cluster(&self) -> Result<&Cluster, String> {
        let deadline = Instant::now() + JOIN_PATIENCE;
        loop {
            if let Some(cluster) = self.cluster.get() {
                return Ok(cluster);
            }
            if Instant::now() >= deadline {
                return Err("this node has not joined the cluster".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A build lock held: on drop, the service's tip is announced (unless the lock was found
/// lost: another node announces now), then the lock released.
struct Locked {
    lock: Option<BuildLock>,
    cluster: Cluster,
    store: Store,
    service: String,
    /// [`Coordinator::check_lock`] found it was not this node's any more.
    lost: std::sync::atomic::AtomicBool,
}

impl Drop for Locked {
    fn drop(&mut self) {
        let (lock, cluster, store) = (self.lock.take(), self.cluster.clone(), self.store.clone());
        let service = std::mem::take(&mut self.service);
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.lost.load(std::sync::atomic::Ordering::Relaxed) {
            drop(lock);
            return;
        }
        handle.spawn(async move {
            let tip = store.tip(&service).ok().flatten();
            let announced = cluster
                .heads()
                .into_iter()
                .find(|(name, _)| *name == service)
                .map(|(_, head)| head.commit);
            if let Some(tip) = tip
                && announced.as_deref() != Some(tip.to_hex().as_str())
                && let Err(error) = cluster.announce_head(&service, &tip.to_hex()).await
            {
                warn!(error, service, "cannot announce a build to the cluster");
            }
            drop(lock);
        });
    }
}

impl Coordinator for Coordinated {
    fn move_ref<'a>(
        &'a self,
        service: &'a str,
        refname: &'a str,
        old: &'a str,
        new: &'a str,
    ) -> CoordinatorFuture<'a, ()> {
        Box::pin(async move {
            let cluster = self.cluster().await?;
            cluster
                .move_ref(service, refname, old, new)
                .await
                .map_err(|error| error.to_string())
        })
    }

    fn lock_builds<'a>(&'a self, service: &'a str) -> CoordinatorFuture<'a, Held> {
        Box::pin(async move {
            let cluster = self.cluster().await?;
            let lock = cluster.lock_builds(service, LOCK_PATIENCE).await?;
            // The lock's last holder announced its tip before releasing it.
            fetch_deployments(cluster, &self.store, service, &self.token)
                .await
                .map_err(|error| {
                    format!("cannot fetch the deployments of `{service}` first: {error}")
                })?;
            Ok(Box::new(Locked {
                lock: Some(lock),
                cluster: cluster.clone(),
                store: self.store.clone(),
                service: service.to_owned(),
                lost: std::sync::atomic::AtomicBool::new(false),
            }) as Held)
        })
    }

    fn may_create<'a>(&'a self, service: &'a str) -> CoordinatorFuture<'a, ()> {
        Box::pin(async move {
            let cluster = self.cluster().await?;
            let Some(record) = cluster.retired_record(service) else {
                return Ok(());
            };
            let add =
                format!("create a new `{service}` on purpose with `revboot service add {service}`");
            Err(match record.renamed_to {
                Some(to) => format!(
                    "Service `{service}` was renamed to `{to}` (by node {}): use /git/{to}.git (git remote set-url <remote> <daemon>/git/{to}.git), or {add}",
                    record.node
                ),
                None => format!(
                    "Service `{service}` was deleted (by node {}): {add}",
                    record.node
                ),
            })
        })
    }

    fn check_lock<'a>(&'a self, service: &'a str, held: &'a Held) -> CoordinatorFuture<'a, ()> {
        Box::pin(async move {
            let Some(locked) = held.downcast_ref::<Locked>() else {
                return Err(format!("not a build lock of `{service}` this node took"));
            };
            let (Some(lock), Some(cluster)) = (&locked.lock, self.cluster.get()) else {
                return Err(format!("the build lock of `{service}` is released"));
            };
            let checked = cluster.check_build_lock(lock).await;
            if checked.is_err() {
                locked
                    .lost
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            checked
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_fetch_waits_twice_as_long_each_time_up_to_the_cap() {
        assert_eq!(
            backoff_delay(1, 0.999_999),
            BACKOFF_BASE.mul_f64(0.999_999_5)
        );
        assert_eq!(backoff_delay(1, 0.0), BACKOFF_BASE / 2);
        assert_eq!(backoff_delay(3, 0.0), BACKOFF_BASE * 2);
        assert_eq!(backoff_delay(30, 0.0), BACKOFF_CAP / 2);
        assert!(backoff_delay(30, 0.999) <= BACKOFF_CAP);
        let mut backoff = Backoff::default();
        assert!(backoff.ready("a"));
        let first = backoff.failed("a");
        assert!(first <= BACKOFF_BASE);
        let second = backoff.failed("a");
        assert!(second >= BACKOFF_BASE && second <= BACKOFF_BASE * 2);
        backoff.succeeded("a");
        assert!(backoff.ready("a"));
    }
}

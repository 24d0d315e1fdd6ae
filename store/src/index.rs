//! The in-memory index of deployments and labels, and how it stays true to the repository.
//!
//! 1. A snapshot lists the refs under `refs/heads/`, `refs/live/` and `refs/tags/`, walks each
//!    service branch by first parent and parses each commit once (commits never change, so
//!    parsed commits are kept across snapshots).
//! 2. With it the store keeps a fingerprint: inode, size and mtime of `packed-refs` and of the
//!    ref directories. Creating, moving or deleting a loose ref — by the store, another process
//!    or stock git — renames a file in its directory and so changes that directory's mtime.
//! 3. Each call compares the fingerprint (a handful of `stat`s). Equal and settled: the
//!    snapshot is used. Otherwise the refs are listed again; when they differ a new snapshot is
//!    built and the generation goes up.
//! 4. A fingerprint is settled once every mtime in it is older than the snapshot by
//!    [`SETTLE`]: file systems stamp mtimes with a coarse clock, so a change made in the same
//!    tick as the snapshot could otherwise hide behind an unchanged mtime ("racy git").
//! 5. Where inotify is available it replaces steps 2–4: before listing refs the index
//!    watches the repository root (for `packed-refs`) and every ref directory; the kernel
//!    queues an event during the rename that moves a ref, so one non-blocking read on each
//!    call tells whether anything moved. A full event queue counts as a change.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gix::ObjectId;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::protocol::{self, Trailers};
use crate::types::{BuildStatus, Deployment};
use crate::{ReadError, ResolveError, Revision};

/// How much older than the snapshot every mtime must be for the fingerprint to be trusted.
pub const SETTLE: Duration = Duration::from_millis(500);
/// The most commits followed on one service branch.
pub const MAX_HISTORY: usize = 100_000;
/// The most candidates listed in an ambiguity error.
const MAX_CANDIDATES: usize = 10;

/// One parsed commit.
#[derive(Debug)]
pub struct Meta {
    pub id: ObjectId,
    pub parent: Option<ObjectId>,
    pub time: i64,
    pub tree: ObjectId,
    /// The subject and trailers, or why the commit does not follow the protocol.
    pub info: Result<(String, Trailers), String>,
}

/// The deployments and labels of one service.
#[derive(Debug, Default)]
pub struct ServiceIndex {
    pub live: Option<ObjectId>,
    /// Deployment commits, newest first.
    pub history: Vec<Arc<Meta>>,
    /// DNS-safe tag label → (tag name, the commit it peels to).
    pub tags: BTreeMap<String, Vec<(String, ObjectId)>>,
    /// Full hex of each deployment, sorted.
    hexes: Vec<(String, ObjectId)>,
    /// Lowercase source commit hex → the deployment it names, sorted.
    sources: Vec<(String, ObjectId)>,
    /// DNS-safe branch label → (source ref, the deployment it names).
    branches: HashMap<String, Vec<(String, ObjectId)>>,
    positions: HashMap<ObjectId, usize>,
}

/// Everything the index knows at one point in time.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub refs: BTreeMap<String, ObjectId>,
    pub services: BTreeMap<String, ServiceIndex>,
}

type Stamp = Option<(u64, u64, i64, i64)>;

/// The ref namespaces under `refs/` the index lists; nothing else it holds comes from refs.
const LISTED: [&str; 3] = ["heads", "live", "tags"];

/// The ref files every service depends on, first; then those only listings depend on.
/// Runtime logs (`refs/revboot/logs/*`) are not among them: nothing the index holds comes
/// from them, and every stopped instance moves one.
const GLOBAL: [&str; 5] = [
    "packed-refs",
    "refs/heads",
    "refs/live",
    "refs/tags",
    "refs",
];
/// How many of [`GLOBAL`] a single service's answers depend on (with its tag directory).
const PER_SERVICE: usize = 3;

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

fn stamp_settled(stamp: &Stamp, limit: Duration) -> bool {
    match stamp {
        None => true,
        Some((_, _, secs, nanos)) => {
            Duration::new((*secs).max(0) as u64, (*nanos).clamp(0, 999_999_999) as u32) < limit
        }
    }
}

/// Paths and stamps of the ref files, as of the last refresh.
#[derive(Debug, Default)]
struct Fingerprint {
    global: Vec<(PathBuf, Stamp)>,
    tags: HashMap<String, (PathBuf, Stamp)>,
}

impl Fingerprint {
    fn take(repo: &Path, services: &[String]) -> Fingerprint {
        let global = GLOBAL
            .iter()
            .map(|p| {
                let path = repo.join(p);
                let stamp = stamp(&path);
                (path, stamp)
            })
            .collect();
        let mut fingerprint = Fingerprint {
            global,
            tags: HashMap::new(),
        };
        fingerprint.add_services(repo, services);
        fingerprint
    }

    fn add_services(&mut self, repo: &Path, services: &[String]) {
        for service in services {
            if !self.tags.contains_key(service) {
                let path = repo.join("refs/tags").join(service);
                let stamp = stamp(&path);
                self.tags.insert(service.clone(), (path, stamp));
            }
        }
    }

    /// Whether nothing `service` depends on (everything, for `None`) changed.
    fn unchanged(&self, service: Option<&str>) -> bool {
        let same = |(path, old): &(PathBuf, Stamp)| stamp(path) == *old;
        match service {
            Some(service) => {
                self.global[..PER_SERVICE].iter().all(same)
                    && self.tags.get(service).is_none_or(same)
            }
            None => self.global.iter().all(same) && self.tags.values().all(same),
        }
    }

    fn settled(&self, taken_at: SystemTime) -> bool {
        let Ok(since_epoch) = taken_at.duration_since(SystemTime::UNIX_EPOCH) else {
            return false;
        };
        let limit = since_epoch.saturating_sub(SETTLE);
        self.global
            .iter()
            .chain(self.tags.values())
            .all(|(_, stamp)| stamp_settled(stamp, limit))
    }
}

/// Ref-change notifications through inotify.
#[derive(Debug)]
pub struct Watcher {
    inotify: Inotify,
    root: PathBuf,
    root_watch: Option<WatchDescriptor>,
    refs_watch: Option<WatchDescriptor>,
}

const WATCH_MASK: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MODIFY)
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

impl Watcher {
    /// An inotify instance for the repository, or `None` where there is none to be had
    /// (the stat fingerprint is used then).
    pub fn new(repo: &Path) -> Option<Watcher> {
        match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(inotify) => Some(Watcher {
                inotify,
                root: repo.to_owned(),
                root_watch: None,
                refs_watch: None,
            }),
            Err(error) => {
                tracing::info!(%error, "no inotify; the index falls back to stat fingerprints");
                None
            }
        }
    }

    /// Whether events are queued (or the check failed: the caller then reads and sees).
    fn pending(&self) -> bool {
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
    }

    /// Watches the root and every ref directory that exists now.
    fn watch_all(&mut self) {
        let add = |path: &Path| self.inotify.add_watch(path, WATCH_MASK).ok();
        self.root_watch = add(&self.root);
        self.refs_watch = add(&self.root.join("refs"));
        for dir in LISTED {
            add(&self.root.join("refs").join(dir));
        }
        if let Ok(entries) = std::fs::read_dir(self.root.join("refs/tags")) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    add(&entry.path());
                }
            }
        }
    }

    /// Reads all queued events; whether any of them may have moved a ref.
    ///
    /// Every resolve asks, so the usual answer (nothing queued) costs one `poll`, not a
    /// read into a zeroed event buffer.
    fn changed(&self) -> bool {
        if !self.pending() {
            return false;
        }
        let mut changed = false;
        loop {
            match self.inotify.read_events() {
                Ok(events) if events.is_empty() => return changed,
                Ok(events) => {
                    changed |= events.iter().any(|event| {
                        let named = |names: &[&str]| {
                            event
                                .name
                                .as_deref()
                                .is_some_and(|n| names.iter().any(|name| n == *name))
                        };
                        // In the root and in `refs/`, only what holds the refs the index
                        // lists (`refs/revboot/logs` moves with every stopped instance).
                        event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                            || if Some(event.wd) == self.root_watch {
                                named(&["packed-refs", "refs"])
                            } else if Some(event.wd) == self.refs_watch {
                                named(&LISTED)
                            } else {
                                true
                            }
                    });
                }
                Err(nix::errno::Errno::EAGAIN) => return changed,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(error) => {
                    tracing::warn!(%error, "reading inotify events failed; refreshing");
                    return true;
                }
            }
        }
    }
}

/// The index behind one store: the current snapshot and the parsed-commit cache.
#[derive(Debug, Default)]
pub struct IndexState {
    snapshot: Arc<Snapshot>,
    fingerprint: Option<Fingerprint>,
    settled: bool,
    metas: HashMap<ObjectId, Arc<Meta>>,
    watcher: Option<Watcher>,
    /// Events were seen that no successful refresh has covered yet.
    dirty: bool,
    /// Refreshes so far (each lists the refs).
    refreshes: u64,
}

impl IndexState {
    /// The current snapshot, refreshed if anything `service` depends on (everything, for
    /// `None`) changed.
    pub fn snapshot(
        &mut self,
        repo_path: &Path,
        repo: &gix::ThreadSafeRepository,
        service: Option<&str>,
    ) -> Result<Arc<Snapshot>, ReadError> {
        if let Some(watcher) = &self.watcher {
            self.dirty |= watcher.changed();
            if !self.dirty && self.fingerprint.is_some() {
                return Ok(self.snapshot.clone());
            }
        } else if self.settled
            && let Some(fingerprint) = &self.fingerprint
            && fingerprint.unchanged(service)
        {
            return Ok(self.snapshot.clone());
        }
        self.refresh(repo_path, repo)?;
        Ok(self.snapshot.clone())
    }

    /// Lists the refs again (always after the store itself changed one).
    pub fn refresh(
        &mut self,
        repo_path: &Path,
        repo: &gix::ThreadSafeRepository,
    ) -> Result<(), ReadError> {
        // Watches and stamps first, refs second: a change after them shows up in the next
        // check.
        if let Some(watcher) = &mut self.watcher {
            watcher.watch_all();
            watcher.changed();
        }
        self.refreshes += 1;
        let taken_at = SystemTime::now();
        let known: Vec<String> = self.snapshot.services.keys().cloned().collect();
        let mut fingerprint = Fingerprint::take(repo_path, &known);
        let repo = repo.to_thread_local();
        let refs = list_refs(&repo)?;
        fingerprint.add_services(repo_path, &service_names(&refs));
        if refs != self.snapshot.refs || self.fingerprint.is_none() {
            let snapshot = build(&repo, refs, &mut self.metas, self.snapshot.generation + 1)?;
            self.snapshot = Arc::new(snapshot);
        }
        self.settled = fingerprint.settled(taken_at);
        self.fingerprint = Some(fingerprint);
        self.dirty = false;
        Ok(())
    }

    /// How many times the refs were listed.
    #[cfg(test)]
    pub fn refreshes(&self) -> u64 {
        self.refreshes
    }

    /// An index that learns of changes through `watcher` (or stat fingerprints without one).
    pub fn with_watcher(watcher: Option<Watcher>) -> IndexState {
        IndexState {
            watcher,
            ..IndexState::default()
        }
    }
}

fn list_refs(repo: &gix::Repository) -> Result<BTreeMap<String, ObjectId>, ReadError> {
    let git = |action| move |source| ReadError::Git { action, source };
    let mut refs = BTreeMap::new();
    let platform = repo.references().map_err(git("list refs"))?;
    for namespace in LISTED {
        let prefix = format!("refs/{namespace}/");
        let iter = platform
            .prefixed(prefix.as_str())
            .map_err(git("list refs"))?;
        for reference in iter {
            let mut reference = match reference {
                Ok(r) => r,
                Err(error) => {
                    tracing::warn!(%error, "skipping unreadable ref");
                    continue;
                }
            };
            let name = reference.name().as_bstr().to_string();
            match reference.peel_to_id() {
                Ok(id) => {
                    refs.insert(name, id.detach());
                }
                Err(error) => {
                    tracing::warn!(%error, reference = name, "skipping ref that does not peel")
                }
            }
        }
    }
    Ok(refs)
}

fn service_names(refs: &BTreeMap<String, ObjectId>) -> Vec<String> {
    refs.keys()
        .filter_map(|name| name.strip_prefix("refs/heads/"))
        .filter(|name| protocol::check_label(name).is_ok())
        .map(str::to_owned)
        .collect()
}

/// Reads and parses one commit.
pub fn read_meta(repo: &gix::Repository, id: ObjectId) -> Result<Meta, ReadError> {
    let revision = Revision::new(id);
    let object = repo
        .find_object(id)
        .map_err(|_| ReadError::UnknownRevision(revision))?;
    if object.kind != gix::objs::Kind::Commit {
        return Err(ReadError::Malformed {
            revision,
            reason: format!("is a {}, not a commit", object.kind),
        });
    }
    let commit =
        gix::objs::CommitRef::from_bytes(&object.data, gix::hash::Kind::Sha1).map_err(|error| {
            ReadError::Malformed {
                revision,
                reason: error.to_string(),
            }
        })?;
    let time = commit.time().map(|t| t.seconds).unwrap_or(0);
    let info = std::str::from_utf8(commit.message)
        .map_err(|_| "message is not UTF-8".to_owned())
        .and_then(protocol::parse_message);
    Ok(Meta {
        id,
        parent: commit.parents().next(),
        time,
        tree: commit.tree(),
        info,
    })
}

fn build(
    repo: &gix::Repository,
    refs: BTreeMap<String, ObjectId>,
    metas: &mut HashMap<ObjectId, Arc<Meta>>,
    generation: u64,
) -> Result<Snapshot, ReadError> {
    let mut services = BTreeMap::new();
    for name in service_names(&refs) {
        let tip = refs[&format!("refs/heads/{name}")];
        let mut index = ServiceIndex {
            live: refs.get(&format!("refs/live/{name}")).copied(),
            ..ServiceIndex::default()
        };
        let mut next = Some(tip);
        while let Some(id) = next {
            if index.history.len() >= MAX_HISTORY {
                tracing::warn!(
                    service = name,
                    limit = MAX_HISTORY,
                    "history longer than the index holds; older builds are not indexed"
                );
                break;
            }
            let meta = match metas.get(&id) {
                Some(meta) => meta.clone(),
                None => match read_meta(repo, id) {
                    Ok(meta) => {
                        if let Err(reason) = &meta.info {
                            tracing::warn!(service = name, commit = %id, reason, "commit on service branch is not a deployment; skipped");
                        }
                        let meta = Arc::new(meta);
                        metas.insert(id, meta.clone());
                        meta
                    }
                    Err(error) => {
                        // A shallow or damaged history: index what is there.
                        tracing::warn!(service = name, commit = %id, %error, "history ends at an unreadable commit");
                        break;
                    }
                },
            };
            next = meta.parent;
            if meta.info.is_ok() {
                index.history.push(meta);
            }
        }
        let prefix = format!("refs/tags/{name}/");
        for (reference, id) in refs.range(prefix.clone()..) {
            let Some(tag) = reference.strip_prefix(&prefix) else {
                break;
            };
            if let Some(label) = protocol::dns_safe_branch(tag) {
                index
                    .tags
                    .entry(label)
                    .or_default()
                    .push((tag.to_owned(), *id));
            }
        }
        index.finish();
        services.insert(name, index);
    }
    Ok(Snapshot {
        generation,
        refs,
        services,
    })
}

impl ServiceIndex {
    fn finish(&mut self) {
        let mut sources: HashMap<String, (ObjectId, bool)> = HashMap::new();
        let mut branches: HashMap<String, HashMap<String, (ObjectId, bool)>> = HashMap::new();
        for (position, meta) in self.history.iter().enumerate() {
            self.positions.insert(meta.id, position);
            self.hexes.push((meta.id.to_hex().to_string(), meta.id));
            let Ok((_, trailers)) = &meta.info else {
                continue;
            };
            let succeeded = trailers.status == BuildStatus::Succeeded;
            // Newest first: the first succeeded build wins; without one, the newest build.
            let offer = |slot: &mut (ObjectId, bool)| {
                if succeeded && !slot.1 {
                    *slot = (meta.id, true);
                }
            };
            offer(
                sources
                    .entry(trailers.source_commit.to_ascii_lowercase())
                    .or_insert((meta.id, succeeded)),
            );
            if let Some(source_ref) = &trailers.source_ref
                && let Some(label) = protocol::dns_safe_branch(source_ref)
            {
                offer(
                    branches
                        .entry(label)
                        .or_default()
                        .entry(source_ref.clone())
                        .or_insert((meta.id, succeeded)),
                );
            }
        }
        self.hexes.sort();
        self.sources = sources.into_iter().map(|(k, (id, _))| (k, id)).collect();
        self.sources.sort();
        self.branches = branches
            .into_iter()
            .map(|(label, refs)| {
                let mut refs: Vec<(String, ObjectId)> =
                    refs.into_iter().map(|(r, (id, _))| (r, id)).collect();
                refs.sort();
                (label, refs)
            })
            .collect();
    }

    /// The position of a deployment in the history, if it is one.
    pub fn position(&self, id: &ObjectId) -> Option<usize> {
        self.positions.get(id).copied()
    }

    /// A deployment as the API shows it.
    pub fn deployment(&self, service: &str, position: usize) -> Deployment {
        let meta = &self.history[position];
        let (subject, trailers) = meta
            .info
            .as_ref()
            .expect("only well-formed commits enter the history");
        Deployment {
            revision: Revision::new(meta.id),
            parent: meta.parent.map(Revision::new),
            service: service.to_owned(),
            status: trailers.status,
            source_commit: trailers.source_commit.clone(),
            source_repo: trailers.source_repo.clone(),
            source_ref: trailers.source_ref.clone(),
            subject: subject.clone(),
            image: trailers.images.first().cloned(),
            time: meta.time,
            live: self.live == Some(meta.id),
        }
    }

    /// Every revision `label` names, with the rule that matched (no allocation unless the
    /// label matches more than a few times).
    fn candidates<'a>(&'a self, label: &str) -> Vec<(ObjectId, Rule<'a>)> {
        let mut found = Vec::new();
        let is_hex = label.len() >= 7 && label.bytes().all(|b| b.is_ascii_hexdigit());
        if is_hex {
            for (_, id) in prefix_range(&self.hexes, label) {
                found.push((*id, Rule::Deployment));
            }
            for (source, id) in prefix_range(&self.sources, label) {
                found.push((*id, Rule::Source(source)));
            }
        }
        for (tag, id) in self.tags.get(label).into_iter().flatten() {
            found.push((*id, Rule::Tag(tag)));
        }
        for (source_ref, id) in self.branches.get(label).into_iter().flatten() {
            found.push((*id, Rule::Branch(source_ref)));
        }
        found
    }
}

/// Which rule matched a label.
#[derive(Debug, Clone, Copy)]
enum Rule<'a> {
    Deployment,
    Source(&'a str),
    Tag(&'a str),
    Branch(&'a str),
}

impl std::fmt::Display for Rule<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Deployment => f.write_str("deployment"),
            Rule::Source(source) => write!(f, "source commit {}", &source[..12.min(source.len())]),
            Rule::Tag(tag) => write!(f, "tag {tag}"),
            Rule::Branch(source_ref) => write!(f, "branch {source_ref}"),
        }
    }
}

fn prefix_range<'a>(
    sorted: &'a [(String, ObjectId)],
    prefix: &str,
) -> impl Iterator<Item = &'a (String, ObjectId)> {
    let start = sorted.partition_point(|(hex, _)| hex.as_str() < prefix);
    sorted[start..]
        .iter()
        .take_while(move |(hex, _)| hex.starts_with(prefix))
}

/// Checks a label and lowers its case.
pub fn normalise_label(label: &str) -> Result<String, ResolveError> {
    let invalid = |reason| ResolveError::InvalidLabel {
        label: label.chars().take(80).collect(),
        reason,
    };
    if label.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if label.len() > protocol::MAX_LABEL {
        return Err(invalid("longer than 63 bytes"));
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(invalid("only a-z, 0-9 and - are allowed"));
    }
    Ok(label.to_ascii_lowercase())
}

impl Snapshot {
    /// The service's index, or why there is none.
    pub fn service(&self, service: &str) -> Result<&ServiceIndex, ResolveError> {
        protocol::check_label(service)
            .map_err(|_| ResolveError::InvalidService(service.chars().take(80).collect()))?;
        self.services
            .get(service)
            .ok_or_else(|| ResolveError::UnknownService(service.to_owned()))
    }

    /// Resolves a label (`None`: the live revision).
    pub fn resolve(&self, service: &str, label: Option<&str>) -> Result<ObjectId, ResolveError> {
        let index = self.service(service)?;
        let Some(label) = label else {
            return index.live.ok_or_else(|| ResolveError::NoLive {
                service: service.to_owned(),
            });
        };
        let label = normalise_label(label)?;
        let found = index.candidates(&label);
        match found.first() {
            None => Err(ResolveError::UnknownLabel {
                service: service.to_owned(),
                label,
            }),
            Some((id, _)) if found.iter().all(|(other, _)| other == id) => Ok(*id),
            Some(_) => {
                let mut by_revision: BTreeMap<ObjectId, Vec<String>> = BTreeMap::new();
                for (id, rule) in &found {
                    by_revision.entry(*id).or_default().push(rule.to_string());
                }
                Err(ResolveError::Ambiguous {
                    service: service.to_owned(),
                    label,
                    candidates: by_revision
                        .iter()
                        .take(MAX_CANDIDATES)
                        .map(|(id, rules)| {
                            format!("{} ({})", id.to_hex_with_len(12), rules.join(", "))
                        })
                        .collect(),
                })
            }
        }
    }

    /// The labels that name `id` within `service`, shortest first per rule.
    pub fn labels(&self, service: &str, id: ObjectId) -> Vec<String> {
        let Ok(index) = self.service(service) else {
            return Vec::new();
        };
        let resolves = |label: &str| self.resolve(service, Some(label)).ok() == Some(id);
        let mut labels = Vec::new();
        let hex = id.to_hex().to_string();
        if index.position(&id).is_some()
            && let Some(len) = (7..=40).find(|&len| resolves(&hex[..len]))
        {
            labels.push(hex[..len].to_owned());
        }
        if let Some(position) = index.position(&id)
            && let Ok((_, trailers)) = &index.history[position].info
        {
            let source = trailers.source_commit.to_ascii_lowercase();
            if source.len() >= 7
                && let Some(len) = (7..=source.len().min(40)).find(|&len| resolves(&source[..len]))
            {
                labels.push(source[..len].to_owned());
            }
            if let Some(branch) = trailers
                .source_ref
                .as_deref()
                .and_then(protocol::dns_safe_branch)
                && resolves(&branch)
            {
                labels.push(branch);
            }
        }
        for (label, tags) in &index.tags {
            if tags.iter().any(|(_, target)| *target == id) && resolves(label) {
                labels.push(label.clone());
            }
        }
        labels.dedup();
        labels
    }
}

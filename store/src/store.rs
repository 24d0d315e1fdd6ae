//! The [`Store`] itself: opening the repository, and the one way a ref moves.
//!
//! 1. [`Store::init`] creates the bare repository with reflogs for every ref and automatic gc
//!    off; [`Store::open`] removes what a killed writer left (spools, quarantines, temporary
//!    objects) and points `HEAD` at a service branch unless it names one that exists.
//! 2. Every ref the store writes moves by compare-and-swap against the tip it read
//!    ([`Store::cas_update`], at most [`CAS_ATTEMPTS`] tries), with the service lock held by
//!    the caller. A move that needs new objects (a deployment, a tag, a runtime log) goes
//!    through [`Store::publish`], which links them in from the write's quarantine under the
//!    objects lock first and takes them back if the ref does not move.
//! 3. A deployment, live or tag write refreshes the index afterwards, so the writer's next
//!    read sees it.
//!
//! Writing deployments, reading them, the live pointer and tags, runtime logs, push checks and
//! repacking are modules of their own that add to `impl Store`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gix::ObjectId;
use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};

use crate::index::{IndexState, Snapshot};
use crate::lock::{self, ServiceLock};
use crate::protocol;
use crate::quarantine::Quarantine;
use crate::{OpenError, ReadError, WriteError};

/// How often a compare-and-swap ref update is tried before giving up.
pub const CAS_ATTEMPTS: u32 = 8;

/// The deployment repository. Cheap to clone; all clones share one index.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    repo: gix::ThreadSafeRepository,
    index: Mutex<IndexState>,
    /// Who must agree to a live move before it is made here (a cluster's etcd), if any.
    authority: std::sync::OnceLock<Arc<dyn crate::LiveAuthority>>,
}

impl Store {
    /// Opens the bare repository at `path`, creating it (and its parents) if absent.
    pub fn init(path: impl AsRef<Path>) -> Result<Store, OpenError> {
        let path = path.as_ref();
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| OpenError::Io {
                action,
                path,
                source,
            }
        };
        if !path.join("HEAD").exists() {
            fs::create_dir_all(path).map_err(io("create", path))?;
            gix::init_bare(path).map_err(|source| OpenError::Git {
                path: path.to_owned(),
                source,
            })?;
            // Bare repositories keep no reflogs by default; the live pointer's trail needs them,
            // also for updates made by stock git. Automatic gc would prune while we read.
            let config = path.join("config");
            let mut file = fs::OpenOptions::new()
                .append(true)
                .open(&config)
                .map_err(io("open", &config))?;
            file.write_all(b"[core]\n\tlogAllRefUpdates = always\n[gc]\n\tauto = 0\n")
                .map_err(io("write", &config))?;
            tracing::info!(path = %path.display(), "created deployment repository");
        }
        Store::open(path)
    }

    /// Opens an existing bare repository.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, OpenError> {
        Store::open_watching(path.as_ref(), use_inotify())
    }

    /// Opens with or without inotify (without: stat fingerprints).
    pub(crate) fn open_watching(path: &Path, inotify: bool) -> Result<Store, OpenError> {
        if !path.join("HEAD").exists() {
            return Err(OpenError::NotFound {
                path: path.to_owned(),
            });
        }
        let repo = gix::open(path).map_err(|source| OpenError::Git {
            path: path.to_owned(),
            source,
        })?;
        if !repo.is_bare() {
            return Err(OpenError::NotBare {
                path: path.to_owned(),
            });
        }
        let path = repo.path().to_owned();
        let spools = lock::spool_dir(&path);
        fs::create_dir_all(&spools).map_err(|source| OpenError::Io {
            action: "create",
            path: spools.clone(),
            source,
        })?;
        lock::sweep_spools(&path);
        lock::sweep_object_temporaries(&path, lock::ABANDONED_TEMPORARY);
        let first_branch = repo.references().ok().and_then(|references| {
            let all = references.all().ok()?;
            all.flatten()
                .filter_map(|r| {
                    let name = r.name().as_bstr().to_string();
                    let service = name.strip_prefix("refs/heads/")?.to_owned();
                    protocol::check_label(&service).ok().map(|()| service)
                })
                .min()
        });
        let watcher = inotify.then(|| crate::index::Watcher::new(&path)).flatten();
        let store = Store {
            inner: Arc::new(Inner {
                path,
                repo: repo.into_sync(),
                index: Mutex::new(IndexState::with_watcher(watcher)),
                authority: std::sync::OnceLock::new(),
            }),
        };
        if let Some(service) = first_branch {
            store.keep_head(&service);
        }
        Ok(store)
    }

    /// Points `HEAD` at `refs/heads/<service>` unless it names a branch that exists, so that
    /// a clone checks a service out.
    pub(crate) fn keep_head(&self, service: &str) {
        let head = self.inner.path.join("HEAD");
        let current = fs::read_to_string(&head).unwrap_or_default();
        if let Some(target) = current.trim().strip_prefix("ref: ")
            && read_ref(&self.repo(), target).ok().flatten().is_some()
        {
            return;
        }
        let staging = self.inner.path.join("HEAD.revboot-new");
        let written = fs::write(&staging, format!("ref: refs/heads/{service}\n"))
            .and_then(|()| fs::rename(&staging, &head));
        match written {
            Ok(()) => tracing::info!(service, "HEAD names the service now"),
            Err(error) => tracing::warn!(%error, service, "cannot point HEAD at the service"),
        }
    }

    /// Installs the authority every later [`Store::set_live`] asks first (once; a second
    /// call is refused and returns `false`).
    pub fn set_authority(&self, authority: Arc<dyn crate::LiveAuthority>) -> bool {
        self.inner.authority.set(authority).is_ok()
    }

    pub(crate) fn authority(&self) -> Option<&Arc<dyn crate::LiveAuthority>> {
        self.inner.authority.get()
    }

    /// The repository's directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub(crate) fn repo(&self) -> gix::Repository {
        self.inner.repo.to_thread_local()
    }

    /// The index, checked against the refs `service` depends on (all refs, for `None`).
    pub(crate) fn snapshot_for(&self, service: Option<&str>) -> Result<Arc<Snapshot>, ReadError> {
        let mut index = self
            .inner
            .index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        index.snapshot(&self.inner.path, &self.inner.repo, service)
    }

    /// The index, checked against all refs.
    pub(crate) fn snapshot(&self) -> Result<Arc<Snapshot>, ReadError> {
        self.snapshot_for(None)
    }

    pub(crate) fn refreshed(&self) {
        let mut index = self
            .inner
            .index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(error) = index.refresh(&self.inner.path, &self.inner.repo) {
            tracing::warn!(%error, "index refresh after write failed; next read retries");
        }
    }

    /// Changes whenever the refs change (any writer, including stock git): a cache key.
    pub fn generation(&self) -> u64 {
        match self.snapshot() {
            Ok(snapshot) => snapshot.generation,
            Err(error) => {
                tracing::warn!(%error, "could not refresh the index");
                0
            }
        }
    }

    /// Moves `reference` of `service` to the commit or tag `make` writes into `quarantine` for
    /// the current tip, with the quarantine's objects linked into the repository under the
    /// objects lock first; if the ref does not move, they are taken back out. The caller holds
    /// the service lock.
    pub(crate) fn publish(
        &self,
        repo: &gix::Repository,
        service: &str,
        quarantine: &mut Quarantine,
        reference: &str,
        reflog: &str,
        mut make: impl FnMut(&mut Quarantine, Option<ObjectId>) -> Result<ObjectId, WriteError>,
    ) -> Result<ObjectId, WriteError> {
        let _objects = ServiceLock::objects(&self.inner.path, service)?;
        let mut made = None;
        let moved = self.cas_update(repo, reference, reflog, |current| {
            // Made for a tip that moved meanwhile: not wanted any more.
            if let Some(stale) = made.take() {
                quarantine.take_back(stale);
            }
            let id = make(quarantine, current)?;
            made = Some(id);
            quarantine.link_in()?;
            Ok(id)
        });
        if moved.is_err() {
            quarantine.take_back_all();
        }
        moved
    }

    /// Moves `reference` by compare-and-swap to the object `make(current)` returns, retrying
    /// when another writer moved it. The caller holds the service lock. When the disk is full,
    /// it gives up at once and leaves the ref's reflog as it was.
    pub(crate) fn cas_update(
        &self,
        repo: &gix::Repository,
        reference: &str,
        reflog: &str,
        mut make: impl FnMut(Option<ObjectId>) -> Result<ObjectId, WriteError>,
    ) -> Result<ObjectId, WriteError> {
        let name: gix::refs::FullName =
            reference.try_into().map_err(|_| WriteError::InvalidName {
                what: "ref",
                name: reference.to_owned(),
                reason: "not a valid ref name",
            })?;
        let mut last_error = None;
        for attempt in 1..=CAS_ATTEMPTS {
            lock::clear_stale_ref_lock(&self.inner.path, reference)?;
            let current = read_ref(repo, reference)?;
            let new = make(current)?;
            let expected = match current {
                Some(id) => PreviousValue::MustExistAndMatch(gix::refs::Target::Object(id)),
                None => PreviousValue::MustNotExist,
            };
            let edit = RefEdit {
                change: Change::Update {
                    log: LogChange {
                        mode: RefLog::AndReference,
                        force_create_reflog: true,
                        message: reflog.into(),
                    },
                    expected,
                    new: gix::refs::Target::Object(new),
                },
                name: name.clone(),
                deref: false,
            };
            let signature = signature();
            let mut time = gix::date::parse::TimeBuf::default();
            let reflog_path = self.inner.path.join("logs").join(reference);
            let reflog_len = fs::metadata(&reflog_path).map(|m| m.len()).ok();
            match repo.edit_references_as(Some(edit), Some(signature.to_ref(&mut time))) {
                Ok(_) => return Ok(new),
                Err(error) if crate::error::out_of_space(&error) => {
                    // gix appends to the reflog before it moves the ref: a line cut short
                    // by the full disk, for a move that did not happen, must not stay.
                    restore_reflog(&reflog_path, reflog_len);
                    tracing::warn!(reference, %error, "no space left to move the ref");
                    return Err(WriteError::Git {
                        action: "move the ref",
                        source: error,
                    });
                }
                Err(error) => {
                    let now = read_ref(repo, reference)?;
                    if now != current {
                        tracing::info!(
                            reference,
                            attempt,
                            "ref moved under us; retrying on the new tip"
                        );
                    } else {
                        tracing::warn!(reference, attempt, %error, "ref update failed; retrying");
                        std::thread::sleep(std::time::Duration::from_millis(
                            10 * u64::from(attempt),
                        ));
                    }
                    last_error = Some(error);
                }
            }
        }
        if let Some(error) = last_error {
            tracing::warn!(reference, %error, "giving up on ref update");
        }
        Err(WriteError::Conflict {
            reference: reference.to_owned(),
            attempts: CAS_ATTEMPTS,
        })
    }
}

/// Whether the index may use inotify (`REVBOOT_STORE_NO_INOTIFY=1` turns it off, to test the
/// stat fingerprint that is used where inotify is unavailable).
fn use_inotify() -> bool {
    std::env::var_os("REVBOOT_STORE_NO_INOTIFY").is_none_or(|v| v != "1")
}

/// A commit by revboot of `tree` on `parent`.
pub(crate) fn commit(tree: ObjectId, parent: Option<ObjectId>, message: &str) -> gix::objs::Commit {
    let signature = signature();
    gix::objs::Commit {
        tree,
        parents: parent.into_iter().collect(),
        author: signature.clone(),
        committer: signature,
        encoding: None,
        message: message.into(),
        extra_headers: Vec::new(),
    }
}

/// Cuts a reflog back to `len` bytes (`None`: it did not exist, so it goes).
fn restore_reflog(path: &Path, len: Option<u64>) {
    let restored = match len {
        Some(len) => fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|file| file.set_len(len)),
        None => fs::remove_file(path),
    };
    if let Err(error) = restored
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(%error, path = %path.display(), "cannot restore the reflog");
    }
}

pub(crate) fn signature() -> gix::actor::Signature {
    gix::actor::Signature {
        name: protocol::IDENTITY.0.into(),
        email: protocol::IDENTITY.1.into(),
        time: gix::date::Time::now_utc(),
    }
}

pub(crate) fn read_ref(repo: &gix::Repository, name: &str) -> Result<Option<ObjectId>, WriteError> {
    let reference = repo
        .try_find_reference(name)
        .map_err(|source| WriteError::Git {
            action: "read ref",
            source,
        })?;
    Ok(reference.and_then(|r| r.target().try_id().map(ToOwned::to_owned)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Revision;
    use crate::test_support::{deploy, store};

    /// `git update-ref refs/live/hello <target>`, behind the store's back.
    fn stock_git_moves_live(store: &Store, target: &Revision) {
        let status = std::process::Command::new("git")
            .arg("-C")
            .arg(store.path())
            .args(["update-ref", "refs/live/hello", &target.to_hex()])
            .status()
            .expect("git runs");
        assert!(status.success());
    }

    /// Both ways of noticing changes (inotify, and stat fingerprints where it is missing)
    /// see a ref moved by stock git on the very next call, also once the index is settled.
    #[test]
    fn external_live_moves_are_seen_with_and_without_inotify() {
        for inotify in [true, false] {
            let (_dir, store) = store();
            let store = Store::open_watching(store.path(), inotify).expect("open");
            let one = deploy(&store, "hello", 1, Some(b"one"));
            let two = deploy(&store, "hello", 2, Some(b"two"));
            store.set_live("hello", &two, "deploy").expect("live");
            for settle in [false, true] {
                if settle {
                    std::thread::sleep(crate::index::SETTLE * 2);
                    assert_eq!(store.resolve("hello", None).expect("live"), one);
                }
                let target = if settle { two } else { one };
                stock_git_moves_live(&store, &target);
                assert_eq!(
                    store.resolve("hello", None).expect("live"),
                    target,
                    "inotify: {inotify}, settled: {settle}"
                );
            }
        }
    }

    /// A runtime log (one per stopped instance) is no reason to list the refs again on the
    /// next resolve, which may be a DNS answer's; a ref moved by stock git still is.
    #[test]
    fn runtime_logs_do_not_make_the_index_list_refs() {
        for inotify in [true, false] {
            let (_dir, store) = store();
            let store = Store::open_watching(store.path(), inotify).expect("open");
            let one = deploy(&store, "hello", 1, Some(b"one"));
            let two = deploy(&store, "hello", 2, Some(b"two"));
            store.set_live("hello", &one, "deploy").expect("live");
            if !inotify {
                // Stat fingerprints trust a listing only once the ref files are older.
                std::thread::sleep(crate::index::SETTLE * 2);
            }
            assert_eq!(store.resolve("hello", None).expect("live"), one);
            let refreshes = || store.inner.index.lock().expect("index").refreshes();
            let before = refreshes();
            for n in 0..3 {
                let record = crate::RuntimeRecord {
                    revision: one,
                    client: None,
                    started_at_ms: n,
                    boot_ms: Some(1),
                    lifetime_ms: 10,
                    outcome: "stopped: idle".into(),
                    console: b"console\n".to_vec(),
                };
                store.append_runtime_log("hello", &record).expect("log");
                assert_eq!(store.resolve("hello", None).expect("live"), one);
            }
            assert_eq!(refreshes(), before, "inotify: {inotify}");
            stock_git_moves_live(&store, &two);
            assert_eq!(store.resolve("hello", None).expect("live"), two);
            assert!(refreshes() > before, "inotify: {inotify}");
        }
    }

    #[test]
    fn store_is_shared_across_threads() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<Store>();
    }

    #[test]
    fn open_refuses_missing_repository() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            Store::open(dir.path().join("nope")),
            Err(OpenError::NotFound { .. })
        ));
    }

    #[test]
    fn init_twice_opens_the_same_repository() {
        let (dir, store) = store();
        let revision = deploy(&store, "hello", 1, Some(b"one"));
        let again = Store::init(dir.path().join("deploy.git")).expect("reopen");
        assert_eq!(
            again.history("hello").expect("history")[0].revision,
            revision
        );
    }

    #[test]
    fn generation_changes_with_refs() {
        let (_dir, store) = store();
        let before = store.generation();
        let one = deploy(&store, "hello", 1, Some(b"one"));
        let after_write = store.generation();
        assert_ne!(before, after_write);
        store.set_live("hello", &one, "x").expect("live");
        assert_ne!(after_write, store.generation());
    }
}

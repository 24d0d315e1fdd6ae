//! The [`Store`]: opening, writing deployments, the live pointer, tags, reading.

use std::fs;
use std::io::{BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gix::ObjectId;
use gix::objs::tree::{Entry, EntryKind};
use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};
use sha2::{Digest, Sha256};

use crate::index::{IndexState, Snapshot};
use crate::lock::{self, ServiceLock};
use crate::protocol::{self, Trailers};
use crate::quarantine::Quarantine;
use crate::types::{
    BuildStatus, Deployment, DeploymentDiff, ImageInfo, ImageReader, LiveMove, NewDeployment,
};
use crate::{LiveError, Manifest, OpenError, ReadError, ResolveError, Revision, WriteError};

/// The largest image the store accepts.
pub const MAX_IMAGE_BYTES: u64 = 1 << 30;
/// The largest build log the store accepts.
pub const MAX_BUILD_LOG_BYTES: usize = 64 << 20;
/// The largest manifest the store accepts.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
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
}

static SPOOL_COUNTER: AtomicU64 = AtomicU64::new(0);

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
            }),
        };
        if let Some(service) = first_branch {
            store.keep_head(&service);
        }
        Ok(store)
    }

    /// Points `HEAD` at `refs/heads/<service>` unless it names a branch that exists, so that
    /// a clone checks a service out.
    fn keep_head(&self, service: &str) {
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

    fn refreshed(&self) {
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

    /// Writes one build as a commit on `refs/heads/<service>`.
    ///
    /// Images are streamed through a spool file, so an image is never held in memory. The
    /// objects are written to a quarantine and linked into the repository just before the
    /// branch moves ([the deployment tree protocol](crate#the-deployment-tree-protocol)): a
    /// write that fails, for example because the disk is full
    /// ([`WriteError::is_out_of_space`]), leaves no object behind. The branch moves by
    /// compare-and-swap: a concurrent writer's commit becomes the parent.
    pub fn write_deployment(&self, d: NewDeployment<'_>) -> Result<Revision, WriteError> {
        let checked = check_deployment(&d).inspect_err(|error| {
            tracing::warn!(%error, service = d.service, "refused deployment");
        })?;
        let repo = self.repo();
        let mut quarantine = Quarantine::create(&self.inner.path)?;

        let mut image_entries = Vec::new();
        let mut infos = Vec::new();
        for image in d.images {
            let (id, info) = self.write_image(&mut quarantine, image)?;
            image_entries.push(Entry {
                mode: EntryKind::BlobExecutable.into(),
                filename: info.name.clone().into(),
                oid: id,
            });
            infos.push(info);
        }
        // The boot image's trailer comes first.
        if let Some(boot) = &checked.boot_image
            && let Some(position) = infos.iter().position(|i| &i.name == boot)
        {
            let info = infos.remove(position);
            infos.insert(0, info);
        }

        let mut entries = Vec::new();
        let log = quarantine.write_blob(d.build_log, "write build log")?;
        entries.push(Entry {
            mode: EntryKind::Blob.into(),
            filename: protocol::BUILD_LOG.into(),
            oid: log,
        });
        if let Some(manifest) = d.manifest {
            let id = quarantine.write_blob(manifest.as_bytes(), "write manifest")?;
            entries.push(Entry {
                mode: EntryKind::Blob.into(),
                filename: crate::manifest::FILE_NAME.into(),
                oid: id,
            });
        }
        if !image_entries.is_empty() {
            image_entries.sort();
            let tree = gix::objs::Tree {
                entries: image_entries,
            };
            let id = quarantine.write(&tree, "write image tree")?;
            entries.push(Entry {
                mode: EntryKind::Tree.into(),
                filename: protocol::IMAGE_DIR.into(),
                oid: id,
            });
        }
        entries.sort();
        let tree = quarantine.write(&gix::objs::Tree { entries }, "write tree")?;

        let trailers = Trailers {
            status: d.status,
            source_commit: checked.source_commit.clone(),
            source_repo: d.source_repo.to_owned(),
            source_ref: d.source_ref.map(str::to_owned),
            images: infos,
        };
        let short = &checked.source_commit[..12];
        let subject = protocol::clean_subject(d.subject, || format!("Build of {short}"));
        let message = protocol::message(&subject, &trailers);
        let reference = format!("refs/heads/{}", d.service);
        let reflog = format!("revboot: build {} of {short}", d.status);

        let _lock = ServiceLock::acquire(&self.inner.path, d.service)?;
        let id = self.publish(
            &repo,
            d.service,
            &mut quarantine,
            &reference,
            &reflog,
            |quarantine, parent| quarantine.write(&commit(tree, parent, &message), "write commit"),
        )?;
        drop(_lock);
        self.keep_head(d.service);
        self.refreshed();
        tracing::info!(service = d.service, revision = %id, status = %d.status, "wrote deployment");
        Ok(Revision::new(id))
    }

    /// Streams one image into a spool file (hashing it), then into a quarantined loose blob.
    fn write_image(
        &self,
        quarantine: &mut Quarantine,
        mut image: crate::types::ImageInput<'_>,
    ) -> Result<(ObjectId, ImageInfo), WriteError> {
        let spool_path = lock::spool_dir(&self.inner.path).join(format!(
            "spool-{}-{}",
            std::process::id(),
            SPOOL_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let io = WriteError::io;
        let spool = Spool(spool_path.clone());
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&spool.0)
            .map_err(io("create spool", &spool_path))?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match image.reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(WriteError::ReadImage {
                        name: image.name,
                        source,
                    });
                }
            };
            size += n as u64;
            if size > MAX_IMAGE_BYTES {
                return Err(WriteError::ImageTooLarge {
                    name: image.name,
                    limit: MAX_IMAGE_BYTES,
                });
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .map_err(io("write spool", &spool_path))?;
        }
        file.rewind().map_err(io("rewind spool", &spool_path))?;
        let mut reader = BufReader::with_capacity(256 << 10, file);
        let id = quarantine.write_blob_stream(size, &mut reader, "write image blob")?;
        drop(spool);
        Ok((
            id,
            ImageInfo {
                name: image.name,
                size,
                sha256: hex::encode(hasher.finalize()),
            },
        ))
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

    /// Points `refs/live/<service>` at `to`, a deployment of the service; the move is recorded
    /// in the ref's reflog (`git reflog refs/live/<service>`) with `reason`.
    pub fn set_live(
        &self,
        service: &str,
        to: &Revision,
        reason: &str,
    ) -> Result<LiveMove, LiveError> {
        protocol::check_label(service)
            .map_err(|_| LiveError::InvalidService(service.to_owned()))?;
        if reason.contains('\n') || reason.len() > 500 {
            return Err(LiveError::InvalidReason(
                "must be one line of at most 500 bytes",
            ));
        }
        let snapshot = self.snapshot_for(Some(service)).map_err(WriteError::from)?;
        let on_branch = snapshot
            .services
            .get(service)
            .and_then(|s| s.position(&to.id()))
            .is_some();
        if !on_branch {
            tracing::warn!(service, revision = %to, "refused to point live at a revision off the service branch");
            return Err(LiveError::NotADeployment {
                service: service.to_owned(),
                revision: *to,
            });
        }
        let repo = self.repo();
        let reference = format!("refs/live/{service}");
        let _lock = ServiceLock::acquire(&self.inner.path, service)?;
        let mut from = None;
        let reflog = format!("revboot: live {}: {}", to.short(12), reason.trim());
        self.cas_update(&repo, &reference, &reflog, |current| {
            from = current;
            Ok(to.id())
        })?;
        drop(_lock);
        self.refreshed();
        let from = from.map(Revision::new);
        tracing::info!(service, from = ?from, to = %to, reason, "moved live pointer");
        Ok(LiveMove {
            service: service.to_owned(),
            from,
            to: *to,
        })
    }

    /// The revision `refs/live/<service>` names, if set.
    pub fn live(&self, service: &str) -> Result<Option<Revision>, ReadError> {
        protocol::check_label(service)
            .map_err(|_| ReadError::InvalidService(service.to_owned()))?;
        let snapshot = self.snapshot_for(Some(service))?;
        Ok(snapshot
            .refs
            .get(&format!("refs/live/{service}"))
            .copied()
            .map(Revision::new))
    }

    /// Tags `revision` (a deployment of `service`) as `refs/tags/<service>/<name>` with an
    /// annotated tag. Tagging the same revision again is a no-op.
    pub fn tag(&self, service: &str, name: &str, revision: &Revision) -> Result<(), WriteError> {
        let invalid = |what, name: &str, reason| WriteError::InvalidName {
            what,
            name: name.to_owned(),
            reason,
        };
        protocol::check_label(service).map_err(|r| invalid("service", service, r))?;
        protocol::check_label(name).map_err(|r| invalid("tag", name, r))?;
        let snapshot = self.snapshot_for(Some(service))?;
        let Some(index) = snapshot.services.get(service) else {
            return Err(WriteError::NotADeployment {
                service: service.to_owned(),
                revision: *revision,
            });
        };
        let Some(position) = index.position(&revision.id()) else {
            return Err(WriteError::NotADeployment {
                service: service.to_owned(),
                revision: *revision,
            });
        };
        let deployment = index.deployment(service, position);
        let reference = format!("refs/tags/{service}/{name}");
        let repo = self.repo();
        let _lock = ServiceLock::acquire(&self.inner.path, service)?;
        if let Some(existing) = read_ref(&repo, &reference)? {
            let peeled = peel(&repo, existing)?;
            if peeled == revision.id() {
                return Ok(());
            }
            return Err(WriteError::TagExists {
                service: service.to_owned(),
                name: name.to_owned(),
            });
        }
        let signature = signature();
        let tag = gix::objs::Tag {
            target: revision.id(),
            target_kind: gix::objs::Kind::Commit,
            name: format!("{service}/{name}").into(),
            tagger: Some(signature),
            message: format!(
                "{service} {name}\n\nSource-Commit: {}\nSource-Repo: {}\n",
                deployment.source_commit, deployment.source_repo
            )
            .into(),
            signature: None,
        };
        let mut quarantine = Quarantine::create(&self.inner.path)?;
        let reflog = format!("revboot: tag {name}");
        self.publish(
            &repo,
            service,
            &mut quarantine,
            &reference,
            &reflog,
            |quarantine, current| match current {
                None => quarantine.write(&tag, "write tag"),
                Some(_) => Err(WriteError::TagExists {
                    service: service.to_owned(),
                    name: name.to_owned(),
                }),
            },
        )?;
        drop(_lock);
        self.refreshed();
        tracing::info!(service, tag = name, revision = %revision, "tagged deployment");
        Ok(())
    }

    /// Resolves a DNS label to a revision of `service` (`None`: the live revision).
    ///
    /// Rules, all tried at once: a ≥7-hex prefix of a deployment commit; a ≥7-hex prefix of a
    /// source commit (its newest successful deployment, or its newest deployment when none
    /// succeeded); a tag; a source branch made DNS-safe (likewise). Case-insensitive. A label
    /// that names two revisions is [`ResolveError::Ambiguous`].
    pub fn resolve(&self, service: &str, label: Option<&str>) -> Result<Revision, ResolveError> {
        let snapshot = self.snapshot_for(Some(service))?;
        snapshot.resolve(service, label).map(Revision::new)
    }

    /// Every label that resolves to `revision` within `service`: the shortest unambiguous
    /// deployment prefix, the shortest source prefix that names it, its branch label and its
    /// tags, where each of them names exactly this revision.
    pub fn labels(&self, service: &str, revision: &Revision) -> Result<Vec<String>, ReadError> {
        protocol::check_label(service)
            .map_err(|_| ReadError::InvalidService(service.to_owned()))?;
        Ok(self
            .snapshot_for(Some(service))?
            .labels(service, revision.id()))
    }

    /// The services, i.e. the branches whose names are DNS labels.
    pub fn services(&self) -> Result<Vec<String>, ReadError> {
        Ok(self.snapshot()?.services.keys().cloned().collect())
    }

    /// The builds of `service`, newest first.
    pub fn history(&self, service: &str) -> Result<Vec<Deployment>, ReadError> {
        let snapshot = self.snapshot_for(Some(service))?;
        let index = service_index(&snapshot, service)?;
        Ok((0..index.history.len())
            .map(|position| index.deployment(service, position))
            .collect())
    }

    /// One build of `service`.
    pub fn deployment(&self, service: &str, revision: &Revision) -> Result<Deployment, ReadError> {
        let snapshot = self.snapshot_for(Some(service))?;
        let index = service_index(&snapshot, service)?;
        let position = index
            .position(&revision.id())
            .ok_or_else(|| ReadError::NotADeployment {
                service: service.to_owned(),
                revision: *revision,
            })?;
        Ok(index.deployment(service, position))
    }

    /// The raw `revboot.toml` of a deployment, if it has one.
    pub fn manifest_text(&self, revision: &Revision) -> Result<Option<String>, ReadError> {
        let repo = self.repo();
        let Some(bytes) = read_file(&repo, revision, crate::manifest::FILE_NAME)? else {
            return Ok(None);
        };
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| ReadError::Malformed {
                revision: *revision,
                reason: "revboot.toml is not UTF-8".into(),
            })
    }

    /// The parsed manifest of a deployment, if it has one.
    pub fn manifest(&self, revision: &Revision) -> Result<Option<Manifest>, ReadError> {
        let Some(text) = self.manifest_text(revision)? else {
            return Ok(None);
        };
        Manifest::from_toml(&text)
            .map(Some)
            .map_err(|error| ReadError::Malformed {
                revision: *revision,
                reason: error.to_string(),
            })
    }

    /// The build output of a deployment.
    pub fn build_log(&self, revision: &Revision) -> Result<Vec<u8>, ReadError> {
        let repo = self.repo();
        read_file(&repo, revision, protocol::BUILD_LOG)?.ok_or_else(|| ReadError::Malformed {
            revision: *revision,
            reason: "no build.log".into(),
        })
    }

    /// What changed between two deployments of `service`.
    pub fn diff(
        &self,
        service: &str,
        a: &Revision,
        b: &Revision,
    ) -> Result<DeploymentDiff, ReadError> {
        let left = self.deployment(service, a)?;
        let right = self.deployment(service, b)?;
        let text_a = self.manifest_text(a)?.unwrap_or_default();
        let text_b = self.manifest_text(b)?.unwrap_or_default();
        let manifest = crate::diff::unified(
            &text_a,
            &text_b,
            &format!("a/{}", crate::manifest::FILE_NAME),
            &format!("b/{}", crate::manifest::FILE_NAME),
        );
        let size = |d: &Deployment| d.image.as_ref().map(|i| i.size);
        let sha = |d: &Deployment| d.image.as_ref().map(|i| i.sha256.clone());
        Ok(DeploymentDiff {
            manifest,
            image_size: (size(&left), size(&right)),
            image_changed: sha(&left) != sha(&right),
            image_sha256: (sha(&left), sha(&right)),
            status: (left.status, right.status),
            source_commit: (left.source_commit, right.source_commit),
        })
    }

    /// Opens an image of a deployment for reading (`None`: the boot image).
    pub fn open_image(
        &self,
        revision: &Revision,
        name: Option<&str>,
    ) -> Result<ImageReader, ReadError> {
        let repo = self.repo();
        let (info, tree) = image_info(&repo, revision, name)?;
        read_image(&repo, *revision, tree, info, name)
    }

    /// Writes the boot image to `<cache_dir>/<sha256 hex>` (mode 0755) once per hash; returns
    /// the path. The file appears atomically (a link, never over an existing one) and its
    /// hash is checked first.
    pub fn materialize_image(
        &self,
        revision: &Revision,
        cache_dir: &Path,
    ) -> Result<PathBuf, ReadError> {
        // The commit names the hash: a cached image costs no blob read (an image is megabytes
        // to inflate, and every revision of an unchanged image shares one file).
        let repo = self.repo();
        let (info, tree) = image_info(&repo, revision, None)?;
        let target = cache_dir.join(&info.sha256);
        if target.exists() {
            return Ok(target);
        }
        let mut reader = read_image(&repo, *revision, tree, info, None)?;
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| ReadError::Io {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(cache_dir).map_err(io("create", cache_dir))?;
        let mut temp = tempfile::Builder::new()
            .prefix(".partial-")
            .tempfile_in(cache_dir)
            .map_err(io("create temporary file in", cache_dir))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(io("read image for", &target))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            temp.write_all(&buf[..n])
                .map_err(io("write", temp.path()))?;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != reader.info().sha256 {
            return Err(ReadError::HashMismatch {
                revision: *revision,
                recorded: reader.info().sha256.clone(),
                actual,
            });
        }
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o755))
                .map_err(io("chmod", temp.path()))?;
        }
        temp.as_file().sync_all().map_err(io("sync", &target))?;
        // Never over an existing file: another revision of the same image may have put it
        // there meanwhile and be executing it, and a replaced inode would be one that
        // freshly cloned children still hold open for writing (exec fails: text file busy).
        match temp.persist_noclobber(&target) {
            Ok(_) => {
                tracing::info!(revision = %revision, path = %target.display(), "materialised image");
            }
            Err(error) if error.error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => {
                return Err(ReadError::Io {
                    action: "link into",
                    path: target.clone(),
                    source: error.error,
                });
            }
        }
        Ok(target)
    }
}

/// Whether the index may use inotify (`REVBOOT_STORE_NO_INOTIFY=1` turns it off, to test the
/// stat fingerprint that is used where inotify is unavailable).
fn use_inotify() -> bool {
    std::env::var_os("REVBOOT_STORE_NO_INOTIFY").is_none_or(|v| v != "1")
}

struct Spool(PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

struct Checked {
    source_commit: String,
    boot_image: Option<String>,
}

fn check_deployment(d: &NewDeployment<'_>) -> Result<Checked, WriteError> {
    let invalid = |what: String| Err(WriteError::InvalidDeployment(what));
    protocol::check_label(d.service).map_err(|reason| WriteError::InvalidName {
        what: "service",
        name: d.service.to_owned(),
        reason,
    })?;
    if d.source_commit.len() != 40 || !d.source_commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return invalid(format!(
            "source commit `{}` is not 40 hex digits",
            d.source_commit.chars().take(80).collect::<String>()
        ));
    }
    let printable =
        |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control());
    if !printable(d.source_repo) || d.source_repo.len() > 200 {
        return invalid("source repo must be a name without whitespace, at most 200 bytes".into());
    }
    if let Some(source_ref) = d.source_ref
        && (!source_ref.starts_with("refs/") || !printable(source_ref) || source_ref.len() > 255)
    {
        return invalid(format!("source ref `{source_ref}` is not a full ref name"));
    }
    match (d.status, d.images.is_empty()) {
        (BuildStatus::Succeeded, true) => {
            return invalid("a successful build needs at least one image".into());
        }
        (BuildStatus::Failed | BuildStatus::Interrupted, false) => {
            return invalid(format!("a build that {} has no images", d.status));
        }
        _ => {}
    }
    let mut names = Vec::new();
    for image in &d.images {
        protocol::check_image_name(&image.name).map_err(|reason| WriteError::InvalidName {
            what: "image",
            name: image.name.clone(),
            reason,
        })?;
        if names.contains(&image.name.as_str()) {
            return invalid(format!("two images are named `{}`", image.name));
        }
        names.push(&image.name);
    }
    if d.build_log.len() > MAX_BUILD_LOG_BYTES {
        return invalid(format!("build log exceeds {MAX_BUILD_LOG_BYTES} bytes"));
    }
    if d.manifest.is_some_and(|m| m.len() > MAX_MANIFEST_BYTES) {
        return invalid(format!("manifest exceeds {MAX_MANIFEST_BYTES} bytes"));
    }
    let mut boot_image = None;
    if d.status == BuildStatus::Succeeded
        && let Some(text) = d.manifest
    {
        let manifest = Manifest::from_toml(text).map_err(WriteError::Manifest)?;
        let boot = manifest.boot_image();
        if !names.contains(&boot) {
            return invalid(format!(
                "the manifest boots `{boot}`, which is not among the images"
            ));
        }
        boot_image = Some(boot.to_owned());
    }
    Ok(Checked {
        source_commit: d.source_commit.to_ascii_lowercase(),
        boot_image,
    })
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

fn read_ref(repo: &gix::Repository, name: &str) -> Result<Option<ObjectId>, WriteError> {
    let reference = repo
        .try_find_reference(name)
        .map_err(|source| WriteError::Git {
            action: "read ref",
            source,
        })?;
    Ok(reference.and_then(|r| r.target().try_id().map(ToOwned::to_owned)))
}

fn peel(repo: &gix::Repository, id: ObjectId) -> Result<ObjectId, WriteError> {
    let object = repo.find_object(id).map_err(|source| WriteError::Git {
        action: "read tag",
        source,
    })?;
    let commit = object.peel_to_commit().map_err(|source| WriteError::Git {
        action: "peel tag",
        source,
    })?;
    Ok(commit.id)
}

fn service_index<'a>(
    snapshot: &'a Snapshot,
    service: &str,
) -> Result<&'a crate::index::ServiceIndex, ReadError> {
    snapshot.service(service).map_err(|error| match error {
        ResolveError::InvalidService(s) => ReadError::InvalidService(s),
        _ => ReadError::UnknownService(service.to_owned()),
    })
}

/// Reads the file at `path` (e.g. `image/hello`) in a deployment's tree.
/// What the commit of `revision` records about an image (`None`: the boot image), and the
/// commit's tree.
fn image_info(
    repo: &gix::Repository,
    revision: &Revision,
    name: Option<&str>,
) -> Result<(ImageInfo, ObjectId), ReadError> {
    let meta = crate::index::read_meta(repo, revision.id())?;
    let (_, trailers) = meta.info.map_err(|reason| ReadError::Malformed {
        revision: *revision,
        reason,
    })?;
    let info = match name {
        None => trailers.images.first(),
        Some(name) => trailers.images.iter().find(|i| i.name == name),
    }
    .cloned()
    .ok_or_else(|| ReadError::NoImage {
        revision: *revision,
        name: name.map(str::to_owned),
    })?;
    Ok((info, meta.tree))
}

/// Reads the image `info` describes (asked for as `name`) from `tree`, checking its
/// recorded size.
fn read_image(
    repo: &gix::Repository,
    revision: Revision,
    tree: ObjectId,
    info: ImageInfo,
    name: Option<&str>,
) -> Result<ImageReader, ReadError> {
    let path = format!("{}/{}", protocol::IMAGE_DIR, info.name);
    let bytes = read_tree_file(repo, revision, tree, &path)?.ok_or_else(|| ReadError::NoImage {
        revision,
        name: name.map(str::to_owned),
    })?;
    if bytes.len() as u64 != info.size {
        return Err(ReadError::Malformed {
            revision,
            reason: format!(
                "image `{}` has {} bytes, its commit records {}",
                info.name,
                bytes.len(),
                info.size
            ),
        });
    }
    Ok(ImageReader {
        info,
        bytes: std::io::Cursor::new(bytes),
    })
}

fn read_file(
    repo: &gix::Repository,
    revision: &Revision,
    path: &str,
) -> Result<Option<Vec<u8>>, ReadError> {
    let meta = crate::index::read_meta(repo, revision.id())?;
    read_tree_file(repo, *revision, meta.tree, path)
}

/// Reads the file at `path` in `tree`, which belongs to `revision` (named in errors).
pub(crate) fn read_tree_file(
    repo: &gix::Repository,
    revision: Revision,
    mut tree: ObjectId,
    path: &str,
) -> Result<Option<Vec<u8>>, ReadError> {
    let git = |action| move |source| ReadError::Git { action, source };
    let mut parts = path.split('/').peekable();
    while let Some(part) = parts.next() {
        let object = repo.find_object(tree).map_err(git("read tree"))?;
        let decoded =
            gix::objs::TreeRef::from_bytes(&object.data, gix::hash::Kind::Sha1).map_err(|e| {
                ReadError::Malformed {
                    revision,
                    reason: e.to_string(),
                }
            })?;
        let Some(entry) = decoded.entries.iter().find(|e| e.filename == part) else {
            return Ok(None);
        };
        let id = entry.oid.to_owned();
        if parts.peek().is_none() {
            if !entry.mode.is_blob() {
                return Ok(None);
            }
            let mut blob = repo.find_blob(id).map_err(git("read blob"))?;
            return Ok(Some(blob.take_data()));
        }
        if !entry.mode.is_tree() {
            return Ok(None);
        }
        tree = id;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ImageInput;

    const MANIFEST: &str = "[build]\ncommand = [\"make\"]\nartifacts = [\"out/hello\"]\n";

    fn source(n: u8) -> String {
        format!("{:02x}", n).repeat(20)
    }

    fn deploy(store: &Store, service: &str, n: u8, image: Option<&[u8]>) -> Revision {
        let source = source(n);
        let (status, images) = match image {
            Some(bytes) => (
                BuildStatus::Succeeded,
                vec![ImageInput {
                    name: "hello".into(),
                    reader: Box::new(std::io::Cursor::new(bytes.to_vec())),
                }],
            ),
            None => (BuildStatus::Failed, Vec::new()),
        };
        store
            .write_deployment(NewDeployment {
                service,
                status,
                manifest: Some(MANIFEST),
                images,
                build_log: format!("build {n}\n").as_bytes(),
                source_commit: &source,
                source_repo: service,
                source_ref: Some("refs/heads/main"),
                subject: &format!("Change {n}"),
            })
            .expect("written")
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::init(dir.path().join("deploy.git")).expect("init");
        (dir, store)
    }

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
    fn history_is_newest_first_with_parents() {
        let (_dir, store) = store();
        let first = deploy(&store, "hello", 1, Some(b"one"));
        let failed = deploy(&store, "hello", 2, None);
        let third = deploy(&store, "hello", 3, Some(b"three"));
        let history = store.history("hello").expect("history");
        let revisions: Vec<Revision> = history.iter().map(|d| d.revision).collect();
        assert_eq!(revisions, vec![third, failed, first]);
        assert_eq!(history[0].parent, Some(failed));
        assert_eq!(history[2].parent, None);
        assert_eq!(history[1].status, BuildStatus::Failed);
        assert_eq!(history[1].image, None);
        let image = history[0].image.as_ref().expect("image");
        assert_eq!(image.size, 5);
        assert_eq!(image.sha256, hex::encode(Sha256::digest(b"three")));
        assert_eq!(history[0].subject, "Change 3");
        assert_eq!(history[0].source_commit, source(3));
        assert_eq!(
            store.services().expect("services"),
            vec!["hello".to_owned()]
        );
    }

    #[test]
    fn files_read_back() {
        let (dir, store) = store();
        let revision = deploy(&store, "hello", 1, Some(b"\x7fELF image"));
        assert_eq!(
            store.manifest_text(&revision).expect("read").as_deref(),
            Some(MANIFEST)
        );
        assert_eq!(
            store
                .manifest(&revision)
                .expect("read")
                .expect("some")
                .boot_image(),
            "hello"
        );
        assert_eq!(store.build_log(&revision).expect("read"), b"build 1\n");
        let mut bytes = Vec::new();
        store
            .open_image(&revision, None)
            .expect("open")
            .read_to_end(&mut bytes)
            .expect("read");
        assert_eq!(bytes, b"\x7fELF image");
        assert!(matches!(
            store.open_image(&revision, Some("other")),
            Err(ReadError::NoImage { .. })
        ));
        let cache = dir.path().join("cache");
        let path = store
            .materialize_image(&revision, &cache)
            .expect("materialise");
        assert_eq!(fs::read(&path).expect("read"), b"\x7fELF image");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).expect("stat").permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            path.file_name().and_then(|n| n.to_str()),
            Some(hex::encode(Sha256::digest(b"\x7fELF image")).as_str())
        );
        assert_eq!(
            store.materialize_image(&revision, &cache).expect("again"),
            path
        );
    }

    #[test]
    fn concurrent_materialisations_of_one_image_never_replace_the_file() {
        use std::os::unix::fs::MetadataExt;
        let (dir, store) = store();
        let bytes = vec![0x7f; 256 * 1024];
        let revisions: Vec<Revision> = (1..=4)
            .map(|n| deploy(&store, "hello", n, Some(&bytes)))
            .collect();
        let cache = dir.path().join("cache");
        for round in 0..10 {
            let cache = cache.join(round.to_string());
            let inodes: Vec<(PathBuf, u64)> = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..8)
                    .map(|i| {
                        let (store, cache, revision) = (&store, &cache, revisions[i % 4]);
                        scope.spawn(move || {
                            let path = store.materialize_image(&revision, cache).expect("ok");
                            let inode = fs::metadata(&path).expect("stat").ino();
                            (path, inode)
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().expect("joins"))
                    .collect()
            });
            let (path, inode) = &inodes[0];
            let now = fs::metadata(path).expect("stat").ino();
            for (other_path, other_inode) in &inodes {
                assert_eq!(other_path, path);
                assert_eq!(*other_inode, now, "the file was replaced after it appeared");
            }
            assert_eq!(*inode, now);
            assert_eq!(fs::read(path).expect("read"), bytes);
            // No partial files are left behind.
            assert_eq!(fs::read_dir(&cache).expect("list").count(), 1);
        }
    }

    #[test]
    fn failed_build_has_no_image() {
        let (_dir, store) = store();
        let revision = deploy(&store, "hello", 1, None);
        assert!(matches!(
            store.open_image(&revision, None),
            Err(ReadError::NoImage { .. })
        ));
        assert_eq!(store.build_log(&revision).expect("log"), b"build 1\n");
    }

    #[test]
    fn bad_input_changes_nothing() {
        let (_dir, store) = store();
        let good = deploy(&store, "hello", 1, Some(b"one"));
        let bad = |service: &str, source_commit: &str, status: BuildStatus, with_image: bool| {
            let images = if with_image {
                vec![ImageInput {
                    name: "hello".into(),
                    reader: Box::new(&b"x"[..]),
                }]
            } else {
                Vec::new()
            };
            store.write_deployment(NewDeployment {
                service,
                status,
                manifest: Some(MANIFEST),
                images,
                build_log: b"",
                source_commit,
                source_repo: "hello",
                source_ref: None,
                subject: "x",
            })
        };
        let src = source(9);
        assert!(matches!(
            bad("Hello", &src, BuildStatus::Succeeded, true),
            Err(WriteError::InvalidName { .. })
        ));
        assert!(matches!(
            bad("hello", "abc", BuildStatus::Succeeded, true),
            Err(WriteError::InvalidDeployment(_))
        ));
        assert!(matches!(
            bad("hello", &src, BuildStatus::Failed, true),
            Err(WriteError::InvalidDeployment(_))
        ));
        assert!(matches!(
            bad("hello", &src, BuildStatus::Succeeded, false),
            Err(WriteError::InvalidDeployment(_))
        ));
        assert_eq!(store.history("hello").expect("history").len(), 1);
        assert_eq!(
            store
                .resolve("hello", Some(&good.short(7)))
                .expect("resolve"),
            good
        );
    }

    #[test]
    fn boot_image_must_be_an_image() {
        let (_dir, store) = store();
        let result = store.write_deployment(NewDeployment {
            service: "hello",
            status: BuildStatus::Succeeded,
            manifest: Some(MANIFEST),
            images: vec![ImageInput {
                name: "other".into(),
                reader: Box::new(&b"x"[..]),
            }],
            build_log: b"",
            source_commit: &source(1),
            source_repo: "hello",
            source_ref: None,
            subject: "x",
        });
        assert!(
            matches!(result, Err(WriteError::InvalidDeployment(_))),
            "{result:?}"
        );
    }

    #[test]
    fn live_moves_and_rolls_back() {
        let (_dir, store) = store();
        assert_eq!(store.live("hello").expect("live"), None);
        let one = deploy(&store, "hello", 1, Some(b"one"));
        let two = deploy(&store, "hello", 2, Some(b"two"));
        let first = store.set_live("hello", &two, "deploy").expect("set");
        assert_eq!((first.from, first.to), (None, two));
        let back = store.set_live("hello", &one, "rollback").expect("rollback");
        assert_eq!((back.from, back.to), (Some(two), one));
        assert_eq!(store.live("hello").expect("live"), Some(one));
        assert_eq!(store.resolve("hello", None).expect("resolve"), one);
        assert!(store.deployment("hello", &one).expect("deployment").live);
        assert!(!store.deployment("hello", &two).expect("deployment").live);
        let reflog = fs::read_to_string(store.path().join("logs/refs/live/hello")).expect("reflog");
        assert_eq!(reflog.lines().count(), 2, "{reflog}");
        assert!(reflog.contains("rollback"), "{reflog}");
    }

    #[test]
    fn live_refuses_foreign_revision() {
        let (_dir, store) = store();
        let other = deploy(&store, "other", 1, Some(b"one"));
        deploy(&store, "hello", 1, Some(b"one"));
        assert!(matches!(
            store.set_live("hello", &other, "x"),
            Err(LiveError::NotADeployment { .. })
        ));
        assert!(matches!(
            store.set_live("hello", &other, "two\nlines"),
            Err(LiveError::InvalidReason(_))
        ));
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

    #[test]
    fn tags_resolve_and_are_not_moved() {
        let (_dir, store) = store();
        let one = deploy(&store, "hello", 1, Some(b"one"));
        let two = deploy(&store, "hello", 2, Some(b"two"));
        store.tag("hello", "v1", &one).expect("tag");
        store.tag("hello", "v1", &one).expect("same tag again");
        assert!(matches!(
            store.tag("hello", "v1", &two),
            Err(WriteError::TagExists { .. })
        ));
        assert_eq!(store.resolve("hello", Some("V1")).expect("resolve"), one);
    }

    #[test]
    fn diff_shows_manifest_and_image_change() {
        let (_dir, store) = store();
        let one = deploy(&store, "hello", 1, Some(b"one"));
        let two = deploy(&store, "hello", 2, Some(b"three"));
        let diff = store.diff("hello", &one, &two).expect("diff");
        assert_eq!(diff.manifest, "");
        assert!(diff.image_changed);
        assert_eq!(diff.image_size, (Some(3), Some(5)));
    }
}

//! The revision cache and its warm-up: what a summon needs to know of a deployment.
//!
//! 1. A revision's manifest and whether it can boot are read from the store once and kept
//!    (at most [`REVISION_CACHE`] revisions), so a cold summon on a DNS answer's path reads
//!    no git.
//! 2. Soon after start, and whenever the store moves on, the recent revisions of every
//!    service are read ahead in the background (the warm-up), a bounded number per service.
//! 3. An image is materialised from the store once per revision and checked against its
//!    tender (a process image must be static) before its first boot.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use revboot_store::Revision;
use revboot_store::manifest::Manifest;

use crate::summon::ResolveError;

use super::{Deployer, error_chain};

/// Revisions whose manifests are cached.
pub(super) const REVISION_CACHE: usize = 8192;
/// The background warm-up reads at most this many newest bootable deployments per service
/// (a `git bisect` over deployments boots old ones by name; a revision outside the cache
/// costs its DNS answer a manifest read from git, some 300 µs),
pub(super) const WARM_PER_SERVICE: usize = 2048;
/// and stops when the revision cache holds this many.
pub(super) const WARM_LIMIT: usize = REVISION_CACHE * 3 / 4;

#[derive(Debug)]
pub(super) struct RevisionInfo {
    pub(super) manifest: Manifest,
    pub(super) bootable: bool,
    pub(super) image: OnceLock<PathBuf>,
}

impl Deployer {
    pub(super) fn revision_info(
        &self,
        service: &str,
        revision: &Revision,
    ) -> Result<Arc<RevisionInfo>, ResolveError> {
        if let Some(info) = self
            .revisions
            .lock()
            .expect("revision cache lock is never poisoned")
            .get(revision)
        {
            return Ok(Arc::clone(info));
        }
        // A miss: the repository may have changed since the last warm-up.
        self.warm_soon();
        self.read_revision_info(service, revision)
    }

    /// Reads a revision's manifest from the store into the revision cache.
    pub(super) fn read_revision_info(
        &self,
        service: &str,
        revision: &Revision,
    ) -> Result<Arc<RevisionInfo>, ResolveError> {
        let deployment = self
            .store
            .deployment(service, revision)
            .map_err(|error| read_error(service, revision, &error))?;
        self.metrics.manifest_read();
        let manifest = self
            .store
            .manifest(revision)
            .map_err(|error| read_error(service, revision, &error))?;
        let (Some(manifest), Some(_)) = (manifest, deployment.image.as_ref()) else {
            return Err(ResolveError::NotBootable {
                service: service.to_owned(),
                revision: revision.short(12),
            });
        };
        let info = Arc::new(RevisionInfo {
            manifest,
            bootable: true,
            image: OnceLock::new(),
        });
        let mut cache = self
            .revisions
            .lock()
            .expect("revision cache lock is never poisoned");
        if cache.len() >= REVISION_CACHE {
            cache.clear();
        }
        cache.insert(*revision, Arc::clone(&info));
        Ok(info)
    }

    /// Reads the manifests of the newest deployments of every service into the revision
    /// cache, on a blocking thread, once per store generation (asked at start-up and on a
    /// cache miss, so a cached resolve costs no extra index check): the first query for a
    /// revision then costs no git read on the path of its DNS answer. At most one warm-up
    /// runs at a time, and it stops short of filling the cache.
    pub(super) fn warm_soon(&self) {
        let generation = self.store.generation();
        if self.warmed.load(Ordering::Acquire) == generation
            || self.warming.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            self.warming.store(false, Ordering::Release);
            return;
        };
        self.runtime.spawn_blocking(move || {
            me.warm();
            me.warmed.store(generation, Ordering::Release);
            me.warming.store(false, Ordering::Release);
        });
    }

    pub(super) fn warm(&self) {
        let Ok(services) = self.store.services() else {
            return;
        };
        for service in services {
            if self
                .table
                .lock()
                .expect("table lock is never poisoned")
                .shutting_down
            {
                return;
            }
            let Ok(history) = self.store.history(&service) else {
                continue;
            };
            let bootable = history.iter().filter(|d| d.image.is_some());
            for deployment in bootable.take(WARM_PER_SERVICE) {
                let (full, known) = {
                    let cache = self
                        .revisions
                        .lock()
                        .expect("revision cache lock is never poisoned");
                    (
                        cache.len() >= WARM_LIMIT,
                        cache.contains_key(&deployment.revision),
                    )
                };
                if full {
                    return;
                }
                if !known {
                    // Errors are the query's to report, when one comes.
                    let _ = self.read_revision_info(&service, &deployment.revision);
                }
            }
        }
    }

    pub(super) async fn image_path(
        &self,
        info: &RevisionInfo,
        revision: &Revision,
    ) -> Result<PathBuf, String> {
        if let Some(path) = info.image.get() {
            return Ok(path.clone());
        }
        let store = self.store.clone();
        let revision = *revision;
        let dir = self.image_dir.clone();
        let tender = info.manifest.run.tender;
        let name = info.manifest.boot_image().to_owned();
        let path = tokio::task::spawn_blocking(move || {
            let path = store.materialize_image(&revision, &dir).map_err(|error| {
                format!(
                    "cannot materialise the image: {error}: {}",
                    error_chain(&error)
                )
            })?;
            // Deployments made before the build checked this, or pushed from elsewhere:
            // an image its tender cannot run is said so, not booted into a refusal.
            revboot_store::image::check_path(&name, tender, &path)
                .map_err(|error| error.to_string())?;
            Ok::<_, String>(path)
        })
        .await
        .map_err(|error| format!("image materialisation panicked: {error}"))??;
        let _ = info.image.set(path.clone());
        Ok(path)
    }
}

pub(super) fn read_error(
    service: &str,
    revision: &Revision,
    error: &revboot_store::ReadError,
) -> ResolveError {
    use revboot_store::ReadError as E;
    match error {
        E::UnknownService(_) | E::InvalidService(_) => {
            ResolveError::UnknownService(service.to_owned())
        }
        E::UnknownRevision(_) | E::NotADeployment { .. } => ResolveError::UnknownLabel {
            service: service.to_owned(),
            label: revision.short(12),
        },
        E::NoImage { .. } => ResolveError::NotBootable {
            service: service.to_owned(),
            revision: revision.short(12),
        },
        other => ResolveError::Store(format!("{other}: {}", error_chain(other))),
    }
}

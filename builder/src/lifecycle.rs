//! A service's rename and delete, on the builder's side: its source repository, its build
//! cache and the queue's state of it.
//!
//! 1. [`Builder::close`] closes services to pushes and builds while they are renamed or
//!    deleted: refused ([`LifecycleError::Busy`]) while a build of one waits or runs.
//!    Closed, a push to one is answered `409` and queues nothing, and closing it again is
//!    refused ([`LifecycleError::Closed`]); the
//!    [`ClosedServices`] guard opens them again when dropped.
//! 2. [`Builder::rename_source`] moves `<data>/src/<old>.git` to `<data>/src/<new>.git`
//!    (one `rename(2)`) and rewrites its hook, which names the service; the build cache and
//!    the queue's state (branch heads, build records) follow. The new name must have no
//!    source repository. The old name is recorded (see `renamed`): a push to the old URL
//!    is refused with the new name, until `service add` creates the old name on purpose.
//! 3. [`Builder::delete_source`] moves the source repository to
//!    `<data>/src/.deleted/<service>-<unix ms>.git` when the deployments are kept,
//!    otherwise it removes it (renamed aside first, so the service is gone at once even if
//!    removing its files takes long or fails); the build cache and the queue's state of the
//!    service go, and so do the records of its old names.

use std::path::{Path, PathBuf};

use crate::Builder;
use crate::closed::Closed;
use crate::name::{ServiceNameError, validate_service_name};
use crate::queue::Refusal;

/// Why a rename or delete could not be done on the builder's side. Nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LifecycleError {
    /// A name is not a valid service name.
    #[error(transparent)]
    Name(#[from] ServiceNameError),
    /// Builds of the service wait or run.
    #[error("Service `{service}` has builds waiting or running (#{}): try again once they have finished", builds.iter().map(u64::to_string).collect::<Vec<_>>().join(", #"))]
    Busy {
        /// The service.
        service: String,
        /// The builds.
        builds: Vec<u64>,
    },
    /// Another rename or delete of the service is under way.
    #[error("Service `{service}` is being renamed or deleted already")]
    Closed {
        /// The service.
        service: String,
    },
    /// The new name has a source repository already.
    #[error("Service `{service}` exists already")]
    Exists {
        /// The name asked for.
        service: String,
    },
    /// A file operation failed.
    #[error("Cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The builder is shutting down.
    #[error("The builder is shutting down")]
    ShuttingDown,
}

/// Services closed by [`Builder::close`]; dropping it opens them again.
#[derive(Debug)]
#[must_use = "the services open again once this is dropped"]
pub struct ClosedServices {
    closed: Closed,
    services: Vec<String>,
}

impl Drop for ClosedServices {
    fn drop(&mut self) {
        self.closed.remove(&self.services);
    }
}

impl Builder {
    /// Closes `services` to pushes and builds (module docs, rule 1).
    pub async fn close(&self, services: &[&str]) -> Result<ClosedServices, LifecycleError> {
        for service in services {
            validate_service_name(service)?;
        }
        let names: Vec<String> = services.iter().map(|s| (*s).to_owned()).collect();
        match self.inner.queue.close(names.clone()).await {
            None => Err(LifecycleError::ShuttingDown),
            Some(Err(Refusal::Busy(builds))) => Err(LifecycleError::Busy {
                service: services.join(", "),
                builds,
            }),
            Some(Err(Refusal::Closed(service))) => Err(LifecycleError::Closed { service }),
            Some(Ok(())) => Ok(ClosedServices {
                closed: self.inner.closed.clone(),
                services: names,
            }),
        }
    }

    /// Whether `service` has a source repository.
    pub fn has_source(&self, service: &str) -> bool {
        self.inner.repos.exists(service)
    }

    /// The name a service once called `name` has now, if it was renamed and `name` was not
    /// made a service again since (the `renamed` module).
    pub fn renamed_to(&self, name: &str) -> Option<String> {
        self.inner.renamed.new_name(name)
    }

    /// Moves the source repository, build cache and queue state of `from` to `to` (module
    /// docs, rule 2); both must be closed. Returns whether `from` had a source repository.
    pub async fn rename_source(
        &self,
        _closed: &ClosedServices,
        from: &str,
        to: &str,
    ) -> Result<bool, LifecycleError> {
        validate_service_name(from)?;
        validate_service_name(to)?;
        let repos = &self.inner.repos;
        let (old, new) = (repos.path(from), repos.path(to));
        if new.exists() {
            return Err(LifecycleError::Exists {
                service: to.to_owned(),
            });
        }
        let had = repos.exists(from);
        if had {
            std::fs::rename(&old, &new).map_err(io("rename the source repository", &old))?;
            if let Err(source) = repos.refresh_hook(to).await {
                // Back as it was: the hook must name the service it serves.
                let _ = std::fs::rename(&new, &old);
                return Err(LifecycleError::Io {
                    action: "rewrite the hook of",
                    path: new,
                    source,
                });
            }
        }
        let cache = self.cache(from);
        if cache.exists() {
            let target = self.cache(to);
            remove_dir(&target);
            if let Err(error) = std::fs::rename(&cache, &target) {
                // A cache is rebuilt by the next build: dropping it loses time, not data.
                tracing::warn!(%error, cache = %cache.display(), "cannot move the build cache; removing it");
                remove_dir(&cache);
            }
        }
        self.inner.queue.rename(from, to).await;
        if let Err(error) = self.inner.renamed.record(from, to) {
            // Refused all the same until a restart: the record is in memory.
            tracing::error!(%error, from, to, "cannot save the record of the rename");
        }
        tracing::info!(
            from,
            to,
            source = had,
            "renamed the service's source repository"
        );
        Ok(had)
    }

    /// Archives (`keep`) or removes the source repository of `service`, and drops its build
    /// cache and queue state (module docs, rule 3); it must be closed. Returns where the
    /// repository was archived.
    pub async fn delete_source(
        &self,
        _closed: &ClosedServices,
        service: &str,
        keep: bool,
    ) -> Result<Option<PathBuf>, LifecycleError> {
        validate_service_name(service)?;
        let repos = &self.inner.repos;
        let path = repos.path(service);
        let mut archive = None;
        if repos.exists(service) {
            let deleted = repos.root().join(".deleted");
            std::fs::create_dir_all(&deleted).map_err(io("create", &deleted))?;
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let target = if keep {
                deleted.join(format!("{service}-{stamp}.git"))
            } else {
                deleted.join(format!(".removing-{service}-{stamp}"))
            };
            std::fs::rename(&path, &target).map_err(io("move the source repository", &path))?;
            if keep {
                archive = Some(target);
            } else {
                remove_dir(&target);
            }
        }
        remove_dir(&self.cache(service));
        self.inner.queue.forget(service).await;
        if let Err(error) = self.inner.renamed.forget_service(service) {
            tracing::error!(%error, service, "cannot save the records of renames");
        }
        tracing::info!(service, keep, "deleted the service's source repository");
        Ok(archive)
    }

    fn cache(&self, service: &str) -> PathBuf {
        self.inner.config.data_dir.join("cache").join(service)
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LifecycleError {
    let path = path.to_owned();
    move |source| LifecycleError::Io {
        action,
        path,
        source,
    }
}

/// Removes a directory tree, if there; a failure is logged (what is left is unreachable).
fn remove_dir(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(%error, path = %path.display(), "cannot remove"),
    }
}

//! Renaming and deleting a service: the order in which the parts change.
//!
//! 1. The names are checked (service names: lowercase letters, digits and `-`); the
//!    service must exist (a source repository, or refs in the deployment repository) and a
//!    new name must not. A bad name is `invalid`, an unknown service `not_found`, a taken
//!    name `conflict`; nothing changes.
//! 2. The builder closes the names: refused (`conflict`) while builds of the service wait or
//!    run; from then on pushes to them are refused.
//! 3. On a node of a cluster, the operation goes through etcd now
//!    (`revboot_cluster::Cluster::retire`): refused (`conflict`, with the reason) when
//!    another node renamed or deleted the service first, a build of it runs on any node, or
//!    the new name is taken on another node; `unavailable` when etcd does not answer. The
//!    service's records in etcd move or go with it, and the other nodes apply it on their
//!    next replication round ([`follow`]), with the same steps from here on.
//! 4. The deployer retires the old name: summons of it are refused, its running instances
//!    are stopped and their runtime records written under the old name.
//! 5. The deployment repository changes in one transaction: every ref of the service is
//!    renamed, archived or removed (`revboot_store`'s `lifecycle` module). DNS changes
//!    here: the store's generation moves, so the DNS answer cache is emptied, the old names
//!    answer NXDOMAIN and, after a rename, every label answers under the new name with the
//!    same revisions; the live pointer keeps its revision and its trail.
//! 6. The builder moves (rename), archives (delete, keeping the deployments) or removes the
//!    source repository, and moves or drops the build cache and its queue state. If that
//!    fails after the store was renamed, the store is renamed back.
//! 7. The service's configuration variables (`revboot config`) move with a rename, sealed
//!    again under the new name, before the store changes (and back if a later step fails);
//!    a delete removes them last, after everything else: a name created again starts with
//!    none, and a failed delete never loses the secrets of a service that still exists.
//! 8. The names open again: a renamed service's instances boot on the first query of a new
//!    name; a deleted name may be created again.

use std::sync::Arc;

use revboot_builder::{Builder, LifecycleError};
use revboot_cluster::{Cluster, RetireError, RetiredRecord};
use revboot_deployer::Deployer;
use revboot_store::{Store, WriteError};

use crate::action::{ActionError, DeletedView, RenamedView};
use crate::engine::error_chain;

/// The parts a rename or delete changes.
pub(crate) struct Parts<'a> {
    pub(crate) store: &'a Store,
    pub(crate) builder: &'a Builder,
    pub(crate) deployer: &'a Arc<Deployer>,
    pub(crate) zone: &'a str,
    /// The cluster the node is one of, which takes the operation first (step 3); `None`
    /// on a single host, and when a node applies another node's operation.
    pub(crate) cluster: Option<&'a Cluster>,
}

impl Parts<'_> {
    /// Whether `service` exists: a source repository or refs in the deployment repository.
    fn exists(&self, service: &str) -> Result<bool, ActionError> {
        Ok(self.builder.has_source(service)
            || !self
                .store
                .service_refs(service)
                .map_err(store_error)?
                .is_empty())
    }

    /// Step 3: the cluster, if any, takes the operation first.
    async fn through_cluster(
        &self,
        service: &str,
        renamed_to: Option<&str>,
        keep: bool,
    ) -> Result<(), ActionError> {
        let Some(cluster) = self.cluster else {
            return Ok(());
        };
        cluster
            .retire(service, renamed_to, keep)
            .await
            .map_err(|error| match error {
                RetireError::Conflict(_) => ActionError::Conflict(error.to_string()),
                other => ActionError::Unavailable(other.to_string()),
            })
    }

    fn check_exists(&self, service: &str) -> Result<(), ActionError> {
        if self.exists(service)? {
            Ok(())
        } else {
            Err(ActionError::NotFound(format!(
                "No service named `{service}`"
            )))
        }
    }

    /// Adds `service`. On a node of a cluster it is recorded in etcd first, a new service
    /// even when a service of that name was renamed or deleted before (its record goes, see
    /// `revboot_cluster::Cluster::revive`); the other nodes make its source repository.
    pub(crate) async fn add(&self, service: &str) -> Result<(), ActionError> {
        let mut recorded = false;
        if let Some(cluster) = self.cluster
            && !self.builder.has_source(service)
        {
            revboot_builder::validate_service_name(service)
                .map_err(|error| ActionError::Invalid(error.to_string()))?;
            recorded = cluster.revive(service).await.map_err(|error| {
                ActionError::Unavailable(format!(
                    "Cannot add `{service}`: the cluster's etcd did not answer ({error}); nothing changed"
                ))
            })?;
        }
        let info = self
            .builder
            .add_service(service)
            .await
            .map_err(|error| ActionError::Invalid(error_chain(&error)))?;
        // Recorded in etcd by this call, it may have been made here by replication since.
        if info.created || recorded {
            Ok(())
        } else {
            Err(ActionError::Conflict(format!(
                "Service `{service}` exists already ({})",
                info.source_repo.display()
            )))
        }
    }

    /// Deletes `service`, its deployments kept or removed (module docs).
    pub(crate) async fn delete(
        &self,
        service: &str,
        keep: bool,
    ) -> Result<DeletedView, ActionError> {
        revboot_builder::validate_service_name(service)
            .map_err(|error| ActionError::Invalid(error.to_string()))?;
        let closed = self
            .builder
            .close(&[service])
            .await
            .map_err(builder_error)?;
        self.check_exists(service)?;
        self.through_cluster(service, None, keep).await?;
        let retired = self.deployer.retire(service).await;
        let deployments = self.store.history(service).map_or(0, |h| h.len());
        let changed = self
            .store
            .delete_service(service, keep)
            .map_err(store_error)?;
        let source = self
            .builder
            .delete_source(&closed, service, keep)
            .await
            .map_err(|error| {
                ActionError::Internal(format!(
                    "The deployment repository no longer has `{service}`, but its source repository could not be deleted: {}; delete it again",
                    error_chain(&error)
                ))
            })?;
        let variables = self.deployer.vars().remove(service).map_err(|error| {
            ActionError::Internal(format!(
                "`{service}` is deleted, but its configuration variables could not be removed: {}",
                error_chain(&error)
            ))
        })?;
        tracing::info!(
            service,
            keep,
            deployments,
            stopped = retired.stopped(),
            "service deleted"
        );
        Ok(DeletedView {
            service: service.to_owned(),
            deployments,
            kept: keep,
            archive: changed.archive,
            source_archive: source.map(|path| path.display().to_string()),
            stopped: retired.stopped(),
            variables,
        })
    }

    /// Renames `from` to `to` (module docs).
    pub(crate) async fn rename(&self, from: &str, to: &str) -> Result<RenamedView, ActionError> {
        revboot_builder::validate_service_name(from)
            .map_err(|error| ActionError::Invalid(error.to_string()))?;
        revboot_builder::validate_service_name(to)
            .map_err(|error| ActionError::Invalid(format!("New name: {error}")))?;
        if from == to {
            return Err(ActionError::Invalid(format!(
                "`{from}` is the service's name already"
            )));
        }
        let closed = self
            .builder
            .close(&[from, to])
            .await
            .map_err(builder_error)?;
        self.check_exists(from)?;
        if self.exists(to)? {
            return Err(ActionError::Conflict(format!(
                "Service `{to}` exists already"
            )));
        }
        let vars = self.deployer.vars();
        if !vars.get(to).is_empty() {
            return Err(ActionError::Conflict(format!(
                "`{to}` has configuration variables already (`revboot config unset {to} …` first)"
            )));
        }
        self.through_cluster(from, Some(to), false).await?;
        let retired = self.deployer.retire(from).await;
        let variables = vars.rename(from, to).map_err(vars_error)?;
        let vars_back = || {
            if let Err(back) = vars.rename(to, from) {
                tracing::error!(back = %error_chain(&back), from, to, "cannot move the configuration variables back");
            }
        };
        if let Err(error) = self.store.rename_service(from, to) {
            vars_back();
            return Err(store_error(error));
        }
        if let Err(error) = self.builder.rename_source(&closed, from, to).await {
            if let Err(back) = self.store.rename_service(to, from) {
                tracing::error!(%back, from, to, "cannot rename the deployment repository's refs back");
            }
            vars_back();
            return Err(builder_error(error));
        }
        let deployments = self.store.history(to).map_or(0, |h| h.len());
        let live = self.store.live(to).ok().flatten();
        tracing::info!(
            from,
            to,
            deployments,
            stopped = retired.stopped(),
            "service renamed"
        );
        Ok(RenamedView {
            service: from.to_owned(),
            to: to.to_owned(),
            dns_name: format!("{to}.{}", self.zone),
            live: live.map(|r| r.to_hex()),
            deployments,
            stopped: retired.stopped(),
            variables,
        })
    }
}

/// The rename or delete that a service of the cluster replaced, when this node still has
/// the service from before it (its deployment [`RetiredRecord::head`] is here under the
/// name): this node was away for both, and applies it before anything else of the name.
pub(crate) fn stale(cluster: &Cluster, store: &Store, service: &str) -> Option<RetiredRecord> {
    let (_, record, _) = (cluster.sources().into_iter()).find(|(name, _, _)| name == service)?;
    let replaced = record.replaces?;
    let head: revboot_store::Revision = replaced.head.as_deref()?.parse().ok()?;
    store.has_deployment(service, &head).then_some(replaced)
}

/// Applies the renames and deletes another node took (step 3) to the services this node
/// still has, as that node did, and those a service added again since replaced
/// ([`stale`]). How many it could not apply (tried again later).
pub(crate) async fn follow(parts: &Parts<'_>, cluster: &Cluster) -> usize {
    let mut unapplied = 0;
    let replaced = (cluster.sources().into_iter())
        .filter_map(|(service, _, _)| Some((stale(cluster, parts.store, &service)?, service)));
    let retired = (cluster.retired().into_iter()).map(|(service, record)| (record, service));
    for (record, service) in retired.chain(replaced.collect::<Vec<_>>()) {
        if revboot_builder::validate_service_name(&service).is_err()
            || !parts.exists(&service).unwrap_or(false)
        {
            continue;
        }
        let done = match &record.renamed_to {
            Some(to) => parts.rename(&service, to).await.map(|_| ()),
            None => parts.delete(&service, record.keep).await.map(|_| ()),
        };
        match done {
            Ok(()) => tracing::info!(
                service,
                to = record.renamed_to,
                by = record.node,
                "renamed or deleted a service as another node of the cluster did"
            ),
            Err(error) => {
                tracing::warn!(%error, service, to = record.renamed_to, by = record.node, "cannot rename or delete a service as another node of the cluster did");
                unapplied += 1;
            }
        }
    }
    unapplied
}

fn vars_error(error: revboot_deployer::vars::VarsError) -> ActionError {
    match error {
        revboot_deployer::vars::VarsError::Taken { .. } => ActionError::Conflict(error.to_string()),
        other => ActionError::Internal(error_chain(&other)),
    }
}

fn builder_error(error: LifecycleError) -> ActionError {
    match error {
        LifecycleError::Name(_) => ActionError::Invalid(error.to_string()),
        LifecycleError::Busy { .. }
        | LifecycleError::Closed { .. }
        | LifecycleError::Exists { .. } => ActionError::Conflict(error.to_string()),
        LifecycleError::ShuttingDown => ActionError::Unavailable(error.to_string()),
        other => ActionError::Internal(error_chain(&other)),
    }
}

fn store_error(error: WriteError) -> ActionError {
    match error {
        WriteError::InvalidName { .. } => ActionError::Invalid(error.to_string()),
        WriteError::NameTaken { .. } => ActionError::Conflict(error.to_string()),
        WriteError::Busy { .. } => ActionError::Unavailable(error.to_string()),
        other => ActionError::Internal(error_chain(&other)),
    }
}

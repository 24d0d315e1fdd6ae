//! Renaming and deleting a service: the order in which the parts change.
//!
//! 1. The names are checked (service names: lowercase letters, digits and `-`); a node of
//!    a cluster refuses (`conflict`): the other nodes would bring the service back; the
//!    service must exist (a source repository, or refs in the deployment repository) and a
//!    new name must not. A bad name is `invalid`, an unknown service `not_found`, a taken
//!    name `conflict`; nothing changes.
//! 2. The builder closes the names: refused (`conflict`) while builds of the service wait or
//!    run; from then on pushes to them are refused.
//! 3. The deployer retires the old name: summons of it are refused, its running instances
//!    are stopped and their runtime records written under the old name.
//! 4. The deployment repository changes in one transaction: every ref of the service is
//!    renamed, archived or removed (`revboot_store`'s `lifecycle` module). DNS changes
//!    here: the store's generation moves, so the DNS answer cache is emptied, the old names
//!    answer NXDOMAIN and, after a rename, every label answers under the new name with the
//!    same revisions; the live pointer keeps its revision and its trail.
//! 5. The builder moves (rename), archives (delete, keeping the deployments) or removes the
//!    source repository, and moves or drops the build cache and its queue state. If that
//!    fails after the store was renamed, the store is renamed back.
//! 6. The service's configuration variables (`revboot config`) move with a rename, sealed
//!    again under the new name, before the store changes (and back if a later step fails);
//!    a delete removes them last, after everything else: a name created again starts with
//!    none, and a failed delete never loses the secrets of a service that still exists.
//! 7. The names open again: a renamed service's instances boot on the first query of a new
//!    name; a deleted name may be created again.

use std::sync::Arc;

use revboot_builder::{Builder, LifecycleError};
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
    /// Whether the node is one of a cluster, where renames and deletes are refused.
    pub(crate) clustered: bool,
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

    /// Renames and deletes change one node; the others would bring the service back (its
    /// sources and deployments replicate), so a cluster refuses them for now.
    fn check_single_host(&self) -> Result<(), ActionError> {
        if self.clustered {
            return Err(ActionError::Conflict(
                "Renaming or deleting a service is not supported in a cluster yet (the other nodes would bring it back); nothing changed".to_owned(),
            ));
        }
        Ok(())
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

    /// Deletes `service`, its deployments kept or removed (module docs).
    pub(crate) async fn delete(
        &self,
        service: &str,
        keep: bool,
    ) -> Result<DeletedView, ActionError> {
        revboot_builder::validate_service_name(service)
            .map_err(|error| ActionError::Invalid(error.to_string()))?;
        self.check_single_host()?;
        let closed = self
            .builder
            .close(&[service])
            .await
            .map_err(builder_error)?;
        self.check_exists(service)?;
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
        self.check_single_host()?;
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

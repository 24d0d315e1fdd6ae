//! The engine: carries out [`Action`]s against the store, the builder and the deployer.
//!
//! The engine is what the HTTP API calls in the daemon, and what the CLI calls directly
//! (store only) when no daemon is running and the action only reads.

use std::sync::Arc;

use revboot_store::{Deployment, ReadError, ResolveError, Revision, Store};

use crate::action::{
    Action, ActionError, BuildLogView, ConsoleView, DeletedView, DeploymentView, Deployments,
    DiffView, MoveReason, MoveView, RenamedView, Reply, ServiceView, ShowView, TokenView,
};

/// The running parts an engine may have beside the store.
pub trait Runtime: Send + Sync + 'static {
    /// Creates a service (its source repository).
    fn add_service(&self, name: &str) -> Result<(), ActionError>;
    /// The services that have a source repository (added, or pushed to), sorted: a service
    /// added and not built yet has no deployment in the store but exists all the same.
    fn added_services(&self) -> Result<Vec<String>, ActionError>;
    /// Deletes a service (see `crate::lifecycle`).
    fn delete_service(&self, service: &str, keep: bool) -> Result<DeletedView, ActionError>;
    /// Renames a service (see `crate::lifecycle`).
    fn rename_service(&self, from: &str, to: &str) -> Result<RenamedView, ActionError>;
    /// Runs an instance-related action (list, stop, summon).
    fn instances(&self, action: &Action) -> Result<Reply, ActionError>;
    /// Builds queued, running and recently finished, newest first.
    fn builds(&self, service: Option<&str>) -> Result<Vec<crate::action::BuildView>, ActionError>;
    /// For a label that names no deployment: builds the source commit it names, if any, on
    /// demand ([`ActionError::Building`]); otherwise `unknown`, the error as it was.
    fn build_on_demand(&self, service: &str, label: &str, unknown: ActionError) -> ActionError;
    /// Configuration variables: list or change ([`Action::Config`],
    /// [`Action::ConfigChange`]).
    fn config(&self, action: &Action) -> Result<Reply, ActionError>;
    /// Before live moves to `revision`: boots and checks it when its manifest asks
    /// (`[deploy] check`, `min_instances`); how it passed, or why not (a conflict).
    fn promote(&self, service: &str, revision: &Revision) -> Result<Option<String>, ActionError>;
    /// Live of `service` moved.
    fn promoted(&self, service: &str);
    /// The daemon itself, its upgrade in place, or its cluster ([`Action::Daemon`],
    /// [`Action::Upgrade`], [`Action::Nodes`]).
    fn daemon(&self, action: &Action) -> Result<Reply, ActionError>;
    /// The name the service once called `service` has now, if it was renamed.
    fn renamed_to(&self, service: &str) -> Option<String>;
}

/// Carries out actions.
#[derive(Clone)]
pub struct Engine {
    store: Store,
    zone: String,
    runtime: Option<Arc<dyn Runtime>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("store", &self.store.path())
            .field("zone", &self.zone)
            .field("runtime", &self.runtime.is_some())
            .finish()
    }
}

impl Engine {
    /// An engine over the store alone: reads and live moves work; instances and service
    /// creation need the daemon.
    pub fn offline(store: Store, zone: &str) -> Engine {
        Engine {
            store,
            zone: zone.to_owned(),
            runtime: None,
        }
    }

    /// An engine with the daemon's running parts.
    pub fn with_runtime(store: Store, zone: &str, runtime: Arc<dyn Runtime>) -> Engine {
        Engine {
            store,
            zone: zone.to_owned(),
            runtime: Some(runtime),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The zone.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// Carries out one action. A service not found that was renamed is named by its new
    /// name, as a push to its old URL is (a checkout's remote still names the old one).
    pub fn execute(&self, action: Action) -> Result<Reply, ActionError> {
        let service = action.service().map(str::to_owned);
        match (self.carry_out(action), service, &self.runtime) {
            (Err(ActionError::NotFound(unknown)), Some(service), Some(runtime)) => {
                Err(ActionError::NotFound(match runtime.renamed_to(&service) {
                    Some(to) => format!(
                        "Service `{service}` was renamed to `{to}`: name it `{to}`, or point \
                         the checkout's remote at /git/{to}.git (git remote set-url <remote> \
                         <daemon>/git/{to}.git)"
                    ),
                    None => unknown,
                }))
            }
            (result, _, _) => result,
        }
    }

    fn carry_out(&self, action: Action) -> Result<Reply, ActionError> {
        match &action {
            Action::AddService { name } => {
                let runtime = self.runtime()?;
                runtime.add_service(name)?;
                Ok(Reply::ServiceAdded(ServiceView {
                    name: name.clone(),
                    live: None,
                    deployments: 0,
                    dns_name: format!("{name}.{}", self.zone),
                }))
            }
            Action::ListServices => self.services().map(Reply::Services),
            Action::DeleteService {
                service,
                deployments,
            } => self
                .runtime()?
                .delete_service(service, *deployments == Deployments::Keep)
                .map(Reply::ServiceDeleted),
            Action::RenameService { service, to } => self
                .runtime()?
                .rename_service(service, to)
                .map(Reply::ServiceRenamed),
            Action::CheckToken => Ok(Reply::Token(TokenView {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                zone: self.zone.clone(),
            })),
            Action::History { service } => {
                let history = match self.store.history(service) {
                    Err(ReadError::UnknownService(_)) if self.added(service)? => Vec::new(),
                    other => other.map_err(read_error)?,
                };
                Ok(Reply::History(
                    history.iter().map(|d| self.view(d)).collect(),
                ))
            }
            Action::Show { service, label } => {
                let deployment = self.deployment(service, Some(label))?;
                let manifest = self
                    .store
                    .manifest_text(&deployment.revision)
                    .map_err(read_error)?;
                let labels = self
                    .store
                    .labels(service, &deployment.revision)
                    .map_err(read_error)?;
                Ok(Reply::Show(Box::new(ShowView {
                    deployment: self.view(&deployment),
                    manifest,
                    labels,
                })))
            }
            Action::Diff { service, a, b } => {
                let a = self.revision(service, Some(a))?;
                let b = self.revision(service, Some(b))?;
                let diff = self.store.diff(service, &a, &b).map_err(read_error)?;
                Ok(Reply::Diff(DiffView {
                    a: a.to_hex(),
                    b: b.to_hex(),
                    manifest: diff.manifest,
                    image_size: diff.image_size,
                    image_changed: diff.image_changed,
                }))
            }
            Action::MoveLive {
                service,
                label,
                reason,
                check,
            } => self.move_live(service, label, *reason, *check),
            Action::BuildLog { service, label } => {
                let deployment = self.deployment(service, label.as_deref())?;
                let log = self
                    .store
                    .build_log(&deployment.revision)
                    .map_err(read_error)?;
                Ok(Reply::BuildLog(BuildLogView {
                    revision: deployment.revision.to_hex(),
                    status: deployment.status.to_string(),
                    log: String::from_utf8_lossy(&log).into_owned(),
                }))
            }
            Action::ConsoleLogs {
                service,
                label,
                limit,
            } => {
                let only = match label {
                    Some(label) => Some(self.revision(service, Some(label))?),
                    None => None,
                };
                let limit = limit.unwrap_or(revboot_store::MAX_RUNTIME_LOGS);
                let records = self
                    .store
                    .runtime_logs_of(service, only, limit)
                    .map_err(read_error)?;
                Ok(Reply::Console(
                    records
                        .into_iter()
                        .map(|record| ConsoleView {
                            revision: record.revision.to_hex(),
                            client: record.client.map(|c| c.to_string()),
                            started_at_ms: record.started_at_ms,
                            boot_ms: record.boot_ms,
                            lifetime_ms: record.lifetime_ms,
                            outcome: record.outcome,
                            console: String::from_utf8_lossy(&record.console).into_owned(),
                        })
                        .collect(),
                ))
            }
            Action::ListInstances | Action::StopInstance { .. } | Action::Summon { .. } => {
                self.runtime()?.instances(&action)
            }
            Action::Config { .. } | Action::ConfigChange { .. } => self.runtime()?.config(&action),
            Action::Daemon | Action::Upgrade | Action::Nodes => self.runtime()?.daemon(&action),
            Action::ListBuilds { service } => {
                if let Some(service) = service {
                    revboot_store::protocol::check_label(service).map_err(|why| {
                        ActionError::Invalid(format!("`{service}` is not a service name: {why}"))
                    })?;
                }
                self.runtime()?
                    .builds(service.as_deref())
                    .map(Reply::Builds)
            }
        }
    }

    fn runtime(&self) -> Result<&Arc<dyn Runtime>, ActionError> {
        self.runtime.as_ref().ok_or_else(|| {
            ActionError::Unavailable(
                "The daemon is not running: start it with `revboot serve`".to_owned(),
            )
        })
    }

    /// Every service: those with deployments, and those added and not built yet (with no
    /// deployment and no live revision).
    fn services(&self) -> Result<Vec<ServiceView>, ActionError> {
        let mut names = self.store.services().map_err(read_error)?;
        if let Some(runtime) = &self.runtime {
            names.extend(runtime.added_services()?);
            names.sort();
            names.dedup();
        }
        names
            .into_iter()
            .map(|name| {
                let history = match self.store.history(&name) {
                    Err(ReadError::UnknownService(_)) => Vec::new(),
                    other => other.map_err(read_error)?,
                };
                let live = self.store.live(&name).map_err(read_error)?;
                Ok(ServiceView {
                    dns_name: format!("{name}.{}", self.zone),
                    live: live.map(|r| r.to_hex()),
                    deployments: history.len(),
                    name,
                })
            })
            .collect()
    }

    /// Whether `service` was added (has a source repository) with the daemon running.
    fn added(&self, service: &str) -> Result<bool, ActionError> {
        match &self.runtime {
            Some(runtime) => Ok(runtime.added_services()?.iter().any(|s| s == service)),
            None => Ok(false),
        }
    }

    /// Resolves a label (`None`: live) of a service.
    pub fn revision(&self, service: &str, label: Option<&str>) -> Result<Revision, ActionError> {
        self.store.resolve(service, label).map_err(resolve_error)
    }

    /// Resolves a label and reads its deployment.
    pub fn deployment(
        &self,
        service: &str,
        label: Option<&str>,
    ) -> Result<Deployment, ActionError> {
        let revision = self.revision(service, label)?;
        self.store
            .deployment(service, &revision)
            .map_err(read_error)
    }

    fn move_live(
        &self,
        service: &str,
        label: &str,
        reason: MoveReason,
        check: bool,
    ) -> Result<Reply, ActionError> {
        let target = match (self.deployment(service, Some(label)), &self.runtime) {
            (Err(unknown @ ActionError::NotFound(_)), Some(runtime)) => {
                return Err(runtime.build_on_demand(service, label, unknown));
            }
            (result, _) => result?,
        };
        if target.image.is_none() {
            return Err(ActionError::Conflict(format!(
                "{} of `{service}` has no image (its build {}): it cannot be live",
                target.revision.short(12),
                target.status
            )));
        }
        let word = match reason {
            MoveReason::Rollback => "rollback",
            MoveReason::Deploy => "deploy",
        };
        // Checked like a push's promotion, when the daemon runs (nothing runs without it).
        let checked = match (&self.runtime, check) {
            (Some(runtime), true) => runtime.promote(service, &target.revision)?,
            _ => None,
        };
        let moved = self
            .store
            .set_live(service, &target.revision, &format!("{word} to {label}"))
            .map_err(|error| ActionError::Internal(format!("{error:#}")))?;
        let from = match moved.from {
            Some(from) => {
                Some(self.view(&self.store.deployment(service, &from).map_err(read_error)?))
            }
            None => None,
        };
        let to = self
            .store
            .deployment(service, &moved.to)
            .map_err(read_error)?;
        if let Some(runtime) = &self.runtime {
            runtime.promoted(service);
        }
        Ok(Reply::Moved(Box::new(MoveView {
            service: service.to_owned(),
            from,
            to: self.view(&to),
            check: checked,
        })))
    }

    /// The view of a deployment, with its DNS name.
    pub fn view(&self, deployment: &Deployment) -> DeploymentView {
        let short = deployment.revision.short(7);
        DeploymentView {
            revision: deployment.revision.to_hex(),
            dns_name: format!("{short}.{}.{}", deployment.service, self.zone),
            short,
            source_commit: deployment.source_commit.clone(),
            subject: deployment.subject.clone(),
            source_ref: deployment.source_ref.clone(),
            status: deployment.status.to_string(),
            image_size: deployment.image.as_ref().map(|i| i.size),
            image_sha256: deployment.image.as_ref().map(|i| i.sha256.clone()),
            time: deployment.time,
            live: deployment.live,
        }
    }
}

/// Maps a store read error onto an action error.
pub fn read_error(error: revboot_store::ReadError) -> ActionError {
    use revboot_store::ReadError as E;
    match error {
        E::InvalidService(_) => ActionError::Invalid(error.to_string()),
        E::UnknownService(_) | E::UnknownRevision(_) | E::NotADeployment { .. } => {
            ActionError::NotFound(error.to_string())
        }
        E::NoImage { .. } => ActionError::Conflict(error.to_string()),
        other => ActionError::Internal(error_chain(&other)),
    }
}

/// Maps a store resolve error onto an action error.
pub fn resolve_error(error: ResolveError) -> ActionError {
    match error {
        ResolveError::InvalidService(_) | ResolveError::InvalidLabel { .. } => {
            ActionError::Invalid(error.to_string())
        }
        ResolveError::UnknownService(_)
        | ResolveError::NoLive { .. }
        | ResolveError::UnknownLabel { .. } => ActionError::NotFound(error.to_string()),
        ResolveError::Ambiguous { .. } => ActionError::Ambiguous(error.to_string()),
        ResolveError::Read(read) => read_error(read),
        other => ActionError::Internal(error_chain(&other)),
    }
}

/// An error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

//! One error enum per operation of the store.

use std::path::PathBuf;

/// Why a store could not be opened or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// `open` was given a path that holds no repository.
    #[error("No deployment repository at {path}")]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The path holds a repository with a work tree; the store needs a bare one.
    #[error("Repository at {path} is not bare")]
    NotBare {
        /// The path given.
        path: PathBuf,
    },
    /// A file system operation failed.
    #[error("Could not {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// gix could not open or initialise the repository.
    #[error("Could not open repository at {path}")]
    Git {
        /// The path given.
        path: PathBuf,
        /// The cause.
        #[source]
        source: gix::Error,
    },
}

/// Why a deployment, tag or runtime log could not be written. Nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// A service, tag or image name is not allowed.
    #[error("Invalid {what} `{name}`: {reason}")]
    InvalidName {
        /// Which kind of name.
        what: &'static str,
        /// The name given.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A field of the deployment is not acceptable.
    #[error("Invalid deployment: {0}")]
    InvalidDeployment(String),
    /// The writer's check right before the branch moves refused
    /// ([`crate::Store::write_deployment_checked`]): nothing was written.
    #[error("The deployment of `{service}` was not written: {reason}")]
    Refused {
        /// The service.
        service: String,
        /// What the check said.
        reason: String,
    },
    /// The manifest of a successful build does not parse or validate.
    #[error("Manifest of a successful build is invalid")]
    Manifest(#[source] crate::ManifestError),
    /// An image is larger than the store accepts.
    #[error("Image `{name}` exceeds {limit} bytes")]
    ImageTooLarge {
        /// The image name.
        name: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// Reading an image from its reader failed.
    #[error("Could not read image `{name}`")]
    ReadImage {
        /// The image name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The revision to tag is not a deployment of the service.
    #[error("{revision} is not a deployment of `{service}`")]
    NotADeployment {
        /// The service.
        service: String,
        /// The revision given.
        revision: crate::Revision,
    },
    /// A tag of that name exists already and points elsewhere.
    #[error("Tag `{name}` of `{service}` exists and points to another revision")]
    TagExists {
        /// The service.
        service: String,
        /// The tag name.
        name: String,
    },
    /// Another writer kept the ref moving; the update was retried and gave up.
    #[error("Ref {reference} kept changing under {attempts} attempts")]
    Conflict {
        /// The ref.
        reference: String,
        /// How many attempts were made.
        attempts: u32,
    },
    /// The new name of a service is taken: refs of that name exist.
    #[error("Service `{service}` exists already in the deployment repository")]
    NameTaken {
        /// The name asked for.
        service: String,
    },
    /// Another writer holds the service's write lock for too long.
    #[error("Service `{service}` is locked by another writer")]
    Busy {
        /// The service.
        service: String,
    },
    /// A file system operation failed.
    #[error("Could not {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A repository operation failed.
    #[error("Could not {action}")]
    Git {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: gix::Error,
    },
    /// Reading the repository failed.
    #[error("Could not read the repository")]
    Read(#[from] ReadError),
}

impl WriteError {
    /// Turns the error of a file system step into [`WriteError::Io`], for `map_err`.
    pub(crate) fn io(
        action: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> WriteError {
        let path = path.to_owned();
        move |source| WriteError::Io {
            action,
            path,
            source,
        }
    }

    /// Whether the write failed because the file system of the repository is full (or the
    /// quota is used up). Nothing was changed and no object of the write was left behind;
    /// the same write can succeed once space is free.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            WriteError::Io { source, .. } => io_out_of_space(source),
            WriteError::Git { source, .. } => out_of_space(source),
            _ => false,
        }
    }
}

fn io_out_of_space(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Whether a gix error was caused by a full file system.
pub(crate) fn out_of_space(error: &gix::Error) -> bool {
    error
        .iter_errors()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(io_out_of_space)
}

/// Why the live pointer could not be moved. It was left where it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LiveError {
    /// The service name is not allowed.
    #[error("Invalid service name `{0}`")]
    InvalidService(String),
    /// The reason is not a single line of text.
    #[error("Invalid reason: {0}")]
    InvalidReason(&'static str),
    /// The revision is not a deployment on the service's branch.
    #[error("{revision} is not a deployment of `{service}`")]
    NotADeployment {
        /// The service.
        service: String,
        /// The revision given.
        revision: crate::Revision,
    },
    /// Writing the ref failed.
    #[error("Could not move the live pointer")]
    Write(#[from] WriteError),
    /// The live authority (a cluster's etcd) refused the move or could not be asked; the
    /// message says which and why.
    #[error("{0}")]
    Refused(String),
}

/// Why something could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The service name is not allowed.
    #[error("Invalid service name `{0}`")]
    InvalidService(String),
    /// The service has no branch.
    #[error("Unknown service `{0}`")]
    UnknownService(String),
    /// The revision is not in the repository.
    #[error("Unknown revision {0}")]
    UnknownRevision(crate::Revision),
    /// The revision is not a deployment of the service.
    #[error("{revision} is not a deployment of `{service}`")]
    NotADeployment {
        /// The service.
        service: String,
        /// The revision given.
        revision: crate::Revision,
    },
    /// The deployment has no image of that name (failed builds have none).
    #[error("Revision {revision} has no image{}", name.as_deref().map(|n| format!(" `{n}`")).unwrap_or_default())]
    NoImage {
        /// The revision.
        revision: crate::Revision,
        /// The name asked for, `None` for the boot image.
        name: Option<String>,
    },
    /// A commit or tree does not follow the deployment protocol.
    #[error("Revision {revision} is malformed: {reason}")]
    Malformed {
        /// The revision.
        revision: crate::Revision,
        /// What is wrong.
        reason: String,
    },
    /// A materialised image did not match its recorded hash.
    #[error("Image of {revision} has sha256 {actual}, its commit records {recorded}")]
    HashMismatch {
        /// The revision.
        revision: crate::Revision,
        /// The hash in the commit.
        recorded: String,
        /// The hash of the bytes.
        actual: String,
    },
    /// A file system operation failed.
    #[error("Could not {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A repository operation failed.
    #[error("Could not {action}")]
    Git {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: gix::Error,
    },
}

/// Why a DNS label did not resolve to a revision.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The service name is not a valid DNS label.
    #[error("Invalid service name `{0}`")]
    InvalidService(String),
    /// The label is longer than a DNS label may be, or holds characters a label cannot.
    #[error("Invalid label `{label}`: {reason}")]
    InvalidLabel {
        /// The label given.
        label: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The service has no branch.
    #[error("Unknown service `{0}`")]
    UnknownService(String),
    /// The service has no live revision yet.
    #[error("Service `{service}` has no live revision")]
    NoLive {
        /// The service.
        service: String,
    },
    /// Nothing matches the label.
    #[error("Unknown label `{label}` for service `{service}`")]
    UnknownLabel {
        /// The service.
        service: String,
        /// The label.
        label: String,
    },
    /// The label matches more than one revision.
    #[error("Label `{label}` of `{service}` is ambiguous: {}", candidates.join(", "))]
    Ambiguous {
        /// The service.
        service: String,
        /// The label.
        label: String,
        /// What it matches, each as `<revision> (<rule>)`.
        candidates: Vec<String>,
    },
    /// Reading the repository failed.
    #[error("Could not read the repository")]
    Read(#[from] ReadError),
}

/// Why a maintenance operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MaintenanceError {
    /// `git` could not be started.
    #[error("Could not run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `git repack` exited with an error.
    #[error("git repack failed ({status}): {stderr}")]
    Failed {
        /// The exit status.
        status: String,
        /// The tail of its error output.
        stderr: String,
    },
    /// Another repack runs; it was not waited for.
    #[error("Another repack is running")]
    Busy,
    /// A file system operation failed.
    #[error("Could not {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

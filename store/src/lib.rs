//! The revboot deployment repository.
//!
//! A bare git repository, written through gix and readable by stock `git`, that holds one
//! commit per build of each service, the live pointer per service, tags, and runtime logs on
//! a separate ref. [`Store`] is the only way the rest of revboot touches it.
//!
//! # Repository layout
//!
//! - `refs/heads/<service>`: the build history of the service, one commit per build
//!   (succeeded, failed or interrupted), parent = the previous build.
//! - `refs/live/<service>`: the revision `<service>.<zone>` answers with. Every move is a
//!   reflog entry (`git reflog refs/live/<service>`); the repository is created with
//!   `core.logAllRefUpdates = always`, so a push by stock git leaves one too, and the store
//!   honours it on its next call.
//! - `refs/tags/<service>/<name>`: annotated tags naming deployments.
//! - `refs/revboot/logs/<service>`: runtime logs, one commit per instance (see below).
//! - `refs/revboot/deleted/<service>/<unix ms>/…`: the refs of a service deleted with its
//!   deployments kept ([`Store::delete_service`]); a rename ([`Store::rename_service`])
//!   moves every ref of a service, reflogs included, and rewrites no commit.
//! - `revboot/`: the store's private files (writer locks, image spools); git ignores them.
//! - `HEAD` names a service branch, so that `git clone` checks one out: the first service
//!   written, or, when the branch it named is gone, the next one written (or the first
//!   branch found when the store opens).
//!
//! Deployments may also be pushed with stock git (a CI's prebuilt images):
//! [`Store::check_push`] says whether a push's updates follow the protocol below.
//!
//! # The deployment tree protocol
//!
//! 1. The tree has `build.log` (always), `revboot.toml` (when the source commit had one)
//!    and, for a successful build only, `image/<name>` (mode 100755) per image.
//! 2. The message is the source commit's subject, a blank line and trailers:
//!    `Build-Status: succeeded|failed|interrupted`, `Source-Commit: <40 hex>`,
//!    `Source-Repo: <name>`, optionally `Source-Ref: <ref>`, and one
//!    `Image: <name> <size> <sha256>` per image, the boot image first.
//! 3. Images are streamed from their reader into a spool file (hashing sha256 on the way),
//!    then into a loose blob; no image is held in memory while it is written.
//! 4. Blobs, trees and the commit are written first, into a quarantine directory of their
//!    own; under a per-service writer lock they are linked into `objects/` and the branch
//!    moves by compare-and-swap. A write that fails — the disk is full
//!    ([`WriteError::is_out_of_space`]), the branch cannot move — leaves no object behind,
//!    so the space it took is free again at once. A writer killed at any point leaves either
//!    the whole deployment on the branch or none of it (plus, killed between linking and the
//!    ref update, unreachable objects that `git gc` collects). Ref locks, image spools,
//!    quarantines and temporary objects left by a killed writer are detected and removed.
//!
//! # Labels
//!
//! A DNS label names a revision of a service by any of: a ≥7-hex prefix of the deployment
//! commit, a ≥7-hex prefix of the source commit (its newest successful deployment), a tag
//! made DNS-safe (`v1.0` → `v1-0`), or the source branch made DNS-safe (`feature/x` →
//! `feature-x`; its newest successful deployment). Where a source commit or branch has no
//! successful build, its newest build is named (callers see it has no image). Labels are
//! case-insensitive and at most 63 bytes; one that names two revisions is refused with the
//! candidates listed, never guessed. No label means live. [`Store::labels`] hands out the
//! labels that name a revision, each checked to resolve back to it. Which service and label
//! a host name designates (`<label>.<service>.<zone>`, `<service>.<zone>`) is the [`name`]
//! module's grammar, shared by the DNS front end and the proxy's front door.
//! Resolution runs on an in-memory index that checks on every call whether any ref moved —
//! one non-blocking read of an inotify queue watching the ref directories and
//! `packed-refs`, or, where inotify is unavailable, `stat` of `packed-refs`, `refs/heads`,
//! `refs/live` and the service's tag directory — so changes by other processes and stock
//! git are seen on the next call.
//!
//! # Runtime logs
//!
//! [`Store::append_runtime_log`] adds one commit per instance record to
//! `refs/revboot/logs/<service>` with a tree of `record.toml` and `console.log`. The
//! deployment branches are never touched by it.
//!
//! # Limits
//!
//! - Images up to [`MAX_IMAGE_BYTES`]; reading an image holds it once in memory.
//! - Build logs up to [`MAX_BUILD_LOG_BYTES`], manifests up to [`MAX_MANIFEST_BYTES`].
//! - The index follows at most [`MAX_HISTORY`] commits per service.
//! - Delta compression of similar images needs [`Store::repack`] (stock `git repack`).
//! - The live pointer's trail is the reflog, which `git clone` does not copy.
//! - Runtime logs returned at most [`MAX_RUNTIME_LOGS`] per call; consoles up to
//!   [`MAX_CONSOLE_BYTES`] per record.
//! - Linux only (writer locks are `flock`, stale spools are found through `/proc`).
//!
//! # Example
//!
//! ```
//! use revboot_store::{BuildStatus, ImageInput, NewDeployment, Store};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = Store::init(dir.path().join("deploy.git"))?;
//! let revision = store.write_deployment(NewDeployment {
//!     service: "hello",
//!     status: BuildStatus::Succeeded,
//!     manifest: Some("[build]\ncommand = [\"make\"]\nartifacts = [\"hello\"]\n"),
//!     images: vec![ImageInput { name: "hello".into(), reader: Box::new(&b"\x7fELF"[..]) }],
//!     build_log: b"ok\n",
//!     source_commit: "0123456789abcdef0123456789abcdef01234567",
//!     source_repo: "hello",
//!     source_ref: Some("refs/heads/main"),
//!     subject: "Say hello",
//! })?;
//! store.set_live("hello", &revision, "first deploy")?;
//! assert_eq!(store.resolve("hello", None)?, revision);
//! assert_eq!(store.resolve("hello", Some("0123456"))?, revision);
//! assert_eq!(store.resolve("hello", Some("MAIN"))?, revision);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod diff;
mod error;
pub mod image;
mod incoming;
mod index;
mod lifecycle;
mod live;
mod lock;
mod logs;
pub mod manifest;
pub mod name;
pub mod protocol;
mod quarantine;
mod read;
mod repack;
mod revision;
mod source;
mod store;
#[cfg(test)]
mod test_support;
mod types;
mod write;

pub use error::{LiveError, MaintenanceError, OpenError, ReadError, ResolveError, WriteError};
pub use incoming::{MAX_PUSHED_COMMITS, PushRefused, PushedDeployments, PushedRef};
pub use index::MAX_HISTORY;
pub use lifecycle::{DELETED_PREFIX, RefsChanged};
pub use live::LiveAuthority;
pub use logs::{MAX_CONSOLE_BYTES, MAX_RUNTIME_LOGS};
pub use manifest::{Manifest, ManifestError};
pub use repack::REPACK_TIMEOUT;
pub use revision::{ParseRevisionError, Revision};
pub use source::find_commit;
pub use store::{CAS_ATTEMPTS, Store};
pub use types::{
    BuildStatus, Deployment, DeploymentDiff, ImageInfo, ImageInput, ImageReader, LiveMove,
    NewDeployment, ParseBuildStatusError, RepackReport, RuntimeRecord,
};
pub use write::{MAX_BUILD_LOG_BYTES, MAX_IMAGE_BYTES, MAX_MANIFEST_BYTES};

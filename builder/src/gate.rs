//! What a build's promotion waits for: the new revision booted and checked before live
//! moves to it (the daemon's part; the builder knows nothing of instances).
//!
//! 1. A successful build that would move live, of a recipe with `[deploy] check` or
//!    `[run] min_instances` above 0, is handed to the [`Gate`] first.
//! 2. The gate boots the revision (each of its replicas) and checks it (or, without a
//!    check, waits until it is ready): its lines go to the pusher.
//! 3. Passed: live moves, and the gate hears of it ([`Gate::promoted`]). Failed: live stays
//!    where it was, the pusher reads why, and the push is refused (`git push` exits
//!    non-zero); the deployment stays in the history, and the build's record says why it
//!    did not go live.

use std::future::Future;
use std::pin::Pin;

use revboot_store::{Manifest, Revision};

/// A boxed, sendable future, as [`Gate`] returns.
pub type GateFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<String>, String>> + Send + 'a>>;

/// Decides whether a new deployment may go live (module doc).
pub trait Gate: Send + Sync + std::fmt::Debug + 'static {
    /// Boots `revision` of `service` and checks it by its manifest: lines for the pusher,
    /// or why it may not go live.
    fn admit<'a>(
        &'a self,
        service: &'a str,
        revision: Revision,
        manifest: &'a Manifest,
    ) -> GateFuture<'a>;

    /// Live moved to `revision` of `service`.
    fn promoted(&self, service: &str, revision: Revision);
}

/// Whether a promotion to a revision of this recipe goes through the gate.
pub fn gated(manifest: &Manifest) -> bool {
    manifest.deploy.check.is_some() || manifest.run.min_instances > 0
}

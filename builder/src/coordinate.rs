//! A builder that is one node of a cluster (the daemon's part; the builder knows nothing
//! of etcd).
//!
//! 1. A push moves each branch through the [`Coordinator`] before its builds are queued
//!    ([`Coordinator::move_ref`], from what this node had to the pushed commit): refused
//!    (another node took a push of the branch first), nothing is built, and the push of the
//!    branch is refused with the reason, as git refuses a push that is not a fast-forward.
//! 2. A branch whose tip did not build stays where it was here, and is moved back in the
//!    cluster too.
//! 3. Every build runs under the service's build lock ([`Coordinator::lock_builds`]): one
//!    node at a time writes a service's deployment branch, on top of the others' builds
//!    (the coordinator fetches them first). A build of a commit that a deployment of the
//!    service already records (another node built it) adopts that deployment instead.
//!    Right before the deployment is written, with every object in place and only the
//!    branch's move left, the lock is checked ([`Coordinator::check_lock`]): a builder whose
//!    lock expired while its node stalled writes nothing (another node may have built
//!    since), and the build is recorded interrupted, with the reason.
//! 4. A push of a service this node does not have creates it only if the cluster lets it
//!    ([`Coordinator::may_create`]): not one renamed or deleted on another node.

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future, as [`Coordinator`] returns.
pub type CoordinatorFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// What a build lock is: held while it lives.
pub type Held = Box<dyn std::any::Any + Send + Sync>;

/// The cluster as the builder sees it (module doc).
pub trait Coordinator: Send + Sync + std::fmt::Debug + 'static {
    /// Moves `refname` of `service` from `old` to `new` (40 hex; zeros: absent) in the
    /// cluster, or says why not.
    fn move_ref<'a>(
        &'a self,
        service: &'a str,
        refname: &'a str,
        old: &'a str,
        new: &'a str,
    ) -> CoordinatorFuture<'a, ()>;

    /// Takes the build lock of `service` once this node has every deployment of it the
    /// cluster announced; released when the returned value is dropped.
    fn lock_builds<'a>(&'a self, service: &'a str) -> CoordinatorFuture<'a, Held>;

    /// Whether a push may create `service` here, as a push of an unknown service does on a
    /// single host; `Err` says why not (the cluster renamed or deleted it: `revboot service
    /// add` makes it again, on purpose).
    fn may_create<'a>(&'a self, service: &'a str) -> CoordinatorFuture<'a, ()> {
        let _ = service;
        Box::pin(async { Ok(()) })
    }

    /// Whether `held`, taken by [`Coordinator::lock_builds`], is still this node's lock of
    /// `service` (rule 3); else why not. Called on a blocking thread of the runtime.
    fn check_lock<'a>(&'a self, service: &'a str, held: &'a Held) -> CoordinatorFuture<'a, ()>;
}

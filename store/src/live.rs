//! The live pointer and tags: the refs that name a deployment of a service without being its
//! branch.
//!
//! 1. `refs/live/<service>` moves only to a commit on the service's branch, with a reason of
//!    one line (at most 500 bytes) that goes into its reflog (`git reflog refs/live/<service>`).
//! 2. It moves under the service lock by compare-and-swap; [`LiveMove`] says from where.
//! 3. A tag is an annotated tag `refs/tags/<service>/<name>` of a deployment of the service,
//!    carrying its source link; it never moves (tagging the same revision again is a no-op,
//!    another revision is [`WriteError::TagExists`]).

use gix::ObjectId;

use crate::lock::ServiceLock;
use crate::protocol;
use crate::quarantine::Quarantine;
use crate::store::{read_ref, signature};
use crate::types::LiveMove;
use crate::{LiveError, ReadError, Revision, Store, WriteError};

/// Who must agree to a live move before the store makes it: in a cluster, etcd by
/// compare-and-swap. Called from blocking code (never from an async task).
pub trait LiveAuthority: Send + Sync + std::fmt::Debug + 'static {
    /// Moves live of `service` from `from` (what is live here) to `to`, or says why not
    /// (a conflict with the revision live now, or the authority unreachable).
    fn propose(
        &self,
        service: &str,
        from: Option<&Revision>,
        to: &Revision,
        reason: &str,
    ) -> Result<(), String>;
}

impl Store {
    /// Points `refs/live/<service>` at `to`, a deployment of the service; the move is recorded
    /// in the ref's reflog (`git reflog refs/live/<service>`) with `reason`.
    pub fn set_live(
        &self,
        service: &str,
        to: &Revision,
        reason: &str,
    ) -> Result<LiveMove, LiveError> {
        self.move_live(service, to, reason, true)
    }

    /// As [`Store::set_live`], for a move the [`LiveAuthority`] has made already (another
    /// node's): it is not proposed again.
    pub fn mirror_live(
        &self,
        service: &str,
        to: &Revision,
        reason: &str,
    ) -> Result<LiveMove, LiveError> {
        self.move_live(service, to, reason, false)
    }

    fn move_live(
        &self,
        service: &str,
        to: &Revision,
        reason: &str,
        propose: bool,
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
        if let Some(authority) = self.authority().filter(|_| propose) {
            let here = snapshot
                .refs
                .get(&format!("refs/live/{service}"))
                .copied()
                .map(Revision::new);
            authority
                .propose(service, here.as_ref(), to, reason.trim())
                .map_err(LiveError::Refused)?;
        }
        let repo = self.repo();
        let reference = format!("refs/live/{service}");
        let _lock = ServiceLock::acquire(self.path(), service)?;
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
        let _lock = ServiceLock::acquire(self.path(), service)?;
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
        let mut quarantine = Quarantine::create(self.path())?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{deploy, store};
    use std::fs;

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
}

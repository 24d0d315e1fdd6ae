//! A service's whole life in the deployment repository: renaming it, and deleting it with
//! its deployments archived or removed.
//!
//! 1. A service's refs are `refs/heads/<s>` (its history), `refs/live/<s>`,
//!    `refs/tags/<s>/*` and `refs/revboot/logs/<s>` (runtime logs). Both operations take the
//!    writer locks of the names involved (in name order, so two of them cannot wait on each
//!    other) and change every ref in one transaction, each against the value read: a ref
//!    that moved meanwhile fails the whole change, and nothing moves.
//! 2. [`Store::rename_service`] moves every ref to the new name with its reflog, so the live
//!    pointer's trail goes on (`git reflog refs/live/<new>`), with one more entry,
//!    `revboot: renamed from <old>`. No commit or tag object is rewritten: revisions, and
//!    so their labels, stay the same, and `Source-Repo:` trailers and tag messages keep the
//!    name they were made under. The new name must have no ref.
//! 3. [`Store::delete_service`] keeping the deployments moves the refs under
//!    `refs/revboot/deleted/<s>/<unix ms>/` (`heads`, `live`, `logs`, `tags/<name>`),
//!    reflogs included: no label names them any more, `git log` of the archived refs still
//!    shows them (a `git clone --mirror` copies them), and the name is free again.
//! 4. Removing the deployments deletes the refs and their reflogs; their objects are then
//!    unreachable, and `git gc` frees their space (the store never prunes by itself: a
//!    prune could take the objects of a deployment being written at that moment).
//! 5. `HEAD` is pointed at another service's branch when it named the old one.

use std::fs;
use std::path::Path;

use gix::ObjectId;
use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};

use crate::lock::ServiceLock;
use crate::logs::log_ref;
use crate::store::signature;
use crate::{Store, WriteError, protocol};

/// The prefix under which deleted services' refs are kept.
pub const DELETED_PREFIX: &str = "refs/revboot/deleted/";

/// What a rename or delete did to a service's refs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefsChanged {
    /// The service's refs as they were, in name order.
    pub refs: Vec<String>,
    /// Where they went: the new names (rename, or delete keeping the deployments); empty
    /// when they were removed.
    pub moved_to: Vec<String>,
    /// The archive prefix of a delete that kept the deployments.
    pub archive: Option<String>,
}

impl Store {
    /// The refs of `service` (see the module docs), in name order, with what they point at
    /// (not peeled: a tag ref names its tag object).
    pub fn service_refs(&self, service: &str) -> Result<Vec<(String, ObjectId)>, WriteError> {
        check(service)?;
        let repo = self.repo();
        let git = |action| move |source| WriteError::Git { action, source };
        let mut refs = Vec::new();
        for name in [
            format!("refs/heads/{service}"),
            format!("refs/live/{service}"),
            log_ref(service),
        ] {
            if let Some(id) = crate::store::read_ref(&repo, &name)? {
                refs.push((name, id));
            }
        }
        let platform = repo.references().map_err(git("list refs"))?;
        let prefix = format!("refs/tags/{service}/");
        for reference in platform
            .prefixed(prefix.as_str())
            .map_err(git("list refs"))?
        {
            let reference = reference.map_err(git("read a tag ref"))?;
            if let Some(id) = reference.target().try_id() {
                refs.push((reference.name().as_bstr().to_string(), id.to_owned()));
            }
        }
        refs.sort();
        Ok(refs)
    }

    /// Renames `from` to `to`: every ref of the service moves, with its reflog (module docs,
    /// rule 2). A service with no ref is no error (it may have a source repository only):
    /// the answer then lists none.
    pub fn rename_service(&self, from: &str, to: &str) -> Result<RefsChanged, WriteError> {
        check(from)?;
        check(to)?;
        if from == to {
            return Err(WriteError::InvalidName {
                what: "new service name",
                name: to.to_owned(),
                reason: "is the service's name already",
            });
        }
        let (first, second) = if from < to { (from, to) } else { (to, from) };
        let _first = ServiceLock::acquire(self.path(), first)?;
        let _second = ServiceLock::acquire(self.path(), second)?;
        if !self.service_refs(to)?.is_empty() {
            return Err(WriteError::NameTaken {
                service: to.to_owned(),
            });
        }
        let refs = self.service_refs(from)?;
        let heads = format!("refs/heads/{from}");
        let moves: Vec<(String, ObjectId, String)> = refs
            .iter()
            .map(|(name, id)| (name.clone(), *id, renamed(name, from, to)))
            .collect();
        let reason = format!("revboot: renamed from {from}");
        self.move_refs(&moves, &reason)?;
        self.refreshed();
        if self.head_target().as_deref() == Some(heads.as_str()) {
            self.keep_head(to);
        }
        tracing::info!(from, to, refs = refs.len(), "renamed service");
        Ok(RefsChanged {
            refs: refs.into_iter().map(|(name, _)| name).collect(),
            moved_to: moves.into_iter().map(|(_, _, new)| new).collect(),
            archive: None,
        })
    }

    /// Deletes `service` from the deployment repository: its refs move to an archive under
    /// [`DELETED_PREFIX`] (`keep`), or are deleted with their reflogs (module docs, rules 3
    /// and 4). A service with no ref is no error: the answer then lists none.
    pub fn delete_service(&self, service: &str, keep: bool) -> Result<RefsChanged, WriteError> {
        check(service)?;
        let _lock = ServiceLock::acquire(self.path(), service)?;
        let refs = self.service_refs(service)?;
        let heads = format!("refs/heads/{service}");
        let (moved_to, archive) = if keep && !refs.is_empty() {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let archive = format!("{DELETED_PREFIX}{service}/{stamp}/");
            let tags = format!("refs/tags/{service}/");
            let moves: Vec<(String, ObjectId, String)> = refs
                .iter()
                .map(|(name, id)| {
                    let to = if let Some(tag) = name.strip_prefix(&tags) {
                        format!("{archive}tags/{tag}")
                    } else if name.starts_with("refs/heads/") {
                        format!("{archive}heads")
                    } else if name.starts_with("refs/live/") {
                        format!("{archive}live")
                    } else {
                        format!("{archive}logs")
                    };
                    (name.clone(), *id, to)
                })
                .collect();
            self.move_refs(&moves, &format!("revboot: {service} deleted, kept here"))?;
            let moved_to = moves.into_iter().map(|(_, _, to)| to).collect();
            (moved_to, Some(archive))
        } else {
            let edits = refs.iter().map(|(name, id)| delete(name, *id));
            self.transaction(edits)?;
            (Vec::new(), None)
        };
        self.refreshed();
        if self.head_target().as_deref() == Some(heads.as_str())
            && let Some(next) = self.services().ok().and_then(|s| s.into_iter().next())
        {
            self.keep_head(&next);
        }
        tracing::info!(
            service,
            refs = refs.len(),
            archive = archive.as_deref().unwrap_or("none"),
            "deleted service"
        );
        Ok(RefsChanged {
            refs: refs.into_iter().map(|(name, _)| name).collect(),
            moved_to,
            archive,
        })
    }

    /// Moves each `(old, id, new)` ref in one transaction, with its reflog: the old reflog
    /// is copied to the new name first, and the move appends `reason` to it. If the
    /// transaction fails, the copies go again.
    fn move_refs(
        &self,
        moves: &[(String, ObjectId, String)],
        reason: &str,
    ) -> Result<(), WriteError> {
        let logs = self.path().join("logs");
        let mut copied = Vec::new();
        let copy = |from: &Path, to: &Path| -> Result<(), WriteError> {
            let io = |action, path: &Path| {
                let path = path.to_owned();
                move |source| WriteError::Io {
                    action,
                    path,
                    source,
                }
            };
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(io("create", parent))?;
            }
            fs::copy(from, to).map_err(io("copy the reflog to", to))?;
            Ok(())
        };
        let mut result = Ok(());
        for (old, _, new) in moves {
            let (from, to) = (logs.join(old), logs.join(new));
            if from.is_file() {
                result = copy(&from, &to);
                if result.is_err() {
                    break;
                }
                copied.push(to);
            }
        }
        if result.is_ok() {
            let edits = moves.iter().flat_map(|(old, id, new)| {
                [
                    delete(old, *id),
                    RefEdit {
                        change: Change::Update {
                            log: LogChange {
                                mode: RefLog::AndReference,
                                force_create_reflog: true,
                                message: reason.into(),
                            },
                            expected: PreviousValue::MustNotExist,
                            new: gix::refs::Target::Object(*id),
                        },
                        name: new.as_str().try_into().expect("names made from valid refs"),
                        deref: false,
                    },
                ]
            });
            result = self.transaction(edits);
        }
        if result.is_err() {
            for path in copied {
                let _ = fs::remove_file(path);
            }
        }
        result
    }

    fn transaction(&self, edits: impl IntoIterator<Item = RefEdit>) -> Result<(), WriteError> {
        let signature = signature();
        let mut time = gix::date::parse::TimeBuf::default();
        self.repo()
            .edit_references_as(edits, Some(signature.to_ref(&mut time)))
            .map_err(|source| WriteError::Git {
                action: "move the service's refs (a ref moved meanwhile, or could not be locked; nothing changed)",
                source,
            })?;
        Ok(())
    }

    /// The ref `HEAD` names, if it is symbolic.
    fn head_target(&self) -> Option<String> {
        let head = fs::read_to_string(self.path().join("HEAD")).ok()?;
        head.trim().strip_prefix("ref: ").map(str::to_owned)
    }
}

fn check(service: &str) -> Result<(), WriteError> {
    protocol::check_label(service).map_err(|reason| WriteError::InvalidName {
        what: "service",
        name: service.to_owned(),
        reason,
    })
}

/// The name `name`, a ref of service `from`, takes for service `to`.
fn renamed(name: &str, from: &str, to: &str) -> String {
    let tags = format!("refs/tags/{from}/");
    if let Some(tag) = name.strip_prefix(&tags) {
        return format!("refs/tags/{to}/{tag}");
    }
    let base = name
        .strip_suffix(from)
        .expect("the other refs of a service end with its name");
    format!("{base}{to}")
}

fn delete(name: &str, id: ObjectId) -> RefEdit {
    RefEdit {
        change: Change::Delete {
            expected: PreviousValue::MustExistAndMatch(gix::refs::Target::Object(id)),
            log: RefLog::AndReference,
        },
        name: name.try_into().expect("names read from the repository"),
        deref: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{deploy, store};
    use crate::{Revision, RuntimeRecord};

    fn record(revision: Revision) -> RuntimeRecord {
        RuntimeRecord {
            revision,
            client: None,
            started_at_ms: 1,
            boot_ms: Some(1),
            lifetime_ms: 10,
            outcome: "stopped: by operator".into(),
            console: b"hi\n".to_vec(),
        }
    }

    fn git(store: &Store, args: &[&str]) -> String {
        let output = std::process::Command::new("git")
            .arg("-C")
            .arg(store.path())
            .args(args)
            .output()
            .expect("git runs");
        assert!(output.status.success(), "{args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    #[test]
    fn rename_moves_every_ref_with_its_trail_and_keeps_revisions() {
        let (_dir, store) = store();
        let one = deploy(&store, "hello", 1, Some(b"one"));
        let two = deploy(&store, "hello", 2, Some(b"two"));
        deploy(&store, "other", 1, Some(b"one"));
        store.set_live("hello", &one, "deploy").expect("live");
        store.set_live("hello", &two, "deploy").expect("live");
        store.tag("hello", "v1", &one).expect("tag");
        store
            .append_runtime_log("hello", &record(two))
            .expect("log");
        // Packed refs must move too.
        git(&store, &["pack-refs", "--all"]);
        let changed = store.rename_service("hello", "greet").expect("rename");
        assert_eq!(changed.refs.len(), 4, "{changed:?}");
        assert!(store.service_refs("hello").expect("refs").is_empty());
        assert_eq!(store.resolve("greet", None).expect("live"), two);
        assert_eq!(store.resolve("greet", Some("v1")).expect("tag"), one);
        assert_eq!(
            store.resolve("greet", Some(&one.short(7))).expect("prefix"),
            one
        );
        assert!(store.resolve("hello", None).is_err());
        assert_eq!(store.history("greet").expect("history").len(), 2);
        assert_eq!(store.runtime_logs("greet").expect("logs").len(), 1);
        let reflog = git(&store, &["reflog", "show", "refs/live/greet"]);
        assert_eq!(reflog.lines().count(), 3, "{reflog}");
        assert!(reflog.contains("renamed from hello"), "{reflog}");
        assert_eq!(store.services().expect("services"), ["greet", "other"]);
        assert!(git(&store, &["symbolic-ref", "HEAD"]).contains("refs/heads/greet"));
        git(&store, &["fsck", "--no-dangling"]);
    }

    #[test]
    fn rename_refuses_a_taken_or_bad_name_and_changes_nothing() {
        let (_dir, store) = store();
        deploy(&store, "hello", 1, Some(b"one"));
        deploy(&store, "other", 1, Some(b"one"));
        let before = git(&store, &["for-each-ref"]);
        assert!(matches!(
            store.rename_service("hello", "other"),
            Err(WriteError::NameTaken { .. })
        ));
        for bad in ["Hello", "a_b", "", "-x"] {
            assert!(matches!(
                store.rename_service("hello", bad),
                Err(WriteError::InvalidName { .. })
            ));
        }
        assert!(matches!(
            store.rename_service("hello", "hello"),
            Err(WriteError::InvalidName { .. })
        ));
        assert_eq!(git(&store, &["for-each-ref"]), before);
    }

    #[test]
    fn delete_keeps_an_archive_or_removes_everything() {
        let (_dir, store) = store();
        let one = deploy(&store, "hello", 1, Some(b"one"));
        store.set_live("hello", &one, "deploy").expect("live");
        store.tag("hello", "v1", &one).expect("tag");
        deploy(&store, "other", 1, Some(b"one"));
        let kept = store.delete_service("hello", true).expect("delete");
        let archive = kept.archive.clone().expect("an archive");
        assert!(store.resolve("hello", None).is_err());
        assert_eq!(store.services().expect("services"), ["other"]);
        let log = git(&store, &["log", "--format=%H", &format!("{archive}heads")]);
        assert_eq!(log.trim(), one.to_hex());
        let reflog = git(&store, &["reflog", "show", &format!("{archive}live")]);
        assert!(reflog.contains("deleted, kept here"), "{reflog}");
        assert!(git(&store, &["symbolic-ref", "HEAD"]).contains("refs/heads/other"));

        // The name is free again; removing leaves nothing of the new service.
        let two = deploy(&store, "hello", 2, Some(b"two"));
        store.set_live("hello", &two, "deploy").expect("live");
        let removed = store.delete_service("hello", false).expect("delete");
        assert_eq!(removed.refs.len(), 2);
        assert!(removed.moved_to.is_empty());
        assert!(store.service_refs("hello").expect("refs").is_empty());
        assert!(!store.path().join("logs/refs/live/hello").exists());
        // The archive of the first delete is untouched.
        let log = git(&store, &["log", "--format=%H", &format!("{archive}heads")]);
        assert_eq!(log.trim(), one.to_hex());
        git(&store, &["fsck", "--no-dangling"]);
    }
}

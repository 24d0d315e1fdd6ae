//! Deployments pushed with stock git: what a push into the repository must be to be taken.
//!
//! An external CI may push prebuilt deployments to `refs/heads/<service>`. `git
//! receive-pack` keeps a push's objects in a quarantine directory until its `pre-receive`
//! hook accepts it; [`Store::check_push`] reads them there (and the repository's own objects
//! beside them) and says what is wrong, so that a refused push changes nothing. The rules:
//!
//! 1. Only `refs/heads/<service>` (a DNS label) and `refs/live/<service>` may be updated;
//!    nothing may be deleted.
//! 2. A service branch only grows: the new tip's first-parent chain reaches the old tip
//!    (none, for a new service) through at most [`MAX_PUSHED_COMMITS`] commits, each with
//!    one parent (the first deployment of a service has none).
//! 3. Each new commit follows [the deployment tree protocol](crate#the-deployment-tree-protocol):
//!    its tree holds only `revboot.toml`, `build.log` and `image/`; its message has the
//!    `Build-Status`, `Source-Commit`, `Source-Repo` (and optionally `Source-Ref`) trailers
//!    and one `Image: <name> <size> <sha256>` trailer per file in `image/`, the boot image
//!    first, whose size and hash match the file. A successful build has a manifest that
//!    parses and an image the manifest boots, of its tender's kind ([`crate::image::check`]);
//!    a failed one has no image. Sizes are bounded as for the store's own writes.
//! 4. `refs/live/<service>` may name a successful deployment of the service's branch as it
//!    is after the push; with a [`crate::LiveAuthority`] (a cluster), only once it agreed to
//!    the move from the ref's old value.

use std::io::Cursor;
use std::path::Path;

use gix::ObjectId;
use gix::objs::Find as _;
use sha2::{Digest, Sha256};

use crate::protocol;
use crate::types::BuildStatus;
use crate::{MAX_BUILD_LOG_BYTES, MAX_IMAGE_BYTES, MAX_MANIFEST_BYTES, Manifest, Store};

/// The most new deployments one push may bring to a service.
pub const MAX_PUSHED_COMMITS: usize = 64;

/// Why a pushed update is refused. The message is for the pusher.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reference}: {reason}")]
pub struct PushRefused {
    /// The ref the update was for.
    pub reference: String,
    /// What is wrong, on one line.
    pub reason: String,
}

/// One update of a push, as `receive-pack` hands it to its hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedRef {
    /// The ref's value before the push (`None`: it did not exist).
    pub old: Option<ObjectId>,
    /// The value pushed (`None`: a deletion).
    pub new: Option<ObjectId>,
    /// The full ref name.
    pub reference: String,
}

/// What an accepted push brings to a service branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedDeployments {
    /// The service.
    pub service: String,
    /// The new deployment commits, oldest first.
    pub commits: Vec<ObjectId>,
}

/// Objects as a push's hooks see them: the quarantine first, then the repository.
struct Objects {
    quarantine: Option<gix::odb::Handle>,
    repo: gix::Repository,
}

impl Objects {
    fn find(&self, id: ObjectId) -> Option<(gix::objs::Kind, Vec<u8>)> {
        let mut buffer = Vec::new();
        if let Some(quarantine) = &self.quarantine
            && let Ok(Some(data)) = quarantine.try_find(&id, &mut buffer)
        {
            return Some((data.kind, data.data.to_vec()));
        }
        let object = self.repo.find_object(id).ok()?;
        Some((object.kind, object.data.clone()))
    }
}

impl Store {
    /// Checks the updates of a push (see the module docs); `quarantine` is the push's
    /// object directory (`GIT_QUARANTINE_PATH`), which must lie in this repository's
    /// `objects/`. Returns the new deployments per service branch, oldest first.
    pub fn check_push(
        &self,
        quarantine: Option<&Path>,
        updates: &[PushedRef],
    ) -> Result<Vec<PushedDeployments>, PushRefused> {
        let objects_dir = self.path().join("objects");
        let quarantine = match quarantine {
            Some(path) => {
                let inside = path
                    .canonicalize()
                    .ok()
                    .zip(objects_dir.canonicalize().ok())
                    .is_some_and(|(path, objects)| path.starts_with(objects));
                if !inside {
                    return Err(PushRefused {
                        reference: "(push)".into(),
                        reason: format!(
                            "the quarantine {} is not in the repository",
                            path.display()
                        ),
                    });
                }
                Some(
                    gix::odb::at(path, gix::hash::Kind::Sha1).map_err(|error| PushRefused {
                        reference: "(push)".into(),
                        reason: format!("cannot read the pushed objects: {error}"),
                    })?,
                )
            }
            None => None,
        };
        let objects = Objects {
            quarantine,
            repo: self.repo(),
        };
        let mut accepted = Vec::new();
        let mut branch_tips = std::collections::HashMap::new();
        for update in updates {
            let refuse = |reason: String| PushRefused {
                reference: update.reference.clone(),
                reason,
            };
            let Some(new) = update.new else {
                return Err(refuse("deployments are never deleted".into()));
            };
            if let Some(service) = update.reference.strip_prefix("refs/heads/") {
                protocol::check_label(service).map_err(|reason| {
                    refuse(format!("`{service}` is not a service name: {reason}"))
                })?;
                let commits = new_deployments(&objects, update.old, new).map_err(refuse)?;
                for commit in &commits {
                    check_deployment(&objects, *commit).map_err(|reason| {
                        refuse(format!(
                            "commit {}: {reason}",
                            &commit.to_hex().to_string()[..12]
                        ))
                    })?;
                }
                branch_tips.insert(service.to_owned(), new);
                accepted.push(PushedDeployments {
                    service: service.to_owned(),
                    commits,
                });
            } else if let Some(service) = update.reference.strip_prefix("refs/live/") {
                protocol::check_label(service).map_err(|reason| {
                    refuse(format!("`{service}` is not a service name: {reason}"))
                })?;
                let tip = match branch_tips.get(service) {
                    Some(tip) => Some(*tip),
                    None => self.inner_ref(&format!("refs/heads/{service}")),
                };
                let on_branch = tip.is_some_and(|tip| first_parent_reaches(&objects, tip, new));
                if !on_branch {
                    return Err(refuse(format!(
                        "{} is not a deployment of `{service}`",
                        new.to_hex()
                    )));
                }
                let status = read_trailers(&objects, new).map(|(_, t)| t.status);
                if status != Ok(BuildStatus::Succeeded) {
                    return Err(refuse(format!(
                        "{} has no image (its build did not succeed): it cannot be live",
                        new.to_hex()
                    )));
                }
                if let Some(authority) = self.authority() {
                    let from = update.old.map(crate::Revision::new);
                    authority
                        .propose(
                            service,
                            from.as_ref(),
                            &crate::Revision::new(new),
                            "push to refs/live with git",
                        )
                        .map_err(refuse)?;
                }
            } else {
                return Err(refuse(
                    "only refs/heads/<service> (deployments) and refs/live/<service> may be pushed"
                        .into(),
                ));
            }
        }
        Ok(accepted)
    }

    fn inner_ref(&self, name: &str) -> Option<ObjectId> {
        let repo = self.repo();
        let reference = repo.try_find_reference(name).ok().flatten()?;
        reference.target().try_id().map(ToOwned::to_owned)
    }
}

/// The commits from `old` (exclusive) to `new`, oldest first, by first parent (rule 2).
fn new_deployments(
    objects: &Objects,
    old: Option<ObjectId>,
    new: ObjectId,
) -> Result<Vec<ObjectId>, String> {
    let mut commits = Vec::new();
    let mut current = Some(new);
    while let Some(id) = current {
        if Some(id) == old {
            break;
        }
        if commits.len() >= MAX_PUSHED_COMMITS {
            return Err(match old {
                Some(_) => format!(
                    "not a fast-forward of the service's history, or more than {MAX_PUSHED_COMMITS} new deployments in one push"
                ),
                None => format!("more than {MAX_PUSHED_COMMITS} deployments in one push"),
            });
        }
        let parents = parents(objects, id)?;
        if parents.len() > 1 {
            return Err(format!(
                "commit {} is a merge; a service's history is one line of deployments",
                &id.to_hex().to_string()[..12]
            ));
        }
        commits.push(id);
        current = parents.first().copied();
    }
    if let Some(old) = old
        && current != Some(old)
    {
        return Err(format!(
            "not a fast-forward of the service's history ({} is not an ancestor of {}); deployments are only ever added",
            &old.to_hex().to_string()[..12],
            &new.to_hex().to_string()[..12]
        ));
    }
    commits.reverse();
    Ok(commits)
}

fn parents(objects: &Objects, id: ObjectId) -> Result<Vec<ObjectId>, String> {
    let (kind, data) = objects
        .find(id)
        .ok_or_else(|| format!("object {} is missing", id.to_hex()))?;
    if kind != gix::objs::Kind::Commit {
        return Err(format!("{} is a {kind}, not a commit", id.to_hex()));
    }
    let commit = gix::objs::CommitRef::from_bytes(&data, gix::hash::Kind::Sha1)
        .map_err(|error| format!("commit {} does not parse: {error}", id.to_hex()))?;
    Ok(commit.parents().collect())
}

/// Whether `target` is on the first-parent chain of `tip` (bounded by the index's limit).
fn first_parent_reaches(objects: &Objects, tip: ObjectId, target: ObjectId) -> bool {
    let mut current = Some(tip);
    for _ in 0..crate::MAX_HISTORY {
        let Some(id) = current else { return false };
        if id == target {
            return true;
        }
        current = parents(objects, id).ok().and_then(|p| p.first().copied());
    }
    false
}

fn read_trailers(
    objects: &Objects,
    id: ObjectId,
) -> Result<(ObjectId, protocol::Trailers), String> {
    let (_, data) = objects
        .find(id)
        .ok_or_else(|| format!("object {} is missing", id.to_hex()))?;
    let commit = gix::objs::CommitRef::from_bytes(&data, gix::hash::Kind::Sha1)
        .map_err(|error| format!("does not parse: {error}"))?;
    let message =
        std::str::from_utf8(commit.message).map_err(|_| "its message is not UTF-8".to_owned())?;
    let (_, trailers) = protocol::parse_message(message)
        .map_err(|error| format!("its message lacks the deployment trailers ({error})"))?;
    Ok((commit.tree(), trailers))
}

/// The entries of a tree: name, kind, object.
fn tree_entries(
    objects: &Objects,
    tree: ObjectId,
) -> Result<Vec<(String, gix::objs::tree::EntryKind, ObjectId)>, String> {
    let (kind, data) = objects
        .find(tree)
        .ok_or_else(|| format!("tree {} is missing", tree.to_hex()))?;
    if kind != gix::objs::Kind::Tree {
        return Err(format!("{} is not a tree", tree.to_hex()));
    }
    let decoded = gix::objs::TreeRef::from_bytes(&data, gix::hash::Kind::Sha1)
        .map_err(|error| format!("a tree does not parse: {error}"))?;
    Ok(decoded
        .entries
        .iter()
        .map(|e| (e.filename.to_string(), e.mode.kind(), e.oid.to_owned()))
        .collect())
}

fn blob(objects: &Objects, id: ObjectId, what: &str, limit: u64) -> Result<Vec<u8>, String> {
    let (kind, data) = objects
        .find(id)
        .ok_or_else(|| format!("{what} is missing"))?;
    if kind != gix::objs::Kind::Blob {
        return Err(format!("{what} is not a file"));
    }
    if data.len() as u64 > limit {
        return Err(format!("{what} exceeds {limit} bytes"));
    }
    Ok(data)
}

/// Rule 3 for one commit.
fn check_deployment(objects: &Objects, id: ObjectId) -> Result<(), String> {
    use gix::objs::tree::EntryKind;
    let (tree, trailers) = read_trailers(objects, id)?;
    if trailers.source_commit.len() != 40
        || !trailers
            .source_commit
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
    {
        return Err("its Source-Commit trailer is not 40 hex digits".into());
    }
    let mut manifest_text = None;
    let mut images = Vec::new();
    for (name, kind, oid) in tree_entries(objects, tree)? {
        match (name.as_str(), kind) {
            (crate::manifest::FILE_NAME, EntryKind::Blob | EntryKind::BlobExecutable) => {
                let bytes = blob(objects, oid, "revboot.toml", MAX_MANIFEST_BYTES as u64)?;
                let text =
                    String::from_utf8(bytes).map_err(|_| "revboot.toml is not UTF-8".to_owned())?;
                manifest_text = Some(text);
            }
            (protocol::BUILD_LOG, EntryKind::Blob | EntryKind::BlobExecutable) => {
                blob(objects, oid, "build.log", MAX_BUILD_LOG_BYTES as u64)?;
            }
            (protocol::IMAGE_DIR, EntryKind::Tree) => {
                for (name, kind, oid) in tree_entries(objects, oid)? {
                    if !matches!(kind, EntryKind::Blob | EntryKind::BlobExecutable) {
                        return Err(format!("image/{name} is not a file"));
                    }
                    images.push((name, oid));
                }
            }
            (other, _) => {
                return Err(format!(
                    "unexpected `{other}` in its tree (a deployment holds revboot.toml, build.log and image/)"
                ));
            }
        }
    }
    if trailers.status != BuildStatus::Succeeded {
        if !images.is_empty() || !trailers.images.is_empty() {
            return Err(format!("a build that {} has no image", trailers.status));
        }
        return Ok(());
    }
    let Some(text) = manifest_text else {
        return Err("a successful build needs its revboot.toml".into());
    };
    let manifest =
        Manifest::from_toml(&text).map_err(|error| format!("revboot.toml is invalid: {error}"))?;
    let boot = manifest.boot_image();
    if !images.iter().any(|(name, _)| name == boot) {
        return Err(format!("its manifest boots image/{boot}, which is missing"));
    }
    let mut expected = Vec::new();
    let mut boot_bytes = None;
    for (name, oid) in &images {
        let bytes = blob(objects, *oid, &format!("image/{name}"), MAX_IMAGE_BYTES)?;
        let line = format!(
            "Image: {name} {} {}",
            bytes.len(),
            hex::encode(Sha256::digest(&bytes))
        );
        if name == boot {
            expected.insert(0, line);
            boot_bytes = Some(bytes);
        } else {
            expected.push(line);
        }
    }
    let given: Vec<String> = trailers
        .images
        .iter()
        .map(|i| format!("Image: {} {} {}", i.name, i.size, i.sha256))
        .collect();
    if given.first() != expected.first() || {
        let (mut a, mut b) = (given.clone(), expected.clone());
        a.sort();
        b.sort();
        a != b
    } {
        return Err(format!(
            "its Image trailers do not describe image/ (boot image first); they should read: {}",
            expected.join(" | ")
        ));
    }
    let bytes = boot_bytes.expect("the boot image was read above");
    crate::image::check(boot, manifest.run.tender, Cursor::new(bytes))
        .map_err(|error| error.to_string())?;
    Ok(())
}

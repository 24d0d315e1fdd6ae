//! A write's objects kept apart until its ref moves, as `git receive-pack` keeps a push's
//! (`GIT_QUARANTINE_PATH`).
//!
//! 1. A write makes `<repo>/revboot/tmp/objects-<pid>-<n>/` and writes every object it makes
//!    there as a loose object (images, log, manifest, trees, then the commit); nothing of it
//!    is in `objects/` yet, so nothing there has to be found and removed if it fails.
//! 2. Holding the service's lock and then the objects lock ([`crate::lock`]), the write makes
//!    the fan-out directories its objects need in `objects/` and hard-links each object in
//!    that is not there loose already (a link never replaces a file, and it needs no space for
//!    the object's bytes). Then the ref moves.
//! 3. If the ref cannot move (the disk is full, the ref kept moving), the objects this write
//!    linked in are removed again: they were not loose in the repository before, and no other
//!    store writer can have come to rely on them, since all of them link under the objects
//!    lock. A commit made for a tip that moved meanwhile is taken back the same way before the
//!    next attempt.
//! 4. The quarantine directory is removed when the write ends, however it ends, so a failed
//!    write leaves no object behind and the space it took is free again at once. One left by a
//!    killed writer is removed on the next open ([`crate::lock::sweep_spools`]).
//!
//! Removing unreachable objects after a failure instead would race with other writers: an
//! object that a failed write made may be one that a concurrent write (another service's
//! deployment of the same image or manifest) found present and used. Stock git writing into
//! the repository does not take the objects lock; it never removes objects, and only a push of
//! the very same object into the deployment repository in the instant a write takes its
//! objects back could miss one.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use gix::ObjectId;
use gix::objs::Write as _;

use crate::WriteError;

static QUARANTINE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The objects of one write, outside the repository until [`Quarantine::link_in`].
pub(crate) struct Quarantine {
    dir: PathBuf,
    objects: PathBuf,
    store: gix::odb::loose::Store,
    /// Written here, not linked in.
    pending: Vec<ObjectId>,
    /// Linked into `objects/` by this write (they were not there before).
    linked: Vec<ObjectId>,
}

impl std::fmt::Debug for Quarantine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quarantine")
            .field("dir", &self.dir)
            .field("pending", &self.pending.len())
            .field("linked", &self.linked.len())
            .finish()
    }
}

impl Quarantine {
    /// Makes an empty quarantine for a write to the repository at `repo`.
    pub(crate) fn create(repo: &Path) -> Result<Quarantine, WriteError> {
        let dir = crate::lock::spool_dir(repo).join(format!(
            "objects-{}-{}",
            std::process::id(),
            QUARANTINE_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).map_err(WriteError::io("create quarantine", &dir))?;
        Ok(Quarantine {
            store: gix::odb::loose::Store::at(&dir, gix::hash::Kind::Sha1),
            objects: repo.join("objects"),
            dir,
            pending: Vec::new(),
            linked: Vec::new(),
        })
    }

    fn written(&mut self, id: ObjectId) -> ObjectId {
        if !self.pending.contains(&id) && !self.linked.contains(&id) {
            self.pending.push(id);
        }
        id
    }

    /// Writes an object (a tree, a commit, a tag) into the quarantine.
    pub(crate) fn write(
        &mut self,
        object: &dyn gix::objs::WriteTo,
        action: &'static str,
    ) -> Result<ObjectId, WriteError> {
        let id = self
            .store
            .write(object)
            .map_err(|source| WriteError::Git { action, source })?;
        Ok(self.written(id))
    }

    /// Writes a blob into the quarantine.
    pub(crate) fn write_blob(
        &mut self,
        bytes: &[u8],
        action: &'static str,
    ) -> Result<ObjectId, WriteError> {
        let id = self
            .store
            .write_buf(gix::objs::Kind::Blob, bytes)
            .map_err(|source| WriteError::Git { action, source })?;
        Ok(self.written(id))
    }

    /// Streams a blob of `size` bytes into the quarantine.
    pub(crate) fn write_blob_stream(
        &mut self,
        size: u64,
        reader: &mut dyn Read,
        action: &'static str,
    ) -> Result<ObjectId, WriteError> {
        let id = self
            .store
            .write_stream(gix::objs::Kind::Blob, size, reader)
            .map_err(|source| WriteError::Git { action, source })?;
        Ok(self.written(id))
    }

    fn loose_path(root: &Path, id: &ObjectId) -> PathBuf {
        let hex = id.to_hex().to_string();
        root.join(&hex[..2]).join(&hex[2..])
    }

    /// Links every object written since the last call into `objects/`. The caller holds the
    /// objects lock. On failure, what this call linked is taken back out.
    pub(crate) fn link_in(&mut self) -> Result<(), WriteError> {
        let io = WriteError::io;
        // Directories first: should one not fit on the disk, nothing is linked yet.
        for id in &self.pending {
            let dir = self.objects.join(&id.to_hex().to_string()[..2]);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(io("create object directory", &dir)(error)),
            }
        }
        let before = self.linked.len();
        while let Some(id) = self.pending.pop() {
            let from = Quarantine::loose_path(&self.dir, &id);
            let to = Quarantine::loose_path(&self.objects, &id);
            match fs::hard_link(&from, &to) {
                Ok(()) => self.linked.push(id),
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(error) => {
                    self.pending.push(id);
                    let failed = io("link object into", &to)(error);
                    while self.linked.len() > before {
                        let id = self.linked.pop().expect("longer than before");
                        self.unlink(id);
                    }
                    return Err(failed);
                }
            }
        }
        Ok(())
    }

    /// Removes one object this write linked in (its quarantined copy stays, for a retry).
    pub(crate) fn take_back(&mut self, id: ObjectId) {
        if let Some(position) = self.linked.iter().position(|linked| *linked == id) {
            self.linked.remove(position);
            self.unlink(id);
        }
    }

    /// Removes every object this write linked in. The caller holds the objects lock.
    pub(crate) fn take_back_all(&mut self) {
        while let Some(id) = self.linked.pop() {
            self.unlink(id);
        }
    }

    fn unlink(&mut self, id: ObjectId) {
        let path = Quarantine::loose_path(&self.objects, &id);
        if let Err(error) = fs::remove_file(&path) {
            tracing::warn!(%error, path = %path.display(), "cannot take an object back out");
        }
        self.pending.push(id);
    }
}

impl Drop for Quarantine {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_dir_all(&self.dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, dir = %self.dir.display(), "cannot remove a quarantine");
        }
    }
}

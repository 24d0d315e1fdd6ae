//! Reading deployments back: labels resolved to revisions, history, the files of a
//! deployment's tree, diffs and images.
//!
//! 1. Labels, history and single deployments come from the in-memory index (checked on every
//!    call for refs that moved); see [Labels](crate#labels) for the rules.
//! 2. Files are read from a deployment's tree (`revboot.toml`, `build.log`, `image/<name>`);
//!    an image's size is checked against what its commit records.
//! 3. [`Store::materialize_image`] writes the boot image once per hash, checked, and links it
//!    into place without ever replacing a file.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use gix::ObjectId;
use sha2::{Digest, Sha256};

use crate::index::Snapshot;
use crate::protocol;
use crate::types::{Deployment, DeploymentDiff, ImageInfo, ImageReader};
use crate::{Manifest, ReadError, ResolveError, Revision, Store};

impl Store {
    /// Resolves a DNS label to a revision of `service` (`None`: the live revision).
    ///
    /// Rules, all tried at once: a ≥7-hex prefix of a deployment commit; a ≥7-hex prefix of a
    /// source commit (its newest successful deployment, or its newest deployment when none
    /// succeeded); a tag; a source branch made DNS-safe (likewise). Case-insensitive. A label
    /// that names two revisions is [`ResolveError::Ambiguous`].
    pub fn resolve(&self, service: &str, label: Option<&str>) -> Result<Revision, ResolveError> {
        let snapshot = self.snapshot_for(Some(service))?;
        snapshot.resolve(service, label).map(Revision::new)
    }

    /// Every label that resolves to `revision` within `service`: the shortest unambiguous
    /// deployment prefix, the shortest source prefix that names it, its branch label and its
    /// tags, where each of them names exactly this revision.
    pub fn labels(&self, service: &str, revision: &Revision) -> Result<Vec<String>, ReadError> {
        protocol::check_label(service)
            .map_err(|_| ReadError::InvalidService(service.to_owned()))?;
        Ok(self
            .snapshot_for(Some(service))?
            .labels(service, revision.id()))
    }

    /// The services, i.e. the branches whose names are DNS labels.
    pub fn services(&self) -> Result<Vec<String>, ReadError> {
        Ok(self.snapshot()?.services.keys().cloned().collect())
    }

    /// The newest deployment of `service` (the tip of its branch), if it has one.
    pub fn tip(&self, service: &str) -> Result<Option<Revision>, ReadError> {
        let snapshot = self.snapshot_for(Some(service))?;
        let index = service_index(&snapshot, service)?;
        Ok(index.history.first().map(|meta| Revision::new(meta.id)))
    }

    /// True when `revision` is a deployment on `service`'s branch here.
    pub fn has_deployment(&self, service: &str, revision: &Revision) -> bool {
        self.snapshot_for(Some(service))
            .ok()
            .and_then(|snapshot| {
                service_index(&snapshot, service)
                    .ok()
                    .map(|index| index.position(&revision.id()).is_some())
            })
            .unwrap_or(false)
    }

    /// The builds of `service`, newest first.
    pub fn history(&self, service: &str) -> Result<Vec<Deployment>, ReadError> {
        let snapshot = self.snapshot_for(Some(service))?;
        let index = service_index(&snapshot, service)?;
        Ok((0..index.history.len())
            .map(|position| index.deployment(service, position))
            .collect())
    }

    /// One build of `service`.
    pub fn deployment(&self, service: &str, revision: &Revision) -> Result<Deployment, ReadError> {
        let snapshot = self.snapshot_for(Some(service))?;
        let index = service_index(&snapshot, service)?;
        let position = index
            .position(&revision.id())
            .ok_or_else(|| ReadError::NotADeployment {
                service: service.to_owned(),
                revision: *revision,
            })?;
        Ok(index.deployment(service, position))
    }

    /// The raw `revboot.toml` of a deployment, if it has one.
    pub fn manifest_text(&self, revision: &Revision) -> Result<Option<String>, ReadError> {
        let repo = self.repo();
        let Some(bytes) = read_file(&repo, revision, crate::manifest::FILE_NAME)? else {
            return Ok(None);
        };
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| ReadError::Malformed {
                revision: *revision,
                reason: "revboot.toml is not UTF-8".into(),
            })
    }

    /// The parsed manifest of a deployment, if it has one.
    pub fn manifest(&self, revision: &Revision) -> Result<Option<Manifest>, ReadError> {
        let Some(text) = self.manifest_text(revision)? else {
            return Ok(None);
        };
        Manifest::from_toml(&text)
            .map(Some)
            .map_err(|error| ReadError::Malformed {
                revision: *revision,
                reason: error.to_string(),
            })
    }

    /// The build output of a deployment.
    pub fn build_log(&self, revision: &Revision) -> Result<Vec<u8>, ReadError> {
        let repo = self.repo();
        read_file(&repo, revision, protocol::BUILD_LOG)?.ok_or_else(|| ReadError::Malformed {
            revision: *revision,
            reason: "no build.log".into(),
        })
    }

    /// What changed between two deployments of `service`.
    pub fn diff(
        &self,
        service: &str,
        a: &Revision,
        b: &Revision,
    ) -> Result<DeploymentDiff, ReadError> {
        let left = self.deployment(service, a)?;
        let right = self.deployment(service, b)?;
        let text_a = self.manifest_text(a)?.unwrap_or_default();
        let text_b = self.manifest_text(b)?.unwrap_or_default();
        let manifest = crate::diff::unified(
            &text_a,
            &text_b,
            &format!("a/{}", crate::manifest::FILE_NAME),
            &format!("b/{}", crate::manifest::FILE_NAME),
        );
        let size = |d: &Deployment| d.image.as_ref().map(|i| i.size);
        let sha = |d: &Deployment| d.image.as_ref().map(|i| i.sha256.clone());
        Ok(DeploymentDiff {
            manifest,
            image_size: (size(&left), size(&right)),
            image_changed: sha(&left) != sha(&right),
            image_sha256: (sha(&left), sha(&right)),
            status: (left.status, right.status),
            source_commit: (left.source_commit, right.source_commit),
        })
    }

    /// Opens an image of a deployment for reading (`None`: the boot image).
    pub fn open_image(
        &self,
        revision: &Revision,
        name: Option<&str>,
    ) -> Result<ImageReader, ReadError> {
        let repo = self.repo();
        let (info, tree) = image_info(&repo, revision, name)?;
        read_image(&repo, *revision, tree, info, name)
    }

    /// Writes the boot image to `<cache_dir>/<sha256 hex>` (mode 0755) once per hash; returns
    /// the path. The file appears atomically (a link, never over an existing one) and its
    /// hash is checked first.
    pub fn materialize_image(
        &self,
        revision: &Revision,
        cache_dir: &Path,
    ) -> Result<PathBuf, ReadError> {
        // The commit names the hash: a cached image costs no blob read (an image is megabytes
        // to inflate, and every revision of an unchanged image shares one file).
        let repo = self.repo();
        let (info, tree) = image_info(&repo, revision, None)?;
        let target = cache_dir.join(&info.sha256);
        if target.exists() {
            return Ok(target);
        }
        let mut reader = read_image(&repo, *revision, tree, info, None)?;
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| ReadError::Io {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(cache_dir).map_err(io("create", cache_dir))?;
        let mut temp = tempfile::Builder::new()
            .prefix(".partial-")
            .tempfile_in(cache_dir)
            .map_err(io("create temporary file in", cache_dir))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(io("read image for", &target))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            temp.write_all(&buf[..n])
                .map_err(io("write", temp.path()))?;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != reader.info().sha256 {
            return Err(ReadError::HashMismatch {
                revision: *revision,
                recorded: reader.info().sha256.clone(),
                actual,
            });
        }
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o755))
                .map_err(io("chmod", temp.path()))?;
        }
        temp.as_file().sync_all().map_err(io("sync", &target))?;
        // Never over an existing file: another revision of the same image may have put it
        // there meanwhile and be executing it, and a replaced inode would be one that
        // freshly cloned children still hold open for writing (exec fails: text file busy).
        match temp.persist_noclobber(&target) {
            Ok(_) => {
                tracing::info!(revision = %revision, path = %target.display(), "materialised image");
            }
            Err(error) if error.error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => {
                return Err(ReadError::Io {
                    action: "link into",
                    path: target.clone(),
                    source: error.error,
                });
            }
        }
        Ok(target)
    }
}

fn service_index<'a>(
    snapshot: &'a Snapshot,
    service: &str,
) -> Result<&'a crate::index::ServiceIndex, ReadError> {
    snapshot.service(service).map_err(|error| match error {
        ResolveError::InvalidService(s) => ReadError::InvalidService(s),
        _ => ReadError::UnknownService(service.to_owned()),
    })
}

/// What the commit of `revision` records about an image (`None`: the boot image), and the
/// commit's tree.
fn image_info(
    repo: &gix::Repository,
    revision: &Revision,
    name: Option<&str>,
) -> Result<(ImageInfo, ObjectId), ReadError> {
    let meta = crate::index::read_meta(repo, revision.id())?;
    let (_, trailers) = meta.info.map_err(|reason| ReadError::Malformed {
        revision: *revision,
        reason,
    })?;
    let info = match name {
        None => trailers.images.first(),
        Some(name) => trailers.images.iter().find(|i| i.name == name),
    }
    .cloned()
    .ok_or_else(|| ReadError::NoImage {
        revision: *revision,
        name: name.map(str::to_owned),
    })?;
    Ok((info, meta.tree))
}

/// Reads the image `info` describes (asked for as `name`) from `tree`, checking its
/// recorded size.
fn read_image(
    repo: &gix::Repository,
    revision: Revision,
    tree: ObjectId,
    info: ImageInfo,
    name: Option<&str>,
) -> Result<ImageReader, ReadError> {
    let path = format!("{}/{}", protocol::IMAGE_DIR, info.name);
    let bytes = read_tree_file(repo, revision, tree, &path)?.ok_or_else(|| ReadError::NoImage {
        revision,
        name: name.map(str::to_owned),
    })?;
    if bytes.len() as u64 != info.size {
        return Err(ReadError::Malformed {
            revision,
            reason: format!(
                "image `{}` has {} bytes, its commit records {}",
                info.name,
                bytes.len(),
                info.size
            ),
        });
    }
    Ok(ImageReader {
        info,
        bytes: std::io::Cursor::new(bytes),
    })
}

/// Reads the file at `path` (e.g. `image/hello`) in a deployment's tree.
fn read_file(
    repo: &gix::Repository,
    revision: &Revision,
    path: &str,
) -> Result<Option<Vec<u8>>, ReadError> {
    let meta = crate::index::read_meta(repo, revision.id())?;
    read_tree_file(repo, *revision, meta.tree, path)
}

/// Reads the file at `path` in `tree`, which belongs to `revision` (named in errors).
pub(crate) fn read_tree_file(
    repo: &gix::Repository,
    revision: Revision,
    mut tree: ObjectId,
    path: &str,
) -> Result<Option<Vec<u8>>, ReadError> {
    let git = |action| move |source| ReadError::Git { action, source };
    let mut parts = path.split('/').peekable();
    while let Some(part) = parts.next() {
        let object = repo.find_object(tree).map_err(git("read tree"))?;
        let decoded =
            gix::objs::TreeRef::from_bytes(&object.data, gix::hash::Kind::Sha1).map_err(|e| {
                ReadError::Malformed {
                    revision,
                    reason: e.to_string(),
                }
            })?;
        let Some(entry) = decoded.entries.iter().find(|e| e.filename == part) else {
            return Ok(None);
        };
        let id = entry.oid.to_owned();
        if parts.peek().is_none() {
            if !entry.mode.is_blob() {
                return Ok(None);
            }
            let mut blob = repo.find_blob(id).map_err(git("read blob"))?;
            return Ok(Some(blob.take_data()));
        }
        if !entry.mode.is_tree() {
            return Ok(None);
        }
        tree = id;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BuildStatus;
    use crate::test_support::{MANIFEST, deploy, source, store};

    #[test]
    fn history_is_newest_first_with_parents() {
        let (_dir, store) = store();
        let first = deploy(&store, "hello", 1, Some(b"one"));
        let failed = deploy(&store, "hello", 2, None);
        let third = deploy(&store, "hello", 3, Some(b"three"));
        let history = store.history("hello").expect("history");
        let revisions: Vec<Revision> = history.iter().map(|d| d.revision).collect();
        assert_eq!(revisions, vec![third, failed, first]);
        assert_eq!(history[0].parent, Some(failed));
        assert_eq!(history[2].parent, None);
        assert_eq!(history[1].status, BuildStatus::Failed);
        assert_eq!(history[1].image, None);
        let image = history[0].image.as_ref().expect("image");
        assert_eq!(image.size, 5);
        assert_eq!(image.sha256, hex::encode(Sha256::digest(b"three")));
        assert_eq!(history[0].subject, "Change 3");
        assert_eq!(history[0].source_commit, source(3));
        assert_eq!(
            store.services().expect("services"),
            vec!["hello".to_owned()]
        );
    }

    #[test]
    fn files_read_back() {
        let (dir, store) = store();
        let revision = deploy(&store, "hello", 1, Some(b"\x7fELF image"));
        assert_eq!(
            store.manifest_text(&revision).expect("read").as_deref(),
            Some(MANIFEST)
        );
        assert_eq!(
            store
                .manifest(&revision)
                .expect("read")
                .expect("some")
                .boot_image(),
            "hello"
        );
        assert_eq!(store.build_log(&revision).expect("read"), b"build 1\n");
        let mut bytes = Vec::new();
        store
            .open_image(&revision, None)
            .expect("open")
            .read_to_end(&mut bytes)
            .expect("read");
        assert_eq!(bytes, b"\x7fELF image");
        assert!(matches!(
            store.open_image(&revision, Some("other")),
            Err(ReadError::NoImage { .. })
        ));
        let cache = dir.path().join("cache");
        let path = store
            .materialize_image(&revision, &cache)
            .expect("materialise");
        assert_eq!(fs::read(&path).expect("read"), b"\x7fELF image");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).expect("stat").permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            path.file_name().and_then(|n| n.to_str()),
            Some(hex::encode(Sha256::digest(b"\x7fELF image")).as_str())
        );
        assert_eq!(
            store.materialize_image(&revision, &cache).expect("again"),
            path
        );
    }

    #[test]
    fn concurrent_materialisations_of_one_image_never_replace_the_file() {
        use std::os::unix::fs::MetadataExt;
        let (dir, store) = store();
        let bytes = vec![0x7f; 256 * 1024];
        let revisions: Vec<Revision> = (1..=4)
            .map(|n| deploy(&store, "hello", n, Some(&bytes)))
            .collect();
        let cache = dir.path().join("cache");
        for round in 0..10 {
            let cache = cache.join(round.to_string());
            let inodes: Vec<(PathBuf, u64)> = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..8)
                    .map(|i| {
                        let (store, cache, revision) = (&store, &cache, revisions[i % 4]);
                        scope.spawn(move || {
                            let path = store.materialize_image(&revision, cache).expect("ok");
                            let inode = fs::metadata(&path).expect("stat").ino();
                            (path, inode)
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().expect("joins"))
                    .collect()
            });
            let (path, inode) = &inodes[0];
            let now = fs::metadata(path).expect("stat").ino();
            for (other_path, other_inode) in &inodes {
                assert_eq!(other_path, path);
                assert_eq!(*other_inode, now, "the file was replaced after it appeared");
            }
            assert_eq!(*inode, now);
            assert_eq!(fs::read(path).expect("read"), bytes);
            // No partial files are left behind.
            assert_eq!(fs::read_dir(&cache).expect("list").count(), 1);
        }
    }

    #[test]
    fn diff_shows_manifest_and_image_change() {
        let (_dir, store) = store();
        let one = deploy(&store, "hello", 1, Some(b"one"));
        let two = deploy(&store, "hello", 2, Some(b"three"));
        let diff = store.diff("hello", &one, &two).expect("diff");
        assert_eq!(diff.manifest, "");
        assert!(diff.image_changed);
        assert_eq!(diff.image_size, (Some(3), Some(5)));
    }
}

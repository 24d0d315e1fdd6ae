//! Writing one build as a deployment commit ([the deployment tree
//! protocol](crate#the-deployment-tree-protocol)).
//!
//! 1. The deployment is checked before anything is written: names, the source commit, the
//!    status against the images, sizes, and that the manifest boots one of the images.
//! 2. Each image is streamed from its reader into a spool file under `revboot/tmp/`, hashed
//!    on the way, then into a loose blob of the write's quarantine; none is held in memory.
//! 3. The log, the manifest, the trees and the commit go into the quarantine too.
//! 4. Under the service lock the objects are linked in and the branch moves by
//!    compare-and-swap ([`Store::publish`]); then `HEAD` and the index are brought up to date.

use std::fs;
use std::io::{BufReader, Read, Seek, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use gix::ObjectId;
use gix::objs::tree::{Entry, EntryKind};
use sha2::{Digest, Sha256};

use crate::lock::{self, ServiceLock};
use crate::protocol::{self, Trailers};
use crate::quarantine::Quarantine;
use crate::store::commit;
use crate::types::{BuildStatus, ImageInfo, NewDeployment};
use crate::{Manifest, Revision, Store, WriteError};

/// The largest image the store accepts.
pub const MAX_IMAGE_BYTES: u64 = 1 << 30;
/// The largest build log the store accepts.
pub const MAX_BUILD_LOG_BYTES: usize = 64 << 20;
/// The largest manifest the store accepts.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;

static SPOOL_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Writes one build as a commit on `refs/heads/<service>`.
    ///
    /// Images are streamed through a spool file, so an image is never held in memory. The
    /// objects are written to a quarantine and linked into the repository just before the
    /// branch moves ([the deployment tree protocol](crate#the-deployment-tree-protocol)): a
    /// write that fails, for example because the disk is full
    /// ([`WriteError::is_out_of_space`]), leaves no object behind. The branch moves by
    /// compare-and-swap: a concurrent writer's commit becomes the parent.
    pub fn write_deployment(&self, d: NewDeployment<'_>) -> Result<Revision, WriteError> {
        self.write_deployment_checked(d, || Ok(()))
    }

    /// As [`Store::write_deployment`], asking `check` once every object is written and the
    /// service's lock is held, right before the branch moves: an error it returns is
    /// [`WriteError::Refused`], and nothing is written. A node of a cluster checks there
    /// that it still holds the service's build lock, so that the window in which another
    /// node could write the branch too is as small as the store allows.
    pub fn write_deployment_checked(
        &self,
        d: NewDeployment<'_>,
        check: impl FnOnce() -> Result<(), String>,
    ) -> Result<Revision, WriteError> {
        let checked = check_deployment(&d).inspect_err(|error| {
            tracing::warn!(%error, service = d.service, "refused deployment");
        })?;
        let repo = self.repo();
        let mut quarantine = Quarantine::create(self.path())?;

        let mut image_entries = Vec::new();
        let mut infos = Vec::new();
        for image in d.images {
            let (id, info) = self.write_image(&mut quarantine, image)?;
            image_entries.push(Entry {
                mode: EntryKind::BlobExecutable.into(),
                filename: info.name.clone().into(),
                oid: id,
            });
            infos.push(info);
        }
        // The boot image's trailer comes first.
        if let Some(boot) = &checked.boot_image
            && let Some(position) = infos.iter().position(|i| &i.name == boot)
        {
            let info = infos.remove(position);
            infos.insert(0, info);
        }

        let mut entries = Vec::new();
        let log = quarantine.write_blob(d.build_log, "write build log")?;
        entries.push(Entry {
            mode: EntryKind::Blob.into(),
            filename: protocol::BUILD_LOG.into(),
            oid: log,
        });
        if let Some(manifest) = d.manifest {
            let id = quarantine.write_blob(manifest.as_bytes(), "write manifest")?;
            entries.push(Entry {
                mode: EntryKind::Blob.into(),
                filename: crate::manifest::FILE_NAME.into(),
                oid: id,
            });
        }
        if !image_entries.is_empty() {
            image_entries.sort();
            let tree = gix::objs::Tree {
                entries: image_entries,
            };
            let id = quarantine.write(&tree, "write image tree")?;
            entries.push(Entry {
                mode: EntryKind::Tree.into(),
                filename: protocol::IMAGE_DIR.into(),
                oid: id,
            });
        }
        entries.sort();
        let tree = quarantine.write(&gix::objs::Tree { entries }, "write tree")?;

        let trailers = Trailers {
            status: d.status,
            source_commit: checked.source_commit.clone(),
            source_repo: d.source_repo.to_owned(),
            source_ref: d.source_ref.map(str::to_owned),
            images: infos,
        };
        let short = &checked.source_commit[..12];
        let subject = protocol::clean_subject(d.subject, || format!("Build of {short}"));
        let message = protocol::message(&subject, &trailers);
        let reference = format!("refs/heads/{}", d.service);
        let reflog = format!("revboot: build {} of {short}", d.status);

        let _lock = ServiceLock::acquire(self.path(), d.service)?;
        check().map_err(|reason| WriteError::Refused {
            service: d.service.to_owned(),
            reason,
        })?;
        let id = self.publish(
            &repo,
            d.service,
            &mut quarantine,
            &reference,
            &reflog,
            |quarantine, parent| quarantine.write(&commit(tree, parent, &message), "write commit"),
        )?;
        drop(_lock);
        self.keep_head(d.service);
        self.refreshed();
        tracing::info!(service = d.service, revision = %id, status = %d.status, "wrote deployment");
        Ok(Revision::new(id))
    }

    /// Streams one image into a spool file (hashing it), then into a quarantined loose blob.
    fn write_image(
        &self,
        quarantine: &mut Quarantine,
        mut image: crate::types::ImageInput<'_>,
    ) -> Result<(ObjectId, ImageInfo), WriteError> {
        let spool_path = lock::spool_dir(self.path()).join(format!(
            "spool-{}-{}",
            std::process::id(),
            SPOOL_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let io = WriteError::io;
        let spool = Spool(spool_path.clone());
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&spool.0)
            .map_err(io("create spool", &spool_path))?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match image.reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(WriteError::ReadImage {
                        name: image.name,
                        source,
                    });
                }
            };
            size += n as u64;
            if size > MAX_IMAGE_BYTES {
                return Err(WriteError::ImageTooLarge {
                    name: image.name,
                    limit: MAX_IMAGE_BYTES,
                });
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .map_err(io("write spool", &spool_path))?;
        }
        file.rewind().map_err(io("rewind spool", &spool_path))?;
        let mut reader = BufReader::with_capacity(256 << 10, file);
        let id = quarantine.write_blob_stream(size, &mut reader, "write image blob")?;
        drop(spool);
        Ok((
            id,
            ImageInfo {
                name: image.name,
                size,
                sha256: hex::encode(hasher.finalize()),
            },
        ))
    }
}

struct Spool(PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

struct Checked {
    source_commit: String,
    boot_image: Option<String>,
}

fn check_deployment(d: &NewDeployment<'_>) -> Result<Checked, WriteError> {
    let invalid = |what: String| Err(WriteError::InvalidDeployment(what));
    protocol::check_label(d.service).map_err(|reason| WriteError::InvalidName {
        what: "service",
        name: d.service.to_owned(),
        reason,
    })?;
    if d.source_commit.len() != 40 || !d.source_commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return invalid(format!(
            "source commit `{}` is not 40 hex digits",
            d.source_commit.chars().take(80).collect::<String>()
        ));
    }
    let printable =
        |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control());
    if !printable(d.source_repo) || d.source_repo.len() > 200 {
        return invalid("source repo must be a name without whitespace, at most 200 bytes".into());
    }
    if let Some(source_ref) = d.source_ref
        && (!source_ref.starts_with("refs/") || !printable(source_ref) || source_ref.len() > 255)
    {
        return invalid(format!("source ref `{source_ref}` is not a full ref name"));
    }
    match (d.status, d.images.is_empty()) {
        (BuildStatus::Succeeded, true) => {
            return invalid("a successful build needs at least one image".into());
        }
        (BuildStatus::Failed | BuildStatus::Interrupted, false) => {
            return invalid(format!("a build that {} has no images", d.status));
        }
        _ => {}
    }
    let mut names = Vec::new();
    for image in &d.images {
        protocol::check_image_name(&image.name).map_err(|reason| WriteError::InvalidName {
            what: "image",
            name: image.name.clone(),
            reason,
        })?;
        if names.contains(&image.name.as_str()) {
            return invalid(format!("two images are named `{}`", image.name));
        }
        names.push(&image.name);
    }
    if d.build_log.len() > MAX_BUILD_LOG_BYTES {
        return invalid(format!("build log exceeds {MAX_BUILD_LOG_BYTES} bytes"));
    }
    if d.manifest.is_some_and(|m| m.len() > MAX_MANIFEST_BYTES) {
        return invalid(format!("manifest exceeds {MAX_MANIFEST_BYTES} bytes"));
    }
    let mut boot_image = None;
    if d.status == BuildStatus::Succeeded
        && let Some(text) = d.manifest
    {
        let manifest = Manifest::from_toml(text).map_err(WriteError::Manifest)?;
        let boot = manifest.boot_image();
        if !names.contains(&boot) {
            return invalid(format!(
                "the manifest boots `{boot}`, which is not among the images"
            ));
        }
        boot_image = Some(boot.to_owned());
    }
    Ok(Checked {
        source_commit: d.source_commit.to_ascii_lowercase(),
        boot_image,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ReadError;
    use crate::test_support::{MANIFEST, deploy, source, store};
    use crate::types::ImageInput;

    #[test]
    fn failed_build_has_no_image() {
        let (_dir, store) = store();
        let revision = deploy(&store, "hello", 1, None);
        assert!(matches!(
            store.open_image(&revision, None),
            Err(ReadError::NoImage { .. })
        ));
        assert_eq!(store.build_log(&revision).expect("log"), b"build 1\n");
    }

    #[test]
    fn bad_input_changes_nothing() {
        let (_dir, store) = store();
        let good = deploy(&store, "hello", 1, Some(b"one"));
        let bad = |service: &str, source_commit: &str, status: BuildStatus, with_image: bool| {
            let images = if with_image {
                vec![ImageInput {
                    name: "hello".into(),
                    reader: Box::new(&b"x"[..]),
                }]
            } else {
                Vec::new()
            };
            store.write_deployment(NewDeployment {
                service,
                status,
                manifest: Some(MANIFEST),
                images,
                build_log: b"",
                source_commit,
                source_repo: "hello",
                source_ref: None,
                subject: "x",
            })
        };
        let src = source(9);
        assert!(matches!(
            bad("Hello", &src, BuildStatus::Succeeded, true),
            Err(WriteError::InvalidName { .. })
        ));
        assert!(matches!(
            bad("hello", "abc", BuildStatus::Succeeded, true),
            Err(WriteError::InvalidDeployment(_))
        ));
        assert!(matches!(
            bad("hello", &src, BuildStatus::Failed, true),
            Err(WriteError::InvalidDeployment(_))
        ));
        assert!(matches!(
            bad("hello", &src, BuildStatus::Succeeded, false),
            Err(WriteError::InvalidDeployment(_))
        ));
        assert_eq!(store.history("hello").expect("history").len(), 1);
        assert_eq!(
            store
                .resolve("hello", Some(&good.short(7)))
                .expect("resolve"),
            good
        );
    }

    #[test]
    fn boot_image_must_be_an_image() {
        let (_dir, store) = store();
        let result = store.write_deployment(NewDeployment {
            service: "hello",
            status: BuildStatus::Succeeded,
            manifest: Some(MANIFEST),
            images: vec![ImageInput {
                name: "other".into(),
                reader: Box::new(&b"x"[..]),
            }],
            build_log: b"",
            source_commit: &source(1),
            source_repo: "hello",
            source_ref: None,
            subject: "x",
        });
        assert!(
            matches!(result, Err(WriteError::InvalidDeployment(_))),
            "{result:?}"
        );
    }
}

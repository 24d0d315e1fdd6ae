//! Snapshots of ready guests: what a later instance of the same revision restores instead of
//! booting.
//!
//! 1. Where: beside the image in the deployer's image cache, `<image>.snapshots/<deployment
//!    commit>.vmstate` (qemu's migration stream) and `….json` (its [`Meta`]). Never in git:
//!    the stream holds the guest's memory, so it is tied to one qemu and one set of settings
//!    and is rebuilt rather than shared.
//! 2. Made once: after an instance booted cold and passed its readiness probe, with no
//!    client connection yet, the supervisor stops the guest, migrates it over a unix socket
//!    in the instance's scratch directory (the daemon listens, qemu connects; the daemon
//!    writes the file), and resumes it ([`save`]). The file is written then renamed, the
//!    meta last: a half-written snapshot is never found.
//! 3. Keyed by the qemu version (from QMP's greeting), the tender's settings (the machine
//!    arguments, the memory, the kernel command line, the guest port) and the image's
//!    SHA-256. [`find`] refuses a snapshot whose settings or image differ, and a qemu whose
//!    version differs refuses it at restore; the instance then boots cold, the reason goes
//!    on its console (and the log), and its own snapshot replaces the refused one.
//! 4. The directory is the daemon's alone (mode 0700): a stream is a guest's memory.
//! 5. Bounded: a stream longer than the guest's memory and [`SLACK`] is refused while it is
//!    written; every wait has a timeout ([`SAVE_TIMEOUT`]).

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use revboot_store::Revision;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::jail;
use super::qmp::Qmp;

/// The layout of [`Meta`]; a snapshot of another format is refused.
const FORMAT: u32 = 1;
/// Bytes a migration stream may hold beyond the guest's memory (device state, headers).
pub(super) const SLACK: u64 = 16 << 20;
/// How long saving a snapshot may take, from `stop` to the file in place.
pub(super) const SAVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Revisions remembered to have a snapshot, before the set is forgotten and relearnt.
const KNOWN: usize = 4096;

/// What a snapshot was made with, stored beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Meta {
    pub(super) format: u32,
    /// qemu's version, as QMP's greeting gives it.
    pub(super) qemu: String,
    /// The tender's settings ([`super::QemuPrepared::settings`]).
    pub(super) settings: String,
    /// The image's SHA-256, hex.
    pub(super) image_sha256: String,
    /// The stream's length.
    pub(super) bytes: u64,
}

/// A snapshot found for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Found {
    pub(super) revision: Revision,
    pub(super) stream: PathBuf,
    pub(super) meta: Meta,
}

/// Where the snapshot of `revision` booted from `image` is: (stream, meta).
pub(super) fn paths(image: &Path, revision: &Revision) -> (PathBuf, PathBuf) {
    let mut dir = image.as_os_str().to_owned();
    dir.push(".snapshots");
    let dir = PathBuf::from(dir);
    let hex = revision.to_hex();
    (
        dir.join(format!("{hex}.vmstate")),
        dir.join(format!("{hex}.json")),
    )
}

/// The SHA-256 of `image`: its file name when that is one (the deployer's image cache names
/// each image by its hash), read and hashed otherwise.
pub(super) fn image_sha256(image: &Path) -> io::Result<String> {
    if let Some(name) = image.file_name().and_then(|name| name.to_str())
        && name.len() == 64
        && name.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Ok(name.to_ascii_lowercase());
    }
    let mut file = std::fs::File::open(image)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// The snapshot of `revision` booted from `image`, if one is stored: `Ok(None)` when there
/// is none, `Err(reason)` when there is one that does not match (`qemu`, when known, is the
/// version this tender runs).
pub(super) fn find(
    image: &Path,
    revision: &Revision,
    settings: &str,
    qemu: Option<&str>,
) -> Result<Option<Found>, String> {
    let (stream, meta_path) = paths(image, revision);
    let text = match std::fs::read(&meta_path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("cannot read {}: {error}", meta_path.display())),
    };
    let meta: Meta = serde_json::from_slice(&text)
        .map_err(|error| format!("{} is not a snapshot record: {error}", meta_path.display()))?;
    if meta.format != FORMAT {
        return Err(format!(
            "it is of format {}, this daemon reads {FORMAT}",
            meta.format
        ));
    }
    if let Some(qemu) = qemu
        && meta.qemu != qemu
    {
        return Err(format!("it was made by qemu {}, this is {qemu}", meta.qemu));
    }
    if meta.settings != settings {
        return Err(format!(
            "it was made with other settings (`{}`), these are `{settings}`",
            meta.settings
        ));
    }
    let sha = image_sha256(image).map_err(|error| format!("cannot hash the image: {error}"))?;
    if meta.image_sha256 != sha {
        return Err(format!(
            "it was made from image {}, this is {sha}",
            meta.image_sha256
        ));
    }
    match std::fs::metadata(&stream) {
        Ok(file) if file.len() == meta.bytes => Ok(Some(Found {
            revision: *revision,
            stream,
            meta,
        })),
        Ok(file) => Err(format!(
            "its stream holds {} bytes, its record says {}",
            file.len(),
            meta.bytes
        )),
        Err(error) => Err(format!("cannot open {}: {error}", stream.display())),
    }
}

/// Removes the snapshot of `revision` booted from `image` (a refused or unusable one).
pub(super) fn remove(image: &Path, revision: &Revision) {
    let (stream, meta) = paths(image, revision);
    let _ = std::fs::remove_file(meta);
    let _ = std::fs::remove_file(stream);
}

/// What the supervisor needs to save a running instance's snapshot.
#[derive(Debug, Clone)]
pub(super) struct SavePlan {
    pub(super) image: PathBuf,
    pub(super) revision: Revision,
    pub(super) settings: String,
    /// The instance's scratch directory on the host (bound at [`jail::RUN`]).
    pub(super) scratch: PathBuf,
    pub(super) uid: u32,
    pub(super) memory_mib: u64,
}

/// Saves the guest `qmp` runs as the snapshot `plan` says: stop, migrate, resume (see the
/// module doc). The guest runs again whatever happened; returns the snapshot saved.
pub(super) async fn save(qmp: &mut Qmp, plan: &SavePlan) -> Result<Found, String> {
    let image_sha256 = image_sha256(&plan.image).map_err(|e| format!("hash the image: {e}"))?;
    let socket = plan.scratch.join("snapshot.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| format!("listen on {}: {e}", socket.display()))?;
    // qemu runs as the instance's uid: the socket must be its to connect to.
    std::os::unix::fs::chown(&socket, Some(plan.uid), Some(plan.uid))
        .map_err(|e| format!("hand {} to the instance: {e}", socket.display()))?;
    qmp.migration_events().await.map_err(|e| e.to_string())?;
    qmp.execute("stop").await.map_err(|e| e.to_string())?;
    let saved = tokio::time::timeout(SAVE_TIMEOUT, write(qmp, plan, &listener, image_sha256))
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()));
    let resumed = qmp.execute("cont").await;
    let _ = std::fs::remove_file(&socket);
    if let Err(error) = resumed {
        return Err(format!("the guest did not resume: {error}"));
    }
    saved
}

async fn write(
    qmp: &mut Qmp,
    plan: &SavePlan,
    listener: &tokio::net::UnixListener,
    image_sha256: String,
) -> Result<Found, String> {
    let (stream_path, meta_path) = paths(&plan.image, &plan.revision);
    let dir = stream_path
        .parent()
        .expect("a snapshot path has a directory");
    // The stream is the guest's memory: the daemon's alone.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    qmp.call(
        "migrate",
        Some(serde_json::json!({ "uri": format!("unix:{}/snapshot.sock", jail::RUN) })),
    )
    .await
    .map_err(|e| e.to_string())?;
    let (mut stream, _) = listener
        .accept()
        .await
        .map_err(|e| format!("accept qemu's stream: {e}"))?;
    let partial = dir.join(format!(
        ".partial-{}-{}",
        plan.revision.to_hex(),
        std::process::id()
    ));
    let limit = (plan.memory_mib << 20) + SLACK;
    let copied = async {
        let mut file = tokio::fs::File::create(&partial).await?;
        let bytes = tokio::io::copy(&mut (&mut stream).take(limit + 1), &mut file).await?;
        file.sync_all().await?;
        Ok::<u64, io::Error>(bytes)
    }
    .await;
    let bytes = match copied {
        Ok(bytes) if bytes <= limit => bytes,
        Ok(_) => {
            let _ = std::fs::remove_file(&partial);
            return Err(format!("the stream is longer than {limit} bytes"));
        }
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(format!("write {}: {error}", partial.display()));
        }
    };
    if !qmp.migrated().await {
        let _ = std::fs::remove_file(&partial);
        return Err("qemu did not complete the migration".into());
    }
    let meta = Meta {
        format: FORMAT,
        qemu: qmp.version().to_owned(),
        settings: plan.settings.clone(),
        image_sha256,
        bytes,
    };
    // The record goes last: without it the stream is not found.
    let _ = std::fs::remove_file(&meta_path);
    std::fs::rename(&partial, &stream_path)
        .map_err(|e| format!("rename to {}: {e}", stream_path.display()))?;
    let text = serde_json::to_vec_pretty(&meta).expect("a snapshot record serialises");
    let meta_partial = dir.join(format!(".partial-{}.json", plan.revision.to_hex()));
    let mut file = tokio::fs::File::create(&meta_partial)
        .await
        .map_err(|e| format!("write {}: {e}", meta_partial.display()))?;
    file.write_all(&text)
        .await
        .map_err(|e| format!("write {}: {e}", meta_partial.display()))?;
    file.sync_all()
        .await
        .map_err(|e| format!("write {}: {e}", meta_partial.display()))?;
    std::fs::rename(&meta_partial, &meta_path)
        .map_err(|e| format!("rename to {}: {e}", meta_path.display()))?;
    Ok(Found {
        revision: plan.revision,
        stream: stream_path,
        meta,
    })
}

/// The revisions known to have a snapshot, so that [`super::QemuTender::prepare`] (on the
/// path of a DNS answer) takes a waiting qemu only for them, without touching the disk.
#[derive(Debug, Default)]
pub(super) struct Known(Mutex<HashSet<Revision>>);

impl Known {
    pub(super) fn contains(&self, revision: &Revision) -> bool {
        self.0
            .lock()
            .expect("snapshot set lock is never poisoned")
            .contains(revision)
    }

    pub(super) fn insert(&self, revision: Revision) {
        let mut known = self.0.lock().expect("snapshot set lock is never poisoned");
        if known.len() >= KNOWN {
            known.clear();
        }
        known.insert(revision);
    }

    pub(super) fn forget(&self, revision: &Revision) {
        self.0
            .lock()
            .expect("snapshot set lock is never poisoned")
            .remove(revision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revision() -> Revision {
        "0123456789abcdef0123456789abcdef01234567"
            .parse()
            .expect("a revision")
    }

    fn store(dir: &Path, meta: &Meta, stream: &[u8]) -> PathBuf {
        let image = dir.join("kernel");
        std::fs::write(&image, b"an image").expect("image");
        let (stream_path, meta_path) = paths(&image, &revision());
        std::fs::create_dir_all(stream_path.parent().expect("dir")).expect("dir");
        std::fs::write(stream_path, stream).expect("stream");
        std::fs::write(meta_path, serde_json::to_vec(meta).expect("json")).expect("meta");
        image
    }

    fn meta(dir: &Path) -> Meta {
        std::fs::write(dir.join("kernel"), b"an image").expect("image");
        Meta {
            format: FORMAT,
            qemu: "7.2.22".into(),
            settings: "-m 32M".into(),
            image_sha256: image_sha256(&dir.join("kernel")).expect("hash"),
            bytes: 5,
        }
    }

    #[test]
    fn a_matching_snapshot_is_found_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().expect("dir");
        let image = store(dir.path(), &meta(dir.path()), b"state");
        let found = find(&image, &revision(), "-m 32M", Some("7.2.22"))
            .expect("matches")
            .expect("found");
        assert_eq!(found.meta.bytes, 5);
        let other: Revision = "1123456789abcdef0123456789abcdef01234567"
            .parse()
            .expect("a revision");
        assert!(matches!(find(&image, &other, "-m 32M", None), Ok(None)));
    }

    #[test]
    fn a_snapshot_of_other_settings_qemu_or_image_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("dir");
        let image = store(dir.path(), &meta(dir.path()), b"state");
        let settings = find(&image, &revision(), "-m 64M", None).expect_err("settings");
        assert!(settings.contains("other settings"), "{settings}");
        let qemu = find(&image, &revision(), "-m 32M", Some("8.0.0")).expect_err("qemu");
        assert!(
            qemu.contains("made by qemu 7.2.22, this is 8.0.0"),
            "{qemu}"
        );
        std::fs::write(&image, b"another image").expect("image");
        let other = find(&image, &revision(), "-m 32M", None).expect_err("image");
        assert!(other.contains("made from image"), "{other}");
        let (stream, _) = paths(&image, &revision());
        std::fs::write(stream, b"cut").expect("stream");
        std::fs::write(&image, b"an image").expect("image");
        let cut = find(&image, &revision(), "-m 32M", None).expect_err("cut");
        assert!(cut.contains("its record says 5"), "{cut}");
    }

    #[test]
    fn an_image_named_by_its_hash_is_not_read() {
        let name = "ab".repeat(32);
        let path = Path::new("/nonexistent").join(&name);
        assert_eq!(image_sha256(&path).expect("from the name"), name);
    }
}

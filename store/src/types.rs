//! The values the store takes and hands out.

use std::fmt;
use std::io::{Cursor, Read};
use std::net::IpAddr;
use std::str::FromStr;

use crate::Revision;

/// The outcome of a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BuildStatus {
    /// The recipe ran and produced its artifacts.
    Succeeded,
    /// The recipe failed; the commit has a build log and no image.
    Failed,
    /// The build was stopped (time limit, shutdown) before it finished.
    Interrupted,
}

impl BuildStatus {
    /// The word used in the `Build-Status:` trailer.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Succeeded => "succeeded",
            BuildStatus::Failed => "failed",
            BuildStatus::Interrupted => "interrupted",
        }
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that is not a build status.
#[derive(Debug, thiserror::Error)]
#[error("Unknown build status `{0}`")]
pub struct ParseBuildStatusError(String);

impl FromStr for BuildStatus {
    type Err = ParseBuildStatusError;

    fn from_str(text: &str) -> Result<BuildStatus, ParseBuildStatusError> {
        match text {
            "succeeded" => Ok(BuildStatus::Succeeded),
            "failed" => Ok(BuildStatus::Failed),
            "interrupted" => Ok(BuildStatus::Interrupted),
            other => Err(ParseBuildStatusError(other.to_owned())),
        }
    }
}

/// Everything a build hands to the store.
pub struct NewDeployment<'a> {
    /// The service (a DNS label: `[a-z0-9-]`, at most 63 bytes).
    pub service: &'a str,
    /// How the build ended.
    pub status: BuildStatus,
    /// The raw `revboot.toml` of the source commit, if it had one.
    pub manifest: Option<&'a str>,
    /// The images; non-empty exactly when `status` is `Succeeded`.
    pub images: Vec<ImageInput<'a>>,
    /// The whole build output.
    pub build_log: &'a [u8],
    /// The 40-hex id of the source commit.
    pub source_commit: &'a str,
    /// The source repository's name, e.g. `hello`.
    pub source_repo: &'a str,
    /// The source ref that was built, e.g. `refs/heads/main`.
    pub source_ref: Option<&'a str>,
    /// The source commit's subject line.
    pub subject: &'a str,
}

impl fmt::Debug for NewDeployment<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewDeployment")
            .field("service", &self.service)
            .field("status", &self.status)
            .field("images", &self.images)
            .field("source_commit", &self.source_commit)
            .field("source_repo", &self.source_repo)
            .field("source_ref", &self.source_ref)
            .finish_non_exhaustive()
    }
}

/// One image file, read once from `reader` and stored as `image/<name>`.
pub struct ImageInput<'a> {
    /// The file name under `image/`.
    pub name: String,
    /// The bytes, streamed.
    pub reader: Box<dyn Read + Send + 'a>,
}

impl fmt::Debug for ImageInput<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageInput")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// An image as recorded in its deployment commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The file name under `image/`.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The lowercase hex sha256 of its bytes.
    pub sha256: String,
}

/// One deployment commit, as history and labels see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// The deployment commit.
    pub revision: Revision,
    /// The previous build of the service.
    pub parent: Option<Revision>,
    /// The service.
    pub service: String,
    /// How the build ended.
    pub status: BuildStatus,
    /// The source commit (40 hex).
    pub source_commit: String,
    /// The source repository's name.
    pub source_repo: String,
    /// The source ref that was built.
    pub source_ref: Option<String>,
    /// The source commit's subject.
    pub subject: String,
    /// The boot image, absent on failed builds.
    pub image: Option<ImageInfo>,
    /// Committer time, unix seconds.
    pub time: i64,
    /// Whether the live pointer names this revision.
    pub live: bool,
}

/// A move of the live pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveMove {
    /// The service.
    pub service: String,
    /// Where it pointed before.
    pub from: Option<Revision>,
    /// Where it points now.
    pub to: Revision,
}

/// What changed between two deployments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentDiff {
    /// A unified diff of `revboot.toml` (empty when equal).
    pub manifest: String,
    /// Boot image sizes of `a` and `b`.
    pub image_size: (Option<u64>, Option<u64>),
    /// Boot image sha256 of `a` and `b`.
    pub image_sha256: (Option<String>, Option<String>),
    /// Whether the boot images differ.
    pub image_changed: bool,
    /// Build statuses of `a` and `b`.
    pub status: (BuildStatus, BuildStatus),
    /// Source commits of `a` and `b`.
    pub source_commit: (String, String),
}

/// What happened to one instance, written back when it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeRecord {
    /// The deployment the instance ran.
    pub revision: Revision,
    /// The client it was started for (per-client instances).
    pub client: Option<IpAddr>,
    /// When it started, unix milliseconds.
    pub started_at_ms: u64,
    /// Boot to ready.
    pub boot_ms: Option<u64>,
    /// Start to stop.
    pub lifetime_ms: u64,
    /// One line, e.g. `stopped: idle` or `crashed: exited with status 1`.
    pub outcome: String,
    /// The console output (bounded by the caller).
    pub console: Vec<u8>,
}

/// What a repack did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepackReport {
    /// Bytes of loose objects and packs before.
    pub bytes_before: u64,
    /// Bytes of loose objects and packs after.
    pub bytes_after: u64,
    /// Number of packs after.
    pub packs_after: usize,
    /// Wall time of `git repack`.
    pub elapsed: std::time::Duration,
}

/// An image being read. The blob is held once in memory while it is read.
#[derive(Debug)]
pub struct ImageReader {
    pub(crate) info: ImageInfo,
    pub(crate) bytes: Cursor<Vec<u8>>,
}

impl ImageReader {
    /// The image's name, size and hash.
    pub fn info(&self) -> &ImageInfo {
        &self.info
    }
}

impl Read for ImageReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.bytes.read(buf)
    }
}

//! The deployment commit protocol: what a deployment commit holds and how it is read back.
//!
//! 1. The tree has `build.log` (mode 100644, always), `revboot.toml` (100644, when the source
//!    commit had one) and, for a successful build only, `image/<name>` (100755) per image.
//! 2. The message is the source commit's subject, a blank line, then trailers in this order:
//!    `Build-Status: succeeded|failed|interrupted`, `Source-Commit: <40 hex>`,
//!    `Source-Repo: <name>`, optionally `Source-Ref: <ref>`, then one
//!    `Image: <name> <size> <sha256>` per image, the boot image first.
//! 3. Author and committer are `revboot <revboot@localhost>` at the time of writing.
//! 4. The parent is the previous tip of `refs/heads/<service>`; the ref moves by
//!    compare-and-swap, so a commit is on the branch completely or not at all.
//!
//! Reading is lenient about unknown trailers and strict about the ones above.

use crate::types::{BuildStatus, ImageInfo};

/// The file holding the build output.
pub const BUILD_LOG: &str = "build.log";
/// The directory holding the images.
pub const IMAGE_DIR: &str = "image";
/// The name and email of the deployment commits' author and committer.
pub const IDENTITY: (&str, &str) = ("revboot", "revboot@localhost");

/// The most bytes of a name that is used as a DNS label.
pub const MAX_LABEL: usize = 63;

/// Checks that `name` is a DNS label (`[a-z0-9-]`, 1..=63 bytes, no `-` at either end).
pub fn check_label(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > MAX_LABEL {
        return Err("must be at most 63 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("must contain only a-z, 0-9 and -");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("must not start or end with -");
    }
    Ok(())
}

/// Checks an image file name.
pub fn check_image_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name == "." || name == ".." {
        return Err("must be a file name");
    }
    if name.len() > 255 {
        return Err("must be at most 255 bytes");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b'\\' || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("must not contain slashes, whitespace or control characters");
    }
    if name.eq_ignore_ascii_case(".git") {
        return Err("must not be .git");
    }
    Ok(())
}

/// A source branch made DNS-safe: `refs/heads/feature/X_1` → `feature-x-1`.
///
/// Every byte outside `[a-z0-9]` becomes `-`, runs of `-` collapse, ends are trimmed, and
/// the result is cut to 63 bytes. `None` when nothing is left.
pub fn dns_safe_branch(source_ref: &str) -> Option<String> {
    let name = source_ref
        .strip_prefix("refs/heads/")
        .or_else(|| source_ref.strip_prefix("refs/tags/"))
        .unwrap_or(source_ref);
    let mut label = String::with_capacity(name.len());
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            label.push(c);
        } else if !label.ends_with('-') {
            label.push('-');
        }
    }
    let mut label = label.trim_matches('-').to_owned();
    label.truncate(MAX_LABEL);
    let label = label.trim_end_matches('-').to_owned();
    (!label.is_empty()).then_some(label)
}

/// The trailers of a deployment commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailers {
    /// `Build-Status`.
    pub status: BuildStatus,
    /// `Source-Commit`.
    pub source_commit: String,
    /// `Source-Repo`.
    pub source_repo: String,
    /// `Source-Ref`.
    pub source_ref: Option<String>,
    /// `Image`, boot image first.
    pub images: Vec<ImageInfo>,
}

/// Makes a commit subject a single printable line.
pub fn clean_subject(subject: &str, fallback: impl FnOnce() -> String) -> String {
    let line: String = subject
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    let line = line.trim();
    if line.is_empty() || line.contains(':') && parse_trailer_line(line).is_some() {
        fallback()
    } else {
        line.to_owned()
    }
}

/// The full commit message.
pub fn message(subject: &str, trailers: &Trailers) -> String {
    let mut text = format!(
        "{subject}\n\nBuild-Status: {}\nSource-Commit: {}\nSource-Repo: {}\n",
        trailers.status, trailers.source_commit, trailers.source_repo
    );
    if let Some(source_ref) = &trailers.source_ref {
        text.push_str(&format!("Source-Ref: {source_ref}\n"));
    }
    for image in &trailers.images {
        text.push_str(&format!(
            "Image: {} {} {}\n",
            image.name, image.size, image.sha256
        ));
    }
    text
}

fn parse_trailer_line(line: &str) -> Option<(&str, &str)> {
    let (key, value) = line.split_once(": ")?;
    let valid_key = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    valid_key.then_some((key, value.trim()))
}

/// Splits a message into its subject and trailers.
pub fn parse_message(text: &str) -> Result<(String, Trailers), String> {
    let subject = text.lines().next().unwrap_or("").trim().to_owned();
    let last_paragraph = text
        .trim_end()
        .rsplit("\n\n")
        .next()
        .ok_or_else(|| "no trailers".to_owned())?;
    let mut status = None;
    let mut source_commit = None;
    let mut source_repo = None;
    let mut source_ref = None;
    let mut images = Vec::new();
    for line in last_paragraph.lines() {
        let Some((key, value)) = parse_trailer_line(line) else {
            continue;
        };
        match key {
            "Build-Status" => {
                status = Some(value.parse::<BuildStatus>().map_err(|e| e.to_string())?);
            }
            "Source-Commit" => source_commit = Some(value.to_owned()),
            "Source-Repo" => source_repo = Some(value.to_owned()),
            "Source-Ref" => source_ref = Some(value.to_owned()),
            "Image" => {
                let mut parts = value.split(' ');
                let (Some(name), Some(size), Some(sha256), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err(format!("bad Image trailer `{value}`"));
                };
                let size = size
                    .parse::<u64>()
                    .map_err(|_| format!("bad image size `{size}`"))?;
                // Both become file names (`image/<name>`, the cache's `<sha256>`): a commit
                // made by hand must not name a path outside either directory.
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    return Err(format!("bad image name `{name}`"));
                }
                if sha256.len() != 64
                    || !sha256
                        .bytes()
                        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                {
                    return Err(format!("bad image sha256 `{sha256}`"));
                }
                images.push(ImageInfo {
                    name: name.to_owned(),
                    size,
                    sha256: sha256.to_owned(),
                });
            }
            _ => {}
        }
    }
    let trailers = Trailers {
        status: status.ok_or("no Build-Status trailer")?,
        source_commit: source_commit.ok_or("no Source-Commit trailer")?,
        source_repo: source_repo.ok_or("no Source-Repo trailer")?,
        source_ref,
        images,
    };
    Ok((subject, trailers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trips() {
        let trailers = Trailers {
            status: BuildStatus::Succeeded,
            source_commit: "a".repeat(40),
            source_repo: "hello".into(),
            source_ref: Some("refs/heads/main".into()),
            images: vec![ImageInfo {
                name: "hello".into(),
                size: 12,
                sha256: "b".repeat(64),
            }],
        };
        let text = message("Say hello", &trailers);
        assert_eq!(
            parse_message(&text).expect("parses"),
            ("Say hello".to_owned(), trailers)
        );
    }

    #[test]
    fn image_trailers_cannot_name_paths() {
        let commit = |image: &str| {
            format!(
                "x\n\nBuild-Status: succeeded\nSource-Commit: a\nSource-Repo: b\nImage: {image}\n"
            )
        };
        let sha = "c".repeat(64);
        assert!(parse_message(&commit(&format!("hello 1 {sha}"))).is_ok());
        for bad in [
            format!("../x 1 {sha}"),
            format!(".. 1 {sha}"),
            "hello 1 ../../bin/sh".to_owned(),
            format!("hello 1 {}", "C".repeat(64)),
            format!("hello 1 {}", "c".repeat(63)),
        ] {
            let error = parse_message(&commit(&bad)).expect_err(&bad);
            assert!(error.starts_with("bad image"), "{bad}: {error}");
        }
    }

    #[test]
    fn message_without_status_is_malformed() {
        assert!(parse_message("x\n\nSource-Commit: a\nSource-Repo: b\n").is_err());
    }

    #[test]
    fn branch_labels() {
        assert_eq!(
            dns_safe_branch("refs/heads/feature/x").as_deref(),
            Some("feature-x")
        );
        assert_eq!(
            dns_safe_branch("refs/heads/Fix__Bug//2").as_deref(),
            Some("fix-bug-2")
        );
        assert_eq!(dns_safe_branch("refs/heads/___"), None);
        let long = format!("refs/heads/{}", "a".repeat(100));
        assert_eq!(dns_safe_branch(&long).map(|l| l.len()), Some(63));
    }

    #[test]
    fn labels_are_checked() {
        assert!(check_label("hello-1").is_ok());
        assert!(check_label("Hello").is_err());
        assert!(check_label("-x").is_err());
        assert!(check_label(&"a".repeat(64)).is_err());
        assert!(check_label("a/b").is_err());
    }

    #[test]
    fn subject_is_one_line() {
        assert_eq!(clean_subject("one\ntwo", || "f".into()), "one");
        assert_eq!(clean_subject("  ", || "f".into()), "f");
        assert_eq!(
            clean_subject("Build-Status: failed", || "f".into()),
            "f",
            "a subject that looks like a trailer would confuse parsing"
        );
    }
}

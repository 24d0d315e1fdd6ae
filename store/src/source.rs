//! Finding a commit of a service's source repository by a prefix of its id, in process: a
//! DNS query for a source commit that has no deployment yet asks this before a build is
//! queued for it, so a made-up prefix costs an index look-up, never a `git` process.

use std::path::Path;

use crate::ReadError;

/// The full id of the one commit of the repository at `repository` whose id starts with
/// `prefix` (7 to 40 hex digits); `None` when there is none, or when the prefix names more
/// than one object or something else than a commit.
pub fn find_commit(repository: &Path, prefix: &str) -> Result<Option<String>, ReadError> {
    if !(7..=40).contains(&prefix.len()) || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let repo = gix::open(repository).map_err(|error| ReadError::Io {
        action: "open the source repository",
        path: repository.to_owned(),
        source: std::io::Error::other(error),
    })?;
    let Ok(prefix) = gix::hash::Prefix::from_hex(&prefix.to_ascii_lowercase()) else {
        return Ok(None);
    };
    let found = repo
        .objects
        .lookup_prefix(prefix, None)
        .map_err(|error| ReadError::Io {
            action: "look up a prefix in",
            path: repository.to_owned(),
            source: std::io::Error::other(error),
        })?;
    let Some(Ok(id)) = found else {
        return Ok(None);
    };
    let is_commit = repo
        .find_header(id)
        .is_ok_and(|header| header.kind() == gix::objs::Kind::Commit);
    Ok(is_commit.then(|| id.to_hex().to_string()))
}

//! The daemon's secrets on disk (the token for pushes and the API, the hook token): random,
//! and readable by the daemon alone, never by a sandbox or another user.
//!
//! 1. A secret is [`random_hex`]: bytes from `/dev/urandom`, as lowercase hex.
//! 2. It is written whole or not at all ([`write_private`]): to `<file>.tmp`, created with
//!    mode 0600 so that no one else can read it even for a moment, synced, then renamed over
//!    `<file>`.

use std::fs::OpenOptions;
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// `bytes` random bytes from `/dev/urandom`, as `2 * bytes` lowercase hex digits.
pub fn random_hex(bytes: usize) -> io::Result<String> {
    let mut random = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    Ok(random.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `text` to `path`, readable and writable by the owner alone, replacing what was
/// there at once (the module's rule 2).
pub fn write_private(path: &Path, text: &str) -> io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_secret_is_hex_and_readable_by_its_owner_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        let token = random_hex(16).expect("random bytes");
        assert_eq!(token.len(), 32);
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        write_private(&path, &token).expect("written");
        write_private(&path, &token).expect("written again over the first");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), token);
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!path.with_extension("tmp").exists());
    }
}

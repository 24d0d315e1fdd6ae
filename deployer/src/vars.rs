//! Configuration variables and secrets of services, kept outside git (`revboot config`).
//!
//! 1. One service's variables live in `<dir>/<service>.vars`, a JSON object sealed with
//!    XChaCha20-Poly1305 (the `chacha20poly1305` crate of RustCrypto, audited and kept up;
//!    a fresh random 24-byte nonce for every write, so nonces never repeat by chance; the
//!    service name as associated data, so a file copied under another service's name does
//!    not open). The 32-byte key is `<dir>/key`, made on first use. Every file is mode 0600
//!    and written whole by write-then-rename ([`revboot_sandbox::secret`]).
//! 2. Names are environment names (`[A-Za-z_][A-Za-z0-9_]*`, at most [`MAX_NAME`] bytes)
//!    other than those revboot sets itself (`LISTEN_*`, `REVBOOT_*`, `PATH`); values are
//!    UTF-8 without NUL, at most [`MAX_VALUE`] bytes; a service has at most [`MAX_VARS`].
//!    A change that breaks a rule changes nothing.
//! 3. The deployer keeps every service's variables in memory; a boot copies them into the
//!    instance's environment, over the manifest's `run.env` entry of the same name. A change
//!    applies to instances booted after it.
//! 4. Values never reach a log, the deployment repository or a listing that did not ask:
//!    [`ServiceVars`] prints names only, and console records written back to the deployment
//!    repository have every value of [`REDACT_FROM`] bytes or more replaced by `[hidden]`
//!    ([`ServiceVars::redact`]): a secret an instance prints stays out of git. Shorter values
//!    (a port, `debug`) are configuration, not secrets, and would hide ordinary words.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};

/// The longest variable name.
pub const MAX_NAME: usize = 128;
/// The longest value.
pub const MAX_VALUE: usize = 32 * 1024;
/// Variables per service.
pub const MAX_VARS: usize = 256;
/// Values at least this long are hidden in console records.
pub const REDACT_FROM: usize = 8;
/// What a hidden value becomes in a console record.
const HIDDEN: &[u8] = b"[hidden]";
/// Names revboot sets in every instance's environment.
const RESERVED_PREFIXES: [&str; 2] = ["LISTEN_", "REVBOOT_"];
const RESERVED: [&str; 1] = ["PATH"];
const NONCE: usize = 24;
const FORMAT: &str = "revboot-vars-v1";

/// Why the variables could not be read or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VarsError {
    /// The service name cannot name a file of variables.
    #[error("Invalid service name `{0}`")]
    InvalidService(String),
    /// A name breaks the rules.
    #[error("Invalid variable name `{name}`: {why}")]
    InvalidName {
        /// The name (cut short).
        name: String,
        /// Which rule.
        why: &'static str,
    },
    /// A value breaks the rules (the value itself is not said).
    #[error("Invalid value of `{name}`: {why}")]
    InvalidValue {
        /// The variable.
        name: String,
        /// Which rule.
        why: String,
    },
    /// `unset` of a variable that is not set.
    #[error("`{name}` is not set for {service}")]
    NotSet {
        /// The service.
        service: String,
        /// The variable.
        name: String,
    },
    /// Too many variables.
    #[error("{service} would have {count} variables; at most {MAX_VARS} are allowed")]
    TooMany {
        /// The service.
        service: String,
        /// How many it would have.
        count: usize,
    },
    /// A rename onto a service that has variables of its own.
    #[error("{service} has configuration variables already")]
    Taken {
        /// The service.
        service: String,
    },
    /// A file could not be read or written.
    #[error("Cannot {what} {path}")]
    Io {
        /// read, write…
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file of variables does not open with the key (damaged, or another key).
    #[error("{path} does not open with the key in {key}: damaged, or sealed with another key")]
    Sealed {
        /// The file.
        path: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

/// One service's variables. `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ServiceVars(BTreeMap<String, String>);

impl std::fmt::Debug for ServiceVars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl ServiceVars {
    /// Name and value of each, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if none is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `text` with every value of [`REDACT_FROM`] bytes or more replaced by `[hidden]`
    /// (rule 4), longest values first so that one holding another is hidden whole.
    pub fn redact(&self, text: &[u8]) -> Vec<u8> {
        let mut values: Vec<&[u8]> = self
            .0
            .values()
            .map(String::as_bytes)
            .filter(|value| value.len() >= REDACT_FROM)
            .collect();
        if values.is_empty() {
            return text.to_vec();
        }
        values.sort_by_key(|value| std::cmp::Reverse(value.len()));
        let mut text = text.to_vec();
        for value in values {
            text = replace(&text, value, HIDDEN);
        }
        text
    }
}

fn replace(text: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest
        .windows(needle.len())
        .position(|window| window == needle)
    {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// A change to one service's variables: names to set, names to unset.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// `NAME=value` pairs to set.
    pub set: Vec<(String, String)>,
    /// Names to remove.
    pub unset: Vec<String>,
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Change")
            .field("set", &self.set.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("unset", &self.unset)
            .finish()
    }
}

/// Every service's variables, sealed on disk and kept in memory (module doc).
pub struct Vars {
    dir: PathBuf,
    cipher: XChaCha20Poly1305,
    /// Service → its variables; a service with none has no entry.
    services: Mutex<HashMap<String, Arc<ServiceVars>>>,
    /// Serialises changes (read, change, seal, write).
    writing: Mutex<()>,
}

impl std::fmt::Debug for Vars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vars")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> VarsError {
    let path = path.to_owned();
    move |source| VarsError::Io { what, path, source }
}

impl Vars {
    /// Opens the variables kept in `dir` (made, with its key, on first use) and reads every
    /// service's into memory.
    pub fn open(dir: &Path) -> Result<Vars, VarsError> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error("create", dir))?;
        let key_file = dir.join("key");
        let key = match std::fs::read_to_string(&key_file) {
            Ok(text) => hex::decode(text.trim())
                .ok()
                .filter(|key| key.len() == 32)
                .ok_or_else(|| VarsError::Sealed {
                    path: key_file.clone(),
                    key: key_file.clone(),
                })?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let key = revboot_sandbox::secret::random_hex(32)
                    .map_err(io_error("read random bytes for", &key_file))?;
                revboot_sandbox::secret::write_private(&key_file, &key)
                    .map_err(io_error("write", &key_file))?;
                hex::decode(key).expect("random_hex writes hex")
            }
            Err(error) => return Err(io_error("read", &key_file)(error)),
        };
        let vars = Vars {
            dir: dir.to_owned(),
            cipher: XChaCha20Poly1305::new(Key::from_slice(&key)),
            services: Mutex::new(HashMap::new()),
            writing: Mutex::new(()),
        };
        let entries = std::fs::read_dir(dir).map_err(io_error("read", dir))?;
        let mut services = HashMap::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(service) = name.strip_suffix(".vars") else {
                continue;
            };
            if check_service(service).is_err() {
                continue;
            }
            let read = vars.read(service)?;
            if !read.is_empty() {
                services.insert(service.to_owned(), Arc::new(read));
            }
        }
        *vars.services.lock().expect("vars lock is never poisoned") = services;
        Ok(vars)
    }

    /// The variables of `service` (empty when it has none).
    pub fn get(&self, service: &str) -> Arc<ServiceVars> {
        self.services
            .lock()
            .expect("vars lock is never poisoned")
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    /// Applies `change` to `service`'s variables, on disk then in memory; nothing changes
    /// if any part of it breaks a rule. Returns the variables now set.
    pub fn change(&self, service: &str, change: &Change) -> Result<Arc<ServiceVars>, VarsError> {
        check_service(service)?;
        let _writing = self.writing.lock().expect("vars lock is never poisoned");
        let mut vars = (*self.get(service)).clone();
        for name in &change.unset {
            check_name(name)?;
            if vars.0.remove(name).is_none() {
                return Err(VarsError::NotSet {
                    service: service.to_owned(),
                    name: name.clone(),
                });
            }
        }
        for (name, value) in &change.set {
            check_name(name)?;
            check_value(name, value)?;
            vars.0.insert(name.clone(), value.clone());
        }
        if vars.len() > MAX_VARS {
            return Err(VarsError::TooMany {
                service: service.to_owned(),
                count: vars.len(),
            });
        }
        self.write(service, &vars)?;
        let vars = Arc::new(vars);
        let mut services = self.services.lock().expect("vars lock is never poisoned");
        if vars.is_empty() {
            services.remove(service);
        } else {
            services.insert(service.to_owned(), Arc::clone(&vars));
        }
        Ok(vars)
    }

    /// Moves `from`'s variables to `to`, sealed again under the new name (the name is the
    /// seal's associated data), for a service rename. `to` must have none. Returns how many
    /// moved; nothing changes on an error. The new file is written before the old one is
    /// removed: a crash in between leaves both, never neither.
    pub fn rename(&self, from: &str, to: &str) -> Result<usize, VarsError> {
        check_service(from)?;
        check_service(to)?;
        let _writing = self.writing.lock().expect("vars lock is never poisoned");
        if !self.get(to).is_empty() {
            return Err(VarsError::Taken {
                service: to.to_owned(),
            });
        }
        let vars = self.get(from);
        if vars.is_empty() {
            return Ok(0);
        }
        self.write(to, &vars)?;
        let old = self.path(from);
        if let Err(error) = std::fs::remove_file(&old) {
            let _ = std::fs::remove_file(self.path(to));
            return Err(io_error("remove", &old)(error));
        }
        let mut services = self.services.lock().expect("vars lock is never poisoned");
        services.remove(from);
        services.insert(to.to_owned(), Arc::clone(&vars));
        Ok(vars.len())
    }

    /// Removes `service`'s variables, for a service delete: a service created again under
    /// the name starts with none. Returns how many there were.
    pub fn remove(&self, service: &str) -> Result<usize, VarsError> {
        check_service(service)?;
        let _writing = self.writing.lock().expect("vars lock is never poisoned");
        let count = self.get(service).len();
        let path = self.path(service);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error("remove", &path)(error)),
        }
        self.services
            .lock()
            .expect("vars lock is never poisoned")
            .remove(service);
        Ok(count)
    }

    fn path(&self, service: &str) -> PathBuf {
        self.dir.join(format!("{service}.vars"))
    }

    fn read(&self, service: &str) -> Result<ServiceVars, VarsError> {
        let path = self.path(service);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Ok(ServiceVars::default());
            }
            Err(error) => return Err(io_error("read", &path)(error)),
        };
        let sealed = || VarsError::Sealed {
            path: path.clone(),
            key: self.dir.join("key"),
        };
        let mut fields = text.split_whitespace();
        let (Some(FORMAT), Some(nonce), Some(sealed_text), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(sealed());
        };
        let nonce = hex::decode(nonce)
            .ok()
            .filter(|n| n.len() == NONCE)
            .ok_or_else(sealed)?;
        let sealed_bytes = hex::decode(sealed_text).map_err(|_| sealed())?;
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &sealed_bytes,
                    aad: service.as_bytes(),
                },
            )
            .map_err(|_| sealed())?;
        let map: BTreeMap<String, String> = serde_json::from_slice(&plain).map_err(|_| sealed())?;
        Ok(ServiceVars(map))
    }

    fn write(&self, service: &str, vars: &ServiceVars) -> Result<(), VarsError> {
        let path = self.path(service);
        let nonce = revboot_sandbox::secret::random_hex(NONCE)
            .map_err(io_error("read random bytes for", &path))?;
        let nonce_bytes = hex::decode(&nonce).expect("random_hex writes hex");
        let plain = serde_json::to_vec(&vars.0).expect("a map of strings serialises");
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce_bytes),
                Payload {
                    msg: &plain,
                    aad: service.as_bytes(),
                },
            )
            .map_err(|_| {
                io_error("seal", &path)(io::Error::other("the cipher refused the plaintext"))
            })?;
        let text = format!("{FORMAT} {nonce} {}\n", hex::encode(sealed));
        revboot_sandbox::secret::write_private(&path, &text).map_err(io_error("write", &path))
    }
}

fn check_service(service: &str) -> Result<(), VarsError> {
    let ok = !service.is_empty()
        && service.len() <= 63
        && !service.starts_with('-')
        && service
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(VarsError::InvalidService(
            service.chars().take(80).collect(),
        ))
    }
}

/// Checks a variable name (module doc, rule 2).
pub fn check_name(name: &str) -> Result<(), VarsError> {
    let invalid = |why| VarsError::InvalidName {
        name: name.chars().take(MAX_NAME).collect(),
        why,
    };
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(invalid("a name has 1 to 128 characters"));
    }
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(invalid(
            "use letters, digits and `_`, not starting with a digit",
        ));
    }
    if RESERVED.contains(&name) || RESERVED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Err(invalid("revboot sets it (LISTEN_*, REVBOOT_*, PATH)"));
    }
    Ok(())
}

fn check_value(name: &str, value: &str) -> Result<(), VarsError> {
    let invalid = |why: String| VarsError::InvalidValue {
        name: name.to_owned(),
        why,
    };
    if value.len() > MAX_VALUE {
        return Err(invalid(format!("longer than {MAX_VALUE} bytes")));
    }
    if value.contains('\0') {
        return Err(invalid("it holds a NUL byte".to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> Change {
        Change {
            set: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            unset: Vec::new(),
        }
    }

    #[test]
    fn a_rename_moves_the_variables_sealed_under_the_new_name_and_a_delete_removes_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vars = Vars::open(dir.path()).expect("open");
        vars.change("hello", &set(&[("API_KEY", "sk-live-0123456789")]))
            .expect("set");
        vars.change("other", &set(&[("MODE", "fast")]))
            .expect("set");
        // Onto a service with variables of its own: refused, nothing moves.
        assert!(matches!(
            vars.rename("hello", "other"),
            Err(VarsError::Taken { .. })
        ));
        assert_eq!(vars.get("hello").get("API_KEY"), Some("sk-live-0123456789"));

        assert_eq!(vars.rename("hello", "world").expect("rename"), 1);
        assert!(vars.get("hello").is_empty());
        assert!(!dir.path().join("hello.vars").exists());
        let again = Vars::open(dir.path()).expect("reopen");
        assert_eq!(
            again.get("world").get("API_KEY"),
            Some("sk-live-0123456789")
        );
        assert!(again.get("hello").is_empty());
        // Sealed under the new name: the file copied back under the old name does not open.
        std::fs::copy(dir.path().join("world.vars"), dir.path().join("hello.vars")).expect("copy");
        assert!(matches!(
            Vars::open(dir.path()),
            Err(VarsError::Sealed { .. })
        ));
        std::fs::remove_file(dir.path().join("hello.vars")).expect("remove the copy");
        // A service with none renames with nothing to move.
        assert_eq!(again.rename("nothing", "still-nothing").expect("rename"), 0);

        assert_eq!(again.remove("world").expect("remove"), 1);
        assert!(again.get("world").is_empty());
        assert!(!dir.path().join("world.vars").exists());
        assert_eq!(again.remove("world").expect("remove again"), 0);
        let reopened = Vars::open(dir.path()).expect("reopen");
        assert!(reopened.get("world").is_empty());
        assert_eq!(reopened.get("other").get("MODE"), Some("fast"));
    }

    #[test]
    fn sealed_on_disk_and_read_back_by_a_new_opener() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vars = Vars::open(dir.path()).expect("open");
        let now = vars
            .change(
                "hello",
                &set(&[("API_KEY", "sk-live-0123456789"), ("MODE", "fast")]),
            )
            .expect("set");
        assert_eq!(now.get("API_KEY"), Some("sk-live-0123456789"));
        let on_disk = std::fs::read(dir.path().join("hello.vars")).expect("file");
        assert!(
            !on_disk
                .windows(7)
                .any(|w| w == b"sk-live" || w == b"API_KEY"),
            "the file is sealed"
        );
        use std::os::unix::fs::PermissionsExt as _;
        for file in ["hello.vars", "key"] {
            let mode = std::fs::metadata(dir.path().join(file))
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let again = Vars::open(dir.path()).expect("reopen");
        assert_eq!(again.get("hello").get("MODE"), Some("fast"));
        assert_eq!(
            format!("{:?}", again.get("hello")),
            r#"{"API_KEY", "MODE"}"#
        );
        // A file moved onto another service's name does not open.
        std::fs::copy(dir.path().join("hello.vars"), dir.path().join("other.vars")).expect("copy");
        assert!(matches!(
            Vars::open(dir.path()),
            Err(VarsError::Sealed { .. })
        ));
    }

    #[test]
    fn bad_changes_change_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vars = Vars::open(dir.path()).expect("open");
        vars.change("hello", &set(&[("A", "1")])).expect("set");
        for bad in [
            set(&[("B", "2"), ("1X", "3")]),
            set(&[("REVBOOT_SERVICE", "x")]),
            set(&[("PATH", "/bin")]),
            set(&[("B", "a\0b")]),
            set(&[("B-C", "x")]),
            Change {
                set: Vec::new(),
                unset: vec!["NOPE".into()],
            },
        ] {
            assert!(vars.change("hello", &bad).is_err(), "{bad:?}");
        }
        assert!(vars.change("../x", &set(&[("A", "1")])).is_err());
        assert_eq!(vars.get("hello").len(), 1);
        let unset = Change {
            set: Vec::new(),
            unset: vec!["A".into()],
        };
        assert!(vars.change("hello", &unset).expect("unset").is_empty());
        assert!(vars.get("hello").is_empty());
    }

    #[test]
    fn long_values_are_hidden_in_console_text() {
        let vars = ServiceVars(
            [
                ("TOKEN".to_owned(), "s3cr3t-t0ken".to_owned()),
                ("LONGER".to_owned(), "s3cr3t-t0ken-and-more".to_owned()),
                ("LEVEL".to_owned(), "debug".to_owned()),
            ]
            .into(),
        );
        let text = b"token s3cr3t-t0ken; long s3cr3t-t0ken-and-more; level debug";
        assert_eq!(
            vars.redact(text),
            b"token [hidden]; long [hidden]; level debug".to_vec()
        );
    }
}

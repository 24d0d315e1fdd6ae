//! ACME DNS-01 challenge records (RFC 8555 §8.4): the TXT records at
//! `_acme-challenge.<name>` that a certificate authority reads to check that whoever asks
//! for a certificate of `<name>` controls its DNS.
//!
//! 1. The ACME client publishes a value with [`Challenges::publish`] before it tells the CA
//!    to check, and withdraws it with [`Challenges::withdraw`] once the CA has answered.
//! 2. A name may carry several values at once (a certificate for `*.hello.<zone>` and
//!    `hello.<zone>` has two authorizations, both at `_acme-challenge.hello.<zone>`).
//! 3. Bounded: at most [`MAX_NAMES`] names and [`MAX_VALUES`] values per name; past it,
//!    `publish` refuses, and the order fails rather than the server growing.
//! 4. Answers for these names are never cached: a value published or withdrawn is seen by
//!    the next query.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Most names carrying challenge values at once.
pub const MAX_NAMES: usize = 1024;
/// Most values at one name.
pub const MAX_VALUES: usize = 8;

/// The label every challenge name starts with.
pub(crate) const LABEL: &[u8] = b"_acme-challenge";

/// The published challenge values, shared by the ACME client and the DNS server.
#[derive(Debug, Clone, Default)]
pub struct Challenges {
    // A std lock: held for a map lookup or insert, never across an await.
    inner: Arc<RwLock<HashMap<String, Vec<String>>>>,
}

/// Why a value was not published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The bound on names or values is reached.
    #[error(
        "Too many ACME challenges published at once (at most {MAX_NAMES} names, {MAX_VALUES} values each)"
    )]
    Full,
    /// The name is not a challenge name.
    #[error("`{0}` is not an _acme-challenge name")]
    NotAChallenge(String),
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Challenges {
    /// No challenges.
    pub fn new() -> Challenges {
        Challenges::default()
    }

    /// Publishes `value` as a TXT record at `name` (`_acme-challenge.<domain>`).
    pub fn publish(&self, name: &str, value: &str) -> Result<(), PublishError> {
        let name = key(name);
        if !name.starts_with("_acme-challenge.") {
            return Err(PublishError::NotAChallenge(name));
        }
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let full = map.len() >= MAX_NAMES && !map.contains_key(&name);
        let values = map.get(&name).map_or(0, Vec::len);
        if full || values >= MAX_VALUES {
            return Err(PublishError::Full);
        }
        let values = map.entry(name).or_default();
        if !values.iter().any(|v| v == value) {
            values.push(value.to_owned());
        }
        Ok(())
    }

    /// Withdraws `value` from `name` (nothing if it is not there).
    pub fn withdraw(&self, name: &str, value: &str) {
        let name = key(name);
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(values) = map.get_mut(&name) {
            values.retain(|v| v != value);
            if values.is_empty() {
                map.remove(&name);
            }
        }
    }

    /// The values at `name`, if any.
    pub fn values(&self, name: &str) -> Vec<String> {
        let map = self.inner.read().unwrap_or_else(|p| p.into_inner());
        map.get(&key(name)).cloned().unwrap_or_default()
    }

    /// How many names carry values now.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no name carries a value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a lowercased wire name starts with the `_acme-challenge` label.
pub(crate) fn is_challenge(lowercase: &[u8]) -> bool {
    lowercase.first() == Some(&(LABEL.len() as u8)) && lowercase.get(1..=LABEL.len()) == Some(LABEL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_published_withdrawn_and_bounded() {
        let challenges = Challenges::new();
        challenges
            .publish("_acme-challenge.Hello.revboot.test.", "a")
            .expect("publish");
        challenges
            .publish("_acme-challenge.hello.revboot.test", "b")
            .expect("publish");
        assert_eq!(
            challenges.values("_acme-challenge.hello.revboot.test"),
            ["a", "b"]
        );
        challenges.withdraw("_acme-challenge.hello.revboot.test", "a");
        assert_eq!(
            challenges.values("_acme-challenge.hello.revboot.test"),
            ["b"]
        );
        assert!(challenges.publish("hello.revboot.test", "x").is_err());
        for n in 1..MAX_VALUES {
            challenges
                .publish("_acme-challenge.hello.revboot.test", &n.to_string())
                .expect("under the bound");
        }
        assert!(matches!(
            challenges.publish("_acme-challenge.hello.revboot.test", "over"),
            Err(PublishError::Full)
        ));
        challenges.withdraw("_acme-challenge.hello.revboot.test", "nothing");
        assert!(!challenges.is_empty());
    }

    #[test]
    fn the_wire_label_is_recognised() {
        let mut wire = vec![LABEL.len() as u8];
        wire.extend_from_slice(LABEL);
        wire.extend_from_slice(b"\x05hello\x00");
        assert!(is_challenge(&wire));
        assert!(!is_challenge(b"\x05hello\x00"));
    }
}

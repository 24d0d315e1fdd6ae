//! The identity of a deployment: its commit id in the deployment repository.

use std::fmt;
use std::str::FromStr;

/// A deployment commit id (SHA-1), the identity of a built revision.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Revision(gix::ObjectId);

impl Revision {
    /// Wraps an object id.
    pub fn new(id: gix::ObjectId) -> Revision {
        Revision(id)
    }

    /// The object id.
    pub fn id(&self) -> gix::ObjectId {
        self.0
    }

    /// The full lowercase hex form.
    pub fn to_hex(&self) -> String {
        self.0.to_hex().to_string()
    }

    /// The first `len` hex digits (at most 40).
    pub fn short(&self, len: usize) -> String {
        self.0.to_hex_with_len(len.min(40)).to_string()
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Revision({})", self.short(12))
    }
}

/// A string that is not a full 40-digit hex commit id.
#[derive(Debug, thiserror::Error)]
#[error("Not a full commit id: `{0}`")]
pub struct ParseRevisionError(String);

impl FromStr for Revision {
    type Err = ParseRevisionError;

    fn from_str(text: &str) -> Result<Revision, ParseRevisionError> {
        if text.len() != 40 {
            return Err(ParseRevisionError(text.to_owned()));
        }
        gix::ObjectId::from_hex(text.as_bytes())
            .map(Revision)
            .map_err(|_| ParseRevisionError(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let hex = "0123456789abcdef0123456789abcdef01234567";
        let revision: Revision = hex.parse().expect("valid");
        assert_eq!(revision.to_string(), hex);
        assert_eq!(revision.short(7), "0123456");
        assert!("0123".parse::<Revision>().is_err());
        assert!("z".repeat(40).parse::<Revision>().is_err());
    }
}

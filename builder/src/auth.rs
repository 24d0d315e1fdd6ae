//! HTTP basic authentication for pushes, as stock git clients send it.
//!
//! 1. A request without valid credentials gets `401` with `WWW-Authenticate: Basic`, which
//!    makes git use the credentials in the URL or ask its credential helper, then retry.
//! 2. The client sends `Authorization: Basic base64(user:token)`; the token must be one of
//!    the configured push tokens (compared in constant time); the user name is only recorded
//!    (`REMOTE_USER`).

/// Credentials taken from an `Authorization: Basic …` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicCredentials {
    /// The user name (recorded, not checked).
    pub user: String,
    /// The password: a push or API token.
    pub password: String,
}

/// Parses an `Authorization` header value; `None` for anything that is not valid basic auth.
pub fn parse_basic(header: &str) -> Option<BasicCredentials> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = decode_base64(encoded.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some(BasicCredentials {
        user: user.to_owned(),
        password: password.to_owned(),
    })
}

/// Whether `given` equals one of `tokens`, without an early exit on the first differing byte.
pub fn token_matches(tokens: &[String], given: &str) -> bool {
    let mut found = false;
    for token in tokens {
        found |= constant_time_eq(token.as_bytes(), given.as_bytes());
    }
    found
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes standard base64, with or without padding (git sends it padded; other clients may
/// not), refusing anything longer than a credential could be.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    if text.len() > 4096 {
        return None;
    }
    ENGINE.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_basic_header() {
        // printf 'git:s3cret' | base64
        let credentials = parse_basic("Basic Z2l0OnMzY3JldA==").expect("valid");
        assert_eq!(credentials.user, "git");
        assert_eq!(credentials.password, "s3cret");
        // A password may contain ':'.
        // printf 'u:a:b' | base64
        let credentials = parse_basic("basic dTphOmI=").expect("valid");
        assert_eq!(credentials.password, "a:b");
    }

    #[test]
    fn rejects_other_schemes_and_garbage() {
        assert_eq!(parse_basic("Bearer abc"), None);
        assert_eq!(parse_basic("Basic !!!!"), None);
        assert_eq!(parse_basic("Basic"), None);
        // printf 'nocolon' | base64
        assert_eq!(parse_basic("Basic bm9jb2xvbg=="), None);
    }

    #[test]
    fn base64_lengths() {
        assert_eq!(decode_base64("YQ").as_deref(), Some(&b"a"[..]));
        assert_eq!(decode_base64("YWI=").as_deref(), Some(&b"ab"[..]));
        assert_eq!(decode_base64("YWJj").as_deref(), Some(&b"abc"[..]));
        assert_eq!(decode_base64("Y"), None);
    }

    #[test]
    fn token_comparison() {
        let tokens = vec!["one".to_owned(), "two".to_owned()];
        assert!(token_matches(&tokens, "two"));
        assert!(!token_matches(&tokens, "tw"));
        assert!(!token_matches(&tokens, ""));
        assert!(!token_matches(&[], "one"));
    }
}

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

/// Decodes standard base64 (with or without padding). The workspace has no base64 crate and
/// this (with the daemon's API, which calls [`parse_basic`]) is the only place that needs one.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let bytes = text.trim_end_matches('=').as_bytes();
    if bytes.len() % 4 == 1 || bytes.len() > 4096 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= value(*c)? << (18 - 6 * i);
        }
        let [_, a, b, c] = acc.to_be_bytes();
        out.push(a);
        if chunk.len() > 2 {
            out.push(b);
        }
        if chunk.len() > 3 {
            out.push(c);
        }
    }
    Some(out)
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

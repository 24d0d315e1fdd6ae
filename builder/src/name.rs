//! Service names: the `<service>` in `<label>.<service>.<zone>` and in `/git/<service>.git`.

/// The longest service name accepted (leaves room for a label within DNS name limits).
pub const MAX_SERVICE_NAME: usize = 40;

/// Why a service name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceNameError {
    /// The name is empty.
    #[error("Service name is empty")]
    Empty,
    /// The name is longer than [`MAX_SERVICE_NAME`].
    #[error(
        "Service name `{name}` is {len} characters long; at most {MAX_SERVICE_NAME} are allowed"
    )]
    TooLong {
        /// The rejected name.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The name has a character outside `a-z`, `0-9` and `-`.
    #[error("Service name `{name}` has `{ch}`; use lowercase letters, digits and `-` only")]
    BadChar {
        /// The rejected name.
        name: String,
        /// The first offending character.
        ch: char,
    },
    /// The name starts or ends with `-`.
    #[error("Service name `{name}` must not start or end with `-`")]
    BadEdge {
        /// The rejected name.
        name: String,
    },
    /// The name has `--` as its third and fourth characters: DNS keeps those labels for
    /// encoded international names (RFC 5891 §4.2.3.1), and certificate authorities refuse
    /// them, so `*.<service>.<zone>` could never have a certificate.
    #[error(
        "Service name `{name}` has `--` as its third and fourth characters, which DNS keeps for \
         encoded international names: no certificate authority issues a certificate for it"
    )]
    Reserved {
        /// The rejected name.
        name: String,
    },
}

/// Checks that `name` is a DNS-label-safe service name: 1 to 40 characters of lowercase
/// `a-z`, `0-9` and `-`, not starting or ending with `-`, without `--` as its third and
/// fourth characters (so that a certificate authority can issue `*.<service>.<zone>`).
pub fn validate_service_name(name: &str) -> Result<(), ServiceNameError> {
    if name.is_empty() {
        return Err(ServiceNameError::Empty);
    }
    if name.len() > MAX_SERVICE_NAME {
        return Err(ServiceNameError::TooLong {
            name: name.chars().take(MAX_SERVICE_NAME + 8).collect(),
            len: name.len(),
        });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(ServiceNameError::BadChar {
            name: name.to_owned(),
            ch,
        });
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(ServiceNameError::BadEdge {
            name: name.to_owned(),
        });
    }
    if name.get(2..4) == Some("--") {
        return Err(ServiceNameError::Reserved {
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for name in [
            "hello",
            "a",
            "my-service-2",
            "0day",
            "a--b",
            &"x".repeat(40),
        ] {
            assert_eq!(validate_service_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn rejects_unsafe_names() {
        assert_eq!(validate_service_name(""), Err(ServiceNameError::Empty));
        assert!(matches!(
            validate_service_name(&"x".repeat(41)),
            Err(ServiceNameError::TooLong { len: 41, .. })
        ));
        for (name, ch) in [
            ("Hello", 'H'),
            ("a.b", '.'),
            ("a_b", '_'),
            ("../x", '.'),
            ("a b", ' '),
        ] {
            assert_eq!(
                validate_service_name(name),
                Err(ServiceNameError::BadChar {
                    name: name.into(),
                    ch
                })
            );
        }
        assert!(matches!(
            validate_service_name("-x"),
            Err(ServiceNameError::BadEdge { .. })
        ));
        assert!(matches!(
            validate_service_name("x-"),
            Err(ServiceNameError::BadEdge { .. })
        ));
        for name in ["xn--hello", "ab--cd", "zz--"] {
            assert!(
                matches!(
                    validate_service_name(name),
                    Err(ServiceNameError::Reserved { .. } | ServiceNameError::BadEdge { .. })
                ),
                "{name}"
            );
        }
    }
}

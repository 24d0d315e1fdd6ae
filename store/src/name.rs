//! The name grammar: which revision of which service a host name designates.
//!
//! The DNS front end reads it from a query's name, the proxy's front door from an HTTP
//! `Host` header or a TLS server name; both give the labels of one name, lowercased, and
//! get the same answer:
//!
//! 1. Fewer labels than the zone, or a suffix other than the zone → [`Shape::Outside`].
//! 2. The zone itself → [`Shape::Apex`].
//! 3. `<service>.<zone>` → [`Shape::Live`]: the service's live revision.
//! 4. `<label>.<service>.<zone>` → [`Shape::Label`]: the revision `label` names (see the
//!    crate docs' "Labels").
//! 5. Services and labels are lowercase letters, digits, `-` and `_`; anything else in the
//!    zone — other characters, an empty label, three or more labels below the zone, more
//!    than [`MAX_LABELS`] labels — is [`Shape::Nothing`], a name that cannot exist.
//!
//! Matching is case-insensitive because callers lowercase (ASCII) before they ask; an
//! uppercase byte in `labels` makes the name [`Shape::Nothing`].

/// The most labels a name may have (a DNS name of 255 bytes has at most 127).
pub const MAX_LABELS: usize = 128;

/// What a name is, relative to the zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape<'a> {
    /// Not in the zone.
    Outside,
    /// The zone itself.
    Apex,
    /// `<service>.<zone>`: the live revision.
    Live {
        /// The service.
        service: &'a str,
    },
    /// `<label>.<service>.<zone>`.
    Label {
        /// The label.
        label: &'a str,
        /// The service.
        service: &'a str,
    },
    /// In the zone, but not a shape that can exist (too deep, or characters no service or
    /// label can have).
    Nothing,
}

/// Classifies a name given as its labels, leftmost first, each lowercased, against the
/// zone's lowercased labels (leftmost first too).
pub fn classify<'a, Z: AsRef<[u8]>>(
    labels: impl IntoIterator<Item = &'a [u8]>,
    zone: &[Z],
) -> Shape<'a> {
    // A fixed array keeps this allocation-free: the DNS front end asks on every query.
    let mut held: [&[u8]; MAX_LABELS] = [&[]; MAX_LABELS];
    let mut count = 0;
    for label in labels {
        if count == held.len() {
            return Shape::Nothing;
        }
        held[count] = label;
        count += 1;
    }
    let labels = &held[..count];
    if labels.len() < zone.len() {
        return Shape::Outside;
    }
    let (relative, suffix) = labels.split_at(labels.len() - zone.len());
    if suffix.iter().zip(zone).any(|(a, b)| *a != b.as_ref()) {
        return Shape::Outside;
    }
    match relative {
        [] => Shape::Apex,
        [service] => word(service).map_or(Shape::Nothing, |service| Shape::Live { service }),
        [label, service] => match (word(label), word(service)) {
            (Some(label), Some(service)) => Shape::Label { label, service },
            _ => Shape::Nothing,
        },
        _ => Shape::Nothing,
    }
}

/// Classifies a host name as written in a URL, an HTTP `Host` header or a TLS server name
/// (`c63dc27.hello.revboot.test`, an optional trailing dot; no port), lowercasing it into
/// `scratch` first. `zone` is the zone's lowercased labels.
pub fn classify_host<'a, Z: AsRef<[u8]>>(
    host: &str,
    zone: &[Z],
    scratch: &'a mut String,
) -> Shape<'a> {
    scratch.clear();
    scratch.push_str(host.strip_suffix('.').unwrap_or(host));
    scratch.make_ascii_lowercase();
    if scratch.is_empty() {
        return if zone.is_empty() {
            Shape::Apex
        } else {
            Shape::Outside
        };
    }
    classify(scratch.split('.').map(str::as_bytes), zone)
}

/// A service name or label, if `label` can be one.
fn word(label: &[u8]) -> Option<&str> {
    let ok = !label.is_empty()
        && label
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_');
    ok.then(|| std::str::from_utf8(label).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Vec<Vec<u8>> {
        vec![b"revboot".to_vec(), b"test".to_vec()]
    }

    fn shape(name: &str) -> String {
        let mut scratch = String::new();
        match classify_host(name, &zone(), &mut scratch) {
            Shape::Outside => "outside".into(),
            Shape::Apex => "apex".into(),
            Shape::Live { service } => format!("live {service}"),
            Shape::Label { label, service } => format!("label {label} {service}"),
            Shape::Nothing => "nothing".into(),
        }
    }

    #[test]
    fn shapes() {
        assert_eq!(shape("revboot.test"), "apex");
        assert_eq!(shape("hello.revboot.test"), "live hello");
        assert_eq!(shape("abc1234.hello.revboot.test"), "label abc1234 hello");
        assert_eq!(shape("a.b.hello.revboot.test"), "nothing");
        assert_eq!(shape("he*lo.revboot.test"), "nothing");
        assert_eq!(shape("x.he\u{e9}.revboot.test"), "nothing");
        assert_eq!(shape("example.com"), "outside");
        assert_eq!(shape("test"), "outside");
        assert_eq!(shape("revboot.test.evil"), "outside");
        assert_eq!(shape(""), "outside");
    }

    #[test]
    fn host_names_are_case_insensitive_and_may_end_in_a_dot() {
        assert_eq!(shape("ABC1234.Hello.REVBOOT.test."), "label abc1234 hello");
        assert_eq!(shape("hello.revboot.test."), "live hello");
        assert_eq!(shape("hello..revboot.test"), "nothing");
        assert_eq!(shape(".revboot.test"), "nothing");
    }

    #[test]
    fn uppercase_labels_cannot_exist() {
        let labels: [&[u8]; 3] = [b"Hello", b"revboot", b"test"];
        assert_eq!(classify(labels, &zone()), Shape::Nothing);
    }

    #[test]
    fn too_many_labels_cannot_exist() {
        let many = vec![&b"a"[..]; MAX_LABELS + 1];
        assert_eq!(classify(many, &zone()), Shape::Nothing);
    }
}

//! The name grammar (see the crate docs for the numbered rules).

use crate::wire;

/// What a lowercased query name is, relative to the zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape<'a> {
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

/// Classifies `name` (lowercased wire form) against the zone's lowercased labels.
pub(crate) fn classify<'a>(name: &'a [u8], zone: &[Vec<u8>]) -> Shape<'a> {
    // At most 128 labels fit in 255 bytes; a fixed array keeps this allocation-free.
    let mut labels: [&[u8]; 128] = [&[]; 128];
    let mut count = 0;
    for label in wire::labels(name) {
        if count == labels.len() {
            return Shape::Nothing;
        }
        labels[count] = label;
        count += 1;
    }
    let labels = &labels[..count];
    if labels.len() < zone.len() {
        return Shape::Outside;
    }
    let (relative, suffix) = labels.split_at(labels.len() - zone.len());
    if suffix.iter().zip(zone).any(|(a, b)| *a != b.as_slice()) {
        return Shape::Outside;
    }
    let word = |label: &'a [u8]| -> Option<&'a str> {
        let ok = !label.is_empty()
            && label
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_');
        ok.then(|| std::str::from_utf8(label).ok()).flatten()
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    fn zone() -> Vec<Vec<u8>> {
        vec![b"revboot".to_vec(), b"test".to_vec()]
    }

    #[test]
    fn shapes() {
        let z = zone();
        let shape = |n: &str| classify(&wire(n), &z).to_owned_shape();
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

    trait Owned {
        fn to_owned_shape(&self) -> String;
    }

    impl Owned for Shape<'_> {
        fn to_owned_shape(&self) -> String {
            match self {
                Shape::Outside => "outside".into(),
                Shape::Apex => "apex".into(),
                Shape::Live { service } => format!("live {service}"),
                Shape::Label { label, service } => format!("label {label} {service}"),
                Shape::Nothing => "nothing".into(),
            }
        }
    }
}

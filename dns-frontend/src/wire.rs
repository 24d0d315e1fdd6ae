//! Reading a query straight from its wire bytes (RFC 1035 §4.1, RFC 6891 §6, RFC 7871 §6),
//! and writing the one answer that is on the cold path, an instance's address
//! ([`address_response`]).
//!
//! The hot path never builds a full message: it needs the id, a few flags, the question as
//! sent (to echo it) and what the OPT record says. The protocol, as read here:
//!
//! 1. A packet shorter than the 12-byte header, or one with QR set (a response), is ignored:
//!    answering it could only serve reflection.
//! 2. Opcode other than QUERY → NOTIMP (header only).
//! 3. Exactly one question; its name is a sequence of length-prefixed labels (≤ 63 bytes,
//!    ≤ 255 in all, no compression pointers) ending with the root label → otherwise FORMERR.
//! 4. Answer and authority records, when a client sends any, are skipped record by record;
//!    additional records likewise, except OPT: at most one, owned by the root name, its
//!    options well-formed (code, length, value) → otherwise FORMERR.
//! 5. From OPT: the requestor's UDP payload size, the EDNS version, the DO bit and, when it is
//!    well-formed (family 1 or 2, address length = ⌈source/8⌉, no bits past the prefix, scope
//!    0), the Client Subnet option. A malformed Client Subnet is FORMERR only when the
//!    server is configured to trust it; otherwise all options are ignored.
//!
//! Bytes after the last record are ignored.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The fixed DNS header length.
pub(crate) const HEADER_LEN: usize = 12;
/// Largest DNS message.
pub(crate) const MAX_MESSAGE: usize = 65_535;
/// RR type OPT.
const TYPE_OPT: u16 = 41;
/// EDNS option code of Client Subnet (RFC 7871).
const OPTION_SUBNET: u16 = 8;

/// A query, borrowed from its packet.
#[derive(Debug, Clone)]
pub(crate) struct Query<'a> {
    /// The message id.
    pub id: u16,
    /// Recursion desired (copied into the response).
    pub rd: bool,
    /// Checking disabled (copied into the response).
    pub cd: bool,
    /// The question section as sent: name, type, class.
    pub question: &'a [u8],
    /// The question's type.
    pub qtype: u16,
    /// The question's class.
    pub qclass: u16,
    /// What the OPT record said, if there was one.
    pub edns: Option<Edns>,
}

impl Query<'_> {
    /// The question name as sent (wire form, with the root label).
    pub fn qname(&self) -> &[u8] {
        &self.question[..self.question.len() - 4]
    }
}

/// What a query's OPT record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Edns {
    /// Requestor's UDP payload size (values below 512 count as 512).
    pub udp_size: u16,
    /// EDNS version.
    pub version: u8,
    /// DNSSEC OK.
    pub dnssec_ok: bool,
    /// The Client Subnet option, if present and well-formed.
    pub subnet: Option<Subnet>,
}

/// An EDNS Client Subnet (RFC 7871) as a query states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Subnet {
    /// The address, bits past `source_prefix` zero.
    pub address: IpAddr,
    /// How many leading bits of `address` are given.
    pub source_prefix: u8,
}

/// Why a packet gets no normal answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// Not worth a reply (too short for a header, or a response).
    Ignore,
    /// The header was readable, the rest is malformed: FORMERR.
    FormErr(Header),
    /// An opcode this server does not implement: NOTIMP.
    NotImp(Header),
}

/// The parts of a header needed to answer with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// The message id.
    pub id: u16,
    /// The opcode (4 bits).
    pub opcode: u8,
    /// Recursion desired.
    pub rd: bool,
}

impl Header {
    /// A 12-byte response carrying only this header and `rcode` (no sections).
    pub fn error_response(&self, rcode: u8) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..2].copy_from_slice(&self.id.to_be_bytes());
        out[2] = 0x80 | (self.opcode << 3) | u8::from(self.rd);
        out[3] = rcode & 0x0f;
        out
    }
}

/// A cursor over a packet; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        let s = self.take(2)?;
        Some(u16::from_be_bytes([s[0], s[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        let s = self.take(4)?;
        Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(len)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    /// Skips a name that may end in a compression pointer (records other than the question).
    fn skip_name(&mut self) -> Option<bool> {
        let start = self.at;
        loop {
            let len = self.u8()?;
            match len & 0xc0 {
                0x00 if len == 0 => return Some(self.at - start == 1),
                0x00 => {
                    self.take(usize::from(len))?;
                }
                0xc0 => {
                    self.u8()?;
                    return Some(false);
                }
                _ => return None,
            }
            if self.at - start > 255 {
                return None;
            }
        }
    }

    /// Reads an uncompressed name; returns its length in bytes.
    fn plain_name(&mut self) -> Option<usize> {
        let start = self.at;
        loop {
            let len = self.u8()?;
            if len == 0 {
                break;
            }
            if len > 63 {
                return None;
            }
            self.take(usize::from(len))?;
        }
        let total = self.at - start;
        (total <= 255).then_some(total)
    }
}

/// Parses a query packet. `strict_subnet`: a malformed Client Subnet is FORMERR (the server
/// trusts the option) rather than ignored.
pub(crate) fn parse(packet: &[u8], strict_subnet: bool) -> Result<Query<'_>, Rejected> {
    if packet.len() < HEADER_LEN {
        return Err(Rejected::Ignore);
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let flags = u16::from_be_bytes([packet[2], packet[3]]);
    if flags & 0x8000 != 0 {
        return Err(Rejected::Ignore);
    }
    let header = Header {
        id,
        opcode: ((flags >> 11) & 0x0f) as u8,
        rd: flags & 0x0100 != 0,
    };
    if header.opcode != 0 {
        return Err(Rejected::NotImp(header));
    }
    let count = |i: usize| u16::from_be_bytes([packet[i], packet[i + 1]]);
    let (qdcount, ancount, nscount, arcount) = (count(4), count(6), count(8), count(10));
    if qdcount != 1 {
        return Err(Rejected::FormErr(header));
    }
    let formerr = Rejected::FormErr(header);
    let mut r = Reader {
        bytes: packet,
        at: HEADER_LEN,
    };
    r.plain_name().ok_or(formerr)?;
    let qtype = r.u16().ok_or(formerr)?;
    let qclass = r.u16().ok_or(formerr)?;
    let question = &packet[HEADER_LEN..r.at];

    for _ in 0..u32::from(ancount) + u32::from(nscount) {
        skip_record(&mut r).ok_or(formerr)?;
    }
    let mut edns = None;
    for _ in 0..arcount {
        let root = r.skip_name().ok_or(formerr)?;
        let rtype = r.u16().ok_or(formerr)?;
        let class = r.u16().ok_or(formerr)?;
        let ttl = r.u32().ok_or(formerr)?;
        let rdlen = r.u16().ok_or(formerr)?;
        let rdata = r.take(usize::from(rdlen)).ok_or(formerr)?;
        if rtype != TYPE_OPT {
            continue;
        }
        if edns.is_some() || !root {
            return Err(formerr);
        }
        let subnet = match options(rdata, strict_subnet) {
            Ok(subnet) => subnet,
            Err(()) => return Err(formerr),
        };
        edns = Some(Edns {
            udp_size: class.max(512),
            version: (ttl >> 16) as u8,
            dnssec_ok: ttl & 0x8000 != 0,
            subnet,
        });
    }
    Ok(Query {
        id,
        rd: header.rd,
        cd: flags & 0x0010 != 0,
        question,
        qtype,
        qclass,
        edns,
    })
}

fn skip_record(r: &mut Reader<'_>) -> Option<()> {
    r.skip_name()?;
    r.take(8)?;
    let rdlen = r.u16()?;
    r.take(usize::from(rdlen))?;
    Some(())
}

/// Walks the options of an OPT record; returns the Client Subnet if one is well-formed.
fn options(rdata: &[u8], strict_subnet: bool) -> Result<Option<Subnet>, ()> {
    let mut r = Reader {
        bytes: rdata,
        at: 0,
    };
    let mut subnet = None;
    while r.at < rdata.len() {
        let code = r.u16().ok_or(())?;
        let len = r.u16().ok_or(())?;
        let value = r.take(usize::from(len)).ok_or(())?;
        if code == OPTION_SUBNET {
            match client_subnet(value) {
                Some(parsed) if subnet.is_none() => subnet = Some(parsed),
                _ if strict_subnet => return Err(()),
                _ => {}
            }
        }
    }
    Ok(subnet)
}

/// Parses a Client Subnet option value (RFC 7871 §6); `None` when malformed.
fn client_subnet(value: &[u8]) -> Option<Subnet> {
    let mut r = Reader {
        bytes: value,
        at: 0,
    };
    let family = r.u16()?;
    let source_prefix = r.u8()?;
    let scope_prefix = r.u8()?;
    let addr = &value[r.at..];
    let max = match family {
        1 => 32,
        2 => 128,
        _ => return None,
    };
    if source_prefix > max
        || scope_prefix != 0
        || addr.len() != usize::from(source_prefix).div_ceil(8)
    {
        return None;
    }
    if let Some(&last) = addr.last() {
        let used = source_prefix % 8;
        if used != 0 && last & (0xff >> used) != 0 {
            return None;
        }
    }
    let address = if family == 1 {
        let mut octets = [0u8; 4];
        octets[..addr.len()].copy_from_slice(addr);
        IpAddr::V4(Ipv4Addr::from(octets))
    } else {
        let mut octets = [0u8; 16];
        octets[..addr.len()].copy_from_slice(addr);
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    Some(Subnet {
        address,
        source_prefix,
    })
}

/// Appends the question name lowercased (ASCII only, RFC 4343) to `out`.
pub(crate) fn push_lowercase(name: &[u8], out: &mut Vec<u8>) {
    out.extend(name.iter().map(u8::to_ascii_lowercase));
}

/// `name` in wire form, lowercased as [`push_lowercase`] does a question's.
pub(crate) fn lowercase_name(name: &hickory_proto::rr::Name) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.iter() {
        out.push(label.len() as u8);
        push_lowercase(label, &mut out);
    }
    out.push(0);
    out
}

/// The labels of an uncompressed wire name (already validated by [`parse`]).
pub(crate) fn labels(name: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = usize::from(*name.get(at)?);
        if len == 0 {
            return None;
        }
        let label = name.get(at + 1..at + 1 + len)?;
        at += 1 + len;
        Some(label)
    })
}

/// What the OPT record of a response says (RFC 6891 §6.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResponseOpt {
    /// The UDP payload size this server accepts.
    pub udp_size: u16,
    /// DNSSEC OK, echoed.
    pub dnssec_ok: bool,
    /// The query's Client Subnet and the scope prefix the answer holds for (RFC 7871 §7.1.2).
    pub subnet: Option<(Subnet, u8)>,
}

/// The positive answer to `query` with one A or AAAA record, as its full and its truncated
/// (TC, no answer) form.
///
/// This is the answer to a name that summons an instance, so it is written straight to the
/// wire: building and encoding a message twice costs more than the rest of the answer after
/// an idle moment. The question is echoed as `lowercase` (the server restores its case when
/// it sends); the record's owner is a pointer to it. A test checks it byte for byte against
/// the general encoder.
pub(crate) fn address_response(
    query: &Query<'_>,
    lowercase: &[u8],
    address: IpAddr,
    ttl: u32,
    opt: Option<ResponseOpt>,
) -> (Vec<u8>, Vec<u8>) {
    let mut full = Vec::with_capacity(HEADER_LEN + 2 * lowercase.len() + 64);
    full.extend_from_slice(&query.id.to_be_bytes());
    // QR, opcode QUERY, AA, RD; then RA = 0, Z = 0, AD = 0, CD, rcode NOERROR.
    full.push(0x80 | 0x04 | u8::from(query.rd));
    full.push(u8::from(query.cd) << 4);
    for count in [1, 1, 0, u16::from(opt.is_some())] {
        full.extend_from_slice(&count.to_be_bytes());
    }
    full.extend_from_slice(lowercase);
    full.extend_from_slice(&query.qtype.to_be_bytes());
    full.extend_from_slice(&query.qclass.to_be_bytes());
    let answer_at = full.len();
    // Owner: a pointer to the question name at offset 12.
    full.extend_from_slice(&[0xc0, 0x0c]);
    let (bytes, width) = octets(address);
    let rtype: u16 = if address.is_ipv4() { 1 } else { 28 };
    full.extend_from_slice(&rtype.to_be_bytes());
    full.extend_from_slice(&1u16.to_be_bytes());
    full.extend_from_slice(&ttl.to_be_bytes());
    full.extend_from_slice(&(width as u16).to_be_bytes());
    full.extend_from_slice(&bytes[..width]);
    let opt_at = full.len();
    if let Some(opt) = opt {
        full.push(0);
        full.extend_from_slice(&TYPE_OPT.to_be_bytes());
        full.extend_from_slice(&opt.udp_size.to_be_bytes());
        // Extended rcode 0, version 0, the DO bit.
        let flags: u32 = if opt.dnssec_ok { 0x8000 } else { 0 };
        full.extend_from_slice(&flags.to_be_bytes());
        match opt.subnet {
            None => full.extend_from_slice(&0u16.to_be_bytes()),
            Some((subnet, scope)) => {
                let (octets, width) = octets(subnet.address);
                let given = &octets[..usize::from(subnet.source_prefix).div_ceil(8).min(width)];
                let family: u16 = if subnet.address.is_ipv4() { 1 } else { 2 };
                let length = u16::try_from(4 + given.len()).expect("at most 20 bytes");
                full.extend_from_slice(&(length + 4).to_be_bytes());
                full.extend_from_slice(&OPTION_SUBNET.to_be_bytes());
                full.extend_from_slice(&length.to_be_bytes());
                full.extend_from_slice(&family.to_be_bytes());
                full.push(subnet.source_prefix);
                full.push(scope);
                full.extend_from_slice(given);
            }
        }
    }
    // Truncated: the same without the answer, with TC and no answer counted.
    let mut truncated = [&full[..answer_at], &full[opt_at..]].concat();
    truncated[2] |= 0x02;
    truncated[6..8].copy_from_slice(&0u16.to_be_bytes());
    (full, truncated)
}

/// An address's bytes in a 16-byte buffer, and how many of them it has.
fn octets(address: IpAddr) -> ([u8; 16], usize) {
    match address {
        IpAddr::V4(ip) => {
            let mut octets = [0u8; 16];
            octets[..4].copy_from_slice(&ip.octets());
            (octets, 4)
        }
        IpAddr::V6(ip) => (ip.octets(), 16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[&str], qtype: u16, additional: &[u8], arcount: u16) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0];
        p.extend_from_slice(&arcount.to_be_bytes());
        for label in name {
            p.push(label.len() as u8);
            p.extend_from_slice(label.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        p.extend_from_slice(additional);
        p
    }

    fn opt(udp: u16, version: u8, options: &[u8]) -> Vec<u8> {
        let mut p = vec![0, 0, 41];
        p.extend_from_slice(&udp.to_be_bytes());
        p.extend_from_slice(&[0, version, 0x80, 0]);
        p.extend_from_slice(&(options.len() as u16).to_be_bytes());
        p.extend_from_slice(options);
        p
    }

    #[test]
    fn reads_a_plain_question() {
        let p = query(&["Hello", "revboot", "test"], 1, &[], 0);
        let q = parse(&p, false).expect("valid query");
        assert_eq!(q.id, 0x1234);
        assert!(q.rd);
        assert_eq!(q.qtype, 1);
        assert_eq!(q.qclass, 1);
        assert!(q.edns.is_none());
        let labels: Vec<_> = labels(q.qname()).collect();
        assert_eq!(labels, [&b"Hello"[..], b"revboot", b"test"]);
    }

    #[test]
    fn reads_opt_and_client_subnet() {
        let ecs = [0, 8, 0, 7, 0, 1, 24, 0, 10, 1, 2];
        let p = query(&["a", "test"], 1, &opt(4096, 0, &ecs), 1);
        let q = parse(&p, true).expect("valid query");
        let edns = q.edns.expect("OPT present");
        assert_eq!(edns.udp_size, 4096);
        assert!(edns.dnssec_ok);
        let subnet = edns.subnet.expect("subnet");
        assert_eq!(subnet.address, IpAddr::from([10, 1, 2, 0]));
        assert_eq!(subnet.source_prefix, 24);
    }

    #[test]
    fn malformed_subnet_is_formerr_only_when_trusted() {
        // Source prefix 24 but only 2 address bytes.
        let ecs = [0, 8, 0, 6, 0, 1, 24, 0, 10, 1];
        let p = query(&["a", "test"], 1, &opt(1232, 0, &ecs), 1);
        assert!(matches!(parse(&p, true), Err(Rejected::FormErr(_))));
        let q = parse(&p, false).expect("ignored when untrusted");
        assert_eq!(q.edns.expect("OPT").subnet, None);
    }

    #[test]
    fn two_opt_records_are_formerr() {
        let mut extra = opt(1232, 0, &[]);
        extra.extend(opt(1232, 0, &[]));
        let p = query(&["a", "test"], 1, &extra, 2);
        assert!(matches!(parse(&p, false), Err(Rejected::FormErr(_))));
    }

    #[test]
    fn bad_shapes_are_rejected() {
        assert!(matches!(parse(&[0; 11], false), Err(Rejected::Ignore)));
        let mut response = query(&["a"], 1, &[], 0);
        response[2] |= 0x80;
        assert!(matches!(parse(&response, false), Err(Rejected::Ignore)));
        let mut update = query(&["a"], 1, &[], 0);
        update[2] |= 5 << 3;
        assert!(matches!(parse(&update, false), Err(Rejected::NotImp(_))));
        let mut two = query(&["a"], 1, &[], 0);
        two[5] = 2;
        assert!(matches!(parse(&two, false), Err(Rejected::FormErr(_))));
        let truncated = query(&["abc"], 1, &[], 0);
        assert!(matches!(
            parse(&truncated[..truncated.len() - 3], false),
            Err(Rejected::FormErr(_))
        ));
        let mut pointer = query(&["a"], 1, &[], 0);
        pointer[12] = 0xc0;
        assert!(matches!(parse(&pointer, false), Err(Rejected::FormErr(_))));
    }
}

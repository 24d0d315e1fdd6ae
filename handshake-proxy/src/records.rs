//! A user-space TLS record layer, for the connections whose TLS the front door ended and an
//! upgrade in place handed over: the rustls session cannot leave the old program (and this
//! kernel has no kTLS), so the old program extracts its traffic keys and sequence numbers
//! (rustls' `dangerous_extract_secrets`) and the new one carries the session on with this.
//!
//! 1. Application data only: the handshake was done by rustls. TLS 1.3 with AES-128-GCM,
//!    AES-256-GCM and CHACHA20-POLY1305 (nonce = iv XOR sequence number, AAD = the 5-byte
//!    record header, the inner content type after the data, zero padding stripped), and
//!    TLS 1.2 with AES-GCM (nonce = the 4-byte salt and the record's 8-byte explicit nonce;
//!    sent ones are iv XOR sequence number, as rustls does) and CHACHA20-POLY1305 (nonce =
//!    iv XOR sequence number); TLS 1.2's AAD is the sequence number, type, version and
//!    plaintext length. Each direction has its own key, iv and sequence number, counted on
//!    from where rustls left them.
//! 2. Sent data is cut into records of at most 16 KiB of plaintext.
//! 3. A close_notify alert from the client ends its direction cleanly (the instance's side
//!    is shut down); one is sent when the instance ends its own.
//! 4. Anything else it cannot follow is refused with a [`RecordError`], which names the
//!    fatal alert to send back, if any: a record that fails to decrypt (`bad_record_mac`),
//!    one longer than the protocol allows (`record_overflow`), a handshake message after
//!    the handshake (a KeyUpdate, a renegotiation: `unexpected_message`), another content
//!    type. An alert the client sends other than close_notify ends it, with nothing sent.
//! 5. The keys never reach a log: [`TlsSession`]'s `Debug` shows the version, suite and
//!    sequence numbers only; [`TlsSession::to_bytes`] is for the upgrade's sealed memfd
//!    alone. The keys are overwritten when dropped.

use std::fmt;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};

/// Plaintext carried by one record at most.
pub(crate) const MAX_PLAINTEXT: usize = 16 * 1024;
/// A record header's length.
const HEADER: usize = 5;
/// The AEAD tag's length (all three suites).
const TAG: usize = 16;
/// TLS 1.2 AES-GCM's explicit nonce, sent before each record's ciphertext.
const EXPLICIT: usize = 8;
/// Content types.
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
/// Alert descriptions sent.
const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const DECODE_ERROR: u8 = 50;
/// The first byte of [`TlsSession::to_bytes`]: its format.
const FORMAT: u8 = 1;

/// The protocol version of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Version {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

/// The AEAD of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Suite {
    /// AES-128-GCM.
    Aes128Gcm,
    /// AES-256-GCM.
    Aes256Gcm,
    /// CHACHA20-POLY1305.
    Chacha20Poly1305,
}

impl Suite {
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    fn code(self) -> u8 {
        match self {
            Suite::Aes128Gcm => 1,
            Suite::Aes256Gcm => 2,
            Suite::Chacha20Poly1305 => 3,
        }
    }

    /// TLS 1.2's explicit nonce: AES-GCM only.
    fn explicit(self, version: Version) -> usize {
        match (version, self) {
            (Version::Tls12, Suite::Aes128Gcm | Suite::Aes256Gcm) => EXPLICIT,
            _ => 0,
        }
    }
}

/// Why a session cannot be carried on, or a record not followed (rule 4). Never holds a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// A record that failed to decrypt: tampered, or not of this session.
    #[error("A record failed to decrypt")]
    Decrypt,
    /// A record longer than the protocol allows.
    #[error("A record of {length} bytes, over the protocol's bound")]
    Oversized {
        /// Its length field.
        length: usize,
    },
    /// A handshake message after the handshake (a KeyUpdate, a renegotiation).
    #[error("A handshake message after the handshake (a KeyUpdate or renegotiation), not followed")]
    PostHandshake,
    /// A content type other than application data, alert, handshake.
    #[error("A record of content type {0}, not followed")]
    Unexpected(u8),
    /// A record too short for its suite, or an alert not two bytes long.
    #[error("A malformed record")]
    Malformed,
    /// The client sent an alert other than close_notify.
    #[error("The client sent alert {0}")]
    Alert(u8),
    /// A sequence number would wrap.
    #[error("The sequence numbers ran out")]
    Exhausted,
    /// The session's version or suite is not one this layer follows (rule 1).
    #[error("A TLS version or cipher suite this record layer does not follow")]
    Unsupported,
    /// [`TlsSession::from_bytes`] was given something else.
    #[error("Not a TLS session's state")]
    NotAState,
}

impl RecordError {
    /// The fatal alert to send back, if any (rule 4).
    pub(crate) fn alert(&self) -> Option<u8> {
        match self {
            RecordError::Decrypt => Some(BAD_RECORD_MAC),
            RecordError::Oversized { .. } => Some(RECORD_OVERFLOW),
            RecordError::PostHandshake | RecordError::Unexpected(_) => Some(UNEXPECTED_MESSAGE),
            RecordError::Malformed => Some(DECODE_ERROR),
            RecordError::Alert(_)
            | RecordError::Exhausted
            | RecordError::Unsupported
            | RecordError::NotAState => None,
        }
    }
}

/// One direction's key, iv and next sequence number.
struct Keys {
    raw: Vec<u8>,
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new(suite: Suite, raw: &[u8], iv: &[u8], seq: u64) -> Result<Keys, RecordError> {
        let key = UnboundKey::new(suite.algorithm(), raw).map_err(|_| RecordError::Unsupported)?;
        let iv = iv.try_into().map_err(|_| RecordError::Unsupported)?;
        Ok(Keys {
            raw: raw.to_vec(),
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// iv XOR the sequence number (rule 1).
    fn nonce(&self) -> [u8; aead::NONCE_LEN] {
        let mut nonce = self.iv;
        for (byte, seq) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *byte ^= seq;
        }
        nonce
    }

    fn next(&mut self) -> Result<(), RecordError> {
        self.seq = self.seq.checked_add(1).ok_or(RecordError::Exhausted)?;
        Ok(())
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.iv);
        out.push(u8::try_from(self.raw.len()).expect("an AEAD key is at most 32 bytes"));
        out.extend_from_slice(&self.raw);
    }

    fn read(suite: Suite, bytes: &mut &[u8]) -> Result<Keys, RecordError> {
        let seq = u64::from_be_bytes(take(bytes, 8)?.try_into().expect("8 bytes"));
        let iv = take(bytes, aead::NONCE_LEN)?;
        let length = take(bytes, 1)?[0];
        let raw = take(bytes, usize::from(length))?;
        Keys::new(suite, raw, iv, seq)
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.raw.iter_mut().for_each(|byte| *byte = 0);
        self.iv = [0; aead::NONCE_LEN];
    }
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], RecordError> {
    if bytes.len() < n {
        return Err(RecordError::NotAState);
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

/// What the client sends: records opened (its keys) and the bytes of a record not whole
/// yet.
pub(crate) struct Opener {
    version: Version,
    suite: Suite,
    keys: Keys,
    /// Bytes read from the client and not yet opened: at most one record, not whole.
    pub(crate) incoming: Vec<u8>,
}

/// What [`Opener::open`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    /// Every whole record was opened; more bytes are needed.
    More,
    /// The client's close_notify (rule 3): its direction ended.
    Closed,
}

impl Opener {
    /// The longest record payload the protocol allows.
    fn max_payload(&self) -> usize {
        match self.version {
            Version::Tls13 => MAX_PLAINTEXT + 256,
            Version::Tls12 => MAX_PLAINTEXT + 2048,
        }
    }

    /// Opens every whole record in `incoming`, appending application data to `plain`
    /// (rules 1, 3, 4). The bytes of a record not whole stay in `incoming`.
    pub(crate) fn open(&mut self, plain: &mut Vec<u8>) -> Result<Opened, RecordError> {
        let mut at = 0;
        let opened = loop {
            let rest = &self.incoming[at..];
            if rest.len() < HEADER {
                break Opened::More;
            }
            let length = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            if length > self.max_payload() {
                return Err(RecordError::Oversized { length });
            }
            if rest.len() < HEADER + length {
                break Opened::More;
            }
            let header: [u8; HEADER] = rest[..HEADER].try_into().expect("5 bytes");
            let mut payload = rest[HEADER..HEADER + length].to_vec();
            at += HEADER + length;
            let (kind, data) = self.open_one(header, &mut payload)?;
            match kind {
                APPLICATION_DATA => plain.extend_from_slice(data),
                ALERT => match data {
                    [_, CLOSE_NOTIFY] => break Opened::Closed,
                    [_, description] => return Err(RecordError::Alert(*description)),
                    _ => return Err(RecordError::Malformed),
                },
                HANDSHAKE => return Err(RecordError::PostHandshake),
                other => return Err(RecordError::Unexpected(other)),
            }
        };
        self.incoming.drain(..at);
        if opened == Opened::Closed {
            // "Any data received after a closure alert has been received MUST be ignored."
            self.incoming.clear();
        }
        Ok(opened)
    }

    /// Decrypts one record: its content type and data.
    fn open_one<'p>(
        &mut self,
        header: [u8; HEADER],
        payload: &'p mut [u8],
    ) -> Result<(u8, &'p [u8]), RecordError> {
        let explicit = self.suite.explicit(self.version);
        if payload.len() < explicit + TAG {
            return Err(RecordError::Malformed);
        }
        let opened = match self.version {
            Version::Tls13 => {
                if header[0] != APPLICATION_DATA {
                    return Err(RecordError::Unexpected(header[0]));
                }
                let nonce = Nonce::assume_unique_for_key(self.keys.nonce());
                let inner = self
                    .keys
                    .key
                    .open_in_place(nonce, Aad::from(header), payload)
                    .map_err(|_| RecordError::Decrypt)?;
                // The inner content type is the last byte that is not padding.
                let end = inner
                    .iter()
                    .rposition(|&byte| byte != 0)
                    .ok_or(RecordError::Unexpected(0))?;
                let kind = inner[end];
                self.keys.next()?;
                (kind, &inner[..end])
            }
            Version::Tls12 => {
                let nonce = if explicit > 0 {
                    let mut nonce = self.keys.iv;
                    nonce[4..].copy_from_slice(&payload[..EXPLICIT]);
                    nonce
                } else {
                    self.keys.nonce()
                };
                let plain_length = payload.len() - explicit - TAG;
                let aad = tls12_aad(self.keys.seq, header[0], plain_length);
                let data = self
                    .keys
                    .key
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(aad),
                        &mut payload[explicit..],
                    )
                    .map_err(|_| RecordError::Decrypt)?;
                self.keys.next()?;
                (header[0], &*data)
            }
        };
        Ok(opened)
    }
}

/// TLS 1.2's additional data: sequence number, type, version, plaintext length.
fn tls12_aad(seq: u64, kind: u8, length: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = kind;
    aad[9..11].copy_from_slice(&[3, 3]);
    aad[11..].copy_from_slice(&u16::try_from(length).unwrap_or(u16::MAX).to_be_bytes());
    aad
}

/// What goes to the client: records sealed with the server's keys.
pub(crate) struct Sealer {
    version: Version,
    suite: Suite,
    keys: Keys,
}

impl Sealer {
    /// Appends `data` to `out` as application data records (rules 1, 2).
    pub(crate) fn seal(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        for chunk in data.chunks(MAX_PLAINTEXT) {
            self.record(APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Appends an alert record to `out`: close_notify (a warning) or a fatal one.
    pub(crate) fn alert(&mut self, description: u8, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let level = if description == CLOSE_NOTIFY { 1 } else { 2 };
        self.record(ALERT, &[level, description], out)
    }

    /// Appends the close_notify alert to `out` (rule 3).
    pub(crate) fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.alert(CLOSE_NOTIFY, out)
    }

    fn record(&mut self, kind: u8, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let start = out.len();
        let nonce = self.keys.nonce();
        match self.version {
            Version::Tls13 => {
                let length = data.len() + 1 + TAG;
                out.extend_from_slice(&[APPLICATION_DATA, 3, 3]);
                out.extend_from_slice(&length16(length).to_be_bytes());
                let header: [u8; HEADER] = out[start..].try_into().expect("5 bytes");
                out.extend_from_slice(data);
                out.push(kind);
                self.seal_tail(nonce, Aad::from(header), out, start + HEADER)?;
            }
            Version::Tls12 => {
                let explicit = self.suite.explicit(self.version);
                let length = explicit + data.len() + TAG;
                out.extend_from_slice(&[kind, 3, 3]);
                out.extend_from_slice(&length16(length).to_be_bytes());
                out.extend_from_slice(&nonce[aead::NONCE_LEN - explicit..]);
                let aad = tls12_aad(self.keys.seq, kind, data.len());
                let body = out.len();
                out.extend_from_slice(data);
                self.seal_tail(nonce, Aad::from(aad), out, body)?;
            }
        }
        self.keys.next()
    }

    /// Seals `out[from..]` in place and appends its tag.
    fn seal_tail<A: AsRef<[u8]>>(
        &self,
        nonce: [u8; aead::NONCE_LEN],
        aad: Aad<A>,
        out: &mut Vec<u8>,
        from: usize,
    ) -> Result<(), RecordError> {
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), aad, &mut out[from..])
            .map_err(|_| RecordError::Exhausted)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

fn length16(length: usize) -> u16 {
    u16::try_from(length).expect("a record is under 64 KiB (rule 2)")
}

/// A TLS session carried on from rustls: both directions' keys and sequence numbers, and
/// the client's bytes of a record not whole yet (rule 5 for its `Debug`).
pub struct TlsSession {
    pub(crate) opener: Opener,
    pub(crate) sealer: Sealer,
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSession")
            .field("version", &self.sealer.version)
            .field("suite", &self.sealer.suite)
            .field("sent", &self.sealer.keys.seq)
            .field("received", &self.opener.keys.seq)
            .field("incoming", &self.opener.incoming.len())
            .field("keys", &"<redacted>")
            .finish()
    }
}

impl TlsSession {
    /// The session rustls extracted from a server connection (`secrets.tx` is what the
    /// server sends). A version or suite not of rule 1 is [`RecordError::Unsupported`].
    pub(crate) fn from_rustls(
        version: rustls::ProtocolVersion,
        secrets: rustls::ExtractedSecrets,
    ) -> Result<TlsSession, RecordError> {
        let version = match version {
            rustls::ProtocolVersion::TLSv1_3 => Version::Tls13,
            rustls::ProtocolVersion::TLSv1_2 => Version::Tls12,
            _ => return Err(RecordError::Unsupported),
        };
        let keys = |(seq, secrets): (u64, rustls::ConnectionTrafficSecrets)| {
            let (suite, key, iv) = match secrets {
                rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                    (Suite::Aes128Gcm, key, iv)
                }
                rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                    (Suite::Aes256Gcm, key, iv)
                }
                rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                    (Suite::Chacha20Poly1305, key, iv)
                }
                _ => return Err(RecordError::Unsupported),
            };
            Ok((suite, Keys::new(suite, key.as_ref(), iv.as_ref(), seq)?))
        };
        let (suite, tx) = keys(secrets.tx)?;
        let (rx_suite, rx) = keys(secrets.rx)?;
        if suite != rx_suite {
            return Err(RecordError::Unsupported);
        }
        Ok(TlsSession::new(version, suite, tx, rx, Vec::new()))
    }

    fn new(version: Version, suite: Suite, tx: Keys, rx: Keys, incoming: Vec<u8>) -> TlsSession {
        TlsSession {
            opener: Opener {
                version,
                suite,
                keys: rx,
                incoming,
            },
            sealer: Sealer {
                version,
                suite,
                keys: tx,
            },
        }
    }

    /// The session as bytes, keys included, for the upgrade's sealed memfd only (rule 5).
    pub fn to_bytes(&self) -> Vec<u8> {
        let version = match self.sealer.version {
            Version::Tls12 => 2,
            Version::Tls13 => 3,
        };
        let mut out = vec![FORMAT, version, self.sealer.suite.code()];
        self.sealer.keys.write(&mut out);
        self.opener.keys.write(&mut out);
        let incoming = u32::try_from(self.opener.incoming.len()).expect("at most one record");
        out.extend_from_slice(&incoming.to_be_bytes());
        out.extend_from_slice(&self.opener.incoming);
        out
    }

    /// A session written by [`TlsSession::to_bytes`].
    pub fn from_bytes(mut bytes: &[u8]) -> Result<TlsSession, RecordError> {
        let bytes = &mut bytes;
        let head = take(bytes, 3)?;
        let version = match (head[0], head[1]) {
            (FORMAT, 2) => Version::Tls12,
            (FORMAT, 3) => Version::Tls13,
            _ => return Err(RecordError::NotAState),
        };
        let suite = match head[2] {
            1 => Suite::Aes128Gcm,
            2 => Suite::Aes256Gcm,
            3 => Suite::Chacha20Poly1305,
            _ => return Err(RecordError::NotAState),
        };
        let tx = Keys::read(suite, bytes)?;
        let rx = Keys::read(suite, bytes)?;
        let length = u32::from_be_bytes(take(bytes, 4)?.try_into().expect("4 bytes"));
        let incoming = take(bytes, usize::try_from(length).unwrap_or(usize::MAX))?.to_vec();
        if !bytes.is_empty() {
            return Err(RecordError::NotAState);
        }
        Ok(TlsSession::new(version, suite, tx, rx, incoming))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::crypto::ring::cipher_suite as suites;
    use rustls::{ClientConnection, ServerConnection, SupportedCipherSuite};

    use super::*;

    /// A rustls client and server, in memory, handshake done; the server's session
    /// extracted, and the client.
    fn pair(suite: SupportedCipherSuite) -> (ClientConnection, TlsSession) {
        let certified = rcgen::generate_simple_self_signed(vec!["front.test".to_string()])
            .expect("certificate");
        let cert = certified.cert.der().clone();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        // ring, as the daemon's front door uses (deprecated only for post-quantum key
        // exchange, which does not matter here).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..rustls::crypto::ring::default_provider()
        });
        let version = suite.version();
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[version])
            .expect("version")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server config");
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .expect("version")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("front.test").expect("name");
        let mut client = ClientConnection::new(Arc::new(client), name).expect("client");
        let mut server = ServerConnection::new(Arc::new(server)).expect("server");
        for _ in 0..20 {
            if !client.is_handshaking() && !server.is_handshaking() && !server.wants_write() {
                break;
            }
            let mut bytes = Vec::new();
            client.write_tls(&mut bytes).expect("client writes");
            server.read_tls(&mut &bytes[..]).expect("server reads");
            server.process_new_packets().expect("server handshake");
            let mut bytes = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut bytes).expect("server writes");
            }
            client.read_tls(&mut &bytes[..]).expect("client reads");
            client.process_new_packets().expect("client handshake");
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        let version = server.protocol_version().expect("version");
        let secrets = server.dangerous_extract_secrets().expect("secrets");
        let session = TlsSession::from_rustls(version, secrets).expect("a suite it follows");
        (client, session)
    }

    fn every_suite() -> Vec<SupportedCipherSuite> {
        vec![
            suites::TLS13_AES_128_GCM_SHA256,
            suites::TLS13_AES_256_GCM_SHA384,
            suites::TLS13_CHACHA20_POLY1305_SHA256,
            suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ]
    }

    /// What the client sends, as records.
    fn sent_by(client: &mut ClientConnection, data: &[u8]) -> Vec<u8> {
        client.writer().write_all(data).expect("client writes");
        let mut bytes = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut bytes).expect("records");
        }
        bytes
    }

    /// What the client reads of `records`.
    fn read_by(client: &mut ClientConnection, records: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let mut records = records;
        let mut plain = Vec::new();
        while !records.is_empty() {
            client.read_tls(&mut records).expect("client reads");
            client.process_new_packets()?;
            match client.reader().read_to_end(&mut plain) {
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => panic!("client read: {error}"),
            }
        }
        Ok(plain)
    }

    #[test]
    fn both_ways_with_a_rustls_client_for_every_suite_and_version() {
        for suite in every_suite() {
            let name = format!("{:?}", suite.suite());
            let (mut client, mut session) = pair(suite);
            // Client → record layer, byte by byte: a record not whole waits for the rest.
            let request = b"GET / HTTP/1.1\r\nhost: front.test\r\n\r\n";
            let records = sent_by(&mut client, request);
            let mut plain = Vec::new();
            for byte in &records {
                session.opener.incoming.push(*byte);
                assert_eq!(session.opener.open(&mut plain), Ok(Opened::More), "{name}");
            }
            assert_eq!(plain, request, "{name}");
            assert!(session.opener.incoming.is_empty());
            // Record layer → client, more than one record's worth.
            let answer: Vec<u8> = (0..40_000u32).map(|n| (n % 251) as u8).collect();
            let mut out = Vec::new();
            session.sealer.seal(&answer, &mut out).expect("seal");
            assert_eq!(read_by(&mut client, &out).expect(&name), answer, "{name}");
            // Then once more each way, after the session went through its bytes.
            let mut session = TlsSession::from_bytes(&session.to_bytes()).expect(&name);
            let mut plain = Vec::new();
            session.opener.incoming = sent_by(&mut client, b"again");
            assert_eq!(session.opener.open(&mut plain), Ok(Opened::More));
            assert_eq!(plain, b"again", "{name}");
            let mut out = Vec::new();
            session.sealer.seal(b"answered", &mut out).expect("seal");
            assert_eq!(read_by(&mut client, &out).expect(&name), b"answered");
            // close_notify ends each direction.
            client.send_close_notify();
            session.opener.incoming = sent_by(&mut client, b"");
            assert_eq!(
                session.opener.open(&mut plain),
                Ok(Opened::Closed),
                "{name}"
            );
            let mut out = Vec::new();
            session.sealer.close_notify(&mut out).expect("alert");
            read_by(&mut client, &out).expect(&name);
            let mut rest = Vec::new();
            assert_eq!(client.reader().read_to_end(&mut rest).expect(&name), 0);
        }
    }

    #[test]
    fn a_tampered_record_is_refused_with_bad_record_mac_which_the_client_reads() {
        for suite in every_suite() {
            let (mut client, mut session) = pair(suite);
            let mut records = sent_by(&mut client, b"hello");
            let last = records.len() - 1;
            records[last] ^= 1;
            session.opener.incoming = records;
            let error = session.opener.open(&mut Vec::new()).expect_err("tampered");
            assert_eq!(error, RecordError::Decrypt);
            let mut out = Vec::new();
            let alert = error.alert().expect("an alert is sent");
            session.sealer.alert(alert, &mut out).expect("alert");
            let read = read_by(&mut client, &out);
            assert!(
                matches!(
                    read,
                    Err(rustls::Error::AlertReceived(
                        rustls::AlertDescription::BadRecordMac
                    ))
                ),
                "{read:?}"
            );
        }
    }

    #[test]
    fn a_key_update_from_the_client_is_refused() {
        for suite in every_suite().into_iter().take(3) {
            let (mut client, mut session) = pair(suite);
            client.refresh_traffic_keys().expect("key update");
            session.opener.incoming = sent_by(&mut client, b"");
            let error = session
                .opener
                .open(&mut Vec::new())
                .expect_err("key update");
            assert_eq!(error, RecordError::PostHandshake);
            assert_eq!(error.alert(), Some(UNEXPECTED_MESSAGE));
        }
    }

    #[test]
    fn an_oversized_record_is_refused_before_it_is_whole() {
        for suite in every_suite() {
            let (_client, mut session) = pair(suite);
            let length = session.opener.max_payload() + 1;
            let length = u16::try_from(length).expect("fits");
            session.opener.incoming = vec![APPLICATION_DATA, 3, 3];
            session.opener.incoming.extend(length.to_be_bytes());
            let error = session.opener.open(&mut Vec::new()).expect_err("oversized");
            assert!(matches!(error, RecordError::Oversized { .. }), "{error:?}");
            assert_eq!(error.alert(), Some(RECORD_OVERFLOW));
        }
    }

    #[test]
    fn the_keys_reach_no_debug_print_and_a_state_that_is_not_one_is_refused() {
        let (_client, session) = pair(suites::TLS13_AES_128_GCM_SHA256);
        let printed = format!("{session:?}");
        assert!(printed.contains("<redacted>"), "{printed}");
        let key = format!("{:?}", session.sealer.keys.raw);
        let iv = format!("{:?}", session.sealer.keys.iv);
        assert!(!printed.contains(&key[1..key.len() - 1]), "{printed}");
        assert!(!printed.contains(&iv[1..iv.len() - 1]), "{printed}");
        let bytes = session.to_bytes();
        assert!(TlsSession::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert!(TlsSession::from_bytes(b"not a state").is_err());
    }
}

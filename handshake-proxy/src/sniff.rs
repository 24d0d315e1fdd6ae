//! Reading the name a connection to the front door is for, without consuming it: the head of
//! an HTTP/1.x request (its `Host`), or a TLS ClientHello (its server name).
//!
//! 1. Read into one buffer, at most `max` bytes; every byte read is kept, to be replayed to
//!    the instance untouched.
//! 2. HTTP: parse the head each time more arrives (`httparse`); once it is complete, its
//!    `Host` header (port stripped) is the name. A head that does not fit in `max` is
//!    [`Sniffed::TooLarge`].
//! 3. TLS: collect handshake records until the first handshake message (the ClientHello) is
//!    whole, however the client split it over records, then read its `server_name`
//!    extension (`tls-parser`). No extension, or no host name in it: [`Sniffed::NoName`].
//! 4. The caller bounds the whole read with a timeout; the end of the stream before the head
//!    is whole is [`Sniffed::Malformed`].
//! 5. [`peek`] does the same without consuming a byte (`MSG_PEEK`), for a connection that
//!    may be handed to its instance untouched; [`consume`] then reads what was peeked when
//!    the connection is relayed after all.

use std::io;
use std::os::fd::AsRawFd;

use nix::sys::socket::{MsgFlags, recv};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Which protocol a front door listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// HTTP/1.x: routed by the `Host` header.
    Http,
    /// TLS: routed by the ClientHello's server name.
    Tls,
}

/// Most headers an HTTP request head may have.
const MAX_HEADERS: usize = 100;
/// A TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;
/// The TLS content type of handshake records.
const HANDSHAKE: u8 = 22;
/// The handshake type of a ClientHello.
const CLIENT_HELLO: u8 = 1;

/// What the head of a connection said.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sniffed {
    /// The host name the connection is for (as sent: case and a trailing dot kept).
    Name(String),
    /// A complete head with no name in it (no `Host`, no server name).
    NoName,
    /// The head is longer than the bound.
    TooLarge,
    /// Not a request head or ClientHello, or the client ended before it was whole.
    Malformed(&'static str),
}

/// Reads from `stream` into `buffer` until the head says what it is (steps 1–4): the
/// parsers' tests read from byte slices; the front door peeks ([`peek`]).
#[cfg(test)]
pub(crate) async fn sniff<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    protocol: Protocol,
    max: usize,
    buffer: &mut Vec<u8>,
) -> std::io::Result<Sniffed> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    loop {
        let verdict = match protocol {
            Protocol::Http => http(buffer),
            Protocol::Tls => tls(buffer),
        };
        match verdict {
            Some(sniffed) => return Ok(sniffed),
            None if buffer.len() >= max => return Ok(Sniffed::TooLarge),
            None => {}
        }
        let room = (max - buffer.len()).min(chunk.len());
        let read = stream.read(&mut chunk[..room]).await?;
        if read == 0 {
            return Ok(Sniffed::Malformed("the connection ended before its head"));
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// Step 5: peeks at `stream` until the head says what it is; `buffer` ends holding the
/// bytes peeked (none consumed).
///
/// Peeking leaves the bytes queued, so the socket stays readable: after a look that found
/// nothing new, the readiness tokio remembers is dropped, the queue looked at once more
/// (bytes that came in between), and only then is the next event waited for. The end of
/// the stream is read from the readiness (`read_closed`), which tokio never drops.
pub(crate) async fn peek(
    stream: &TcpStream,
    protocol: Protocol,
    max: usize,
    buffer: &mut Vec<u8>,
) -> io::Result<Sniffed> {
    buffer.clear();
    buffer.resize(max, 0);
    let (mut seen, mut closed, mut forgot) = (0, false, false);
    let ended = Sniffed::Malformed("the connection ended before its head");
    loop {
        let queued = match recv(
            stream.as_raw_fd(),
            buffer,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(queued) => Some(queued),
            Err(nix::errno::Errno::EAGAIN) => None,
            Err(errno) => {
                buffer.clear();
                return Err(errno.into());
            }
        };
        match queued {
            Some(0) => {
                buffer.clear();
                return Ok(ended);
            }
            Some(queued) if queued > seen => {
                seen = queued;
                let verdict = match protocol {
                    Protocol::Http => http(&buffer[..seen]),
                    Protocol::Tls => tls(&buffer[..seen]),
                };
                match verdict {
                    Some(sniffed) => {
                        buffer.truncate(seen);
                        return Ok(sniffed);
                    }
                    None if seen >= max => {
                        buffer.truncate(seen);
                        return Ok(Sniffed::TooLarge);
                    }
                    None => continue,
                }
            }
            _ if closed => {
                buffer.truncate(seen);
                return Ok(ended);
            }
            _ => {}
        }
        if !forgot {
            // Not an I/O error: tokio takes WouldBlock as "not ready" and drops readiness.
            let _ = stream.try_io(Interest::READABLE, || {
                Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
            });
            forgot = true;
            continue;
        }
        closed = stream.ready(Interest::READABLE).await?.is_read_closed();
        forgot = false;
    }
}

/// Step 5: reads (consumes) up to `len` bytes already queued, without waiting, and
/// registers the stream anew, so that tokio learns again what [`peek`] made it forget;
/// returns once tokio knows it writable again (a last-gasp write, such as a TLS alert
/// before closing, is not refused for want of it), within [`REREGISTERED`].
pub(crate) async fn consume(stream: TcpStream, len: usize) -> io::Result<TcpStream> {
    let mut scratch = vec![0u8; len.min(64 * 1024)];
    let mut left = len;
    while left > 0 {
        let room = left.min(scratch.len());
        match recv(
            stream.as_raw_fd(),
            &mut scratch[..room],
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) | Err(nix::errno::Errno::EAGAIN) => break,
            Ok(read) => left -= read,
            Err(errno) => return Err(errno.into()),
        }
    }
    let stream = TcpStream::from_std(stream.into_std()?)?;
    let _ = tokio::time::timeout(REREGISTERED, stream.writable()).await;
    Ok(stream)
}

/// How long [`consume`] waits for tokio to see a stream registered anew as writable (a
/// connected socket with room to send is, at once).
const REREGISTERED: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads and drops what `stream` has queued now, at most 256 KiB, without waiting.
pub(crate) fn discard_queued(stream: &TcpStream) {
    let mut scratch = [0u8; 16 * 1024];
    for _ in 0..16 {
        match recv(stream.as_raw_fd(), &mut scratch, MsgFlags::MSG_DONTWAIT) {
            Ok(read) if read == scratch.len() => {}
            _ => return,
        }
    }
}

/// Step 2: `None` while the head is incomplete.
fn http(buffer: &[u8]) -> Option<Sniffed> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buffer) {
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => Some(Sniffed::TooLarge),
        Err(_) => Some(Sniffed::Malformed("not an HTTP/1.x request head")),
        Ok(httparse::Status::Complete(_)) => {
            let host = request
                .headers
                .iter()
                .find(|header| header.name.eq_ignore_ascii_case("host"))
                .and_then(|header| std::str::from_utf8(header.value).ok());
            Some(match host.map(str::trim).map(without_port) {
                Some(host) if !host.is_empty() => Sniffed::Name(host.to_owned()),
                _ => Sniffed::NoName,
            })
        }
    }
}

/// `host:port` → `host`; an IPv6 literal (`[::1]:80`) is kept whole (no zone name is one).
fn without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host;
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Step 3: `None` while the ClientHello is incomplete.
fn tls(buffer: &[u8]) -> Option<Sniffed> {
    // The handshake bytes of the records so far.
    let mut handshake = Vec::new();
    let mut rest = buffer;
    loop {
        if rest.len() < RECORD_HEADER {
            break;
        }
        if rest[0] != HANDSHAKE {
            return Some(Sniffed::Malformed("not a TLS handshake"));
        }
        let length = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        let Some(record) = rest.get(RECORD_HEADER..RECORD_HEADER + length) else {
            break;
        };
        handshake.extend_from_slice(record);
        rest = &rest[RECORD_HEADER + length..];
    }
    if rest.first().is_some_and(|&kind| kind != HANDSHAKE) {
        return Some(Sniffed::Malformed("not a TLS handshake"));
    }
    if handshake.first().is_some_and(|&kind| kind != CLIENT_HELLO) {
        return Some(Sniffed::Malformed(
            "the first handshake message is no ClientHello",
        ));
    }
    let length = handshake
        .get(1..4)
        .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))?;
    let message = handshake.get(..4 + length)?;
    Some(server_name(message))
}

/// The server name of a whole ClientHello message.
fn server_name(message: &[u8]) -> Sniffed {
    use tls_parser::{SNIType, TlsExtension, TlsMessage, TlsMessageHandshake};
    let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
        tls_parser::parse_tls_message_handshake(message)
    else {
        return Sniffed::Malformed("a ClientHello that does not parse");
    };
    let Some(extensions) = hello.ext else {
        return Sniffed::NoName;
    };
    let Ok((_, extensions)) = tls_parser::parse_tls_client_hello_extensions(extensions) else {
        return Sniffed::Malformed("ClientHello extensions that do not parse");
    };
    let name = extensions.iter().find_map(|extension| match extension {
        TlsExtension::SNI(names) => names
            .iter()
            .find(|(kind, _)| *kind == SNIType::HostName)
            .map(|(_, name)| *name),
        _ => None,
    });
    match name.map(std::str::from_utf8) {
        Some(Ok(name)) if !name.is_empty() => Sniffed::Name(name.to_owned()),
        Some(Ok(_)) | None => Sniffed::NoName,
        Some(Err(_)) => Sniffed::Malformed("a server name that is not text"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(protocol: Protocol, max: usize, input: &[u8]) -> (Sniffed, usize) {
        let mut stream = input;
        let mut buffer = Vec::new();
        let sniffed = sniff(&mut stream, protocol, max, &mut buffer)
            .await
            .expect("reads from a slice");
        (sniffed, buffer.len())
    }

    #[tokio::test]
    async fn a_peek_waits_for_the_whole_head_and_leaves_every_byte_queued() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let head = b"GET / HTTP/1.1\r\nHost: a.hello.revboot.test\r\n\r\n";
        client.write_all(&head[..10]).await.expect("first part");
        let sending = async {
            // The rest comes once the peek has seen the first part and waits for more.
            tokio::task::yield_now().await;
            client.write_all(&head[10..]).await.expect("the rest");
        };
        let mut buffer = Vec::new();
        let (sniffed, ()) = tokio::join!(peek(&server, Protocol::Http, 4096, &mut buffer), sending);
        assert_eq!(
            sniffed.expect("peeked"),
            Sniffed::Name("a.hello.revboot.test".into())
        );
        assert_eq!(buffer, head);
        let mut server = consume(server, 10).await.expect("consumed");
        let mut rest = vec![0u8; head.len() - 10];
        server
            .read_exact(&mut rest)
            .await
            .expect("the rest, still queued");
        assert_eq!(rest, head[10..]);

        // The end of the stream before the head is whole.
        client.write_all(b"GET / HT").await.expect("part");
        client.shutdown().await.expect("shutdown");
        let sniffed = peek(&server, Protocol::Http, 4096, &mut buffer).await;
        assert!(
            matches!(sniffed.expect("peeked"), Sniffed::Malformed(_)),
            "ended"
        );
    }

    #[tokio::test]
    async fn http_host_is_read_and_every_byte_kept() {
        let request = b"GET / HTTP/1.1\r\nHost: Abc1234.Hello.revboot.test:8080\r\n\r\nbody";
        let (sniffed, kept) = read(Protocol::Http, 16 * 1024, request).await;
        assert_eq!(sniffed, Sniffed::Name("Abc1234.Hello.revboot.test".into()));
        assert_eq!(kept, request.len());
    }

    #[tokio::test]
    async fn http_without_host_or_too_long_or_not_http() {
        let (sniffed, _) = read(Protocol::Http, 1024, b"GET / HTTP/1.0\r\n\r\n").await;
        assert_eq!(sniffed, Sniffed::NoName);
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(4000));
        let (sniffed, kept) = read(Protocol::Http, 1024, long.as_bytes()).await;
        assert_eq!((sniffed, kept), (Sniffed::TooLarge, 1024));
        let (sniffed, _) = read(Protocol::Http, 1024, b"\x16\x03\x01\x00\x05hello").await;
        assert!(matches!(sniffed, Sniffed::Malformed(_)), "{sniffed:?}");
        let (sniffed, _) = read(Protocol::Http, 1024, b"GET / HTTP/1.1\r\nHost: a").await;
        assert!(matches!(sniffed, Sniffed::Malformed(_)), "{sniffed:?}");
    }

    #[test]
    fn ports_and_literals() {
        assert_eq!(without_port("a.test:80"), "a.test");
        assert_eq!(without_port("a.test"), "a.test");
        assert_eq!(without_port("[::1]:80"), "[::1]:80");
    }

    /// A ClientHello record for `name` (none: no server_name extension).
    fn client_hello(name: Option<&str>) -> Vec<u8> {
        let mut extensions = Vec::new();
        if let Some(name) = name {
            let name = name.as_bytes();
            let list_len = u16::try_from(name.len() + 3).expect("short");
            extensions.extend_from_slice(&[0, 0]);
            extensions.extend_from_slice(&(list_len + 2).to_be_bytes());
            extensions.extend_from_slice(&list_len.to_be_bytes());
            extensions.push(0);
            extensions.extend_from_slice(&u16::try_from(name.len()).expect("short").to_be_bytes());
            extensions.extend_from_slice(name);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(
            &u16::try_from(extensions.len())
                .expect("short")
                .to_be_bytes(),
        );
        body.extend_from_slice(&extensions);
        let length = u32::try_from(body.len()).expect("short").to_be_bytes();
        let mut message = vec![CLIENT_HELLO, length[1], length[2], length[3]];
        message.extend_from_slice(&body);
        message
    }

    fn records(message: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in message.chunks(size) {
            out.extend_from_slice(&[HANDSHAKE, 3, 1]);
            out.extend_from_slice(&u16::try_from(part.len()).expect("short").to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    #[tokio::test]
    async fn tls_server_name_is_read_across_records() {
        let message = client_hello(Some("c63dc27.hello.revboot.test"));
        for size in [message.len(), 40, 7] {
            let input = records(&message, size);
            let (sniffed, kept) = read(Protocol::Tls, 16 * 1024, &input).await;
            assert_eq!(sniffed, Sniffed::Name("c63dc27.hello.revboot.test".into()));
            assert_eq!(kept, input.len());
        }
    }

    #[tokio::test]
    async fn tls_without_a_name_or_not_tls() {
        let input = records(&client_hello(None), 512);
        assert_eq!(read(Protocol::Tls, 1024, &input).await.0, Sniffed::NoName);
        let (sniffed, _) = read(Protocol::Tls, 1024, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(matches!(sniffed, Sniffed::Malformed(_)), "{sniffed:?}");
        let input = records(&client_hello(Some("a.hello.revboot.test")), 512);
        let (sniffed, _) = read(Protocol::Tls, 16, &input).await;
        assert_eq!(sniffed, Sniffed::TooLarge);
    }
}

//! QMP, qemu's machine protocol: the supervisor's line to a running VM.
//!
//! 1. Connect to the instance's QMP socket, retrying every few milliseconds while qemu
//!    starts, for at most [`QMP_CONNECT_TIMEOUT`].
//! 2. Read the greeting, send `qmp_capabilities`, read its reply: from then on qemu sends
//!    events (`SHUTDOWN`, `RESET`, `GUEST_PANICKED`…), one JSON object per line.
//! 3. A command is one line; its reply is the next `return` or `error`, events read while
//!    waiting are kept (at most 64) for [`Qmp::event`].
//!
//! Every read is bounded in length ([`QMP_MAX_LINE`]); every wait has a timeout at the
//! caller's side.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long the supervisor tries to reach QMP after spawning qemu. Generous, since without
/// QMP a guest's crash is not explained on the console, and nothing waits on it meanwhile
/// (a stop asked for before it connects is a SIGTERM).
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest pause between attempts to reach QMP while qemu starts.
const QMP_CONNECT_PAUSE: Duration = Duration::from_millis(4);
/// The longest QMP message accepted.
const QMP_MAX_LINE: u64 = 64 * 1024;

/// A QMP session: one JSON object per line.
pub(super) struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    /// Events read while waiting for a command's reply.
    pending: std::collections::VecDeque<serde_json::Value>,
}

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum QmpError {
    #[error("QMP socket did not come up")]
    Timeout,
    #[error("QMP I/O")]
    Io(#[from] io::Error),
    #[error("QMP said something unexpected")]
    Protocol,
}

/// Connects to qemu's QMP socket (retrying while qemu starts) and negotiates capabilities.
pub(super) async fn qmp_connect(path: PathBuf) -> Result<Qmp, QmpError> {
    let attempt = async {
        // Often: qemu sends events only once the session is negotiated, and a guest that
        // is ready in tens of milliseconds can crash right after (a failed connect is one
        // cheap syscall).
        let mut pause = Duration::from_millis(1);
        let stream = loop {
            match UnixStream::connect(&path).await {
                Ok(stream) => break stream,
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(QMP_CONNECT_PAUSE);
                }
            }
        };
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read),
            writer,
            pending: Default::default(),
        };
        let greeting = qmp.read().await?.ok_or(QmpError::Protocol)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol);
        }
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
    };
    tokio::time::timeout(QMP_CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| QmpError::Timeout)?
}

impl Qmp {
    /// Reads one message; `None` at end of stream.
    async fn read(&mut self) -> Result<Option<serde_json::Value>, QmpError> {
        let mut line = Vec::new();
        let read = (&mut self.reader)
            .take(QMP_MAX_LINE)
            .read_until(b'\n', &mut line)
            .await?;
        if read == 0 {
            return Ok(None);
        }
        if !line.ends_with(b"\n") {
            return Err(QmpError::Protocol);
        }
        serde_json::from_slice(&line)
            .map(Some)
            .map_err(|_| QmpError::Protocol)
    }

    /// Runs a command without arguments and waits for its reply.
    pub(super) async fn execute(&mut self, command: &str) -> Result<(), QmpError> {
        let request = serde_json::json!({ "execute": command });
        let mut bytes = serde_json::to_vec(&request).map_err(|_| QmpError::Protocol)?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await?;
        loop {
            let Some(message) = self.read().await? else {
                // qemu closes QMP as it quits: for `quit`, that is the answer.
                return if command == "quit" {
                    Ok(())
                } else {
                    Err(QmpError::Protocol)
                };
            };
            if message.get("return").is_some() {
                return Ok(());
            }
            if message.get("error").is_some() {
                return Err(QmpError::Protocol);
            }
            if self.pending.len() < 64 {
                self.pending.push_back(message);
            }
        }
    }

    /// The next event; `None` when the session ended.
    pub(super) async fn event(&mut self) -> Option<serde_json::Value> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        loop {
            match self.read().await {
                Ok(Some(message)) if message.get("event").is_some() => return Some(message),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

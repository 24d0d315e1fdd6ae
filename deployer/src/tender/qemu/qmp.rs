//! QMP, qemu's machine protocol: the supervisor's line to a running VM.
//!
//! 1. Connect to the instance's QMP socket, retrying every few milliseconds while qemu
//!    starts, for at most [`QMP_CONNECT_TIMEOUT`].
//! 2. Read the greeting, send `qmp_capabilities`, read its reply: from then on qemu sends
//!    events (`SHUTDOWN`, `RESET`, `GUEST_PANICKED`…), one JSON object per line.
//! 3. A command is one line; its reply is the next `return` or `error`, events read while
//!    waiting are kept (at most 64) for [`Qmp::event`].
//! 4. The greeting names qemu's version ([`Qmp::version`]): a snapshot is restored only by
//!    the version that made it.
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
#[derive(Debug)]
pub(super) struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    /// Events read while waiting for a command's reply.
    pending: std::collections::VecDeque<serde_json::Value>,
    /// qemu's version, from the greeting: `7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
    version: String,
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
    #[error("qemu refused `{command}`: {message}")]
    Refused { command: String, message: String },
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
            version: String::new(),
        };
        let greeting = qmp.read().await?.ok_or(QmpError::Protocol)?;
        let Some(hello) = greeting.get("QMP") else {
            return Err(QmpError::Protocol);
        };
        qmp.version = version_of(hello);
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

    /// qemu's version, as its greeting said: `<major>.<minor>.<micro> (<package>)`.
    pub(super) fn version(&self) -> &str {
        &self.version
    }

    /// Runs a command without arguments and waits for its reply.
    pub(super) async fn execute(&mut self, command: &str) -> Result<(), QmpError> {
        self.call(command, None).await.map(drop)
    }

    /// Runs `command` with `arguments` and returns what it returned.
    pub(super) async fn call(
        &mut self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, QmpError> {
        let request = match arguments {
            Some(arguments) => serde_json::json!({ "execute": command, "arguments": arguments }),
            None => serde_json::json!({ "execute": command }),
        };
        let mut bytes = serde_json::to_vec(&request).map_err(|_| QmpError::Protocol)?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await?;
        loop {
            let Some(message) = self.read().await? else {
                // qemu closes QMP as it quits: for `quit`, that is the answer.
                return if command == "quit" {
                    Ok(serde_json::Value::Null)
                } else {
                    Err(QmpError::Protocol)
                };
            };
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let message = error
                    .get("desc")
                    .and_then(|desc| desc.as_str())
                    .unwrap_or("no reason given");
                return Err(QmpError::Refused {
                    command: command.to_owned(),
                    message: message.chars().take(512).collect(),
                });
            }
            if self.pending.len() < 64 {
                self.pending.push_back(message);
            }
        }
    }

    /// Waits for the event `name` whose `data` satisfies `matches`, keeping the others for
    /// [`Qmp::event`] (at most 64); `None` when the session ended. Callers bound the wait.
    pub(super) async fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        if let Some(at) = self.pending.iter().position(|event| {
            event.get("event").and_then(|n| n.as_str()) == Some(name)
                && matches(event.get("data").unwrap_or(&serde_json::Value::Null))
        }) {
            return self.pending.remove(at);
        }
        loop {
            let event = match self.read().await {
                Ok(Some(message)) if message.get("event").is_some() => message,
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            };
            if event.get("event").and_then(|n| n.as_str()) == Some(name)
                && matches(event.get("data").unwrap_or(&serde_json::Value::Null))
            {
                return Some(event);
            }
            if self.pending.len() < 64 {
                self.pending.push_back(event);
            }
        }
    }

    /// Turns on qemu's `MIGRATION` events, which [`Qmp::migrated`] waits for.
    pub(super) async fn migration_events(&mut self) -> Result<(), QmpError> {
        let on = serde_json::json!({
            "capabilities": [{ "capability": "events", "state": true }]
        });
        self.call("migrate-set-capabilities", Some(on))
            .await
            .map(drop)
    }

    /// Waits for the migration under way to end: true when it completed. Callers bound the
    /// wait.
    pub(super) async fn migrated(&mut self) -> bool {
        let done = self
            .wait_event("MIGRATION", |data| {
                matches!(data["status"].as_str(), Some("completed" | "failed"))
            })
            .await;
        done.as_ref()
            .and_then(|event| event["data"]["status"].as_str())
            == Some("completed")
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

/// `<major>.<minor>.<micro> (<package>)` from a QMP greeting's `QMP` object.
fn version_of(hello: &serde_json::Value) -> String {
    let version = &hello["version"];
    let number = |key: &str| version["qemu"][key].as_u64().unwrap_or(0);
    let mut text = format!(
        "{}.{}.{}",
        number("major"),
        number("minor"),
        number("micro")
    );
    if let Some(package) = version["package"].as_str().filter(|p| !p.trim().is_empty()) {
        text.push_str(&format!(" ({})", package.trim()));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_greeting_names_the_version_and_package() {
        let hello = serde_json::json!({
            "version": {
                "qemu": { "micro": 22, "minor": 2, "major": 7 },
                "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"
            },
            "capabilities": ["oob"]
        });
        assert_eq!(
            version_of(&hello),
            "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
        );
        let bare =
            serde_json::json!({ "version": { "qemu": { "micro": 0, "minor": 0, "major": 9 } } });
        assert_eq!(version_of(&bare), "9.0.0");
    }
}

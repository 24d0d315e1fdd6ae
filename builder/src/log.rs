//! Build logs: timestamped, size-bounded, readable while they are being written.
//!
//! 1. The build's stdout and stderr share one pipe, so lines keep the order the build wrote
//!    them in. Each line is stored as `[  1.234s] text`, the time since the build started.
//! 2. The log stops growing at its limit (8 MiB by default) with a note saying how much was
//!    left out; the build itself runs on.
//! 3. Followers (the pusher's hook connection, API readers) keep an offset and wait on a
//!    `watch` channel for the log length or the build's phase to change, so a late follower
//!    still sees the whole log and a slow one never makes the build wait.

use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::watch;

use crate::state::Phase;

/// The default cap of a build log.
pub const DEFAULT_LOG_LIMIT: usize = 8 * 1024 * 1024;

/// The longest line kept whole; longer lines are split.
const MAX_LINE: usize = 64 * 1024;

/// Where a build is, as followers see it.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    pub(crate) log_len: usize,
    pub(crate) phase: Phase,
}

/// The log and phase of one build, shared between the runner and its followers.
#[derive(Debug)]
pub(crate) struct Tracker {
    pub(crate) id: u64,
    log: Mutex<LogBuffer>,
    progress: watch::Sender<Progress>,
}

#[derive(Debug)]
struct LogBuffer {
    bytes: Vec<u8>,
    limit: usize,
    dropped: u64,
    /// A line not yet terminated by `\n`.
    partial: Vec<u8>,
    started: Option<Instant>,
    partial_at: f64,
}

impl Tracker {
    pub(crate) fn new(id: u64, limit: usize, phase: Phase) -> Tracker {
        Tracker {
            id,
            log: Mutex::new(LogBuffer {
                bytes: Vec::new(),
                limit,
                dropped: 0,
                partial: Vec::new(),
                started: None,
                partial_at: 0.0,
            }),
            progress: watch::Sender::new(Progress { log_len: 0, phase }),
        }
    }

    /// Starts the clock that timestamps output lines.
    pub(crate) fn start_clock(&self) {
        self.buffer().started = Some(Instant::now());
    }

    /// Seconds since the clock started.
    pub(crate) fn elapsed(&self) -> f64 {
        self.buffer()
            .started
            .map(|start| start.elapsed().as_secs_f64())
            .unwrap_or(0.0)
    }

    fn buffer(&self) -> std::sync::MutexGuard<'_, LogBuffer> {
        // A panic while holding the lock leaves a log that is still valid bytes.
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends raw build output; complete lines get a timestamp.
    pub(crate) fn output(&self, chunk: &[u8]) {
        let len = {
            let mut buffer = self.buffer();
            let now = buffer
                .started
                .map(|start| start.elapsed().as_secs_f64())
                .unwrap_or(0.0);
            let mut rest = chunk;
            while !rest.is_empty() {
                if buffer.partial.is_empty() {
                    buffer.partial_at = now;
                }
                match rest.iter().position(|b| *b == b'\n') {
                    Some(newline) => {
                        buffer.partial.extend_from_slice(&rest[..newline]);
                        rest = &rest[newline + 1..];
                        buffer.flush_line();
                    }
                    None => {
                        buffer.partial.extend_from_slice(rest);
                        rest = &[];
                        if buffer.partial.len() >= MAX_LINE {
                            buffer.flush_line();
                        }
                    }
                }
            }
            buffer.bytes.len()
        };
        self.progress.send_modify(|progress| progress.log_len = len);
    }

    /// Appends a line written by revboot itself (`revboot: …`), timestamped like output.
    pub(crate) fn note(&self, text: &str) {
        let len = {
            let mut buffer = self.buffer();
            if !buffer.partial.is_empty() {
                buffer.flush_line();
            }
            buffer.partial_at = buffer
                .started
                .map(|start| start.elapsed().as_secs_f64())
                .unwrap_or(0.0);
            buffer.partial.extend_from_slice(b"revboot: ");
            buffer.partial.extend_from_slice(text.as_bytes());
            buffer.flush_line();
            buffer.bytes.len()
        };
        self.progress.send_modify(|progress| progress.log_len = len);
    }

    /// Ends an unterminated last line and appends the truncation note if any; returns the
    /// whole log.
    pub(crate) fn finish_log(&self) -> Vec<u8> {
        let mut buffer = self.buffer();
        if !buffer.partial.is_empty() {
            buffer.flush_line();
        }
        let mut log = buffer.bytes.clone();
        if buffer.dropped > 0 {
            log.extend_from_slice(
                format!(
                    "revboot: the log was cut at {} bytes; {} more bytes were left out\n",
                    buffer.limit, buffer.dropped
                )
                .as_bytes(),
            );
        }
        log
    }

    /// The log bytes in `from..` (as far as written).
    pub(crate) fn log_from(&self, from: usize) -> Vec<u8> {
        let buffer = self.buffer();
        buffer
            .bytes
            .get(from..)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    /// At most `max` log bytes from `from` on (as far as written).
    fn log_range(&self, from: usize, max: usize) -> Vec<u8> {
        let buffer = self.buffer();
        let end = buffer.bytes.len().min(from.saturating_add(max));
        buffer
            .bytes
            .get(from..end)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.progress.send_modify(|progress| progress.phase = phase);
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }
}

/// The most log bytes one [`LogFollow::next`] yields.
const FOLLOW_CHUNK: usize = 64 * 1024;

/// A reader of a build's log as it is written ([`crate::Builder::follow_log`]): from the
/// start, then each new piece, then how the build ended. It keeps an offset into the log, so
/// a slow reader never makes the build wait and misses nothing.
#[derive(Debug)]
pub struct LogFollow {
    tracker: std::sync::Arc<Tracker>,
    offset: usize,
    progress: watch::Receiver<Progress>,
    ended: bool,
}

/// What a [`LogFollow`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogStep {
    /// More of the log.
    Output(Vec<u8>),
    /// The build ended so; the log is complete.
    Ended {
        /// How it ended.
        state: crate::BuildState,
        /// The deployment commit recording it, if any.
        revision: Option<revboot_store::Revision>,
    },
}

impl LogFollow {
    pub(crate) fn new(tracker: std::sync::Arc<Tracker>) -> LogFollow {
        let progress = tracker.subscribe();
        LogFollow {
            tracker,
            offset: 0,
            progress,
            ended: false,
        }
    }

    /// The build's number.
    pub fn id(&self) -> u64 {
        self.tracker.id
    }

    /// The next piece of the log, the end, or `None` after the end.
    pub async fn next(&mut self) -> Option<LogStep> {
        loop {
            if self.ended {
                return None;
            }
            let progress = self.progress.borrow_and_update().clone();
            if progress.log_len > self.offset {
                let bytes = self.tracker.log_range(self.offset, FOLLOW_CHUNK);
                self.offset += bytes.len();
                return Some(LogStep::Output(bytes));
            }
            let end = match &progress.phase {
                Phase::Done(outcome) => Some((outcome.state, outcome.revision)),
                Phase::Superseded { .. } => Some((crate::BuildState::Superseded, None)),
                Phase::Queued | Phase::Running => None,
            };
            if let Some((state, revision)) = end {
                self.ended = true;
                return Some(LogStep::Ended { state, revision });
            }
            if self.progress.changed().await.is_err() {
                return None;
            }
        }
    }
}

impl LogBuffer {
    fn flush_line(&mut self) {
        let line = std::mem::take(&mut self.partial);
        let stamp = format!("[{:7.3}s] ", self.partial_at);
        let needed = stamp.len() + line.len() + 1;
        if self.dropped > 0 || self.bytes.len() + needed > self.limit {
            self.dropped += line.len() as u64 + 1;
            return;
        }
        self.bytes.extend_from_slice(stamp.as_bytes());
        self.bytes.extend_from_slice(&line);
        self.bytes.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(tracker: &Tracker) -> String {
        String::from_utf8(tracker.finish_log()).expect("utf8")
    }

    #[test]
    fn stamps_lines_across_chunks() {
        let tracker = Tracker::new(1, DEFAULT_LOG_LIMIT, Phase::Running);
        tracker.output(b"one\ntw");
        tracker.output(b"o\nthree");
        let log = text(&tracker);
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 3, "{log}");
        assert!(lines[0].starts_with("[  0.000s] one"), "{log}");
        assert!(lines[1].ends_with("] two"), "{log}");
        assert!(lines[2].ends_with("] three"), "{log}");
    }

    #[test]
    fn cuts_at_limit_with_a_note() {
        let tracker = Tracker::new(1, 100, Phase::Running);
        for _ in 0..20 {
            tracker.output(b"0123456789\n");
        }
        let log = text(&tracker);
        let kept = log.lines().filter(|l| l.ends_with("0123456789")).count();
        assert!(kept > 0 && kept < 20, "{log}");
        assert!(log.contains("the log was cut at 100 bytes"), "{log}");
        assert!(tracker.log_from(0).len() <= 100);
    }

    #[test]
    fn followers_read_from_an_offset() {
        let tracker = Tracker::new(1, DEFAULT_LOG_LIMIT, Phase::Running);
        let follower = tracker.subscribe();
        tracker.output(b"a\n");
        let first = follower.borrow().log_len;
        tracker.note("done");
        let rest = String::from_utf8(tracker.log_from(first)).expect("utf8");
        assert!(rest.ends_with("] revboot: done\n"), "{rest}");
        assert!(!rest.contains("] a"), "{rest}");
    }

    #[tokio::test]
    async fn a_log_follower_gets_everything_then_the_end() {
        let tracker = std::sync::Arc::new(Tracker::new(1, DEFAULT_LOG_LIMIT, Phase::Running));
        tracker.output(b"before\n");
        let mut follow = LogFollow::new(tracker.clone());
        let Some(LogStep::Output(first)) = follow.next().await else {
            panic!("no output first");
        };
        assert!(String::from_utf8_lossy(&first).ends_with("] before\n"));
        tracker.output(b"after\n");
        let Some(LogStep::Output(second)) = follow.next().await else {
            panic!("no output second");
        };
        assert!(String::from_utf8_lossy(&second).ends_with("] after\n"));
        tracker.set_phase(Phase::Superseded {
            by: 2,
            commit: "c".repeat(40),
        });
        assert_eq!(
            follow.next().await,
            Some(LogStep::Ended {
                state: crate::BuildState::Superseded,
                revision: None
            })
        );
        assert_eq!(follow.next().await, None);
    }
}

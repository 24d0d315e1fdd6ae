//! An instance's console: its stdout and stderr, kept as a bounded tail and streamable.
//!
//! 1. The tender feeds every chunk it reads to [`Console::push`].
//! 2. The last `capacity` bytes stay in a ring ([`Console::tail`]); older bytes are dropped
//!    and counted.
//! 3. Live readers [`Console::subscribe`] to a bounded broadcast; a reader that falls behind
//!    loses chunks (and is told so by the channel), it never slows the instance down.
//! 4. [`Console::follow`] takes the kept tail and a live subscription in one step (a chunk
//!    is in the tail or comes live, never both, never neither); [`Follow::next`] then yields
//!    the chunks, a [`FollowStep::Skipped`] note where the reader fell behind, and `None`
//!    once the output has ended.
//! 5. [`Console::close`] marks the end of output; [`Console::closed`] waits for it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, watch};

/// Chunks buffered for each live reader.
const STREAM_CHUNKS: usize = 256;

/// A shared handle on one instance's console.
#[derive(Debug, Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    capacity: usize,
    ring: Mutex<Ring>,
    stream: broadcast::Sender<Arc<[u8]>>,
    /// Total bytes ever pushed, and whether the output has ended.
    progress: watch::Sender<(u64, bool)>,
}

#[derive(Debug, Default)]
struct Ring {
    bytes: VecDeque<u8>,
    dropped: u64,
}

impl Console {
    /// An empty console keeping the last `capacity` bytes.
    pub fn new(capacity: usize) -> Console {
        let (stream, _) = broadcast::channel(STREAM_CHUNKS);
        Console {
            inner: Arc::new(Inner {
                capacity: capacity.max(1),
                ring: Mutex::new(Ring::default()),
                stream,
                progress: watch::channel((0, false)).0,
            }),
        }
    }

    /// Appends a line of the host's own (a tender's note) on a line of its own: after a
    /// line break when the output so far ends mid-line.
    pub fn push_line(&self, line: &str) {
        let mid_line = {
            let ring = self
                .inner
                .ring
                .lock()
                .expect("console lock is never poisoned");
            ring.bytes.back().is_some_and(|&last| last != b'\n')
        };
        let text = format!("{}{}\n", if mid_line { "\n" } else { "" }, line.trim_end());
        self.push(text.as_bytes());
    }

    /// Waits, at most `timeout`, until the output so far ends a line (or is empty, or has
    /// ended): a guest seen mid-line is still printing.
    pub async fn line_end(&self, timeout: Duration) {
        let mut progress = self.inner.progress.subscribe();
        let ends_line = |ring: &Ring| ring.bytes.back().is_none_or(|&last| last == b'\n');
        let wait = progress.wait_for(|(_, closed)| {
            *closed
                || ends_line(
                    &self
                        .inner
                        .ring
                        .lock()
                        .expect("console lock is never poisoned"),
                )
        });
        let _ = tokio::time::timeout(timeout, wait).await;
    }

    /// Appends output.
    pub fn push(&self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        {
            let mut ring = self
                .inner
                .ring
                .lock()
                .expect("console lock is never poisoned");
            let keep = &chunk[chunk.len().saturating_sub(self.inner.capacity)..];
            let overflow = (ring.bytes.len() + keep.len()).saturating_sub(self.inner.capacity);
            ring.bytes.drain(..overflow);
            ring.dropped += (overflow + chunk.len() - keep.len()) as u64;
            ring.bytes.extend(keep);
            // Sent under the ring's lock, so that `follow` sees each chunk exactly once, in
            // the tail or live. The send never waits; no receivers is fine.
            let _ = self.inner.stream.send(Arc::from(chunk));
        }
        self.inner
            .progress
            .send_modify(|(total, _)| *total += chunk.len() as u64);
    }

    /// Marks the end of output.
    pub fn close(&self) {
        self.inner
            .progress
            .send_modify(|(_, closed)| *closed = true);
    }

    /// The kept tail of the output.
    pub fn tail(&self) -> Vec<u8> {
        let ring = self
            .inner
            .ring
            .lock()
            .expect("console lock is never poisoned");
        ring.bytes.iter().copied().collect()
    }

    /// Bytes dropped from the front of the ring so far.
    pub fn dropped(&self) -> u64 {
        self.inner
            .ring
            .lock()
            .expect("console lock is never poisoned")
            .dropped
    }

    /// Live output from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<[u8]>> {
        self.inner.stream.subscribe()
    }

    /// The kept tail and, from there on, the live output, taken together.
    pub fn follow(&self) -> Follow {
        let ring = self
            .inner
            .ring
            .lock()
            .expect("console lock is never poisoned");
        Follow {
            tail: ring.bytes.iter().copied().collect(),
            dropped: ring.dropped,
            live: self.inner.stream.subscribe(),
            progress: self.inner.progress.subscribe(),
            ended: false,
        }
    }

    /// Waits until the output has ended, at most `timeout`; true if it has.
    pub async fn closed(&self, timeout: Duration) -> bool {
        let mut progress = self.inner.progress.subscribe();
        tokio::time::timeout(timeout, progress.wait_for(|(_, closed)| *closed))
            .await
            .is_ok_and(|result| result.is_ok())
    }

    /// Waits until the kept output contains `text`, at most `timeout`; true if it does.
    /// Output that ends without it returns false at once.
    pub async fn wait_for(&self, text: &str, timeout: Duration) -> bool {
        let mut progress = self.inner.progress.subscribe();
        let needle = text.as_bytes();
        let search = async {
            loop {
                let closed = progress.borrow_and_update().1;
                if contains(&self.tail(), needle) {
                    return true;
                }
                if closed || progress.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(timeout, search).await.unwrap_or(false)
    }
}

/// A reader of one console: the tail it started from, then live chunks ([`Console::follow`]).
#[derive(Debug)]
pub struct Follow {
    /// The output kept when following began.
    pub tail: Vec<u8>,
    /// Bytes that had been dropped from the front of the ring by then.
    pub dropped: u64,
    live: broadcast::Receiver<Arc<[u8]>>,
    progress: watch::Receiver<(u64, bool)>,
    ended: bool,
}

/// What a [`Follow`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowStep {
    /// Output, as the instance wrote it.
    Output(Arc<[u8]>),
    /// The reader fell behind by this many chunks, which it will not see; the instance was
    /// never slowed down for it.
    Skipped(u64),
}

impl Follow {
    /// The next chunk, a note of skipped ones, or `None` once the output has ended and every
    /// chunk before the end was yielded.
    pub async fn next(&mut self) -> Option<FollowStep> {
        loop {
            if self.ended {
                // The end is marked after the last push: what is left is in the channel.
                return match self.live.try_recv() {
                    Ok(chunk) => Some(FollowStep::Output(chunk)),
                    Err(TryRecvError::Lagged(n)) => Some(FollowStep::Skipped(n)),
                    Err(TryRecvError::Empty | TryRecvError::Closed) => None,
                };
            }
            tokio::select! {
                biased;
                received = self.live.recv() => match received {
                    Ok(chunk) => return Some(FollowStep::Output(chunk)),
                    Err(RecvError::Lagged(n)) => return Some(FollowStep::Skipped(n)),
                    Err(RecvError::Closed) => self.ended = true,
                },
                ended = self.progress.wait_for(|(_, closed)| *closed) => {
                    let _ = ended;
                    self.ended = true;
                }
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_tail() {
        let console = Console::new(8);
        console.push(b"hello ");
        console.push(b"world");
        assert_eq!(console.tail(), b"lo world");
        assert_eq!(console.dropped(), 3);
        console.push(b"0123456789");
        assert_eq!(console.tail(), b"23456789");
        assert_eq!(console.dropped(), 13);
    }

    #[tokio::test]
    async fn waits_for_a_line_and_streams() {
        let console = Console::new(1024);
        let mut live = console.subscribe();
        let waiter = {
            let console = console.clone();
            tokio::spawn(async move { console.wait_for("ready", Duration::from_secs(10)).await })
        };
        console.push(b"booting\n");
        console.push(b"hello v1 ready\n");
        assert!(waiter.await.expect("joins"));
        assert_eq!(&*live.recv().await.expect("chunk"), b"booting\n");
        console.close();
        assert!(console.closed(Duration::from_secs(1)).await);
        assert!(!console.wait_for("never", Duration::from_secs(10)).await);
    }

    #[tokio::test]
    async fn a_follower_gets_the_tail_then_every_chunk_then_the_end() {
        let console = Console::new(4);
        console.push(b"abcdef");
        let mut follow = console.follow();
        assert_eq!(follow.tail, b"cdef");
        assert_eq!(follow.dropped, 2);
        console.push(b"gh");
        console.push(b"ij");
        console.close();
        assert_eq!(
            follow.next().await,
            Some(FollowStep::Output(Arc::from(&b"gh"[..])))
        );
        assert_eq!(
            follow.next().await,
            Some(FollowStep::Output(Arc::from(&b"ij"[..])))
        );
        assert_eq!(follow.next().await, None);
    }

    #[tokio::test]
    async fn a_slow_follower_is_told_what_it_missed_and_never_holds_the_writer() {
        let console = Console::new(16);
        let mut follow = console.follow();
        // Far more chunks than the channel keeps: every push returns at once.
        for n in 0..(STREAM_CHUNKS + 10) {
            console.push(format!("{n}\n").as_bytes());
        }
        assert_eq!(follow.next().await, Some(FollowStep::Skipped(10)));
        assert_eq!(
            follow.next().await,
            Some(FollowStep::Output(Arc::from(&b"10\n"[..])))
        );
    }

    #[test]
    fn a_note_starts_a_line_of_its_own() {
        let console = Console::new(256);
        console.push_line("[revboot] first");
        console.push(b"guest: half a ");
        console.push_line("[revboot] second\n");
        console.push(b"line\n");
        assert_eq!(
            console.tail(),
            b"[revboot] first\nguest: half a \n[revboot] second\nline\n"
        );
    }
}

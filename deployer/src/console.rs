//! An instance's console: its stdout and stderr, kept as a bounded tail and streamable.
//!
//! 1. The tender feeds every chunk it reads to [`Console::push`].
//! 2. The last `capacity` bytes stay in a ring ([`Console::tail`]); older bytes are dropped
//!    and counted.
//! 3. Live readers [`Console::subscribe`] to a bounded broadcast; a reader that falls behind
//!    loses chunks (and is told so by the channel), it never slows the instance down.
//! 4. [`Console::close`] marks the end of output; [`Console::closed`] waits for it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
        }
        // No receivers is fine: nobody is watching live.
        let _ = self.inner.stream.send(Arc::from(chunk));
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
}

//! Copying both ways between two streams of any kind (a decrypted TLS stream and a TCP
//! connection), ended when neither side has moved a byte for the idle timeout: the bound the
//! splice path keeps for plain connections, for the streams splice(2) cannot move.
//!
//! Each stream is wrapped so that a read or write that moves bytes stamps the time of the
//! last activity; a watchdog wakes when the idle time could have passed and ends the copy
//! if it has.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// `copy_bidirectional` between `a` and `b`, ended with [`io::ErrorKind::TimedOut`] once
/// neither has moved a byte for `idle` (`None`: never). Bytes from `a` to `b`, and back.
pub(crate) async fn copy_until_idle<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Option<Duration>,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let Some(idle) = idle else {
        return tokio::io::copy_bidirectional(a, b).await;
    };
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Watched {
        inner: a,
        start,
        last: Arc::clone(&last),
    };
    let mut b = Watched {
        inner: b,
        start,
        last: Arc::clone(&last),
    };
    let copying = tokio::io::copy_bidirectional(&mut a, &mut b);
    let watching = async {
        loop {
            let quiet_since = start + Duration::from_millis(last.load(Ordering::Relaxed));
            if quiet_since.elapsed() >= idle {
                return;
            }
            tokio::time::sleep_until(quiet_since + idle).await;
        }
    };
    tokio::select! {
        copied = copying => copied,
        () = watching => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no byte either way for {} ms", idle.as_millis()),
        )),
    }
}

/// A stream that stamps `last` (milliseconds since `start`) when it moves bytes.
struct Watched<'a, S> {
    inner: &'a mut S,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<S> Watched<'_, S> {
    fn stamp(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.fetch_max(now, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.stamp();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.stamp();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_quiet_copy_ends_after_the_idle_time_and_traffic_keeps_it_open() {
        let (mut client, mut near) = tokio::io::duplex(1024);
        let (mut far, mut backend) = tokio::io::duplex(1024);
        let idle = Duration::from_secs(10);
        let copy =
            tokio::spawn(async move { copy_until_idle(&mut near, &mut far, Some(idle)).await });
        // Bytes every 6 s, for 30 s: more than the idle time in all, never that long quiet.
        for round in 0..5u8 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(&[round]).await.expect("write");
            let mut byte = [0u8; 1];
            backend.read_exact(&mut byte).await.expect("read");
            assert_eq!(byte[0], round);
            assert!(!copy.is_finished(), "ended while bytes moved");
        }
        // Then quiet: it ends, timed out, within the idle time and a little.
        let ended = tokio::time::timeout(idle + Duration::from_secs(1), copy)
            .await
            .expect("ended within the idle time")
            .expect("the task");
        let error = ended.expect_err("timed out");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_idle_time_a_quiet_copy_goes_on_until_a_side_ends() {
        let (client, mut near) = tokio::io::duplex(1024);
        let (mut far, backend) = tokio::io::duplex(1024);
        let copy = tokio::spawn(async move { copy_until_idle(&mut near, &mut far, None).await });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!copy.is_finished());
        drop(client);
        drop(backend);
        let copied = tokio::time::timeout(Duration::from_secs(1), copy)
            .await
            .expect("ended")
            .expect("the task")
            .expect("no error");
        assert_eq!(copied, (0, 0));
    }
}

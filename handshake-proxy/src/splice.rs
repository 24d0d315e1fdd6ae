//! Splicing a client to its backend: bytes both ways, half-close, idle and total timeouts.
//!
//! 1. When one side ends its writing (EOF), the proxy shuts down writing on the other side
//!    and keeps copying the other direction until it ends too.
//! 2. Every read that yields bytes counts them and moves the connection's activity clock.
//! 3. Each direction is a [`crate::pump`]: small bursts are copied through a buffer; with
//!    `zero_copy`, a bulk transfer moves to splice(2) through a pipe (while pipes are left).
//! 4. The connection is closed when the clock has not moved for the idle timeout, or when the
//!    total timeout passes, or when the proxy shuts down.
//! 5. At an upgrade in place the relay pauses: both directions stop where they are, and the
//!    sockets and the bytes each had read and not yet written ([`Resume`]) are given back, to
//!    be handed to the next program, which goes on from there with its clocks restarted.

use std::io;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, Limit};
use crate::pump::{self, Flow, Mode};

/// Limits of one spliced connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits<'a> {
    pub(crate) idle: Option<Duration>,
    pub(crate) total: Option<Duration>,
    pub(crate) buffer: usize,
    /// The proxy's pipes, when bulk transfers move by splice(2); `None` copies.
    pub(crate) pipes: Option<&'a Semaphore>,
}

/// Where the bytes are counted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counters<'a> {
    pub(crate) from_client: &'a AtomicU64,
    pub(crate) to_client: &'a AtomicU64,
}

/// How a splice ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Both directions reached EOF.
    Done,
    /// Silent for the idle timeout.
    Idle,
    /// Open for the total timeout.
    Total,
    /// The proxy is shutting down.
    Cancelled,
    /// A read or write failed (typically a reset by one side).
    Failed(io::Error),
    /// Paused for an upgrade in place (rule 5): the sockets and what was in flight.
    Paused(Paused),
}

/// Where a relay stands: the bytes read from one side and not yet written to the other, and
/// which directions ended. [`Paused`] gives it; [`relay`] goes on from it.
#[derive(Debug, Default)]
pub(crate) struct Resume {
    /// Read from the client, for the backend.
    pub(crate) up: Vec<u8>,
    /// Read from the backend, for the client.
    pub(crate) down: Vec<u8>,
    /// The client's writing ended and the backend's was shut down.
    pub(crate) up_done: bool,
    /// The backend's writing ended and the client's was shut down.
    pub(crate) down_done: bool,
}

/// A relay stopped at an upgrade in place, whole.
#[derive(Debug)]
pub(crate) struct Paused {
    pub(crate) client: TcpStream,
    pub(crate) backend: TcpStream,
    pub(crate) resume: Resume,
}

/// Copies `client` ⇄ `backend` until both directions end or a limit is hit (the tests' way
/// in; the proxy's connections go through [`relay`]). With
/// `client_done`, the client had already ended its writing before the splice began: the
/// backend's writing side is shut down at once and only the answer is copied.
#[cfg(test)]
pub(crate) async fn splice(
    client: TcpStream,
    backend: TcpStream,
    client_done: bool,
    limits: Limits<'_>,
    counters: Counters<'_>,
    cancel: &CancellationToken,
) -> Ended {
    let mut resume = Resume::default();
    if client_done {
        if let Err(error) = pump::shutdown_write(&backend) {
            return Ended::Failed(error);
        }
        resume.up_done = true;
    }
    relay(client, backend, resume, limits, counters, cancel, None).await
}

/// As [`splice`], going on from `resume`; when `pause` is cancelled, stops and gives the
/// sockets and what was in flight back ([`Ended::Paused`], rule 5).
pub(crate) async fn relay(
    mut client: TcpStream,
    mut backend: TcpStream,
    resume: Resume,
    limits: Limits<'_>,
    counters: Counters<'_>,
    cancel: &CancellationToken,
    pause: Option<&CancellationToken>,
) -> Ended {
    let clock = &Clock::new();
    let mode = Mode {
        buffer: limits.buffer,
        pipes: limits.pipes,
    };
    let (up, down) = (counters.from_client, counters.to_client);
    let mut up_flow = Flow::resumed(resume.up, resume.up_done);
    let mut down_flow = Flow::resumed(resume.down, resume.down_done);
    // `None`: paused.
    let ended: Option<Ended> = {
        let (client_read, client_write) = client.split();
        let (backend_read, backend_write) = backend.split();
        let copying = async {
            tokio::try_join!(
                pump::pump(client_read, backend_write, mode, clock, up, &mut up_flow),
                pump::pump(
                    backend_read,
                    client_write,
                    mode,
                    clock,
                    down,
                    &mut down_flow
                ),
            )
            .map(drop)
        };
        let total = limits
            .total
            .map(|total| tokio::time::Instant::now() + total);
        tokio::select! {
            copied = copying => Some(match copied {
                Ok(()) => Ended::Done,
                Err(error) => Ended::Failed(error),
            }),
            limit = clock.limits(limits.idle, total, cancel, pause) => match limit {
                Limit::Idle => Some(Ended::Idle),
                Limit::Total => Some(Ended::Total),
                Limit::Cancelled => Some(Ended::Cancelled),
                Limit::Paused => None,
            },
        }
    };
    if let Some(ended) = ended {
        return ended;
    }
    // The pumps are dropped: what they had in flight is in their flows.
    let taken = up_flow
        .take_pending()
        .and_then(|up| Ok((up, down_flow.take_pending()?)));
    match taken {
        Ok((up, down)) => Ended::Paused(Paused {
            client,
            backend,
            resume: Resume {
                up,
                down,
                up_done: up_flow.done,
                down_done: down_flow.done,
            },
        }),
        Err(error) => Ended::Failed(error),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of streams on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    /// Pipes for the zero-copy tests.
    static PIPES: Semaphore = Semaphore::const_new(64);

    fn limits(idle: Option<Duration>, zero_copy: bool) -> Limits<'static> {
        Limits {
            idle,
            total: None,
            buffer: 8192,
            pipes: zero_copy.then_some(&PIPES),
        }
    }

    #[tokio::test]
    async fn a_paused_relay_goes_on_byte_exact_copying() {
        a_paused_relay_goes_on_byte_exact(false).await;
    }

    #[tokio::test]
    async fn a_paused_relay_goes_on_byte_exact_zero_copy() {
        a_paused_relay_goes_on_byte_exact(true).await;
    }

    /// A download paused mid-transfer (the client reading nothing meanwhile, so bytes are
    /// in flight in the relay) and resumed from what the pause gave back: the client gets
    /// every byte once, in order, and what it sends after reaches the server.
    async fn a_paused_relay_goes_on_byte_exact(zero_copy: bool) {
        let (mut user, client) = pair().await;
        let (backend, mut server) = pair().await;
        let (from, to) = (AtomicU64::new(0), AtomicU64::new(0));
        let counters = Counters {
            from_client: &from,
            to_client: &to,
        };
        let (cancel, pause) = (CancellationToken::new(), CancellationToken::new());
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let server = tokio::spawn(async move {
            server.write_all(&sent).await.expect("server write");
            server.shutdown().await.expect("server shutdown");
            let mut heard = Vec::new();
            server.read_to_end(&mut heard).await.expect("server read");
            heard
        });
        let mut got = vec![0u8; 100_000];
        let relaying = relay(
            client,
            backend,
            Resume::default(),
            limits(None, zero_copy),
            counters,
            &cancel,
            Some(&pause),
        );
        let pausing = async {
            user.read_exact(&mut got).await.expect("user read");
            // More than was read is in flight: the relay holds some of it.
            let moved = || to.load(Ordering::Relaxed) as usize;
            tokio::time::timeout(Duration::from_secs(30), async {
                while moved() < 2 * got.len() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("the relay moves bytes");
            pause.cancel();
        };
        let (ended, ()) = tokio::join!(relaying, pausing);
        let Ended::Paused(paused) = ended else {
            panic!("not paused: {ended:?}");
        };
        let resumed = relay(
            paused.client,
            paused.backend,
            paused.resume,
            limits(None, zero_copy),
            counters,
            &cancel,
            None,
        );
        let used = async {
            let mut rest = Vec::new();
            user.read_to_end(&mut rest).await.expect("user read");
            user.write_all(b"after the pause")
                .await
                .expect("user write");
            user.shutdown().await.expect("user shutdown");
            rest
        };
        let (ended, rest) = tokio::join!(resumed, used);
        assert!(matches!(ended, Ended::Done), "{ended:?}");
        got.extend_from_slice(&rest);
        assert!(
            got == data,
            "{} bytes received of {}",
            got.len(),
            data.len()
        );
        assert_eq!(server.await.expect("server"), b"after the pause");
    }

    #[tokio::test]
    async fn half_close_from_client_still_delivers_the_answer_copying() {
        half_close_from_client_still_delivers_the_answer(false).await;
    }

    #[tokio::test]
    async fn half_close_from_client_still_delivers_the_answer_zero_copy() {
        half_close_from_client_still_delivers_the_answer(true).await;
    }

    async fn half_close_from_client_still_delivers_the_answer(zero_copy: bool) {
        let (mut user, client) = pair().await;
        let (backend, mut server) = pair().await;
        let from = AtomicU64::new(0);
        let to = AtomicU64::new(0);
        let cancel = CancellationToken::new();
        let counters = Counters {
            from_client: &from,
            to_client: &to,
        };
        let splicing = splice(
            client,
            backend,
            false,
            limits(None, zero_copy),
            counters,
            &cancel,
        );
        let served = async {
            let mut request = Vec::new();
            server.read_to_end(&mut request).await.expect("server read");
            server.write_all(b"answer to ").await.expect("server write");
            server.write_all(&request).await.expect("server write");
            server.shutdown().await.expect("server shutdown");
        };
        let used = async {
            user.write_all(b"question").await.expect("user write");
            user.shutdown().await.expect("user shutdown");
            let mut answer = Vec::new();
            user.read_to_end(&mut answer).await.expect("user read");
            answer
        };
        let (ended, (), answer) = tokio::join!(splicing, served, used);
        assert!(matches!(ended, Ended::Done), "{ended:?}");
        assert_eq!(answer, b"answer to question");
        assert_eq!(from.load(Ordering::Relaxed), 8);
        assert_eq!(to.load(Ordering::Relaxed), 18);
    }

    #[tokio::test]
    async fn client_done_before_splice_shuts_down_backend_writing_copying() {
        client_done_before_splice_shuts_down_backend_writing(false).await;
    }

    #[tokio::test]
    async fn client_done_before_splice_shuts_down_backend_writing_zero_copy() {
        client_done_before_splice_shuts_down_backend_writing(true).await;
    }

    async fn client_done_before_splice_shuts_down_backend_writing(zero_copy: bool) {
        let (mut user, client) = pair().await;
        let (backend, mut server) = pair().await;
        let from = AtomicU64::new(0);
        let to = AtomicU64::new(0);
        let cancel = CancellationToken::new();
        let counters = Counters {
            from_client: &from,
            to_client: &to,
        };
        user.shutdown().await.expect("user shutdown");
        let splicing = splice(
            client,
            backend,
            true,
            limits(None, zero_copy),
            counters,
            &cancel,
        );
        let served = async {
            let mut request = Vec::new();
            server
                .read_to_end(&mut request)
                .await
                .expect("server sees EOF");
            server.write_all(b"bye").await.expect("server write");
            server.shutdown().await.expect("server shutdown");
        };
        let used = async {
            let mut answer = Vec::new();
            user.read_to_end(&mut answer).await.expect("user read");
            answer
        };
        let (ended, (), answer) = tokio::join!(splicing, served, used);
        assert!(matches!(ended, Ended::Done), "{ended:?}");
        assert_eq!(answer, b"bye");
    }

    #[tokio::test]
    async fn silent_connection_is_closed_by_the_idle_timeout() {
        let (_user, client) = pair().await;
        let (backend, _server) = pair().await;
        let from = AtomicU64::new(0);
        let to = AtomicU64::new(0);
        let cancel = CancellationToken::new();
        let counters = Counters {
            from_client: &from,
            to_client: &to,
        };
        let idle = Some(Duration::from_millis(200));
        let ended = splice(
            client,
            backend,
            false,
            limits(idle, false),
            counters,
            &cancel,
        )
        .await;
        assert!(matches!(ended, Ended::Idle), "{ended:?}");
    }

    async fn megabytes_arrive_intact(zero_copy: bool) {
        let (mut user, client) = pair().await;
        let (backend, mut server) = pair().await;
        let from = AtomicU64::new(0);
        let to = AtomicU64::new(0);
        let cancel = CancellationToken::new();
        let counters = Counters {
            from_client: &from,
            to_client: &to,
        };
        let sent: Vec<u8> = (0..3 * 1024 * 1024u32).map(|n| (n % 251) as u8).collect();
        let splicing = splice(
            client,
            backend,
            false,
            limits(None, zero_copy),
            counters,
            &cancel,
        );
        let served = async {
            let mut request = [0u8; 3];
            server.read_exact(&mut request).await.expect("server read");
            server.write_all(&sent).await.expect("server write");
            server.shutdown().await.expect("server shutdown");
        };
        let used = async {
            user.write_all(b"get").await.expect("user write");
            let mut answer = Vec::new();
            user.read_to_end(&mut answer).await.expect("user read");
            user.shutdown().await.expect("user shutdown");
            answer
        };
        let (ended, (), answer) = tokio::join!(splicing, served, used);
        assert!(matches!(ended, Ended::Done), "{ended:?}");
        assert!(
            answer == sent,
            "{} bytes arrived, not the {} sent",
            answer.len(),
            sent.len()
        );
        assert_eq!(to.load(Ordering::Relaxed), sent.len() as u64);
    }

    #[tokio::test]
    async fn megabytes_arrive_intact_copying() {
        megabytes_arrive_intact(false).await;
    }

    #[tokio::test]
    async fn megabytes_arrive_intact_zero_copy() {
        megabytes_arrive_intact(true).await;
    }

    /// Set by `relayed_connections_leave_no_descriptor_behind` for the process it starts.
    const ALONE: &str = "REVBOOT_PROXY_TEST_ALONE";

    /// The descriptors this process has open.
    fn open_descriptors() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .count()
    }

    /// One relayed connection carrying `size` bytes to the client; with `reset`, the client
    /// resets its connection after the first bytes instead of reading on.
    async fn relay_once(pipes: &Semaphore, zero_copy: bool, size: usize, reset: bool) {
        let (mut user, client) = pair().await;
        let (backend, mut server) = pair().await;
        let (from, to) = (AtomicU64::new(0), AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let counters = Counters {
            from_client: &from,
            to_client: &to,
        };
        let limits = Limits {
            idle: Some(Duration::from_secs(30)),
            total: None,
            buffer: 8192,
            pipes: zero_copy.then_some(pipes),
        };
        let splicing = splice(client, backend, false, limits, counters, &cancel);
        let served = async {
            let mut request = [0u8; 3];
            server.read_exact(&mut request).await.expect("server read");
            // A reset client makes these fail: the proxy closes this side too.
            let _ = server.write_all(&vec![7u8; size]).await;
            let _ = server.shutdown().await;
        };
        let used = async {
            user.write_all(b"get").await.expect("user write");
            if reset {
                let mut first = [0u8; 1];
                user.read_exact(&mut first).await.expect("first byte");
                user.set_zero_linger().expect("linger");
                drop(user);
            } else {
                let mut answer = Vec::new();
                user.read_to_end(&mut answer).await.expect("user read");
                assert_eq!(answer.len(), size);
            }
        };
        let (ended, (), ()) = tokio::join!(splicing, served, used);
        if reset {
            assert!(matches!(ended, Ended::Failed(_)), "{ended:?}");
        } else {
            assert!(matches!(ended, Ended::Done), "{ended:?}");
        }
    }

    /// Counts the whole process's descriptors, so it only runs alone, in a process of its
    /// own: `relayed_connections_leave_no_descriptor_behind` starts it.
    #[tokio::test]
    #[ignore = "run alone by relayed_connections_leave_no_descriptor_behind"]
    async fn relayed_connections_leave_no_descriptor_behind_alone() {
        if std::env::var_os(ALONE).is_none() {
            return;
        }
        let pipes = Semaphore::new(4);
        // The runtime's own descriptors exist after a first connection.
        relay_once(&pipes, true, 1 << 20, false).await;
        let before = open_descriptors();
        for n in 0..200 {
            let zero_copy = n % 2 == 0;
            relay_once(&pipes, zero_copy, 1 << 20, n % 10 == 0).await;
        }
        assert_eq!(open_descriptors(), before, "descriptors left open");
        assert_eq!(pipes.available_permits(), 4, "pipes not given back");
    }

    #[tokio::test]
    async fn relayed_connections_leave_no_descriptor_behind() {
        let test = "splice::tests::relayed_connections_leave_no_descriptor_behind_alone";
        let running = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", test, "--ignored", "--test-threads=1"])
            .env(ALONE, "1")
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(300), running)
            .await
            .expect("the counting run ends within 5 minutes")
            .expect("run the test binary");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

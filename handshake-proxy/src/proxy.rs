//! The proxy as a decorator of the deployer: `summon` also makes sure a listener exists.
//!
//! 1. `summon` asks the deployer, then binds `address:port` (unless the instance itself
//!    listens there) before it returns, so an address is never handed out before a listener
//!    exists for it.
//! 2. Each listener accepts at once, admits or refuses (see [`crate::connection`]), and hands
//!    the connection to its own task.
//! 3. A sweep every `sweep_interval` closes listeners whose address the deployer no longer
//!    gives to an instance on that port; the listener count is bounded by `max_listeners`.

use std::net::IpAddr;
use std::sync::Arc;

use revboot_deployer::{
    Activity, InstanceKey, Instances, ResolveError, Resolved, SummonError, Summoned,
};
use revboot_store::Revision;
use tokio::runtime::Handle;
use tracing::{info, warn};

use crate::config::ProxyConfig;
use crate::connection;
use crate::door::{FrontAddresses, FrontConfig, FrontError};
use crate::metrics::ProxyMetrics;
use crate::shared::{ListenError, Shared};

/// The handshake proxy. It implements [`Instances`] itself: give it to the DNS front end in
/// place of the deployer, and every address DNS hands out has a listener behind it.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    /// Wraps `inner` (the deployer). Listener and connection tasks run on the current tokio
    /// runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(config: ProxyConfig, inner: Arc<dyn Instances>) -> Arc<Proxy> {
        let runtime = Handle::try_current().expect("Proxy::new is called inside a tokio runtime");
        if let Err(error) = config.validate() {
            // The config is the caller's; an unusable one still makes a proxy that refuses
            // what its bounds refuse, and says so.
            warn!(%error, "proxy configuration is unusable");
        }
        let shared = Arc::new(Shared::new(config, inner, runtime, None));
        shared.runtime.spawn(sweeping(Arc::clone(&shared)));
        Arc::new(Proxy { shared })
    }

    /// Like [`Proxy::new`], with a front door ([`crate::front`]): its listeners are bound
    /// before this returns, and services whose manifest says `reach = "front"` get no
    /// listener of their own.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn with_front(
        config: ProxyConfig,
        front: FrontConfig,
        inner: Arc<dyn Instances>,
    ) -> Result<Arc<Proxy>, FrontError> {
        Proxy::with_front_inheriting(config, front, inner, Vec::new())
    }

    /// [`Proxy::with_front`], listening on the front door's sockets handed over by the
    /// previous daemon ([`Proxy::hand_over_front`]) where they are on the addresses
    /// configured.
    pub fn with_front_inheriting(
        config: ProxyConfig,
        front: FrontConfig,
        inner: Arc<dyn Instances>,
        inherited: Vec<std::net::TcpListener>,
    ) -> Result<Arc<Proxy>, FrontError> {
        let runtime =
            Handle::try_current().expect("Proxy::with_front is called inside a tokio runtime");
        if let Err(error) = config.validate() {
            warn!(%error, "proxy configuration is unusable");
        }
        let (front, bound) = crate::door::bind(&front, config.backlog, inherited)?;
        let shared = Arc::new(Shared::new(config, inner, runtime, Some(front)));
        crate::front::start(&shared, bound);
        shared.runtime.spawn(sweeping(Arc::clone(&shared)));
        Ok(Arc::new(Proxy { shared }))
    }

    /// Where the front door listens (ports as bound); nothing without one.
    pub fn front_addresses(&self) -> FrontAddresses {
        self.shared
            .front
            .as_ref()
            .map(|front| front.addresses)
            .unwrap_or_default()
    }

    /// Has the front door resolve the names it routes by through `names` instead of the
    /// instances the proxy wraps: the daemon's layer that builds a source commit with no
    /// deployment yet, as DNS does; a connection then waits for that build (at most
    /// [`FrontConfig::build_wait`]) instead of a 404. Held weakly (`names` wraps this
    /// proxy); set once, later calls change nothing. Without a front door, nothing.
    pub fn resolve_names_through(&self, names: &Arc<dyn Instances>) {
        if let Some(front) = &self.shared.front {
            let _ = front.names.set(Arc::downgrade(names));
        }
    }

    /// What its tasks share.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> ProxyMetrics {
        self.shared.metrics.snapshot()
    }

    /// Closes every listener and every connection, held or spliced. Later summons fail with
    /// [`SummonError::ShuttingDown`].
    pub fn shutdown(&self) {
        info!("handshake proxy shutting down");
        self.shared.cancel.cancel();
        if let Some(front) = &self.shared.front {
            front.stop.cancel();
            // The second descriptors too: the sockets close.
            front
                .kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }
        self.shared.close_listeners();
    }

    /// Makes sure a listener exists for `summoned`; what [`Instances::summon`] does after
    /// asking the deployer.
    pub fn listen(&self, summoned: &Summoned) -> Result<(), ListenError> {
        connection::listen(&self.shared, summoned)
    }

    /// Closes listeners whose address no longer belongs to an instance on that port; returns
    /// how many were closed. Runs every `sweep_interval` on its own.
    pub fn sweep(&self) -> usize {
        self.shared.sweep()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Runs [`Shared::sweep`] every `sweep_interval` until shutdown.
async fn sweeping(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(shared.config.sweep_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // At most `max_listeners` in-memory lookups: cheap enough to do every tick.
        shared.sweep();
    }
}

impl Instances for Proxy {
    fn resolve(&self, service: &str, label: Option<&str>) -> Result<Resolved, ResolveError> {
        self.shared.inner.resolve(service, label)
    }

    fn summon(
        &self,
        service: &str,
        revision: &Revision,
        client: Option<IpAddr>,
    ) -> Result<Summoned, SummonError> {
        connection::summon(&self.shared, service, revision, client)
    }

    fn by_address(&self, address: IpAddr) -> Option<Summoned> {
        self.shared.inner.by_address(address)
    }

    fn activity(&self, key: &InstanceKey, activity: Activity) {
        self.shared.inner.activity(key, activity);
    }

    fn generation(&self) -> u64 {
        self.shared.inner.generation()
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::net::{IpAddr, SocketAddr};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    use super::*;
    use revboot_deployer::InstanceState;
    use revboot_testkit::instances::{
        Addresses, Backend, Behaviour, Boot, Fake, FakeService, unique_ip,
    };

    /// Generous bound for a test step that should take milliseconds, so a bug fails the test
    /// instead of hanging it.
    const STEP: Duration = Duration::from_secs(20);
    /// The client port every fake instance is reached on.
    const PORT: u16 = 8080;
    /// How long a fake instance takes to boot.
    const BOOT: Duration = Duration::from_millis(300);

    /// Fake instances as these tests want them: a real backend on a loopback address of
    /// their own, ready [`BOOT`] after the summon, never reaped.
    fn booting() -> Behaviour {
        Behaviour {
            cap: usize::MAX,
            boot: Boot::After(BOOT),
            backend: Backend::Echo,
            addresses: Addresses::Unique,
            boot_timeout: Duration::from_secs(10),
            idle_timeout: None,
        }
    }

    /// The deployer's stand-in with one service, `hello` on [`PORT`].
    fn fake(behaviour: Behaviour) -> Arc<Fake> {
        let fake = Fake::new(behaviour);
        fake.add_service("hello", FakeService::one(PORT, revision()));
        fake
    }

    fn revision() -> Revision {
        revboot_testkit::instances::revision(1)
    }

    fn proxy(fake: &Arc<Fake>, config: ProxyConfig) -> Arc<Proxy> {
        let inner: Arc<dyn Instances> = fake.clone();
        Proxy::new(config, inner)
    }

    async fn connect(to: SocketAddr, from: Option<IpAddr>) -> io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        if let Some(from) = from {
            socket.bind(SocketAddr::new(from, 0))?;
        }
        socket.connect(to).await
    }

    /// Sends a request and reads the whole answer.
    async fn get(to: SocketAddr, from: Option<IpAddr>, path: &str) -> io::Result<String> {
        let mut stream = connect(to, from).await?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    fn key(summoned: &Summoned) -> InstanceKey {
        summoned.key.clone()
    }

    fn at(summoned: &Summoned) -> SocketAddr {
        SocketAddr::new(summoned.addresses.primary(), summoned.port)
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        tokio::time::timeout(STEP, async {
            while !check() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("never true: {what}"));
    }

    #[tokio::test]
    async fn summon_returns_with_the_listener_already_bound() {
        let fake = fake(booting());
        let proxy = proxy(&fake, ProxyConfig::default());
        let summoned = proxy.summon("hello", &revision(), None).expect("summon");
        assert_eq!(summoned.port, PORT);
        // Booting, not ready: the connect still succeeds because the proxy listens.
        assert!(!summoned.state.borrow().is_serving());
        let answer = tokio::time::timeout(STEP, get(at(&summoned), None, "/first"))
            .await
            .expect("answered in time")
            .expect("answered");
        assert!(
            answer.ends_with("answer to GET /first HTTP/1.1\n"),
            "{answer}"
        );
        assert_eq!(proxy.metrics().held, 1);
        assert_eq!(proxy.metrics().spliced, 1);
    }

    #[tokio::test]
    async fn many_clients_on_a_cold_instance_boot_it_once() {
        let fake = fake(booting());
        let proxy = proxy(&fake, ProxyConfig::default());
        let summoned = proxy.summon("hello", &revision(), None).expect("summon");
        let address = at(&summoned);
        let clients: Vec<_> = (0..100)
            .map(|n| tokio::spawn(async move { get(address, None, &format!("/{n}")).await }))
            .collect();
        for (n, client) in clients.into_iter().enumerate() {
            let answer = tokio::time::timeout(STEP, client)
                .await
                .expect("answered in time")
                .expect("client task")
                .expect("no refusal or reset");
            assert!(answer.contains(&format!("answer to GET /{n} ")), "{answer}");
        }
        assert_eq!(fake.boots(&key(&summoned)), 1);
        assert_eq!(proxy.metrics().refused, 0);
    }

    #[tokio::test]
    async fn request_sent_and_half_closed_before_ready_is_answered() {
        let fake = fake(booting());
        let proxy = proxy(&fake, ProxyConfig::default());
        let summoned = proxy.summon("hello", &revision(), None).expect("summon");
        let mut stream = connect(at(&summoned), None).await.expect("connect");
        stream
            .write_all(b"GET /early HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .expect("write");
        stream.shutdown().await.expect("end of request");
        assert!(!summoned.state.borrow().is_serving(), "sent before ready");
        let mut answer = String::new();
        tokio::time::timeout(STEP, stream.read_to_string(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        assert!(answer.contains("answer to GET /early "), "{answer}");
        let request_len = "GET /early HTTP/1.1\r\nhost: test\r\n\r\n".len() as u64;
        assert_eq!(proxy.metrics().replayed_bytes, request_len);
    }

    #[tokio::test]
    async fn per_client_instance_refuses_another_source_address() {
        let fake = fake(booting());
        let proxy = proxy(&fake, ProxyConfig::default());
        let alice = unique_ip();
        let bob = unique_ip();
        let summoned = proxy
            .summon("hello", &revision(), Some(alice))
            .expect("summon");
        let refused = tokio::time::timeout(STEP, get(at(&summoned), Some(bob), "/bob"))
            .await
            .expect("refused in time");
        match refused {
            Ok(answer) => assert!(answer.is_empty(), "bob was answered: {answer}"),
            Err(error) => assert_eq!(error.kind(), io::ErrorKind::ConnectionReset),
        }
        let answer = tokio::time::timeout(STEP, get(at(&summoned), Some(alice), "/alice"))
            .await
            .expect("answered in time")
            .expect("alice is served");
        assert!(answer.contains("answer to GET /alice "), "{answer}");
        let metrics = proxy.metrics();
        assert_eq!(metrics.refused_admission, 1);
        assert_eq!(metrics.spliced, 1);
    }

    async fn closed_without_answer(mut stream: TcpStream) {
        let mut answer = Vec::new();
        let read = tokio::time::timeout(STEP, stream.read_to_end(&mut answer))
            .await
            .expect("closed in time");
        if read.is_ok() {
            assert!(answer.is_empty(), "answered: {answer:?}");
        }
    }

    #[tokio::test]
    async fn failed_boot_closes_every_held_connection() {
        let fake = fake(Behaviour {
            boot: Boot::CrashAfter(BOOT),
            ..booting()
        });
        let proxy = proxy(&fake, ProxyConfig::default());
        let summoned = proxy.summon("hello", &revision(), None).expect("summon");
        let mut held = Vec::new();
        for _ in 0..20 {
            let mut stream = connect(at(&summoned), None).await.expect("connect");
            stream
                .write_all(b"GET / HTTP/1.1\r\n\r\n")
                .await
                .expect("write");
            held.push(stream);
        }
        for stream in held {
            closed_without_answer(stream).await;
        }
        eventually("20 boot failures counted", || {
            proxy.metrics().boot_failures == 20
        })
        .await;
        assert_eq!(proxy.metrics().held_now, 0);
    }

    /// A proxy holding one connection to a `Boot::Manual` instance, half its request read,
    /// is handed over: the next proxy, on the same listener, holds it again. The fake, the
    /// instance, the client's stream and the next proxy.
    async fn held_and_handed_over() -> (Arc<Fake>, Summoned, TcpStream, Arc<Proxy>) {
        let fake = fake(Behaviour {
            boot: Boot::Manual,
            ..booting()
        });
        let old = proxy(&fake, ProxyConfig::default());
        let summoned = old.summon("hello", &revision(), None).expect("summon");
        let mut stream = connect(at(&summoned), None).await.expect("connect");
        stream
            .write_all(b"GET /held HTTP/1.1\r\n")
            .await
            .expect("write");
        eventually("held", || old.metrics().held_now == 1).await;
        // The drain ends as soon as nothing is open: the held connection is kept at once
        // (the instance is still booting, and stays so).
        let listeners = old.hand_over(STEP).await;
        let held = old.take_held();
        assert_eq!(held.len(), 1);
        assert_eq!(old.take_relays().len(), 0);
        assert_eq!(old.metrics().open_now, 0);
        let new = proxy(&fake, ProxyConfig::default());
        for (address, listener) in listeners {
            new.adopt(address, listener);
        }
        new.adopt_held(held);
        eventually("held again", || new.metrics().held_now == 1).await;
        (fake, summoned, stream, new)
    }

    #[tokio::test]
    async fn a_held_connection_handed_over_is_answered_once_its_instance_is_ready() {
        let (fake, summoned, mut stream, new) = held_and_handed_over().await;
        stream
            .write_all(b"host: test\r\n\r\n")
            .await
            .expect("write");
        fake.set_state(&key(&summoned), InstanceState::Ready);
        let mut answer = String::new();
        tokio::time::timeout(STEP, stream.read_to_string(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        assert!(
            answer.ends_with("answer to GET /held HTTP/1.1\n"),
            "{answer}"
        );
        assert_eq!(new.metrics().spliced, 1);
    }

    #[tokio::test]
    async fn a_held_connection_handed_over_is_closed_when_its_instance_fails_to_boot() {
        let (fake, summoned, stream, new) = held_and_handed_over().await;
        fake.set_state(
            &key(&summoned),
            InstanceState::Crashed {
                reason: "test".into(),
            },
        );
        closed_without_answer(stream).await;
        eventually("boot failure counted", || new.metrics().boot_failures == 1).await;
        assert_eq!(new.metrics().held_now, 0);
    }

    #[tokio::test]
    async fn boot_timeout_closes_held_connections() {
        let fake = fake(Behaviour {
            boot: Boot::After(Duration::from_secs(3600)),
            boot_timeout: Duration::from_millis(200),
            ..booting()
        });
        let proxy = proxy(&fake, ProxyConfig::default());
        let summoned = proxy.summon("hello", &revision(), None).expect("summon");
        let stream = connect(at(&summoned), None).await.expect("connect");
        closed_without_answer(stream).await;
        eventually("boot failure counted", || {
            proxy.metrics().boot_failures == 1
        })
        .await;
    }

    #[tokio::test]
    async fn quiet_open_connection_keeps_the_instance_from_being_reaped() {
        let idle = Duration::from_millis(200);
        let fake = fake(Behaviour {
            idle_timeout: Some(idle),
            boot: Boot::After(Duration::from_millis(10)),
            ..booting()
        });
        let proxy = proxy(&fake, ProxyConfig::default());
        let summoned = proxy.summon("hello", &revision(), None).expect("summon");
        let instance = key(&summoned);
        let quiet = connect(at(&summoned), None).await.expect("connect");
        eventually("connection reported open", || fake.open(&instance) == 1).await;
        tokio::time::sleep(idle * 5).await;
        assert_eq!(fake.state(&instance), Some(InstanceState::Ready));
        drop(quiet);
        eventually("reaped once closed", || {
            fake.state(&instance) == Some(InstanceState::Stopped)
        })
        .await;
        // The listener stays: the next connection boots the instance again.
        let answer = tokio::time::timeout(STEP, get(at(&summoned), None, "/again"))
            .await
            .expect("answered in time")
            .expect("answered");
        assert!(answer.contains("answer to GET /again "), "{answer}");
        assert_eq!(fake.boots(&instance), 2);
    }

    #[tokio::test]
    async fn held_connections_over_the_bound_are_refused() {
        let fake = fake(Behaviour {
            boot: Boot::After(Duration::from_secs(3600)),
            ..booting()
        });
        let config = ProxyConfig {
            max_held_per_instance: 2,
            ..ProxyConfig::default()
        };
        let proxy = proxy(&fake, config);
        let summoned = proxy.summon("hello", &revision(), None).expect("summon");
        let _first = connect(at(&summoned), None).await.expect("connect");
        let _second = connect(at(&summoned), None).await.expect("connect");
        eventually("two held", || proxy.metrics().held_now == 2).await;
        let third = connect(at(&summoned), None).await.expect("connect");
        closed_without_answer(third).await;
        let metrics = proxy.metrics();
        assert_eq!(metrics.refused_overload, 1);
        assert_eq!(metrics.held_now, 2);
    }

    #[tokio::test]
    async fn released_address_loses_its_listener() {
        let fake = fake(booting());
        let proxy = proxy(&fake, ProxyConfig::default());
        let summoned = proxy.summon("hello", &revision(), None).expect("summon");
        assert_eq!(proxy.sweep(), 0, "address still owned");
        fake.release(&key(&summoned));
        assert_eq!(proxy.sweep(), 1);
        eventually("listener gone", || proxy.metrics().listeners == 0).await;
        let refused = connect(at(&summoned), None).await;
        assert_eq!(
            refused.expect_err("nothing listens").kind(),
            io::ErrorKind::ConnectionRefused
        );
    }

    #[tokio::test]
    async fn shutdown_closes_held_connections_and_refuses_summons() {
        let fake = fake(Behaviour {
            boot: Boot::After(Duration::from_secs(3600)),
            ..booting()
        });
        let proxy = proxy(&fake, ProxyConfig::default());
        let summoned = proxy.summon("hello", &revision(), None).expect("summon");
        let held = connect(at(&summoned), None).await.expect("connect");
        eventually("held", || proxy.metrics().held_now == 1).await;
        proxy.shutdown();
        closed_without_answer(held).await;
        assert!(matches!(
            proxy.summon("hello", &revision(), None),
            Err(SummonError::ShuttingDown)
        ));
    }
}

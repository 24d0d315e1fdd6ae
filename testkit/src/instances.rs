//! A stand-in for the deployer behind [`Instances`], for the tests and benchmarks of the
//! parts that front it: the DNS front end and the handshake proxy.
//!
//! 1. Services and their revisions live in memory ([`FakeService`]). `resolve` finds no
//!    label as the live revision, a label as a tag or as a prefix of 7 or more hex digits of
//!    a revision; a label naming several revisions is ambiguous, a revision without an image
//!    is not bootable.
//! 2. `summon` of an instance that is not final returns it. Otherwise it starts one, at most
//!    `cap` running, on an address of its own ([`Addresses`]; an instance summoned again
//!    keeps the address of its last life), whose state follows [`Boot`] and which answers
//!    where [`Backend`] says. A per-client service refuses a summon without a client. The
//!    count of summons moves once the call is done, so a test that sees it also sees the
//!    instance.
//! 3. `by_address` finds the instance at an address. `activity` counts answered queries and
//!    open connections; with an `idle_timeout`, a serving instance with no open connection
//!    and no activity for that long is stopped, as the deployer's reaper does.
//! 4. `generation` moves with every change to the services.
//!
//! A test steers instances with [`Fake::set_state`] and [`Fake::release`] and reads what
//! the front end did from the counters.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use revboot_deployer::{
    Activity, ClientPrefixes, InstanceKey, InstanceState, Instances, Reach, ResolveError, Resolved,
    ServiceAddresses, SummonError, Summoned,
};
use revboot_store::Revision;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// One revision of a fake service.
#[derive(Debug, Clone)]
pub struct FakeRevision {
    /// The deployment commit.
    pub revision: Revision,
    /// Tags that name it.
    pub tags: Vec<String>,
    /// Whether it has an image (a failed build has none).
    pub bootable: bool,
}

/// A fake service.
#[derive(Debug, Default, Clone)]
pub struct FakeService {
    /// One instance per client address.
    pub per_client: bool,
    /// The port clients connect to.
    pub port: u16,
    /// How clients reach it.
    pub reach: Reach,
    /// Its revisions, oldest first.
    pub revisions: Vec<FakeRevision>,
    /// The live revision.
    pub live: Option<Revision>,
}

impl FakeService {
    /// A service on `port` with one bootable revision, live.
    pub fn one(port: u16, revision: Revision) -> FakeService {
        FakeService {
            per_client: false,
            port,
            reach: Reach::Address,
            revisions: vec![FakeRevision {
                revision,
                tags: Vec::new(),
                bootable: true,
            }],
            live: Some(revision),
        }
    }
}

/// How a summoned instance comes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// Ready as soon as it is summoned.
    Instant,
    /// Booting until [`Fake::set_state`].
    Manual,
    /// Ready after this long.
    After(Duration),
    /// Crashed after this long.
    CrashAfter(Duration),
}

/// Where an instance accepts connections (`Summoned::backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// On its service address and port, where nothing listens: for tests that never
    /// connect.
    ServiceAddress,
    /// A real HTTP server on an ephemeral port of the service address, listening from the
    /// moment the instance is ready until it stops serving; it answers each connection's
    /// request with `answer to <request line>` and closes it.
    Echo,
    /// An address something else listens on (a benchmark's backend process).
    At(SocketAddr),
}

/// Which service addresses instances get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addresses {
    /// `127.100.0.1`, `127.100.0.2`, … in the order instances are first summoned: for tests
    /// that never bind them.
    Loopback,
    /// `fd00::1`, `fd00::2`, … likewise.
    V6,
    /// Both of the above, one of each family per instance.
    Dual,
    /// Loopback addresses that no other test process hands out at the same time
    /// ([`unique_ip`]): for instances something listens on.
    Unique,
    /// This address, for every instance.
    Fixed(IpAddr),
}

/// What the stand-in does.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// The most instances running at once.
    pub cap: usize,
    /// How an instance comes up.
    pub boot: Boot,
    /// Where it accepts connections.
    pub backend: Backend,
    /// Which addresses instances get.
    pub addresses: Addresses,
    /// The boot timeout summons report (how long a connection or a delayed answer waits).
    pub boot_timeout: Duration,
    /// Serving instances with no open connection and no activity for this long are stopped.
    pub idle_timeout: Option<Duration>,
}

impl Default for Behaviour {
    /// Sixteen instances, ready at once, on `127.100.0.x`, never reaped.
    fn default() -> Behaviour {
        Behaviour {
            cap: 16,
            boot: Boot::Instant,
            backend: Backend::ServiceAddress,
            addresses: Addresses::Loopback,
            boot_timeout: Duration::from_secs(5),
            idle_timeout: None,
        }
    }
}

/// A revision id made from a small number (distinct, deterministic, valid hex).
pub fn revision(n: u64) -> Revision {
    format!("{:016x}{n:024x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .parse()
        .expect("40 hex digits")
}

/// A loopback address no other test process uses at the same time (derived from the pid).
pub fn unique_ip() -> IpAddr {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let pid = std::process::id();
    let host = NEXT.fetch_add(1, Ordering::Relaxed);
    IpAddr::V4(Ipv4Addr::new(
        127,
        100 + ((pid >> 8) & 0x3f) as u8,
        (pid & 0xff) as u8,
        host,
    ))
}

/// A service and the hex of its revisions, in order (so that resolving does not format).
#[derive(Debug)]
struct Known {
    service: FakeService,
    hexes: Vec<String>,
}

#[derive(Debug)]
struct Instance {
    addresses: ServiceAddresses,
    backend: SocketAddr,
    state: watch::Sender<InstanceState>,
    open: usize,
    last_activity: Instant,
}

#[derive(Debug, Default)]
struct State {
    instances: HashMap<InstanceKey, Instance>,
    boots: HashMap<InstanceKey, usize>,
    queries: HashMap<InstanceKey, u64>,
    /// Addresses handed out so far ([`Addresses::Loopback`] and [`Addresses::V6`]).
    addresses: u32,
}

/// The stand-in deployer (module docs).
#[derive(Debug)]
pub struct Fake {
    behaviour: Behaviour,
    services: Mutex<HashMap<String, Known>>,
    state: Mutex<State>,
    generation: AtomicU64,
    /// Services whose instances take connections handed to them, and the socket they come on.
    handoffs: Mutex<HashMap<String, revboot_deployer::Handoff>>,
    /// Summons asked of it (counted once each call is done).
    pub summons: AtomicU64,
    /// Names resolved.
    pub resolves: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .expect("no test panicked while holding the fake's lock")
}

impl Fake {
    /// A stand-in with no services. With an `idle_timeout`, it must be made inside a tokio
    /// runtime (it reaps from a task of its own).
    pub fn new(behaviour: Behaviour) -> Arc<Fake> {
        let idle = behaviour.idle_timeout;
        let fake = Arc::new(Fake {
            behaviour,
            services: Mutex::new(HashMap::new()),
            state: Mutex::new(State::default()),
            generation: AtomicU64::new(1),
            handoffs: Mutex::new(HashMap::new()),
            summons: AtomicU64::new(0),
            resolves: AtomicU64::new(0),
        });
        if let Some(idle) = idle {
            tokio::spawn(reaping(Arc::downgrade(&fake), idle));
        }
        fake
    }

    /// Adds (or replaces) a service.
    pub fn add_service(&self, name: &str, service: FakeService) {
        let hexes = service
            .revisions
            .iter()
            .map(|r| r.revision.to_hex())
            .collect();
        lock(&self.services).insert(name.to_owned(), Known { service, hexes });
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Every instance of `service` takes connections handed over on `handoff` (the stand-in
    /// instance receiving them is the test's).
    pub fn set_handoff(&self, service: &str, handoff: revboot_deployer::Handoff) {
        lock(&self.handoffs).insert(service.to_owned(), handoff);
    }

    /// Moves a service's live revision.
    pub fn set_live(&self, name: &str, to: Revision) {
        if let Some(known) = lock(&self.services).get_mut(name) {
            known.service.live = Some(to);
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Instances not in a final state.
    pub fn running(&self) -> usize {
        lock(&self.state)
            .instances
            .values()
            .filter(|i| !i.state.borrow().is_final())
            .count()
    }

    /// Every instance summoned and not released.
    pub fn keys(&self) -> Vec<InstanceKey> {
        lock(&self.state).instances.keys().cloned().collect()
    }

    /// Moves an instance's state, as a boot, a crash or a stop would.
    pub fn set_state(&self, key: &InstanceKey, state: InstanceState) {
        if let Some(instance) = lock(&self.state).instances.get(key) {
            instance.state.send_replace(state);
        }
    }

    /// An instance's state.
    pub fn state(&self, key: &InstanceKey) -> Option<InstanceState> {
        let state = lock(&self.state);
        let instance = state.instances.get(key)?;
        Some(instance.state.borrow().clone())
    }

    /// Forgets an instance and its address, as a deployer releasing it does.
    pub fn release(&self, key: &InstanceKey) {
        if let Some(instance) = lock(&self.state).instances.remove(key) {
            instance.state.send_replace(InstanceState::Stopped);
        }
    }

    /// How many times an instance was started.
    pub fn boots(&self, key: &InstanceKey) -> usize {
        lock(&self.state).boots.get(key).copied().unwrap_or(0)
    }

    /// Connections open to an instance.
    pub fn open(&self, key: &InstanceKey) -> usize {
        lock(&self.state)
            .instances
            .get(key)
            .map_or(0, |instance| instance.open)
    }

    /// Queries answered with an instance.
    pub fn activity_of(&self, key: &InstanceKey) -> u64 {
        lock(&self.state).queries.get(key).copied().unwrap_or(0)
    }

    fn summoned(
        &self,
        key: &InstanceKey,
        (port, reach): (u16, Reach),
        instance: &Instance,
    ) -> Summoned {
        Summoned {
            key: key.clone(),
            addresses: instance.addresses,
            port,
            backend: revboot_deployer::Backend::known(instance.backend),
            boot_timeout: self.behaviour.boot_timeout,
            reach,
            state: instance.state.subscribe(),
        }
    }

    fn summon_now(
        &self,
        service: &str,
        revision: &Revision,
        client: Option<IpAddr>,
    ) -> Result<Summoned, SummonError> {
        let port = {
            let services = lock(&self.services);
            let known = services
                .get(service)
                .ok_or_else(|| ResolveError::UnknownService(service.to_owned()))?;
            if known.service.per_client && client.is_none() {
                return Err(SummonError::ClientRequired {
                    service: service.to_owned(),
                });
            }
            (known.service.port, known.service.reach)
        };
        let key = InstanceKey {
            service: service.to_owned(),
            revision: *revision,
            client: client.map(|client| ClientPrefixes::default().client_of(client)),
            replica: 0,
        };
        let mut state = lock(&self.state);
        if let Some(instance) = state.instances.get(&key)
            && !instance.state.borrow().is_final()
        {
            return Ok(self.summoned(&key, port, instance));
        }
        let running = state
            .instances
            .values()
            .filter(|i| !i.state.borrow().is_final())
            .count();
        if running >= self.behaviour.cap {
            return Err(SummonError::GlobalCap {
                limit: self.behaviour.cap,
            });
        }
        let address = match state.instances.get(&key) {
            Some(instance) => instance.addresses,
            None => self.next_addresses(&mut state),
        };
        let instance = self.start(&key, address, port.0)?;
        *state.boots.entry(key.clone()).or_insert(0) += 1;
        let summoned = self.summoned(&key, port, &instance);
        state.instances.insert(key, instance);
        Ok(summoned)
    }

    fn next_addresses(&self, state: &mut State) -> ServiceAddresses {
        let mut next = || {
            state.addresses += 1;
            let n = state.addresses;
            (
                Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 100, 0, 0)) + n),
                std::net::Ipv6Addr::from([0xfd00, 0, 0, 0, 0, 0, 0, n as u16]),
            )
        };
        match self.behaviour.addresses {
            Addresses::Loopback => ServiceAddresses::one(IpAddr::V4(next().0)),
            Addresses::V6 => ServiceAddresses::one(IpAddr::V6(next().1)),
            Addresses::Dual => {
                let (v4, v6) = next();
                ServiceAddresses::new(Some(v4), Some(v6)).expect("two addresses")
            }
            Addresses::Unique => ServiceAddresses::one(unique_ip()),
            Addresses::Fixed(address) => ServiceAddresses::one(address),
        }
    }

    /// Starts an instance on `address`: its state, and its backend if it has one.
    fn start(
        &self,
        key: &InstanceKey,
        addresses: ServiceAddresses,
        port: u16,
    ) -> Result<Instance, SummonError> {
        let address = addresses.primary();
        let initial = match self.behaviour.boot {
            Boot::Instant => InstanceState::Ready,
            Boot::Manual | Boot::After(_) | Boot::CrashAfter(_) => InstanceState::Booting,
        };
        let state = watch::Sender::new(initial);
        let backend = match self.behaviour.backend {
            Backend::ServiceAddress => SocketAddr::new(address, port),
            Backend::At(backend) => backend,
            Backend::Echo => {
                let start = |error: std::io::Error| SummonError::Start {
                    key: key.to_string(),
                    reason: error.to_string(),
                };
                let socket = if address.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
                .map_err(start)?;
                socket.bind(SocketAddr::new(address, 0)).map_err(start)?;
                let backend = socket.local_addr().map_err(start)?;
                tokio::spawn(serving(socket, state.subscribe()));
                backend
            }
        };
        match self.behaviour.boot {
            Boot::Instant | Boot::Manual => {}
            Boot::After(delay) | Boot::CrashAfter(delay) => {
                let booting = state.clone();
                let crash = matches!(self.behaviour.boot, Boot::CrashAfter(_));
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    booting.send_replace(if crash {
                        InstanceState::Crashed {
                            reason: "exited with status 1".to_owned(),
                        }
                    } else {
                        InstanceState::Ready
                    });
                });
            }
        }
        Ok(Instance {
            addresses,
            backend,
            state,
            open: 0,
            last_activity: Instant::now(),
        })
    }
}

/// Stops instances idle past the idle timeout, as the deployer's reaper does.
async fn reaping(fake: Weak<Fake>, idle: Duration) {
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Some(fake) = fake.upgrade() else { return };
        let state = lock(&fake.state);
        for instance in state.instances.values() {
            let serving = instance.state.borrow().is_serving();
            if serving && instance.open == 0 && instance.last_activity.elapsed() > idle {
                instance.state.send_replace(InstanceState::Stopped);
            }
        }
    }
}

/// [`Backend::Echo`]: listens once the state is serving (never, if it turns final first),
/// answers one request per connection, and stops accepting when the state leaves serving.
async fn serving(socket: TcpSocket, mut state: watch::Receiver<InstanceState>) {
    match state
        .wait_for(|state| state.is_serving() || state.is_final())
        .await
    {
        Ok(state) if state.is_serving() => {}
        _ => return,
    }
    let listener = socket.listen(1024).expect("the fake backend listens");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = state.wait_for(|state| !state.is_serving()) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        tokio::spawn(answer(stream));
    }
}

async fn answer(mut stream: TcpStream) {
    let mut request = Vec::new();
    let mut chunk = [0u8; 4096];
    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
        }
    }
    let line = request
        .split(|&byte| byte == b'\r')
        .next()
        .unwrap_or_default();
    let body = format!("answer to {}\n", String::from_utf8_lossy(line));
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

impl Instances for Fake {
    fn resolve(&self, service: &str, label: Option<&str>) -> Result<Resolved, ResolveError> {
        self.resolves.fetch_add(1, Ordering::Relaxed);
        let services = lock(&self.services);
        let Known { service: s, hexes } = services
            .get(service)
            .ok_or_else(|| ResolveError::UnknownService(service.to_owned()))?;
        let unknown = || ResolveError::UnknownLabel {
            service: service.to_owned(),
            label: label.unwrap_or("live").to_owned(),
        };
        let found = match label {
            None => {
                let live = s.live.ok_or_else(unknown)?;
                s.revisions
                    .iter()
                    .find(|r| r.revision == live)
                    .ok_or_else(unknown)?
            }
            Some(label) => {
                let matches: Vec<&FakeRevision> = s
                    .revisions
                    .iter()
                    .zip(hexes)
                    .filter(|(r, hex)| {
                        (label.len() >= 7 && hex.starts_with(label))
                            || r.tags.iter().any(|t| t == label)
                    })
                    .map(|(r, _)| r)
                    .collect();
                match matches.as_slice() {
                    [] => return Err(unknown()),
                    [one] => *one,
                    many => {
                        return Err(ResolveError::Ambiguous {
                            service: service.to_owned(),
                            label: label.to_owned(),
                            candidates: many.iter().map(|r| r.revision.short(12)).collect(),
                        });
                    }
                }
            }
        };
        if !found.bootable {
            return Err(ResolveError::NotBootable {
                service: service.to_owned(),
                revision: found.revision.short(12),
            });
        }
        Ok(Resolved {
            service: service.to_owned(),
            revision: found.revision,
            per_client: s.per_client,
            port: s.port,
            reach: s.reach,
            tls: revboot_deployer::TlsMode::default(),
        })
    }

    fn summon(
        &self,
        service: &str,
        revision: &Revision,
        client: Option<IpAddr>,
    ) -> Result<Summoned, SummonError> {
        // Counted once the call is done, so a test that sees the count also sees the instance.
        let result = self.summon_now(service, revision, client);
        self.summons.fetch_add(1, Ordering::SeqCst);
        result
    }

    fn by_address(&self, address: IpAddr) -> Option<Summoned> {
        let services = lock(&self.services);
        let state = lock(&self.state);
        state
            .instances
            .iter()
            .find(|(_, instance)| instance.addresses.contains(address))
            .map(|(key, instance)| {
                let port = services
                    .get(&key.service)
                    .map_or((0, Reach::Address), |k| (k.service.port, k.service.reach));
                self.summoned(key, port, instance)
            })
    }

    fn handoff(&self, key: &InstanceKey) -> Option<revboot_deployer::Handoff> {
        lock(&self.handoffs).get(&key.service).cloned()
    }

    fn activity(&self, key: &InstanceKey, activity: Activity) {
        let mut state = lock(&self.state);
        if activity == Activity::Query {
            *state.queries.entry(key.clone()).or_default() += 1;
        }
        if let Some(instance) = state.instances.get_mut(key) {
            instance.last_activity = Instant::now();
            match activity {
                Activity::ConnectionOpened => instance.open += 1,
                Activity::ConnectionClosed => instance.open = instance.open.saturating_sub(1),
                Activity::Query => {}
            }
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

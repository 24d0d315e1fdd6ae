//! A fake deployer for unit tests: real TCP backends that start after a delay.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use revboot_deployer::{
    Activity, InstanceKey, InstanceState, Instances, ResolveError, Resolved, SummonError, Summoned,
};
use revboot_store::Revision;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// The client port every fake instance is reached on.
pub(crate) const PORT: u16 = 8080;

/// A loopback address no other test process uses at the same time (derived from the pid).
pub(crate) fn unique_ip() -> IpAddr {
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

/// A revision for tests.
pub(crate) fn revision() -> Revision {
    "0123456789abcdef0123456789abcdef01234567"
        .parse()
        .expect("a full hex id")
}

/// How the fake boots.
#[derive(Debug, Clone)]
pub(crate) struct Behaviour {
    pub(crate) boot_delay: Duration,
    pub(crate) boot_timeout: Duration,
    /// The boot ends in `Crashed` instead of `Ready`.
    pub(crate) fail: bool,
    /// The instance is stopped after this long with no open connection.
    pub(crate) idle_timeout: Duration,
}

impl Default for Behaviour {
    fn default() -> Behaviour {
        Behaviour {
            boot_delay: Duration::from_millis(300),
            boot_timeout: Duration::from_secs(10),
            fail: false,
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug)]
struct Instance {
    address: IpAddr,
    backend: SocketAddr,
    state: watch::Sender<InstanceState>,
    open: usize,
    last_activity: Instant,
}

#[derive(Debug, Default)]
struct State {
    instances: HashMap<InstanceKey, Instance>,
    boots: HashMap<InstanceKey, usize>,
}

/// A fake deployer. Each summon of a cold or final instance reserves a backend port on a
/// fresh address (or the instance's old one), then after `boot_delay` starts a real HTTP/1.0
/// style server there and reports `Ready` (or `Crashed`).
#[derive(Debug)]
pub(crate) struct Fake {
    behaviour: Behaviour,
    state: Mutex<State>,
}

impl Fake {
    pub(crate) fn new(behaviour: Behaviour) -> Arc<Fake> {
        let fake = Arc::new(Fake {
            behaviour,
            state: Mutex::new(State::default()),
        });
        tokio::spawn(reaping(Arc::downgrade(&fake)));
        fake
    }

    pub(crate) fn boots(&self, key: &InstanceKey) -> usize {
        let state = self.state.lock().expect("fake lock");
        state.boots.get(key).copied().unwrap_or(0)
    }

    pub(crate) fn open(&self, key: &InstanceKey) -> usize {
        let state = self.state.lock().expect("fake lock");
        state.instances.get(key).map_or(0, |instance| instance.open)
    }

    pub(crate) fn state(&self, key: &InstanceKey) -> Option<InstanceState> {
        let state = self.state.lock().expect("fake lock");
        let instance = state.instances.get(key)?;
        Some(instance.state.borrow().clone())
    }

    /// Forgets an instance and its address, as a deployer releasing it does.
    pub(crate) fn release(&self, key: &InstanceKey) {
        let mut state = self.state.lock().expect("fake lock");
        if let Some(instance) = state.instances.remove(key) {
            instance.state.send_replace(InstanceState::Stopped);
        }
    }

    fn summoned(&self, key: &InstanceKey, instance: &Instance) -> Summoned {
        Summoned {
            key: key.clone(),
            address: instance.address,
            port: PORT,
            backend: instance.backend,
            boot_timeout: self.behaviour.boot_timeout,
            state: instance.state.subscribe(),
        }
    }
}

/// Stops instances idle past the idle timeout, as the deployer's reaper does.
async fn reaping(fake: std::sync::Weak<Fake>) {
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Some(fake) = fake.upgrade() else { return };
        let idle = fake.behaviour.idle_timeout;
        let state = fake.state.lock().expect("fake lock");
        for instance in state.instances.values() {
            let serving = instance.state.borrow().is_serving();
            if serving && instance.open == 0 && instance.last_activity.elapsed() > idle {
                instance.state.send_replace(InstanceState::Stopped);
            }
        }
    }
}

/// Answers one request per connection with the request line echoed, then closes; stops
/// accepting when the state leaves serving.
async fn serving(socket: TcpSocket, mut state: watch::Receiver<InstanceState>) {
    let listener = socket.listen(1024).expect("fake backend listens");
    // Wait for Ready first: the watch starts at Booting.
    let _ = state.wait_for(InstanceState::is_serving).await;
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
    fn resolve(&self, service: &str, _label: Option<&str>) -> Result<Resolved, ResolveError> {
        Ok(Resolved {
            service: service.to_owned(),
            revision: revision(),
            per_client: false,
            port: PORT,
        })
    }

    fn summon(
        &self,
        service: &str,
        revision: &Revision,
        client: Option<IpAddr>,
    ) -> Result<Summoned, SummonError> {
        let key = InstanceKey {
            service: service.to_owned(),
            revision: *revision,
            client,
        };
        let mut state = self.state.lock().expect("fake lock");
        if let Some(instance) = state.instances.get(&key)
            && !instance.state.borrow().is_final()
        {
            return Ok(self.summoned(&key, instance));
        }
        let address = state
            .instances
            .get(&key)
            .map_or_else(unique_ip, |instance| instance.address);
        let start = |reason: String| SummonError::Start {
            key: key.to_string(),
            reason,
        };
        let socket = TcpSocket::new_v4().map_err(|error| start(error.to_string()))?;
        socket
            .bind(SocketAddr::new(address, 0))
            .map_err(|error| start(error.to_string()))?;
        let backend = socket
            .local_addr()
            .map_err(|error| start(error.to_string()))?;
        let sender = watch::Sender::new(InstanceState::Booting);
        let booting = sender.clone();
        let behaviour = self.behaviour.clone();
        tokio::spawn(async move {
            tokio::time::sleep(behaviour.boot_delay).await;
            if behaviour.fail {
                booting.send_replace(InstanceState::Crashed {
                    reason: "exited with status 1".to_owned(),
                });
                return;
            }
            let server = tokio::spawn(serving(socket, booting.subscribe()));
            booting.send_replace(InstanceState::Ready);
            let _ = server.await;
        });
        *state.boots.entry(key.clone()).or_insert(0) += 1;
        let instance = Instance {
            address,
            backend,
            state: sender,
            open: 0,
            last_activity: Instant::now(),
        };
        let summoned = self.summoned(&key, &instance);
        state.instances.insert(key, instance);
        Ok(summoned)
    }

    fn by_address(&self, address: IpAddr) -> Option<Summoned> {
        let state = self.state.lock().expect("fake lock");
        state
            .instances
            .iter()
            .find(|(_, instance)| instance.address == address)
            .map(|(key, instance)| self.summoned(key, instance))
    }

    fn activity(&self, key: &InstanceKey, activity: Activity) {
        let mut state = self.state.lock().expect("fake lock");
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
        0
    }
}

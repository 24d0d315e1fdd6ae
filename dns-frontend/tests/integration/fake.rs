//! A fake deployer: services and revisions in memory, instances that are only addresses and a
//! state watch. It counts what the DNS server asks of it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use revboot_deployer::{
    Activity, InstanceKey, InstanceState, Instances, ResolveError, Resolved, SummonError, Summoned,
};
use revboot_store::Revision;
use tokio::sync::watch;

/// One revision of a fake service.
#[derive(Debug, Clone)]
pub struct FakeRevision {
    pub revision: Revision,
    pub tags: Vec<String>,
    pub bootable: bool,
}

#[derive(Debug, Default, Clone)]
pub struct FakeService {
    pub per_client: bool,
    pub port: u16,
    pub revisions: Vec<FakeRevision>,
    pub live: Option<Revision>,
}

struct Instance {
    address: IpAddr,
    state: watch::Sender<InstanceState>,
}

/// What the fake does when summoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// Instances are ready as soon as they are summoned.
    Instant,
    /// Instances stay booting until [`Fake::set_state`].
    Manual,
}

pub struct Fake {
    services: Mutex<HashMap<String, FakeService>>,
    /// Hex of each service's revisions, in order (so that resolving does not format).
    hexes: Mutex<HashMap<String, Vec<String>>>,
    instances: Mutex<HashMap<InstanceKey, Instance>>,
    pub cap: usize,
    pub boot: Boot,
    pub v6: bool,
    /// The boot timeout summons report (bounds a delayed answer's wait).
    pub boot_timeout: Duration,
    generation: AtomicU64,
    pub summons: AtomicU64,
    pub resolves: AtomicU64,
    activity: Mutex<HashMap<InstanceKey, u64>>,
}

/// A revision id made from a small number (distinct, deterministic, valid hex).
pub fn revision(n: u64) -> Revision {
    format!("{:016x}{n:024x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .parse()
        .expect("40 hex digits")
}

impl Fake {
    fn summon_now(
        &self,
        service: &str,
        revision: &Revision,
        client: Option<IpAddr>,
    ) -> Result<Summoned, SummonError> {
        let port = {
            let services = self.services.lock().expect("fake lock");
            let s = services
                .get(service)
                .ok_or_else(|| ResolveError::UnknownService(service.to_owned()))?;
            if s.per_client && client.is_none() {
                return Err(SummonError::ClientRequired {
                    service: service.to_owned(),
                });
            }
            s.port
        };
        let key = InstanceKey {
            service: service.to_owned(),
            revision: *revision,
            client,
        };
        let mut instances = self.instances.lock().expect("fake lock");
        let reusable = instances
            .get(&key)
            .is_some_and(|i| !i.state.borrow().is_final());
        if !reusable {
            let running = instances
                .values()
                .filter(|i| !i.state.borrow().is_final())
                .count();
            if running >= self.cap {
                return Err(SummonError::GlobalCap { limit: self.cap });
            }
            let n = instances.len() as u32 + 1;
            let address = if self.v6 {
                IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, n as u16])
            } else {
                IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 100, 0, 0)) + n))
            };
            let initial = match self.boot {
                Boot::Instant => InstanceState::Ready,
                Boot::Manual => InstanceState::Booting,
            };
            let (state, _) = watch::channel(initial);
            instances.insert(key.clone(), Instance { address, state });
        }
        let instance = instances.get(&key).expect("just inserted");
        Ok(Summoned {
            key: key.clone(),
            address: instance.address,
            port,
            backend: SocketAddr::new(instance.address, port),
            boot_timeout: self.boot_timeout,
            state: instance.state.subscribe(),
        })
    }

    pub fn new(cap: usize, boot: Boot) -> Fake {
        Fake {
            services: Mutex::new(HashMap::new()),
            hexes: Mutex::new(HashMap::new()),
            instances: Mutex::new(HashMap::new()),
            cap,
            boot,
            v6: false,
            boot_timeout: Duration::from_secs(5),
            generation: AtomicU64::new(1),
            summons: AtomicU64::new(0),
            resolves: AtomicU64::new(0),
            activity: Mutex::new(HashMap::new()),
        }
    }

    pub fn add_service(&self, name: &str, service: FakeService) {
        let hexes = service
            .revisions
            .iter()
            .map(|r| r.revision.to_hex())
            .collect();
        self.hexes
            .lock()
            .expect("fake lock")
            .insert(name.to_owned(), hexes);
        self.services
            .lock()
            .expect("fake lock")
            .insert(name.to_owned(), service);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn set_live(&self, name: &str, to: Revision) {
        if let Some(service) = self.services.lock().expect("fake lock").get_mut(name) {
            service.live = Some(to);
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn running(&self) -> usize {
        self.instances
            .lock()
            .expect("fake lock")
            .values()
            .filter(|i| !i.state.borrow().is_final())
            .count()
    }

    pub fn set_state(&self, key: &InstanceKey, state: InstanceState) {
        if let Some(instance) = self.instances.lock().expect("fake lock").get(key) {
            instance.state.send_replace(state);
        }
    }

    pub fn keys(&self) -> Vec<InstanceKey> {
        self.instances
            .lock()
            .expect("fake lock")
            .keys()
            .cloned()
            .collect()
    }

    pub fn activity_of(&self, key: &InstanceKey) -> u64 {
        self.activity
            .lock()
            .expect("fake lock")
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

impl Instances for Fake {
    fn resolve(&self, service: &str, label: Option<&str>) -> Result<Resolved, ResolveError> {
        self.resolves.fetch_add(1, Ordering::Relaxed);
        let services = self.services.lock().expect("fake lock");
        let s = services
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
                let hexes = self.hexes.lock().expect("fake lock");
                let hexes = hexes.get(service).map(Vec::as_slice).unwrap_or_default();
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
        let _ = address;
        None
    }

    fn activity(&self, key: &InstanceKey, activity: Activity) {
        if activity == Activity::Query {
            *self
                .activity
                .lock()
                .expect("fake lock")
                .entry(key.clone())
                .or_default() += 1;
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

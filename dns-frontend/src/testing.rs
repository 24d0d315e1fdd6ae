//! What the unit tests of this crate share: a stand-in for the deployer and a checked
//! configuration.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use revboot_deployer::{
    Activity, InstanceKey, InstanceState, Instances, ResolveError, Resolved, SummonError, Summoned,
};
use revboot_store::Revision;
use tokio::sync::watch;

use crate::config::{Checked, DnsConfig};

/// The default configuration (Client Subnet trusted or not), checked.
pub(crate) fn config(trust_ecs: bool) -> (DnsConfig, Checked) {
    let config = DnsConfig {
        trust_ecs,
        ..DnsConfig::default()
    };
    let checked = config
        .check(SocketAddr::from(([127, 0, 0, 1], 53)))
        .expect("valid config");
    (config, checked)
}

/// One service, `hello`, whose every label resolves to one revision.
pub(crate) struct One {
    pub revision: Revision,
    pub state: watch::Sender<InstanceState>,
}

impl Instances for One {
    fn resolve(&self, service: &str, _: Option<&str>) -> Result<Resolved, ResolveError> {
        if service != "hello" {
            return Err(ResolveError::UnknownService(service.to_owned()));
        }
        Ok(Resolved {
            service: service.to_owned(),
            revision: self.revision,
            per_client: false,
            port: 8080,
        })
    }

    fn summon(
        &self,
        service: &str,
        revision: &Revision,
        client: Option<IpAddr>,
    ) -> Result<Summoned, SummonError> {
        let address = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));
        Ok(Summoned {
            key: InstanceKey {
                service: service.to_owned(),
                revision: *revision,
                client,
            },
            address,
            port: 8080,
            backend: SocketAddr::new(address, 8080),
            boot_timeout: Duration::from_secs(1),
            state: self.state.subscribe(),
        })
    }

    fn by_address(&self, _: IpAddr) -> Option<Summoned> {
        None
    }

    fn activity(&self, _: &InstanceKey, _: Activity) {}

    fn generation(&self) -> u64 {
        1
    }
}

impl One {
    /// A ready instance of one fixed revision.
    pub(crate) fn ready() -> One {
        One {
            revision: "0123456789abcdef0123456789abcdef01234567"
                .parse()
                .expect("revision"),
            state: watch::channel(InstanceState::Ready).0,
        }
    }
}

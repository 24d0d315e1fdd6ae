//! What the unit tests of this crate share: a checked configuration and the deployer's
//! stand-in with one service.

use std::net::SocketAddr;
use std::sync::Arc;

use revboot_testkit::instances::{Behaviour, Fake, FakeService, revision};

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

/// One service, `hello` on port 8080, whose one revision is live and tagged `abcdef1`;
/// its instances are ready at once.
pub(crate) fn hello() -> Arc<Fake> {
    let fake = Fake::new(Behaviour::default());
    let mut service = FakeService::one(8080, revision(1));
    service.revisions[0].tags.push("abcdef1".to_owned());
    fake.add_service("hello", service);
    fake
}

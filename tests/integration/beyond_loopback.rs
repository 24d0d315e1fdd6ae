//! Serving beyond loopback, between two network namespaces the test makes: a "server" one
//! where `revboot serve` runs with pools of documentation prefixes (IPv6 and IPv4) it makes
//! local itself, and a "client" one joined to it by a veth pair, where **unbound** resolves
//! the zone through a stub zone pointing at revboot's DNS, as a resolver of a real network
//! would after a delegation. Nothing here touches the host's own network.

use std::path::Path;
use std::process::{Child, Output, Stdio};

use revboot_testkit::netns::Netns;

use crate::support::{
    Daemon, Setup, eventually, example_source, git, hello_source, push, push_service,
};

const ZONE: &str = "example.com";
/// The server's end of the veth pair: revboot's DNS listens here.
const SERVER: &str = "2001:db8:ff::1";
/// The client's addresses: each one a client of its own (`client_prefixes.ipv6 = 128`).
const CLIENTS: [&str; 3] = ["2001:db8:ff::2", "2001:db8:ff::3", "2001:db8:ff::4"];
const POOL_V6: &str = "2001:db8:1::/64";
const POOL_V4: &str = "203.0.113.16/28";

/// The two namespaces, joined, with routes to the pools through the server.
struct Network {
    server: Netns,
    client: Netns,
}

impl Network {
    fn new() -> Network {
        let server = Netns::new();
        let client = Netns::new();
        server.veth("rb-server", &client, "rb-client");
        server.add_address("rb-server", &format!("{SERVER}/64"));
        server.add_address("rb-server", "192.0.2.1/24");
        for address in CLIENTS {
            client.add_address("rb-client", &format!("{address}/64"));
        }
        client.add_address("rb-client", "192.0.2.2/24");
        client.add_route(POOL_V6, SERVER);
        client.add_route(POOL_V4, "192.0.2.1");
        Network { server, client }
    }

    /// Runs `program` in the client namespace; its output, whatever its exit status.
    fn client_run(&self, program: &str, args: &[&str]) -> Output {
        self.client
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run in the client namespace")
    }
}

/// unbound in the client namespace on 127.0.0.1:53 and on the client's first address, the
/// zone a stub zone of revboot's DNS; killed on drop.
struct Unbound {
    child: Child,
}

/// What unbound adds for per-client services: EDNS Client Subnet towards revboot, the
/// client's whole address (unbound's subnet cache module).
const ECS: &str = "\x20 module-config: \"subnetcache iterator\"\n\
                   \x20 send-client-subnet: 2001:db8:ff::1\n\
                   \x20 client-subnet-always-forward: yes\n\
                   \x20 max-client-subnet-ipv6: 128\n\
                   \x20 max-client-subnet-ipv4: 32\n";

impl Unbound {
    /// `modules`: the `server:` lines that choose unbound's modules (empty: the iterator
    /// alone).
    fn start(network: &Network, dir: &Path, modules: &str) -> Unbound {
        let config = dir.join("unbound.conf");
        std::fs::write(
            &config,
            format!(
                "server:\n\
                 \x20 interface: 127.0.0.1\n\
                 \x20 interface: {client}\n\
                 \x20 port: 53\n\
                 \x20 access-control: 127.0.0.0/8 allow\n\
                 \x20 access-control: 2001:db8:ff::/64 allow\n\
                 \x20 username: \"\"\n\
                 \x20 chroot: \"\"\n\
                 \x20 directory: \"{dir}\"\n\
                 \x20 pidfile: \"{dir}/unbound.pid\"\n\
                 \x20 do-daemonize: no\n\
                 \x20 use-syslog: no\n\
                 \x20 logfile: \"\"\n\
                 \x20 verbosity: 1\n\
                 \x20 num-threads: 1\n\
                 \x20 so-reuseport: no\n\
                 {modules}\
                 \x20 do-ip6: yes\n\
                 \x20 qname-minimisation: no\n\
                 \x20 # Random letter case in every query: answers must echo it.\n\
                 \x20 use-caps-for-id: yes\n\
                 stub-zone:\n\
                 \x20 name: \"{ZONE}\"\n\
                 \x20 stub-addr: {SERVER}@53\n\
                 remote-control:\n\
                 \x20 control-enable: no\n",
                dir = dir.display(),
                client = CLIENTS[0],
                modules = if modules.is_empty() {
                    "\x20 module-config: \"iterator\"\n"
                } else {
                    modules
                },
            ),
        )
        .expect("write unbound.conf");
        let child = network
            .client
            .command("unbound")
            .args(["-d", "-c"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("unbound.log")).expect("unbound log"))
            .spawn()
            .expect("start unbound");
        Unbound { child }
    }
}

impl Unbound {
    /// unbound with the iterator alone, once it answers: the apex's SOA through the stub
    /// zone.
    fn answering(network: &Network, dir: &Path) -> Unbound {
        let unbound = Unbound::start(network, dir, "");
        assert!(
            eventually(|| !resolve(network, ZONE, "SOA").is_empty()),
            "unbound never answered; its log:\n{}",
            std::fs::read_to_string(dir.join("unbound.log")).unwrap_or_default()
        );
        unbound
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts revboot in the server namespace, DNS on port 53 of the server's veth address, the
/// zone's one name server; `dns`: more `[dns]` settings; `more`: more tables.
fn start(network: &Network, data: &Path, pools: &[&str], dns: &str, more: &str) -> Daemon {
    let config = format!(
        "zone = \"{ZONE}\"\n\
         [dns]\n\
         {dns}\
         nameservers = [{{ name = \"ns1.{ZONE}\", addresses = [\"{SERVER}\", \"192.0.2.1\"] }}]\n\
         [instances]\n\
         idle_timeout_ms = 600000\n\
         client_prefixes = {{ ipv6 = 128 }}\n\
         {more}"
    );
    Daemon::start_setup(
        data,
        &Setup {
            config: &config,
            netns: Some(&network.server),
            pools,
            dns: Some(format!("[{SERVER}]:53").parse().expect("dns address")),
            ..Setup::default()
        },
    )
}

/// `dig` through unbound in the client namespace: the addresses of the answer.
fn resolve(network: &Network, name: &str, kind: &str) -> Vec<String> {
    resolve_at(network, "127.0.0.1", name, kind)
}

/// `dig` to `server` in the client namespace: the addresses of the answer.
fn resolve_at(network: &Network, server: &str, name: &str, kind: &str) -> Vec<String> {
    let server = format!("@{server}");
    let output = network.client_run(
        "dig",
        &[&server, "+short", "+time=10", "+tries=1", name, kind],
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.starts_with(';') && !line.is_empty())
        .map(str::to_owned)
        .collect()
}

/// GET / of `url` from the client namespace, from `source` if given; the body, or `None`
/// when the connection fails.
fn get(network: &Network, source: Option<&str>, url: &str) -> Option<String> {
    let mut args = vec!["-sS", "--fail", "--max-time", "30"];
    if let Some(source) = source {
        args.extend(["--interface", source]);
    }
    args.push(url);
    curl_body(network, &args)
}

/// `curl` with `args` from the client namespace: the body, or `None` when it fails.
fn curl_body(network: &Network, args: &[&str]) -> Option<String> {
    let output = network.client_run("curl", args);
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn url(address: &str) -> String {
    if address.contains(':') {
        format!("http://[{address}]:8080/")
    } else {
        format!("http://{address}:8080/")
    }
}

fn inside(address: &str, pool: &str) -> bool {
    let prefix: revboot_deployer::config::Prefix = pool.parse().expect("a pool");
    address
        .parse()
        .is_ok_and(|address: std::net::IpAddr| prefix.contains(address))
}

/// The routes of `server`'s local table, as `ip` prints them.
fn local_routes(network: &Network, family: &str) -> String {
    let output = network
        .server
        .command("ip")
        .args([family, "route", "show", "table", "local"])
        .output()
        .expect("ip route");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_client_network_resolves_through_unbound_and_reaches_revisions_over_ipv6() {
    let network = Network::new();
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("data");
    let daemon = start(&network, &data, &[POOL_V6, POOL_V4], "", "");
    // Neither pool was local: revboot added a route for each, and says so.
    let log = daemon.log();
    assert!(log.contains(&format!("pool={POOL_V6}")), "{log}");
    assert!(log.contains("made local"), "{log}");
    assert!(local_routes(&network, "-6").contains(&format!("local {POOL_V6} dev lo")));
    assert!(local_routes(&network, "-4").contains(&format!("local {POOL_V4} dev lo")));

    let work = hello_source(temp.path());
    assert!(push(&daemon, &work).contains("succeeded"));
    let unbound = Unbound::answering(&network, temp.path());

    assert_eq!(resolve(&network, ZONE, "NS"), [format!("ns1.{ZONE}.")]);

    // AAAA through the resolver: an address of the IPv6 pool, where the live revision
    // answers; A: one of the IPv4 pool, the same instance.
    let name = format!("hello.{ZONE}");
    let v6 = resolve(&network, &name, "AAAA");
    assert_eq!(v6.len(), 1, "{v6:?}");
    assert!(inside(&v6[0], POOL_V6), "{v6:?}");
    let body = get(&network, None, &url(&v6[0])).expect("GET over IPv6");
    assert!(body.starts_with("hello from v1"), "{body}");
    let v4 = resolve(&network, &name, "A");
    assert_eq!(v4.len(), 1, "{v4:?}");
    assert!(inside(&v4[0], POOL_V4), "{v4:?}");
    assert!(get(&network, None, &url(&v4[0])).is_some_and(|b| b.starts_with("hello from v1")));

    // A second revision by its own name, booted on the query.
    crate::support::commit_revision(&work, "v2", "hi");
    assert!(push(&daemon, &work).contains("succeeded"));
    let commit = String::from_utf8_lossy(&git(&work, &["rev-parse", "--short=7", "HEAD"]).stdout)
        .trim()
        .to_owned();
    let v2 = resolve(&network, &format!("{commit}.hello.{ZONE}"), "AAAA");
    assert_eq!(v2.len(), 1, "{v2:?}");
    assert!(inside(&v2[0], POOL_V6) && v2 != v6, "{v2:?} {v6:?}");
    let body = get(&network, None, &url(&v2[0])).expect("GET of v2 over IPv6");
    assert!(body.starts_with("hi from v2"), "{body}");
    // The negative answer carries the SOA, through the resolver too.
    let output = network.client_run(
        "dig",
        &["@127.0.0.1", &format!("nope.hello.{ZONE}"), "AAAA"],
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("status: NXDOMAIN"), "{text}");
    assert!(text.contains("SOA"), "{text}");
    drop(unbound);

    // Killed outright, revboot leaves its routes; started again, it adopts them, and
    // stopped, it takes them away.
    daemon.kill();
    assert!(local_routes(&network, "-6").contains(POOL_V6));
    let daemon = start(&network, &data, &[POOL_V6, POOL_V4], "", "");
    assert!(daemon.log().contains("adopted"), "{}", daemon.log());
    daemon.stop();
    assert!(!local_routes(&network, "-6").contains(POOL_V6));
    assert!(!local_routes(&network, "-4").contains(POOL_V4));
}

#[test]
fn three_clients_get_gatekeepers_of_their_own_and_cannot_reach_each_others() {
    let network = Network::new();
    let temp = tempfile::tempdir().expect("temp dir");
    // The resolver is trusted with the clients' addresses (EDNS Client Subnet).
    let daemon = start(
        &network,
        &temp.path().join("data"),
        &[POOL_V6],
        "trust_ecs = true\n",
        "",
    );
    let work = hello_source(temp.path());
    let manifest = work.join("revboot.toml");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(&manifest, format!("{text}per_client = true\n")).expect("write manifest");
    git(&work, &["commit", "-q", "-am", "hello per client"]);
    assert!(push_service(&daemon, &work, "mine").contains("succeeded"));

    // Each client asks unbound, which tells revboot who asks (EDNS Client Subnet).
    let _unbound = Unbound::start(&network, temp.path(), ECS);
    let name = format!("mine.{ZONE}");
    let ask = |client: &str| {
        let output = network.client_run(
            "dig",
            &[
                "-b",
                client,
                &format!("@{}", CLIENTS[0]),
                "+short",
                "+time=10",
                &name,
                "AAAA",
            ],
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    assert!(
        eventually(|| inside(&ask(CLIENTS[0]), POOL_V6)),
        "unbound never answered; its log:\n{}",
        std::fs::read_to_string(temp.path().join("unbound.log")).unwrap_or_default()
    );
    let addresses: Vec<String> = CLIENTS
        .iter()
        .map(|client| {
            let answer = ask(client);
            assert!(inside(&answer, POOL_V6), "{client}: {answer:?}");
            answer
        })
        .collect();
    let mut distinct = addresses.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{addresses:?}");

    for (client, address) in CLIENTS.iter().zip(&addresses) {
        let body = get(&network, Some(client), &url(address)).expect("own gatekeeper");
        assert!(body.starts_with("hello from v1"), "{client}: {body}");
    }
    // Nobody reaches another client's gatekeeper.
    for (i, client) in CLIENTS.iter().enumerate() {
        for (j, address) in addresses.iter().enumerate() {
            if i != j {
                assert_eq!(
                    get(&network, Some(client), &url(address)),
                    None,
                    "{client} reached {}'s instance at {address}",
                    CLIENTS[j]
                );
            }
        }
    }
    let instances = daemon.instances();
    let mut clients: Vec<&str> = instances
        .iter()
        .filter_map(|instance| instance["client"].as_str())
        .collect();
    clients.sort_unstable();
    assert_eq!(clients, CLIENTS, "{instances:?}");
}

/// The front door's address in the server namespace: one IPv4 address for every name.
const FRONT: &str = "192.0.2.1";

/// `curl` from the client namespace of `scheme://name/`, `name` resolved to the front door
/// (its address as unbound answered it) on `port`; with `ca`, the certificate is checked
/// against it. The body, or `None` when the request fails.
fn get_front(
    network: &Network,
    scheme: &str,
    name: &str,
    port: u16,
    ca: Option<&Path>,
) -> Option<String> {
    let resolve = format!("{name}:{port}:{FRONT}");
    let url = format!("{scheme}://{name}:{port}/");
    let mut args = vec!["-sS", "--fail", "--max-time", "60", "--resolve", &resolve];
    let ca = ca.map(|ca| ca.display().to_string());
    if let Some(ca) = &ca {
        args.extend(["--cacert", ca]);
    }
    args.push(&url);
    curl_body(network, &args)
}

/// The short source commit of a working copy's HEAD.
fn head(work: &Path) -> String {
    String::from_utf8_lossy(&git(work, &["rev-parse", "--short=7", "HEAD"]).stdout)
        .trim()
        .to_owned()
}

/// Instances of `service` the daemon runs.
fn running(daemon: &Daemon, service: &str) -> usize {
    daemon
        .instances()
        .iter()
        .filter(|instance| instance["service"] == service)
        .count()
}

#[test]
fn the_front_door_routes_a_client_network_by_host_and_by_tls_server_name_booting_each_revision() {
    let network = Network::new();
    let temp = tempfile::tempdir().expect("temp dir");
    let front = format!("[front]\nhttp = \"{FRONT}:80\"\ntls = \"{FRONT}:443\"\n");
    let daemon = start(&network, &temp.path().join("data"), &[POOL_V4], "", &front);

    // hello, reached by the Host of its requests.
    let hello = hello_source(temp.path());
    crate::support::write_manifest(&hello, "reach = \"front\"\n");
    git(&hello, &["commit", "-q", "-am", "hello at the front door"]);
    assert!(push(&daemon, &hello).contains("succeeded"));
    // hello-tls ends TLS itself with a certificate of the test's CA, for every revision's
    // name; the front door passes its ClientHello through by server name. Two revisions.
    let tls = crate::support::example_source(temp.path(), "hello-tls");
    let v1 = head(&tls);
    assert!(push_service(&daemon, &tls, "hello-tls").contains("succeeded"));
    let main = tls.join("src/main.rs");
    let text = std::fs::read_to_string(&main).expect("main.rs");
    let text = text.replace(
        "const REVISION: &str = \"v1\";",
        "const REVISION: &str = \"v2\";",
    );
    std::fs::write(&main, text).expect("write main.rs");
    git(&tls, &["commit", "-q", "-am", "hello-tls v2"]);
    let v2 = head(&tls);
    assert!(push_service(&daemon, &tls, "hello-tls").contains("succeeded"));
    let ca = crate::https::TestCa::new(temp.path());
    let (cert, key) = (temp.path().join("tls.pem"), temp.path().join("tls.key"));
    ca.issue(&[&format!("*.hello-tls.{ZONE}")], (2020, 2100), &cert, &key);
    for (name, file) in [("TLS_CERT", &cert), ("TLS_KEY", &key)] {
        let pem = std::fs::read(file).expect("PEM");
        let set = daemon.cli_with_input(&["config", "set", "hello-tls", "--stdin", name], &pem);
        assert!(
            set.status.success(),
            "{}",
            String::from_utf8_lossy(&set.stderr)
        );
    }
    assert_eq!(
        running(&daemon, "hello-tls"),
        0,
        "booted before a client asked"
    );

    let _unbound = Unbound::answering(&network, temp.path());

    // By Host: the name resolves to the front door, which boots the live revision.
    let name = format!("hello.{ZONE}");
    assert_eq!(resolve(&network, &name, "A"), [FRONT]);
    let body = get_front(&network, "http", &name, 80, None).expect("GET by Host");
    assert!(body.starts_with("hello from v1"), "{body}");

    // By server name: each revision by its own name, booted on demand, its certificate
    // checked by the client against the test's CA.
    for (label, revision) in [(&v1, "v1"), (&v2, "v2")] {
        let name = format!("{label}.hello-tls.{ZONE}");
        assert_eq!(resolve(&network, &name, "A"), [FRONT], "{name}");
        let body = get_front(&network, "https", &name, 443, Some(&ca.pem))
            .unwrap_or_else(|| panic!("GET of {name} over TLS failed; log:\n{}", daemon.log()));
        assert!(
            body.starts_with(&format!("hello-tls from {revision} (")),
            "{name}: {body}"
        );
        assert!(body.trim_end().ends_with(&format!("for {name}")), "{body}");
    }
    assert_eq!(running(&daemon, "hello-tls"), 2);
    // A name no revision has: the TLS handshake fails with an alert, never a hang.
    let unknown = format!("nosuch.hello-tls.{ZONE}");
    assert_eq!(
        get_front(&network, "https", &unknown, 443, Some(&ca.pem)),
        None
    );
    let metrics = daemon.metrics();
    assert!(
        metrics.contains("revboot_proxy_connections_total{outcome=\"front_routed\"} 3"),
        "{metrics}"
    );
}

/// The deployment of `service` built from a source commit starting with `source`.
fn deployment_of(daemon: &Daemon, service: &str, source: &str) -> String {
    let output = daemon.cli(&["--json", "log", service]);
    let history: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).expect("JSON");
    history
        .iter()
        .find(|d| {
            d["source_commit"]
                .as_str()
                .is_some_and(|s| s.starts_with(source))
        })
        .and_then(|d| d["revision"].as_str())
        .unwrap_or_else(|| panic!("no deployment of {source}: {history:?}"))
        .to_owned()
}

#[test]
fn a_vm_revision_answers_aaaa_and_serves_a_client_network_over_ipv6_booted_on_demand() {
    let network = Network::new();
    let temp = tempfile::tempdir().expect("temp dir");
    // TCG, qemu's emulator, whatever the host has: hardware virtualisation is not assumed.
    let tcg = "qemu_accel = \"tcg\"\n";
    let daemon = start(
        &network,
        &temp.path().join("data"),
        &[POOL_V6, POOL_V4],
        "",
        tcg,
    );
    // Two revisions of hello-vm in one push: one that asks for IPv6 alone, then (live) one
    // on every family there is a pool of.
    let work = example_source(temp.path(), "hello-vm");
    let manifest = work.join("revboot.toml");
    let both = std::fs::read_to_string(&manifest).expect("revboot.toml");
    std::fs::write(&manifest, format!("{both}families = [\"ipv6\"]\n")).expect("write");
    git(&work, &["commit", "-q", "-am", "hello-vm on IPv6 alone"]);
    let v6_only = head(&work);
    std::fs::write(&manifest, both).expect("write revboot.toml");
    git(&work, &["commit", "-q", "-am", "hello-vm on both families"]);
    let dual = head(&work);
    let pushed = push_service(&daemon, &work, "hello-vm");
    assert!(pushed.contains("succeeded"), "{pushed}");
    let unbound = Unbound::answering(&network, temp.path());

    // IPv6 alone: AAAA through the resolver is an address of the IPv6 pool, and no A; the
    // VM boots on that query and answers over IPv6 (the proxy brings the connection to
    // qemu's port forward, on loopback).
    let name = format!("{v6_only}.hello-vm.{ZONE}");
    let v6 = resolve(&network, &name, "AAAA");
    assert_eq!(v6.len(), 1, "{v6:?}");
    assert!(inside(&v6[0], POOL_V6), "{v6:?}");
    assert_eq!(resolve(&network, &name, "A"), Vec::<String>::new());
    let body = get(&network, None, &url(&v6[0])).expect("GET of the VM over IPv6");
    let deployment = deployment_of(&daemon, "hello-vm", &v6_only);
    assert_eq!(body.trim(), format!("hello from v1 ({deployment})"));
    // Stopped, it is restored from the snapshot its boot saved, into a qemu whose forward
    // is on loopback too, on the next query (straight to revboot: unbound keeps the
    // answer for its TTL).
    let stopped = daemon.cli(&["stop", "hello-vm", &deployment]);
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(eventually(|| running(&daemon, "hello-vm") == 0));
    let v6 = resolve_at(&network, SERVER, &name, "AAAA");
    assert!(v6.len() == 1 && inside(&v6[0], POOL_V6), "{v6:?}");
    let body = get(&network, None, &url(&v6[0])).expect("GET of the restored VM");
    assert_eq!(body.trim(), format!("hello from v1 ({deployment})"));
    assert!(daemon.log().contains("restored from its snapshot"));

    // Both families: one instance at an address of each pool, reached over each.
    let name = format!("hello-vm.{ZONE}");
    let deployment = deployment_of(&daemon, "hello-vm", &dual);
    let v6 = resolve(&network, &name, "AAAA");
    assert!(v6.len() == 1 && inside(&v6[0], POOL_V6), "{v6:?}");
    let v4 = resolve(&network, &name, "A");
    assert!(v4.len() == 1 && inside(&v4[0], POOL_V4), "{v4:?}");
    for address in [&v6[0], &v4[0]] {
        let body = get(&network, None, &url(address)).expect("GET of the VM");
        assert_eq!(body.trim(), format!("hello from v1 ({deployment})"));
    }
    assert_eq!(running(&daemon, "hello-vm"), 2);
    drop(unbound);
}

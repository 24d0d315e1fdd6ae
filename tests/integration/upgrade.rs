//! `revboot upgrade`: the daemon executes a new binary in place, its instances and their
//! connections untouched; `kill -9` after it still leaves nothing behind.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::support::{
    Daemon, PATIENCE, Setup, curl, dig_ok, eventually, example_source, hello_source, push,
    push_service,
};

const ZONE: &str = "revboot.test";

/// One HTTP/1.1 exchange with `host` on `stream` (hello closes after answering); the
/// answer.
fn exchange(mut stream: TcpStream, host: &str) -> std::io::Result<String> {
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_write_timeout(Some(PATIENCE))?;
    let request = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Requests to hello, each on a new connection, one after the other until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Load {
    /// Starts the requests to `target` for `host`, and waits until one was served.
    fn start(target: SocketAddr, host: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let thread = {
            let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
            let host = host.to_owned();
            std::thread::spawn(move || {
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let answer = TcpStream::connect_timeout(&target, PATIENCE)
                        .and_then(|stream| exchange(stream, &host));
                    match answer {
                        Ok(text) if text.contains("hello from v1") => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.push(format!("{other:?}"));
                        }
                    }
                }
                errors
            })
        };
        let load = Load {
            stop,
            served,
            failed,
            thread,
        };
        assert!(eventually(|| load.served() > 0));
        load
    }

    /// Requests served so far.
    fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Waits for a few more requests served, stops, and asserts that none failed.
    fn finish(self) {
        let served = self.served();
        assert!(eventually(|| self.served() > served + 5));
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.thread.join().expect("the load thread");
        assert_eq!(
            self.failed.load(Ordering::Relaxed),
            0,
            "failed requests: {errors:?}"
        );
    }
}

/// A connection to `target` with half a request sent, answered once [`finish`]ed.
fn half_request(target: SocketAddr) -> TcpStream {
    let mut established = TcpStream::connect_timeout(&target, PATIENCE).expect("connect");
    established
        .write_all(b"GET / HTTP/1.1\r\n")
        .expect("half a request");
    established
}

/// Sends the rest of a [`half_request`]; the answer.
fn finish(mut established: TcpStream) -> String {
    established
        .write_all(b"host: hello\r\nconnection: close\r\n\r\n")
        .expect("the rest of the request");
    established
        .set_read_timeout(Some(PATIENCE))
        .expect("timeout");
    let mut answer = String::new();
    established
        .read_to_string(&mut answer)
        .expect("the established connection is answered");
    answer
}

/// A daemon started from a copy of the binary, and the path of that copy.
pub(crate) fn upgradable(temp: &Path, config: &str) -> (Daemon, PathBuf) {
    let binary = temp.join("revboot");
    std::fs::copy(env!("CARGO_BIN_EXE_revboot"), &binary).expect("copy the binary");
    let daemon = Daemon::start_setup(
        &temp.join("data"),
        &Setup {
            binary: Some(&binary),
            config,
            ..Setup::default()
        },
    );
    (daemon, binary)
}

/// Replaces the daemon's binary file by a new copy (a rename, as a package manager does:
/// the running file stays intact).
pub(crate) fn replace_binary(binary: &Path) {
    let new_binary = binary.with_extension("new");
    std::fs::copy(env!("CARGO_BIN_EXE_revboot"), &new_binary).expect("copy the binary");
    std::fs::rename(&new_binary, binary).expect("replace the binary");
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rfind(')')
                .map(|i| !stat[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The children of `parent` that ended and were not reaped.
fn zombies_of(parent: u32) -> Vec<String> {
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(end) = stat.rfind(')') else { continue };
        let mut fields = stat[end + 1..].split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if state == Some("Z") && ppid == Some(parent.to_string().as_str()) {
            zombies.push(stat[..end + 1].to_owned());
        }
    }
    zombies
}

/// The cgroup directories of a process, for the controllers revboot limits.
fn cgroups_of(pid: u64) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read its cgroups");
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let root = Path::new("/sys/fs/cgroup");
            match controllers {
                "" => Some(root.join("unified").join(path.trim_start_matches('/'))),
                "memory" | "pids" | "cpu" => {
                    Some(root.join(controllers).join(path.trim_start_matches('/')))
                }
                _ => None,
            }
        })
        .filter(|dir| dir.components().count() > 5)
        .collect()
}

/// `revboot upgrade --json`: the daemon as it serves again.
pub(crate) fn upgrade(daemon: &Daemon) -> serde_json::Value {
    let upgraded = daemon.cli(&["--json", "upgrade"]);
    assert!(
        upgraded.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&upgraded.stdout),
        String::from_utf8_lossy(&upgraded.stderr)
    );
    serde_json::from_slice(&upgraded.stdout).expect("JSON")
}

/// The pid of each instance.
pub(crate) fn pids(daemon: &Daemon) -> Vec<u64> {
    daemon
        .instances()
        .iter()
        .filter_map(|i| i["pid"].as_u64())
        .collect()
}

#[test]
fn upgrade_in_place_keeps_instances_and_connections() {
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("data");
    // The daemon runs from a file of its own, replaced by the new binary before the upgrade.
    let (daemon, binary) = upgradable(temp.path(), "");
    let work = hello_source(temp.path());
    push(&daemon, &work);
    let live = format!("hello.{ZONE}");
    let address = dig_ok(&daemon, &live, false);
    assert!(curl(&live, &address, 8080).starts_with("hello from v1"));
    let before = pids(&daemon);
    assert_eq!(before.len(), 1, "{before:?}");
    let instance = before[0];
    let groups = cgroups_of(instance);
    let target: SocketAddr = format!("{address}:8080").parse().expect("address");

    // Requests all through an upgrade, each on a new connection.
    let load = Load::start(target, "hello");
    replace_binary(&binary);
    let view = upgrade(&daemon);
    assert_eq!(view["upgrades"], 1, "{view}");
    assert_eq!(
        view["pid"].as_u64(),
        Some(u64::from(daemon.pid())),
        "{view}"
    );
    assert_eq!(view["last_upgrade_instances"], 1, "{view}");
    // A few requests after the new program serves, then the load stops.
    load.finish();
    assert_eq!(pids(&daemon), before);

    // A connection established before a second upgrade, its request half sent, is answered
    // after it (hello serves one connection at a time: this one holds it meanwhile).
    let established = half_request(target);
    let view = upgrade(&daemon);
    assert_eq!(view["upgrades"], 2, "{view}");
    let answer = finish(established);
    assert!(answer.contains("hello from v1"), "{answer}");

    // The same instance serves, adopted by the new program; everything else works on.
    assert_eq!(pids(&daemon), before);
    assert_eq!(dig_ok(&daemon, &live, true), address);
    assert!(curl(&live, &address, 8080).starts_with("hello from v1"));
    let log = daemon.log();
    assert!(log.contains("upgraded in place"), "{log}");

    // kill -9 of the upgraded daemon: its instance dies with it, and the next start
    // leaves nothing of it.
    let (http, dns, pool) = (daemon.http.port(), daemon.dns.port(), daemon.pool.clone());
    daemon.kill();
    assert!(
        eventually(|| !alive(instance)),
        "the instance outlived the daemon"
    );
    let restarted = restart_clean(&data, (http, dns, &pool), &groups);
    assert!(curl(&live, &dig_ok(&restarted, &live, false), 8080).starts_with("hello from v1"));
}

/// Starts a daemon again on `data` after a `kill -9` (its HTTP and DNS ports and pool):
/// it runs no instance, and nothing is left of the killed one's (`groups`, scratch).
fn restart_clean(data: &Path, (http, dns, pool): (u16, u16, &str), groups: &[PathBuf]) -> Daemon {
    let restarted = Daemon::start_with(data, http, dns, pool);
    assert!(restarted.instances().is_empty());
    let left: Vec<&PathBuf> = groups.iter().filter(|dir| dir.exists()).collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
    let scratch = data.join("deployer/scratch");
    let scratch_left: Vec<_> = std::fs::read_dir(&scratch)
        .map(|dir| dir.flatten().map(|entry| entry.file_name()).collect())
        .unwrap_or_default();
    assert!(
        scratch_left.is_empty(),
        "scratch directories left: {scratch_left:?}"
    );
    restarted
}

/// Stops the live instance of hello-vm, whose pid is `pid`, and waits until it is gone.
fn stop_vm(daemon: &Daemon, pid: u64) {
    let stopped = daemon.cli(&["stop", "hello-vm"]);
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(eventually(|| !alive(pid)), "the VM did not stop");
    assert!(eventually(|| daemon.instances().is_empty()));
}

/// Serves hello-vm (`live`) once, restored, until the pool keeps a qemu waiting for a
/// snapshot again (it refills after each restore), then stops it.
fn restored_until_the_pool_refills(daemon: &Daemon, live: &str) {
    let waiting = || daemon.log().matches("a qemu waits for a snapshot").count();
    let before = waiting();
    let address = dig_ok(daemon, live, false);
    assert!(curl(live, &address, 8080).starts_with("hello from v1"));
    assert!(eventually(|| waiting() > before), "the pool did not refill");
    stop_vm(daemon, pids(daemon)[0]);
}

#[test]
fn upgrade_in_place_keeps_a_vm_booted_cold_and_one_restored_with_their_connections() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (daemon, binary) = upgradable(temp.path(), "[instances]\nqemu_pool = 1\n");
    let work = example_source(temp.path(), "hello-vm");
    let pushed = push_service(&daemon, &work, "hello-vm");
    assert!(pushed.contains("succeeded"), "{pushed}");
    let live = format!("hello-vm.{ZONE}");
    let address = dig_ok(&daemon, &live, false);
    assert!(curl(&live, &address, 8080).starts_with("hello from v1"));
    let cold = pids(&daemon);
    assert_eq!(cold.len(), 1, "{cold:?}");
    let target: SocketAddr = format!("{address}:8080").parse().expect("address");

    // A cold-booted VM: its pid, its cgroups, an established connection, its console.
    let established = half_request(target);
    replace_binary(&binary);
    let view = upgrade(&daemon);
    assert_eq!(view["last_upgrade_instances"], 1, "{view}");
    let answer = finish(established);
    assert!(answer.contains("hello from v1"), "{answer}");
    assert_eq!(pids(&daemon), cold);
    assert!(curl(&live, &address, 8080).starts_with("hello from v1"));
    let log = daemon.log();
    assert!(log.contains("qemu instance handed over"), "{log}");
    // The qemu processes that waited for a snapshot were killed and reaped, not left.
    assert!(
        eventually(|| zombies_of(daemon.pid()).is_empty()),
        "{:?}",
        zombies_of(daemon.pid())
    );

    // Stopped by the new program as any of its own.
    stop_vm(&daemon, cold[0]);

    // Restored from the snapshot the first boot saved, into a qemu started then; then, once
    // the pool keeps a qemu waiting with it loaded, into that one: a qemu with a scratch
    // directory and uid of its own, kept as well.
    restored_until_the_pool_refills(&daemon, &live);
    let address = dig_ok(&daemon, &live, false);
    // Answered once it is ready, when its pid is known.
    assert!(curl(&live, &address, 8080).starts_with("hello from v1"));
    let restored = pids(&daemon);
    assert_eq!(restored.len(), 1, "{restored:?}");
    let log = daemon.log();
    assert!(log.contains("loaded_ahead=true"), "{log}");
    let target: SocketAddr = format!("{address}:8080").parse().expect("address");
    let established = half_request(target);
    let view = upgrade(&daemon);
    assert_eq!(view["upgrades"], 2, "{view}");
    assert_eq!(view["last_upgrade_instances"], 1, "{view}");
    assert!(finish(established).contains("hello from v1"));
    assert_eq!(pids(&daemon), restored);
    assert!(curl(&live, &address, 8080).starts_with("hello from v1"));

    // A restore under way when the upgrade comes (the query starts it; the upgrade may find
    // it before or after its qemu runs): waited for, then handed over either way.
    stop_vm(&daemon, restored[0]);
    let address = dig_ok(&daemon, &live, false);
    let view = upgrade(&daemon);
    assert_eq!(view["upgrades"], 3, "{view}");
    assert_eq!(view["last_upgrade_instances"], 1, "{view}");
    assert!(curl(&live, &address, 8080).starts_with("hello from v1"));
    let restored = pids(&daemon);
    assert_eq!(restored.len(), 1, "{restored:?}");

    // An upgrade that hands no instance over while a qemu waits for a snapshot (the pool
    // refills after a restore): the old program stops that qemu, and the new one reaps it,
    // though it took nothing over; nothing else of the old program's is left either.
    stop_vm(&daemon, restored[0]);
    restored_until_the_pool_refills(&daemon, &live);
    let view = upgrade(&daemon);
    assert_eq!(view["upgrades"], 4, "{view}");
    assert_eq!(view["last_upgrade_instances"], 0, "{view}");
    assert!(
        eventually(|| zombies_of(daemon.pid()).is_empty()),
        "{:?}",
        zombies_of(daemon.pid())
    );
    let address = dig_ok(&daemon, &live, false);
    assert!(curl(&live, &address, 8080).starts_with("hello from v1"));
    let restored = pids(&daemon);
    assert_eq!(restored.len(), 1, "{restored:?}");
    let groups = cgroups_of(restored[0]);

    // kill -9 of the upgraded daemon: the VM dies with it; the next start leaves nothing.
    let (http, dns, pool) = (daemon.http.port(), daemon.dns.port(), daemon.pool.clone());
    let data = daemon.data.clone();
    daemon.kill();
    assert!(
        eventually(|| !alive(restored[0])),
        "the VM outlived the daemon"
    );
    restart_clean(&data, (http, dns, &pool), &groups);
}

/// An upgradable daemon with a front door and hello pushed, reached there only: the
/// daemon, its binary, the front door's address, hello's name.
fn hello_at_the_front_door(temp: &Path) -> (Daemon, PathBuf, SocketAddr, String) {
    let (daemon, binary) = upgradable(temp, "[front]\nhttp = \"127.0.0.1:0\"\n");
    let front = daemon.front("front_http=");
    let work = hello_source(temp);
    crate::support::write_manifest(&work, "reach = \"front\"\n");
    crate::support::git(&work, &["commit", "-q", "-am", "reached at the front door"]);
    push(&daemon, &work);
    (daemon, binary, front, format!("hello.{ZONE}"))
}

#[test]
fn upgrade_in_place_hands_the_front_door_over_on_its_port() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (daemon, binary, front, host) = hello_at_the_front_door(temp.path());
    assert!(crate::front_door::curl_front(&host, front).contains("hello from v1"));

    // Requests through the front door all through the upgrade: its listener is handed
    // over, never closed, so none is refused, and it keeps its port (0 was configured: a
    // listener bound anew would get another).
    let load = Load::start(front, &host);
    replace_binary(&binary);
    let view = upgrade(&daemon);
    assert_eq!(view["upgrades"], 1, "{view}");
    load.finish();
    let log = daemon.log();
    assert!(log.contains("front door handed over"), "{log}");
    let serving: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("revboot is serving"))
        .collect();
    assert_eq!(serving.len(), 2, "{log}");
    assert!(
        serving[1].contains(&format!("front_http={front}")),
        "{}",
        serving[1]
    );
    assert!(crate::front_door::curl_front(&host, front).contains("hello from v1"));
}

/// The pid, state and steered connections of the one instance.
fn booting(daemon: &Daemon) -> (Option<u64>, Option<String>, Option<u64>) {
    let instances = daemon.instances();
    let first = instances.first();
    (
        first.and_then(|i| i["pid"].as_u64()),
        first.map(|i| i["state"].to_string()),
        first.and_then(|i| i["steered"].as_u64()),
    )
}

fn is_booting(state: Option<&str>) -> bool {
    state.is_some_and(|s| s.contains("booting"))
}

/// Makes hello in `work` ready only once someone asks for /ready-now (its console probe),
/// within a boot timeout long enough for any test, and commits.
fn ready_on_request(work: &Path) {
    let manifest = work.join("revboot.toml");
    let text = std::fs::read_to_string(&manifest).expect("revboot.toml");
    let text = text.replace(
        "ready = { probe = \"socket\" }",
        "ready = { probe = \"console\", line = \"hello: GET /ready-now\" }\nboot_timeout_ms = 300000",
    );
    std::fs::write(&manifest, text).expect("write revboot.toml");
    crate::support::git(work, &["commit", "-q", "-am", "ready on request"]);
}

/// A daemon with `config` running hello, ready only once someone asks for /ready-now, and
/// summoned: booting until the test says so. The daemon, its binary, the live name, the
/// instance's address and pid.
fn booting_hello(temp: &Path, config: &str) -> (Daemon, PathBuf, String, String, Option<u64>) {
    let (daemon, binary) = upgradable(temp, config);
    let work = hello_source(temp);
    ready_on_request(&work);
    push(&daemon, &work);
    let live = format!("hello.{ZONE}");
    let address = dig_ok(&daemon, &live, false);
    let pid = booting_pid(&daemon);
    (daemon, binary, live, address, Some(pid))
}

/// The pid of the one instance, once it has one, still booting.
fn booting_pid(daemon: &Daemon) -> u64 {
    assert!(
        eventually(|| booting(daemon).0.is_some()),
        "{:?}",
        booting(daemon)
    );
    let (pid, state, _) = booting(daemon);
    assert!(is_booting(state.as_deref()), "{state:?}");
    pid.expect("its pid")
}

#[test]
fn upgrade_in_place_keeps_an_instance_still_booting_and_its_probe_goes_on() {
    let temp = tempfile::tempdir().expect("temp dir");
    // Direct: clients reach the instance's own socket, which exists from its start.
    let (daemon, binary, live, address, pid) =
        booting_hello(temp.path(), "[instances]\ndirect = true\n");

    replace_binary(&binary);
    let view = upgrade(&daemon);
    assert_eq!(view["last_upgrade_instances"], 1, "{view}");
    let (after, state, _) = booting(&daemon);
    assert_eq!(after, pid);
    assert!(is_booting(state.as_deref()), "{state:?}");

    // The new program's probe sees the line, and the instance serves.
    let answer = crate::support::curl_path(&live, &address, 8080, "/ready-now");
    assert!(answer.starts_with("hello from v1"), "{answer}");
    assert!(eventually(|| booting(&daemon)
        .1
        .is_some_and(|s| s.contains("ready") || s.contains("idle"))));
    assert_eq!(booting(&daemon).0, pid);
    assert!(curl(&live, &address, 8080).starts_with("hello from v1"));
}

#[test]
fn an_instance_handed_over_while_booting_is_steered_at_once_not_relayed() {
    let temp = tempfile::tempdir().expect("temp dir");
    // The proxy in front: the first program steers the booting instance from its spawn.
    let (daemon, binary, live, address, pid) = booting_hello(temp.path(), "");
    assert!(
        eventually(|| booting(&daemon).2.is_some()),
        "{:?}",
        booting(&daemon)
    );

    replace_binary(&binary);
    let view = upgrade(&daemon);
    assert_eq!(view["last_upgrade_instances"], 1, "{view}");
    // The new program steers it too while it still boots (its probe waits for /ready-now).
    assert!(
        eventually(|| booting(&daemon).2.is_some()),
        "{:?}",
        booting(&daemon)
    );
    let (after, state, _) = booting(&daemon);
    assert_eq!(after, pid);
    assert!(is_booting(state.as_deref()), "{state:?}");

    // Connections made now reach its socket: the new program's proxy accepts none.
    for _ in 0..3 {
        assert!(curl(&live, &address, 8080).starts_with("hello from v1"));
    }
    let metrics = daemon.metrics();
    assert!(
        metrics.contains("revboot_proxy_connections_total{outcome=\"accepted\"} 0"),
        "{metrics}"
    );
    let (_, state, steered) = booting(&daemon);
    assert!(is_booting(state.as_deref()), "{state:?}");
    assert!(steered >= Some(3), "{steered:?}");
}

/// The byte at `offset` of the stream [`Echo`] sends.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// A transfer through hello's `/echo` on one connection: a thread sends the pattern until
/// stopped, another reads back what is echoed.
struct Echo {
    stop: Arc<AtomicBool>,
    echoed: Arc<std::sync::atomic::AtomicU64>,
    writer: std::thread::JoinHandle<std::io::Result<u64>>,
    reader: std::thread::JoinHandle<std::io::Result<Vec<u8>>>,
}

impl Echo {
    /// Asks `target` for `/echo` of `host` and starts the transfer.
    fn start(target: SocketAddr, host: &str) -> Echo {
        let mut stream = TcpStream::connect_timeout(&target, PATIENCE).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        stream.set_write_timeout(Some(PATIENCE)).expect("timeout");
        let request = format!("GET /echo HTTP/1.1\r\nhost: {host}\r\n\r\n");
        stream.write_all(request.as_bytes()).expect("request");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).expect("the answer's head");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut sending = stream.try_clone().expect("clone");
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let chunk: Vec<u8> = (sent..sent + 65_536).map(pattern).collect();
                    sending.write_all(&chunk)?;
                    sent += chunk.len() as u64;
                }
                sending.shutdown(std::net::Shutdown::Write)?;
                Ok(sent)
            })
        };
        let reader = {
            let echoed = echoed.clone();
            let mut stream = stream;
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut buffer = vec![0u8; 65_536];
                loop {
                    let read = stream.read(&mut buffer)?;
                    if read == 0 {
                        return Ok(got);
                    }
                    got.extend_from_slice(&buffer[..read]);
                    echoed.fetch_add(read as u64, Ordering::Relaxed);
                }
            })
        };
        Echo {
            stop,
            echoed,
            writer,
            reader,
        }
    }

    /// Waits until at least `more` bytes more than now came back.
    fn wait_for_more(&self, more: u64) {
        let now = self.echoed.load(Ordering::Relaxed);
        assert!(
            eventually(|| self.echoed.load(Ordering::Relaxed) >= now + more),
            "the transfer stopped at {now} bytes"
        );
    }

    /// Stops sending; asserts that every byte sent came back once, in order.
    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.writer.join().expect("writer").expect("sending");
        let got = self.reader.join().expect("reader").expect("reading");
        assert_eq!(got.len() as u64, sent, "bytes echoed of those sent");
        let first_wrong = (0..sent).find(|&at| got[at as usize] != pattern(at));
        assert_eq!(first_wrong, None, "a byte echoed differs");
    }
}

#[test]
fn upgrade_in_place_hands_relayed_connections_over_mid_transfer() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (daemon, binary, front, host) = hello_at_the_front_door(temp.path());

    // A transfer both ways through the front door's relay, going on through two upgrades:
    // the relay is handed over with what it had in flight each time.
    let echo = Echo::start(front, &host);
    echo.wait_for_more(1 << 20);
    replace_binary(&binary);
    assert_eq!(upgrade(&daemon)["upgrades"], 1);
    echo.wait_for_more(1 << 20);
    assert_eq!(upgrade(&daemon)["upgrades"], 2);
    echo.wait_for_more(1 << 20);
    echo.finish();
    let log = daemon.log();
    let handed = log
        .lines()
        .filter(|line| line.contains("proxy handed over") && line.contains("relays=1"))
        .count();
    assert_eq!(handed, 2, "{log}");
    assert!(crate::front_door::curl_front(&host, front).contains("hello from v1"));
}

/// The value of the metric line that starts with `name` (0 when absent).
fn metric(daemon: &Daemon, name: &str) -> u64 {
    let metrics = daemon.metrics();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

const HANDED_OFF: &str = "revboot_proxy_connections_total{outcome=\"handed_off\"}";
const FROM_CLIENTS: &str = "revboot_proxy_bytes_total{direction=\"from_clients\"}";
const TO_CLIENTS: &str = "revboot_proxy_bytes_total{direction=\"to_clients\"}";

#[test]
fn a_connection_handed_to_an_instance_keeps_it_past_an_upgrade_and_new_ones_are_handed_there() {
    let temp = tempfile::tempdir().expect("temp dir");
    // Reaped after a second idle: only a connection counted open keeps it.
    let (daemon, binary) = upgradable(
        temp.path(),
        "[front]\nhttp = \"127.0.0.1:0\"\n[instances]\nidle_timeout_ms = 1000\n",
    );
    let front = daemon.front("front_http=");
    let work = hello_source(temp.path());
    crate::support::write_manifest(&work, "reach = \"front\"\nhandoff = true\n");
    crate::support::git(&work, &["commit", "-q", "-am", "handed its connections"]);
    push(&daemon, &work);
    let host = format!("hello.{ZONE}");

    // A request whose body is not sent yet: hello holds the connection, handed to it.
    let mut held = TcpStream::connect_timeout(&front, PATIENCE).expect("connect");
    let head = format!(
        "POST / HTTP/1.1\r\nhost: {host}\r\ncontent-length: 4\r\nconnection: close\r\n\r\n"
    );
    held.write_all(head.as_bytes()).expect("the head");
    assert!(eventually(|| metric(&daemon, HANDED_OFF) == 1));
    let before = pids(&daemon);
    assert_eq!(before.len(), 1, "{before:?}");

    replace_binary(&binary);
    assert_eq!(upgrade(&daemon)["upgrades"], 1);
    let log = daemon.log();
    assert!(
        log.lines()
            .any(|line| line.contains("proxy handed over") && line.contains("handed_off=1")),
        "{log}"
    );
    // Several idle timeouts of the new program: the handed connection, still open, counts
    // there, so the same instance stays.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(pids(&daemon), before);
    held.write_all(b"body").expect("the body");
    held.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut answer = String::new();
    held.read_to_string(&mut answer).expect("answered");
    assert!(answer.contains("hello from v1"), "{answer}");
    assert_eq!(pids(&daemon), before);

    // A new connection is handed to the adopted instance through the socket handed over
    // with it: not relayed.
    let (handed, from, to) = (
        metric(&daemon, HANDED_OFF),
        metric(&daemon, FROM_CLIENTS),
        metric(&daemon, TO_CLIENTS),
    );
    assert!(crate::front_door::curl_front(&host, front).contains("hello from v1"));
    assert_eq!(metric(&daemon, HANDED_OFF), handed + 1);
    assert_eq!(
        (metric(&daemon, FROM_CLIENTS), metric(&daemon, TO_CLIENTS)),
        (from, to)
    );
    assert_eq!(pids(&daemon), before);
}

#[test]
fn upgrade_in_place_hands_over_connections_relayed_to_an_instance_not_steered() {
    let temp = tempfile::tempdir().expect("temp dir");
    // Not steered: the proxy relays every connection to the instance's own address.
    let (daemon, binary) = upgradable(temp.path(), "[instances]\nsteer = false\n");
    let work = hello_source(temp.path());
    push(&daemon, &work);
    let live = format!("hello.{ZONE}");
    let address = dig_ok(&daemon, &live, false);
    let target: SocketAddr = format!("{address}:8080").parse().expect("address");
    let echo = Echo::start(target, &live);
    echo.wait_for_more(1 << 20);
    replace_binary(&binary);
    assert_eq!(upgrade(&daemon)["upgrades"], 1);
    echo.wait_for_more(1 << 20);
    echo.finish();
    let log = daemon.log();
    assert!(log.contains("relays=1"), "{log}");
}

#[test]
fn upgrade_in_place_keeps_gatekeepers_their_clients_and_upstream_connections() {
    use crate::gatekeeper::{Backend, NAME, answered, curl_from, gatekeeper_pid};
    // Clients of this test alone: gatekeeper_pid finds a gatekeeper by its client.
    let (first, second) = ("127.0.0.71", "127.0.0.72");
    let temp = tempfile::tempdir().expect("temp dir");
    let backend = Backend::start(&temp.path().join("backend.log"));
    let (daemon, binary) = upgradable(temp.path(), "[instances]\nmax_clients_per_service = 3\n");
    crate::gatekeeper::push_gatekeeper(&daemon, temp.path(), &backend);
    let addresses = [first, second].map(|client| {
        let address = daemon.address_for(client, NAME);
        let (status, body) = answered(&curl_from(client, &address, "GET", "/api/hello", None));
        assert_eq!(status, 200, "{body}");
        address
    });
    let pids = [first, second].map(|client| gatekeeper_pid(client).expect("its gatekeeper"));

    // A request of the first client waits at the backend, through its gatekeeper's
    // upstream grant, while the daemon upgrades.
    let waiting = {
        let address = addresses[0].clone();
        std::thread::spawn(move || curl_from(first, &address, "GET", "/api/wait", None))
    };
    let seen = |what: &str| backend.requests().iter().any(|r| r.contains(what));
    assert!(eventually(|| seen("GET /api/wait for 127.0.0.71")));
    replace_binary(&binary);
    let view = upgrade(&daemon);
    assert_eq!(view["last_upgrade_instances"], 2, "{view}");
    backend.open_gate();
    let (status, body) = answered(&waiting.join().expect("the waiting request"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        "legacy backend saw GET /api/wait for 127.0.0.71 (0 body bytes)\n"
    );

    // The same gatekeepers, each reaching the backend for its own client only.
    assert_eq!([first, second].map(gatekeeper_pid), pids.map(Some));
    for (client, address) in [first, second].iter().zip(&addresses) {
        assert_eq!(&daemon.address_for(client, NAME), address);
        let (status, body) = answered(&curl_from(client, address, "GET", "/api/after", None));
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&format!("for {client}")), "{body}");
    }
    let intruder = curl_from(second, &addresses[0], "GET", "/api/hello", None);
    let text = String::from_utf8_lossy(&intruder.stdout);
    assert!(!intruder.status.success(), "{text}");
    assert!(!text.contains("legacy backend"), "{text}");
    // Two hellos, the one that waited, two after: the intruder's never reached it.
    assert_eq!(backend.requests().len(), 5, "{:?}", backend.requests());
}

/// The parent of `pid`.
fn parent_of(pid: u64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let end = stat.rfind(')')?;
    stat[end + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// The port an instance whose pid is `pid` listens on over TCP (its one listening socket,
/// held by it or a process under it): their socket inodes matched with its network
/// namespace's table or this one's.
fn listening_port(pid: u64) -> u16 {
    let under = |mut other: u64| {
        for _ in 0..8 {
            if other == pid {
                return true;
            }
            match parent_of(other) {
                Some(parent) if parent > 1 => other = parent,
                _ => return false,
            }
        }
        false
    };
    let processes: Vec<u64> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|&other| under(other))
        .collect();
    let inodes: Vec<String> = processes
        .iter()
        .filter_map(|process| std::fs::read_dir(format!("/proc/{process}/fd")).ok())
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    // The socket may have been made in the daemon's namespace and passed to the instance.
    let tables = ["tcp", "tcp6"].into_iter().flat_map(|table| {
        [
            format!("/proc/{pid}/net/{table}"),
            format!("/proc/self/net/{table}"),
        ]
    });
    for table in tables {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, st (0A: listening), inode.
            if fields.len() > 9 && fields[3] == "0A" && inodes.iter().any(|i| i == fields[9]) {
                let port = fields[1].rsplit(':').next().expect("a port");
                return u16::from_str_radix(port, 16).expect("a hex port");
            }
        }
    }
    panic!("process {pid} listens on no TCP port");
}

/// Runs `during`, watching `dir` (inotify): what it returns, and the names created or
/// moved into `dir` meanwhile.
fn created_during<R>(dir: &Path, during: impl FnOnce() -> R) -> (R, Vec<String>) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK).expect("inotify");
    inotify
        .add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
        .expect("watch the directory");
    let result = during();
    let mut names = Vec::new();
    while let Ok(events) = inotify.read_events() {
        if events.is_empty() {
            break;
        }
        names.extend(
            events
                .into_iter()
                .filter_map(|event| event.name)
                .map(|name| name.to_string_lossy().into_owned()),
        );
    }
    (result, names)
}

#[test]
fn a_connection_held_through_a_boot_is_handed_over_not_drained_and_the_state_never_on_disk() {
    let temp = tempfile::tempdir().expect("temp dir");
    // Not steered: the proxy holds the connections that come while the instance boots.
    let (daemon, binary, live, address, pid) =
        booting_hello(temp.path(), "[instances]\nsteer = false\n");
    let pid = pid.expect("the instance's pid");
    let target: SocketAddr = format!("{address}:8080").parse().expect("address");
    let held = "revboot_proxy_connections{kind=\"held\"} 1";
    // Half a request: the proxy reads it while it holds the connection.
    let established = half_request(target);
    assert!(
        eventually(|| daemon.metrics().contains(held)),
        "{}",
        daemon.metrics()
    );

    replace_binary(&binary);
    let (view, created) = created_during(&daemon.data, || upgrade(&daemon));
    assert_eq!(view["last_upgrade_instances"], 1, "{view}");
    // Handed over as it stood, not left to a drain that would have closed it.
    let log = daemon.log();
    let handed: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("proxy handed over"))
        .collect();
    assert_eq!(handed.len(), 1, "{log}");
    assert!(handed[0].contains("held=1"), "{}", handed[0]);
    assert!(handed[0].contains("left=0"), "{}", handed[0]);
    // The state went through a memfd: nothing was written in the data directory for it,
    // and the new program was named a descriptor, not a file.
    assert!(
        !created.iter().any(|name| name.contains("handover")),
        "{created:?}"
    );
    let environ = std::fs::read(format!("/proc/{}/environ", daemon.pid())).expect("environ");
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains("\0REVBOOT_HANDOVER=fd:") || environ.starts_with("REVBOOT_HANDOVER=fd:")
    );
    assert!(
        eventually(|| daemon.metrics().contains(held)),
        "{}",
        daemon.metrics()
    );
    assert_eq!(booting(&daemon).0, Some(pid));

    // The new program's probe passes once the instance is asked for /ready-now (at its own
    // socket: the proxy would hold that request too); the held connection is answered then,
    // the request's first half carried over, exactly as a request made afterwards.
    let backend = listening_port(pid);
    let ready = crate::support::curl_path(&live, &address, backend, "/ready-now");
    assert!(ready.starts_with("hello from v1"), "{ready}");
    let answer = finish(established);
    let again = finish(half_request(target));
    assert!(answer.contains("hello from v1"), "{answer}");
    assert_eq!(answer, again);
    assert_eq!(booting(&daemon).0, Some(pid));
}

#[test]
fn a_front_door_connection_held_through_a_boot_is_handed_over_with_the_head_it_read() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (daemon, binary) = upgradable(temp.path(), "[front]\nhttp = \"127.0.0.1:0\"\n");
    let front = daemon.front("front_http=");
    let work = hello_source(temp.path());
    crate::support::write_manifest(&work, "reach = \"front\"\n");
    crate::support::git(&work, &["commit", "-q", "-am", "reached at the front door"]);
    ready_on_request(&work);
    push(&daemon, &work);
    let host = format!("hello.{ZONE}");

    // The front door reads the head, routes it, summons hello and holds the connection.
    let mut held = TcpStream::connect_timeout(&front, PATIENCE).expect("connect");
    let request = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    held.write_all(request.as_bytes()).expect("the request");
    let metric = "revboot_proxy_connections{kind=\"held\"} 1";
    assert!(
        eventually(|| daemon.metrics().contains(metric)),
        "{}",
        daemon.metrics()
    );
    let pid = booting_pid(&daemon);

    replace_binary(&binary);
    let view = upgrade(&daemon);
    assert_eq!(view["last_upgrade_instances"], 1, "{view}");
    let log = daemon.log();
    let handed = log.lines().find(|line| line.contains("proxy handed over"));
    assert!(handed.is_some_and(|line| line.contains("held=1")), "{log}");
    assert!(
        eventually(|| daemon.metrics().contains(metric)),
        "{}",
        daemon.metrics()
    );

    // Ready: the held connection is answered as a request made afterwards is.
    let address = daemon.instances()[0]["address"]
        .as_str()
        .expect("its address")
        .to_owned();
    let ready = crate::support::curl_path(&host, &address, listening_port(pid), "/ready-now");
    assert!(ready.starts_with("hello from v1"), "{ready}");
    held.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut answer = String::new();
    held.read_to_string(&mut answer)
        .expect("the held connection is answered");
    let stream = TcpStream::connect_timeout(&front, PATIENCE).expect("connect");
    let again = exchange(stream, &host).expect("answered");
    assert!(answer.contains("hello from v1"), "{answer}");
    assert_eq!(answer, again);
    assert_eq!(booting(&daemon).0, Some(pid));
}

/// `revboot upgrade` started, not waited for; its errors piped.
fn upgrade_started(daemon: &Daemon) -> std::process::Child {
    daemon
        .cli_command(&format!("http://{}", daemon.http), &[], &["upgrade"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("revboot upgrade")
}

#[test]
fn a_sighup_or_sigterm_during_the_exec_of_an_upgrade_does_not_end_the_daemon() {
    use nix::sys::signal::{Signal, kill};
    let temp = tempfile::tempdir().expect("temp dir");
    let (daemon, _binary) = upgradable(temp.path(), "");
    let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
    for round in 1..=3 {
        // SIGHUPs all through the upgrade, the exec's instant among them.
        let mut upgrading = upgrade_started(&daemon);
        let done = loop {
            kill(pid, Signal::SIGHUP).expect("the daemon is alive");
            if let Some(done) = upgrading.try_wait().expect("the upgrade's status") {
                break done;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        };
        let mut stderr = String::new();
        let _ = upgrading
            .stderr
            .take()
            .map(|mut e| e.read_to_string(&mut stderr));
        assert!(
            done.success(),
            "round {round}: {done:?} {stderr}\n{}",
            daemon.log()
        );
        assert!(eventually(|| daemon.metrics().contains("revboot_")));
        let log = daemon.log();
        assert_eq!(log.matches("upgraded in place").count(), round, "{log}");
    }
    // One SIGTERM, sent as the old program says it executes the new one (its last look
    // at the signals taken, the exec under way or done): whichever thread of which program
    // takes it, it is not lost, and the daemon stops gracefully, never killed by it.
    let executing = |log: &str| log.matches("executing the new program").count();
    let before = executing(&daemon.log());
    let mut upgrading = upgrade_started(&daemon);
    let deadline = std::time::Instant::now() + crate::support::PATIENCE;
    while executing(&daemon.log()) == before {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
    kill(pid, Signal::SIGTERM).expect("the daemon is alive");
    let stopped = eventually(|| daemon.log().contains("revboot stopped"));
    let _ = upgrading.wait();
    let log = daemon.log();
    assert!(stopped, "one SIGTERM did not stop the daemon:\n{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
}

/// The instances that answered `count` requests through the front door (hello's
/// `x-instance` header).
fn answered_at_the_front_door(
    host: &str,
    front: SocketAddr,
    count: usize,
) -> std::collections::HashSet<String> {
    (0..count)
        .map(|_| {
            let answer = crate::front_door::curl_front(host, front);
            assert!(answer.contains("hello from v1"), "{answer}");
            answer
                .lines()
                .find_map(|line| line.strip_prefix("x-instance: "))
                .map(|id| id.trim().to_owned())
                .unwrap_or_else(|| panic!("no x-instance header: {answer}"))
        })
        .collect()
}

/// (replica, pid) of each instance, in order.
fn replicas(daemon: &Daemon) -> Vec<(u64, Option<u64>)> {
    let mut replicas: Vec<(u64, Option<u64>)> = daemon
        .instances()
        .iter()
        .map(|i| (i["replica"].as_u64().unwrap_or(0), i["pid"].as_u64()))
        .collect();
    replicas.sort_unstable();
    replicas
}

#[test]
fn upgrade_in_place_hands_every_replica_over_and_the_front_door_hands_connections_to_each() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (daemon, binary) = upgradable(temp.path(), "[front]\nhttp = \"127.0.0.1:0\"\n");
    let front = daemon.front("front_http=");
    let work = hello_source(temp.path());
    crate::support::write_manifest(
        &work,
        "reach = \"front\"\nhandoff = true\nmin_instances = 3\n",
    );
    crate::support::git(
        &work,
        &["commit", "-q", "-am", "three replicas, handed off"],
    );
    push(&daemon, &work);
    let host = format!("hello.{ZONE}");
    let before = replicas(&daemon);
    assert_eq!(
        before.iter().map(|r| r.0).collect::<Vec<_>>(),
        [0, 1, 2],
        "{before:?}"
    );

    // Routed by Host, handed to the replicas' own sockets: more than one answers.
    let handed = |daemon: &Daemon| {
        daemon
            .metrics()
            .lines()
            .find(|line| line.contains("outcome=\"handed_off\""))
            .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let handed_before = handed(&daemon);
    let answered = answered_at_the_front_door(&host, front, 20);
    assert!(answered.len() > 1, "all answered by {answered:?}");
    assert!(
        handed(&daemon) >= handed_before + 20,
        "{}",
        daemon.metrics()
    );

    // Requests all through an upgrade: every replica is handed over, same pids, same index.
    let load = Load::start(front, &host);
    replace_binary(&binary);
    let view = upgrade(&daemon);
    assert_eq!(view["last_upgrade_instances"], 3, "{view}");
    load.finish();
    assert_eq!(replicas(&daemon), before);
    let answered = answered_at_the_front_door(&host, front, 20);
    assert!(
        answered.len() > 1,
        "after the upgrade, all answered by {answered:?}"
    );
}

//! A real `revboot serve` in a temporary data directory, on loopback ports it picks itself.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The token every test daemon uses.
pub const TOKEN: &str = "e2e-token";

/// Bound on every wait in these tests (not a timing assertion).
pub const PATIENCE: Duration = Duration::from_secs(60);

static POOLS: AtomicU8 = AtomicU8::new(0);
static LAUNCHES: AtomicUsize = AtomicUsize::new(0);

/// A /24 of service addresses no other daemon of this test run uses.
pub fn fresh_pool() -> String {
    format!(
        "127.{}.{}.0/24",
        90 + std::process::id() % 60,
        POOLS.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where the daemon listens when the test does not say: port 0, so the daemon binds a free
/// port itself and names it in its log.
const ANY_PORT: u16 = 0;

/// How a test daemon starts; the default is what [`Daemon::start`] does.
pub struct Setup<'a> {
    /// `revbootd.toml` text (e.g. a short idle timeout); empty: no file.
    pub config: &'a str,
    /// The token given with `--token`; `None`: the daemon generates one in its data directory.
    pub token: Option<&'a str>,
    /// `RUST_LOG`.
    pub log_filter: &'a str,
    /// A network namespace the test made to run the daemon in (its commands run there too);
    /// `None`: the test's own.
    pub netns: Option<&'a revboot_testkit::netns::Netns>,
    /// The address pools; empty: a fresh loopback /24.
    pub pools: &'a [&'a str],
    /// Where DNS listens; `None`: a port of 127.0.0.1 the daemon picks.
    pub dns: Option<SocketAddr>,
    /// Where HTTP listens; `None`: a port of 127.0.0.1 the daemon picks.
    pub http: Option<SocketAddr>,
    /// The binary to run; `None`: the one cargo built.
    pub binary: Option<&'a Path>,
    /// More environment variables (e.g. `NOTIFY_SOCKET`).
    pub env: &'a [(&'a str, &'a std::ffi::OsStr)],
    /// `cgroup.procs` (or `tasks`) files the daemon's process joins before it executes
    /// revboot, as systemd puts a unit's process in its cgroups; empty: the test's cgroups.
    pub cgroups: &'a [PathBuf],
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            config: "",
            token: Some(TOKEN),
            log_filter: "info",
            netns: None,
            pools: &[],
            dns: None,
            http: None,
            binary: None,
            env: &[],
            cgroups: &[],
        }
    }
}

/// A running daemon.
pub struct Daemon {
    pub data: PathBuf,
    pub http: SocketAddr,
    pub dns: SocketAddr,
    pub pool: String,
    /// The token for pushes and the API.
    pub token: String,
    /// The network namespace the daemon runs in, when not the test's.
    enter: Option<PathBuf>,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts a daemon in `data` and waits until it serves.
    pub fn start(data: &Path) -> Daemon {
        Daemon::start_setup(data, &Setup::default())
    }

    /// Starts a daemon with `revbootd.toml` text (e.g. a short idle timeout).
    pub fn start_configured(data: &Path, config: &str) -> Daemon {
        Daemon::start_setup(
            data,
            &Setup {
                config,
                ..Setup::default()
            },
        )
    }

    /// Starts a daemon set up so.
    pub fn start_setup(data: &Path, setup: &Setup<'_>) -> Daemon {
        let pool = match setup.pools {
            [] => fresh_pool(),
            pools => pools.join(" "),
        };
        Daemon::launch(data, ANY_PORT, ANY_PORT, &pool, setup)
    }

    /// Starts a daemon with the given ports (0: the daemon picks one) and pool.
    pub fn start_with(data: &Path, http: u16, dns: u16, pool: &str) -> Daemon {
        Daemon::launch(data, http, dns, pool, &Setup::default())
    }

    fn launch(data: &Path, http: u16, dns: u16, pool: &str, setup: &Setup<'_>) -> Daemon {
        let launch = LAUNCHES.fetch_add(1, Ordering::Relaxed);
        let log = data.with_extension(format!("log.{launch}"));
        let http = setup.http.unwrap_or(([127, 0, 0, 1], http).into());
        let dns = setup.dns.unwrap_or(([127, 0, 0, 1], dns).into());
        let enter = setup.netns.map(revboot_testkit::netns::Netns::path);
        let binary = setup
            .binary
            .unwrap_or(Path::new(env!("CARGO_BIN_EXE_revboot")));
        let mut command = if setup.cgroups.is_empty() {
            in_netns(enter.as_deref(), &binary.to_string_lossy())
        } else {
            // The shell joins them, then becomes revboot (same pid).
            let mut command = in_netns(enter.as_deref(), "sh");
            command
                .arg("-c")
                .arg(r#"for procs in "$@"; do [ "$procs" = -- ] && break; echo $$ > "$procs"; shift; done; shift; exec "$@""#)
                .arg("sh")
                .args(setup.cgroups)
                .arg("--")
                .arg(binary);
            command
        };
        if !setup.config.is_empty() {
            let file = data.with_extension(format!("revbootd.{launch}.toml"));
            std::fs::write(&file, setup.config).expect("write revbootd.toml");
            command.arg("--config").arg(file);
        }
        command
            .args(["--data", &data.to_string_lossy(), "serve"])
            .args(["--http", &http.to_string(), "--dns", &dns.to_string()])
            .args(pool.split(' ').flat_map(|pool| ["--pool", pool]));
        if let Some(token) = setup.token {
            command.args(["--token", token]);
        }
        command.envs(setup.env.iter().copied());
        command
            .env("RUST_LOG", setup.log_filter)
            // Whether the log is coloured is the daemon's own choice, from its stderr.
            .env_remove("NO_COLOR")
            .env_remove("REVBOOT_TOKEN")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("daemon log"))
            .stderr(
                std::fs::File::options()
                    .append(true)
                    .open(&log)
                    .expect("daemon log"),
            );
        // A binary the test has just written (a copy to upgrade from) may still be open for
        // writing in a child another test thread forked meanwhile, until that child execs:
        // its exec fails with "text file busy" for that moment. Bounded retries.
        let mut attempts = 0;
        let child = loop {
            match command.spawn() {
                Err(error)
                    if error.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 100 =>
                {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other.expect("start revboot serve"),
            }
        };
        let mut daemon = Daemon {
            data: data.to_owned(),
            http,
            dns,
            pool: pool.to_owned(),
            token: setup.token.unwrap_or_default().to_owned(),
            enter,
            child: Some(child),
            log,
        };
        (daemon.http, daemon.dns) = daemon.wait_serving();
        if setup.token.is_none() {
            daemon.token = std::fs::read_to_string(data.join("token"))
                .expect("the generated token")
                .trim()
                .to_owned();
        }
        daemon
    }

    /// Waits for the daemon's `revboot is serving` line (it comes once every part listens)
    /// and reads from it where the HTTP and DNS servers are.
    fn wait_serving(&mut self) -> (SocketAddr, SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let log = self.log();
            if let Some(line) = log.lines().find(|line| line.contains("revboot is serving")) {
                let field = |name: &str| -> SocketAddr {
                    line.split_whitespace()
                        .find_map(|word| word.strip_prefix(name))
                        .and_then(|value| value.parse().ok())
                        .unwrap_or_else(|| panic!("no {name}<address> in {line:?}"))
                };
                return (field("http="), field("dns="));
            }
            let exited = self
                .child
                .as_mut()
                .is_none_or(|child| child.try_wait().is_ok_and(|status| status.is_some()));
            assert!(!exited, "daemon exited before serving; its log:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("daemon did not serve within 60s; its log:\n{}", self.log());
    }

    /// Where the front door's HTTP (`"front_http="`) or TLS (`"front_tls="`) listener is,
    /// as the `revboot is serving` line says.
    pub fn front(&self, field: &str) -> SocketAddr {
        let log = self.log();
        let line = log
            .lines()
            .find(|line| line.contains("revboot is serving"))
            .expect("the daemon serves");
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(field))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {field}<address> in {line:?}"))
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The push URL of a service, with the token.
    pub fn remote(&self, service: &str) -> String {
        format!("http://git:{}@{}/git/{service}.git", self.token, self.http)
    }

    /// A command that runs `program` where the daemon runs (its network namespace).
    pub fn command(&self, program: &str) -> Command {
        in_netns(self.enter.as_deref(), program)
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_at(&format!("http://{}", self.http), &[], args)
    }

    /// Runs the CLI against this daemon at `url`, with more global options first.
    pub fn cli_at(&self, url: &str, options: &[&std::ffi::OsStr], args: &[&str]) -> Output {
        self.cli_command(url, options, args)
            .stdin(Stdio::null())
            .output()
            .expect("run revboot")
    }

    /// `revboot <args>` against this daemon with `input` on its standard input.
    pub fn cli_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write as _;
        let mut child = self
            .cli_command(&format!("http://{}", self.http), &[], args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run revboot");
        child
            .stdin
            .take()
            .expect("its stdin")
            .write_all(input)
            .expect("write its stdin");
        child.wait_with_output().expect("wait for revboot")
    }

    /// The command [`Daemon::cli_at`] runs.
    pub fn cli_command(&self, url: &str, options: &[&std::ffi::OsStr], args: &[&str]) -> Command {
        let mut command = self.command(env!("CARGO_BIN_EXE_revboot"));
        command
            .args(["--url", url])
            .args(options)
            .args(["--data", &self.data.to_string_lossy()])
            .args(args)
            .env("REVBOOT_TOKEN", &self.token)
            // The client configuration of whoever runs the tests stays out of them.
            .env("XDG_CONFIG_HOME", self.data.with_extension("config"))
            .env_remove("REVBOOT_REMOTE");
        command
    }

    /// `/metrics`, read with the token.
    pub fn metrics(&self) -> String {
        let output = run(self
            .command("curl")
            .args(["-sS", "--fail", "--max-time", "10", "-H"])
            .arg(format!("authorization: Bearer {}", self.token))
            .arg(format!("http://{}/metrics", self.http)));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `revboot ps --json`.
    pub fn instances(&self) -> Vec<serde_json::Value> {
        let output = self.cli(&["--json", "ps"]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("ps is JSON")
    }

    /// `dig` of `name` from a source address; the whole output (status, EDE and answer).
    pub fn dig_from(&self, source: &str, name: &str) -> String {
        let output = self
            .command("dig")
            .arg(format!("@{}", self.dns.ip()))
            .args(["-p", &self.dns.port().to_string(), "-b", source])
            .args(["+time=5", "+tries=1", name, "A"])
            .output()
            .expect("run dig");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The one address `dig` of `name` from `source` answers.
    pub fn address_for(&self, source: &str, name: &str) -> String {
        let output = self.dig_from(source, name);
        let answer = output
            .lines()
            .filter(|line| !line.starts_with(';'))
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.len() == 5 && fields[3] == "A").then(|| fields[4].to_owned())
            });
        answer.unwrap_or_else(|| {
            panic!(
                "dig from {source} gave no address:\n{output}\ndaemon log:\n{}",
                self.log()
            )
        })
    }

    /// A TCP connection from `source` to the client port of its per-client instance at
    /// `address`, held open: returned once the deployer can tell it is open (the proxy has
    /// counted it, or the kernel steers connections to the instance, so that its socket
    /// shows it).
    pub fn hold_connection(&self, source: &str, address: &str, port: u16) -> TcpStream {
        let source: std::net::IpAddr = source.parse().expect("a source address");
        let target: SocketAddr = (
            address.parse::<std::net::IpAddr>().expect("an address"),
            port,
        )
            .into();
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::new(source, 0).into())
            .expect("bind the source address");
        socket
            .connect_timeout(&target.into(), PATIENCE)
            .expect("connect");
        let client = source.to_string();
        let counted = eventually(|| {
            self.instances().iter().any(|instance| {
                instance["client"] == client.as_str()
                    && (instance["connections"].as_u64() > Some(0) || instance["steered"].is_u64())
            })
        });
        assert!(
            counted,
            "{source}'s connection is not seen: {:?}",
            self.instances()
        );
        socket.into()
    }

    /// `dig +short` of a name against this daemon, over UDP (or TCP).
    pub fn dig(&self, name: &str, tcp: bool) -> String {
        let mut command = self.command("dig");
        command
            .arg(format!("@{}", self.dns.ip()))
            .args(["-p", &self.dns.port().to_string()])
            .args(["+short", "+time=5", "+tries=1", name, "A"]);
        if tcp {
            command.arg("+tcp");
        }
        let output = command.output().expect("run dig");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon runs").id()
    }

    /// Kills the daemon with SIGKILL (nothing of it runs on) and waits for it.
    pub fn kill(mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.log()
    }

    /// Stops with SIGTERM and waits (bounded).
    pub fn stop(mut self) -> String {
        self.terminate();
        self.log()
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Daemon {
    // A failing test shows the daemon's log on the test's stderr, where the harness keeps it.
    #[allow(clippy::print_stderr)]
    fn drop(&mut self) {
        self.terminate();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "--- last lines of the daemon log ({}) ---",
                self.log.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A command for `program`, in the network namespace at `netns` if one is given.
fn in_netns(netns: Option<&Path>, program: &str) -> Command {
    netns.map_or_else(
        || Command::new(program),
        |netns| revboot_testkit::netns::enter(netns, program),
    )
}

/// Starts `revboot serve` with the configuration file `config` and waits (bounded) for it
/// to exit, as it must at a start it refuses; its exit status and stderr.
pub fn serve_refused(config: &Path, data: &Path, pool: &str) -> (std::process::ExitStatus, String) {
    serve_refused_on(config, data, pool, "127.0.0.1:0", "127.0.0.1:0")
}

/// [`serve_refused`] with the HTTP and DNS addresses given (e.g. ones another daemon holds).
pub fn serve_refused_on(
    config: &Path,
    data: &Path,
    pool: &str,
    http: &str,
    dns: &str,
) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_revboot"))
        .arg("--config")
        .arg(config)
        .args(["--data", &data.to_string_lossy(), "serve"])
        .args(["--http", http, "--dns", dns])
        .args(["--pool", pool, "--token", "t"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start revboot serve");
    let status = exits(&mut child, "revboot serve");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut stderr)
        .expect("read stderr");
    (status, stderr)
}

/// Waits (bounded) for `child`, which must end by itself (a start it refuses): its exit
/// status; killed, and the test failed, past [`PATIENCE`].
pub fn exits(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) until `check` holds.
pub fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Runs a command, panicking with its output on failure.
pub fn run(command: &mut Command) -> Output {
    let output = command.stdin(Stdio::null()).output().expect("run command");
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs git in `dir` with a fixed identity.
pub fn git(dir: &Path, args: &[&str]) -> Output {
    run(Command::new("git")
        .args(["-c", "user.name=e2e", "-c", "user.email=e2e@revboot.test"])
        .args(args)
        .current_dir(dir))
}

/// A git working copy of examples/hello.
pub fn hello_source(dir: &Path) -> PathBuf {
    example_source(dir, "hello")
}

/// A git working copy of one of the examples, committed as `<name> v1`.
pub fn example_source(dir: &Path, name: &str) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    let work = dir.join(name);
    copy(&source, &work);
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", &format!("{name} v1")]);
    work
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read examples") {
        let entry = entry.expect("entry");
        if entry.file_name() == "target" {
            continue;
        }
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Sets the response prefix and revision of the hello working copy and commits.
pub fn commit_revision(work: &Path, revision: &str, greeting: &str) {
    let main = work.join("src/main.rs");
    let text = std::fs::read_to_string(&main).expect("read main.rs");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for line in &mut lines {
        if line.starts_with("const REVISION: &str = ") {
            *line = format!("const REVISION: &str = \"{revision}\";");
        }
        if line.contains("let body = format!(\"") {
            *line = format!(
                "    let body = format!(\"{greeting} from {{REVISION}} ({{deployment}})\\n\");"
            );
        }
    }
    std::fs::write(&main, lines.join("\n") + "\n").expect("write main.rs");
    git(work, &["commit", "-q", "-am", &format!("hello {revision}")]);
}

/// Pushes the working copy's main branch; returns git's stderr (the remote: lines).
pub fn push(daemon: &Daemon, work: &Path) -> String {
    push_service(daemon, work, "hello")
}

/// Pushes a working copy's main branch, expecting git to fail; git's stderr.
pub fn push_refused(daemon: &Daemon, work: &Path) -> String {
    let output = daemon
        .command("git")
        .args(["push", &daemon.remote("hello"), "main"])
        .current_dir(work)
        .stdin(Stdio::null())
        .output()
        .expect("run git");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "the push succeeded:\n{stderr}");
    stderr
}

/// Writes the working copy's `revboot.toml` as examples/hello has it followed by `tail`
/// (its last table is `[run]`: a tail may add keys to it, then tables); the next commit
/// (e.g. [`commit_revision`]'s) takes it.
pub fn write_manifest(work: &Path, tail: &str) {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello/revboot.toml");
    let mut manifest = std::fs::read_to_string(example).expect("read revboot.toml");
    manifest.push_str(tail);
    std::fs::write(work.join("revboot.toml"), manifest).expect("write revboot.toml");
}

/// Pushes a working copy's main branch to a service.
pub fn push_service(daemon: &Daemon, work: &Path, service: &str) -> String {
    let output = run(daemon
        .command("git")
        .args(["push", &daemon.remote(service), "main"])
        .current_dir(work));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// GET / of a name at an address through curl --resolve; the body.
pub fn curl(name: &str, address: &str, port: u16) -> String {
    curl_path(name, address, port, "/")
}

/// GET of a path (taken as it is written) of a name at an address; the body.
pub fn curl_path(name: &str, address: &str, port: u16, path: &str) -> String {
    let output = run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "--globoff"])
        .args(["--resolve", &format!("{name}:{port}:{address}")])
        .arg(format!("http://{name}:{port}{path}")));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The history of a service as JSON.
pub fn history(daemon: &Daemon, service: &str) -> Vec<serde_json::Value> {
    let output = daemon.cli(&["--json", "log", service]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("history is JSON")
}

/// `dig +short` that must answer one address.
pub fn dig_ok(daemon: &Daemon, name: &str, tcp: bool) -> String {
    let answer = daemon.dig(name, tcp);
    assert!(
        answer.parse::<std::net::Ipv4Addr>().is_ok(),
        "dig {name} (tcp: {tcp}) answered {answer:?}; daemon log:\n{}",
        daemon.log()
    );
    answer
}

/// (status, body) of a curl request to the daemon's HTTP server, with the token or without.
pub fn request(
    daemon: &Daemon,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: bool,
) -> (u16, String) {
    let mut command = daemon.command("curl");
    command
        .args([
            "-sS",
            "--max-time",
            "30",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!("http://{}{path}", daemon.http));
    if let Some(body) = body {
        command.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ]);
    }
    if token {
        command.args(["-H", &format!("authorization: Bearer {}", daemon.token)]);
    }
    let output = command.output().expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').expect("status line");
    (status.trim().parse().expect("status code"), body.to_owned())
}

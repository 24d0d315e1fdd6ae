#!/usr/bin/env bash
# Running revboot for months: an upgrade in place under load, and what a health check adds
# to a promotion, through the whole daemon.
#
# Starts `revboot serve` (from a copy of the binary, in a temporary data directory, on
# loopback ports it picks itself) and pushes examples/hello with stock git, then:
#   1. promotion delay: PUSHES pushes of a new revision with `[deploy] check = { http =
#      "/health" }` and as many without, alternating; the wall time of each `git push` and,
#      with the check, the gate's own figure (summon → check passed, as the pusher reads
#      it). p50 of each and the difference of the push p50s;
#   2. upgrade under load: ROUNDS times, `wrk` against the live revision's instance for
#      DURATION seconds; a third of the way in, the binary file is replaced (a rename, as a
#      package manager does) and `revboot upgrade` runs. Failed requests (wrk's socket
#      errors and non-2xx answers), requests/s, and the upgrade's duration (the daemon's
#      own figure, request → serving again, and the CLI's wall time). Beside it the anchor:
#      the same wrk run without an upgrade. The instance's pid must be the same after.
# With EXAMPLE=hello-vm, the service is examples/hello-vm, a qemu microvm (step 1 is
# skipped: PUSHES counts for hello only), and wrk opens CONNECTIONS connections (default 16;
# hello-vm has four sockets, and with four or more connections one that arrives while a
# socket closes is reset, in the anchor as much as during an upgrade: 2 suits it): the VM
# must keep its pid too.
# With TLS=1, hello is reached at the front door with its TLS ended there (`tls =
# "terminate"`, a certificate made by openssl for the run): the load is CONNECTIONS
# threads (default 4 then) each making TLS connections one after the other (Python's ssl,
# the certificate verified, a close_notify required at the end: an end without one counts
# failed), since wrk cannot send the server name of a host it has no DNS for; connections
# in flight at the upgrade are handed over with their TLS session. With TLS=echo, one TLS
# connection instead (hello serves one at a time), kept open through the run, `GET /echo`
# then 1 KiB messages sent and read back byte for byte one after the other, each counted a
# request: it is handed over at the upgrade, and a broken one counts failed (and is made
# again). Step 1 is skipped.
# All traffic stays on 127.0.0.0/8.
#
#   bench/upgrade.sh [ROUNDS] [PUSHES] [DURATION]   (default 3, 5, 15; REVBOOT_PROFILE=
#                                                    release|dev, or REVBOOT_BIN=<a revboot>;
#                                                    REVBOOT_NEW_BIN=<the binary upgraded to>;
#                                                    EXAMPLE=hello|hello-vm; CONNECTIONS=16;
#                                                    TLS=1|echo)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
pushes=${2:-5}
duration=${3:-15}
profile=${REVBOOT_PROFILE:-dev}
if [ -n "${REVBOOT_BIN:-}" ]; then
    exe=$REVBOOT_BIN
    profile="given ($exe)"
elif [ "$profile" = release ]; then
    cargo build --release --locked -q -p revboot
    exe=${CARGO_TARGET_DIR:-target}/release/revboot
else
    cargo build --locked -q -p revboot
    exe=${CARGO_TARGET_DIR:-target}/debug/revboot
fi
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }
exec python3 - "$exe" "${REVBOOT_NEW_BIN:-$exe}" "$rounds" "$pushes" "$duration" "$profile" \
    "${EXAMPLE:-hello}" "${CONNECTIONS:-}" "${TLS:-0}" <<'PY'
import json, os, re, shutil, socket, ssl, statistics, subprocess, sys, tempfile, threading, time

EXE, NEW, ROUNDS, PUSHES, DURATION, PROFILE, EXAMPLE, CONNECTIONS, TLS = (
    os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]), int(sys.argv[3]),
    int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7], sys.argv[8],
    sys.argv[9] if sys.argv[9] in ("1", "echo") else None)
CONNECTIONS = 1 if TLS == "echo" else int(CONNECTIONS or (4 if TLS else 16))
if EXAMPLE not in ("hello", "hello-vm"):
    sys.exit("EXAMPLE is hello or hello-vm")
if TLS and EXAMPLE != "hello":
    sys.exit("TLS=1 is for EXAMPLE=hello")
if EXAMPLE == "hello-vm" or TLS:
    PUSHES = 0
ROOT = os.getcwd()
TOKEN = "bench-token"
tmp = tempfile.mkdtemp(prefix="revboot-upgrade-bench-")
binary = os.path.join(tmp, "revboot")
shutil.copy2(EXE, binary)
data = os.path.join(tmp, "data")
log_path = os.path.join(tmp, "daemon.log")
log = open(log_path, "w")
pool = "127.%d.%d.0/24" % (160 + os.getpid() % 60, os.getpid() // 60 % 250)
ZONE = "revboot.test"
NAME = "%s.%s" % (EXAMPLE, ZONE)
configured = []
if TLS:
    cert, key, config = (os.path.join(tmp, f) for f in ("hello.pem", "hello.key", "revbootd.toml"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=" + NAME,
                    "-addext", "subjectAltName=DNS:%s,DNS:*.%s" % (NAME, NAME),
                    "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    open(config, "w").write('[front]\ntls = "127.0.0.1:0"\n[tls.services.hello]\n'
                            'cert = "%s"\nkey = "%s"\n' % (cert, key))
    configured = ["--config", config]
daemon = subprocess.Popen(
    [binary, *configured, "--data", data, "serve", "--http", "127.0.0.1:0", "--dns", "127.0.0.1:0",
     "--pool", pool, "--token", TOKEN],
    stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="info"))


def serving_line(after=0):
    deadline = time.time() + 60
    while time.time() < deadline:
        lines = [l for l in open(log_path).read().splitlines() if "revboot is serving" in l]
        if len(lines) > after:
            return lines[after]
        if daemon.poll() is not None:
            sys.exit("the daemon exited:\n" + open(log_path).read())
        time.sleep(0.05)
    sys.exit("the daemon did not serve:\n" + open(log_path).read())


line = serving_line()
http = re.search(r"http=(\S+)", line).group(1)
dns = re.search(r"dns=(\S+)", line).group(1)


def cli(*args):
    out = subprocess.run([binary, "--url", "http://" + http, "--data", data, "--json", *args],
                         env=dict(os.environ, REVBOOT_TOKEN=TOKEN), capture_output=True, text=True,
                         timeout=180)
    if out.returncode != 0:
        sys.exit("revboot %s failed: %s %s" % (" ".join(args), out.stdout, out.stderr))
    return json.loads(out.stdout)


def git(*args):
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@revboot.test", *args],
                   cwd=work, check=True, capture_output=True, timeout=300)


work = os.path.join(tmp, EXAMPLE)
shutil.copytree(os.path.join(ROOT, "examples", EXAMPLE), work,
                ignore=shutil.ignore_patterns("target"))
manifest = open(os.path.join(work, "revboot.toml")).read()
if TLS:
    manifest += 'reach = "front"\ntls = "terminate"\n'
    open(os.path.join(work, "revboot.toml"), "w").write(manifest)
git("init", "-q", "-b", "main")
git("add", ".")
git("commit", "-q", "-m", "hello v1")
remote = "http://git:%s@%s/git/%s.git" % (TOKEN, http, EXAMPLE)
serial = [0]


def push(checked):
    serial[0] += 1
    tail = '[deploy]\ncheck = { http = "/health", within_ms = 20000 }\n' if checked else ""
    open(os.path.join(work, "revboot.toml"), "w").write(manifest + tail)
    main = os.path.join(work, "src/main.rs")
    text = open(main).read()
    text = re.sub(r'const REVISION: &str = "[^"]*";', 'const REVISION: &str = "b%d";' % serial[0], text)
    open(main, "w").write(text)
    git("commit", "-q", "-am", "hello b%d" % serial[0])
    start = time.monotonic()
    out = subprocess.run(["git", "push", "-q", remote, "main"], cwd=work, capture_output=True,
                         text=True, timeout=600)
    wall = (time.monotonic() - start) * 1000
    if out.returncode != 0:
        sys.exit("push failed:\n" + out.stderr)
    gate = re.search(r"health check passed in ([0-9.]+) ms", out.stderr)
    return wall, float(gate.group(1)) if gate else None


if EXAMPLE == "hello-vm":
    out = subprocess.run(["git", "push", "-q", remote, "main"], cwd=work, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        sys.exit("push failed:\n" + out.stderr)
else:
    push(False)  # the first build warms cargo's cache
plain, checked, gate = [], [], []
for _ in range(PUSHES):
    plain.append(push(False)[0])
    wall, passed = push(True)
    checked.append(wall)
    gate.append(passed)
p50 = statistics.median
print("revboot upgrade bench (%s binary, examples/%s)" % (PROFILE, EXAMPLE))
if PUSHES:
    print("== promotion delay of examples/hello, %d pushes each ==" % PUSHES)
    print("push without check: p50 %.0f ms (%.0f..%.0f)" % (p50(plain), min(plain), max(plain)))
    print("push with check:    p50 %.0f ms (%.0f..%.0f)" % (p50(checked), min(checked), max(checked)))
    print("gate (summon → GET /health passed): p50 %.1f ms (%.1f..%.1f)" % (p50(gate), min(gate), max(gate)))
    print("added by the check (push p50 difference): %.0f ms" % (p50(checked) - p50(plain)))

# The live revision's instance, booted.
if TLS:
    front = re.search(r"front_tls=(\S+)", line).group(1)
    url = "https://%s/ at %s" % (NAME, front)
    subprocess.run(["curl", "-sS", "--max-time", "30", "-o", "/dev/null", "--cacert", cert,
                    "--resolve", "%s:%s:%s" % (NAME, front.rsplit(":", 1)[1], front.rsplit(":", 1)[0]),
                    "https://%s:%s/" % (NAME, front.rsplit(":", 1)[1])], check=True)
else:
    answer = subprocess.run(["dig", "@" + dns.rsplit(":", 1)[0], "-p", dns.rsplit(":", 1)[1],
                             "+short", NAME, "A"], capture_output=True, text=True,
                            timeout=30).stdout.split()
    address = answer[0]
    url = "http://%s:8080/" % address
    subprocess.run(["curl", "-sS", "--max-time", "30", "-o", "/dev/null", url], check=True)


def instance_pids():
    return sorted(i.get("pid") for i in cli("ps") if i.get("pid"))


def tls_load():
    """CONNECTIONS threads of TLS connections one after the other for DURATION seconds, each
    a GET answered by hello and ended by a close_notify; wrk's figures."""
    context = ssl.create_default_context(cafile=cert)
    host, port = front.rsplit(":", 1)
    counts = {"ok": 0, "failed": 0}
    errors = []
    lock = threading.Lock()
    end = time.monotonic() + DURATION

    def one():
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=NAME) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nhost: %s\r\n\r\n" % NAME.encode())
                answer = b""
                while True:
                    chunk = tls.recv(65536)
                    if not chunk:
                        return answer
                    answer += chunk

    def count(ok, error):
        with lock:
            counts["ok" if ok else "failed"] += 1
            if error and len(errors) < 10:
                errors.append(error)

    def worker():
        while time.monotonic() < end:
            try:
                ok = b"hello from" in one()
                count(ok, None if ok else "no answer")
            except Exception as caught:  # noqa: BLE001 - every failure counts
                count(False, repr(caught))

    def read_exactly(tls, n):
        got = b""
        while len(got) < n:
            chunk = tls.recv(n - len(got))
            if not chunk:
                raise EOFError("closed after %d of %d bytes" % (len(got), n))
            got += chunk
        return got

    def echo():
        message = bytes(range(256)) * 4
        head = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n"
        while time.monotonic() < end:
            try:
                with socket.create_connection((host, int(port)), timeout=10) as raw:
                    with context.wrap_socket(raw, server_hostname=NAME) as tls:
                        tls.sendall(b"GET /echo HTTP/1.1\r\nhost: %s\r\n\r\n" % NAME.encode())
                        if read_exactly(tls, len(head)) != head:
                            raise ValueError("not the echo's head")
                        while time.monotonic() < end:
                            tls.sendall(message)
                            ok = read_exactly(tls, len(message)) == message
                            count(ok, None if ok else "the echo differs")
                        tls.unwrap()
            except Exception as caught:  # noqa: BLE001 - every failure counts
                count(False, repr(caught))

    threads = [threading.Thread(target=echo if TLS == "echo" else worker)
               for _ in range(CONNECTIONS)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = counts["ok"] + counts["failed"]
    return total / (time.monotonic() - start), total, counts["failed"], "\n".join(errors)


def wrk():
    if TLS:
        return tls_load()
    out = subprocess.run(["wrk", "-t2", "-c%d" % CONNECTIONS, "-d%ds" % DURATION, "--timeout", "10s",
                          url],
                         capture_output=True, text=True, timeout=DURATION + 120).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    failed = 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errors:
        failed += sum(int(n) for n in errors.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        failed += int(non2xx.group(1))
    return rps, total, failed, out


print("== upgrade in place under load: %s -c%d -d%ds against %s ==" % (
    {"1": "TLS connections", "echo": "one TLS connection's echo"}.get(TLS, "wrk -t2"),
    CONNECTIONS, DURATION, url))
upgrades = []
for round in range(1, ROUNDS + 1):
    rps, total, failed, _ = wrk()
    print("round %d anchor (no upgrade): %.0f req/s, %d requests, %d failed" % (round, rps, total, failed))
    before = instance_pids()
    result = {}

    def upgrade():
        time.sleep(DURATION / 3)
        shutil.copy2(NEW, binary + ".new")
        os.rename(binary + ".new", binary)
        start = time.monotonic()
        view = cli("upgrade")
        result["wall"] = (time.monotonic() - start) * 1000
        result["view"] = view

    thread = threading.Thread(target=upgrade)
    thread.start()
    rps, total, failed, out = wrk()
    thread.join()
    view = result["view"]
    after = instance_pids()
    upgrades.append((failed, view["last_upgrade_ms"], result["wall"]))
    print("round %d upgrade: %.0f req/s, %d requests, %d failed; upgrade %d ms (daemon: request → "
          "serving), %.0f ms (revboot upgrade wall), %d instance(s) handed over, pids %s"
          % (round, rps, total, failed, view["last_upgrade_ms"], result["wall"],
             view.get("last_upgrade_instances", 0), "kept" if after == before else
             "CHANGED %s → %s" % (before, after)))
    if failed:
        print(out)
fails = [u[0] for u in upgrades]
ms = [u[1] for u in upgrades]
print("failed requests during upgrades: %d..%d (goal 0); upgrade duration %d..%d ms"
      % (min(fails), max(fails), min(ms), max(ms)))
daemon.terminate()
try:
    daemon.wait(timeout=60)
except subprocess.TimeoutExpired:
    daemon.kill()
shutil.rmtree(tmp, ignore_errors=True)
PY

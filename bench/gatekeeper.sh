#!/usr/bin/env bash
# Per-client gatekeepers (examples/gatekeeper) through the whole daemon.
#
# Starts `revboot serve` on free loopback ports in a temporary data directory with a legacy
# backend (a tiny HTTP server on 127.0.0.1), pushes examples/gatekeeper with stock git
# (its upstream pointed at the backend), then:
#   1. summon → first byte: for each of RUNS new clients (a fresh source address each),
#      a DNS A query from that address (the per-client summon), a TCP connect from it to
#      the answered address through the handshake proxy, `GET /api/x`, first response byte
#      (which the backend produced, through the gatekeeper and its upstream grant). Beside
#      it, the same from a warm client: the floor. p50/p90 and the ratio;
#   2. memory per gatekeeper: RSS of each gatekeeper process and the usage of its memory
#      cgroup, with every gatekeeper of step 3 running;
#   3. capacity: more clients until CAP (the daemon's `max_clients_per_service`) hold a
#      gatekeeper each; then every one of them is asked once more (all must answer), and one
#      client more must be refused by DNS with the cap's reason.
# Clients are spread over many /24s (127.1.x.y and up), so that the DNS boot rate limit per /24
# does not pace the run. All traffic stays on 127.0.0.0/8.
#
#   bench/gatekeeper.sh [RUNS] [CAP]      (default 50 and 500; REVBOOT_PROFILE=release|dev,
#                                          or REVBOOT_BIN=<a built revboot>)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-50}
cap=${2:-500}
profile=${REVBOOT_PROFILE:-dev}
if [ -n "${REVBOOT_BIN:-}" ]; then
    exe=$REVBOOT_BIN
    profile="given ($exe)"
elif [ "$profile" = release ]; then
    cargo build --release --locked -q -p revboot
    exe=target/release/revboot
else
    cargo build --locked -q -p revboot
    exe=target/debug/revboot
fi
exec python3 - "$exe" "$runs" "$cap" "$profile" <<'PY'
import importlib.util, json, os, random, shutil, socket, socketserver, statistics, struct, subprocess, sys
import tempfile, threading, time, urllib.request

EXE, RUNS, CAP, PROFILE = os.path.abspath(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ROOT = os.getcwd()
TOKEN = "bench-token"
NAME = "gatekeeper.revboot.test"


# Waiting for the daemon to serve, and where it serves, is bench/e2e-cold.py's.
_spec = importlib.util.spec_from_file_location("e2e_cold", os.path.join(ROOT, "bench", "e2e-cold.py"))
E2E = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(E2E)


class Backend(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        self.connection.settimeout(10)
        while True:
            line = self.rfile.readline(65536)
            if not line or line in (b"\r\n", b"\n"):
                break
        body = b"legacy backend answer\n"
        self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                         % (len(body), body))


def dns_query(server, name, source, edns=False):
    qid = random.randrange(65536)
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    for label in name.split("."):
        packet += bytes([len(label)]) + label.encode()
    packet += b"\x00" + struct.pack(">HH", 1, 1)
    if edns:
        # OPT: root name, type 41, 1232-byte payload, no flags, no options (room for EDE).
        packet += b"\x00" + struct.pack(">HHIH", 41, 1232, 0, 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(10)
        s.sendto(packet, server)
        reply = s.recv(4096)
    ancount = struct.unpack(">H", reply[6:8])[0]
    if ancount < 1:
        return None, reply[3] & 15, reply
    return socket.inet_ntoa(reply[-4:]), 0, reply


def request(address, source):
    with socket.socket() as s:
        s.settimeout(20)
        s.bind((source, 0))
        s.connect((address, 8080))
        s.sendall(b"GET /api/x HTTP/1.1\r\nHost: " + NAME.encode() + b"\r\n\r\n")
        first = s.recv(1)
        t = time.perf_counter()
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    body = first + rest
    if b"legacy backend answer" not in body:
        raise RuntimeError("no backend answer for %s: %r" % (source, body[:200]))
    return t


def api(http, method, path, body=None):
    req = urllib.request.Request(
        "http://%s%s" % (http, path), method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": "Bearer " + TOKEN, "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def client(n):
    # 4 clients per /24, each asking at most 4 times: inside the DNS boot burst of a prefix.
    block = n // 4
    return "127.%d.%d.%d" % (1 + block // 256, block % 256, n % 4 + 1)


def gatekeepers():
    """(pid, VmRSS KiB, memory cgroup usage bytes, PSS KiB) of every gatekeeper of this run."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/environ" % entry, "rb") as f:
                env = f.read().split(b"\0")
            if b"REVBOOT_SERVICE=gatekeeper" not in env or b"GATEKEEPER_BENCH=1" not in env:
                continue
            with open("/proc/%s/status" % entry) as f:
                rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
            # Proportional set size: shared pages (the image's text) split among sharers.
            with open("/proc/%s/smaps_rollup" % entry) as f:
                pss = next(int(l.split()[1]) for l in f if l.startswith("Pss:"))
            usage = None
            with open("/proc/%s/cgroup" % entry) as f:
                for line in f:
                    _, controllers, path = line.strip().split(":", 2)
                    if controllers == "memory":
                        base = "/sys/fs/cgroup/memory" + path
                        with open(base + "/memory.usage_in_bytes") as u:
                            usage = int(u.read())
                    elif controllers == "" and usage is None:
                        current = "/sys/fs/cgroup" + path + "/memory.current"
                        if os.path.exists(current):
                            with open(current) as u:
                                usage = int(u.read())
            found.append((int(entry), rss, usage, pss))
        except (OSError, StopIteration, ValueError):
            continue
    return found


def main():
    work = tempfile.mkdtemp(prefix="revboot-gk-bench-")
    backend = Backend(("127.0.0.1", 0), Handler)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    backend_port = backend.server_address[1]
    config = os.path.join(work, "revbootd.toml")
    with open(config, "w") as f:
        f.write("[instances]\nmax_total = %d\nmax_per_service = %d\nmax_clients_per_service = %d\n"
                "idle_timeout_ms = 900000\n" % (CAP + 64, CAP + 64, CAP))
    log_path = os.path.join(work, "daemon.log")
    log = open(log_path, "w")
    daemon = subprocess.Popen([EXE, "--config", config, "--data", os.path.join(work, "data"),
                               "serve", "--http", "127.0.0.1:0", "--dns", "127.0.0.1:0",
                               "--pool", "127.67.0.0/16", "--token", TOKEN],
                              stdout=log, stderr=log,
                              env=dict(os.environ, RUST_LOG="warn,revboot::daemon=info"))
    try:
        http, dns = E2E.wait_serving(daemon, log_path)
        src = os.path.join(work, "gatekeeper")
        shutil.copytree(os.path.join(ROOT, "examples/gatekeeper"), src,
                        ignore=shutil.ignore_patterns("target"))
        manifest = os.path.join(src, "revboot.toml")
        with open(manifest) as f:
            text = f.read().replace('"127.0.0.1:9000"', '"127.0.0.1:%d"' % backend_port)
        # Marks this run's gatekeepers, so that memory is read only for them.
        text = text.replace("[run.env]\n", "[run.env]\nGATEKEEPER_BENCH = \"1\"\n")
        with open(manifest, "w") as f:
            f.write(text)
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@revboot.test"]
        subprocess.run(git + ["init", "-q", "-b", "main"], cwd=src, check=True)
        subprocess.run(git + ["add", "."], cwd=src, check=True)
        subprocess.run(git + ["commit", "-qm", "gatekeeper"], cwd=src, check=True)
        subprocess.run(["git", "push", "-q", "http://git:%s@%s/git/gatekeeper.git" % (TOKEN, http),
                        "main"], cwd=src, check=True, stderr=subprocess.DEVNULL)

        # 1. Cold per-client summon → first byte, and the warm floor.
        cold_dns, cold_first, warm_first = [], [], []
        for n in range(RUNS):
            source = client(n)
            t0 = time.perf_counter()
            address, rcode, _ = dns_query(dns, NAME, source)
            t1 = time.perf_counter()
            if address is None:
                raise RuntimeError("client %s refused: rcode %d" % (source, rcode))
            t2 = request(address, source)
            cold_dns.append(t1 - t0)
            cold_first.append(t2 - t0)
            t0 = time.perf_counter()
            again, _, _ = dns_query(dns, NAME, source)
            warm_first.append(request(again, source) - t0)
        ms = lambda v: "%.2f ms" % (v * 1000)
        print("per-client gatekeepers, %s build, %d cold clients (process tender, DNS + proxy + upstream grant)"
              % (PROFILE, RUNS))
        print("  cold: DNS answer (summon)       p50 %s  p90 %s" % (ms(pct(cold_dns, 50)), ms(pct(cold_dns, 90))))
        print("  cold: summon -> first byte      p50 %s  p90 %s" % (ms(pct(cold_first, 50)), ms(pct(cold_first, 90))))
        print("  warm: DNS -> first byte         p50 %s  p90 %s" % (ms(pct(warm_first, 50)), ms(pct(warm_first, 90))))
        print("  ratio cold/warm first byte p50: %.1fx" % (pct(cold_first, 50) / pct(warm_first, 50)))

        # 3. Fill up to the cap; every client answered once on the way.
        started = time.perf_counter()
        addresses = {}
        for n in range(CAP):
            source = client(n)
            address, rcode, _ = dns_query(dns, NAME, source)
            if address is None:
                print("  capacity: client %d (%s) refused before the cap: rcode %d" % (n + 1, source, rcode))
                break
            if n >= RUNS:
                try:
                    request(address, source)
                except Exception as error:
                    print("  capacity: client %d (%s) not served: %s" % (n + 1, source, error))
                    log.flush()
                    with open(os.path.join(work, "daemon.log"), errors="replace") as f:
                        tail = [l.rstrip() for l in f if "WARN" in l or "ERROR" in l][-4:]
                    for line in tail:
                        print("    daemon: " + line[:300])
                    break
            addresses[source] = address
        held = len(addresses)
        fill = time.perf_counter() - started
        with open("/proc/%d/limits" % daemon.pid) as f:
            nofile = next(l.split()[3] for l in f if l.startswith("Max open files"))
        print("  daemon: %d open fds (limit %s), %d threads" % (
            len(os.listdir("/proc/%d/fd" % daemon.pid)), nofile,
            len(os.listdir("/proc/%d/task" % daemon.pid))))

        # 2. Memory, with them all running.
        running = gatekeepers()
        rss = [r for _, r, _, _ in running]
        pss = [p for _, _, _, p in running]
        usage = [u for _, _, u, _ in running if u is not None]
        if rss:
            print("  memory per gatekeeper (%d running): RSS p50 %.0f KiB (mean %.0f, max %.0f); "
                  "PSS p50 %.0f KiB (mean %.0f, max %.0f)"
                  % (len(rss), pct(rss, 50), statistics.mean(rss), max(rss),
                     pct(pss, 50), statistics.mean(pss), max(pss)))
        if usage:
            print("  memory cgroup usage per gatekeeper: p50 %.0f KiB (mean %.0f, max %.0f); "
                  "host MemAvailable now %s"
                  % (pct(usage, 50) / 1024, statistics.mean(usage) / 1024, max(usage) / 1024,
                     next(l.split(None, 1)[1].strip() for l in open("/proc/meminfo")
                          if l.startswith("MemAvailable"))))

        # Every held client still answers, through its own gatekeeper.
        failures = 0
        for source, address in addresses.items():
            try:
                again, _, _ = dns_query(dns, NAME, source)
                if again != address:
                    raise RuntimeError("address moved from %s to %s" % (address, again))
                request(address, source)
            except Exception as error:
                failures += 1
                if failures <= 10:
                    print("  client %s lost its gatekeeper: %s" % (source, error))
        instances = [i for i in api(http, "GET", "/api/v1/instances") if i["service"] == "gatekeeper"]
        clients = {i["client"] for i in instances}
        print("  capacity: %d concurrent clients held (cap %d) in %.1f s; %d answered again; "
              "%d distinct clients in `ps`" % (held, CAP, fill, held - failures, len(clients)))
        over, rcode, reply = dns_query(dns, NAME, client(CAP + 5), edns=True)
        cap_text = b"Per-client instance limit" in reply
        print("  one client more: %s (%s)" % ("refused, rcode %d" % rcode if over is None else "answered",
                                            "cap reason in EDE" if cap_text else "no cap reason"))
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()
        backend.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
PY

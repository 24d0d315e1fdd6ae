#!/usr/bin/env python3
"""End-to-end cold request through the whole daemon: DNS query + connect + first byte.

Starts `revboot serve` on loopback ports it picks itself (port 0; the daemon says which in its
`revboot is serving` line) in a temporary data directory, pushes
examples/hello with stock git, then N times: stop every instance (API), and time
  1. a DNS A query for the live name over UDP (answered at once, the boot starts),
  2. a TCP connect to the answered address through the handshake proxy,
  3. the first byte of the HTTP response (the instance is now booted and ready).
Beside it, the same request to the instance once warm (the floor of steps 1-3).
Prints p50/p99 of each and the ratio cold/warm.

usage: bench/e2e-cold.py [N] [--direct]   (default 1000; run as root from the repository root)
  --direct: `[instances] direct = true`, clients reach the instance's own socket (no proxy)
"""
import json, os, random, shutil, socket, struct, subprocess, sys, tempfile, time, urllib.request

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
DIRECT = "--direct" in sys.argv[1:]
N = int(ARGS[0]) if ARGS else 1000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "bench-token"


def wait_serving(daemon, log_path, timeout=60):
    """Waits (bounded) for the daemon's `revboot is serving` line and returns where it serves:
    (HTTP "host:port", DNS (host, port)). The daemon binds port 0 and says which port it got:
    a port found free here and released could be taken by anyone before the daemon binds it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, errors="replace") as f:
            for line in f:
                if "revboot is serving" in line:
                    fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
                    host, port = fields["dns"].rsplit(":", 1)
                    return fields["http"], (host, int(port))
        if daemon.poll() is not None:
            raise RuntimeError("daemon exited before serving; see " + log_path)
        time.sleep(0.05)
    raise RuntimeError("daemon did not serve within %d s; see %s" % (timeout, log_path))


def dns_query(server, name):
    qid = random.randrange(65536)
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        packet += bytes([len(label)]) + label.encode()
    packet += b"\x00" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(packet, server)
        reply = s.recv(4096)
    # The answer's last 4 bytes are the A record's address (single answer, no EDNS).
    ancount = struct.unpack(">H", reply[6:8])[0]
    if ancount < 1:
        raise RuntimeError("no answer: rcode %d" % (reply[3] & 15))
    return socket.inet_ntoa(reply[-4:])


def request(address, name, port=8080):
    t0 = time.perf_counter()
    with socket.create_connection((address, port), timeout=10) as s:
        t1 = time.perf_counter()
        s.sendall(b"GET / HTTP/1.1\r\nHost: " + name.encode() + b"\r\n\r\n")
        first = s.recv(1)
        t2 = time.perf_counter()
        if not first:
            raise RuntimeError("connection closed without an answer")
        while s.recv(65536):
            pass
    return t1 - t0, t2 - t0


def api(http, method, path, body=None):
    req = urllib.request.Request(
        "http://%s%s" % (http, path), method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": "Bearer " + TOKEN, "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def main():
    exe = os.path.join(ROOT, "target/release/revboot")
    subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "revboot"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="revboot-bench-")
    log_path = os.path.join(work, "daemon.log")
    log = open(log_path, "w")
    # The bench is one client booting on purpose, as fast as it can: lift the per-client
    # boot limit that protects the daemon from floods.
    config = os.path.join(work, "revbootd.toml")
    with open(config, "w") as f:
        f.write("[dns]\nboots_per_second = 100000\nboot_burst = 100000\nresponses_per_second = 0\n")
        if DIRECT:
            f.write("[instances]\ndirect = true\n")
    daemon = subprocess.Popen([exe, "--config", config, "--data", os.path.join(work, "data"), "serve", "--http", "127.0.0.1:0",
                               "--dns", "127.0.0.1:0", "--pool", "127.66.0.0/16", "--token", TOKEN],
                              stdout=log, stderr=log)
    try:
        http, dns = wait_serving(daemon, log_path)
        src = os.path.join(work, "hello")
        shutil.copytree(os.path.join(ROOT, "examples/hello"), src, ignore=shutil.ignore_patterns("target"))
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@revboot.test"]
        subprocess.run(git + ["init", "-q", "-b", "main"], cwd=src, check=True)
        subprocess.run(git + ["add", "."], cwd=src, check=True)
        subprocess.run(git + ["commit", "-qm", "hello v1"], cwd=src, check=True)
        subprocess.run(["git", "push", "-q", "http://git:%s@%s/git/hello.git" % (TOKEN, http), "main"],
                       cwd=src, check=True, stderr=subprocess.DEVNULL)
        name = "hello.revboot.test"
        cold_dns, cold_connect, cold_first = [], [], []
        warm_dns, warm_first = [], []
        for i in range(N):
            for inst in api(http, "GET", "/api/v1/instances"):
                try:
                    api(http, "POST", "/api/v1/instances/stop", {"service": inst["service"], "kill": True})
                except Exception:
                    pass
            t0 = time.perf_counter()
            address = dns_query(dns, name)
            t1 = time.perf_counter()
            connect, first = request(address, name)
            cold_dns.append(t1 - t0)
            cold_connect.append(t1 - t0 + connect)
            cold_first.append(t1 - t0 + first)
            # Warm: the same query and request again, instance running.
            t0 = time.perf_counter()
            address = dns_query(dns, name)
            t1 = time.perf_counter()
            _, first = request(address, name)
            warm_dns.append(t1 - t0)
            warm_first.append(t1 - t0 + first)
        ms = lambda v: "%.2f ms" % (v * 1000)
        path = "DNS, no proxy (direct)" if DIRECT else "DNS + proxy"
        print("end-to-end over %d cold starts (examples/hello, process tender, through %s)" % (N, path))
        print("  cold: DNS answer      p50 %s  p99 %s" % (ms(pct(cold_dns, 50)), ms(pct(cold_dns, 99))))
        print("  cold: + connect       p50 %s  p99 %s" % (ms(pct(cold_connect, 50)), ms(pct(cold_connect, 99))))
        print("  cold: + first byte    p50 %s  p99 %s" % (ms(pct(cold_first, 50)), ms(pct(cold_first, 99))))
        print("  warm: DNS + first byte p50 %s  p99 %s" % (ms(pct(warm_first, 50)), ms(pct(warm_first, 99))))
        print("  ratio cold/warm first byte p50: %.1fx" % (pct(cold_first, 50) / pct(warm_first, 50)))
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

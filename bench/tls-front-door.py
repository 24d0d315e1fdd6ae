#!/usr/bin/env python3
"""TLS at the front door, against plain TCP, and how long a new service waits for its
certificate, all against pebble (the ACME test server) resolving through revboot's DNS.

Starts pebble and `revboot serve` on fixed ports of addresses in 127.66.220.0/24 (loopback,
apart from the tests' ranges and a daemon's defaults), with `[acme]` and `[tls] acme = true`;
pushes examples/hello with `reach = "front"` and `tls = "terminate"` over https, then, in one
run, N times each, interleaved:
  1. cold TLS:   stop every instance, then connect to the front door's TLS port, handshake
                 (SNI hello.revboot.test, verified with pebble's root), GET /, first byte;
  2. cold plain: stop every instance, then connect to the front door's HTTP port, GET /
                 with Host hello.revboot.test, first byte;
  3. warm TLS and warm plain: the same with the instance running.
Prints p50/p99 of the handshake and of the first byte, and the TLS/plain ratios. Then M
times: `POST /api/v1/services` and the time until the API shows that service's certificate
(`*.<service>.<zone>` + `<service>.<zone>`) valid, i.e. served at the next handshake.

usage: bench/tls-front-door.py [N] [M]   (defaults 200 and 5; as root, from the repository root)
  REVBOOT_BIN: the binary to run (default: target/release/revboot, built first)
"""
import http.client, json, os, shutil, socket, ssl, subprocess, sys, tempfile, time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
M = int(sys.argv[2]) if len(sys.argv) > 2 else 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "bench-token"
ZONE = "revboot.test"
NET = "127.66.220"
HTTP = (NET + ".1", 8443)
FRONT_IP = NET + ".2"
FRONT_TLS, FRONT_HTTP = (FRONT_IP, 8443), (FRONT_IP, 8080)
DNS = (NET + ".253", 5353)
PEBBLE = NET + ".252"


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def wait_for(check, what, limit=120):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.02)
    raise RuntimeError("gave up waiting for " + what)


class Api:
    """The daemon's API over https to its own name, verified with pebble's root."""

    def __init__(self, root):
        self.ctx = ssl.create_default_context(cafile=root)

    def call(self, method, path, body=None):
        conn = http.client.HTTPSConnection(ZONE, HTTP[1], timeout=30, context=self.ctx)
        conn.sock = self.ctx.wrap_socket(socket.create_connection(HTTP, timeout=30), server_hostname=ZONE)
        headers = {"authorization": "Bearer " + TOKEN, "content-type": "application/json"}
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        answer = conn.getresponse()
        text = answer.read()
        conn.close()
        if answer.status >= 300:
            raise RuntimeError("%s %s: %d %s" % (method, path, answer.status, text[:200]))
        return json.loads(text) if text else None

    def certificate(self, cert_id):
        for cert in self.call("GET", "/api/v1/daemon").get("certificates", []):
            if cert["id"] == cert_id:
                return cert
        return {}

    def stop_all(self):
        for inst in self.call("GET", "/api/v1/instances"):
            try:
                self.call("POST", "/api/v1/instances/stop", {"service": inst["service"], "kill": True})
            except Exception:
                pass


def tls_first_byte(ctx, name):
    t0 = time.perf_counter()
    with socket.create_connection(FRONT_TLS, timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as s:
            t1 = time.perf_counter()
            s.sendall(b"GET / HTTP/1.1\r\nHost: " + name.encode() + b"\r\nConnection: close\r\n\r\n")
            if not s.recv(1):
                raise RuntimeError("TLS: closed without an answer")
            t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def plain_first_byte(name):
    t0 = time.perf_counter()
    with socket.create_connection(FRONT_HTTP, timeout=30) as s:
        t1 = time.perf_counter()
        s.sendall(b"GET / HTTP/1.1\r\nHost: " + name.encode() + b"\r\nConnection: close\r\n\r\n")
        if not s.recv(1):
            raise RuntimeError("plain: closed without an answer")
        t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def main():
    exe = os.environ.get("REVBOOT_BIN")
    if not exe:
        exe = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release/revboot")
        subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "revboot"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="revboot-tls-bench-")
    procs = []
    try:
        # pebble's own HTTPS certificate, from a CA of the bench's.
        ca, key = os.path.join(work, "ca.pem"), os.path.join(work, "ca.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", ca, "-days", "2", "-subj", "/CN=bench CA"],
                       check=True, capture_output=True)
        pkey, pcsr, pcert = (os.path.join(work, n) for n in ("pebble.key", "pebble.csr", "pebble.pem"))
        subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                        "-keyout", pkey, "-out", pcsr, "-subj", "/CN=pebble"], check=True, capture_output=True)
        ext = os.path.join(work, "san.ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=IP:%s\n" % PEBBLE)
        subprocess.run(["openssl", "x509", "-req", "-in", pcsr, "-CA", ca, "-CAkey", key, "-CAcreateserial",
                        "-out", pcert, "-days", "2", "-extfile", ext], check=True, capture_output=True)
        config = os.path.join(work, "pebble.json")
        with open(config, "w") as f:
            json.dump({"pebble": {"listenAddress": PEBBLE + ":14000", "managementListenAddress": PEBBLE + ":15000",
                                  "certificate": pcert, "privateKey": pkey, "httpPort": 5002, "tlsPort": 5001,
                                  "ocspResponderURL": "", "externalAccountBindingRequired": False}}, f)
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        plog = open(os.path.join(work, "pebble.log"), "w")
        procs.append(subprocess.Popen(["pebble", "-config", config, "-dnsserver", "%s:%d" % DNS],
                                      env=env, stdout=plog, stderr=plog))
        pebble_ctx = ssl.create_default_context(cafile=ca)

        def pebble_get(port, path):
            conn = http.client.HTTPSConnection(PEBBLE, port, timeout=10, context=pebble_ctx)
            conn.request("GET", path)
            return conn.getresponse().read().decode()

        wait_for(lambda: pebble_get(14000, "/dir"), "pebble")
        root = os.path.join(work, "root.pem")
        with open(root, "w") as f:
            f.write(pebble_get(15000, "/roots/0"))

        daemon_config = os.path.join(work, "revbootd.toml")
        with open(daemon_config, "w") as f:
            f.write("[dns]\nboots_per_second = 100000\nboot_burst = 100000\nresponses_per_second = 0\n")
            f.write('[front]\nhttp = "%s:%d"\ntls = "%s:%d"\n' % (FRONT_HTTP + FRONT_TLS))
            f.write("[tls]\nacme = true\n")
            f.write('[acme]\ndirectory = "https://%s:14000/dir"\nca = "%s"\n' % (PEBBLE, ca))
            f.write("check_ms = 100\nretry_min_ms = 500\nretry_max_ms = 4000\n")
        dlog = open(os.path.join(work, "daemon.log"), "w")
        procs.append(subprocess.Popen(
            [exe, "--config", daemon_config, "--data", os.path.join(work, "data"), "serve",
             "--http", "%s:%d" % HTTP, "--dns", "%s:%d" % DNS, "--pool", "127.66.221.0/24", "--token", TOKEN],
            stdout=dlog, stderr=dlog))
        api = Api(root)
        wait_for(lambda: api.certificate("_daemon").get("state") == "valid", "the daemon's certificate")

        src = os.path.join(work, "hello")
        shutil.copytree(os.path.join(ROOT, "examples/hello"), src, ignore=shutil.ignore_patterns("target"))
        with open(os.path.join(src, "revboot.toml"), "a") as f:
            f.write('reach = "front"\ntls = "terminate"\n')
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@revboot.test"]
        subprocess.run(git + ["init", "-q", "-b", "main"], cwd=src, check=True)
        subprocess.run(git + ["add", "."], cwd=src, check=True)
        subprocess.run(git + ["commit", "-qm", "hello v1"], cwd=src, check=True)
        subprocess.run(["git", "-c", "http.curloptResolve=%s:%d:%s" % (ZONE, HTTP[1], HTTP[0]), "push", "-q",
                        "https://git:%s@%s:%d/git/hello.git" % (TOKEN, ZONE, HTTP[1]), "main"],
                       cwd=src, check=True, stderr=subprocess.DEVNULL, env=dict(os.environ, GIT_SSL_CAINFO=root))
        wait_for(lambda: api.certificate("hello").get("state") == "valid", "hello's certificate")

        name = "hello." + ZONE
        ctx = ssl.create_default_context(cafile=root)
        runs = {k: [] for k in ("cold_tls_hs", "cold_tls", "cold_plain", "warm_tls_hs", "warm_tls", "warm_plain")}
        for _ in range(N):
            api.stop_all()
            hs, first = tls_first_byte(ctx, name)
            runs["cold_tls_hs"].append(hs)
            runs["cold_tls"].append(first)
            hs, first = tls_first_byte(ctx, name)
            runs["warm_tls_hs"].append(hs)
            runs["warm_tls"].append(first)
            api.stop_all()
            runs["cold_plain"].append(plain_first_byte(name)[1])
            runs["warm_plain"].append(plain_first_byte(name)[1])
        ms = lambda v: "%7.2f ms" % (v * 1000)
        line = lambda label, key: print("  %-34s p50 %s  p99 %s" % (label, ms(pct(runs[key], 50)), ms(pct(runs[key], 99))))
        print("front door over %d rounds (examples/hello, process tender, %s)" % (N, exe))
        line("cold: TLS handshake", "cold_tls_hs")
        line("cold: TLS handshake + first byte", "cold_tls")
        line("cold: plain TCP first byte", "cold_plain")
        line("warm: TLS handshake", "warm_tls_hs")
        line("warm: TLS handshake + first byte", "warm_tls")
        line("warm: plain TCP first byte", "warm_plain")
        print("  ratio TLS/plain first byte: cold p50 %.2fx p99 %.2fx, warm p50 %.2fx p99 %.2fx" % (
            pct(runs["cold_tls"], 50) / pct(runs["cold_plain"], 50), pct(runs["cold_tls"], 99) / pct(runs["cold_plain"], 99),
            pct(runs["warm_tls"], 50) / pct(runs["warm_plain"], 50), pct(runs["warm_tls"], 99) / pct(runs["warm_plain"], 99)))

        waits = []
        for i in range(M):
            service = "bench%d" % i
            t0 = time.perf_counter()
            api.call("POST", "/api/v1/services", {"name": service})
            wait_for(lambda: api.certificate(service).get("state") == "valid", service + "'s certificate")
            waits.append(time.perf_counter() - t0)
        print("service add to a usable certificate (pebble, DNS-01 through revboot's DNS), %d services:" % M)
        print("  p50 %s  max %s" % (ms(pct(waits, 50)), ms(max(waits))))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

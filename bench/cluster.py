#!/usr/bin/env python3
"""A revboot cluster on one machine: replication lag (deployments and sources) and failover.

Starts a 3-member etcd (Debian etcd-server) and three `revboot serve` nodes with `[cluster]`,
all on loopback addresses of their own (etcd on 127.<a>.<b>.1-3, ports no default etcd
uses; the daemons on port 0 of 127.0.0.1, read from their 'revboot is serving' lines), then:

  1. Replication lag, N times: a new commit of examples/hello pushed to node 1 (the push
     returns once the deployment is written there) -> the deployment is on the other two
     nodes (their refs/heads/hello names it: fetched by git, bootable there), and, from the
     same pushes side by side, the source commit is on the other two nodes (their source
     repository's refs/heads/main names it: moved through etcd, fetched by git).
  2. Failover, K times: the owner of a revision's name (the node whose pool holds the address
     every node answers) is killed with SIGKILL -> both survivors answer the name with an
     address of a live node (polled every 20 ms over UDP). The killed node is started again
     and waited for before the next round.

  3. Rename lag, R times (after 2): the service renamed on node 3 through the API (the
     request returns once etcd and node 3 have it) -> nodes 1 and 2 have renamed it too
     (the new name's source repository and live pointer there, the old one's gone), side
     by side with the source replication lag of 1, from the same run.

Prints p50/p99/max of each, and the membership lease's TTL the failover is bound by.

usage: bench/cluster.py [N] [K] [R]   (default 20 20 10; K = 0 skips failover, R = 0 the
       renames; as root, from the repository root)
  REVBOOT=<binary> runs that binary (default: target/release/revboot, built first)
"""
import json, os, random, re, shutil, socket, struct, subprocess, sys, tempfile, time, urllib.request

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20
K = int(sys.argv[2]) if len(sys.argv) > 2 else 20
R = int(sys.argv[3]) if len(sys.argv) > 3 else 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "bench-token"
TTL_S = 2


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def dns_a(server, name, timeout=1.0):
    """The A address answered for `name`, or None (SERVFAIL, NXDOMAIN, no answer)."""
    qid = random.randrange(65536)
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        packet += bytes([len(label)]) + label.encode()
    packet += b"\x00" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(packet, server)
            reply = s.recv(4096)
        except OSError:
            return None
    if reply[3] & 15 or struct.unpack(">H", reply[6:8])[0] < 1:
        return None
    return socket.inet_ntoa(reply[-4:])


def api(http, path, body=None):
    req = urllib.request.Request("http://%s%s" % (http, path),
                                 headers={"authorization": "Bearer " + TOKEN,
                                          "content-type": "application/json"},
                                 data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


class Etcd:
    def __init__(self, work):
        a, b = 30 + os.getpid() % 50, 251 + os.getpid() % 4
        self.ips = ["127.%d.%d.%d" % (a, b, i) for i in (1, 2, 3)]
        initial = ",".join("m%d=http://%s:32380" % (i + 1, ip) for i, ip in enumerate(self.ips))
        self.procs = []
        for i, ip in enumerate(self.ips):
            log = open(os.path.join(work, "etcd-m%d.log" % (i + 1)), "w")
            self.procs.append(subprocess.Popen(
                ["timeout", "-s", "KILL", "3600", "etcd", "--name", "m%d" % (i + 1),
                 "--data-dir", os.path.join(work, "etcd-m%d" % (i + 1)),
                 "--listen-client-urls", "http://%s:32379" % ip,
                 "--advertise-client-urls", "http://%s:32379" % ip,
                 "--listen-peer-urls", "http://%s:32380" % ip,
                 "--initial-advertise-peer-urls", "http://%s:32380" % ip,
                 "--initial-cluster", initial, "--initial-cluster-state", "new",
                 "--initial-cluster-token", "revboot-bench-%d" % os.getpid(),
                 "--heartbeat-interval", "100", "--election-timeout", "1000",
                 "--logger", "zap", "--log-level", "warn"],
                stdout=log, stderr=log))
        deadline = time.time() + 30
        while time.time() < deadline:
            if all(self.healthy(ip) for ip in self.ips):
                return
            time.sleep(0.1)
        raise SystemExit("etcd did not become healthy (see %s)" % work)

    @staticmethod
    def healthy(ip):
        try:
            with urllib.request.urlopen("http://%s:32379/health" % ip, timeout=2) as r:
                return b'"health":"true"' in r.read()
        except OSError:
            return False

    def endpoints(self):
        return "[%s]" % ", ".join('"http://%s:32379"' % ip for ip in self.ips)

    def stop(self):
        for proc in self.procs:
            # SIGKILL is not passed on by `timeout`: its child (etcd) first.
            try:
                children = open("/proc/%d/task/%d/children" % (proc.pid, proc.pid)).read().split()
            except OSError:
                children = []
            for child in children:
                subprocess.run(["kill", "-KILL", child])
            proc.kill()
            proc.wait()


class Node:
    def __init__(self, exe, work, etcd, index):
        self.id = "n%d" % index
        self.exe, self.work, self.etcd = exe, work, etcd
        self.data = os.path.join(work, self.id)
        self.pool = "127.%d.%d.0/24" % (200 + os.getpid() % 40, index)
        self.config = os.path.join(work, self.id + ".toml")
        with open(self.config, "w") as f:
            f.write("[dns]\nboots_per_second = 10000\nboot_burst = 10000\nresponses_per_second = 0\n"
                    "[instances]\nidle_timeout_ms = 3600000\n"
                    "[cluster]\netcd = %s\nnode = \"%s\"\nttl_s = %d\n"
                    % (etcd.endpoints(), self.id, TTL_S))
        self.launches = 0
        self.start()

    def start(self):
        self.launches += 1
        self.log = os.path.join(self.work, "%s.log.%d" % (self.id, self.launches))
        out = open(self.log, "w")
        self.proc = subprocess.Popen(
            [self.exe, "--config", self.config, "--data", self.data, "serve",
             "--http", "127.0.0.1:0", "--dns", "127.0.0.1:0", "--pool", self.pool,
             "--token", TOKEN], stdout=out, stderr=out, env=dict(os.environ, RUST_LOG="info"))
        deadline = time.time() + 60
        while time.time() < deadline:
            text = open(self.log).read()
            m = re.search(r"revboot is serving.*? http=(\S+) dns=(\S+)", text)
            if m:
                self.http = m.group(1)
                host, port = m.group(2).rsplit(":", 1)
                self.dns = (host, int(port))
                return
            if self.proc.poll() is not None:
                raise SystemExit("node %s exited:\n%s" % (self.id, text[-3000:]))
            time.sleep(0.05)
        raise SystemExit("node %s did not serve" % self.id)

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def owns(self, address):
        return address is not None and address.startswith(self.pool.rsplit(".", 1)[0] + ".")

    def tip(self, repo="deploy.git", ref="refs/heads/hello"):
        out = subprocess.run(["git", "-C", os.path.join(self.data, repo), "rev-parse",
                              "--verify", "-q", ref], capture_output=True, text=True)
        return out.stdout.strip()

    def source(self):
        return self.tip("src/hello.git", "refs/heads/main")


def git(work, *args):
    done = subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@revboot.test",
                           *args], cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit("git %s failed:\n%s" % (args[0], done.stderr[-3000:]))


def main():
    exe = os.environ.get("REVBOOT")
    if not exe:
        exe = os.path.join(ROOT, "target/release/revboot")
        subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "revboot"],
                       cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="revboot-bench-cluster-")
    etcd = Etcd(work)
    nodes = []
    try:
        nodes = [Node(exe, work, etcd, i) for i in (1, 2, 3)]
        deadline = time.time() + 30
        while len(api(nodes[0].http, "/api/v1/nodes")["nodes"]) < 3:
            if time.time() > deadline:
                raise SystemExit("the nodes did not all join")
            time.sleep(0.1)
        src = os.path.join(work, "hello")
        shutil.copytree(os.path.join(ROOT, "examples/hello"), src,
                        ignore=shutil.ignore_patterns("target"))
        git(src, "init", "-q", "-b", "main")
        git(src, "add", ".")
        git(src, "commit", "-qm", "hello v1")
        remote = "http://git:%s@%s/git/hello.git" % (TOKEN, nodes[0].http)

        # 1. Replication lag.
        lags, source_lags = [], []
        for i in range(N):
            with open(os.path.join(src, "CHANGES"), "a") as f:
                f.write("change %d\n" % i)
            git(src, "add", "-A")
            git(src, "commit", "-qm", "hello change %d" % i)
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, check=True,
                                    capture_output=True, text=True).stdout.strip()
            git(src, "push", "-q", remote, "main")
            t0 = time.perf_counter()
            tip = nodes[0].tip()
            lag = source_lag = None
            while lag is None or source_lag is None:
                if time.perf_counter() - t0 > 120:
                    raise SystemExit("replication took over 120 s")
                if lag is None and all(n.tip() == tip for n in nodes[1:]):
                    lag = time.perf_counter() - t0
                if source_lag is None and all(n.source() == commit for n in nodes[1:]):
                    source_lag = time.perf_counter() - t0
                time.sleep(0.005)
            lags.append(lag)
            source_lags.append(source_lag)
        print("replication lag (push to node 1 returned -> on nodes 2 and 3), %d pushes: "
              "p50 %.0f ms, p99 %.0f ms, max %.0f ms"
              % (N, pct(lags, 50) * 1000, pct(lags, 99) * 1000, max(lags) * 1000))
        print("source replication lag (same pushes -> source commit on nodes 2 and 3): "
              "p50 %.0f ms, p99 %.0f ms, max %.0f ms; load average %.1f"
              % (pct(source_lags, 50) * 1000, pct(source_lags, 99) * 1000,
                 max(source_lags) * 1000, os.getloadavg()[0]))

        # 2. Failover.
        name = "%s.hello.revboot.test" % nodes[0].tip()[:12]
        times = []
        for k in range(K):
            deadline = time.time() + 60
            while True:
                answers = [dns_a(n.dns, name) for n in nodes]
                if answers[0] and all(a == answers[0] for a in answers):
                    break
                if time.time() > deadline:
                    raise SystemExit("the nodes do not agree on %s: %s" % (name, answers))
                time.sleep(0.05)
            owner = next(n for n in nodes if n.owns(answers[0]))
            survivors = [n for n in nodes if n is not owner]
            owner.kill()
            t0 = time.perf_counter()
            while True:
                got = [dns_a(n.dns, name, 0.2) for n in survivors]
                if all(a and any(s.owns(a) for s in survivors) for a in got):
                    break
                if time.perf_counter() - t0 > 60:
                    raise SystemExit("failover took over 60 s")
                time.sleep(0.02)
            times.append(time.perf_counter() - t0)
            owner.start()
            deadline = time.time() + 60
            while len(api(survivors[0].http, "/api/v1/nodes")["nodes"]) < 3:
                if time.time() > deadline:
                    raise SystemExit("the restarted node did not rejoin")
                time.sleep(0.1)
        if times:
            print("failover (owner killed -> both survivors answer a live node's address), %d kills: "
              "p50 %.0f ms, p99 %.0f ms, max %.0f ms (lease ttl_s = %d)"
                  % (K, pct(times, 50) * 1000, pct(times, 99) * 1000, max(times) * 1000,
                     TTL_S))

        # 3. Rename lag.
        renames, old = [], "hello"
        for r in range(R):
            new = "renamed%d" % r
            for n in nodes:  # every node has the service under its current name first
                deadline = time.time() + 60
                while not n.tip("deploy.git", "refs/live/" + old):
                    if time.time() > deadline:
                        raise SystemExit("%s has no live %s" % (n.id, old))
                    time.sleep(0.05)
            api(nodes[2].http, "/api/v1/services/%s/rename" % old, {"to": new})
            t0 = time.perf_counter()
            while not all(n.tip("deploy.git", "refs/live/" + new)
                          and os.path.isfile(os.path.join(n.data, "src", new + ".git", "HEAD"))
                          and not os.path.exists(os.path.join(n.data, "src", old + ".git"))
                          for n in nodes[:2]):
                if time.perf_counter() - t0 > 120:
                    raise SystemExit("a rename took over 120 s to reach every node")
                time.sleep(0.005)
            renames.append(time.perf_counter() - t0)
            old = new
        if renames:
            print("rename lag (rename on node 3 returned -> renamed on nodes 1 and 2), %d renames: "
                  "p50 %.0f ms, p99 %.0f ms, max %.0f ms; anchor, source replication lag of 1: "
                  "p50 %.0f ms; load average %.1f"
                  % (R, pct(renames, 50) * 1000, pct(renames, 99) * 1000, max(renames) * 1000,
                     pct(source_lags, 50) * 1000, os.getloadavg()[0]))
    finally:
        for node in nodes:
            node.stop()
        etcd.stop()
        if os.environ.get("KEEP"):
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""One node of a cluster against a single host, side by side in one run: DNS QPS and the
cold first byte.

Starts a 3-member etcd and three `revboot serve` nodes with `[cluster]` (bench/cluster.py's
setup, loopback addresses of their own), and beside them one `revboot serve` without
`[cluster]` (the anchor: a single host). Pushes examples/hello to node 1 and to the single
host; on node 1 adds 11 more deployments of the same image with stock git (as a CI would),
so that node 1 answers names it owns ("cluster, own") and names another node owns
("cluster, other": node 1 asks the owner and answers its address, kept 5 s). Then:

  1. DNS QPS for a running instance's name, with dnsperf (-c 4 -T 1 -q 200, L seconds per
     run), alternating single host / cluster own / cluster other, R rounds; the best of
     each and the ratios to the single host.
  2. Cold first byte, C rounds, the three paths in an order that rotates: every instance
     stopped first (on its owner, through the API), node 1's kept answers left to end (6 s),
     then the query over UDP to the single host or node 1, a TCP connect to the answered
     address (the handshake proxy holds it), and the first byte of the HTTP response once
     the instance booted. p50/p99 of each and the ratios to the single host.

usage: bench/cluster-side.py [C] [R] [L]   (default 10 3 5; as root, from the repository root)
  REVBOOT=<binary> runs that binary (default: target/release/revboot, built first)
Load average and cores are printed with the figures: they move them.
"""
import importlib.util, os, re, shutil, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The cluster's setup is bench/cluster.py's; the request and the percentile e2e-cold.py's.
_spec = importlib.util.spec_from_file_location("cluster", os.path.join(ROOT, "bench", "cluster.py"))
CLUSTER = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(CLUSTER)
_spec = importlib.util.spec_from_file_location("e2e_cold", os.path.join(ROOT, "bench", "e2e-cold.py"))
E2E = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(E2E)

C = int(sys.argv[1]) if len(sys.argv) > 1 else 10
R = int(sys.argv[2]) if len(sys.argv) > 2 else 3
L = int(sys.argv[3]) if len(sys.argv) > 3 else 5
TOKEN = CLUSTER.TOKEN
KEPT_S = 6  # node 1 keeps an owner's answer 5 s (REMOTE_TTL), ended by a sweep every second


class Single(CLUSTER.Node):
    """A single host: bench/cluster.py's node without `[cluster]`."""

    def __init__(self, exe, work):
        self.id = "single"
        self.exe, self.work = exe, work
        self.data = os.path.join(work, self.id)
        self.pool = "127.%d.9.0/24" % (200 + os.getpid() % 40)
        self.config = os.path.join(work, "single.toml")
        with open(self.config, "w") as f:
            f.write("[dns]\nboots_per_second = 10000\nboot_burst = 10000\nresponses_per_second = 0\n"
                    "[instances]\nidle_timeout_ms = 3600000\n")
        self.launches = 0
        self.start()


def git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@revboot.test", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def push_hello(node, src):
    git(src, "push", "-q", "http://git:%s@%s/git/hello.git" % (TOKEN, node.http), "main")


def more_deployments(node, work, count):
    """Deployments 2..count of hello on `node`: the tip's tree with subjects of their own."""
    deploy = "http://git:%s@%s/git/-/deploy.git" % (TOKEN, node.http)
    repo = os.path.join(work, "ci-deploy")
    git(work, "clone", "-q", "--bare", deploy, repo)
    parent = git(repo, "rev-parse", "refs/heads/hello")
    tree = git(repo, "rev-parse", parent + "^{tree}")
    body = git(repo, "log", "-1", "--format=%B", parent).split("\n", 1)[1]
    for n in range(2, count + 1):
        parent = git(repo, "commit-tree", tree, "-p", parent, "-m", "hello, deployment %d\n%s" % (n, body))
    git(repo, "push", "-q", deploy, parent + ":refs/heads/hello")
    return git(repo, "rev-list", "--max-count=%d" % count, parent).split()


def stop_all(nodes):
    for node in nodes:
        for inst in CLUSTER.api(node.http, "/api/v1/instances"):
            body = {"service": inst["service"], "label": inst["revision"], "kill": True}
            post(node.http, "POST", "/api/v1/instances/stop", body)


def post(http, method, path, body):
    import json, urllib.request
    req = urllib.request.Request("http://%s%s" % (http, path), method=method, data=json.dumps(body).encode(),
                                 headers={"authorization": "Bearer " + TOKEN, "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def dnsperf(server, name, seconds):
    queries = tempfile.NamedTemporaryFile("w", delete=False)
    queries.write("%s A\n" % name)
    queries.close()
    out = subprocess.run(["dnsperf", "-s", server[0], "-p", str(server[1]), "-d", queries.name,
                          "-l", str(seconds), "-c", "4", "-T", "1", "-q", "200"],
                         capture_output=True, text=True).stdout
    os.unlink(queries.name)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    if not qps:
        raise SystemExit("dnsperf said:\n" + out)
    return float(qps.group(1)), int(lost.group(1)) if lost else 0


def main():
    if not shutil.which("dnsperf"):
        raise SystemExit("dnsperf is missing: apt-get install dnsperf")
    exe = os.environ.get("REVBOOT")
    if not exe:
        exe = os.path.join(ROOT, "target/release/revboot")
        subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "revboot"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="revboot-bench-cluster-side-")
    etcd = CLUSTER.Etcd(work)
    nodes, single = [], None
    try:
        nodes = [CLUSTER.Node(exe, work, etcd, i) for i in (1, 2, 3)]
        single = Single(exe, work)
        deadline = time.time() + 30
        while len(CLUSTER.api(nodes[0].http, "/api/v1/nodes")["nodes"]) < 3:
            if time.time() > deadline:
                raise SystemExit("the nodes did not all join")
            time.sleep(0.1)
        src = os.path.join(work, "hello")
        shutil.copytree(os.path.join(ROOT, "examples/hello"), src, ignore=shutil.ignore_patterns("target"))
        git(src, "init", "-q", "-b", "main")
        git(src, "add", ".")
        git(src, "commit", "-qm", "hello v1")
        push_hello(nodes[0], src)
        push_hello(single, src)
        revisions = more_deployments(nodes[0], work, 12)
        deadline = time.time() + 60
        while not all(n.tip() == revisions[0] for n in nodes):
            if time.time() > deadline:
                raise SystemExit("the deployments did not reach every node")
            time.sleep(0.1)

        # Which node owns which name, as node 1 answers (and every node would).
        own = other = None
        for revision in revisions:
            name = "%s.hello.revboot.test" % revision[:12]
            deadline = time.time() + 30
            while (address := CLUSTER.dns_a(nodes[0].dns, name)) is None:
                if time.time() > deadline:
                    raise SystemExit("node 1 does not answer %s" % name)
                time.sleep(0.1)
            if nodes[0].owns(address):
                own = own or name
            else:
                other = other or (name, next(n for n in nodes if n.owns(address)))
        if not own or not other:
            raise SystemExit("node 1 owns all or none of 12 names: run again")
        paths = {
            "single host": (single.dns, "hello.revboot.test"),
            "cluster, own": (nodes[0].dns, own),
            "cluster, other": (nodes[0].dns, other[0]),
        }
        print("node 1 answers %s itself and %s for %s" % (own, other[0], other[1].id))

        # 1. QPS on the cached path, a running instance.
        for server, name in paths.values():
            E2E.request(CLUSTER.dns_a(server, name), name)
        best = {path: (0.0, 0) for path in paths}
        for r in range(R):
            for path in list(paths)[r % 3:] + list(paths)[:r % 3]:
                qps, lost = dnsperf(*paths[path], L)
                if qps > best[path][0]:
                    best[path] = (qps, lost)
        print("DNS QPS, dnsperf -c 4 -T 1 -q 200 -l %d, best of %d:" % (L, R))
        for path, (qps, lost) in best.items():
            print("  %-15s %9.0f q/s  (lost %d)  %.2fx single host"
                  % (path, qps, lost, qps / best["single host"][0]))

        # 2. Cold first byte.
        cold = {path: [] for path in paths}
        for c in range(C):
            stop_all(nodes + [single])
            time.sleep(KEPT_S)
            for path in list(paths)[c % 3:] + list(paths)[:c % 3]:
                server, name = paths[path]
                t0 = time.perf_counter()
                address = CLUSTER.dns_a(server, name, 10)
                if address is None:
                    raise SystemExit("%s: no answer for %s" % (path, name))
                dns = time.perf_counter() - t0
                _, first = E2E.request(address, name)
                cold[path].append((dns, dns + first))
        ms = lambda v: "%.1f ms" % (v * 1000)
        print("cold first byte (query over UDP -> connect -> first byte), %d boots per path:" % C)
        base = E2E.pct([f for _, f in cold["single host"]], 50)
        for path, values in cold.items():
            firsts = [f for _, f in values]
            print("  %-15s dns p50 %s; first byte p50 %s p99 %s  %.2fx single host (p50)"
                  % (path, ms(E2E.pct([d for d, _ in values], 50)), ms(E2E.pct(firsts, 50)),
                     ms(E2E.pct(firsts, 99)), E2E.pct(firsts, 50) / base))
        print("load average: %s on %d cores" % (" ".join(open("/proc/loadavg").read().split()[:3]), os.cpu_count()))
    finally:
        for node in nodes + ([single] if single else []):
            node.stop()
        etcd.stop()
        if os.environ.get("KEEP"):
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

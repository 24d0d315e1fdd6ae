#!/usr/bin/env python3
"""What an idle cluster costs: the CPU time of its nodes while nothing changes.

Starts a 3-member etcd and three `revboot serve` nodes with `[cluster]` (bench/cluster.py's
set-up: loopback addresses of their own, ports no default etcd uses, the daemons on port 0
of 127.0.0.1), adds S services on node 1 (`revboot service add`), waits until every node
has the S source repositories, lets them settle, then reads each node's CPU time
(utime + stime of /proc/<pid>/stat, children included once reaped: the git processes a
replication round runs) over T seconds. Nothing is pushed meanwhile: what it measures is
the cost of the replication rounds alone.

With ANCHOR=<binary> the same is done with that binary (for example one built from another
commit) in the same run, the two alternating over R rounds, and the ratio printed.

usage: bench/cluster-idle.py [S] [T] [R]   (default 200 20 2; as root, from the repository
       root)
  REVBOOT=<binary> runs that binary (default: target/release/revboot, built first)
"""
import os, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster  # noqa: E402  (bench/cluster.py: Etcd, Node, api)

S = int(sys.argv[1]) if len(sys.argv) > 1 else 200
T = float(sys.argv[2]) if len(sys.argv) > 2 else 20
R = int(sys.argv[3]) if len(sys.argv) > 3 else 2
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime + cutime + cstime of `pid`, in seconds."""
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / TICK


def measure(exe):
    """CPU seconds per second of each node of an idle cluster of `exe` with S services."""
    work = tempfile.mkdtemp(prefix="revboot-bench-idle-")
    etcd = cluster.Etcd(work)
    nodes = []
    try:
        nodes = [cluster.Node(exe, work, etcd, i) for i in (1, 2, 3)]
        deadline = time.time() + 30
        while len(cluster.api(nodes[0].http, "/api/v1/nodes")["nodes"]) < 3:
            if time.time() > deadline:
                raise SystemExit("the nodes did not all join")
            time.sleep(0.1)
        env = dict(os.environ, REVBOOT_TOKEN=cluster.TOKEN,
                   XDG_CONFIG_HOME=os.path.join(work, "config"))
        for i in range(S):
            subprocess.run([exe, "--url", "http://" + nodes[0].http, "--data", nodes[0].data,
                            "service", "add", "s%d" % i], env=env, check=True,
                           stdout=subprocess.DEVNULL)
        deadline = time.time() + 300
        for node in nodes:
            src = os.path.join(node.data, "src")
            while len([n for n in os.listdir(src) if n.endswith(".git")]) < S:
                if time.time() > deadline:
                    raise SystemExit("node %s did not make the %d services" % (node.id, S))
                time.sleep(0.2)
        time.sleep(5)
        before = [cpu_seconds(node.proc.pid) for node in nodes]
        start = time.time()
        time.sleep(T)
        spent = time.time() - start
        return [(cpu_seconds(node.proc.pid) - b) / spent for node, b in zip(nodes, before)]
    finally:
        for node in nodes:
            node.stop()
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)


def main():
    exe = os.environ.get("REVBOOT")
    if not exe:
        exe = os.path.join(cluster.ROOT, "target/release/revboot")
        subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "revboot"],
                       cwd=cluster.ROOT, check=True)
    anchor = os.environ.get("ANCHOR")
    runs = {"revboot": []}
    if anchor:
        runs["anchor"] = []
    for r in range(R):
        order = list(runs) if r % 2 == 0 else list(reversed(list(runs)))
        for name in order:
            per_node = measure(exe if name == "revboot" else anchor)
            runs[name].append(sum(per_node) / len(per_node))
            print("round %d %-7s CPU per node: %s (mean %.1f ms/s)" % (
                r + 1, name, " ".join("%.1f" % (x * 1000) for x in per_node),
                runs[name][-1] * 1000), flush=True)
    for name, values in runs.items():
        print("%-7s %d services idle: %.1f-%.1f ms of CPU per second per node over %d rounds"
              % (name, S, min(values) * 1000, max(values) * 1000, R))
    if anchor:
        ratios = [a / b for a, b in zip(runs["revboot"], runs["anchor"]) if b > 0]
        print("revboot / anchor: %.2f-%.2fx" % (min(ratios), max(ratios)))


if __name__ == "__main__":
    main()

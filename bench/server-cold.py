#!/usr/bin/env python3
"""Cold first byte beyond loopback: a client network resolving through unbound.

Makes two network namespaces joined by a veth pair (nothing touches the host's network):
"server", where `revboot serve` runs with the pools 2001:db8:1::/64 and 203.0.113.16/28 (it
makes them local itself) and DNS on [2001:db8:ff::1]:53; and "client", with unbound on
127.0.0.1:53 resolving the zone through a stub zone pointing at revboot (its cache capped at
0 s, so every query goes to revboot, as a cold name does). Pushes examples/hello, then N
times: stop every instance, and from the client namespace time
  1. the AAAA query for the live name through unbound (revboot answers at once, the boot
     starts),
  2. a TCP connect to the answered IPv6 address (the handshake proxy holds it),
  3. the first byte of the HTTP response (the instance booted and answered);
then the same again with the instance warm (the floor). Prints p50/p99 and the ratio.

usage: bench/server-cold.py [N]   (default 200; run as root from the repository root)
"""
import importlib.util, json, os, random, shutil, socket, struct, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The request and the percentile are bench/e2e-cold.py's, so both benches time the same way.
_spec = importlib.util.spec_from_file_location("e2e_cold", os.path.join(ROOT, "bench", "e2e-cold.py"))
E2E = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(E2E)
ZONE = "example.com"
SERVER = "2001:db8:ff::1"
CLIENT = "2001:db8:ff::2"
TOKEN = "bench-token"
HTTP = "127.0.0.1:18080"  # inside the server namespace: no other daemon there


# --- the client side, run inside the client namespace -------------------------------------

def aaaa_query(name):
    """An AAAA query to unbound on 127.0.0.1:53; the first IPv6 address of the answer."""
    qid = random.randrange(65536)
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        packet += bytes([len(label)]) + label.encode()
    packet += b"\x00" + struct.pack(">HH", 28, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(packet, ("127.0.0.1", 53))
        reply = s.recv(4096)
    ancount = struct.unpack(">H", reply[6:8])[0]
    at = len(packet)  # past the question, echoed as sent (letter case aside)
    for _ in range(ancount):
        while reply[at] != 0:  # owner name: labels or a pointer
            if reply[at] & 0xC0 == 0xC0:
                at += 1
                break
            at += reply[at] + 1
        at += 1
        rtype, _, _, length = struct.unpack(">HHIH", reply[at:at + 10])
        at += 10
        if rtype == 28:
            return socket.inet_ntop(socket.AF_INET6, reply[at:at + 16])
        at += length
    raise RuntimeError("no AAAA: rcode %d" % (reply[3] & 15))


def once(name):
    t0 = time.perf_counter()
    address = aaaa_query(name)
    dns = time.perf_counter() - t0
    connect, first = E2E.request(address, name)
    return {"dns": dns, "connect": dns + connect, "first": dns + first}


def client():
    for line in sys.stdin:
        print(json.dumps(once(line.strip())), flush=True)


# --- the orchestration ---------------------------------------------------------------------

def holder():
    """A network namespace held by a sleeping child; its /proc path."""
    child = subprocess.Popen(["unshare", "--net", "--", "sleep", "3600"])
    ours = os.readlink("/proc/self/ns/net")
    for _ in range(1000):
        try:
            if os.readlink("/proc/%d/ns/net" % child.pid) != ours:
                break
        except OSError:
            pass
        time.sleep(0.005)
    return child, "/proc/%d/ns/net" % child.pid


def enter(ns, *argv):
    return ["nsenter", "--net=" + ns, "--"] + list(argv)


def run(ns, *argv):
    subprocess.run(enter(ns, *argv), check=True, stdout=subprocess.DEVNULL)


def api(ns, method, path, body=None):
    argv = ["curl", "-sS", "--fail", "-X", method, "-H", "authorization: Bearer " + TOKEN,
            "-H", "content-type: application/json", "http://%s%s" % (HTTP, path)]
    if body is not None:
        argv += ["-d", json.dumps(body)]
    out = subprocess.run(enter(ns, *argv), check=True, capture_output=True).stdout
    return json.loads(out) if out.strip() else None


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "revboot"], cwd=ROOT, check=True)
    exe = os.path.join(ROOT, "target/release/revboot")
    work = tempfile.mkdtemp(prefix="revboot-server-bench-")
    holders, children = [], []
    try:
        server_holder, server = holder()
        client_holder, client_ns = holder()
        holders += [server_holder, client_holder]
        for ns in (server, client_ns):
            run(ns, "ip", "link", "set", "lo", "up")
        run(server, "ip", "link", "add", "rb-server", "type", "veth", "peer", "name", "rb-client",
            "netns", client_ns)
        run(server, "ip", "link", "set", "rb-server", "up")
        run(client_ns, "ip", "link", "set", "rb-client", "up")
        run(server, "ip", "-6", "addr", "add", SERVER + "/64", "dev", "rb-server", "nodad")
        run(client_ns, "ip", "-6", "addr", "add", CLIENT + "/64", "dev", "rb-client", "nodad")
        run(client_ns, "ip", "-6", "route", "add", "2001:db8:1::/64", "via", SERVER)

        config = os.path.join(work, "revbootd.toml")
        with open(config, "w") as f:
            f.write('zone = "%s"\n[dns]\nlisten = "[%s]:53"\n' % (ZONE, SERVER))
            f.write('nameservers = [{ name = "ns1.%s", addresses = ["%s"] }]\n' % (ZONE, SERVER))
            # One client booting on purpose, as fast as it can: lift the flood limits.
            f.write("boots_per_second = 100000\nboot_burst = 100000\nresponses_per_second = 0\n")
            f.write('[instances]\npools = ["2001:db8:1::/64"]\n')
        log = open(os.path.join(work, "daemon.log"), "w")
        daemon = subprocess.Popen(enter(server, exe, "--config", config, "--data", os.path.join(work, "data"),
                                        "serve", "--http", HTTP, "--token", TOKEN), stdout=log, stderr=log)
        children.append(daemon)
        for _ in range(300):
            try:
                api(server, "GET", "/api/v1/services")
                break
            except subprocess.CalledProcessError:
                time.sleep(0.1)
        src = os.path.join(work, "hello")
        shutil.copytree(os.path.join(ROOT, "examples/hello"), src, ignore=shutil.ignore_patterns("target"))
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@revboot.test"]
        subprocess.run(git + ["init", "-q", "-b", "main"], cwd=src, check=True)
        subprocess.run(git + ["add", "."], cwd=src, check=True)
        subprocess.run(git + ["commit", "-qm", "hello v1"], cwd=src, check=True)
        subprocess.run(enter(server, "git", "push", "-q", "http://git:%s@%s/git/hello.git" % (TOKEN, HTTP), "main"),
                       cwd=src, check=True, stderr=subprocess.DEVNULL)

        with open(os.path.join(work, "unbound.conf"), "w") as f:
            f.write("server:\n  interface: 127.0.0.1\n  port: 53\n  access-control: 127.0.0.0/8 allow\n"
                    '  username: ""\n  chroot: ""\n  directory: "%s"\n  pidfile: "%s/unbound.pid"\n'
                    '  do-daemonize: no\n  use-syslog: no\n  logfile: ""\n  num-threads: 1\n'
                    '  module-config: "iterator"\n  do-ip6: yes\n  qname-minimisation: no\n'
                    "  cache-max-ttl: 0\n  cache-max-negative-ttl: 0\n"
                    'stub-zone:\n  name: "%s"\n  stub-addr: %s@53\nremote-control:\n  control-enable: no\n'
                    % (work, work, ZONE, SERVER))
        unbound = subprocess.Popen(enter(client_ns, "unbound", "-d", "-c", os.path.join(work, "unbound.conf")),
                                   stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "unbound.log"), "w"))
        children.append(unbound)
        measurer = subprocess.Popen(enter(client_ns, sys.executable, os.path.abspath(__file__), "--client"),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        children.append(measurer)

        def measure():
            measurer.stdin.write("hello.%s\n" % ZONE)
            measurer.stdin.flush()
            line = measurer.stdout.readline()
            if not line:
                raise RuntimeError("the client side ended; see %s" % work)
            return json.loads(line)

        for _ in range(300):  # unbound listens
            try:
                measure()
                break
            except RuntimeError:
                raise
            except Exception:
                time.sleep(0.1)
        cold, warm = [], []
        for _ in range(n):
            for inst in api(server, "GET", "/api/v1/instances"):
                api(server, "POST", "/api/v1/instances/stop", {"service": inst["service"], "kill": True})
            cold.append(measure())
            warm.append(measure())
        ms = lambda v: "%.2f ms" % (v * 1000)
        print("cold first byte beyond loopback over %d boots (examples/hello, process tender, IPv6 pool,"
              " client namespace -> unbound -> revboot DNS -> proxy)" % n)
        for key, what in (("dns", "AAAA via unbound"), ("connect", "+ connect"), ("first", "+ first byte")):
            print("  cold: %-17s p50 %s  p99 %s" % (what, ms(E2E.pct([c[key] for c in cold], 50)),
                                                     ms(E2E.pct([c[key] for c in cold], 99))))
        print("  warm: %-17s p50 %s  p99 %s" % ("AAAA + first byte", ms(E2E.pct([w["first"] for w in warm], 50)),
                                                 ms(E2E.pct([w["first"] for w in warm], 99))))
        print("  ratio cold/warm first byte p50: %.1fx" % (E2E.pct([c["first"] for c in cold], 50)
                                                          / E2E.pct([w["first"] for w in warm], 50)))
    finally:
        for child in reversed(children):
            child.terminate()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
        for h in holders:
            h.kill()
            h.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--client"]:
        client()
    else:
        main()

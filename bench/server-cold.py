#!/usr/bin/env python3
"""Cold first byte beyond loopback: a client network resolving through unbound, at an
address of its own and through the front door, side by side.

Makes two network namespaces joined by a veth pair (nothing touches the host's network):
"server", where `revboot serve` runs with the pool 2001:db8:1::/64 (it makes it local
itself), DNS on [2001:db8:ff::1]:53 and the front door on 192.0.2.1:80; and "client", with
unbound on 127.0.0.1:53 resolving the zone through a stub zone pointing at revboot (its
cache capped at 0 s, so every query goes to revboot, as a cold name does). Pushes
examples/hello twice: as `hello` (an address of its own) and as `front` (`reach =
"front"`). Then N rounds, each timing both paths one after the other (the order
alternating), every time right after stopping every instance, from the client namespace:
  1. the query for the live name through unbound (revboot answers at once, the boot
     starts): AAAA for `hello` (an address of the IPv6 pool), A for `front` (the front
     door's address),
  2. a TCP connect to the answered address (the handshake proxy, or the front door, holds
     it),
  3. the first byte of the HTTP response (the instance booted and answered; through the
     front door, after the head was read and routed by its Host);
then `hello` again warm (the floor). Prints p50/p99 of each and the ratios.

With --vm: examples/hello-vm (a qemu microvm under TCG) as `hello-vm`, on the pools
2001:db8:1::/64 and 203.0.113.16/28, one instance at an address of each, and the two paths
timed are AAAA (IPv6: the proxy relays to qemu's port forward) and A (IPv4) of its live
name; warm, each again. Instances restore from the snapshot of the first boot (the
default); QEMU_RESTORE=false times cold boots.

usage: bench/server-cold.py [N] [--vm]   (default 200; run as root from the repository root)
REVBOOT=<binary> times that binary instead of building this tree's: an anchor built from
another commit, run in turn with this tree's on the same loaded host (the examples pushed
are this tree's either way).
Load average and cores are printed with the figures: they move them.
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
FRONT = "192.0.2.1"
TOKEN = "bench-token"
HTTP = "127.0.0.1:18080"  # inside the server namespace: no other daemon there
VM = "--vm" in sys.argv[1:]
POOL_V4 = "203.0.113.16/28"


# --- the client side, run inside the client namespace -------------------------------------

def query(name, rtype):
    """A query of `rtype` (28: AAAA, 1: A) to unbound on 127.0.0.1:53; the first address of
    that type in the answer."""
    qid = random.randrange(65536)
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        packet += bytes([len(label)]) + label.encode()
    packet += b"\x00" + struct.pack(">HH", rtype, 1)
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
        answered, _, _, length = struct.unpack(">HHIH", reply[at:at + 10])
        at += 10
        if (rtype, answered) == (28, 28):
            return socket.inet_ntop(socket.AF_INET6, reply[at:at + 16])
        if (rtype, answered) == (1, 1):
            return socket.inet_ntop(socket.AF_INET, reply[at:at + 4])
        at += length
    raise RuntimeError("no address of type %d: rcode %d" % (rtype, reply[3] & 15))


def once(name, rtype, port):
    t0 = time.perf_counter()
    address = query(name, rtype)
    dns = time.perf_counter() - t0
    connect, first = E2E.request(address, name, port)
    return {"dns": dns, "connect": dns + connect, "first": dns + first}


def client():
    for line in sys.stdin:
        name, rtype, port = line.split()
        print(json.dumps(once(name, int(rtype), int(port))), flush=True)


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
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 200
    exe = os.environ.get("REVBOOT")
    if exe:
        exe = os.path.abspath(exe)
    else:
        subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "revboot"], cwd=ROOT, check=True)
        exe = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release/revboot")
    print("binary: %s" % exe, flush=True)
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
        run(server, "ip", "addr", "add", FRONT + "/24", "dev", "rb-server")
        run(client_ns, "ip", "addr", "add", "192.0.2.2/24", "dev", "rb-client")
        run(client_ns, "ip", "route", "add", POOL_V4, "via", FRONT)

        config = os.path.join(work, "revbootd.toml")
        with open(config, "w") as f:
            f.write('zone = "%s"\n[dns]\nlisten = "[%s]:53"\n' % (ZONE, SERVER))
            f.write('nameservers = [{ name = "ns1.%s", addresses = ["%s"] }]\n' % (ZONE, SERVER))
            # One client booting on purpose, as fast as it can: lift the flood limits.
            f.write("boots_per_second = 100000\nboot_burst = 100000\nresponses_per_second = 0\n")
            if VM:
                restore = os.environ.get("QEMU_RESTORE", "true")
                f.write('[instances]\npools = ["2001:db8:1::/64", "%s"]\n' % POOL_V4)
                f.write('qemu_accel = "tcg"\nqemu_restore = %s\n' % restore)
            else:
                f.write('[instances]\npools = ["2001:db8:1::/64"]\n')
            f.write('[front]\nhttp = "%s:80"\n' % FRONT)
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
        services = [("hello-vm", "hello-vm", None)] if VM else [("hello", "hello", None), ("front", "hello", "front")]
        for service, example, reach in services:
            src = os.path.join(work, service)
            shutil.copytree(os.path.join(ROOT, "examples", example), src, ignore=shutil.ignore_patterns("target"))
            if reach:
                with open(os.path.join(src, "revboot.toml"), "a") as f:
                    f.write('reach = "%s"\n' % reach)
            git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@revboot.test"]
            subprocess.run(git + ["init", "-q", "-b", "main"], cwd=src, check=True)
            subprocess.run(git + ["add", "."], cwd=src, check=True)
            subprocess.run(git + ["commit", "-qm", "%s v1" % service], cwd=src, check=True)
            subprocess.run(enter(server, "git", "push", "-q", "http://git:%s@%s/git/%s.git" % (TOKEN, HTTP, service),
                                 "main"), cwd=src, check=True, stderr=subprocess.DEVNULL)

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

        if VM:
            paths = {"IPv6": "hello-vm.%s 28 8080\n" % ZONE, "IPv4": "hello-vm.%s 1 8080\n" % ZONE}
        else:
            paths = {"per-address": "hello.%s 28 8080\n" % ZONE, "front door": "front.%s 1 80\n" % ZONE}
        first_path = list(paths)[0]

        def measure(path=first_path):
            measurer.stdin.write(paths[path])
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
        cold, warm = {path: [] for path in paths}, {path: [] for path in paths}

        def stop_all():
            for inst in api(server, "GET", "/api/v1/instances"):
                api(server, "POST", "/api/v1/instances/stop", {"service": inst["service"], "kill": True})
            for _ in range(600):  # bounded: a VM's qemu takes a moment to go
                if not api(server, "GET", "/api/v1/instances"):
                    return
                time.sleep(0.01)
            raise RuntimeError("instances still running after 6 s; see %s" % work)

        for i in range(n):
            for path in (list(paths) if i % 2 == 0 else list(reversed(paths))):
                stop_all()
                cold[path].append(measure(path))
                if VM:
                    warm[path].append(measure(path))
            if not VM:
                warm[first_path].append(measure())
        ms = lambda v: "%.2f ms" % (v * 1000)
        if VM:
            print("cold first byte of a VM over IPv6 and IPv4, %d boots per path (examples/hello-vm, qemu"
                  " under TCG, restore %s, client namespace -> unbound -> revboot DNS -> proxy or steered)"
                  % (n, os.environ.get("QEMU_RESTORE", "true")))
            for path, query_name in (("IPv6", "AAAA via unbound"), ("IPv4", "A via unbound")):
                for key, what in (("dns", query_name), ("connect", "+ connect"), ("first", "+ first byte")):
                    vals = [c[key] for c in cold[path]]
                    print("  cold, %-5s %-17s p50 %s  p99 %s" % (path + ":", what, ms(E2E.pct(vals, 50)), ms(E2E.pct(vals, 99))))
            for path in paths:
                vals = [w["first"] for w in warm[path]]
                print("  warm, %-5s query + first byte  p50 %s  p99 %s" % (path + ":", ms(E2E.pct(vals, 50)), ms(E2E.pct(vals, 99))))
            first = {path: [c["first"] for c in cold[path]] for path in paths}
            print("  IPv6 / IPv4, cold first byte: p50 %.2fx, p99 %.2fx"
                  % (E2E.pct(first["IPv6"], 50) / E2E.pct(first["IPv4"], 50),
                     E2E.pct(first["IPv6"], 99) / E2E.pct(first["IPv4"], 99)))
            print("load average: %s on %d cores" % (" ".join(open("/proc/loadavg").read().split()[:3]), os.cpu_count()))
            return
        warm = warm[first_path]
        print("cold first byte beyond loopback over %d boots per path (examples/hello, process tender,"
              " client namespace -> unbound -> revboot DNS -> proxy or front door)" % n)
        for path, query_name in (("per-address", "AAAA via unbound"), ("front door", "A via unbound")):
            for key, what in (("dns", query_name), ("connect", "+ connect"), ("first", "+ first byte")):
                print("  cold, %-11s %-17s p50 %s  p99 %s" % (path + ":", what, ms(E2E.pct([c[key] for c in cold[path]], 50)),
                                                             ms(E2E.pct([c[key] for c in cold[path]], 99))))
        first = {path: [c["first"] for c in cold[path]] for path in paths}
        print("  front door / per-address, cold first byte: p50 %.2fx, p99 %.2fx"
              % (E2E.pct(first["front door"], 50) / E2E.pct(first["per-address"], 50),
                 E2E.pct(first["front door"], 99) / E2E.pct(first["per-address"], 99)))
        cold = cold["per-address"]
        print("  warm: %-17s p50 %s  p99 %s" % ("AAAA + first byte", ms(E2E.pct([w["first"] for w in warm], 50)),
                                                 ms(E2E.pct([w["first"] for w in warm], 99))))
        print("  ratio cold/warm first byte p50: %.1fx" % (E2E.pct([c["first"] for c in cold], 50)
                                                          / E2E.pct([w["first"] for w in warm], 50)))
        print("load average: %s on %d cores" % (" ".join(open("/proc/loadavg").read().split()[:3]), os.cpu_count()))
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

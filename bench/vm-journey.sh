#!/usr/bin/env bash
# Cold start through revboot, query → first HTTP byte: examples/hello-vm (qemu tender)
# booted cold and restored from its snapshot, side by side, beside examples/hello (process
# tender), in two runs of a real `revboot serve` at once: one with `qemu_restore = false`,
# one with restore on (and its pool of waiting qemu processes).
#
# Pushes the examples with stock git, then per run: stop the service's instances (API),
# send a DNS query for `<revision>.<service>.<zone>` over UDP, connect to the answered
# address on port 8080 (the handshake proxy), send GET /, take the first response byte.
# The clock starts when the query is sent; cold and restored runs alternate. Prints p50/p90/
# p99 per case, the restored VM's memory (RSS and PSS of its qemu, its cgroup's
# memory.current), a waiting qemu's, and the snapshot's size on disk; then runs
# bench/vm-cold.sh (the same image under a bare qemu) for comparison. Loopback only.
#
#   bench/vm-journey.sh [runs per case, default 20]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}

cargo build --release --quiet -p revboot
revboot=${CARGO_TARGET_DIR:-target}/release/revboot
(cd examples/hello-vm && cargo fetch --locked --quiet)
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    [[ -n ${KEEP:-} ]] || rm -rf "$work"; [[ -n ${KEEP:-} ]] && echo "kept $work" >&2; true
}
trap cleanup EXIT

token=bench-token
# start <name> <restore> <pool prefix>: a daemon of its own; sets http_<name> and dns_<name>.
start() {
    local name=$1 http= dns= line
    mkdir -p "$work/$name"
    # Boots back to back, faster than the default DNS boot rate allows.
    printf '[dns]\nboots_per_second = 1000\nboot_burst = 1000\n[instances]\nqemu_restore = %s\n' "$2" \
        >"$work/$name/revbootd.toml"
    "$revboot" --config "$work/$name/revbootd.toml" --data "$work/$name/data" serve \
        --http 127.0.0.1:0 --dns 127.0.0.1:0 --pool "$3" --token "$token" \
        >"$work/$name/daemon.log" 2>&1 &
    pids+=($!)
    # The daemon picks its ports (port 0) and says which once every part listens.
    for _ in $(seq 600); do
        line=$(grep -m1 'revboot is serving' "$work/$name/daemon.log" || true)
        [[ -n $line ]] && break
        kill -0 "${pids[-1]}" 2>/dev/null || { cat "$work/$name/daemon.log" >&2; exit 1; }
        sleep 0.1
    done
    [[ -n $line ]] || { echo "daemon $name did not serve within 60 s" >&2; exit 1; }
    [[ $line =~ \ http=[0-9.]+:([0-9]+) ]] && http=${BASH_REMATCH[1]}
    [[ $line =~ \ dns=[0-9.]+:([0-9]+) ]] && dns=${BASH_REMATCH[1]}
    printf -v "http_$name" %s "$http"
    printf -v "dns_$name" %s "$dns"
}
start cold false 127.94.0.0/24
start restore true 127.95.0.0/24

for service in hello hello-vm; do
    mkdir -p "$work/src/$service"
    tar -C "examples/$service" --exclude=./target -cf - . | tar -C "$work/src/$service" -xf -
    git -C "$work/src/$service" init -q -b main
    git -C "$work/src/$service" add .
    git -C "$work/src/$service" -c user.name=bench -c user.email=bench@revboot.test commit -q -m "$service"
    git -C "$work/src/$service" push -q "http://git:$token@127.0.0.1:$http_cold/git/$service.git" main 2>/dev/null
done
git -C "$work/src/hello-vm" push -q "http://git:$token@127.0.0.1:$http_restore/git/hello-vm.git" main 2>/dev/null

python3 - "$http_cold" "$dns_cold" "$http_restore" "$dns_restore" "$token" "$runs" "$work/restore/data" <<'PY'
import glob, json, os, socket, struct, sys, time, urllib.error, urllib.request

daemons = {"cold": (int(sys.argv[1]), int(sys.argv[2])), "restore": (int(sys.argv[3]), int(sys.argv[4]))}
token, runs, restore_data = sys.argv[5], int(sys.argv[6]), sys.argv[7]
http, dns = daemons["cold"]

def use(daemon):
    global http, dns
    http, dns = daemons[daemon]

def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{http}/api/v1" + path, data=data,
                                     method="POST" if data else "GET",
                                     headers={"authorization": f"Bearer {token}",
                                              "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)

def query(name):
    """One A query over UDP; returns the first address answered."""
    labels = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + labels + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(packet, ("127.0.0.1", dns))
        reply, _ = s.recvfrom(4096)
    _, flags, _, answers, _, _ = struct.unpack(">HHHHHH", reply[:12])
    if flags & 0xf or answers == 0:
        raise RuntimeError(f"no answer for {name} (rcode {flags & 0xf})")
    at = 12 + len(labels) + 4
    while at < len(reply):
        at += 2 if reply[at] & 0xc0 == 0xc0 else reply.index(b"\0", at) + 1 - at
        rtype, _, _, length = struct.unpack(">HHIH", reply[at:at + 10])
        at += 10
        if rtype == 1 and length == 4:
            return socket.inet_ntoa(reply[at:at + 4])
        at += length
    raise RuntimeError("no A record")

def running(service):
    return [i for i in call("/instances") if i["service"] == service]

def stopped(service):
    if running(service):
        try:
            call("/instances/stop", {"service": service})
        except urllib.error.HTTPError as error:
            if error.code != 404:  # 404: it stopped on its own meanwhile
                raise
    deadline = time.time() + 30
    while time.time() < deadline:
        if not running(service):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{service} did not stop")

def cold(service, name):
    """Stop the service, then query → first byte, ms; the instance stays up."""
    stopped(service)
    t0 = time.perf_counter()
    address = query(name)
    with socket.create_connection((address, 8080), timeout=30) as conn:
        conn.sendall(f"GET / HTTP/1.1\r\nhost: {name}\r\n\r\n".encode())
        first = conn.recv(1)
        t1 = time.perf_counter()
        body = first
        while chunk := conn.recv(4096):
            body += chunk
    if b"hello from" not in body:
        raise RuntimeError(f"{service}: unexpected answer: {body!r}")
    return (t1 - t0) * 1e3

def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]

def memory(pid):
    """RSS and PSS of a process, MiB; and its cgroup's memory.current, MiB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if parts[0] in ("Rss:", "Pss:"):
                fields[parts[0][:-1]] = int(parts[1]) / 1024
    # Its memory cgroup, v1 (memory.usage_in_bytes) or v2 (memory.current).
    fields["cgroup"] = float("nan")
    for line in open(f"/proc/{pid}/cgroup"):
        _, controllers, path = line.strip().split(":", 2)
        for file in ((f"/sys/fs/cgroup/memory{path}/memory.usage_in_bytes",) if controllers == "memory"
                     else (f"/sys/fs/cgroup{path}/memory.current",) if controllers == "" else ()):
            if os.path.exists(file) and path != "/":
                fields["cgroup"] = int(open(file).read()) / (1 << 20)
    return fields

def waiting_qemu(instances):
    """A qemu of a pool, waiting for a snapshot (found by its argv and cgroup), not one of
    the running `instances` (a restored one was such a qemu)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in instances:
            continue
        try:
            if "-incoming" in open(f"/proc/{pid}/cmdline").read() and "/pool-" in open(f"/proc/{pid}/cgroup").read():
                return int(pid)
        except OSError:
            pass
    return None

def line(label, samples):
    print(f"  {label:28} p50 {pct(samples, 50):7.1f} ms  p90 {pct(samples, 90):7.1f} ms  "
          f"p99 {pct(samples, 99):7.1f} ms  min {min(samples):7.1f} ms")

def name_of(service):
    return f"{call(f'/services/{service}/deployments')[0]['short']}.{service}.revboot.test"

print(f"cold start through revboot (DNS query sent → first HTTP byte), {runs} runs each:")
use("cold")
name = name_of("hello")
cold("hello", name)  # warm the image cache and page cache
line("hello (process)", [cold("hello", name) for _ in range(runs)])

names = {}
for daemon in ("cold", "restore"):
    use(daemon)
    names[daemon] = name_of("hello-vm")
    cold("hello-vm", names[daemon])  # warm; the restore daemon saves its snapshot here
    cold("hello-vm", names[daemon])  # the restore daemon's first restore; its pool fills
samples = {"cold": [], "restore": []}
for _ in range(runs):
    for daemon in ("cold", "restore"):
        use(daemon)
        samples[daemon].append(cold("hello-vm", names[daemon]))
line("hello-vm (qemu/tcg) cold boot", samples["cold"])
line("hello-vm (qemu/tcg) restored", samples["restore"])
print(f"  restore / cold boot, p50: {pct(samples['restore'], 50) / pct(samples['cold'], 50):.2f}")

use("restore")
vm = [i for i in call("/instances") if i["service"] == "hello-vm"]
instances = {i.get("pid") for i in vm}
if vm and vm[0].get("pid"):
    m = memory(vm[0]["pid"])
    print(f"  memory of a restored VM (32 MiB guest): qemu RSS {m['Rss']:.1f} MiB, PSS {m['Pss']:.1f} MiB, "
          f"its cgroup {m['cgroup']:.1f} MiB")
use("cold")
vm = [i for i in call("/instances") if i["service"] == "hello-vm"]
if vm and vm[0].get("pid"):
    m = memory(vm[0]["pid"])
    print(f"  memory of a cold-booted VM:        qemu RSS {m['Rss']:.1f} MiB, PSS {m['Pss']:.1f} MiB, "
          f"its cgroup {m['cgroup']:.1f} MiB")
pid = waiting_qemu(instances)
if pid:
    m = memory(pid)
    print(f"  a qemu waiting, snapshot loaded:   qemu RSS {m['Rss']:.1f} MiB, PSS {m['Pss']:.1f} MiB, "
          f"its cgroup {m['cgroup']:.1f} MiB")
for stream in glob.glob(os.path.join(restore_data, "deployer/images/*.snapshots/*.vmstate")):
    stat = os.stat(stream)
    print(f"  snapshot on disk: {stat.st_size / 1024:.0f} KiB ({stat.st_blocks * 512 / 1024:.0f} KiB allocated), "
          f"{os.path.relpath(stream, restore_data)}")
PY

# The same image booted by a bare qemu, no revboot around it, for comparison.
cleanup
pids=()
trap - EXIT
bench/vm-cold.sh "$runs"

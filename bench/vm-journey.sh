#!/usr/bin/env bash
# Cold start through revboot, query → first HTTP byte: examples/hello-vm (qemu tender)
# beside examples/hello (process tender), in one run of a real `revboot serve`.
#
# Pushes both examples with stock git, then per run: stop the service's instances (API),
# send a DNS query for `<revision>.<service>.<zone>` over UDP, connect to the answered
# address on port 8080 (the handshake proxy), send GET /, take the first response byte.
# The clock starts when the query is sent. Prints p50/p90 per service, then runs
# bench/vm-cold.sh (the same image under a bare qemu) for comparison. Loopback only.
#
#   bench/vm-journey.sh [runs per service, default 20]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}

cargo build --release --quiet -p revboot
(cd examples/hello-vm && cargo fetch --locked --quiet)
work=$(mktemp -d)
daemon_pid=
cleanup() {
    if [[ -n $daemon_pid ]]; then kill "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(free_port)
dns=$(free_port)
token=bench-token
target/release/revboot --data "$work/data" serve --http "127.0.0.1:$http" --dns "127.0.0.1:$dns" \
    --pool 127.94.0.0/24 --token "$token" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do
    curl -sf -o /dev/null -H "authorization: Bearer $token" "http://127.0.0.1:$http/api/v1/services" && break
    sleep 0.1
done

for service in hello hello-vm; do
    mkdir -p "$work/src/$service"
    tar -C "examples/$service" --exclude=./target -cf - . | tar -C "$work/src/$service" -xf -
    git -C "$work/src/$service" init -q -b main
    git -C "$work/src/$service" add .
    git -C "$work/src/$service" -c user.name=bench -c user.email=bench@revboot.test commit -q -m "$service"
    git -C "$work/src/$service" push -q "http://git:$token@127.0.0.1:$http/git/$service.git" main 2>/dev/null
done

python3 - "$http" "$dns" "$token" "$runs" <<'PY'
import json, socket, struct, sys, time, urllib.error, urllib.request

http, dns, token, runs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
api = f"http://127.0.0.1:{http}/api/v1"

def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api + path, data=data, method="POST" if data else "GET",
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

print(f"cold start through revboot (DNS query sent → first HTTP byte), {runs} runs each:")
for service, tender in (("hello", "process"), ("hello-vm", "qemu/tcg")):
    revision = call(f"/services/{service}/deployments")[0]["short"]
    name = f"{revision}.{service}.revboot.test"
    cold(service, name)  # warm the image cache and page cache
    samples = [cold(service, name) for _ in range(runs)]
    print(f"  {service:9} ({tender:8}) p50 {pct(samples, 50):7.1f} ms  p90 {pct(samples, 90):7.1f} ms  min {min(samples):7.1f} ms")
PY

# The same image booted by a bare qemu, no revboot around it, for comparison.
cleanup
daemon_pid=
trap - EXIT
bench/vm-cold.sh "$runs"

#!/usr/bin/env bash
# Cold start of examples/hello-vm in a bare qemu microvm, with the qemu tender's arguments.
#
# Per run: spawn qemu → first serial line → "listening" line → an HTTP request on the
# forwarded loopback port (qemu binds port 0 and keeps what the kernel gave it; the bench
# reads which from qemu's socket) → first response byte. Prints p50/p90 of each step (ms from the
# spawn), the RSS of a running VM and the host CPU it uses while idle. Traffic stays on
# 127.0.0.1.
#
#   bench/vm-cold.sh [runs]        (REVBOOT_QEMU_ACCEL=kvm|tcg, default tcg)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
(cd examples/hello-vm && cargo build --release --offline --locked -q)
image=examples/hello-vm/target/x86_64-unknown-linux-gnu/release/hello-vm
exec python3 - "$image" "$runs" "${REVBOOT_QEMU_ACCEL:-tcg}" <<'PY'
import os, socket, statistics, subprocess, sys, time

image, runs, accel = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def forwarded_port(pid):
    """The port of qemu's forward: qemu binds port 0 itself (the kernel picks, qemu holds it
    from then on), and its one listening TCP socket says which. A port found free here and
    released for qemu could be taken by anyone before qemu binds it."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    with open(f"/proc/{pid}/net/tcp") as tcp:
        next(tcp)
        for line in tcp:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN, one of qemu's
                return int(fields[1].rsplit(":", 1)[1], 16)
    raise RuntimeError("qemu has no listening socket")

def qemu(port):
    return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off",
            "-accel", accel, *([] if accel == "tcg" else ["-cpu", "host"]), "-m", "32",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-serial", "stdio", "-kernel", image, "-append", "revboot.revision=bench",
            "-global", "virtio-mmio.force-legacy=false",
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:8080",
            "-device", "virtio-net-device,netdev=n0"]

def one(measure_rss=False):
    t0 = time.perf_counter()
    vm = subprocess.Popen(qemu(0), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL)
    try:
        first = listening = None
        deadline = t0 + 10
        for line in vm.stdout:
            now = time.perf_counter()
            if first is None:
                first = now
                # The guest runs: qemu made its forward before (a read of /proc, well
                # under a millisecond, while the guest boots on).
                port = forwarded_port(vm.pid)
            if b"listening" in line:
                listening = now
                break
            if now > deadline:
                raise RuntimeError("no listening line in 10 s")
        if listening is None:
            raise RuntimeError("qemu exited before listening")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            byte = conn.recv(1)
            first_byte = time.perf_counter()
            body = byte
            while chunk := conn.recv(4096):
                body += chunk
        if b"hello from" not in body:
            raise RuntimeError(f"unexpected answer: {body!r}")
        rss = idle = None
        if measure_rss:
            with open(f"/proc/{vm.pid}/status") as status:
                rss = {l.split(":")[0]: int(l.split()[1]) for l in status
                       if l.startswith(("VmRSS", "RssAnon", "RssFile"))}
            idle = idle_cpu(vm.pid)
        return (first - t0) * 1e3, (listening - t0) * 1e3, (first_byte - t0) * 1e3, rss, idle
    finally:
        vm.kill()
        vm.wait()

def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def idle_cpu(pid, seconds=3.0):
    """Host CPU used by an idle VM, in percent of one core."""
    time.sleep(0.5)
    before, t = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.perf_counter() - t) * 100

def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]

one()  # warm the page cache
samples = [one(measure_rss=(i == 0)) for i in range(runs)]
print(f"hello-vm cold start under {accel}, {runs} runs (ms from qemu spawn):")
for name, idx in (("first serial line", 0), ("listening", 1), ("first HTTP byte", 2)):
    vals = [s[idx] for s in samples]
    print(f"  {name:18} p50 {pct(vals, 50):7.1f}  p90 {pct(vals, 90):7.1f}  min {min(vals):7.1f}")
rss = samples[0][3]
print(f"  qemu RSS while serving: {rss['VmRSS'] / 1024:.1f} MiB: {rss['RssAnon'] / 1024:.1f} MiB private, "
      f"{rss['RssFile'] / 1024:.1f} MiB file-backed (binary, libraries: shared between VMs); guest memory 32 MiB")
print(f"  host CPU of an idle VM: {samples[0][4]:.1f}% of one core")
PY

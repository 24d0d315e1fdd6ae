#!/usr/bin/env bash
# Running revboot for months: an upgrade in place under load, and what a health check adds
# to a promotion, through the whole daemon.
#
# Starts `revboot serve` (from a copy of the binary, in a temporary data directory, on
# loopback ports it picks itself) and pushes examples/hello with stock git, then:
#   1. promotion delay: PUSHES pushes of a new revision with `[deploy] check = { http =
#      "/health" }` and as many without, alternating; the wall time of each `git push` and,
#      with the check, the gate's own figure (summon → check passed, as the pusher reads
#      it). p50 of each and the difference of the push p50s;
#   2. upgrade under load: ROUNDS times, `wrk` against the live revision's instance for
#      DURATION seconds; a third of the way in, the binary file is replaced (a rename, as a
#      package manager does) and `revboot upgrade` runs. Failed requests (wrk's socket
#      errors and non-2xx answers), requests/s, and the upgrade's duration (the daemon's
#      own figure, request → serving again, and the CLI's wall time). Beside it the anchor:
#      the same wrk run without an upgrade. The instance's pid must be the same after.
# With EXAMPLE=hello-vm, the service is examples/hello-vm, a qemu microvm (step 1 is
# skipped: PUSHES counts for hello only), and wrk opens CONNECTIONS connections (default 16;
# hello-vm has four sockets, and with four or more connections one that arrives while a
# socket closes is reset, in the anchor as much as during an upgrade: 2 suits it): the VM
# must keep its pid too.
# All traffic stays on 127.0.0.0/8.
#
#   bench/upgrade.sh [ROUNDS] [PUSHES] [DURATION]   (default 3, 5, 15; REVBOOT_PROFILE=
#                                                    release|dev, or REVBOOT_BIN=<a revboot>;
#                                                    REVBOOT_NEW_BIN=<the binary upgraded to>;
#                                                    EXAMPLE=hello|hello-vm; CONNECTIONS=16)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
pushes=${2:-5}
duration=${3:-15}
profile=${REVBOOT_PROFILE:-dev}
if [ -n "${REVBOOT_BIN:-}" ]; then
    exe=$REVBOOT_BIN
    profile="given ($exe)"
elif [ "$profile" = release ]; then
    cargo build --release --locked -q -p revboot
    exe=${CARGO_TARGET_DIR:-target}/release/revboot
else
    cargo build --locked -q -p revboot
    exe=${CARGO_TARGET_DIR:-target}/debug/revboot
fi
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }
exec python3 - "$exe" "${REVBOOT_NEW_BIN:-$exe}" "$rounds" "$pushes" "$duration" "$profile" \
    "${EXAMPLE:-hello}" "${CONNECTIONS:-16}" <<'PY'
import json, os, re, shutil, statistics, subprocess, sys, tempfile, threading, time

EXE, NEW, ROUNDS, PUSHES, DURATION, PROFILE, EXAMPLE, CONNECTIONS = (
    os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]), int(sys.argv[3]),
    int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7], int(sys.argv[8]))
if EXAMPLE not in ("hello", "hello-vm"):
    sys.exit("EXAMPLE is hello or hello-vm")
if EXAMPLE == "hello-vm":
    PUSHES = 0
ROOT = os.getcwd()
TOKEN = "bench-token"
ZONE = "revboot.test"
tmp = tempfile.mkdtemp(prefix="revboot-upgrade-bench-")
binary = os.path.join(tmp, "revboot")
shutil.copy2(EXE, binary)
data = os.path.join(tmp, "data")
log_path = os.path.join(tmp, "daemon.log")
log = open(log_path, "w")
pool = "127.%d.%d.0/24" % (160 + os.getpid() % 60, os.getpid() // 60 % 250)
daemon = subprocess.Popen(
    [binary, "--data", data, "serve", "--http", "127.0.0.1:0", "--dns", "127.0.0.1:0",
     "--pool", pool, "--token", TOKEN],
    stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="info"))


def serving_line(after=0):
    deadline = time.time() + 60
    while time.time() < deadline:
        lines = [l for l in open(log_path).read().splitlines() if "revboot is serving" in l]
        if len(lines) > after:
            return lines[after]
        if daemon.poll() is not None:
            sys.exit("the daemon exited:\n" + open(log_path).read())
        time.sleep(0.05)
    sys.exit("the daemon did not serve:\n" + open(log_path).read())


line = serving_line()
http = re.search(r"http=(\S+)", line).group(1)
dns = re.search(r"dns=(\S+)", line).group(1)


def cli(*args):
    out = subprocess.run([binary, "--url", "http://" + http, "--data", data, "--json", *args],
                         env=dict(os.environ, REVBOOT_TOKEN=TOKEN), capture_output=True, text=True,
                         timeout=180)
    if out.returncode != 0:
        sys.exit("revboot %s failed: %s %s" % (" ".join(args), out.stdout, out.stderr))
    return json.loads(out.stdout)


def git(*args):
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@revboot.test", *args],
                   cwd=work, check=True, capture_output=True, timeout=300)


work = os.path.join(tmp, EXAMPLE)
shutil.copytree(os.path.join(ROOT, "examples", EXAMPLE), work,
                ignore=shutil.ignore_patterns("target"))
manifest = open(os.path.join(work, "revboot.toml")).read()
git("init", "-q", "-b", "main")
git("add", ".")
git("commit", "-q", "-m", "hello v1")
remote = "http://git:%s@%s/git/%s.git" % (TOKEN, http, EXAMPLE)
serial = [0]


def push(checked):
    serial[0] += 1
    tail = '[deploy]\ncheck = { http = "/health", within_ms = 20000 }\n' if checked else ""
    open(os.path.join(work, "revboot.toml"), "w").write(manifest + tail)
    main = os.path.join(work, "src/main.rs")
    text = open(main).read()
    text = re.sub(r'const REVISION: &str = "[^"]*";', 'const REVISION: &str = "b%d";' % serial[0], text)
    open(main, "w").write(text)
    git("commit", "-q", "-am", "hello b%d" % serial[0])
    start = time.monotonic()
    out = subprocess.run(["git", "push", "-q", remote, "main"], cwd=work, capture_output=True,
                         text=True, timeout=600)
    wall = (time.monotonic() - start) * 1000
    if out.returncode != 0:
        sys.exit("push failed:\n" + out.stderr)
    gate = re.search(r"health check passed in ([0-9.]+) ms", out.stderr)
    return wall, float(gate.group(1)) if gate else None


if EXAMPLE == "hello-vm":
    out = subprocess.run(["git", "push", "-q", remote, "main"], cwd=work, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        sys.exit("push failed:\n" + out.stderr)
else:
    push(False)  # the first build warms cargo's cache
plain, checked, gate = [], [], []
for _ in range(PUSHES):
    plain.append(push(False)[0])
    wall, passed = push(True)
    checked.append(wall)
    gate.append(passed)
p50 = statistics.median
print("revboot upgrade bench (%s binary, examples/%s)" % (PROFILE, EXAMPLE))
if PUSHES:
    print("== promotion delay of examples/hello, %d pushes each ==" % PUSHES)
    print("push without check: p50 %.0f ms (%.0f..%.0f)" % (p50(plain), min(plain), max(plain)))
    print("push with check:    p50 %.0f ms (%.0f..%.0f)" % (p50(checked), min(checked), max(checked)))
    print("gate (summon → GET /health passed): p50 %.1f ms (%.1f..%.1f)" % (p50(gate), min(gate), max(gate)))
    print("added by the check (push p50 difference): %.0f ms" % (p50(checked) - p50(plain)))

# The live revision's instance, booted.
name = "%s.%s" % (EXAMPLE, ZONE)
answer = subprocess.run(["dig", "@" + dns.rsplit(":", 1)[0], "-p", dns.rsplit(":", 1)[1], "+short",
                         name, "A"], capture_output=True, text=True, timeout=30).stdout.split()
address = answer[0]
url = "http://%s:8080/" % address
subprocess.run(["curl", "-sS", "--max-time", "30", "-o", "/dev/null", url], check=True)


def instance_pids():
    return sorted(i.get("pid") for i in cli("ps") if i.get("pid"))


def wrk():
    out = subprocess.run(["wrk", "-t2", "-c%d" % CONNECTIONS, "-d%ds" % DURATION, "--timeout", "10s",
                          url],
                         capture_output=True, text=True, timeout=DURATION + 120).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    failed = 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errors:
        failed += sum(int(n) for n in errors.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        failed += int(non2xx.group(1))
    return rps, total, failed, out


print("== upgrade in place under load: wrk -t2 -c%d -d%ds against %s ==" % (CONNECTIONS, DURATION, url))
upgrades = []
for round in range(1, ROUNDS + 1):
    rps, total, failed, _ = wrk()
    print("round %d anchor (no upgrade): %.0f req/s, %d requests, %d failed" % (round, rps, total, failed))
    before = instance_pids()
    result = {}

    def upgrade():
        time.sleep(DURATION / 3)
        shutil.copy2(NEW, binary + ".new")
        os.rename(binary + ".new", binary)
        start = time.monotonic()
        view = cli("upgrade")
        result["wall"] = (time.monotonic() - start) * 1000
        result["view"] = view

    thread = threading.Thread(target=upgrade)
    thread.start()
    rps, total, failed, out = wrk()
    thread.join()
    view = result["view"]
    after = instance_pids()
    upgrades.append((failed, view["last_upgrade_ms"], result["wall"]))
    print("round %d upgrade: %.0f req/s, %d requests, %d failed; upgrade %d ms (daemon: request → "
          "serving), %.0f ms (revboot upgrade wall), %d instance(s) handed over, pids %s"
          % (round, rps, total, failed, view["last_upgrade_ms"], result["wall"],
             view.get("last_upgrade_instances", 0), "kept" if after == before else
             "CHANGED %s → %s" % (before, after)))
    if failed:
        print(out)
fails = [u[0] for u in upgrades]
ms = [u[1] for u in upgrades]
print("failed requests during upgrades: %d..%d (goal 0); upgrade duration %d..%d ms"
      % (min(fails), max(fails), min(ms), max(ms)))
daemon.terminate()
try:
    daemon.wait(timeout=60)
except subprocess.TimeoutExpired:
    daemon.kill()
shutil.rmtree(tmp, ignore_errors=True)
PY

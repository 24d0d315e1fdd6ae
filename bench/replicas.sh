#!/usr/bin/env bash
# Warm replicas: `wrk` against one service kept warm with one replica and against the same
# service with three (`[run] min_instances = 1` vs `3`), side by side in one run.
#
# Starts `revboot serve` (in a temporary data directory, on loopback ports it picks itself)
# and pushes examples/hello with stock git twice, as `one` (min_instances = 1) and `three`
# (min_instances = 3). Then ROUNDS times, alternating which goes first: `wrk -t2 -cCONNECTIONS
# -dDURATION` against each one's service address (hello answers `connection: close`, so
# every request is a new connection, which the kernel or the proxy gives to a replica).
# Prints requests/s of each, failed requests (socket errors and non-2xx), how many replicas
# answered (hello's `x-instance` header, 30 requests after each round), the connections the
# kernel steered to each replica so far (none: not steered) and the ratio three / one per
# round.
# The machine's cores bound what three replicas can add. Both services' connections are
# steered by the kernel (sk_lookup, when the daemon can load it), the three replicas' spread
# over them by a hash of the client's port: STEER=off runs the daemon with `[instances]
# steer = false`, so that both go through the proxy's relay. All traffic stays on
# 127.0.0.0/8.
#
#   bench/replicas.sh [ROUNDS] [DURATION]   (default 3, 10; REVBOOT_PROFILE=release|dev, or
#                                            REVBOOT_BIN=<a revboot>; CONNECTIONS=16;
#                                            STEER=on|off)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
duration=${2:-10}
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
exec python3 - "$exe" "$rounds" "$duration" "$profile" "${CONNECTIONS:-16}" "${STEER:-on}" <<'PY'
import json, os, re, shutil, subprocess, sys, tempfile, time

EXE, ROUNDS, DURATION, PROFILE, CONNECTIONS, STEER = (
    os.path.abspath(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]),
    sys.argv[6])
ROOT = os.getcwd()
TOKEN = "bench-token"
tmp = tempfile.mkdtemp(prefix="revboot-replicas-bench-")
data = os.path.join(tmp, "data")
log_path = os.path.join(tmp, "daemon.log")
log = open(log_path, "w")
pool = "127.%d.%d.0/24" % (160 + os.getpid() % 60, os.getpid() // 60 % 250)
config = os.path.join(tmp, "revbootd.toml")
open(config, "w").write("[instances]\nsteer = %s\n" % ("false" if STEER == "off" else "true"))
daemon = subprocess.Popen(
    [EXE, "--config", config, "--data", data, "serve", "--http", "127.0.0.1:0", "--dns", "127.0.0.1:0",
     "--pool", pool, "--token", TOKEN],
    stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="info"))


def stop():
    daemon.terminate()
    try:
        daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()


def fail(why):
    stop()
    sys.exit(why + "\ndaemon log: " + log_path)


deadline = time.time() + 60
line = None
while line is None:
    lines = [l for l in open(log_path).read().splitlines() if "revboot is serving" in l]
    if lines:
        line = lines[0]
    elif daemon.poll() is not None or time.time() > deadline:
        fail("the daemon did not serve:\n" + open(log_path).read())
    else:
        time.sleep(0.05)
http = re.search(r"http=(\S+)", line).group(1)


def cli(*args):
    out = subprocess.run([EXE, "--url", "http://" + http, "--data", data, "--json", *args],
                         env=dict(os.environ, REVBOOT_TOKEN=TOKEN), capture_output=True, text=True,
                         timeout=180)
    if out.returncode != 0:
        fail("revboot %s failed: %s %s" % (" ".join(args), out.stdout, out.stderr))
    return json.loads(out.stdout)


work = os.path.join(tmp, "hello")
shutil.copytree(os.path.join(ROOT, "examples", "hello"), work,
                ignore=shutil.ignore_patterns("target"))
manifest = open(os.path.join(work, "revboot.toml")).read()


def git(*args):
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@revboot.test", *args],
                   cwd=work, check=True, capture_output=True, timeout=300)


git("init", "-q", "-b", "main")
git("add", ".")
git("commit", "-q", "-m", "hello v1")
services = {"one": 1, "three": 3}
for service, replicas in services.items():
    open(os.path.join(work, "revboot.toml"), "w").write(manifest + "min_instances = %d\n" % replicas)
    git("commit", "-q", "-am", "hello, %d replicas" % replicas)
    remote = "http://git:%s@%s/git/%s.git" % (TOKEN, http, service)
    out = subprocess.run(["git", "push", "-q", remote, "main"], cwd=work, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        fail("push of %s failed:\n%s" % (service, out.stderr))


def serving(service):
    return [i for i in cli("ps") if i["service"] == service and i["state"] in ("ready", "idle")]


address = {}
for service, replicas in services.items():
    deadline = time.time() + 60
    while len(serving(service)) < replicas:
        if time.time() > deadline:
            fail("%s has not %d replicas: %s" % (service, replicas, cli("ps")))
        time.sleep(0.2)
    address[service] = serving(service)[0]["address"]


def steered(service):
    return [i.get("steered") for i in sorted(serving(service), key=lambda i: i.get("replica") or 0)]


def answered_by(service):
    seen = set()
    for _ in range(30):
        out = subprocess.run(["curl", "-sS", "-i", "--max-time", "10", "http://%s:8080/" % address[service]],
                             capture_output=True, text=True, timeout=30).stdout
        found = re.search(r"^x-instance: (\S+)", out, re.M)
        if found:
            seen.add(found.group(1))
    return len(seen)


def wrk(service):
    out = subprocess.run(["wrk", "-t2", "-c%d" % CONNECTIONS, "-d%ds" % DURATION, "--timeout", "10s",
                          "http://%s:8080/" % address[service]],
                         capture_output=True, text=True, timeout=DURATION + 120).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    failed = 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errors:
        failed += sum(int(n) for n in errors.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        failed += int(non2xx.group(1))
    return rps, failed


print("revboot replicas bench (%s binary, examples/hello, wrk -t2 -c%d -d%ds, steering %s, load %s)"
      % (PROFILE, CONNECTIONS, DURATION, STEER, open("/proc/loadavg").read().split()[0]))
ratios = []
for round in range(1, ROUNDS + 1):
    order = ["one", "three"] if round % 2 else ["three", "one"]
    result = {}
    for service in order:
        result[service] = wrk(service)
        print("round %d %-5s (min_instances = %d): %.0f req/s, %d failed, %d replica(s) answered,"
              " steered so far by replica: %s"
              % (round, service, services[service], result[service][0], result[service][1],
                 answered_by(service), steered(service)))
    ratio = result["three"][0] / result["one"][0]
    ratios.append(ratio)
    print("round %d ratio three / one: %.2fx" % (round, ratio))
print("ratio three replicas / one over %d rounds: %.2f..%.2fx" % (ROUNDS, min(ratios), max(ratios)))
stop()
shutil.rmtree(tmp, ignore_errors=True)
PY

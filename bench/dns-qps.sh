#!/usr/bin/env bash
# revboot-dns against NSD, in one run, same dnsperf settings; loopback only.
#
#   bench/dns-qps.sh [seconds per run, default 10] [rounds, default 2] [--fake]
#
# 1. QPS for a running instance's name on the cached path: revboot-dns (dns-bench example:
#    the real deployer and store with the examples/hello image; --fake for an in-memory
#    stand-in) and NSD serving an equivalent static zone, each with 2 UDP workers, rate
#    limits off; dnsperf alternates between them for ROUNDS rounds; the best of each is
#    compared and the ratio printed.
# 2. Answer latency for cold names (each query summons an instance; non-delayed mode),
#    behind the handshake proxy (the daemon's default) and with instances on their service
#    address, with the deployer's own resolve() and summon() timed alone beside it, and
#    each cold query paired with a query for a running instance's name (the anchor: the
#    machine's noise), one at a time also after the same pause.
# 3. The machine's floor: thread wake-up latency (cyclictest, when installed).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN="${1:-10}"
ROUNDS="${2:-2}"
BACKEND_FLAG="--deployer"
[ "${3:-}" = "--fake" ] && BACKEND_FLAG="--fake"
REVBOOT_PORT=15353
NSD_PORT=15354

cargo build --release --quiet --offline -p revboot --example dns-bench
BIN=target/release/examples/dns-bench
IMAGE=target/deployer-images/hello/x86_64-unknown-linux-gnu/release/hello
if [ "$BACKEND_FLAG" = "--deployer" ]; then
  (cd examples/hello && env -u RUSTFLAGS CARGO_TARGET_DIR=../../target/deployer-images/hello \
    cargo build --release --offline --quiet --target x86_64-unknown-linux-gnu)
  BACKEND=("--deployer" "$IMAGE")
else
  BACKEND=("--fake")
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" serve "127.0.0.1:$REVBOOT_PORT" "${BACKEND[@]}" >"$WORK/revboot.out" 2>"$WORK/revboot.err" &
PIDS+=("$!")
for _ in $(seq 300); do
  grep -q '^ready' "$WORK/revboot.out" 2>/dev/null && break
  sleep 0.1
done
NAME=$(awk '/^ready/ {print $2; exit}' "$WORK/revboot.out")
[ -n "$NAME" ] || { echo "revboot-dns did not start" >&2; cat "$WORK/revboot.err" >&2; exit 1; }
ADDRESS=$(dig +short -p "$REVBOOT_PORT" @127.0.0.1 "$NAME" A)
echo "revboot-dns ($BACKEND_FLAG) on :$REVBOOT_PORT answers $NAME -> $ADDRESS"

# The same names, statically, for NSD.
cat >"$WORK/revboot.test.zone" <<EOF
\$ORIGIN revboot.test.
\$TTL 300
@       IN SOA ns.revboot.test. hostmaster.revboot.test. 1 3600 600 86400 5
@       IN NS  ns.revboot.test.
ns      IN A   127.0.0.1
hello 1 IN A   $ADDRESS
$NAME. 1 IN A $ADDRESS
EOF
cat >"$WORK/nsd.conf" <<EOF
server:
  ip-address: 127.0.0.1@$NSD_PORT
  server-count: 2
  username: ""
  chroot: ""
  zonesdir: "$WORK"
  database: ""
  zonelistfile: "$WORK/zone.list"
  xfrdfile: "$WORK/xfrd.state"
  pidfile: "$WORK/nsd.pid"
  logfile: "$WORK/nsd.log"
  verbosity: 0
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: revboot.test
  zonefile: revboot.test.zone
EOF
nsd -d -c "$WORK/nsd.conf" &
PIDS+=("$!")
for _ in $(seq 100); do
  [ -n "$(dig +short +time=1 +tries=1 -p "$NSD_PORT" @127.0.0.1 "$NAME" A 2>/dev/null)" ] && break
  sleep 0.1
done
echo "nsd on :$NSD_PORT answers $NAME -> $(dig +short -p "$NSD_PORT" @127.0.0.1 "$NAME" A)"

printf '%s A\nhello.revboot.test A\n' "$NAME" >"$WORK/queries"
qps() { # port
  dnsperf -s 127.0.0.1 -p "$1" -d "$WORK/queries" -l "$SECONDS_PER_RUN" -c 4 -T 1 -q 200 2>&1 \
    | awk '/Queries per second/ {print $4}'
}
best_nsd=0
best_revboot=0
for round in $(seq "$ROUNDS"); do
  n=$(qps "$NSD_PORT")
  r=$(qps "$REVBOOT_PORT")
  echo "round $round: nsd $n qps, revboot-dns $r qps"
  best_nsd=$(echo "$n $best_nsd" | awk '{print ($1 > $2) ? $1 : $2}')
  best_revboot=$(echo "$r $best_revboot" | awk '{print ($1 > $2) ? $1 : $2}')
done
echo "dnsperf -l $SECONDS_PER_RUN -c 4 -T 1 -q 200, cached path, best of $ROUNDS:"
echo "  nsd         $best_nsd qps"
echo "  revboot-dns $best_revboot qps"
echo "  ratio       $(echo "$best_revboot $best_nsd" | awk '{printf "%.2f", $1 / $2}') x NSD"
kill "${PIDS[0]}" 2>/dev/null || true
wait "${PIDS[0]}" 2>/dev/null || true
echo "revboot-dns counters: $(grep MetricsSnapshot "$WORK/revboot.err" | tail -1)"

echo "cold names (each query summons; answered without waiting for the boot):"
if [ "$BACKEND_FLAG" = "--deployer" ]; then
  echo " behind the handshake proxy (the daemon's default):"
  "$BIN" cold 600 --proxy "$IMAGE" 2>/dev/null | sed 's/^/  /'
  echo " each instance on its service address itself ([instances] direct = true):"
fi
"$BIN" cold 600 "${BACKEND[@]}" 2>/dev/null | sed 's/^/  /'

# The machine's own floor for the latency figures: how late a sleeping thread wakes
# (cyclictest from Debian's rt-tests, when installed). Every DNS exchange needs at least two
# such wake-ups, the server's and the client's.
if command -v cyclictest >/dev/null; then
  cyclictest -t2 -i 500 -l 20000 -q -h 5000 2>/dev/null >"$WORK/cyclictest"
  python3 - "$WORK/cyclictest" <<'PY'
import sys
rows = [line.split() for line in open(sys.argv[1]) if line[:1].isdigit()]
total = sum(int(row[1]) + int(row[2]) for row in rows)
def at(q):
    seen = 0
    for row in rows:
        seen += int(row[1]) + int(row[2])
        if seen >= total * q:
            return int(row[0])
    return None
print(f"machine floor: thread wake-up latency (cyclictest, {total} samples): "
      f"p50 {at(0.5)} us, p99 {at(0.99)} us, p99.9 {at(0.999)} us")
PY
else
  echo "machine floor: install rt-tests (cyclictest) to print thread wake-up latency"
fi

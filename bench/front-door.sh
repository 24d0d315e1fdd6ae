#!/usr/bin/env bash
# The latency the front door adds: first byte of a new connection (connect, `GET /` with a
# Host header, first byte of the answer), straight to a backend and through the proxy's
# front door in front of the same backend (head read, name → revision, summon of a ready
# instance, connect, replay), interleaved in one run; prints p50 and p99 of both and the
# ratios. Loopback only.
#
#   [ROUNDS=3] bench/front-door.sh [connections per round, default 2000]
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT="${1:-2000}"
FRONT_IP=127.66.201.1

cargo build --release --quiet -p revboot-proxy --example proxy_bench
BIN="${CARGO_TARGET_DIR:-target}/release/examples/proxy_bench"

WORK=$(mktemp -d)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

# Starts a background process writing to $WORK/$1 and waits (10 s at most) for its first line.
start() {
  local name=$1; shift
  "$@" >"$WORK/$name" &
  PIDS+=("$!")
  for _ in $(seq 100); do
    [ -s "$WORK/$name" ] && return 0
    sleep 0.1
  done
  echo "$name did not start" >&2; exit 1
}

start backend "$BIN" backend
BACKEND=$(awk '{print $2; exit}' "$WORK/backend")
start front "$BIN" front "$BACKEND" "$FRONT_IP"
FRONT=$(awk '{print $2; exit}' "$WORK/front")
echo "backend $BACKEND, front door $FRONT"
for round in $(seq "${ROUNDS:-3}"); do
  echo "round $round"
  "$BIN" firstbyte "$COUNT" "$BACKEND" "$FRONT"
done

#!/usr/bin/env bash
# The handshake proxy's warm figures, in one run: wrk straight to a backend, then at the
# service address of a proxy in front of the same backend — once as the deployer runs a
# ready instance, or a booting process instance (steered: the kernel hands each new
# connection to the backend's socket, sk_lookup, root), once with the proxy relaying every
# byte (steering off, a front-door connection, or one held through a VM's boot); then through
# the front door (routed by Host), once relayed and once handed to the instance's own socket
# ([run] handoff = true: the backend receives each connection over a Unix socket, as a
# process instance does on REVBOOT_HANDOFF_FD); prints the ratios. Loopback only.
#
#   [ROUNDS=3] bench/proxy.sh [seconds per run, default 10] [multi|current] [buffer bytes] [copy|zero]
#
# Warm small requests (keep-alive, 6-byte body), 1 MiB bodies, and single-connection latency
# (wrk -c1: p50 difference is the latency the proxy adds). Also the cost of binding one
# listener on demand.
#
# Besides wrk's rates, each relayed run reports the CPU time the relay spent per request
# beside the backend's own (from /proc/<pid>/task/*/schedstat, all threads): on a shared
# machine the rates swing with other tenants' load, the CPU cost per request much less,
# and it is what the relay takes from the instance and the clients on a busy host. The cold figures come from
# `cargo bench -p revboot-proxy --bench cold` (real deployer, real hello image).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN="${1:-10}"
SERVICE_IP=127.66.200.1
STEERED_IP=127.66.200.2
FRONT_IP=127.66.200.3
HANDED_IP=127.66.200.4

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

# The proxy binds these addresses on demand and would only log a failure: if another run (or
# anything else) listens there already, the relayed column would measure that listener.
for ip in "$SERVICE_IP" "$STEERED_IP"; do
  if [ -n "$(ss -Hltn "src $ip:8080")" ]; then
    echo "$ip:8080 is taken already (another bench/proxy.sh running?); not measuring" >&2
    exit 1
  fi
done

start backend "$BIN" backend "$WORK/handoff.sock"
BACKEND=$(awk '{print $2; exit}' "$WORK/backend")
BACKEND_PID=$(awk '{print $3; exit}' "$WORK/backend")
start proxy "$BIN" proxy "$BACKEND" "$SERVICE_IP" "${2:-multi}" "${3:-65536}" "${4:-copy}"
PROXY_PID=${PIDS[-1]}
PROXIED=$(awk '{print $2; exit}' "$WORK/proxy")
start steered "$BIN" steer "$BACKEND" "$STEERED_IP" "$BACKEND_PID"
STEERED=$(awk '{print $2; exit}' "$WORK/steered")
start front "$BIN" front "$BACKEND" "$FRONT_IP"
FRONT_PID=${PIDS[-1]}
FRONT=$(awk '{print $2; exit}' "$WORK/front")
start handed "$BIN" front "$BACKEND" "$HANDED_IP" "$WORK/handoff.sock"
HANDED_PID=${PIDS[-1]}
HANDED=$(awk '{print $2; exit}' "$WORK/handed")
HOST_HEADER="Host: bench.revboot.test"
echo "backend $BACKEND, relayed $PROXIED (runtime ${2:-multi}, buffer ${3:-65536}, ${4:-copy}), steered $STEERED, front door relayed $FRONT, front door handed off $HANDED"

# CPU time (ns) of every thread of a process so far.
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%.0f", s}'; }

# wrk summary → "requests/s bytes/s p50-µs relay-CPU-µs/request backend-CPU-µs/request"
# (the relay's figure is the proxy's CPU over the run, so 0 when the proxy was not in the path)
# RELAY_PID: the process whose CPU counts as the relay's (default: the proxy).
measure() {
  local relay=${RELAY_PID:-$PROXY_PID}
  local proxy0 backend0; proxy0=$(cpu_ns "$relay"); backend0=$(cpu_ns "$BACKEND_PID")
  local out; out=$(wrk --latency "$@")
  local proxy1 backend1; proxy1=$(cpu_ns "$relay"); backend1=$(cpu_ns "$BACKEND_PID")
  local rps; rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  local tps; tps=$(awk '/^Transfer\/sec/ {print $2}' <<<"$out")
  local p50; p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  local count; count=$(awk '/requests in/ {print $1}' <<<"$out")
  echo "$rps $(to_bytes "$tps") $(to_us "$p50") $(per_request "$proxy0" "$proxy1" "$count") $(per_request "$backend0" "$backend1" "$count")"
}
# per_request <ns before> <ns after> <requests> → µs per request
per_request() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN{printf "%.1f", (n > 0 ? (b-a)/n/1000 : 0)}'; }
to_bytes() { # 1.23MB / 456.7KB / 12GB
  awk -v v="$1" 'BEGIN { n=v+0; u=substr(v, length(v)-1);
    if (u=="KB") n*=1024; else if (u=="MB") n*=1048576; else if (u=="GB") n*=1073741824;
    printf "%.0f", n }'
}
to_us() { # 45.00us / 1.20ms / 2.00s
  awk -v v="$1" 'BEGIN { n=v+0;
    if (v ~ /us$/) n=n; else if (v ~ /ms$/) n*=1000; else if (v ~ /s$/) n*=1000000;
    printf "%.1f", n }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a/b }'; }

D=${SECONDS_PER_RUN}s
ROUNDS=${ROUNDS:-3}
mib() { awk -v b="$1" 'BEGIN{printf "%.0f MiB/s", b/1048576}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# scenario <title> <path> <wrk args…>: ROUNDS of direct, steered, relayed; the median of
# each round's ratios (the machine is shared, so a round pairs like with like).
scenario() {
  local title=$1 path=$2; shift 2
  echo
  echo "== $title (wrk $*, ${D} per run, $ROUNDS rounds) =="
  local rps=() bps=() added=() s_rps=() s_bps=() s_added=() relay_cpu=() backend_cpu=()
  local f_rps=() f_bps=() f_added=() h_rps=() h_bps=() h_added=() front_cpu=() handed_cpu=()
  for round in $(seq "$ROUNDS"); do
    read -r d_rps d_bps d_p50 _ d_cpu < <(measure "$@" -d"$D" "http://$BACKEND$path")
    read -r s_rps_ s_bps_ s_p50 _ _ < <(measure "$@" -d"$D" "http://$STEERED$path")
    read -r p_rps p_bps p_p50 p_cpu _ < <(measure "$@" -d"$D" "http://$PROXIED$path")
    read -r f_rps_ f_bps_ f_p50 f_cpu _ < <(RELAY_PID=$FRONT_PID measure "$@" -H "$HOST_HEADER" -d"$D" "http://$FRONT$path")
    read -r h_rps_ h_bps_ h_p50 h_cpu _ < <(RELAY_PID=$HANDED_PID measure "$@" -H "$HOST_HEADER" -d"$D" "http://$HANDED$path")
    echo "  round $round: direct $d_rps req/s, $(mib "$d_bps"), p50 $d_p50 us | steered $s_rps_ req/s, $(mib "$s_bps_"), p50 $s_p50 us | relayed $p_rps req/s, $(mib "$p_bps"), p50 $p_p50 us | CPU per request: backend $d_cpu us, relay $p_cpu us"
    echo "           front door relayed $f_rps_ req/s, $(mib "$f_bps_"), p50 $f_p50 us (front CPU $f_cpu us/request) | front door handed off $h_rps_ req/s, $(mib "$h_bps_"), p50 $h_p50 us (front CPU $h_cpu us/request)"
    front_cpu+=("$f_cpu")
    handed_cpu+=("$h_cpu")
    f_rps+=("$(ratio "$f_rps_" "$d_rps")")
    f_bps+=("$(ratio "$f_bps_" "$d_bps")")
    f_added+=("$(awk -v a="$f_p50" -v b="$d_p50" 'BEGIN{printf "%.1f", a-b}')")
    h_rps+=("$(ratio "$h_rps_" "$d_rps")")
    h_bps+=("$(ratio "$h_bps_" "$d_bps")")
    h_added+=("$(awk -v a="$h_p50" -v b="$d_p50" 'BEGIN{printf "%.1f", a-b}')")
    relay_cpu+=("$p_cpu")
    backend_cpu+=("$d_cpu")
    s_rps+=("$(ratio "$s_rps_" "$d_rps")")
    s_bps+=("$(ratio "$s_bps_" "$d_bps")")
    s_added+=("$(awk -v a="$s_p50" -v b="$d_p50" 'BEGIN{printf "%.1f", a-b}')")
    rps+=("$(ratio "$p_rps" "$d_rps")")
    bps+=("$(ratio "$p_bps" "$d_bps")")
    added+=("$(awk -v a="$p_p50" -v b="$d_p50" 'BEGIN{printf "%.1f", a-b}')")
  done
  echo "  steered (ready instance, or a process instance from its boot on): median ratio requests/s $(median "${s_rps[@]}"), bytes/s $(median "${s_bps[@]}"), added p50 $(median "${s_added[@]}") us"
  echo "  relayed (front door, held through a VM's boot, or steer = false): median ratio requests/s $(median "${rps[@]}"), bytes/s $(median "${bps[@]}"), added p50 $(median "${added[@]}") us"
  echo "  front door, relayed: median ratio requests/s $(median "${f_rps[@]}"), bytes/s $(median "${f_bps[@]}"), added p50 $(median "${f_added[@]}") us"
  echo "  front door, handed off ([run] handoff = true): median ratio requests/s $(median "${h_rps[@]}"), bytes/s $(median "${h_bps[@]}"), added p50 $(median "${h_added[@]}") us"
  echo "  CPU per request (median): backend $(median "${backend_cpu[@]}") us, relay $(median "${relay_cpu[@]}") us, front door relaying $(median "${front_cpu[@]}") us, front door handing off $(median "${handed_cpu[@]}") us"
}

scenario "small responses, keep-alive" / -t2 -c32
scenario "1 MiB responses, keep-alive" /1m -t1 -c4
scenario "latency: one connection, sequential requests" / -t1 -c1
echo
echo "targets: requests/s >= 0.9 (small), bytes/s >= 0.9 (1 MiB), added p50 <= 50 us (one connection)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"

echo "== binding a listener on demand =="
"$BIN" bind 2000

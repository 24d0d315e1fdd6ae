#!/usr/bin/env bash
# Push-to-deployed overhead for examples/hello with a warm cache: the wall time of a stock
# `git push` over smart HTTP to the builder (on 127.0.0.1) minus the build command's own
# time. Goal: <= 1 s. Usage: bench/push-overhead.sh [N pushes, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
PUSH_OVERHEAD_N="${1:-10}" exec cargo bench -p revboot-builder --bench push_overhead

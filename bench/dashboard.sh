#!/usr/bin/env bash
# The dashboard's figures, on a real `revboot serve` in a release build: the history page
# of a service with 1,000 deployments (p50, p90; the API's JSON of the same history beside
# it), and the time from an instance writing a console line to the line being in the page
# of a headless Chromium following the live console (p50, p90); and the instances page with
# 200 instances running (p50, p90; the API's JSON list beside it).
# Usage: bench/dashboard.sh   (needs chromium and chromium-driver: scripts/test-tools.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --locked --test integration dashboard_figures -- --ignored --nocapture 2>&1 |
  grep -E "^(history page|instances page|console line)|test result|panicked"

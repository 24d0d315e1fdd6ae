#!/usr/bin/env bash
# Deployer figures with their anchors, measured in the same run (run as root):
#   cold start summon -> first byte of examples/hello, beside a plain fork/exec of hello;
#   crash detected -> replacement ready; a boot storm kept running, with memory per instance.
# Counts: COLD (default 1000), CRASHES (200), STORM (1000).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p revboot-deployer --bench instances

#!/usr/bin/env bash
# The whole test suite: installs the tools it drives when missing (as root), then format,
# lints, tests and docs. The tests create namespaces and cgroups: run as root.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/test-tools.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

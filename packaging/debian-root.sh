#!/usr/bin/env bash
# Makes the clean Debian root packaging/test-deb.sh installs the package in: bookworm,
# minbase, with systemd and git, by debootstrap from deb.debian.org. Once: a root that is
# there already is kept. Written aside and renamed, so an interrupted run leaves none.
# scripts/test-tools.sh runs it, so that the tests themselves reach no network.
# Usage, as root: packaging/debian-root.sh <dir>
set -euo pipefail
root=$1
[[ -x $root/lib/systemd/systemd ]] && exit 0
rm -rf "$root.tmp"
mkdir -p "$(dirname "$root")"
log=$(mktemp)
timeout 1200 debootstrap --variant=minbase --include=systemd,systemd-sysv,git \
    bookworm "$root.tmp" http://deb.debian.org/debian >"$log" 2>&1 ||
    { tail -20 "$log" >&2; rm -f "$log"; exit 1; }
rm -f "$log"
rm -rf "$root"
mv "$root.tmp" "$root"

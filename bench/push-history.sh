#!/usr/bin/env bash
# One push of N commits of examples/hello (default 50) to a real `revboot serve`: the time
# until every commit is deployed (the push waits for its builds), against the sum of the
# build commands' own times in the same run; then the deployment repository's growth per
# deployment after `git repack`, against the image's size.
# Usage: bench/push-history.sh [N]   (REVBOOT_BIN: the revboot binary; default: a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-50}"
if [ -z "${REVBOOT_BIN:-}" ]; then
  cargo build --release -q -p revboot
  REVBOOT_BIN="${CARGO_TARGET_DIR:-target}/release/revboot"
fi
tmp=$(mktemp -d)
daemon=
cleanup() {
  [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
data="$tmp/data"
"$REVBOOT_BIN" --data "$data" serve --http 127.0.0.1:0 --dns 127.0.0.1:0 \
  --pool 127.79.0.0/24 --token bench >"$tmp/log" 2>&1 &
daemon=$!
for _ in $(seq 600); do grep -q "revboot is serving" "$tmp/log" && break; sleep 0.1; done
http=$(grep -o 'http=[0-9.:]*' "$tmp/log" | head -1 | cut -d= -f2)
remote="http://git:bench@$http/git/hello.git"
git_() { git -c user.name=bench -c user.email=bench@revboot.test "$@"; }
work="$tmp/hello"
mkdir -p "$work" && (cd examples/hello && tar --exclude=target -cf - .) | tar -xf - -C "$work"
cd "$work"
git_ init -q -b main && git_ add . && git_ commit -qm "hello v0"
git_ push -q "$remote" main 2>/dev/null  # the first build warms the build cache
repack() {
  git -C "$data/deploy.git" -c core.bigFileThreshold=2g repack -a -d -q --window=50 --depth=50
  du -sb "$data/deploy.git/objects" | cut -f1
}
before=$(repack)
for i in $(seq "$N"); do
  sed -i "s/^const REVISION: &str = .*/const REVISION: \&str = \"bench-$i\";/" src/main.rs
  git_ commit -qam "hello v$i"
done
start=$(date +%s.%N)
git_ push -q "$remote" main 2>"$tmp/push.err" || { cat "$tmp/push.err"; exit 1; }
end=$(date +%s.%N)
deployed=$(git -C "$data/deploy.git" rev-list --count hello)
after=$(repack)
image=$(git -C "$data/deploy.git" cat-file -s hello:image/hello)
commands=$(
  python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); r=[b for b in s["records"] if b["service"]=="hello" and b["id"]>1]; print(sum(b.get("command_secs") or 0 for b in r))' "$data/builder/state.json")
python3 - "$N" "$start" "$end" "$deployed" "$before" "$after" "$image" "$commands" <<'PY'
import sys
n, start, end, deployed, before, after, image, commands = sys.argv[1:]
n, deployed, before, after, image = int(n), int(deployed), int(before), int(after), int(image)
total, commands = float(end) - float(start), float(commands)
print(f"{n} commits in one push: {deployed - 1} deployed in {total:.1f} s ({total / n:.2f} s each)")
print(f"  the build commands alone: {commands:.1f} s; push total / build commands = {total / commands:.2f}x")
growth = (after - before) / n
print(f"  repository growth per deployment after repack: {growth / 1024:.1f} KiB"
      f" ({100 * growth / image:.2f}% of one {image / 2**20:.2f} MiB image)")
PY

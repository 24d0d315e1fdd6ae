#!/usr/bin/env bash
# Builds the Debian package with cargo-deb: the binary, its manual page and shell
# completions (written by the binary itself), /etc/revboot/revbootd.toml and the systemd
# unit. Prints the package's path (target/debian/revboot_<version>-1_<arch>.deb unless
# `-o` says otherwise). Needs cargo-deb (`cargo install --locked cargo-deb`).
# REVBOOT_DEB_PROFILE: the cargo profile to build and package (default: release).
# Arguments go to `cargo deb`.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${REVBOOT_DEB_PROFILE:-release}
target=${CARGO_TARGET_DIR:-target}
cargo build --locked --profile "$profile" --bin revboot >&2
case $profile in
dev) dir=debug ;;
*) dir=$profile ;;
esac
bin=$target/$dir/revboot
# cargo-deb reads the assets named target/release/… in the profile's own directory.
out=$target/$dir/packaging
mkdir -p "$out"
"$bin" man >"$out/revboot.1"
"$bin" completions bash >"$out/revboot.bash"
"$bin" completions zsh >"$out/_revboot"
"$bin" completions fish >"$out/revboot.fish"
cargo deb --no-build --locked --profile "$profile" "$@"

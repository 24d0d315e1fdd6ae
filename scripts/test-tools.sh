#!/usr/bin/env bash
# Installs what the test suite drives when it is missing: stock git, curl, dig, qemu,
# iproute2, unbound (the resolver of the beyond-loopback tests), nsenter, openssl (a TLS
# client and server for the front door's tests), pebble (the ACME test server the
# certificate tests get certificates from), a C compiler, Chromium with its WebDriver
# for the dashboard's browser test, the shells and man that load the CLI's completions and
# render its manual page, debootstrap (Debian package names), setfattr (the delegated
# cgroup systemd would mark, in the delegation test), etcd (the cluster tests), protoc with
# protobuf's .proto files (the etcd client's build) and cargo-deb; makes the clean
# Debian root the package is tested in (in the cargo target directory, once); and fills the
# cargo cache for examples/hello-vm and examples/hello-tls, whose recipes build offline as the
# builder runs them.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v git >/dev/null || need+=(git)
command -v curl >/dev/null || need+=(curl)
command -v dig >/dev/null || need+=(dnsutils)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v ip >/dev/null || need+=(iproute2)
command -v cc >/dev/null || need+=(gcc)
command -v unbound >/dev/null || need+=(unbound)
command -v nsenter >/dev/null || need+=(util-linux)
command -v openssl >/dev/null || need+=(openssl)
command -v pebble >/dev/null || need+=(pebble)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v zsh >/dev/null || need+=(zsh)
command -v fish >/dev/null || need+=(fish)
command -v man >/dev/null || need+=(man-db)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v setfattr >/dev/null || need+=(attr)
# etcd for the cluster tests; protoc and protobuf's own .proto files build the etcd client.
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
[[ -f /usr/include/google/protobuf/descriptor.proto ]] || need+=(libprotobuf-dev)
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "test-tools: missing ${need[*]}; install them (Debian: apt-get install ${need[*]}) or run as root" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

cargo fetch --locked --manifest-path examples/hello-vm/Cargo.toml >/dev/null
cargo fetch --locked --manifest-path examples/hello-tls/Cargo.toml >/dev/null
cargo deb --version >/dev/null 2>&1 || cargo install --locked --quiet cargo-deb@3.8.0
if [[ $(id -u) -eq 0 ]]; then
    packaging/debian-root.sh "${CARGO_TARGET_DIR:-target}/packaging-test-debian-root"
fi

#!/usr/bin/env bash
# Installs a revboot Debian package in a clean Debian root and boots systemd there, in
# namespaces of its own (pid, mount, network with loopback only, cgroup, uts, ipc), so
# that nothing of it reaches the host's network, ports or cgroups:
#
# 1. The clean root (bookworm, minbase, with systemd and git) is in <cache>, made once by
#    packaging/debian-root.sh (scripts/test-tools.sh runs it: this script reaches no
#    network); each run works on a copy.
# 2. `dpkg -i` installs the package: the unit must then be enabled.
# 3. systemd boots as PID 1 of the namespaces (the root pivoted to), in cgroups of this run's own (one per
#    hierarchy, removed at the end), and starts the enabled unit. The unit is Type=notify:
#    systemd counts it active only once the daemon has said READY=1 through sd_notify.
# 4. The daemon is asked, inside the namespaces: its API over TCP with the token it
#    generated, its DNS server over UDP, the CLI as root with /etc/revboot's configuration.
# 5. systemd powers off (the daemon gets SIGTERM and says STOPPING=1); everything goes.
#
# Prints `unit: <ActiveState> <SubState>`, `status: <StatusText>`, `delegate: <Delegate>`,
# `cgroup: <ControlGroup>`, `delegated: <the daemon's log line on it>`, `api: …`, `dns: …`,
# `cli: …` lines, and the unit's journal; exits non-zero when a step fails.
# Usage, as root: packaging/test-deb.sh <package.deb> <cache dir> <work dir>
set -euo pipefail
deb=$(realpath "$1")
cache=$2
work=$3
limit=300 # seconds, for each wait

mkdir -p "$work"
if [[ ! -x $cache/lib/systemd/systemd ]]; then
    echo "no clean Debian root in $cache: scripts/test-tools.sh makes it (packaging/debian-root.sh)" >&2
    exit 1
fi

root=$work/root
name=revboot-deb-test-$$
unshare_pid=
cleanup() {
    if [[ -n $unshare_pid ]] && kill -0 "$unshare_pid" 2>/dev/null; then
        kill -KILL "$unshare_pid" 2>/dev/null || true
        wait "$unshare_pid" 2>/dev/null || true
    fi
    # This run's cgroups, deepest first (systemd and the daemon made some inside), once the
    # last process of the namespaces has gone (bounded).
    for _ in $(seq 300); do
        find /sys/fs/cgroup/ -depth -type d -path "*/$name*" -exec rmdir {} + 2>/dev/null || true
        [[ -z $(find /sys/fs/cgroup/ -type d -path "*/$name*" -print -quit) ]] && break
        sleep 0.1
    done
    rm -rf "$root"
}
trap cleanup EXIT

cp -a "$cache" "$root"
cp "$deb" "$root/tmp/revboot.deb"
# dpkg in the root, in namespaces too: nothing it starts could reach the host.
unshare --pid --fork --mount --net --uts --ipc -- chroot "$root" \
    /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg -i /tmp/revboot.deb >"$work/dpkg.log" 2>&1 ||
    { cat "$work/dpkg.log" >&2; exit 1; }
echo "installed: $(chroot "$root" dpkg-query -W -f '${Package} ${Version}' revboot)"
echo "enabled: $(chroot "$root" systemctl is-enabled revboot.service)"
# No terminal to log in on: no getty.
chroot "$root" systemctl mask --quiet getty@.service console-getty.service

# In the background: a cgroup of this run's own in every hierarchy (the cgroup namespace
# makes it systemd's root), then the namespaces and systemd. This shell stays where it was,
# so that it can remove those cgroups at the end.
(
    cgroups=$(cat /proc/self/cgroup)
    while IFS=: read -r _ controllers path; do
        case $controllers in
        "") hierarchy=/sys/fs/cgroup/unified; [[ -d $hierarchy ]] || hierarchy=/sys/fs/cgroup ;;
        name=systemd) hierarchy=/sys/fs/cgroup/systemd ;;
        *) hierarchy=/sys/fs/cgroup/${controllers%%,*} ;;
        esac
        [[ -d $hierarchy ]] || continue
        group=$hierarchy${path%/}/$name
        mkdir -p "$group"
        if [[ -f $group/cpuset.cpus ]]; then # cpuset takes no task before it has cpus and mems
            cat "$hierarchy${path%/}/cpuset.cpus" >"$group/cpuset.cpus"
            cat "$hierarchy${path%/}/cpuset.mems" >"$group/cpuset.mems"
        fi
        echo "$BASHPID" >"$group/cgroup.procs"
    done <<<"$cgroups"
    exec unshare --pid --fork --kill-child --mount --uts --ipc --net --cgroup --propagation private -- \
        bash -c '
        set -e
        root=$1
        mount --bind "$root" "$root"
        mount -t proc proc "$root/proc"
        mount -t sysfs sysfs "$root/sys"
        if [[ -d /sys/fs/cgroup/unified ]]; then # hybrid: v1 controllers and a v2 tree
            mount -t tmpfs tmpfs "$root/sys/fs/cgroup"
            mkdir "$root/sys/fs/cgroup/systemd" "$root/sys/fs/cgroup/unified"
            mount -t cgroup -o none,name=systemd cgroup "$root/sys/fs/cgroup/systemd"
            mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup/unified"
        else
            mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
        fi
        # A /dev of its own, as a container manager makes it: a few host nodes, its own pts.
        mount -t tmpfs -o mode=0755,size=1m tmpfs "$root/dev"
        for node in null zero full random urandom tty; do
            touch "$root/dev/$node"
            mount --bind "/dev/$node" "$root/dev/$node"
        done
        mkdir "$root/dev/pts" "$root/dev/shm"
        mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
        ln -s pts/ptmx "$root/dev/ptmx"
        mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
        # pivot_root, not chroot, as a container manager does: a process that enters a
        # mount namespace (the daemon does, for its instances) gets that namespace'"'"'s root.
        cd "$root"
        mkdir -p .host
        pivot_root . .host
        umount -l /.host
        rmdir /.host
        exec /usr/bin/env -i container=revboot-test /lib/systemd/systemd
    ' boot "$root"
) >"$work/systemd.log" 2>&1 &
unshare_pid=$!

init=
for _ in $(seq $((limit * 10))); do
    init=$(pgrep -P "$unshare_pid" || true)
    [[ -n $init ]] && break
    sleep 0.1
done
[[ -n $init ]] || { echo "systemd did not start" >&2; cat "$work/systemd.log" >&2; exit 1; }
inside() { nsenter --target "$init" --mount --pid --net --uts --ipc --root --wd -- "$@"; }

# Wait for the boot to settle, then for the unit (bounded both).
for _ in $(seq $limit); do
    state=$(inside systemctl is-system-running 2>/dev/null || true)
    [[ $state == running || $state == degraded ]] && break
    sleep 1
done
for _ in $(seq $limit); do
    active=$(inside systemctl show -P ActiveState revboot.service 2>/dev/null || true)
    [[ $active == activating || -z $active ]] || break
    sleep 1
done
echo "system: $(inside systemctl is-system-running 2>/dev/null || true)"
echo "unit: $(inside systemctl show -P ActiveState revboot.service) $(inside systemctl show -P SubState revboot.service)"
echo "status: $(inside systemctl show -P StatusText revboot.service)"
echo "delegate: $(inside systemctl show -P Delegate revboot.service)"
echo "cgroup: $(inside systemctl show -P ControlGroup revboot.service)"
# Where the daemon put its cgroups: below the unit's, which systemd marked delegated.
echo "delegated: $(inside journalctl -u revboot.service -o cat 2>/dev/null |
    grep -m1 -o 'cgroups go below the cgroup systemd delegated cgroup=[^ ]*' || true)"

token=$(cat "/proc/$init/root/var/lib/revboot/token" 2>/dev/null || true)
if [[ -n $token ]]; then
    echo "api: $(nsenter --target "$init" --net -- curl -sS --max-time 10 \
        -H "authorization: Bearer $token" http://127.0.0.1:8080/api/v1/token || true)"
fi
echo "dns: $(nsenter --target "$init" --net -- dig @127.0.0.1 -p 5353 +time=5 +tries=1 \
    +short revboot.test SOA || true)"
echo "cli: $(inside /usr/bin/revboot --json service list 2>&1 || true)"
echo "--- journal of revboot.service ---"
inside journalctl -u revboot.service --no-pager -o cat 2>/dev/null | tail -40 || true

# Power off: systemd stops the unit (SIGTERM), then exits.
kill -s SIGRTMIN+4 "$init" 2>/dev/null || true
timeout $limit tail --pid="$unshare_pid" -f /dev/null || true

#!/usr/bin/env bash
# Try the README's commands the way a new user would: on a freshly bootstrapped Debian 12 root
# with a plain `git clone` of this repository's committed HEAD. Run as root; not part of .ci/run.
#
#   scripts/fresh-check.sh [--variant default|minbase|both] [--keep] [--dir DIR]
#
#   --variant  debootstrap variant(s) to try (default: both, one after the other)
#   --keep     leave the root(s) in place afterwards (unmounted) for a look inside
#   --dir      where the roots go (default: a new directory under /var/tmp)
#
# Per variant: debootstrap bookworm from the mirror the host's apt uses; supply what a chroot
# lacks and a real machine has — the host's extra CA certificates (a machine behind this
# proxy has them in /usr/local/share/ca-certificates), `/` as a mount point (for unshare),
# proc, sys with /sys/fs/cgroup, dev, dev/pts, tmpfs /tmp and /run — and nothing else: no pip
# configuration, no venv, no packages beyond debootstrap's. Then, inside, as root with CI=true
# and no stdin: `bash scripts/test.sh` (the README's test command), then the README's
# "Installing on a host" steps. Prints pytest's counts; exits non-zero if anything failed.
# Everything is unmounted on exit, also on failure or Ctrl-C.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SUITE=bookworm
CLONE=/root/secretbus            # where a user would clone it: under root's 0700 home
DEBCACHE=/var/cache/secretbus-fresh-check   # host-side cache of the downloaded .debs only

VARIANTS=(default minbase)
KEEP=0
BASE=
while (($#)); do
    case $1 in
        --variant) shift; case ${1-} in
                default|minbase) VARIANTS=("$1") ;;
                both) VARIANTS=(default minbase) ;;
                *) echo "fresh-check: --variant default|minbase|both" >&2; exit 2 ;;
            esac ;;
        --keep) KEEP=1 ;;
        --dir) shift; BASE=${1:?--dir needs a directory} ;;
        -h|--help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "fresh-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf 'fresh-check: %s\n' "$*"; }
die() { say "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, mount, chroot)"
HEAD=$(git -C "$REPO" rev-parse HEAD)
BRANCH=$(git -C "$REPO" symbolic-ref -q --short HEAD || true)
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]; then
    say "note: uncommitted changes in $REPO are not part of the check (it clones $HEAD)"
fi

if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

# The host's Debian mirror: the first URI serving the plain suite (deb822 or one-line format).
host_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v s="$SUITE" '
            /^$/ { if (uri && ok) { print uri; exit } uri=""; ok=0 }
            /^URIs:/ { uri=$2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) ok=1 }
            END { if (uri && ok) print uri }' "$f"
    done
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk -v s="$SUITE" '$1 == "deb" { for (i = 2; i < NF; i++) if ($i !~ /^\[/ && $(i+1) == s) print $i }'
    return 0
}
MIRROR=$(host_mirror 2>/dev/null | awk 'NR == 1')
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if [ -z "$BASE" ]; then
    BASE=$(mktemp -d /var/tmp/secretbus-fresh.XXXXXX)
else
    mkdir -p "$BASE"
fi
BASE=$(cd "$BASE" && pwd)

ROOT=                            # the root being checked (for the exit trap)
MOUNTS=()                        # mounted targets, in mount order

mnt() {  # mnt TARGET MOUNT-ARGS... : mount and remember, never propagating to the host
    local target=$1; shift
    mkdir -p "$target"
    mount "$@" "$target"
    MOUNTS+=("$target")
    mount --make-rprivate "$target"
}

# Processes still running inside the root (a daemon that a package's postinst started):
# found by their root directory, so only processes that this check started are ended.
stop_root_processes() {
    local p pids=()
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ] && pids+=("${p#/proc/}")
    done
    ((${#pids[@]})) || return 0
    say "ending processes left in the root: ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    sleep 2
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

teardown() {
    [ -n "$ROOT" ] || return 0
    stop_root_processes
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount -R "${MOUNTS[i]}" 2>/dev/null || umount -lR "${MOUNTS[i]}" \
            || say "could not unmount ${MOUNTS[i]}" >&2
    done
    MOUNTS=()
    if grep -qF " $ROOT" /proc/self/mountinfo; then
        say "mounts left under $ROOT: not removing it" >&2
    elif ((KEEP)); then
        say "kept $ROOT"
    else
        rm -rf --one-file-system "$ROOT"
    fi
    ROOT=
}
trap teardown EXIT
trap 'exit 130' INT TERM

# enter_root DIR LOG: supply what a chroot lacks and a real machine has; clone the repository.
enter_root() {
    ROOT=$1
    local log=$2 crt
    mnt "$ROOT" --bind "$ROOT"                        # `/` a mount point: unshare needs it
    mnt "$ROOT/proc" -t proc proc
    mnt "$ROOT/sys" -t sysfs sysfs
    mnt "$ROOT/sys/fs/cgroup" --rbind /sys/fs/cgroup
    mnt "$ROOT/dev" --bind /dev
    mnt "$ROOT/dev/pts" -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts
    mnt "$ROOT/tmp" -t tmpfs -o mode=1777,nosuid,nodev tmpfs
    mnt "$ROOT/run" -t tmpfs -o mode=0755,nosuid,nodev tmpfs
    for crt in /usr/local/share/ca-certificates/*.crt; do   # the proxy's CA, as an admin adds it
        [ -f "$crt" ] && install -D -m 0644 "$crt" "$ROOT/usr/local/share/ca-certificates/${crt##*/}"
    done
    # (without the ca-certificates package the bundle is made when that package is installed)
    if [ -x "$ROOT/usr/sbin/update-ca-certificates" ]; then
        chroot "$ROOT" /usr/sbin/update-ca-certificates >>"$log" 2>&1
    fi
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"  # what DHCP would have written
    # what the installer (netcfg) writes and debootstrap does not: without it "localhost"
    # does not resolve (the Kerberos tests name their service libvirt/localhost), nor this
    # host's name (libvirtd's own acceptor asks for libvirt/<hostname>). In the default variant
    # netbase's postinst has written one already, with localhost only: the name is added.
    [ -e "$ROOT/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        > "$ROOT/etc/hosts"
    grep -qw -- "$(hostname)" "$ROOT/etc/hosts" || printf '127.0.1.1\t%s\n' "$(hostname)" >> "$ROOT/etc/hosts"
    git clone -q --no-hardlinks ${BRANCH:+--branch "$BRANCH"} "$REPO" "$ROOT$CLONE"
    git -C "$ROOT$CLONE" checkout -q --detach "$HEAD"
}

# check VARIANT: bootstrap a root, copy it, run the test command in one and the install steps
# in the other (each command on a root as fresh as debootstrap made it); sets OK=1 when both
# passed. (A failure to prepare a root ends the whole script: set -e; the trap unmounts.)
OK=0
check() {
    OK=0
    local variant=$1
    local log=$BASE/$variant.log dir=$BASE/$variant
    [ ! -e "$dir" ] || die "$dir exists already (remove it or pick another --dir)"
    say "[$variant] debootstrap $SUITE from $MIRROR into $dir/test (log: $log)"
    mkdir -p "$DEBCACHE/$variant" "$dir"
    local vopt=()
    [ "$variant" = default ] || vopt=(--variant="$variant")
    debootstrap "${vopt[@]}" --cache-dir="$DEBCACHE/$variant" "$SUITE" "$dir/test" "$MIRROR" \
        >"$log" 2>&1 || { tail -n 20 "$log" >&2; die "[$variant] debootstrap failed"; }
    cp -a "$dir/test" "$dir/install"

    say "[$variant] git clone (HEAD ${HEAD:0:12}${BRANCH:+ on $BRANCH}) into $CLONE; bash scripts/test.sh"
    enter_root "$dir/test" "$log"
    local rc=0
    echo "fresh-check: ==== bash scripts/test.sh" >>"$log"
    run_inside "cd $CLONE && bash scripts/test.sh" >>"$log" 2>&1 || rc=$?
    teardown
    local summary
    # pytest -q's last line: "4 failed, 553 passed, 7 skipped in 428.49s (0:07:08)"
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)\b.* in [0-9.]+s' "$log" \
        | tail -n1 | tr -d '=' || true)
    say "[$variant] test.sh exit $rc: ${summary:-no pytest summary (see $log)}"
    if ((rc)); then
        grep -E '^(FAILED|ERROR) ' "$log" | sed "s/^/fresh-check: [$variant]   /" || true
        grep -E '^setup: ' "$log" | tail -n 3 | sed "s/^/fresh-check: [$variant]   /" || true
    fi

    say "[$variant] README \"Installing on a host\" in a second fresh root ($dir/install)"
    enter_root "$dir/install" "$log"
    local irc=0
    echo "fresh-check: ==== README install steps" >>"$log"
    run_inside "$(install_steps)" >>"$log" 2>&1 || irc=$?
    teardown
    if ((irc)); then
        say "[$variant] README install steps FAILED (exit $irc, see $log)"
    else
        say "[$variant] README install steps: ok"
    fi
    ((KEEP)) || rmdir "$dir" 2>/dev/null || true
    if ((rc == 0 && irc == 0)); then OK=1; fi
}

# The commands of README's "Installing on a host" (kept in step with it), then a smoke test.
install_steps() {
    cat <<EOF
set -eux
cd $CLONE
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends ca-certificates python3-venv python3-dev gcc pkg-config \\
    libsystemd-dev dbus-daemon polkitd systemd
python3 -m venv /opt/secretbus
/opt/secretbus/bin/pip install -q .
bash scripts/install.sh BINDIR=/opt/secretbus/bin
test -f /usr/share/dbus-1/system.d/org.libvirt.secret.conf
test -f /usr/share/polkit-1/actions/org.libvirt.api.secret.policy
grep -q '/opt/secretbus/bin/secretbusd' /usr/lib/systemd/system/secretbusd.service
/opt/secretbus/bin/secretbusd --help >/dev/null
d=\$(mktemp -d)
echo "<secret ephemeral='no' private='no'><usage type='ceph'><name>fresh-check</name></usage></secret>" >\$d/s.xml
/opt/secretbus/bin/secretbus -c "secret:///embed?root=\$d/root" secret-define \$d/s.xml
/opt/secretbus/bin/secretbus -c "secret:///embed?root=\$d/root" secret-list | grep -q fresh-check
rm -rf "\$d"
EOF
}

run_inside() {  # a login-like root environment: nothing of the host's environment leaks in
    chroot "$ROOT" /usr/bin/env -i HOME=/root USER=root LOGNAME=root SHELL=/bin/bash \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 TERM=dumb CI=true /bin/bash -c "$1" </dev/null
}

main() {
    local v status=0 results=()
    for v in "${VARIANTS[@]}"; do
        check "$v"
        if ((OK)); then results+=("$v: ok"); else status=1; results+=("$v: FAILED"); fi
    done
    say "result: ${results[*]} (logs in $BASE)"
    return "$status"
}
main; exit  # (one line: bash reads scripts as it runs them; editing this file mid-run is safe)

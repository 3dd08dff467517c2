#!/usr/bin/env bash
# Install secretbus's system integration files: D-Bus policy, activation and interface files,
# polkit actions (and rules), systemd units (the service, its libvirt RPC sockets, the key oneshot,
# the user unit). The Python package itself (which provides the
# `secretbus` and `secretbusd` commands) is installed with pip; point BINDIR at its commands.
#
#   scripts/install.sh [install|uninstall] [--with-network] [VAR=value ...]   (or set the VARs in the environment)
#
#   --with-network               also install the drop-in systemd/secretbusd-network.conf as
#                                $SYSTEMD_SYSCONFDIR/secretbusd.service.d/network.conf: it opens the
#                                network of secretbusd.service for the TLS/TCP listeners and fleet
#                                mode (docs/remote.md). Without it the unit has no network; the
#                                drop-in is always installed to $DOCDIR/examples to copy later.
#                                uninstall removes an installed drop-in unless it was edited.
#   DESTDIR=                     staging root for packaging (files go to $DESTDIR$dir)
#   PREFIX=/usr                  the dirs dbus-daemon, polkitd and systemd search are under /usr
#   BINDIR=$PREFIX/bin           where `secretbusd` and `secretbus` are; written into the units
#                                and the activation files, e.g. BINDIR=/opt/secretbus/bin for a venv
#   DATADIR=$PREFIX/share
#   DBUS_POLICYDIR=$DATADIR/dbus-1/system.d
#   DBUS_SYSTEM_SERVICEDIR=$DATADIR/dbus-1/system-services
#   DBUS_SESSION_SERVICEDIR=$DATADIR/dbus-1/services
#   DBUS_INTERFACESDIR=$DATADIR/dbus-1/interfaces
#   POLKIT_ACTIONSDIR=$DATADIR/polkit-1/actions
#   POLKIT_RULESDIR=$DATADIR/polkit-1/rules.d      (*.rules; *.rules.example go to DOCDIR/examples)
#   SYSTEMD_UNITDIR=$PREFIX/lib/systemd/system
#   SYSTEMD_USERUNITDIR=$PREFIX/lib/systemd/user
#   SYSTEMD_SYSCONFDIR=/etc/systemd/system      (the administrator's unit dir: drop-ins go there)
#   DOCDIR=$DATADIR/doc/secretbus
#
# The files in the repository name /usr/bin/secretbusd and /usr/bin/secretbus (the PREFIX=/usr
# layout); any other BINDIR is substituted while installing. Note that dbus-daemon reads bus
# policy only from /usr/share/dbus-1/system.d and /etc/dbus-1/system.d, and polkitd reads
# actions only from /usr/share/polkit-1/actions: with another PREFIX, set DBUS_POLICYDIR and
# POLKIT_ACTIONSDIR to those.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ACTION=install
WITH_NETWORK=no
for arg in "$@"; do
    case $arg in
        install|uninstall) ACTION=$arg ;;
        --with-network) WITH_NETWORK=yes ;;
        [A-Z]*=*) export "${arg?}" ;;
        -h|--help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
    esac
done

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr}
BINDIR=${BINDIR:-$PREFIX/bin}
DATADIR=${DATADIR:-$PREFIX/share}
DBUS_POLICYDIR=${DBUS_POLICYDIR:-$DATADIR/dbus-1/system.d}
DBUS_SYSTEM_SERVICEDIR=${DBUS_SYSTEM_SERVICEDIR:-$DATADIR/dbus-1/system-services}
DBUS_SESSION_SERVICEDIR=${DBUS_SESSION_SERVICEDIR:-$DATADIR/dbus-1/services}
DBUS_INTERFACESDIR=${DBUS_INTERFACESDIR:-$DATADIR/dbus-1/interfaces}
POLKIT_ACTIONSDIR=${POLKIT_ACTIONSDIR:-$DATADIR/polkit-1/actions}
POLKIT_RULESDIR=${POLKIT_RULESDIR:-$DATADIR/polkit-1/rules.d}
SYSTEMD_UNITDIR=${SYSTEMD_UNITDIR:-$PREFIX/lib/systemd/system}
SYSTEMD_USERUNITDIR=${SYSTEMD_USERUNITDIR:-$PREFIX/lib/systemd/user}
SYSTEMD_SYSCONFDIR=${SYSTEMD_SYSCONFDIR:-/etc/systemd/system}
DOCDIR=${DOCDIR:-$DATADIR/doc/secretbus}

for v in PREFIX BINDIR DATADIR DBUS_POLICYDIR DBUS_SYSTEM_SERVICEDIR DBUS_SESSION_SERVICEDIR \
         DBUS_INTERFACESDIR POLKIT_ACTIONSDIR POLKIT_RULESDIR SYSTEMD_UNITDIR SYSTEMD_USERUNITDIR \
         SYSTEMD_SYSCONFDIR DOCDIR; do
    case ${!v} in
        /*) ;;
        *) echo "install.sh: $v must be an absolute path, not '${!v}'" >&2; exit 2 ;;
    esac
    case ${!v} in *[[:space:]]*) echo "install.sh: $v must not contain white space" >&2; exit 2 ;; esac
done
# The substitution below uses '|' as the sed delimiter and '&' is special in its replacement.
case $BINDIR in *'|'*|*'&'*|*'\'*) echo "install.sh: unsupported character in BINDIR" >&2; exit 2 ;; esac

# source (relative to the repo), destination directory, and "subst" for the files that name
# the commands (/usr/bin/secretbus* becomes $BINDIR/secretbus*).
MANIFEST=(
    "dbus/org.libvirt.secret.conf                 $DBUS_POLICYDIR"
    "dbus/system-services/org.libvirt.secret.service $DBUS_SYSTEM_SERVICEDIR subst"
    "dbus/services/org.libvirt.secret.service     $DBUS_SESSION_SERVICEDIR subst"
    "systemd/secretbusd.service                   $SYSTEMD_UNITDIR subst"
    "systemd/secretbusd-init-encryption.service   $SYSTEMD_UNITDIR subst"
    "systemd/secretbusd.socket                    $SYSTEMD_UNITDIR"
    "systemd/secretbusd-ro.socket                 $SYSTEMD_UNITDIR"
    "systemd/user/secretbusd.service              $SYSTEMD_USERUNITDIR subst"
    "systemd/user/secretbusd.socket               $SYSTEMD_USERUNITDIR"
)
# The interface XML has one copy, the packaged one (dbus/interfaces links to it).
for f in "$REPO"/secretbus/bus/interfaces/*.xml; do
    [ -e "$f" ] && MANIFEST+=("secretbus/bus/interfaces/${f##*/} $DBUS_INTERFACESDIR")
done
for f in "$REPO"/polkit/*; do
    [ -f "$f" ] || continue
    case ${f##*/} in
        *.policy) MANIFEST+=("polkit/${f##*/} $POLKIT_ACTIONSDIR") ;;
        *.rules)  MANIFEST+=("polkit/${f##*/} $POLKIT_RULESDIR") ;;
        *)        MANIFEST+=("polkit/${f##*/} $DOCDIR/examples") ;;   # e.g. *.rules.example
    esac
done
[ -f "$REPO/README.md" ] && MANIFEST+=("README.md $DOCDIR")
# The network drop-in: always as an example to copy; in place only with --with-network.
MANIFEST+=("systemd/secretbusd-network.conf $DOCDIR/examples")
NETWORK_DROPIN=$DESTDIR$SYSTEMD_SYSCONFDIR/secretbusd.service.d/network.conf

say() { printf 'install.sh: %s\n' "$*"; }

# put SRC DEST [subst]: write the repo's SRC as DEST (0644), atomically (temp file, rename).
put() {
    local src=$1 dest=$2 mode=${3:-} tmp
    install -d -m 0755 -- "${dest%/*}"
    tmp=$(mktemp "${dest%/*}/.${dest##*/}.XXXXXX")
    if [ "$mode" = subst ]; then
        sed -e "s|/usr/bin/secretbus|$BINDIR/secretbus|g" -- "$REPO/$src" >"$tmp"
    else
        cat -- "$REPO/$src" >"$tmp"
    fi
    chmod 0644 -- "$tmp"
    mv -f -- "$tmp" "$dest"
    say "installed $dest"
}

for entry in "${MANIFEST[@]}"; do
    read -r src dir mode <<<"$entry"
    dest=$DESTDIR$dir/${src##*/}
    if [ "$ACTION" = uninstall ]; then
        if [ -e "$dest" ]; then rm -f -- "$dest"; say "removed $dest"; fi
        continue
    fi
    put "$src" "$dest" "${mode:-}"
done

if [ "$ACTION" = install ] && [ "$WITH_NETWORK" = yes ]; then
    put systemd/secretbusd-network.conf "$NETWORK_DROPIN"
elif [ "$ACTION" = uninstall ] && [ -e "$NETWORK_DROPIN" ]; then
    # The administrator's directory: remove only the file as shipped, never an edited one.
    if cmp -s -- "$REPO/systemd/secretbusd-network.conf" "$NETWORK_DROPIN"; then
        rm -f -- "$NETWORK_DROPIN"
        rmdir -- "${NETWORK_DROPIN%/*}" 2>/dev/null || true
        say "removed $NETWORK_DROPIN"
    else
        say "kept $NETWORK_DROPIN: it differs from systemd/secretbusd-network.conf (edited here)"
    fi
fi

if [ "$ACTION" = install ] && [ -z "$DESTDIR" ]; then
    for cmd in secretbusd secretbus; do
        [ -x "$BINDIR/$cmd" ] || say "warning: $BINDIR/$cmd does not exist yet (install the Python package there, or set BINDIR)"
    done
fi
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload || true
fi

#!/usr/bin/env bash
# Prepare a Debian 12 machine for secretbus (run as root; idempotent, fast on re-runs).
#  1. Debian packages: skipped when all are installed already (works offline then).
#  2. A venv at $REPO/.venv made with Debian's /usr/bin/python3, so that unprivileged test
#     users can run the same interpreter; secretbus installed editable with its test extras.
#     Skipped when pyproject.toml has not changed since the last successful install.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$REPO/.venv
PY=/usr/bin/python3

say() { printf 'setup: %s\n' "$*"; }

# package -> why
PACKAGES=(
    python3 python3-venv python3-dev      # interpreter, venv, headers for systemd-python
    gcc pkg-config libsystemd-dev         # build systemd-python from its sdist
    dbus-daemon dbus-bin                  # private buses in the tests, dbus-send
    libglib2.0-bin                        # gdbus: an independent client in the tests
    polkitd                               # authorisation on the system bus
    systemd                               # systemd-creds, systemd-analyze, busctl
    util-linux                            # setpriv
    procps                                # ps, kill (minbase roots lack them)
    openssl
    ca-certificates                       # pip reaches PyPI over HTTPS (minbase roots lack it)
    passwd adduser                        # useradd / groupadd for test users
    libvirt-clients python3-libvirt       # virsh and libvirt's python binding: real RPC clients in the tests
    libvirt-daemon                        # libvirtd 9.0 and virt-ssh-helper, never started as a service (no
                                          # libvirt-daemon-system): the tests that compare with libvirt's own daemon
    libsasl2-modules                      # SCRAM for virsh/python3-libvirt (libvirt's SASL client) in the SASL-over-TLS tests
    etcd-server etcd-client               # fleet mode's shared store (etcd 3.4); the fleet tests start their own
    openssh-server                        # sshd for the secret+ssh:// tests (each test starts its own on loopback)
    openssh-client                        # ssh: the client side of secret+ssh:// (secretbus and virsh run it)
    netcat-openbsd                        # nc -U: libvirt's remote command for secret+ssh://…?socket=
    libkrb5-dev                           # krb5-config and headers: pip builds python's gssapi (no Linux wheel) for secret+tcp://
    krb5-kdc krb5-admin-server            # krb5kdc, kdb5_util, kadmin.local: each secret+tcp:// test runs its own KDC on loopback
    krb5-user                             # kinit, klist: Kerberos tickets for the test clients
    libsasl2-modules-gssapi-mit           # GSSAPI for virsh/python3-libvirt's SASL client (secret+tcp:// with Kerberos)
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        say "missing Debian packages: ${missing[*]} (run this script as root)" >&2
        exit 1
    fi
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "Debian packages present"
fi

# A venv from another interpreter (pyenv, …) would not run for other users: rebuild it.
if [ -f "$VENV/pyvenv.cfg" ] && ! grep -qx 'home = /usr/bin' "$VENV/pyvenv.cfg"; then
    say "replacing $VENV (not made with $PY)"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi

stamp=$VENV/.secretbus-setup
want=$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && "$VENV/bin/python" -c 'import secretbus, pytest' 2>/dev/null; then
    say "venv up to date"
else
    say "pip install -e '${REPO}[test]'"
    # (the filter drops pip's notes about this machine's missing local index directories)
    # --use-pep517: Debian's venv has no `wheel`, and without it pip installs systemd-python
    # (an sdist) the legacy way, with no RECORD of its compiled modules; the test harness copies
    # packages for unprivileged users from that record.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --use-pep517 -e "${REPO}[test]" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    echo "$want" > "$stamp"
fi
# An editable install compiles nothing of the package itself, and where PYTHONDONTWRITEBYTECODE
# is set (as on these machines) every start of secretbusd compiled all its modules again: ~100 ms
# of a start-up. Compiled once here; a module edited later is compiled in memory until the next
# setup (Python checks each .pyc against its source).
"$VENV/bin/python" -m compileall -q "$REPO/secretbus"
say "done ($VENV)"

#!/usr/bin/env bash
# Set everything up and run secretbusd (as root on Debian 12), needing nothing running:
# a private session-type dbus-daemon, secretbusd on it with an encrypted store in a fresh
# directory, then the calls a program would make (busctl, gdbus) and the virsh-style CLI.
# The service then keeps running in the foreground until Ctrl-C; with --demo-only (or no
# terminal on stdin) it stops after the demo. Everything is removed on exit.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/scripts/setup.sh"
DEMO_ONLY=0
[ "${1:-}" = "--demo-only" ] && DEMO_ONLY=1
[ -t 0 ] || DEMO_ONLY=1

BIN=$REPO/.venv/bin
DIR=$(mktemp -d /tmp/secretbus-demo.XXXXXX)
chmod 0755 "$DIR"
BUS_PID= ; SB_PID=
cleanup() {
    [ -n "$SB_PID" ] && kill "$SB_PID" 2>/dev/null && wait "$SB_PID" 2>/dev/null || true
    [ -n "$BUS_PID" ] && kill "$BUS_PID" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

# 1. A private bus: session type, only this user may connect.
cat > "$DIR/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=$DIR/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
EOF
BUS_PID=$(dbus-daemon --config-file="$DIR/bus.conf" --fork --print-pid=1)
export DBUS_SESSION_BUS_ADDRESS="unix:path=$DIR/bus"
echo "== private session bus: $DBUS_SESSION_BUS_ADDRESS (dbus-daemon pid $BUS_PID)"

# 2. An encryption key (a raw 0600 file; on systemd hosts: systemd-creds, see README) and secretbusd.
ROOT=$DIR/store
"$BIN/secretbus" init-encryption --raw --key-path "$DIR/key/secrets-encryption-key"
mkdir -p "$ROOT/etc" && chmod 0700 "$ROOT/etc"
printf 'secrets_encryption_key = "%s"\n' "$DIR/key/secrets-encryption-key" > "$ROOT/etc/secret.conf"
"$BIN/secretbusd" --session --root "$ROOT" --bus-address "$DBUS_SESSION_BUS_ADDRESS" &
SB_PID=$!
for _ in $(seq 100); do
    busctl --address="$DBUS_SESSION_BUS_ADDRESS" status org.libvirt.secret >/dev/null 2>&1 && break
    sleep 0.1
done
echo "== secretbusd pid $SB_PID owns org.libvirt.secret; store $ROOT/etc/secrets"

show() { printf '\n$ %s\n' "$*"; "$@"; }
B=(busctl --address="$DBUS_SESSION_BUS_ADDRESS")
XML="<secret ephemeral='no' private='no'><description>LUKS passphrase of the demo volume</description><usage type='volume'><volume>/var/lib/libvirt/images/demo.img</volume></usage></secret>"

echo; echo "== what a program does over D-Bus (busctl / gdbus)"
out=$(show "${B[@]}" call org.libvirt.secret /org/libvirt/secret org.libvirt.Connect SecretDefineXML su "$XML" 0)
printf '%s\n' "$out"
OBJ=$(printf '%s\n' "$out" | awk '/^o / {gsub(/"/, "", $2); print $2}')
show "${B[@]}" call org.libvirt.secret "$OBJ" org.libvirt.Secret SetValue ayu 6 112 97 115 115 33 33 0
show "${B[@]}" call org.libvirt.secret "$OBJ" org.libvirt.Secret GetValue u 0
show "${B[@]}" get-property org.libvirt.secret "$OBJ" org.libvirt.Secret UUID UsageType UsageID
show gdbus call --address "$DBUS_SESSION_BUS_ADDRESS" --dest org.libvirt.secret \
    --object-path /org/libvirt/secret --method org.libvirt.Connect.SecretLookupByUsage 1 /var/lib/libvirt/images/demo.img
show "${B[@]}" tree org.libvirt.secret

echo; echo "== the virsh-style command line over the same bus"
UUID=$("${B[@]}" get-property org.libvirt.secret "$OBJ" org.libvirt.Secret UUID | awk '{gsub(/"/, "", $2); print $2}')
printf 'correct horse battery staple' > "$DIR/passphrase"
S=("$BIN/secretbus" -c secret:///session)
show "${S[@]}" secret-set-value "$UUID" --file "$DIR/passphrase" --plain
show "${S[@]}" secret-list
show "${S[@]}" secret-get-value "$UUID"
show "${S[@]}" secret-dumpxml "$UUID"
printf '\n$ ls -l %s\n' "$ROOT/etc/secrets"
ls -l "$ROOT/etc/secrets"
echo "(the value is stored AES-256-GCM encrypted: $(cat "$ROOT/etc/secrets/$UUID.aes256gcm" | head -c 40)...)"

if [ "$DEMO_ONLY" = 1 ]; then
    echo; echo "== demo finished; stopping secretbusd"
    exit 0
fi
cat <<EOF

== secretbusd keeps running. From another terminal:
   export DBUS_SESSION_BUS_ADDRESS=$DBUS_SESSION_BUS_ADDRESS
   $BIN/secretbus -c secret:///session secret-list
   busctl --user call org.libvirt.secret /org/libvirt/secret org.libvirt.Connect ListSecrets u 0
   (Ctrl-C here stops it and removes $DIR)
EOF
wait "$SB_PID"

#!/usr/bin/env bash
# Demonstrate secretbus (as root on Debian 12): prepare the machine, then walk through the
# virsh-style secret commands in embedded mode (the driver in the CLI's own process, its
# store in a fresh temporary directory that is removed afterwards).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/scripts/setup.sh"

SECRETBUS=$REPO/.venv/bin/secretbus
DIR=$(mktemp -d /tmp/secretbus-demo.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
URI="secret:///embed?root=$DIR"

sb() {  # show and run one secretbus command against the demo store
    printf '\n$ secretbus -c "%s" %s\n' "$URI" "$*"
    "$SECRETBUS" -c "$URI" "$@"
}

cat > "$DIR/demo-secret.xml" <<'EOF'
<secret ephemeral='no' private='no'>
  <description>LUKS passphrase of the demo volume</description>
  <usage type='volume'>
    <volume>/var/lib/libvirt/images/demo.img</volume>
  </usage>
</secret>
EOF
printf 'correct horse battery staple' > "$DIR/passphrase"

echo "== embedded mode: $URI"
printf '\n$ cat %s\n' "$DIR/demo-secret.xml"
cat "$DIR/demo-secret.xml"
out=$(sb secret-define "$DIR/demo-secret.xml")
printf '%s\n' "$out"
UUID=$(printf '%s\n' "$out" | awk '/^Secret .* created$/ {print $2}')
[ -n "$UUID" ] || { echo "run-demo: no UUID in the output of secret-define" >&2; exit 1; }

sb secret-set-value "$UUID" --file "$DIR/passphrase" --plain
sb secret-list
sb secret-get-value "$UUID"
sb secret-get-value "$UUID" --plain
echo
sb secret-dumpxml "$UUID"
printf '\n$ %s\n' "ls -l $DIR/etc/secrets"
ls -l "$DIR/etc/secrets"
echo
echo "== demo finished (store $DIR removed)"

"""The `secretbus` command driven as a user would: the installed entry point, in a subprocess."""
from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

U1 = "f52a81b2-424e-490c-823d-6bd4235bc572"
U2 = "1b40a534-8301-45d5-b1aa-11894ebb1735"
SENTINEL = b"cli-S3ntinel\x00\xfe"


def entry_point() -> list[str]:
    script = Path(sys.executable).parent / "secretbus"
    return [str(script)] if script.exists() else [sys.executable, "-m", "secretbus.cli"]


class CLI:
    def __init__(self, root: Path):
        self.uri = f"secret:///embed?root={root}"
        self.root = root

    def __call__(self, *args: str, input: bytes | None = None, uri: str | None = None):
        env = {k: v for k, v in os.environ.items() if k != "SECRETBUS_DEFAULT_URI"}
        p = subprocess.run(entry_point() + ["-c", uri or self.uri, *args], input=input,
                           capture_output=True, timeout=60, env=env)
        return p


@pytest.fixture
def cli(tmp_path):
    return CLI(tmp_path / "root")


@pytest.fixture
def xmlfile(tmp_path):
    def make(uuid=U1, priv="no", usage="<usage type='ceph'><name>client.admin secret</name></usage>"):
        f = tmp_path / f"{uuid}.xml"
        f.write_text(f"<secret ephemeral='no' private='{priv}'><uuid>{uuid}</uuid>{usage}</secret>")
        return str(f)
    return make


def test_define_list_dump_undefine(cli, xmlfile):
    p = cli("secret-define", xmlfile())
    assert (p.returncode, p.stdout, p.stderr) == (0, f"Secret {U1} created\n\n".encode(), b"")
    cli("secret-define", xmlfile(U2, usage=""))
    p = cli("secret-list")
    assert p.returncode == 0
    rule = "-" * ((36 + 3) + (24 + 3))     # vshTable: every column's width + 3
    assert p.stdout.decode() == (
        " UUID                                   Usage\n"
        + rule + "\n"
        + f" {U2}   Unused\n"
        + f" {U1}   ceph client.admin secret\n"
        + "\n")
    p = cli("secret-dumpxml", U1)
    assert p.stdout.decode() == (
        "<secret ephemeral='no' private='no'>\n"
        f"  <uuid>{U1}</uuid>\n"
        "  <usage type='ceph'>\n"
        "    <name>client.admin secret</name>\n"
        "  </usage>\n"
        "</secret>\n")
    p = cli("secret-dumpxml", U1, "--xpath", "string(/secret/usage/@type)")
    assert p.stdout == b"ceph\n"
    p = cli("secret-undefine", U1)
    assert (p.returncode, p.stdout) == (0, f"Secret {U1} deleted\n\n".encode())
    p = cli("secret-list", "--no-ephemeral")
    assert U1.encode() not in p.stdout and U2.encode() in p.stdout


def test_list_filters(cli, xmlfile, tmp_path):
    cli("secret-define", xmlfile(U1, priv="yes"))
    cli("secret-define", xmlfile(U2, usage=""))
    assert U1.encode() in cli("secret-list", "--private").stdout
    assert U2.encode() not in cli("secret-list", "--private").stdout
    assert U2.encode() in cli("secret-list", "--no-private").stdout
    assert cli("secret-list", "--ephemeral").stdout.count(b"\n") == 3   # header, rule, blank


def test_set_and_get_value_all_inputs(cli, xmlfile, tmp_path):
    cli("secret-define", xmlfile())
    f = tmp_path / "v.b64"
    f.write_bytes(base64.encodebytes(SENTINEL))          # wrapped with a newline, as base64(1) writes
    p = cli("secret-set-value", U1, "--file", str(f))
    assert (p.returncode, p.stdout, p.stderr) == (0, b"Secret value set\n\n", b"")
    assert cli("secret-get-value", U1).stdout == base64.b64encode(SENTINEL) + b"\n"
    raw = tmp_path / "v.raw"
    raw.write_bytes(SENTINEL + b"\n")
    assert cli("secret-set-value", U1, "--file", str(raw), "--plain").returncode == 0
    assert cli("secret-get-value", U1, "--plain").stdout == SENTINEL + b"\n"
    p = cli("secret-set-value", U1, base64.b64encode(b"argv").decode())
    assert p.returncode == 0
    assert p.stderr == b"error: Passing secret value as command-line argument is insecure!\n"
    assert cli("secret-get-value", U1, "--plain").stdout == b"argv"
    p = cli("secret-set-value", U1, "--interactive", input=b"typed value\n")
    assert p.returncode == 0 and b"typed value" not in p.stdout + p.stderr
    assert cli("secret-get-value", U1, "--plain").stdout == b"typed value"
    # The value never shows in what the command printed while setting it.
    for out in (p.stdout, p.stderr):
        assert SENTINEL not in out


def test_set_value_errors(cli, xmlfile, tmp_path):
    cli("secret-define", xmlfile())
    p = cli("secret-set-value", U1)
    assert (p.returncode, p.stderr) == (1, b"error: Input secret value is missing\n")
    p = cli("secret-set-value", U1, "--file", "/nonexistent", "QUJD")
    assert p.returncode == 1 and b"Options --file and --base64 are mutually exclusive" in p.stderr
    p = cli("secret-set-value", U1, "--interactive", "--plain")
    assert p.returncode == 1 and b"--interactive and --plain are mutually exclusive" in p.stderr
    bad = tmp_path / "bad"
    bad.write_bytes(b"%%%not-base64%%%")
    p = cli("secret-set-value", U1, "--file", str(bad))
    assert p.returncode == 1
    assert p.stderr == b"error: Failed to set secret value\nerror: secret value is not valid base64\n"
    big = tmp_path / "big"
    big.write_bytes(b"x" * 65537)
    p = cli("secret-set-value", U1, "--file", str(big), "--plain")
    assert (p.returncode, p.stderr) == (1, b"error: Failed to set secret value\n"
                                           b"error: value length greater than maximum: 65537 > 65536\n")
    assert cli("secret-get-value", U1).returncode == 1   # still no value


def test_private_value_refused(cli, xmlfile, tmp_path):
    cli("secret-define", xmlfile(priv="yes"))
    cli("secret-set-value", U1, "--file", str(_write(tmp_path / "v", SENTINEL)), "--plain")
    p = cli("secret-get-value", U1)
    assert (p.returncode, p.stdout, p.stderr) == (1, b"", b"error: Invalid secret: secret is private\n")


def test_lookup_and_define_failures(cli, tmp_path):
    p = cli("secret-get-value", "nonsense")
    assert p.returncode == 1
    assert p.stderr == (b"error: failed to get secret 'nonsense'\n"
                        b"error: invalid argument: uuidstr in virSecretLookupByUUIDString must be a valid UUID\n")
    p = cli("secret-undefine", U1)
    assert p.stderr == (f"error: failed to get secret '{U1}'\n"
                        f"error: Secret not found: no secret with matching uuid '{U1}'\n").encode()
    f = _write(tmp_path / "p.xml", b"<secret><usage type='passphrase'><name>x</name></usage></secret>")
    p = cli("secret-define", str(f))
    assert p.returncode == 1
    assert p.stderr == (f"error: Failed to set attributes from {f}\n"
                        "error: unsupported configuration: unknown secret usage type passphrase\n").encode()
    p = cli("secret-define", str(f), uri="secret:///embed")
    assert p.returncode == 1 and b"root parameter is required" in p.stderr


def test_events_in_embedded_mode(cli):
    p = cli("secret-event", "--list")
    assert p.stdout == b"lifecycle\nvalue-changed\n"
    p = cli("secret-event")
    assert p.returncode == 1 and p.stderr == b"error: either --list or --event <type> is required\n"
    p = cli("secret-event", "--event", "bogus")
    assert p.stderr == b"error: unknown event type bogus\n"
    p = cli("secret-event", "--event", "lifecycle", "--timeout", "1")
    assert (p.returncode, p.stdout) == (1, b"event loop timed out\nevents received: 0\n")


def test_init_encryption_raw_then_rewrite(cli, xmlfile, tmp_path):
    key = tmp_path / "keys" / "k"
    p = cli("init-encryption", "--raw", "--key-path", str(key))
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    p = cli("init-encryption", "--raw", "--key-path", str(key))
    assert p.returncode == 1 and b"already exists" in p.stderr
    cli("secret-define", xmlfile())
    cli("secret-set-value", U1, "--file", str(_write(tmp_path / "v", SENTINEL)), "--plain")
    cfg = cli.root / "etc" / "secrets"
    assert (cfg / f"{U1}.base64").exists()
    (cli.root / "etc" / "secret.conf").write_text(f'secrets_encryption_key = "{key}"\n')
    p = cli("rewrite-values")
    assert (p.returncode, p.stdout) == (0, b"Rewrote 1 of 1 persistent secret values\n")
    assert sorted(os.listdir(cfg)) == [f"{U1}.aes256gcm", f"{U1}.xml"]
    assert cli("secret-get-value", U1, "--plain").stdout == SENTINEL
    # Without the key the encrypted value cannot load: counted as skipped, exit status 1.
    (cli.root / "etc" / "secret.conf").write_text("encrypt_data = 0\n")
    p = cli("rewrite-values")
    assert p.returncode == 1
    assert p.stdout == b"Rewrote 0 of 1 persistent secret values\n"
    assert b"error: 1 secrets could not be loaded and were not rewritten" in p.stderr
    assert sorted(os.listdir(cfg)) == [f"{U1}.aes256gcm", f"{U1}.xml"]


def test_unsupported_uri(cli):
    p = cli("secret-list", uri="secret+ssh://host/system")
    assert p.returncode == 1 and b"not supported yet" in p.stderr


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path

"""The `secretbus` command driven as a user would: the installed entry point, in a subprocess."""
from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import U1, U2
from harness import programs

SENTINEL = b"cli-S3ntinel\x00\xfe"


REPO = Path(__file__).resolve().parents[1]


@functools.cache
def entry_point() -> list[str]:
    """The installed `secretbus` script when it runs this checkout's code; otherwise (the venv's
    editable install is another checkout, e.g. from a git worktree) this checkout's cli.main."""
    script = Path(sys.executable).parent / "secretbus"
    where = subprocess.run([sys.executable, "-c", "import secretbus; print(secretbus.__file__)"],
                           capture_output=True, text=True, cwd="/", timeout=60).stdout.strip()
    if script.exists() and where == str(REPO / "secretbus" / "__init__.py"):
        return [str(script)]
    code = f"import sys; sys.path.insert(0, {json.dumps(str(REPO))}); from secretbus.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code]


class CLI:
    def __init__(self, root: Path):
        self.uri = f"secret:///embed?root={root}"
        self.root = root

    def __call__(self, *args: str, input: bytes | None = None, uri: str | None = None,
                 stdout=subprocess.PIPE, top: tuple[str, ...] = ()):
        env = {k: v for k, v in os.environ.items() if k != "SECRETBUS_DEFAULT_URI"}
        p = subprocess.run(entry_point() + [*top, "-c", uri or self.uri, *args], input=input,
                           stdout=stdout, stderr=subprocess.PIPE, timeout=60, env=env)
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
        "</secret>\n"
        "\n")
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
    assert cli("secret-get-value", U1, "--plain").stdout == SENTINEL + b"\n\n"
    assert cli("secret-get-value", U1, "--plain", top=("-q",)).stdout == SENTINEL + b"\n"
    p = cli("secret-set-value", U1, base64.b64encode(b"argv").decode())
    assert p.returncode == 0
    assert p.stderr == b"error: Passing secret value as command-line argument is insecure!\n"
    assert cli("secret-get-value", U1, "--plain").stdout == b"argv\n"
    p = cli("secret-set-value", U1, "--interactive", input=b"typed value\n")
    assert p.returncode == 0 and b"typed value" not in p.stdout + p.stderr
    assert cli("secret-get-value", U1, "--plain").stdout == b"typed value\n"
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
    # virsh ends every command that ran with a blank line, a failed one too
    assert (p.returncode, p.stdout, p.stderr) == (1, b"\n", b"error: Invalid secret: secret is private\n")


def test_lookup_and_define_failures(cli, tmp_path):
    p = cli("secret-get-value", "nonsense")
    assert p.returncode == 1
    # virsh 9.0's text: libvirt's client library reports it without the "invalid argument: " prefix.
    assert p.stderr == (b"error: failed to get secret 'nonsense'\n"
                        b"error: uuidstr in virSecretLookupByUUIDString must be a valid UUID\n")
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
    assert p.stdout == b"lifecycle\nvalue-changed\n\n"
    p = cli("secret-event")
    assert p.returncode == 1 and p.stderr == b"error: either --list or --event <type> is required\n"
    p = cli("secret-event", "--event", "bogus")
    assert p.stderr == b"error: unknown event type bogus\n"
    p = cli("secret-event", "--event", "lifecycle", "--timeout", "1")
    assert (p.returncode, p.stdout) == (1, b"event loop timed out\nevents received: 0\n\n")


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
    assert (p.returncode, p.stdout) == (0, b"Rewrote 1 of 1 persistent secret values\n\n")
    assert sorted(os.listdir(cfg)) == [f"{U1}.aes256gcm", f"{U1}.xml"]
    assert cli("secret-get-value", U1, "--plain").stdout == SENTINEL + b"\n"
    # Without the key the encrypted value cannot load: counted as skipped, exit status 1.
    (cli.root / "etc" / "secret.conf").write_text("encrypt_data = 0\n")
    p = cli("rewrite-values")
    assert p.returncode == 1
    assert p.stdout == b"Rewrote 0 of 1 persistent secret values\n\n"
    assert b"error: 1 secrets could not be loaded and were not rewritten" in p.stderr
    assert sorted(os.listdir(cfg)) == [f"{U1}.aes256gcm", f"{U1}.xml"]


def test_unsupported_uri(cli):
    p = cli("secret-list", uri="secret+libssh2://host/system")
    assert p.returncode == 1 and b"not supported yet" in p.stderr


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- virsh 9.0 compatibility (texts observed with Debian 12's virsh 9.0) --------------------
def test_blank_line_after_every_command_that_ran_and_quiet(cli, xmlfile, tmp_path):
    f = xmlfile()
    p = cli("secret-define", f, top=("-q",))
    assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")
    p = cli("secret-set-value", U1, "--file", str(_write(tmp_path / "v", b"raw")), "--plain",
            top=("--quiet",))
    assert (p.returncode, p.stdout) == (0, b"")
    # base64 has no newline of its own: without --quiet the blank line ends it, with it nothing does
    assert cli("secret-get-value", U1).stdout == b"cmF3\n"
    assert cli("secret-get-value", U1, top=("-q",)).stdout == b"cmF3"
    assert cli("secret-get-value", U1, "--plain").stdout == b"raw\n"
    assert cli("secret-get-value", U1, "--plain", top=("-q",)).stdout == b"raw"
    # -q drops the table header and rule, not the rows
    assert cli("secret-list", top=("-q",)).stdout == f" {U1}   ceph client.admin secret\n".encode()
    assert cli("secret-list", "--private", top=("-q",)).stdout == b""
    assert cli("secret-dumpxml", U1, top=("-q",)).stdout.endswith(b"</secret>\n")
    assert cli("secret-event", "--list", top=("-q",)).stdout == b"lifecycle\nvalue-changed\n"
    # a failed command still ends with the blank line; a usage error never ran
    p = cli("secret-get-value", U2)
    assert (p.returncode, p.stdout) == (1, b"\n")
    assert cli("secret-get-value", U2, top=("-q",)).stdout == b""
    p = cli("secret-get-value")
    assert (p.returncode, p.stdout) == (1, b"")
    p = cli("secret-undefine", U1, top=("-q",))
    assert (p.returncode, p.stdout) == (0, b"")
    # -c and -q bundled, as getopt allows
    p = subprocess.run(entry_point() + ["-qc", cli.uri, "secret-list"], capture_output=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")


USAGE_ERRORS = [
    (["secret-define"], "command 'secret-define' requires <file> option"),
    (["secret-define", "--validate"], "command 'secret-define' requires <file> option"),
    (["secret-dumpxml"], "command 'secret-dumpxml' requires <secret> option"),
    (["secret-dumpxml", "--xpath=/secret"], "command 'secret-dumpxml' requires <secret> option"),
    (["secret-get-value"], "command 'secret-get-value' requires <secret> option"),
    (["secret-set-value"], "command 'secret-set-value' requires <secret> option"),
    (["secret-undefine"], "command 'secret-undefine' requires <secret> option"),
    (["secret-list", "--bogus"], "command 'secret-list' doesn't support option --bogus"),
    (["secret-list", "extra"], "unexpected data 'extra'"),
    (["secret-list", "-x"], "unexpected data '-x'"),
    (["secret-list", "--ephemeral", "--ephemeral"], "option --ephemeral already seen"),
    (["secret-list", "--ephemeral=yes"], "invalid '=' after option --ephemeral"),
    (["secret-dumpxml", U1, "--xpath", "a", "--xpath", "b"], "option --xpath already seen"),
    (["secret-dumpxml", U1, "--xpath"], "expected syntax: --xpath <string>"),
    (["secret-dumpxml", U1, "/secret"], "unexpected data '/secret'"),       # --xpath is named only
    (["secret-set-value", "--file"], "expected syntax: --file <string>"),
    (["secret-set-value", U1, "QUJD", "more"], "unexpected data 'more'"),
    (["secret-set-value", "--base64", "QUJD", U1, "more"], "unexpected data 'more'"),
    (["secret-event", "--timeout"], "expected syntax: --timeout <number>"),
    (["secret-event", U1, "lifecycle", "5", "more"], "unexpected data 'more'"),
    (["secret-define", "--", "a", "b"], "unexpected data 'b'"),
    (["secret-dumpxml", "--help=1"], "invalid '=' after option --help"),
    (["secret-list", "--help", "extra"], "unexpected data 'extra'"),     # vsh parses past --help
    (["secret-dumpxml", "--help", "--xpath"], "expected syntax: --xpath <string>"),
    (["bogus-cmd"], "unknown command: 'bogus-cmd'"),
]


@pytest.mark.parametrize("args,message", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_exit_1_with_virsh_wording(cli, args, message):
    p = cli(*args)
    assert (p.returncode, p.stdout, p.stderr) == (1, b"", f"error: {message}\n".encode())


@pytest.mark.parametrize("top,message", [
    (["-x"], "unsupported option '-x'. See --help."),
    (["--bogus"], "unsupported option '--bogus'. See --help."),
    (["-c"], "option '-c'/'--connect' requires an argument"),
    (["--connect"], "option '-c'/'--connect' requires an argument"),
])
def test_top_level_usage_errors(top, message):
    p = subprocess.run(entry_point() + top, capture_output=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (1, b"", f"error: {message}\n".encode())


def test_version_options_as_virsh():
    """virsh's -v/--version[=short] print the version alone and -V/--version=long more; either
    ends the option parse there (what follows is not read; an unknown option before it is)."""
    from secretbus.core.model import VERSION

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(entry_point() + list(args), capture_output=True, timeout=60)
    for args in (["-v"], ["--version"], ["--version=short"], ["--version=foo"], ["-qv"], ["-v", "-x"],
                 ["-c", "secret:///nowhere", "--version", "secret-list"]):
        p = run(*args)
        assert (p.returncode, p.stdout, p.stderr) == (0, f"{VERSION}\n".encode(), b""), args
    for args in (["-V"], ["--version=long"]):
        p = run(*args)
        assert p.returncode == 0 and p.stderr == b"", args
        assert p.stdout.startswith(f"Secretbus command line tool {VERSION}\n".encode())
        assert b"secret+tcp://" in p.stdout and p.stdout.endswith(b"\n") and not p.stdout.endswith(b"\n\n")
    p = run("-x", "-v")
    assert (p.returncode, p.stdout, p.stderr) == (1, b"", b"error: unsupported option '-x'. See --help.\n")
    d = subprocess.run([sys.executable, "-m", "secretbus.daemon", "--version"], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert (d.returncode, d.stdout) == (0, f"secretbusd (secretbus) {VERSION}\n")     # as libvirtd's


@pytest.mark.skipif(shutil.which("virsh") is None, reason="virsh is not installed")
def test_version_and_keepalive_option_parse_matches_real_virsh():
    """The same words end the same way in virsh (whose version is another): -v/-V, and the
    -k/-K numbers (C's strtol in base 0, an int, at least 0) with virsh's error texts."""
    for args in (["-v", "-x"], ["-x", "-v"], ["-qv"], ["--version", "long"], ["-v", "secret-list"],
                 ["-k"], ["-K"], ["--keepalive-interval"], ["--keepalive-count"], ["-k", "x"], ["-K", "x"],
                 ["-k", "-1"], ["-K", "-2"], ["--keepalive-interval=abc"], ["--keepalive-count=-1"],
                 ["--keepalive-interval=-1"], ["-k", "99999999999", "-v"], ["-k", "5x", "-v"], ["-k", "", "-v"],
                 ["-k", "0x10", "-v"], ["-k", "010", "-v"], ["-k", "08", "-v"], ["-k", " 5", "-v"], ["-k5", "-v"],
                 ["-k+5", "-v"], ["-k", "-0", "-v"], ["--keepalive-interval", "3", "-v"], ["-K0", "-k", "0", "-v"],
                 ["-k", "2147483647", "-v"], ["-k", "2147483648", "-v"], ["-qk", "1", "-v"]):
        v = subprocess.run(["virsh", *args], capture_output=True, timeout=60)
        p = subprocess.run(entry_point() + args, capture_output=True, timeout=60)
        assert (p.returncode, p.stderr, len(p.stdout.splitlines())) == \
            (v.returncode, v.stderr, len(v.stdout.splitlines())), args


SET_VALUE_HELP = """\
  NAME
    secret-set-value - set a secret value

  SYNOPSIS
    secret-set-value <secret> [--file <string>] [--plain] [--interactive] [--base64 <string>]

  DESCRIPTION
    Set a secret value.

  OPTIONS
    [--secret] <string>  secret UUID
    --file <string>  read secret from file
    --plain          read the secret from file without converting from base64
    --interactive    read the secret from the terminal
    --base64 <string>  base64-encoded secret value


"""


def test_help_pages_as_virsh(cli):
    for args in (("help", "secret-set-value"), ("secret-set-value", "--help"),
                 ("secret-set-value", U1, "--help")):
        p = cli(*args)
        assert (p.returncode, p.stdout.decode(), p.stderr) == (0, SET_VALUE_HELP, b"")
    p = cli("help")
    assert p.returncode == 0 and b"secret-define" in p.stdout and b"rewrite-values" in p.stdout
    p = cli("help", "nope")     # a command that ran and failed: the blank line follows
    assert (p.returncode, p.stdout) == (1, b"\n")
    assert p.stderr == b"error: command or command group 'nope' doesn't exist\n"
    assert cli("help", "--bogus", "secret-set-value", "extra").stdout.decode() == SET_VALUE_HELP
    p = subprocess.run(entry_point() + ["--help"], capture_output=True, timeout=60)
    assert p.returncode == 0 and b"--connect=URI" in p.stdout
    p = subprocess.run(entry_point(), capture_output=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith(b"error: a command is required")


def test_empty_option_arguments(cli, xmlfile):
    p = cli("secret-define", "")
    assert (p.returncode, p.stderr) == (1, b"error: Failed to get option 'file': Option argument is empty\n")
    p = cli("secret-dumpxml", "--secret=")
    assert p.stderr == b"error: Failed to get option 'secret': Option argument is empty\n"
    cli("secret-define", xmlfile())
    p = cli("secret-set-value", U1, "--file=")
    assert p.stderr == b"error: Failed to get option 'file': Option argument is empty\n"
    p = cli("secret-event", "--event", "")
    assert p.stderr == b"error: Failed to get option 'event': Option argument is empty\n"


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1x", "", "2147484"])
def test_event_timeout_must_be_positive_seconds(cli, value):
    p = cli("secret-event", "--event", "lifecycle", "--timeout", value)
    assert p.returncode == 1
    assert p.stderr == f"error: Numeric value '{value}' for <timeout> option is malformed or out of range\n".encode()


def test_event_arguments_by_position(cli):
    # --secret, --event and --timeout may be given positionally, in that order (vsh's rule)
    p = cli("secret-event", U1, "lifecycle", "1")
    assert (p.returncode, p.stderr) == (1, f"error: failed to get secret '{U1}'\nerror: Secret not found: "
                                           f"no secret with matching uuid '{U1}'\n".encode())


def test_file_errors_as_virsh(cli, xmlfile, tmp_path):
    p = cli("secret-define", str(tmp_path / "missing.xml"))
    assert (p.returncode, p.stdout) == (1, b"\n")
    assert p.stderr == f"error: Failed to open file '{tmp_path}/missing.xml': No such file or directory\n".encode()
    p = cli("secret-define", str(tmp_path))
    assert p.stderr == f"error: Failed to read file '{tmp_path}': Is a directory\n".encode()
    big = tmp_path / "big.xml"
    with open(big, "wb") as f:
        f.truncate(10 * 1024 * 1024 + 1)       # one byte over virsh's 10 MiB
    p = cli("secret-define", str(big))
    assert p.stderr == f"error: Failed to read file '{big}': Value too large for defined data type\n".encode()
    cli("secret-define", xmlfile())
    p = cli("secret-set-value", U1, "--file", str(tmp_path / "nothing"))
    assert (p.returncode, p.stderr) == (
        1, f"error: Failed to open file '{tmp_path}/nothing': No such file or directory\n".encode())
    huge = tmp_path / "huge"
    huge.write_bytes(b"A" * (2 * 65536 + 1))
    p = cli("secret-set-value", U1, "--file", str(huge))
    assert p.stderr == f"error: Failed to read file '{huge}': Value too large for defined data type\n".encode()
    assert cli("secret-get-value", U1).returncode == 1     # nothing was stored


def test_xpath_as_virsh(cli, xmlfile):
    cli("secret-define", xmlfile())

    def dump(*args: str):
        return cli("secret-dumpxml", U1, "--xpath", *args)
    p = dump("/secret/usage/@type")
    assert (p.returncode, p.stdout) == (0, b' type="ceph"\n\n')
    assert dump("/secret/@*").stdout == b' ephemeral="no"\n private="no"\n\n'
    assert dump("/secret/usage").stdout == (b'<usage type="ceph">\n  <name>client.admin secret</name>\n'
                                           b'</usage>\n\n')
    assert dump("uuid/text()").stdout == f"{U1}\n\n".encode()      # relative to <secret>
    assert dump("/secret/uuid|/secret/usage/name").stdout == (
        f"<uuid>{U1}</uuid>\n<name>client.admin secret</name>\n\n".encode())
    assert dump("/secret/usage", "--wrap").stdout == (
        b'<nodes>\n  <usage type="ceph">\n    <name>client.admin secret</name>\n  </usage>\n</nodes>\n\n')
    assert dump("/secret/usage/@type", "--wrap").stdout == b'<nodes type="ceph"/>\n\n'
    assert dump("/nothing", "--wrap").stdout == b"<nodes/>\n\n"
    assert dump("/nothing").stdout == b"\n"
    for expr in ("string(/secret/usage/@type)", "count(/secret)", "1 = 1"):
        p = dump(expr)
        assert (p.returncode, p.stdout) == (1, b"\n")
        assert p.stderr == f"error: internal error: Incorrect xpath '{expr}'\n".encode()
    # virsh prints libxml2's complaint and succeeds with no output; secretbus fails (docs)
    p = dump("///")
    assert (p.returncode, p.stderr) == (1, b"error: XPath error : Invalid expression in '///'\n")
    assert dump("").stderr == b"error: Failed to get option 'xpath': Option argument is empty\n"


def test_interactive_eof_stores_nothing(cli, xmlfile, tmp_path):
    cli("secret-define", xmlfile())
    assert cli("secret-set-value", U1, "--file", str(_write(tmp_path / "v", b"old")), "--plain").returncode == 0
    p = cli("secret-set-value", U1, "--interactive", input=b"")
    assert (p.returncode, p.stdout) == (1, b"\n")
    assert p.stderr == b"Enter new value for secret:\nerror: Failed to read secret: end of input before any value\n"
    assert cli("secret-get-value", U1, "--plain", top=("-q",)).stdout == b"old"
    # an empty line is a deliberate (empty) value, as libvirt would take it
    assert cli("secret-set-value", U1, "--interactive", input=b"\n").returncode == 0
    assert cli("secret-get-value", U1, "--plain", top=("-q",)).stdout == b""


# -- stdout that cannot be written -----------------------------------------------------------
def _lost_output_cases(xmlfile_path: str) -> list[tuple[str, ...]]:
    return [("secret-list",), ("secret-dumpxml", U1), ("secret-get-value", U1),
            ("secret-event", "--list"), ("help",), ("secret-define", xmlfile_path)]


def _assert_one_error_line(p, reason: bytes):
    assert p.returncode == 1, p.stderr
    assert b"Traceback" not in p.stderr and p.stderr.count(b"\n") == 1, p.stderr
    assert p.stderr.startswith(b"error: ") and reason in p.stderr, p.stderr
    assert SENTINEL not in p.stderr and base64.b64encode(SENTINEL) not in p.stderr


def test_full_disk_on_stdout(cli, xmlfile, tmp_path):
    f = xmlfile()
    cli("secret-define", f)
    cli("secret-set-value", U1, "--file", str(_write(tmp_path / "v", SENTINEL)), "--plain")
    with open("/dev/full", "wb") as full:
        for args in _lost_output_cases(f):
            p = cli(*args, stdout=full)
            _assert_one_error_line(p, b"No space left on device" if args[0] != "secret-get-value"
                                   else b"failed to write secret")
        p = cli("secret-get-value", U1, "--plain", stdout=full)
        assert p.stderr == b"error: failed to write secret\n" and p.returncode == 1


def test_closed_pipe_and_closed_stdout(cli, xmlfile, tmp_path):
    f = xmlfile()
    cli("secret-define", f)
    cli("secret-set-value", U1, "--file", str(_write(tmp_path / "v", SENTINEL)), "--plain")
    r, w = os.pipe()
    os.close(r)          # the reader is gone before anything is written: EPIPE, every time
    try:
        for args in _lost_output_cases(f):
            p = cli(*args, stdout=w)
            _assert_one_error_line(p, b"Broken pipe" if args[0] != "secret-get-value"
                                   else b"failed to write secret")
        p = cli("secret-event", "--event", "lifecycle", "--timeout", "1", stdout=w)
        _assert_one_error_line(p, b"Broken pipe")
    finally:
        os.close(w)
    # stdout closed altogether: nothing may be written into a file that took fd 1
    p = subprocess.run(entry_point() + ["-c", cli.uri, "secret-list"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=60, preexec_fn=lambda: os.close(1))
    _assert_one_error_line(p, b"Bad file descriptor")
    assert sorted(os.listdir(cli.root / "etc" / "secrets")) == [f"{U1}.base64", f"{U1}.xml"]


def test_shell_pipeline_into_true(cli, xmlfile, tmp_path):
    # `secretbus secret-list | true`: the output is lost, so the status is not 0 (when true is
    # gone before the write; a sleep makes that certain)
    for i in range(30):
        cli("secret-define", xmlfile(f"{U1[:-2]}{i:02d}"))
    cmd = " ".join(f"'{a}'" for a in entry_point() + ["-c", cli.uri])
    p = subprocess.run(["bash", "-c", f"set -o pipefail; {{ sleep 0.5; {cmd} secret-list; }} | true"],
                       capture_output=True, timeout=60)
    _assert_one_error_line(p, b"Broken pipe")


# -- against the real virsh, where it is installed (Debian: libvirt-clients) ---------------
needs_virsh = pytest.mark.skipif(shutil.which("virsh") is None, reason="virsh is not installed")


@needs_virsh
def test_usage_errors_match_real_virsh(cli):
    # virsh checks the command line before it connects, so no secret driver is needed
    for args, _message in USAGE_ERRORS:
        v = subprocess.run(["virsh", "-c", cli.uri, *args], capture_output=True, timeout=60)
        p = cli(*args)
        assert (p.returncode, p.stdout, p.stderr) == (v.returncode, v.stdout, v.stderr), args


@needs_virsh
@pytest.mark.parametrize("command", ["secret-define", "secret-dumpxml", "secret-event", "secret-get-value",
                                     "secret-list", "secret-set-value", "secret-undefine"])
def test_help_pages_match_real_virsh(cli, command):
    v = subprocess.run(["virsh", "-c", "test:///default", "help", command], capture_output=True, timeout=60)
    p = cli("help", command)
    assert (p.returncode, p.stdout.decode(), p.stderr) == (v.returncode, v.stdout.decode(), v.stderr)


def test_text_left_in_pythons_stdout_is_flushed_and_reported(cli, xmlfile):
    # Something printed through sys.stdout (not the CLI's writer) would otherwise fail only in
    # the interpreter's flush at exit, as "Exception ignored ... BrokenPipeError".
    code = programs.source("cli_after_library_print")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}   # Python's default buffering
    with open("/dev/full", "wb") as full:
        p = subprocess.run([sys.executable, "-c", code, cli.uri], stdout=full, stderr=subprocess.PIPE, timeout=60,
                           env=env)
    _assert_one_error_line(p, b"No space left on device")
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-c", code, cli.uri], stdout=w, stderr=subprocess.PIPE, timeout=60,
                           env=env)
    finally:
        os.close(w)
    _assert_one_error_line(p, b"Broken pipe")


def test_a_connection_without_sasl_does_not_load_scram(tmp_path):
    """`secretbus -c` starts for every command of a script: SCRAM's library (scramp, with
    asn1crypto and importlib.metadata) cost a fifth of that start and is loaded only when a
    server asks for SASL."""
    code = ("import sys, secretbus.cli as c\n"
            f"rc = c.main(['-c', 'secret:///session?socket={tmp_path}/none', 'secret-list'])\n"
            "print(rc, sorted(m for m in ('scramp', 'asn1crypto') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.stdout.split("\n")[-2] == "1 []", (r.stdout, r.stderr)

"""secretbusd.conf: libvirtd.conf's keys in virConf syntax, remote_access grants, errors that
name the file and the line."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from secretbus.core import errors
from secretbus.core.model import InstanceKind
from secretbus.rpc.serverconf import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    TLS_PORT,
    Kind,
    Rights,
    glob_match,
    load_serverconf,
    parse_serverconf,
)
from secretbus.store.paths import InstancePaths

DN = "C=GB,ST=London,L=London,O=secretbus test,CN=client1"


def test_defaults_are_libvirts():
    c = parse_serverconf("")
    assert (c.listen_tls, c.listen_tcp, c.tls_port, c.tcp_port) == (False, False, TLS_PORT, 16509)
    assert (c.ca_file, c.cert_file, c.key_file) == (CA_FILE, CERT_FILE, KEY_FILE)
    assert CA_FILE == "/etc/pki/CA/cacert.pem" and KEY_FILE == "/etc/pki/libvirt/private/serverkey.pem"
    assert c.tls_allowed_dn_list is None and c.dn_allowed(DN)
    assert c.rights_of(Kind.X509, DN) is None           # no grant: refused


def test_a_libvirtd_style_file():
    c = parse_serverconf('''# as in libvirtd.conf
listen_tls = 1
listen_tcp = 0
tls_port = "16600"
listen_addr = "127.0.0.1"
key_file = "/k/serverkey.pem"; cert_file = "/k/servercert.pem"
ca_file = "/k/cacert.pem"
crl_file = "/k/cacrl.pem"
tls_no_verify_certificate = 0
tls_allowed_dn_list = ["C=GB,ST=London,L=London,O=secretbus test,CN=*",
                       "CN=admin?" ]
auth_tls = "none"
max_clients = 20
max_client_requests = 3
remote_access = [ "x509:C=GB,*,CN=client1=rw+values", "x509:*=ro", "sasl:fred=rw" ]
''', "/etc/secretbus/secretbusd.conf")
    assert c.listen_tls and not c.listen_tcp and c.tls_port == 16600 and c.listen_addr == "127.0.0.1"
    assert c.crl_path() == "/k/cacrl.pem" and c.max_clients == 20 and c.max_client_requests == 3
    assert c.remote_clients() == 10                    # half of max_clients, unless set
    assert (c.keepalive_interval, c.keepalive_count) == (5, 5)      # libvirtd's defaults
    k = parse_serverconf("keepalive_interval = -1\nkeepalive_count = 0\n")
    assert (k.keepalive_interval, k.keepalive_count) == (-1, 0)
    assert parse_serverconf("max_remote_clients = 7\n").remote_clients() == 7
    assert c.dn_allowed(DN) and c.dn_allowed("CN=admin1") and not c.dn_allowed("CN=admin12")
    assert not c.dn_allowed("C=GB,ST=London,L=London,O=other,CN=x")
    # first match wins; the DN's own '=' signs stay in the glob
    assert c.rights_of(Kind.X509, DN) is Rights.RW_VALUES
    assert c.rights_of(Kind.X509, "CN=someone") is Rights.RO
    assert c.rights_of(Kind.SASL, "fred") is Rights.RW and c.rights_of(Kind.SASL, "bob") is None
    assert [g.line for g in c.remote_access] == [15, 15, 15]


def test_unix_auth_defaults_are_libvirts_and_each_socket_has_its_own():
    c = parse_serverconf("")
    # libvirtd privileged with polkit: both sockets polkit; unprivileged: none
    assert [c.unix_auth(True, ro) for ro in (False, True)] == ["polkit", "polkit"]
    assert [c.unix_auth(False, ro) for ro in (False, True)] == ["none", "none"]
    c = parse_serverconf('auth_unix_rw = "sasl"\nauth_unix_ro = "none"\n')
    assert (c.unix_auth(True, False), c.unix_auth(True, True)) == ("sasl", "none")
    assert c.unix_auth(False, False) == "sasl"
    assert parse_serverconf('auth_unix_ro = "sasl"').unix_auth(True, False) == "polkit"


def test_an_empty_dn_list_admits_nobody():
    assert not parse_serverconf("tls_allowed_dn_list = []").dn_allowed(DN)


@pytest.mark.parametrize("pattern,text,want", [
    ("*", "", True), ("CN=*", "CN=a,b", True), ("CN=?", "CN=ab", False), ("a[b]c", "a[b]c", True),
    ("a[b]c", "abc", False), ("C=GB,O=x*", "C=GB,O=x\\,y", True), ("*.ops", "CN=a.ops", True),
])
def test_globs_are_glibs_simple_patterns(pattern, text, want):
    assert glob_match(pattern, text) is want


@pytest.mark.parametrize("text,line,words", [
    ("listen_tls = 2", 1, "'listen_tls' must be 0 or 1"),
    ("listen_tls = \"1\"", 1, "'listen_tls' must be 0 or 1"),
    ("\n\ntls_port = 70000", 3, "port number"),
    ("tls_port = \"16x\"", 1, "port number"),
    ("ca_file = \"relative.pem\"", 1, "absolute path"),
    ("auth_tls = \"polkit\"", 1, "'auth_tls' must be 'none' or 'sasl'"),
    ("auth_tcp = \"none\"", 1, "'auth_tcp' must be 'sasl'"),
    ("auth_unix_rw = \"gssapi\"", 1, "'auth_unix_rw' must be 'none' or 'polkit' or 'sasl'"),
    ("\nauth_unix_ro = 1", 2, "auth_unix_ro"),
    ("tls_allowed_dn_list = \"CN=*\"", 1, "expected a list"),
    ("remote_access = [\n \"x509:CN=a=all\" ]", 2, "rights must be ro, rw or rw+values"),
    ("remote_access = [ \"unix:x=ro\" ]", 1, "must start with x509: or sasl:"),
    ("remote_access = [ \"x509:=ro\" ]", 1, "<kind>:<glob>=<rights>"),
    ("remote_access = [ \"x509:CN=a\" ]", 1, "rights must be"),
    ("remote_access = [ 1 ]", 1, "must be strings"),
    ("tls_no_verify_certificate = 1", 1, "not supported"),
    ("max_clients = 0", 1, "positive integer"),
    ("keepalive_interval = -2", 1, "'keepalive_interval' must be an integer from -1 to 2147483"),
    ("keepalive_interval = 2147484", 1, "from -1 to 2147483"),
    ("keepalive_interval = \"5\"", 1, "keepalive_interval"),
    ("keepalive_count = -1", 1, "'keepalive_count' must be an integer from 0"),
    ("listen_tls = 1\nlisten_tls = 0", 2, "duplicate key 'listen_tls' (first set at line 1)"),
    ("listen_tls 1", 1, "expecting an assignment"),
    ("x = [ \"a\",\n  \"b\"", 1, "list is not closed"),
])
def test_bad_values_name_file_and_line(text, line, words):
    with pytest.raises(errors.ConfigError) as e:
        parse_serverconf(text, "/etc/secretbus/secretbusd.conf")
    msg = str(e.value)
    assert msg.startswith(f"/etc/secretbus/secretbusd.conf:{line}: "), msg
    assert words in msg


def test_unknown_keys_warn_and_are_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="secretbus.serverconf"):
        c = parse_serverconf("listen_tls = 1\nunix_sock_group = \"libvirt\"\n", "/f.conf")
    assert c.listen_tls
    assert "/f.conf:2: unknown key 'unix_sock_group' ignored" in caplog.text


def test_load(tmp_path: Path):
    assert load_serverconf(tmp_path / "none.conf").path is None          # missing: defaults
    with pytest.raises(errors.ConfigError, match="No such file"):
        load_serverconf(tmp_path / "none.conf", required=True)           # --config names it
    f = tmp_path / "s.conf"
    f.write_text("listen_tls = 1\n")
    os.chmod(f, 0o600)
    c = load_serverconf(f)
    assert c.listen_tls and c.path == f
    os.chmod(f, 0o666)
    with pytest.raises(errors.ConfigError, match="writable by others"):
        load_serverconf(f)
    os.chmod(f, 0o600)
    f.write_bytes(b"listen_tls = 1\nlisten_addr = \"\xff\"\n")
    with pytest.raises(errors.ConfigError, match=r"s\.conf:2: not valid UTF-8"):
        load_serverconf(f)
    link = tmp_path / "link.conf"
    link.symlink_to(f)
    with pytest.raises(errors.ConfigError, match="Failed to open"):
        load_serverconf(link)


def test_default_paths(monkeypatch, tmp_path):
    assert str(InstancePaths.system().server_conf_file) == "/etc/secretbus/secretbusd.conf"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert InstancePaths.session().server_conf_file == tmp_path / "secretbus" / "secretbusd.conf"
    assert InstancePaths.for_kind(InstanceKind.SYSTEM, "/r").server_conf_file == Path("/r/etc/secretbusd.conf")
    named = InstancePaths.system().with_server_conf("rel/x.conf")
    assert named.server_conf_named and named.server_conf_file == Path.cwd() / "rel" / "x.conf"


# -- rights of remote callers (rpc/remote.py, guard.py's remote branch): pure logic --------------
def test_sasl_passwd_writes_the_store_the_server_reads(tmp_path: Path):
    """`secretbus sasl-passwd USER` without --file: secretbusd.conf's sasl_verifier_file, else
    sasl-verifiers.json beside that file (--config names another, as for secretbusd)."""
    import subprocess
    import sys
    root = tmp_path / "r"
    (root / "etc").mkdir(parents=True)

    def passwd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", f"secret:///embed?root={root}",
                               "sasl-passwd", "fred", *args], input="fr3d-pass\n", capture_output=True, text=True,
                              timeout=60, cwd=Path(__file__).resolve().parents[1])
    r = passwd()
    beside = root / "etc" / "sasl-verifiers.json"
    assert r.returncode == 0 and f"set in {beside}" in r.stdout and beside.exists(), r
    named = tmp_path / "verifiers.json"
    (root / "etc" / "secretbusd.conf").write_text(f'sasl_verifier_file = "{named}"\n')
    r = passwd()
    assert r.returncode == 0 and named.exists() and b"fr3d-pass" not in named.read_bytes(), r
    other, elsewhere = tmp_path / "other.conf", tmp_path / "elsewhere.json"
    other.write_text(f'sasl_verifier_file = "{elsewhere}"\n')
    r = passwd("--config", str(other))
    assert r.returncode == 0 and elsewhere.exists(), r
    r = passwd("--config", str(tmp_path / "missing.conf"))
    assert r.returncode == 1 and "No such file" in r.stderr, r


def _remote_session(dn: str = DN):
    from secretbus.rpc.remote import RemoteIdentity
    from secretbus.rpc.server import REMOTE_PEER
    from secretbus.rpc.session import Session
    return Session(REMOTE_PEER, socket_readonly=False, trusted=False, authenticated=True,
                   remote=RemoteIdentity(Kind.X509, dn, "192.0.2.1:4000"))


GRANTS = '''remote_access = [ "x509:*,CN=ro=ro", "x509:*,CN=rw=rw", "x509:*,CN=client1=rw+values", "x509:*=ro" ]
tls_allowed_dn_list = [ "C=GB,*" ]'''


@pytest.mark.parametrize("cn,want", [
    ("ro", {"search-secrets", "getattr", "read"}),
    ("rw", {"search-secrets", "getattr", "read", "write", "save", "delete"}),
    ("client1", {"search-secrets", "getattr", "read", "write", "save", "delete", "read-secure"}),
])
def test_rights_give_their_permissions_and_no_more(cn, want):
    from secretbus.access.permissions import Perm
    from secretbus.rpc.guard import Guard
    from secretbus.rpc.remote import RemotePolicy
    g = Guard(system=False)           # even the session instance checks remote callers
    s = _remote_session(f"C=GB,ST=London,L=London,O=secretbus test,CN={cn}")
    assert g.checked(s) and s.subject() is None          # never a polkit subject
    assert not any(g.cached(s, p, None) for p in Perm)   # no policy attached: everything refused
    g.remote = RemotePolicy(parse_serverconf(GRANTS))
    allowed = {p.value.rsplit(".", 1)[1] for p in Perm if g.cached(s, p, None)}
    assert allowed == want


def test_a_reload_takes_rights_away_from_open_connections():
    from secretbus.access.permissions import Perm
    from secretbus.rpc.guard import Guard
    from secretbus.rpc.remote import RemotePolicy
    g = Guard(system=True)
    g.remote = policy = RemotePolicy(parse_serverconf(GRANTS))
    s = _remote_session()
    assert g.cached(s, Perm.WRITE, None)
    policy.update(parse_serverconf('remote_access = [ "x509:*=ro" ]'))
    assert not g.cached(s, Perm.WRITE, None) and g.cached(s, Perm.READ, None)
    policy.update(parse_serverconf('remote_access = [ "x509:*=rw" ]\ntls_allowed_dn_list = [ "CN=*" ]'))
    assert not g.cached(s, Perm.READ, None)               # off the DN list now


def test_private_values_never_go_to_a_remote_caller():
    import asyncio

    from secretbus.core.model import SecretDef, UsageType
    from secretbus.rpc.guard import Guard
    from secretbus.rpc.remote import RemotePolicy
    g = Guard(system=True)
    g.remote = RemotePolicy(parse_serverconf(GRANTS))

    class C:
        session = _remote_session()
    private = SecretDef("0d5f0b7e-1a2b-4c3d-8e9f-0123456789ab", private=True, usage_type=UsageType.VOLUME,
                        usage_id="/v")
    read_called = []
    with pytest.raises(errors.InvalidSecret, match="secret is private"):
        asyncio.run(g.value_read(C(), private, lambda: read_called.append(1)))   # type: ignore[arg-type]
    assert not read_called
    public = SecretDef("0d5f0b7e-1a2b-4c3d-8e9f-0123456789ac", usage_type=UsageType.VOLUME, usage_id="/w")
    assert asyncio.run(g.value_read(C(), public, lambda: b"v")) == b"v"   # type: ignore[arg-type]


def test_sasl_rights_first_match_over_dn_and_user():
    from secretbus.rpc.remote import RemoteIdentity, RemotePolicy
    pol = RemotePolicy(parse_serverconf('''auth_tls = "sasl"
sasl_allowed_username_list = [ "fred", "ann*" ]
remote_access = [ "sasl:ann=ro", "x509:*,CN=client1=rw", "sasl:fred=rw+values" ]'''))
    who = RemoteIdentity(Kind.X509, DN, "192.0.2.1:4000")
    assert pol.may_connect(who) and pol.rights(who) is None        # nothing before SASL succeeded
    assert pol.rights(who.with_sasl_user("fred")) is Rights.RW       # the DN's grant comes first
    assert pol.rights(who.with_sasl_user("ann")) is Rights.RO
    assert pol.rights(who.with_sasl_user("bob")) is None             # not in the allowed list
    other = RemoteIdentity(Kind.X509, "CN=x", "192.0.2.1:4000")
    assert pol.rights(other.with_sasl_user("fred")) is Rights.RW_VALUES
    assert pol.rights(other.with_sasl_user("annie")) is None         # allowed, but no grant
    assert "SASL user 'fred'" in other.with_sasl_user("fred").describe()

"""The opt-in network drop-in, systemd/secretbusd-network.conf (installed as
/etc/systemd/system/secretbusd.service.d/network.conf): what it changes in secretbusd.service
(and nothing else), that systemd accepts and scores it, and the daemon under the unit's
sandbox with it — a TLS listener served to virsh and secretbus's client, Kerberos TCP, fleet
mode over https to a real etcd — and without it: `listen_tls = 1` refused with a message that
names the drop-in, exit 78 (no restart loop), while the unit alone still reads /etc/secretbus
(secretbusd.conf, the SCRAM verifier store).

The sandbox is tests/systemd_sandbox.py's emulation (see tests/test_systemd.py); --map stands
test directories in for /etc/secretbus, /etc/pki/libvirt, /etc/pki/CA, /etc/pki/secretbus and
/etc/krb5.conf, so the daemon reads them at the paths the units bind, with the defaults of
secretbusd.conf.
"""
from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import harness
import pytest
import systemd_sandbox
import test_systemd
from harness.journal import JournalSocket
from harness.ports import free_port
from test_systemd import (
    MAX_EXPOSURE,
    SANDBOX,
    SYSTEM_UNIT,
    SYSTEM_UNITS,
    Installed,
    analyze,
    daemon_argv,
    exposure,
    load_credentials,
    run_install,
    seal_key,
    start_daemon,
    systemd_env,
)

from secretbus.daemon import EXIT_CONFIG
from secretbus.rpc import netcheck
from secretbus.rpc.server import SYSTEM_DIR, socket_plan
from secretbus.store.paths import InstancePaths

installed = test_systemd.installed      # the module-scoped fixture: the units installed into a DESTDIR

REPO = Path(__file__).resolve().parents[1]
DROPIN = REPO / "systemd" / "secretbusd-network.conf"
DROPIN_DEST = "/etc/systemd/system/secretbusd.service.d/network.conf"
# `systemd-analyze security --offline=true` (systemd 252) of secretbusd.service with the drop-in:
# 1.6 (0.7 without), the cost of the host's network, IP sockets and no IP address allow list
# (1.5 with the IPAddressAllow= variant its comment shows).
EXPOSURE_WITH_DROPIN = 1.6

ROOT_MARKS = (pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.skipif(not shutil.which("systemd-analyze") or not shutil.which("systemd-creds"),
                                 reason="needs systemd-analyze and systemd-creds"))


def root_only(fn):
    """The marks of tests/test_systemd.py's integration tests (they run systemd-analyze, install
    into a DESTDIR, or mount and seccomp the sandbox)."""
    for mark in ROOT_MARKS:
        fn = mark(fn)
    return fn


# -- systemd's merge rules, as the emulator applies them (pure logic) --------------------------
def test_dropin_merge_rules(tmp_path):
    """systemd.unit(5): a drop-in's lines continue the unit's — lists append, an empty
    assignment resets, the last single value wins — and drop-ins apply in their order."""
    unit = tmp_path / "x.service"
    unit.write_text("[Service]\nPrivateNetwork=yes\nRestrictAddressFamilies=AF_UNIX\nIPAddressDeny=any\n"
                    "BindReadOnlyPaths=-/etc/a\nCapabilityBoundingSet=\nExecStart=/bin/true\n")
    net = tmp_path / "10-net.conf"
    net.write_text("[Service]\nPrivateNetwork=no\nRestrictAddressFamilies=AF_INET AF_INET6\nIPAddressDeny=\n"
                   "BindReadOnlyPaths=-/etc/b\nExecStart=\nExecStart=/bin/false\n")
    allow = tmp_path / "20-allow.conf"
    allow.write_text("[Service]\nIPAddressDeny=any\nIPAddressAllow=localhost\n")

    svc = systemd_sandbox.service(systemd_sandbox.parse_unit(unit))
    assert svc["CapabilityBoundingSet"] == [] and svc["IPAddressDeny"] == ["any"]
    svc = systemd_sandbox.service(systemd_sandbox.parse_unit(unit, [net]))
    assert systemd_sandbox.last(svc, "PrivateNetwork") == "no"
    assert [f for w in systemd_sandbox.words(svc, "RestrictAddressFamilies") for f in w] == \
        ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert svc["IPAddressDeny"] == []                     # reset: no deny list at all
    assert svc["BindReadOnlyPaths"] == ["-/etc/a", "-/etc/b"]
    assert svc["ExecStart"] == ["/bin/false"]             # reset, then one command
    assert "CapabilityBoundingSet" in svc and svc["CapabilityBoundingSet"] == []   # still the empty set
    svc = systemd_sandbox.service(systemd_sandbox.parse_unit(unit, [net, allow]))
    assert svc["IPAddressDeny"] == ["any"] and svc["IPAddressAllow"] == ["localhost"]
    svc = systemd_sandbox.service(systemd_sandbox.parse_unit(unit, [allow, net]))
    assert svc["IPAddressDeny"] == [] and svc["IPAddressAllow"] == ["localhost"]


def test_address_family_rules_are_systemds():
    """One socket() rule per comparison: below the lowest, above the highest, each gap."""
    lt, gt, eq = systemd_sandbox.SCMP_CMP_LT, systemd_sandbox.SCMP_CMP_GT, systemd_sandbox.SCMP_CMP_EQ
    assert systemd_sandbox.address_family_rules({1}) == [(0, gt, 1, 0)]
    rules = systemd_sandbox.address_family_rules({1, 2, 10})
    assert rules == [(0, gt, 10, 0)] + [(0, eq, af, 0) for af in range(3, 10)]
    assert systemd_sandbox.address_family_rules({2, 10})[0] == (0, lt, 2, 0)


def _binds(svc: dict) -> set[str]:
    return {p.lstrip("-") for v in svc.get("BindReadOnlyPaths", []) for p in v.split()}


def test_shipped_dropin_opens_the_network_and_nothing_else():
    base = systemd_sandbox.service(systemd_sandbox.parse_unit(REPO / "systemd" / SYSTEM_UNIT))
    merged = systemd_sandbox.service(systemd_sandbox.parse_unit(REPO / "systemd" / SYSTEM_UNIT, [DROPIN]))
    # The unit alone: closed, but its server configuration and verifier store are readable.
    assert (systemd_sandbox.last(base, "PrivateNetwork"), base["RestrictAddressFamilies"], base["IPAddressDeny"]) \
        == ("yes", ["AF_UNIX"], ["any"])
    assert "/etc/secretbus" in _binds(base)
    # With the drop-in: the host's network, IPv4/IPv6 besides AF_UNIX (no netlink), no deny list.
    assert systemd_sandbox.last(merged, "PrivateNetwork") == "no"
    families = {f for w in systemd_sandbox.words(merged, "RestrictAddressFamilies") for f in w}
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert merged["IPAddressDeny"] == []
    added = _binds(merged) - _binds(base)
    assert _binds(base) <= _binds(merged)
    assert added == {"/etc/pki/libvirt", "/etc/pki/CA", "/etc/pki/secretbus", "/etc/ssl/openssl.cnf",
                     "/etc/krb5.conf", "/etc/krb5.conf.d", "/etc/gss",
                     "/etc/hosts", "/etc/resolv.conf", "/etc/host.conf", "/etc/gai.conf"}
    # Not other services' keys: no whole /etc/pki or /etc/ssl, no host keytab, shadow or ssh.
    assert not {b for b in added if b in ("/etc/pki", "/etc/ssl", "/etc/krb5.keytab")
                or any(k in b for k in ("shadow", "ssh", "private"))}
    rw = {p.lstrip("-") for v in merged["ReadWritePaths"] for p in v.split()}
    assert rw - {p for v in base["ReadWritePaths"] for p in v.split()} == {"/etc/libvirt/secretbus-fleet"}
    # Every other setting is the unit's.
    changed = {"PrivateNetwork", "RestrictAddressFamilies", "IPAddressDeny", "BindReadOnlyPaths", "ReadWritePaths"}
    assert set(merged) == set(base)
    assert {k: v for k, v in merged.items() if k not in changed} == {k: v for k, v in base.items() if k not in changed}


def test_only_loopback(tmp_path):
    head = "Inter-|   Receive\n face |bytes    packets\n"
    f = tmp_path / "dev"
    f.write_text(head + "    lo: 1 2 3\n")
    assert netcheck.only_loopback(f)
    f.write_text(head + "    lo: 1 2 3\n  eth0: 4 5 6\n")
    assert not netcheck.only_loopback(f)
    assert not netcheck.only_loopback(tmp_path / "missing")


class _NoSockets:
    """What asyncio's create_server() returns when every socket() failed: no socket at all."""
    sockets: tuple = ()
    closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("forbidden", [True, False], ids=["sandboxed", "other-cause"])
def test_a_server_without_sockets_is_a_config_error(monkeypatch, forbidden):
    from secretbus.core import errors
    monkeypatch.setattr(netcheck, "ip_sockets_forbidden", lambda: forbidden)
    server = _NoSockets()
    with pytest.raises(errors.ConfigError) as e:
        netcheck.require_sockets(server, "TLS", "192.0.2.1", 16514)  # type: ignore[arg-type]
    assert server.closed
    assert "cannot serve the TLS listener on 192.0.2.1 port 16514" in str(e.value)
    assert (DROPIN_DEST in str(e.value)) == forbidden


def test_refusal_message_names_the_dropin():
    hint = netcheck.sandbox_hint()
    assert DROPIN.name in hint and DROPIN_DEST in hint and "--with-network" in hint
    assert netcheck.NETWORK_DROPIN == DROPIN_DEST and netcheck.SHIPPED_DROPIN == DROPIN.name


# -- install, systemd-analyze ------------------------------------------------------------------
@root_only
@pytest.mark.parametrize("flag", [True, False], ids=["with-network", "default"])
def test_install_puts_the_dropin_only_when_asked(tmp_path, flag):
    r = run_install(f"DESTDIR={tmp_path}", "PREFIX=/usr", *(["--with-network"] if flag else []))
    assert r.returncode == 0, r.stderr
    example = tmp_path / "usr/share/doc/secretbus/examples" / DROPIN.name
    assert example.read_bytes() == DROPIN.read_bytes()          # always there, to copy
    dest = tmp_path / DROPIN_DEST.lstrip("/")
    assert dest.exists() == flag
    if flag:
        assert dest.read_bytes() == DROPIN.read_bytes() and dest.stat().st_mode & 0o777 == 0o644
    r = run_install("uninstall", f"DESTDIR={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert not dest.parent.exists()


@root_only
def test_uninstall_keeps_an_edited_dropin(tmp_path):
    assert run_install(f"DESTDIR={tmp_path}", "--with-network").returncode == 0
    dest = tmp_path / DROPIN_DEST.lstrip("/")
    dest.write_text(dest.read_text() + "IPAddressAllow=192.0.2.0/24\n")
    r = run_install("uninstall", f"DESTDIR={tmp_path}")
    assert r.returncode == 0 and "kept" in r.stdout and dest.exists()


def unit_dir_with_dropin(installed: Installed, tmp_path: Path, text: str | None = None) -> Path:
    """A copy of the installed system units with secretbusd.service.d/network.conf beside them."""
    d = tmp_path / "units"
    d.mkdir(parents=True)
    for u in SYSTEM_UNITS:
        shutil.copy(installed.unitdir / u, d / u)
    (d / f"{SYSTEM_UNIT}.d").mkdir()
    (d / f"{SYSTEM_UNIT}.d" / "network.conf").write_text(DROPIN.read_text() if text is None else text)
    return d


@root_only
def test_units_verify_with_the_dropin(installed, tmp_path):
    d = unit_dir_with_dropin(installed, tmp_path)
    r = analyze("verify", *(str(d / u) for u in SYSTEM_UNITS))
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "")
    # verify reads the drop-in: a misspelt key there is a warning.
    bad = unit_dir_with_dropin(installed, tmp_path / "bad",
                               DROPIN.read_text().replace("PrivateNetwork=", "PrivateNetworkX="))
    r = analyze("verify", *(str(bad / u) for u in SYSTEM_UNITS))
    assert r.returncode == 0 and "PrivateNetworkX" in r.stderr and "network.conf" in r.stderr


@root_only
def test_security_exposure_with_the_dropin(installed, tmp_path, record_property):
    without = exposure(installed.unitdir / SYSTEM_UNIT)
    level = exposure(unit_dir_with_dropin(installed, tmp_path) / SYSTEM_UNIT)
    # The narrower variant the drop-in's comment shows: deny all, allow the peers.
    text = DROPIN.read_text()
    assert "\nIPAddressDeny=\n" in text
    narrow_text = text.replace("\nIPAddressDeny=\n", "\nIPAddressDeny=any\nIPAddressAllow=localhost 192.0.2.0/24\n")
    narrow = exposure(unit_dir_with_dropin(installed, tmp_path / "narrow", narrow_text) / SYSTEM_UNIT)
    record_property("exposure", level)
    print(f"{SYSTEM_UNIT} + network.conf: exposure {level} (without the drop-in: {without}; "
          f"recorded: {EXPOSURE_WITH_DROPIN}; with IPAddressDeny=any + IPAddressAllow=: {narrow})")
    assert without < narrow < level <= MAX_EXPOSURE


# -- the sandbox with the drop-in ----------------------------------------------------------------
NET_PROBE = r"""
import errno, os, socket, sys
def fails(fn, code):
    try:
        fn()
    except OSError as e:
        return e.errno == code
    return False
port, pki = int(sys.argv[1]), sys.argv[2]
def connect():
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.recv(5)
names = {a[4][0] for a in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG)}
checks = {
    "AF_INET allowed": socket.socket(socket.AF_INET).close() is None,
    "AF_INET6 allowed": socket.socket(socket.AF_INET6).close() is None,
    "AF_NETLINK refused": fails(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW), errno.EAFNOSUPPORT),
    "AF_PACKET refused": fails(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW), errno.EAFNOSUPPORT),
    "host network": [l.split(":")[0].strip() for l in open("/proc/self/net/dev").readlines()[2:]] != ["lo"],
    "host listener reached": connect() == b"hello",
    "localhost resolves (AI_ADDRCONFIG, no netlink)": "127.0.0.1" in names,
    "/etc/hosts readable": "localhost" in open("/etc/hosts").read(),
    "/etc/pki/libvirt bound": os.listdir("/etc/pki/libvirt") == ["probe"],
    "/etc/pki read-only": fails(lambda: open("/etc/pki/libvirt/new", "w"), errno.EROFS),
    "/etc/secretbus bound": os.path.isdir("/etc/secretbus"),
    "no /etc/ssh": not os.path.exists("/etc/ssh"),
    "no /etc/krb5.keytab": not os.path.exists("/etc/krb5.keytab"),
    "no /etc/ssl/private": not os.path.exists("/etc/ssl/private"),
}
for path in sys.argv[3:]:
    checks[path + " unreadable"] = fails(lambda: open(path).read(1), errno.ENOENT) or \
        fails(lambda: open(path).read(1), errno.EACCES)
print(checks)
sys.exit(0 if all(checks.values()) else 1)
"""


def _maps(**kw: Path) -> list[str]:
    return [x for k, v in kw.items() for x in ("--map", f"{k}={v}")]


@root_only
def test_sandbox_with_the_dropin_has_the_network_and_still_hides_roots_files(installed, tmp_path):
    from test_systemd import HOST_SECRETS
    rw = tmp_path / "secrets"
    rw.mkdir(mode=0o700)
    pki = tmp_path / "pki-libvirt"
    pki.mkdir()
    (pki / "probe").write_text("x")
    etc_sb = tmp_path / "etc-secretbus"
    etc_sb.mkdir(mode=0o700)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(30)
    system = InstancePaths.system()
    proc = subprocess.Popen(
        [sys.executable, str(SANDBOX), "--unit", str(installed.unitdir / SYSTEM_UNIT), "--dropin", str(DROPIN),
         *_maps(**{str(system.config_dir): rw, str(system.state_dir): rw, str(SYSTEM_DIR): rw,
                   "/etc/pki/libvirt": pki, "/etc/secretbus": etc_sb}),
         "--", sys.executable, "-c", NET_PROBE, str(port), str(pki), *HOST_SECRETS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, umask=0o077,
        env={k: v for k, v in systemd_env().items() if k != "SANDBOX_DENY"})
    try:
        conn, _ = listener.accept()
        conn.sendall(b"hello")
        conn.close()
        out, err = proc.communicate(timeout=60)
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
    print(out)
    assert proc.returncode == 0, out + err
    assert '"IPAddressDeny"' not in err          # reset by the drop-in: nothing left to emulate


# -- the daemon under the unit's sandbox --------------------------------------------------------
def make_pki(d: Path) -> dict[str, Path]:
    """libvirt's PKI layout (/etc/pki/libvirt, /etc/pki/CA with a CRL) made with the TLS tests'
    openssl helpers, and pkipath= directories for a good and a revoked client."""
    from test_remote_tls import SERVER_EXT, Pki
    pki = Pki(d)
    pki.ca()
    pki.cert("server", "/C=GB/O=secretbus test/CN=127.0.0.1", SERVER_EXT)
    good = pki.client_dir("good", "client1")
    revoked = pki.client_dir("revoked", "client2")
    crl = pki.revoke("revoked")
    libvirt, ca = d / "etc-pki-libvirt", d / "etc-pki-CA"
    (libvirt / "private").mkdir(parents=True, mode=0o700)
    ca.mkdir()
    shutil.copy(d / "server.pem", libvirt / "servercert.pem")
    shutil.copy(d / "server.key", libvirt / "private/serverkey.pem")
    shutil.copy(d / "ca.pem", ca / "cacert.pem")
    shutil.copy(crl, ca / "cacrl.pem")
    return {"libvirt": libvirt, "CA": ca, "good": good, "revoked": revoked}


class Unit:
    """secretbusd --system as secretbusd.service runs it (ExecStart=, credential, notify,
    systemd's environment), in the unit's emulated sandbox, on a store under `root`, with
    /etc/secretbus (and more, `maps`) stood in for by test directories."""

    def __init__(self, installed: Installed, root: Path, tmp_path: Path, notify: harness.NotifySocket):
        self.installed, self.root, self.tmp, self.notify = installed, root, tmp_path, notify
        for sub in ("etc/secrets", "run/secrets"):
            (root / sub).mkdir(parents=True, mode=0o700)
        self.rundir = root / "run/libvirt"
        self.rundir.mkdir(mode=0o755)
        self.etc = tmp_path / "etc-secretbus"          # /etc/secretbus in the sandbox
        self.etc.mkdir(mode=0o700)
        _key, creds_env = seal_key(installed, root, sandboxed=False)
        self.creds = load_credentials(installed.unit(SYSTEM_UNIT), root, creds_env)
        system = InstancePaths.system()
        self.maps: dict[str, Path] = {str(system.config_dir): root / "etc/secrets",
                                      str(system.state_dir): root / "run/secrets", str(SYSTEM_DIR): self.rundir,
                                      "/etc/secretbus": self.etc}
        self.log = tmp_path / "secretbusd.log"
        # Under systemd journald takes the audit records of value reads (without: refused, fail closed).
        self.journal = JournalSocket(tmp_path / "journal.socket").start()

    def write_conf(self, text: str) -> None:
        conf = self.etc / "secretbusd.conf"
        conf.write_text(text)
        conf.chmod(0o600)

    def env(self, **extra: str) -> dict[str, str]:
        return systemd_env(CREDENTIALS_DIRECTORY=str(self.creds), RUNTIME_DIRECTORY="/run/libvirt/secrets",
                           CONFIGURATION_DIRECTORY="/etc/libvirt/secrets",
                           SECRETBUS_JOURNAL_SOCKET=str(self.journal.path), **extra)

    def close(self) -> None:
        self.journal.close()

    def args(self) -> list[str]:
        # The unit's own secretbusd.conf path, read through the /etc/secretbus bind.
        return ["--root", str(self.root), "--no-dbus", "--config", "/etc/secretbus/secretbusd.conf"]

    def start(self, *, dropin: bool, maps: dict[str, Path] | None = None, **env: str):
        return start_daemon(self.installed.unitdir / SYSTEM_UNIT, self.args(), self.env(**env), self.notify,
                            self.log, sandboxed=True, maps={**self.maps, **(maps or {})},
                            dropins=[DROPIN] if dropin else [])

    def run_to_exit(self, *, dropin: bool, maps: dict[str, Path] | None = None) -> subprocess.CompletedProcess:
        argv = daemon_argv(self.installed.unitdir / SYSTEM_UNIT, self.args(), sandboxed=True,
                           maps={**self.maps, **(maps or {})}, dropins=[DROPIN] if dropin else [])
        return subprocess.run(argv, env={**self.env(), **self.notify.env()}, capture_output=True, text=True,
                              timeout=60, umask=0o077)

    def ro_socket(self) -> Path:
        return self.rundir / socket_plan(True)[1].path.name


DN_BASE = "C=GB,ST=London,L=London,O=secretbus test"


def tls_conf(port: int) -> str:
    """listen_tls with libvirt's default PKI paths (key_file etc. unset: /etc/pki/...)."""
    return (f'listen_tls = 1\ntls_port = "{port}"\nlisten_addr = "127.0.0.1"\n'
            f'tls_allowed_dn_list = [ "{DN_BASE},CN=*" ]\nremote_access = [ "x509:{DN_BASE},CN=*=rw+values" ]\n')


def virsh(uri: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=60, env=env)


def sb(uri: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", uri, *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env)


needs_virsh = pytest.mark.skipif(shutil.which("virsh") is None or shutil.which("openssl") is None,
                                 reason="virsh (libvirt-clients) and openssl needed")


@root_only
@needs_virsh
def test_tls_listener_under_the_unit_with_the_dropin(installed, notify_socket, tmp_path, disk_tmp_path):
    keys = make_pki(harness.public_tempdir("sb-unit-pki-"))
    unit = Unit(installed, disk_tmp_path / "root", tmp_path, notify_socket)
    port = free_port()
    unit.write_conf(tls_conf(port))
    d = unit.start(dropin=True, maps={"/etc/pki/libvirt": keys["libvirt"], "/etc/pki/CA": keys["CA"]})
    try:
        log = d.log_text()
        assert f"serving libvirt RPC over TLS on 127.0.0.1 port {port}" in log, log
        assert "network namespace whose only interface is lo" not in log
        uri = f"secret+tls://127.0.0.1:{port}/system?pkipath={keys['good']}"
        uuid = str(uuidlib.uuid4())
        xml = tmp_path / "s.xml"
        xml.write_text(f"<secret ephemeral='no' private='no'><uuid>{uuid}</uuid>"
                       f"<usage type='ceph'><name>client.unit</name></usage></secret>")
        r = virsh(uri, "secret-define", str(xml))
        assert r.returncode == 0 and f"Secret {uuid} created" in r.stdout, r.stderr + d.log_text()
        value = base64.b64encode(b"unit-tls-" + os.urandom(8)).decode()
        r = virsh(uri, "secret-set-value", uuid, value)
        assert r.returncode == 0, r.stderr
        r = sb(uri, "secret-get-value", uuid)                   # secretbus's own client, same listener
        assert (r.returncode, r.stdout.strip()) == (0, value), r.stderr
        assert (unit.root / "etc/secrets" / f"{uuid}.xml").exists()
        # The CRL at the default /etc/pki/CA/cacrl.pem (bound by the drop-in) is in force.
        r = virsh(f"secret+tls://127.0.0.1:{port}/system?pkipath={keys['revoked']}", "secret-list")
        assert r.returncode != 0 and uuid not in r.stdout
        audit = [e for e in unit.journal.snapshot() if "AUDIT_OUTCOME" in e]
        assert [(e["SECRET_UUID"], e["AUDIT_OUTCOME"]) for e in audit] == [([uuid.encode()], [b"allowed"])]
        assert b"x509 DN" in audit[0]["CALLER_IDENTITY"][0]
        assert value not in d.log_text() and "Traceback" not in d.log_text()
    finally:
        harness.stop_process(d.proc)
        unit.close()


@root_only
@needs_virsh
def test_without_the_dropin_listen_tls_is_refused_clearly(installed, notify_socket, tmp_path, disk_tmp_path):
    """The unit alone: socket(AF_INET) is refused, so asyncio's server would get no socket at
    all; the daemon says why and which drop-in opens it, and exits 78 (EX_CONFIG), which the
    unit's RestartPreventExitStatus= keeps from restarting in a loop."""
    unit = Unit(installed, disk_tmp_path / "root", tmp_path, notify_socket)
    port = free_port()
    unit.write_conf(tls_conf(port))
    svc = installed.unit(SYSTEM_UNIT)
    assert svc["RestartPreventExitStatus"] == [str(EXIT_CONFIG)] and svc["Restart"] == ["on-failure"]
    t0 = time.monotonic()
    try:
        r = unit.run_to_exit(dropin=False)
    finally:
        unit.close()
    print(r.stderr[-1500:])
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert time.monotonic() - t0 < 30
    assert f"cannot serve listen_tls = 1 (TLS port {port}): this process may not create IP sockets" in r.stderr
    assert "sandbox has no network" in r.stderr and DROPIN_DEST in r.stderr and DROPIN.name in r.stderr
    assert "Traceback" not in r.stderr
    status = [m for m in notify_socket.messages() if b"STATUS=failed" in m]
    assert status and DROPIN_DEST.encode() in status[-1]
    assert not any(b"READY=1" in m for m in notify_socket.messages())
    with socket.socket() as s:                                   # nothing listens
        assert s.connect_ex(("127.0.0.1", port)) != 0


@root_only
def test_unit_alone_reads_etc_secretbus_for_scram_on_the_unix_socket(installed, notify_socket, tmp_path,
                                                                    disk_tmp_path):
    """No drop-in needed for the local sockets' SASL: secretbusd.conf (auth_unix_ro = "sasl")
    and the verifier store beside it, written by `secretbus sasl-passwd` outside the unit, are
    read through the unit's read-only /etc/secretbus."""
    unit = Unit(installed, disk_tmp_path / "root", tmp_path, notify_socket)
    unit.write_conf('auth_unix_ro = "sasl"\nsasl_allowed_username_list = [ "fred" ]\n')
    r = subprocess.run([sys.executable, "-m", "secretbus.cli", "sasl-passwd", "fred", "--file",
                        str(unit.etc / "sasl-verifiers.json")], input="fr3d-pass\n", capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    d = unit.start(dropin=False)
    try:
        uri = f"secret:///system?socket={unit.ro_socket()}"
        good, bad = tmp_path / "good.conf", tmp_path / "bad.conf"
        for f, pw in ((good, "fr3d-pass"), (bad, "wrong-pass")):
            f.write_text(f"[credentials-t]\nauthname=fred\npassword={pw}\n\n[auth-libvirt-localhost]\ncredentials=t\n")
            f.chmod(0o600)
        r = sb(f"{uri}&authfile={good}", "secret-list")
        assert r.returncode == 0, r.stderr + d.log_text()
        assert "SASL user 'fred'" in d.log_text()
        r = sb(f"{uri}&authfile={bad}", "secret-list")
        assert r.returncode == 1 and "authentication failed" in r.stderr
        assert "fr3d-pass" not in d.log_text() and "wrong-pass" not in d.log_text()
    finally:
        harness.stop_process(d.proc)
        unit.close()


needs_kerberos = pytest.mark.skipif(
    shutil.which("virsh") is None or not os.path.exists("/usr/sbin/krb5kdc")
    or not os.path.exists("/usr/lib/x86_64-linux-gnu/sasl2/libgssapiv2.so"),
    reason="virsh, krb5-kdc and libsasl2-modules-gssapi-mit needed (scripts/setup.sh)")


@root_only
@needs_kerberos
def test_kerberos_tcp_listener_under_the_unit_with_the_dropin(installed, notify_socket, tmp_path, disk_tmp_path):
    """listen_tcp = 1 with the drop-in: the realm's krb5.conf read at /etc/krb5.conf (the
    drop-in's bind; no KRB5_CONFIG for the daemon), the service keytab at
    /etc/secretbus/libvirt.keytab (the unit's bind), a ticket-holding virsh and secretbus -c."""
    pytest.importorskip("gssapi")
    from harness.kdc import Kdc
    realm = "SECRETBUS.TEST"
    kdc = Kdc(realm, hosts=("localhost", "127.0.0.1")).start()
    unit = None
    d = None
    try:
        kdc.add_user("fred")
        unit = Unit(installed, disk_tmp_path / "root", tmp_path, notify_socket)
        shutil.copy(kdc.keytab, unit.etc / "libvirt.keytab")
        (unit.etc / "libvirt.keytab").chmod(0o600)
        port = free_port()
        unit.write_conf(f'listen_tcp = 1\ntcp_port = "{port}"\nlisten_addr = "127.0.0.1"\n'
                        f'sasl_keytab = "/etc/secretbus/libvirt.keytab"\n'
                        f'sasl_allowed_username_list = [ "fred@{realm}" ]\n'
                        f'remote_access = [ "sasl:fred@{realm}=rw+values" ]\n')
        # MIT's replay cache goes to /var/tmp: writable only through the unit's PrivateTmp=yes
        # (ProtectSystem=strict), which the emulator reproduces for /var/tmp.
        d = unit.start(dropin=True, maps={"/etc/krb5.conf": kdc.krb5_conf})
        assert f"serving libvirt RPC over TCP (SASL GSSAPI) on 127.0.0.1 port {port}" in d.log_text()
        env = kdc.kinit("fred")
        uri = f"secret+tcp://localhost:{port}/system"
        uuid = str(uuidlib.uuid4())
        xml = tmp_path / "k.xml"
        xml.write_text(f"<secret ephemeral='no' private='no'><uuid>{uuid}</uuid>"
                       f"<usage type='ceph'><name>client.krb</name></usage></secret>")
        r = virsh(uri, "secret-define", str(xml), env=env)
        assert r.returncode == 0 and f"Secret {uuid} created" in r.stdout, r.stderr + d.log_text()
        r = sb(uri, "secret-list", env=env)
        assert r.returncode == 0 and uuid in r.stdout, r.stderr + d.log_text()
        assert f"SASL user 'fred@{realm}'" in d.log_text() or f"fred@{realm}" in d.log_text()
        assert "Traceback" not in d.log_text()
    finally:
        if d is not None:
            harness.stop_process(d.proc)
        if unit is not None:
            unit.close()
        kdc.cleanup()


@root_only
@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")
def test_fleet_under_the_unit_with_the_dropin(installed, notify_socket, tmp_path, disk_tmp_path):
    """Fleet mode in secretbusd --system under the unit + drop-in: https to a real etcd with the
    CA, client certificate and key at /etc/pki/secretbus (the drop-in's bind), the fleet state
    directory writable (its ReadWritePaths=); a secret defined on another (embedded) host is
    served over the daemon's RPC socket, and one defined there reaches the other host."""
    from test_fleet import make_host, uid, wait_for, xml

    from secretbus.core.model import EventId, Lifecycle
    from secretbus.fleet.keyfile import fleet_dir, init_fleet_key
    from tests.harness.etcd import EtcdCluster
    from tests.harness.etcd import Pki as EtcdPki
    pki = EtcdPki.create(tmp_path / "etcd-pki")
    cluster = EtcdCluster.create(tmp_path / "etcd", 1, pki=pki)
    a = d = unit = None
    try:
        cluster.start()
        etc_pki = tmp_path / "etc-pki-secretbus"                 # /etc/pki/secretbus in the sandbox
        etc_pki.mkdir(mode=0o700)
        for src, name in ((pki.ca, "etcd-ca.pem"), (pki.client_cert, "etcd-client.pem"),
                          (pki.client_key, "etcd-client-key.pem")):
            shutil.copy(src, etc_pki / name)
        tls = (f'fleet_ca_file = "{pki.ca}"\nfleet_cert_file = "{pki.client_cert}"\n'
               f'fleet_key_file = "{pki.client_key}"\n')
        a, key = make_host(tmp_path, "a", cluster.endpoints, None, tls)
        a.open()
        root = disk_tmp_path / "root"
        unit = Unit(installed, root, tmp_path, notify_socket)
        ends = ", ".join(f'"{e}"' for e in cluster.endpoints)
        state = fleet_dir(InstancePaths.embed(root))
        init_fleet_key(state, raw=True, key=key)
        # fleet mode's keys in /etc/secretbus/secretbusd.conf, which the unit binds read-only
        unit.write_conf(f'fleet_endpoints = [ {ends} ]\nfleet_cluster = "test"\n'
                        'fleet_ca_file = "/etc/pki/secretbus/etcd-ca.pem"\n'
                        'fleet_cert_file = "/etc/pki/secretbus/etcd-client.pem"\n'
                        'fleet_key_file = "/etc/pki/secretbus/etcd-client-key.pem"\n')
        d = unit.start(dropin=True, maps={"/etc/pki/secretbus": etc_pki, "/etc/libvirt/secretbus-fleet": state})
        sock = unit.rundir / socket_plan(True)[0].path.name
        uri = f"secret:///system?socket={sock}"
        u = uid(2100)
        a.d.define_xml(xml(u, "unit.2100"))
        a.d.set_value(u, b"fleet-under-unit")
        want = base64.b64encode(b"fleet-under-unit").decode()
        wait_for(lambda: sb(uri, "secret-get-value", u).stdout.strip() == want, "the value served by the unit")
        v = uid(2101)
        xml_file = tmp_path / "v.xml"
        xml_file.write_text(xml(v, "unit.2101"))
        r = sb(uri, "secret-define", str(xml_file))
        assert r.returncode == 0, r.stderr + d.log_text()
        wait_for(lambda: a.seen(v, EventId.LIFECYCLE, Lifecycle.DEFINED) > 0, "the unit's define on host a")
        log = d.log_text()
        assert "fleet-under-unit" not in log and "Traceback" not in log
    finally:
        if d is not None:
            harness.stop_process(d.proc)
        if unit is not None:
            unit.close()
        if a is not None:
            a.close()
        cluster.stop()


@root_only
def test_without_the_dropin_a_reload_that_turns_tls_on_keeps_serving(installed, notify_socket, tmp_path,
                                                                       disk_tmp_path):
    """SIGHUP with listen_tls = 1 under the unit alone: the reload fails with the same message
    and the running daemon keeps its state and its unix sockets."""
    import signal
    unit = Unit(installed, disk_tmp_path / "root", tmp_path, notify_socket)
    unit.write_conf("")
    d = unit.start(dropin=False)
    try:
        port = free_port()
        unit.write_conf(tls_conf(port))
        d.proc.send_signal(signal.SIGHUP)
        failed = "reload of the server configuration failed, keeping the previous one: cannot serve listen_tls = 1"
        harness.wait_until(lambda: failed in d.log_text(), timeout=20, what="the failed reload",
                           proc=d.proc, log=d.log)
        log = d.log_text()
        assert "sandbox has no network" in log and DROPIN_DEST in log and "Traceback" not in log
        assert d.proc.poll() is None
        r = sb(f"secret:///system?socket={unit.ro_socket()}", "secret-list")
        assert r.returncode == 0, r.stderr
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        harness.stop_process(d.proc)
        unit.close()


@root_only
@needs_virsh
def test_ip_sockets_without_the_hosts_network_warn(installed, notify_socket, tmp_path, disk_tmp_path):
    """A half-opened unit (an own drop-in that allows AF_INET but leaves PrivateNetwork=yes):
    the listener binds in the unit's namespace, where only lo exists, and says so."""
    keys = make_pki(harness.public_tempdir("sb-unit-pki-"))
    half = tmp_path / "half.conf"
    half.write_text("[Service]\nRestrictAddressFamilies=AF_INET AF_INET6\n"
                    "BindReadOnlyPaths=-/etc/pki/libvirt -/etc/pki/CA\n")
    unit = Unit(installed, disk_tmp_path / "root", tmp_path, notify_socket)
    port = free_port()
    unit.write_conf(tls_conf(port))
    d = start_daemon(installed.unitdir / SYSTEM_UNIT, unit.args(), unit.env(), notify_socket, unit.log,
                     sandboxed=True, maps={**unit.maps, "/etc/pki/libvirt": keys["libvirt"], "/etc/pki/CA": keys["CA"]},
                     dropins=[half])
    try:
        log = d.log_text()
        assert f"serving libvirt RPC over TLS on 127.0.0.1 port {port}" in log, log
        assert "network namespace whose only interface is lo: clients on other hosts cannot reach it" in log
        assert DROPIN_DEST in log
        with socket.socket() as s:                       # the host's 127.0.0.1 is another one
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        harness.stop_process(d.proc)
        unit.close()

"""secret+tcp:// for real: secretbusd's TCP listener with SASL GSSAPI on a free loopback port, a
private MIT KDC (tests/harness/kdc.py) with its own realm, keytab and principals, `kinit` into
private credential caches, and Debian 12's unmodified virsh 9.0 and python3-libvirt 9.0 (Cyrus
SASL's GSSAPI plugin) as clients, plus secretbus's own client. Refusals show libvirt's client
message and serve nothing; the bytes on the wire after authentication are SASL-encoded."""
from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import harness
import pytest
from fixtures import U1, U2, secret_xml
from harness import reference
from harness.events import EventWatch
from harness.kdc import CLOCKSKEW, Kdc
from test_remote_tls import DEBIAN_PYTHON, PY_CLIENT, define_file, free_port, ok

SENTINEL = b"tcp-S3ntinel\x00\x01\xff"
B64 = base64.b64encode(SENTINEL).decode()
REPO = Path(__file__).resolve().parents[1]
REALM = "SECRETBUS.TEST"
FRED = f"fred@{REALM}"

pytestmark = pytest.mark.skipif(
    shutil.which("virsh") is None or not os.path.exists("/usr/sbin/krb5kdc")
    or not os.path.exists("/usr/lib/x86_64-linux-gnu/sasl2/libgssapiv2.so"),
    reason="virsh, krb5-kdc and libsasl2-modules-gssapi-mit needed (scripts/setup.sh)")
gssapi = pytest.importorskip("gssapi")


HOSTNAME = socket.gethostname()


@pytest.fixture(scope="module")
def kdc():
    # libvirt/<this host's name> too: libvirtd's own acceptor asks for that one (its serverFQDN)
    k = Kdc(REALM, hosts=("localhost", "127.0.0.1", HOSTNAME)).start()
    for user in ("fred", "roger", "bob", "nogrant", "short", "noticket"):
        k.add_user(user)
    yield k
    k.cleanup()


def conf_text(kdc: Kdc, port: int, *, listen: int = 1, extra: str = "") -> str:
    return (extra + f'listen_tcp = {listen}\ntcp_port = "{port}"\nlisten_addr = "127.0.0.1"\n'
            f'sasl_keytab = "{kdc.keytab}"\n'
            f'sasl_allowed_username_list = [ "fred@{REALM}", "ro*@{REALM}", "nogrant@*", "short@*" ]\n'
            f'remote_access = [ "sasl:fred@{REALM}=rw+values", "sasl:ro*=ro", "sasl:short@*=rw" ]\n')


@dataclass
class Tcp:
    kdc: Kdc
    port: int
    conf: Path
    daemon: harness.Secretbusd

    def uri(self, host: str = "localhost") -> str:
        return f"secret+tcp://{host}:{self.port}/system"

    def env(self, user: str = "fred", **kinit) -> dict[str, str]:
        """A ticket for `user` in its own credential cache ("noticket": an empty cache). libvirt's
        SASL client needs no configuration of its own: it takes the server's mechanism list, less
        what cannot give SSF 56 on plain TCP (or the one `auth=sasl.MECH` names)."""
        if user == "noticket":
            return self.kdc.env(KRB5CCNAME=f"FILE:{self.kdc.dir}/cc-empty")
        return self.kdc.kinit(user, **kinit)


def start_tcp(bus, make_secretbusd, kdc: Kdc, tmp_path: Path, **kw) -> Tcp:
    port = free_port()
    conf = tmp_path / "secretbusd.conf"
    conf.write_text(conf_text(kdc, port, **kw))
    conf.chmod(0o600)
    # The daemon's Kerberos library: our realm's krb5.conf, its replay cache in the KDC's directory.
    env = kdc.env(KRB5RCACHEDIR=str(kdc.dir))
    d = make_secretbusd(bus, system=True, wait=False, env=env,
                        args=("--no-dbus", "--rpc-dir", str(tmp_path / "rpc"), "--config", str(conf)))
    harness.wait_until(lambda: "over libvirt RPC only" in d.log(), timeout=20, what="secretbusd's TCP listener",
                       proc=d.proc, log=d.log_path)
    assert f"serving libvirt RPC over TCP (SASL GSSAPI) on 127.0.0.1 port {port}" in d.log()
    return Tcp(kdc, port, conf, d)


@pytest.fixture
def tcp(session_bus, make_secretbusd, kdc, tmp_path):
    return start_tcp(session_bus, make_secretbusd, kdc, tmp_path)


def virsh(uri: str, *args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=timeout, env=env)


def sb(uri: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", uri, *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=env)


# -- virsh and python3-libvirt over TCP with Kerberos ---------------------------------------------
def test_virsh_over_tcp_with_kerberos(tcp, tmp_path):
    u, env = tcp.uri(), tcp.env()
    assert f"Secret {U1} created" in ok(virsh(u, "secret-define", define_file(tmp_path), env=env))
    assert U1 in ok(virsh(u, "secret-list", env=env))
    assert "Secret value set" in ok(virsh(u, "secret-set-value", U1, "--base64", B64, env=env))
    assert ok(virsh(u, "secret-get-value", U1, env=env)).strip() == B64
    assert f"<uuid>{U1}</uuid>" in ok(virsh(u, "secret-dumpxml", U1, env=env))
    # a private value is never sent over a remote transport, whatever the grant
    ok(virsh(u, "secret-define", define_file(tmp_path, U2, priv="yes", uid="other"), env=env))
    ok(virsh(u, "secret-set-value", U2, "--base64", B64, env=env))
    r = virsh(u, "secret-get-value", U2, env=env)
    assert r.returncode == 1 and "Invalid secret: secret is private" in r.stderr
    assert B64 not in r.stdout + r.stderr
    # 127.0.0.1 works as well: the client asks for libvirt/127.0.0.1, which the keytab holds
    assert U1 in ok(virsh(tcp.uri("127.0.0.1"), "secret-list", env=env))
    assert f"Secret {U1} deleted" in ok(virsh(u, "secret-undefine", U1, env=env))
    assert U1 not in ok(virsh(u, "secret-list", env=env))
    log = tcp.daemon.log()
    assert f"SASL user '{FRED}'" in log and B64 not in log
    # every remote value read is audited with the principal
    entries = [{k: v[0].decode(errors="replace") for k, v in e.items()} for e in list(tcp.daemon.journal.entries)]
    records = [r for r in entries if r.get("SECRET_UUID") in (U1, U2) and "secret value read" in r.get("MESSAGE", "")]
    assert any(r.get("CALLER_IDENTITY", "").startswith(f"SASL user '{FRED}'") and "allowed" in r["MESSAGE"]
               and r["SECRET_UUID"] == U1 for r in records), records
    assert any("denied (private)" in r["MESSAGE"] and r["SECRET_UUID"] == U2 for r in records), records


def test_virsh_secret_event_over_tcp(tcp, tmp_path):
    env = tcp.env()
    ev = EventWatch(["virsh", "-c", tcp.uri(), "secret-event", "--event", "lifecycle", "--loop", "--timeout", "20"],
                    env=env)
    try:
        time.sleep(1.5)
        ok(virsh(tcp.uri(), "secret-define", define_file(tmp_path), env=env))
        ok(virsh(tcp.uri(), "secret-undefine", U1, env=env))
        out, err = ev.until(f"secret {U1}: Undefined")
    finally:
        ev.kill()
    assert f"'lifecycle' for secret {U1}: Defined" in out, (out, err)
    assert f"'lifecycle' for secret {U1}: Undefined" in out, (out, err)


def test_python_libvirt_over_tcp(tcp):
    if not Path(DEBIAN_PYTHON).exists():
        pytest.skip("Debian's python3 not there")
    r = subprocess.run([DEBIAN_PYTHON, "-c", PY_CLIENT, tcp.uri(), U1, secret_xml(U1)], capture_output=True,
                       text=True, timeout=60, env=tcp.env())
    if "No module named 'libvirt'" in r.stderr:
        pytest.skip("python3-libvirt not installed")
    out = ok(r)
    assert "value python-value" in out and f"list ['{U1}']" in out
    assert f"event ['{U1}']" in out and "after 0" in out
    # a private value: stored, never sent
    r = subprocess.run([DEBIAN_PYTHON, "-c", PY_PRIVATE, tcp.uri(), secret_xml(U2, priv="yes", uid="other")],
                       capture_output=True, text=True, timeout=60, env=tcp.env())
    assert "refused secret is private" in ok(r) and "py-private" not in r.stdout


PY_PRIVATE = r'''
import sys, libvirt
c = libvirt.open(sys.argv[1])
s = c.secretDefineXML(sys.argv[2])
s.setValue(b"py-private")
try:
    print("got", s.value())
except libvirt.libvirtError as e:
    print("refused", e.get_error_message().split(": ")[-1])
s.undefine()
'''


def test_a_read_only_principal_lists_but_does_not_change_or_read(tcp, tmp_path):
    env = tcp.env()
    ok(virsh(tcp.uri(), "secret-define", define_file(tmp_path), env=env))
    ok(virsh(tcp.uri(), "secret-set-value", U1, "--base64", B64, env=env))
    ro = tcp.env("roger")
    assert U1 in ok(virsh(tcp.uri(), "secret-list", env=ro))
    for cmd in (("secret-get-value", U1), ("secret-undefine", U1), ("secret-set-value", U1, "--base64", "QUJD")):
        r = virsh(tcp.uri(), *cmd, env=ro)
        assert r.returncode == 1 and "access denied: 'secret' denied access" in r.stderr, (cmd, r.stderr)
        assert B64 not in r.stdout
    assert ok(virsh(tcp.uri(), "secret-get-value", U1, env=env)).strip() == B64


# -- the security layer on the wire ----------------------------------------------------------------
class Recorder:
    """A loopback relay that keeps every byte each way (the test's eavesdropper)."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = bytearray()        # client → server
        self.down = bytearray()      # server → client
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            s = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(c, s, self.up), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, self.down), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket, log: bytearray) -> None:
        try:
            while data := a.recv(65536):
                log += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def split_frames(data: bytes, count: int) -> tuple[list[bytes], bytes]:
    """The first `count` RPC frames (length-prefixed, clear) and the rest."""
    frames = []
    for _ in range(count):
        n = int.from_bytes(data[:4], "big")
        frames.append(data[:n])
        data = data[n:]
    return frames, data


def packets(data: bytes) -> list[bytes]:
    """SASL packets: 4-byte length + wrap token each, exactly covering `data`."""
    out = []
    while data:
        n = int.from_bytes(data[:4], "big")
        assert 0 < n <= 65536 and len(data) >= 4 + n, (n, len(data))
        out.append(data[4:4 + n])
        data = data[4 + n:]
    return out


def test_every_frame_after_authentication_is_sasl_encoded(tcp, tmp_path):
    """virsh's set-value and get-value through an eavesdropper: the SASL exchange (AUTH_LIST,
    SASL_INIT, START with the AP-REQ, an empty STEP after the AP-REP, the STEP with the layer
    choice) goes in the clear, then only wrap tokens, each within the
    maximum buffers, and neither the value nor the UUID is readable."""
    env = tcp.env()
    ok(virsh(tcp.uri(), "secret-define", define_file(tmp_path), env=env))
    rec = Recorder(tcp.port)
    try:
        ok(virsh(f"secret+tcp://localhost:{rec.port}/system", "secret-set-value", U1, "--base64", B64, env=env))
        assert ok(virsh(f"secret+tcp://localhost:{rec.port}/system", "secret-get-value", U1, env=env)).strip() == B64
    finally:
        rec.close()
    for stream in (bytes(rec.up), bytes(rec.down)):
        assert SENTINEL not in stream and B64.encode() not in stream and U1.encode() not in stream
    # each connection's first 5 frames each way are the clear SASL exchange (AUTH_LIST … the last
    # STEP); the relay saw two connections one after the other, so the first one is checked here
    clear_up, rest_up = split_frames(bytes(rec.up), 5)
    procs = [int.from_bytes(f[12:16], "big") for f in clear_up]
    assert procs == [66, 67, 68, 69, 69], procs     # AUTH_LIST, SASL_INIT, SASL_START, 2 × SASL_STEP
    assert len(packets(rest_up[:_first_connection_end(rest_up)])) >= 3
    clear_down, rest_down = split_frames(bytes(rec.down), 5)
    assert [int.from_bytes(f[12:16], "big") for f in clear_down] == procs
    # what follows parses as SASL packets up to the end of the first connection's stream, with
    # no clear RPC header (REMOTE_PROGRAM) in it
    first = rest_down[:_first_connection_end(rest_down)]
    assert len(packets(first)) >= 3 and b"\x20\x00\x80\x86" not in first


def _first_connection_end(data: bytes) -> int:
    """Where the packets of the first connection stop (the second one starts with a clear frame)."""
    i = 0
    while i + 4 <= len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        if data[i + 4:i + 8] == b"\x20\x00\x80\x86":
            return i                   # a clear RPC header: the next connection's AUTH_LIST reply
        i += 4 + n
    return len(data)


# -- refusals: libvirt's client message, nothing served --------------------------------------------
def refused(tcp: Tcp, env: dict[str, str], tmp_path: Path) -> str:
    r = virsh(tcp.uri(), "secret-define", define_file(tmp_path, U2, uid="other"), env=env)
    assert r.returncode == 1, r.stdout
    assert U2 not in ok(virsh(tcp.uri(), "secret-list", env=tcp.env()))          # nothing was served
    return r.stderr


def test_scram_on_plain_tcp_is_refused(tcp, tmp_path):
    """libvirt's client asked for SCRAM (auth=sasl.scram-sha-256): the server offers GSSAPI only."""
    auth = tmp_path / "auth.conf"
    auth.write_text("[credentials-t]\nauthname=fred\npassword=whatever\n\n[auth-libvirt-default]\ncredentials=t\n")
    env = tcp.env()
    env["LIBVIRT_AUTH_FILE"] = str(auth)
    r = virsh(tcp.uri() + "?auth=sasl.scram-sha-256", "secret-define", define_file(tmp_path, U2, uid="other"),
              env=env)
    assert r.returncode == 1, r.stdout
    assert U2 not in ok(virsh(tcp.uri(), "secret-list", env=tcp.env()))          # nothing was served
    assert "SASL mechanism scram-sha-256 not supported by server" in r.stderr, r.stderr


def test_scram_start_on_plain_tcp_is_refused_by_the_server(tcp):
    """A client that insists (AUTH_SASL_START with SCRAM-SHA-256) gets AUTH_FAILED and nothing else."""
    import asyncio

    from secretbus.core import errors
    from secretbus.rpc import protocol as P
    from secretbus.rpc.sasl_client import _Wire

    async def run() -> list:
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp.port)
        wire = _Wire(reader, writer)
        seen = [(await wire.call(P.Proc.AUTH_LIST))["types"], (await wire.call(P.Proc.AUTH_SASL_INIT))["mechlist"]]
        try:
            await wire.call(P.Proc.AUTH_SASL_START, {"mech": "SCRAM-SHA-256", "nil": 0, "data": b"n,,n=fred,r=abc"})
        except errors.SecretError as e:
            seen.append(errors.display(e))
        try:
            await wire.call(P.Proc.CONNECT_LIST_ALL_SECRETS, {"need_results": 1, "flags": 0})
        except errors.SecretError as e:
            seen.append(errors.display(e))
        writer.close()
        return seen
    types, mechs, start, listing = asyncio.run(run())
    assert types == [P.AuthType.SASL] and mechs == "GSSAPI"
    assert "authentication failed" in start and "only GSSAPI is offered on plain TCP" in start, start
    assert "authentication required" in listing, listing


def test_expired_ticket_is_refused(tcp, tmp_path):
    env = tcp.env("short", lifetime="2s")
    time.sleep(2 + CLOCKSKEW + 1.5)
    err = refused(tcp, env, tmp_path)
    assert "authentication failed" in err and "Ticket expired" in err, err


def test_no_ticket_is_refused(tcp, tmp_path):
    err = refused(tcp, tcp.env("noticket"), tmp_path)
    assert "authentication failed" in err and "No Kerberos credentials available" in err, err


@pytest.mark.parametrize("user,log_words", [
    ("bob", f"SASL user 'bob@{REALM}' is not in sasl_allowed_username_list"),
    ("nogrant", "no remote_access grant matches SASL user 'nogrant@"),
])
def test_a_principal_outside_the_lists_is_refused(tcp, tmp_path, user, log_words):
    err = refused(tcp, tcp.env(user), tmp_path)
    assert "authentication failed" in err, err
    harness.wait_until(lambda: log_words in tcp.daemon.log(), timeout=10, what=log_words, proc=tcp.daemon.proc,
                       log=tcp.daemon.log_path)


def test_stalled_authentications_do_not_block_others(tcp, tmp_path):
    """32 connections from one address that never finish a frame: a 33rd from there is closed at
    once, and a Kerberos client from another address is served without waiting."""
    stalled = [socket.create_connection(("127.0.0.1", tcp.port), timeout=10, source_address=("127.0.0.2", 0))
               for _ in range(32)]
    try:
        for s in stalled:
            s.sendall(b"\x00\x00\x00\x1c\x20\x00")      # half an AUTH_LIST frame
        time.sleep(0.5)
        extra = socket.create_connection(("127.0.0.1", tcp.port), timeout=10, source_address=("127.0.0.2", 0))
        extra.settimeout(3)
        try:
            assert extra.recv(1) == b""
        except ConnectionResetError:
            pass
        extra.close()
        t0 = time.monotonic()
        assert f"Secret {U1} created" in ok(virsh(tcp.uri(), "secret-define", define_file(tmp_path), env=tcp.env()))
        assert time.monotonic() - t0 < 5
        assert "too many unauthenticated connections" in tcp.daemon.log()
    finally:
        for s in stalled:
            s.close()


# -- reload ----------------------------------------------------------------------------------------
def test_sighup_stops_and_moves_the_tcp_listener(tcp):
    env = tcp.env()
    tcp.conf.write_text(conf_text(tcp.kdc, tcp.port, listen=0))
    tcp.daemon.signal(signal.SIGHUP)
    harness.wait_until(lambda: "TCP listener stopped" in tcp.daemon.log(), timeout=10, what="TCP listener stopped",
                       proc=tcp.daemon.proc, log=tcp.daemon.log_path)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", tcp.port), timeout=2).close()
    new = free_port()
    tcp.conf.write_text(conf_text(tcp.kdc, new))
    tcp.daemon.signal(signal.SIGHUP)
    harness.wait_until(lambda: f"port {new}" in tcp.daemon.log(), timeout=10, what="the new TCP listener",
                       proc=tcp.daemon.proc, log=tcp.daemon.log_path)
    assert "Usage" in ok(virsh(f"secret+tcp://localhost:{new}/system", "secret-list", env=env))


def test_sighup_applies_tcp_min_ssf_to_new_connections(tcp):
    env = tcp.env()
    assert "Usage" in ok(virsh(tcp.uri(), "secret-list", env=env))
    tcp.conf.write_text(conf_text(tcp.kdc, tcp.port, extra="tcp_min_ssf = 1000\n"))
    tcp.daemon.signal(signal.SIGHUP)
    harness.wait_until(lambda: f"TCP listener on port {tcp.port}" in tcp.daemon.log(), timeout=10,
                       what="the reload", proc=tcp.daemon.proc, log=tcp.daemon.log_path)
    r = virsh(tcp.uri(), "secret-list", env=env)
    assert r.returncode == 1 and "authentication failed" in r.stderr, r.stderr
    harness.wait_until(lambda: "negotiated SSF 256 was not strong enough (tcp_min_ssf is 1000)" in tcp.daemon.log(),
                       timeout=10, what="the SSF refusal", proc=tcp.daemon.proc, log=tcp.daemon.log_path)


# -- secretbus's own client ------------------------------------------------------------------------
def test_secretbus_cli_over_tcp(tcp, tmp_path):
    u, env = tcp.uri(), tcp.env()
    assert f"Secret {U1} created" in ok(sb(u, "secret-define", define_file(tmp_path), env=env))
    assert U1 in ok(sb(u, "secret-list", env=env))
    assert f"<uuid>{U1}</uuid>" in ok(sb(u, "secret-dumpxml", U1, env=env))
    ok(sb(u, "secret-set-value", U1, B64, env=env))
    assert ok(sb(u, "secret-get-value", U1, env=env)).strip() == B64
    assert ok(virsh(u, "secret-get-value", U1, env=env)).strip() == B64           # one server, two clients
    ev = subprocess.Popen([sys.executable, "-m", "secretbus.cli", "-c", u, "secret-event", "--event", "lifecycle",
                           "--timeout", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                          env=env)
    try:
        time.sleep(2)
        ok(sb(u, "secret-define", define_file(tmp_path, U2, priv="yes", uid="other"), env=env))
        out, err = ev.communicate(timeout=20)
    finally:
        ev.kill()
    assert f"'lifecycle' for secret {U2}: Defined" in out, (out, err)
    r = sb(u, "secret-get-value", U2, env=env)
    assert r.returncode == 1 and "Invalid secret: secret is private" in r.stderr
    # -r: a read-only connection (VIR_CONNECT_RO), enforced by the server
    r = subprocess.run([sys.executable, "-m", "secretbus.cli", "-r", "-c", u, "secret-get-value", U1],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert r.returncode == 1 and "read only access prevents virSecretGetValue" in r.stderr, r.stderr
    assert f"Secret {U1} deleted" in ok(sb(u, "secret-undefine", U1, env=env))
    assert U1 not in ok(sb(u, "secret-list", env=env))


def test_secretbus_open_over_tcp_with_events(tcp, monkeypatch):
    import secretbus
    from secretbus.core.model import EventId
    for k, v in tcp.env().items():
        if k.startswith("KRB5"):
            monkeypatch.setenv(k, v)
    seen: list[str] = []
    with secretbus.open(tcp.uri()) as conn:
        conn.subscribe(lambda s, ev: seen.append(s.uuid), EventId.LIFECYCLE)
        s = conn.define_xml(secret_xml(U1))
        s.set_value(SENTINEL)
        assert s.get_value() == SENTINEL
        big = os.urandom(60000)        # a value larger than one SASL packet's worth either way
        s.set_value(big)
        assert s.get_value() == big
        harness.wait_until(lambda: U1 in seen, timeout=10, what="the lifecycle event")
        s.undefine()


def test_secretbus_client_errors_name_the_step(tcp, monkeypatch):
    from secretbus.core import errors
    from secretbus.uri import open_connection
    dead = free_port()

    def fails(env: dict[str, str], uri: str) -> str:
        for k, v in env.items():
            if k.startswith("KRB5"):
                monkeypatch.setenv(k, v)
        with pytest.raises(errors.SecretError) as e:
            open_connection(uri, timeout=10).close()
        return errors.display(e.value)
    msg = fails(tcp.env(), f"secret+tcp://localhost:{dead}/system")
    assert f"unable to connect to server at 'localhost:{dead}'" in msg, msg
    msg = fails(tcp.env("noticket"), tcp.uri())
    assert "authentication failed: GSSAPI: No Kerberos credentials available" in msg, msg
    msg = fails(tcp.env("bob"), tcp.uri())
    assert "authentication failed" in msg and "SASL user is not allowed" in msg, msg
    # access step: a read-only principal
    for k, v in tcp.env("roger").items():
        if k.startswith("KRB5"):
            monkeypatch.setenv(k, v)
    with open_connection(tcp.uri(), timeout=10) as conn:
        with pytest.raises(errors.AccessDenied, match="'secret' denied access"):
            conn.define_xml(secret_xml(U1))


# -- configuration ---------------------------------------------------------------------------------
def test_tcp_configuration_keys():
    from secretbus.core import errors
    from secretbus.rpc.serverconf import parse_serverconf
    c = parse_serverconf('listen_tcp = 1\ntcp_port = "16600"\ntcp_min_ssf = 112\nsasl_keytab = "/etc/x.keytab"\n')
    assert (c.listen_tcp, c.tcp_port, c.tcp_min_ssf, c.sasl_keytab) == (True, 16600, 112, "/etc/x.keytab")
    assert parse_serverconf("").tcp_min_ssf == 56
    with pytest.raises(errors.ConfigError, match="<string>:1: .*'tcp_min_ssf' must be an integer from 56"):
        parse_serverconf("tcp_min_ssf = 40\n")
    with pytest.raises(errors.ConfigError, match="'auth_tcp' must be 'sasl'"):
        parse_serverconf('auth_tcp = "none"\n')


# -- the mechanism and the layer, in process (real Kerberos, no daemon) ---------------------------------
def _exchange_until_offer(kdc: Kdc, monkeypatch, user: str = "fred"):
    """A GSSAPI exchange driven by python-gssapi's initiator up to the server's layer offer."""
    from secretbus.rpc.sasl_gssapi import GssapiExchange
    for k, v in kdc.kinit(user).items():
        if k.startswith("KRB5"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("KRB5RCACHEDIR", str(kdc.dir))
    layers: list = []
    F = gssapi.RequirementFlag
    server = GssapiExchange(str(kdc.keytab), 56, layers.append)
    client = gssapi.SecurityContext(name=gssapi.Name("libvirt@localhost", gssapi.NameType.hostbased_service),
                                    usage="initiate", flags=F.mutual_authentication | F.out_of_sequence_detection
                                    | F.confidentiality | F.integrity)
    assert server.init() == {"mechlist": "GSSAPI"}
    ret = server.start("GSSAPI", client.step())
    client.step(bytes(ret["data"]))
    assert client.complete and not ret["complete"]
    offer = client.unwrap(bytes(server.step(b"")["data"])).message
    assert offer == b"\x04\x01\x00\x00"              # confidentiality only, 65536 bytes
    return server, client, layers


def _answer(client, layer: int, maxbuf: int = 65536, authzid: bytes = b"") -> bytes:
    return client.wrap(bytes([layer]) + maxbuf.to_bytes(3, "big") + authzid, False).message


def test_gssapi_exchange_and_layer_in_process(kdc, monkeypatch):
    from secretbus.rpc.sasl_layer import LayerError, SecurityLayer
    server, client, layers = _exchange_until_offer(kdc, monkeypatch)
    ret = server.step(_answer(client, 4, 4096, FRED.encode()))      # its own principal as authzid: fine
    assert ret["complete"] == 1 and server.user == FRED and server.layer is not None
    assert server.layer.ssf == 256 and server.layer.chunk < 4096      # AES-256; packets fit the client's buffer
    server.layer_on()
    assert layers == [server.layer]
    # server → client: packets of at most 4096 bytes; client → server: decoded across any split
    data = os.urandom(10000)
    wire = server.layer.encode(data)
    assert len(packets(wire)) == 3 and all(len(p) <= 4096 for p in packets(wire))
    assert b"".join(client.unwrap(p).message for p in packets(wire)) == data
    theirs = SecurityLayer(client, 60000, 65536, 56).encode(data)
    assert b"".join(server.layer.decode(theirs[i:i + 7]) for i in range(0, len(theirs), 7)) == data
    # a replayed packet, an unencrypted one, an oversized or empty length: the connection ends
    for bad in (theirs, (len(t := client.wrap(b"x", False).message)).to_bytes(4, "big") + t,
                (70000).to_bytes(4, "big"), b"\x00\x00\x00\x00"):
        with pytest.raises(LayerError):
            server.layer.decode(bad)
        server.layer._buf.clear()


@pytest.mark.parametrize("layer,maxbuf,authzid,words", [
    (1, 65536, b"", r"confidentiality \(4\) is required"),
    (2, 65536, b"", r"confidentiality \(4\) is required"),
    (4, 100, b"", "maximum buffer of 100 bytes is too small"),
    (4, 65536, b"root@SECRETBUS.TEST", "authorisation id other than the client's own principal"),
])
def test_gssapi_bad_answers_are_refused(kdc, monkeypatch, layer, maxbuf, authzid, words):
    from secretbus.rpc.failures import RemoteFailure
    server, client, layers = _exchange_until_offer(kdc, monkeypatch)
    with pytest.raises(RemoteFailure, match=words):
        server.step(_answer(client, layer, maxbuf, authzid))
    assert server.user is None and layers == []
    with pytest.raises(RemoteFailure, match="no SASL exchange in progress"):
        server.step(_answer(client, 4))                               # one attempt per connection


def test_gssapi_min_ssf_and_bounds(kdc, monkeypatch):
    from secretbus.rpc.failures import RemoteFailure
    from secretbus.rpc.sasl_gssapi import MAX_TOKEN, GssapiExchange
    server, client, _ = _exchange_until_offer(kdc, monkeypatch)
    server.min_ssf = 100_000
    with pytest.raises(RemoteFailure, match="negotiated SSF .* was not strong enough"):
        server.step(_answer(client, 4))
    with pytest.raises(RemoteFailure, match="SASL token of 65537 bytes"):
        GssapiExchange(str(kdc.keytab), 56, print).start("GSSAPI", b"x" * (MAX_TOKEN + 1))
    with pytest.raises(RemoteFailure, match="GSSAPI: "):
        GssapiExchange(str(kdc.keytab), 56, print).start("GSSAPI", b"not a token")
    with pytest.raises(RemoteFailure, match="no usable Kerberos service key"):
        GssapiExchange("/nonexistent.keytab", 56, print).start("GSSAPI", b"x")


def test_a_context_without_sequence_detection_is_refused(kdc, monkeypatch):
    from secretbus.rpc.failures import RemoteFailure
    from secretbus.rpc.sasl_gssapi import GssapiExchange
    for k, v in kdc.kinit("fred").items():
        if k.startswith("KRB5"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("KRB5RCACHEDIR", str(kdc.dir))
    F = gssapi.RequirementFlag
    client = gssapi.SecurityContext(name=gssapi.Name("libvirt@localhost", gssapi.NameType.hostbased_service),
                                    usage="initiate", flags=F.mutual_authentication | F.confidentiality | F.integrity)
    server = GssapiExchange(str(kdc.keytab), 56, print)
    with pytest.raises(RemoteFailure, match="no sequence detection"):
        server.start("GSSAPI", client.step())


def test_a_forged_packet_after_authentication_ends_the_connection(tcp, monkeypatch):
    """Authenticated with secretbus's client, then bytes that are no wrap token: the server closes."""
    import asyncio

    from secretbus.rpc.tcp_client import TcpTransport, tcp_target
    for k, v in tcp.env().items():
        if k.startswith("KRB5"):
            monkeypatch.setenv(k, v)

    async def run() -> bytes:
        target = tcp_target(tcp.uri())
        assert target is not None
        reader, writer = await TcpTransport(target).open()
        inner = writer.transport._inner           # below the layer: what an attacker on the path can do
        inner.write(b"\x00\x00\x00\x20" + os.urandom(32))
        try:
            return await asyncio.wait_for(reader.read(100), 10)
        finally:
            writer.close()
    assert asyncio.run(run()) == b""
    harness.wait_until(lambda: "closing a connection: GSS-API unwrap failed" in tcp.daemon.log(), timeout=10,
                       what="the server's log line", proc=tcp.daemon.proc, log=tcp.daemon.log_path)


def test_a_missing_keytab_is_a_warning_and_every_client_is_refused(session_bus, make_secretbusd, kdc, tmp_path):
    port = free_port()
    conf = tmp_path / "secretbusd.conf"
    conf.write_text(conf_text(kdc, port).replace(str(kdc.keytab), str(tmp_path / "none.keytab")))
    conf.chmod(0o600)
    d = make_secretbusd(session_bus, system=True, wait=False, env=kdc.env(KRB5RCACHEDIR=str(kdc.dir)),
                        args=("--no-dbus", "--rpc-dir", str(tmp_path / "rpc"), "--config", str(conf)))
    harness.wait_until(lambda: "over libvirt RPC only" in d.log(), timeout=20, what="secretbusd", proc=d.proc,
                       log=d.log_path)
    assert "cannot be used yet" in d.log()
    r = virsh(f"secret+tcp://localhost:{port}/system", "secret-list", env=kdc.kinit("fred"))
    assert r.returncode == 1 and "authentication failed" in r.stderr, r.stderr
    assert "authentication failed: the server has no usable Kerberos service key" in r.stderr, r.stderr
    assert f"cannot read the service keys in '{tmp_path / 'none.keytab'}'" in d.log()


def test_layered_transport_turns_encoding_on_after_the_next_write():
    """The server's final STEP reply goes in the clear, everything after it encoded (pure logic:
    a stand-in transport and wrap)."""
    import asyncio

    from secretbus.rpc.sasl_layer import LayeredTransport, SecurityLayer

    class Inner(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.out: list[bytes] = []

        def write(self, data) -> None:
            self.out.append(bytes(data))

    class Wrap:
        def wrap(self, message: bytes, encrypt: bool):
            return type("W", (), {"message": b"<" + message + b">", "encrypted": encrypt})()

        def unwrap(self, message: bytes):
            return type("U", (), {"message": message[1:-1], "encrypted": True})()
    inner = Inner()
    t = LayeredTransport(inner)
    t.write(b"before")
    t.arm(SecurityLayer(Wrap(), 3, 100, 56), after_next_write=True)
    t.write(b"reply")
    t.write(b"abcdefg")
    assert inner.out[:2] == [b"before", b"reply"]
    assert inner.out[2] == b"".join(len(p).to_bytes(4, "big") + p for p in (b"<abc>", b"<def>", b"<g>"))
    assert not t.can_write_eof()          # an EOF would bypass the layer


def test_kdc_harness_stops_by_pid():
    from harness.procs import leftover_processes, pid_alive
    k = Kdc("STOP.TEST").start()
    pid = k.proc.pid
    assert pid_alive(pid)
    k.cleanup()
    assert not pid_alive(pid) and pid not in leftover_processes() and not k.dir.exists()


# -- secretbus's client against libvirt's own libvirtd 9.0 -----------------------------------------
LIBVIRTD_CONF = """unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "1:stderr"
log_filters = "1:remote 1:rpc.netsaslcontext 3:rpc 3:util 3:object 3:event"
listen_tls = 0
listen_tcp = 1
tcp_port = "{port}"
listen_addr = "0.0.0.0"
auth_tcp = "sasl"
"""


def test_secretbus_client_against_libvirtd_over_tcp(kdc, tmp_path, monkeypatch):
    """The client's GSSAPI and layer against the reference server: Debian's libvirtd 9.0 with
    auth_tcp = "sasl" and Cyrus's GSSAPI plugin (its own mount namespace, secret driver only, as
    bench/bench_rpc.py runs it); it also shows what libvirtd makes of the principal."""
    bench_rpc = harness.load_bench("bench_rpc")
    if not bench_rpc.LIBVIRTD.exists() or not (bench_rpc.DRIVER_DIR / "libvirt_driver_secret.so").exists():
        pytest.skip("libvirtd (libvirt-daemon) not installed")
    if not socket.gethostbyname(HOSTNAME).startswith("127."):
        pytest.skip(f"{HOSTNAME} is not a loopback name: libvirtd's service principal would not be ours")
    port = free_port()
    lv = harness.public_tempdir("sb-lv-tcp-")
    procs = bench_rpc.Procs()
    try:
        (lv / "sasl").mkdir(mode=0o700)
        (lv / "empty").mkdir(mode=0o700)
        (lv / "sasl" / "libvirt.conf").write_text(f"mech_list: gssapi\nkeytab: {kdc.keytab}\n")
        env = kdc.env(SASL_CONF_PATH=str(lv / "sasl"), KRB5_KTNAME=str(kdc.keytab), KRB5RCACHEDIR=str(kdc.dir))
        server = bench_rpc.start_libvirtd(procs, lv, lv / "empty", 0, conf=LIBVIRTD_CONF.format(port=port).splitlines(),
                                          listen=True, env=env)
        log = lv / "libvirtd.log"
        harness.wait_until(lambda: reference.accepting(port), timeout=30, what="libvirtd's TCP listener",
                           proc=server.proc, log=log)
        for k, v in kdc.kinit("fred").items():
            if k.startswith("KRB5"):
                monkeypatch.setenv(k, v)
        from secretbus.uri import open_connection
        with open_connection(f"secret+tcp://{HOSTNAME}:{port}/system", timeout=15) as conn:
            s = conn.define_xml(secret_xml(U1))
            big = os.urandom(60000)             # more than one SASL packet each way
            s.set_value(big)
            assert conn.secret_get_value(U1) == big
            assert [x.uuid for x in conn.list_secrets()] == [U1]
            s.undefine()
        text = log.read_text(errors="replace")
        assert "negotiated an SSF of 256" in text
        # Cyrus drops the default realm (docs/libvirt-differences.md #16); secretbusd does not
        assert "SASL client username fred\n" in text
    finally:
        procs.stop_all()
        harness.procs.remove_tree(lv)



"""The project's own RPC client (secretbus.rpc.client / facade) against a real secretbusd RPC
socket: every secret-* CLI command over `secret:///…?socket=`, the open() API, events, errors,
read-only connections, the front-end choice of secretbus.uri; and, in-process, calls in flight
matched by serial, keepalive and a server that goes away."""
from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import socket
import subprocess
import threading
import time
import uuid as uuidlib
from pathlib import Path

import harness
import pytest
from fixtures import U1, U1_NEXT, U2, secret_xml
from harness.procs import remove_tree
from test_cli import entry_point
from test_rpc_server import FIXTURES, InProcess

import secretbus
from secretbus.bus.client import DBusConnection
from secretbus.core import errors
from secretbus.core.model import EventId, Lifecycle, ListFlags, UsageType
from secretbus.rpc import protocol as P
from secretbus.rpc import xdr
from secretbus.rpc.client import AsyncRpcClient, error_from_remote
from secretbus.rpc.connection import RpcLimits
from secretbus.rpc.facade import RpcConnection
from secretbus.rpc.frame import Header, decode_frame, encode_frame
from secretbus.rpc.transport import UnixTransport
from secretbus.uri import parse_uri

SENTINEL = b"rpcc-S3ntinel\x00\x01\xfe"


# -- daemons ---------------------------------------------------------------------------------
def rpc_only(bus, make_secretbusd, rpc_dir: Path, *, system: bool, env: dict | None = None):
    """secretbusd serving RPC only: nothing owns org.libvirt.secret, so a D-Bus client cannot
    be what answers."""
    d = make_secretbusd(bus, system=system, wait=False, env=env, args=("--no-dbus", "--rpc-dir", str(rpc_dir)))
    harness.wait_until(lambda: "over libvirt RPC only" in d.log(), timeout=20, what="secretbusd's RPC sockets",
                       proc=d.proc, log=d.log_path)
    return d


@pytest.fixture
def sessiond(session_bus, make_secretbusd, rpc_dir):
    return rpc_only(session_bus, make_secretbusd, rpc_dir, system=False)


@pytest.fixture
def systemd_(session_bus, make_secretbusd, rpc_dir):
    return rpc_only(session_bus, make_secretbusd, rpc_dir, system=True)


def uri(rpc_dir: Path, kind: str = "session", ro: bool = False) -> str:
    return f"secret:///{kind}?socket={rpc_dir}/virtsecretd-sock{'-ro' if ro else ''}"


def cli(u: str, *args: str, input: bytes | None = None, env: dict | None = None,
        top: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "SECRETBUS_DEFAULT_URI"}
    return subprocess.run(entry_point() + [*top, "-c", u, *args], input=input, capture_output=True, timeout=60,
                          env={**base, **(env or {})})


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout.decode()


def xml_file(tmp_path: Path, name: str = "s.xml", **kw) -> str:
    f = tmp_path / name
    f.write_text(secret_xml(**kw))
    return str(f)


# -- the CLI over RPC --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["system", "session"])
def test_cli_every_secret_command_over_rpc(kind, session_bus, make_secretbusd, rpc_dir, tmp_path):
    d = rpc_only(session_bus, make_secretbusd, rpc_dir, system=kind == "system")
    u = uri(rpc_dir, kind)
    assert ok(cli(u, "secret-define", xml_file(tmp_path))) == f"Secret {U1} created\n\n"
    assert ok(cli(u, "secret-define", xml_file(tmp_path, "p.xml", uuid=U2, priv="yes", usage="volume",
                                               uid="/var/lib/libvirt/images/p.img")))
    out = ok(cli(u, "secret-list"))
    assert U1 in out and "ceph client.admin" in out and "volume /var/lib/libvirt/images/p.img" in out
    assert U1 not in ok(cli(u, "secret-list", "--private")) and U2 in ok(cli(u, "secret-list", "--private"))
    assert "Secret value set" in ok(cli(u, "secret-set-value", U1, "--base64", base64.b64encode(SENTINEL).decode()))
    assert ok(cli(u, "secret-get-value", U1)) == base64.b64encode(SENTINEL).decode() + "\n"
    raw = tmp_path / "raw"
    raw.write_bytes(b"plain value")
    ok(cli(u, "secret-set-value", U1, "--file", str(raw), "--plain"))
    assert cli(u, "secret-get-value", U1, "--plain").stdout == b"plain value\n"
    assert f"<uuid>{U1}</uuid>" in ok(cli(u, "secret-dumpxml", U1))
    assert ok(cli(u, "secret-dumpxml", U1, "--xpath", "/secret/usage/name")) == "<name>client.admin</name>\n\n"
    # errors: the server's, with libvirt's texts, exit status 1
    r = cli(u, "secret-get-value", U2)
    assert r.returncode == 1 and b"Invalid secret: secret is private" in r.stderr, r.stderr
    r = cli(u, "secret-define", xml_file(tmp_path, "clash.xml", uuid=U1_NEXT))
    assert r.returncode == 1 and f"a secret with UUID {U1} is already defined".encode() in r.stderr, r.stderr
    assert ok(cli(u, "secret-undefine", U1)) == f"Secret {U1} deleted\n\n"
    r = cli(u, "secret-dumpxml", U1)
    assert r.returncode == 1 and f"Secret not found: no secret with matching uuid '{U1}'".encode() in r.stderr
    r = cli(u, "secret-undefine", "not-a-uuid")
    assert r.returncode == 1 and b"failed to get secret 'not-a-uuid'" in r.stderr, r.stderr
    log = d.log()
    assert SENTINEL.hex() not in log and base64.b64encode(SENTINEL).decode() not in log


def test_cli_secret_event_over_rpc(sessiond, rpc_dir, tmp_path):
    u = uri(rpc_dir)
    ok(cli(u, "secret-define", xml_file(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k != "SECRETBUS_DEFAULT_URI"}
    watch = {"lifecycle": [], "value-changed": [U1]}
    procs = {ev: subprocess.Popen(entry_point() + ["-c", u, "secret-event", *args, "--event", ev, "--timeout", "60"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for ev, args in watch.items()}
    try:
        # The watchers are one-shot: repeat the change until each has seen one (however long
        # a loaded machine takes to start them).
        deadline = time.monotonic() + 60
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            if procs["lifecycle"].poll() is None:
                ok(cli(u, "secret-define", xml_file(tmp_path)))
            if procs["value-changed"].poll() is None:
                ok(cli(u, "secret-set-value", U1, "--base64", "QUJD"))
            time.sleep(0.3)
        out = {ev: p.communicate(timeout=30) for ev, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs["lifecycle"].returncode == 0, out["lifecycle"]
    assert f"event 'lifecycle' for secret {U1}: Defined" in out["lifecycle"][0]
    assert "events received: 1" in out["lifecycle"][0]
    assert procs["value-changed"].returncode == 0, out["value-changed"]
    assert f"event 'value-changed' for secret {U1}\n" in out["value-changed"][0]


# -- the Python API over RPC -------------------------------------------------------------------
def test_open_api_over_rpc(sessiond, rpc_dir):
    with secretbus.open(uri(rpc_dir)) as conn:
        assert isinstance(conn, RpcConnection)
        s = conn.define_xml(secret_xml())
        # bytes in another encoding are read as on D-Bus and embedded (core/clientargs.py)
        assert conn.define_xml(secret_xml().encode("utf-16")).uuid == U1
        assert (s.uuid, s.usage_type, s.usage_id) == (U1, UsageType.CEPH, "client.admin")
        assert conn.lookup_by_uuid(U1.upper()) == s
        got = conn.lookup_by_usage(UsageType.CEPH, "client.admin")
        assert (got.uuid, got.usage_id) == (U1, "client.admin")
        s.set_value(SENTINEL)
        assert s.get_value() == SENTINEL
        assert f"<uuid>{U1}</uuid>" in s.xml_desc()
        conn.define_xml(secret_xml(U2, priv="yes", eph="yes", usage="tls", uid="web"))
        assert {x.uuid for x in conn.list_secrets()} == {U1, U2}
        assert [x.uuid for x in conn.list_secrets(ListFlags.PRIVATE)] == [U2]
        assert [x.uuid for x in conn.list_secrets(ListFlags.NO_EPHEMERAL)] == [U1]
        assert conn.call(P.Proc.CONNECT_GET_LIB_VERSION) == {"lib_ver": 12_001_000}
        # many threads on one connection: each gets its own answer
        results: list = []

        def worker() -> None:
            for _ in range(20):
                results.append(conn.lookup_by_uuid(U1).uuid == U1 and conn.secret_get_value(U1) == SENTINEL)
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [True] * 80
        s.undefine()
        assert [x.uuid for x in conn.list_secrets()] == [U2]
    assert SENTINEL.hex() not in sessiond.log()


def test_errors_are_the_projects_classes_with_libvirts_codes(sessiond, rpc_dir):
    embedded_msgs = {}
    with secretbus.open(uri(rpc_dir)) as conn:
        conn.define_xml(secret_xml(priv="yes"))
        cases = {
            "missing": lambda: conn.lookup_by_uuid(U2),
            "private": lambda: conn.secret_get_value(U1),
            "no value": lambda: conn.define_xml(secret_xml(U2, usage="volume", uid="/v")) and conn.secret_get_value(U2),
            "bad uuid": lambda: conn.lookup_by_uuid("nope"),
            "bad flags": lambda: conn.list_secrets(0x400),
            "negative flags": lambda: conn.secret_xml_desc(U1, -1),
            "usage missing": lambda: conn.lookup_by_usage(UsageType.CEPH, "nope"),
            "bad xml": lambda: conn.define_xml("<secret><uuid>zz</uuid></secret>"),
            "empty value": lambda: conn.secret_set_value(U1, b""),
            "too large": lambda: conn.secret_set_value(U1, b"x" * 65537),
            "internal_call": lambda: conn.secret_get_value(U1, internal_call=True),
            "bad event": lambda: conn.subscribe(lambda *_: None, 7),
        }
        got = {}
        for name, fn in cases.items():
            with pytest.raises(errors.SecretError) as ei:
                fn()
            got[name] = ei.value
    # the same cases against the embedded driver give the same classes and texts
    root = harness.public_tempdir("sb-rpcc-embed-")
    try:
        with secretbus.open(f"secret:///embed?root={root}") as emb:
            emb.define_xml(secret_xml(priv="yes"))
            for name, fn in {
                "missing": lambda: emb.lookup_by_uuid(U2),
                "private": lambda: emb.secret_get_value(U1),
                "no value": lambda: (emb.define_xml(secret_xml(U2, usage="volume", uid="/v"))
                                     and emb.secret_get_value(U2)),
                "bad uuid": lambda: emb.lookup_by_uuid("nope"),
                "bad flags": lambda: emb.list_secrets(0x400),
                "usage missing": lambda: emb.lookup_by_usage(UsageType.CEPH, "nope"),
                "bad xml": lambda: emb.define_xml("<secret><uuid>zz</uuid></secret>"),
                "too large": lambda: emb.secret_set_value(U1, b"x" * 65537),
            }.items():
                with pytest.raises(errors.SecretError) as ei:
                    fn()
                embedded_msgs[name] = ei.value
    finally:
        remove_tree(root)
    for name, e in embedded_msgs.items():
        assert (type(got[name]), got[name].code, got[name].display()) == (type(e), e.code, e.display()), name
    assert isinstance(got["missing"], errors.NoSecret) and got["missing"].code == 66
    assert got["private"].display() == "Invalid secret: secret is private"
    assert isinstance(got["negative flags"], errors.InvalidArg) and "0xffffffff" in got["negative flags"].message
    assert got["empty value"].display() == "value in virSecretSetValue must not be NULL"
    assert isinstance(got["internal_call"], errors.InvalidArg) and isinstance(got["bad event"], errors.InvalidArg)


def test_events_over_rpc(sessiond, rpc_dir):
    with secretbus.open(uri(rpc_dir)) as conn, secretbus.open(uri(rpc_dir)) as other:
        every: list = []
        only_u2: list = []
        values: list = []
        sub = conn.subscribe(lambda s, e: every.append((s.uuid, e.event_id, e.lifecycle)))
        conn.subscribe(lambda s, e: only_u2.append(e.uuid), EventId.LIFECYCLE, U2)
        # a handler may call its own connection (it runs on the events thread)
        conn.subscribe(lambda s, e: values.append(s.get_value()), EventId.VALUE_CHANGED)
        other.define_xml(secret_xml())
        other.secret_set_value(U1, SENTINEL)
        other.define_xml(secret_xml(U2, usage="volume", uid="/v"))
        other.secret_undefine(U1)
        harness.wait_until(lambda: len(every) >= 4 and values, timeout=20, what="four events")
        assert every == [(U1, EventId.LIFECYCLE, Lifecycle.DEFINED), (U1, EventId.VALUE_CHANGED, None),
                         (U2, EventId.LIFECYCLE, Lifecycle.DEFINED), (U1, EventId.LIFECYCLE, Lifecycle.UNDEFINED)]
        assert only_u2 == [U2] and values == [SENTINEL]
        conn.unsubscribe(sub)
        other.secret_undefine(U2)
        harness.wait_until(lambda: len(only_u2) == 2, timeout=20, what="the undefine of U2")
        assert len(every) == 4                  # unsubscribed: nothing more
        with pytest.raises(errors.InvalidArg):
            conn.unsubscribe(sub)



def test_read_only_over_rpc(systemd_, rpc_dir):
    with secretbus.open(uri(rpc_dir, "system")) as rw:
        rw.define_xml(secret_xml())
        rw.secret_set_value(U1, SENTINEL)
    for conn in (secretbus.open(uri(rpc_dir, "system", ro=True)),            # the -ro socket
                 secretbus.open(uri(rpc_dir, "system"), readonly=True)):     # CONNECT_OPEN flag 1
        with conn:
            assert [s.uuid for s in conn.list_secrets()] == [U1]
            assert f"<uuid>{U1}</uuid>" in conn.secret_xml_desc(U1)
            for method, args, api in (("secret_get_value", (U1,), "virSecretGetValue"),
                                      ("secret_set_value", (U1, b"x"), "virSecretSetValue"),
                                      ("secret_undefine", (U1,), "virSecretUndefine"),
                                      ("define_xml", (secret_xml(U2),), "virSecretDefineXML")):
                with pytest.raises(errors.OperationDenied) as ei:
                    getattr(conn, method)(*args)
                assert ei.value.code == 29
                assert ei.value.display() == f"operation forbidden: read only access prevents {api}"
    r = cli(uri(rpc_dir, "system", ro=True), "secret-get-value", U1)
    assert r.returncode == 1 and b"read only access prevents virSecretGetValue" in r.stderr
    for top in (("-r",), ("--readonly",)):        # virsh -r: the rw socket, CONNECT_OPEN flag 1
        r = cli(uri(rpc_dir, "system"), "secret-undefine", U1, top=top)
        assert r.returncode == 1 and b"read only access prevents virSecretUndefine" in r.stderr, r.stderr
        assert U1 in ok(cli(uri(rpc_dir, "system"), "secret-list", top=top))
    assert SENTINEL.hex() not in systemd_.log()


def test_a_wrong_instance_or_no_server(sessiond, rpc_dir, tmp_path):
    with pytest.raises(errors.SecretError) as ei:        # the session socket, the system name
        secretbus.open(f"secret:///system?socket={rpc_dir}/virtsecretd-sock")
    assert "unexpected secret URI path '/system'" in ei.value.message
    with pytest.raises(errors.SystemError) as ei2:
        secretbus.open(f"secret:///session?socket={tmp_path}/none")
    assert ei2.value.message.startswith(f"Failed to connect socket to '{tmp_path}/none'")
    r = cli(f"secret:///session?socket={tmp_path}/none", "secret-list")
    assert r.returncode == 1 and b"failed to connect to the hypervisor" in r.stderr


# -- which front end ---------------------------------------------------------------------------
def test_front_end_choice(session_bus, make_secretbusd, tmp_path):
    """No ?socket=: D-Bus when the service is on the bus; RPC when the bus has no such service or
    cannot be reached but the instance's libvirt socket exists."""
    runtime = harness.public_tempdir("sb-rpcc-xdg-")
    try:
        (runtime / "libvirt").mkdir(mode=0o700)
        env = {"XDG_RUNTIME_DIR": str(runtime)}
        d = rpc_only(session_bus, make_secretbusd, runtime / "libvirt", system=False, env=env)
        for bus in (session_bus.address, f"unix:path={tmp_path}/no-bus"):
            e = {**env, "DBUS_SESSION_BUS_ADDRESS": bus}
            ok(cli("secret:///session", "secret-define", xml_file(tmp_path), env=e))
            assert U1 in ok(cli("secret:///session", "secret-list", env=e))
            ok(cli("secret:///session", "secret-undefine", U1, env=e))
        d.stop()
        # the service on the bus and the socket there: D-Bus
        both = make_secretbusd(session_bus, env=env, args=("--rpc-dir", str(runtime / "libvirt")))
        old = {k: os.environ.get(k) for k in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")}
        os.environ.update({**env, "DBUS_SESSION_BUS_ADDRESS": session_bus.address})
        try:
            with secretbus.open("secret:///session") as conn:
                assert isinstance(conn, DBusConnection)
            with secretbus.open("secret:///session?mode=direct") as conn:
                assert isinstance(conn, RpcConnection)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        both.stop()
    finally:
        remove_tree(runtime)


def test_uri_parameters():
    p = parse_uri("secret:///system?socket=/tmp/s&mode=direct&foo=bar&no_verify=1")
    assert p.socket == Path("/tmp/s") and p.mode == "direct" and p.wants_rpc
    assert p.open_name() == "secret:///system?foo=bar"          # libvirt's client params stay here
    assert parse_uri("secret+unix:///session").open_name() == "secret:///session"
    assert not parse_uri("secret:///session").wants_rpc
    for bad in ("secret:///system?socket=relative", "secret:///system?mode=sideways"):
        with pytest.raises(errors.InvalidArg):
            parse_uri(bad)
    with pytest.raises(errors.NoSupport):
        parse_uri("secret+ssh://host/system")


def test_error_replies_map_to_the_projects_classes():
    _, payload = decode_frame(next(v for k, v in FIXTURES.items() if k.startswith("SECRET_GET_VALUE error")))
    e = error_from_remote(xdr.decode(P.REMOTE_ERROR, payload))
    assert type(e) is errors.InvalidSecret and e.message == "secret is private"
    body = {"code": 39, "domain": 7, "message": "unknown procedure: 9999"}
    assert type(error_from_remote(body)) is errors.NoSupport
    auth = error_from_remote({"code": 45, "domain": 60, "message": "authentication failed: no"})
    assert isinstance(auth, errors.OperationFailed) and auth.code == 45
    assert auth.display() == "authentication failed: no"
    assert error_from_remote({"code": 1, "message": "internal error: x"}).display() == "internal error: x"


# -- the asyncio client in-process -------------------------------------------------------------
@pytest.fixture
def srv(tmp_path):
    s = InProcess(tmp_path)
    yield s
    s.close()


def test_sixteen_calls_in_flight_matched_by_serial(srv):
    async def run() -> None:
        c = await AsyncRpcClient.connect(UnixTransport(srv.rw))
        await c.open(srv.uri)
        uuids = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(16)]
        # writes (the writer thread) and reads interleaved: replies come back out of order
        defs = [c.send(P.Proc.SECRET_DEFINE_XML, {"xml": secret_xml(u, usage="volume", uid=f"/v/{u}"), "flags": 0})
                for u in uuids]
        nums = [c.send(P.Proc.CONNECT_NUM_OF_SECRETS) for _ in range(16)]
        got = await asyncio.gather(*defs)
        assert [str(uuidlib.UUID(bytes=g["secret"]["uuid"])) for g in got] == uuids
        assert all(0 <= n["num"] <= 16 for n in await asyncio.gather(*nums))
        assert c.in_flight == 0
        await c.close()
        assert c.closed
    asyncio.run(run())


def test_keepalive_answered(tmp_path):
    s = InProcess(tmp_path, limits=RpcLimits(keepalive_interval=0.2, keepalive_count=2))
    try:
        conn = RpcConnection.open(s.uri, UnixTransport(s.rw), name=s.uri, timeout=10)
        try:
            time.sleep(2.0)           # ten intervals idle: a peer that did not answer is gone by now
            assert conn.list_secrets() == []
        finally:
            conn.close()
    finally:
        s.close()


class SilentAfterOpen:
    """A server that answers the handshake (keepalive supported) and CONNECT_CLOSE, nothing
    else, and PINGs only if `pong`: what a vanished or a live idle peer looks like."""

    def __init__(self, path: Path, *, pong: bool):
        self.pings = 0
        self.pong = pong
        self._l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._l.bind(str(path))
        self._l.listen(1)
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        peer, _ = self._l.accept()
        replies = {P.Proc.AUTH_LIST: {"types": [0]}, P.Proc.CONNECT_SUPPORTS_FEATURE: {"supported": 1},
                   P.Proc.CONNECT_OPEN: None, P.Proc.CONNECT_CLOSE: None}
        with peer:
            buf = b""
            while True:
                data = peer.recv(65536)
                if not data:
                    return
                buf += data
                while len(buf) >= 4 and len(buf) >= int.from_bytes(buf[:4], "big"):
                    n = int.from_bytes(buf[:4], "big")
                    h, _payload = decode_frame(buf[:n])
                    buf = buf[n:]
                    if h.prog == P.KEEPALIVE_PROGRAM and h.proc == P.KeepAlive.PING:
                        self.pings += 1
                        if self.pong:
                            peer.sendall(encode_frame(Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PONG,
                                                             P.MsgType.MESSAGE, 0, 0)))
                    elif h.prog == P.REMOTE_PROGRAM and h.proc in replies:
                        body = xdr.encode(P.PROCS[h.proc].ret, replies[h.proc])
                        peer.sendall(encode_frame(Header(P.REMOTE_PROGRAM, 1, h.proc, P.MsgType.REPLY, h.serial, 0),
                                                  body))

    def close(self) -> None:
        self._l.close()
        self._t.join(5)


@pytest.mark.parametrize("pong", [False, True])
def test_the_client_pings_and_closes_a_silent_server(tmp_path, pong):
    """virsh's keepalive (-k/-K): PINGs after a silent interval; `count` unanswered end the
    connection with "keepalive timeout" told to on_lost, and calls fail; PONGs keep it."""
    from secretbus.rpc.client import KeepAlive
    srv = SilentAfterOpen(tmp_path / "silent", pong=pong)
    lost: list[str] = []
    conn = RpcConnection.open("secret:///session", UnixTransport(tmp_path / "silent"), name="secret:///session",
                              timeout=10, keepalive=KeepAlive(0.2, 2))
    try:
        conn.on_lost(lost.append)
        t0 = time.monotonic()
        if pong:
            time.sleep(1.5)
            assert lost == [] and srv.pings >= 4        # answered each time: still up
        else:
            harness.wait_until(lambda: lost, timeout=10, what="the keepalive timeout")
            took = time.monotonic() - t0
            assert lost == ["keepalive timeout"] and srv.pings == 2 and 0.4 < took < 3, (lost, srv.pings, took)
            with pytest.raises(errors.OperationFailed, match="no answer to 2 keepalive pings"):
                conn.list_secrets()
    finally:
        conn.close()
        srv.close()
    assert lost == ([] if pong else ["keepalive timeout"])     # and never for our own close


def test_keepalive_interval_zero_never_pings_and_count_zero_never_waits(tmp_path):
    """libvirt's rules: -k 0 disables the PINGs; -K 0 closes after one silent interval, unasked."""
    from secretbus.rpc.client import KeepAlive
    for ka, sock in ((KeepAlive(0, 1), "off"), (KeepAlive(0.3, 0), "zero")):
        srv = SilentAfterOpen(tmp_path / sock, pong=False)
        conn = RpcConnection.open("secret:///session", UnixTransport(tmp_path / sock), name="secret:///session",
                                  timeout=10, keepalive=ka)
        lost: list[str] = []
        conn.on_lost(lost.append)
        try:
            time.sleep(1.0)
            assert srv.pings == 0 and lost == ([] if ka.count else ["keepalive timeout"]), (ka, lost)
            if not ka.count:
                with pytest.raises(errors.OperationFailed, match=r"silent for 0.3 s \(keepalive count 0\)"):
                    conn.list_secrets()
        finally:
            conn.close()
            srv.close()


def test_a_server_that_goes_away(tmp_path):
    s = InProcess(tmp_path)
    conn = RpcConnection.open(s.uri, UnixTransport(s.rw), name=s.uri, timeout=10)
    lost: list[str] = []
    conn.on_lost(lost.append)
    assert conn.is_alive()
    try:
        s.close()
        with pytest.raises(errors.OperationFailed) as ei:
            conn.list_secrets()
        assert "was lost" in ei.value.message or "closed" in ei.value.message
        harness.wait_until(lambda: lost, timeout=10, what="the close callback")
        assert lost == ["end of file"] and not conn.is_alive()     # libvirt's virConnectIsAlive
    finally:
        conn.close()
    with pytest.raises(errors.OperationFailed):
        conn.list_secrets()
    assert json.dumps(ei.value.message)      # a plain text, no value in it


def test_a_server_that_never_answers(tmp_path):
    path = tmp_path / "mute"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        mute.bind(str(path))
        mute.listen(1)             # accepted by the kernel, never read nor answered
        t0 = time.monotonic()
        with pytest.raises(errors.OperationFailed) as ei:
            RpcConnection.open("secret:///session", UnixTransport(path), name="secret:///session", timeout=0.5)
        assert ei.value.message == f"no reply from {path} within 0.5 s"
        assert time.monotonic() - t0 < 15
    finally:
        mute.close()


def test_a_hostile_server_costs_the_client_nothing(tmp_path):
    """A frame length beyond the protocol's maximum ends the connection before anything is
    read or allocated; a reply to a serial never sent is ignored."""
    path = tmp_path / "hostile"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)

    def serve() -> None:
        peer, _ = lsock.accept()
        with peer:
            peer.recv(4096)                                            # AUTH_LIST
            stray = xdr.encode(P.PROCS[P.Proc.AUTH_LIST].ret, {"types": [0]})
            peer.sendall(encode_frame(Header(P.REMOTE_PROGRAM, 1, P.Proc.AUTH_LIST, P.MsgType.REPLY, 77, 0), stray))
            peer.sendall(b"\xff\xff\xff\xf0")                          # a 4 GiB frame
            peer.recv(4096)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(errors.OperationFailed) as ei:
            RpcConnection.open("secret:///session", UnixTransport(path), name="secret:///session", timeout=10)
        assert "frame length" in ei.value.message and "out of bounds" in ei.value.message
    finally:
        lsock.close()
        t.join(10)


def test_the_rpc_connection_has_the_dbus_connections_api():
    public = {n for n in dir(DBusConnection) if not n.startswith("_")} - {"service_present", "open"}
    for name in public:
        theirs = getattr(DBusConnection, name)
        assert hasattr(RpcConnection, name), name
        if callable(theirs) and not isinstance(theirs, type):
            ours = inspect.signature(getattr(RpcConnection, name)).parameters
            assert list(inspect.signature(theirs).parameters) == list(ours), name

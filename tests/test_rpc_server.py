"""The RPC server in-process, with a raw client: libvirtd's captured replies reproduced byte for
byte, libvirt's dispatch rules and errors, events, keepalive, and hostile clients that change
nothing and stall nobody."""
from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from rpcraw import RawClient, RemoteError, handle

from secretbus.core import busypoll, errors
from secretbus.core.model import InstanceKind
from secretbus.driver.build import open_instance
from secretbus.rpc import protocol as P
from secretbus.rpc import xdr
from secretbus.rpc.connection import WRITE_HIGH_WATER, RpcLimits
from secretbus.rpc.events import EventHub
from secretbus.rpc.frame import Header, encode_frame
from secretbus.rpc.identity import SystemToken
from secretbus.rpc.procedures import Procedures
from secretbus.rpc.server import RpcServer, SocketBusy, socket_plan
from secretbus.rpc.session import Peer, Session
from secretbus.store.paths import InstancePaths

FIXTURES = {f["label"]: bytes.fromhex(f["hex"]) for f in
            json.loads((Path(__file__).parent / "data" / "rpc" / "rpc-fixtures.json").read_text())}
CAP_UUID = "0d5f0b7e-1a2b-4c3d-8e9f-0123456789ab"      # the captured ceph secret
CAP_USAGE = "client.admin secret"
MISSING = "11111111-2222-3333-4444-555555555555"


def fx(prefix: str) -> bytes:
    (label,) = [k for k in FIXTURES if k.startswith(prefix)]
    return FIXTURES[label]


class InProcess:
    """An RpcServer over a fresh store, its loop in a thread."""

    def __init__(self, tmp: Path, *, system: bool = True, limits: RpcLimits | None = None):
        self.driver = open_instance(InstancePaths.for_kind(InstanceKind.SYSTEM, tmp / "root"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.plan = socket_plan(system, str(tmp / "rpc"))
        self.server = RpcServer(self.driver, system=system, plan=self.plan, limits=limits)
        try:
            self.run(self.server.start())
        except BaseException:
            self._stop_loop()
            raise
        self.rw = self.plan[0].path
        self.ro = self.plan[1].path if system else None
        self.uri = "secret:///system" if system else "secret:///session"

    def run(self, coro, timeout: float = 20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, ro: bool = False) -> RawClient:
        return RawClient(self.ro if ro else self.rw)

    def opened(self, ro: bool = False, flags: int = 0) -> RawClient:
        return self.client(ro).open(self.uri, flags)

    def close(self) -> None:
        self.run(self.server.stop())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.driver.close()


@pytest.fixture
def srv(tmp_path):
    s = InProcess(tmp_path)
    yield s
    s.close()


def define_captured(c: RawClient, private: str = "no") -> None:
    c.call(P.Proc.SECRET_DEFINE_XML, {
        "xml": f"<secret ephemeral='no' private='{private}'><uuid>{CAP_UUID}</uuid><description>test ceph"
               f"</description><usage type='ceph'><name>{CAP_USAGE}</name></usage></secret>", "flags": 0})


def exchange(c: RawClient, frame: bytes) -> bytes:
    """Send a whole frame; the next whole frame back."""
    c.send_raw(frame)
    h, payload = c.read_frame()
    return encode_frame(h, payload)


def call_frame(proc: int, serial: int, args) -> bytes:
    return encode_frame(Header(P.REMOTE_PROGRAM, 1, proc, P.MsgType.CALL, serial, P.Status.OK),
                        xdr.encode(P.PROCS[proc].args, args))


# -- byte for byte what libvirtd 9.0 answered ------------------------------------------
def test_replays_libvirtds_captured_answers(srv):
    with srv.client() as c:
        assert exchange(c, fx("AUTH_LIST call")) == fx("AUTH_LIST reply types=[REMOTE_AUTH_NONE]")
        assert exchange(c, fx("CONNECT_SUPPORTS_FEATURE call")) == fx("CONNECT_SUPPORTS_FEATURE reply")
        assert exchange(c, fx("CONNECT_OPEN call")) == fx("CONNECT_OPEN reply")
        assert exchange(c, fx("SECRET_DEFINE_XML call")) == fx("SECRET_DEFINE_XML reply")
        sec = handle(CAP_UUID, 2, CAP_USAGE)
        assert exchange(c, call_frame(P.Proc.SECRET_GET_XML_DESC, 7, {"secret": sec, "flags": 0})) \
            == fx("SECRET_GET_XML_DESC reply")
        c.send_raw(fx("SECRET_SET_VALUE call"))
        assert c.read_frame()[0].status == P.Status.OK
        assert exchange(c, call_frame(P.Proc.SECRET_GET_VALUE, 7, {"secret": sec, "flags": 0})) \
            == fx("SECRET_GET_VALUE reply")
        assert exchange(c, call_frame(P.Proc.SECRET_LOOKUP_BY_UUID, 6, {"uuid": handle(MISSING)["uuid"]})) \
            == fx("SECRET_LOOKUP_BY_UUID error")
        assert exchange(c, call_frame(P.Proc.CONNECT_GET_HOSTNAME, 17, None)) == fx("CONNECT_GET_HOSTNAME error")
        define_captured(c, private="yes")       # public -> private is allowed
        assert exchange(c, call_frame(P.Proc.SECRET_GET_VALUE, 7, {"secret": sec, "flags": 0})) \
            == fx("SECRET_GET_VALUE error")


def test_event_messages_as_libvirtd_sends_them(srv):
    with srv.opened() as setter, srv.client() as ev:
        define_captured(setter)
        for f in ("AUTH_LIST call", "CONNECT_OPEN call", "CONNECT_SECRET_EVENT_REGISTER_ANY call eventID=0",
                  "CONNECT_SECRET_EVENT_REGISTER_ANY call eventID=1"):
            ev.send_raw(fx(f))
            assert ev.read_frame()[0].status == P.Status.OK
        setter.call(P.Proc.SECRET_SET_VALUE, {"secret": handle(CAP_UUID), "value": b"x", "flags": 0})
        h, payload = ev.read_frame()
        assert encode_frame(h, payload) == fx("SECRET_EVENT_VALUE_CHANGED")
        setter.call(P.Proc.SECRET_UNDEFINE, {"secret": handle(CAP_UUID)})
        h, payload = ev.read_frame()
        assert encode_frame(h, payload) == fx("SECRET_EVENT_LIFECYCLE message UNDEFINED")


def test_keepalive_ping_pong_and_dead_peers(tmp_path):
    s = InProcess(tmp_path, limits=RpcLimits(keepalive_interval=0.2, keepalive_count=3))
    try:
        with s.client() as c:
            assert exchange(c, fx("KEEPALIVE PING (server")) == fx("KEEPALIVE PONG (client")   # at any time
            c.call(P.Proc.AUTH_LIST)
            assert c.call(P.Proc.CONNECT_SUPPORTS_FEATURE, {"feature": 10}) == {"supported": 1}
            assert encode_frame(*c.read_frame()) == fx("KEEPALIVE PING (server")
            c.send_raw(fx("KEEPALIVE PONG (client"))
            # a peer that stops answering is dropped after keepalive_count pings
            deadline = time.monotonic() + 10
            with pytest.raises(EOFError):
                while time.monotonic() < deadline:
                    c.read_frame()
        with s.client() as quiet:        # never asked for keepalive: never pinged, never dropped
            quiet.open(s.uri)
            quiet.sock.settimeout(1.0)
            with pytest.raises(socket.timeout):
                quiet.read_frame()
            assert quiet.call(P.Proc.CONNECT_NUM_OF_SECRETS) == {"num": 0}
    finally:
        s.close()


def test_keepalive_interval_off_and_count_zero(tmp_path):
    """secretbusd.conf's keepalive_interval = -1: never pinged (client PINGs still answered);
    keepalive_count = 0: dropped after one silent interval, with no PING first (libvirtd.conf)."""
    off = InProcess(tmp_path / "off", limits=RpcLimits(keepalive_interval=-1))
    try:
        with off.client() as c:
            c.call(P.Proc.AUTH_LIST)
            assert c.call(P.Proc.CONNECT_SUPPORTS_FEATURE, {"feature": 10}) == {"supported": 1}
            c.sock.settimeout(1.0)
            with pytest.raises(socket.timeout):
                c.read_frame()
            assert exchange(c, fx("KEEPALIVE PING (server")) == fx("KEEPALIVE PONG (client")
    finally:
        off.close()
    zero = InProcess(tmp_path / "zero", limits=RpcLimits(keepalive_interval=0.2, keepalive_count=0))
    try:
        with zero.client() as c:
            c.call(P.Proc.AUTH_LIST)
            c.call(P.Proc.CONNECT_SUPPORTS_FEATURE, {"feature": 10})
            c.sock.settimeout(5.0)
            with pytest.raises(EOFError):
                c.read_frame()          # the end, not a PING
    finally:
        zero.close()


# -- libvirt's dispatch rules -------------------------------------------------------------
def _err(c: RawClient, proc, args=None) -> tuple[int, int, str]:
    with pytest.raises(RemoteError) as ei:
        c.call(proc, args)
    e = ei.value.body
    if e["code"] == errors.InvalidArgCheck.code and (e["int1"], e["int2"]) == (0, 0):
        # virReportInvalidArg: str1 the function, str2 the argument's name (libvirtd 9.0)
        assert e["str1"] in e["message"] and e["str2"] in e["message"]
    else:
        assert e["str1"].endswith("%s") and e["message"] == e["str1"].replace("%s", e["str2"])
    return e["code"], e["domain"], e["message"]


def test_dispatch_rules(srv):
    with srv.client() as c:
        c.call(P.Proc.AUTH_LIST)
        assert _err(c, P.Proc.CONNECT_GET_TYPE) == (1, 7, "internal error: hypervisor connection not open")
        assert _err(c, P.Proc.CONNECT_SUPPORTS_FEATURE, {"feature": 9}) == \
            (1, 7, "internal error: hypervisor connection not open")
        assert _err(c, P.Proc.CONNECT_OPEN, {"name": "secret:///session", "flags": 0}) == \
            (1, 0, "internal error: unexpected secret URI path '/session', try secret:///system")
        assert _err(c, P.Proc.CONNECT_OPEN, {"name": "qemu:///system", "flags": 0})[:2] == (5, 0)
        c.call(P.Proc.CONNECT_OPEN, {"name": "secret:///system?foo=bar", "flags": 0})   # unknown params pass
        assert c.call(P.Proc.CONNECT_GET_TYPE) == {"type": "secret"}
        assert c.call(P.Proc.CONNECT_GET_URI) == {"uri": "secret:///system"}
        assert c.call(P.Proc.CONNECT_IS_SECURE) == {"secure": 1}
        assert c.call(P.Proc.CONNECT_GET_LIB_VERSION) == {"lib_ver": 12_001_000}
        assert c.call(P.Proc.CONNECT_SUPPORTS_FEATURE, {"feature": 9}) == {"supported": 0}
        assert c.call(P.Proc.CONNECT_SUPPORTS_FEATURE, {"feature": 15}) == {"supported": 1}
        assert c.call(P.Proc.CONNECT_REGISTER_CLOSE_CALLBACK) is None
        assert c.call(P.Proc.CONNECT_UNREGISTER_CLOSE_CALLBACK) is None
        # unknown procedures: clients turn this into "not supported"
        serial = c.send_call(9999)
        h, body = c.read_reply(serial)
        assert (h.proc, h.status, body["code"], body["domain"], body["message"]) == \
            (9999, P.Status.ERROR, 39, 7, "unknown procedure: 9999")
        # a second open is refused and closes the first (libvirt's quirk)
        assert _err(c, P.Proc.CONNECT_OPEN, {"name": "secret:///system", "flags": 0}) == \
            (1, 7, "internal error: connection already open")
        assert _err(c, P.Proc.CONNECT_GET_TYPE)[2] == "internal error: hypervisor connection not open"


def test_secret_procedures(srv):
    with srv.opened() as c:
        assert c.call(P.Proc.CONNECT_LIST_ALL_SECRETS, {"need_results": 1, "flags": 0}) == {"secrets": [], "ret": 0}
        define_captured(c)
        assert c.call(P.Proc.CONNECT_NUM_OF_SECRETS) == {"num": 1}
        assert c.call(P.Proc.CONNECT_LIST_SECRETS, {"maxuuids": 5}) == {"uuids": [CAP_UUID]}
        assert c.call(P.Proc.CONNECT_LIST_SECRETS, {"maxuuids": 0}) == {"uuids": []}
        assert _err(c, P.Proc.CONNECT_LIST_SECRETS, {"maxuuids": 16385})[:2] == (39, 7)
        assert c.call(P.Proc.CONNECT_LIST_ALL_SECRETS, {"need_results": 0, "flags": 0}) == {"secrets": [], "ret": 1}
        assert c.call(P.Proc.CONNECT_LIST_ALL_SECRETS, {"need_results": 1, "flags": 4}) == {"secrets": [], "ret": 0}
        assert _err(c, P.Proc.CONNECT_LIST_ALL_SECRETS, {"need_results": 1, "flags": 16}) == \
            (8, 30, "unsupported flags (0x10) in function secretConnectListAllSecrets")
        found = c.call(P.Proc.SECRET_LOOKUP_BY_USAGE, {"usageType": 2, "usageID": CAP_USAGE})
        assert found == {"secret": handle(CAP_UUID, 2, CAP_USAGE)}
        # handles are resolved by UUID only: a wrong usage inside changes nothing
        bogus = handle(CAP_UUID, 4, "bogus")
        assert "<uuid>" + CAP_UUID in c.call(P.Proc.SECRET_GET_XML_DESC, {"secret": bogus, "flags": 0})["xml"]
        assert _err(c, P.Proc.SECRET_SET_VALUE, {"secret": bogus, "value": b"", "flags": 0}) == \
            (8, 30, "value in virSecretSetValue must not be NULL")
        assert _err(c, P.Proc.SECRET_GET_VALUE, {"secret": bogus, "flags": 1}) == \
            (8, 30, "unsupported flags (0x1) in function secretGetValue")
        assert _err(c, P.Proc.SECRET_DEFINE_XML, {"xml": "<secret>", "flags": 0})[:2] in ((27, 30), (35, 30))
        c.call(P.Proc.SECRET_UNDEFINE, {"secret": bogus})
        assert _err(c, P.Proc.SECRET_UNDEFINE, {"secret": bogus})[:2] == (66, 30)


@pytest.mark.parametrize("ro_socket,flags", [(True, 0), (False, 1)])
def test_read_only_refused_by_the_server(srv, ro_socket, flags):
    with srv.opened() as rw:
        define_captured(rw)
        rw.call(P.Proc.SECRET_SET_VALUE, {"secret": handle(CAP_UUID), "value": b"v1", "flags": 0})
    sec = handle(CAP_UUID)
    with srv.opened(ro=ro_socket, flags=flags) as ro:
        for proc, args, api in [
            (P.Proc.SECRET_GET_VALUE, {"secret": sec, "flags": 0}, "virSecretGetValue"),
            (P.Proc.SECRET_SET_VALUE, {"secret": sec, "value": b"v2", "flags": 0}, "virSecretSetValue"),
            (P.Proc.SECRET_UNDEFINE, {"secret": sec}, "virSecretUndefine"),
            (P.Proc.SECRET_DEFINE_XML, {"xml": "<secret/>", "flags": 0}, "virSecretDefineXML"),
        ]:
            assert _err(ro, proc, args) == (29, 30, f"operation forbidden: read only access prevents {api}")
        assert ro.call(P.Proc.CONNECT_NUM_OF_SECRETS) == {"num": 1}
        assert ro.call(P.Proc.SECRET_LOOKUP_BY_UUID, {"uuid": sec["uuid"]})["secret"]["usageID"] == CAP_USAGE
        assert isinstance(ro.call(P.Proc.CONNECT_SECRET_EVENT_REGISTER_ANY, {"eventID": 0, "secret": None})
                          ["callbackID"], int)
    assert srv.driver.get_value(CAP_UUID) == b"v1"


def test_event_registrations(srv):
    with srv.opened() as a, srv.opened() as b, srv.opened() as setter:
        ida = a.call(P.Proc.CONNECT_SECRET_EVENT_REGISTER_ANY, {"eventID": 0, "secret": None})["callbackID"]
        idb = b.call(P.Proc.CONNECT_SECRET_EVENT_REGISTER_ANY,
                     {"eventID": 1, "secret": handle(MISSING)})["callbackID"]
        assert ida != idb                                    # unique in the daemon
        assert _err(a, P.Proc.CONNECT_SECRET_EVENT_REGISTER_ANY, {"eventID": 7, "secret": None}) == \
            (1, 7, "internal error: unsupported secret event ID 7")
        assert _err(a, P.Proc.CONNECT_SECRET_EVENT_DEREGISTER_ANY, {"callbackID": idb}) == \
            (39, 7, f"callbackID {idb} not registered")     # not a's to drop
        define_captured(setter)
        setter.call(P.Proc.SECRET_SET_VALUE, {"secret": handle(CAP_UUID), "value": b"x", "flags": 0})
        h, msg = a.wait_message()
        assert (h.proc, h.type, h.serial, msg["callbackID"], msg["event"]) == (382, 2, 1, ida, 0)
        b.sock.settimeout(0.5)
        with pytest.raises(socket.timeout):              # b filtered on another secret
            b.read_frame()
        a.call(P.Proc.CONNECT_SECRET_EVENT_DEREGISTER_ANY, {"callbackID": ida})
        setter.call(P.Proc.SECRET_UNDEFINE, {"secret": handle(CAP_UUID)})
        a.sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            a.read_frame()
    deadline = time.monotonic() + 5                       # closing b drops its registration
    while len(srv.server.hub) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(srv.server.hub) == 0


# -- hostile clients ------------------------------------------------------------------------
def _healthy(srv: InProcess) -> None:
    with srv.opened() as c:
        assert c.call(P.Proc.CONNECT_NUM_OF_SECRETS) == {"num": 1}


def test_hostile_frames_change_nothing(srv):
    with srv.opened() as c:
        define_captured(c)
        # wrong program: the reply echoes it
        serial = c.send_call(1, prog=0x11111111)
        h, body = c.read_reply(serial)
        assert (h.prog, body["code"], body["domain"], body["message"]) == \
            (0x11111111, 39, 7, "Cannot find program 286331153 version 1")
        # truncated payload
        serial = c.send_call(P.Proc.SECRET_UNDEFINE, b"\x0d\x5f\x0b\x7e")
        h, body = c.read_reply(serial)
        assert (body["code"], body["domain"], body["message"]) == (39, 7, "Unable to decode message payload")
        # a string length beyond its bound, and trailing garbage
        for payload in (struct.pack(">I", 0xFFFFFFF0), xdr.encode(P.PROCS[P.Proc.CONNECT_LIST_SECRETS].args,
                                                                  {"maxuuids": 1}) + b"junk"):
            serial = c.send_call(P.Proc.SECRET_DEFINE_XML if len(payload) == 4 else P.Proc.CONNECT_LIST_SECRETS,
                                 payload)
            assert c.read_reply(serial)[1]["message"] == "Unable to decode message payload"
        # a reply or an event sent to the server is dropped, and the connection goes on
        c.send_call(P.Proc.CONNECT_NUM_OF_SECRETS, msg_type=P.MsgType.REPLY)
        assert c.call(P.Proc.CONNECT_NUM_OF_SECRETS) == {"num": 1}
    for bad in (struct.pack(">I", 0x7FFFFFFF), struct.pack(">I", 3), struct.pack(">I", 27) + bytes(23)):
        with srv.client() as c:
            c.send_raw(bad)
            with pytest.raises((EOFError, ConnectionError)):
                c.read_frame()
    with srv.client() as c:       # half a frame, then gone
        c.send_raw(fx("CONNECT_OPEN call")[:30])
    _healthy(srv)
    assert srv.driver.lookup_by_uuid(CAP_UUID).usage_id == CAP_USAGE


def test_many_idle_connections_stall_nobody(srv):
    with srv.opened() as c:
        define_captured(c)
    idle = []
    while len(idle) < 300:
        try:
            idle.append(srv.client())
        except BlockingIOError:       # the backlog is full for a moment: a real client waits too
            time.sleep(0.01)
    try:
        t0 = time.monotonic()
        _healthy(srv)
        assert time.monotonic() - t0 < 5
        assert srv.server.clients >= 300
    finally:
        for c in idle:
            c.close()


def test_connection_limits(tmp_path):
    s = InProcess(tmp_path, limits=RpcLimits(max_clients=8, root_reserve=2))
    try:
        held = [s.client() for _ in range(8)]
        for c in held:
            c.call(P.Proc.AUTH_LIST)       # all served
        extra = s.client()
        with pytest.raises((EOFError, ConnectionError)):
            extra.call(P.Proc.AUTH_LIST)  # the ninth is closed at once
        extra.close()
        held.pop().close()
        time.sleep(0.2)
        with s.client() as c:
            assert c.call(P.Proc.AUTH_LIST) == {"types": [0]}
        for c in held:
            c.close()
    finally:
        s.close()


def test_a_client_that_never_reads_stalls_only_itself(srv):
    with srv.opened() as c:
        for i in range(300):
            c.call(P.Proc.SECRET_DEFINE_XML, {
                "xml": f"<secret><uuid>00000000-0000-4000-8000-{i:012d}</uuid><usage type='volume'>"
                       f"<volume>/var/lib/images/{'x' * 40}{i}</volume></usage></secret>", "flags": 0})
    hog = srv.opened()
    call = call_frame(P.Proc.CONNECT_LIST_ALL_SECRETS, 0, {"need_results": 1, "flags": 0})
    hog.sock.setblocking(False)
    sent = 0
    try:
        while sent < 2000:              # ~40 MB of replies asked for, none read
            hog.sock.send(call)
            sent += 1
    except BlockingIOError:
        pass
    time.sleep(0.5)
    assert srv.server.in_flight <= RpcLimits().max_requests
    t0 = time.monotonic()
    with srv.opened() as c:
        assert c.call(P.Proc.CONNECT_LIST_ALL_SECRETS, {"need_results": 0, "flags": 0})["ret"] == 300
    assert time.monotonic() - t0 < 5
    hog.close()


def test_bad_calls_and_pings_never_read_are_not_kept(srv):
    """Error replies and PONGs hold no call slot: a client that floods unknown procedures and
    PINGs and never reads must stop being read, not grow our output buffer (it held 66 MB
    after 14 MB of such frames)."""
    hog = srv.opened()
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ping = encode_frame(Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PING, P.MsgType.MESSAGE, 0, P.Status.OK))
    bad = encode_frame(Header(P.REMOTE_PROGRAM, 1, 9999, P.MsgType.CALL, 7, P.Status.OK))
    chunk = (bad + ping) * 500
    hog.sock.setblocking(False)
    sent = 0
    try:
        while sent < 40 * 1024 * 1024:
            sent += hog.sock.send(chunk)
    except BlockingIOError:
        pass
    time.sleep(0.5)

    assert sent < 40 * 1024 * 1024                  # the server stopped reading it
    async def unread() -> int:                      # read on the server's loop
        return srv.server.unread
    assert srv.run(unread()) < 2 * WRITE_HIGH_WATER
    t0 = time.monotonic()
    with srv.opened() as c:
        assert c.call(P.Proc.CONNECT_NUM_OF_SECRETS) == {"num": 0}
    assert time.monotonic() - t0 < 5
    hog.close()


def test_a_define_over_the_frame_limit_is_refused_and_the_connection_goes_on(srv):
    """libvirt takes a define of up to its 4 MiB string; we read past one over max_frame
    without keeping it and give the XML size refusal, as for one over 1 MiB."""
    from secretbus.core.secretxml import MAX_XML_BYTES
    with srv.opened() as c:
        uuid = "00000000-0000-4000-8000-00000000abcd"
        xml = f"<secret><uuid>{uuid}</uuid><description>{'d' * (3 << 20)}</description></secret>"
        assert len(xml) > RpcLimits().max_frame
        with pytest.raises(RemoteError) as ei:
            c.call(P.Proc.SECRET_DEFINE_XML, {"xml": xml, "flags": 0})
        assert (ei.value.code, ei.value.domain, ei.value.message) == \
            (27, 30, f"XML error: secret XML document is larger than {MAX_XML_BYTES} bytes")
        assert c.call(P.Proc.CONNECT_NUM_OF_SECRETS) == {"num": 0}


# -- the sockets ------------------------------------------------------------------------------
def test_never_takes_over_a_live_socket(tmp_path):
    path = tmp_path / "rpc" / "virtsecretd-sock"
    path.parent.mkdir()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(SocketBusy, match="served by another process"):
            InProcess(tmp_path)
    finally:
        live.close()
    # now stale (nobody listens): replaced, and removed again on stop
    assert path.exists()
    s = InProcess(tmp_path)
    try:
        assert s.client().call(P.Proc.AUTH_LIST) == {"types": [0]}
    finally:
        s.close()
    assert not path.exists() and not (tmp_path / "rpc" / "virtsecretd-sock-ro").exists()


def test_never_replaces_what_is_not_a_socket(tmp_path):
    path = tmp_path / "rpc" / "virtsecretd-sock"
    path.parent.mkdir()
    path.write_text("keep me")
    with pytest.raises(SocketBusy, match="not a socket"):
        InProcess(tmp_path)
    assert path.read_text() == "keep me"


# -- SET_IDENTITY and the system token --------------------------------------------------------
def _identity(token: str | None, *, uid: int = 0, **extra) -> dict:
    """What virtqemud sends for a user (here root: uid 0 is allowed without polkit)."""
    params = [{"field": "user-name", "value": (7, "alice")}, {"field": "process-id", "value": (3, 4242)},
              {"field": "unix-user-id", "value": (4, uid)}, {"field": "process-time", "value": (4, 12345)}]
    if token is not None:
        params.append({"field": "system.token", "value": (7, token)})
    params += [{"field": k, "value": v} for k, v in extra.items()]
    return {"params": params, "flags": 0}


def test_set_identity_elevates_only_with_the_hosts_token(srv):
    token_file = srv.rw.parent / "common" / "system.token"
    token = token_file.read_text()
    assert len(token) == 32 and int(token, 16) >= 0
    sec = handle(CAP_UUID)
    with srv.opened() as c:
        define_captured(c, private="yes")
        c.call(P.Proc.SECRET_SET_VALUE, {"secret": sec, "value": b"luks-pass", "flags": 0})
        get = {"secret": sec, "flags": 0}
        assert _err(c, P.Proc.SECRET_GET_VALUE, get)[0] == 65
        c.call(P.Proc.CONNECT_SET_IDENTITY, _identity("0" * 32))
        assert _err(c, P.Proc.SECRET_GET_VALUE, get)[0] == 65
        c.call(P.Proc.CONNECT_SET_IDENTITY, _identity(token))
        assert c.call(P.Proc.SECRET_GET_VALUE, get) == {"value": b"luks-pass"}
        assert _err(c, P.Proc.SECRET_GET_VALUE, {"secret": sec, "flags": 1})[0] == 8    # no INTERNAL_CALL bit
        c.call(P.Proc.CONNECT_SET_IDENTITY, _identity(None))          # replaced: no longer elevated
        assert _err(c, P.Proc.SECRET_GET_VALUE, get)[0] == 65
        # An identity polkit cannot be asked about (no pid, start time and uid) passes no check,
        # as libvirt's "No process ID available"; nor does one of another uid without polkit.
        c.call(P.Proc.CONNECT_SET_IDENTITY, {"params": [{"field": "system.token", "value": (7, token)}], "flags": 0})
        assert _err(c, P.Proc.SECRET_GET_VALUE, get) == (88, 55, "access denied: 'secret' denied access")
        assert _err(c, P.Proc.SECRET_LOOKUP_BY_UUID, {"uuid": sec["uuid"]})[0] == 88
        c.call(P.Proc.CONNECT_SET_IDENTITY, _identity(token, uid=1000))
        assert _err(c, P.Proc.SECRET_GET_VALUE, get)[0] == 88
        assert _err(c, P.Proc.CONNECT_SET_IDENTITY, {"params": [], "flags": 1})[:2] == (8, 30)
        assert _err(c, P.Proc.CONNECT_SET_IDENTITY, _identity(token, bogus=(7, "x")))[2] == \
            "invalid argument: parameter 'bogus' not supported"
        assert _err(c, P.Proc.CONNECT_SET_IDENTITY, {"params": [{"field": "system.token", "value": (4, 1)}],
                                                     "flags": 0})[0] == 8
        with pytest.raises(RemoteError):
            c.call(P.Proc.SECRET_GET_VALUE, get)    # refused calls elevate nothing
    with srv.client() as c:         # not before CONNECT_OPEN
        c.call(P.Proc.AUTH_LIST)
        assert _err(c, P.Proc.CONNECT_SET_IDENTITY, _identity(token))[2] == \
            "internal error: hypervisor connection not open"


def test_the_token_is_read_when_needed(srv):
    """A libvirt daemon that (re)creates the token after secretbus started is believed."""
    token_file = srv.rw.parent / "common" / "system.token"
    old = token_file.read_text()
    new = "0123456789abcdef" * 2
    token_file.unlink()
    with srv.opened() as c:
        define_captured(c, private="yes")
        c.call(P.Proc.SECRET_SET_VALUE, {"secret": handle(CAP_UUID), "value": b"v", "flags": 0})
        c.call(P.Proc.CONNECT_SET_IDENTITY, _identity(old))
        assert _err(c, P.Proc.SECRET_GET_VALUE, {"secret": handle(CAP_UUID), "flags": 0})[0] == 65   # no file
        token_file.write_text(new)
        c.call(P.Proc.CONNECT_SET_IDENTITY, _identity(old))
        assert _err(c, P.Proc.SECRET_GET_VALUE, {"secret": handle(CAP_UUID), "flags": 0})[0] == 65
        c.call(P.Proc.CONNECT_SET_IDENTITY, _identity(new))
        assert c.call(P.Proc.SECRET_GET_VALUE, {"secret": handle(CAP_UUID), "flags": 0}) == {"value": b"v"}


def test_set_identity_from_a_non_root_peer_is_refused(tmp_path):
    """Unit level: a peer authenticated some other way (the next increment's polkit) still
    may not speak for others."""
    class Fake:
        def __init__(self):
            self.session = Session(Peer(77, 1000, 1000), socket_readonly=False, trusted=False,
                                   authenticated=True, opened=True)

        def send_message(self, proc, payload):
            raise AssertionError("no events here")

    token = SystemToken(tmp_path / "common" / "system.token")
    token.ensure()
    loop = asyncio.new_event_loop()
    try:
        procs = Procedures(None, EventHub(loop), token, system=True)   # type: ignore[arg-type]
        client = Fake()
        with pytest.raises(errors.AccessDenied):
            procs.set_identity(client, _identity(token.path.read_text()))
        assert client.session.identity is None
    finally:
        loop.close()


def test_a_client_connection_is_polled_while_it_is_served(tmp_path, monkeypatch):
    # core/busypoll: the connection marks its socket, and unmarks it when it closes
    monkeypatch.setattr(asyncio, "new_event_loop", lambda: busypoll.new_event_loop(50))
    s = InProcess(tmp_path)
    monkeypatch.undo()
    try:
        sel = s.loop._selector
        assert isinstance(sel, busypoll.PollingSelector) and sel.marked == frozenset()
        with s.opened() as c:
            c.call(P.Proc.CONNECT_NUM_OF_SECRETS)
            assert len(sel.marked) == 1
            with s.opened() as c2:
                c2.call(P.Proc.CONNECT_NUM_OF_SECRETS)
                assert len(sel.marked) == 2
        deadline = time.monotonic() + 10
        while sel.marked and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sel.marked == frozenset()
    finally:
        s.close()

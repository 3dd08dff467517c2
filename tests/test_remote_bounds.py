"""A remote host (TLS, TCP) is bounded as one untrusted local uid is (DESIGN §12): its
connections together, the frame bytes they hold, the event callbacks they register. In process:
the connections come to `RpcServer.serve_remote` over socketpairs, as the listeners pass them
once a peer's certificate (or SASL) passed."""
from __future__ import annotations

import asyncio
import socket

import pytest
from harness import wait_until
from rpcraw import RawClient, RemoteError
from test_rpc_server import InProcess

from secretbus.rpc import events
from secretbus.rpc import protocol as P
from secretbus.rpc.connection import RpcLimits
from secretbus.rpc.frame import Header, encode_frame
from secretbus.rpc.remote import RemoteIdentity, RemotePolicy, host_of
from secretbus.rpc.serverconf import Kind, parse_serverconf

URI = "secret:///system"
UNKNOWN = 9999              # a procedure nobody serves: answered "unknown procedure", after its frame is read
REG = P.Proc.CONNECT_SECRET_EVENT_REGISTER_ANY


class Remote:
    """An in-process server whose remote_access grants every DN `ro`."""

    def __init__(self, tmp_path, limits: RpcLimits):
        self.ip = InProcess(tmp_path, limits=limits)
        self.ip.server.guard.remote = RemotePolicy(parse_serverconf('remote_access = [ "x509:*=ro" ]\n'))
        self._port = 40000
        self.clients: list[RawClient] = []

    def connect(self, host: str) -> RawClient:
        """A connection from `host` (a new port each), served as an authenticated TLS peer."""
        ours, theirs = socket.socketpair()
        self._port += 1
        who = RemoteIdentity(Kind.X509, "C=GB,O=secretbus test,CN=client1", f"{host}:{self._port}")

        async def serve() -> None:
            reader, writer = await asyncio.open_connection(sock=ours)
            asyncio.ensure_future(self.ip.server.serve_remote(reader, writer, who))
        self.ip.run(serve())
        c = RawClient.over(theirs, timeout=5)
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.ip.close()


@pytest.fixture
def remote(request, tmp_path):
    r = Remote(tmp_path, getattr(request, "param", RpcLimits(max_clients_per_uid=4)))
    yield r
    r.close()


def closed_by_server(c: RawClient) -> bool:
    try:
        return c.sock.recv(1) == b""
    except (TimeoutError, ConnectionError):
        return False


def test_a_remote_hosts_connections_are_bounded_as_a_uids(remote):
    """One host has max_clients_per_uid connections, whatever DN or port; another host has its own."""
    first = [remote.connect("192.0.2.1").open(URI) for _ in range(4)]
    over = remote.connect("192.0.2.1")
    assert closed_by_server(over)
    other = remote.connect("[2001:db8::1]").open(URI)
    assert other.call(P.Proc.CONNECT_GET_TYPE)["type"] == "secret"
    assert remote.ip.server.clients == 5
    first[0].close()
    wait_until(lambda: remote.ip.server.clients == 4, timeout=5, what="the closed connection's slot back")
    again = remote.connect("192.0.2.1").open(URI)        # its slot is free again
    assert again.call(P.Proc.CONNECT_GET_TYPE)["type"] == "secret"


@pytest.mark.parametrize("remote", [RpcLimits(max_clients_per_uid=4, max_remote_clients=6)], indirect=True)
def test_remote_hosts_together_are_bounded_and_leave_the_local_slots(remote):
    """77 hosts of 64 connections each could take every slot but root's, and with them every
    local user's: remote connections together are max_remote_clients at most."""
    held = [remote.connect("192.0.2.1").open(URI) for _ in range(4)] + \
        [remote.connect("192.0.2.2").open(URI) for _ in range(2)]
    assert closed_by_server(remote.connect("192.0.2.3"))       # a host with none yet: the pool is full
    with remote.ip.opened() as local:                           # a local caller is served
        assert local.call(P.Proc.CONNECT_GET_TYPE)["type"] == "secret"
    held[0].close()
    wait_until(lambda: remote.ip.server.clients == 5, timeout=5, what="the closed connection's slot back")
    third = remote.connect("192.0.2.3").open(URI)
    assert third.call(P.Proc.CONNECT_GET_TYPE)["type"] == "secret"


def test_an_ipv6_host_is_counted_by_its_64():
    """One interface may use any address of its /64: counted per address, one machine would
    get max_clients_per_uid connections per address, every slot."""
    assert host_of("[2001:db8::1]:16514") == host_of("[2001:db8::ffff:1:2]:1") == "[2001:db8::]/64"
    assert host_of("[2001:db8:0:1::1]:1") == "[2001:db8:0:1::]/64"
    assert host_of("[::ffff:192.0.2.9]:7") == host_of("192.0.2.9:8") == "192.0.2.9"
    assert host_of("[fe80::1%eth0]:3") == "[fe80::]/64"
    assert host_of("192.0.2.1:5") == "192.0.2.1"


def test_addresses_of_one_ipv6_64_share_one_hosts_connections(remote):
    held = [remote.connect(f"[2001:db8::{i + 1:x}]").open(URI) for i in range(4)]
    assert closed_by_server(remote.connect("[2001:db8::ffff]"))
    mapped = remote.connect("[::ffff:192.0.2.200]").open(URI)   # an IPv4 host
    assert mapped.call(P.Proc.CONNECT_GET_TYPE)["type"] == "secret"
    other = remote.connect("[2001:db8:0:1::1]").open(URI)     # another /64: another host
    assert other.call(P.Proc.CONNECT_GET_TYPE)["type"] == "secret"
    assert len(held) == 4


def test_a_remote_hosts_event_callbacks_are_counted_together(remote, monkeypatch):
    """A host with a read-only grant could otherwise register MAX_PER_CONNECTION on each of
    thousands of connections (each event is matched against every registration)."""
    monkeypatch.setattr(events, "MAX_PER_CONNECTION", 3)
    monkeypatch.setattr(events, "MAX_PER_UID", 5)
    a, b = remote.connect("192.0.2.7").open(URI), remote.connect("192.0.2.7").open(URI)
    for _ in range(3):
        a.call(REG, {"eventID": 0, "secret": None})
    with pytest.raises(RemoteError, match="this connection has 3 event callbacks"):
        a.call(REG, {"eventID": 0, "secret": None})
    for _ in range(2):
        b.call(REG, {"eventID": 1, "secret": None})
    with pytest.raises(RemoteError, match="this host has 5 event callbacks"):
        b.call(REG, {"eventID": 1, "secret": None})
    c = remote.connect("192.0.2.8").open(URI)            # another host: its own count
    for _ in range(3):
        c.call(REG, {"eventID": 0, "secret": None})
    b.close()                                            # its callbacks go with it
    d = remote.connect("192.0.2.7").open(URI)
    wait_until(lambda: remote.ip.server.clients == 3, timeout=5, what="b's connection gone")
    d.call(REG, {"eventID": 0, "secret": None})


SHARE = 256 * 1024


def big_call(serial: int, size: int) -> bytes:
    return encode_frame(Header(P.REMOTE_PROGRAM, 1, UNKNOWN, P.MsgType.CALL, serial, P.Status.OK), b"\0" * size)


@pytest.mark.parametrize("remote", [RpcLimits(max_frame=SHARE, uid_frame_bytes=SHARE)], indirect=True)
def test_a_remote_hosts_connections_share_one_frame_budget(remote):
    """A half-sent frame on one connection of a host holds its bytes from the host's share: the
    host's next frame that does not fit waits unread until the first is answered; another host's
    is read at once."""
    a, b, c = (remote.connect(h).open(URI) for h in ("192.0.2.1", "192.0.2.1", "192.0.2.2"))
    half = big_call(50, 200 * 1024)
    a.send_raw(half[:100 * 1024])                        # holds ~200 KiB of 192.0.2.1's 256 KiB
    b.send_raw(big_call(60, 100 * 1024))
    c.send_raw(big_call(70, 100 * 1024))
    head, err = c.read_reply(70)
    assert head.status == P.Status.ERROR and err["message"].startswith("unknown procedure")
    b.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        b.read_frame()                                   # not read: it waits for a's frame
    a.send_raw(half[100 * 1024:])
    assert a.read_reply(50)[0].status == P.Status.ERROR
    b.sock.settimeout(5)
    head, err = b.read_reply(60)
    assert head.status == P.Status.ERROR and err["message"].startswith("unknown procedure")
    assert b.call(P.Proc.CONNECT_GET_TYPE)["type"] == "secret"


def test_shares_left_by_calls_of_closed_connections_are_swept(remote):
    """_forget keeps a host's share while a closed connection's call still holds its bytes; once
    given back it is idle, and the next new share sweeps those out (many hosts would grow it)."""
    from secretbus.rpc.uidshare import UidShare
    server = remote.ip.server
    server._shares.update({f"198.51.100.{i}": UidShare() for i in range(200)})     # idle, no connection
    held = server._shares["203.0.113.9"] = UidShare()
    held.held = 4096                                     # a closed connection's call still runs
    remote.connect("192.0.2.1").open(URI)
    assert set(server._shares) == {"203.0.113.9", "192.0.2.1"}

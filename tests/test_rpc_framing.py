"""The connection's frame parser (rpc/connection.py) on a fake transport: frames cut anywhere
or packed many to a read, the in-flight bound (reading paused, then resumed), the frame-size
bound, the unread-output hold, and the stream path (TLS, SASL) through the same parser."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from secretbus.rpc import protocol as P
from secretbus.rpc import xdr
from secretbus.rpc.connection import (
    LARGE_FRAME,
    MAX_LARGE,
    OUT_BYTES,
    PRE_AUTH_FRAME,
    WRITE_HIGH_WATER,
    Connection,
    RpcLimits,
)
from secretbus.rpc.frame import LENGTH_SIZE, Header, decode_frame, encode_frame
from secretbus.rpc.procedures import Handler
from secretbus.rpc.session import Peer, Session
from secretbus.rpc.uidshare import UidShare

TYPE = P.Proc.CONNECT_GET_TYPE           # answered at once
WAIT = P.Proc.CONNECT_GET_HOSTNAME       # answered when the test says so
BIG = P.Proc.SECRET_DEFINE_XML           # takes a long string; answered when the test says so


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.paused = False
        self.pauses = 0
        self.closed = self.aborted = False
        self.unread = 0                     # what get_write_buffer_size() reports

    def write(self, data: Any) -> None:
        self.out += data

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.unread

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def replies(self) -> list[tuple[int, Any]]:
        """(serial, decoded reply) of every whole frame written so far."""
        out, data = [], bytes(self.out)
        while data:
            n = int.from_bytes(data[:LENGTH_SIZE], "big")
            h, payload = decode_frame(data[:n])
            out.append((h.serial, xdr.decode(P.PROCS[h.proc].ret, payload)))
            data = data[n:]
        return out


def call(proc: int, serial: int) -> bytes:
    return encode_frame(Header(P.REMOTE_PROGRAM, 1, proc, P.MsgType.CALL, serial, P.Status.OK),
                        xdr.encode(P.PROCS[proc].args, None))


class Rig:
    def __init__(self, limits: RpcLimits, *, share: UidShare | None = None, authenticated: bool = True,
                 table: dict[int, Handler] | None = None):
        self.gates: list[asyncio.Future[None]] = []

        async def wait(_c: Any, _a: Any) -> Any:
            gate = asyncio.get_running_loop().create_future()
            self.gates.append(gate)
            await gate
            return {"hostname": "h"}
        async def big(_c: Any, _a: Any) -> Any:
            gate = asyncio.get_running_loop().create_future()
            self.gates.append(gate)
            await gate
            return {"secret": {"uuid": b"\0" * 16, "usageType": 0, "usageID": "x"}}
        table = {TYPE: Handler(lambda _c, _a: {"type": "secret"}), WAIT: Handler(wait), BIG: Handler(big),
                 **(table or {})}
        session = Session(Peer(pid=1, uid=0 if share is None else 1000, gid=0), socket_readonly=False,
                          trusted=share is None, authenticated=authenticated, opened=authenticated)
        self.closed: list[Connection] = []
        self.conn = Connection(session, table, limits, self.closed.append, share)
        self.t = FakeTransport()
        self.conn.connection_made(self.t)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 27, 28, 29, 1000])
def test_frames_cut_anywhere_or_packed_are_answered_in_order(cut):
    async def main() -> None:
        r = Rig(RpcLimits())
        stream = b"".join(call(TYPE, i) for i in range(20))
        for i in range(0, len(stream), cut):
            r.conn.data_received(stream[i:i + cut])
        assert r.t.replies() == [(i, {"type": "secret"}) for i in range(20)]
        assert r.conn.in_flight == 0 and not r.t.paused
        r.conn.close()
    asyncio.run(main())


def test_a_full_connection_stops_reading_until_a_call_ends():
    async def main() -> None:
        r = Rig(RpcLimits(max_requests=3))
        # five slow calls and a fast one in one read: three run, the rest wait, reading stops
        r.conn.data_received(b"".join(call(WAIT, i) for i in range(5)) + call(TYPE, 5))
        await settle()
        assert (len(r.gates), r.conn.in_flight, r.t.paused, r.t.out) == (3, 3, True, bytearray())
        r.gates[0].set_result(None)
        await settle()
        # one slot freed: the fourth call runs, reading is still off (the connection is full again)
        assert [s for s, _ in r.t.replies()] == [0]
        assert (len(r.gates), r.conn.in_flight, r.t.paused) == (4, 3, True)
        for g in r.gates[1:]:
            g.set_result(None)
        await settle()
        r.gates[4].set_result(None)
        await settle()
        assert sorted(s for s, _ in r.t.replies()) == [0, 1, 2, 3, 4, 5]
        assert r.conn.in_flight == 0 and not r.t.paused
        r.conn.close()
    asyncio.run(main())


def big_call(serial: int) -> bytes:
    return encode_frame(Header(P.REMOTE_PROGRAM, 1, BIG, P.MsgType.CALL, serial, P.Status.OK),
                        xdr.encode(P.PROCS[BIG].args, {"xml": "x" * LARGE_FRAME, "flags": 0}))


def test_large_frames_in_flight_are_bounded_apart_from_small_ones():
    """16 calls may be in flight, but at most MAX_LARGE frames over LARGE_FRAME: a flood of
    large defines holds a few MiB per connection, not 16 × max_frame; small calls still run."""
    async def main() -> None:
        r = Rig(RpcLimits(max_requests=16))
        r.conn.data_received(b"".join(big_call(i) for i in range(4)))
        await settle()
        assert (len(r.gates), r.conn.in_flight, r.t.paused) == (MAX_LARGE, MAX_LARGE, True)
        r.gates[0].set_result(None)
        await settle()
        # one large slot freed: the next large frame runs, the last still waits
        assert (len(r.gates), r.conn.in_flight, r.t.paused) == (MAX_LARGE + 1, MAX_LARGE, True)
        for g in r.gates[1:]:
            g.set_result(None)
        await settle()
        for g in r.gates[MAX_LARGE + 1:]:
            g.set_result(None)
        await settle()
        assert sorted(s for s, _ in r.t.replies()) == [0, 1, 2, 3]
        assert r.conn.in_flight == 0 and not r.t.paused
        # small calls are not held back by the large bound
        r.conn.data_received(big_call(10) + big_call(11) + b"".join(call(WAIT, 20 + i) for i in range(5)))
        await settle()
        assert (len(r.gates), r.conn.in_flight, r.t.paused) == (4 + MAX_LARGE + 5, MAX_LARGE + 5, False)
        for g in r.gates[4:]:
            g.set_result(None)
        await settle()
        assert r.conn.in_flight == 0
        r.conn.close()
    asyncio.run(main())


def test_a_frame_over_libvirts_bound_aborts_before_it_is_read():
    async def main() -> None:
        r = Rig(RpcLimits(max_frame=1000))
        r.conn.data_received((P.MESSAGE_MAX + LENGTH_SIZE + 1).to_bytes(4, "big") + b"\0" * 10)
        assert r.t.aborted and r.closed == [r.conn]
        r.conn.data_received(call(TYPE, 1))         # nothing more is served
        assert r.t.out == bytearray()
    asyncio.run(main())


def raw_frame(proc: int, serial: int, payload: bytes, msg_type: P.MsgType = P.MsgType.CALL) -> bytes:
    return encode_frame(Header(P.REMOTE_PROGRAM, 1, proc, msg_type, serial, P.Status.OK), payload)


def answers(t: FakeTransport) -> list[tuple[int, Any]]:
    """(serial, the reply or (code, message) of the error) of every whole frame written."""
    out, data = [], bytes(t.out)
    while data:
        n = int.from_bytes(data[:LENGTH_SIZE], "big")
        h, payload = decode_frame(data[:n])
        if h.status == P.Status.ERROR:
            e = xdr.decode(P.REMOTE_ERROR, payload)
            out.append((h.serial, (e["code"], e["message"])))
        else:
            out.append((h.serial, xdr.decode(P.PROCS[h.proc].ret, payload)))
        data = data[n:]
    return out


@pytest.mark.parametrize("cut", [1, 7, 28, 1000, 1 << 20])
@pytest.mark.parametrize("shared", [False, True])
def test_a_call_over_max_frame_is_read_past_and_refused(cut, shared):
    """A call larger than max_frame but within libvirt's bound (libvirt takes a define of up to
    its 4 MiB string) is not buffered: read past, its header kept, answered with an error, and
    the connection goes on. It takes nothing from its uid's frame budget (smaller than it)."""
    from secretbus.core.secretxml import MAX_XML_BYTES
    async def main() -> None:
        share = UidShare(3000) if shared else None
        r = Rig(RpcLimits(max_frame=2000), share=share)
        define = xdr.encode(P.PROCS[BIG].args, {"xml": "x" * 5000, "flags": 0})
        stream = (raw_frame(BIG, 1, define) + raw_frame(9999, 2, bytes(4000)) + raw_frame(TYPE, 3, bytes(4000))
                  + raw_frame(TYPE, 9, bytes(4000), P.MsgType.REPLY) + call(TYPE, 4))
        for i in range(0, len(stream), cut):
            r.conn.data_received(stream[i:i + cut])
        await settle()
        assert answers(r.t) == [
            (1, (27, f"XML error: secret XML document is larger than {MAX_XML_BYTES} bytes")),
            (2, (39, "unknown procedure: 9999")),
            (3, (39, f"message of {P.HEADER_SIZE + 4000} bytes is larger than the 2000 this server reads")),
            (4, {"type": "secret"})]
        assert not r.t.aborted and r.conn.in_flight == 0 and not r.t.paused
        if share is not None:
            assert share.take(r.conn, 3000)             # the whole budget is still there
        r.conn.close()
    asyncio.run(main())


def test_bad_calls_never_read_stop_the_reading():
    """An error reply or a PONG holds no slot, so a client sending bad calls or PINGs and never
    reading used to grow our output without end: no frame is read while more than the
    high-water mark is unread, and reading resumes once the client has read."""
    async def main() -> None:
        r = Rig(RpcLimits())
        def write(data: Any) -> None:             # nothing written is read
            r.t.out += data
            r.t.unread += len(data)
            if r.t.unread > WRITE_HIGH_WATER and not r.conn._write_paused:
                r.conn.pause_writing()
        r.t.write = write                         # type: ignore[method-assign]
        ping = encode_frame(Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PING, P.MsgType.MESSAGE, 0, P.Status.OK))
        flood = b"".join(raw_frame(9999, i, b"") + ping for i in range(20000))
        r.conn.data_received(flood)
        await settle()
        held = len(r.t.out)
        assert r.t.paused and WRITE_HIGH_WATER < held < WRITE_HIGH_WATER + 200
        r.conn.data_received(b"")                 # (a paused transport delivers nothing more)
        await settle()
        assert len(r.t.out) == held
        answered = 0
        while r.t.paused:                         # the client reads everything, round by round
            answered = len(r.t.out)
            r.t.unread = 0
            r.conn.resume_writing()
            await settle()
            assert len(r.t.out) > answered
        got = answers_and_pongs(r.t)
        assert sum(a == "pong" for _, a in got) == 20000
        assert [s for s, a in got if a != "pong"] == list(range(20000))
        r.conn.close()
    asyncio.run(main())


def answers_and_pongs(t: FakeTransport) -> list[tuple[int, Any]]:
    out, data, pos = [], memoryview(bytes(t.out)), 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + LENGTH_SIZE], "big")
        h, payload = decode_frame(data[pos:pos + n])
        out.append((h.serial, "pong" if h.prog == P.KEEPALIVE_PROGRAM else xdr.decode(P.REMOTE_ERROR, payload)))
        pos += n
    return out


def test_before_authentication_a_frame_is_at_most_a_sasl_step():
    """The largest call an unauthenticated peer may make is a SASL step with 64 KiB of data
    (4 bytes a byte on the wire): it is read and answered; a larger frame aborts at its length."""
    async def main() -> None:
        async def step(_c: Any, a: Any) -> Any:
            return {"complete": 0, "nil": 0, "data": a["data"][:1]}
        r = Rig(RpcLimits(), authenticated=False, table={P.Proc.AUTH_SASL_STEP: Handler(step, pre_auth=True,
                                                                                        pre_open=True)})
        biggest = encode_frame(Header(P.REMOTE_PROGRAM, 1, P.Proc.AUTH_SASL_STEP, P.MsgType.CALL, 1, P.Status.OK),
                               xdr.encode(P.PROCS[P.Proc.AUTH_SASL_STEP].args,
                                          {"nil": 0, "data": b"x" * P.REMOTE_AUTH_SASL_DATA_MAX}))
        assert LARGE_FRAME < len(biggest) <= PRE_AUTH_FRAME + LENGTH_SIZE
        r.conn.data_received(biggest)
        await settle()
        assert r.t.replies() == [(1, {"complete": 0, "nil": 0, "data": b"x"})]
        r.conn.data_received((PRE_AUTH_FRAME + LENGTH_SIZE + 1).to_bytes(4, "big"))
        assert r.t.aborted and r.closed == [r.conn]
    asyncio.run(main())


def test_a_uids_connections_share_one_frame_budget():
    """Frames are held against the uid's budget from their length word to their answer: a
    frame that does not fit stops its connection reading, however many connections the uid
    opens, until the uid's earlier frames are answered; then it is read and served."""
    async def main() -> None:
        frame = len(big_call(0)) - LENGTH_SIZE     # what a frame holds: all but its length word
        budget = UidShare(2 * frame + 100)
        a, b = Rig(RpcLimits(), share=budget), Rig(RpcLimits(), share=budget)
        b.gates = a.gates
        a.conn.data_received(big_call(1))
        b.conn.data_received(big_call(2) + call(TYPE, 3))
        await settle()
        assert (budget.held, len(a.gates), a.t.paused, b.t.paused) == (2 * frame, 2, False, False)
        # a third large frame, half sent: it does not fit, nothing of it is kept but the read
        c = Rig(RpcLimits(), share=budget)
        c.gates = a.gates
        c.conn.data_received(big_call(4)[:1000])
        assert c.t.paused and c.conn._chunks == [] and budget.held == 2 * frame
        # a small call behind it on another connection waits its turn too (FIFO)
        b.conn.data_received(call(TYPE, 5))
        assert b.t.paused and [s for s, _ in b.t.replies()] == [3]
        a.gates[0].set_result(None)         # the first answered: its bytes go to c's frame
        await settle()
        assert [s for s, _ in a.t.replies()] == [1] and not c.t.paused and budget.held == 2 * frame
        c.conn.data_received(big_call(4)[1000:])
        await settle()
        assert len(a.gates) == 3
        assert [s for s, _ in b.t.replies()] == [3, 5] and not b.t.paused   # the small one fitted
        for g in a.gates[1:]:
            g.set_result(None)
        await settle()
        assert [s for s, _ in c.t.replies()] == [4] and budget.held == 0
        for r in (a, b, c):
            r.conn.close()
        assert budget.idle
    asyncio.run(main())


def test_a_closed_connection_gives_back_what_it_held_or_was_given():
    async def main() -> None:
        frame = len(big_call(0)) - LENGTH_SIZE     # what a frame holds: all but its length word
        budget = UidShare(frame + 10)     # one large frame, and no small one beside it
        a, b, c = (Rig(RpcLimits(), share=budget) for _ in range(3))
        a.conn.data_received(big_call(1)[:5000])         # held while it arrives
        b.conn.data_received(big_call(2)[:5000])         # waits
        c.conn.data_received(call(TYPE, 3))               # waits behind b
        assert budget.held == frame and b.t.paused and c.t.paused
        a.conn.close()                                     # a's bytes go to b's frame
        assert budget.held == frame
        b.conn.close()                                     # b's grant, never used, goes on to c
        await settle()
        assert [s for s, _ in c.t.replies()] == [3] and budget.held == 0
        c.conn.close()
        assert budget.idle
    asyncio.run(main())


def test_events_a_uids_connections_leave_unread_are_bounded_together():
    """Each connection may leave max_unread of events unread, but a uid has 64 connections:
    one that is itself behind is dropped once the uid's connections together leave more than
    uid_max_unread; one that reads is never dropped for another's backlog."""
    async def main() -> None:
        share = UidShare()
        limits = RpcLimits(max_unread=1000 * WRITE_HIGH_WATER, uid_max_unread=4 * WRITE_HIGH_WATER)
        behind, other, reader = (Rig(limits, share=share) for _ in range(3))
        behind.t.unread = other.t.unread = 2 * WRITE_HIGH_WATER
        reader.t.unread = 0
        for r in (behind, other, reader):
            r.conn.send_message(P.Proc.SECRET_EVENT_VALUE_CHANGED, b"e")
        assert not any(r.t.aborted for r in (behind, other, reader))     # exactly at the bound
        behind.t.unread += 1
        reader.conn.send_message(P.Proc.SECRET_EVENT_VALUE_CHANGED, b"e")
        assert not reader.t.aborted                 # over it, but this one reads
        behind.conn.send_message(P.Proc.SECRET_EVENT_VALUE_CHANGED, b"e")
        assert behind.t.aborted and behind.conn not in share.connections
        other.conn.send_message(P.Proc.SECRET_EVENT_VALUE_CHANGED, b"e")
        assert not other.t.aborted                  # the uid is back under its bound
        # root (no share) keeps the per-connection bound only
        root = Rig(limits)
        root.t.unread = 999 * WRITE_HIGH_WATER
        root.conn.send_message(P.Proc.SECRET_EVENT_VALUE_CHANGED, b"e")
        assert not root.t.aborted
        for r in (other, reader, root):
            r.conn.close()
        assert share.idle
    asyncio.run(main())


def test_replies_a_uids_connections_leave_unread_are_bounded_together():
    """The same rule for replies: 64 connections × 16 lists never read held every reply here.
    A reply that finds its connection behind while the uid's connections together leave more
    than uid_max_unread drops that connection instead of queueing; one that reads is answered.
    (The calls are read before their connections fall behind: a connection already behind
    reads no new call, test_bad_calls_never_read_stop_the_reading.)"""
    async def main() -> None:
        share = UidShare()
        limits = RpcLimits(uid_max_unread=4 * WRITE_HIGH_WATER)
        behind, other, reader = (Rig(limits, share=share) for _ in range(3))
        for n, r in enumerate((behind, other, reader)):
            r.conn.data_received(call(WAIT, n))
        await settle()
        behind.t.unread = other.t.unread = 2 * WRITE_HIGH_WATER + 1
        reader.gates[0].set_result(None)
        await settle()
        assert not reader.t.aborted and reader.t.out     # over the uid's bound, but it reads
        sent = len(behind.t.out)
        behind.gates[0].set_result(None)
        await settle()
        assert behind.t.aborted and len(behind.t.out) == sent and behind.conn not in share.connections
        other.t.unread = 0                               # (drained, so that its reply is not held)
        other.gates[0].set_result(None)
        await settle()
        assert not other.t.aborted                       # the uid is back under its bound
        root = Rig(limits)                               # root: no share, answered however behind
        root.conn.data_received(call(WAIT, 10))
        await settle()
        root.t.unread = 999 * WRITE_HIGH_WATER
        root.gates[0].set_result(None)
        await settle()
        assert not root.t.aborted and [s for s, _ in root.t.replies()] == [10]
        for r in (other, reader, root):
            r.conn.close()
        await settle()
    asyncio.run(main())


def test_the_frame_budget_in_order():
    class W:
        def __init__(self) -> None:
            self.got: list[int] = []

        def frame_granted(self, n: int) -> None:
            self.got.append(n)
    budget = UidShare(100)
    x, y, z = W(), W(), W()
    assert budget.take(x, 60) and not budget.take(y, 50) and not budget.take(z, 10)
    assert not budget.take(y, 50) and budget.held == 60      # asking again does not queue twice
    budget.give(60)
    assert (x.got, y.got, z.got, budget.held) == ([], [50], [10], 60)   # in order, both fit
    assert not budget.take(x, 50)
    budget.cancel(x)
    assert budget.take(x, 40) and budget.held == 100
    budget.give(50)
    budget.give(10)
    budget.give(40)
    assert budget.idle


def test_a_large_frame_in_small_pieces_is_kept_as_pieces_until_whole():
    async def main() -> None:
        r = Rig(RpcLimits())
        big = encode_frame(Header(P.REMOTE_PROGRAM, 1, TYPE, P.MsgType.CALL, 7, P.Status.OK), b"\0" * 100_000)
        for i in range(0, len(big) - 1, 4096):
            r.conn.data_received(big[i:min(i + 4096, len(big) - 1)])
        assert len(r.conn._chunks) > 20 and r.t.out == bytearray()     # not joined per piece
        r.conn.data_received(big[-1:] + call(TYPE, 8))
        # the payload does not decode (trailing bytes): an error reply, then the next call
        frames = bytes(r.t.out)
        n = int.from_bytes(frames[:4], "big")
        h, _ = decode_frame(frames[:n])
        assert (h.serial, h.status) == (7, P.Status.ERROR)
        h, _ = decode_frame(frames[n:])
        assert (h.serial, h.status) == (8, P.Status.OK)
        assert r.conn._chunks == []
        r.conn.close()
    asyncio.run(main())


def first_write_unread(r: Rig) -> list[bytes]:
    """The client leaves the connection's first write unread (over the high-water mark, as the
    transport says) until the test says otherwise; what is written is listed, a write each."""
    writes: list[bytes] = []

    def write(data: Any) -> None:
        if not r.t.out:
            r.t.unread = WRITE_HIGH_WATER + 1
            r.conn.pause_writing()
        writes.append(bytes(data))
        r.t.out += data
    r.t.write = write                         # type: ignore[method-assign]
    return writes


def test_replies_the_client_does_not_read_stop_the_reading():
    """What one read asks is answered in one write; while the client leaves that unread,
    the next read waits in the kernel."""
    async def main() -> None:
        r = Rig(RpcLimits(max_requests=1))
        writes = first_write_unread(r)
        r.conn.data_received(call(TYPE, 0) + call(TYPE, 1))
        await settle()
        assert [s for s, _ in r.t.replies()] == [0, 1] and len(writes) == 1
        r.conn.data_received(call(TYPE, 2))
        await settle()
        assert [s for s, _ in r.t.replies()] == [0, 1] and r.t.paused
        r.t.unread = 0
        r.conn.resume_writing()
        await settle()
        assert [s for s, _ in r.t.replies()] == [0, 1, 2] and r.conn.in_flight == 0 and not r.t.paused
        r.conn.close()
    asyncio.run(main())


def test_a_large_reply_is_written_at_once_and_holds_its_slot():
    """Replies of one read are written together only up to OUT_BYTES: a larger one goes out
    when it is made, and while the client leaves it unread its slot stays taken."""
    uri = P.Proc.CONNECT_GET_URI
    async def main() -> None:
        r = Rig(RpcLimits(max_requests=1), table={uri: Handler(lambda _c, _a: {"uri": "u" * OUT_BYTES})})
        writes = first_write_unread(r)
        r.conn.data_received(call(uri, 0) + call(TYPE, 1))
        await settle()
        assert [s for s, _ in r.t.replies()] == [0] and len(writes) == 1 and r.conn.in_flight == 1
        r.t.unread = 0
        r.conn.resume_writing()
        await settle()
        assert [s for s, _ in r.t.replies()] == [0, 1] and len(writes) == 2 and r.conn.in_flight == 0
        r.conn.close()
    asyncio.run(main())


def test_the_stream_path_parses_the_same_and_stops_reading_when_full():
    async def main() -> None:
        r = Rig(RpcLimits(max_requests=2))
        t = FakeTransport()
        reader = asyncio.StreamReader()
        proto = asyncio.StreamReaderProtocol(reader)
        proto.connection_made(t)
        writer = asyncio.StreamWriter(t, proto, reader, asyncio.get_running_loop())
        conn = Connection(r.conn.session, r.conn._table, RpcLimits(max_requests=2), r.closed.append)
        task = asyncio.get_running_loop().create_task(conn.serve_stream(reader, writer))
        reader.feed_data(b"".join(call(WAIT, i) for i in range(3)))
        await settle()
        assert conn.in_flight == 2 and len(r.gates) == 2 and not t.paused   # the loop waits, not the transport
        reader.feed_data(call(TYPE, 9)[:10])
        await settle()
        for g in r.gates[:2]:
            g.set_result(None)
        await settle()
        assert len(r.gates) == 3
        r.gates[2].set_result(None)
        reader.feed_data(call(TYPE, 9)[10:])
        await settle()
        assert sorted(s for s, _ in t.replies()) == [0, 1, 2, 9]
        reader.feed_eof()
        await asyncio.wait_for(task, 5)
        assert t.closed and conn in r.closed
        r.conn.close()
    asyncio.run(main())


# -- the client's reader (rpc/client.py), the same framing from the other side ---------------
@pytest.mark.parametrize("cut", [1, 4, 5, 29, 100, 1 << 20])
def test_the_client_reads_replies_cut_anywhere_or_many_at_once(cut):
    from secretbus.rpc.client import AsyncRpcClient

    async def main() -> None:
        loop = asyncio.get_running_loop()
        t = FakeTransport()
        reader = asyncio.StreamReader()
        proto = asyncio.StreamReaderProtocol(reader)
        proto.connection_made(t)
        client = AsyncRpcClient(reader, asyncio.StreamWriter(t, proto, reader, loop), where="test")
        futs = [client.send(TYPE) for _ in range(6)]
        sent = bytes(t.out)
        t.out.clear()

        def reply(serial: int, value: str) -> bytes:
            return encode_frame(Header(P.REMOTE_PROGRAM, 1, TYPE, P.MsgType.REPLY, serial, P.Status.OK),
                                xdr.encode(P.PROCS[TYPE].ret, {"type": value}))
        ping = encode_frame(Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PING, P.MsgType.MESSAGE, 0, P.Status.OK))
        big = "x" * 300_000             # a reply larger than one read
        stream = reply(3, "c") + ping + reply(0, big) + b"".join(reply(i, str(i)) for i in (1, 2, 4, 5))
        for i in range(0, len(stream), cut):
            reader.feed_data(stream[i:i + cut])
            await asyncio.sleep(0)
        got = await asyncio.wait_for(asyncio.gather(*futs), 5)
        assert got == [{"type": v} for v in (big, "1", "2", "c", "4", "5")]
        assert len(sent) == 6 * 28 and bytes(t.out) == encode_frame(
            Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PONG, P.MsgType.MESSAGE, 0, P.Status.OK))
        reader.feed_data((P.MESSAGE_MAX + 5).to_bytes(4, "big"))      # out of bounds: the stream is dropped
        await asyncio.sleep(0)
        assert client.closed
        await client.close(goodbye=False, wait=0.1)
    asyncio.run(main())

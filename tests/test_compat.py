"""Each private API that secretbus/bus/compat.py leans on still exists and still behaves as
the workaround assumes. A failure here means upstream changed: revisit the entry."""
from __future__ import annotations

import asyncio
import socket
from typing import Any

from dbus_fast import Message
from dbus_fast.aio import MessageBus

from secretbus.bus import compat


class _Bus:
    """What dbus-fast's aio _MessageWriter reads of its MessageBus."""

    def __init__(self, sock: socket.socket):
        self._sock, self._fd, self._negotiate_unix_fd = sock, sock.fileno(), False
        self._loop = asyncio.get_running_loop()
        self._user_disconnect = False
        self.unique_name = ":1.1"
        self.finalized: list[Exception] = []
        self._writer: Any = None

    def _finalize(self, e: Exception) -> None:
        self.finalized.append(e)


def test_dbus_fast_pending_call_handlers():
    async def main():
        bus = MessageBus(bus_address="unix:path=/nonexistent")
        # A dict keyed by serial (compat.forget_pending_call).
        assert isinstance(bus._method_return_handlers, dict)
        bus._method_return_handlers[7] = lambda *a: None
        compat.forget_pending_call(bus, 7)
        assert 7 not in bus._method_return_handlers
    asyncio.run(main())


def _full_writer(wrap: bool):
    from dbus_fast.aio.message_bus import _MessageWriter
    a, b = socket.socketpair()
    a.setblocking(False)
    while True:                                   # fill the send buffer
        try:
            a.send(b"\0" * 65536)
        except BlockingIOError:
            break
    bus = _Bus(a)
    writer = _MessageWriter(bus)  # type: ignore[arg-type]  # a stand-in with what it reads
    bus._writer = writer
    assert writer.sock is a                       # the attribute the workaround replaces
    if wrap:
        compat.eagain_is_not_fatal(bus)
        compat.eagain_is_not_fatal(bus)           # idempotent
        assert isinstance(writer.sock, compat.EagainIsNotFatal) and writer.sock._sock is a
    writer.buffer_message(Message(path="/", interface="a.b", member="C"))
    writer.write_callback(remove_writer=False)
    return bus, writer, (a, b)


def test_eagain_still_fatal_upstream_and_not_with_the_workaround():
    async def main():
        bus, writer, socks = _full_writer(wrap=False)
        # Upstream still drops the connection on EAGAIN; when this fails, dbus-fast handles it
        # and compat.eagain_is_not_fatal can go.
        assert len(bus.finalized) == 1 and isinstance(bus.finalized[0], BlockingIOError)
        for s in socks:
            s.close()
        bus, writer, socks = _full_writer(wrap=True)
        assert bus.finalized == [] and writer.buf is not None   # kept, waits for writability
        assert writer.sock.fileno() == socks[0].fileno()         # the rest passes through
        for s in socks:
            s.close()
    asyncio.run(main())


def test_dbus_fast_writer_queue_is_measured():
    """compat.queued_bytes: the writer keeps (marshalled bytes, fds, future) entries and the
    message in progress in buf/offset/fut; a full socket keeps the message queued."""
    async def main():
        bus, writer, socks = _full_writer(wrap=True)
        fut = asyncio.get_running_loop().create_future()
        msg = Message(path="/", interface="a.b", member="D", signature="s", body=["x" * 1000])
        writer.schedule_write(msg, fut)
        n = compat.queued_bytes(bus, fut)
        assert n == len(msg._marshall(False)) and n > 1000
        other = asyncio.get_running_loop().create_future()
        assert compat.queued_bytes(bus, other) == 0            # not ours: unknown, 0
        # the message in progress (part-written) counts what is left of it
        writer.buf, writer.offset, writer.fut = memoryview(b"\0" * 100), 40, other
        assert compat.queued_bytes(bus, other) == 60
        for s in socks:
            s.close()
    asyncio.run(main())


def test_dbus_fast_bus_address_and_socket_are_reachable(session_bus):
    """compat.bus_address reads the parsed `_bus_address` (the lookups' second connection goes
    to the same bus with it) and compat.set_send_buffer reaches `_writer.sock`."""
    async def main():
        bus = await MessageBus(bus_address=session_bus.address).connect()
        try:
            again = compat.bus_address(bus)
            assert again is not None and again.startswith("unix:")
            second = await MessageBus(bus_address=again).connect()     # the same bus, another name
            assert second.unique_name != bus.unique_name
            second.disconnect()
            assert compat.set_send_buffer(bus, 32768)
            sock = bus._writer.sock
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 32768
        finally:
            bus.disconnect()
    asyncio.run(main())


class _CountingSock:
    """A socket whose sendmsg calls are counted (the writer's `sock`)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.calls = sock, 0

    def sendmsg(self, bufs: list) -> int:
        self.calls += 1
        return self.sock.sendmsg(bufs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def _writer_on_socketpair(sndbuf: int | None = None):
    from dbus_fast.aio.message_bus import _MessageWriter
    a, b = socket.socketpair()
    a.setblocking(False)
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    bus = _Bus(a)
    writer = _MessageWriter(bus)  # type: ignore[arg-type]  # a stand-in with what it reads
    bus._writer = writer
    compat.eagain_is_not_fatal(bus)
    counting = _CountingSock(writer.sock)
    writer.sock = counting
    assert compat.coalesce_writes(bus)
    assert not compat.coalesce_writes(bus)          # once
    return bus, writer, counting, (a, b)


def _read_all(sock: socket.socket, n: int) -> bytes:
    got = b""
    sock.settimeout(5)
    while len(got) < n:
        got += sock.recv(n - len(got))
    return got


def test_messages_of_one_iteration_go_out_in_one_sendmsg_in_order():
    """compat.coalesce_writes: messages sent in one loop iteration leave in one sendmsg, in
    order; each future is done once its bytes are out; the queue is measured as before."""
    async def main():
        bus, writer, counting, (a, b) = _writer_on_socketpair()
        loop = asyncio.get_running_loop()
        msgs = [Message(path="/", interface="a.b", member="M", signature="s", body=[f"m{i}"]) for i in range(5)]
        futs = [loop.create_future() for _ in msgs]
        for m, f in zip(msgs, futs, strict=True):
            writer.schedule_write(m, f)
        # queued, not yet sent: the last one is measured as the writer's last entry
        assert compat.queued_bytes(bus, futs[-1]) == len(msgs[-1]._marshall(False))
        assert counting.calls == 0 and not any(f.done() for f in futs)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert counting.calls == 1 and all(f.done() for f in futs)
        # flush_writes (before a disconnect) sends at once what waits for the iteration's end
        last = loop.create_future()
        writer.schedule_write(Message(path="/", interface="a.b", member="Last"), last)
        compat.flush_writes(bus)
        assert counting.calls == 2 and last.done()
        msgs.append(Message(path="/", interface="a.b", member="Last"))
        want = b"".join(bytes(m._marshall(False)) for m in msgs)
        assert _read_all(b, len(want)) == want
        assert bus.finalized == [] and writer.buf is None and not writer.messages
        a.close()
        b.close()
    asyncio.run(main())


def test_a_partial_coalesced_write_is_finished_by_the_writer_callback():
    """A socket that takes only part of the batch: the rest stays in buf/offset/fut and the
    queue, dbus-fast's writer callback sends it when the socket is writable again."""
    async def main():
        bus, writer, counting, (a, b) = _writer_on_socketpair(sndbuf=4096)
        loop = asyncio.get_running_loop()
        msgs = [Message(path="/", interface="a.b", member="M", signature="s", body=["x" * 20000 + str(i)])
                for i in range(4)]
        futs = [loop.create_future() for _ in msgs]
        for m, f in zip(msgs, futs, strict=True):
            writer.schedule_write(m, f)
        want = b"".join(bytes(m._marshall(False)) for m in msgs)
        got = b""
        b.setblocking(False)
        for _ in range(2000):
            await asyncio.sleep(0.001)
            try:
                got += b.recv(1 << 20)
            except BlockingIOError:
                pass
            if len(got) >= len(want):
                break
        assert got == want
        await asyncio.sleep(0.01)
        assert all(f.done() and f.exception() is None for f in futs)
        assert bus.finalized == [] and writer.buf is None and not writer.messages
        a.close()
        b.close()
    asyncio.run(main())

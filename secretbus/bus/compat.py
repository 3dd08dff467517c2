"""Every use of a private API of a dependency (today: dbus-fast's), in one place.

Each entry names what it touches, why, the upstream reference and when it can go.
`tests/test_compat.py` fails when upstream changes under an entry, and pyproject.toml
pins the upper bounds of the packages concerned.
"""
from __future__ import annotations

from typing import Any


# -- dbus-fast: `MessageBus._method_return_handlers` --------------------------------------
# Why: a `bus.call()` that times out or is cancelled leaves its reply handler registered
# until a reply comes, which may be never; dropping it keeps a late reply from being
# routed and the dict from growing. dbus-fast has no public way to abandon a call.
# Reference: dbus_fast/message_bus.py (BaseMessageBus._method_return_handlers, 5.x).
# Remove when dbus-fast cleans up cancelled calls itself.
def forget_pending_call(bus: Any, serial: int) -> None:
    handlers = getattr(bus, "_method_return_handlers", None)
    if isinstance(handlers, dict):
        handlers.pop(serial, None)


# -- dbus-fast: `MessageBus._writer.sock` (EAGAIN is not fatal) ---------------------------
# Why: dbus-fast 5.2 sends a message straight away when its queue is empty; if the socket
# buffer is full at that moment, `send` raises BlockingIOError (EAGAIN), which the library
# treats as fatal and drops the whole bus connection. A burst of replies or polkit checks
# can do that. Here a full buffer counts as "0 bytes sent": the writer then keeps the
# message and waits for the socket to become writable, as it does for a partial write.
# Reference: python-dbus-next #153 / PR #154 (same code, inherited by dbus-fast).
# Remove when dbus-fast's writer handles BlockingIOError itself.
class EagainIsNotFatal:
    __slots__ = ("_sock",)

    def __init__(self, sock: Any):
        self._sock = sock

    # Only send() is wrapped: sendmsg() carries unix fds, which this project never sends.
    def send(self, data: bytes | memoryview) -> int:
        try:
            return int(self._sock.send(data))
        except BlockingIOError:
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def eagain_is_not_fatal(bus: Any) -> Any:
    """Wrap the socket of `bus`'s writer (a connected dbus-fast aio MessageBus); idempotent."""
    writer = getattr(bus, "_writer", None)
    if writer is not None and hasattr(writer, "sock") and not isinstance(writer.sock, EagainIsNotFatal):
        writer.sock = EagainIsNotFatal(writer.sock)
    return bus


# -- dbus-fast: `MessageBus._writer.messages` / `.buf` / `.fut` (bytes still queued) ------
# Why: `send` marshals the message into the writer's queue and returns a future that is
# done once the socket took the last byte; when the bus daemon stops reading from us the
# queue grows without bound. The service counts, per caller, the bytes of each reply still
# queued (DESIGN.md §12): the queue's last entry is the message just sent, or the writer
# is part-way through it. O(1); 0 when the message already went out (or unknown layout).
# Reference: dbus_fast/aio/message_bus.py (_MessageWriter.messages, buf, offset, fut; 5.x).
# Remove when dbus-fast exposes its write backlog.
def queued_bytes(bus: Any, fut: Any) -> int:
    writer: Any = getattr(bus, "_writer", None)
    messages = getattr(writer, "messages", None)
    if messages:
        last = messages[-1]
        if isinstance(last, tuple) and len(last) == 3 and last[2] is fut:
            return len(last[0])
    if getattr(writer, "fut", None) is fut and getattr(writer, "buf", None) is not None:
        return max(0, len(writer.buf) - int(writer.offset))
    return 0


# -- dbus-fast: `BaseMessageBus._bus_address` (the parsed address) -----------------------
# Why: the service opens a second connection to the same bus for its lookups of callers'
# uids and pids (bus/polkit.py: they must not queue behind large replies on the main
# connection), and dbus-fast keeps the address only parsed. Rebuilt as a string here; None
# when the layout is not the expected one (the lookups then stay on the main connection).
# Reference: dbus_fast/message_bus.py (BaseMessageBus.__init__, parse_address; 5.x).
# Remove when dbus-fast exposes the address it connected to.
def bus_address(bus: Any) -> str | None:
    from urllib.parse import quote

    parsed = getattr(bus, "_bus_address", None)
    if not isinstance(parsed, list):
        return None
    parts = []
    for entry in parsed:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], dict)):
            return None
        transport, options = entry
        parts.append(transport + ":" + ",".join(f"{k}={quote(str(v), safe='-_/.')}" for k, v in options.items()))
    return ";".join(parts) or None


# -- dbus-fast: `MessageBus._writer.sock` (the socket's send buffer) ---------------------
# Why: what the kernel holds in our socket's send buffer (~200 KB by default on Linux) is
# ahead of every reply queued after it, root's too, and a flooded bus reads us slowly; a
# small buffer keeps the queue in our writer, where the service orders it (core/lane.py).
# Same attribute as EagainIsNotFatal above (it forwards setsockopt).
# Reference: dbus_fast/aio/message_bus.py (_MessageWriter.sock; 5.x).
# Remove when dbus-fast exposes its socket.
def set_send_buffer(bus: Any, size: int) -> bool:
    """Set SO_SNDBUF of `bus`'s socket; False when it cannot be found or set."""
    import socket

    sock = getattr(getattr(bus, "_writer", None), "sock", None)
    if sock is None or not hasattr(sock, "setsockopt"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except OSError:
        return False
    return True


# -- dbus-fast: `MessageBus._writer.schedule_write` (one send for an iteration's messages) --
# Why: dbus-fast writes each message with its own send(2) the moment it is queued. A write
# batch finishing answers 16 calls at once, each with its reply and one or two signals: 48
# sends, each waking the bus daemon (on this VM half of the loop thread's CPU per Undefine,
# py-spy). Here a message queued while the writer is idle waits for the end of the loop
# iteration (`call_soon`), and everything queued by then goes out in one sendmsg(2) with one
# buffer per message. Order, the queue's layout (queued_bytes) and each message's future
# are as before: a future is resolved once the socket took its last byte; a partial write
# leaves the rest in `buf` / `offset` / `fut` for dbus-fast's own writer callback, as a
# partial send() does. Messages with unix fds (never sent here) take dbus-fast's path.
# Reference: dbus_fast/aio/message_bus.py (_MessageWriter.schedule_write, write_callback,
# messages, buf, offset, fut, sock, loop, fd; 5.x).
# Remove when dbus-fast coalesces writes itself.
IOV_MAX = 1024             # buffers in one sendmsg (Linux's UIO_MAXIOV)


class _CoalescedWrites:
    __slots__ = ("_w", "_scheduled")

    def __init__(self, writer: Any) -> None:
        self._w = writer
        self._scheduled = False

    def schedule_write(self, msg: Any = None, future: Any = None) -> None:
        w = self._w
        if msg is not None:
            w.buffer_message(msg, future)
        if not w.bus.unique_name or w.buf is not None:
            # Before Hello, or a message part-written: dbus-fast's writer callback carries on.
            w.loop.add_writer(w.fd, w.write_callback)
        elif not self._scheduled and w.messages:
            self._scheduled = True
            w.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        w = self._w
        messages = w.messages
        if w.buf is not None or not messages:
            return
        bufs: list[bytes | bytearray] = []
        for buf, fds, _ in messages:
            if fds or len(bufs) >= IOV_MAX:
                break
            bufs.append(buf)
        if not bufs:
            w.loop.add_writer(w.fd, w.write_callback)
            return
        try:
            sent = w.sock.sendmsg(bufs)
        except BlockingIOError:
            sent = 0
        except Exception:  # noqa: BLE001 - dbus-fast's writer meets the same error and handles it
            w.write_callback()
            return
        for buf in bufs:
            if sent < len(buf):
                break
            sent -= len(buf)
            fut = messages.popleft()[2]
            if fut is not None and not fut.done():
                fut.set_result(None)
        if sent:
            buf, _, fut = messages.popleft()
            w.buf, w.offset, w.fut, w.unix_fds = memoryview(buf), sent, fut, None
        if w.buf is not None or messages:
            w.loop.add_writer(w.fd, w.write_callback)


def _coalescer(writer: Any) -> _CoalescedWrites | None:
    """The _CoalescedWrites installed on `writer`, if any."""
    cw = getattr(getattr(writer, "schedule_write", None), "__self__", None)
    return cw if isinstance(cw, _CoalescedWrites) else None


def coalesce_writes(bus: Any) -> bool:
    """Make `bus`'s writer coalesce (above); False when its layout is not the expected one."""
    w = getattr(bus, "_writer", None)
    if w is None:
        return False
    needed = ("messages", "buf", "offset", "fut", "sock", "loop", "fd", "bus", "buffer_message",
              "write_callback", "schedule_write")
    if not all(hasattr(w, n) for n in needed) or not hasattr(w.sock, "sendmsg"):
        return False
    if _coalescer(w) is not None:
        return False                       # installed already
    w.schedule_write = _CoalescedWrites(w).schedule_write
    return True


def flush_writes(bus: Any) -> None:
    """Send now what coalesce_writes holds for the end of this iteration (before a disconnect)."""
    cw = _coalescer(getattr(bus, "_writer", None))
    if cw is not None:
        cw.flush()

"""Connecting to a bus with dbus-fast, plus one workaround for it.

dbus-fast 5.2 sends a message straight away when its queue is empty; if the socket buffer
is full at that moment, `send` raises BlockingIOError (EAGAIN), which the library treats as
fatal and drops the whole bus connection (the same bug as python-dbus-next #153). A burst
of replies or polkit checks can do that. Here a full buffer counts as "0 bytes sent": the
writer then keeps the message and waits for the socket to become writable, as it does for
a partial write.
"""
from __future__ import annotations

import socket

from dbus_fast import BusType
from dbus_fast.aio import MessageBus


class _EagainIsNotFatal:
    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket):
        self._sock = sock

    # Only send() is wrapped: sendmsg() carries unix fds, which this project never sends.
    def send(self, data) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def harden(bus: MessageBus) -> MessageBus:
    writer = getattr(bus, "_writer", None)
    if writer is not None and hasattr(writer, "sock") and not isinstance(writer.sock, _EagainIsNotFatal):
        writer.sock = _EagainIsNotFatal(writer.sock)
    return bus


async def connect(address: str | None = None, bus_type: BusType = BusType.SESSION) -> MessageBus:
    """Connect to `address`, or to the standard bus of `bus_type` (honours DBUS_*_BUS_ADDRESS)."""
    bus = MessageBus(bus_address=address) if address else MessageBus(bus_type=bus_type)
    return harden(await bus.connect())

"""The access layer's polkit client and caller uids over a dbus-fast connection.

access/ holds the logic (decision cache, fail closed, bounded checks, subjects) and
talks to the bus through access.busport.BusPort; `DBusFastPort` is that port for a
dbus-fast MessageBus, and the two classes here take the bus as the daemon has it.
"""
from __future__ import annotations

import asyncio
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from secretbus.access import polkit
from secretbus.access.busport import BusError, Signal, SignalHandler, Typed


def _variants(value: Any) -> Any:
    """The body with every access-layer Typed turned into a dbus-fast Variant."""
    if isinstance(value, Typed):
        return Variant(value.signature, _variants(value.value))
    if isinstance(value, dict):
        return {k: _variants(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_variants(v) for v in value]
    return value


class DBusFastPort:
    def __init__(self, bus: MessageBus):
        self.bus = bus
        self._watchers: dict[SignalHandler, Any] = {}

    async def call(self, destination: str, path: str, interface: str, member: str,
                   signature: str, body: list[Any], timeout: float) -> list[Any]:
        msg = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=_variants(body))
        reply = await asyncio.wait_for(self.bus.call(msg), timeout)
        if reply is None:
            raise BusError("org.freedesktop.DBus.Error.NoReply", "no reply")
        if reply.message_type is MessageType.ERROR:
            raise BusError(reply.error_name or "", str(reply.body[0]) if reply.body else "")
        return list(reply.body)

    def watch(self, handler: SignalHandler) -> None:
        def on_message(msg: Message) -> None:
            if msg.message_type is MessageType.SIGNAL:
                handler(Signal(msg.sender, msg.path, msg.interface, msg.member, msg.body))
        self._watchers[handler] = on_message
        self.bus.add_message_handler(on_message)

    def unwatch(self, handler: SignalHandler) -> None:
        on_message = self._watchers.pop(handler, None)
        if on_message is not None:
            self.bus.remove_message_handler(on_message)


class CallerUids(polkit.CallerUids):
    def __init__(self, bus: MessageBus, timeout: float = 5.0):
        super().__init__(DBusFastPort(bus), timeout)


class PolkitAccess(polkit.PolkitAccess):
    def __init__(self, bus: MessageBus, uids: polkit.CallerUids, **kw: Any):
        super().__init__(DBusFastPort(bus), uids, **kw)

"""The access layer's polkit client and caller uids over a dbus-fast connection.

access/ holds the logic (decision cache, fail closed, bounded checks, subjects) and
talks to the bus through access.busport.BusPort; `DBusFastPort` is that port for a
dbus-fast MessageBus, and the two classes here take the bus as the daemon has it.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from secretbus.access import polkit
from secretbus.access.busport import BusError, Signal, SignalHandler, Typed
from secretbus.bus import compat

log = logging.getLogger("secretbus.dbus")


def _variants(value: Any) -> Any:
    """The body with every access-layer Typed turned into a dbus-fast Variant."""
    if isinstance(value, Typed):
        return Variant(value.signature, _variants(value.value))
    if isinstance(value, dict):
        return {k: _variants(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_variants(v) for v in value]
    return value


def _body(reply: Message | None) -> list[Any]:
    if reply is None:
        raise BusError("org.freedesktop.DBus.Error.NoReply", "no reply")
    if reply.message_type is MessageType.ERROR:
        raise BusError(reply.error_name or "", str(reply.body[0]) if reply.body else "")
    return list(reply.body)


class DBusFastPort:
    def __init__(self, bus: MessageBus):
        self.bus = bus
        self._watchers: dict[SignalHandler, Any] = {}

    async def call(self, destination: str, path: str, interface: str, member: str,
                   signature: str, body: list[Any], timeout: float) -> list[Any]:
        msg = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=_variants(body))
        return _body(await asyncio.wait_for(self.bus.call(msg), timeout))

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


_MATCH_RULES = ("AddMatch", "RemoveMatch")


class LookupPort(DBusFastPort):
    """Calls to the bus daemon on a connection of their own, signals on the main one.

    A caller's uid (and, for the audit, pid) is asked for on every call of a new connection,
    root's too. On the main connection such a question waits behind every reply queued
    there, and a flooded bus reads that connection slowly: a few large replies ahead made
    root's uid lookup take 0.5 s. The second connection has nothing else to send. Order does
    not matter for these (a name that left is no owner, on either connection; CallerUids
    drops a uid whose NameOwnerChanged came while it was looked up). Without it (no address,
    refused, lost), the questions go on the main connection as before.
    """

    def __init__(self, bus: MessageBus):
        super().__init__(bus)
        self._side: MessageBus | None = None

    async def open(self) -> None:
        address = compat.bus_address(self.bus)
        if address is None:
            return
        try:
            self._side = await asyncio.wait_for(MessageBus(bus_address=address).connect(), 5.0)
        except Exception as e:  # noqa: BLE001 - the main connection serves instead
            log.warning("no second bus connection for caller lookups (%s): they share the main one",
                        type(e).__name__)

    def close(self) -> None:
        if self._side is not None:
            self._side.disconnect()
            self._side = None

    async def call(self, destination: str, path: str, interface: str, member: str,
                   signature: str, body: list[Any], timeout: float) -> list[Any]:
        side = self._side
        # Match rules belong to the connection that watches the signals: the main one.
        if side is None or not side.connected or member in _MATCH_RULES:
            return await super().call(destination, path, interface, member, signature, body, timeout)
        msg = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=_variants(body))
        return _body(await asyncio.wait_for(side.call(msg), timeout))


class CallerUids(polkit.CallerUids):
    """Uids (and the audit's pids, through the same port) asked on a connection of their own;
    NameOwnerChanged and AddMatch on the main one (where departures are watched)."""

    def __init__(self, bus: MessageBus, timeout: float = 5.0):
        self._port = LookupPort(bus)
        super().__init__(self._port, timeout)

    async def start(self) -> None:
        await self._port.open()
        await super().start()

    def close(self) -> None:
        super().close()
        self._port.close()


class PolkitAccess(polkit.PolkitAccess):
    def __init__(self, bus: MessageBus, uids: polkit.CallerUids, **kw: Any):
        super().__init__(DBusFastPort(bus), uids, **kw)

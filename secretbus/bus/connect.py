"""Connecting to a bus with dbus-fast (with the EAGAIN workaround of bus/compat.py)."""
from __future__ import annotations

from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from secretbus.bus.compat import eagain_is_not_fatal


def harden(bus: MessageBus) -> MessageBus:
    """Make a full socket buffer non-fatal for `bus` (see compat.eagain_is_not_fatal)."""
    return eagain_is_not_fatal(bus)


async def connect(address: str | None = None, bus_type: BusType = BusType.SESSION) -> MessageBus:
    """Connect to `address`, or to the standard bus of `bus_type` (honours DBUS_*_BUS_ADDRESS)."""
    bus = MessageBus(bus_address=address) if address else MessageBus(bus_type=bus_type)
    return harden(await bus.connect())

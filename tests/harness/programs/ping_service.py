"""A D-Bus service owning NAME with one method, Ping() -> "pong".  argv: BUS_ADDRESS NAME"""
import asyncio
import sys

from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method


class Ping(ServiceInterface):
    def __init__(self, name: str):
        super().__init__(name)

    @method()
    def Ping(self) -> "s":  # noqa: F821 - a D-Bus signature, not a type
        return "pong"


async def main() -> None:
    address, name = sys.argv[1], sys.argv[2]
    bus = await MessageBus(bus_address=address).connect()
    bus.export("/org/example/SbTest", Ping(name))
    await bus.request_name(name)
    await asyncio.Event().wait()

asyncio.run(main())

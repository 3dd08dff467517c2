"""Call NAME's Ping(); print "pong" or the error name.  argv: BUS_ADDRESS NAME"""
import asyncio
import sys

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus


async def main() -> None:
    address, name = sys.argv[1], sys.argv[2]
    bus = await MessageBus(bus_address=address).connect()
    reply = await asyncio.wait_for(bus.call(Message(
        destination=name, path="/org/example/SbTest", interface=name, member="Ping")), 10)
    print(reply.error_name if reply.message_type == MessageType.ERROR else reply.body[0])

asyncio.run(main())

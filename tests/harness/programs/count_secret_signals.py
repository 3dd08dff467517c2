"""Subscribe to the service's signals and listen under /org/libvirt/secret for SECONDS; print
"listening", then how many arrived.  argv: BUS_ADDRESS SECONDS"""
import asyncio
import sys

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus


async def main() -> None:
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    got = []
    bus.add_message_handler(lambda m: got.append(m.member) if m.message_type is MessageType.SIGNAL
                            and m.path and m.path.startswith("/org/libvirt/secret") else None)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=["type='signal',path_namespace='/org/libvirt/secret'"]))
    # On the system bus signals go to subscribers (the bus policy refuses an outsider's call).
    await bus.call(Message(destination="org.libvirt.secret", path="/org/libvirt/secret",
                           interface="org.libvirt.Connect", member="Subscribe"))
    print("listening", flush=True)
    await asyncio.sleep(float(sys.argv[2]))
    print(len(got), flush=True)

asyncio.run(main())

"""The daemon built from its parts, in this process: the driver from the composition root,
the access control and the bus passed in (no monkeypatching of the daemon module)."""
from __future__ import annotations

import asyncio
import subprocess
import sys

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from fixtures import U1

from secretbus import daemon
from secretbus.access.permissions import Caller, Perm
from secretbus.bus.names import BUS_NAME, CONNECT_IFACE, CONNECT_PATH
from secretbus.core.gil import SWITCH_INTERVAL
from secretbus.core.model import SecretDef
from secretbus.driver.build import open_instance
from secretbus.store.paths import InstancePaths


class DenyAll:
    """Access control that refuses every check and records what it was asked."""

    enabled = True

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.closed = False

    async def allowed(self, caller: Caller, perm: Perm, d: SecretDef | None) -> bool:
        self.asked.append(perm.value)
        return False

    async def caller_uid(self, caller: Caller) -> int | None:
        return None

    def close(self) -> None:
        self.closed = True


def test_daemon_serves_with_the_access_control_it_is_given(tmp_path, session_bus):
    driver = open_instance(InstancePaths.embed(tmp_path))
    driver.define_xml(f"<secret><uuid>{U1}</uuid></secret>")
    deny = DenyAll()

    async def make_access(bus, uids):
        return deny

    d = daemon.Daemon(driver, access=make_access, system=False,
                      connect=daemon.bus_factory(session_bus.address, system=False))

    async def scenario() -> tuple[int, Message]:
        served = asyncio.create_task(d.run(frozenset()))
        client = await MessageBus(bus_address=session_bus.address).connect()
        try:
            await asyncio.to_thread(session_bus.wait_for_name, BUS_NAME)     # the daemon runs on this loop
            reply = await client.call(Message(destination=BUS_NAME, path=CONNECT_PATH,
                                              interface=CONNECT_IFACE, member="ListSecrets",
                                              signature="u", body=[0]))
        finally:
            client.disconnect()
        d.stop_event.set()
        return await asyncio.wait_for(served, 30), reply

    try:
        rc, reply = asyncio.run(scenario())
    finally:
        driver.close()
    assert rc == 0
    assert reply.message_type is MessageType.ERROR and reply.error_name == "org.libvirt.Error.AccessDenied"
    assert deny.asked and deny.asked[0] == Perm.SEARCH_SECRETS.value
    assert deny.closed


def test_the_daemon_shortens_the_gil_switch_interval(tmp_path):
    """core/gil.py: main sets the interval before it loads the store. Here it stops right after:
    the root is a file, so the configuration cannot be read (EX_CONFIG, 78)."""
    root = tmp_path / "root"
    root.write_text("")
    code = ("import sys; from secretbus import daemon; "
            "rc = daemon.main(['--session', '--root', sys.argv[1], '--no-rpc']); "
            "print(rc, sys.getswitchinterval())")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True,
                         timeout=60, check=True)
    assert sys.getswitchinterval() == 0.005          # this process: CPython's default, untouched
    assert out.stdout.split() == ["78", str(SWITCH_INTERVAL)]

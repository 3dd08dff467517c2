"""A write whose secret is redefined while the write's access is checked.

The driver acts only on the definition that was checked (compare-and-set, errors.ChangedMeanwhile).
Both front ends then look the secret up and check the write again on what it is now, as if it
had come after that change (bus/execute.py `_write`, rpc/procedures.py `_retried`): the caller
gets the answer libvirt would give, and no write acts on a definition nobody checked. After
ChangedMeanwhile.retries more changes the refusal stands.

The access control here allows everything but the descriptions it is told to refuse, and at
its first checks of one permission it redefines the secret (a new description) before it
answers, as another caller's redefine racing the check would.
"""
from __future__ import annotations

import asyncio
import os
import uuid as uuidlib
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from test_rpc_audit_batch import call
from test_rpc_framing import FakeTransport, answers

from secretbus import daemon
from secretbus.access.permissions import Caller, Perm
from secretbus.bus.names import BUS_NAME, CONNECT_IFACE, CONNECT_PATH, SECRET_IFACE, secret_path
from secretbus.core import errors
from secretbus.core.model import SecretDef
from secretbus.driver.build import open_instance
from secretbus.rpc import protocol as P
from secretbus.rpc.connection import Connection, RpcLimits
from secretbus.rpc.guard import Guard
from secretbus.rpc.identity import SystemToken
from secretbus.rpc.procedures import Procedures
from secretbus.rpc.session import Peer, Session, start_time_of
from secretbus.store.paths import InstancePaths

U = "5b7e5700-0000-4000-8003-000000000001"
TRIES = errors.ChangedMeanwhile.retries + 1
CHANGED = f"operation failed: secret {U} changed while the request was being authorised; try again"


def xml(description: str) -> str:
    return (f"<secret ephemeral='no' private='no'><uuid>{U}</uuid><description>{description}</description>"
            "<usage type='volume'><volume>/v/changed.img</volume></usage></secret>")


class Redefining:
    """Allows every check but those on a definition whose description is in `refuse`; at each
    of its first `times` checks of `perm` it redefines U first. `asked`: (permission,
    description of the definition checked), in order."""

    enabled = True

    def __init__(self, driver: Any, perm: Perm, times: int, refuse: tuple[str, ...] = ()) -> None:
        self.driver, self.perm, self.left, self.refuse = driver, perm, times, refuse
        self.made = 0
        self.asked: list[tuple[Perm, str | None]] = []

    async def allowed(self, caller: Caller, perm: Perm, d: SecretDef | None) -> bool:
        self.asked.append((perm, d.description if d is not None else None))
        if perm is self.perm and self.left:
            self.left -= 1
            self.made += 1
            await asyncio.to_thread(self.driver.define_xml, xml(f"redefined {self.made}"))
        return d is None or d.description not in self.refuse

    async def caller_uid(self, caller: Caller) -> int | None:
        return 1000

    def close(self) -> None:
        pass


def _driver(tmp_path: Any) -> Any:
    driver = open_instance(InstancePaths.embed(tmp_path))
    driver.define_xml(xml("first"))
    driver.set_value(U, b"old")
    return driver


# -- D-Bus ---------------------------------------------------------------------------------
def _over_dbus(bus: Any, access: Redefining, msg: Message) -> Message:
    async def make_access(bus: Any, uids: Any) -> Redefining:
        return access

    d = daemon.Daemon(access.driver, access=make_access, system=False,
                      connect=daemon.bus_factory(bus.address, system=False))

    async def scenario() -> Message:
        served = asyncio.create_task(d.run(frozenset()))
        client = await MessageBus(bus_address=bus.address).connect()
        try:
            await asyncio.to_thread(bus.wait_for_name, BUS_NAME)     # the daemon runs on this loop
            reply = await asyncio.wait_for(client.call(msg), 30)
            assert reply is not None
            return reply
        finally:
            client.disconnect()
            d.stop_event.set()
            await asyncio.wait_for(served, 30)
    return asyncio.run(scenario())


def _set_value(value: bytes) -> Message:
    return Message(destination=BUS_NAME, path=secret_path(U), interface=SECRET_IFACE, member="SetValue",
                   signature="ayu", body=[value, 0])


def test_dbus_set_value_across_one_redefine_is_checked_again_and_done(tmp_path, session_bus):
    driver = _driver(tmp_path)
    access = Redefining(driver, Perm.WRITE, times=1)
    try:
        reply = _over_dbus(session_bus, access, _set_value(b"new"))
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        assert access.asked == [(Perm.WRITE, "first"), (Perm.WRITE, "redefined 1")]
        assert driver.get_value(U) == b"new"
    finally:
        driver.close()


def test_dbus_set_value_redefined_at_every_check_is_refused_and_changes_nothing(tmp_path, session_bus):
    driver = _driver(tmp_path)
    access = Redefining(driver, Perm.WRITE, times=TRIES + 5)
    try:
        reply = _over_dbus(session_bus, access, _set_value(b"new"))
        assert reply.message_type is MessageType.ERROR
        assert reply.error_name == "org.libvirt.Error.OperationFailed" and reply.body == [CHANGED]
        assert [p for p, _ in access.asked] == [Perm.WRITE] * TRIES      # bounded: then the refusal stands
        # nothing was set (a redefine keeps the stored value)
        assert driver.get_value(U) == b"old"
    finally:
        driver.close()


def test_dbus_set_value_refused_on_the_definition_it_meets_again(tmp_path, session_bus):
    """The second check is a real one: the definition of now is refused, so nothing is done."""
    driver = _driver(tmp_path)
    access = Redefining(driver, Perm.WRITE, times=1, refuse=("redefined 1",))
    try:
        reply = _over_dbus(session_bus, access, _set_value(b"new"))
        assert reply.message_type is MessageType.ERROR and reply.error_name == "org.libvirt.Error.AccessDenied"
        assert driver.get_value(U) == b"old"
    finally:
        driver.close()


def test_dbus_redefine_across_another_redefine_checks_the_one_it_replaces_now(tmp_path, session_bus):
    driver = _driver(tmp_path)
    access = Redefining(driver, Perm.SAVE, times=1)
    try:
        reply = _over_dbus(session_bus, access, Message(
            destination=BUS_NAME, path=CONNECT_PATH, interface=CONNECT_IFACE, member="SecretDefineXML",
            signature="su", body=[xml("mine"), 0]))
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        # the redefine checks (write, save of the one replaced) were made again on "redefined 1"
        assert (Perm.WRITE, "redefined 1") in access.asked and (Perm.SAVE, "redefined 1") in access.asked
        assert driver.find(U).description == "mine"
        assert driver.get_value(U) == b"old"
    finally:
        driver.close()


# -- RPC -----------------------------------------------------------------------------------
def _over_rpc(tmp_path: Any, access: Redefining, proc: int, args: Any) -> Any:
    """One call of an unprivileged peer (this process, as uid 1000) on a checked connection:
    the decoded reply, or (code, message) of the error."""
    async def main() -> Any:
        token = SystemToken(tmp_path / "common" / "system.token")
        token.ensure()
        guard = Guard(system=True)
        guard.attach(access)       # type: ignore[arg-type]
        table = Procedures(access.driver, None, token, system=True, guard=guard).table()  # type: ignore[arg-type]
        pid = os.getpid()
        session = Session(Peer(pid=pid, uid=1000, gid=1000, start_time=start_time_of(pid)), socket_readonly=False,
                          trusted=False, authenticated=True, opened=True)
        assert guard.checked(session)
        conn = Connection(session, table, RpcLimits(), lambda _c: None, None, None)
        t = FakeTransport()
        conn.connection_made(t)
        conn.data_received(call(proc, 7, args))
        for _ in range(1000):
            if t.out:
                break
            await asyncio.sleep(0.01)
        conn.close()
        ((serial, got),) = answers(t)
        assert serial == 7
        return got
    return asyncio.run(main())


def _handle() -> dict[str, Any]:
    return {"uuid": uuidlib.UUID(U).bytes, "usageType": 1, "usageID": "/v/changed.img"}


def test_rpc_set_value_across_one_redefine_is_checked_again_and_done(tmp_path):
    driver = _driver(tmp_path)
    access = Redefining(driver, Perm.WRITE, times=1)
    try:
        assert _over_rpc(tmp_path, access, P.Proc.SECRET_SET_VALUE,
                         {"secret": _handle(), "value": b"new", "flags": 0}) is None
        assert access.asked == [(Perm.WRITE, "first"), (Perm.WRITE, "redefined 1")]
        assert driver.get_value(U) == b"new"
    finally:
        driver.close()


def test_rpc_set_value_redefined_at_every_check_is_refused_and_changes_nothing(tmp_path):
    driver = _driver(tmp_path)
    access = Redefining(driver, Perm.WRITE, times=TRIES + 5)
    try:
        got = _over_rpc(tmp_path, access, P.Proc.SECRET_SET_VALUE, {"secret": _handle(), "value": b"new", "flags": 0})
        assert got == (errors.OperationFailed.code, CHANGED)
        assert [p for p, _ in access.asked] == [Perm.WRITE] * TRIES
        assert driver.get_value(U) == b"old"
    finally:
        driver.close()


def test_rpc_undefine_across_one_redefine_is_checked_again_and_done(tmp_path):
    driver = _driver(tmp_path)
    access = Redefining(driver, Perm.DELETE, times=1)
    try:
        assert _over_rpc(tmp_path, access, P.Proc.SECRET_UNDEFINE, {"secret": _handle()}) is None
        assert access.asked == [(Perm.DELETE, "first"), (Perm.DELETE, "redefined 1")]
        assert driver.find(U) is None
    finally:
        driver.close()

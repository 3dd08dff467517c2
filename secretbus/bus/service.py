"""The D-Bus front end: `org.libvirt.Connect` (secret part) and one `org.libvirt.Secret` per secret.

The parts, one concern each: `dispatch` routes messages by object type and checks them
against the interface model (`introspection`), `handlers` declares and prepares each
method, `calls` authorises and runs them, `signals` tells the bus what changed. This
module puts them together over one driver and one bus connection.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.introspection import Interface

from secretbus.access.busport import BusError
from secretbus.access.permissions import AccessControl
from secretbus.bus import compat
from secretbus.bus.auditing import ReadAudit
from secretbus.bus.dispatch import Dispatcher, Entry, ObjectType, Reply, error
from secretbus.bus.emit import Announcer
from secretbus.bus.execute import BUS_MESSAGE_MAX, Bound, CallRunner, specs_of
from secretbus.bus.handlers import ConnectHandlers, SecretHandlers, secret_properties
from secretbus.bus.introspection import STANDARD, node_xml, packaged
from secretbus.bus.limits import Bounds
from secretbus.bus.names import (
    CONNECT_IFACE,
    CONNECT_PATH,
    DBUS_IFACE,
    DBUS_NAME,
    DBUS_PATH,
    INTROSPECT_IFACE,
    OM_IFACE,
    PEER_IFACE,
    PROPS_IFACE,
    SECRET_IFACE,
    SECRET_PREFIX,
    SECRETS_PATH,
    secret_node,
    uuid_from_path,
)
from secretbus.bus.unread import Ask
from secretbus.core import loophop
from secretbus.core.model import SecretEvent
from secretbus.driver.driver import StoreState

__all__ = ["SecretService", "secret_properties"]

log = logging.getLogger("secretbus.dbus")

NAME_GONE = (f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_IFACE}',"
             "member='NameOwnerChanged',arg2=''")

STATS_IFACE = "org.freedesktop.DBus.Debug.Stats"
SEND_BUFFER = 32 << 10   # SO_SNDBUF of the service's bus socket (the kernel doubles it)
# The path down to the connect object: each node introspects with its one child.
_TREE = {"/": "org", "/org": "libvirt", "/org/libvirt": "secret"}


def _locate(path: str) -> str | None:
    if path == CONNECT_PATH:
        return "connect"
    if path.startswith(SECRET_PREFIX):
        return "secret"
    if path == SECRETS_PATH:
        return "secrets"
    if path in _TREE:
        return "tree"
    return None


def _outgoing_bytes(bus: Any) -> Ask:
    """How many bytes the bus daemon holds for a connection that has not read them."""
    async def ask(sender: str) -> int:
        msg = Message(destination=DBUS_NAME, path=DBUS_PATH, interface=STATS_IFACE,
                      member="GetConnectionStats", signature="s", body=[sender])
        reply = await asyncio.wait_for(bus.call(msg), 5)
        if reply.message_type is MessageType.ERROR:
            raise BusError(reply.error_name or "", "")
        return int(reply.body[0]["OutgoingBytes"].value)
    return ask


class SecretService:
    def __init__(self, driver: Any, bus: Any, access: AccessControl, *,
                 private_readers: frozenset[int] = frozenset(), audit: ReadAudit | None = None,
                 bounds: Bounds | None = None, max_message: int = BUS_MESSAGE_MAX):
        self.driver = driver
        self.bus = bus
        self.access = access
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # A small send buffer: what the kernel holds is ahead of root's replies (compat.py).
        compat.set_send_buffer(bus, SEND_BUFFER)
        # The replies and signals of one loop iteration in one sendmsg (compat.py).
        compat.coalesce_writes(bus)
        self._runner = CallRunner(bus, access, private_readers, audit=audit, bounds=bounds,
                                  max_message=max_message,
                                  unread=_outgoing_bytes(bus) if hasattr(bus, "call") else None)
        self._signals = Announcer(bus, driver, access)
        self._closing = False
        self.calls = 0                         # for idle tracking
        self._sub: int | None = None
        self._unwatch_state: Callable[[], None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._dispatcher = Dispatcher(_locate, self._object_types(), self._invoke, node_xml)

    def _object_types(self) -> dict[str, ObjectType[Bound]]:
        std = [STANDARD[INTROSPECT_IFACE], STANDARD[PEER_IFACE]]
        connect: list[Interface] = [*std, STANDARD[PROPS_IFACE], STANDARD[OM_IFACE], packaged(CONNECT_IFACE)]
        secret: list[Interface] = [*std, STANDARD[PROPS_IFACE], packaged(SECRET_IFACE)]

        def bound(handlers: object) -> list[Bound]:
            return [Bound(spec, fn) for spec, fn in specs_of(handlers)]

        def secrets_children(path: str) -> list[str]:
            # Child names are UUIDs, which getattr-level callers may see anyway; with access
            # control on, they are not listed at all.
            return [] if self.access.enabled else [secret_node(u) for u in sorted(self._signals.exported)]

        return {
            "connect": ObjectType.build(connect, bound(ConnectHandlers(self.driver, self._signals.subscribers,
                                                                       filtered=self.access.enabled)),
                                        introspect=lambda path: ["secret"]),
            # Introspect of a secret is its handler's (behind getattr), not the dispatcher's.
            "secret": ObjectType.build(secret, bound(SecretHandlers(self.driver, node_xml(secret, []))),
                                       well_formed=lambda path: uuid_from_path(path) is not None),
            "secrets": ObjectType([] if self.access.enabled else std, introspect=secrets_children),
            "tree": ObjectType(std, introspect=lambda path: [_TREE[path]]),
        }

    # -- life cycle -------------------------------------------------------------------
    def attach(self) -> None:
        self._signals.reset(self.driver.list_secrets())
        self.bus.add_message_handler(self._dispatcher.on_message)
        if self.access.enabled:
            self.bus.add_message_handler(self._on_bus_signal)
            self._watch = self._loop.create_task(self._watch_departures())
        self._sub = self.driver.subscribe(self._on_driver_event)
        self._unwatch_state = self.driver.watch_store_state(self._on_store_state)

    @property
    def private_readers(self) -> frozenset[int]:
        return self._runner.private_readers

    @private_readers.setter
    def private_readers(self, uids: frozenset[int]) -> None:
        # The runner decides GetValue of private secrets; a reload must reach it.
        self._runner.private_readers = uids

    async def _watch_departures(self) -> None:
        """Subscribers that leave the bus are dropped (unique names are never reused)."""
        try:
            reply = await self.bus.call(Message(destination=DBUS_NAME, path=DBUS_PATH, interface=DBUS_IFACE,
                                                member="AddMatch", signature="s", body=[NAME_GONE]))
            if reply.message_type is MessageType.ERROR:
                raise RuntimeError(reply.error_name)
        except Exception as e:  # noqa: BLE001
            log.error("cannot watch for departed event subscribers: %s", type(e).__name__)

    def _on_bus_signal(self, msg: Message) -> None:
        if (msg.message_type is MessageType.SIGNAL and msg.sender == DBUS_NAME
                and msg.member == "NameOwnerChanged" and msg.signature == "sss" and not msg.body[2]):
            self._signals.subscribers.gone(msg.body[0])

    def refresh(self) -> None:
        """After a reload: announce objects that appeared or vanished (no lifecycle events)."""
        self._signals.refresh(self.driver.list_secrets())

    @property
    def in_flight(self) -> int:
        return len(self._runner.tasks)

    def caller_left(self, sender: str) -> None:
        """A unique name left the bus (NameOwnerChanged): drop what is kept for it."""
        self._runner.forget(sender)

    def table_sizes(self) -> dict[str, int]:
        """The per-caller tables' sizes, and the count of calls dropped unanswered (the daemon
        logs them on SIGUSR1, for tests)."""
        return {"tasks": len(self._runner.tasks), **self._runner.budget.sizes(), **self._runner.unread.sizes(),
                **self._runner.lane.sizes(), **self._runner.writes.sizes(), **self._signals.subscribers.sizes(),
                "unanswered": self._runner.unanswered}

    async def drain(self) -> None:
        """Stop taking calls and wait for those already running (SIGTERM)."""
        self._closing = True
        await self._runner.drain()
        await self._signals.close()
        if self._sub is not None:
            self.driver.unsubscribe(self._sub)
            self._sub = None
        if self._unwatch_state is not None:
            self._unwatch_state()
            self._unwatch_state = None
        # The replies of this loop iteration go out now: the daemon disconnects next.
        compat.flush_writes(self.bus)

    # -- calls and events ---------------------------------------------------------------
    def _invoke(self, msg: Message, entry: Entry[Bound]) -> Reply:
        if self._closing:
            return error(msg, "org.libvirt.Error.OperationFailed", "service is shutting down")
        self.calls += 1
        return self._runner.run(msg, entry.handler.spec, entry.handler.prepare, entry.out_sig)

    def _on_store_state(self, state: StoreState) -> None:
        """The fleet store went online / degraded (called from its sync thread)."""
        try:
            self._loop.call_soon_threadsafe(self._signals.store_state, state)
        except RuntimeError:     # the loop has closed: nobody is left to tell
            pass

    def _on_driver_event(self, ev: SecretEvent) -> None:
        if threading.get_ident() == self._loop_thread:
            self._signals.emit(ev)
        else:
            # with the other events and answers of its write batch, in order (core/loophop.py)
            loophop.hops(self._loop).post(self._signals.emit, ev)

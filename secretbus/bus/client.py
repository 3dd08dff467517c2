"""The D-Bus client: `DBusConnection`, the `Connection` API over the bus.

`secret:///system` and `secret:///session` open one of these. It is synchronous, like the
embedded connection, and thread-safe. The parts, one concern each:

- `secretbus.core.loopthread`: the private event loop thread ("secretbus-dbus") every public method
  submits its coroutine to, with a bounded wait;
- `secretbus.bus.calls`: the bus connection, method calls with a timeout, error mapping;
- `secretbus.bus.signals`: match rules and decoding signals and properties (pure);
- `secretbus.bus.events`: the usage cache, trusted senders, the subscriber thread;
- `secretbus.bus.wire`: Python arguments as D-Bus values.

The service owns every API rule (value size, flags, XML size, private values); this class
only encodes arguments for the wire and turns replies into handles. No secret value is ever
logged or put into an exception text or a repr.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

from secretbus.bus import wire
from secretbus.bus.calls import Calls, default_address, error_from_reply
from secretbus.bus.events import Dispatcher, Pending, SignalFeed, Usage, UsageCache
from secretbus.bus.names import (
    BUS_NAME,
    CONNECT_IFACE,
    CONNECT_PATH,
    DBUS_IFACE,
    DBUS_NAME,
    DBUS_PATH,
    OM_IFACE,
    PROPS_IFACE,
    SECRET_IFACE,
    secret_path,
    uuid_from_path,
)
from secretbus.bus.signals import known_usage, usage_from_props
from secretbus.core import errors
from secretbus.core.api import Connection, EventHandler, LostHandler, Secret, event_filter
from secretbus.core.clientargs import wire_safe
from secretbus.core.loopthread import LoopThread
from secretbus.core.uuids import canonical_uuid, parse_uuid

if TYPE_CHECKING:
    from secretbus.core.model import InstanceKind

__all__ = ["DBusConnection", "default_address", "error_from_reply"]

log = logging.getLogger("secretbus.client")

Found = tuple[str, int, str]         # (uuid, usage type, usage id): what a handle needs


class DBusConnection(Connection):
    """A connection to the secretbus service over the system or the session bus.

    Open it with `DBusConnection.open()` (or `secretbus.uri.open_connection`); close it
    with `close()` or a `with` block.
    """

    def __init__(self, kind: InstanceKind, uri: str, address: str, *, timeout: float,
                 interactive: bool):
        self.uri = uri
        self.kind = kind
        self.address = address
        self.bus_label = "system bus" if kind.value == "system" else "session bus"
        self.timeout = float(timeout)
        self.interactive = interactive
        self._state_lock = threading.Lock()
        self._loop = LoopThread(self.timeout, "secretbus-dbus", kind="D-Bus", peer=BUS_NAME)
        self._calls = Calls(address, self.bus_label, self.timeout, interactive=interactive,
                            closed=lambda: self._loop.closed)
        self._cache = UsageCache()            # loop thread only
        events: queue.SimpleQueue[Pending | str | None] = queue.SimpleQueue()
        self._signals = SignalFeed(self._calls, self._cache, events)
        self._subs = Dispatcher(events, lookup=self._lookup_usage, handle=self._handle_of,
                                closed=lambda: self._loop.closed)
        self._bus_watch: asyncio.Task[None] | None = None      # loop thread: on_lost's

    # -- opening and closing --------------------------------------------------------------
    @classmethod
    def open(cls, kind: InstanceKind, uri: str, *, timeout: float = 25.0,
             bus_address: str | None = None, interactive: bool = False) -> DBusConnection:
        """Connect to the system (SYSTEM) or session (SESSION) bus; `bus_address` overrides
        the address ($DBUS_SYSTEM_BUS_ADDRESS / $DBUS_SESSION_BUS_ADDRESS otherwise).
        `interactive=True` lets polkit ask the user (ALLOW_INTERACTIVE_AUTHORIZATION)."""
        if kind.value not in ("system", "session"):
            raise errors.InvalidArg(f"a D-Bus connection needs the system or session instance, not {kind.value}")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise errors.InvalidArg("timeout must be a positive number of seconds")
        address = bus_address or default_address(kind)
        conn = cls(kind, uri, address, timeout=timeout, interactive=interactive)
        conn._loop.start()
        try:
            conn._loop.submit(conn._calls.connect(conn._signals.on_message), conn.timeout + 5)
        except BaseException:
            conn._loop.closed = True
            conn._loop.stop()
            raise
        return conn

    def close(self) -> None:
        """Remove the match rules, disconnect and stop both threads. Idempotent."""
        with self._state_lock:
            if self._loop.closed:
                return
            self._loop.closed = True
        self._subs.clear()
        try:
            self._loop.finish(self._calls.disconnect(self._signals.farewell()))
        except Exception:  # noqa: BLE001 - closing is best-effort
            log.debug("D-Bus connection did not shut down cleanly", exc_info=True)
        self._subs.close()
        self._loop.stop()

    def service_present(self) -> bool:
        """Whether org.libvirt.secret has an owner on this bus or can be activated (open()
        chooses the RPC front end when it cannot; secretbus.uri)."""
        async def run() -> bool:
            (owned,) = await self._calls.call(DBUS_PATH, DBUS_IFACE, "NameHasOwner", "s", [BUS_NAME], "b",
                                              destination=DBUS_NAME)
            if owned:
                return True
            (names,) = await self._calls.call(DBUS_PATH, DBUS_IFACE, "ListActivatableNames", "", [], "as",
                                              destination=DBUS_NAME)
            return BUS_NAME in names
        return bool(self._loop.submit(run(), 2 * self.timeout + 1))

    def __repr__(self) -> str:
        state = "closed" if self._loop.closed else "open"
        return f"<DBusConnection {self.uri} {self.bus_label} {self.address} {state}>"

    # -- plumbing -------------------------------------------------------------------------
    async def _props(self, path: str, uuid: str | None = None) -> Found:
        """A secret's usage from its properties (GetAll: getattr, NoSecret if it is gone)."""
        (props,) = await self._calls.call(path, PROPS_IFACE, "GetAll", "s", [SECRET_IFACE], "a{sv}", uuid=uuid)
        found = usage_from_props(props)
        self._cache.remember(*found)
        return found

    def _lookup_usage(self, path: str, uuid: str) -> Usage | None:
        """Events thread: the usage of a secret the cache does not know."""
        try:
            _, utype, uid = self._loop.submit(self._props(path, uuid))
        except errors.SecretError:
            return None
        return utype, uid

    def _handle_of(self, uuid: str, utype: int, uid: str) -> Secret:
        return Secret(self, uuid, utype, uid)

    # -- connection level -----------------------------------------------------------------
    def define_xml(self, xml: str | bytes, flags: int = 0) -> Secret:
        text = wire.xml_text(xml)
        flags = wire.u32(flags)

        async def run() -> Found:
            (path,) = await self._calls.call(CONNECT_PATH, CONNECT_IFACE, "SecretDefineXML", "su",
                                             [text, flags], "o")
            uuid = uuid_from_path(path)
            if uuid is None:
                raise errors.OperationFailed(f"the service returned an unexpected object path {path}")
            try:
                return await self._props(path, uuid)
            except errors.SecretError:
                # No getattr permission (or undefined again already): the usage is still the
                # one of the document the service has just accepted.
                return self._usage_of_document(uuid, text)
        return self._handle_of(*self._loop.submit(run(), 2 * self.timeout + 1))

    def _usage_of_document(self, uuid: str, text: str) -> Found:
        from secretbus.core.secretxml import parse_secret_xml
        try:
            d = parse_secret_xml(text)
        except errors.SecretError:
            return uuid, 0, ""
        self._cache.remember(uuid, int(d.usage_type), d.usage_id or "")
        return uuid, int(d.usage_type), d.usage_id or ""

    def lookup_by_uuid(self, uuid: str) -> Secret:
        # GetAll on the object is the lookup: one round trip instead of SecretLookupByUUID +
        # GetAll (two polkit checks on the system bus), with the same permission (getattr)
        # and the same NoSecret for a missing secret.
        canon = canonical_uuid(uuid)
        return self._handle_of(*self._loop.submit(self._props(secret_path(canon), canon)))

    def lookup_by_usage(self, usage_type: int, usage_id: str) -> Secret:
        # Arguments that cannot be put on the wire ('i', 's') get the answer the service gives
        # for a usage no secret has.
        if not isinstance(usage_id, str):
            raise errors.arg_check("usageID", "virSecretLookupByUsage", "must not be NULL")
        if not wire.fits_int32(usage_type) or not wire_safe(usage_id):
            raise errors.NoSecret(f"no secret with matching usage '{usage_id}'")
        utype = int(usage_type)

        async def run() -> Found:
            (path,) = await self._calls.call(CONNECT_PATH, CONNECT_IFACE, "SecretLookupByUsage", "is",
                                             [utype, usage_id], "o")
            uuid = uuid_from_path(path)
            if uuid is None or known_usage(utype) != utype:
                return await self._props(path, uuid)
            # The service matched (type, id) exactly, so they are the secret's usage.
            self._cache.remember(uuid, utype, usage_id)
            return uuid, utype, usage_id
        return self._handle_of(*self._loop.submit(run(), 2 * self.timeout + 1))

    def list_secrets(self, flags: int = 0) -> list[Secret]:
        flags = wire.u32(flags)
        return [self._handle_of(*f) for f in self._loop.submit(self._list(flags), 2 * self.timeout + 1)]

    async def _list(self, flags: int) -> list[Found]:
        # ListSecrets filters by flags (server side); GetManagedObjects, pipelined right behind
        # it, brings every listed object's properties in the same round trip.
        replies: list[Any] = await asyncio.gather(
            self._calls.call(CONNECT_PATH, CONNECT_IFACE, "ListSecrets", "u", [flags], "ao"),
            self._calls.call(CONNECT_PATH, OM_IFACE, "GetManagedObjects", "", [], "a{oa{sa{sv}}}"),
            return_exceptions=True)
        listed, managed = replies
        if isinstance(listed, BaseException):
            raise listed
        objects: dict[str, Any] = managed[0] if not isinstance(managed, BaseException) else {}
        out: list[Found | None] = []
        missing: list[tuple[int, str]] = []
        for path in listed[0]:
            props = objects.get(path, {}).get(SECRET_IFACE)
            if props is None:
                missing.append((len(out), path))
                out.append(None)
                continue
            found = usage_from_props(props)
            self._cache.remember(*found)
            out.append(found)
        if missing:   # no ObjectManager, or defined after its snapshot: ask each one
            await self._fill_in(out, missing)
        return [f for f in out if f is not None]

    async def _fill_in(self, out: list[Found | None], missing: list[tuple[int, str]]) -> None:
        got = await asyncio.gather(*(self._props(p, uuid_from_path(p)) for _, p in missing),
                                   return_exceptions=True)
        for (i, _), res in zip(missing, got, strict=True):
            if isinstance(res, errors.NoSecret):
                continue              # undefined in the meantime
            if isinstance(res, BaseException):
                raise res
            out[i] = res

    # -- secret level ---------------------------------------------------------------------
    def _secret_call(self, uuid: str, member: str, sig: str, body: list[Any], reply_sig: str) -> list[Any]:
        canon = canonical_uuid(uuid)
        return self._loop.submit(self._calls.call(secret_path(canon), SECRET_IFACE, member, sig, body,
                                                  reply_sig, uuid=canon))

    def secret_xml_desc(self, uuid: str, flags: int = 0) -> str:
        return self._secret_call(uuid, "GetXMLDesc", "u", [wire.u32(flags)], "s")[0]

    def secret_get_value(self, uuid: str, flags: int = 0, *, internal_call: bool = False) -> bytes:
        if internal_call:    # not an API rule: the bus has no such argument
            raise errors.InvalidArg("internal_call is only available on embedded connections")
        return bytes(self._secret_call(uuid, "GetValue", "u", [wire.u32(flags)], "ay")[0])

    def secret_set_value(self, uuid: str, value: bytes, flags: int = 0) -> None:
        flags = wire.u32(flags)
        self._secret_call(uuid, "SetValue", "ayu", [wire.value_bytes(value), flags], "")

    def secret_undefine(self, uuid: str) -> None:
        self._secret_call(uuid, "Undefine", "", [], "")

    # -- events ---------------------------------------------------------------------------
    def subscribe(self, handler: EventHandler, event_id: int | None = None,
                  secret: Secret | str | None = None) -> int:
        if not callable(handler):
            raise errors.InvalidArg("handler must be callable")
        if isinstance(secret, str):
            secret = parse_uuid(secret) or secret
        wanted = event_filter(event_id, secret)
        return self._subs.add(handler, wanted,
                              first=lambda: self._loop.submit(self._signals.listen(), self.timeout + 1))

    def unsubscribe(self, sub_id: int) -> None:
        self._subs.remove(sub_id, last=lambda: self._loop.submit(self._signals.unlisten(), self.timeout + 1))

    def is_alive(self) -> bool:
        bus = self._calls.bus
        return not self._loop.closed and bus is not None and bus.connected

    def on_lost(self, handler: LostHandler) -> None:
        """The bus connection ending (the bus daemon gone), not the service: a secretbusd that
        restarts keeps the subscriptions, and its events come again."""
        if self._subs.add_lost(handler):
            self._loop.submit(self._watch_bus(), self.timeout + 1)

    async def _watch_bus(self) -> None:
        bus = self._calls.bus
        if bus is None:
            return

        async def watch() -> None:
            with contextlib.suppress(Exception):
                await bus.wait_for_disconnect()
            if not self._loop.closed:
                self._subs.events.put("end of file")     # after the signals that came before
        self._bus_watch = asyncio.get_running_loop().create_task(watch())


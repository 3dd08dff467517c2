"""The D-Bus client: `DBusConnection`, the `Connection` API over the bus.

`secret:///system` and `secret:///session` open one of these. It is synchronous, like the
embedded connection, and thread-safe: each connection owns a private asyncio event loop
running in a daemon thread ("secretbus-dbus"), and every public method submits a coroutine
to that loop with `asyncio.run_coroutine_threadsafe` and waits for its result. A timeout
applies twice: `asyncio.wait_for` around each bus call inside the loop, and a slightly
longer wait on the caller's side in case the loop itself is stuck.

Events arrive as signals on the loop thread, which only updates a small usage cache and
queues them; a second daemon thread ("secretbus-events", started by the first
`subscribe`) calls the handlers in arrival order. Handlers may therefore call the
connection (e.g. re-read a value after SecretValueChanged), as they can on an embedded
connection; an exception in a handler is logged, never propagated.

Signals are accepted only from the current owner of `org.libvirt.secret` (tracked with
GetNameOwner and NameOwnerChanged), so another peer cannot fake events with directed
signals.

No secret value is ever logged or put into an exception text or a repr.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import os
import queue
import stat
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from secretbus.bus import connect as busconn
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
    SECRETS_PATH,
    secret_path,
    uuid_from_path,
)
from secretbus.core import compat, errors
from secretbus.core.api import Connection, EventHandler, Secret, event_filter
from secretbus.core.model import VALUE_MAX, EventId, Lifecycle, SecretEvent, UsageType
from secretbus.core.uuids import parse_uuid
from secretbus.store.paths import InstanceKind

log = logging.getLogger("secretbus.client")

DEFAULT_SYSTEM_ADDRESS = "unix:path=/var/run/dbus/system_bus_socket"

ERR_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
ERR_UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
ERR_NAME_HAS_NO_OWNER = "org.freedesktop.DBus.Error.NameHasNoOwner"
ERR_NO_REPLY = "org.freedesktop.DBus.Error.NoReply"
_NOT_RUNNING = frozenset({"org.freedesktop.DBus.Error.ServiceUnknown", ERR_NAME_HAS_NO_OWNER})
_SPAWN_PREFIX = "org.freedesktop.DBus.Error.Spawn."

_INVALID_UUID = "uuidstr in virSecretLookupByUUIDString must be a valid UUID"
_CACHE_MAX = 16384
_INT32 = (-(2 ** 31), 2 ** 31)


def error_from_reply(name: str, text: str, *, bus: str = "session bus",
                     uuid: str | None = None) -> errors.SecretError:
    """The project's exception for a D-Bus error reply `name: text`.

    `uuid` is set for calls on a secret object: the service answers UnknownObject for a
    secret that does not exist, which the embedded driver reports as NoSecret.
    """
    if name.startswith(errors.DBUS_ERROR_PREFIX):
        return errors.from_dbus(name, text)
    if name == ERR_ACCESS_DENIED:
        return errors.AccessDenied(text)
    if name in _NOT_RUNNING or name.startswith(_SPAWN_PREFIX):
        return errors.OperationFailed(f"secretbus service is not running on the {bus} ({name}: {text})")
    if name == ERR_NO_REPLY:
        return errors.OperationFailed(f"no reply from {BUS_NAME}: {text}" if text else f"no reply from {BUS_NAME}")
    if name == ERR_UNKNOWN_OBJECT and uuid is not None:
        return errors.NoSecret(f"no secret with matching uuid '{uuid}'")
    return errors.OperationFailed(f"{name}: {text}" if text else name)


def default_address(kind: InstanceKind) -> str:
    """The bus address for `kind`, as libdbus / sd-bus find it."""
    if kind is InstanceKind.SYSTEM:
        return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_ADDRESS
    env = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        path = os.path.join(runtime, "bus")
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return f"unix:path={path}"
        except OSError:
            pass
    raise errors.OperationFailed("cannot connect to the session bus: DBUS_SESSION_BUS_ADDRESS is not set"
                                 " and there is no $XDG_RUNTIME_DIR/bus socket")


def _u32(flags: int) -> int:
    """Flags for a 'u' argument. Negative values are taken as C's unsigned int would, so the
    service reports the same 'unsupported flags (0x...)' text as the embedded driver."""
    if not isinstance(flags, int):
        raise errors.InvalidArg(f"flags must be an integer, not {type(flags).__name__}")
    if not -(2 ** 31) <= flags < 2 ** 32:
        raise errors.InvalidArg(f"flags {flags} do not fit in 32 bits")
    return int(flags) & 0xFFFFFFFF


def _wire_safe(text: str) -> bool:
    """A D-Bus string may hold no NUL and must be valid UTF-8 (no lone surrogates)."""
    if "\0" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decode_document(data: bytes) -> str | None:
    """`data` as text, in the encoding libxml2 reads it with; None if it does not parse."""
    from lxml import etree

    from secretbus.core.secretxml import _new_parser
    try:
        root = etree.fromstring(data, _new_parser())
        encoding = root.getroottree().docinfo.encoding or "utf-8"
        return data.decode(encoding)
    except (etree.LxmlError, ValueError, TypeError, LookupError):
        return None


def _usage(props: dict[str, Any]) -> tuple[str, int, str]:
    """(uuid, usage type, usage id) from an org.libvirt.Secret property dict."""
    try:
        uuid = props["UUID"].value
        utype = int(props["UsageType"].value)
        uid = props["UsageID"].value
    except (KeyError, AttributeError, TypeError, ValueError):
        raise errors.OperationFailed("the service sent incomplete org.libvirt.Secret properties") from None
    canon = parse_uuid(uuid) if isinstance(uuid, str) else None
    if canon is None or not isinstance(uid, str):
        raise errors.OperationFailed("the service sent invalid org.libvirt.Secret properties")
    if not compat.enum_has_value(UsageType, utype):
        utype = UsageType.NONE
    return canon, utype, uid


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


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
        self.bus_label = "system bus" if kind is InstanceKind.SYSTEM else "session bus"
        self.timeout = float(timeout)
        self.interactive = interactive
        self._flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else MessageFlag.NONE
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=_run_loop, args=(self._loop,),
                                        name="secretbus-dbus", daemon=True)
        self._loop_tid: int | None = None
        self._bus: MessageBus | None = None
        self._closed = False
        self._state_lock = threading.Lock()
        # Loop thread only: uuid -> (usage type, usage id); owner of the bus name.
        self._usage_cache: collections.OrderedDict[str, tuple[int, str]] = collections.OrderedDict()
        self._owner: str | None = None
        # Events: copy-on-write dict, replaced under _sub_lock, read without locking.
        self._sub_lock = threading.Lock()
        self._subs: dict[int, tuple[EventHandler, Callable[[SecretEvent], bool]]] = {}
        self._sub_ids = itertools.count(1)
        self._rules: list[str] = []
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._dispatcher: threading.Thread | None = None

    # -- opening and closing --------------------------------------------------------------
    @classmethod
    def open(cls, kind: InstanceKind, uri: str, *, timeout: float = 25.0,
             bus_address: str | None = None, interactive: bool = False) -> DBusConnection:
        """Connect to the system (SYSTEM) or session (SESSION) bus; `bus_address` overrides
        the address ($DBUS_SYSTEM_BUS_ADDRESS / $DBUS_SESSION_BUS_ADDRESS otherwise).
        `interactive=True` lets polkit ask the user (ALLOW_INTERACTIVE_AUTHORIZATION)."""
        if kind not in (InstanceKind.SYSTEM, InstanceKind.SESSION):
            raise errors.InvalidArg(f"a D-Bus connection needs the system or session instance, not {kind.value}")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise errors.InvalidArg("timeout must be a positive number of seconds")
        address = bus_address or default_address(kind)
        conn = cls(kind, uri, address, timeout=timeout, interactive=interactive)
        conn._thread.start()
        try:
            conn._submit(conn._connect(), conn.timeout + 5)
        except BaseException:
            conn._closed = True
            conn._stop_loop()
            raise
        return conn

    async def _connect(self) -> None:
        self._loop_tid = threading.get_ident()
        where = f"cannot connect to the {self.bus_label} at {self.address}"
        try:
            bus = await asyncio.wait_for(busconn.connect(self.address), self.timeout)
        except TimeoutError:
            raise errors.OperationFailed(f"{where}: no answer within {self.timeout:g} s") from None
        except OSError as e:
            raise errors.OperationFailed(f"{where}: {e.strerror or e}") from None
        except Exception as e:  # noqa: BLE001 - AuthError, InvalidAddressError, ...
            raise errors.OperationFailed(f"{where}: {e or type(e).__name__}") from None
        bus.add_message_handler(self._on_message)
        self._bus = bus

    def close(self) -> None:
        """Remove the match rules, disconnect and stop both threads. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        with self._sub_lock:
            self._subs = {}
        if self._thread.is_alive():
            try:
                fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
                if threading.get_ident() != self._loop_tid:
                    fut.result(5)
            except Exception:  # noqa: BLE001 - closing is best-effort
                log.debug("D-Bus connection did not shut down cleanly", exc_info=True)
        if self._dispatcher is not None:
            self._events.put(None)
            if threading.current_thread() is not self._dispatcher:
                self._dispatcher.join(5)
        self._stop_loop()

    async def _shutdown(self) -> None:
        bus, self._bus = self._bus, None
        if bus is None or not bus.connected:
            return
        rules, self._rules = self._rules, []
        sent = [bus.send(self._dbus_msg("RemoveMatch", "s", [r], flags=MessageFlag.NO_REPLY_EXPECTED))
                for r in rules]
        if sent:
            await asyncio.wait_for(asyncio.gather(*sent, return_exceptions=True), 2)
        bus.disconnect()
        try:
            await asyncio.wait_for(bus.wait_for_disconnect(), 2)
        except Exception:  # noqa: BLE001
            pass

    def _stop_loop(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:
            return
        if threading.get_ident() != self._loop_tid:
            self._thread.join(5)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<DBusConnection {self.uri} {self.bus_label} {self.address} {state}>"

    # -- plumbing -------------------------------------------------------------------------
    def _submit(self, coro: Coroutine[Any, Any, Any], wait: float | None = None) -> Any:
        """Run `coro` on the loop and wait for it (at most `wait` s, default timeout + 1)."""
        if threading.get_ident() == self._loop_tid:
            coro.close()
            raise errors.OperationFailed("a secretbus D-Bus connection cannot be called from its own event loop")
        if self._closed or self._loop.is_closed():
            coro.close()
            raise errors.OperationFailed("the connection is closed")
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:
            coro.close()
            raise errors.OperationFailed("the connection is closed") from None
        try:
            return fut.result(self.timeout + 1 if wait is None else wait)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise errors.OperationFailed(f"no reply from {BUS_NAME} within {self.timeout:g} s") from None
        except concurrent.futures.CancelledError:
            raise errors.OperationFailed("the connection is closed") from None
        except BaseException:
            fut.cancel()
            raise

    def _dbus_msg(self, member: str, sig: str, body: list[Any], *, flags=MessageFlag.NONE) -> Message:
        return Message(destination=DBUS_NAME, path=DBUS_PATH, interface=DBUS_IFACE, member=member,
                       signature=sig, body=body, flags=flags)

    async def _call(self, path: str, iface: str, member: str, sig: str, body: list[Any], reply_sig: str,
                    *, uuid: str | None = None, destination: str = BUS_NAME,
                    flags: MessageFlag | None = None) -> list[Any]:
        """One method call; returns the reply body or raises the mapped SecretError."""
        bus = self._bus
        if bus is None or not bus.connected:
            raise errors.OperationFailed("the connection is closed" if self._closed else
                                         f"the connection to the {self.bus_label} was lost")
        msg = Message(destination=destination, path=path, interface=iface, member=member,
                      signature=sig, body=body, flags=self._flags if flags is None else flags,
                      serial=bus.next_serial())
        try:
            # asyncio.timeout: wait_for's semantics without its extra task (~20 % faster).
            async with asyncio.timeout(self.timeout):
                reply = await bus.call(msg)
        except BaseException as e:
            # Timed out or cancelled: forget the call, so a late reply is dropped.
            compat.forget_pending_call(bus, msg.serial)
            if isinstance(e, TimeoutError):
                raise errors.OperationFailed(f"no reply from {destination} within {self.timeout:g} s") from None
            if not isinstance(e, Exception):
                raise                    # CancelledError, KeyboardInterrupt...
            if self._closed:
                raise errors.OperationFailed("the connection is closed") from None
            # The connection broke under the call. Only transport errors carry their text:
            # nothing else may quote an argument.
            reason = str(e) if isinstance(e, (OSError, EOFError)) and str(e) else type(e).__name__
            raise errors.OperationFailed(f"the connection to the {self.bus_label} was lost: {reason}") from None
        if reply is None:
            raise errors.OperationFailed("the connection is closed")
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise error_from_reply(reply.error_name or "", text, bus=self.bus_label, uuid=uuid)
        if reply.signature != reply_sig:
            raise errors.OperationFailed(f"unexpected reply to {iface}.{member}: signature "
                                         f"'{reply.signature}', expected '{reply_sig}'")
        return reply.body

    def _remember(self, uuid: str, utype: int, uid: str) -> None:
        """Loop thread only."""
        cache = self._usage_cache
        cache[uuid] = (utype, uid)
        cache.move_to_end(uuid)
        while len(cache) > _CACHE_MAX:
            cache.popitem(last=False)

    async def _props(self, path: str, uuid: str | None = None) -> tuple[str, int, str]:
        (props,) = await self._call(path, PROPS_IFACE, "GetAll", "s", [SECRET_IFACE], "a{sv}", uuid=uuid)
        found = _usage(props)
        self._remember(*found)
        return found

    def _handle(self, found: tuple[str, int, str]) -> Secret:
        return Secret(self, *found)

    @staticmethod
    def _canon(uuid: str) -> str:
        canon = parse_uuid(uuid) if isinstance(uuid, str) else None
        if canon is None:
            raise errors.InvalidArg(_INVALID_UUID)
        return canon

    # -- connection level -----------------------------------------------------------------
    def define_xml(self, xml: str, flags: int = 0) -> Secret:
        text = self._xml_for_bus(xml)
        flags = _u32(flags)

        async def run() -> str:
            (path,) = await self._call(CONNECT_PATH, CONNECT_IFACE, "SecretDefineXML", "su", [text, flags], "o")
            uuid = uuid_from_path(path)
            if uuid is None:
                raise errors.OperationFailed(f"the service returned an unexpected object path {path}")
            return uuid
        uuid = self._submit(run())
        # The usage comes from the document the service has just accepted, read by the same
        # parser: no second round trip (and on the system bus no second polkit check).
        found = self._usage_from_xml(uuid, text)
        if found is None:
            try:
                found = self._submit(self._props(secret_path(uuid), uuid))
            except errors.SecretError:      # undefined again already, or no getattr permission
                found = (uuid, int(UsageType.NONE), "")
        self._learn(found)
        return self._handle(found)

    def _learn(self, found: tuple[str, int, str]) -> None:
        """Put a handle's usage into the cache (which only the loop thread touches)."""
        try:
            self._loop.call_soon_threadsafe(self._remember, *found)
        except RuntimeError:
            pass                            # closed meanwhile

    @staticmethod
    def _xml_for_bus(xml: str | bytes) -> str:
        """The document as a D-Bus string; what cannot travel gets the embedded driver's error.

        Bytes are decoded as their XML declaration (or BOM) says, as the embedded driver
        reads them; the service re-encodes a string as UTF-8 whatever its declaration says.
        """
        from secretbus.core.secretxml import parse_secret_xml
        if isinstance(xml, (bytes, bytearray, memoryview)):
            data = bytes(xml)
            text = _decode_document(data)
            if text is None:
                parse_secret_xml(data)     # raises the embedded driver's XMLError
                raise errors.XMLError("failed to parse xml document '(string)': unknown encoding")
        elif isinstance(xml, str):
            text = xml
        else:
            raise errors.InvalidArg("secret XML must be str or bytes")
        if not _wire_safe(text):
            parse_secret_xml(text)         # raises the embedded driver's XMLError
            raise errors.XMLError("failed to parse xml document '(string)': invalid character")
        return text

    @staticmethod
    def _usage_from_xml(uuid: str, text: str) -> tuple[str, int, str] | None:
        try:
            from secretbus.core.secretxml import parse_secret_xml
            d = parse_secret_xml(text)
        except Exception:  # noqa: BLE001
            return None
        return uuid, int(d.usage_type), d.usage_id or ""

    def lookup_by_uuid(self, uuid: str) -> Secret:
        # GetAll on the object is the lookup: one round trip instead of SecretLookupByUUID +
        # GetAll (two polkit checks on the system bus), with the same permission (getattr)
        # and the same NoSecret for a missing secret.
        canon = self._canon(uuid)
        return self._handle(self._submit(self._props(secret_path(canon), canon)))

    def lookup_by_usage(self, usage_type: int, usage_id: str) -> Secret:
        if not isinstance(usage_id, str):
            raise errors.InvalidArg("usageID in virSecretLookupByUsage must not be NULL")
        if (not isinstance(usage_type, int) or not _INT32[0] <= usage_type < _INT32[1]
                or not _wire_safe(usage_id)):
            raise errors.NoSecret(f"no secret with matching usage '{usage_id}'")
        utype = int(usage_type)

        async def run() -> tuple[str, int, str]:
            (path,) = await self._call(CONNECT_PATH, CONNECT_IFACE, "SecretLookupByUsage", "is",
                                       [utype, usage_id], "o")
            uuid = uuid_from_path(path)
            if uuid is None or not compat.enum_has_value(UsageType, utype):
                return await self._props(path, uuid)
            # The service matched (type, id) exactly, so they are the secret's usage.
            self._remember(uuid, utype, usage_id)
            return uuid, utype, usage_id
        return self._handle(self._submit(run(), 2 * self.timeout + 1))

    def list_secrets(self, flags: int = 0) -> list[Secret]:
        flags = _u32(flags)
        return [self._handle(f) for f in self._submit(self._list(flags), 2 * self.timeout + 1)]

    async def _list(self, flags: int) -> list[tuple[str, int, str]]:
        # ListSecrets filters by flags (server side); GetManagedObjects, pipelined right behind
        # it, brings every listed object's properties in the same round trip.
        listed, managed = await asyncio.gather(
            self._call(CONNECT_PATH, CONNECT_IFACE, "ListSecrets", "u", [flags], "ao"),
            self._call(CONNECT_PATH, OM_IFACE, "GetManagedObjects", "", [], "a{oa{sa{sv}}}"),
            return_exceptions=True)
        if isinstance(listed, BaseException):
            raise listed
        objects: dict[str, Any] = managed[0] if not isinstance(managed, BaseException) else {}
        out: list[tuple[str, int, str] | None] = []
        missing: list[tuple[int, str]] = []
        for path in listed[0]:
            props = objects.get(path, {}).get(SECRET_IFACE)
            if props is not None:
                found = _usage(props)
                self._remember(*found)
                out.append(found)
            else:
                missing.append((len(out), path))
                out.append(None)
        if missing:   # no ObjectManager, or defined after its snapshot: ask each one
            got = await asyncio.gather(*(self._props(p, uuid_from_path(p)) for _, p in missing),
                                       return_exceptions=True)
            for (i, _), res in zip(missing, got):
                if isinstance(res, errors.NoSecret):
                    continue              # undefined in the meantime
                if isinstance(res, BaseException):
                    raise res
                out[i] = res
        return [f for f in out if f is not None]

    # -- secret level ---------------------------------------------------------------------
    def _secret_call(self, uuid: str, member: str, sig: str, body: list[Any], reply_sig: str) -> list[Any]:
        canon = self._canon(uuid)
        return self._submit(self._call(secret_path(canon), SECRET_IFACE, member, sig, body, reply_sig,
                                       uuid=canon))

    def secret_xml_desc(self, uuid: str, flags: int = 0) -> str:
        return self._secret_call(uuid, "GetXMLDesc", "u", [_u32(flags)], "s")[0]

    def secret_get_value(self, uuid: str, flags: int = 0, *, internal_call: bool = False) -> bytes:
        if internal_call:
            raise errors.InvalidArg("internal_call is only available on embedded connections")
        return bytes(self._secret_call(uuid, "GetValue", "u", [_u32(flags)], "ay")[0])

    def secret_set_value(self, uuid: str, value: bytes, flags: int = 0) -> None:
        flags = _u32(flags)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise errors.InvalidArg("value in virSecretSetValue must be bytes")
        value = bytes(value)
        if len(value) > VALUE_MAX:
            raise errors.InvalidArg(f"secret value is larger than {VALUE_MAX} bytes")
        self._secret_call(uuid, "SetValue", "ayu", [value, flags], "")

    def secret_undefine(self, uuid: str) -> None:
        self._secret_call(uuid, "Undefine", "", [], "")

    # -- events ---------------------------------------------------------------------------
    def _match_rules(self) -> list[str]:
        own = f"type='signal',sender='{BUS_NAME}'"
        return [
            f"type='signal',sender='{DBUS_NAME}',path='{DBUS_PATH}',interface='{DBUS_IFACE}',"
            f"member='NameOwnerChanged',arg0='{BUS_NAME}'",
            f"{own},interface='{CONNECT_IFACE}',path='{CONNECT_PATH}',member='SecretEvent'",
            f"{own},interface='{CONNECT_IFACE}',path='{CONNECT_PATH}',member='SecretValueChanged'",
            # Usage data of new and redefined secrets, sent just before their SecretEvent.
            f"{own},interface='{OM_IFACE}',path='{CONNECT_PATH}',member='InterfacesAdded'",
            f"{own},interface='{PROPS_IFACE}',member='PropertiesChanged',"
            f"path_namespace='{SECRETS_PATH}',arg0='{SECRET_IFACE}'",
        ]

    async def _add_matches(self) -> None:
        rules = self._match_rules()
        calls = [self._call(DBUS_PATH, DBUS_IFACE, "AddMatch", "s", [r], "", destination=DBUS_NAME,
                            flags=MessageFlag.NONE) for r in rules]
        calls.append(self._call(DBUS_PATH, DBUS_IFACE, "GetNameOwner", "s", [BUS_NAME], "s",
                                destination=DBUS_NAME, flags=MessageFlag.NONE))
        res = await asyncio.gather(*calls, return_exceptions=True)
        added = [r for r, ok in zip(rules, res) if not isinstance(ok, BaseException)]
        self._rules = added
        failed = [e for e in res[:-1] if isinstance(e, BaseException)]
        if failed:
            await self._remove_matches()
            raise failed[0]
        owner = res[-1]
        self._owner = owner[0] if not isinstance(owner, BaseException) else None

    async def _remove_matches(self) -> None:
        rules, self._rules = self._rules, []
        await asyncio.gather(*(self._call(DBUS_PATH, DBUS_IFACE, "RemoveMatch", "s", [r], "",
                                          destination=DBUS_NAME, flags=MessageFlag.NONE) for r in rules),
                             return_exceptions=True)

    def subscribe(self, handler: EventHandler, event_id: int | None = None,
                  secret: Secret | str | None = None) -> int:
        if not callable(handler):
            raise errors.InvalidArg("handler must be callable")
        if isinstance(secret, str):
            secret = parse_uuid(secret) or secret
        wanted = event_filter(event_id, secret)
        with self._sub_lock:
            if self._closed:
                raise errors.OperationFailed("the connection is closed")
            if not self._subs:
                self._submit(self._add_matches(), self.timeout + 1)
                if self._dispatcher is None:
                    self._dispatcher = threading.Thread(target=self._dispatch_loop, name="secretbus-events",
                                                        daemon=True)
                    self._dispatcher.start()
            sub_id = next(self._sub_ids)
            self._subs = {**self._subs, sub_id: (handler, wanted)}
        return sub_id

    def unsubscribe(self, sub_id: int) -> None:
        with self._sub_lock:
            if sub_id not in self._subs:
                raise errors.InvalidArg(f"callback {sub_id} is not registered")
            subs = dict(self._subs)
            del subs[sub_id]
            self._subs = subs
            if not subs and not self._closed:
                try:
                    self._submit(self._remove_matches(), self.timeout + 1)
                except errors.SecretError:
                    log.debug("could not remove D-Bus match rules", exc_info=True)

    def _on_message(self, msg: Message) -> None:
        """Loop thread: every message this connection receives passes here first."""
        if msg.message_type is not MessageType.SIGNAL:
            return None
        try:
            self._on_signal(msg)
        except Exception:  # noqa: BLE001 - a malformed signal must not break the connection
            log.warning("ignored a malformed %s.%s signal", msg.interface, msg.member)
        return None

    def _on_signal(self, msg: Message) -> None:
        member, body = msg.member, msg.body
        if msg.sender == DBUS_NAME:
            if member == "NameOwnerChanged" and msg.signature == "sss" and body[0] == BUS_NAME:
                new = body[2] or None
                if new != self._owner:
                    self._owner = new
                    self._usage_cache.clear()   # a restarted service may hold other definitions
            return
        if not self._rules or self._owner is None or msg.sender != self._owner:
            return
        path, iface = msg.path, msg.interface
        if path == CONNECT_PATH and iface == CONNECT_IFACE:
            if member == "SecretEvent" and msg.signature == "oii":
                uuid = uuid_from_path(body[0])
                if uuid is None or not compat.enum_has_value(Lifecycle, body[1]):
                    return
                lifecycle = Lifecycle(body[1])
                usage = (self._usage_cache.pop(uuid, None) if lifecycle is Lifecycle.UNDEFINED
                         else self._usage_cache.get(uuid))
                self._events.put((EventId.LIFECYCLE, uuid, body[0], lifecycle, int(body[2]), usage))
            elif member == "SecretValueChanged" and msg.signature == "o":
                uuid = uuid_from_path(body[0])
                if uuid is not None:
                    self._events.put((EventId.VALUE_CHANGED, uuid, body[0], None, 0,
                                      self._usage_cache.get(uuid)))
        elif path == CONNECT_PATH and iface == OM_IFACE:
            if member == "InterfacesAdded" and msg.signature == "oa{sa{sv}}":
                props = body[1].get(SECRET_IFACE)
                if props is not None:
                    self._remember(*_usage(props))
        elif iface == PROPS_IFACE and member == "PropertiesChanged" and msg.signature == "sa{sv}as":
            uuid = uuid_from_path(path)
            old = self._usage_cache.get(uuid) if uuid else None
            if old is not None and body[0] == SECRET_IFACE:
                changed = body[1]
                utype = int(changed["UsageType"].value) if "UsageType" in changed else old[0]
                uid = changed["UsageID"].value if "UsageID" in changed else old[1]
                if not compat.enum_has_value(UsageType, utype):
                    utype = UsageType.NONE
                self._remember(uuid, utype, uid)

    def _dispatch_loop(self) -> None:
        """Events thread: call the handlers, in arrival order."""
        while True:
            item = self._events.get()
            if item is None:
                return
            event_id, uuid, path, lifecycle, detail, usage = item
            probe = SecretEvent(event_id, uuid, UsageType.NONE, "", lifecycle, detail)
            targets = [(sid, h) for sid, (h, wanted) in self._subs.items() if wanted(probe)]
            if not targets:
                continue
            if usage is None and lifecycle is not Lifecycle.UNDEFINED and not self._closed:
                try:        # a secret this connection has not seen yet: ask once
                    _, *found = self._submit(self._props(path, uuid))
                    usage = tuple(found)
                except errors.SecretError:
                    usage = None
            utype, uid = usage or (UsageType.NONE, "")
            ev = SecretEvent(event_id, uuid, UsageType(utype), uid, lifecycle, detail)
            handle = Secret(self, uuid, utype, uid)
            for sid, handler in targets:
                if sid not in self._subs:
                    continue      # unsubscribed while an earlier handler ran
                try:
                    handler(handle, ev)
                except Exception:  # noqa: BLE001
                    log.exception("secret event handler %d failed", sid)

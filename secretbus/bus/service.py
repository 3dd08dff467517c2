"""The D-Bus front end: `org.libvirt.Connect` (secret part) and one `org.libvirt.Secret` per secret.

Messages are dispatched directly from dbus-fast's message-handler hook instead of exporting
one ServiceInterface per secret: 10,000 secrets cost a dict lookup, not 10,000 objects, and
the caller's unique name is at hand for access checks. Each call goes through three steps:
prepare (parse arguments, find objects, name the permissions), authorise (skipped entirely
when access control is off), act (inline for reads, in a worker thread for anything that
writes files, so fsync never stalls the event loop).

No reply, error or signal ever carries a value except GetValue's own return.
"""
from __future__ import annotations

import asyncio
import contextvars
import importlib.resources
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.constants import ErrorType

from secretbus.access.permissions import AccessControl, Caller, Perm
from secretbus.bus.names import (
    CONNECT_IFACE,
    CONNECT_PATH,
    INTROSPECT_IFACE,
    INVALID_ARGS,
    OM_IFACE,
    PEER_IFACE,
    PROPS_IFACE,
    SECRET_IFACE,
    SECRET_PREFIX,
    SECRETS_PATH,
    secret_path,
    uuid_from_path,
)
from secretbus.core import errors, logsetup
from secretbus.core.model import VALUE_MAX, EventId, Lifecycle, SecretDef, SecretEvent
from secretbus.driver import rules

log = logging.getLogger("secretbus.dbus")

def _interface_xml(name: str) -> str:
    """The <interface> element of dbus/<name>.xml, verbatim, so introspection equals the file."""
    text = importlib.resources.files("secretbus.bus").joinpath(f"interfaces/{name}.xml").read_text()
    start = text.index("  <interface ")
    end = text.index("</interface>", start) + len("</interface>")
    return text[start:end]


_STANDARD = """  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect">
      <arg name="xml_data" type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping"/>
    <method name="GetMachineId">
      <arg name="machine_uuid" type="s" direction="out"/>
    </method>
  </interface>
"""
_PROPERTIES = """  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="out"/>
    </method>
    <method name="GetAll">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="props" type="a{sv}" direction="out"/>
    </method>
    <method name="Set">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="in"/>
    </method>
    <signal name="PropertiesChanged">
      <arg name="interface_name" type="s"/>
      <arg name="changed_properties" type="a{sv}"/>
      <arg name="invalidated_properties" type="as"/>
    </signal>
  </interface>
"""
_OBJECT_MANAGER = """  <interface name="org.freedesktop.DBus.ObjectManager">
    <method name="GetManagedObjects">
      <arg name="objects" type="a{oa{sa{sv}}}" direction="out"/>
    </method>
    <signal name="InterfacesAdded">
      <arg name="object" type="o"/>
      <arg name="interfaces" type="a{sa{sv}}"/>
    </signal>
    <signal name="InterfacesRemoved">
      <arg name="object" type="o"/>
      <arg name="interfaces" type="as"/>
    </signal>
  </interface>
"""
_DOCTYPE = ('<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
            ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n')


def _node(body: str, children: list[str]) -> str:
    kids = "".join(f'  <node name="{c}"/>\n' for c in children)
    return f"{_DOCTYPE}<node>\n{body}{kids}</node>\n"


def secret_properties(d: SecretDef) -> dict[str, Variant]:
    return {
        "UUID": Variant("s", d.uuid),
        "UsageID": Variant("s", d.usage_id or ""),
        "UsageType": Variant("i", int(d.usage_type)),
        "Description": Variant("s", d.description or ""),
        "Ephemeral": Variant("b", d.ephemeral),
        "Private": Variant("b", d.private),
    }


class _DBusFailure(Exception):
    """A reply with a freedesktop error name (wrong arguments, unknown property...)."""

    def __init__(self, name: str, text: str):
        super().__init__(text)
        self.name, self.text = name, text


@dataclass
class Op:
    """A prepared call: what to check, then what to do."""

    run: Callable[..., tuple[str, list[Any]]]      # -> (reply signature, body)
    checks: list[tuple[Perm, SecretDef | None]] = field(default_factory=list)
    blocking: bool = False                         # writes files: run in the worker thread
    filter_perm: Perm | None = None                # run(allowed_defs) gets the defs passing it
    candidates: list[SecretDef] | None = None
    private_value: bool = False                    # GetValue of a private secret
    large: bool = False                            # a reply that can be ~1 MB (lists)


class SecretService:
    def __init__(self, driver, bus, access: AccessControl, *, private_readers: frozenset[int] = frozenset()):
        self.driver = driver
        self.bus = bus
        self.access = access
        self.private_readers = private_readers
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # One worker keeps writes in arrival order; the driver serialises them anyway.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secretbus-io")
        self._tasks: set[asyncio.Task] = set()
        self._exported: dict[str, SecretDef] = {}   # what the bus has been told exists
        self._closing = False
        self._path_cache: dict[int, tuple[int, list[str]]] = {}
        self._large_replies = asyncio.Lock()
        self.calls = 0                         # for idle tracking
        self._sub: int | None = None
        self._connect_xml = _node(_STANDARD + _OBJECT_MANAGER + _interface_xml(CONNECT_IFACE), ["secret"])
        self._secret_body = _STANDARD + _PROPERTIES + _interface_xml(SECRET_IFACE)
        self._methods = self._method_table()

    # -- life cycle -------------------------------------------------------------------
    def attach(self) -> None:
        self._exported = {d.uuid: d for d in self.driver.list_secrets()}
        self.bus.add_message_handler(self._on_message)
        self._sub = self.driver.subscribe(self._on_driver_event)

    def refresh(self) -> None:
        """After a reload: announce objects that appeared or vanished (no lifecycle events)."""
        now = {d.uuid: d for d in self.driver.list_secrets()}
        for uuid in list(self._exported):
            if uuid not in now:
                del self._exported[uuid]
                self._signal(CONNECT_PATH, OM_IFACE, "InterfacesRemoved", "oas", [secret_path(uuid), [SECRET_IFACE]])
        for d in now.values():
            self._announce(d)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self) -> None:
        """Stop taking calls and wait for those already running (SIGTERM)."""
        self._closing = True
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._executor.shutdown(wait=True)
        if self._sub is not None:
            self.driver.unsubscribe(self._sub)
            self._sub = None

    # -- signals ----------------------------------------------------------------------
    def _signal(self, path: str, iface: str, member: str, sig: str, body: list[Any]) -> None:
        self.bus.send(Message.new_signal(path, iface, member, sig, body))

    def _on_driver_event(self, ev: SecretEvent) -> None:
        if threading.get_ident() == self._loop_thread:
            self._emit(ev)
        else:
            self._loop.call_soon_threadsafe(self._emit, ev)

    def _emit(self, ev: SecretEvent) -> None:
        path = secret_path(ev.uuid)
        if ev.event_id == EventId.VALUE_CHANGED:
            self._signal(CONNECT_PATH, CONNECT_IFACE, "SecretValueChanged", "o", [path])
            return
        if ev.lifecycle == Lifecycle.DEFINED:
            try:
                self._announce(self.driver.lookup_by_uuid(ev.uuid))
            except errors.NoSecret:
                pass      # undefined again before this ran; its own event follows
        else:
            if self._exported.pop(ev.uuid, None) is not None:
                self._signal(CONNECT_PATH, OM_IFACE, "InterfacesRemoved", "oas", [path, [SECRET_IFACE]])
        self._signal(CONNECT_PATH, CONNECT_IFACE, "SecretEvent", "oii", [path, int(ev.lifecycle), ev.detail])

    def _announce(self, d: SecretDef) -> None:
        """Tell ObjectManager / Properties watchers that `d` exists or changed."""
        old = self._exported.get(d.uuid)
        self._exported[d.uuid] = d
        props = secret_properties(d)
        if old is None:
            self._signal(CONNECT_PATH, OM_IFACE, "InterfacesAdded", "oa{sa{sv}}",
                         [secret_path(d.uuid), {SECRET_IFACE: props}])
        elif old != d:
            before = secret_properties(old)
            changed = {k: v for k, v in props.items() if before[k] != v}
            if changed:
                self._signal(secret_path(d.uuid), PROPS_IFACE, "PropertiesChanged", "sa{sv}as",
                             [SECRET_IFACE, changed, []])

    # -- dispatch ---------------------------------------------------------------------
    def _method_table(self) -> dict[tuple[str, str, str], tuple[str, Callable[[Message], Op]]]:
        """(object kind, interface, member) -> (input signature, prepare function)."""
        return {
            ("connect", CONNECT_IFACE, "ListSecrets"): ("u", self._list_secrets),
            ("connect", CONNECT_IFACE, "SecretDefineXML"): ("su", self._define_xml),
            ("connect", CONNECT_IFACE, "SecretLookupByUUID"): ("s", self._lookup_uuid),
            ("connect", CONNECT_IFACE, "SecretLookupByUsage"): ("is", self._lookup_usage),
            ("connect", OM_IFACE, "GetManagedObjects"): ("", self._managed_objects),
            ("secret", SECRET_IFACE, "GetValue"): ("u", self._get_value),
            ("secret", SECRET_IFACE, "SetValue"): ("ayu", self._set_value),
            ("secret", SECRET_IFACE, "GetXMLDesc"): ("u", self._xml_desc),
            ("secret", SECRET_IFACE, "Undefine"): ("", self._undefine),
            ("secret", PROPS_IFACE, "Get"): ("ss", self._prop_get),
            ("secret", PROPS_IFACE, "GetAll"): ("s", self._prop_get_all),
            ("secret", PROPS_IFACE, "Set"): ("ssv", self._prop_set),
        }

    def _on_message(self, msg: Message) -> Message | bool | None:
        if msg.message_type is not MessageType.METHOD_CALL:
            return None
        path = msg.path
        if path == CONNECT_PATH:
            kind = "connect"
        elif path.startswith(SECRET_PREFIX):
            kind = "secret"
        elif path in ("/", "/org", "/org/libvirt", SECRETS_PATH):
            kind = "tree"
        elif msg.interface == PEER_IFACE:
            return None          # the library answers Ping / GetMachineId on any path
        else:
            return Message.new_error(msg, ErrorType.UNKNOWN_OBJECT.value, f"no object at {path}")
        iface, member = msg.interface, msg.member
        if iface == INTROSPECT_IFACE or (iface is None and member == "Introspect"):
            if member != "Introspect":
                return Message.new_error(msg, ErrorType.UNKNOWN_METHOD.value,
                                         f"{INTROSPECT_IFACE}.{member} does not exist")
            if msg.signature != "":
                return Message.new_error(msg, INVALID_ARGS, "Introspect takes no arguments")
            return self._introspect(msg, kind)
        if kind == "tree" and iface != PEER_IFACE:
            return Message.new_error(msg, ErrorType.UNKNOWN_METHOD.value,
                                     f"{iface}.{member} does not exist at {path}")
        if iface == PEER_IFACE:
            return None   # the library answers Ping / GetMachineId
        if iface is None:
            iface = self._iface_for(kind, member)
        entry = self._methods.get((kind, iface, member))
        if entry is None:
            if kind == "secret" and uuid_from_path(path) is None:
                return Message.new_error(msg, ErrorType.UNKNOWN_OBJECT.value, f"no object at {path}")
            return Message.new_error(msg, ErrorType.UNKNOWN_METHOD.value,
                                     f"{iface}.{member} with signature \"{msg.signature}\" could not be found")
        signature, prepare = entry
        if msg.signature != signature:
            return Message.new_error(msg, INVALID_ARGS,
                                     f"{member} takes signature '{signature}', not '{msg.signature}'")
        if self._closing:
            return Message.new_error(msg, "org.libvirt.Error.OperationFailed", "service is shutting down")
        self.calls += 1
        caller = Caller(msg.sender, bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION))
        try:
            op = prepare(msg)
            if not self.access.enabled and not op.blocking and not op.private_value and not op.large:
                sig, body = op.run(op.candidates) if op.filter_perm else op.run()
                return self._reply(msg, sig, body)
        except Exception as e:   # noqa: BLE001 - every failure becomes a clean error reply
            return self._error_reply(msg, e)
        task = self._loop.create_task(self._finish(msg, caller, op))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _iface_for(self, kind: str, member: str) -> str | None:
        for (k, iface, m) in self._methods:
            if k == kind and m == member:
                return iface
        return None

    async def _finish(self, msg: Message, caller: Caller, op: Op) -> None:
        try:
            uid = None
            if op.blocking or op.private_value or self.access.enabled:
                # Who did it goes into the log records of this request (journal CALLER_UID).
                uid = await self.access.caller_uid(caller)
                logsetup.caller_uid.set(uid)
            for perm, d in op.checks:
                if not await self.access.allowed(caller, perm, d):
                    log.warning("denied %s to %s", perm.value, caller.sender,
                                extra={"SECRET_UUID": d.uuid if d else "", "SECRET_OPERATION": msg.member})
                    raise errors.AccessDenied(f"'{perm.value}' denied access")
            args: tuple[Any, ...] = ()
            if op.filter_perm is not None:
                cands = op.candidates or []
                if self.access.enabled:
                    cands = await self._filter(caller, op.filter_perm, cands)
                args = (cands,)
            if op.private_value:
                args = (uid is not None and uid in self.private_readers,)
            if op.blocking:
                # run_in_executor does not carry context variables over; copy them.
                ctx = contextvars.copy_context()
                sig, body = await self._loop.run_in_executor(self._executor, ctx.run, op.run, *args)
            elif op.large:
                # One big reply in the socket queue at a time: 16 concurrent lists of 10,000
                # paths would otherwise hold 16 marshalled copies (~0.7 MB each) at once.
                async with self._large_replies:
                    reply = self._reply(msg, *op.run(*args))
                    if isinstance(reply, Message) and self.bus.connected:
                        await self.bus.send(reply)
                    return
            else:
                sig, body = op.run(*args)
            reply = self._reply(msg, sig, body)
        except Exception as e:  # noqa: BLE001
            reply = self._error_reply(msg, e)
        if isinstance(reply, Message) and self.bus.connected:
            self.bus.send(reply)

    async def _filter(self, caller: Caller, perm: Perm, defs: list[SecretDef]) -> list[SecretDef]:
        """The defs `caller` may see; cached decisions are read without awaiting each one."""
        cached = getattr(self.access, "cached", None)
        known = [cached(caller, perm, d) if cached else None for d in defs]
        missing = [d for d, k in zip(defs, known) if k is None]
        asked = dict(zip((d.uuid for d in missing),
                         await asyncio.gather(*(self.access.allowed(caller, perm, d) for d in missing))))
        return [d for d, k in zip(defs, known) if (k if k is not None else asked[d.uuid])]

    @staticmethod
    def _reply(msg: Message, sig: str, body: list[Any]) -> Message | bool:
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return True
        return Message.new_method_return(msg, sig, body)

    @staticmethod
    def _error_reply(msg: Message, e: Exception) -> Message:
        if isinstance(e, errors.SecretError):
            return Message.new_error(msg, e.dbus_name, e.display())
        if isinstance(e, _DBusFailure):
            return Message.new_error(msg, e.name, e.text)
        # Unexpected: the caller learns nothing; the log gets the type and the stack,
        # never the exception text (it could quote an argument).
        log.error("internal error in %s.%s: %s", msg.interface, msg.member, type(e).__name__,
                  exc_info=(type(e), e, e.__traceback__) if log.isEnabledFor(logging.DEBUG) else None)
        return Message.new_error(msg, "org.libvirt.Error.InternalError", "internal error")

    # -- objects ----------------------------------------------------------------------
    def _secret_def(self, msg: Message) -> SecretDef:
        uuid = uuid_from_path(msg.path)
        if uuid is None:
            raise _DBusFailure(ErrorType.UNKNOWN_OBJECT.value, f"no object at {msg.path}")
        return self.driver.lookup_by_uuid(uuid)   # NoSecret with libvirt's wording if gone

    def _introspect(self, msg: Message, kind: str) -> Message:
        if kind == "connect":
            xml = self._connect_xml
        elif kind == "secret":
            if uuid_from_path(msg.path) not in self._exported:
                return Message.new_error(msg, ErrorType.UNKNOWN_OBJECT.value, f"no object at {msg.path}")
            xml = _node(self._secret_body, [])
        elif msg.path == SECRETS_PATH:
            # Child names are UUIDs, which getattr-level callers may see anyway.
            xml = _node("" if self.access.enabled else _STANDARD, [] if self.access.enabled else
                        ["_" + u.replace("-", "_") for u in sorted(self._exported)])
        else:
            nxt = {"/": "org", "/org": "libvirt", "/org/libvirt": "secret"}[msg.path]
            xml = _node(_STANDARD, [nxt])
        return Message.new_method_return(msg, "s", [xml])

    # -- org.libvirt.Connect -----------------------------------------------------------
    def _list_secrets(self, msg: Message) -> Op:
        (flags,) = msg.body
        if not self.access.enabled:
            paths = self._paths_for(flags)
            return Op(run=lambda: ("ao", [paths]), large=len(paths) > 1000)
        defs = self.driver.list_secrets(flags)
        return Op(run=lambda allowed: ("ao", [[secret_path(d.uuid) for d in allowed]]),
                  checks=[(Perm.SEARCH_SECRETS, None)], filter_perm=Perm.GETATTR, candidates=defs,
                  large=len(defs) > 1000)

    def _paths_for(self, flags: int) -> list[str]:
        """Object paths of ListSecrets(flags), kept until the driver's table changes."""
        version = self.driver.version        # read first: a racing change marks the entry stale
        hit = self._path_cache.get(flags)
        if hit is not None and hit[0] == version:
            return hit[1]
        paths = [secret_path(d.uuid) for d in self.driver.list_secrets(flags)]
        self._path_cache[flags] = (version, paths)
        return paths

    def _managed_objects(self, msg: Message) -> Op:
        defs = self.driver.list_secrets(0)
        return Op(run=lambda allowed: ("a{oa{sa{sv}}}", [{secret_path(d.uuid): {SECRET_IFACE: secret_properties(d)}
                                                           for d in allowed}]),
                  checks=[(Perm.SEARCH_SECRETS, None)], filter_perm=Perm.GETATTR, candidates=defs,
                  large=len(defs) > 200)

    def _define_xml(self, msg: Message) -> Op:
        xml, flags = msg.body
        if len(xml) > 1024 * 1024:
            raise errors.XMLError("secret XML document is larger than 1048576 bytes")
        d = self.driver.parse_definition(xml, flags)

        def run() -> tuple[str, list[Any]]:
            return "o", [secret_path(self.driver.define(d).uuid)]
        return Op(run=run, checks=[(Perm.WRITE, d), (Perm.SAVE, d)], blocking=True)

    def _lookup_uuid(self, msg: Message) -> Op:
        d = self.driver.lookup_by_uuid(msg.body[0])
        return Op(run=lambda: ("o", [secret_path(d.uuid)]), checks=[(Perm.GETATTR, d)])

    def _lookup_usage(self, msg: Message) -> Op:
        d = self.driver.lookup_by_usage(*msg.body)
        return Op(run=lambda: ("o", [secret_path(d.uuid)]), checks=[(Perm.GETATTR, d)])

    # -- org.libvirt.Secret ------------------------------------------------------------
    def _get_value(self, msg: Message) -> Op:
        d = self._secret_def(msg)
        (flags,) = msg.body
        rules.check_get_value_flags(flags)

        def run(private_reader: bool = False) -> tuple[str, list[Any]]:
            if d.private and not private_reader:
                raise errors.InvalidSecret("secret is private")
            return "ay", [self.driver.get_value(d.uuid, 0, internal_call=private_reader)]
        return Op(run=run, checks=[(Perm.READ_SECURE, d)], private_value=d.private)

    def _set_value(self, msg: Message) -> Op:
        d = self._secret_def(msg)
        value, flags = msg.body
        rules.check_set_value_flags(flags)
        rules.check_value(value)

        def run() -> tuple[str, list[Any]]:
            self.driver.set_value(d.uuid, value, 0)
            return "", []
        return Op(run=run, checks=[(Perm.WRITE, d)], blocking=True)

    def _xml_desc(self, msg: Message) -> Op:
        d = self._secret_def(msg)
        (flags,) = msg.body
        rules.check_xml_desc_flags(flags)
        return Op(run=lambda: ("s", [self.driver.get_xml_desc(d.uuid)]), checks=[(Perm.READ, d)])

    def _undefine(self, msg: Message) -> Op:
        d = self._secret_def(msg)

        def run() -> tuple[str, list[Any]]:
            self.driver.undefine(d.uuid)
            return "", []
        return Op(run=run, checks=[(Perm.DELETE, d)], blocking=True)

    # -- org.freedesktop.DBus.Properties -----------------------------------------------
    def _props(self, msg: Message, iface: str) -> tuple[SecretDef, dict[str, Variant]]:
        d = self._secret_def(msg)
        if iface not in (SECRET_IFACE, ""):
            raise _DBusFailure(ErrorType.UNKNOWN_INTERFACE.value, f"no interface {iface} at {msg.path}")
        return d, secret_properties(d)

    def _prop_get(self, msg: Message) -> Op:
        iface, name = msg.body
        d, props = self._props(msg, iface)
        if name not in props:
            raise _DBusFailure(ErrorType.UNKNOWN_PROPERTY.value, f"no property {name} on {SECRET_IFACE}")
        return Op(run=lambda: ("v", [props[name]]), checks=[(Perm.GETATTR, d)])

    def _prop_get_all(self, msg: Message) -> Op:
        (iface,) = msg.body
        d, props = self._props(msg, iface)
        return Op(run=lambda: ("a{sv}", [props]), checks=[(Perm.GETATTR, d)])

    def _prop_set(self, msg: Message) -> Op:
        iface, name, _ = msg.body
        _, props = self._props(msg, iface)
        if name not in props:
            raise _DBusFailure(ErrorType.UNKNOWN_PROPERTY.value, f"no property {name} on {SECRET_IFACE}")
        raise _DBusFailure(ErrorType.PROPERTY_READ_ONLY.value, f"property {name} is read-only")

"""The secret service's method handlers, one `@method` line each: what it is, what it needs.

Handlers parse arguments and find objects (errors here are the caller's: no access check
has run, so they name nothing the caller could not name itself), then return the action
for execute.CallRunner to authorise and run. No reply or error carries a value except
GetValue's own return.
"""
from __future__ import annotations

import socket
from collections.abc import Awaitable, Mapping
from typing import Any

from dbus_fast import Message, Variant

from secretbus.access.permissions import Perm, redefine_checks
from secretbus.bus.execute import DBusFailure, Grant, Prepared, method
from secretbus.bus.names import (
    CONNECT_IFACE,
    INTROSPECT_IFACE,
    OM_IFACE,
    PROPERTY_READ_ONLY,
    PROPS_IFACE,
    SECRET_IFACE,
    UNKNOWN_INTERFACE,
    UNKNOWN_OBJECT,
    UNKNOWN_PROPERTY,
    secret_path,
    uuid_from_path,
)
from secretbus.core.model import LIBVIRT_COMPAT, VERSION, SecretDef
from secretbus.driver import rules
from secretbus.driver.driver import StoreState
from secretbus.driver.writer import outcome

LARGE_LIST = 1000              # paths; a reply above this waits for the previous large one
LARGE_OBJECTS = 200            # GetManagedObjects entries (each carries six properties)


def encode_version(text: str) -> int:
    """"1.2.3" -> 1002003, libvirt's encoding; 0 when unknown."""
    parts = [int(p) if p.isdigit() else 0 for p in text.split(".")[:3]] + [0, 0, 0]
    return parts[0] * 1_000_000 + parts[1] * 1_000 + parts[2]


def _own_version() -> int:
    # The package's own constant, not importlib.metadata (~10 ms of every start-up);
    # tests/test_dispatch.py checks that it is the installed distribution's version.
    return encode_version(VERSION)


def secret_properties(d: SecretDef) -> dict[str, Variant]:
    return {
        "UUID": Variant("s", d.uuid),
        "UsageID": Variant("s", d.usage_id or ""),
        "UsageType": Variant("i", int(d.usage_type)),
        "Description": Variant("s", d.description or ""),
        "Ephemeral": Variant("b", d.ephemeral),
        "Private": Variant("b", d.private),
    }


def store_state_properties(state: StoreState) -> dict[str, Variant]:
    """secretbus's own Connect properties: the fleet store's state (driver.StoreState)."""
    return {"FleetState": Variant("s", state.state), "FleetStateReason": Variant("s", state.reason)}


def connect_properties(driver: Any) -> dict[str, Variant]:
    """libvirt-dbus's org.libvirt.Connect properties, with what is true of a local bus:
    as libvirt says of a unix socket, not encrypted but secure (no other host sees it);
    and the store's state."""
    return {
        **store_state_properties(driver.store_state()),
        "Encrypted": Variant("b", False),
        "Hostname": Variant("s", socket.gethostname()),
        "LibVersion": Variant("t", LIBVIRT_COMPAT),
        "Secure": Variant("b", True),
        "Version": Variant("t", _OWN_VERSION),
    }


_OWN_VERSION = _own_version()


def _prop_iface(msg: Message, iface: str, own: str) -> None:
    if iface not in (own, ""):
        raise DBusFailure(UNKNOWN_INTERFACE, f"no interface {iface} at {msg.path}")


def _prop(props: Mapping[str, Variant], name: str, own: str) -> Variant:
    if name not in props:
        raise DBusFailure(UNKNOWN_PROPERTY, f"no property {name} on {own}")
    return props[name]


class ConnectHandlers:
    """/org/libvirt/secret: org.libvirt.Connect (secret part), ObjectManager, Properties."""

    def __init__(self, driver: Any, subscribers: Any = None, *, filtered: bool = False):
        self.driver = driver
        self.subscribers = subscribers     # emit.Subscriptions: who gets filtered signals
        self.filtered = filtered           # access control on: signals go to subscribers only
        # The last path list per ListSecrets flags, with the definitions it was made from:
        # a list of 10,000 secrets costs 10,000 new strings per call otherwise. It is a memo
        # of a pure function (equal definitions, equal paths), so it cannot go stale; the
        # comparison is by identity first, ~50 us for 10,000 unchanged definitions.
        self._paths: dict[int, tuple[list[SecretDef], list[str]]] = {}

    def _paths_of(self, flags: int, defs: list[SecretDef]) -> list[str]:
        hit = self._paths.get(flags)
        if hit is not None and hit[0] == defs:
            return hit[1]
        paths = [secret_path(d.uuid) for d in defs]
        self._paths[flags] = (defs, paths)    # flags are checked by the driver: few keys
        return paths

    @method(CONNECT_IFACE, "ListSecrets", "u", perms=(Perm.SEARCH_SECRETS,), each=Perm.GETATTR)
    def list_secrets(self, msg: Message) -> Prepared:
        (flags,) = msg.body
        defs = self.driver.list_secrets(flags)
        return Prepared(lambda g: [self._paths_of(flags, list(g.visible))], candidates=defs,
                        large=len(defs) > LARGE_LIST)

    @method(CONNECT_IFACE, "SecretDefineXML", "su", perms=(Perm.WRITE, Perm.SAVE), writes=True)
    def define_xml(self, msg: Message) -> Prepared:
        xml, flags = msg.body
        d = self.driver.parse_definition(xml, flags)    # flags, size limit and parse: the driver's rules
        old = self.driver.find(d.uuid)
        # The act compares-and-sets: if the definition checked here changed during the
        # checks, the redefine is refused instead of acting on one nobody checked.
        return Prepared(lambda g: outcome(self.driver.submit_define(d, expect=old), lambda nd: [secret_path(nd.uuid)]),
                        target=d, also=redefine_checks(old, d))

    # libvirt's virConnectSecretEventRegisterAny needs search-secrets; each event then
    # reaches the subscriber only if it may getattr the secret (emit.py). With access
    # control off every signal is broadcast, so subscribing changes nothing there.
    @method(CONNECT_IFACE, "Subscribe", "", perms=(Perm.SEARCH_SECRETS,))
    def subscribe(self, msg: Message) -> Prepared:
        sender = msg.sender or ""

        def act(g: Grant) -> list[Any]:
            if self.filtered and self.subscribers is not None:
                self.subscribers.add(sender, g.uid)
            return []
        return Prepared(act)

    @method(CONNECT_IFACE, "Unsubscribe", "")
    def unsubscribe(self, msg: Message) -> Prepared:
        sender = msg.sender or ""

        def act(g: Grant) -> list[Any]:
            if self.subscribers is not None:
                self.subscribers.discard(sender)
            return []
        return Prepared(act)

    @method(CONNECT_IFACE, "SecretLookupByUUID", "s", perms=(Perm.GETATTR,))
    def lookup_uuid(self, msg: Message) -> Prepared:
        d = self.driver.lookup_by_uuid(msg.body[0])
        return Prepared(lambda g: [secret_path(d.uuid)], target=d)

    @method(CONNECT_IFACE, "SecretLookupByUsage", "is", perms=(Perm.GETATTR,))
    def lookup_usage(self, msg: Message) -> Prepared:
        d = self.driver.lookup_by_usage(*msg.body)
        return Prepared(lambda g: [secret_path(d.uuid)], target=d)

    @method(OM_IFACE, "GetManagedObjects", "", perms=(Perm.SEARCH_SECRETS,), each=Perm.GETATTR)
    def managed_objects(self, msg: Message) -> Prepared:
        defs = self.driver.list_secrets(0)
        return Prepared(lambda g: [{secret_path(d.uuid): {SECRET_IFACE: secret_properties(d)} for d in g.visible}],
                        candidates=defs, large=len(defs) > LARGE_OBJECTS)

    # Connection-level facts: the same rule as listing (search-secrets on the connection).
    @method(PROPS_IFACE, "Get", "ss", perms=(Perm.SEARCH_SECRETS,))
    def prop_get(self, msg: Message) -> Prepared:
        iface, name = msg.body
        _prop_iface(msg, iface, CONNECT_IFACE)
        value = _prop(connect_properties(self.driver), name, CONNECT_IFACE)
        return Prepared(lambda g: [value])

    @method(PROPS_IFACE, "GetAll", "s", perms=(Perm.SEARCH_SECRETS,))
    def prop_get_all(self, msg: Message) -> Prepared:
        _prop_iface(msg, msg.body[0], CONNECT_IFACE)
        props = connect_properties(self.driver)
        return Prepared(lambda g: [props])

    @method(PROPS_IFACE, "Set", "ssv")
    def prop_set(self, msg: Message) -> Prepared:
        iface, name, _ = msg.body
        _prop_iface(msg, iface, CONNECT_IFACE)
        _prop(connect_properties(self.driver), name, CONNECT_IFACE)
        raise DBusFailure(PROPERTY_READ_ONLY, f"property {name} is read-only")


class SecretHandlers:
    """/org/libvirt/secret/secret/_<uuid>: org.libvirt.Secret and Properties."""

    def __init__(self, driver: Any, introspection: str = ""):
        self.driver = driver
        self.introspection = introspection     # the Introspect reply of every secret object

    def _secret(self, msg: Message) -> SecretDef:
        uuid = uuid_from_path(msg.path or "")
        if uuid is None:
            raise DBusFailure(UNKNOWN_OBJECT, f"no object at {msg.path}")
        return self.driver.lookup_by_uuid(uuid)   # NoSecret with libvirt's wording if gone

    # Behind getattr, and a denial answers as for no object: a hidden secret's path must
    # not tell that it exists.
    @method(INTROSPECT_IFACE, "Introspect", "", perms=(Perm.GETATTR,), hidden=True)
    def introspect(self, msg: Message) -> Prepared:
        uuid = uuid_from_path(msg.path or "")
        d = self.driver.find(uuid) if uuid is not None else None
        if d is None:
            raise DBusFailure(UNKNOWN_OBJECT, f"no object at {msg.path}")
        xml = self.introspection
        return Prepared(lambda g: [xml], target=d)

    @method(SECRET_IFACE, "GetValue", "u", perms=(Perm.READ_SECURE,), audit=True)
    def get_value(self, msg: Message) -> Prepared:
        d = self._secret(msg)
        rules.check_get_value_flags(msg.body[0])

        def act(g: Grant) -> list[Any]:
            rules.check_readable(d, internal_call=g.private_reader)
            return [self.driver.value_of(d, internal_call=g.private_reader)]
        return Prepared(act, target=d, private=d.private)

    @method(SECRET_IFACE, "SetValue", "ayu", perms=(Perm.WRITE,), writes=True)
    def set_value(self, msg: Message) -> Prepared:
        d = self._secret(msg)
        value, flags = msg.body
        rules.check_set_value_flags(flags)
        rules.check_value(value)

        def act(g: Grant) -> Awaitable[list[Any]]:
            # still the secret checked
            return outcome(self.driver.submit_set_value(d.uuid, value, 0, expect=d), lambda _: [])
        return Prepared(act, target=d)

    @method(SECRET_IFACE, "GetXMLDesc", "u", perms=(Perm.READ,))
    def xml_desc(self, msg: Message) -> Prepared:
        d = self._secret(msg)
        rules.check_xml_desc_flags(msg.body[0])
        return Prepared(lambda g: [self.driver.get_xml_desc(d.uuid)], target=d)

    @method(SECRET_IFACE, "Undefine", "", perms=(Perm.DELETE,), writes=True)
    def undefine(self, msg: Message) -> Prepared:
        d = self._secret(msg)

        def act(g: Grant) -> Awaitable[list[Any]]:
            return outcome(self.driver.submit_undefine(d.uuid, expect=d), lambda _: [])    # still the secret checked
        return Prepared(act, target=d)

    @method(PROPS_IFACE, "Get", "ss", perms=(Perm.GETATTR,))
    def prop_get(self, msg: Message) -> Prepared:
        iface, name = msg.body
        d = self._secret(msg)
        _prop_iface(msg, iface, SECRET_IFACE)
        value = _prop(secret_properties(d), name, SECRET_IFACE)
        return Prepared(lambda g: [value], target=d)

    @method(PROPS_IFACE, "GetAll", "s", perms=(Perm.GETATTR,))
    def prop_get_all(self, msg: Message) -> Prepared:
        d = self._secret(msg)
        _prop_iface(msg, msg.body[0], SECRET_IFACE)
        props = secret_properties(d)
        return Prepared(lambda g: [props], target=d)

    @method(PROPS_IFACE, "Set", "ssv")
    def prop_set(self, msg: Message) -> Prepared:
        iface, name, _ = msg.body
        d = self._secret(msg)
        _prop_iface(msg, iface, SECRET_IFACE)
        _prop(secret_properties(d), name, SECRET_IFACE)
        raise DBusFailure(PROPERTY_READ_ONLY, f"property {name} is read-only")

"""Decoding what the service sends the client: the AddMatch rules of a subscribed connection,
its signals as small records, and org.libvirt.Secret property dicts. Pure functions: no
state, no I/O, no trust decisions (`secretbus.bus.events` checks who sent a signal).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from dbus_fast import Message

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
    uuid_from_path,
)
from secretbus.core import errors
from secretbus.core.model import Lifecycle, UsageType
from secretbus.core.uuids import parse_uuid


# -- decoding (pure) --------------------------------------------------------------------
def match_rules() -> list[str]:
    """The AddMatch rules of a subscribed connection."""
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


def known_usage(utype: int) -> int:
    """`utype`, or NONE for a usage type this client does not know."""
    try:
        return int(UsageType(utype))
    except ValueError:
        return int(UsageType.NONE)


def usage_from_props(props: dict[str, Any]) -> tuple[str, int, str]:
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
    return canon, known_usage(utype), uid


class OwnerChanged(NamedTuple):
    owner: str | None                    # None: the name has no owner now


class LifecycleSignal(NamedTuple):
    uuid: str
    path: str
    lifecycle: Lifecycle
    detail: int


class ValueChangedSignal(NamedTuple):
    uuid: str
    path: str


class UsageSeen(NamedTuple):             # a new or redefined secret's properties
    uuid: str
    usage_type: int
    usage_id: str


class UsageChanged(NamedTuple):          # None: that property did not change
    uuid: str
    usage_type: int | None
    usage_id: str | None


Signal = LifecycleSignal | ValueChangedSignal | UsageSeen | UsageChanged


def decode_owner_change(msg: Message) -> OwnerChanged | None:
    """NameOwnerChanged for the service's name (trust the sender to be the bus daemon first)."""
    if msg.member == "NameOwnerChanged" and msg.signature == "sss" and msg.body[0] == BUS_NAME:
        return OwnerChanged(msg.body[2] or None)
    return None


def _secret_event(body: list[Any]) -> LifecycleSignal | None:
    uuid = uuid_from_path(body[0])
    try:
        lifecycle = Lifecycle(body[1])
    except ValueError:
        return None
    return LifecycleSignal(uuid, body[0], lifecycle, int(body[2])) if uuid is not None else None


def _value_changed(body: list[Any]) -> ValueChangedSignal | None:
    uuid = uuid_from_path(body[0])
    return ValueChangedSignal(uuid, body[0]) if uuid is not None else None


def _interfaces_added(body: list[Any]) -> UsageSeen | None:
    props = body[1].get(SECRET_IFACE)
    return UsageSeen(*usage_from_props(props)) if props is not None else None


# (interface, member) -> (signature, decoder of the body); all sent on CONNECT_PATH.
_CONNECT_SIGNALS: dict[tuple[str, str], tuple[str, Callable[[list[Any]], Signal | None]]] = {
    (CONNECT_IFACE, "SecretEvent"): ("oii", _secret_event),
    (CONNECT_IFACE, "SecretValueChanged"): ("o", _value_changed),
    (OM_IFACE, "InterfacesAdded"): ("oa{sa{sv}}", _interfaces_added),
}


def _properties_changed(msg: Message) -> UsageChanged | None:
    uuid = uuid_from_path(msg.path or "")
    if uuid is None or msg.signature != "sa{sv}as" or msg.body[0] != SECRET_IFACE:
        return None
    changed = msg.body[1]
    utype = known_usage(int(changed["UsageType"].value)) if "UsageType" in changed else None
    uid = changed["UsageID"].value if "UsageID" in changed else None
    return UsageChanged(uuid, utype, uid)


def decode_signal(msg: Message) -> Signal | None:
    """What a signal from the service says; None for anything else. Raises on a body that
    does not hold what its signature promised."""
    if msg.interface == PROPS_IFACE and msg.member == "PropertiesChanged":
        return _properties_changed(msg)
    entry = _CONNECT_SIGNALS.get((msg.interface or "", msg.member or ""))
    if entry is None or msg.path != CONNECT_PATH or msg.signature != entry[0]:
        return None
    return entry[1](msg.body)

"""The D-Bus vocabulary of secretbus, shared by the service, the client, the tests and the bench:
bus name, object paths, interface names and the path <-> UUID mapping."""
from __future__ import annotations

import re

from dbus_fast.constants import ErrorType

BUS_NAME = "org.libvirt.secret"
CONNECT_PATH = "/org/libvirt/secret"
SECRETS_PATH = "/org/libvirt/secret/secret"
SECRET_PREFIX = SECRETS_PATH + "/_"
CONNECT_IFACE = "org.libvirt.Connect"
SECRET_IFACE = "org.libvirt.Secret"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
INTROSPECT_IFACE = "org.freedesktop.DBus.Introspectable"
PEER_IFACE = "org.freedesktop.DBus.Peer"
OM_IFACE = "org.freedesktop.DBus.ObjectManager"
INVALID_ARGS = ErrorType.INVALID_ARGS.value
_UUID_PATH = re.compile(r"^[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}$")


def secret_path(uuid: str) -> str:
    return SECRET_PREFIX + uuid.replace("-", "_")


def uuid_from_path(path: str) -> str | None:
    tail = path[len(SECRET_PREFIX):] if path.startswith(SECRET_PREFIX) else ""
    return tail.replace("_", "-") if _UUID_PATH.match(tail) else None

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_IFACE = "org.freedesktop.DBus"

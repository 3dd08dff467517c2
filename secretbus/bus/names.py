"""The D-Bus vocabulary of secretbus, shared by the service, the client, the tests and the bench:
bus name, object paths, interface names, the path <-> UUID mapping and error names both ways."""
from __future__ import annotations

import re

from dbus_fast.constants import ErrorType

from secretbus.core import errors

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

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_IFACE = "org.freedesktop.DBus"

# The freedesktop error names the service answers with (besides libvirt's own).
INVALID_ARGS = ErrorType.INVALID_ARGS.value
UNKNOWN_OBJECT = ErrorType.UNKNOWN_OBJECT.value
UNKNOWN_METHOD = ErrorType.UNKNOWN_METHOD.value
UNKNOWN_INTERFACE = ErrorType.UNKNOWN_INTERFACE.value
UNKNOWN_PROPERTY = ErrorType.UNKNOWN_PROPERTY.value
PROPERTY_READ_ONLY = ErrorType.PROPERTY_READ_ONLY.value

_UUID_PATH = re.compile(r"^[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}$")


def secret_node(uuid: str) -> str:
    """The last element of a secret's object path: `_` + the UUID with '-' as '_'."""
    return "_" + uuid.replace("-", "_")


def secret_path(uuid: str) -> str:
    return SECRET_PREFIX + uuid.replace("-", "_")     # = SECRETS_PATH/secret_node(uuid), one call


def uuid_from_path(path: str) -> str | None:
    tail = path[len(SECRET_PREFIX):] if path.startswith(SECRET_PREFIX) else ""
    return tail.replace("_", "-") if _UUID_PATH.match(tail) else None


def error_name(err: errors.SecretError) -> str:
    """`org.libvirt.Error.<Kind>` of a project error."""
    return err.dbus_name


def error_text(err: errors.SecretError) -> str:
    """The text of a D-Bus error reply: libvirt's prefixed message (`Secret not found: ...`)."""
    return err.display()


def error_from_dbus(name: str, text: str) -> errors.SecretError:
    """The project error an `org.libvirt.Error.*` reply stands for (unknown names: OperationFailed)."""
    return errors.from_dbus(name, text)

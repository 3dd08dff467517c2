"""secretbus: libvirt-compatible secret storage, natively on D-Bus.

    import secretbus
    with secretbus.open("secret:///embed?root=/srv/vmhost") as conn:
        s = conn.define_xml(xml)
        s.set_value(b"passphrase")

`secret:///system` and `secret:///session` go over D-Bus, or over libvirt's RPC protocol with
`?socket=PATH`, `?mode=direct`, `readonly=True`, or when only the RPC socket is there
(secretbus.uri); both connections have the same methods and exceptions.
"""
from secretbus.core import errors
from secretbus.core.api import Connection, Secret
from secretbus.core.errors import SecretError
from secretbus.core.model import VERSION, EventId, Lifecycle, ListFlags, SecretDef, SecretEvent, UsageType
from secretbus.uri import open_connection as open

__all__ = ["open", "Connection", "Secret", "SecretError", "errors", "EventId", "Lifecycle",
           "ListFlags", "SecretDef", "SecretEvent", "UsageType"]
__version__ = VERSION

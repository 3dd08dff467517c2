"""The public Python API: a connection and secret handles, the same for every URI.

`secretbus.driver.embedded.EmbeddedConnection` runs the driver in this process; the D-Bus
client (`secretbus.bus.client`) implements the same `Connection` methods over the bus.
"""
from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterable

from secretbus.core import errors
from secretbus.core.model import EventId, SecretDef, SecretEvent, UsageType

EventHandler = Callable[["Secret", SecretEvent], None]
LostHandler = Callable[[str], None]      # (why: "end of file", "keepalive timeout", "error")

log = logging.getLogger("secretbus.api")


def tell_lost(handlers: Iterable[LostHandler], reason: str) -> None:
    """Each `on_lost` handler, in order (on a client's events thread); one that raises is
    logged, never propagated, as an event handler's."""
    for handler in list(handlers):
        try:
            handler(reason)
        except Exception:  # noqa: BLE001
            log.exception("connection-lost handler failed")


class Secret:
    """A handle, like libvirt's virSecretPtr: identity plus convenience methods."""

    __slots__ = ("_conn", "uuid", "usage_type", "usage_id")

    def __init__(self, conn: Connection, uuid: str, usage_type: int, usage_id: str):
        self._conn = conn
        self.uuid = uuid
        self.usage_type = UsageType(usage_type)
        self.usage_id = usage_id     # "" for usage type NONE, as libvirt

    @classmethod
    def from_def(cls, conn: Connection, d: SecretDef) -> Secret:
        return cls(conn, d.uuid, d.usage_type, d.usage_id or "")

    def xml_desc(self, flags: int = 0) -> str:
        return self._conn.secret_xml_desc(self.uuid, flags)

    def get_value(self, flags: int = 0, **kw) -> bytes:
        return self._conn.secret_get_value(self.uuid, flags, **kw)

    def set_value(self, value: bytes, flags: int = 0) -> None:
        self._conn.secret_set_value(self.uuid, value, flags)

    def undefine(self) -> None:
        self._conn.secret_undefine(self.uuid)

    def __repr__(self) -> str:
        return f"<Secret {self.uuid} {self.usage_type.xml_name} {self.usage_id!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.uuid == self.uuid

    def __hash__(self) -> int:
        return hash(self.uuid)


class Connection(abc.ABC):
    uri: str

    # -- connection level ---------------------------------------------------------
    @abc.abstractmethod
    def define_xml(self, xml: str, flags: int = 0) -> Secret: ...

    @abc.abstractmethod
    def lookup_by_uuid(self, uuid: str) -> Secret: ...

    @abc.abstractmethod
    def lookup_by_usage(self, usage_type: int, usage_id: str) -> Secret: ...

    @abc.abstractmethod
    def list_secrets(self, flags: int = 0) -> list[Secret]: ...

    # -- secret level (by canonical uuid) ---------------------------------------
    @abc.abstractmethod
    def secret_xml_desc(self, uuid: str, flags: int = 0) -> str: ...

    @abc.abstractmethod
    def secret_get_value(self, uuid: str, flags: int = 0) -> bytes: ...

    @abc.abstractmethod
    def secret_set_value(self, uuid: str, value: bytes, flags: int = 0) -> None: ...

    @abc.abstractmethod
    def secret_undefine(self, uuid: str) -> None: ...

    # -- events -------------------------------------------------------------------
    @abc.abstractmethod
    def subscribe(self, handler: EventHandler, event_id: int | None = None,
                  secret: Secret | str | None = None) -> int:
        """Call `handler(secret, event)` for events (all ids if `event_id` is None)."""

    @abc.abstractmethod
    def unsubscribe(self, sub_id: int) -> None: ...

    @abc.abstractmethod
    def is_alive(self) -> bool:
        """libvirt's virConnectIsAlive: not closed, and (for a remote one) its channel is up."""

    def on_lost(self, handler: LostHandler) -> None:  # noqa: B027 - an embedded one is never lost
        """Call `handler(reason)` once if the other side ends the connection (the RPC server,
        the D-Bus bus daemon), after the events it delivered: libvirt's close callback, with
        virsh's words for the reason ("end of file", "keepalive timeout", "error"). Never
        after `close()`."""

    def close(self) -> None:  # noqa: B027 - an optional hook: most connections hold nothing
        pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_event_id(event_id: int | None) -> None:
    if event_id is not None and event_id not in (EventId.LIFECYCLE, EventId.VALUE_CHANGED):
        raise errors.arg_check("eventID", "virConnectSecretEventRegisterAny", f"must be less than {len(EventId)}")


def event_filter(event_id: int | None, secret: Secret | str | None):
    check_event_id(event_id)
    uuid = secret.uuid if isinstance(secret, Secret) else secret

    def wanted(ev: SecretEvent) -> bool:
        return (event_id is None or ev.event_id == event_id) and (uuid is None or ev.uuid == uuid)
    return wanted

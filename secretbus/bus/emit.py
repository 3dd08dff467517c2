"""What the bus is told: SecretEvent / SecretValueChanged, and ObjectManager / Properties
announcements of the secret objects that exist. Signals carry identities, never values."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dbus_fast import Message

from secretbus.bus.handlers import secret_properties
from secretbus.bus.names import CONNECT_IFACE, CONNECT_PATH, OM_IFACE, PROPS_IFACE, SECRET_IFACE, secret_path
from secretbus.core.model import EventId, Lifecycle, SecretDef, SecretEvent


class Announcer:
    def __init__(self, bus: Any, driver: Any):
        self.bus = bus
        self.driver = driver
        self.exported: dict[str, SecretDef] = {}   # what the bus has been told exists

    def _signal(self, path: str, iface: str, member: str, sig: str, body: list[Any]) -> None:
        self.bus.send(Message.new_signal(path, iface, member, sig, body))

    def reset(self, defs: Iterable[SecretDef]) -> None:
        """At start: these exist (no signals; nobody has asked yet)."""
        self.exported = {d.uuid: d for d in defs}

    def refresh(self, defs: Iterable[SecretDef]) -> None:
        """After a reload: announce objects that appeared or vanished (no lifecycle events)."""
        now = {d.uuid: d for d in defs}
        for uuid in list(self.exported):
            if uuid not in now:
                del self.exported[uuid]
                self._removed(uuid)
        for d in now.values():
            self.announce(d)

    def emit(self, ev: SecretEvent) -> None:
        path = secret_path(ev.uuid)
        if ev.event_id == EventId.VALUE_CHANGED:
            self._signal(CONNECT_PATH, CONNECT_IFACE, "SecretValueChanged", "o", [path])
            return
        if ev.lifecycle == Lifecycle.DEFINED and ev.definition is not None:
            self.announce(ev.definition)
        elif self.exported.pop(ev.uuid, None) is not None:
            self._removed(ev.uuid)
        self._signal(CONNECT_PATH, CONNECT_IFACE, "SecretEvent", "oii", [path, int(ev.lifecycle or 0), ev.detail])

    def _removed(self, uuid: str) -> None:
        self._signal(CONNECT_PATH, OM_IFACE, "InterfacesRemoved", "oas", [secret_path(uuid), [SECRET_IFACE]])

    def announce(self, d: SecretDef) -> None:
        """Tell ObjectManager / Properties watchers that `d` exists or changed."""
        old = self.exported.get(d.uuid)
        self.exported[d.uuid] = d
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

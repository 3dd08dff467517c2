"""What the bus is told: SecretEvent / SecretValueChanged, and ObjectManager / Properties
announcements of the secret objects that exist. Signals carry identities, never values.

With access control off (session bus: the bus admits only its user) every signal is
broadcast. With it on (system bus), each signal names a secret (its path is its UUID, the
announcements carry usage and description), so it goes only to subscribers allowed
`getattr` on that secret, as libvirt filters each event through the client's ACL: one
unicast copy per allowed subscriber (a signal with a destination reaches that connection
alone; a member's AddMatch, eavesdropping or not, sees nothing addressed to others).
Clients subscribe with `org.libvirt.Connect.Subscribe()` (`Subscriptions`).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

from dbus_fast import Message, MessageType

from secretbus.access.permissions import AccessControl, Caller, Perm
from secretbus.bus.handlers import secret_properties, store_state_properties
from secretbus.bus.names import CONNECT_IFACE, CONNECT_PATH, OM_IFACE, PROPS_IFACE, SECRET_IFACE, secret_path
from secretbus.core import errors
from secretbus.core.model import EventId, Lifecycle, SecretDef, SecretEvent
from secretbus.driver.driver import StoreState

log = logging.getLogger("secretbus.dbus")

SUBSCRIBERS_MAX = 4096      # connections; a subscriber costs one unicast copy per event it may see
SUBSCRIBERS_PER_UID = 64    # one user's connections (the system bus lets a user have 256)
ROOT_RESERVE = 256          # of SUBSCRIBERS_MAX, left to root whatever the others hold
ROOT = 0


class Signal(NamedTuple):
    path: str
    iface: str
    member: str
    sig: str
    body: list[Any]


class Subscriptions:
    """The connections (unique names) that asked for events, in subscription order, with
    their uid. Entries go when the connection leaves the bus (`gone`) or unsubscribes.

    Bounded as the other per-caller tables (DESIGN §12): at most `per_uid` connections of
    one uid (callers whose uid is unknown count as one uid), `limit` in all, of which
    `root_reserve` only root may take; root has no per-uid bound."""

    def __init__(self, limit: int = SUBSCRIBERS_MAX, *, per_uid: int = SUBSCRIBERS_PER_UID,
                 root_reserve: int = ROOT_RESERVE):
        self._names: dict[str, int | None] = {}
        self._per_uid: dict[int | None, int] = {}
        self._limit = limit
        self._per = per_uid
        self._reserve = min(root_reserve, limit)

    def add(self, name: str, uid: int | None = None) -> None:
        if name in self._names:
            return
        if uid == ROOT:
            if len(self._names) >= self._limit:
                raise errors.OperationFailed(f"too many event subscribers ({self._limit}); try again later")
        else:
            if len(self._names) - self._per_uid.get(ROOT, 0) >= self._limit - self._reserve:   # root's aside
                raise errors.OperationFailed(f"too many event subscribers ({self._limit - self._reserve}); "
                                             "try again later")
            held = self._per_uid.get(uid, 0)
            if held >= self._per:
                raise errors.OperationFailed(f"this user already has {held} event subscriptions, the most "
                                             "allowed: unsubscribe or close one first")
        self._names[name] = uid
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1

    def discard(self, name: str) -> None:
        if name not in self._names:
            return
        uid = self._names.pop(name)
        left = self._per_uid[uid] - 1
        if left:
            self._per_uid[uid] = left
        else:
            del self._per_uid[uid]

    gone = discard

    def snapshot(self) -> list[str]:
        return list(self._names)

    def sizes(self) -> dict[str, int]:
        return {"subscribers": len(self._names), "subscriber_uids": len(self._per_uid)}

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)


class Announcer:
    def __init__(self, bus: Any, driver: Any, access: AccessControl | None = None):
        self.bus = bus
        self.driver = driver
        self.access = access
        self.filtered = access is not None and access.enabled
        self.subscribers = Subscriptions()
        self.exported: dict[str, SecretDef] = {}   # what the bus has been told exists
        # Filtered delivery awaits access checks; one worker keeps the signals in order.
        self._queue: asyncio.Queue[tuple[SecretDef, list[Signal]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    # -- what changed -------------------------------------------------------------------
    def reset(self, defs: Iterable[SecretDef]) -> None:
        """At start: these exist (no signals; nobody has asked yet)."""
        self.exported = {d.uuid: d for d in defs}

    def refresh(self, defs: Iterable[SecretDef]) -> None:
        """After a reload: announce objects that appeared or vanished (no lifecycle events)."""
        now = {d.uuid: d for d in defs}
        for uuid in list(self.exported):
            if uuid not in now:
                self._send(self.exported.pop(uuid), [self._removed(uuid)])
        for d in now.values():
            self._send(d, self._announce(d))

    def emit(self, ev: SecretEvent) -> None:
        path = secret_path(ev.uuid)
        about = ev.definition or self.exported.get(ev.uuid)
        if ev.event_id == EventId.VALUE_CHANGED:
            out = [Signal(CONNECT_PATH, CONNECT_IFACE, "SecretValueChanged", "o", [path])]
        else:
            if ev.lifecycle == Lifecycle.DEFINED and ev.definition is not None:
                out = self._announce(ev.definition)
            else:
                gone = self.exported.pop(ev.uuid, None)
                about = about or gone
                out = [self._removed(ev.uuid)] if gone is not None else []
            out.append(Signal(CONNECT_PATH, CONNECT_IFACE, "SecretEvent", "oii",
                              [path, int(ev.lifecycle or 0), ev.detail]))
        if about is None:
            log.warning("event about an unknown secret %s not sent", ev.uuid)   # fail closed
            return
        self._send(about, out)

    def announce(self, d: SecretDef) -> None:
        """Tell ObjectManager / Properties watchers that `d` exists or changed."""
        self._send(d, self._announce(d))

    def _announce(self, d: SecretDef) -> list[Signal]:
        old = self.exported.get(d.uuid)
        self.exported[d.uuid] = d
        props = secret_properties(d)
        if old is None:
            return [Signal(CONNECT_PATH, OM_IFACE, "InterfacesAdded", "oa{sa{sv}}",
                           [secret_path(d.uuid), {SECRET_IFACE: props}])]
        if old != d:
            before = secret_properties(old)
            changed = {k: v for k, v in props.items() if before[k] != v}
            if changed:
                return [Signal(secret_path(d.uuid), PROPS_IFACE, "PropertiesChanged", "sa{sv}as",
                               [SECRET_IFACE, changed, []])]
        return []

    def store_state(self, state: StoreState) -> None:
        """FleetState changed on the Connect object. It names no secret, so every subscriber
        is told (Subscribe needed search-secrets, as reading the property does); on the
        session bus it is broadcast."""
        s = Signal(CONNECT_PATH, PROPS_IFACE, "PropertiesChanged", "sa{sv}as",
                   [CONNECT_IFACE, store_state_properties(state), []])
        if self.filtered:
            self._unicast(self.subscribers.snapshot(), [s])
        elif self.bus.connected:
            self.bus.send(Message.new_signal(s.path, s.iface, s.member, s.sig, s.body))

    @staticmethod
    def _removed(uuid: str) -> Signal:
        return Signal(CONNECT_PATH, OM_IFACE, "InterfacesRemoved", "oas", [secret_path(uuid), [SECRET_IFACE]])

    # -- delivery -------------------------------------------------------------------------
    def _send(self, about: SecretDef, out: list[Signal]) -> None:
        if not out:
            return
        if not self.filtered:
            for s in out:
                self.bus.send(Message.new_signal(s.path, s.iface, s.member, s.sig, s.body))
            return
        if not len(self.subscribers):
            return                       # nobody to tell: no checks, no queue
        idle = self._queue.empty() and (self._worker is None or self._worker.done())
        if idle and self._deliver_cached(about, out):
            return                       # in order, before the reply of the call that caused it
        self._queue.put_nowait((about, out))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._deliver_all())

    async def _deliver_all(self) -> None:
        while not self._queue.empty():
            about, out = self._queue.get_nowait()
            try:
                await self._deliver(about, out)
            except Exception:  # noqa: BLE001 - one failed delivery must not stop the next
                log.exception("could not deliver the signals about secret %s", about.uuid)

    def _deliver_cached(self, about: SecretDef, out: list[Signal]) -> bool:
        """Deliver now if every subscriber's decision is cached (no await); False if not."""
        cached = getattr(self.access, "cached", None)
        if cached is None:
            return False
        names = self.subscribers.snapshot()
        known = [cached(Caller(n), Perm.GETATTR, about) for n in names]
        if any(k is None for k in known):
            return False
        self._unicast([n for n, ok in zip(names, known, strict=True) if ok], out)
        return True

    async def _deliver(self, about: SecretDef, out: list[Signal]) -> None:
        access = self.access
        assert access is not None
        names = self.subscribers.snapshot()
        allowed = await asyncio.gather(*(access.allowed(Caller(n), Perm.GETATTR, about) for n in names))
        self._unicast([n for n, ok in zip(names, allowed, strict=True) if ok and n in self.subscribers], out)

    def _unicast(self, names: list[str], out: list[Signal]) -> None:
        if not self.bus.connected:
            return
        for name in names:
            for s in out:
                self.bus.send(Message(destination=name, path=s.path, interface=s.iface, member=s.member,
                                      message_type=MessageType.SIGNAL, signature=s.sig, body=s.body))

    async def close(self) -> None:
        """Deliver what is queued (drain)."""
        if self._worker is not None:
            await asyncio.gather(self._worker, return_exceptions=True)

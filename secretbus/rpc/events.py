"""Secret event registrations of RPC clients, and the MESSAGE frames the driver's events become.

Callback ids are unique in the daemon (libvirt hands out 0, 1, … across connections). The
driver calls its subscribers from whichever thread changed the table (the driver's I/O thread
for a write), so events hop to the event loop before any socket is touched.

An event reaches a registration only if its connection may `getattr` the secret (libvirt's
`@aclfilter`; DESIGN §12: a secret's identity goes only to those allowed to see it). Decisions
the access layer holds are used at once; when one must be asked, that event and every later
one wait in one ordered queue, so each client still sees events in the driver's order.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from secretbus.core import errors, loophop
from secretbus.core.model import EventId, SecretDef, SecretEvent
from secretbus.rpc import protocol as P
from secretbus.rpc.failures import daemon_internal, rpc_failure
from secretbus.rpc.handles import uuid_bytes, wire_secret
from secretbus.rpc.xdr import encode

log = logging.getLogger("secretbus.rpc")

MAX_QUEUED = 4096        # events waiting for polkit decisions


class EventSink(Protocol):
    def send_message(self, proc: int, payload: bytes) -> None:
        """Queue a MESSAGE frame to this client (never blocks; drops a client that does not read)."""


class EventFilter(Protocol):
    def decided(self, sink: EventSink, d: SecretDef | None) -> bool | None:
        """Whether `sink` may see events about `d`, None when that must be awaited."""

    async def allowed(self, sink: EventSink, d: SecretDef | None) -> bool: ...


__all__ = ["EventFilter", "EventHub", "EventSink", "Registration", "wire_secret"]


@dataclass(frozen=True)
class Registration:
    sink: EventSink
    event_id: EventId
    uuid: str | None               # only this secret's events, when set
    owner: int | str | None = None   # whose count it is in (Session.bounds; None: not counted)


# Every event is matched against every registration, and any local user may register (the
# read-only socket and connect:search_secrets are open to all): unbounded, one user's millions
# of registrations would stall the loop on each write and fill memory. virsh registers one,
# a management stack a few per connection.
MAX_PER_CONNECTION = 64
MAX_PER_UID = 256                  # over all connections of an untrusted local uid (or remote host)


class EventHub:
    def __init__(self, loop: asyncio.AbstractEventLoop, visible: EventFilter | None = None):
        self._loop = loop
        self._next = 0
        self._regs: dict[int, Registration] = {}
        self._per_owner: Counter[int | str] = Counter()
        self.visible = visible
        self._queue: deque[tuple[SecretEvent, list[tuple[int, Registration]]]] = deque()
        self._worker: asyncio.Task[None] | None = None

    @staticmethod
    def event_id(event_id: int) -> EventId:
        try:
            return EventId(event_id)
        except ValueError:
            raise daemon_internal(f"unsupported secret event ID {event_id}") from None

    def register(self, sink: EventSink, event_id: int, uuid: str | None, *, owner: int | str | None = None,
                 held: int = 0) -> int:
        """A new callback id; `held`: the registrations `sink` has already, `owner`: the uid
        or remote host counted against MAX_PER_UID (Session.bounds; None: not counted, trusted)."""
        eid = self.event_id(event_id)
        if held >= MAX_PER_CONNECTION:
            raise errors.OperationFailed(f"this connection has {held} event callbacks, the most allowed")
        if owner is not None and self._per_owner[owner] >= MAX_PER_UID:
            who = "host" if isinstance(owner, str) else "user"
            raise errors.OperationFailed(f"this {who} has {self._per_owner[owner]} event callbacks, the most allowed")
        cb = self._next
        self._next += 1
        self._regs[cb] = Registration(sink, eid, uuid, owner)
        if owner is not None:
            self._per_owner[owner] += 1
        return cb

    def deregister(self, sink: EventSink, callback_id: int) -> None:
        reg = self._regs.get(callback_id)
        if reg is None or reg.sink is not sink:
            raise rpc_failure(f"callbackID {callback_id} not registered")
        self._remove(callback_id, reg)

    def drop(self, sink: EventSink, callback_ids: set[int]) -> None:
        for cb in callback_ids:
            reg = self._regs.get(cb)
            if reg is not None and reg.sink is sink:
                self._remove(cb, reg)

    def _remove(self, cb: int, reg: Registration) -> None:
        del self._regs[cb]
        if reg.owner is not None:
            left = self._per_owner[reg.owner] - 1
            if left > 0:
                self._per_owner[reg.owner] = left
            else:
                del self._per_owner[reg.owner]

    def __len__(self) -> int:
        return len(self._regs)

    # -- from the driver ----------------------------------------------------------
    def driver_callback(self) -> Callable[[SecretEvent], None]:
        hops = loophop.hops(self._loop)

        def on_event(event: SecretEvent) -> None:
            # No registration, nothing to deliver: no wake-up of the loop (a registration made
            # before the write was submitted is seen here). Else the event goes with the other
            # events and answers of its write batch, in one wake-up (core/loophop.py); a closed
            # loop drops it (the daemon is stopping, nobody is listening).
            if self._regs:
                hops.post(self.deliver, event)
        return on_event

    def deliver(self, event: SecretEvent) -> None:
        if not self._regs:
            return
        targets = [(cb, reg) for cb, reg in self._regs.items()
                   if reg.event_id == event.event_id and (reg.uuid is None or reg.uuid == event.uuid)]
        if not targets:
            return
        if self.visible is not None:
            known = [self.visible.decided(reg.sink, event.definition) for _, reg in targets]
            if self._queue or any(k is None for k in known):
                if len(self._queue) >= MAX_QUEUED:
                    # polkit stalls and writes go on: the service's memory must stay bounded.
                    log.warning("dropping an RPC event about secret %s: %d events wait for polkit",
                                event.uuid, len(self._queue))
                    return
                self._queue.append((event, targets))
                if self._worker is None or self._worker.done():
                    self._worker = self._loop.create_task(self._deliver_queued())
                return
            targets = [t for t, k in zip(targets, known, strict=True) if k]
        self._send(event, targets)

    async def _deliver_queued(self) -> None:
        assert self.visible is not None
        while self._queue:
            event, targets = self._queue[0]
            try:
                allowed = await asyncio.gather(*(self.visible.allowed(reg.sink, event.definition)
                                                 for _, reg in targets))
                # Registrations dropped meanwhile get nothing.
                self._send(event, [(cb, reg) for (cb, reg), ok in zip(targets, allowed, strict=True)
                                   if ok and self._regs.get(cb) is reg])
            except Exception:  # noqa: BLE001 - one failed delivery must not stop the next
                log.exception("could not deliver an RPC event about secret %s", event.uuid)
            finally:
                self._queue.popleft()

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._queue.clear()

    def _send(self, event: SecretEvent, targets: list[tuple[int, Registration]]) -> None:
        secret = {"uuid": uuid_bytes(event.uuid), "usageType": int(event.usage_type),
                  "usageID": event.usage_id}
        for cb, reg in targets:
            if event.event_id == EventId.LIFECYCLE:
                proc = P.Proc.SECRET_EVENT_LIFECYCLE
                body = encode(P.LIFECYCLE_MSG, {"callbackID": cb, "secret": secret,
                                                "event": int(event.lifecycle or 0), "detail": event.detail})
            else:
                proc = P.Proc.SECRET_EVENT_VALUE_CHANGED
                body = encode(P.VALUE_CHANGED_MSG, {"callbackID": cb, "secret": secret})
            reg.sink.send_message(proc, body)


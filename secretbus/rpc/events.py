"""Secret event registrations of RPC clients, and the MESSAGE frames the driver's events become.

Callback ids are unique in the daemon (libvirt hands out 0, 1, … across connections). The
driver calls its subscribers from whichever thread changed the table (the writer thread for
a write), so events hop to the event loop before any socket is touched.
"""
from __future__ import annotations

import asyncio
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from secretbus.core.model import EventId, SecretDef, SecretEvent
from secretbus.rpc import protocol as P
from secretbus.rpc.failures import daemon_internal, rpc_failure
from secretbus.rpc.xdr import encode


class EventSink(Protocol):
    def send_message(self, proc: int, payload: bytes) -> None:
        """Queue a MESSAGE frame to this client (never blocks; drops a client that does not read)."""


def wire_secret(d: SecretDef) -> dict[str, Any]:
    return {"uuid": uuidlib.UUID(d.uuid).bytes, "usageType": int(d.usage_type), "usageID": d.usage_id or ""}


@dataclass(frozen=True)
class Registration:
    sink: EventSink
    event_id: EventId
    uuid: str | None               # only this secret's events, when set


class EventHub:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._next = 0
        self._regs: dict[int, Registration] = {}

    def register(self, sink: EventSink, event_id: int, uuid: str | None) -> int:
        try:
            eid = EventId(event_id)
        except ValueError:
            raise daemon_internal(f"unsupported secret event ID {event_id}") from None
        cb = self._next
        self._next += 1
        self._regs[cb] = Registration(sink, eid, uuid)
        return cb

    def deregister(self, sink: EventSink, callback_id: int) -> None:
        reg = self._regs.get(callback_id)
        if reg is None or reg.sink is not sink:
            raise rpc_failure(f"callbackID {callback_id} not registered")
        del self._regs[callback_id]

    def drop(self, sink: EventSink, callback_ids: set[int]) -> None:
        for cb in callback_ids:
            reg = self._regs.get(cb)
            if reg is not None and reg.sink is sink:
                del self._regs[cb]

    def __len__(self) -> int:
        return len(self._regs)

    # -- from the driver ----------------------------------------------------------
    def driver_callback(self) -> Callable[[SecretEvent], None]:
        def on_event(event: SecretEvent) -> None:
            try:
                self._loop.call_soon_threadsafe(self.deliver, event)
            except RuntimeError:
                pass    # the loop has closed: the daemon is stopping, nobody is listening
        return on_event

    def deliver(self, event: SecretEvent) -> None:
        if not self._regs:
            return
        secret = {"uuid": uuidlib.UUID(event.uuid).bytes, "usageType": int(event.usage_type),
                  "usageID": event.usage_id}
        for cb, reg in list(self._regs.items()):
            if reg.event_id != event.event_id or (reg.uuid is not None and reg.uuid != event.uuid):
                continue
            if event.event_id == EventId.LIFECYCLE:
                proc = P.Proc.SECRET_EVENT_LIFECYCLE
                body = encode(P.LIFECYCLE_MSG, {"callbackID": cb, "secret": secret,
                                                "event": int(event.lifecycle or 0), "detail": event.detail})
            else:
                proc = P.Proc.SECRET_EVENT_VALUE_CHANGED
                body = encode(P.VALUE_CHANGED_MSG, {"callbackID": cb, "secret": secret})
            reg.sink.send_message(proc, body)


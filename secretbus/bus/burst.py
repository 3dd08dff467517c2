"""Value reads of one loop pass answered together: their audit records first, in one burst.

Why: journald (like the benches' stand-in) sleeps between datagrams, and a datagram that finds
it asleep wakes it. On this project's 2-vCPU VMs a send that wakes the receiver cost ~9 µs,
the next ones of a burst ~1.4 µs each (bench/README), and the receiver's own work per wake-up
about as much again: with 16 reads in flight, one record per read, the records were a third of
a GetValue's service CPU. The reads of one pass (up to 16 with 16 in flight) now send their
records back to back, so the receiver wakes about once for them, and then their replies go.

What stays as before: a reply leaves only once its own record was taken (required mode: no
record, no value; AuditFailed becomes the caller's error); a record the journal cannot take
now (its queue is full) sends that read the awaiting way; the replies go out in the same pass
as an inline reply would (`flush` is called last: the writer's coalesced send, compat.py).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from secretbus.core.model import SecretDef

log = logging.getLogger("secretbus.dbus")

T = TypeVar("T")

Sent = bool | Exception    # True: answer it; False: await the record; an error: answer that


class RecordBurst(Generic[T]):
    """Held reads: `hold` one with its encoded record; at the end of the pass every record is
    sent by `send` (True taken or lost by the mode's rule, False not now, AuditFailed), then
    `answer(item, None | error)` or `wait(item)` runs for each, then `flush()` once."""

    __slots__ = ("_loop", "_send", "_answer", "_wait", "_flush", "_held")

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Callable[[SecretDef, bytes], bool],
                 answer: Callable[[T, Exception | None], None], wait: Callable[[T], None],
                 flush: Callable[[], None]):
        self._loop = loop
        self._send = send
        self._answer = answer
        self._wait = wait
        self._flush = flush
        self._held: list[tuple[SecretDef, bytes, T]] = []

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, d: SecretDef, record: bytes, item: T) -> None:
        self._held.append((d, record, item))
        if len(self._held) == 1:
            self._loop.call_soon(self.release)

    def release(self) -> None:
        held, self._held = self._held, []
        if not held:
            return
        sent: list[Sent] = []
        send = self._send
        for d, record, _ in held:          # back to back: the receiver wakes once for them
            try:
                sent.append(send(d, record))
            except Exception as e:   # noqa: BLE001 - AuditFailed: that read's error reply
                sent.append(e)
        for (_, _, item), outcome in zip(held, sent, strict=True):
            try:
                if outcome is False:
                    self._wait(item)
                else:
                    self._answer(item, None if outcome is True else outcome)
            except Exception as e:  # noqa: BLE001 - one read's failure must not drop the others
                log.error("internal error answering a value read: %s", type(e).__name__)
        self._flush()

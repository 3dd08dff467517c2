"""Slots for polkit checks in flight, shared fairly between uids.

One bus connection may have only so many calls awaiting replies (dbus-daemon: 128), so the
checks in flight are bounded. First come first served would let one uid that floods the
service with checks take every slot; here each uid holds at most `per_key` slots, waits in
its own queue beyond that, and a freed slot goes to the uids with waiters in turn (round
robin), so a uid's wait depends on the number of uids waiting, not on how much each sends.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class FairSlots:
    def __init__(self, total: int, per_key: int):
        if total < 1 or per_key < 1:
            raise ValueError("FairSlots needs at least one slot")
        self.total = total
        self.per_key = min(per_key, total)
        self._free = total
        self._held: dict[Hashable, int] = {}
        # Keys with waiters, in the order they get the next free slot.
        self._queues: OrderedDict[Hashable, deque[asyncio.Future[None]]] = OrderedDict()

    def held(self, key: Hashable) -> int:
        return self._held.get(key, 0)

    def waiting(self, key: Hashable) -> int:
        return len(self._queues.get(key, ()))

    @property
    def free(self) -> int:
        return self._free

    async def acquire(self, key: Hashable) -> None:
        if self._free and key not in self._queues and self.held(key) < self.per_key:
            self._take(key)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(key)          # granted just as we were cancelled: give it back
            else:
                self._drop_waiter(key, fut)
            raise

    def release(self, key: Hashable) -> None:
        held = self._held[key] - 1
        if held:
            self._held[key] = held
        else:
            del self._held[key]            # no entry kept for a uid with nothing in flight
        self._free += 1
        self._dispatch()

    @asynccontextmanager
    async def slot(self, key: Hashable) -> AsyncIterator[None]:
        await self.acquire(key)
        try:
            yield
        finally:
            self.release(key)

    def _take(self, key: Hashable) -> None:
        self._free -= 1
        self._held[key] = self.held(key) + 1

    def _drop_waiter(self, key: Hashable, fut: asyncio.Future[None]) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            try:
                queue.remove(fut)
            except ValueError:
                pass
            if not queue:
                del self._queues[key]

    def _dispatch(self) -> None:
        """Hand free slots to waiting keys in turn; a key at its limit is passed over."""
        while self._free and self._queues:
            for key in self._queues:
                if self.held(key) < self.per_key:
                    break
            else:
                return                      # every waiting key is at its limit
            queue = self._queues[key]
            fut = queue.popleft()
            if not queue:
                del self._queues[key]
            else:
                self._queues.move_to_end(key)   # its next waiter queues behind the other keys
            if fut.done():                  # cancelled while queued
                continue
            self._take(key)
            fut.set_result(None)

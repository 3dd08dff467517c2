"""One large reply built at a time, turns shared fairly, the loop's sockets polled between.

A large reply (GetManagedObjects of hundreds of secrets: build, size, marshal) holds the event
loop for milliseconds, tens of them on a loaded machine; a fresh connection that pipelines 32
such calls gets them all ready in the same loop iteration, and asyncio runs every ready task of
an iteration before it polls the sockets again: root's call, already in our socket, waits for
the whole burst (issue 12: p99 1.4 s under attack). Through the lane, the next large reply
starts only in a later iteration than the previous one ended (a `call_soon` hand-over), so the
sockets are polled between any two and a small call waits for one large reply at most.

Turns go round the uids that wait, and within a uid round its connections, so one connection
with many calls queued does not hold up the uid's other connections, nor a uid with many
connections the other uids. Root does not take the lane (bus/execute.py's CallRunner, and
rpc/guard.py for RPC lists): it is never queued behind others. O(1) per turn; the tables hold
only callers that wait.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

Who = int | str        # the caller's uid (a remote host over RPC), or its unique name when the uid is not known


class LargeReplyLane:
    def __init__(self) -> None:
        self._busy = False
        # uid -> sender -> waiters, each in turn order (OrderedDicts used as round-robin rings)
        self._waiting: OrderedDict[Who, OrderedDict[str, deque[asyncio.Future[None]]]] = OrderedDict()
        self.turns = 0
        self.waited = 0

    @asynccontextmanager
    async def turn(self, who: Who, sender: str) -> AsyncIterator[None]:
        """Hold the lane for one large reply of `sender` (of uid `who`)."""
        if self._busy or self._waiting:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(who, OrderedDict()).setdefault(sender, deque()).append(fut)
            self.waited += 1
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._release()      # handed the lane, then cancelled: pass it on
                else:
                    self._drop(who, sender, fut)
                raise
        else:
            self._busy = True
        self.turns += 1
        try:
            yield
        finally:
            self._release()

    def sizes(self) -> dict[str, int]:
        return {"lane_uids": len(self._waiting),
                "lane_waiting": sum(len(q) for s in self._waiting.values() for q in s.values())}

    def _release(self) -> None:
        # Still busy until the hand-over, which runs in the next loop iteration: a task that
        # becomes ready meanwhile queues instead of building straight after this one.
        asyncio.get_running_loop().call_soon(self._hand_over)

    def _hand_over(self) -> None:
        while self._waiting:
            who, senders = next(iter(self._waiting.items()))
            sender, queue = next(iter(senders.items()))
            fut = queue.popleft()
            # This uid goes to the back of the ring, and this sender to the back of its uid's.
            if queue:
                senders.move_to_end(sender)
            else:
                del senders[sender]
            if senders:
                self._waiting.move_to_end(who)
            else:
                del self._waiting[who]
            if not fut.done():
                fut.set_result(None)     # busy stays True: the lane is that waiter's now
                return
        self._busy = False

    def _drop(self, who: Who, sender: str, fut: asyncio.Future[None]) -> None:
        """A waiter that gave up (its task cancelled) before its turn."""
        senders = self._waiting.get(who)
        queue = senders.get(sender) if senders is not None else None
        if queue is None or senders is None:
            return
        try:
            queue.remove(fut)
        except ValueError:
            return
        if not queue:
            del senders[sender]
            if not senders:
                del self._waiting[who]

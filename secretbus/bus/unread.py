"""Bytes of replies a caller has not read yet, as the bus daemon counts them.

dbus-daemon takes our replies at once and queues them for a recipient that does not read;
those bytes count against *our* connection's max_incoming_bytes until delivered, and when
that is reached dbus-daemon stops reading from us: one slow reader then stalls every
caller, root included. Our own writer queue cannot see this, so the service asks the bus
(`org.freedesktop.DBus.Debug.Stats.GetConnectionStats`, allowed to root on the system bus:
`OutgoingBytes` is the recipient's queue) about a caller after every `recheck` bytes sent
to it, one question per caller at a time, and refuses the calls of a caller over `bound`
until it has read. O(1) per call. A bus without statistics (or refusing them) turns this
off, logged once: the writer-queue bounds of limits.py still apply.

The bound is a real one on what we add: a caller is `over` when the bus's last answer plus
every byte sent to it since that question went out reaches `bound`. The bus handles our
messages in order, so what we sent before a question is in its answer (queued or delivered)
and only what we sent after it is not; nothing sent is ever left uncounted. Checked right
before a reply is built, this keeps the bytes of our replies the bus holds for one caller
under `bound` plus one reply, whatever the timing. `settle` asks again and waits, so a caller
that has read in the meantime is served after one round trip.

A connection is on probation until the bus has shown that it reads (an answer below what we
had sent it before that question): its bound is `probation`, not `bound`. A client that
reads costs one more round trip, once, if it takes more than `probation` before the first
answer; one that never reads (a new connection of a slow-reader attack every few seconds)
gets `probation` of replies instead of `bound`, all of which the bus must read from us,
ahead of root's replies, at the pace a flood leaves it.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("secretbus.dbus")

Ask = Callable[[str], Awaitable[int]]   # unique name -> OutgoingBytes; raises when it cannot tell
DRAIN_WAIT = 2.0      # s: the longest a reading caller's call waits for its unread bytes to drain
DRAIN_STALL = 0.25    # s: ... and only while its queue in the bus went down this recently
DRAIN_PAUSE = 0.002   # s: between the questions of that wait (each one is a bus round trip)


class UnreadReplies:
    def __init__(self, ask: Ask | None, *, bound: int = 2 << 20, recheck: int = 512 << 10,
                 probation: int = 256 << 10, max_senders: int = 4096):
        self._ask = ask
        self.bound = bound
        self.recheck = recheck
        self.probation = min(probation, bound)
        self.max_senders = max_senders
        self._sent: dict[str, int] = {}     # bytes sent since the last question went out
        self._known: dict[str, int] = {}    # the bus's last answer, when not 0
        self._asking: dict[str, asyncio.Task[None]] = {}
        self._reads: set[str] = set()       # callers the bus has shown to read
        self._progress: dict[str, float] = {}   # when the bus last showed a caller's queue go down

    def blocked(self, sender: str) -> int:
        """`over`, asking the bus again when it is, so a caller is let through once it has read."""
        unread = self.over(sender)
        if unread:
            self._question(sender)
        return unread

    def over(self, sender: str) -> int:
        """What `sender` may have left unread when that reaches the bound (0: under it): the
        bus's last answer plus what we sent it since that question went out."""
        unread = self._known.get(sender, 0) + self._sent.get(sender, 0)
        return unread if unread >= (self.bound if sender in self._reads else self.probation) else 0

    async def settle(self, sender: str, rounds: int = 2) -> int:
        """Ask the bus about `sender` (joining a question on its way, then asking anew, at
        most `rounds` questions) until it is not `over`; returns `over` at the end. Without
        room for another question the last figures stand (it stays refused: fail closed).

        A caller whose queue in the bus went down within the last `DRAIN_STALL` is reading
        (a client with several ~1 MB lists in flight holds more than `bound` there while it
        reads as fast as it can): it is waited for, a question every `DRAIN_PAUSE`, for at
        most `DRAIN_WAIT`. Dropping its calls would leave a well-behaved client without
        replies for good; a caller that stops reading shows no progress and is refused."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_WAIT
        asked = 0
        while True:
            task = self._asking.get(sender)
            if task is None:
                self._question(sender)
                task = self._asking.get(sender)
                if task is None:
                    break
            await asyncio.wait([task])      # a question cancelled (caller gone) ends the wait too
            asked += 1
            if not self.over(sender):
                return 0
            if asked < rounds:
                continue
            now = loop.time()
            if now >= deadline or not self.draining(sender):
                break
            await asyncio.sleep(DRAIN_PAUSE)
        return self.over(sender)

    def draining(self, sender: str) -> bool:
        """Whether the bus showed `sender`'s queue go down within the last DRAIN_STALL."""
        return asyncio.get_running_loop().time() - self._progress.get(sender, float("-inf")) <= DRAIN_STALL

    def sent(self, sender: str, n: int) -> None:
        if self._ask is None or n <= 0:
            return
        total = self._sent.get(sender, 0) + n
        self._sent[sender] = total
        if total >= self.recheck or self.over(sender):    # on probation, before `recheck`
            self._question(sender)

    def forget(self, sender: str) -> None:
        self._sent.pop(sender, None)
        self._known.pop(sender, None)
        self._reads.discard(sender)
        self._progress.pop(sender, None)
        task = self._asking.pop(sender, None)
        if task is not None:
            task.cancel()

    def sizes(self) -> dict[str, int]:
        blocked = sum(1 for s in self._known.keys() | self._sent.keys() if self.over(s))
        return {"unread_tracked": len(self._sent), "unread_blocked": blocked,
                "unread_asking": len(self._asking), "unread_readers": len(self._reads)}

    def _question(self, sender: str) -> None:
        if self._ask is None or sender in self._asking or len(self._asking) >= self.max_senders:
            return
        # What was sent up to now is in the answer; what is sent from now on is not.
        task = asyncio.get_running_loop().create_task(self._check(sender, self._sent.get(sender, 0)))
        self._asking[sender] = task
        task.add_done_callback(lambda t: self._asking.pop(sender, None) if self._asking.get(sender) is t else None)

    async def _check(self, sender: str, before: int) -> None:
        ask = self._ask
        assert ask is not None
        try:
            unread = await ask(sender)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - no statistics: fall back to the writer bounds
            if self._ask is not None and _unsupported(e):
                log.warning("the bus gives no connection statistics (%s): unread replies are not "
                            "bounded per caller", type(e).__name__)
                self._ask = None
                self._sent.clear()
                self._known.clear()
                self._reads.clear()
                self._progress.clear()
            return
        if sender not in self._asking:
            return                       # left meanwhile
        # What the bus could hold for it when the question went out: its previous answer plus
        # what we sent after that one. Less is queued now: it reads. (Against `before` alone,
        # a caller that had read everything while nothing new was sent would never qualify.)
        outstanding = self._known.get(sender, 0) + before
        if unread < outstanding:
            if len(self._reads) < self.max_senders:
                self._reads.add(sender)
            if sender in self._progress or len(self._progress) < self.max_senders:
                self._progress[sender] = asyncio.get_running_loop().time()
        after = self._sent.get(sender, 0) - before
        if after > 0:
            self._sent[sender] = after
        else:
            self._sent.pop(sender, None)
        if unread > 0 and (sender in self._known or len(self._known) < self.max_senders):
            self._known[sender] = unread
        elif unread > 0:
            # No room to remember it: count it as sent since, so the bound still holds
            # (`_sent` has an entry per caller with calls anyway).
            self._sent[sender] = self._sent.get(sender, 0) + unread
        else:
            self._known.pop(sender, None)


# What a bus without statistics, or one that refuses them to us, answers; anything else
# (a caller that left, a timeout) is about this one question only.
_UNSUPPORTED = ("org.freedesktop.DBus.Error.UnknownMethod", "org.freedesktop.DBus.Error.UnknownInterface",
                "org.freedesktop.DBus.Error.AccessDenied", "org.freedesktop.DBus.Error.NotSupported")


def _unsupported(e: Exception) -> bool:
    return getattr(e, "name", None) in _UNSUPPORTED

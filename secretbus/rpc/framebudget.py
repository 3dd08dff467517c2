"""The bytes of frames one local uid may hold at once, across all its connections (DESIGN §12).

A frame is held whole while it arrives and while its call runs. Per connection that is bounded
(16 calls in flight, MAX_LARGE of them over LARGE_FRAME), but a uid has up to
`max_clients_per_uid` connections: 64 half-sent frames of 2 MiB were 128 MiB of the daemon's
memory for one unprivileged user who had not even authenticated, and 64 × 16 lookups waiting
for polkit with 64 KiB of junk each would be 64 MiB. So the connections of each untrusted local
uid share one `FrameBudget`: a frame takes its size from it when its length word is read, and
gives it back when its call is answered. A connection whose frame does not fit stops reading
(what it sends waits in the kernel's buffer) until the uid's earlier frames are answered; the
freed bytes go to the uid's waiting connections in the order they came. A uid stalls only its
own connections; root and the session's own user have no budget.
"""
from __future__ import annotations

from collections import deque
from typing import Protocol

UID_FRAME_BYTES = 8 * 1024 * 1024


class Waiter(Protocol):
    def frame_granted(self, n: int) -> None:
        """The `n` bytes this waiter asked for are its now (it must give them back)."""


class FrameBudget:
    def __init__(self, limit: int = UID_FRAME_BYTES):
        self.limit = limit          # at least the largest frame, or that frame would wait for ever
        self.held = 0
        self._waiting: deque[tuple[Waiter, int]] = deque()

    def take(self, who: Waiter, n: int) -> bool:
        """`n` bytes for `who` now (True), or `who` queues for them (False) and is told by
        `frame_granted`. One queued request per waiter: asking again while queued only waits."""
        if not self._waiting and self.held + n <= self.limit:
            self.held += n
            return True
        if all(w is not who for w, _ in self._waiting):
            self._waiting.append((who, n))
        return False

    def give(self, n: int) -> None:
        self.held -= n
        while self._waiting:
            who, want = self._waiting[0]
            if self.held + want > self.limit:
                return
            self._waiting.popleft()
            self.held += want
            who.frame_granted(want)

    def cancel(self, who: Waiter) -> None:
        """`who` no longer waits (its connection closed)."""
        for i, (w, _) in enumerate(self._waiting):
            if w is who:
                del self._waiting[i]
                self.give(0)        # the next in line may fit now
                return

    @property
    def idle(self) -> bool:
        return self.held == 0 and not self._waiting

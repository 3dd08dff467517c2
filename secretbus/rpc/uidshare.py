"""What all connections of one untrusted local uid share (DESIGN §12): the bytes of frames they
may hold at once, and one bound on the output they leave unread.

A uid may open up to `max_clients_per_uid` connections, and each connection's own bounds were
not enough together:
- A frame is held whole while it arrives and while its call runs. Per connection that is
  bounded (16 calls in flight, MAX_LARGE of them over LARGE_FRAME), but 64 half-sent frames of
  2 MiB were 128 MiB of the daemon's memory for one unprivileged user who had not even
  authenticated. So a frame takes its size from the uid's share when its length word is read,
  and gives it back when its call is answered. A connection whose frame does not fit stops
  reading (what it sends waits in the kernel's buffer) until the uid's earlier frames are
  answered; the freed bytes go to the uid's waiting connections in the order they came.
- Events queue on a connection that does not read until `max_unread` (16 MiB), which over 64
  connections is a GiB. So a connection that is itself behind is dropped as soon as the
  uid's connections together leave more than `uid_max_unread` unread (connection.py).
A uid stalls or loses only its own connections; root and the session's own user share nothing.
A remote host's connections (TLS, TCP) share one as an untrusted uid's do (Session.bounds).
"""
from __future__ import annotations

from collections import deque
from typing import Protocol

UID_FRAME_BYTES = 8 * 1024 * 1024


class Member(Protocol):
    def frame_granted(self, n: int) -> None:
        """The `n` bytes this waiter asked for are its now (it must give them back)."""

    @property
    def unread(self) -> int:
        """Bytes written to it that its client has not read yet."""


class UidShare:
    def __init__(self, limit: int = UID_FRAME_BYTES):
        self.limit = limit          # at least the largest frame, or that frame would wait for ever
        self.held = 0
        self._waiting: deque[tuple[Member, int]] = deque()
        self.connections: set[Member] = set()

    def unread_total(self) -> int:
        return sum(c.unread for c in self.connections)

    def take(self, who: Member, n: int) -> bool:
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

    def cancel(self, who: Member) -> None:
        """`who` no longer waits (its connection closed)."""
        for i, (w, _) in enumerate(self._waiting):
            if w is who:
                del self._waiting[i]
                self.give(0)        # the next in line may fit now
                return

    @property
    def idle(self) -> bool:
        return self.held == 0 and not self._waiting and not self.connections

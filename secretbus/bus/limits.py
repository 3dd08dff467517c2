"""What each caller may have outstanding (DESIGN.md §12): calls in flight per unique name,
and bytes of replies handed to our bus writer but not yet taken by the bus daemon.

Everything here is O(1) per call: counters per sender, created on a caller's first call
and removed when they drop back to zero or the caller leaves the bus, so the tables hold
only callers with something outstanding. A release for a caller that left is a no-op.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"


@dataclass(frozen=True)
class Bounds:
    calls_per_sender: int = 32            # a client pipelining more than this waits for replies
    bytes_per_sender: int = 8 << 20       # replies queued in our writer for one caller
    backlog: int = 32 << 20               # all replies queued: over it, large replies are refused
    senders: int = 4096                   # callers with calls in flight at once (bus default: 2048 connections)
    # What the writes of one uid other than root may hold at once, over all its connections
    # (UidWrites): a uid may open 256 bus connections of 32 calls each.
    write_bytes_per_uid: int = 8 << 20


class Refused(Exception):
    """A call over a bound: replied with LimitsExceeded and this text (no argument in it)."""


class CallerBudget:
    def __init__(self, bounds: Bounds | None = None):
        self.bounds = bounds or Bounds()
        self._calls: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self.backlog = 0                  # bytes of replies in the writer's queue, all callers
        self.refused = 0

    def admit(self, sender: str) -> None:
        """Count one more call in flight for `sender`, or raise Refused."""
        n = self._calls.get(sender, 0)
        b = self.bounds
        if n >= b.calls_per_sender:
            self._refuse(f"{n} calls of this connection are in flight, the most allowed is "
                         f"{b.calls_per_sender}: wait for their replies")
        if self._bytes.get(sender, 0) >= b.bytes_per_sender:
            self._refuse(f"this connection has not read {self._bytes[sender]} bytes of replies "
                         f"(at most {b.bytes_per_sender}): read them before calling again")
        if n == 0 and len(self._calls) >= b.senders:
            self._refuse("too many callers with calls in flight; try again later")
        self._calls[sender] = n + 1

    def active(self, sender: str) -> bool:
        """Whether `sender` has a call in flight: false once it left the bus."""
        return sender in self._calls

    def release(self, sender: str) -> None:
        n = self._calls.get(sender)
        if n is None:
            return                        # the caller left meanwhile: nothing to keep
        if n <= 1:
            del self._calls[sender]
        else:
            self._calls[sender] = n - 1

    def over_backlog(self) -> bool:
        return self.backlog >= self.bounds.backlog

    def queued(self, sender: str, n: int) -> None:
        """`n` bytes of a reply to `sender` wait in the writer's queue."""
        self.backlog += n
        self._bytes[sender] = self._bytes.get(sender, 0) + n

    def taken(self, sender: str, n: int) -> None:
        """The bus took them (or the connection closed)."""
        self.backlog -= n
        left = self._bytes.get(sender)
        if left is None:
            return
        if left <= n:
            del self._bytes[sender]
        else:
            self._bytes[sender] = left - n

    def forget(self, sender: str) -> None:
        """`sender` left the bus. Its queued bytes stay in `backlog` until written."""
        self._calls.pop(sender, None)
        self._bytes.pop(sender, None)

    def sizes(self) -> dict[str, int]:
        return {"in_flight_senders": len(self._calls), "queued_senders": len(self._bytes),
                "backlog": self.backlog}

    def _refuse(self, text: str) -> None:
        self.refused += 1
        raise Refused(text)


# What one write holds at least while it waits (its message, the op, its plan) besides its
# XML or value: an Undefine counts too.
WRITE_COST_MIN = 4096


class UidWrites:
    """The bytes of the writes of each uid in flight, from their access check to their reply.

    Writes to one secret are committed in order, one per batch, so a uid allowed to write can
    keep thousands waiting: 32 member connections of 32 SetValue calls of 64 KiB each held
    75 MB of the daemon's memory, and a uid may open 256 connections. A write that would take
    its uid over the bound is refused at once (nothing is done). Root is not counted."""

    def __init__(self, bound: int):
        self.bound = bound
        self._held: dict[int | None, int] = {}
        self.refused = 0
        # Writes still waiting to learn their uid (take_unknown): their bytes, all together,
        # and how many each connection has.
        self._unknown = 0
        self._unknown_by_sender: dict[str, int] = {}

    def take(self, uid: int | None, n: int) -> int:
        """Count a write of about `n` bytes for `uid`, or raise Refused; what to give back."""
        n = max(n, WRITE_COST_MIN)
        held = self._held.get(uid, 0)
        if held and held + n > self.bound:
            self.refused += 1
            raise Refused(f"{held} bytes of this user's writes are in flight, the most allowed is "
                          f"{self.bound}: wait for their replies")
        self._held[uid] = held + n
        return n

    def give(self, uid: int | None, n: int) -> None:
        left = self._held.get(uid, 0) - n
        if left > 0:
            self._held[uid] = left
        else:
            self._held.pop(uid, None)

    def take_unknown(self, sender: str, n: int) -> tuple[str, int]:
        """Count a write of about `n` bytes whose uid is still being asked of the bus daemon,
        or raise Refused; what to give back (give_unknown). The answer comes after everything
        the bus queued for us, so a flood of writes from new connections would all be held
        until then: 64 connections of 32 SetValue of 64 KiB, up to 128 MB. A connection's
        first such write is always taken (root's first write too; its uid is known after it);
        a further one only while those of all connections stay within the bound together."""
        n = max(n, WRITE_COST_MIN)
        waiting = self._unknown_by_sender.get(sender, 0)
        if waiting and self._unknown + n > self.bound:
            self.refused += 1
            raise Refused(f"{self._unknown} bytes of writes of connections whose user is not known yet are in "
                          f"flight, the most allowed is {self.bound}: wait for this connection's first reply")
        self._unknown += n
        self._unknown_by_sender[sender] = waiting + 1
        return sender, n

    def give_unknown(self, sender: str, n: int) -> None:
        self._unknown -= n
        left = self._unknown_by_sender.get(sender, 0) - 1
        if left > 0:
            self._unknown_by_sender[sender] = left
        else:
            self._unknown_by_sender.pop(sender, None)

    def sizes(self) -> dict[str, int]:
        return {"writing_uids": len(self._held), "writing_unknown_senders": len(self._unknown_by_sender)}


def write_size(body: Sequence[object]) -> int:
    """About what a write's arguments hold: its XML or value."""
    return sum(len(x) for x in body if isinstance(x, (str, bytes, bytearray)))

"""An event loop that polls its clients' sockets for a moment before it sleeps.

A client making one call at a time (virtqemud reading a VM's secrets at start, virsh in a
script, python3-libvirt in a loop) sends its next request a few tens of µs after our reply.
If the loop is asleep in epoll_wait by then, that request must wake it; where an idle CPU halts
at once (a VM booted with `guest_halt_poll_ns=0`, deep C-states) that wake-up costs more than
the call itself. So while a marked socket (an RPC client connection, `mark`) has had I/O in the
last HOT_WINDOW, `select` first polls (epoll_wait without waiting) for up to `spin` seconds,
yielding the CPU to anything else runnable between polls, and only then sleeps: the next
request finds the loop awake.

The D-Bus connection is not marked: its requests come through dbus-daemon, which sleeps as
well, and with 16 calls in flight on 2 CPUs a poll took CPU that the bus daemon and the
clients needed (bench/README.md).

What it costs is bounded: at most `spin` of CPU per select, and only within HOT_WINDOW of a
marked socket's I/O. A wait that ends with nothing ready (a timer) ends the window, and a loop
with nothing to do sleeps as before.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import time
import weakref

DEFAULT_POLL_US = 50      # python3-libvirt's next call arrives 20–40 µs after a reply here
MAX_POLL_US = 1000
HOT_WINDOW = 0.002        # s: spans a write's fsyncs between a client's reply and its next call

_NEVER = float("-inf")
_selectors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PollingSelector] = weakref.WeakKeyDictionary()


class PollingSelector(selectors.EpollSelector):
    """EpollSelector whose select polls up to `spin` seconds before it blocks, while a
    marked fd had I/O in the last `window` seconds."""

    def __init__(self, spin: float, window: float = HOT_WINDOW) -> None:
        super().__init__()
        self._spin = spin
        self._window = window
        self._marked: set[int] = set()
        self._hot_at = _NEVER             # when a select last returned a marked fd

    @property
    def marked(self) -> frozenset[int]:
        return frozenset(self._marked)

    def mark(self, fd: int, marked: bool = True) -> None:
        if marked:
            self._marked.add(fd)
        else:
            self._marked.discard(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        now = time.perf_counter
        if (self._spin > 0 and (timeout is None or timeout > 0)
                and now() - self._hot_at <= self._window):
            poll = super().select
            start = now()
            end = start + (self._spin if timeout is None else min(self._spin, timeout))
            while True:
                ready = poll(0)
                if ready:
                    return self._seen(ready)
                if now() >= end:
                    break
                os.sched_yield()
            if timeout is not None:
                timeout = max(0.0, timeout - (now() - start))
        ready = super().select(timeout)
        if ready:
            return self._seen(ready)
        if timeout is None or timeout > 0:
            self._hot_at = _NEVER          # slept and nothing came (a timer): no poll after it
        # (a select(0) with nothing ready, asyncio's between callbacks, changes nothing)
        return ready

    def _seen(self, ready: list[tuple[selectors.SelectorKey, int]]) -> list[tuple[selectors.SelectorKey, int]]:
        marked = self._marked
        if marked and any(key.fd in marked for key, _ in ready):
            self._hot_at = time.perf_counter()
        return ready


def new_event_loop(poll_us: int) -> asyncio.AbstractEventLoop:
    """The daemon's loop: polling up to `poll_us` µs after marked I/O (0: asyncio's own loop)."""
    if poll_us <= 0:
        return asyncio.new_event_loop()
    sel = PollingSelector(poll_us / 1e6)
    loop = asyncio.SelectorEventLoop(sel)
    _selectors[loop] = sel
    return loop


def mark(loop: asyncio.AbstractEventLoop, fd: int, marked: bool = True) -> None:
    """`loop` polls after I/O on `fd` (a client connection's socket), or no longer. Nothing if
    that loop does not poll."""
    sel = _selectors.get(loop)
    if sel is not None:
        sel.mark(fd, marked)


def poll_us_arg(text: str) -> int:
    """argparse type of --poll-us."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of µs: {text!r}") from None
    if not 0 <= v <= MAX_POLL_US:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_POLL_US} µs, not {v}")
    return v

"""An event loop that polls its sockets for a moment before it sleeps.

A client making one call at a time (virtqemud reading a VM's secrets at start, virsh in a
script, python3-libvirt in a loop) sends its next request a few tens of µs after our reply.
If the loop is asleep in epoll_wait by then, that request must wake it; where an idle CPU halts
at once (a VM booted with `guest_halt_poll_ns=0`, deep C-states) that wake-up costs more than
the call itself. So after a pass that handled I/O, `select` first polls (epoll_wait without
waiting) for up to `spin` seconds, yielding the CPU to anything else runnable between polls,
and only then sleeps: the next request finds the loop awake.

What it costs is bounded: at most `spin` of CPU per pass that handled I/O. A wake-up by a timer
alone polls nothing after it, and a loop with nothing to do sleeps as before. With many calls
in flight the loop rarely reaches `select` with nothing ready, so the poll seldom runs.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import time

DEFAULT_POLL_US = 50      # python3-libvirt's next call arrives 20–40 µs after a reply here
MAX_POLL_US = 1000


class PollingSelector(selectors.EpollSelector):
    """EpollSelector whose select polls up to `spin` seconds before it blocks, after I/O."""

    def __init__(self, spin: float) -> None:
        super().__init__()
        self._spin = spin
        self._after_io = False            # the last select returned events

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self._after_io and self._spin > 0 and (timeout is None or timeout > 0):
            poll = super().select
            now = time.perf_counter
            start = now()
            end = start + (self._spin if timeout is None else min(self._spin, timeout))
            while True:
                ready = poll(0)
                if ready:
                    return ready
                if now() >= end:
                    break
                os.sched_yield()
            if timeout is not None:
                timeout = max(0.0, timeout - (now() - start))
        ready = super().select(timeout)
        if ready:
            self._after_io = True
        elif timeout is None or timeout > 0:
            self._after_io = False         # woken by a timer: nothing came while we slept
        # (a select(0) with nothing ready, asyncio's between callbacks, leaves it as it was)
        return ready


def new_event_loop(poll_us: int) -> asyncio.AbstractEventLoop:
    """The daemon's loop: polling up to `poll_us` µs after I/O (0: asyncio's own loop)."""
    if poll_us <= 0:
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(PollingSelector(poll_us / 1e6))


def poll_us_arg(text: str) -> int:
    """argparse type of --poll-us."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of µs: {text!r}") from None
    if not 0 <= v <= MAX_POLL_US:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_POLL_US} µs, not {v}")
    return v


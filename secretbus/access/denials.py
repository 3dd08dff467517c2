"""Denials in the log, without letting a caller flood it.

A caller that repeats a denied call thousands of times a second would push every other
record out of the journal. So the first denial of an action to a uid is logged in full
(with the caller's bus name and the secret), later ones within `window` seconds are only
counted, and when the window ends one summary line per (uid, action) says how many were
left out. Memory is bounded: at most `max_uids` uids are tracked; denials of further uids
are counted together and reported with the next summary.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("secretbus.access")


@dataclass
class _Window:
    started: float                          # time.time(), for the summary text
    opened: float                           # clock(), for the window's end
    counts: dict[str, int] = field(default_factory=dict)   # action -> denials not logged


class DenialLog:
    def __init__(self, *, window: float = 60.0, max_uids: int = 1024,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger = log):
        self.window = window
        self.max_uids = max_uids
        self.clock = clock
        self.log = logger
        self._windows: dict[int | None, _Window] = {}
        self._untracked = 0
        self._timer: asyncio.TimerHandle | None = None

    def denied(self, uid: int | None, sender: str, action: str,
               extra: Mapping[str, Any] | None = None) -> None:
        """Record one denial of `action` to `sender` (uid `uid`, None when unknown)."""
        now = self.clock()
        w = self._windows.get(uid)
        if w is not None and now - w.opened >= self.window:   # only this uid's: O(1) per denial
            self._summarise(uid, self._windows.pop(uid))
            w = None
        if w is None:
            if len(self._windows) >= self.max_uids:
                self._untracked += 1
                return
            w = self._windows[uid] = _Window(time.time(), now)
            self._arm()
        if action in w.counts:
            w.counts[action] += 1
            return
        w.counts[action] = 0
        self.log.warning("denied %s to %s (uid %s)", action, sender, uid, extra=dict(extra or {}))

    def flush(self) -> None:
        """Summarise every open window now (on shutdown)."""
        self._expire(float("inf"))

    def close(self) -> None:
        self.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, now: float) -> None:
        for uid in [u for u, w in self._windows.items() if now - w.opened >= self.window]:
            self._summarise(uid, self._windows.pop(uid))
        if self._untracked and len(self._windows) < self.max_uids:
            self.log.warning("%d more denials of callers of other uids", self._untracked)
            self._untracked = 0

    def _summarise(self, uid: int | None, w: _Window) -> None:
        since = time.strftime("%H:%M:%S", time.localtime(w.started))
        for action, n in w.counts.items():
            if n:
                self.log.warning("uid %s: %d more denials of %s since %s", uid, n, action, since)

    def _arm(self) -> None:
        """Make sure a summary is written when the oldest window ends, even if no further
        denial comes to trigger it."""
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return                          # no loop (tests, embedded): summaries come lazily
        self._timer = loop.call_later(self.window, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._expire(self.clock())
        if self._windows:
            oldest = min(w.opened for w in self._windows.values())
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, oldest + self.window - self.clock()), self._tick)

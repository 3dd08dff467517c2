"""The fleet store's connection state, visible to the daemon and logged on every change."""
from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("secretbus.fleet")


class FleetState(enum.Enum):
    CONNECTING = "connecting"     # start-up: serving the cache, not yet in sync
    ONLINE = "online"             # in sync and watching: fleet writes allowed
    DEGRADED = "degraded"         # etcd unreachable: reads from the cache, fleet writes refused


@dataclass(frozen=True)
class FleetStatus:
    state: FleetState
    reason: str          # why not online ("" when online)
    revision: int        # the last etcd revision applied here

    @property
    def degraded(self) -> bool:
        return self.state is not FleetState.ONLINE


class StatusCell:
    """Thread-safe holder of the state; waiters can block until it is online."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._state = FleetState.CONNECTING
        self._reason = "not yet connected to etcd"
        self._watchers: list[Callable[[FleetState, str], None]] = []

    def watch(self, fn: Callable[[FleetState, str], None]) -> None:
        """Call `fn(state, reason)` after every change, in the thread that made it."""
        with self._cond:
            self._watchers.append(fn)

    def get(self) -> tuple[FleetState, str]:
        with self._cond:
            return self._state, self._reason

    def set(self, state: FleetState, reason: str = "") -> None:
        with self._cond:
            if (state, reason) == (self._state, self._reason):
                return
            was = self._state
            self._state, self._reason = state, reason
            self._cond.notify_all()
            watchers = list(self._watchers)
        for fn in watchers:
            try:
                fn(state, reason)
            except Exception:   # a watcher's failure must not stop the sync thread
                log.exception("fleet state watcher failed")
        if state is FleetState.ONLINE:
            log.info("fleet store online" + (" again" if was is FleetState.DEGRADED else ""))
        elif state is FleetState.DEGRADED and was is not FleetState.DEGRADED:
            log.warning("fleet store unavailable: %s; serving cached secrets, fleet writes refused", reason)

    def wait_online(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._state is FleetState.ONLINE, timeout)

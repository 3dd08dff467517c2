"""sd_notify through systemd-python; harmless when no NOTIFY_SOCKET is set."""
from __future__ import annotations

import logging
import time

log = logging.getLogger("secretbus.notify")

try:
    import systemd.daemon as _sd_daemon
except ImportError:  # systemd-python is a dependency, but a bare checkout may lack it
    _sd_daemon = None


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=...") to the service manager, if any."""
    if _sd_daemon is None:
        return False
    try:
        return bool(_sd_daemon.notify("\n".join(fields)))
    except OSError as e:
        log.warning("sd_notify failed: %s", e.strerror)
        return False


def reloading() -> bool:
    # systemd 253+ wants MONOTONIC_USEC with RELOADING=1 for Type=notify-reload.
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

"""Process hardening for anything that holds secret values or the key in memory."""
from __future__ import annotations

import ctypes
import logging
import resource

log = logging.getLogger("secretbus.procsec")

PR_SET_DUMPABLE = 4


def no_core_dumps() -> None:
    """No core file (it would hold every value and the key in clear) and no same-uid ptrace."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_DUMPABLE, 0) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):
        log.warning("prctl is not available; core dumps are limited by RLIMIT_CORE only")

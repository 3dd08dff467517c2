"""The daemon's GIL switch interval: short, so that the writer's threads do not wait on the loop.

A thread back from a syscall (the writer's fdatasync, rename or directory fsync) must take the
GIL again before it can go on. The event loop keeps the GIL while it runs Python code (a read
of many messages, each DefineXML's parse) until it next blocks, or until a waiting thread has
asked for the GIL for one switch interval. CPython's default, 5 ms, is longer than a batch's
own disk work, so a write batch could stand still for most of it. At 0.5 ms, DefineXML with
16 in flight went from 1,980 to 2,130 calls/s (means of six interleaved bench_dbus runs each);
the other write rows moved 1-3 %, within their spread, and the reads not at all (bench/README,
"The GIL's switch interval").

Only the daemon sets it: in embedded mode the threads of the process are its caller's.
"""
from __future__ import annotations

import sys

SWITCH_INTERVAL = 0.0005     # seconds; CPython's default is 0.005


def shorten_switch_interval() -> None:
    """Set this process's GIL switch interval to SWITCH_INTERVAL."""
    sys.setswitchinterval(SWITCH_INTERVAL)

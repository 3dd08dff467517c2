"""glibc's malloc, told to give freed memory back: the daemon's RSS follows what it holds.

glibc raises its mmap threshold each time a block it had mmapped is freed, up to 32 MiB, and
keeps up to twice that free at the top of the heap untrimmed. A caller's burst of 64 KiB
writes or a few large list replies then leaves the daemon's RSS tens of MB above what it
holds: a member's flood of SetValue, bounded to 8 MiB of writes in flight, took it from 45 to
104-154 MB with the store on tmpfs (tests/test_attack_fairness.py). Setting the thresholds once
turns that adjustment off. Blocks of 64 KiB and more (a value at VALUE_MAX, its message) are
mmapped and unmapped when freed, and more than 128 KiB free at the top of the heap is trimmed.
Same flood: 55-59 MB. The mmap threshold at 128 KiB was not enough (104-129 MB); SetValue ×16
costs ~2.5 % more (bench/README).

Nothing changes where malloc is not glibc's, or when the MALLOC_TRIM_THRESHOLD_ /
MALLOC_MMAP_THRESHOLD_ environment variables already say what the administrator wants.
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1       # glibc's malloc.h
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 128 * 1024     # glibc's own starting value, kept fixed
MMAP_THRESHOLD = 64 * 1024      # a 64 KiB value (its message, its copies) is mmapped: given back when freed


def give_back_freed_memory() -> bool:
    """Fix glibc's trim and mmap thresholds; whether it was done."""
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False            # not glibc (musl has no mallopt of these)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))

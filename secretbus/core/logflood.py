"""The daemon's log, without letting a caller flood it.

Many log lines are a caller's doing: a write logs one, a refused or junk connection logs one,
and any local user (or, with a listener, any host) can make thousands a second. journald rate-limits
a service per priority pool (NOTICE and INFO share one; default 10,000 per 30 s, more with free
disk) and drops what is over, and the value-read audit records (NOTICE) are in that pool: a flood
of our own lines would get real reads' records dropped, and push old records out of the journal.

So the daemon's handler filters every record through a token bucket per line of code and caller
(logger, message template, CALLER_UID): `burst` records pass at once, then `rate` a second.
All keys together also share one bucket (`total_burst`, `total_rate`), so the records we send
stay far under journald's limit however many keys there are. What a bucket holds back is counted,
and a summary line says how many like records were left out, before the key's next record passes
(or, for a key that went quiet, at the next sweep or at shutdown). Memory is bounded: at most
`max_keys` keys; past that, records of new keys are counted together.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

Key = tuple[str, str, object]
SUMMARY = "_secretbus_flood_summary"        # set on our own summary records: never held back
SWEEP_EVERY = 10.0                          # seconds between looks for quiet keys with a count


@dataclass
class _Bucket:
    tokens: float
    at: float
    level: int = logging.INFO   # its records' level, for its summary
    held: int = 0               # records left out since `since`
    since: float = 0.0          # time.time() of the first of them


class FloodFilter(logging.Filter):
    def __init__(self, *, burst: int = 200, rate: float = 20.0, total_burst: int = 2000,
                 total_rate: float = 100.0, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst, self.rate = burst, rate
        self.total_burst, self.total_rate = total_burst, total_rate
        self.max_keys = max_keys
        self.clock = clock
        self.emit: Callable[[logging.LogRecord], object] | None = None   # where summaries go (the handler)
        self._keys: dict[Key, _Bucket] = {}
        self._total = _Bucket(float(total_burst), clock())
        self._untracked = _Bucket(0.0, 0.0)
        self._lock = threading.Lock()
        self._swept = self._forgot = clock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, SUMMARY, False):
            return True
        key: Key = (record.name, str(record.msg), getattr(record, "CALLER_UID", None))
        with self._lock:
            now = self.clock()
            summaries = self._sweep(now) if now - self._swept >= SWEEP_EVERY else []
            b = self._bucket(key, now, record.levelno)
            passed = b is not None and self._take(b, now)
            if passed and b is not None and b.held:
                summaries.append(self._summary(key, b))
        for s in summaries:
            self._send(s)
        return passed

    def flush(self) -> None:
        """Send the summary of every key that holds a count (at shutdown)."""
        with self._lock:
            summaries = self._sweep(float("inf"))
        for s in summaries:
            self._send(s)

    def _bucket(self, key: Key, now: float, level: int) -> _Bucket | None:
        b = self._keys.get(key)
        if b is not None:
            b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
            b.at = now
            return b
        if len(self._keys) >= self.max_keys and now - self._forgot >= 1.0:
            self._forgot = now          # a scan of every key at most once a second
            self._forget_full(now)
        if len(self._keys) >= self.max_keys:
            self._hold(self._untracked)
            return None
        b = self._keys[key] = _Bucket(float(self.burst), now, level)
        return b

    def _take(self, b: _Bucket, now: float) -> bool:
        t = self._total
        t.tokens = min(float(self.total_burst), t.tokens + (now - t.at) * self.total_rate)
        t.at = now
        if b.tokens >= 1 and t.tokens >= 1:
            b.tokens -= 1
            t.tokens -= 1
            return True
        self._hold(b)
        return False

    @staticmethod
    def _hold(b: _Bucket) -> None:
        if not b.held:
            b.since = time.time()
        b.held += 1

    def _forget_full(self, now: float) -> None:
        """Drop the keys whose buckets are full again and hold no count (they are as new)."""
        for k in [k for k, b in self._keys.items()
                  if not b.held and b.tokens + (now - b.at) * self.rate >= self.burst]:
            del self._keys[k]

    def _sweep(self, now: float) -> list[logging.LogRecord]:
        """Summaries of keys that hold a count and went quiet (their bucket refilled)."""
        self._swept = self.clock() if now == float("inf") else now
        out = []
        for key, b in self._keys.items():
            if b.held and (now == float("inf") or b.tokens + (now - b.at) * self.rate >= 1):
                out.append(self._summary(key, b))
        u = self._untracked
        if u.held and (now == float("inf") or len(self._keys) < self.max_keys):
            rec = logging.LogRecord("secretbus", logging.WARNING, __file__, 0,
                                    "%d log records of other kinds were left out (too many at once, since %s)",
                                    (u.held, _hms(u.since)), None)
            setattr(rec, SUMMARY, True)
            out.append(rec)
            u.held = 0
        return out

    @staticmethod
    def _summary(key: Key, b: _Bucket) -> logging.LogRecord:
        """The line that says how many records of `key` were left out; `b` holds none after."""
        name, template, uid = key
        # The template only, never a record's arguments: they name callers and secrets.
        rec = logging.LogRecord(name, b.level, __file__, 0,
                                "%d records like \"%s\" were left out (too many at once, since %s)",
                                (b.held, template[:200], _hms(b.since)), None)
        if uid is not None:
            rec.CALLER_UID = uid
        setattr(rec, SUMMARY, True)
        b.held = 0
        return rec

    def _send(self, rec: logging.LogRecord) -> None:
        if self.emit is not None:
            self.emit(rec)


def _hms(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))

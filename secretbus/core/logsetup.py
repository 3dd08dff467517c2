"""Logging set-up: the journal with structured fields under systemd, else stderr.

Log records carry only UUIDs, usage ids, operations and file names, never values:
`extra={"SECRET_UUID": ..., "SECRET_OPERATION": ..., "CALLER_UID": ...}` become journal fields.
"""
from __future__ import annotations

import contextvars
import logging
import os
import sys
import time

from secretbus.core.logflood import FloodFilter

JOURNAL_FIELDS = ("SECRET_UUID", "SECRET_OPERATION", "CALLER_UID")

# The uid of the bus caller whose request is being served; the D-Bus layer sets it and
# every log record made on that request's behalf (driver, store) carries it.
caller_uid: contextvars.ContextVar[int | None] = contextvars.ContextVar("caller_uid", default=None)


class _CallerFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "CALLER_UID", None) is None:
            record.CALLER_UID = caller_uid.get()
        return True


class _JournalFieldsHandler(logging.Handler):
    """Sends each record to journald with our fields; silently drops when none listens."""

    def __init__(self, identifier: str):
        super().__init__()
        import systemd.journal as journal  # import only when the journal is wanted
        self._journal = journal
        self._identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {k: str(getattr(record, k)) for k in JOURNAL_FIELDS if getattr(record, k, None) not in (None, "")}
            self._journal.send(self.format(record), PRIORITY=_priority(record.levelno),
                               SYSLOG_IDENTIFIER=self._identifier, LOGGER=record.name, **fields)
        except Exception:
            self.handleError(record)


def _priority(level: int) -> int:
    if level >= logging.CRITICAL:
        return 2
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    if level >= logging.INFO:
        return 6
    return 7


class _FieldsFormatter(logging.Formatter):
    """The stderr format: our fields appended. The time text is made once per second (every
    write logs a line: logging's formatTime is a localtime and a strftime each time)."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None or self.datefmt is not None:
            return super().formatTime(record, datefmt)
        sec = int(record.created)
        cached = self._second
        if cached[0] != sec:
            cached = self._second = (sec, time.strftime(self.default_time_format, self.converter(sec)))
        msec = self.default_msec_format
        return msec % (cached[1], record.msecs) if msec else cached[1]

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = " ".join(f"{k}={getattr(record, k)}" for k in JOURNAL_FIELDS
                         if getattr(record, k, None) not in (None, ""))
        return f"{base} [{extra}]" if extra else base


def setup_daemon_logging(identifier: str = "secretbusd", verbose: bool = False) -> None:
    root = logging.getLogger("secretbus")
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # No format of ours shows them, and every record would look them up (every write logs one).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root.propagate = False
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM"):
        try:
            handler = _JournalFieldsHandler(identifier)
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_FieldsFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_CallerFilter())
    global _flood
    _flood = FloodFilter()      # after _CallerFilter: its buckets are per caller uid
    _flood.emit = handler.handle
    handler.addFilter(_flood)
    root.addHandler(handler)


_flood: FloodFilter | None = None


def flush_held() -> None:
    """Log how many records the flood filter held back that no summary has told of yet (at exit)."""
    if _flood is not None:
        _flood.flush()


def setup_cli_logging() -> None:
    root = logging.getLogger("secretbus")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("warning: %(message)s"))
        root.addHandler(h)
        root.setLevel(logging.WARNING)
        root.propagate = False

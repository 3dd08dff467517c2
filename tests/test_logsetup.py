"""The daemon's stderr log format: its once-per-second time text matches logging's own."""
from __future__ import annotations

import logging

from secretbus.core.logsetup import _FieldsFormatter

FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def record(created: float) -> logging.LogRecord:
    r = logging.LogRecord("secretbus.driver", logging.INFO, __file__, 1, "set value of secret %s", ("u",), None)
    r.created, r.msecs = created, (created - int(created)) * 1000
    r.SECRET_UUID = "u"
    return r


def test_time_text_is_logging_s_own_across_seconds():
    ours, std = _FieldsFormatter(FMT), logging.Formatter(FMT)
    for t in (1_796_000_000.0, 1_796_000_000.999, 1_796_000_001.5, 1_796_000_001.001, 1_796_000_000.25):
        r = record(t)
        assert ours.formatTime(r) == std.formatTime(r), t
        assert ours.format(r) == f"{std.format(record(t))} [SECRET_UUID=u]"


def test_an_explicit_date_format_is_honoured():
    r = record(1_796_000_000.5)
    assert _FieldsFormatter(FMT, datefmt="%H").formatTime(r) == logging.Formatter(FMT, datefmt="%H").formatTime(r)
    assert _FieldsFormatter(FMT).formatTime(r, "%Y") == logging.Formatter(FMT).formatTime(r, "%Y")

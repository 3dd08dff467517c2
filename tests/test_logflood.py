"""core/logflood.py: the daemon's log lines per (logger, template, caller uid) are held to a
token bucket, all together to another, and what is held back is told in a summary line."""
from __future__ import annotations

import logging

import pytest

from secretbus.core.logflood import FloodFilter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Rig:
    def __init__(self, **kw) -> None:
        self.clock = Clock()
        self.f = FloodFilter(clock=self.clock, **kw)
        self.out: list[logging.LogRecord] = []
        self.f.emit = self._handle

    def _handle(self, rec: logging.LogRecord) -> None:
        if self.f.filter(rec):
            self.out.append(rec)

    def log(self, msg: str = "set value of secret %s", *args, uid: int | None = 1000, name: str = "secretbus.driver",
            level: int = logging.INFO) -> bool:
        rec = logging.LogRecord(name, level, __file__, 1, msg, args or ("u-1",), None)
        if uid is not None:
            rec.CALLER_UID = uid
        self._handle(rec)
        return rec in self.out

    def texts(self) -> list[str]:
        return [r.getMessage() for r in self.out]


def test_a_key_passes_its_burst_then_its_rate_and_says_what_it_held_back():
    r = Rig(burst=5, rate=2.0)
    assert [r.log() for _ in range(8)] == [True] * 5 + [False] * 3
    r.clock.t += 0.4                     # 0.8 of a token: still held
    assert not r.log()
    r.clock.t += 0.1                     # one token
    assert r.log()
    summary, line = r.texts()[-2:]
    assert summary.startswith('4 records like "set value of secret %s" were left out (too many at once, since ')
    assert line == "set value of secret u-1"
    assert r.out[-2].levelno == logging.INFO and r.out[-2].CALLER_UID == 1000
    r.clock.t += 10
    assert [r.log() for _ in range(6)] == [True] * 5 + [False]      # refilled to the burst, not beyond


def test_the_summary_never_carries_a_records_arguments():
    r = Rig(burst=1, rate=1.0)
    r.log("set value of secret %s", "SECRET-ARG-1")
    r.log("set value of secret %s", "SECRET-ARG-2")
    r.clock.t += 1
    r.log("set value of secret %s", "SECRET-ARG-3")
    assert not any("SECRET-ARG-2" in t for t in r.texts())
    assert "SECRET-ARG-2" not in "".join(str(x.args) for x in r.out)


def test_callers_and_lines_are_held_apart():
    """A member's flood of writes does not hold back root's write lines, nor other lines."""
    r = Rig(burst=3, rate=1.0)
    for _ in range(10):
        r.log(uid=1000)
    assert r.log(uid=0)
    assert r.log("undefined secret %s", uid=1000)
    assert r.log("closing RPC client pid %d uid %d: %s", 1, 2, "x", uid=None, name="secretbus.rpc")


def test_all_keys_together_share_one_bucket():
    r = Rig(burst=100, rate=100.0, total_burst=10, total_rate=5.0)
    passed = [r.log(f"line {i} %s") for i in range(20)]
    assert passed == [True] * 10 + [False] * 10
    r.clock.t += 1                      # 5 tokens in all
    assert sum(r.log(f"line {i} %s") for i in range(10, 20)) == 5


def test_a_quiet_key_is_told_at_the_next_sweep_or_at_flush():
    r = Rig(burst=2, rate=1.0)
    for _ in range(5):
        r.log()
    r.clock.t += 11                      # past the sweep interval: any line that passes sweeps
    r.log("another line %s")
    assert any(t.startswith('3 records like "set value of secret %s"') for t in r.texts())
    for _ in range(4):
        r.log("third %s")
    n = len(r.out)
    r.f.flush()
    assert r.texts()[n:] and r.texts()[n].startswith('2 records like "third %s"')
    r.f.flush()
    assert len(r.out) == n + 1           # told once


def test_keys_are_bounded():
    r = Rig(burst=1, rate=0.001, max_keys=8)
    for i in range(8):
        r.log(f"line {i} %s")
        r.log(f"line {i} %s")           # each holds a count: not forgotten
    assert not r.log("line 9 %s")       # no room: counted with the untracked
    assert len(r.f._keys) == 8
    r.f.flush()
    assert any(t.startswith("1 log records of other kinds were left out") for t in r.texts())
    r2 = Rig(burst=1, rate=1000.0, max_keys=8)
    for i in range(50):                  # full buckets again by the next one: forgotten, room made
        r2.clock.t += 1.0                # (a scan for such keys runs at most once a second)
        assert r2.log(f"line {i} %s")
    assert len(r2.f._keys) <= 8


@pytest.mark.parametrize("level", [logging.DEBUG, logging.WARNING, logging.ERROR])
def test_every_level_is_held_and_its_summary_keeps_the_level(level):
    r = Rig(burst=1, rate=1.0)
    r.log("refusing %s", level=level)
    r.log("refusing %s", level=level)
    r.clock.t += 1
    r.log("refusing %s", level=level)
    assert [x.levelno for x in r.out] == [level] * 3


def test_the_daemons_handler_has_the_filter_after_the_caller_uid(monkeypatch, capsys):
    from secretbus.core import logsetup
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger("secretbus")
    saved = (root.handlers[:], root.level, root.propagate)
    try:
        logsetup.setup_daemon_logging()
        log = logging.getLogger("secretbus.rpc")
        for i in range(400):
            log.warning("closing RPC client pid %d uid %d: %s", i, 1000, "bad program")
        logsetup.flush_held()
        err = capsys.readouterr().err.splitlines()
        closing = [x for x in err if "closing RPC client pid" in x and "left out" not in x]
        assert 200 <= len(closing) <= 210, len(closing)   # the default burst, and 20 a second
        assert any(f'{400 - len(closing)} records like "closing RPC client pid %d uid %d: %s" were left out' in x
                   for x in err), err[-3:]
    finally:
        root.handlers[:], root.level, root.propagate = saved

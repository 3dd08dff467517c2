"""Cheap versions of the reliability benches as real tests (bench/reliability.py runs the big ones).

* crash trials: 4 × (load, kill -9, restart), every acknowledged write must survive;
* soak: 4 clients (2 root, 2 `sbtest-member` through setpriv) × 100 mixed calls on a private
  system bus with polkitd; no unexpected error, no dead client, no daemon error log line, no
  fd growth, RSS drift under 10 %;
* the aggregator's goal judging and its handling of missing / failing sections.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import types
from pathlib import Path

import pytest
from harness import load_bench

reliability = load_bench("reliability")


@pytest.mark.integration
def test_crash_trials_lose_no_acknowledged_write():
    crash_trials = load_bench("crash_trials")
    a = argparse.Namespace(trials=4, clients=4, secrets=24, encrypted=True, seed=20261122, keep=False)
    s = asyncio.run(crash_trials.run(a))
    assert s.trials == 4
    assert s.acked_ops > 0, "the clients made no acknowledged call before the kills"
    assert s.lost == 0 and s.half == 0, s.notes
    assert s.temp_left == 0
    assert s.orphans == 0          # no value file outlives its XML
    assert s.skipped == 0


@pytest.mark.integration
@pytest.mark.skipif(not Path("/usr/lib/polkit-1/polkitd").exists(), reason="polkitd not installed")
def test_soak_has_no_unexpected_error(test_users, unpriv_python):
    soak = load_bench("soak")
    r = soak.run(4, 100, root_share=0.5, seed=20261122)
    detail = f"unexpected {r.unexpected}; samples {r.samples}; log {r.log_errors}"
    assert r.uids == {0: 2, test_users.member.uid: 2}, r.uids
    assert sum(r.counts.values()) == 400, detail
    assert r.dead_clients == 0, detail
    assert r.unexpected_total == 0, detail
    assert r.log_errors == [], detail
    assert r.end["fds"] == r.warm["fds"]
    assert r.drift < 10, (r.warm, r.end)
    rows = {f: (v, g) for f, v, g in soak.rows(r)}
    assert all(reliability.judge(v, g) is not False for v, g in rows.values()), rows


@pytest.mark.parametrize("value, goal, verdict", [
    (0, "0", True), (2, "0", False), (8, "= 8", True), (7, "= 8", False),
    (0.4, "< 10", True), (10.0, "< 10", False), ("3.2 %", "< 10 %", True), (float("nan"), "< 10", False),
    ("1,200", ">= 1000", True), (5, "≤ 5", True), ("n/a", "0", False), ("whatever", "-", None),
    (123, "", None), ("yes", "yes", True), ("no", "yes", False),
])
def test_goal_judging(value, goal, verdict):
    assert reliability.judge(value, goal) is verdict


def test_sections_missing_or_failing(monkeypatch):
    rows, _ = reliability.run_section("sbtest_no_such_module", "x", False, "small")
    assert rows[0][1].startswith("not available") and rows[0][4] is None
    rows, _ = reliability.run_section("sbtest_no_such_module", "x", True, "small")
    assert rows[0][4] is False

    def boom(size):
        raise RuntimeError("broken")
    monkeypatch.setitem(sys.modules, "sbtest_broken", types.SimpleNamespace(figures=boom))
    rows, _ = reliability.run_section("sbtest_broken", "b", False, "small")
    assert rows[0][1] == "not available (RuntimeError: broken)" and rows[0][4] is False

    monkeypatch.setitem(sys.modules, "sbtest_fine", types.SimpleNamespace(
        figures=lambda size: [("fine: errors", 0, "0"), ("fine: rate", 5, "-"), ("fine: bad", 3, "0")]))
    rows, _ = reliability.run_section("sbtest_fine", "fine", False, "small")
    assert [(f, ok) for _, f, _, _, ok in rows] == [("errors", True), ("rate", None), ("bad", False)]

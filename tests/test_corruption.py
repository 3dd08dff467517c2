"""Store corruption, end to end: every kind of damage in one store, the real daemon (not root) over
D-Bus serves the healthy secrets, skips exactly the damaged ones with a log line naming the secret
and the damage, and deletes nothing but stale *.new temp files. The work is bench/corruption.py's
(the same code makes the figures; its docstring lists the kinds); here at the CI size, once logging
to stderr and once to an emulated journald (tests/harness/journal.py), plus a store with FIFOs.

tests/test_store.py and tests/test_encrypted_store.py cover the same damage in-process with the
embedded driver; these tests add the daemon, the bus, a non-root reader (mode 000 files), the
reload path and the journal fields.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from harness import load_bench as _bench

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


corruption = _bench("corruption")

EXPECTED_KINDS = {
    "truncated value", "empty value file", "flipped bit", "value files swapped", "not base64", "wrong key",
    "unreadable value file (mode 000)", "unreadable XML (mode 000)", "malformed XML",
    "UUID differs from file name", "duplicate usage", "two value files (.base64 + .aes256gcm)",
    "stale temp file (*.new)", "symlink instead of a value file", "directory instead of a value file",
}


def _check(r) -> None:
    assert set(r.kinds) == EXPECTED_KINDS
    bad = {k: r.kind_notes.get(k) for k, ok in r.kind_ok.items() if not ok}
    assert not bad, bad
    assert r.garbage_served == 0
    assert r.unexpected_skips == []
    assert r.skipped_seen == r.skipped_expected == r.damaged == 14
    assert r.healthy_served == r.healthy_total == 6
    assert r.reload_same
    assert (r.files_deleted, r.files_changed, r.files_added) == ([], [], [])
    assert r.stale_removed == r.stale_planted == 1      # the one deletion start-up may make
    assert r.log_has_values == 0
    assert "loaded 10 secrets, skipped 14" in r.log
    assert corruption.ok(r)


def test_damaged_store_served_by_non_root_daemon(test_users):
    r = corruption.run("small")
    _check(r)
    # Every figure meets its goal.
    for name, value, goal in corruption.rows(r):
        if goal.startswith("= "):
            assert str(value) == goal[2:], name
        elif goal in ("0", "yes"):
            assert str(value) == goal, name


def test_damaged_store_logged_to_the_journal_with_fields(test_users):
    r = corruption.run("small", journal=True)
    _check(r)
    skips = [e for e in r.journal_entries if b"skipping secret file" in e["MESSAGE"][0]]
    assert len(skips) == 2 * 14        # start-up and reload
    for e in skips:
        assert e["PRIORITY"] == [b"3"] and e["SECRET_OPERATION"] == [b"load"]
    # A value-file problem names the secret in SECRET_UUID too, so `journalctl SECRET_UUID=…` finds it.
    by_uuid = {e["SECRET_UUID"][0].decode() for e in skips if "SECRET_UUID" in e}
    value_damage = {x.uuid for x in r.expected if not x.served and any(".aes256gcm" in p for p in x.phrases)}
    assert value_damage <= by_uuid
    warn = [e for e in r.journal_entries if b"value files; using " in e["MESSAGE"][0]]
    assert warn and all(e["PRIORITY"] == [b"4"] and "SECRET_UUID" in e for e in warn)


def test_fifo_in_the_store_is_skipped_not_waited_on(test_users):
    r = corruption.fifo_run(timeout=5)
    assert r.started, r.detail
    assert r.healthy_served == r.healthy_total == 3
    assert r.fifos_skipped_with_line == r.fifos == 2

"""Spare files (store/commit.py): a file replaced by a write is written over as a later write's
temp file instead of a new inode, and never while another name still shows it; an undefine
renames its files to spares; an idle writer and start-up remove those left."""
from __future__ import annotations

import logging
import os

import pytest

from secretbus.store import commit, fsutil
from secretbus.store.commit import Plan, Replace, Unlink

U = "6c0a1b2e-0000-4000-8000-000000000001"


@pytest.fixture
def d(tmp_path, monkeypatch):
    monkeypatch.setattr(commit, "_dirs", fsutil.DirCache())
    path = tmp_path / "secrets"
    path.mkdir(mode=0o700)
    yield path
    commit._dirs.clear()


def write(d, name, data):
    err = commit.commit_batch([Plan([Replace(d, name, data)])]).errors[0]
    if err is not None:
        raise err


def spares(d):
    return sorted(n for n in os.listdir(d) if fsutil.is_spare_name(n))


def ino(d, name):
    return os.lstat(d / name).st_ino


def test_a_replaced_file_is_the_temp_file_of_a_later_write(d):
    write(d, "a", b"first a, a longer content")
    first = ino(d, "a")
    write(d, "a", b"second a")                 # the first a's inode: now a spare
    assert [ino(d, n) for n in spares(d)] == [first]
    write(d, "b", b"b")                        # written over the spare, renamed to b
    assert ino(d, "b") == first
    assert (d / "b").read_bytes() == b"b"      # truncated to its new length
    assert (d / "a").read_bytes() == b"second a"
    assert spares(d) == []
    for n in os.listdir(d):
        st = os.lstat(d / n)
        assert st.st_nlink == 1 and st.st_mode & 0o777 == 0o600, n
    assert not [n for n in os.listdir(d) if n.endswith(".new")]


def test_a_spare_with_a_second_name_is_never_written_over(d):
    write(d, "a", b"old a")
    write(d, "a", b"new a")
    [spare] = spares(d)
    os.link(d / spare, d / "other")            # the same file under another name now
    write(d, "b", b"b")
    assert (d / "other").read_bytes() == b"old a"
    assert spares(d) == [] and ino(d, "b") != ino(d, "other")


def test_a_failed_rename_leaves_the_file_and_no_spare(d, monkeypatch):
    write(d, "a", b"old a")
    real = os.rename

    def fail(*a, **kw):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "rename", fail)
    with pytest.raises(Exception, match="cannot write"):
        write(d, "a", b"new a")
    monkeypatch.setattr(os, "rename", real)
    assert os.listdir(d) == ["a"]
    assert (d / "a").read_bytes() == b"old a" and os.lstat(d / "a").st_nlink == 1
    write(d, "b", b"b")                        # nothing pooled by the failed write
    assert ino(d, "b") != ino(d, "a")


def test_an_undefine_turns_its_files_into_spares_until_the_writer_is_idle(d):
    name = f"{U}.base64"
    write(d, name, b"value one")
    write(d, name, b"value two")               # a spare holds value one
    live = ino(d, name)
    assert commit.commit_batch([Plan([Unlink(d, name)])]).errors == [None]
    assert not (d / name).exists()
    # Renamed, not unlinked: no inode freed; both are spares, under names that are not the secret's.
    assert live in {ino(d, n) for n in spares(d)} and len(spares(d)) == 2
    assert [n for n in spares(d) if n.startswith("removed.")]
    kept = {ino(d, n) for n in spares(d)}
    write(d, "other.xml", b"x")                # a later write takes one of them
    assert ino(d, "other.xml") in kept
    assert len(spares(d)) == 1
    commit.drop_idle_spares()
    left = {n: (d / n).read_bytes() for n in os.listdir(d)}
    assert left == {"other.xml": b"x"}         # no earlier value stays once the writes are over


def test_an_undefine_of_no_file_makes_no_spare_and_no_directory_change(d):
    res = commit.commit_batch([Plan([Unlink(d, f"{U}.base64")])])
    assert res.errors == [None] and res.dir_syncs == 0
    assert os.listdir(d) == []


def test_a_removed_file_with_a_second_name_is_never_written_over(d):
    write(d, "a", b"old a")
    os.link(d / "a", d / "other")             # the same file under another name
    assert commit.commit_batch([Plan([Unlink(d, "a")])]).errors == [None]
    write(d, "b", b"b")
    assert (d / "other").read_bytes() == b"old a" and ino(d, "b") != ino(d, "other")


def test_at_most_max_spares_are_kept(d, monkeypatch):
    monkeypatch.setattr(commit, "MAX_SPARES", 2)
    for i in range(5):
        write(d, f"f{i}", b"1")
    res = commit.commit_batch([Plan([Replace(d, f"f{i}", b"2")]) for i in range(5)])   # 5 replaced at once
    assert res.errors == [None] * 5
    assert len(spares(d)) == 2
    assert sorted(n for n in os.listdir(d) if not fsutil.is_spare_name(n)) == [f"f{i}" for i in range(5)]


def test_start_up_removes_spares_quietly_and_only_spares(tmp_path, caplog):
    import secretbus
    cfg = tmp_path / "etc" / "secrets"
    with secretbus.open(f"secret:///embed?root={tmp_path}") as c:
        s = c.define_xml(f"<secret><uuid>{U}</uuid></secret>")
        s.set_value(b"one")
        s.set_value(b"two")
        assert spares(cfg)
    (cfg / "notes.spare").write_text("not a spare of ours")
    with caplog.at_level(logging.INFO, logger="secretbus"):
        with secretbus.open(f"secret:///embed?root={tmp_path}") as c:
            assert c.lookup_by_uuid(U).get_value() == b"two"
    assert spares(cfg) == []
    assert sorted(os.listdir(cfg)) == sorted([f"{U}.base64", f"{U}.xml", "notes.spare"])
    assert "incomplete write" not in caplog.text


def test_spares_stay_in_use_when_their_directory_is_walked_anew(d, monkeypatch):
    # A held directory is walked anew every WALK_AGE s: the same directory keeps its spares
    # (taken by the next write, not left on disk nor unlinked on the request's path).
    for k in range(3):
        write(d, "a.base64", b"v%d" % k)
    assert spares(d)
    monkeypatch.setattr(fsutil.DirCache, "WALK_AGE", -1.0)     # every use walks anew
    for k in range(5):
        before = {ino(d, n) for n in spares(d)}
        write(d, "a.base64", b"w%d" % k)
        assert ino(d, "a.base64") in before
        assert len(spares(d)) <= 2
    assert (d / "a.base64").read_bytes() == b"w4"


def test_spares_go_when_their_directory_is_replaced(d, monkeypatch):
    for k in range(3):
        write(d, "a.base64", b"v%d" % k)
    assert spares(d)
    old = d.parent / "old"
    d.rename(old)
    d.mkdir(mode=0o700)
    write(d, "b.base64", b"b")                 # the new directory: walked, the old one dropped
    assert not [n for n in os.listdir(old) if fsutil.is_spare_name(n)]
    assert os.listdir(d) == ["b.base64"]


def test_an_idle_drop_stops_for_a_waiting_write_and_goes_on_later(d):
    for i in range(200):
        write(d, f"f{i}", b"1")
    assert commit.commit_batch([Plan([Unlink(d, f"f{i}")]) for i in range(200)]).errors == [None] * 200
    assert len(spares(d)) == 200
    assert commit.drop_idle_spares(lambda: True) is False
    assert len(spares(d)) == 200 - fsutil.DirCache.SWEEP_CHUNK
    assert commit.drop_idle_spares(lambda: False) is True
    assert spares(d) == []


def test_spares_go_when_the_writer_is_idle(d):
    for k in range(3):
        write(d, "a.base64", b"v%d" % k)
        write(d, "b.base64", b"v%d" % k)
    assert spares(d)
    commit.drop_idle_spares()
    assert spares(d) == []
    assert (d / "a.base64").read_bytes() == b"v2" and (d / "b.base64").read_bytes() == b"v2"
    write(d, "a.base64", b"after")          # a fresh spare works as before
    assert (d / "a.base64").read_bytes() == b"after"


def test_the_writer_empties_the_spares_then_drops_them_once_no_write_comes(tmp_path, monkeypatch):
    import time

    import secretbus
    from secretbus.driver import writer

    monkeypatch.setattr(writer, "SPARE_IDLE", 0.2)
    monkeypatch.setattr(writer, "EMPTY_IDLE", 0.8)
    c = secretbus.open(f"secret:///embed?root={tmp_path / 'inst'}")
    try:
        d = c.driver
        d.define_xml(f"<secret ephemeral='no' private='no'><uuid>{U}</uuid></secret>")
        for k in range(4):
            d.set_value(U, b"value-%d" % k)
        store = tmp_path / "inst" / "etc" / "secrets"
        assert spares(store), "the test needs spares to exist while writes come"

        def wait_for(cond):
            deadline = time.monotonic() + 5
            while not cond() and time.monotonic() < deadline:
                time.sleep(0.02)
            return cond()
        # First no earlier content is left in any spare, then no spare at all.
        assert wait_for(lambda: all((store / n).stat().st_size == 0 for n in spares(store)))
        assert wait_for(lambda: spares(store) == [])
        assert d.get_value(U, internal_call=True) == b"value-3"
    finally:
        c.close()


def test_an_idle_writer_keeps_empty_spares_for_the_next_writes(d, monkeypatch):
    monkeypatch.setattr(commit, "KEEP_EMPTY", 3)
    for i in range(5):
        write(d, f"f{i}", b"a value")
    assert commit.commit_batch([Plan([Unlink(d, f"f{i}")]) for i in range(5)]).errors == [None] * 5
    assert commit.empty_idle_spares() is True
    kept = spares(d)
    assert len(kept) == 3 and all((d / n).stat().st_size == 0 for n in kept)
    inodes = {ino(d, n) for n in kept}
    write(d, "g", b"new")                      # no inode allocated: an empty spare is written
    assert ino(d, "g") in inodes and (d / "g").read_bytes() == b"new"
    os.link(d / spares(d)[0], d / "linked")    # a spare with a second name is never emptied
    (d / "linked").write_bytes(b"other")
    commit.empty_idle_spares()
    assert (d / "linked").read_bytes() == b"other" and len(spares(d)) == 1


def test_a_spare_that_cannot_be_removed_at_start_up_is_logged_as_a_spare(tmp_path, caplog, monkeypatch):
    import secretbus
    from secretbus.store import filestore
    cfg = tmp_path / "etc" / "secrets"
    with secretbus.open(f"secret:///embed?root={tmp_path}") as c:
        c.define_xml(f"<secret><uuid>{U}</uuid></secret>").set_value(b"one")
    (cfg / f"{U}.base64.0123456789ab.spare").write_bytes(b"x")

    def fail(fd, name):
        raise OSError(1, "Operation not permitted")
    monkeypatch.setattr(filestore, "unlink_at", fail)
    with caplog.at_level(logging.WARNING, logger="secretbus"):
        with secretbus.open(f"secret:///embed?root={tmp_path}") as c:
            assert c.lookup_by_uuid(U).get_value() == b"one"
    assert "cannot remove spare file" in caplog.text and "incomplete write" not in caplog.text


def test_an_idle_sweep_goes_gently_and_gives_way_to_a_write(tmp_path, monkeypatch):
    import time

    import secretbus
    from secretbus.driver import writer

    monkeypatch.setattr(writer, "SPARE_IDLE", 0.1)
    monkeypatch.setattr(writer, "SWEEP_PAUSE", 0.5)     # 20 chunks of 64: ~10 s for a whole sweep
    c = secretbus.open(f"secret:///embed?root={tmp_path / 'inst'}")
    try:
        d = c.driver
        uuids = [f"6c0a1b2e-0000-4000-8000-{i:012x}" for i in range(640)]
        for u in uuids:
            d.define_xml(f"<secret ephemeral='no' private='no'><uuid>{u}</uuid></secret>")
            d.set_value(u, b"v")
        for u in uuids:
            d.undefine(u)
        store = tmp_path / "inst" / "etc" / "secrets"
        assert len(spares(store)) >= 1000
        time.sleep(0.8)                        # the emptying sweep has begun, and pauses
        sizes = [(store / n).stat().st_size for n in spares(store)]
        assert 0 in sizes and any(sizes), "the sweep should be under way, not done"
        t = time.monotonic()
        d.define_xml(f"<secret ephemeral='no' private='no'><uuid>{U}</uuid></secret>")
        assert time.monotonic() - t < 0.4      # not behind the rest of the sweep
    finally:
        c.close()


def test_only_small_files_become_spares(d):
    big = b"x" * (commit.SPARE_MAX_SIZE + 1)
    write(d, "big", big)
    write(d, "big", b"small now")              # the big file replaced: freed, not kept
    assert spares(d) == []
    write(d, "big2", big)
    assert commit.commit_batch([Plan([Unlink(d, "big2")])]).errors == [None]
    assert os.listdir(d) == ["big"]            # the big file removed: unlinked, not kept
    write(d, "small", b"s")
    assert commit.commit_batch([Plan([Unlink(d, "small")])]).errors == [None]
    assert len(spares(d)) == 1


def test_a_batch_without_spares_keeps_no_replaced_or_removed_file(d):
    """keep_spares=False (the fleet cache: no idle writer empties its spares): what a write
    replaces and what an undefine removes goes, and an earlier content stays under no name."""
    write(d, "a", b"old a")
    write(d, "b", b"old b")
    plans = [Plan([Replace(d, "a", b"new a")]), Plan([Unlink(d, "b")])]
    assert commit.commit_batch(plans, keep_spares=False).errors == [None, None]
    assert sorted(os.listdir(d)) == ["a"] and (d / "a").read_bytes() == b"new a"
    assert os.lstat(d / "a").st_nlink == 1
    # the same batch with spares kept leaves both earlier contents as spares
    write(d, "b", b"old b")
    assert commit.commit_batch([Plan([Replace(d, "a", b"newer a")]), Plan([Unlink(d, "b")])]).errors == [None, None]
    assert len(spares(d)) == 2

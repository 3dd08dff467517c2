"""The store's held directory fds (fsutil.DirCache, used by store/commit.py's batches): kept open
between batches, yet a replaced directory is followed, a symlink swap gets every check of
open_dir, and a directory that became unsafe is refused."""
from __future__ import annotations

import os

import pytest
from fixtures import store_files

from secretbus.core import errors
from secretbus.store import commit, fsutil
from secretbus.store.commit import Plan, Replace, Unlink


@pytest.fixture
def walks(monkeypatch):
    """A fresh cache for the batches; counts the path walks (open_dir calls) it makes."""
    monkeypatch.setattr(commit, "_dirs", fsutil.DirCache())
    count = [0]
    real = fsutil.open_dir

    def counting(path, **kw):
        count[0] += 1
        return real(path, **kw)
    monkeypatch.setattr(fsutil, "open_dir", counting)
    yield count
    commit._dirs.clear()


def store_dir(tmp_path):
    d = tmp_path / "top" / "secrets"
    d.mkdir(parents=True, mode=0o700)
    return d


def fds_on(key):
    """This process's fds open on the inode `key` (st_dev, st_ino)."""
    found = []
    for n in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(n))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == key:
            found.append(int(n))
    return found


def write(d, name, data=b"v"):
    return commit.commit_batch([Plan([Replace(d, name, data)])]).errors[0]


def test_one_walk_for_many_batches(tmp_path, walks):
    d = store_dir(tmp_path)
    for i in range(5):
        assert write(d, f"f{i}") is None
    assert commit.commit_batch([Plan([Unlink(d, "f0")])]).errors == [None]
    assert walks[0] == 1
    assert store_files(d) == ["f1", "f2", "f3", "f4"]


def test_a_replaced_directory_is_followed_and_the_old_fd_closed(tmp_path, walks):
    d = store_dir(tmp_path)
    assert write(d, "a") is None
    held = commit._dirs.acquire(d)
    old = held.key
    commit._dirs.release(held)
    assert fds_on(old) == [held.fd]
    os.rename(d, tmp_path / "top" / "old")
    d.mkdir(mode=0o700)                        # the administrator's new directory
    assert write(d, "b") is None
    assert os.listdir(d) == ["b"]
    assert os.listdir(tmp_path / "top" / "old") == ["a"]
    assert walks[0] == 2
    assert fds_on(old) == []                   # the fd of the old directory was closed


def test_a_symlink_swapped_in_gets_every_check(tmp_path, walks):
    d = store_dir(tmp_path)
    assert write(d, "a") is None
    open_to_all = tmp_path / "elsewhere"
    open_to_all.mkdir(mode=0o700)
    open_to_all.chmod(0o777)                   # anyone could plant or swap files here
    os.rename(d, tmp_path / "top" / "old")
    os.symlink(open_to_all, d)
    err = write(d, "b")
    assert isinstance(err, errors.SystemError)
    assert "cannot use config directory" in err.message and "lets group or others write" in err.message
    assert os.listdir(open_to_all) == []
    assert os.listdir(tmp_path / "top" / "old") == ["a"]
    # A symlink to a safe directory is the administrator's: served, as open_dir serves it.
    open_to_all.chmod(0o700)
    assert write(d, "c") is None
    assert os.listdir(open_to_all) == ["c"]


def test_a_symlink_swapped_in_above_the_directory_is_noticed(tmp_path, walks):
    d = store_dir(tmp_path)
    assert write(d, "a") is None
    other = tmp_path / "other"
    (other / "secrets").mkdir(parents=True, mode=0o700)
    other.chmod(0o777)                         # above the leaf, writable by others: unsafe
    os.rename(tmp_path / "top", tmp_path / "top.old")
    os.symlink(other, tmp_path / "top")
    err = write(d, "b")
    assert isinstance(err, errors.SystemError) and "refusing directory" in err.message
    assert os.listdir(other / "secrets") == []


def test_the_directory_made_writable_by_others_is_refused_at_the_next_batch(tmp_path, walks):
    d = store_dir(tmp_path)
    assert write(d, "a") is None
    d.chmod(0o770)
    err = write(d, "b")
    assert isinstance(err, errors.SystemError) and "mode 0770" in err.message
    assert os.listdir(d) == ["a"]
    d.chmod(0o700)
    assert write(d, "b") is None


def test_a_directory_above_made_unsafe_is_refused_once_walked_again(tmp_path, walks, monkeypatch):
    d = store_dir(tmp_path)
    assert write(d, "a") is None
    (tmp_path / "top").chmod(0o777)
    monkeypatch.setattr(commit._dirs, "WALK_AGE", 0.0)    # the walk is due (1 s in service)
    err = write(d, "b")
    assert isinstance(err, errors.SystemError) and "mode 0777" in err.message
    assert os.listdir(d) == ["a"]


def test_a_removed_directory_fails_the_batch(tmp_path, walks):
    d = store_dir(tmp_path)
    assert write(d, "a") is None
    os.unlink(d / "a")
    os.rmdir(d)
    err = write(d, "b")
    assert isinstance(err, errors.SystemError) and "No such file or directory" in err.message


def test_a_held_fd_stays_open_while_a_batch_uses_it(tmp_path, walks):
    """Stage 1 and stage 2 of the writer share a held fd: dropping it (a replaced directory)
    closes it only once the batch that uses it is done."""
    d = store_dir(tmp_path)
    b = commit.prepare_batch([Plan([Replace(d, "a", b"v")])])   # holds the fd
    old = b.dirs[d].key
    os.rename(d, tmp_path / "top" / "old")
    d.mkdir(mode=0o700)
    assert write(d, "b") is None                                  # re-walked meanwhile
    assert len(fds_on(old)) == 1                                  # still open
    assert commit.finish_batches([b]) == 1 and b.errors == [None]
    assert os.listdir(tmp_path / "top" / "old") == ["a"]          # where it was prepared
    assert fds_on(old) == []


def test_at_most_size_directories_are_held(tmp_path, monkeypatch):
    cache = fsutil.DirCache(size=2)
    monkeypatch.setattr(commit, "_dirs", cache)
    dirs = []
    for i in range(4):
        d = tmp_path / f"d{i}"
        d.mkdir(mode=0o700)
        dirs.append(d)
        assert write(d, "f") is None
    assert list(cache._held) == dirs[2:]
    cache.clear()
    assert cache._held == {}

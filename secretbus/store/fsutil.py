"""Durable file operations: private directories, atomic writes, fsync of directories."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

TMP_SUFFIX = ".new"  # libvirt's temp suffix; start-up removes stale ones


def ensure_private_dir(path: Path) -> None:
    """Create `path` and its parents with mode 0700 (existing directories are left alone)."""
    old = os.umask(0o077)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    finally:
        os.umask(old)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Replace `path` with `data`: temp 0600 file, write, fsync, rename, fsync the directory.

    A crash at any instant leaves either the old or the new content at `path`.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def unlink_if_exists(path: Path) -> bool:
    """Unlink; True if something was removed. ENOENT is not an error."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_limited(path: Path | str, limit: int, *, dir_fd: int | None = None) -> bytes:
    """Read a whole regular file, refusing more than `limit` bytes and symlinks.
    With `dir_fd`, `path` is a name in that directory (no path walk: start-up reads thousands)."""
    # O_NONBLOCK: a FIFO planted in the store must not hang start-up waiting for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        size = st.st_size
        if size > limit:
            raise OSError(errno.EFBIG, f"file larger than {limit} bytes", str(path))
        # One read for the usual file; the loop only runs if the file grew meanwhile.
        chunks = [os.read(fd, size + 1)]
        total = len(chunks[0])
        while total > size:
            b = os.read(fd, 65536)
            if not b:
                break
            total += len(b)
            if total > limit:
                raise OSError(errno.EFBIG, f"file larger than {limit} bytes", str(path))
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)

"""Durable, hostile-directory-safe file operations.

Every directory the store, the lock or the key lives in is opened by walking its path
from "/" with O_NOFOLLOW, and checked with fstat: the directory itself must belong to
the effective uid and be writable by nobody else; the directories above it must belong
to root or the euid and not be writable by others (unless sticky, like /tmp). Files are
then opened relative to that fd, so nobody else can swap a name underneath us, and
every open for writing is O_NOFOLLOW, temp files O_CREAT|O_EXCL.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".new"  # libvirt's temp suffix; start-up removes stale ones
# A file replaced by a write, kept to be written again as a later write's temp file
# (store/commit.py, "spare files"); start-up removes those left behind, like temp files.
SPARE_SUFFIX = ".spare"
_SPARE_NAME = re.compile(r"[^/]+\.[0-9a-f]{12}" + re.escape(SPARE_SUFFIX))


def is_spare_name(name: str) -> bool:
    """Whether `name` is a spare file's (NAME.<12 hex digits>.spare)."""
    return _SPARE_NAME.fullmatch(name) is not None

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeDirectory(OSError):
    """A directory another user controls (or could replace): refused, fail closed."""

    def __init__(self, path: Path | str, why: str):
        super().__init__(errno.EPERM, f"refusing directory '{path}': {why}", str(path))


def _check_dir(fd: int, path: Path, leaf: bool, euid: int, read_only: bool = False) -> None:
    _check_stat(os.fstat(fd), path, leaf, euid, read_only)


def _check_stat(st: os.stat_result, path: Path, leaf: bool, euid: int, read_only: bool = False) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if leaf:
        # Reading (secret.conf, the key) from root's directory is safe for anyone; a
        # directory we write to must be our own.
        if st.st_uid != euid and not (read_only and st.st_uid == 0):
            raise UnsafeDirectory(path, f"owned by uid {st.st_uid}, not by uid {euid} (ours)")
        if mode & 0o022:
            raise UnsafeDirectory(path, f"mode {mode:04o} lets group or others write to it")
        return
    # Above the leaf: whoever can rename an entry here could swap the leaf for their own.
    if st.st_uid not in (0, euid):
        raise UnsafeDirectory(path, f"owned by uid {st.st_uid}, neither root nor uid {euid} (ours)")
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise UnsafeDirectory(path, f"mode {mode:04o} lets group or others write to it")


def open_dir(path: Path | str, *, create: bool = False, read_only: bool = False) -> int:
    """An fd of directory `path`, verified as above; `create` makes missing components
    with mode 0700; `read_only` (for files we only read) also accepts a leaf owned by
    root. Raises FileNotFoundError, UnsafeDirectory or another OSError."""
    euid = os.geteuid()
    # Symlinks in the configured path are the administrator's; resolve them once, then
    # walk the result without following any, so a swap after this point fails.
    real = Path(os.path.realpath(path))
    fd = os.open("/", _DIR_FLAGS)
    try:
        here = Path("/")
        names = real.parts[1:]
        if not names:
            _check_dir(fd, here, True, euid, read_only)
        for i, name in enumerate(names):
            here = here / name
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise UnsafeDirectory(here, "is a symlink") from None
                raise
            os.close(fd)
            fd = child
            _check_dir(fd, here, i == len(names) - 1, euid, read_only)
        return fd
    except BaseException:
        os.close(fd)
        raise


class HeldDir:
    """A verified directory fd held by a DirCache; `key` is its (st_dev, st_ino)."""

    __slots__ = ("path", "fd", "key", "walked", "users", "retired", "spares")

    def __init__(self, path: Path, fd: int, key: tuple[int, int]) -> None:
        self.path, self.fd, self.key = path, fd, key
        self.walked = time.monotonic()
        self.users = 0
        self.retired = False
        # Names of the spare files in this directory (store/commit.py); a deque: stage 1 takes
        # from it while stage 2 adds to it, and popleft/append need no lock.
        self.spares: deque[str] = deque()


class DirCache:
    """Verified directory fds kept open from one use to the next (the store's write batches).

    open_dir walks the path from "/" (an lstat, then open, fstat and close per component):
    ~25 syscalls before a batch's first write, per write when they come one at a time. Its
    checks keep our writes out of a directory someone else controls. A held fd cannot be
    redirected: what is written relative to it lands in the directory that was checked,
    whatever happens to the path afterwards. What can change, and how each use catches it:

    - the path: the directory (or a component above it) replaced, by a new directory or a
      symlink. Each use stats the path (following symlinks, the administrator's, as open_dir's
      realpath does) and compares (st_dev, st_ino) with the held fd's; on a mismatch the fd is
      dropped and the path walked anew with every check, so the directory now there is served
      only if it passes them, and writes follow an administrator who replaced the directory.
      (An inode number cannot be reused meanwhile: the held fd keeps the old inode alive.)
    - the directory itself (owner, mode): that stat is of the same inode, so the leaf check
      of open_dir runs on it at every use.
    - the directories above it (made writable by others later): walked anew at least every
      WALK_AGE seconds, so a path that became unsafe is refused as open_dir refuses it.

    A dropped fd is closed once the batches using it are done (stage 1 and stage 2 of the
    writer share one). At most `size` directories are held (tests make many stores)."""

    WALK_AGE = 1.0

    def __init__(self, size: int = 8) -> None:
        self._lock = threading.Lock()
        self._held: dict[Path, HeldDir] = {}      # least recently used first
        self._size = size

    def acquire(self, path: Path) -> HeldDir:
        """The verified directory at `path` (open_dir's errors); release() it after use."""
        with self._lock:
            h = self._held.pop(path, None)
            old = None
            if h is not None and not self._current(h):
                old, h = h, None
            if h is None:
                try:
                    fd = open_dir(path)
                    try:
                        st = os.fstat(fd)
                    except BaseException:
                        os.close(fd)
                        raise
                except BaseException:
                    if old is not None:
                        self._retire(old)
                    raise
                h = HeldDir(path, fd, (st.st_dev, st.st_ino))
                if old is not None:
                    if old.key == h.key:
                        # The same directory walked anew (WALK_AGE): its spares are still
                        # ours and in it, so they stay in use instead of being unlinked.
                        h.spares, old.spares = old.spares, deque()
                    self._retire(old)
            self._held[path] = h
            while len(self._held) > self._size:
                self._retire(self._held.pop(next(iter(self._held))))
            h.users += 1
            return h

    def release(self, h: HeldDir) -> None:
        with self._lock:
            h.users -= 1
            if h.retired and h.users == 0:
                _close_held(h)

    def clear(self) -> None:
        """Drop every held fd (closed once unused)."""
        with self._lock:
            held, self._held = self._held, {}
            for h in held.values():
                self._retire(h)

    def close_inherited(self) -> None:
        """In a forked child: close the copies of the parent's fds (no thread of the parent's
        is here to use them; the lock may have been held by one, so it is not taken)."""
        for h in self._held.values():
            os.close(h.fd)
        self._held = {}

    def _current(self, h: HeldDir) -> bool:
        if time.monotonic() - h.walked > self.WALK_AGE:
            return False
        try:
            st = os.stat(h.path)
            if (st.st_dev, st.st_ino) != h.key:
                return False
            _check_stat(st, h.path, True, os.geteuid())
        except OSError:
            return False      # gone or unsafe: the walk says why (or serves what is there now)
        return True

    SWEEP_CHUNK = 64

    def sweep_spares(self, keep: Callable[[HeldDir, str, int], bool],
                     stop: Callable[[], bool] | None = None) -> bool:
        """Pass each held directory's spare files to keep(h, name, kept so far in h): a spare it
        returns False for is unlinked. For the idle writer (store/commit.py); thousands may be
        kept, so `stop` is asked every SWEEP_CHUNK spares, and when it says a write is waiting
        the rest waits for the next idle moment. True when every spare was passed."""
        with self._lock:
            todo = [(h, len(h.spares)) for h in self._held.values()]
        for h, left in todo:
            kept = 0
            while left > 0:
                with self._lock:
                    if h.retired:
                        break            # its spares went with it
                    for _ in range(min(left, self.SWEEP_CHUNK)):
                        left -= 1
                        try:
                            name = h.spares.popleft()
                        except IndexError:
                            left = 0
                            break
                        if keep(h, name, kept):
                            h.spares.append(name)
                            kept += 1
                        else:
                            unlink_quiet(h.fd, name)
                if left > 0 and stop is not None and stop():
                    return False
        return True

    def _retire(self, h: HeldDir) -> None:
        h.retired = True
        if h.users == 0:
            _close_held(h)


def _unlink_spares(h: HeldDir) -> None:
    while True:
        try:
            name = h.spares.popleft()
        except IndexError:
            return
        unlink_quiet(h.fd, name)


def _close_held(h: HeldDir) -> None:
    # Its spares are known only to this HeldDir: removed with it, or they would stay on disk
    # (each holding an earlier content) until the next start-up.
    _unlink_spares(h)
    os.close(h.fd)


@contextmanager
def verified_dir(path: Path | str, *, create: bool = False) -> Iterator[int]:
    fd = open_dir(path, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def ensure_private_dir(path: Path) -> None:
    """Create `path` and missing parents with mode 0700, and verify it (see open_dir)."""
    os.close(open_dir(path, create=True))


def fsync_dir(path: Path) -> None:
    with verified_dir(path) as fd:
        os.fsync(fd)


def write_new(dir_fd: int, name: str, data: bytes) -> None:
    """Create `name` (0600, O_EXCL: never an existing file or a symlink's target) and
    write and fsync `data`. On failure the file is removed."""
    fd = os.open(name, NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o600)     # whatever the umask
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quiet(dir_fd, name)
        raise
    os.close(fd)


def atomic_write_at(dir_fd: int, name: str, data: bytes, *, sync_dir: bool = True) -> None:
    """Replace `name` in the directory `dir_fd` with `data`: a temp file of random name,
    write, fsync, rename, fsync the directory. A crash at any instant leaves either the
    old or the new content at `name`."""
    tmp = f"{name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    write_new(dir_fd, tmp, data)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        unlink_quiet(dir_fd, tmp)
        raise
    if sync_dir:
        os.fsync(dir_fd)


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """atomic_write_at in the verified parent directory of `path`."""
    with verified_dir(path.parent) as fd:
        atomic_write_at(fd, path.name, data, sync_dir=sync_dir)


def unlink_at(dir_fd: int, name: str) -> bool:
    """Unlink; True if something was removed. ENOENT is not an error."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def unlink_if_exists(path: Path) -> bool:
    with verified_dir(path.parent) as fd:
        return unlink_at(fd, path.name)


def unlink_quiet(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def read_limited(path: Path | str, limit: int, *, dir_fd: int | None = None) -> bytes:
    """Read a whole regular file, refusing more than `limit` bytes and symlinks.
    With `dir_fd`, `path` is a name in that directory (no path walk: start-up reads thousands)."""
    return read_limited_stat(path, limit, dir_fd=dir_fd)[0]


def read_limited_stat(path: Path | str, limit: int, *, dir_fd: int | None = None) -> tuple[bytes, os.stat_result]:
    """read_limited, and the stat of the file it read (its fstat: no second lookup by name, and
    the mtime of the very inode read, not of whatever the name points to a moment later)."""
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
        return b"".join(chunks), st
    finally:
        os.close(fd)

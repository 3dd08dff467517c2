"""Write plans and the batch commit: the file changes of many operations made durable together.

A `Plan` is the ordered file changes of one operation (`Replace`: new content under a name;
`Unlink`), built by the store (filestore.plan_*) without touching the disk. `commit_batch`
carries out the plans of one batch with the fewest syncs that keep every guarantee
(docs/security.md §3c says why each is there):

1. every new file of every plan is created under a random temp name (0600, O_EXCL) and written;
2. their data is made durable, all of them at once (`sync_data`): before a name points to a file,
   its content must be on disk, or a crash could leave the name pointing to an empty file;
3. each plan's renames and unlinks, in that plan's order;
4. ONE fsync per directory changed, for the whole batch: only then is any plan durable, and only
   then may its caller be answered.

A plan that fails reports its own error and leaves none of its temp files behind; the other
plans of the batch are unaffected, except that a failed directory fsync fails every plan that
changed that directory.
Nothing here logs or raises a file's content: only names and strerror.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from secretbus.core import errors
from secretbus.store.fsutil import (
    NEW_FILE_FLAGS,
    SPARE_SUFFIX,
    TMP_SUFFIX,
    DirCache,
    HeldDir,
    unlink_at,
    unlink_quiet,
)

log = logging.getLogger("secretbus.store")


@dataclass
class Replace:
    """Replace `name` in `dir` with `data` (temp file, sync, rename)."""

    dir: Path
    name: str
    data: bytes = field(repr=False)


@dataclass
class Unlink:
    """Remove `name` in `dir`. `strict`: a failure fails the plan (a value file that must not
    outlive its secret); otherwise it is logged (a stale file that loses at load anyway)."""

    dir: Path
    name: str
    strict: bool = True


Step = Replace | Unlink


class Plan:
    """The ordered file changes of one operation; `undo` is committed alone if the plan fails
    after some of its steps were done (a new secret's value written, its XML not). `done` are
    called once the plan is durable (the store learns which files exist), in the committing
    thread, before the operation is applied or answered."""

    def __init__(self, steps: list[Step] | None = None, undo: Plan | None = None,
                 done: list[Callable[[], None]] | None = None) -> None:
        self.steps: list[Step] = list(steps or [])
        self.undo = undo
        self.done: list[Callable[[], None]] = list(done or [])

    def __bool__(self) -> bool:
        return bool(self.steps)

    def add(self, other: Plan) -> Plan:
        """Append `other`'s steps (and its `done`); returns self."""
        self.steps.extend(other.steps)
        self.done.extend(other.done)
        return self


# -- making new files' data durable ------------------------------------------------------------
# fdatasync of each new file, at most SYNC_THREADS at once: ext4 (and xfs) fold fsyncs that
# overlap into one journal commit, so a batch of 16 costs about what 4 serial ones do
# (bench_syscalls.py). syncfs(2) of the whole file system would be one call, but it also writes
# back every other dirty file on that file system (a VM image being written: seconds), so a
# secret write would wait for unrelated I/O; it is not used (docs/security.md §3c).
SYNC_THREADS = 4
_pool: ThreadPoolExecutor | None = None
# The store directories of the batches, verified and held open between them (fsutil.DirCache).
_dirs = DirCache()


def _after_fork_in_child() -> None:
    # Per process: a forked child (the crash tests fork) has none of its parent's threads, so
    # a pool inherited from the parent would never run what it is given, and a lock held by
    # one of them at the fork would never be released. (Reset here rather than a getpid()
    # per batch.) The inherited directory fds are the child's own copies: closed.
    global _pool, _dirs
    _pool = None
    old, _dirs = _dirs, DirCache()
    old.close_inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _sync_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=SYNC_THREADS - 1, thread_name_prefix="secretbus-sync")
    return _pool


def sync_data(fds: list[int]) -> list[OSError | None]:
    """fdatasync every fd: the caller's thread takes its share, the pool the rest (no thread
    hop for a lone file). Returns each fd's error or None."""
    def one(fd: int) -> OSError | None:
        try:
            os.fdatasync(fd)
        except OSError as e:
            return e
        return None
    if len(fds) <= 1:
        return [one(fd) for fd in fds]
    # Interleaved shares: fd i goes to worker i % SYNC_THREADS; share 0 is this thread's.
    shares = [fds[k::SYNC_THREADS] for k in range(SYNC_THREADS)]
    def share(s: list[int]) -> list[OSError | None]:
        return [one(fd) for fd in s]
    futures = [_sync_pool().submit(share, s) for s in shares[1:] if s]
    mine = [one(fd) for fd in shares[0]]
    results: dict[int, OSError | None] = dict(zip(shares[0], mine, strict=True))
    for s, f in zip((s for s in shares[1:] if s), futures, strict=True):
        results.update(zip(s, f.result(), strict=True))
    return [results[fd] for fd in fds]


# -- one batch ---------------------------------------------------------------------------------
class Batch:
    """The plans of one batch on their way: verified directory fds, temp files, per-plan errors
    (`errors[i]` None once plan i is durable)."""

    def __init__(self, plans: list[Plan], keep_spares: bool = True) -> None:
        self.plans = plans
        self.keep_spares = keep_spares     # False: replaced and removed files go (no new spares)
        self.errors: list[BaseException | None] = [None] * len(plans)
        self.dirs: dict[Path, HeldDir] = {}
        self.temps: list[dict[int, str]] = [{} for _ in plans]     # step index -> temp name
        self.spares: list[list[tuple[HeldDir, str]]] = [[] for _ in plans]   # made by apply(i)
        self.changed: list[set[Path]] = [set() for _ in plans]

    def held(self, d: Path) -> HeldDir:
        h = self.dirs.get(d)
        if h is None:
            try:
                h = _dirs.acquire(d)
            except OSError as e:
                raise errors.SystemError(f"cannot use config directory '{d}': {e.strerror}") from None
            self.dirs[d] = h
        return h

    def fail(self, i: int, e: BaseException) -> None:
        if self.errors[i] is None:
            self.errors[i] = e
        self.discard(i)

    def discard(self, i: int) -> None:
        """Remove plan i's temp files not yet renamed."""
        steps = self.plans[i].steps
        for k, tmp in self.temps[i].items():
            h = self.dirs.get(steps[k].dir)
            if h is not None:
                unlink_quiet(h.fd, tmp)
        self.temps[i].clear()

    def write_temps(self) -> list[tuple[int, int]]:
        """Step 1 for every plan; returns (plan index, open fd) of each file written."""
        files: list[tuple[int, int]] = []
        for i, p in enumerate(self.plans):
            mine: list[int] = []
            try:
                for k, s in enumerate(p.steps):
                    h = self.held(s.dir)
                    if isinstance(s, Replace):
                        reused = _write_spare(h, s, self.temps[i], k)
                        if reused is not None:
                            mine.append(reused)
                            continue
                        tmp = f"{s.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
                        self.temps[i][k] = tmp
                        mine.append(_write_temp(h.fd, tmp, s))
            except Exception as e:  # noqa: BLE001 - that plan's error; the others go on
                for fd in mine:
                    os.close(fd)
                self.fail(i, e)
                continue
            files += [(i, fd) for fd in mine]
        return files

    def sync_temps(self, files: list[tuple[int, int]]) -> None:
        """Step 2: make every temp file's data durable, then close them."""
        try:
            results = sync_data([fd for _, fd in files])
        finally:
            for _, fd in files:
                os.close(fd)
        for (i, _), err in zip(files, results, strict=True):
            if err is not None:
                self.fail(i, errors.SystemError(f"cannot sync a new file: {err.strerror}"))

    def apply(self, i: int) -> None:
        """Step 3 for plan i: its renames and unlinks, in order; stops at the first failure."""
        for k, s in enumerate(self.plans[i].steps):
            h = self.held(s.dir)
            fd = h.fd
            if isinstance(s, Replace):
                spare = _keep_replaced(h, s.name) if self.keep_spares else None
                try:
                    os.rename(self.temps[i][k], s.name, src_dir_fd=fd, dst_dir_fd=fd)
                except OSError as e:
                    if spare is not None:
                        unlink_quiet(fd, spare)     # a second name of the file still live: never a spare
                    raise errors.SystemError(f"cannot write '{s.dir / s.name}': {e.strerror}") from None
                if spare is not None:
                    self.spares[i].append((h, spare))
                del self.temps[i][k]
                self.changed[i].add(s.dir)
                continue
            if s.strict and self.keep_spares:
                moved = _keep_removed(h, s.name)
                if moved is not None:
                    if moved:
                        self.spares[i].append((h, moved))
                        self.changed[i].add(s.dir)
                    continue
            try:
                if unlink_at(fd, s.name):
                    self.changed[i].add(s.dir)
            except OSError as e:
                if s.strict:
                    raise errors.SystemError(f"cannot unlink '{s.dir / s.name}': {e.strerror}") from None
                # A stale file of another scheme: the current scheme's file wins at load.
                log.warning("cannot remove stale value file %s: %s", s.name, e.strerror)

    def close(self) -> None:
        for i in range(len(self.plans)):
            self.discard(i)
        for h in self.dirs.values():
            _dirs.release(h)
        self.dirs.clear()


# -- spare files -------------------------------------------------------------------------------
# Every write used to create its temp file, a new inode, and its rename freed the inode of the
# file it replaced. Creating an inode is most of a write's CPU on ext4 without a journal (this
# VM's, bench/README "Writes: spare files"): the allocator skips the inodes freed in the last
# 5 s (300 s while their inode table block is dirty), one by one, so its cost grows with the
# write rate. Instead, just before a rename replaces a file, the file is given a second name
# (link(2), NAME.<random>.spare), and once the batch's directory fsync has made the
# rename durable that spare is the temp file of a later write: written over in place, synced,
# renamed. An undefine renames its secret's files to spare names (removed.<random>.spare)
# instead of unlinking them: the same durable change of the directory, about half the cost of
# an unlink, which frees the inode and discards its blocks on the request's path. Every
# guarantee stays: the temp file (spare or new) is written and fdatasync'd before its rename; a
# spare is used only when it has one link (its old name was renamed over or away durably; never
# a file still live under another name); a crash may leave spares, which start-up (and a
# reload's load) removes with the temp files. What a spare holds meanwhile is the previous
# content of a file of this store (an undefined secret's too), 0600 in our own directory, as
# the freed blocks of an unlinked file would: at most MAX_SPARES are kept per directory, they are
# emptied when the writer has been idle SPARE_IDLE s and removed after EMPTY_IDLE s (below), or
# when their directory is replaced (fsutil); so an earlier content stays on disk under a name
# only while writes keep coming.
MAX_SPARES = 4096     # per directory: a burst of undefines of a few thousand secrets frees nothing
# Only files of at most one block become spares (a secret's XML or value nearly always is): a
# burst of writes of 64 KiB values keeps then at most MAX_SPARES * 4 KiB = 16 MiB on disk.
SPARE_MAX_SIZE = 4096


def _spare_size(h: HeldDir, name: str) -> bool | None:
    """None if there is no file at `name`; whether it may become a spare (small enough)."""
    try:
        return os.stat(name, dir_fd=h.fd, follow_symlinks=False).st_size <= SPARE_MAX_SIZE
    except FileNotFoundError:
        return None
    except OSError:
        return False


def _keep_replaced(h: HeldDir, name: str) -> str | None:
    """Give the file at `name`, about to be renamed over, a spare name; None if there is none
    (a new file: ENOENT), it is large, or enough spares are kept (then the rename frees it, as
    before)."""
    if len(h.spares) >= MAX_SPARES or not _spare_size(h, name):
        return None
    spare = f"{name}.{secrets.token_hex(6)}{SPARE_SUFFIX}"
    try:
        os.link(name, spare, src_dir_fd=h.fd, dst_dir_fd=h.fd, follow_symlinks=False)
    except OSError:
        return None
    return spare


def _keep_removed(h: HeldDir, name: str) -> str | None:
    """A file removed for good (an undefine) renamed to a spare name instead of unlinked: its
    inode is not freed, and rename(2) costs here about half an unlink (which frees the inode
    and discards its blocks: bench/README). Returns the spare name; "" if there was no file;
    None to unlink it as before (enough spares are kept, a large file, or the rename failed:
    the unlink says why)."""
    if len(h.spares) >= MAX_SPARES:
        return None
    small = _spare_size(h, name)
    if small is None:
        return ""
    if not small:
        return None
    spare = f"removed.{secrets.token_hex(6)}{SPARE_SUFFIX}"
    try:
        os.rename(name, spare, src_dir_fd=h.fd, dst_dir_fd=h.fd)
    except FileNotFoundError:
        return ""
    except OSError:
        return None
    return spare


def _open_spare(h: HeldDir, name: str) -> tuple[int, os.stat_result] | None:
    """Spare `name` opened for writing, with its stat; None if it is gone (a reload's load
    removes spares) or not a regular file of ours with one link: written, that would change
    what another name shows, so only this name goes."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=h.fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
        os.close(fd)
        unlink_quiet(h.fd, name)
        return None
    return fd, st


def _write_spare(h: HeldDir, s: Replace, temps: dict[int, str], k: int) -> int | None:
    """Write `s` into a spare of `h`, registered as temp k; its open fd, or None (no spare)."""
    while True:
        try:
            tmp = h.spares.popleft()
        except IndexError:
            return None
        opened = _open_spare(h, tmp)
        if opened is None:
            continue
        fd, st = opened
        temps[k] = tmp               # from here on a failure removes it like a new temp file
        try:
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.fchmod(fd, 0o600)
            view, off = memoryview(s.data), 0
            while off < len(view):
                off += os.pwrite(fd, view[off:], off)
            if st.st_size > off:         # a longer earlier content: cut; pwrite set the size otherwise
                os.ftruncate(fd, off)
        except OSError as e:
            os.close(fd)
            raise errors.SystemError(f"cannot write '{s.dir / s.name}': {e.strerror}") from None
        return fd


# The idle writer, in two steps (driver/writer.py): after SPARE_IDLE s without a write every
# spare is emptied (truncated: the earlier content goes) and up to KEEP_EMPTY per directory stay,
# empty, for the next burst's writes; after EMPTY_IDLE s all are removed. Keeping the inodes is
# the point on ext4 without a journal: a file removed now is skipped by every inode allocation
# of its group for the next 5 to 305 s (see above), and an empty spare needs no allocation.
SPARE_IDLE = 1.0
EMPTY_IDLE = 60.0
KEEP_EMPTY = 1024


def empty_idle_spares(stop: Callable[[], bool] | None = None) -> bool:
    """Empty every spare file, keep up to KEEP_EMPTY per directory, remove the rest. `stop`:
    a write is waiting (the rest waits for the next idle moment); True when all were done."""
    return _dirs.sweep_spares(lambda h, name, kept: kept < KEEP_EMPTY and _emptied(h, name), stop)


def drop_idle_spares(stop: Callable[[], bool] | None = None) -> bool:
    """Remove every spare file now; True when all are gone (`stop` as above)."""
    return _dirs.sweep_spares(lambda h, name, kept: False, stop)


def _emptied(h: HeldDir, name: str) -> bool:
    """Truncate spare `name` to nothing; False if it cannot be (_open_spare)."""
    opened = _open_spare(h, name)
    if opened is None:
        return False
    fd, st = opened
    try:
        if st.st_size:
            os.ftruncate(fd, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _write_temp(dir_fd: int, tmp: str, s: Replace) -> int:
    """Create and write a temp file (not synced yet); returns its open fd."""
    try:
        fd = os.open(tmp, NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
    except OSError as e:
        raise errors.SystemError(f"cannot write '{s.dir / s.name}': {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)     # whatever the umask
        view = memoryview(s.data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        os.close(fd)
        raise errors.SystemError(f"cannot write '{s.dir / s.name}': {e.strerror}") from None
    return fd


def prepare_batch(plans: list[Plan], keep_spares: bool = True) -> Batch:
    """Steps 1 and 2 for `plans`: every new file written under its temp name and durable.
    `keep_spares`: whether the batch may keep the files it replaces or removes as spares
    (only a writer that sweeps them when idle may: driver/writer.py)."""
    b = Batch(plans, keep_spares)
    try:
        b.sync_temps(b.write_temps())
    except BaseException:
        b.close()
        raise
    return b


def finish_batches(batches: list[Batch]) -> int:
    """Steps 3 and 4 for prepared batches, together: each plan's renames and unlinks, then one
    fsync per directory changed by any of them (by inode: the same directory opened by two
    batches is synced once). Closes the batches, undoes failed plans; returns the fsyncs made."""
    done: dict[tuple[int, int], BaseException | None] = {}
    try:
        for b in batches:
            for i in range(len(b.plans)):
                if b.errors[i] is None:
                    try:
                        b.apply(i)
                    except Exception as e:  # noqa: BLE001 - reported to that plan's caller
                        b.fail(i, e)
        for b in batches:
            for i in range(len(b.plans)):
                for d in b.changed[i]:
                    h = b.dirs[d]
                    key = h.key
                    if key not in done:
                        try:
                            os.fsync(h.fd)
                            done[key] = None
                        except OSError as e:
                            done[key] = errors.SystemError(f"cannot sync '{d}': {e.strerror}")
                    err = done[key]
                    if err is not None and b.errors[i] is None:
                        b.errors[i] = err
        for b in batches:
            for i, err in enumerate(b.errors):
                for h, spare in b.spares[i]:
                    if err is None and len(h.spares) < MAX_SPARES:
                        h.spares.append(spare)       # its old name's change is durable now
                    else:
                        unlink_quiet(h.fd, spare)
                b.spares[i].clear()
    finally:
        for b in batches:
            for i in range(len(b.plans)):
                for h, spare in b.spares[i]:
                    unlink_quiet(h.fd, spare)
            b.close()
    for b in batches:
        for p, err in zip(b.plans, b.errors, strict=True):
            if err is None:
                for fn in p.done:
                    fn()
            elif p.undo:
                undone = commit_batch([p.undo], b.keep_spares).errors[0]
                if undone is not None:
                    log.error("cannot undo a failed write: %s", undone)
    return len(done)


@dataclass
class BatchResult:
    errors: list[BaseException | None]    # per plan: None when it is durable
    dir_syncs: int


def commit_batch(plans: list[Plan], keep_spares: bool = True) -> BatchResult:
    """Carry out `plans` as one group (steps 1-4 above); `keep_spares` as in prepare_batch."""
    b = prepare_batch(plans, keep_spares)
    syncs = finish_batches([b])
    return BatchResult(b.errors, syncs)


def commit_now(plan: Plan) -> None:
    """Commit one plan alone; raise its error."""
    if plan:
        err = commit_batch([plan]).errors[0]
        if err is not None:
            raise err

#!/usr/bin/env python3
"""What the store's durability syscalls cost here: the figures group commit is designed from.

    .venv/bin/python bench/bench_syscalls.py [--n 200] [--dir DIR ...]

For each directory (default: $TMPDIR and /work), the median and p90 in microseconds of:
create + write of a 100-byte file; fsync / fdatasync of that new file; rename over an existing
name; fsync of the directory after one rename; and the batch shapes the store can use for
16 writes: 16 files synced one after the other, 16 files synced by 16 threads at once (the
file system may fold concurrent syncs into one journal commit), each followed by 16 renames
and one directory fsync. Prints a markdown table; per-write cost is the batch time / 16.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA = b"x" * 100
_LIBC = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """syncfs(2) (Python has no binding): every dirty inode of fd's file system, one journal commit."""
    if _LIBC.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
BATCH = 16
_POOLS = {k: ThreadPoolExecutor(max_workers=k) for k in (4, BATCH)}
FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _new(dfd: int, name: str) -> int:
    fd = os.open(name, FLAGS, 0o600, dir_fd=dfd)
    os.write(fd, DATA)
    return fd


def _sync_files(dfd: int, names: list[str], sync: Callable[[int], None] | None, threads: int) -> None:
    """Create and write every file, then make the data durable: `sync` each file (in `threads`
    threads at once when > 1), or with `sync` None one syncfs of the whole file system."""
    fds = [_new(dfd, n) for n in names]
    try:
        if threads < 0:
            # start the writeback of every file first (the file system allocates all their blocks
            # in one go), then fdatasync each: the first sync's journal commit covers them all
            for fd in fds:
                _LIBC.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), 2)  # SYNC_FILE_RANGE_WRITE
            for fd in fds:
                os.fdatasync(fd)
        elif sync is None:
            syncfs(dfd)
        elif threads <= 1:
            for fd in fds:
                sync(fd)
        else:
            # Pools started beforehand, as the service's I/O threads are: start-up is not timed.
            list(_POOLS[threads].map(sync, fds))
    finally:
        for fd in fds:
            os.close(fd)


def measure(d: Path, n: int) -> list[tuple[str, float, float]]:
    work = Path(tempfile.mkdtemp(prefix="sb-syscalls-", dir=d))
    dfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    rows: dict[str, list[float]] = {}

    def timed(label: str, fn: Callable[[], None], per: int = 1) -> None:
        t = time.perf_counter()
        fn()
        rows.setdefault(label, []).append((time.perf_counter() - t) * 1e6 / per)

    try:
        for i in range(n):
            fd = -1

            def create(i: int = i) -> None:
                nonlocal fd
                fd = _new(dfd, f"c{i}")
            timed("create + write 100 B", create)
            timed("fsync, new file", lambda fd=fd: os.fsync(fd))
            os.close(fd)
            fd2 = _new(dfd, f"d{i}")
            timed("fdatasync, new file", lambda fd2=fd2: os.fdatasync(fd2))
            os.close(fd2)
            timed("rename over existing", lambda i=i: os.rename(f"d{i}", f"c{i}", src_dir_fd=dfd, dst_dir_fd=dfd))
            timed("fsync dir after 1 rename", lambda: os.fsync(dfd))
            timed("syncfs after 1 new file", lambda: syncfs(dfd))
            timed("unlink", lambda i=i: os.unlink(f"c{i}", dir_fd=dfd))
            timed("fsync dir after 1 unlink", lambda: os.fsync(dfd))
        # An undefine's two files (XML and value), and the write after it: the store renames
        # them to spare names and writes into those emptied spares (store/commit.py) instead of
        # unlinking them and creating new files.
        for i in range(n):
            for pfx in ("u", "r"):
                for suffix in ("xml", "base64"):
                    fd = _new(dfd, f"{pfx}{i}.{suffix}")
                    os.fsync(fd)
                    os.close(fd)
            os.fsync(dfd)

            def unlink2(i: int = i) -> None:
                for suffix in ("xml", "base64"):
                    os.unlink(f"u{i}.{suffix}", dir_fd=dfd)
                os.fsync(dfd)

            def rename2(i: int = i) -> None:
                for suffix in ("xml", "base64"):
                    os.rename(f"r{i}.{suffix}", f"s{i}.{suffix}.spare", src_dir_fd=dfd, dst_dir_fd=dfd)
                os.fsync(dfd)
            timed("undefine: 2 unlinks + dir fsync", unlink2)
            timed("undefine: 2 renames to spare names + dir fsync", rename2)
            fd = os.open(f"s{i}.xml.spare", os.O_WRONLY, dir_fd=dfd)
            os.ftruncate(fd, 0)           # as the idle writer empties it
            os.fsync(fd)
            os.close(fd)

            def new_write(i: int = i) -> None:
                fd = _new(dfd, f"n{i}.tmp")
                os.fdatasync(fd)
                os.close(fd)
                os.rename(f"n{i}.tmp", f"n{i}", src_dir_fd=dfd, dst_dir_fd=dfd)
                os.fsync(dfd)

            def spare_write(i: int = i) -> None:
                fd = os.open(f"s{i}.xml.spare", os.O_WRONLY | os.O_NOFOLLOW, dir_fd=dfd)
                os.pwrite(fd, DATA, 0)
                os.fdatasync(fd)
                os.close(fd)
                os.rename(f"s{i}.xml.spare", f"w{i}", src_dir_fd=dfd, dst_dir_fd=dfd)
                os.fsync(dfd)
            timed("new file + fdatasync + rename + dir fsync", new_write)
            timed("empty spare + pwrite + fdatasync + rename + dir fsync", spare_write)
        for i in range(max(10, n // 8)):
            shapes: tuple[tuple[str, Callable[[int], None] | None, int], ...] = (
                ("16 x fsync file, serial", os.fsync, 1),
                ("16 x fdatasync file, serial", os.fdatasync, 1),
                ("16 x fdatasync file, 4 threads", os.fdatasync, 4),
                ("16 x fdatasync file, 16 threads", os.fdatasync, 16),
                ("16 files, 1 syncfs", None, 1),
                ("16 x sync_file_range(WRITE), then 16 x fdatasync, serial", os.fdatasync, -1))
            for label, sync, par in shapes:
                names = [f"b{i}-{k}" for k in range(BATCH)]

                def batch(names: list[str] = names, sync: Callable[[int], None] | None = sync,
                          par: int = par) -> None:
                    _sync_files(dfd, names, sync, par)
                    for k, nm in enumerate(names):
                        os.rename(nm, f"t{k}", src_dir_fd=dfd, dst_dir_fd=dfd)
                    os.fsync(dfd)
                timed(f"{label} + 16 renames + 1 dir fsync, per write", batch, per=BATCH)
    finally:
        os.close(dfd)
        shutil.rmtree(work, ignore_errors=True)
    out = []
    for label, xs in rows.items():
        xs.sort()
        out.append((label, statistics.median(xs), xs[int(len(xs) * 0.9)]))
    return out


def fstype(d: Path) -> str:
    best = ("?", "")
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, typ = line.split()[:3]
            if str(d.resolve()).startswith(mnt) and len(mnt) >= len(best[1]):
                best = (typ, mnt)
    return best[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--dir", action="append", type=Path)
    a = ap.parse_args()
    dirs = a.dir or [Path(tempfile.gettempdir()), Path("/work")]
    load = os.getloadavg()
    print(f"# bench_syscalls: n={a.n}, load average {load[0]:.2f} at start")
    print("| dir (fs) | operation | median µs | p90 µs |\n|---|---|---|---|")
    for d in dirs:
        for label, med, p90 in measure(d, a.n):
            print(f"| {d} ({fstype(d)}) | {label} | {med:,.0f} | {p90:,.0f} |")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A stand-in for journald: the native-protocol socket that libsystemd's sd_journal_send() writes to.

libsystemd sends each entry as one datagram to the fixed path /run/systemd/journal/socket
(no environment variable can move it). An entry is a list of fields, each either
`NAME=value\\n` or, when the value holds a newline, `NAME\\n` + little-endian u64 length + value
+ `\\n`. An entry too large for one datagram is written to a sealed memfd whose descriptor is
passed with SCM_RIGHTS in an otherwise empty datagram. `JournalSocket` binds that path (when
nothing is there: it never replaces a real journald's socket), receives and parses every
entry in a background thread, and removes the socket (and /run/systemd/journal, if it made it)
when closed. `stream_env(path)` is what systemd sets for a service whose stderr goes to the
journal: JOURNAL_STREAM=<dev>:<ino> of that stream, which makes secretbus's logsetup choose the
journal handler.

Only one JournalSocket can exist at the fixed path on a machine at a time; a lock file serialises
test processes. One at another path (a daemon pointed at it with SECRETBUS_JOURNAL_SOCKET) needs no
lock. `Journald` is the real thing: systemd-journald in a private mount namespace whose sockets and
journal files are in a test directory, read back with `journalctl --directory`.
"""
from __future__ import annotations

import array
import fcntl
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path

from .procs import HarnessError, public_tempdir, remove_tree, spawn, stop_process, wait_until

SOCKET_PATH = Path("/run/systemd/journal/socket")
LOCK_FILE = "/run/lock/secretbus-test-journal.lock"
MAX_FDS = 16


def parse_entry(data: bytes) -> dict[str, list[bytes]]:
    """Fields of one native-protocol entry (a field may repeat, hence lists)."""
    entries = parse_entries(data)
    if len(entries) != 1:
        raise ValueError(f"{len(entries)} entries where one was expected")
    return entries[0]


def parse_entries(data: bytes) -> list[dict[str, list[bytes]]]:
    """The entries of one datagram: journald's parser takes an empty line between two fields as
    the end of an entry (journald-native.c), so a sender may put several in one."""
    entries: list[dict[str, list[bytes]]] = []
    fields: dict[str, list[bytes]] = {}
    pos, n = 0, len(data)
    while pos < n:
        nl = data.find(b"\n", pos)
        if nl < 0:
            raise ValueError(f"entry ends without newline at {pos}")
        if nl == pos:                    # an empty line: the entry ends
            entries.append(fields)
            fields, pos = {}, pos + 1
            continue
        eq = data.find(b"=", pos, nl)
        if eq >= 0:                      # NAME=value\n
            name, value, pos = data[pos:eq], data[eq + 1:nl], nl + 1
        else:                            # NAME\n <u64 le size> value \n
            name = data[pos:nl]
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 9
            value = data[start:start + size]
            if len(value) != size or data[start + size:start + size + 1] != b"\n":
                raise ValueError(f"binary field {name!r} truncated")
            pos = start + size + 1
        fields.setdefault(name.decode("ascii", "replace"), []).append(value)
    if fields:
        entries.append(fields)
    return entries


def _read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, off = [], 0
    while off < size:
        b = os.pread(fd, size - off, off)
        if not b:
            break
        chunks.append(b)
        off += len(b)
    return b"".join(chunks)


class JournalSocket:
    """Receives what processes send to journald while it is open.

    `.raw` holds every entry's bytes as received (memfd contents included), `.entries` the
    parsed fields. `.memfd_entries` counts entries that arrived as a passed descriptor.
    """

    def __init__(self, path: Path = SOCKET_PATH, *, wait_free: float = 30):
        self.path = Path(path)
        self.wait_free = wait_free
        self.raw: list[bytes] = []
        self.entries: list[dict[str, list[bytes]]] = []
        self.memfd_entries = 0
        self.errors: list[str] = []
        self._made_dir = False
        self._lock = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._mutex = threading.Lock()

    # -- life cycle --------------------------------------------------------------------
    def _take_lock(self) -> None:
        os.makedirs(os.path.dirname(LOCK_FILE), exist_ok=True)
        self._lock = open(LOCK_FILE, "a")
        deadline = time.monotonic() + self.wait_free
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock.close()
                    self._lock = None
                    raise HarnessError(f"another test holds {LOCK_FILE}") from None
                time.sleep(0.1)

    def start(self) -> JournalSocket:
        if self.path == SOCKET_PATH:
            self._take_lock()
        try:
            if self.path.exists() or self.path.is_symlink():
                raise HarnessError(f"{self.path} exists (a real journald?); not replacing it")
            if not self.path.parent.is_dir():
                self.path.parent.mkdir(mode=0o755, parents=True)
                self._made_dir = True
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
            self._sock.bind(str(self.path))
            os.chmod(self.path, 0o666)      # daemons of any uid may log, as with journald
            self._sock.settimeout(0.1)
            self._thread = threading.Thread(target=self._run, name="journal-socket", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._sock is not None:
            self._drain()
            self._sock.close()
            self._sock = None
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self._made_dir:
            try:
                self.path.parent.rmdir()
            except OSError:
                pass
            self._made_dir = False
        if self._lock is not None:
            self._lock.close()      # releases the flock
            self._lock = None

    def __enter__(self) -> JournalSocket:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- receiving ---------------------------------------------------------------------
    def _receive_one(self) -> bool:
        fds = array.array("i")
        try:
            # The datagram's real size (MSG_TRUNC makes recv report it), then the datagram.
            size = self._sock.recv_into(bytearray(1), 1, socket.MSG_PEEK | socket.MSG_TRUNC)
            data, anc, flags, _ = self._sock.recvmsg(
                max(size, 1), socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
        except (TimeoutError, BlockingIOError):
            return False
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if flags & socket.MSG_CTRUNC:
            self.errors.append("control data truncated")
        if flags & socket.MSG_TRUNC:
            self.errors.append("datagram truncated")
        blobs = []
        if data:
            blobs.append(data)
        for fd in fds:
            try:
                blobs.append(_read_fd(fd))
                with self._mutex:
                    self.memfd_entries += 1
            finally:
                os.close(fd)
        for blob in blobs:
            with self._mutex:
                self.raw.append(blob)
                try:
                    self.entries.extend(parse_entries(blob))
                except (ValueError, struct.error) as e:
                    self.errors.append(f"unparsable entry: {e}")
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._receive_one()
            except OSError as e:
                if self._stop.is_set():
                    return
                self.errors.append(f"receive failed: {e}")
                time.sleep(0.05)

    def _drain(self) -> None:
        self._sock.settimeout(0.0)
        while self._receive_one():
            pass

    # -- reading -----------------------------------------------------------------------
    def snapshot(self) -> list[dict[str, list[bytes]]]:
        with self._mutex:
            return list(self.entries)

    def messages(self) -> list[str]:
        return [e["MESSAGE"][0].decode("utf-8", "replace") for e in self.snapshot() if "MESSAGE" in e]

    def wait_for(self, predicate, timeout: float = 10) -> dict[str, list[bytes]]:
        """The first entry (so far or arriving within `timeout`) for which predicate(fields) holds."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.snapshot():
                if predicate(e):
                    return e
            if time.monotonic() > deadline:
                raise HarnessError(f"no matching journal entry within {timeout} s; "
                                   f"got {self.messages()[-10:]}")
            time.sleep(0.02)

    def wait_for_message(self, text: str, timeout: float = 10) -> dict[str, list[bytes]]:
        return self.wait_for(lambda e: any(text.encode() in m for m in e.get("MESSAGE", ())), timeout)


JOURNALD = "/lib/systemd/systemd-journald"

# In its own mount namespace: /run and /var/log become empty tmpfs mounts (nothing of the
# host's is touched or seen), then its socket dir and its volatile journal dir are bound to
# test directories. Storage=auto with no /var/log/journal keeps the journal in /run/log/journal.
_NAMESPACE_SCRIPT = (
    'set -e; mount -t tmpfs -o mode=0755 sbtest-run /run; mount -t tmpfs sbtest-log /var/log; '
    'mkdir -p /run/systemd/journal /run/log/journal; '
    'mount --bind "$1" /run/systemd/journal; mount --bind "$2" /run/log/journal; exec "$3"')


class Journald:
    """The real systemd-journald, private to a test: `.socket` is its native-protocol socket
    (point a daemon at it with SECRETBUS_JOURNAL_SOCKET), `.files` its journal directory
    (`journalctl --directory`). Started as root; stopped by PID."""

    def __init__(self, base: Path | None = None):
        self._own_base = base is None
        self.base = base or public_tempdir("sb-journald-")
        self.sockets = self.base / "run"
        self.files = self.base / "files"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return os.access(JOURNALD, os.X_OK) and bool(shutil.which("journalctl")) and bool(shutil.which("unshare"))

    @property
    def socket(self) -> Path:
        return self.sockets / "socket"

    def start(self, timeout: float = 15) -> Journald:
        self.sockets.mkdir(mode=0o755, exist_ok=True)
        self.files.mkdir(mode=0o755, exist_ok=True)
        log = self.base / "journald.log"
        for stale in self.sockets.iterdir():     # of a journald stopped before: wait for the new ones
            if stale.is_socket():
                stale.unlink()
        self.proc = spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c", _NAMESPACE_SCRIPT,
                           "sh", str(self.sockets), str(self.files), JOURNALD], what="systemd-journald", log=log)
        wait_until(self._listening, timeout=timeout, what="systemd-journald socket", proc=self.proc, log=log)
        return self

    def _listening(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.connect(str(self.socket))
                return True
            except OSError:
                return False

    def stop(self) -> None:
        stop_process(self.proc)

    def cleanup(self) -> None:
        self.stop()
        if self._own_base:
            remove_tree(self.base)

    def __enter__(self) -> Journald:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def read(self, *matches: str) -> list[dict[str, object]]:
        """Entries matching `matches` (journalctl's FIELD=value terms), as journalctl -o json gives them."""
        r = subprocess.run(["journalctl", "--no-pager", "--directory", str(self.files), "-o", "json", *matches],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise HarnessError(f"journalctl failed ({r.returncode}): {r.stderr.strip()}")
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def wait_for(self, *matches: str, count: int = 1, timeout: float = 10) -> list[dict[str, object]]:
        """At least `count` entries matching, polled (journald writes them asynchronously)."""
        return wait_until(lambda: (lambda got: got if len(got) >= count else None)(self.read(*matches)),
                          timeout=timeout, interval=0.1, what=f"{count} journal entries {matches}")


def stream_env(stream_path: str | Path) -> dict[str, str]:
    """JOURNAL_STREAM as systemd sets it for a service whose stderr is `stream_path`."""
    st = os.stat(stream_path)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}

"""The CLI's standard output: written straight to fd 1, so that a full disk or a closed pipe
is one error the CLI reports itself, not a traceback from Python's own stdout at shutdown.

`print` is vsh's vshPrint (always shown), `extra` its vshPrintExtra (hidden by --quiet).
"""
from __future__ import annotations

import errno
import os
import threading

_FLUSH_AT = 64 * 1024


class OutputLost(Exception):
    """Writing to stdout failed; what was not written is lost."""

    def __init__(self, err: OSError):
        super().__init__(err.strerror or str(err))
        self.strerror = err.strerror or str(err)


class Output:
    def __init__(self, fd: int = 1, quiet: bool = False):
        self.fd = fd
        self.quiet = quiet
        self.lost: OutputLost | None = None
        self.lost_reported = False      # a command already said what failed
        self._buf = bytearray()
        self._lock = threading.Lock()    # event handlers print from the client's thread

    def write(self, data: bytes | str) -> None:
        """Buffer `data`; raises OutputLost on the first failed write, drops it afterwards."""
        with self._lock:
            if self.lost is not None:
                return
            self._buf += data.encode("utf-8", "backslashreplace") if isinstance(data, str) else data
            if len(self._buf) >= _FLUSH_AT:
                self._flush_locked()

    def print(self, text: str) -> None:
        self.write(text)

    def extra(self, text: str) -> None:
        if not self.quiet:
            self.write(text)

    def flush(self) -> None:
        with self._lock:
            if self.lost is None:
                self._flush_locked()

    def _flush_locked(self) -> None:
        view = memoryview(self._buf)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as e:
            self.lost = OutputLost(e)
            raise self.lost from None
        finally:
            view.release()
            # Values pass through this buffer (secret-get-value): overwrite before dropping.
            self._buf[:] = bytes(len(self._buf))
            del self._buf[:]


def guard_std_fds(out: Output) -> None:
    """Put /dev/null on a closed fd 0, 1 or 2 before anything opens files, so that no store
    or lock file can become "stdout"; a closed stdout counts as output lost."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if fd == out.fd:
            out.lost = OutputLost(OSError(errno.EBADF, os.strerror(errno.EBADF)))

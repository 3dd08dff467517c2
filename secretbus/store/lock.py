"""Single-instance lock: an exclusive flock on `<state dir>/driver.pid`."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from secretbus.core import errors
from secretbus.store.fsutil import ensure_private_dir


class InstanceLock:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        ensure_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise errors.OperationFailed(
                f"another secret driver already holds the lock '{self.path}'") from None
        except OSError as e:
            os.close(fd)
            raise errors.SystemError(f"cannot lock '{self.path}': {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # Closing drops the flock; the file stays (libvirt leaves it too).
            os.close(self._fd)
            self._fd = None

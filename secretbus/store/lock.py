"""Single-instance lock: an exclusive flock on `<state dir>/driver.pid`.

Deliberately not also libvirt's fcntl lock on byte 0 (virPidFileAcquire): a monolithic libvirtd
(Debian 12) always holds that one for its in-process secret driver, so taking it would make
whichever daemon starts second fail — libvirtd with all its VMs. The flock keeps two secretbus
drivers apart; README says how to run beside libvirtd with one writer."""
from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from secretbus.core import errors
from secretbus.store.fsutil import open_dir


class InstanceLock:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            dir_fd = open_dir(self.path.parent, create=True)
        except OSError as e:
            raise errors.SystemError(
                f"cannot use state directory '{self.path.parent}': {e.strerror}") from None
        try:
            # No O_TRUNC, O_NOFOLLOW: a planted symlink or someone else's file is refused
            # below before a byte is written (the directory check makes planting hard anyway).
            fd = os.open(self.path.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, 0o600, dir_fd=dir_fd)
        except OSError as e:
            raise errors.SystemError(f"cannot open lock file '{self.path}': {e.strerror}") from None
        finally:
            os.close(dir_fd)
        try:
            self._check(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise errors.LockHeld(
                f"another secret driver already holds the lock '{self.path}'") from None
        except errors.SecretError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise errors.SystemError(f"cannot lock '{self.path}': {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _check(self, fd: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            raise errors.SystemError(
                f"refusing lock file '{self.path}': not a regular file of uid {os.geteuid()} "
                "with one link")

    def release(self) -> None:
        if self._fd is not None:
            # Closing drops the flock; the file stays (libvirt leaves it too).
            os.close(self._fd)
            self._fd = None

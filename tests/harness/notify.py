"""An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""
from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .procs import HarnessError, public_tempdir, remove_tree

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Notification:
    data: bytes
    pid: int | None  # sender's credentials (SO_PASSCRED), as systemd checks NotifyAccess=
    uid: int | None
    gid: int | None

    def lines(self) -> list[bytes]:
        return self.data.split(b"\n")


class NotifySocket:
    """Bound at `.path` in a fresh 0755 directory, the socket itself 0777 so that a daemon
    running as any uid can notify. Pass `env()` to the daemon."""

    def __init__(self):
        self.dir = public_tempdir("sb-notify-")
        self.path = str(self.dir / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        Path(self.path).chmod(0o777)
        self.received: list[Notification] = []
        self._cursor = 0

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path}

    def _receive(self, timeout: float | None) -> bool:
        """Append one datagram if one arrives within `timeout` (None: don't block)."""
        self.sock.settimeout(timeout if timeout else 0.0)
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(_UCRED.size))
        except (TimeoutError, BlockingIOError):
            return False
        pid = uid = gid = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, uid, gid = _UCRED.unpack(payload[:_UCRED.size])
        self.received.append(Notification(data, pid, uid, gid))
        return True

    def messages(self) -> list[bytes]:
        """Every datagram received so far (without waiting)."""
        while self._receive(None):
            pass
        return [n.data for n in self.received]

    def wait_for(self, needle: bytes, timeout: float = 10) -> Notification:
        """The first datagram not yet returned by wait_for that has a line equal to `needle`
        (or, if `needle` ends with b"=", a line starting with it: b"STATUS=")."""
        def match(n: Notification) -> bool:
            return any(line == needle or (needle.endswith(b"=") and line.startswith(needle))
                       for line in n.lines())
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self._cursor, len(self.received)):
                if match(self.received[i]):
                    self._cursor = i + 1
                    return self.received[i]
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"no {needle!r} on {self.path} within {timeout} s; "
                                   f"got {[n.data for n in self.received]}")
            self._receive(left)

    def close(self) -> None:
        self.sock.close()
        remove_tree(self.dir)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""`secretbus ssh-bridge URI`: stdio <-> the local RPC socket, for ssh clients (DESIGN §10).

What libvirt's `virt-ssh-helper` does on a host that has libvirt: ssh runs it as the remote
command and the RPC stream flows through its stdin/stdout. secretbus ships its own for hosts
without libvirt; the CLI picks the socket (paths.choose_socket, mode=auto as the helper does).

The bridge never looks at the bytes: it is a pipe, and the server sees it as an ordinary local
peer with the ssh user's uid, so the ordinary unix rules of the socket apply to that user.

Each direction holds at most one chunk in flight (a blocking write before the next read), so a
side that stops reading stalls the other instead of growing a buffer. End of input (the ssh
client went away or half-closed) shuts down the socket's write side and keeps relaying the
server's last replies; the server closing the socket ends the bridge.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from secretbus.core import errors

CHUNK = 64 * 1024           # per direction: the only buffering the bridge does


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(path))
    except OSError as e:
        sock.close()
        # libvirt's wording (virNetSocketNewConnectUNIX), as virt-ssh-helper prints it.
        raise errors.SystemError(f"Failed to connect socket to '{path}': {e.strerror or e}") from None
    return sock


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _upstream(stdin_fd: int, sock: socket.socket) -> None:
    """stdin -> socket; at end of input, half-close so the server sees EOF."""
    try:
        while True:
            data = os.read(stdin_fd, CHUNK)
            if not data:
                break
            sock.sendall(data)
    except OSError:
        pass                # the socket side is gone: _downstream sees it and ends the bridge
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _downstream(sock: socket.socket, stdout_fd: int) -> None:
    """socket -> stdout until the server closes (or stdout can no longer be written)."""
    try:
        while True:
            data = sock.recv(CHUNK)
            if not data:
                return
            _write_all(stdout_fd, data)
    except OSError:
        return              # ECONNRESET from the server, EPIPE from a vanished ssh


def run(path: Path, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
    """Connect to `path` and relay until the server's side ends (errors.SystemError when the
    socket cannot be reached)."""
    sock = connect(path)
    up = threading.Thread(target=_upstream, args=(stdin_fd, sock), name="ssh-bridge-up", daemon=True)
    up.start()
    try:
        _downstream(sock, stdout_fd)
    finally:
        sock.close()
        # Nothing more will come: let the ssh side see end of file now, even while the
        # upstream thread still waits for input that no longer matters (it is a daemon).
        try:
            os.close(stdout_fd)
        except OSError:
            pass

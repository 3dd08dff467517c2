"""Sockets passed by systemd (socket activation, sd_listen_fds(3)), for the RPC listeners.

systemd passes the listening sockets of the .socket units that name a service as fds 3, 4, …
with LISTEN_FDS (how many), LISTEN_PID (for which process) and LISTEN_FDNAMES (colon-separated
names: FileDescriptorName=, by default the socket unit's own name). The variables are removed
whether or not they were meant for us, as sd_listen_fds(unset_environment=1) does, so that no
child process takes the sockets for its own. Each fd must be an AF_UNIX stream socket that
listens: anything else is refused, never served.
"""
from __future__ import annotations

import os
import socket
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass

LISTEN_FDS_START = 3              # SD_LISTEN_FDS_START
ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
MAX_FDS = 64                      # far more than the units pass; a bogus count is refused
UNNAMED = "unknown"               # sd_listen_fds_with_names()'s name without LISTEN_FDNAMES


class ActivationError(Exception):
    """The sockets systemd passed cannot be used as they are."""


@dataclass(frozen=True)
class Passed:
    name: str
    fd: int


def take_listen_fds(environ: MutableMapping[str, str] | None = None) -> list[Passed]:
    """The sockets passed to this process, in fd order; the variables are unset in any case."""
    env = os.environ if environ is None else environ
    pid, count, names = (env.pop(k, None) for k in ENV)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []             # an ancestor's environment: the fds are not ours
        n = int(count)
    except ValueError:
        raise ActivationError(f"LISTEN_PID={pid!r} LISTEN_FDS={count!r} are not numbers") from None
    if not 0 <= n <= MAX_FDS:
        raise ActivationError(f"LISTEN_FDS={n} is out of range")
    labels = names.split(":") if names is not None else [UNNAMED] * n
    if len(labels) != n:
        raise ActivationError(f"LISTEN_FDNAMES names {len(labels)} sockets, LISTEN_FDS says {n}")
    passed = [Passed(label, LISTEN_FDS_START + i) for i, label in enumerate(labels)]
    for p in passed:
        try:
            os.set_inheritable(p.fd, False)      # as sd_listen_fds() sets FD_CLOEXEC
        except OSError:
            raise ActivationError(f"socket {p.name!r} (fd {p.fd}) is not open") from None
    return passed


def listening_unix_stream(p: Passed) -> socket.socket:
    """The passed fd as a socket object, if it is an AF_UNIX stream socket that listens."""
    if not stat.S_ISSOCK(os.fstat(p.fd).st_mode):
        raise ActivationError(f"fd {p.fd} ({p.name!r}) passed by systemd is not a socket")
    sock = socket.socket(fileno=p.fd)
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        what = f"{_name(sock.family)} {_name(sock.type)}{'' if listening else ', not listening'}"
        sock.detach()             # not ours to serve; systemd keeps its own copy anyway
        raise ActivationError(f"socket {p.name!r} passed by systemd is {what}, "
                              f"not a listening AF_UNIX stream socket")
    return sock


def _name(value: object) -> str:
    return str(getattr(value, "name", value))     # an unknown family is a bare int


def close_all(passed: list[Passed]) -> None:
    """Sockets this process will not serve (--no-rpc): systemd still holds them."""
    for p in passed:
        try:
            os.close(p.fd)
        except OSError:
            pass

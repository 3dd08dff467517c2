"""What the server knows of one client connection: who it is and where it stands."""
from __future__ import annotations

import itertools
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Protocol

from secretbus.access.audit import HeldRecords
from secretbus.access.permissions import UnixProcess
from secretbus.rpc.identity import Identity
from secretbus.rpc.remote import RemoteIdentity

_UCRED = struct.Struct("3i")    # struct ucred: pid, uid, gid
_names = itertools.count(1)


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    start_time: int = 0     # /proc/<pid>/stat field 22 when it connected; 0: unknown

    @property
    def process(self) -> UnixProcess:
        return UnixProcess(self.pid, self.start_time, self.uid)


def start_time_of(pid: int) -> int:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), as
    libvirt and polkit read it; 0 when it cannot be read (polkit is then not asked)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
    except OSError:
        return 0
    return parse_start_time(stat)


def parse_start_time(stat: bytes) -> int:
    """Field 22 of a /proc/<pid>/stat line; 0 if it is not there."""
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    rest = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(rest[22 - 3])
    except (IndexError, ValueError):
        return 0


def peer_of(sock: socket.socket) -> Peer | None:
    """SO_PEERCRED of a unix stream socket: the kernel's word, not the client's; None if absent.
    The start time is read now, while the connecting process is the one the kernel named."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid, start_time_of(pid)) if pid > 0 else None


class SaslMechanism(Protocol):
    """One connection's SASL exchange: SCRAM (rpc/sasl.py) or GSSAPI (rpc/sasl_gssapi.py)."""

    user: str | None             # once it succeeded

    def init(self) -> dict[str, Any]: ...

    def start(self, mech: str, data: bytes | None) -> dict[str, Any]: ...

    def step(self, data: bytes | None) -> dict[str, Any]: ...


@dataclass
class Session:
    peer: Peer
    socket_readonly: bool          # accepted on the -ro socket
    trusted: bool                  # served without authentication (uid 0, or the session's own user)
    authenticated: bool = False
    opened: bool = False
    open_readonly: bool = False    # CONNECT_OPEN asked for VIR_CONNECT_RO
    close_callback: bool = False
    keepalive: bool = False        # the client asked for feature 10: the server pings it
    callbacks: set[int] = field(default_factory=set)
    identity: Identity | None = None   # set by SET_IDENTITY (a libvirt daemon acting for a user)
    # The access layer's name for this connection (its per-connection decisions, its audit
    # records): never a D-Bus unique name, which all start with ':'.
    name: str = field(default_factory=lambda: f"rpc-{next(_names)}")
    closed: bool = False           # the connection ended (a check still running keeps no decision)
    # A TLS caller (rpc/tls.py): no pid, no uid; its rights come from remote_access (rpc/remote.py).
    remote: RemoteIdentity | None = None
    # auth_tls / auth_unix_* = "sasl" (SCRAM, rpc/sasl.py) or TCP (GSSAPI, rpc/sasl_gssapi.py): to pass
    sasl: SaslMechanism | None = None
    # The SASL user a unix peer authenticated as (auth_unix_* = "sasl"): part of its identity,
    # as in libvirt, for the logs and the audit; its rights stay those of its uid.
    sasl_user: str | None = None
    # While the connection answers what one read brought (rpc/connection.py): the allowed
    # reads' audit records, sent together before any of those replies goes out (None: at once).
    held: HeldRecords | None = None

    @property
    def bounds(self) -> int | str | None:
        """Whose shared bounds this connection counts in (connections, frame bytes, unread
        output, event callbacks; rpc/uidshare.py): an untrusted local peer's uid, or a remote
        peer's host (one host is bounded as one local user, whatever it authenticates as);
        None for a trusted peer."""
        if self.trusted:
            return None
        return self.remote.host if self.remote is not None else self.peer.uid

    def subject(self) -> UnixProcess | None:
        """Whom polkit is asked about: the identity a root peer set (libvirt's ACL checks use
        the current identity), else the peer. None when it has no pid, uid and start time
        (an identity without them, or a start time that could not be read): then no check
        can pass, as libvirt says "No process ID available"."""
        if self.remote is not None:
            return None          # never polkit: remote callers are decided by their grants
        if self.identity is not None:
            f = self.identity.fields
            pid, uid, start = f.get("process-id"), f.get("unix-user-id"), f.get("process-time")
            if not (isinstance(pid, int) and isinstance(uid, int) and isinstance(start, int)):
                return None
            if not 0 < pid < 2**32 or start <= 0 or not 0 <= uid < 2**31:
                return None
            return UnixProcess(pid, start, uid)
        return self.peer.process if self.peer.start_time > 0 else None

    @property
    def elevated(self) -> bool:
        """May read private values: the identity carries the host's libvirt system token."""
        return self.identity is not None and self.identity.elevated

    @property
    def readonly(self) -> bool:
        return self.socket_readonly or self.open_readonly

    def close_driver_connection(self) -> None:
        """CONNECT_CLOSE, or libvirt's quirk of a second CONNECT_OPEN: back to not opened."""
        self.opened = False
        self.open_readonly = False
        self.close_callback = False
        self.identity = None

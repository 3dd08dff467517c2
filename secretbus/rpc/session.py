"""What the server knows of one client connection: who it is and where it stands."""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from secretbus.rpc.identity import Identity

_UCRED = struct.Struct("3i")    # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer | None:
    """SO_PEERCRED of a unix stream socket: the kernel's word, not the client's; None if absent."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid) if pid > 0 else None


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

"""libvirt's virtsecretd socket paths, shared by the server (where it listens) and the client
(where it connects), so the two can never disagree."""
from __future__ import annotations

import os
from pathlib import Path

SYSTEM_DIR = Path("/run/libvirt")          # libvirt's client says /var/run/libvirt: the same place
SOCKET_NAME = "virtsecretd-sock"
RO_SOCKET_NAME = "virtsecretd-sock-ro"


def session_dir() -> Path:
    """$XDG_RUNTIME_DIR/libvirt (libvirt's session socket directory)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return Path(runtime) / "libvirt"


def default_socket(system: bool, readonly: bool = False) -> Path:
    """The socket a client of the system or session instance connects to; the session instance
    has no read-only socket (libvirt's neither)."""
    if system:
        return SYSTEM_DIR / (RO_SOCKET_NAME if readonly else SOCKET_NAME)
    return session_dir() / SOCKET_NAME

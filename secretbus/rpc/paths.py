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


# -- the socket a local helper connects to (virt-ssh-helper's choice, research §3.2) ---------
LEGACY_SOCKET_NAME = "libvirt-sock"        # monolithic libvirtd's socket (-ro for read-only)
MODES = ("auto", "direct", "legacy")


def legacy_socket(system: bool, readonly: bool = False) -> Path:
    """libvirtd's socket: /var/run/libvirt/libvirt-sock(-ro), or the session one."""
    base = SYSTEM_DIR if system else session_dir()
    return base / (LEGACY_SOCKET_NAME + ("-ro" if readonly and system else ""))


def choose_socket(system: bool, readonly: bool = False, mode: str | None = None) -> Path:
    """libvirt's remoteGetUNIXSocket for the secret driver: `direct` is virtsecretd's socket,
    `legacy` libvirtd's; `auto` (the default) the direct one if it exists, else the legacy one
    if that exists, else the direct one (so the error names the socket secretbus serves)."""
    direct = default_socket(system, readonly)
    if mode == "direct":
        return direct
    legacy = legacy_socket(system, readonly)
    if mode == "legacy":
        return legacy
    if not direct.exists() and legacy.exists():
        return legacy
    return direct

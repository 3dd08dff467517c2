"""Access control between the D-Bus layer and the driver: permissions and their checkers.

Permissions and action ids are libvirt's (spec §5), so existing polkit rules keep working.
The session bus uses `AllowAll` (the bus itself admits only the user); the system bus uses
the polkit checker in polkit.py. Every checker fails closed.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from secretbus.core.model import SecretDef, UsageType

CONNECT_DRIVER = "secret"


class Perm(str, enum.Enum):
    SEARCH_SECRETS = "org.libvirt.api.connect.search-secrets"
    # Connection-level checks the RPC front end makes as libvirt's remote_protocol.x @acl
    # lines say (CONNECT_OPEN, GET_TYPE/URI/LIB_VERSION, close callbacks: getattr; event
    # deregistration: read; SET_IDENTITY: write). D-Bus has no such calls.
    CONNECT_GETATTR = "org.libvirt.api.connect.getattr"
    CONNECT_READ = "org.libvirt.api.connect.read"
    CONNECT_WRITE = "org.libvirt.api.connect.write"
    GETATTR = "org.libvirt.api.secret.getattr"
    READ = "org.libvirt.api.secret.read"
    WRITE = "org.libvirt.api.secret.write"
    SAVE = "org.libvirt.api.secret.save"
    DELETE = "org.libvirt.api.secret.delete"
    READ_SECURE = "org.libvirt.api.secret.read-secure"
    # libvirt's socket-level authentication (AUTH_POLKIT): the rw socket, the ro socket.
    UNIX_MANAGE = "org.libvirt.unix.manage"
    UNIX_MONITOR = "org.libvirt.unix.monitor"


# Checked without details, as libvirt's AUTH_POLKIT does.
SOCKET_AUTH = frozenset({Perm.UNIX_MANAGE, Perm.UNIX_MONITOR})


# libvirt's detail key per usage type; vtpm gets secret_usage_name too (libvirt omits it).
_USAGE_DETAIL = {
    UsageType.VOLUME: "secret_usage_volume",
    UsageType.CEPH: "secret_usage_ceph",
    UsageType.ISCSI: "secret_usage_target",
    UsageType.TLS: "secret_usage_name",
    UsageType.VTPM: "secret_usage_name",
}


# Decisions that may be shared by every connection of a uid. They only reveal what the default
# policy grants every user anyway (metadata, the list), and a new connection per ListSecrets
# must not cost one polkit check per secret. Write-side actions and read-secure stay per
# connection: rules may look at the subject's process and session (active, local, seat), and
# those differ between connections of one uid; a "yes" for one must not open the others.
UID_SCOPED = frozenset({Perm.SEARCH_SECRETS, Perm.GETATTR, Perm.READ, Perm.CONNECT_GETATTR, Perm.CONNECT_READ})


def details_for(d: SecretDef | None) -> dict[str, str]:
    """The CheckAuthorization details dict for a check on `d` (None: connection level)."""
    details = {"connect_driver": CONNECT_DRIVER}
    if d is not None:
        details["secret_uuid"] = d.uuid
        key = _USAGE_DETAIL.get(d.usage_type)
        if key and d.usage_id is not None:
            details[key] = d.usage_id
    return details


def details_of(perm: Perm, d: SecretDef | None) -> dict[str, str]:
    """The details polkit gets for `perm` on `d`: none for socket authentication."""
    return {} if perm in SOCKET_AUTH else details_for(d)


def redefine_checks(old: SecretDef | None, new: SecretDef) -> tuple[tuple[Perm, SecretDef], ...]:
    """What a redefine needs on the definition it replaces, beyond write+save on the new one:
    write+save on the old one too (a grant for one usage must not rewrite another's secret),
    and delete when it destroys the stored value (persistent -> ephemeral removes the files).
    One rule for every front end."""
    if old is None:
        return ()
    checks = [(Perm.WRITE, old), (Perm.SAVE, old)]
    if new.ephemeral and not old.ephemeral:
        checks.append((Perm.DELETE, old))
    return tuple(checks)


@dataclass(frozen=True)
class UnixProcess:
    """polkit's `unix-process` subject: a pid with its start time (/proc/<pid>/stat field 22,
    so a recycled pid is not mistaken for the process checked) and its uid."""

    pid: int
    start_time: int
    uid: int


@dataclass(frozen=True)
class Caller:
    """Who sent a call: unique bus name (an RPC connection: a name of its own, never a bus
    name), whether it allows interactive authorisation, and for RPC the process polkit is
    asked about (then the subject is `unix-process`, else `system-bus-name`)."""

    sender: str
    interactive: bool = False
    process: UnixProcess | None = None


class AccessControl(Protocol):
    # False means every check passes without awaiting anything (fast path).
    enabled: bool

    async def allowed(self, caller: Caller, perm: Perm, d: SecretDef | None) -> bool:
        """True if `caller` holds `perm` on `d`; False on denial or any failure."""

    async def caller_uid(self, caller: Caller) -> int | None:
        """The caller's uid as the bus daemon knows it, None if it cannot be found."""


class AllowAll:
    """Session bus: the bus admits only its user, so no per-call checks."""

    enabled = False

    def __init__(self, uid_lookup=None):
        self._uid_lookup = uid_lookup

    async def allowed(self, caller: Caller, perm: Perm, d: SecretDef | None) -> bool:
        return True

    async def caller_uid(self, caller: Caller) -> int | None:
        return await self._uid_lookup(caller.sender) if self._uid_lookup else None

    def known_uid(self, caller: Caller) -> tuple[bool, int | None]:
        """(True, what caller_uid would give) when that needs no await, else (False, None)."""
        return known_uid(self._uid_lookup, caller.sender)

    def close(self) -> None:
        pass   # the uid source is closed by whoever made it


def known_uid(uids: Any, sender: str | None) -> tuple[bool, int | None]:
    """A unique name's uid from `uids` (access/polkit.py's CallerUids; None: no source) without
    awaiting: (True, uid) when it is at hand, (False, None) when only a lookup can tell."""
    if uids is None:
        return True, None
    known = getattr(uids, "known", None)
    if known is not None and sender and known(sender):
        return True, uids.cached(sender)
    return False, None

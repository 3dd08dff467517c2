"""CONNECT_SET_IDENTITY and libvirt's system token: how virtqemud reads a private value.

A libvirt daemon that starts a VM elevates the identity it acts for by adding `system.token`,
the host's token from `<run>/libvirt/common/system.token`, and sends it with SET_IDENTITY
(research §2.3–§2.4). A connection whose identity carries that token is *elevated*: it may
read private values, as libvirt's secret driver allows. The token file follows libvirt's rules
(viridentity.c) so that libvirt's daemons and secretbus share it whichever starts first:
directory 0700, file 0600 opened O_APPEND|O_CREAT, a write lock on its first byte, 32 hex
characters written once. It is read again for every SET_IDENTITY: a token created after
secretbus started (a libvirt daemon came first after a reboot) still counts.
"""
from __future__ import annotations

import fcntl
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secretbus.core import errors

log = logging.getLogger("secretbus.rpc")

TOKEN_LEN = 32                    # hex characters (16 random bytes), viridentity.c
_TOKEN_RE = re.compile(r"[0-9a-f]{32}")

# libvirt's identity parameters and their typed-param types (libvirt-host.h).
_STRING, _LLONG, _ULLONG = 7, 3, 4
PARAMS = {
    "user-name": _STRING, "unix-user-id": _ULLONG, "group-name": _STRING, "unix-group-id": _ULLONG,
    "process-id": _LLONG, "process-time": _ULLONG, "sasl-user-name": _STRING,
    "x509-distinguished-name": _STRING, "selinux-context": _STRING, "system.token": _STRING,
}


@dataclass(frozen=True)
class Identity:
    """What SET_IDENTITY installed: libvirt's fields (the token itself is not kept)."""

    fields: dict[str, Any]
    elevated: bool

    def describe(self) -> str:
        f = self.fields
        return (f"user {f.get('user-name', '?')} uid {f.get('unix-user-id', '?')} "
                f"pid {f.get('process-id', '?')}")


def parse_params(params: list[dict[str, Any]]) -> dict[str, Any]:
    """libvirt's typed parameters as a dict; unknown names, wrong types and repeats refused."""
    out: dict[str, Any] = {}
    for p in params:
        name, (ptype, value) = p["field"], p["value"]
        want = PARAMS.get(name)
        if want is None:
            raise errors.InvalidArg(f"parameter '{name}' not supported")
        if ptype != want:
            raise errors.InvalidArg(f"invalid type for parameter '{name}'")
        if name in out:
            raise errors.InvalidArg(f"parameter '{name}' given more than once")
        out[name] = value
    return out


class SystemToken:
    def __init__(self, path: Path):
        self.path = path

    def ensure(self) -> None:
        """Create the token if no libvirt daemon has (libvirt's algorithm); failures only logged:
        without a token no identity is elevated, which fails closed."""
        try:
            self._read(create=True)
        except OSError as e:
            log.warning("cannot create libvirt's system token %s: %s", self.path, e.strerror)

    def matches(self, offered: str) -> bool:
        try:
            token = self._read(create=False)
        except OSError as e:
            log.warning("cannot read libvirt's system token %s: %s", self.path, e.strerror)
            return False
        return token is not None and hmac.compare_digest(token.encode(), offered.encode())

    def _read(self, *, create: bool) -> str | None:
        if create:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        else:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if create else fcntl.LOCK_SH, 1, 0)
            data = os.read(fd, TOKEN_LEN + 1)
            if not data and create:
                os.write(fd, secrets.token_hex(TOKEN_LEN // 2).encode())
                os.fsync(fd)
                os.lseek(fd, 0, os.SEEK_SET)
                data = os.read(fd, TOKEN_LEN + 1)
        finally:
            os.close(fd)     # closing drops the lock
        text = data.decode("ascii", "replace").rstrip("\n")
        if not _TOKEN_RE.fullmatch(text):
            log.warning("libvirt's system token %s is malformed; no identity is elevated", self.path)
            return None
        return text

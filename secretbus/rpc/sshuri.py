"""`secret+ssh://[user@]host[:port]/system?…`: what an ssh URI asks for (research §3.4).

Parsed into plain values and checked here, before anything runs, so that nothing from the URI
can become an ssh option or shell syntax: the host must look like a host name or address, the
user like a user name, local paths may not hold what ssh itself would expand (`%` tokens) or
split (quotes, white space, control characters). The remote command built from these values is
quoted separately (sshcommand.py); the checks here make the error name the bad parameter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

from secretbus.core import errors
from secretbus.rpc.paths import MODES

SCHEME = "secret+ssh"
# libvirt's client consumes these itself; the others travel in CONNECT_OPEN's name.
CLIENT_PARAMS = frozenset({
    "name", "command", "socket", "auth", "sshauth", "netcat", "keyfile", "pkipath", "known_hosts",
    "known_hosts_verify", "tls_priority", "mode", "proxy", "no_sanity", "no_verify", "no_tty", "authfile",
})
PROXIES = ("auto", "netcat", "native")
KNOWN_HOSTS_VERIFY = ("normal", "auto", "ignore")

_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|[0-9A-Fa-f:.]+(?:%[A-Za-z0-9]+)?")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_PROGRAM = re.compile(r"[A-Za-z0-9_./+-]{1,255}")      # a program name or path, no shell syntax
_BAD_PATH_CHARS = re.compile(r"[\x00-\x20\x7f\"'%\\]")


@dataclass(frozen=True)
class SshTarget:
    host: str
    system: bool                                   # /system or /session on the remote host
    user: str | None = None
    port: int | None = None
    keyfile: Path | None = None
    known_hosts: Path | None = None
    known_hosts_verify: str | None = None          # normal | auto | ignore (libvirt's libssh names)
    no_verify: bool = False
    no_tty: bool = False
    command: str = "ssh"                           # the local ssh program (libvirt's command=)
    netcat: str = "nc"                             # the remote nc program (libvirt's netcat=)
    proxy: str = "auto"
    socket: Path | None = None                     # remote socket (forces nc, or the bridge)
    mode: str | None = None
    params: tuple[tuple[str, str], ...] = field(default=())

    @property
    def instance(self) -> str:
        return "system" if self.system else "session"

    def open_name(self) -> str:
        """CONNECT_OPEN's name: the remote instance, transport stripped (as libvirt sends it)."""
        base = f"secret:///{self.instance}"
        return f"{base}?{urlencode(self.params)}" if self.params else base

    def remote_uri(self) -> str:
        """The local URI the remote helper (ssh-bridge, virt-ssh-helper) is given."""
        extra = [(k, v) for k, v in (("socket", str(self.socket) if self.socket else None), ("mode", self.mode))
                 if v is not None]
        base = f"secret:///{self.instance}"
        return f"{base}?{urlencode(extra)}" if extra else base

    def describe(self) -> str:
        who = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh {who}{host}{f':{self.port}' if self.port else ''}"


def is_ssh_uri(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() == SCHEME


def _flag(name: str, value: str) -> bool:
    # libvirt reads these with atoi: any non-zero number is true.
    if not re.fullmatch(r"[0-9]+", value):
        raise errors.InvalidArg(f"{name} parameter must be 0 or 1, not '{value}'")
    return int(value) != 0


def _local_path(name: str, value: str) -> Path:
    if not value or _BAD_PATH_CHARS.search(value):
        raise errors.InvalidArg(f"{name} parameter must be a path without spaces, quotes, '%' or control "
                                "characters")
    return Path(value)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise errors.InvalidArg(f"unknown {name} '{value}' (expected {', '.join(allowed)})")
    return value


def _program(name: str, value: str) -> str:
    if not _PROGRAM.fullmatch(value) or value.startswith("-"):
        raise errors.InvalidArg(f"{name} parameter must be a program name or path")
    return value


def _endpoint(parts: SplitResult, uri: str) -> tuple[str, str | None, int | None]:
    host = parts.hostname
    if parts.password is not None:      # first: the messages below show the URI, never a password
        raise errors.InvalidArg("the user in the URI is not a user name (a password cannot be given in the URI)")
    if not host:
        raise errors.InvalidArg(f"no host name in '{uri}': expected secret+ssh://[user@]host[:port]/system")
    if not _HOST.fullmatch(host) or host.startswith("-"):
        raise errors.InvalidArg("the host in the URI is not a host name or address")
    user = parts.username
    if user is not None and (not _USER.fullmatch(user) or parts.password is not None):
        raise errors.InvalidArg("the user in the URI is not a user name (a password cannot be given in the URI)")
    try:
        port = parts.port
    except ValueError:
        raise errors.InvalidArg("the port in the URI is not a number from 1 to 65535") from None
    if port == 0:
        raise errors.InvalidArg("the port in the URI is not a number from 1 to 65535")
    return host, user, port


def parse_ssh_uri(uri: str) -> SshTarget:
    parts = urlsplit(uri)
    if parts.scheme.lower() != SCHEME:
        raise errors.InvalidArg(f"not a {SCHEME}:// URI: '{uri}'")
    host, user, port = _endpoint(parts, uri)
    if parts.path not in ("/system", "/session"):
        raise errors.InvalidArg(f"unexpected secret URI path '{parts.path}', try {SCHEME}://host/system")
    kw: dict[str, object] = {}
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ("keyfile", "known_hosts"):
            kw[key] = _local_path(key, value)
        elif key in ("no_verify", "no_tty"):
            kw[key] = _flag(key, value)
        elif key == "known_hosts_verify":
            kw[key] = _choice(key, value, KNOWN_HOSTS_VERIFY)
        elif key in ("command", "netcat"):
            kw[key] = _program(key, value)
        elif key == "proxy":
            kw[key] = _choice("proxy", value, PROXIES)
        elif key == "mode":
            if _choice("remote mode", value, MODES) == "direct":
                # libvirt's refusal (remote_sockets.c): the direct socket is for local connections.
                raise errors.InvalidArg("Cannot use direct socket mode for ssh transport")
            kw[key] = value
        elif key == "socket":
            if not value.startswith("/") or re.search(r"[\x00-\x1f\x7f]", value):
                raise errors.InvalidArg("socket parameter must be an absolute path without control characters")
            kw[key] = Path(value)
        elif key not in CLIENT_PARAMS:
            rest.append((key, value))
    return SshTarget(host, parts.path == "/system", user, port, params=tuple(rest), **kw)  # type: ignore[arg-type]

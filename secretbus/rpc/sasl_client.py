"""The client side of SCRAM-SHA-256: over TLS before the RPC client, on unix and ssh inside it.

A server with auth_tls = "sasl" or auth_unix_* = "sasl" answers AUTH_LIST with SASL. Over TLS
`authenticate()` runs the exchange (AUTH_LIST, AUTH_SASL_INIT, _START, _STEP) on the fresh
stream, so that the RPC client that takes it over afterwards sees AUTH_LIST answer "none";
on other transports the RPC client's own open() calls `scram()` when AUTH_LIST says SASL.

Credentials come from libvirt's auth file (docs: "Client authentication credentials"): the
URI's `authfile=`, else $LIBVIRT_AUTH_FILE, else $XDG_CONFIG_HOME/libvirt/auth.conf, else
/etc/libvirt/auth.conf; the section `[auth-libvirt-<host>]` (else `[auth-libvirt-default]`)
names `credentials=NAME`, and `[credentials-NAME]` holds `authname=` and `password=`. The
host of a unix URI is "localhost", as libvirt names it. Without them the exchange stops before
anything is sent with `CredentialsNeeded`; the caller may ask on the terminal (rpc/askpass.py)
and connect again with `SaslLogin.credentials` set (uri.py does, for `secretbus -c`).
"""
from __future__ import annotations

import asyncio
import configparser
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secretbus.core import errors
from secretbus.rpc import protocol as P
from secretbus.rpc.client import AUTH_FAILED, auth_failed, error_from_remote, remote_error_class
from secretbus.rpc.frame import LENGTH_SIZE, Header, encode_frame, frame_length, parse_header
from secretbus.rpc.xdr import XdrError, decode, encode

MECH = "SCRAM-SHA-256"
LOCALHOST = "localhost"          # libvirt's host name for the auth file when the URI has none
Call = Callable[..., Awaitable[Any]]


class CredentialsNeeded(remote_error_class(AUTH_FAILED)):  # type: ignore[misc]
    """The server asks for SASL and no auth file gives the credentials (nothing was sent yet)."""


@dataclass
class SaslLogin:
    """Where a connection's SASL credentials come from; `credentials` once asked on a terminal."""

    host: str = LOCALHOST
    authfile: str | None = None
    credentials: tuple[str, str] | None = field(default=None, repr=False)    # never printed

    def resolve(self) -> tuple[str, str]:
        if self.credentials is not None:
            return self.credentials
        found = credentials(auth_file(self.authfile), self.host)
        if found is None:
            raise CredentialsNeeded(f"authentication failed: no SASL credentials for {self.host}: give "
                                    "authfile= or LIBVIRT_AUTH_FILE, or run on a terminal to be asked")
        return found


def auth_file(explicit: str | None) -> Path | None:
    for candidate in (explicit, os.environ.get("LIBVIRT_AUTH_FILE")):
        if candidate:
            return Path(candidate)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    for p in (Path(base) / "libvirt" / "auth.conf", Path("/etc/libvirt/auth.conf")):
        if p.exists():
            return p
    return None


def credentials(path: Path | None, host: str) -> tuple[str, str] | None:
    """(user, password) for `host` from libvirt's auth file; None when it has none for it (then
    libvirt asks its callback); AUTH_FAILED when the file cannot be read."""
    if path is None:
        return None
    cp = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            cp.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise auth_failed(f"cannot read the auth file '{path}': {getattr(e, 'strerror', None) or type(e).__name__}"
                          ) from None
    for section in (f"auth-libvirt-{host}", "auth-libvirt-default"):
        if cp.has_section(section) and cp.has_option(section, "credentials"):
            cred = f"credentials-{cp.get(section, 'credentials')}"
            if cp.has_option(cred, "authname") and cp.has_option(cred, "password"):
                return cp.get(cred, "authname"), cp.get(cred, "password")
    return None


class _Wire:
    """Calls on the bare stream, one at a time (nothing else runs on it yet)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.serial = 0

    async def call(self, proc: int, args: Any = None) -> Any:
        spec = P.PROCS[proc]
        self.writer.write(encode_frame(Header(P.REMOTE_PROGRAM, P.PROTOCOL_VERSION, proc, P.MsgType.CALL,
                                              self.serial, P.Status.OK), encode(spec.args, args)))
        self.serial += 1
        await self.writer.drain()
        while True:
            word = await self.reader.readexactly(LENGTH_SIZE)
            header, payload = parse_header(await self.reader.readexactly(frame_length(word)))
            if header.prog != P.REMOTE_PROGRAM or header.type != P.MsgType.REPLY:
                continue          # a keepalive or event cannot come yet; skip whatever it is
            if header.status == P.Status.ERROR:
                raise error_from_remote(decode(P.REMOTE_ERROR, payload))
            return decode(spec.ret, payload)


async def authenticate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, login: SaslLogin) -> None:
    """Over TLS, before the RPC client: SCRAM if the server asks for SASL; nothing otherwise."""
    wire = _Wire(reader, writer)
    try:
        types = (await wire.call(P.Proc.AUTH_LIST))["types"]
    except (asyncio.IncompleteReadError, ConnectionError, XdrError) as e:
        raise _lost(login, e) from None
    if P.AuthType.SASL in types:
        await scram(wire.call, login)


async def scram(call: Call, login: SaslLogin) -> None:
    """AUTH_SASL_INIT, _START, _STEP with SCRAM-SHA-256 (after AUTH_LIST said SASL); the
    credentials are looked up only once the server offers the mechanism."""
    # Here, not at the top: scramp and what it pulls in (asn1crypto, importlib.metadata) took
    # a fifth of every `secretbus -c` start, and most connections never ask for SASL.
    from scramp import ScramClient, ScramException  # type: ignore[import-untyped]
    try:
        mechs = (await call(P.Proc.AUTH_SASL_INIT))["mechlist"].split(",")
        if MECH not in [m.strip() for m in mechs]:
            raise auth_failed(f"the server offers SASL {', '.join(mechs)}; this client speaks {MECH} only")
        user, password = login.resolve()
        client = ScramClient([MECH], user, password)
        ret = await call(P.Proc.AUTH_SASL_START, {"mech": MECH, "nil": 0, "data": client.get_client_first().encode()})
        client.set_server_first(bytes(ret["data"]).decode())
        ret = await call(P.Proc.AUTH_SASL_STEP, {"nil": 0, "data": client.get_client_final().encode()})
        if not ret["complete"]:
            raise auth_failed("the server did not complete SASL authentication")
        client.set_server_final(bytes(ret["data"]).decode())      # the server proves it knew the verifier
    except ScramException as e:
        raise auth_failed(f"SCRAM: {e}") from None
    except (asyncio.IncompleteReadError, ConnectionError, XdrError) as e:
        raise _lost(login, e) from None


def _lost(login: SaslLogin, e: Exception) -> errors.SecretError:
    return errors.OperationFailed(f"the connection to {login.host} was lost during SASL authentication: "
                                  f"{type(e).__name__}")

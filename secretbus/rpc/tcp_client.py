"""The client side of secret+tcp:// with SASL GSSAPI (Kerberos), as libvirt's client does it.

The credentials are the caller's Kerberos tickets (the default credential cache, or
$KRB5CCNAME), for the service `libvirt@<host in the URI>` (libvirt/<host>@REALM): `kinit`
first. After AUTH_LIST → SASL and AUTH_SASL_INIT → GSSAPI, the GSS-API context is established
over AUTH_SASL_START/STEP, the server's wrapped security-layer offer must include
confidentiality, and the context's SSF must be at least 56 (libvirt's client: "negotiation SSF
%d was not strong enough"); from then on every byte is SASL-encoded (rpc/sasl_layer.py).

Each error says which step failed: connect (the TCP connection), auth (no ticket, an expired
one, a server that offers no GSSAPI or no security layer, a refusal by the server); access
errors come later from the server, in libvirt's words.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import gssapi

from secretbus.core import errors
from secretbus.rpc import protocol as P
from secretbus.rpc.client import auth_failed
from secretbus.rpc.hosturi import host_endpoint
from secretbus.rpc.sasl_client import _Wire
from secretbus.rpc.sasl_gssapi import (
    LAYER_CONFIDENTIALITY,
    MAX_BUFFER,
    MAX_TOKEN,
    MECH,
    SERVICE,
    context_ssf,
    gss_reason,
)
from secretbus.rpc.sasl_layer import LayeredStreamProtocol, LayerError, SecurityLayer
from secretbus.rpc.serverconf import MIN_SSF, TCP_PORT
from secretbus.rpc.tls_client import CLIENT_ONLY
from secretbus.rpc.transport import READ_LIMIT, Streams
from secretbus.rpc.xdr import XdrError

SCHEME = "secret+tcp"


@dataclass(frozen=True)
class TcpTarget:
    host: str
    port: int
    path: str                                   # /system or /session
    params: tuple[tuple[str, str], ...]         # passed on in CONNECT_OPEN's name

    def open_name(self) -> str:
        base = f"secret://{self.path}"
        return f"{base}?{urlencode(self.params)}" if self.params else base


def tcp_target(uri: str) -> TcpTarget | None:
    """The endpoint of a secret+tcp:// URI; None for any other URI."""
    u = urlsplit(uri)
    if u.scheme != SCHEME:
        return None
    host, port = host_endpoint(uri, u, "TCP", TCP_PORT, SCHEME)
    rest = tuple((k, v) for k, v in parse_qsl(u.query, keep_blank_values=True) if k not in CLIENT_ONLY)
    return TcpTarget(host, port, u.path, rest)


@dataclass(frozen=True)
class TcpTransport:
    target: TcpTarget

    def describe(self) -> str:
        return f"{self.target.host}:{self.target.port}"

    async def open(self) -> Streams:
        t = self.target
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_LIMIT, loop=loop)
        try:
            _, proto = await loop.create_connection(lambda: LayeredStreamProtocol(reader), t.host, t.port)
        except OSError as e:
            raise errors.SystemError(f"unable to connect to server at '{t.host}:{t.port}': "
                                     f"{e.strerror or e}") from None
        writer = asyncio.StreamWriter(proto.layered, proto, reader, loop)
        try:
            await authenticate(reader, writer, proto, t.host)
        except BaseException:
            writer.transport.abort()
            raise
        return reader, writer


def _data(ret: dict[str, Any]) -> bytes:
    data = b"" if ret.get("nil") else bytes(ret.get("data") or b"")
    if len(data) > MAX_TOKEN:
        raise auth_failed(f"the server sent a SASL token of {len(data)} bytes")
    return data


async def authenticate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proto: LayeredStreamProtocol,
                       host: str) -> None:
    """GSSAPI if the server asks for SASL (then the layer is on); nothing otherwise."""
    wire = _Wire(reader, writer)
    try:
        if P.AuthType.SASL not in (await wire.call(P.Proc.AUTH_LIST))["types"]:
            return
        mechs = [m.strip() for m in (await wire.call(P.Proc.AUTH_SASL_INIT))["mechlist"].split(",")]
        if MECH not in mechs:
            raise auth_failed(f"the server offers SASL {', '.join(mechs)}; on plain TCP this client "
                              f"speaks {MECH} (Kerberos) only")
        ctx = _context(host)
        ret = await wire.call(P.Proc.AUTH_SASL_START, {"mech": MECH, "nil": 0, "data": _gss(ctx.step) or b""})
        while not ctx.complete:
            if ret["complete"]:
                raise auth_failed("the server ended SASL before the Kerberos context was established")
            token = _gss(ctx.step, _data(ret)) or b""     # after the AP-REP: an empty answer
            ret = await wire.call(P.Proc.AUTH_SASL_STEP, {"nil": 0, "data": token})
        offer = _gss(ctx.unwrap, _data(ret)).message
        if len(offer) != 4 or not offer[0] & LAYER_CONFIDENTIALITY:
            raise auth_failed("the server offers no confidentiality layer on plain TCP")
        ssf = context_ssf(ctx)
        if ssf < MIN_SSF:
            raise auth_failed(f"negotiation SSF {ssf} was not strong enough")
        server_max = int.from_bytes(offer[1:4], "big")
        answer = bytes([LAYER_CONFIDENTIALITY]) + MAX_BUFFER.to_bytes(3, "big")
        ret = await wire.call(P.Proc.AUTH_SASL_STEP, {"nil": 0, "data": _gss(ctx.wrap, answer, False).message})
        if not ret["complete"]:
            raise auth_failed("the server did not complete SASL authentication")
        try:
            layer = SecurityLayer(ctx, _gss(ctx.get_wrap_size_limit, server_max, True), MAX_BUFFER, ssf)
        except LayerError as e:
            raise auth_failed(str(e)) from None
        proto.arm(layer)
    except (asyncio.IncompleteReadError, ConnectionError, XdrError) as e:
        raise errors.OperationFailed(f"the connection to {host} was lost during SASL authentication: "
                                     f"{type(e).__name__}") from None


def _context(host: str) -> gssapi.SecurityContext:
    F = gssapi.RequirementFlag
    try:
        name = gssapi.Name(f"{SERVICE}@{host}", gssapi.NameType.hostbased_service)
        return gssapi.SecurityContext(name=name, usage="initiate",
                                      flags=F.mutual_authentication | F.out_of_sequence_detection | F.replay_detection
                                      | F.integrity
                                      | F.confidentiality)
    except gssapi.exceptions.GSSError as e:
        raise auth_failed(f"GSSAPI: {gss_reason(e)}") from None


def _gss(fn: Any, *args: Any) -> Any:
    """One GSS-API call; its failure (no ticket, an expired one, a bad token) is an auth error."""
    try:
        return fn(*args)
    except gssapi.exceptions.GSSError as e:
        raise auth_failed(f"GSSAPI: {gss_reason(e)}") from None

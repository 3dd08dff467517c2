"""The client side of secret+tls:// (and secret://host/system): a `Transport` as libvirt's.

Files, as libvirt's client finds them (virnettlsconfig.c; research §3.5):
- `pkipath=DIR`: DIR/cacert.pem, DIR/clientcert.pem, DIR/clientkey.pem, DIR/cacrl.pem (optional);
- else, for a user other than root, ~/.pki/libvirt/{cacert,clientcert,clientkey}.pem when all
  are there; else /etc/pki/CA/cacert.pem, /etc/pki/libvirt/clientcert.pem,
  /etc/pki/libvirt/private/clientkey.pem (and /etc/pki/CA/cacrl.pem if present).
`no_verify=1` skips the check of the server's certificate and host name (libvirt's meaning).

After the handshake the server sends one byte \\x01 when it accepts our certificate and DN;
anything else is libvirt's "server verification (of our certificate or IP address) failed".
Each error says which step failed: connect, certificate (our files), handshake, confirmation;
authentication and access errors come later from the server, in libvirt's words.
"""
from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from secretbus.core import errors
from secretbus.rpc.client import auth_failed
from secretbus.rpc.hosturi import host_endpoint, is_tls
from secretbus.rpc.sasl_client import SaslLogin, authenticate
from secretbus.rpc.tls import CONFIRM
from secretbus.rpc.transport import READ_LIMIT, Streams

DEFAULT_PORT = 16514
SYSTEM_PKI = (Path("/etc/pki/CA/cacert.pem"), Path("/etc/pki/libvirt/clientcert.pem"),
              Path("/etc/pki/libvirt/private/clientkey.pem"), Path("/etc/pki/CA/cacrl.pem"))
CLIENT_ONLY = frozenset({"pkipath", "no_verify", "no_sanity", "tls_priority", "mode", "proxy", "socket",
                         "command", "netcat", "keyfile", "known_hosts", "known_hosts_verify", "sshauth",
                         "no_tty", "auth", "authfile", "name"})


@dataclass(frozen=True)
class TlsTarget:
    host: str
    port: int
    path: str              # /system or /session
    pkipath: Path | None
    no_verify: bool
    params: tuple[tuple[str, str], ...]      # passed on in CONNECT_OPEN's name
    authfile: str | None = None              # libvirt's authfile=: SASL credentials

    def open_name(self) -> str:
        base = f"secret://{self.path}"
        return f"{base}?{urlencode(self.params)}" if self.params else base


def tls_target(uri: str) -> TlsTarget | None:
    """The TLS endpoint of `uri`, or None when it is not a TLS URI (secret:///system is local)."""
    u = urlsplit(uri)
    if not is_tls(u):
        return None
    host, port = host_endpoint(uri, u, "TLS", DEFAULT_PORT, "secret+tls")
    pkipath: Path | None = None
    no_verify = False
    authfile: str | None = None
    rest = []
    for key, value in parse_qsl(u.query, keep_blank_values=True):
        if key == "pkipath":
            pkipath = Path(value)
        elif key == "no_verify":
            no_verify = value not in ("", "0")
        elif key == "authfile":
            authfile = value
        elif key not in CLIENT_ONLY:
            rest.append((key, value))
    return TlsTarget(host, port, u.path, pkipath, no_verify, tuple(rest), authfile)


def pki_files(pkipath: Path | None) -> tuple[Path, Path, Path, Path | None]:
    """(CA, client certificate, client key, CRL or None) as libvirt's client picks them."""
    if pkipath is not None:
        crl = pkipath / "cacrl.pem"
        return pkipath / "cacert.pem", pkipath / "clientcert.pem", pkipath / "clientkey.pem", \
            crl if crl.exists() else None
    if os.geteuid() != 0:
        user = Path.home() / ".pki" / "libvirt"
        mine = (user / "cacert.pem", user / "clientcert.pem", user / "clientkey.pem")
        if all(p.exists() for p in mine):
            return (*mine, None)
    ca, cert, key, crl = SYSTEM_PKI
    return ca, cert, key, crl if crl.exists() else None


def client_context(target: TlsTarget) -> ssl.SSLContext:
    ca, cert, key, crl = pki_files(target.pkipath)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if target.no_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        _load(ctx.load_verify_locations, ca, "CA certificate")
        if crl is not None:
            _load(ctx.load_verify_locations, crl, "CA revocation list")
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if cert.exists() or key.exists():
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            raise errors.SystemError(f"Cannot load client certificate '{cert}' and key '{key}': "
                                     f"{_why(e)}") from None
    return ctx


def _load(fn: Callable[..., None], path: Path, what: str) -> None:
    try:
        fn(cafile=str(path))
    except (OSError, ssl.SSLError) as e:
        raise errors.SystemError(f"Cannot read {what} '{path}': {_why(e)}") from None


def _why(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return getattr(e, "reason", None) or getattr(e, "verify_message", None) or str(e) or type(e).__name__


@dataclass(frozen=True)
class TlsTransport:
    target: TlsTarget
    login: SaslLogin | None = None          # SASL credentials (default: the auth file, authfile=)

    def describe(self) -> str:
        return f"{self.target.host}:{self.target.port}"

    async def open(self) -> Streams:
        ctx = client_context(self.target)           # certificate step: our own files
        t = self.target
        try:
            reader, writer = await asyncio.open_connection(t.host, t.port, limit=READ_LIMIT)
        except OSError as e:
            raise errors.SystemError(f"unable to connect to server at '{t.host}:{t.port}': "
                                     f"{e.strerror or e}") from None
        try:
            await writer.start_tls(ctx, server_hostname=None if t.no_verify else t.host)
        except ssl.SSLCertVerificationError as e:
            writer.transport.abort()
            raise errors.SystemError(f"TLS handshake failed: the server certificate of {t.host} is not "
                                     f"trusted: {e.verify_message}") from None
        except (ssl.SSLError, OSError) as e:
            writer.transport.abort()
            raise auth_failed(f"TLS handshake failed: {_why(e)}") from None
        try:
            byte = await reader.read(1)
        except (ssl.SSLError, OSError) as e:
            # TLS 1.3: the server's refusal of our certificate arrives here, as an alert.
            writer.transport.abort()
            raise errors.SystemError(f"Unable to read TLS confirmation: {_why(e)}") from None
        if byte != CONFIRM:
            writer.transport.abort()
            raise errors.RPCError("server verification (of our certificate or IP address) failed")
        try:
            # auth step: SCRAM, if asked
            await authenticate(reader, writer, self.login or SaslLogin(t.host, t.authfile))
        except BaseException:
            writer.transport.abort()
            raise
        return reader, writer

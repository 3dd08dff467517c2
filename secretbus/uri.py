"""Connection URIs (secret:///system, secret:///session, secret:///embed?root=DIR) and `open()`.

Which front end a local URI uses (DESIGN §9; README "Which front end"):

1. libvirt RPC when the URI names a socket (`?socket=PATH`) or asks for `?mode=direct` (libvirt's
   own syntax: only the RPC front end has sockets), or the caller wants a read-only connection
   (`readonly=True`, `secretbus -r`: D-Bus has none);
2. otherwise D-Bus, unless the D-Bus side is absent (the bus cannot be reached, or
   org.libvirt.secret has no owner and cannot be activated) while libvirt's socket of that
   instance (`/run/libvirt/virtsecretd-sock`, `$XDG_RUNTIME_DIR/libvirt/virtsecretd-sock`)
   is there: then RPC. The probe costs a stat, and a NameHasOwner only when the socket exists.

Remote transports can only be RPC. `secret+ssh://[user@]host[:port]/system` runs ssh to the
remote host's RPC socket (secretbus.rpc.sshuri, sshcommand); `secret+tls://host[:port]/system`
and `secret://host/system` (libvirt's TLS default for a host name) go over TLS
(secretbus.rpc.tls_client); `secret+tcp://host[:port]/system` over TCP with SASL GSSAPI, the
caller's Kerberos tickets (secretbus.rpc.tcp_client); docs/remote.md.

A server that asks for SASL (auth_tls / auth_unix_* = "sasl") gets the credentials of libvirt's
auth file (`authfile=`, $LIBVIRT_AUTH_FILE, …); with `prompt=True` (`secretbus -c`) and none
there, they are asked on the controlling terminal in virsh's words and the connection is made
again with them (rpc/askpass.py); without a terminal, or with no_tty=1, it is an auth error.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

from secretbus.core import errors
from secretbus.core.model import InstanceKind

if TYPE_CHECKING:
    from secretbus.core.api import Connection
    from secretbus.driver.embedded import EmbeddedConnection
    from secretbus.rpc.client import KeepAlive
    from secretbus.rpc.sasl_client import SaslLogin

C = TypeVar("C")

# URI parameters libvirt's client consumes itself (remote_driver.c); the others travel in the
# name sent with CONNECT_OPEN, and the server accepts unknown ones.
CLIENT_PARAMS = frozenset({
    "name", "command", "socket", "auth", "sshauth", "netcat", "keyfile", "pkipath", "known_hosts",
    "known_hosts_verify", "tls_priority", "mode", "proxy", "no_sanity", "no_verify", "no_tty", "authfile",
})


@dataclass(frozen=True)
class ParsedURI:
    kind: InstanceKind
    root: Path | None = None
    socket: Path | None = None                 # ?socket=PATH: RPC on that socket
    mode: str | None = None                    # ?mode=auto|direct|legacy (libvirt's)
    params: tuple[tuple[str, str], ...] = field(default=())   # the others, passed on
    authfile: str | None = None                # ?authfile=: libvirt's SASL credentials file

    @property
    def wants_rpc(self) -> bool:
        return self.socket is not None or self.mode == "direct"

    def open_name(self) -> str:
        """What CONNECT_OPEN carries: secret:///system or /session with the other parameters."""
        base = f"secret:///{self.kind.value}"
        return f"{base}?{urlencode(self.params)}" if self.params else base


LOCAL_SCHEMES = ("secret", "secret+unix")


def _rpc_params(uri: str, query: str) -> tuple[Path | None, str | None, tuple[tuple[str, str], ...], str | None]:
    socket: Path | None = None
    mode: str | None = None
    authfile: str | None = None
    rest = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "authfile":
            authfile = value or None
        elif key == "socket":
            if not value.startswith("/"):
                raise errors.InvalidArg(f"socket parameter must be an absolute path, not '{value}'")
            socket = Path(value)
        elif key == "mode":
            if value not in ("auto", "direct", "legacy"):
                raise errors.InvalidArg(f"unknown remote mode '{value}' in '{uri}'")
            mode = value
        elif key not in CLIENT_PARAMS:
            rest.append((key, value))
    return socket, mode, tuple(rest), authfile


def parse_uri(uri: str) -> ParsedURI:
    parts = urlsplit(uri)
    if parts.scheme not in LOCAL_SCHEMES and parts.scheme.startswith("secret"):
        raise errors.NoSupport(f"remote URI '{uri}' is not supported yet")
    if parts.scheme not in LOCAL_SCHEMES:
        raise errors.InvalidArg(f"unsupported URI scheme in '{uri}': expected secret://")
    if parts.netloc:
        raise errors.NoSupport(f"remote URI '{uri}' is not supported yet")
    path = parts.path
    if path in ("/system", "/session"):
        socket, mode, params, authfile = _rpc_params(uri, parts.query)
        kind = InstanceKind.SYSTEM if path == "/system" else InstanceKind.SESSION
        return ParsedURI(kind, socket=socket, mode=mode, params=params, authfile=authfile)
    if path == "/embed":
        if parts.scheme != "secret":
            raise errors.InternalError("URI must be secret:///embed")
        roots = parse_qs(parts.query).get("root", [])
        if len(roots) != 1 or not roots[0]:
            raise errors.InvalidArg("root parameter is required for secret:///embed")
        root = Path(roots[0])
        if not root.is_absolute():
            raise errors.InvalidArg(f"root parameter must be an absolute path, not '{roots[0]}'")
        return ParsedURI(InstanceKind.EMBED, root)
    hint = "secret:///system" if os.geteuid() == 0 else "secret:///session"
    raise errors.InternalError(f"unexpected secret URI path '{path}', try {hint}")


def default_uri() -> str:
    env = os.environ.get("SECRETBUS_DEFAULT_URI")
    if env:
        return env
    return "secret:///system" if os.geteuid() == 0 else "secret:///session"


def open_driver(parsed: ParsedURI, uri: str) -> EmbeddedConnection:
    """The instance of `parsed` as a driver in this process (embedded, or the direct-driver
    commands that must not run while the service does)."""
    from secretbus.driver.build import open_instance
    from secretbus.driver.embedded import EmbeddedConnection
    from secretbus.store.paths import InstancePaths
    return EmbeddedConnection(open_instance(InstancePaths.for_kind(parsed.kind, parsed.root)), uri)


def rpc_socket(parsed: ParsedURI, readonly: bool = False) -> Path:
    """The socket an RPC connection to `parsed` uses: ?socket=, else libvirt's default path."""
    from secretbus.rpc.paths import default_socket
    if parsed.socket is not None:
        return parsed.socket
    return default_socket(parsed.kind is InstanceKind.SYSTEM, readonly)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def _keepalive(keepalive: KeepAlive | None) -> KeepAlive:
    """None: virsh's defaults."""
    from secretbus.rpc.client import DEFAULT_KEEPALIVE
    return DEFAULT_KEEPALIVE if keepalive is None else keepalive


def open_rpc(parsed: ParsedURI, uri: str, *, timeout: float = 25.0, readonly: bool = False,
             login: SaslLogin | None = None, keepalive: KeepAlive | None = None) -> Connection:
    from secretbus.rpc.facade import RpcConnection
    from secretbus.rpc.sasl_client import SaslLogin
    from secretbus.rpc.transport import UnixTransport
    return RpcConnection.open(uri, UnixTransport(rpc_socket(parsed, readonly)), name=parsed.open_name(),
                              readonly=readonly, timeout=timeout, login=login or SaslLogin(authfile=parsed.authfile),
                              keepalive=_keepalive(keepalive))


def open_ssh(uri: str, *, timeout: float = 25.0, readonly: bool = False,
             login: SaslLogin | None = None, keepalive: KeepAlive | None = None) -> Connection:
    """secret+ssh://…: RPC through an ssh child (rpc/transport.SshTransport)."""
    from secretbus.rpc.facade import RpcConnection
    from secretbus.rpc.sshuri import parse_ssh_uri
    from secretbus.rpc.transport import SshTransport
    target = parse_ssh_uri(uri)
    return RpcConnection.open(uri, SshTransport(target, readonly=readonly), name=target.open_name(),
                              readonly=readonly, timeout=timeout, login=login or _login(uri, target.host),
                              keepalive=_keepalive(keepalive))


def _open_tls(uri: str, timeout: float, readonly: bool, login: SaslLogin | None = None,
              keepalive: KeepAlive | None = None) -> Connection | None:
    """secret+tls://host[:port]/system and secret://host/system (libvirt's TLS default), over
    RPC; None for any other URI (rpc/tls_client.py)."""
    from secretbus.rpc.hosturi import is_tls_uri
    if not is_tls_uri(uri):
        return None
    from secretbus.rpc.tls_client import TlsTransport, tls_target
    target = tls_target(uri)
    assert target is not None          # is_tls_uri said so: tls_target asks the same is_tls
    from secretbus.rpc.facade import RpcConnection
    return RpcConnection.open(uri, TlsTransport(target, login), name=target.open_name(), readonly=readonly,
                              timeout=timeout, keepalive=_keepalive(keepalive))


def _open_tcp(uri: str, timeout: float, readonly: bool, keepalive: KeepAlive | None = None) -> Connection | None:
    """secret+tcp://host[:port]/system over RPC with Kerberos; None for any other URI."""
    if not uri.startswith("secret+tcp:"):
        return None
    try:
        from secretbus.rpc.tcp_client import TcpTransport, tcp_target
    except ImportError as e:
        raise errors.NoSupport(f"secret+tcp:// needs python's gssapi module (Kerberos): {e.msg}") from None
    target = tcp_target(uri)
    assert target is not None
    from secretbus.rpc.facade import RpcConnection
    return RpcConnection.open(uri, TcpTransport(target), name=target.open_name(), readonly=readonly,
                              timeout=timeout, keepalive=_keepalive(keepalive))


def _login(uri: str, host: str) -> SaslLogin:
    """Where SASL credentials come from for `uri`: its authfile=, else libvirt's search."""
    from secretbus.rpc.sasl_client import SaslLogin
    authfile = dict(parse_qsl(urlsplit(uri).query)).get("authfile") or None
    return SaslLogin(host, authfile)


def _login_host(uri: str) -> str:
    from secretbus.rpc.sasl_client import LOCALHOST
    return urlsplit(uri).hostname or LOCALHOST


def _asking(uri: str, attempt: Callable[[SaslLogin | None], C]) -> C:
    """`attempt(None)`; if it stopped for want of SASL credentials, ask them on the terminal and
    `attempt(login)` once more with them (a wrong answer is the server's refusal)."""
    from secretbus.rpc.askpass import ask_credentials
    from secretbus.rpc.sasl_client import CredentialsNeeded
    try:
        return attempt(None)
    except CredentialsNeeded:
        no_tty = dict(parse_qsl(urlsplit(uri).query)).get("no_tty", "") not in ("", "0")
        answer = None if no_tty else ask_credentials()
        if answer is None:
            raise
    login = _login(uri, _login_host(uri))
    login.credentials = answer
    return attempt(login)


def open_connection(uri: str | None = None, *, timeout: float = 25.0, readonly: bool = False,
                    prompt: bool = False, keepalive: KeepAlive | None = None) -> Connection:
    """Open `uri` (default: $SECRETBUS_DEFAULT_URI, else system for root, session otherwise)
    over the front end chosen by the rule in this module's docstring. `readonly` asks for a
    read-only connection, which only the RPC front end has (libvirt's `virsh -r`). `prompt`:
    SASL credentials that no auth file gives are asked on the controlling terminal.
    `keepalive`: an RPC connection's (virsh's -k/-K; None: virsh's defaults)."""
    uri = uri or default_uri()
    if prompt:
        return _asking(uri, lambda login: _open(uri, timeout, readonly, login, keepalive))
    return _open(uri, timeout, readonly, None, keepalive)


def _open(uri: str, timeout: float, readonly: bool, login: SaslLogin | None,
          keepalive: KeepAlive | None = None) -> Connection:
    from secretbus.rpc.sshuri import is_ssh_uri
    if is_ssh_uri(uri):
        return open_ssh(uri, timeout=timeout, readonly=readonly, login=login, keepalive=keepalive)
    remote = _open_tls(uri, timeout, readonly, login, keepalive) or _open_tcp(uri, timeout, readonly, keepalive)
    if remote is not None:
        return remote
    parsed = parse_uri(uri)
    if parsed.kind is InstanceKind.EMBED:
        if readonly:
            raise errors.NoSupport("read-only connections are not supported by the embedded driver")
        return open_driver(parsed, uri)
    if parsed.wants_rpc or readonly:
        return open_rpc(parsed, uri, timeout=timeout, readonly=readonly, login=login, keepalive=keepalive)
    try:
        from secretbus.bus.client import DBusConnection
    except ImportError:
        raise errors.NoSupport(f"URI '{uri}' is not supported yet") from None
    socket_there = _is_socket(rpc_socket(parsed))
    try:
        conn = DBusConnection.open(parsed.kind, uri, timeout=timeout)
    except errors.OperationFailed:
        if not socket_there:
            raise
        return open_rpc(parsed, uri, timeout=timeout, login=login, keepalive=keepalive)
    if socket_there:
        try:
            present = conn.service_present()
        except BaseException:
            conn.close()
            raise
        if not present:
            conn.close()
            return open_rpc(parsed, uri, timeout=timeout, login=login, keepalive=keepalive)
    return conn

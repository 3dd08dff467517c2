"""The host part of a remote secret URI (secret+tls://, secret://host/, secret+tcp://): one set
of checks and messages for each transport's client."""
from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from secretbus.core import errors

TLS_SCHEMES = ("secret+tls", "secret")     # secret://host/… is TLS, as libvirt's default


def is_tls(u: SplitResult) -> bool:
    """Whether split URI `u` names a TLS endpoint (secret:///system, with no host, is local).
    Here, not in tls_client: every URI opened asks, and that module's imports (ssl, SASL) cost
    a local connection tens of ms."""
    return u.scheme in TLS_SCHEMES and (u.scheme != "secret" or bool(u.netloc))


def is_tls_uri(uri: str) -> bool:
    return is_tls(urlsplit(uri))


def host_endpoint(uri: str, u: SplitResult, kind: str, default_port: int, scheme: str) -> tuple[str, int]:
    """(host, port) of `u`, the split `uri`; `kind` names the transport in messages ("TLS")."""
    if u.username or u.password:
        # The certificate or the Kerberos ticket says who we are; libvirt ignores a name here.
        # Checked first, and shown no further than the host: a password must not be echoed by
        # this message or by the ones below, which show the whole URI.
        raise errors.InvalidArg(f"a user name has no meaning for a {kind} URI: '{u.scheme}://{u.hostname or ''}…'")
    if not u.hostname:
        raise errors.InvalidArg(f"a host name is required in '{uri}'")
    if u.path not in ("/system", "/session"):
        raise errors.InternalError(f"unexpected secret URI path '{u.path}', try {scheme}://{u.hostname}/system")
    try:
        return u.hostname, u.port or default_port
    except ValueError:
        raise errors.InvalidArg(f"invalid port in '{uri}'") from None

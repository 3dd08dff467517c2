"""Connection URIs (secret:///system, secret:///session, secret:///embed?root=DIR) and `open()`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from secretbus.core import errors
from secretbus.core.model import InstanceKind

if TYPE_CHECKING:
    from secretbus.driver.embedded import EmbeddedConnection


@dataclass(frozen=True)
class ParsedURI:
    kind: InstanceKind
    root: Path | None = None


LOCAL_SCHEMES = ("secret", "secret+unix")


def parse_uri(uri: str) -> ParsedURI:
    parts = urlsplit(uri)
    if parts.scheme not in LOCAL_SCHEMES and parts.scheme.startswith("secret"):
        raise errors.NoSupport(f"remote URI '{uri}' is not supported yet")
    if parts.scheme not in LOCAL_SCHEMES:
        raise errors.InvalidArg(f"unsupported URI scheme in '{uri}': expected secret://")
    if parts.netloc:
        raise errors.NoSupport(f"remote URI '{uri}' is not supported yet")
    path = parts.path
    if path == "/system":
        return ParsedURI(InstanceKind.SYSTEM)
    if path == "/session":
        return ParsedURI(InstanceKind.SESSION)
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


def open_connection(uri: str | None = None, *, timeout: float = 25.0):
    """Open `uri` (default: $SECRETBUS_DEFAULT_URI, else system for root, session otherwise)."""
    uri = uri or default_uri()
    parsed = parse_uri(uri)
    if parsed.kind is InstanceKind.EMBED:
        return open_driver(parsed, uri)
    try:
        from secretbus.bus.client import DBusConnection
    except ImportError:
        raise errors.NoSupport(f"URI '{uri}' is not supported yet") from None
    return DBusConnection.open(parsed.kind, uri, timeout=timeout)

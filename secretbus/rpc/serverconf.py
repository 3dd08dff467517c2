"""secretbusd.conf: the server's remote-access configuration (DESIGN §10), in virConf syntax.

The keys are libvirtd.conf's, so an administrator's libvirtd.conf habits carry over:
listen_tls, listen_tcp, tls_port, tcp_port, listen_addr, key_file, cert_file, ca_file, crl_file,
tls_no_verify_certificate, tls_allowed_dn_list, sasl_allowed_username_list, auth_tls, auth_tcp,
auth_unix_rw, auth_unix_ro, tcp_min_ssf, max_clients, max_client_requests, keepalive_interval,
keepalive_count; plus secretbus's own
`remote_access` grants, `max_remote_clients` (remote connections together; default half of
max_clients, so that remote hosts cannot take the local users' slots), and `sasl_keytab`
(the GSSAPI service keys for TCP; libvirt takes them from KRB5_KTNAME):

    remote_access = [ "x509:C=GB,O=Example,CN=*.ops=rw", "x509:*=ro" ]

Each grant is `<kind>:<glob>=<rights>` (kind x509 or sasl; the glob is the last '=' away from
the rights, as a DN holds '=' itself; rights ro | rw | rw+values). The first grant whose glob
matches the remote identity decides; none matching is a refusal.

Unknown keys are logged and ignored (libvirtd.conf has many that mean nothing here); a bad
value or a duplicate key is a `ConfigError` naming the file and the line. A missing file is
the built-in defaults: no remote listener.
"""
from __future__ import annotations

import enum
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from secretbus.core.virconf import (
    PROTECTED_MAX,
    Entry,
    Parser,
    abs_path,
    is_fleet_key,
    read_options,
    read_protected,
    string,
    string_list,
    type_name,
)

log = logging.getLogger("secretbus.serverconf")

MAX_SIZE = PROTECTED_MAX

# libvirt's PKI defaults (virnettlsconfig.c / libvirtd.conf.in).
CA_FILE = "/etc/pki/CA/cacert.pem"
CRL_FILE = "/etc/pki/CA/cacrl.pem"
CERT_FILE = "/etc/pki/libvirt/servercert.pem"
KEY_FILE = "/etc/pki/libvirt/private/serverkey.pem"
TLS_PORT = 16514
TCP_PORT = 16509
MIN_SSF = 56                    # libvirt's tcp_min_ssf default, and the least it accepts


class Rights(enum.Enum):
    RO = "ro"                   # list, lookup, XML, events
    RW = "rw"                   # + define, set value, undefine
    RW_VALUES = "rw+values"     # + GetValue of non-private secrets


class Kind(enum.Enum):
    X509 = "x509"
    SASL = "sasl"


@dataclass(frozen=True)
class Grant:
    kind: Kind
    pattern: str                # a glob: '*' any run, '?' one character (g_pattern_match_simple)
    rights: Rights
    line: int = 0

    def matches(self, kind: Kind, name: str) -> bool:
        return kind is self.kind and glob_match(self.pattern, name)


@dataclass(frozen=True)
class ServerConf:
    path: Path | None = None            # the file read; None: built-in defaults
    listen_tls: bool = False
    listen_tcp: bool = False
    tls_port: int = TLS_PORT
    tcp_port: int = TCP_PORT
    listen_addr: str = ""               # "": every address, as libvirtd
    key_file: str = KEY_FILE
    cert_file: str = CERT_FILE
    ca_file: str = CA_FILE
    crl_file: str | None = None         # None: CRL_FILE if it exists (libvirt's rule)
    tls_allowed_dn_list: tuple[str, ...] | None = None     # None: any DN the CA signed
    sasl_allowed_username_list: tuple[str, ...] | None = None
    auth_tls: str = "none"
    auth_tcp: str = "sasl"
    # The unix sockets' authentication (libvirtd.conf's names): None is libvirt's default,
    # polkit on the system instance, none on the session's (unix_auth()).
    auth_unix_rw: str | None = None
    auth_unix_ro: str | None = None
    max_clients: int = 5000
    max_remote_clients: int | None = None      # None: max_clients // 2
    max_client_requests: int = 16          # libvirt's is 5; why 16: RpcLimits.max_requests
    # libvirt's: PING a client after keepalive_interval s of silence (<= 0: never), drop it
    # after keepalive_count unanswered (0: after one silent interval, without pinging).
    keepalive_interval: int = 5
    keepalive_count: int = 5
    remote_access: tuple[Grant, ...] = field(default=())
    sasl_verifier_file: str | None = None      # None: sasl-verifiers.json beside this file
    tcp_min_ssf: int = MIN_SSF                 # SASL on plain TCP: the weakest security layer taken
    sasl_keytab: str | None = None             # GSSAPI service keys; None: $KRB5_KTNAME or /etc/krb5.keytab

    def rights_of(self, kind: Kind, name: str) -> Rights | None:
        """The first matching grant's rights; None: refused."""
        for g in self.remote_access:
            if g.matches(kind, name):
                return g.rights
        return None

    def dn_allowed(self, dn: str) -> bool:
        """libvirt's tls_allowed_dn_list: unset lets every certified DN in, [] none."""
        if self.tls_allowed_dn_list is None:
            return True
        return any(glob_match(p, dn) for p in self.tls_allowed_dn_list)

    def sasl_user_allowed(self, user: str) -> bool:
        """libvirt's sasl_allowed_username_list: unset lets every authenticated user in."""
        if self.sasl_allowed_username_list is None:
            return True
        return any(glob_match(p, user) for p in self.sasl_allowed_username_list)

    def verifier_path(self, fallback: Path) -> Path:
        if self.sasl_verifier_file is not None:
            return Path(self.sasl_verifier_file)
        return (self.path.parent if self.path is not None else fallback) / "sasl-verifiers.json"

    def unix_auth(self, system: bool, readonly: bool) -> str:
        """"none", "polkit" or "sasl" for a connection on the rw or the ro unix socket."""
        mode = self.auth_unix_ro if readonly else self.auth_unix_rw
        if mode is not None:
            return mode
        return "polkit" if system else "none"

    def remote_clients(self) -> int:
        """Remote (TLS, TCP) connections together: max_remote_clients, else half of max_clients
        (the local users keep the other half, whatever the remote hosts do)."""
        return self.max_remote_clients if self.max_remote_clients is not None else self.max_clients // 2

    def crl_path(self) -> str | None:
        if self.crl_file is not None:
            return self.crl_file
        return CRL_FILE if os.path.exists(CRL_FILE) else None


def glob_match(pattern: str, text: str) -> bool:
    """GLib's g_pattern_match_simple: '*' and '?' only; every other character is literal."""
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, text, re.DOTALL) is not None


# -- typed values -------------------------------------------------------------------------
Check = Callable[[Entry, Parser], Any]


def _bool(e: Entry, p: Parser) -> bool:
    v = e.value.data
    if not isinstance(v, int) or isinstance(v, bool) or v not in (0, 1):
        raise p.error(f"'{e.name}' must be 0 or 1 (got {_shown(e)})", e.line)
    return v == 1


def _port(e: Entry, p: Parser) -> int:
    v = e.value.data
    # libvirtd.conf writes ports as strings ("16514"); integers are accepted too.
    if isinstance(v, str) and v.isascii() and v.isdigit():
        v = int(v)
    if not isinstance(v, int) or not 0 < v < 65536:
        raise p.error(f"'{e.name}' must be a port number 1-65535 (got {_shown(e)})", e.line)
    return v


def _count(e: Entry, p: Parser) -> int:
    v = e.value.data
    if not isinstance(v, int) or not 0 < v <= 1_000_000:
        raise p.error(f"'{e.name}' must be a positive integer (got {_shown(e)})", e.line)
    return v


def _int_in(low: int, high: int) -> Check:
    def check(e: Entry, p: Parser) -> int:
        v = e.value.data
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise p.error(f"'{e.name}' must be an integer from {low} to {high} (got {_shown(e)})", e.line)
        return v
    return check


def _min_ssf(e: Entry, p: Parser) -> int:
    v = e.value.data
    if not isinstance(v, int) or isinstance(v, bool) or not MIN_SSF <= v <= 100_000:
        # libvirt: "minimum SSF levels lower than 56 are not supported"
        raise p.error(f"'{e.name}' must be an integer from {MIN_SSF} (got {_shown(e)})", e.line)
    return v


def _choice(*allowed: str) -> Check:
    def check(e: Entry, p: Parser) -> str:
        v = string(e, p)
        if v not in allowed:
            raise p.error(f"'{e.name}' must be {' or '.join(repr(a) for a in allowed)}, not {v!r}", e.line)
        return v
    return check


def _no_verify(e: Entry, p: Parser) -> bool:
    if _bool(e, p):
        # Rights come from the verified DN: an unverified certificate would grant them to anyone.
        raise p.error(f"'{e.name}' = 1 is not supported: remote rights are given by the verified "
                      "certificate's DN", e.line)
    return False


def _grants(e: Entry, p: Parser) -> tuple[Grant, ...]:
    if not isinstance(e.value.data, list):
        raise p.error(f"expected a list for '{e.name}' (got {type_name(e.value)})", e.line)
    out = []
    for item in e.value.data:
        v = item.data
        if not isinstance(v, str):
            raise p.error(f"'{e.name}' entries must be strings like \"x509:<DN glob>=ro\"", item.line)
        kind, colon, rest = v.partition(":")
        pattern, eq, rights = rest.rpartition("=")
        if not colon or kind not in {k.value for k in Kind}:
            raise p.error(f"'{e.name}' entry {v!r}: must start with x509: or sasl:", item.line)
        if not eq or not pattern:
            raise p.error(f"'{e.name}' entry {v!r}: must be <kind>:<glob>=<rights>", item.line)
        if rights not in {r.value for r in Rights}:
            raise p.error(f"'{e.name}' entry {v!r}: rights must be ro, rw or rw+values", item.line)
        out.append(Grant(Kind(kind), pattern, Rights(rights), item.line))
    return tuple(out)


def _shown(e: Entry) -> str:
    v = e.value.data
    return repr(v) if not isinstance(v, list) else "a list"


_OPTIONS: dict[str, Check] = {
    "listen_tls": _bool,
    "listen_tcp": _bool,
    "tls_port": _port,
    "tcp_port": _port,
    "listen_addr": string,
    "key_file": abs_path,
    "cert_file": abs_path,
    "ca_file": abs_path,
    "crl_file": abs_path,
    "tls_no_verify_certificate": _no_verify,
    "tls_allowed_dn_list": string_list,
    "sasl_allowed_username_list": string_list,
    "auth_tls": _choice("none", "sasl"),
    "auth_tcp": _choice("sasl"),
    "auth_unix_rw": _choice("none", "polkit", "sasl"),
    "auth_unix_ro": _choice("none", "polkit", "sasl"),
    "max_clients": _count,
    "max_remote_clients": _count,
    "max_client_requests": _count,
    # libvirt refuses intervals whose milliseconds overflow an int (virKeepAliveStart).
    "keepalive_interval": _int_in(-1, 2**31 // 1000),
    "keepalive_count": _int_in(0, 1_000_000),
    "remote_access": _grants,
    "sasl_verifier_file": abs_path,
    "tcp_min_ssf": _min_ssf,
    "sasl_keytab": abs_path,
}
_NOT_FIELDS = {"tls_no_verify_certificate"}


def parse_serverconf(text: str, path: str = "<string>") -> ServerConf:
    values = {k: v for k, v in read_options(text, path, _OPTIONS, log, skip=is_fleet_key).items()
              if k not in _NOT_FIELDS}
    return ServerConf(path=None if path == "<string>" else Path(path), **values)


def load_serverconf(path: Path, *, required: bool = False) -> ServerConf:
    """Read `path`; missing: the defaults (no remote listener), unless `required` (--config).
    It grants remote rights: nobody but its owner (root, or the session's user) may write it."""
    text = read_protected(path, required=required, max_size=MAX_SIZE)
    if text is None:
        return replace(ServerConf(), path=None)
    return parse_serverconf(text, str(path))

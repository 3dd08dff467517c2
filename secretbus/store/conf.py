"""secret.conf: libvirt's virConf syntax → `SecretConf`.

The syntax (the subset of libvirt's virconf.c that libvirt's own daemons use, no more lenient,
so that a secret.conf secretbus accepts is still one libvirt accepts) is core/virconf.py's.

Duplicate keys are an error. (virConf silently uses the *first* occurrence, which
surprises people who expect "last wins"; for a file that decides whether secrets are
encrypted, refusing to guess is the safer choice.)

Every error is a `ConfigError` whose message starts with "<file>:<line>: ".
"""
from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from secretbus.core import errors
from secretbus.core.virconf import (
    Entry,
    Parser,
    Value,
    abs_path,
    is_fleet_key,
    read_options,
    read_protected,
    string_list,
    type_name,
)
from secretbus.store import fsutil
from secretbus.store.paths import InstancePaths

log = logging.getLogger("secretbus.conf")

SCHEMES = ("aes256gcm", "aes256cbc")
MAX_CONF_SIZE = 10 * 1024 * 1024  # virConf's sanity limit
UID_MAX = 2**32 - 2               # (uid_t)-1 means "no user"


@dataclass(frozen=True)
class SecretConf:
    path: Path | None = None                  # the file actually read; None = built-in defaults
    encrypt_data: bool | None = None          # None = not set
    secrets_encryption_key: str | None = None
    encryption_scheme: str = "aes256gcm"      # or "aes256cbc"
    private_value_readers: tuple[str | int, ...] = ()   # user names or uids
    # Fleet mode (DESIGN §11; docs/fleet.md): on when fleet_endpoints is set. Its keys are
    # secretbusd.conf's (load_instance_conf); `fleet_file` is the file they are read from.
    fleet_file: Path | None = None
    fleet_endpoints: tuple[str, ...] = ()
    fleet_cluster: str = "default"
    fleet_ca_file: str | None = None
    fleet_cert_file: str | None = None
    fleet_key_file: str | None = None
    fleet_usage_types: tuple[str, ...] | None = None   # None: every usage type
    fleet_private: bool = True


# The lexer is core/virconf.py's (shared with secretbusd.conf); the old names stay for this module.
_Value = Value
_Entry = Entry
_Parser = Parser


# ---------------------------------------------------------------------------
# Typed options


def _type_name(v: _Value) -> str:
    return type_name(v)


def _encrypt_data(e: _Entry, p: _Parser) -> bool:
    v = e.value.data
    if not isinstance(v, int):
        raise p.error(f"expected 0 or 1 for '{e.name}' (got {_type_name(e.value)})", e.line)
    if v not in (0, 1):
        raise p.error(f"'{e.name}' must be 0 or 1", e.line)
    return v == 1


def _key_path(e: _Entry, p: _Parser) -> str:
    return abs_path(e, p)


def _scheme(e: _Entry, p: _Parser) -> str:
    v = e.value.data
    if not isinstance(v, str):
        raise p.error(f"expected a string for '{e.name}' (got {_type_name(e.value)})", e.line)
    if v not in SCHEMES:
        raise p.error(f"'{e.name}' must be \"aes256gcm\" or \"aes256cbc\", not {v!r}", e.line)
    return v


def _readers(e: _Entry, p: _Parser) -> tuple[str | int, ...]:
    if not isinstance(e.value.data, list):
        raise p.error(f"expected a list for '{e.name}' (got {_type_name(e.value)})", e.line)
    out: list[str | int] = []
    for item in e.value.data:
        v = item.data
        if isinstance(v, str) and v:
            out.append(v)
        elif isinstance(v, int) and 0 <= v <= UID_MAX:
            out.append(v)
        else:
            raise p.error(f"'{e.name}' entries must be user names or uids", item.line)
    return tuple(out)


def _endpoints(e: _Entry, p: _Parser) -> tuple[str, ...]:
    out = string_list(e, p)
    for url in out:
        if not url.startswith(("http://", "https://")):
            raise p.error(f"'{e.name}' entries must be http:// or https:// URLs", e.line)
    return out


def _usage_types(e: _Entry, p: _Parser) -> tuple[str, ...]:
    out = string_list(e, p)
    for name in out:
        if name not in FLEET_USAGE_TYPES:
            raise p.error(f"'{e.name}': unknown usage type {name!r} (one of {', '.join(FLEET_USAGE_TYPES)})",
                          e.line)
    return out


def _cluster(e: _Entry, p: _Parser) -> str:
    v = e.value.data
    if not isinstance(v, str) or not v or len(v) > 63 or not all(c.isascii() and (c.isalnum() or c in "._-")
                                                                 for c in v):
        raise p.error(f"'{e.name}' must be 1-63 letters, digits, '.', '_' or '-'", e.line)
    return v


FLEET_USAGE_TYPES = ("volume", "ceph", "iscsi", "tls", "vtpm")

FLEET_OPTIONS = {
    "fleet_endpoints": _endpoints,
    "fleet_cluster": _cluster,
    "fleet_ca_file": _key_path,
    "fleet_cert_file": _key_path,
    "fleet_key_file": _key_path,
    "fleet_usage_types": _usage_types,
    "fleet_private": _encrypt_data,
}
_OPTIONS = {
    "encrypt_data": _encrypt_data,
    "secrets_encryption_key": _key_path,
    "encryption_scheme": _scheme,
    "private_value_readers": _readers,
    # Read from secret.conf too, where the first fleet builds had them (load_instance_conf).
    **FLEET_OPTIONS,
}


def parse_conf(text: str, path: str = "<string>") -> SecretConf:
    values = read_options(text, path, _OPTIONS, log)
    where = None if path == "<string>" else Path(path)
    fleet_file = where if any(k in FLEET_OPTIONS for k in values) else None
    return SecretConf(path=where, fleet_file=fleet_file, **values)


def _not_fleet(name: str) -> bool:
    return not is_fleet_key(name)


def parse_fleet_keys(text: str, path: str = "<string>") -> dict:
    """The `fleet_*` keys of a secretbusd.conf, checked; its other keys are the server's."""
    return read_options(text, path, FLEET_OPTIONS, log, skip=_not_fleet)


def load_instance_conf(paths: InstancePaths) -> SecretConf:
    """secret.conf, with fleet mode's keys from secretbusd.conf (DESIGN §11). Fleet keys still
    in secret.conf (where the first fleet builds read them) are used with a warning while
    secretbusd.conf has none; in both files they are an error rather than a guess."""
    conf = load_conf(paths.conf_file)
    where = paths.server_conf_file
    text = read_protected(where, required=paths.server_conf_named)
    fleet = {} if text is None else parse_fleet_keys(text, str(where))
    if fleet and conf.fleet_file is not None:
        raise errors.ConfigError(f"{where}: fleet mode's keys are set both here and in {conf.fleet_file}: "
                                 "keep them here only")
    if conf.fleet_file is not None:
        log.warning("%s: fleet mode's keys belong in %s now (DESIGN §11): move them there", conf.fleet_file, where)
        return conf
    return replace(conf, fleet_file=where, **fleet)


def load_conf(path: Path) -> SecretConf:
    """Read secret.conf; a missing file means built-in defaults (as libvirt). It names the
    key and turns encryption off, so it is read only from a directory nobody else can write."""
    path = Path(path)
    try:
        dir_fd = fsutil.open_dir(path.parent, read_only=True)
        try:
            if stat.S_ISDIR(os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            data = fsutil.read_limited(path.name, MAX_CONF_SIZE, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except FileNotFoundError:
        return SecretConf()
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise errors.ConfigError(f"Failed to read file '{path}': larger than {MAX_CONF_SIZE} bytes") from None
        raise errors.ConfigError(f"Failed to open file '{path}': {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise errors.ConfigError(f"{path}:{line}: not valid UTF-8") from None
    return parse_conf(text, str(path))


def resolve_readers(conf: SecretConf) -> frozenset[int]:
    """uids allowed to read private values. Names go through the user database;
    a string that is no user name but all digits is a uid (like chown(1))."""
    uids: set[int] = set()
    for r in conf.private_value_readers:
        if isinstance(r, int):
            uids.add(r)
            continue
        try:
            uids.add(pwd.getpwnam(r).pw_uid)
        except KeyError:
            if r.isascii() and r.isdigit() and int(r) <= UID_MAX:
                uids.add(int(r))
            else:
                where = conf.path if conf.path is not None else "<string>"
                raise errors.ConfigError(
                    f"{where}: private_value_readers: unknown user '{r}'") from None
    return frozenset(uids)

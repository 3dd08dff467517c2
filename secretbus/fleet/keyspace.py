"""Names of the fleet's etcd keys (research/fleet.md §6.3), under /secretbus/v1/<cluster>/:

    secrets/<uuid>/def     sealed {xml, inc}        gen = define counter
    secrets/<uuid>/value   sealed value             gen = value counter, bound to the def's inc
    usage/<HMAC>           <uuid>                   fleet-wide usage uniqueness
    meta/key-check         fingerprint of the fleet key (a host with another key refuses)
    hosts/<id>/pub         a host's X25519 public key, hostname, time (not secret; fleet join)
    hosts/<id>/wrap        the fleet key wrapped for that host (fleet approve; enrol_wrap.py)
    hosts/<id>/alive       hostname and start time, on a lease, while its service runs (presence.py)
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from secretbus.core.uuids import is_canonical

_CLUSTER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
HOST_ID = re.compile(r"[0-9a-f]{32}")      # hostkey.host_id: 128 bits of the public key's hash


def check_cluster(name: str) -> str:
    if not _CLUSTER.fullmatch(name):
        raise ValueError(f"fleet_cluster '{name}' must be 1-63 letters, digits, '.', '_' or '-'")
    return name


@dataclass(frozen=True)
class Keyspace:
    cluster: str

    @property
    def prefix(self) -> bytes:
        return f"/secretbus/v1/{self.cluster}/".encode()

    @property
    def secrets(self) -> bytes:
        return self.prefix + b"secrets/"

    def definition(self, uuid: str) -> bytes:
        return self.secrets + uuid.encode() + b"/def"

    def value(self, uuid: str) -> bytes:
        return self.secrets + uuid.encode() + b"/value"

    def usage(self, index: str) -> bytes:
        return self.prefix + b"usage/" + index.encode()

    @property
    def key_check(self) -> bytes:
        return self.prefix + b"meta/key-check"

    @property
    def hosts(self) -> bytes:
        return self.prefix + b"hosts/"

    def host_pub(self, host_id: str) -> bytes:
        return self.hosts + _host(host_id) + b"/pub"

    def host_wrap(self, host_id: str) -> bytes:
        return self.hosts + _host(host_id) + b"/wrap"

    def host_alive(self, host_id: str) -> bytes:
        return self.hosts + _host(host_id) + b"/alive"

    def parse_host(self, key: bytes) -> tuple[str, str] | None:
        """(host id, "pub" | "wrap" | "alive") of a host record's key; None for every other key."""
        if not key.startswith(self.hosts):
            return None
        parts = key[len(self.hosts):].decode("ascii", "replace").split("/")
        if len(parts) != 2 or parts[1] not in ("pub", "wrap", "alive") or not HOST_ID.fullmatch(parts[0]):
            return None
        return parts[0], parts[1]

    def parse(self, key: bytes) -> tuple[str, str] | None:
        """(uuid, "def" | "value") of a secret's key; None for every other key."""
        if not key.startswith(self.secrets):
            return None
        parts = key[len(self.secrets):].decode("ascii", "replace").split("/")
        if len(parts) != 2 or parts[1] not in ("def", "value") or not is_canonical(parts[0]):
            return None
        return parts[0], parts[1]


def _host(host_id: str) -> bytes:
    # A host id is typed by an operator (fleet approve ID): never let it name another key.
    if not HOST_ID.fullmatch(host_id):
        raise ValueError(f"'{host_id}' is not a fleet host id (32 hex digits, as 'fleet join' prints)")
    return host_id.encode()


class _Keyed(Protocol):
    @property
    def key(self) -> bytes: ...


K = TypeVar("K", bound=_Keyed)


def group_records(kvs: Iterable[K], parse: Callable[[bytes], tuple[str, str] | None]) -> dict[str, dict[str, K]]:
    """Records of one range read by the id `parse` finds in their key, then by record kind
    (Keyspace.parse: uuid -> def/value; parse_host: host id -> pub/wrap/alive); other keys left out."""
    out: dict[str, dict[str, K]] = {}
    for kv in kvs:
        parsed = parse(kv.key)
        if parsed is not None:
            out.setdefault(parsed[0], {})[parsed[1]] = kv
    return out


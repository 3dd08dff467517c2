"""Names of the fleet's etcd keys (research/fleet.md §6.3), under /secretbus/v1/<cluster>/:

    secrets/<uuid>/def     sealed {xml, inc}        gen = define counter
    secrets/<uuid>/value   sealed value             gen = value counter, bound to the def's inc
    usage/<HMAC>           <uuid>                   fleet-wide usage uniqueness
    meta/key-check         fingerprint of the fleet key (a host with another key refuses)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from secretbus.core.uuids import is_canonical

_CLUSTER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


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

    def parse(self, key: bytes) -> tuple[str, str] | None:
        """(uuid, "def" | "value") of a secret's key; None for every other key."""
        if not key.startswith(self.secrets):
            return None
        parts = key[len(self.secrets):].decode("ascii", "replace").split("/")
        if len(parts) != 2 or parts[1] not in ("def", "value") or not is_canonical(parts[0]):
            return None
        return parts[0], parts[1]

"""Sealing of what the fleet puts in etcd, under the fleet data key (FDK).

A record is  b"SBF1" || key_version(u32) || gen(u64) || nonce(12) || AES-256-GCM(plaintext)
with AAD = b"sbfleet1" | kind | cluster | uuid | gen | key_version | extra, so a record copied
to another cluster, secret, kind or generation fails authentication. Usage ids never reach
etcd in clear: the usage index key is HMAC-SHA256 under a key derived from the FDK.
No key or plaintext byte ever reaches a repr, an exception or a log line.

A Sealer holds a key ring: it seals under its newest version and opens every version it
holds, so a host reads records of both sides of a rotation (fleet/rotate.py). The usage index
and the value digest are the newest key's (rotation re-indexes).
"""
from __future__ import annotations

import copy
import hashlib
import hmac
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secretbus.core.model import UsageType
from secretbus.store.crypto import KEY_SIZE

MAGIC = b"SBF1"
AAD_TAG = b"sbfleet1"
_HEADER = struct.Struct(">4sIQ12s")


class SealError(Exception):
    """A record that does not authenticate under this key and binding (no detail leaks)."""


class NewerKey(SealError):
    """A record sealed with a key version newer than this host's: the fleet key was rotated."""

    def __init__(self, message: str, version: int):
        super().__init__(message)
        self.version = version


@dataclass(frozen=True)
class FleetKey:
    version: int
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_SIZE:
            raise ValueError(f"a fleet key has {KEY_SIZE} bytes")

    def check_value(self, cluster: str) -> str:
        """A public fingerprint stored in etcd, so a host with another key refuses to serve."""
        return hmac.new(self._derive(b"key-check", cluster), b"check", hashlib.sha256).hexdigest()[:32]

    def _derive(self, purpose: bytes, cluster: str) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"secretbus fleet " + purpose + b"|" + cluster.encode()).derive(self.key)


class Sealer:
    def __init__(self, cluster: str, key: FleetKey, older: Iterable[FleetKey] = ()):
        """`key` seals; it and the `older` versions open."""
        self.cluster = cluster
        self.key_version = key.version
        ring = {k.version: k for k in older}
        ring[key.version] = key
        if max(ring) != key.version:
            raise ValueError("a Sealer seals with the newest version of its ring")
        self._ring = {v: AESGCM(k.key) for v, k in ring.items()}
        self._aead = self._ring[key.version]
        self._index_key = key._derive(b"usage-index", cluster)
        self._digest_key = key._derive(b"value-digest", cluster)
        self.check_value = key.check_value(cluster)
        # Every version's fingerprint: the cluster's check may name any of them mid-rotation.
        self.check_values = frozenset(k.check_value(cluster) for k in ring.values())

    @property
    def versions(self) -> list[int]:
        return sorted(self._ring)

    def newest_only(self) -> Sealer:
        """This sealer without its older versions (retired once a rotation has finished)."""
        s = copy.copy(self)
        s._ring = {self.key_version: self._aead}
        s.check_values = frozenset({self.check_value})
        return s

    def __repr__(self) -> str:
        return f"Sealer(cluster={self.cluster!r}, key_version={self.key_version}, versions={self.versions})"

    def _aad(self, kind: str, uuid: str, gen: int, version: int, extra: str) -> bytes:
        return b"|".join([AAD_TAG, kind.encode(), self.cluster.encode(), uuid.encode(),
                          str(gen).encode(), str(version).encode(), extra.encode()])

    def seal(self, kind: str, uuid: str, gen: int, plaintext: bytes, extra: str = "") -> bytes:
        nonce = os.urandom(12)
        aad = self._aad(kind, uuid, gen, self.key_version, extra)
        return _HEADER.pack(MAGIC, self.key_version, gen, nonce) + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, kind: str, uuid: str, record: bytes, extra: str = "") -> tuple[int, bytes]:
        """(gen, plaintext) of a record sealed for (kind, uuid, extra)."""
        if len(record) < _HEADER.size + 16:
            raise SealError(f"fleet {kind} record of secret {uuid} is truncated")
        magic, version, gen, nonce = _HEADER.unpack_from(record)
        if magic != MAGIC:
            raise SealError(f"fleet {kind} record of secret {uuid} has an unknown format")
        aead = self._ring.get(version)
        if aead is None:
            text = (f"fleet {kind} record of secret {uuid} is sealed with fleet key version {version}, "
                    f"this host has version{'s' if len(self._ring) > 1 else ''} {', '.join(map(str, self.versions))}")
            if version > self.key_version:
                raise NewerKey(text, version)
            raise SealError(text)
        try:
            plain = aead.decrypt(nonce, record[_HEADER.size:], self._aad(kind, uuid, gen, version, extra))
        except InvalidTag:
            raise SealError(f"fleet {kind} record of secret {uuid} does not authenticate "
                            "(another fleet key, or the record was changed)") from None
        return gen, plain

    def usage_index(self, usage_type: UsageType, usage_id: str) -> str:
        """The usage index name of (type, id): the same on every host, opaque to etcd."""
        msg = f"{int(usage_type)}\0{usage_id}".encode()
        return hmac.new(self._index_key, msg, hashlib.sha256).hexdigest()

    def digest(self, value: bytes) -> bytes:
        """Tells whether a value changed without keeping it (an equal value is not re-sent)."""
        return hmac.new(self._digest_key, value, hashlib.sha256).digest()


def record_version(record: bytes) -> int | None:
    """The key version a sealed record names (None: not a record), without opening it."""
    if len(record) < _HEADER.size or record[:4] != MAGIC:
        return None
    return int(_HEADER.unpack_from(record)[1])


# meta/key-check holds the cluster key's fingerprint, or during a rotation
# "rotating <to-version> <old fingerprint> <new fingerprint>" (fleet writes are refused then).
ROTATING = "rotating"


def cluster_checks(value: bytes) -> frozenset[str]:
    """The fingerprints a key-check value accepts (a host holding any of them belongs)."""
    words = value.decode("ascii", "replace").split()
    if len(words) == 4 and words[0] == ROTATING:
        return frozenset(words[2:])
    return frozenset(words[:1]) if len(words) == 1 else frozenset()

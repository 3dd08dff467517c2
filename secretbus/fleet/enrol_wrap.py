"""The fleet key wrapped for one host (etcd `hosts/<id>/wrap`), HPKE-style:

    b"SBW1" || key_version(u32) || ephemeral X25519 public key(32) || nonce(12) || AES-256-GCM(fleet key)

The AES key is HKDF-SHA256 of the X25519 shared secret between a fresh ephemeral key and the
host's public key, salted with both public keys, with info = "secretbus fleet wrap" | cluster |
host id | key version; the same info is the AAD. So a wrap opens only with that host's private
key, and one copied to another host, cluster or version, or with a changed header, does not.
"""
from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secretbus.fleet.seal import FleetKey
from secretbus.store.crypto import KEY_SIZE

MAGIC = b"SBW1"
_HEADER = struct.Struct(">4sI32s12s")
SIZE = _HEADER.size + KEY_SIZE + 16


class WrapError(Exception):
    """A wrap that is malformed or does not open with this host's key (no detail leaks)."""


def _info(cluster: str, host: str, version: int) -> bytes:
    return b"|".join([b"secretbus fleet wrap", cluster.encode(), host.encode(), str(version).encode()])


def _kek(shared: bytes, ephemeral: bytes, recipient: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=info).derive(shared)


def wrap(key: FleetKey, recipient: bytes, cluster: str, host: str) -> bytes:
    """`key` sealed to the X25519 public key `recipient` of host `host`."""
    try:
        peer = X25519PublicKey.from_public_bytes(recipient)
        eph = X25519PrivateKey.generate()
        shared = eph.exchange(peer)
    except ValueError:
        # (a malformed or low-order public key: OpenSSL refuses the all-zero shared secret)
        raise WrapError(f"the public key of host {host} is not a usable X25519 key") from None
    epk = eph.public_key().public_bytes_raw()
    info = _info(cluster, host, key.version)
    nonce = os.urandom(12)
    sealed = AESGCM(_kek(shared, epk, recipient, info)).encrypt(nonce, key.key, info)
    return _HEADER.pack(MAGIC, key.version, epk, nonce) + sealed


def wrap_version(record: bytes) -> int:
    """The key version a wrap claims (for listing; only unwrap() proves it)."""
    if len(record) != SIZE or record[:4] != MAGIC:
        raise WrapError("not a fleet key wrap")
    return int(_HEADER.unpack_from(record)[1])


def unwrap(record: bytes, private: X25519PrivateKey, cluster: str, host: str) -> FleetKey:
    version = wrap_version(record)
    _, _, epk, nonce = _HEADER.unpack_from(record)
    info = _info(cluster, host, version)
    recipient = private.public_key().public_bytes_raw()
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(epk))
        key = AESGCM(_kek(shared, epk, recipient, info)).decrypt(nonce, record[_HEADER.size:], info)
    except (ValueError, InvalidTag):
        raise WrapError(f"the fleet key wrap for host {host} does not open with this host's key "
                        "(wrapped for another key, host or cluster, or changed)") from None
    return FleetKey(version, key)

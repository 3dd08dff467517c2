"""This host's fleet identity: an X25519 key pair made by `secretbus fleet join` (or `init`).

The private half lives only in the fleet state directory (0700), sealed with systemd-creds like
the fleet key (keyfile.py), or as a raw 0600 file for hosts without systemd and for tests; it is
never replaced once made, so the host id stays the same across joins. The host id is derived
from the public key: an operator who approves the id `fleet join` printed approves exactly that
key, and a public key swapped in etcd afterwards no longer matches its id.
"""
from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secretbus.core import errors
from secretbus.fleet.keyfile import remove_files
from secretbus.store import fsutil
from secretbus.store.keys import load_key, seal_key, unseal_key

CREDENTIAL_NAME = "secretbus-fleet-host-key"
RAW_NAME = "host-key"
SEALED_NAME = "host-key.cred"
PUBLIC_SIZE = 32


def host_id(public: bytes) -> str:
    """128 bits of a domain-separated hash of the public key (32 hex digits)."""
    return hashlib.sha256(b"secretbus fleet host id\0" + public).hexdigest()[:32]


def fingerprint(public: bytes) -> str:
    """What an operator compares (ssh's style): the whole SHA-256 of the public key."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(public).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class HostKey:
    private: X25519PrivateKey = field(repr=False)
    raw: bool         # how it is kept on disk: the fleet key picked up later is kept the same way

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes_raw()

    @property
    def id(self) -> str:
        return host_id(self.public)

    def __repr__(self) -> str:
        return f"HostKey(id={self.id!r}, raw={self.raw})"


def has_host_key(directory: Path) -> bool:
    return any((directory / name).exists() for name in (SEALED_NAME, RAW_NAME))


def load_host_key(directory: Path, environ: Mapping[str, str] = os.environ) -> HostKey:
    sealed, raw = directory / SEALED_NAME, directory / RAW_NAME
    if sealed.exists():
        return HostKey(X25519PrivateKey.from_private_bytes(unseal_key(sealed, environ, CREDENTIAL_NAME)), False)
    if raw.exists():
        return HostKey(X25519PrivateKey.from_private_bytes(load_key(raw)), True)
    raise errors.ConfigError(f"this host has no fleet identity in '{directory}' (run 'secretbus fleet join')")


def load_or_create_host_key(directory: Path, *, raw: bool = False, with_key: str | None = None,
                            environ: Mapping[str, str] = os.environ) -> tuple[HostKey, bool]:
    """(this host's key, whether it was made now)."""
    if has_host_key(directory):
        return load_host_key(directory, environ), False
    private = X25519PrivateKey.generate()
    material = private.private_bytes_raw()
    name = RAW_NAME if raw else SEALED_NAME
    try:
        dir_fd = fsutil.open_dir(directory, create=True)
    except OSError as e:
        raise errors.OperationFailed(f"cannot create '{directory}': {e.strerror or e}") from None
    try:
        # O_EXCL (write_new): two joins at once cannot both make a key; the loser fails here.
        fsutil.write_new(dir_fd, name, material if raw else seal_key(material, with_key, environ, CREDENTIAL_NAME))
        os.fsync(dir_fd)
    except FileExistsError:
        raise errors.OperationFailed(f"a host key appeared in '{directory}' meanwhile; run the command again") from None
    except OSError as e:
        raise errors.OperationFailed(f"cannot create the host key in '{directory}': {e.strerror or e}") from None
    finally:
        os.close(dir_fd)
    return HostKey(private, raw), True


def remove_host_key(directory: Path) -> list[Path]:
    return remove_files(directory, (SEALED_NAME, RAW_NAME))

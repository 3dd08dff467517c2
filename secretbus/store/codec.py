"""Value file codecs: how a secret's value bytes become the content of `<uuid>.<suffix>`.

The store picks one codec for writing and keeps every codec it can read. Adding a
format means adding a codec here (or in crypto.py); the driver never sees formats.
"""
from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass, field
from typing import Protocol

from secretbus.core.model import SecretDef


class Damage(enum.Enum):
    """Why a value file could not be decoded (said in logs; never includes content)."""

    BAD_ENCODING = "not valid base64"
    TRUNCATED = "truncated"
    TAMPERED = "failed authentication (modified or corrupted)"
    WRONG_KEY = "encrypted with a different key"
    MOVED = "belongs to another secret (moved or swapped)"
    NO_KEY = "encrypted, but no encryption key is loaded"
    BAD_PADDING = "decryption failed (wrong key or corrupted)"
    UNBOUND = "unbound format (SBG1), not tied to the definition"
    UNHIDDEN = "bound to private='yes' but the XML says private='no' (definition edited)"
    LEGACY = "legacy format, not read while the write scheme is aes256gcm"


class ValueFileError(Exception):
    """A value file that cannot be turned back into the value. Never carries content."""

    def __init__(self, damage: Damage, detail: str = ""):
        super().__init__(damage.value + (f" ({detail})" if detail else ""))
        self.damage = damage


@dataclass(frozen=True)
class Binding:
    """What a value file is bound to: the secret's UUID and the security-relevant fields of
    its definition. An authenticated codec covers all of it; the others use only the UUID."""

    uuid: str
    private: bool = False
    usage_type: int = 0
    usage_id: str = ""

    @classmethod
    def of(cls, d: SecretDef) -> Binding:
        return cls(d.uuid, bool(d.private), int(d.usage_type), d.usage_id or "")

    def with_private(self, private: bool) -> Binding:
        return Binding(self.uuid, private, self.usage_type, self.usage_id)

    def aad(self) -> bytes:
        """Unambiguous bytes: each text field length-prefixed (4 bytes, big-endian)."""
        def field(text: str) -> bytes:
            raw = text.encode("utf-8")
            return len(raw).to_bytes(4, "big") + raw
        return (field(self.uuid) + bytes([1 if self.private else 0, self.usage_type & 0xFF])
                + field(self.usage_id))


class ValueCodec(Protocol):
    suffix: str  # file suffix without the dot: "base64", "aes256gcm", "aes256cbc"

    def encode(self, binding: Binding, value: bytes) -> bytes:
        """File content for `value` of the secret `binding` describes."""

    def decode(self, binding: Binding, data: bytes) -> bytes:
        """Value from file content; raises ValueFileError."""


def strict_b64decode(data: bytes) -> bytes:
    """Standard base64 with padding; surrounding whitespace tolerated, anything else refused.

    libvirt's decoder skips invalid characters and returns garbage; we refuse instead.
    """
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueFileError(Damage.BAD_ENCODING) from None


class Base64Codec:
    """libvirt's plain scheme: `<uuid>.base64`, one line of standard base64, no newline."""

    suffix = "base64"

    def encode(self, binding: Binding, value: bytes) -> bytes:
        return base64.b64encode(value)

    def decode(self, binding: Binding, data: bytes) -> bytes:
        return strict_b64decode(data)


@dataclass
class ValueCodecs:
    """The store's codec choice: one writer, every reader (the writer among them)."""

    writer: ValueCodec
    readers: dict[str, ValueCodec] = field(default_factory=dict)
    # During a key rotation (store/rotation.py): GCM codecs of the key being retired, by key
    # id; a file under one of them is read, then re-written under the writer.
    retiring: dict[bytes, ValueCodec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.readers.setdefault(self.writer.suffix, self.writer)


# Formats without authentication: while the writer is GCM they are read only by an
# explicit migration (rewrite-values), never beside a GCM file.
LEGACY_SUFFIXES = ("aes256cbc", "base64")

# Every suffix the store knows of, whether or not it can read it right now; used to
# find and remove stale value files of other schemes.
KNOWN_SUFFIXES = ("aes256gcm", "aes256cbc", "base64")


"""Encrypted value codecs: secretbus's `.aes256gcm` and libvirt 12.1's `.aes256cbc`.

`.aes256gcm` file content (one line of standard base64, no newline) of

    b"SBG2" || key_id(8) || nonce(12) || AES-256-GCM(value) ciphertext || tag(16)

with AAD = b"SBG2" || key_id || Binding.aad() (UUID, private flag, usage type and id).
Binding the UUID means a value file copied or renamed to another secret fails
authentication; binding the private flag and usage means an XML edited by someone
without the key (private flipped off, usage changed) fails too. The key id tells
"wrong key" apart from "modified" without trying the key. The previous format SBG1
(AAD = b"SBG1" || key_id || uuid) is read only through `decode_unbound`.

`.aes256cbc` (libvirt, unauthenticated): base64 of IV(16) || AES-256-CBC(PKCS#7(value)).
With the wrong key, CBC decryption gives random bytes whose padding is valid about
once in 256 tries; that format cannot do better, which is why GCM is the default.

No key or value byte ever reaches a repr, an exception or a log line.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secretbus.core import errors
from secretbus.store.codec import Binding, Damage, ValueFileError, strict_b64decode

KEY_SIZE = 32
KEY_ID_SIZE = 8
GCM_MAGIC = b"SBG2"      # AAD binds the definition (see Binding.aad)
GCM_MAGIC_V1 = b"SBG1"   # previous format: AAD binds the UUID only
GCM_NONCE_SIZE = 12
GCM_TAG_SIZE = 16
GCM_HEADER_SIZE = len(GCM_MAGIC) + KEY_ID_SIZE + GCM_NONCE_SIZE   # 24
CBC_IV_SIZE = 16
CBC_BLOCK = 16

_B64_ALPHABET_ONLY = re.compile(rb"[A-Za-z0-9+/]*")


def key_id(key: bytes) -> bytes:
    """Public fingerprint of a key: first 8 bytes of SHA-256(b"secretbus-key-id" || key)."""
    return hashlib.sha256(b"secretbus-key-id" + key).digest()[:KEY_ID_SIZE]


def gcm_key_id(data: bytes) -> bytes | None:
    """The key id in the header of `.aes256gcm` file content (SBG1 or SBG2), or None if the
    content does not start like one. Reads only the header: 16 base64 characters."""
    try:
        head = base64.b64decode(data.strip()[:16], validate=True)
    except (binascii.Error, ValueError):
        return None
    if head[:len(GCM_MAGIC)] not in (GCM_MAGIC, GCM_MAGIC_V1) or len(head) < len(GCM_MAGIC) + KEY_ID_SIZE:
        return None
    return head[len(GCM_MAGIC):len(GCM_MAGIC) + KEY_ID_SIZE]


def _check_key(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
        raise errors.InvalidEncrKey(f"Encryption key length must be '{KEY_SIZE}'")


def _b64decode(data: bytes) -> bytes:
    """strict_b64decode, but tell a cut-off file (clean alphabet, at most two '=' at
    the end, length not a multiple of 4) apart from one with foreign characters."""
    try:
        return strict_b64decode(data)
    except ValueFileError:
        text = data.strip()
        core = text.rstrip(b"=")
        if len(text) % 4 and len(text) - len(core) <= 2 and _B64_ALPHABET_ONLY.fullmatch(core):
            raise ValueFileError(Damage.TRUNCATED, "base64 text cut short") from None
        raise


class _KeyHolder:
    """Shared guard: a codec holding a key must not show or serialise it."""

    suffix: str
    key_id: bytes   # public fingerprint, safe to show

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_id={self.key_id.hex()})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError(f"{type(self).__name__} holds a key and cannot be pickled")


class GcmCodec(_KeyHolder):
    """secretbus's authenticated format, suffix `aes256gcm`; writes SBG2, reads SBG1 only
    through `decode_unbound` (the store decides when that is allowed)."""

    suffix = "aes256gcm"

    def __init__(self, key: bytes):
        _check_key(key)
        self._aead = AESGCM(bytes(key))
        self.key_id = key_id(bytes(key))

    def _aad(self, binding: Binding) -> bytes:
        return GCM_MAGIC + self.key_id + binding.aad()

    def _aad_v1(self, uuid: str) -> bytes:
        return GCM_MAGIC_V1 + self.key_id + uuid.encode("ascii")

    def encode(self, binding: Binding, value: bytes) -> bytes:
        return self._encode_with_nonce(binding, value, os.urandom(GCM_NONCE_SIZE))

    def _encode_with_nonce(self, binding: Binding, value: bytes, nonce: bytes) -> bytes:
        # Separate only so that tests can check exact bytes; production nonces are random.
        if len(nonce) != GCM_NONCE_SIZE:
            raise ValueError("GCM nonce must be 12 bytes")
        sealed = self._aead.encrypt(nonce, bytes(value), self._aad(binding))
        return base64.b64encode(GCM_MAGIC + self.key_id + nonce + sealed)

    def decode(self, binding: Binding, data: bytes) -> bytes:
        """An SBG2 value bound to exactly `binding`. An SBG1 file raises UNBOUND."""
        nonce, body = self._open(data, unbound_ok=False)
        try:
            return self._aead.decrypt(nonce, body, self._aad(binding))
        except InvalidTag:
            raise ValueFileError(Damage.TAMPERED) from None

    def decode_unbound(self, uuid: str, data: bytes) -> bytes:
        """An SBG1 file (AAD covers only the UUID): for upgrades and migration only."""
        nonce, body = self._open(data, unbound_ok=True)
        try:
            return self._aead.decrypt(nonce, body, self._aad_v1(uuid))
        except InvalidTag:
            raise ValueFileError(Damage.TAMPERED) from None

    def _open(self, data: bytes, unbound_ok: bool) -> tuple[bytes, bytes]:
        raw = _b64decode(data)
        head = raw[:len(GCM_MAGIC)]
        if not (GCM_MAGIC.startswith(head) or GCM_MAGIC_V1.startswith(head)):
            # Not ours (e.g. another format under this suffix): the content is not
            # damaged by a cut or a bit flip in the body, it is the wrong encoding.
            raise ValueFileError(Damage.BAD_ENCODING, "no SBG2 header")
        if len(raw) < GCM_HEADER_SIZE + GCM_TAG_SIZE:
            raise ValueFileError(Damage.TRUNCATED, f"{len(raw)} bytes")
        v1 = head == GCM_MAGIC_V1
        if v1 != unbound_ok:
            raise ValueFileError(Damage.UNBOUND if v1 else Damage.BAD_ENCODING,
                                 "" if v1 else "not an SBG1 file")
        kid = raw[len(GCM_MAGIC):len(GCM_MAGIC) + KEY_ID_SIZE]
        if kid != self.key_id:
            raise ValueFileError(Damage.WRONG_KEY, f"key_id={kid.hex()}")
        return raw[len(GCM_MAGIC) + KEY_ID_SIZE:GCM_HEADER_SIZE], raw[GCM_HEADER_SIZE:]


class CbcCodec(_KeyHolder):
    """libvirt 12.1's unauthenticated format, suffix `aes256cbc`."""

    suffix = "aes256cbc"

    def __init__(self, key: bytes):
        _check_key(key)
        self._cipher_key = bytes(key)
        self.key_id = key_id(self._cipher_key)

    def encode(self, binding: Binding, value: bytes) -> bytes:
        iv = os.urandom(CBC_IV_SIZE)
        padder = padding.PKCS7(CBC_BLOCK * 8).padder()
        padded = padder.update(bytes(value)) + padder.finalize()
        enc = Cipher(algorithms.AES(self._cipher_key), modes.CBC(iv)).encryptor()
        return base64.b64encode(iv + enc.update(padded) + enc.finalize())

    def decode(self, binding: Binding, data: bytes) -> bytes:
        raw = _b64decode(data)
        # IV plus at least one block (padding is never empty), whole blocks only.
        if len(raw) < CBC_IV_SIZE + CBC_BLOCK or len(raw) % CBC_BLOCK:
            raise ValueFileError(Damage.TRUNCATED, f"{len(raw)} bytes")
        iv, body = raw[:CBC_IV_SIZE], raw[CBC_IV_SIZE:]
        dec = Cipher(algorithms.AES(self._cipher_key), modes.CBC(iv)).decryptor()
        padded = dec.update(body) + dec.finalize()
        unpadder = padding.PKCS7(CBC_BLOCK * 8).unpadder()
        try:
            return unpadder.update(padded) + unpadder.finalize()
        except ValueError:
            raise ValueFileError(Damage.BAD_PADDING) from None


class NoKeyCodec:
    """Stands in for an encrypted format while no key is loaded: such files exist
    (encryption was turned off, or the credential is missing) but cannot be read."""

    def __init__(self, suffix: str):
        self.suffix = suffix

    def __repr__(self) -> str:
        return f"NoKeyCodec({self.suffix!r})"

    def encode(self, binding: Binding, value: bytes) -> bytes:
        raise errors.InternalError(f"cannot write '.{self.suffix}' values: no encryption key is loaded")

    def decode(self, binding: Binding, data: bytes) -> bytes:
        raise ValueFileError(Damage.NO_KEY)

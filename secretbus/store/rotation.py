"""Online rotation of the local encryption key: the record that makes it crash-safe.

`secretbus rotate-key` replaces the key K1 that encrypts the store by a new key K2 while the
service keeps serving. The steps, each durable before the next:

  1. RECORD_NAME in the store directory: K2 wrapped under K1 (AES-256-GCM, both key ids
     in the AAD), and `<key file>.next`: K2 in the key file's own form (sealed with
     systemd-creds, or raw);
  2. every start or reload that loads K1 finds the record, writes with K2 and still reads
     K1's files, re-writing each of them under K2 as it loads (the usual atomic write):
     no value is unreadable at any moment, whichever key its file is under;
  3. once no file is left under K1, `<key file>.next` is renamed over the key file: the
     next start loads K2 (systemd's `LoadCredentialEncrypted=` reads the same path);
  4. a start or reload that loads K2 and finds the record (new id = K2) removes it: K1 is
     retired.

A crash at any point leaves one of these states, and each of them loads every value: K1 with
or without the record (its K2 reachable through K1), or K2 with or without the record. The
record holds K2 only under K1, so it adds nothing for someone who has neither; no key byte
is ever logged or shown, only key ids.
"""
from __future__ import annotations

import base64
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secretbus.core import errors
from secretbus.store import fsutil
from secretbus.store.crypto import KEY_ID_SIZE, KEY_SIZE, key_id

log = logging.getLogger("secretbus.store")

RECORD_NAME = "key-rotation"        # in the store directory; the loader reads only *.xml and values
NEXT_SUFFIX = ".next"               # beside the key file: the new key in the key file's form
_MAGIC = b"SBK1"
_NONCE = 12
_RECORD_MAX = 4096


@dataclass(frozen=True)
class Rotation:
    """What the record says about the key that was loaded."""

    old_id: bytes
    new_id: bytes
    new_key: bytes | None = field(default=None, repr=False)   # only while rotating from the loaded key

    @property
    def rotating(self) -> bool:
        return self.new_key is not None


def _aad(old_id: bytes, new_id: bytes) -> bytes:
    return _MAGIC + old_id + new_id


def seal_record(old_key: bytes, new_key: bytes) -> bytes:
    old_id, new_id = key_id(old_key), key_id(new_key)
    nonce = os.urandom(_NONCE)
    wrapped = AESGCM(old_key).encrypt(nonce, new_key, _aad(old_id, new_id))
    return base64.b64encode(_MAGIC + old_id + new_id + nonce + wrapped)


def open_record(data: bytes, loaded_key: bytes) -> Rotation:
    """The record's meaning for `loaded_key`; errors.ConfigError if it is not a record."""
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except ValueError:
        raise errors.ConfigError(f"key rotation record '{RECORD_NAME}' is not valid base64") from None
    head = len(_MAGIC) + 2 * KEY_ID_SIZE
    if raw[:len(_MAGIC)] != _MAGIC or len(raw) != head + _NONCE + KEY_SIZE + 16:
        raise errors.ConfigError(f"key rotation record '{RECORD_NAME}' is damaged")
    old_id, new_id = raw[len(_MAGIC):len(_MAGIC) + KEY_ID_SIZE], raw[len(_MAGIC) + KEY_ID_SIZE:head]
    loaded = key_id(loaded_key)
    if loaded != old_id:
        return Rotation(old_id, new_id)
    try:
        new_key = AESGCM(loaded_key).decrypt(raw[head:head + _NONCE], raw[head + _NONCE:], _aad(old_id, new_id))
    except InvalidTag:
        raise errors.ConfigError(f"key rotation record '{RECORD_NAME}' does not authenticate under "
                                 f"key_id={loaded.hex()}") from None
    if key_id(new_key) != new_id:
        raise errors.ConfigError(f"key rotation record '{RECORD_NAME}' names another key than it holds")
    return Rotation(old_id, new_id, new_key)


def read_rotation(store_dir: Path, loaded_key: bytes) -> Rotation | None:
    """The store's rotation record as it concerns `loaded_key`, or None if there is none.
    A record whose new key is the loaded one is finished: it is removed here (step 4)."""
    try:
        fd = fsutil.open_dir(store_dir, read_only=True)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise errors.ConfigError(f"cannot open '{store_dir}': {e.strerror}") from None
    try:
        try:
            data = fsutil.read_limited(RECORD_NAME, _RECORD_MAX, dir_fd=fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise errors.ConfigError(f"cannot read '{store_dir / RECORD_NAME}': {e.strerror}") from None
        rot = open_record(data, loaded_key)
        if rot.rotating:
            return rot
        if rot.new_id == key_id(loaded_key):
            _remove_record(store_dir)
            log.info("key rotation from key_id=%s to key_id=%s complete: old key retired",
                     rot.old_id.hex(), rot.new_id.hex())
            return None
        # Neither key of the record is loaded: the values under its keys are skipped with
        # "wrong key" anyway; the record is left for the administrator to judge.
        log.warning("key rotation record '%s' is about key_id=%s -> key_id=%s, but key_id=%s is loaded; "
                    "ignored", store_dir / RECORD_NAME, rot.old_id.hex(), rot.new_id.hex(),
                    key_id(loaded_key).hex())
        return None
    finally:
        os.close(fd)


def _remove_record(store_dir: Path) -> None:
    try:
        with fsutil.verified_dir(store_dir) as fd:
            if fsutil.unlink_at(fd, RECORD_NAME):
                os.fsync(fd)
    except OSError as e:
        # Harmless: the next load tries again, and the record opens only under the old key.
        log.warning("cannot remove the finished key rotation record: %s", e.strerror)


def write_record(store_dir: Path, old_key: bytes, new_key: bytes) -> None:
    """Step 1's record, written atomically (temp file, fsync, rename, fsync the directory)."""
    try:
        with fsutil.verified_dir(store_dir, create=True) as fd:
            fsutil.atomic_write_at(fd, RECORD_NAME, seal_record(old_key, new_key))
    except OSError as e:
        raise errors.OperationFailed(f"cannot write '{store_dir / RECORD_NAME}': {e.strerror or e}") from None

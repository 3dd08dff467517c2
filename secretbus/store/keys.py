"""Encryption key: where it comes from, loading it, the codec choice, and
creating the sealed key once (what virt-secret-init-encryption.service does).

Precedence, row by row (libvirt's, except row 5):
  1. `secrets_encryption_key` in secret.conf, if set, is the key path;
  2. else `$CREDENTIALS_DIRECTORY/secrets-encryption-key` if that file exists
     (systemd `LoadCredentialEncrypted=` puts it there);
  3. `encrypt_data` unset → encrypt iff a key path is known;
  4. `encrypt_data = 0` → no encryption, and the key is not read at all;
  5. `encrypt_data = 1` with no path → ConfigError. (libvirt falls back to a
     surprising `<user runtime dir>/secrets/encryption-key` instead.)
"""
from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from secretbus.core import errors
from secretbus.store import fsutil
from secretbus.store.codec import KNOWN_SUFFIXES, Base64Codec, ValueCodec, ValueCodecs
from secretbus.store.conf import SecretConf
from secretbus.store.crypto import KEY_SIZE, CbcCodec, GcmCodec, NoKeyCodec
from secretbus.store.rotation import read_rotation

CREDENTIAL_NAME = "secrets-encryption-key"
SEALED_KEY_PATH = Path("/var/lib/libvirt/secrets/secrets-encryption-key")
SYSTEMD_CREDS = "systemd-creds"


@dataclass(frozen=True)
class KeyChoice:
    encrypt: bool
    path: Path | None   # key file that would be used (kept for logs even when encrypt is False)
    source: str         # "secret.conf", "credential" or "none"


def resolve_key(conf: SecretConf, environ: Mapping[str, str] = os.environ) -> KeyChoice:
    path: Path | None
    if conf.secrets_encryption_key is not None:
        path, source = Path(conf.secrets_encryption_key), "secret.conf"
    else:
        path, source = _credential_path(environ), "credential"
        if path is None:
            source = "none"
    encrypt = path is not None if conf.encrypt_data is None else conf.encrypt_data
    if encrypt and path is None:
        raise errors.ConfigError(
            "encrypt_data = 1 but no key: set secrets_encryption_key or provide the "
            f"{CREDENTIAL_NAME} credential")
    return KeyChoice(encrypt=encrypt, path=path, source=source)


def _credential_path(environ: Mapping[str, str]) -> Path | None:
    d = environ.get("CREDENTIALS_DIRECTORY")
    if not d:
        return None
    p = Path(d) / CREDENTIAL_NAME
    try:
        os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        # Not "absent": silently turning encryption off here would be wrong.
        raise errors.ConfigError(f"Failed to open file '{p}': {e.strerror}") from None
    return p


def load_key(path: Path) -> bytes:
    """Exactly 32 raw bytes from a private regular file of ours, in a directory nobody else
    can write (messages never show key bytes)."""
    path = Path(path)
    try:
        dir_fd = fsutil.open_dir(path.parent, read_only=True)
    except OSError as e:
        raise errors.ConfigError(f"Failed to open file '{path}': {e.strerror}") from None
    try:
        return _read_key(dir_fd, path)
    finally:
        os.close(dir_fd)


def _read_key(dir_fd: int, path: Path) -> bytes:
    try:
        st = os.lstat(path.name, dir_fd=dir_fd)
    except OSError as e:
        raise errors.ConfigError(f"Failed to open file '{path}': {e.strerror}") from None
    # lstat first: opening a FIFO would block, and a symlink could point anywhere.
    if not stat.S_ISREG(st.st_mode):
        raise errors.ConfigError(f"key file '{path}' is not a regular file")
    if st.st_uid != os.geteuid():
        raise errors.ConfigError(
            f"key file '{path}' is owned by uid {st.st_uid}, not by uid {os.geteuid()} (ours)")
    if st.st_mode & 0o077:
        raise errors.ConfigError(
            f"key file '{path}' has mode {stat.S_IMODE(st.st_mode):04o}; it must not be "
            "accessible by group or others (chmod 0600)")
    wrong_size = errors.InvalidEncrKey(f"Encryption key length must be '{KEY_SIZE}' '{path}'")
    try:
        key = fsutil.read_limited(path.name, KEY_SIZE + 1, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise wrong_size from None
        raise errors.ConfigError(f"Failed to open file '{path}': {e.strerror}") from None
    if len(key) != KEY_SIZE:
        raise wrong_size
    return key


def codecs_for(conf: SecretConf, environ: Mapping[str, str] = os.environ,
               store_dir: Path | None = None) -> tuple[ValueCodecs, str | None]:
    """Writer and readers for the store; the description is None when no key is loaded.
    With `store_dir`, a key rotation recorded there (store/rotation.py) is taken up: the new
    key writes, the loaded one is still read."""
    choice = resolve_key(conf, environ)
    plain = Base64Codec()
    if not choice.encrypt:
        readers: dict[str, ValueCodec] = {
            s: (plain if s == plain.suffix else NoKeyCodec(s)) for s in KNOWN_SUFFIXES}
        return ValueCodecs(writer=plain, readers=readers), None
    assert choice.path is not None
    key = load_key(choice.path)
    rot = read_rotation(store_dir, key) if store_dir is not None else None
    by_suffix: dict[str, ValueCodec] = {
        "aes256gcm": GcmCodec(key), "aes256cbc": CbcCodec(key), "base64": plain}
    retiring: dict[bytes, ValueCodec] = {}
    rotating_from = ""
    if rot is not None and rot.new_key is not None:
        rotating_from = f" (rotating from key_id={rot.old_id.hex()})"
        if conf.encryption_scheme != "aes256gcm":
            raise errors.ConfigError(f"a key rotation is in progress in '{store_dir}'; it needs "
                                     'encryption_scheme = "aes256gcm"')
        retiring[rot.old_id] = by_suffix["aes256gcm"]
        by_suffix["aes256gcm"] = GcmCodec(rot.new_key)
    writer = by_suffix[conf.encryption_scheme]
    readers = {s: by_suffix[s] for s in KNOWN_SUFFIXES}
    kid = writer.key_id.hex()  # type: ignore[attr-defined]
    desc = f"{conf.encryption_scheme} key_id={kid}{rotating_from} from {choice.source} '{choice.path}'"
    return ValueCodecs(writer=writer, readers=readers, retiring=retiring), desc


def init_encryption(key_path: Path = SEALED_KEY_PATH, with_key: str | None = None,
                    raw: bool = False, environ: Mapping[str, str] = os.environ) -> Path:
    """Create a fresh key once: sealed with systemd-creds (default) or raw 0600 bytes.

    The key travels only through memory and the child's stdin, never argv or logs.
    The final name appears atomically and is never replaced: the new file is
    hard-linked into place, which fails if the name already exists. The directory
    must be ours and writable by nobody else (fsutil.open_dir), else nothing is written.
    """
    key_path = Path(key_path)
    try:
        dir_fd = fsutil.open_dir(key_path.parent, create=True)
    except OSError as e:
        raise errors.OperationFailed(
            f"cannot create key file '{key_path}': {e.strerror or e}") from None
    try:
        _create(dir_fd, key_path, with_key, raw, environ)
    except OSError as e:
        raise errors.OperationFailed(
            f"cannot create key file '{key_path}': {e.strerror or e}") from None
    finally:
        os.close(dir_fd)
    return key_path


def _create(dir_fd: int, key_path: Path, with_key: str | None, raw: bool,
            environ: Mapping[str, str]) -> None:
    name = key_path.name
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    else:
        raise _exists(key_path)
    tmp = name + ".init"
    fsutil.unlink_at(dir_fd, tmp)  # leftover of an interrupted run; never the real key
    key = os.urandom(KEY_SIZE)
    content = key if raw else seal_key(key, with_key, environ)
    try:
        fsutil.write_new(dir_fd, tmp, content)
        try:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            raise _exists(key_path) from None
    finally:
        fsutil.unlink_at(dir_fd, tmp)
    os.fsync(dir_fd)


def _exists(p: Path) -> errors.SecretError:
    return errors.OperationFailed(f"key file '{p}' already exists; refusing to overwrite")


def seal_key(key: bytes, with_key: str | None, environ: Mapping[str, str], name: str = CREDENTIAL_NAME) -> bytes:
    """The sealed credential `name`, written by systemd-creds to its stdout (we create the file)."""
    argv = [SYSTEMD_CREDS, "encrypt", f"--name={name}"]
    if with_key is not None:
        argv.append(f"--with-key={with_key}")
    return _creds(argv + ["-", "-"], key, environ, "encrypt")


def unseal_key(path: Path, environ: Mapping[str, str], name: str = CREDENTIAL_NAME) -> bytes:
    """The 32-byte key in the sealed credential `name` at `path` (what LoadCredentialEncrypted= does)."""
    key = _creds([SYSTEMD_CREDS, "decrypt", f"--name={name}", str(path), "-"], b"", environ, "decrypt")
    if len(key) != KEY_SIZE:
        raise errors.InvalidEncrKey(f"{name} length must be '{KEY_SIZE}' '{path}'")
    return key


def _creds(argv: list[str], data: bytes, environ: Mapping[str, str], what: str) -> bytes:
    """Run systemd-creds with the key on stdin/stdout only (never argv, never logged)."""
    try:
        proc = subprocess.run(argv, input=data, capture_output=True, env=dict(environ), umask=0o077, check=False)
    except FileNotFoundError:
        raise errors.OperationFailed(f"{SYSTEMD_CREDS} not found; install systemd or use a raw key file") from None
    if proc.returncode != 0 or not proc.stdout:
        detail = proc.stderr.decode("utf-8", "replace").strip()[:300]
        raise errors.OperationFailed(f"{SYSTEMD_CREDS} {what} failed (exit status {proc.returncode}): {detail}")
    return proc.stdout

"""The fleet data key on this host: created once by `secretbus fleet init`, kept sealed with
systemd-creds (as the host key, store/keys.py) or, for tests and hosts without it, as a raw
0600 file. Loaded from, in order: the `secretbus-fleet-key` credential systemd passes
(`LoadCredentialEncrypted=`), the sealed file, the raw file.

Every host of a cluster holds the same key, sealed by each host itself: either from a copy
passed over ssh (`fleet init --from-file`) or unwrapped from the copy an enrolled host wrapped
for it in etcd (`fleet join` / `fleet approve`, enrol.py).
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from secretbus.core import errors
from secretbus.fleet.seal import FleetKey
from secretbus.store import fsutil
from secretbus.store.crypto import KEY_SIZE
from secretbus.store.keys import SYSTEMD_CREDS, load_key
from secretbus.store.paths import InstancePaths

CREDENTIAL_NAME = "secretbus-fleet-key"
RAW_NAME = "fleet-key"
SEALED_NAME = "fleet-key.cred"
KEY_VERSION = 1      # rotation (a later increment) adds versions


def fleet_dir(paths: InstancePaths) -> Path:
    """Beside the instance's secrets directory (persistent, unlike its runtime state dir)."""
    return paths.config_dir.parent / "secretbus-fleet"


def init_fleet_key(directory: Path, *, raw: bool = False, with_key: str | None = None,
                   environ: Mapping[str, str] = os.environ, key: bytes | None = None) -> Path:
    """Create the fleet key (or store `key`, a copy from the first host) once; never replaced."""
    name = RAW_NAME if raw else SEALED_NAME
    try:
        dir_fd = fsutil.open_dir(directory, create=True)
    except OSError as e:
        raise errors.OperationFailed(f"cannot create '{directory}': {e.strerror or e}") from None
    try:
        for existing in (RAW_NAME, SEALED_NAME):
            try:
                os.lstat(existing, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            raise errors.OperationFailed(f"fleet key '{directory / existing}' already exists; refusing to overwrite")
        material = os.urandom(KEY_SIZE) if key is None else key
        if len(material) != KEY_SIZE:
            raise errors.InvalidArg(f"a fleet key has {KEY_SIZE} bytes")
        fsutil.write_new(dir_fd, name, material if raw else _seal(material, with_key, environ))
        os.fsync(dir_fd)
    except OSError as e:
        raise errors.OperationFailed(f"cannot create fleet key in '{directory}': {e.strerror or e}") from None
    finally:
        os.close(dir_fd)
    return directory / name


def load_fleet_key(directory: Path, environ: Mapping[str, str] = os.environ) -> FleetKey:
    creds = environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        return FleetKey(KEY_VERSION, load_key(Path(creds) / CREDENTIAL_NAME))
    sealed = directory / SEALED_NAME
    if sealed.exists():
        return FleetKey(KEY_VERSION, _unseal(sealed, environ))
    raw = directory / RAW_NAME
    if raw.exists():
        return FleetKey(KEY_VERSION, load_key(raw))
    raise errors.ConfigError(f"fleet mode is configured but this host has no fleet key in '{directory}' "
                             "(run 'secretbus fleet init' on the first host)")


def has_fleet_key(directory: Path, environ: Mapping[str, str] = os.environ) -> bool:
    creds = environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        return True
    return any((directory / name).exists() for name in (SEALED_NAME, RAW_NAME))


def remove_fleet_key(directory: Path) -> list[Path]:
    """`fleet leave`: the files removed (a credential systemd passes is the unit's to drop)."""
    return remove_files(directory, (SEALED_NAME, RAW_NAME))


def remove_files(directory: Path, names: tuple[str, ...]) -> list[Path]:
    removed = []
    try:
        with fsutil.verified_dir(directory) as dir_fd:
            for name in names:
                if fsutil.unlink_at(dir_fd, name):
                    removed.append(directory / name)
            os.fsync(dir_fd)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise errors.OperationFailed(f"cannot remove files in '{directory}': {e.strerror or e}") from None
    return removed


def seal(key: bytes, with_key: str | None, environ: Mapping[str, str], name: str = CREDENTIAL_NAME) -> bytes:
    """The sealed form of `key` (systemd-creds, credential `name`)."""
    return _seal(key, with_key, environ, name)


def unseal(path: Path, environ: Mapping[str, str], name: str) -> bytes:
    return _unseal(path, environ, name)


def _seal(key: bytes, with_key: str | None, environ: Mapping[str, str], name: str = CREDENTIAL_NAME) -> bytes:
    argv = [SYSTEMD_CREDS, "encrypt", f"--name={name}"]
    if with_key is not None:
        argv.append(f"--with-key={with_key}")
    return _creds(argv + ["-", "-"], key, environ, "encrypt")


def _unseal(path: Path, environ: Mapping[str, str], name: str = CREDENTIAL_NAME) -> bytes:
    key = _creds([SYSTEMD_CREDS, "decrypt", f"--name={name}", str(path), "-"], b"", environ, "decrypt")
    if len(key) != KEY_SIZE:
        raise errors.InvalidEncrKey(f"{name} length must be '{KEY_SIZE}' '{path}'")
    return key


def _creds(argv: list[str], data: bytes, environ: Mapping[str, str], what: str) -> bytes:
    """Run systemd-creds with the key on stdin/stdout only (never argv, never logged)."""
    try:
        proc = subprocess.run(argv, input=data, capture_output=True, env=dict(environ), umask=0o077, check=False)
    except FileNotFoundError:
        raise errors.OperationFailed(f"{SYSTEMD_CREDS} not found; install systemd or use a raw fleet key") from None
    if proc.returncode != 0 or not proc.stdout:
        detail = proc.stderr.decode("utf-8", "replace").strip()[:300]
        raise errors.OperationFailed(f"{SYSTEMD_CREDS} {what} failed (exit status {proc.returncode}): {detail}")
    return proc.stdout

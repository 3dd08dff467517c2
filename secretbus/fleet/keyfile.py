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
import re
from collections.abc import Mapping
from pathlib import Path

from secretbus.core import errors
from secretbus.fleet.seal import FleetKey
from secretbus.store import fsutil
from secretbus.store.crypto import KEY_SIZE
from secretbus.store.keys import load_key, seal_key, unseal_key
from secretbus.store.paths import InstancePaths

CREDENTIAL_NAME = "secretbus-fleet-key"
RAW_NAME = "fleet-key"
SEALED_NAME = "fleet-key.cred"
KEY_VERSION = 1      # the first key's; `fleet rotate` adds fleet-key.v<N>[.cred] beside it
_VERSIONED = re.compile(r"fleet-key\.v([1-9][0-9]{0,8})(\.cred)?")
# The `--with-key` an administrator gave `fleet init` or `fleet join`, for the fleet keys this
# host seals later by itself (picked up at start-up, after `fleet approve` or a rotation).
SEAL_CHOICE_NAME = "seal-with"
_SEAL_CHOICE = re.compile(r"[a-z0-9][a-z0-9+-]{0,63}")     # systemd-creds' key types: host, tpm2, host+tpm2, ...


def key_names(version: int) -> tuple[str, str]:
    """(raw name, sealed name) of a key version's file."""
    if version == KEY_VERSION:
        return RAW_NAME, SEALED_NAME
    return f"fleet-key.v{version}", f"fleet-key.v{version}.cred"


def remember_seal_choice(directory: Path, with_key: str) -> None:
    """Record `with_key` (0600, atomically) as how this host seals its fleet keys from now on."""
    if not _SEAL_CHOICE.fullmatch(with_key):
        raise errors.InvalidArg(f"'{with_key}' is not a systemd-creds key type (--with-key)")
    try:
        with fsutil.verified_dir(directory) as dir_fd:
            fsutil.atomic_write_at(dir_fd, SEAL_CHOICE_NAME, f"{with_key}\n".encode())
    except OSError as e:
        raise errors.OperationFailed(f"cannot record the key choice in '{directory}': {e.strerror or e}") from None


def seal_choice(directory: Path) -> str | None:
    """The recorded `--with-key`, or None (systemd-creds' default). A record that is not one
    is refused rather than ignored: ignoring it would seal with another key than was asked."""
    path = directory / SEAL_CHOICE_NAME
    try:
        text = fsutil.read_limited(path, 256).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise errors.ConfigError(f"cannot read '{path}': {e.strerror or e}") from None
    if not _SEAL_CHOICE.fullmatch(text):
        raise errors.ConfigError(f"'{path}' does not name a systemd-creds key type")
    return text


def fleet_dir(paths: InstancePaths) -> Path:
    """Beside the instance's secrets directory (persistent, unlike its runtime state dir)."""
    return paths.config_dir.parent / "secretbus-fleet"


def init_fleet_key(directory: Path, *, raw: bool = False, with_key: str | None = None,
                   environ: Mapping[str, str] = os.environ, key: bytes | None = None,
                   version: int = KEY_VERSION) -> Path:
    """Create the fleet key (or store `key`, a copy from the first host) once; never replaced."""
    raw_name, sealed_name = key_names(version)
    name = raw_name if raw else sealed_name
    try:
        dir_fd = fsutil.open_dir(directory, create=True)
    except OSError as e:
        raise errors.OperationFailed(f"cannot create '{directory}': {e.strerror or e}") from None
    try:
        for existing in (raw_name, sealed_name):
            try:
                os.lstat(existing, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            raise errors.OperationFailed(f"fleet key '{directory / existing}' already exists; refusing to overwrite")
        material = os.urandom(KEY_SIZE) if key is None else key
        if len(material) != KEY_SIZE:
            raise errors.InvalidArg(f"a fleet key has {KEY_SIZE} bytes")
        fsutil.write_new(dir_fd, name, material if raw else seal_key(material, with_key, environ, CREDENTIAL_NAME))
        os.fsync(dir_fd)
    except OSError as e:
        raise errors.OperationFailed(f"cannot create fleet key in '{directory}': {e.strerror or e}") from None
    finally:
        os.close(dir_fd)
    return directory / name


def load_fleet_key(directory: Path, environ: Mapping[str, str] = os.environ) -> FleetKey:
    """The newest version this host holds."""
    return load_fleet_keys(directory, environ)[-1]


def load_fleet_keys(directory: Path, environ: Mapping[str, str] = os.environ) -> list[FleetKey]:
    """Every version this host holds, oldest first (a credential systemd passes is version 1)."""
    keys: dict[int, FleetKey] = {}
    creds = environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        keys[KEY_VERSION] = FleetKey(KEY_VERSION, load_key(Path(creds) / CREDENTIAL_NAME))
    for version in _versions(directory):
        if version in keys:
            continue
        raw_name, sealed_name = key_names(version)
        if (directory / sealed_name).exists():
            keys[version] = FleetKey(version, unseal_key(directory / sealed_name, environ, CREDENTIAL_NAME))
        elif (directory / raw_name).exists():
            keys[version] = FleetKey(version, load_key(directory / raw_name))
    if not keys:
        raise errors.ConfigError(f"fleet mode is configured but this host has no fleet key in '{directory}' "
                                 "(run 'secretbus fleet init' on the first host)")
    return [keys[v] for v in sorted(keys)]


def _versions(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise errors.ConfigError(f"cannot read '{directory}': {e.strerror}") from None
    found = {KEY_VERSION for n in names if n in (RAW_NAME, SEALED_NAME)}
    found |= {int(m.group(1)) for n in names if (m := _VERSIONED.fullmatch(n))}
    return sorted(found)


def has_fleet_key(directory: Path, environ: Mapping[str, str] = os.environ) -> bool:
    creds = environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        return True
    return bool(_versions(directory))


def remove_fleet_key(directory: Path, versions: list[int] | None = None) -> list[Path]:
    """`fleet leave` (every version), or the versions a rotation retired: the files removed
    (a credential systemd passes is the unit's to drop)."""
    chosen = _versions(directory) if versions is None else versions
    return remove_files(directory, tuple(n for v in chosen for n in key_names(v)))


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



"""`secretbus rotate-key`: replace the local encryption key while the service keeps serving.

The steps and why each state after a crash still loads every value: store/rotation.py. This
module drives them for one instance: the running service re-encrypts on a reload (SIGHUP to the
pid in its lock file), or, with no service running, the command loads the store itself.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from secretbus.core import errors
from secretbus.driver.build import open_instance
from secretbus.store import fsutil, keys, rotation
from secretbus.store.codec import LEGACY_SUFFIXES
from secretbus.store.conf import SecretConf
from secretbus.store.crypto import KEY_SIZE, gcm_key_id, key_id
from secretbus.store.paths import InstancePaths


@dataclass(frozen=True)
class KeyFile:
    path: Path
    sealed: bool        # a systemd credential (LoadCredentialEncrypted=), else 32 raw bytes

    @property
    def next_path(self) -> Path:
        return self.path.with_name(self.path.name + rotation.NEXT_SUFFIX)


def key_file(conf: SecretConf, key_path: str | None, kind_is_system: bool) -> KeyFile:
    """Which file holds the key the service loads: secret.conf's raw key file, else the sealed
    credential (--key-path, default libvirt's path for the system instance)."""
    if conf.encrypt_data is False:
        raise errors.ConfigUnsupported("values are not encrypted (encrypt_data = 0): there is no key to rotate")
    if conf.encryption_scheme != "aes256gcm":
        raise errors.ConfigUnsupported('rotate-key needs encryption_scheme = "aes256gcm" (libvirt\'s aes256cbc '
                                      "files carry no key id)")
    if conf.secrets_encryption_key is not None:
        if key_path is not None and Path(key_path) != Path(conf.secrets_encryption_key):
            raise errors.InvalidArg(f"--key-path differs from secret.conf's secrets_encryption_key "
                                    f"'{conf.secrets_encryption_key}'")
        return KeyFile(Path(conf.secrets_encryption_key), sealed=False)
    if key_path is None and not kind_is_system:
        raise errors.InvalidArg("give --key-path: the sealed credential the service loads")
    return KeyFile(Path(key_path) if key_path else keys.SEALED_KEY_PATH, sealed=True)


def read_key(kf: KeyFile, environ: Mapping[str, str]) -> bytes:
    return keys.unseal_key(kf.path, environ) if kf.sealed else keys.load_key(kf.path)


def write_next(kf: KeyFile, new_key: bytes, with_key: str | None, environ: Mapping[str, str]) -> None:
    content = keys.seal_key(new_key, with_key, environ) if kf.sealed else new_key
    try:
        fsutil.atomic_write(kf.next_path, content)
    except OSError as e:
        raise errors.OperationFailed(f"cannot write '{kf.next_path}': {e.strerror or e}") from None


def commit_next(kf: KeyFile) -> None:
    """Step 3: the new key takes the key file's name (atomic rename, directory synced)."""
    try:
        with fsutil.verified_dir(kf.path.parent) as fd:
            os.rename(kf.next_path.name, kf.path.name, src_dir_fd=fd, dst_dir_fd=fd)
            os.fsync(fd)
    except OSError as e:
        raise errors.OperationFailed(f"cannot rename '{kf.next_path}' to '{kf.path}': {e.strerror or e}") from None


def value_dirs(paths: InstancePaths, conf: SecretConf) -> list[Path]:
    """Where value files under the instance's key are: its store, and in fleet mode the cache."""
    if not conf.fleet_endpoints:
        return [paths.config_dir]
    from secretbus.fleet.keyfile import fleet_dir
    from secretbus.fleet.store import CACHE_DIR
    return [paths.config_dir, fleet_dir(paths) / CACHE_DIR]


def values_under_any(dirs: list[Path], kid: bytes) -> tuple[list[str], list[str]]:
    under: list[str] = []
    legacy: list[str] = []
    for d in dirs:
        u, leg = values_under(d, kid)
        under += u
        legacy += leg
    return under, legacy


def values_under(store_dir: Path, kid: bytes) -> tuple[list[str], list[str]]:
    """(value files still under key `kid`, legacy value files) in the store. Reads headers only."""
    under, legacy = [], []
    try:
        fd = fsutil.open_dir(store_dir, read_only=True)
    except FileNotFoundError:
        return [], []
    try:
        for name in sorted(os.listdir(fd)):
            stem, _, suffix = name.rpartition(".")
            if suffix in LEGACY_SUFFIXES and stem:
                legacy.append(name)
            elif suffix == "aes256gcm" and stem:
                try:
                    data = fsutil.read_limited(name, 1 << 20, dir_fd=fd)
                except OSError:
                    continue
                if gcm_key_id(data) == kid:
                    under.append(name)
    finally:
        os.close(fd)
    return under, legacy


def running_service(paths: InstancePaths) -> int | None:
    """The pid of the secretbus service holding this instance's lock, or None if none does."""
    try:
        pid = int(fsutil.read_limited(paths.lock_file, 64).decode().strip() or 0)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if pid <= 0:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"secretbus" in cmdline else None


def rotate_key(paths: InstancePaths, conf: SecretConf, *, key_path: str | None = None,
               with_key: str | None = None, timeout: float = 60.0,
               environ: Mapping[str, str] = os.environ,
               say: Callable[[str], None] = lambda line: None) -> list[str]:
    """Rotate the instance's key; the lines to print. Raises SecretError with what to do."""
    kf = key_file(conf, key_path, paths.kind.name == "SYSTEM")
    old_key = read_key(kf, environ)
    old_id = key_id(old_key)
    dirs = value_dirs(paths, conf)
    _, legacy = values_under_any(dirs, old_id)
    if legacy:
        raise errors.OperationFailed(f"{len(legacy)} value files are in an unauthenticated legacy format "
                                      f"(e.g. {legacy[0]}); migrate them first with 'secretbus rewrite-values'")
    rot = rotation.read_rotation(paths.config_dir, old_key)
    new_key = rot.new_key if rot is not None and rot.new_key is not None else os.urandom(KEY_SIZE)
    new_id = key_id(new_key)
    if rot is None:
        rotation.write_record(paths.config_dir, old_key, new_key)            # step 1
    say(f"rotating key_id={old_id.hex()} -> key_id={new_id.hex()}" + (" (resumed)" if rot else ""))
    write_next(kf, new_key, with_key, environ)
    pid = _re_encrypt(paths, conf, environ)                                    # step 2
    deadline = time.monotonic() + timeout
    while True:
        left, _ = values_under_any(dirs, old_id)
        if not left:
            break
        if time.monotonic() > deadline:
            raise errors.OperationFailed(
                f"{len(left)} value files are still under key_id={old_id.hex()} after {timeout:.0f} s (e.g. "
                f"{left[0]}; the service's log says why); every value stays readable and the rotation stays "
                "in progress: run 'secretbus rotate-key' again to finish it")
        time.sleep(0.1)
    commit_next(kf)                                                            # step 3
    lines = [f"Key rotated: key_id={old_id.hex()} -> key_id={new_id.hex()}; the new key is in '{kf.path}'"]
    if pid is None or not kf.sealed:
        if pid is not None:
            os.kill(pid, signal.SIGHUP)      # a raw key file is re-read on reload: step 4 there
            if conf.fleet_endpoints:
                _wait_gone(paths.config_dir / rotation.RECORD_NAME, timeout)
        else:
            rotation.read_rotation(paths.config_dir, new_key)                  # step 4
    else:
        lines.append("The service reads the new key from its credential at its next start; until then it "
                     "keeps both keys in memory (every value is already under the new one)")
    return lines


def _wait_gone(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def _re_encrypt(paths: InstancePaths, conf: SecretConf, environ: Mapping[str, str]) -> int | None:
    """Step 2: the running service reloads (SIGHUP), or the store is loaded here. The pid of
    the service, or None if there was none."""
    try:
        driver = open_instance(paths, environ=environ)
    except errors.LockHeld:
        pid = running_service(paths)
        if pid is None:
            raise errors.OperationFailed(f"the lock '{paths.lock_file}' is held, but not by a secretbus "
                                         "service this command can signal") from None
        os.kill(pid, signal.SIGHUP)
        return pid
    driver.close()          # loading re-wrote every value under the new key (driver._rebind)
    return None

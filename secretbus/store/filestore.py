"""libvirt's on-disk layout: `<uuid>.xml` per persistent secret plus one value file.

The store knows files and codecs, nothing of API rules. Writes are durable and atomic
(fsutil.atomic_write). Loading never deletes a file it could not read; it only removes
`*.new` temp files, which are by construction writes that were never acknowledged.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from secretbus.core import errors
from secretbus.core.model import SecretDef
from secretbus.core.secretxml import MAX_XML_BYTES, format_secret_xml, parse_secret_xml
from secretbus.core.uuids import is_canonical
from secretbus.store.codec import KNOWN_SUFFIXES, Damage, ValueCodec, ValueCodecs, ValueFileError
from secretbus.store.fsutil import (
    TMP_SUFFIX,
    atomic_write,
    ensure_private_dir,
    fsync_dir,
    read_limited,
    unlink_if_exists,
)

log = logging.getLogger("secretbus.store")

# The driver refuses to define what formats to more than MAX_XML_BYTES, so every definition
# it wrote loads again: the read limit is the write limit, never below it.
XML_READ_LIMIT = MAX_XML_BYTES
# libvirt reads value files of up to 10 MiB and its embedded driver has no 64 KiB limit:
# a value it stored must load (the 64 KiB limit applies to new writes only).
VALUE_FILE_LIMIT = 10 * 1024 * 1024


@dataclass
class LoadedSecret:
    definition: SecretDef
    value: bytes | None
    mtime_ns: int = 0     # of the XML file: of two files claiming one usage, the older wins


@dataclass
class Skipped:
    file: str
    uuid: str | None
    reason: str
    definition: SecretDef | None = None   # when the XML itself was readable

    @property
    def file_uuid(self) -> str | None:
        """The UUID whose files these are, from the file name: defining it anew would
        overwrite them, so the driver refuses that."""
        stem = self.file[:-4] if self.file.endswith(".xml") else ""
        return stem if is_canonical(stem) else None


def log_skip(skipped: Skipped) -> None:
    log.error("skipping secret file '%s': %s", skipped.file, skipped.reason,
              extra={"SECRET_UUID": skipped.uuid or "", "SECRET_OPERATION": "load"})


@dataclass
class LoadReport:
    secrets: list[LoadedSecret]
    skipped: list[Skipped]


class SecretStore:
    def __init__(self, config_dir: Path, codecs: ValueCodecs):
        self.dir = config_dir
        self.codecs = codecs
        self._dir_fd: int | None = None    # open while loading

    # -- paths -------------------------------------------------------------
    def _path(self, uuid: str, suffix: str) -> Path:
        # Only canonical UUIDs ever reach here, so no name can leave the directory.
        if not is_canonical(uuid):
            raise errors.InternalError(f"refusing non-canonical secret uuid '{uuid!r}'")
        return self.dir / f"{uuid}.{suffix}"

    def xml_path(self, uuid: str) -> Path:
        return self._path(uuid, "xml")

    # -- writing -------------------------------------------------------------
    def prepare(self) -> None:
        try:
            ensure_private_dir(self.dir)
        except OSError as e:
            raise errors.SystemError(f"cannot create config directory '{self.dir}': {e.strerror}") from None

    def write_definition(self, d: SecretDef) -> None:
        self._write(self.xml_path(d.uuid), format_secret_xml(d).encode("utf-8"))

    def write_value(self, uuid: str, value: bytes) -> None:
        """Write the value under the current scheme, then remove every other value file."""
        writer = self.codecs.writer
        self._write(self._path(uuid, writer.suffix), writer.encode(uuid, value))
        self._unlink_values(uuid, keep=writer.suffix)

    def delete_definition(self, uuid: str) -> None:
        path = self.xml_path(uuid)
        try:
            if unlink_if_exists(path):
                fsync_dir(self.dir)
        except OSError as e:
            raise errors.SystemError(f"cannot unlink '{path}': {e.strerror}") from None

    def delete_values(self, uuid: str) -> None:
        """Remove every value file of `uuid`; a file that stays is an error (it would be
        inherited by the next secret with this UUID)."""
        self._unlink_values(uuid, keep=None, strict=True)

    def _unlink_values(self, uuid: str, keep: str | None, strict: bool = False) -> None:
        removed = False
        for suffix in KNOWN_SUFFIXES:
            if suffix == keep:
                continue
            path = self._path(uuid, suffix)
            try:
                removed |= unlink_if_exists(path)
            except OSError as e:
                if strict:
                    raise errors.SystemError(f"cannot unlink '{path}': {e.strerror}") from None
                # After a successful write the newest file wins at load, so this is harmless.
                log.warning("cannot remove stale value file %s.%s: %s", uuid, suffix, e.strerror)
        if removed:
            try:
                fsync_dir(self.dir)
            except OSError as e:
                raise errors.SystemError(f"cannot sync '{self.dir}': {e.strerror}") from None

    def _write(self, path: Path, data: bytes) -> None:
        try:
            atomic_write(path, data)
        except OSError as e:
            raise errors.SystemError(f"cannot write '{path}': {e.strerror}") from None

    # -- loading ------------------------------------------------------------
    def load(self) -> LoadReport:
        report = LoadReport([], [])
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return report
        except OSError as e:
            raise errors.SystemError(f"cannot read config directory '{self.dir}': {e.strerror}") from None
        self._remove_stale_temps(names)
        present = set(names)
        xml_names = [n for n in names if n.endswith(".xml")]
        xml_uuids = [n[:-4] for n in xml_names if is_canonical(n[:-4])]
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in xml_names:
                try:
                    report.secrets.append(self._load_one(name, xml_uuids, present))
                except _Skip as s:
                    log_skip(s.skipped)
                    report.skipped.append(s.skipped)
        finally:
            os.close(self._dir_fd)
            self._dir_fd = None
        return report

    def _mtime(self, name: str) -> int:
        try:
            return os.lstat(name, dir_fd=self._dir_fd).st_mtime_ns
        except OSError:
            return 0

    def _remove_stale_temps(self, names: list[str]) -> None:
        for n in names:
            if not n.endswith(TMP_SUFFIX):
                continue
            path = self.dir / n
            try:
                if not stat.S_ISREG(path.lstat().st_mode):
                    continue        # not a temp file of ours: leave it alone
                # A temp file is a write that never completed, hence never acknowledged.
                log.warning("removing incomplete write '%s'", n)
                unlink_if_exists(path)
            except OSError as e:
                log.warning("cannot remove incomplete write '%s': %s", n, e.strerror)

    def _load_one(self, name: str, all_uuids: list[str], present: set[str]) -> LoadedSecret:
        try:
            data = read_limited(name, XML_READ_LIMIT, dir_fd=self._dir_fd)
            d = parse_secret_xml(data, source=os.path.join(self.dir, name))
        except errors.SecretError as e:
            raise _Skip(name, None, f"invalid XML: {e.message}") from None
        except OSError as e:
            raise _Skip(name, None, f"cannot read: {e.strerror}") from None
        if name != f"{d.uuid}.xml":
            raise _Skip(name, d.uuid, f"{d.uuid} does not match secret file name '{name}'")
        try:
            value = self._load_value(d.uuid, name, all_uuids, present)
        except _Skip as s:
            s.skipped.definition = d
            raise
        return LoadedSecret(d, value, self._mtime(name))

    def _load_value(self, uuid: str, name: str, all_uuids: list[str], present: set[str]) -> bytes | None:
        found = [s for s in KNOWN_SUFFIXES if f"{uuid}.{s}" in present]
        if not found:
            return None
        suffix = found[0]
        if len(found) > 1:
            # A crash between writing the new file and unlinking the old one leaves
            # both; the newest is the last write (libvirt lets .base64 win instead).
            suffix = max(found, key=lambda sfx: self._mtime(f"{uuid}.{sfx}"))
            log.warning("secret %s has %d value files; using the newest, %s.%s", uuid,
                        len(found), uuid, suffix, extra={"SECRET_UUID": uuid})
        fname = f"{uuid}.{suffix}"
        codec = self.codecs.readers.get(suffix)
        if codec is None:
            raise _Skip(name, uuid, f"value file {fname}: no reader for this format")
        try:
            data = read_limited(fname, VALUE_FILE_LIMIT, dir_fd=self._dir_fd)
        except OSError as e:
            raise _Skip(name, uuid, f"value file {fname}: cannot read: {e.strerror}") from None
        try:
            value = codec.decode(uuid, data)
        except ValueFileError as e:
            damage = e.damage
            if damage is Damage.TAMPERED:
                owner = self._find_owner(codec, data, uuid, all_uuids)
                if owner:
                    raise _Skip(name, uuid, f"value file {fname}: {Damage.MOVED.value} "
                                            f"(it was written for secret {owner})") from None
            raise _Skip(name, uuid, f"value file {fname}: {e}") from None
        return value

    @staticmethod
    def _find_owner(codec: ValueCodec, data: bytes, uuid: str, all_uuids: list[str]) -> str | None:
        """On an authentication failure, tell a moved file from a damaged one."""
        for other in all_uuids:
            if other == uuid:
                continue
            try:
                codec.decode(other, data)
            except ValueFileError:
                continue
            return other
        return None


class _Skip(Exception):
    def __init__(self, file: str, uuid: str | None, reason: str):
        super().__init__(reason)
        self.skipped = Skipped(file, uuid, reason)

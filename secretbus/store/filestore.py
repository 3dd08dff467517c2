"""libvirt's on-disk layout: `<uuid>.xml` per persistent secret plus one value file.

The store knows files and codecs, nothing of API rules. Writes are durable and atomic
(fsutil.atomic_write_at) and go through a verified directory fd. Loading never deletes a
file it could not read; it only removes `*.new` temp files, which are by construction
writes that were never acknowledged.

While the write scheme is aes256gcm (docs/security.md §3): a value is bound to its
definition, so an edited XML is skipped like damage; unauthenticated files (`.base64`,
`.aes256cbc`, and SBG1 once the store holds bound files) are read only by an explicit
migration (`load(migrate=True)`, what `secretbus rewrite-values` does), never beside a
`.aes256gcm` file.
"""
from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from secretbus.core import errors
from secretbus.core.model import SecretDef
from secretbus.core.secretxml import MAX_XML_BYTES, format_secret_xml, parse_secret_xml
from secretbus.core.uuids import is_canonical
from secretbus.store.calls import WRITE_METHODS, StoreCall
from secretbus.store.codec import (
    KNOWN_SUFFIXES,
    LEGACY_SUFFIXES,
    Binding,
    Damage,
    ValueCodecs,
    ValueFileError,
)
from secretbus.store.commit import Plan, Replace, Step, Unlink
from secretbus.store.crypto import GCM_MAGIC, GcmCodec, gcm_key_id
from secretbus.store.fsutil import (
    TMP_SUFFIX,
    atomic_write_at,
    ensure_private_dir,
    is_spare_name,
    open_dir,
    read_limited,
    read_limited_stat,
    unlink_at,
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
    stale: bool = False   # read from an unbound or legacy file: rewrite it in the bound format


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
        # The value files (suffixes, by UUID) that may exist: what load found, plus what was
        # written since, less what was removed (a superset: a failed write may leave what it
        # was removing). A SetValue plans the removal of the other schemes' files only if they
        # may exist, not two unlinks that fail with ENOENT each time. None until loaded: all
        # are planned. A file that appears behind our back is not removed by a write, and
        # loses at load as before (the bound scheme ignores it beside its own, otherwise the
        # newest file wins). Updated by the committing thread before the write is applied, and
        # read when one is planned: never both for one UUID at once (the writer's per-secret order).
        # Each set is one of a few shared frozensets (_suffixes): 10,000 secrets' own sets were
        # ~2 MB of the daemon's memory.
        self._value_files: dict[str, frozenset[str]] | None = None

    @property
    def binds_definitions(self) -> bool:
        """True when values are written in the bound GCM format (and legacy ones refused)."""
        return isinstance(self.codecs.writer, GcmCodec)

    # -- paths -------------------------------------------------------------
    @staticmethod
    def _name(uuid: str, suffix: str) -> str:
        # Only canonical UUIDs ever reach here, so no name can leave the directory.
        if not is_canonical(uuid):
            raise errors.InternalError(f"refusing non-canonical secret uuid '{uuid!r}'")
        return f"{uuid}.{suffix}"

    def xml_path(self, uuid: str) -> Path:
        return self.dir / self._name(uuid, "xml")

    def has_value_file(self, uuid: str) -> bool:
        """Whether a value file of `uuid` exists, in any format (not read)."""
        return any((self.dir / self._name(uuid, sfx)).exists() for sfx in KNOWN_SUFFIXES)

    def _open_dir(self) -> int:
        try:
            return open_dir(self.dir)
        except OSError as e:
            raise errors.SystemError(f"cannot use config directory '{self.dir}': {e.strerror}") from None

    # -- writing -------------------------------------------------------------
    def use_codecs(self, codecs: ValueCodecs) -> None:
        """Write and read with `codecs` from now on (a key rotation taken up on reload)."""
        self.codecs = codecs

    def prepare(self) -> None:
        try:
            ensure_private_dir(self.dir)
        except OSError as e:
            raise errors.SystemError(f"cannot create config directory '{self.dir}': {e.strerror}") from None

    # -- write plans: the same file changes as the write_* methods below, described, not done;
    # the driver commits the plans of concurrent operations together (store/commit.py).
    @property
    def group_commit(self) -> bool:
        """Whether plan_* describes every write of this store. A store whose write_* methods
        are replaced — by a subclass (the fleet store: an etcd transaction first) or on the
        instance (a test's failing write) — is written through them, one operation at a time."""
        cls = type(self)
        return all(getattr(cls, n) is getattr(SecretStore, n) and n not in vars(self) for n in WRITE_METHODS)

    # A store without plans that can still commit the writes of one batch together (the
    # fleet store: one etcd transaction) says so and overrides write_many; the writer then
    # hands it the batch as data.
    batches_writes = False

    def write_many(self, writes: Sequence[Sequence[StoreCall]]) -> list[Exception | None]:
        """Make each write (its calls, in order); for each, the error it ended in, or None.
        Only asked of a store that `batches_writes`."""
        raise NotImplementedError

    def plan_definition(self, d: SecretDef) -> Plan:
        return Plan([Replace(self.dir, self._name(d.uuid, "xml"), format_secret_xml(d).encode("utf-8"))])

    def plan_value(self, d: SecretDef, value: bytes) -> Plan:
        """write_value's changes: the value under the current scheme, bound to `d`, then every
        other value file that may exist removed (leniently: the current scheme's file wins at
        load)."""
        writer = self.codecs.writer
        steps: list[Step] = [Replace(self.dir, self._name(d.uuid, writer.suffix), writer.encode(Binding.of(d), value))]
        known = self._value_files
        if known is None:
            others = [sfx for sfx in KNOWN_SUFFIXES if sfx != writer.suffix]
        else:
            have = known.get(d.uuid, _NONE)
            others = [sfx for sfx in KNOWN_SUFFIXES if sfx != writer.suffix and sfx in have]
            self._may_exist(d.uuid, writer.suffix)      # from now on, even if this write fails
        steps += [Unlink(self.dir, self._name(d.uuid, sfx), strict=False) for sfx in others]
        return Plan(steps, done=[partial(self._values_now, d.uuid, {writer.suffix})])

    def plan_delete_values(self, uuid: str) -> Plan:
        """delete_values' changes: a value file that stays fails the plan. Every scheme's file
        is removed, known or not: none may outlive its secret, to be inherited by the next one
        defined with its UUID."""
        return Plan([Unlink(self.dir, self._name(uuid, sfx)) for sfx in KNOWN_SUFFIXES],
                    done=[partial(self._values_now, uuid, set())])

    def _may_exist(self, uuid: str, suffix: str) -> None:
        """Before a write of `uuid`'s value file with `suffix`: that file may exist from now on."""
        known = self._value_files
        if known is not None:
            known[uuid] = _suffixes(known.get(uuid, _NONE) | {suffix})

    def _values_now(self, uuid: str, suffixes: set[str]) -> None:
        """After a durable write or removal: `uuid`'s value files are exactly `suffixes`."""
        known = self._value_files
        if known is None:
            return
        if suffixes:
            known[uuid] = _suffixes(suffixes)
        else:
            known.pop(uuid, None)

    def plan_delete_definition(self, uuid: str) -> Plan:
        return Plan([Unlink(self.dir, self._name(uuid, "xml"))])

    # -- writing one change at a time (start-up re-binds, maintenance, the fleet store) -----
    def write_definition(self, d: SecretDef) -> None:
        fd = self._open_dir()
        try:
            self._write(fd, self._name(d.uuid, "xml"), format_secret_xml(d).encode("utf-8"))
        finally:
            os.close(fd)

    def write_value(self, d: SecretDef, value: bytes) -> None:
        """Write the value under the current scheme, bound to `d`, then remove every other
        value file."""
        writer = self.codecs.writer
        fd = self._open_dir()
        try:
            self._may_exist(d.uuid, writer.suffix)
            self._write(fd, self._name(d.uuid, writer.suffix), writer.encode(Binding.of(d), value))
            self._unlink_values(fd, d.uuid, keep=writer.suffix)
        finally:
            os.close(fd)
        self._values_now(d.uuid, {writer.suffix})

    def delete_definition(self, uuid: str) -> None:
        name = self._name(uuid, "xml")
        fd = self._open_dir()
        try:
            if unlink_at(fd, name):
                os.fsync(fd)
        except OSError as e:
            raise errors.SystemError(f"cannot unlink '{self.dir / name}': {e.strerror}") from None
        finally:
            os.close(fd)

    def delete_values(self, uuid: str) -> None:
        """Remove every value file of `uuid`; a file that stays is an error (it would be
        inherited by the next secret with this UUID)."""
        fd = self._open_dir()
        try:
            self._unlink_values(fd, uuid, keep=None, strict=True)
        finally:
            os.close(fd)
        self._values_now(uuid, set())

    def _unlink_values(self, fd: int, uuid: str, keep: str | None, strict: bool = False) -> None:
        removed = False
        for suffix in KNOWN_SUFFIXES:
            if suffix == keep:
                continue
            name = self._name(uuid, suffix)
            try:
                removed |= unlink_at(fd, name)
            except OSError as e:
                if strict:
                    raise errors.SystemError(f"cannot unlink '{self.dir / name}': {e.strerror}") from None
                # After a successful write the current scheme's file wins at load, so this is harmless.
                log.warning("cannot remove stale value file %s: %s", name, e.strerror)
        if removed:
            try:
                os.fsync(fd)
            except OSError as e:
                raise errors.SystemError(f"cannot sync '{self.dir}': {e.strerror}") from None

    def _write(self, fd: int, name: str, data: bytes) -> None:
        try:
            atomic_write_at(fd, name, data)
        except OSError as e:
            raise errors.SystemError(f"cannot write '{self.dir / name}': {e.strerror}") from None

    # -- loading ------------------------------------------------------------
    def load(self, *, migrate: bool = False) -> LoadReport:
        """Every secret that loads, and why the others do not. `migrate` also reads the
        unauthenticated files the bound scheme otherwise refuses (they come back `stale`)."""
        try:
            fd = open_dir(self.dir)
        except FileNotFoundError:
            self._value_files = {}
            return LoadReport([], [])
        except OSError as e:
            raise errors.SystemError(f"cannot read config directory '{self.dir}': {e.strerror}") from None
        try:
            return _Load(self, fd, migrate).run()
        finally:
            os.close(fd)

    def _found_values(self, names: list[str]) -> None:
        """What load found: the value files by UUID."""
        found: dict[str, set[str]] = {}
        for n in names:
            stem, _, sfx = n.rpartition(".")
            if sfx in KNOWN_SUFFIXES:
                found.setdefault(stem, set()).add(sfx)
        self._value_files = {u: _suffixes(v) for u, v in found.items()}


_NONE: frozenset[str] = frozenset()
_SHARED: dict[frozenset[str], frozenset[str]] = {}


def _suffixes(s: set[str] | frozenset[str]) -> frozenset[str]:
    """The shared frozenset equal to `s` (at most 2**len(KNOWN_SUFFIXES) of them)."""
    f = frozenset(s)
    return _SHARED.setdefault(f, f)


def defined_uuids(directory: Path) -> set[str]:
    """The UUIDs with a definition file in `directory` (none if it does not exist), without
    reading one: what `fleet status` counts while the service runs."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return set()
    except OSError as e:
        raise errors.SystemError(f"cannot read directory '{directory}': {e.strerror}") from None
    return {n[:-4] for n in names if n.endswith(".xml") and is_canonical(n[:-4])}


class _Load:
    """One pass over the store: definitions first, then each secret's value file, so an
    authentication failure can be checked against the other definitions (moved files)."""

    def __init__(self, store: SecretStore, fd: int, migrate: bool):
        self.store, self.fd, self.migrate = store, fd, migrate
        self.strict = store.binds_definitions
        self.defs: dict[str, SecretDef] = {}
        self.xml_mtimes: dict[str, int] = {}     # name -> mtime of the XML file as it was read

    def run(self) -> LoadReport:
        report = LoadReport([], [])
        names = sorted(os.listdir(self.fd))
        self._remove_stale_temps(names)
        self.present = set(names)
        self.store._found_values(names)
        parsed: list[tuple[str, SecretDef]] = []
        for name in (n for n in names if n.endswith(".xml")):
            try:
                d = self._definition(name)
            except _Skip as s:
                log_skip(s.skipped)
                report.skipped.append(s.skipped)
                continue
            parsed.append((name, d))
            self.defs[d.uuid] = d
        values = {d.uuid: self._read_value(d, name) for name, d in parsed}
        # Once a store holds bound files, an SBG1 file is a downgrade unless migrating.
        self.bound_store = any(_is_bound_file(v[1]) for v in values.values()
                               if isinstance(v, tuple) and v[0] == GcmCodec.suffix)
        for name, d in parsed:
            try:
                value, stale = self._value(d, name, values[d.uuid])
            except _Skip as s:
                s.skipped.definition = d
                log_skip(s.skipped)
                report.skipped.append(s.skipped)
                continue
            report.secrets.append(LoadedSecret(d, value, self.xml_mtimes[name], stale))
        return report

    def _mtime(self, name: str) -> int:
        try:
            return os.lstat(name, dir_fd=self.fd).st_mtime_ns
        except OSError:
            return 0

    def _remove_stale_temps(self, names: list[str]) -> None:
        for n in names:
            if not (n.endswith(TMP_SUFFIX) or is_spare_name(n)):
                continue
            try:
                if not stat.S_ISREG(os.lstat(n, dir_fd=self.fd).st_mode):
                    continue        # not a temp file of ours: leave it alone
                if is_spare_name(n):
                    # An earlier content of a file, kept to be written over (store/commit.py).
                    log.debug("removing spare file '%s'", n)
                else:
                    # A temp file is a write that never completed, hence never acknowledged.
                    log.warning("removing incomplete write '%s'", n)
                unlink_at(self.fd, n)
            except OSError as e:
                what = "spare file" if is_spare_name(n) else "incomplete write"
                log.warning("cannot remove %s '%s': %s", what, n, e.strerror)

    def _definition(self, name: str) -> SecretDef:
        try:
            data, st = read_limited_stat(name, XML_READ_LIMIT, dir_fd=self.fd)
            d = parse_secret_xml(data, source=os.path.join(self.store.dir, name))
        except errors.SecretError as e:
            raise _Skip(name, None, f"invalid XML: {e.message}") from None
        except OSError as e:
            raise _Skip(name, None, f"cannot read: {e.strerror}") from None
        if name != f"{d.uuid}.xml":
            raise _Skip(name, d.uuid, f"{d.uuid} does not match secret file name '{name}'")
        self.xml_mtimes[name] = st.st_mtime_ns
        return d

    def _choose(self, uuid: str) -> str | None:
        """Which value file of `uuid` to read, if any."""
        found = [s for s in KNOWN_SUFFIXES if f"{uuid}.{s}" in self.present]
        if not found:
            return None
        if self.strict and GcmCodec.suffix in found:
            if len(found) > 1:
                others = ", ".join(f"{uuid}.{s}" for s in found if s != GcmCodec.suffix)
                log.warning("secret %s has %d value files; using %s.%s and ignoring %s: an "
                            "unauthenticated file beside an authenticated one is never read",
                            uuid, len(found), uuid, GcmCodec.suffix, others,
                            extra={"SECRET_UUID": uuid})
            return GcmCodec.suffix
        if len(found) > 1:
            # A crash between writing the new file and unlinking the old one leaves
            # both; the newest is the last write (libvirt lets .base64 win instead).
            newest = max(found, key=lambda sfx: self._mtime(f"{uuid}.{sfx}"))
            log.warning("secret %s has %d value files; using the newest, %s.%s", uuid,
                        len(found), uuid, newest, extra={"SECRET_UUID": uuid})
            return newest
        return found[0]

    def _read_value(self, d: SecretDef, name: str) -> tuple[str, bytes] | _Skip | None:
        suffix = self._choose(d.uuid)
        if suffix is None:
            return None
        fname = f"{d.uuid}.{suffix}"
        if self.strict and suffix in LEGACY_SUFFIXES and not self.migrate:
            return _Skip(name, d.uuid, f"value file {fname}: {Damage.LEGACY.value}; "
                                       "'secretbus rewrite-values' migrates it")
        try:
            return suffix, read_limited(fname, VALUE_FILE_LIMIT, dir_fd=self.fd)
        except OSError as e:
            return _Skip(name, d.uuid, f"value file {fname}: cannot read: {e.strerror}")

    def _value(self, d: SecretDef, name: str,
               read: tuple[str, bytes] | _Skip | None) -> tuple[bytes | None, bool]:
        if read is None:
            return None, False
        if isinstance(read, _Skip):
            raise read
        suffix, data = read
        fname = f"{d.uuid}.{suffix}"
        codec = self.store.codecs.readers.get(suffix)
        if codec is None:
            raise _Skip(name, d.uuid, f"value file {fname}: no reader for this format")
        try:
            if isinstance(codec, GcmCodec):
                retiring = self.store.codecs.retiring.get(gcm_key_id(data) or b"")
                if isinstance(retiring, GcmCodec):
                    # under the key a rotation retires: served, and re-written under the new one
                    return self._gcm(retiring, d, data)[0], True
                return self._gcm(codec, d, data)
            return codec.decode(Binding.of(d), data), suffix in LEGACY_SUFFIXES and self.strict
        except ValueFileError as e:
            raise _Skip(name, d.uuid, f"value file {fname}: {e}") from None
        except _Verdict as v:
            raise _Skip(name, d.uuid, f"value file {fname}: {v}") from None

    def _gcm(self, codec: GcmCodec, d: SecretDef, data: bytes) -> tuple[bytes, bool]:
        binding = Binding.of(d)
        try:
            return codec.decode(binding, data), False
        except ValueFileError as e:
            if e.damage is Damage.UNBOUND:
                return self._gcm_unbound(codec, d, data), True
            if e.damage is not Damage.TAMPERED:
                raise
        # The value authenticates only against another definition: say which.
        try:
            value = codec.decode(binding.with_private(not d.private), data)
        except ValueFileError:
            pass
        else:
            if d.private:
                # Written before a redefine to private='yes' completed its rewrite: the
                # stricter definition is served, and the value is re-bound.
                return value, True
            raise _Verdict(Damage.UNHIDDEN.value)
        owner = self._owner(codec, d.uuid, data, unbound=False)
        if owner:
            raise _Verdict(f"{Damage.MOVED.value} (it was written for secret {owner})")
        raise _Verdict(f"{Damage.TAMPERED.value}: the value file, or its definition's "
                       "private flag or usage, was changed")

    def _gcm_unbound(self, codec: GcmCodec, d: SecretDef, data: bytes) -> bytes:
        if self.strict and self.bound_store and not self.migrate:
            raise _Verdict(f"{Damage.UNBOUND.value}, refused because this store holds bound "
                           "(SBG2) files (a downgrade?); 'secretbus rewrite-values' migrates it")
        try:
            return codec.decode_unbound(d.uuid, data)
        except ValueFileError as e:
            if e.damage is Damage.TAMPERED:
                owner = self._owner(codec, d.uuid, data, unbound=True)
                if owner:
                    raise _Verdict(f"{Damage.MOVED.value} (it was written for secret {owner})") from None
            raise

    def _owner(self, codec: GcmCodec, uuid: str, data: bytes, unbound: bool) -> str | None:
        """On an authentication failure, tell a moved file from a damaged one."""
        for other, od in self.defs.items():
            if other == uuid:
                continue
            if unbound:
                candidates: list[str | Binding] = [other]
            else:
                b = Binding.of(od)
                candidates = [b, b.with_private(not od.private)]
            for c in candidates:
                try:
                    if isinstance(c, str):
                        codec.decode_unbound(c, data)
                    else:
                        codec.decode(c, data)
                except ValueFileError:
                    continue
                return other
        return None


def _is_bound_file(data: bytes) -> bool:
    """Whether GCM file content starts with the SBG2 magic (8 base64 characters = 6 bytes)."""
    try:
        return base64.b64decode(data.strip()[:8], validate=True)[:len(GCM_MAGIC)] == GCM_MAGIC
    except (binascii.Error, ValueError):
        return False


class _Verdict(Exception):
    """Why a GCM value file was refused, already worded for the log."""


class _Skip(Exception):
    def __init__(self, file: str, uuid: str | None, reason: str):
        super().__init__(reason)
        self.skipped = Skipped(file, uuid, reason)

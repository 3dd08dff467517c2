"""The secret driver: libvirt's API rules (spec §2) over an in-memory table and a store.

Knows nothing of D-Bus. Thread-safe: mutations are serialised by one lock so that a
bus front end may run them in worker threads while reads stay on its event loop.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

from secretbus.core import errors
from secretbus.core.model import (
    DEFINE_VALIDATE,
    LIST_FLAGS_ALL,
    VALUE_MAX,
    EventId,
    Lifecycle,
    SecretDef,
    SecretEvent,
    UsageType,
    list_filter,
)
from secretbus.core.secretxml import format_secret_xml, parse_secret_xml
from secretbus.core.uuids import parse_uuid
from secretbus.store.codec import ValueCodecs
from secretbus.store.conf import SecretConf, load_conf
from secretbus.store.filestore import SecretStore, Skipped
from secretbus.store.keys import codecs_for
from secretbus.store.lock import InstanceLock
from secretbus.store.paths import InstancePaths

log = logging.getLogger("secretbus.driver")

EventCallback = Callable[[SecretEvent], None]

# Supported flags per API and the libvirt driver function (secret_driver.c) that its
# "unsupported flags (0x..) in function NAME" error names.
_FLAGS: dict[str, tuple[int, str]] = {
    "list": (LIST_FLAGS_ALL, "secretConnectListAllSecrets"),
    "define": (DEFINE_VALIDATE, "secretDefineXML"),
    "get_xml_desc": (0, "secretGetXMLDesc"),
    "set_value": (0, "secretSetValue"),
    "get_value": (0, "secretGetValue"),
}


@dataclass(slots=True)
class _Secret:
    definition: SecretDef
    value: bytearray | None = None   # wiped in place when replaced or undefined


def _buffer(value: bytes | None) -> bytearray | None:
    return bytearray(value) if value is not None else None


def _wipe(buf: bytearray | None) -> None:
    if buf is not None:
        buf[:] = b"\0" * len(buf)


@dataclass(frozen=True)
class LoadSummary:
    loaded: int
    skipped: list[Skipped]


class SecretDriver:
    def __init__(self, paths: InstancePaths, *, conf: SecretConf | None = None,
                 environ: dict[str, str] | None = None, take_lock: bool = True):
        self.paths = paths
        self._environ = environ
        self._mutex = threading.RLock()
        self._secrets: dict[str, _Secret] = {}
        self._by_usage: dict[tuple[UsageType, str], str] = {}
        self._subscribers: dict[int, EventCallback] = {}
        self._next_sub = 0
        self.version = 0                                  # bumped on every change of the table
        self._sorted: tuple[int, list[SecretDef]] = (-1, [])
        self._lock = InstanceLock(paths.lock_file) if take_lock else None
        self.conf, codecs, self.key_description = self._load_config(conf)
        self.store = SecretStore(paths.config_dir, codecs)
        self.store.prepare()
        if self._lock:
            self._lock.acquire()
        try:
            self.last_load = self._load_store()   # counts and skipped files; no values
        except BaseException:
            self.close()
            raise

    # -- set-up, reload, shutdown -------------------------------------------------
    def _load_config(self, conf: SecretConf | None) -> tuple[SecretConf, ValueCodecs, str | None]:
        if conf is None:
            conf = load_conf(self.paths.conf_file)
        codecs, desc = codecs_for(conf, os.environ if self._environ is None else self._environ)
        return conf, codecs, desc

    def _load_store(self) -> LoadSummary:
        report = self.store.load()
        skipped_by_store = len(report.skipped)
        table: dict[str, _Secret] = {}
        usage: dict[tuple[UsageType, str], str] = {}
        for loaded in report.secrets:
            d = loaded.definition
            key = self._usage_key(d)
            if key and key in usage:
                # Two files claim one usage: the older claim wins, the newer is skipped.
                older, newer = sorted((table[usage[key]].definition, d),
                                      key=lambda x: (self.store.xml_mtime(x.uuid), x.uuid))
                if older is d:
                    _wipe(table.pop(newer.uuid).value)
                    table[d.uuid] = _Secret(d, _buffer(loaded.value))
                    usage[key] = d.uuid
                SecretStore.report_skip(report, Skipped(
                    f"{newer.uuid}.xml", newer.uuid,
                    f"a secret with UUID {older.uuid} already defined for use with {newer.usage_id}"))
                continue
            table[d.uuid] = _Secret(d, _buffer(loaded.value))
            if key:
                usage[key] = d.uuid
        with self._mutex:
            old = self._secrets
            # Ephemeral secrets live only in memory: a reload keeps them.
            for uuid, s in old.items():
                if s.definition.ephemeral and uuid not in table:
                    key = self._usage_key(s.definition)
                    if key and key in usage:
                        continue
                    table[uuid] = s
                    if key:
                        usage[key] = uuid
            for uuid, s in old.items():
                if table.get(uuid) is not s:
                    _wipe(s.value)
            self._secrets, self._by_usage = table, usage
        self._changed()
        loaded = len(report.secrets) - (len(report.skipped) - skipped_by_store)
        report.secrets.clear()    # the decoded values now live only in the wipeable table
        log.info("loaded %d secrets, skipped %d", loaded, len(report.skipped))
        return LoadSummary(loaded, report.skipped)

    def reload(self) -> LoadSummary:
        """Re-read secret.conf, the key and the store; on failure keep the old state."""
        with self._mutex:
            conf, codecs, desc = self._load_config(None)
            old_store = self.store
            self.store = SecretStore(self.paths.config_dir, codecs)
            try:
                report = self._load_store()
            except BaseException:
                self.store = old_store
                raise
            self.conf, self.key_description = conf, desc
            return report

    def close(self) -> None:
        with self._mutex:
            for s in self._secrets.values():
                _wipe(s.value)
            self._secrets.clear()
            self._by_usage.clear()
            if self._lock:
                self._lock.release()

    # -- events -------------------------------------------------------------------
    def subscribe(self, callback: EventCallback) -> int:
        with self._mutex:
            self._next_sub += 1
            self._subscribers[self._next_sub] = callback
            return self._next_sub

    def unsubscribe(self, sub_id: int) -> None:
        with self._mutex:
            if self._subscribers.pop(sub_id, None) is None:
                raise errors.InvalidArg(f"callback {sub_id} is not registered")

    def _emit(self, event: SecretEvent) -> None:
        for cb in list(self._subscribers.values()):
            try:
                cb(event)
            except Exception:
                log.exception("event subscriber failed")

    @staticmethod
    def _event(d: SecretDef, event_id: EventId, lifecycle: Lifecycle | None = None) -> SecretEvent:
        return SecretEvent(event_id, d.uuid, d.usage_type, d.usage_id or "", lifecycle)

    # -- lookups ------------------------------------------------------------------
    @staticmethod
    def _usage_key(d: SecretDef) -> tuple[UsageType, str] | None:
        return None if d.usage_type == UsageType.NONE else (d.usage_type, d.usage_id or "")

    def _get(self, uuid: str) -> _Secret:
        canon = parse_uuid(uuid) if isinstance(uuid, str) else None
        if canon is None:
            raise errors.InvalidArg("uuidstr in virSecretLookupByUUIDString must be a valid UUID")
        s = self._secrets.get(canon)
        if s is None:
            raise errors.NoSecret(f"no secret with matching uuid '{canon}'")
        return s

    def lookup_by_uuid(self, uuid: str) -> SecretDef:
        return self._get(uuid).definition

    def lookup_by_usage(self, usage_type: int, usage_id: str) -> SecretDef:
        if not isinstance(usage_id, str):
            raise errors.InvalidArg("usageID in virSecretLookupByUsage must not be NULL")
        try:
            ut = UsageType(usage_type)
        except ValueError:
            ut = None
        uuid = self._by_usage.get((ut, usage_id)) if ut and ut != UsageType.NONE else None
        if uuid is None or uuid not in self._secrets:
            raise errors.NoSecret(f"no secret with matching usage '{usage_id}'")
        return self._secrets[uuid].definition

    def _changed(self) -> None:
        self.version += 1

    def list_secrets(self, flags: int = 0) -> list[SecretDef]:
        """Definitions sorted by UUID; the sorted list is kept until the table changes."""
        self.check_flags("list", flags)
        version, defs = self._sorted
        if version != self.version:
            version = self.version    # read before the table: a racing change only makes it stale-marked
            defs = sorted((s.definition for s in list(self._secrets.values())), key=attrgetter("uuid"))
            self._sorted = (version, defs)
        keep = list_filter(flags)
        return list(defs) if keep is None else [d for d in defs if keep(d)]

    @staticmethod
    def check_flags(api: str, flags: int) -> None:
        """libvirt's virCheckFlags for `api` (a key of _FLAGS); front ends that check early call it."""
        supported, function = _FLAGS[api]
        errors.unsupported_flags(flags, supported, function)

    def count(self) -> int:
        return len(self._secrets)

    def get_xml_desc(self, uuid: str, flags: int = 0) -> str:
        self.check_flags("get_xml_desc", flags)
        return format_secret_xml(self._get(uuid).definition)

    # -- define -------------------------------------------------------------------
    @staticmethod
    def parse_definition(xml: str | bytes, flags: int = 0) -> SecretDef:
        SecretDriver.check_flags("define", flags)
        return parse_secret_xml(xml, validate=bool(flags & DEFINE_VALIDATE))

    def define_xml(self, xml: str | bytes, flags: int = 0) -> SecretDef:
        return self.define(self.parse_definition(xml, flags))

    def define(self, new: SecretDef) -> SecretDef:
        with self._mutex:
            old_obj = self._secrets.get(new.uuid)
            new_key = self._usage_key(new)
            if old_obj is not None:
                old = old_obj.definition
                if (old.usage_id or None) != (new.usage_id or None):
                    raise errors.InternalError(
                        f"a secret with UUID {new.uuid} is already defined for use with {old.usage_id or ''}")
                if old.private and not new.private:
                    raise errors.InternalError("cannot change private flag on existing secret")
                holder = self._by_usage.get(new_key) if new_key else None
                if holder is not None and holder != new.uuid:
                    # libvirt compares only the id, so ceph "x" -> tls "x" could collide.
                    raise errors.InternalError(
                        f"a secret with UUID {holder} is already defined for use with {new.usage_id}")
            else:
                old = None
                holder = self._by_usage.get(new_key) if new_key else None
                if holder is not None:
                    # libvirt's text lacks "is" here; ours matches the redefine wording.
                    raise errors.InternalError(
                        f"a secret with UUID {holder} is already defined for use with {new.usage_id}")
            self._persist_define(old, new, old_obj.value if old_obj else None)
            if old_obj is not None:
                old_key = self._usage_key(old)
                if old_key and self._by_usage.get(old_key) == new.uuid:
                    del self._by_usage[old_key]
                old_obj.definition = new
            else:
                self._secrets[new.uuid] = _Secret(new)
            self._changed()
            if new_key:
                self._by_usage[new_key] = new.uuid
        log.info("defined secret %s", new.uuid, extra={"SECRET_UUID": new.uuid, "SECRET_OPERATION": "define"})
        self._emit(self._event(new, EventId.LIFECYCLE, Lifecycle.DEFINED))
        return new

    def _persist_define(self, old: SecretDef | None, new: SecretDef, value: bytearray | None) -> None:
        was_persistent = old is not None and not old.ephemeral
        if new.ephemeral:
            if was_persistent:
                # Fix of libvirt's quirk: the XML goes too, so the secret cannot
                # come back persistent and value-less after a restart.
                self.store.delete_definition(new.uuid)
                self.store.delete_values(new.uuid)
            return
        if old is not None and old.ephemeral and value is not None:
            self.store.write_value(new.uuid, bytes(value))
            try:
                self.store.write_definition(new)
            except BaseException:
                self.store.delete_values(new.uuid)
                raise
            return
        self.store.write_definition(new)

    # -- values -------------------------------------------------------------------
    def set_value(self, uuid: str, value: bytes, flags: int = 0) -> None:
        self.check_flags("set_value", flags)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise errors.InvalidArg("value in virSecretSetValue must be bytes")
        if len(value) > VALUE_MAX:
            # libvirt's remote driver refuses it before sending (REMOTE_SECRET_VALUE_MAX).
            raise errors.RPCError(f"value length greater than maximum: {len(value)} > {VALUE_MAX}")
        with self._mutex:
            s = self._get(uuid)
            d = s.definition
            if not d.ephemeral:
                self.store.write_value(d.uuid, bytes(value))
            old, s.value = s.value, bytearray(value)
            _wipe(old)
        log.info("set value of secret %s", d.uuid, extra={"SECRET_UUID": d.uuid, "SECRET_OPERATION": "set-value"})
        self._emit(self._event(d, EventId.VALUE_CHANGED))

    def get_value(self, uuid: str, flags: int = 0, *, internal_call: bool = False) -> bytes:
        """The value; private secrets only for `internal_call` (an in-process VM launcher)."""
        self.check_flags("get_value", flags)
        s = self._get(uuid)
        if s.definition.private and not internal_call:
            raise errors.InvalidSecret("secret is private")
        value = s.value
        if value is None:
            raise errors.NoSecret(f"secret '{s.definition.uuid}' does not have a value")
        return bytes(value)

    # -- undefine -----------------------------------------------------------------
    def undefine(self, uuid: str) -> None:
        with self._mutex:
            s = self._get(uuid)
            d = s.definition
            # Unlink the XML first: once it is gone the secret is gone, whatever happens next.
            self.store.delete_definition(d.uuid)
            try:
                self.store.delete_values(d.uuid)
            except OSError:
                log.warning("could not remove value files of %s", d.uuid)
            del self._secrets[d.uuid]
            self._changed()
            key = self._usage_key(d)
            if key and self._by_usage.get(key) == d.uuid:
                del self._by_usage[key]
            _wipe(s.value)
        log.info("undefined secret %s", d.uuid, extra={"SECRET_UUID": d.uuid, "SECRET_OPERATION": "undefine"})
        self._emit(self._event(d, EventId.LIFECYCLE, Lifecycle.UNDEFINED))

    # -- maintenance --------------------------------------------------------------
    def rewrite_values(self) -> tuple[int, int]:
        """Re-write every persistent value under the current scheme and key: (rewritten, total)."""
        done = total = 0
        with self._mutex:
            for s in self._secrets.values():
                if s.definition.ephemeral or s.value is None:
                    continue
                total += 1
                self.store.write_value(s.definition.uuid, bytes(s.value))
                done += 1
        return done, total

    def has_ephemeral(self) -> bool:
        return any(s.definition.ephemeral for s in list(self._secrets.values()))

"""The secret driver: libvirt's API rules over the secret table and a store.

Knows nothing of D-Bus. Thread-safe: reads run in the caller's thread without a lock; writes
are checked and planned under one lock in the caller's thread (a front end's event loop) and
committed in batches by one I/O thread (driver/writer.py): `submit_*` return a future, the
plain methods wait for it. A write reaches the table, and is announced, only once durable.
The behaviour it follows is libvirt's secret driver; docs/ARCHITECTURE.md has the map.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

from secretbus.core import errors
from secretbus.core.model import DEFINE_VALIDATE, EventId, Lifecycle, SecretDef, SecretEvent, UsageType, list_filter
from secretbus.core.secretxml import format_secret_xml, parse_secret_xml
from secretbus.core.uuids import canonical_uuid, parse_uuid
from secretbus.driver import rules
from secretbus.driver.rewrite import rewrite
from secretbus.driver.table import Entry, SecretTable, usage_key
from secretbus.driver.writer import Files, Key, Op, Planned, Writes
from secretbus.fleet.changes import Published, PublishResult, RemoteChange
from secretbus.fleet.store import FleetStore
from secretbus.store.codec import Binding, ValueCodecs
from secretbus.store.conf import SecretConf
from secretbus.store.filestore import SecretStore, Skipped, log_skip
from secretbus.store.lock import InstanceLock

log = logging.getLogger("secretbus.driver")

EventCallback = Callable[[SecretEvent], None]
T = TypeVar("T")
ANY = object()    # define(expect=ANY): no compare-and-set


def _keys(uuid: str, *defs: SecretDef | None) -> set[Key]:
    """What a write holds while in flight: its UUID and the usages of `defs`."""
    keys: set[Key] = {("uuid", uuid)}
    for d in defs:
        uk = usage_key(d) if d is not None else None
        if uk is not None:
            keys.add(("usage", uk))
    return keys


def _check_expected(uuid: str, now: SecretDef | None, expect: SecretDef | None | object) -> None:
    """Compare-and-set: the front end checked the caller's access on `expect` and awaited
    meanwhile; a definition that changed since then was not checked, so nothing is done."""
    if expect is not ANY and now != expect:
        raise errors.ChangedMeanwhile(uuid)


@dataclass(frozen=True)
class Setup:
    """One reading of secret.conf and the key: the store the driver serves from."""

    conf: SecretConf
    store: SecretStore
    key_description: str | None    # None when values are not encrypted
    # A reload that keeps its store (fleet mode) but changes its codecs (a key rotation started
    # or finished): the store takes them and every value is re-written under the new writer.
    codecs: ValueCodecs | None = None


Loader = Callable[[], Setup]


@dataclass(frozen=True)
class LoadSummary:
    loaded: int
    skipped: list[Skipped]


class StoreState(NamedTuple):
    state: str      # "local" (no shared store), or the fleet store's: connecting / online / degraded
    reason: str     # why it is not online ("" when it is, or when local)


LOCAL_STORE = StoreState("local", "")


class RewriteResult(NamedTuple):
    rewritten: int
    total: int      # persistent values found, those of skipped secrets included
    skipped: int    # secrets whose files could not be loaded, hence not rewritten


class SecretDriver:
    def __init__(self, setup: Setup, *, reload_setup: Loader | None = None,
                 lock: InstanceLock | None = None):
        """Serve `setup` (its store prepared, `lock` held); `reload_setup` re-reads both
        for reload(). The driver releases `lock` on close."""
        self._reload_setup = reload_setup
        self._lock = lock
        self._mutex = threading.RLock()
        self._writes = Writes(self._mutex, lambda: self._setup.store)
        self._table = SecretTable()
        self._subscribers: dict[int, EventCallback] = {}
        self._next_sub = 0
        self._views: dict[tuple[int, Callable[..., Any]], tuple[int, Any]] = {}
        self._setup = setup
        # Fleet mode (build.py): on a lookup miss, catch_up(uuid=… | usage=…) asks the shared
        # store once and returns True if the secret may now be here; closers run on close().
        self.catch_up: Callable[..., bool] | None = None
        self._closers: list[Callable[[], None]] = []
        # Where the store stands (fleet mode: connecting / online / degraded, and why), for
        # the front ends to show; a local store is always "local".
        self.state_source: Callable[[], StoreState] | None = None
        self._state_watchers: list[Callable[[StoreState], None]] = []
        try:
            self._load_store(setup.store)
        except BaseException:
            self.close()
            raise

    @property
    def conf(self) -> SecretConf:
        return self._setup.conf

    @property
    def key_description(self) -> str | None:
        return self._setup.key_description

    @property
    def store(self) -> SecretStore:
        return self._setup.store

    @property
    def writes(self) -> Writes:
        """The write scheduler (its `stats` count batches, for tests and benchmarks)."""
        return self._writes

    @property
    def setup(self) -> Setup:
        return self._setup

    def skipped(self) -> list[Skipped]:
        """What the last load (start-up or reload) could not serve, and why."""
        return self._table.skipped_files()

    @property
    def version(self) -> int:
        """Bumped on every change of the table."""
        return self._table.version

    # -- set-up, reload, shutdown -------------------------------------------------
    def _load_store(self, store: SecretStore, migrate: bool = False) -> LoadSummary:
        report = store.load(migrate=migrate)
        with self._mutex:
            clashes = self._table.replace(report.secrets, report.skipped)
        for s in clashes:
            log_skip(s)
        loaded = len(report.secrets) - len(clashes)
        stale = [x.definition.uuid for x in report.secrets if x.stale]
        report.secrets.clear()    # the decoded values now live only in the wipeable table
        self._rebind(store, stale)
        skipped = report.skipped + clashes
        log.info("loaded %d secrets, skipped %d", loaded, len(skipped))
        return LoadSummary(loaded, skipped)

    def _rebind(self, store: SecretStore, uuids: list[str]) -> None:
        """Rewrite values read from an unbound file (SBG1, or bound before a redefine to
        private completed) in the bound format, so the store never keeps the weaker one."""
        if not store.binds_definitions:
            return
        with self._mutex:
            entries = [e for uuid in uuids if (e := self._table.get(uuid)) is not None
                       and e.value is not None and not e.definition.ephemeral]
            for uuid, err in rewrite(store, entries):
                if err is not None:
                    log.warning("cannot rewrite the value of secret %s in the bound format: %s",
                                uuid, err.message, extra={"SECRET_UUID": uuid})
                    continue
                log.info("rewrote the value of secret %s in the bound format under the current key", uuid,
                         extra={"SECRET_UUID": uuid, "SECRET_OPERATION": "load"})

    def reload(self, check: Callable[[SecretConf], None] | None = None) -> LoadSummary:
        """Re-read secret.conf, the key and the store; on failure keep the old state.
        `check` sees the new conf before anything is replaced; what it raises aborts the reload."""
        if self._reload_setup is None:
            raise errors.NoSupport("this driver cannot reload its configuration")
        with self._writes.exclusive():
            setup = self._reload_setup()
            if check is not None:
                check(setup.conf)
            if setup.store is self._setup.store:
                # the same store (fleet mode): its table is current, only the conf changes
                if setup.codecs is not None:
                    setup.store.use_codecs(setup.codecs)
                    if setup.codecs.retiring:        # a rotation started: re-write everything
                        self._rebind(setup.store, [e.definition.uuid for e in self._table])
                summary = LoadSummary(len(self._table), self._table.skipped_files())
            else:
                summary = self._load_store(setup.store)
            self._setup = setup
            return summary

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    # -- the store's state ----------------------------------------------------------
    def store_state(self) -> StoreState:
        return self.state_source() if self.state_source is not None else LOCAL_STORE

    def watch_store_state(self, fn: Callable[[StoreState], None]) -> Callable[[], None]:
        """Call `fn(state)` (from any thread) whenever the store's state changes; returns the
        function that ends the watch."""
        with self._mutex:
            self._state_watchers.append(fn)

        def unwatch() -> None:
            with self._mutex:
                if fn in self._state_watchers:
                    self._state_watchers.remove(fn)
        return unwatch

    def store_state_changed(self) -> None:
        state = self.store_state()
        with self._mutex:
            watchers = list(self._state_watchers)
        for fn in watchers:
            fn(state)

    def close(self) -> None:
        for fn in reversed(self._closers):
            fn()
        self._closers.clear()
        self._writes.close()
        with self._mutex:
            self._table.clear()
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

    def _emit(self, d: SecretDef, event_id: EventId, lifecycle: Lifecycle | None = None) -> None:
        event = SecretEvent(event_id, d.uuid, d.usage_type, d.usage_id or "", lifecycle, definition=d)
        for cb in list(self._subscribers.values()):
            try:
                cb(event)
            except Exception:
                log.exception("event subscriber failed")

    # -- lookups ------------------------------------------------------------------
    def _get(self, uuid: str) -> Entry:
        canon = canonical_uuid(uuid)
        entry = self._table.get(canon)
        if entry is None:
            raise errors.NoSecret(f"no secret with matching uuid '{canon}'")
        return entry

    def _get_read(self, uuid: str) -> Entry:
        """_get for reads (never with the mutex held: a catch-up waits for the fleet watch)."""
        try:
            return self._get(uuid)
        except errors.NoSecret:
            if self.catch_up is None or not self.catch_up(uuid=parse_uuid(uuid)):
                raise
        return self._get(uuid)

    def lookup_by_uuid(self, uuid: str) -> SecretDef:
        return self._get_read(uuid).definition

    def lookup_by_usage(self, usage_type: int, usage_id: str) -> SecretDef:
        if not isinstance(usage_id, str):
            raise errors.arg_check("usageID", "virSecretLookupByUsage", "must not be NULL")
        try:
            ut = UsageType(usage_type)
        except ValueError:
            ut = UsageType.NONE
        entry = self._table.by_usage((ut, usage_id)) if ut != UsageType.NONE else None
        if entry is None and ut != UsageType.NONE and self.catch_up is not None \
                and self.catch_up(usage=(ut, usage_id)):
            entry = self._table.by_usage((ut, usage_id))
        if entry is None:
            raise errors.NoSecret(f"no secret with matching usage '{usage_id}'")
        return entry.definition

    def list_secrets(self, flags: int = 0) -> list[SecretDef]:
        """Definitions sorted by UUID, filtered by libvirt's list flags."""
        rules.check_list_flags(flags)
        defs = self._table.snapshot()
        keep = list_filter(flags)
        return list(defs) if keep is None else [d for d in defs if keep(d)]

    def list_view(self, flags: int, derive: Callable[[list[SecretDef]], T]) -> T:
        """derive(list_secrets(flags)), kept until the table changes: a front end's own form
        of a listing (D-Bus object paths, say) without a second cache keyed on `version`.
        `derive` must be one long-lived function (it is part of the cache key)."""
        version = self._table.version    # read first: a racing change only marks the entry stale
        key = (flags, derive)
        hit = self._views.get(key)
        if hit is not None and hit[0] == version:
            return cast(T, hit[1])
        result = derive(self.list_secrets(flags))
        self._views[key] = (version, result)
        return result

    def count(self) -> int:
        return len(self._table)

    def get_xml_desc(self, uuid: str, flags: int = 0) -> str:
        rules.check_xml_desc_flags(flags)
        return format_secret_xml(self._get_read(uuid).definition)

    # -- define -------------------------------------------------------------------
    @staticmethod
    def parse_definition(xml: str | bytes, flags: int = 0) -> SecretDef:
        rules.check_define_flags(flags)
        return parse_secret_xml(xml, validate=bool(flags & DEFINE_VALIDATE))

    def define_xml(self, xml: str | bytes, flags: int = 0) -> SecretDef:
        return self.define(self.parse_definition(xml, flags))

    def find(self, uuid: str) -> SecretDef | None:
        """The definition of `uuid` now, None if there is none (no error: a define asks)."""
        entry = self._table.get(uuid)
        return entry.definition if entry is not None else None

    def define(self, new: SecretDef, *, expect: SecretDef | None | object = ANY) -> SecretDef:
        """Define or redefine `new`. With `expect` (a compare-and-set), the definition of its
        UUID must still be `expect` (None: absent): the caller checked its access against
        that one, and one that changed meanwhile is refused rather than acted on unchecked."""
        return cast(SecretDef, self._writes.run(self._define_op(new, expect)))

    def submit_define(self, new: SecretDef, *, expect: SecretDef | None | object = ANY) -> Future[SecretDef]:
        """define(), answered through the future once durable."""
        return self._writes.submit(self._define_op(new, expect))

    def _define_op(self, new: SecretDef, expect: SecretDef | None | object) -> Op:
        rules.check_definition(new)

        def keys() -> set[Key]:
            entry = self._table.get(new.uuid)
            return _keys(new.uuid, entry.definition if entry is not None else None, new)

        def plan(files: Files) -> Planned:
            entry = self._table.get(new.uuid)
            old = entry.definition if entry is not None else None
            _check_expected(new.uuid, old, expect)
            self._check_define(old, new)
            self._persist_define(old, new, entry.value if entry is not None else None, files)

            def apply() -> SecretDef:
                if entry is not None:
                    self._table.redefine(entry, new)
                else:
                    self._table.add(new)
                return new

            def announce() -> None:
                log.info("defined secret %s", new.uuid, extra={"SECRET_UUID": new.uuid, "SECRET_OPERATION": "define"})
                self._emit(new, EventId.LIFECYCLE, Lifecycle.DEFINED)
            return Planned(apply, announce)
        return Op(frozenset(_keys(new.uuid, new)), keys, plan)

    def _check_define(self, old: SecretDef | None, new: SecretDef) -> None:
        skipped = self._table.skipped(new.uuid)
        if skipped is not None:
            # Its files are in the store (an undecodable value, say, without the key):
            # writing would overwrite or delete them.
            d = skipped.definition
            raise errors.NotLoaded(d if d is not None and d.uuid == new.uuid else SecretDef(new.uuid), skipped.reason)
        if old is not None:
            if (old.usage_id or None) != (new.usage_id or None):
                # libvirt prints a missing usage id as C's printf does a NULL: "(null)".
                raise errors.UsageChange(old)
            if old.private and not new.private:
                raise errors.InternalError("cannot change private flag on existing secret")
        holder = self._table.usage_holder(new)
        if holder is not None:
            # libvirt compares only the id (ceph "x" -> tls "x" clashes there) and its text
            # lacks "is" for a new secret; ours is the redefine wording in both cases.
            raise errors.UsageClash(holder, new)

    @staticmethod
    def _persist_define(old: SecretDef | None, new: SecretDef, value: bytearray | None, files: Files) -> None:
        """The file changes of a define, in order (a plan keeps its steps' order)."""
        was_persistent = old is not None and not old.ephemeral
        if new.ephemeral:
            if was_persistent:
                # Fix of libvirt's quirk: the XML goes too, so the secret cannot
                # come back persistent and value-less after a restart.
                files.delete_values(new.uuid)
                files.delete_definition(new.uuid)
            return
        if was_persistent:
            files.definition(new)
            if value is not None and old is not None and Binding.of(old) != Binding.of(new):
                # The value is bound to the private flag and usage: re-bind it (after the XML, so a
                # crash in between leaves a stricter XML, which loads and is re-bound then).
                files.value(new, bytes(value))
            return
        # New on disk: a value file left by an interrupted undefine is not inherited.
        if value is not None:
            files.value(new, bytes(value))
        else:
            files.delete_values(new.uuid)
        # If the XML cannot be written, the value written before it goes again.
        files.definition(new, undo_values=value is not None)

    # -- values -------------------------------------------------------------------
    def set_value(self, uuid: str, value: bytes, flags: int = 0, *, expect: SecretDef | object = ANY) -> None:
        """`expect`: as for define, the definition the caller's access was checked on."""
        self._writes.run(self._set_value_op(uuid, value, flags, expect))

    def submit_set_value(self, uuid: str, value: bytes, flags: int = 0, *,
                         expect: SecretDef | object = ANY) -> Future[None]:
        return self._writes.submit(self._set_value_op(uuid, value, flags, expect))

    def _set_value_op(self, uuid: str, value: bytes, flags: int, expect: SecretDef | object) -> Op:
        rules.check_set_value_flags(flags)
        data = rules.check_value(value)
        canon = canonical_uuid(uuid)
        own: set[Key] = {("uuid", canon)}

        def plan(files: Files) -> Planned:
            entry = self._get(canon)
            d = entry.definition
            _check_expected(d.uuid, d, expect)
            if not d.ephemeral:
                files.value(d, data)

            def announce() -> None:
                log.info("set value of secret %s", d.uuid,
                         extra={"SECRET_UUID": d.uuid, "SECRET_OPERATION": "set-value"})
                self._emit(d, EventId.VALUE_CHANGED)
            return Planned(lambda: self._table.set_value(entry, data), announce)
        return Op(frozenset(own), lambda: set(own), plan)

    def get_value(self, uuid: str, flags: int = 0, *, internal_call: bool = False) -> bytes:
        """The value; private secrets only for `internal_call` (an in-process VM launcher)."""
        rules.check_get_value_flags(flags)
        entry = self._get_read(uuid)
        rules.check_readable(entry.definition, internal_call=internal_call)
        value = entry.value
        if value is None and self.catch_up is not None and self.catch_up(value_of=entry.definition.uuid):
            entry = self._get(uuid)
            rules.check_readable(entry.definition, internal_call=internal_call)
            value = entry.value
        if value is None:
            raise errors.NoSecret(f"secret '{entry.definition.uuid}' does not have a value")
        return bytes(value)

    def value_of(self, d: SecretDef, *, internal_call: bool = False) -> bytes:
        """get_value(d.uuid) of a definition a front end has just looked up and checked:
        its UUID is not parsed and looked up again while `d` is still the table's; any
        other case (replaced, gone, no value) is get_value's, with its errors."""
        entry = self._table.get(d.uuid)
        if entry is not None and entry.definition is d and entry.value is not None:
            rules.check_readable(d, internal_call=internal_call)
            return bytes(entry.value)
        return self.get_value(d.uuid, 0, internal_call=internal_call)

    # -- undefine -----------------------------------------------------------------
    def undefine(self, uuid: str, *, expect: SecretDef | object = ANY) -> None:
        """`expect`: as for define, the definition the caller's access was checked on."""
        self._writes.run(self._undefine_op(uuid, expect))

    def submit_undefine(self, uuid: str, *, expect: SecretDef | object = ANY) -> Future[None]:
        return self._writes.submit(self._undefine_op(uuid, expect))

    def _undefine_op(self, uuid: str, expect: SecretDef | object) -> Op:
        canon = canonical_uuid(uuid)

        def keys() -> set[Key]:
            entry = self._table.get(canon)
            return _keys(canon, entry.definition if entry is not None else None)

        def plan(files: Files) -> Planned:
            d = self._get(canon).definition
            _check_expected(d.uuid, d, expect)
            # Values first: a crash in between leaves a value-less secret, never a
            # value file that a later secret with this UUID would inherit.
            files.delete_values(d.uuid)
            files.delete_definition(d.uuid)

            def announce() -> None:
                log.info("undefined secret %s", d.uuid, extra={"SECRET_UUID": d.uuid, "SECRET_OPERATION": "undefine"})
                self._emit(d, EventId.LIFECYCLE, Lifecycle.UNDEFINED)
            return Planned(lambda: self._table.remove(d.uuid), announce)
        return Op(frozenset({("uuid", canon)}), keys, plan)

    # -- changes made elsewhere (fleet mode) -----------------------------------------------
    def apply_remote(self, changes: Callable[[], Iterable[RemoteChange]]) -> None:
        """Run `changes()` (the fleet store updating its cache) under the mutex, apply them to
        the table, then announce what differs, as a local define/set/undefine would."""
        events: list[tuple[SecretDef, EventId, Lifecycle | None]] = []
        with self._writes.exclusive():
            batch = list(changes())
            # A value later in the batch (start-up resync) replaces, it does not clear first.
            valued = {c.uuid for c in batch if c.value is not None}
            for c in batch:
                entry = self._table.get(c.uuid)
                if c.definition is None:
                    if entry is not None:
                        self._table.remove(c.uuid)
                        events.append((entry.definition, EventId.LIFECYCLE, Lifecycle.UNDEFINED))
                    continue
                if entry is None:
                    holder = self._table.usage_holder(c.definition)
                    if holder is not None:
                        log.error("secret %s from the fleet is not served here: local secret %s holds "
                                  "its usage", c.uuid, holder, extra={"SECRET_UUID": c.uuid})
                        continue
                    entry = self._table.add(c.definition)
                    events.append((c.definition, EventId.LIFECYCLE, Lifecycle.DEFINED))
                elif entry.definition.ephemeral:
                    log.error("secret %s from the fleet is not served here: a local ephemeral secret has "
                              "its UUID", c.uuid, extra={"SECRET_UUID": c.uuid})
                    continue
                elif entry.definition != c.definition:
                    self._table.redefine(entry, c.definition)
                    events.append((c.definition, EventId.LIFECYCLE, Lifecycle.DEFINED))
                if c.value is not None and (entry.value is None or bytes(entry.value) != c.value):
                    self._table.set_value(entry, c.value)
                    events.append((c.definition, EventId.VALUE_CHANGED, None))
                elif c.fresh and c.uuid not in valued:
                    self._table.clear_value(entry)
        for d, event_id, lifecycle in events:
            self._emit(d, event_id, lifecycle)

    # -- maintenance --------------------------------------------------------------
    def rewrite_values(self) -> RewriteResult:
        """Re-write every persistent value under the current scheme and key; this is also
        the explicit migration of legacy and unbound value files (store.load(migrate=True))."""
        done = total = 0
        with self._writes.exclusive():
            self._load_store(self.store, migrate=True)
            entries = [e for e in self._table if not e.definition.ephemeral and e.value is not None]
            total = len(entries)
            for _, err in rewrite(self.store, entries):
                if err is not None:
                    raise err
                done += 1
            skipped = len(self._table.skipped_files())
        return RewriteResult(done, total + skipped, skipped)

    def publish_to_fleet(self, uuid: str | None = None) -> list[PublishResult]:
        """`secretbus fleet publish`: the persistent secrets this host had before fleet mode
        (or the one named) moved into the fleet, one etcd transaction each, while no other
        write runs. The table does not change (same definition, same value), so nothing is
        announced here; the other hosts' watches announce the new secrets."""
        store = self.store
        if not isinstance(store, FleetStore):
            raise errors.OperationFailed("fleet mode is off: there is no fleet to publish to")
        results: list[PublishResult] = []
        with self._writes.exclusive():
            # From the files: where the fleet has a secret too, the table serves the fleet's copy.
            local = store.local_secrets()
            if uuid is not None:
                named = self._get(uuid).definition
                todo = [local.get(named.uuid, (named, None))]
            else:
                todo = [local[u] for u in sorted(local)]
            for d, value in todo:
                why = None if uuid is not None or store.is_fleet(d.uuid) else store.stays_local(d)
                if why is not None:
                    results.append(PublishResult(d.uuid, Published.STAYS_LOCAL, why))
                    continue
                try:
                    done = store.publish(d, value)
                except errors.SecretError as err:
                    results.append(PublishResult(d.uuid, Published.REFUSED, err.message))
                else:
                    results.append(PublishResult(d.uuid, done))
        return results

    def has_ephemeral(self) -> bool:
        return any(e.definition.ephemeral for e in self._table)

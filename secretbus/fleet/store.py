"""The fleet store: the driver's file store interface, with persistent secrets held in etcd.

`FleetStore` is the instance's usual file store (local-only secrets: ephemeral ones never get
here, persistent ones that do not replicate) plus the fleet's local encrypted cache, a second
`SecretStore` under the host key in the fleet directory; the driver loads both at start-up and
serves from them. Every file in the cache is a fleet secret, so a resync after a restart knows
which cached secrets etcd dropped meanwhile. Writes of fleet secrets: each define, set-value and
undefine is one etcd transaction (the writes the driver's writer takes together share one:
`write_many`), and the cache is written only after it commits, so the writing host reads its
own writes and never diverges from etcd.
Changes made by other hosts arrive through `apply_events`/`resync` (fleet/sync.py), which
update the cache and return what the driver must apply and announce.

The driver's store calls come in fixed sequences (driver._persist_define, undefine): a
`delete_values` or `write_value` of a secret not yet (or no longer) in the fleet is kept
pending and done in the transaction of the `write_definition`/`delete_definition` that
follows, so each API call stays one transaction.

Threads: the driver calls every method here with its mutex held (writes, and the watcher's
apply through driver.apply_remote), so they never interleave; `_lock` guards the
bookkeeping that status and catch-up read from other threads.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from secretbus.core import errors
from secretbus.core.model import SecretDef, UsageType
from secretbus.core.secretxml import format_secret_xml, parse_secret_xml
from secretbus.fleet import etcd as tx
from secretbus.fleet.cachewrites import CacheWrites
from secretbus.fleet.changes import Published, RemoteChange
from secretbus.fleet.etcd import KV, Etcd, EtcdUnavailable, WatchEvent
from secretbus.fleet.keyfile import remove_fleet_key
from secretbus.fleet.keyspace import Keyspace, group_records
from secretbus.fleet.seal import ROTATING, NewerKey, Sealer, SealError, cluster_checks
from secretbus.fleet.status import FleetState, FleetStatus, StatusCell
from secretbus.store import fsutil
from secretbus.store.calls import StoreCall, replay
from secretbus.store.codec import ValueCodecs
from secretbus.store.filestore import LoadReport, SecretStore

log = logging.getLogger("secretbus.fleet")

CACHE_DIR = "cache"
# etcd refuses requests over 1.5 MiB (--max-request-bytes), and the gateway sends base64.
MAX_RECORD = 1_000_000
RESYNC_STEP = 256     # secrets applied per hold of the driver's lock during a resync
# Lookup misses that may ask etcd, per second (a burst of as many): misses cost a round trip,
# and a local caller looking up random UUIDs must not turn into load on etcd or stall reads.
CATCH_UP_RATE = 50.0


@dataclass(frozen=True)
class FleetOptions:
    cluster: str
    usage_types: frozenset[UsageType] | None = None   # None: every usage type replicates
    private: bool = True                               # private secrets replicate too


@dataclass
class Known:
    """What this host knows of one fleet secret, as of the etcd revisions it applied."""
    definition: SecretDef
    inc: str             # incarnation: new on each first define, binds the value to it
    gen: int             # define counter
    def_rev: int
    value_gen: int = 0
    value_rev: int = 0
    digest: bytes | None = field(default=None, repr=False)


def unavailable(why: str) -> errors.SecretError:
    return errors.OperationFailed(f"fleet store unavailable: {why}")


def _changed_meanwhile(uuid: str) -> errors.SecretError:
    return errors.OperationFailed(f"secret {uuid} was changed on another host meanwhile; try again")


@dataclass
class _Write(tx.TxnPart):
    """One write of a fleet secret as a transaction: `failure` reads what explains a refusal
    (`refused(responses)` makes its error); `done(revision)` follows the commit."""
    failure: list[dict[str, Any]]
    done: Callable[[int], None]
    refused: Callable[[list[dict[str, Any]]], errors.SecretError]


class FleetStore(SecretStore):
    def __init__(self, config_dir: Path, codecs: ValueCodecs, *, etcd: Etcd, sealer: Sealer,
                 options: FleetOptions, state_dir: Path):
        super().__init__(config_dir, codecs)
        self.cache = SecretStore(state_dir / CACHE_DIR, codecs)
        # The cache's writes: of other hosts' changes, and of this host's once committed.
        self.cache_writes = CacheWrites(self.cache)
        self.etcd = etcd
        self.sealer = sealer
        self._options = options
        # Fleet mode reloads secret.conf in place (driver/build.py): what this host publishes
        # follows the conf the driver serves with, once set.
        self.options_source: Callable[[], FleetOptions] | None = None
        # `fleet rotate` (rotate.py): picks up this host's newer key; None without a host key.
        self.key_refresh: Callable[[], Sealer | None] | None = None
        self.keys = Keyspace(options.cluster)
        self.host_id: str | None = None           # this host's fleet identity, if it has one
        self.state_dir = state_dir
        self.cell = StatusCell()
        self._lock = threading.Condition(threading.RLock())
        self._known: dict[str, Known] = {}
        self._gone: dict[str, int] = {}          # uuid -> revision of our own undefine
        self._pending_value: dict[str, bytes] = {}
        self._pending_delete: set[str] = set()
        self._deferred: list[_Write] | None = None     # inside write_many: the write's transaction
        self.revision = 0                         # last revision applied from watch/resync
        self.resyncs = 0                          # full resyncs done (start-up, compaction)
        # what the cache held at load, consumed by the first resync: unchanged secrets are not rewritten
        self._cached: dict[str, tuple[SecretDef, bytes | None]] = {}
        self._bucket = (CATCH_UP_RATE, time.monotonic())
        self._bucket_lock = threading.Lock()

    def use_codecs(self, codecs: ValueCodecs) -> None:
        super().use_codecs(codecs)
        self.cache.use_codecs(codecs)      # the cache is under the same host key

    @property
    def options(self) -> FleetOptions:
        return self.options_source() if self.options_source is not None else self._options

    # -- status ----------------------------------------------------------------------
    @property
    def status(self) -> FleetStatus:
        state, reason = self.cell.get()
        return FleetStatus(state, reason, self.revision)

    def is_fleet(self, uuid: str) -> bool:
        with self._lock:
            return uuid in self._known

    def replicates(self, d: SecretDef) -> bool:
        return self.stays_local(d) is None

    def stays_local(self, d: SecretDef) -> str | None:
        """Why `d` is not for the fleet under this host's conf; None if it replicates."""
        if d.ephemeral:
            return "ephemeral secrets never leave this host"
        if d.private and not self.options.private:
            return "it is private and fleet_private is off"
        if self.options.usage_types is not None and d.usage_type not in self.options.usage_types:
            return f"its usage type '{d.usage_type.name.lower()}' is not in fleet_usage_types"
        return None

    def has_local_copy(self, uuid: str) -> bool:
        """Whether the instance's own directory holds `uuid` (a secret of before fleet mode)."""
        return self.xml_path(uuid).exists()

    def _require_online(self) -> None:
        state, reason = self.cell.get()
        if state is not FleetState.ONLINE:
            raise unavailable(reason)

    def _txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
             failure: list[dict[str, Any]] | None = None) -> tuple[bool, int, list[dict[str, Any]]]:
        self._require_online()
        # Every write is sealed and indexed under this host's current key: it commits only while
        # that is the cluster's key (no rotation under way, none finished that we missed).
        fence = tx.value_is(self.keys.key_check, self.sealer.check_value.encode())
        try:
            ok, rev, responses = self.etcd.txn(compare + [fence], success,
                                               (failure or []) + [tx.get(self.keys.key_check)])
        except EtcdUnavailable as e:
            # The outcome is unknown; if it committed, the watch brings it in later.
            self.cell.set(FleetState.DEGRADED, str(e))
            raise unavailable(str(e)) from None
        if not ok:
            kvs = responses[-1].get("response_range", {}).get("kvs", []) if responses else []
            check = KV.of(kvs[0]).value if kvs else b""
            if check != self.sealer.check_value.encode():
                raise self._fenced(check)
            responses = responses[:-1]
        return ok, rev, responses

    def _run(self, w: _Write) -> None:
        """Send one write's transaction, or, inside write_many, keep it for the batch's."""
        if self._deferred is not None:
            if self._deferred:
                raise errors.InternalError("one write of a batch made two fleet transactions")
            self._deferred.append(w)
            return
        ok, rev, responses = self._txn(w.compare, w.ops, w.failure)
        if not ok:
            raise w.refused(responses)
        with self.cache_writes.batch():
            w.done(rev)

    # -- a batch of writes: one transaction ---------------------------------------------------
    batches_writes = True

    def write_many(self, writes: Sequence[Sequence[StoreCall]]) -> list[Exception | None]:
        """The writes the driver's writer took together (their secrets and usages disjoint):
        each one's transaction is made as usual but kept, then they are sent as one (several
        when etcd's bounds call for it), and the cache's files of all of them are committed
        together. A batch refused (a record changed by another host) is sent again one write
        at a time, so each gets its own verdict. A write that is not a single transaction
        at its end (a redefine that re-binds the value, a local secret's) is made at once."""
        out: list[Exception | None] = [None] * len(writes)
        kept: list[tuple[int, _Write]] = []
        with self._lock:
            for i, calls in enumerate(writes):
                self._deferred = [] if self._one_transaction(calls) else None
                try:
                    replay(self, calls)
                except Exception as e:  # noqa: BLE001 - that write's error, for its caller
                    out[i] = e
                    continue
                finally:
                    got, self._deferred = self._deferred, None
                if got:
                    kept.append((i, got[0]))
            for i, err in self._send(kept):
                out[i] = err
        return out

    def _one_transaction(self, calls: Sequence[StoreCall]) -> bool:
        """Whether only the last of `calls` may send a transaction: the calls before it
        leave only pending state (a new secret's value, an undefine's delete_values)."""
        for c in calls[:-1]:
            if c.method == "delete_values":
                continue
            if c.method == "write_value" and c.args[0].uuid not in self._known:
                continue
            return False
        return bool(calls)

    def _send(self, kept: list[tuple[int, _Write]]) -> list[tuple[int, Exception | None]]:
        """(index, error or None) of each kept write, sent as few transactions as fit."""
        out: list[tuple[int, Exception | None]] = []
        group: list[tuple[int, _Write]] = []
        for item in kept:
            if group and not tx.fits([w for _, w in group], item[1]):
                out += self._send_group(group)
                group = []
            group.append(item)
        if group:
            out += self._send_group(group)
        return out

    def _send_group(self, group: list[tuple[int, _Write]]) -> list[tuple[int, Exception | None]]:
        if len(group) > 1:
            try:
                ok, rev, _ = self._txn([c for _, w in group for c in w.compare], [op for _, w in group for op in w.ops])
            except errors.SecretError as e:    # etcd unreachable, or this host's key fenced out
                return [(i, e) for i, _ in group]
            if ok:
                with self.cache_writes.batch():
                    for _, w in group:
                        w.done(rev)
                return [(i, None) for i, _ in group]
        out: list[tuple[int, Exception | None]] = []
        for i, w in group:          # one, or a refused batch: one at a time
            try:
                self._run(w)
            except errors.SecretError as e:
                out.append((i, e))
            else:
                out.append((i, None))
        return out

    def _fenced(self, check: bytes) -> errors.SecretError:
        if check.startswith(ROTATING.encode()):
            return unavailable("the fleet key is being rotated (fleet rotate); try again when it is done")
        if self.refresh_key():
            return errors.OperationFailed("the fleet key was rotated meanwhile; try again")
        return unavailable(f"this host's fleet key is not the one of fleet cluster '{self.options.cluster}'")

    def refresh_key(self, version: int = 0) -> bool:
        """Pick up a newer fleet key (a rotation); True if the sealer now has `version` or a
        newer key than before."""
        if self.key_refresh is None:
            return False
        with self._lock:
            try:
                sealer = self.key_refresh()
            except (EtcdUnavailable, errors.SecretError) as e:
                log.error("fleet: cannot pick up the rotated fleet key: %s", getattr(e, "message", e))
                return False
            if sealer is None or sealer.key_version <= self.sealer.key_version or sealer.key_version < version:
                return False
            log.info("fleet: now using fleet key version %d", sealer.key_version)
            self.sealer = sealer
            return True

    def retire_older_keys(self, checks: frozenset[str]) -> None:
        """Once the cluster's key check names this host's newest key alone, the rotation to it
        has finished: every record is sealed under it (rotate.py's last transaction requires
        it), so the older versions open nothing of the fleet's any more. They leave the ring
        and this host's disk, as on the host that rotated (the local cache is under the host's
        own key, store/keys.py). Called with the check of a revision already applied."""
        with self._lock:
            older = [v for v in self.sealer.versions if v != self.sealer.key_version]
            if not older or checks != {self.sealer.check_value}:
                return
            self.sealer = self.sealer.newest_only()
            try:
                removed = remove_fleet_key(self.state_dir, older)
            except errors.SecretError as e:
                log.error("fleet: cannot remove retired fleet key versions %s: %s",
                          ", ".join(map(str, older)), e.message)
                return
            log.info("fleet: retired fleet key version%s %s (the rotation to version %d has finished; "
                     "%d files removed)", "s" if len(older) > 1 else "", ", ".join(map(str, older)),
                     self.sealer.key_version, len(removed))

    # -- sealing ---------------------------------------------------------------------
    def _seal_def(self, d: SecretDef, inc: str, gen: int) -> bytes:
        # (UTF-8, not \u escapes: the largest definition the rules allow stays far below etcd's limit)
        plain = json.dumps({"xml": format_secret_xml(d), "inc": inc}, ensure_ascii=False).encode()
        return self.sealer.seal("def", d.uuid, gen, plain)

    def _open_def(self, uuid: str, record: bytes) -> tuple[SecretDef, str, int]:
        gen, plain = self.sealer.open("def", uuid, record)
        try:
            rec = json.loads(plain)
            d = parse_secret_xml(rec["xml"])
            inc = str(rec["inc"])
        except (ValueError, KeyError, TypeError):
            raise SealError(f"fleet def record of secret {uuid} is malformed") from None
        except errors.SecretError as e:
            raise SealError(f"fleet def record of secret {uuid}: {e.message}") from None
        if d.uuid != uuid or d.ephemeral:
            raise SealError(f"fleet def record of secret {uuid} names another secret")
        return d, inc, gen

    def _usage_key(self, d: SecretDef) -> bytes | None:
        if d.usage_type == UsageType.NONE:
            return None
        return self.keys.usage(self.sealer.usage_index(d.usage_type, d.usage_id or ""))

    # -- writes (the driver's store interface) ------------------------------------------
    def write_definition(self, d: SecretDef) -> None:
        with self._lock:
            known = self._known.get(d.uuid)
            if known is None and (not self.replicates(d) or self.xml_path(d.uuid).exists()):
                # Not for the fleet, or a secret this host had before fleet mode: it stays local
                # (publishing existing secrets is an explicit step, not a side effect of a redefine).
                self._pending_delete.discard(d.uuid)
                value = self._pending_value.pop(d.uuid, None)
                super().write_definition(d)
                if value is not None:
                    super().write_value(d, value)
                return
            self._define(d, known)

    def _define(self, d: SecretDef, known: Known | None) -> None:
        kd, kv = self.keys.definition(d.uuid), self.keys.value(d.uuid)
        usage = self._usage_key(d)
        old_usage = self._usage_key(known.definition) if known is not None else None
        inc = known.inc if known is not None else secrets.token_hex(8)
        gen = known.gen + 1 if known is not None else 1
        compare = [tx.mod_is(kd, known.def_rev) if known is not None else tx.absent(kd)]
        record = self._seal_def(d, inc, gen)
        if len(record) > MAX_RECORD:
            raise errors.InvalidArg(f"secret {d.uuid}: the definition is too large for the fleet store "
                                    f"({len(record)} bytes sealed, at most {MAX_RECORD})")
        ops = [tx.put(kd, record)]
        if usage is not None and usage != old_usage:
            compare.append(tx.absent(usage))
            ops.append(tx.put(usage, d.uuid.encode()))
        if old_usage is not None and old_usage != usage:
            ops.append(tx.delete(old_usage))
        # (taken now: a refused define leaves nothing pending)
        value = self._pending_value.pop(d.uuid, None)
        value_gen = known.value_gen if known is not None else 0
        if value is not None:
            value_gen += 1
            sealed = self.sealer.seal("value", d.uuid, value_gen, value, extra=inc)
            ops.append(tx.put(kv, sealed))
        elif known is None:
            ops.append(tx.delete(kv))    # a new secret inherits no value
        failure = [tx.get(kd)] + ([tx.get(usage)] if usage is not None else [])

        def done(rev: int) -> None:
            self._pending_delete.discard(d.uuid)
            self._gone.pop(d.uuid, None)
            entry = Known(d, inc, gen, rev)
            if known is not None:
                entry.value_gen, entry.value_rev, entry.digest = known.value_gen, known.value_rev, known.digest
            if value is not None:
                entry.value_gen, entry.value_rev, entry.digest = value_gen, rev, self.sealer.digest(value)
            self._known[d.uuid] = entry
            self.cache_writes.definition(d)
            if value is not None:
                self.cache_writes.value(d, value)
            elif known is None:
                self.cache_writes.delete_values(d.uuid)
        self._run(_Write(compare, ops, failure, done, partial(self._define_refused, d, known)))

    def _define_refused(self, d: SecretDef, known: Known | None,
                        responses: list[dict[str, Any]]) -> errors.SecretError:
        kvs = [r.get("response_range", {}).get("kvs", []) for r in responses]
        if len(kvs) > 1 and kvs[1]:
            holder = KV.of(kvs[1][0]).value.decode("ascii", "replace")
            if holder != d.uuid:
                return errors.UsageClash(holder, d)
        if known is None:
            return errors.OperationFailed(f"secret {d.uuid} was defined on another host meanwhile; try again")
        return errors.OperationFailed(f"secret {d.uuid} was changed on another host meanwhile; try again")

    def write_value(self, d: SecretDef, value: bytes) -> None:
        with self._lock:
            known = self._known.get(d.uuid)
            cached = self._cached.get(d.uuid) if known is None else None
            if cached is not None and cached == (d, self.sealer.digest(value)):
                # A rewrite of a cached fleet secret not yet synced (rewrite-values, offline): the cache only.
                self.cache.write_value(d, value)
                return
            if known is None:
                if self.replicates(d) and not self.xml_path(d.uuid).exists():
                    # Before the definition (driver._persist_define): sent with it.
                    self._require_online()
                    self._pending_value[d.uuid] = bytes(value)
                    return
                super().write_value(d, value)
                return
            digest = self.sealer.digest(value)
            if digest == known.digest:
                # A re-bind after a redefine (the cache's AAD binds the definition; etcd's does not).
                self.cache.write_value(d, value)
                return
            kd, kv = self.keys.definition(d.uuid), self.keys.value(d.uuid)
            gen = known.value_gen + 1
            sealed = self.sealer.seal("value", d.uuid, gen, value, extra=known.inc)
            data = bytes(value)

            def done(rev: int) -> None:
                known.value_gen, known.value_rev, known.digest = gen, rev, digest
                self.cache_writes.value(d, data)
            self._run(_Write([tx.mod_is(kd, known.def_rev)], [tx.put(kv, sealed)], [], done,
                             lambda _: _changed_meanwhile(d.uuid)))

    def publish(self, d: SecretDef, value: bytes | None) -> Published:
        """Move a secret this host had before fleet mode into the fleet (`secretbus fleet
        publish`): one transaction creates it in etcd, as a define with its value would; then
        it is cached and its local files are removed. Already in the fleet with the same
        definition and value, or the same definition and no local value (published from
        another host that had it too, or a removal cut short): only the local copy is
        removed. Anything else changes nothing and raises. A crash after the commit leaves
        both copies; the fleet's is served (load) and a second publish removes the local one."""
        with self._lock:
            known = self._known.get(d.uuid)
            if d.ephemeral or not self.has_local_copy(d.uuid):
                why = (self.stays_local(d) if d.ephemeral else
                       "it is in the fleet already" if known is not None else "this host has no file of it")
                raise errors.InvalidArg(f"secret {d.uuid} is not published: {why}")
            if known is not None:
                # A local copy without a value (also what a removal cut short leaves) adds nothing.
                if known.definition != d or (value is not None and known.digest != self.sealer.digest(value)):
                    raise errors.OperationFailed(
                        f"secret {d.uuid} is not published: the fleet has it with another definition or "
                        "value; the fleet's is served here and the local copy is kept")
                try:
                    self._retire_local_copy(d.uuid, known.digest is not None)
                except errors.SecretError as e:
                    raise errors.SystemError(f"secret {d.uuid} is in the fleet, but its local copy stays: "
                                             f"{e.message}") from None
                return Published.ALREADY
            why = self.stays_local(d)
            if why is not None:
                raise errors.InvalidArg(f"secret {d.uuid} is not published: {why}")
            if value is not None:
                self._pending_value[d.uuid] = bytes(value)
            try:
                self._define(d, None)
            finally:
                self._pending_value.pop(d.uuid, None)
            try:
                self._retire_local_copy(d.uuid, value is not None)
            except errors.SecretError as e:
                raise errors.SystemError(f"secret {d.uuid} is in the fleet now, but its local copy stays: "
                                         f"{e.message} (a second publish removes it)") from None
            return Published.PUBLISHED

    def _retire_local_copy(self, uuid: str, valued: bool) -> None:
        """The local copy of a secret the fleet has, removed once the cache holds the fleet's
        (a cache write after the commit is only logged: without it the copy is all this host
        would have at its next start while etcd is unreachable)."""
        cached = self.cache.xml_path(uuid).exists() and (not valued or self.cache.has_value_file(uuid))
        if not cached:
            raise errors.SystemError("this host's fleet cache has no copy of it yet (the service's next start "
                                     "writes one)")
        self._remove_local_copy(uuid)

    def _remove_local_copy(self, uuid: str) -> None:
        # Value first, as undefine does: a crash between leaves a definition without a value,
        # never a value file the next secret of this UUID could inherit.
        super().delete_values(uuid)
        super().delete_definition(uuid)

    def local_secrets(self) -> dict[str, tuple[SecretDef, bytes | None]]:
        """What the instance's own directory holds, read anew (for a publish: the table serves
        the fleet's copy where both exist)."""
        report = SecretStore.load(self)
        return {x.definition.uuid: (x.definition, None if x.value is None else bytes(x.value))
                for x in report.secrets}

    def local_copies(self) -> list[str]:
        """UUIDs of fleet secrets of which the instance's own directory also holds a copy (an
        interrupted publish, or the same secret defined by hand on several hosts)."""
        with self._lock:
            return sorted(u for u in self._known if self.has_local_copy(u))

    def delete_values(self, uuid: str) -> None:
        with self._lock:
            self._pending_value.pop(uuid, None)
            if uuid in self._known:
                # Only ever followed by delete_definition (undefine, redefine to ephemeral).
                self._require_online()
                self._pending_delete.add(uuid)
                return
            super().delete_values(uuid)

    def delete_definition(self, uuid: str) -> None:
        with self._lock:
            known = self._known.get(uuid)
            if known is None:
                super().delete_definition(uuid)
                return
            kd = self.keys.definition(uuid)
            ops = [tx.delete(kd), tx.delete(self.keys.value(uuid))]
            usage = self._usage_key(known.definition)
            if usage is not None:
                ops.append(tx.delete(usage))

            def done(rev: int) -> None:
                del self._known[uuid]
                self._pending_delete.discard(uuid)
                self._gone[uuid] = rev
                self.cache_writes.drop(uuid)
                if self.has_local_copy(uuid):
                    try:
                        self._remove_local_copy(uuid)     # or it would come back at the next start
                    except errors.SecretError as e:
                        log.error("fleet: secret %s is undefined, but its local copy stays: %s", uuid, e.message,
                                  extra={"SECRET_UUID": uuid})
            self._run(_Write([tx.mod_is(kd, known.def_rev)], ops, [], done,
                             lambda _: _changed_meanwhile(uuid)))

    # -- remote changes -------------------------------------------------------------------
    def apply_events(self, events: Iterable[WatchEvent], revision: int) -> list[RemoteChange]:
        """Apply one watch response (events in revision order) to the cache; what changed."""
        changes: list[RemoteChange] = []
        with self._lock:
            with self.cache_writes.batch():
                for ev in events:
                    self._apply(ev.kv, ev.deleted, changes)
            self._advance(revision)
        return changes

    def resync_steps(self, revision: int, kvs: list[KV],
                     per_step: int = RESYNC_STEP) -> list[Callable[[], list[RemoteChange]]]:
        """Make the cache what etcd held at `revision` (a full read), in steps of `per_step`
        secrets, each run under the driver's lock (a large resync does not hold up local
        writes); each returns its part of the diff. Writes made here meanwhile are newer than
        `revision`, and the steps leave them alone."""
        by_uuid = group_records(kvs, self.keys.parse)
        items = sorted((u, p) for u, p in by_uuid.items() if "def" in p)
        steps: list[Callable[[], list[RemoteChange]]] = [partial(self._resync_drops, revision, set(by_uuid))]
        steps += [partial(self._resync_items, items[i:i + per_step]) for i in range(0, len(items), per_step)]
        steps.append(partial(self._resync_done, revision))
        return steps

    def resync(self, revision: int, kvs: list[KV]) -> list[RemoteChange]:
        """resync_steps, all at once."""
        return [c for step in self.resync_steps(revision, kvs) for c in step()]

    def _resync_drops(self, revision: int, present: set[str]) -> list[RemoteChange]:
        changes: list[RemoteChange] = []
        with self._lock, self.cache_writes.batch():
            for uuid in sorted((set(self._known) | set(self._cached)) - present):
                known = self._known.get(uuid)
                if known is None or known.def_rev <= revision:
                    self._drop(uuid, changes)
        return changes

    def _resync_items(self, items: list[tuple[str, dict[str, KV]]]) -> list[RemoteChange]:
        changes: list[RemoteChange] = []
        with self._lock, self.cache_writes.batch():
            for uuid, parts in items:
                cached = self._cached.pop(uuid, None)
                self._apply(parts["def"], False, changes, cached)
                if "value" in parts:
                    self._apply(parts["value"], False, changes, cached)
                elif cached is not None and cached[1] is not None:
                    self.cache_writes.delete_values(uuid)
        return changes

    def _resync_done(self, revision: int) -> list[RemoteChange]:
        with self._lock:
            self._cached.clear()
            # (tombstones newer than `revision` stay: the watch replays from revision + 1)
            self._advance(revision, force=True)
            self.resyncs += 1
        return []

    def _advance(self, revision: int, force: bool = False) -> None:
        if revision > self.revision or force:
            self.revision = revision
            self._gone = {u: r for u, r in self._gone.items() if r > revision}
            self._lock.notify_all()

    def _apply(self, kv: KV, deleted: bool, changes: list[RemoteChange],
               cached: tuple[SecretDef, bytes | None] | None = None) -> None:
        """`cached`: what the cache held at start-up (resync only): left as it is if equal."""
        parsed = self.keys.parse(kv.key)
        if parsed is None:
            if kv.key == self.keys.key_check and not deleted:
                checks = cluster_checks(kv.value)
                if self.sealer.check_value not in checks:
                    self.refresh_key()     # a rotation ended (or began) with a key this host lacks
                self.retire_older_keys(checks)     # (every change before it was applied: in order)
            return
        uuid, part = parsed
        known = self._known.get(uuid)
        if deleted:
            if part == "def" and known is not None and known.def_rev < kv.mod_revision:
                self._drop(uuid, changes)
            return
        if self._gone.get(uuid, 0) >= kv.mod_revision:
            return      # older than our own undefine of it
        try:
            if part == "def":
                self._apply_def(uuid, kv, known, changes, cached)
            elif known is not None and known.value_rev < kv.mod_revision:
                self._apply_value(uuid, kv, known, changes, cached)
        except NewerKey as e:
            if self.refresh_key(e.version):
                self._apply(kv, deleted, changes, cached)      # (once: the sealer has that version now)
            else:
                log.error("fleet: ignoring a change of secret %s: %s", uuid, e, extra={"SECRET_UUID": uuid})
        except SealError as e:
            log.error("fleet: ignoring a change of secret %s: %s", uuid, e, extra={"SECRET_UUID": uuid})
        except errors.SecretError as e:
            log.error("fleet: cannot cache secret %s: %s", uuid, e.message, extra={"SECRET_UUID": uuid})

    def _apply_def(self, uuid: str, kv: KV, known: Known | None, changes: list[RemoteChange],
                   cached: tuple[SecretDef, bytes | None] | None = None) -> None:
        if known is not None and known.def_rev >= kv.mod_revision:
            return
        d, inc, gen = self._open_def(uuid, kv.value)
        fresh = known is None or known.inc != inc
        if known is not None and fresh:
            self._drop(uuid, changes)    # undefined and defined again meanwhile
        entry = Known(d, inc, gen, kv.mod_revision)
        if known is not None and not fresh:
            entry.value_gen, entry.value_rev, entry.digest = known.value_gen, known.value_rev, known.digest
        self._known[uuid] = entry
        if known is None and cached is not None and cached[0] == d:
            pass        # the cache is current (start-up): no rewrite
        else:
            self.cache_writes.definition(d)
            if fresh and (cached is None or cached[1] is not None):
                self.cache_writes.delete_values(uuid)    # its value, if any, follows in the same batch
        changes.append(RemoteChange(uuid, d, fresh=fresh))

    def _apply_value(self, uuid: str, kv: KV, known: Known, changes: list[RemoteChange],
                     cached: tuple[SecretDef, bytes | None] | None = None) -> None:
        gen, value = self.sealer.open("value", uuid, kv.value, extra=known.inc)
        known.value_gen, known.value_rev, known.digest = gen, kv.mod_revision, self.sealer.digest(value)
        if cached is None or cached != (known.definition, known.digest):
            self.cache_writes.value(known.definition, value)
        changes.append(RemoteChange(uuid, known.definition, value))

    def _drop(self, uuid: str, changes: list[RemoteChange]) -> None:
        self._known.pop(uuid, None)
        self._cached.pop(uuid, None)
        self.cache_writes.drop(uuid)
        changes.append(RemoteChange(uuid, None))

    # -- catching up on a lookup miss -------------------------------------------------------
    def catch_up(self, uuid: str | None = None, usage: tuple[UsageType, str] | None = None,
                 value_of: str | None = None, timeout: float = 2.0) -> bool:
        """On a lookup miss: one quorum read of the secret's key (by UUID, usage, or its value) in etcd; if
        it exists, wait (bounded) until the watch applied it here, so a secret defined on
        another host a moment ago is found. False when the miss stands."""
        if self.cell.get()[0] is not FleetState.ONLINE or not self._take_token():
            return False
        if uuid is not None:
            key = self.keys.definition(uuid)
        elif value_of is not None:
            key = self.keys.value(value_of)
        elif usage is not None and usage[0] != UsageType.NONE:
            key = self.keys.usage(self.sealer.usage_index(usage[0], usage[1]))
        else:
            return False
        try:
            _, kvs = self.etcd.range(key)
        except EtcdUnavailable as e:
            self.cell.set(FleetState.DEGRADED, str(e))
            return False
        if not kvs:
            return False
        target = kvs[0].mod_revision
        with self._lock:
            return self._lock.wait_for(lambda: self.revision >= target, timeout)

    def _take_token(self) -> bool:
        with self._bucket_lock:
            tokens, at = self._bucket
            now = time.monotonic()
            tokens = min(CATCH_UP_RATE, tokens + (now - at) * CATCH_UP_RATE)
            if tokens < 1:
                self._bucket = (tokens, now)
                return False
            self._bucket = (tokens - 1, now)
            return True

    # -- loading: the local store and the fleet cache -------------------------------------
    def prepare(self) -> None:
        super().prepare()
        try:
            fsutil.ensure_private_dir(self.cache.dir)
        except OSError as e:
            raise errors.SystemError(f"cannot create fleet cache directory '{self.cache.dir}': {e.strerror}") from None

    def load(self, *, migrate: bool = False) -> LoadReport:
        local = super().load(migrate=migrate)
        cache = self.cache.load(migrate=migrate)
        with self._lock:
            self._cached = {x.definition.uuid: (x.definition, None if x.value is None else self.sealer.digest(x.value))
                            for x in cache.secrets}
        # A secret in both (a crash while it joined the fleet): the fleet's copy is served.
        secrets = [x for x in local.secrets if x.definition.uuid not in self._cached] + cache.secrets
        return LoadReport(secrets, local.skipped + cache.skipped)

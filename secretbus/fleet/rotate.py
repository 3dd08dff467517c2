"""`secretbus fleet rotate`: a new fleet key version for the hosts still approved.

Under an etcd lock (`meta/rotate-lock`, bound to a lease that this process keeps alive, so a
crashed rotation frees it after LOCK_TTL seconds):

1. start, one transaction: `meta/key-check` becomes "rotating V <old check> <new check>" and
   this host's `hosts/<id>/wrap` the new key V. From then on the fleet's writes and approvals
   are refused (they compare the key check: store._txn), reads go on. Then every other approved
   host whose record holds up gets its wrap of V (its old wrap is retired by the same put), up
   to HOSTS_PER_TXN hosts a transaction that requires the marker and the records it read; a
   host whose record does not hold up loses its wrap. A host that meets a record of version V
   picks its new wrap up (store.refresh_key); no record is at V before every wrap is written;
2. this host seals key V locally, next to the old versions (keyfile.py), before any record uses it;
3. every definition and value is re-sealed under V, its usage index renamed to V's, up to
   BATCH secrets per transaction, which requires the records it read to be unchanged (a batch
   that finds one changed is tried again a secret at a time);
4. finish, one transaction, only if nothing under secrets/ or usage/ changed since the last
   pass found everything at V: `meta/key-check` = V's check. Hosts without V (revoked ones)
   now fail the key check and get no new record they can open.

A crash at any point leaves every record sealed under a version some approved host holds or
can pick up (its wrap), so every value stays readable; `fleet rotate` run again resumes (the
new key comes back from this host's wrap) and finishes. Until then fleet writes stay refused.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from secretbus.core import errors
from secretbus.core.model import UsageType
from secretbus.core.secretxml import parse_secret_xml
from secretbus.fleet import enrol
from secretbus.fleet import etcd as tx
from secretbus.fleet.enrol_wrap import WrapError, unwrap, wrap
from secretbus.fleet.etcd import KV, Etcd
from secretbus.fleet.hostkey import HostKey
from secretbus.fleet.keyfile import load_fleet_keys, remove_fleet_key
from secretbus.fleet.keyspace import Keyspace, group_records
from secretbus.fleet.seal import ROTATING, FleetKey, Sealer, SealError, record_version
from secretbus.store.crypto import KEY_SIZE

log = logging.getLogger("secretbus.fleet")

LOCK_TTL = 10          # seconds: how long a crashed rotation keeps the lock
HOSTS_PER_TXN = 60     # new wraps a transaction: 2 compares a host, and the marker's (--max-txn-ops 128)
MAX_PASSES = 20        # writes are fenced meanwhile: passes beyond the second mean something is wrong
# Re-sealing: writes are refused until it ends, so secrets go BATCH to a transaction (each has
# 2 compares and up to 4 operations), within etcd's bounds (etcd.TXN_OPS, etcd.TXN_BYTES).
BATCH = 32


@dataclass(frozen=True)
class Result:
    version: int
    hosts: int           # hosts the new key was wrapped for
    resealed: int        # secrets re-sealed by this run
    resumed: bool


def lock_key(keys: Keyspace) -> bytes:
    return keys.prefix + b"meta/rotate-lock"


class Lock:
    """meta/rotate-lock on a lease kept alive by a thread; a crash frees it after LOCK_TTL."""

    def __init__(self, client: Etcd, keys: Keyspace, owner: str, wait: float):
        self.client, self.key, self.owner, self.wait = client, lock_key(keys), owner, wait
        self.lease = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keepalive, name="fleet-rotate-lock", daemon=True)
        self.lost = False

    def __enter__(self) -> Lock:
        deadline = time.monotonic() + self.wait
        self.lease = self.client.lease_grant(LOCK_TTL)
        while True:
            ok, _, _ = self.client.txn([tx.absent(self.key)], [tx.put(self.key, self.owner.encode(), self.lease)])
            if ok:
                break
            if time.monotonic() >= deadline:
                self.client.lease_revoke(self.lease)
                raise errors.OperationFailed("another 'fleet rotate' holds the rotation lock "
                                             f"(a crashed one frees it within {LOCK_TTL} s); try again")
            time.sleep(0.5)
            # Our own lease must outlive the wait: waiting for a crashed run's lock takes up to
            # LOCK_TTL, as long as the lease lives without a keepalive ("lease not found").
            if self.client.lease_keepalive(self.lease) <= 0:
                self.lease = self.client.lease_grant(LOCK_TTL)
        self._thread.start()
        return self

    def _keepalive(self) -> None:
        while not self._stop.wait(LOCK_TTL / 3):
            try:
                if self.client.lease_keepalive(self.lease) <= 0:
                    self.lost = True
                    return
            except tx.EtcdUnavailable:
                continue

    def check(self) -> None:
        if self.lost:
            raise errors.OperationFailed("the rotation lock expired (etcd unreachable too long); "
                                         "run 'fleet rotate' again to resume")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.client.lease_revoke(self.lease)
        except tx.EtcdUnavailable:
            pass            # the lease expires on its own


def parse_marker(value: bytes) -> tuple[int, str, str] | None:
    """(new version, old check, new check) of a rotation under way; None otherwise."""
    words = value.decode("ascii", "replace").split()
    if len(words) != 4 or words[0] != ROTATING or not words[1].isdigit():
        return None
    return int(words[1]), words[2], words[3]


def rotate(client: Etcd, keys: Keyspace, host: HostKey, directory: Path, *,
           environ: Mapping[str, str] = os.environ, lock_wait: float = 30.0,
           progress: Callable[[int], None] | None = None) -> Result:
    """Rotate (or resume a rotation) as fleet host `host`, whose keys are in `directory`.
    `progress(n)` is called for each re-sealed secret once its transaction is committed (tests
    crash there)."""
    held = load_fleet_keys(directory, environ)
    with Lock(client, keys, host.id, lock_wait) as lock:
        check = enrol.cluster_check(client, keys)
        if check is None:
            raise errors.OperationFailed(f"fleet cluster '{keys.cluster}' has no fleet key in etcd yet")
        marker = parse_marker(check)
        by_check = {k.check_value(keys.cluster): k for k in held}
        if marker is None:
            old = by_check.get(check.decode("ascii", "replace"))
            if old is None or old.version != held[-1].version:
                raise errors.OperationFailed(f"this host's newest fleet key is not the one of fleet cluster "
                                             f"'{keys.cluster}'; it cannot rotate it")
            new = FleetKey(old.version + 1, os.urandom(KEY_SIZE))
            check = _start(client, keys, old, new, host.id)
            resumed = False
        else:
            version, old_check, _ = marker
            old = by_check.get(old_check)
            if old is None:
                raise errors.OperationFailed("a rotation is under way from a fleet key this host does not hold")
            new = _own_new_key(client, keys, host, version, held)
            resumed = True
            if marker[2] != new.check_value(keys.cluster):
                raise errors.OperationFailed("the rotation under way is to another key than this host's wrap holds")
        hosts = _wrap_hosts(client, keys, new, check)      # (a crashed run may have left some)
        if all(k.version != new.version for k in held):
            enrol.install(directory, new, host, environ=environ)
            held.append(new)
        lock.check()
        ring = Sealer(keys.cluster, new, [k for k in held if k.version != new.version])
        resealed = _reseal_all(client, keys, ring, held, check, lock, progress)
        retired = [k.version for k in held if k.version != new.version]
        remove_fleet_key(directory, retired)
    return Result(new.version, hosts, resealed, resumed)


def _start(client: Etcd, keys: Keyspace, old: FleetKey, new: FleetKey, me: str) -> bytes:
    """Step 1's first transaction: the marker, and this host's wrap of the new key (so that a
    run resumed after a crash finds it); the marker."""
    old_check = old.check_value(keys.cluster)
    marker = f"{ROTATING} {new.version} {old_check} {new.check_value(keys.cluster)}".encode()
    _, kvs = client.range(keys.hosts, tx.prefix_end(keys.hosts))
    mine = group_records(kvs, keys.parse_host).get(me, {})
    if "wrap" not in mine or "pub" not in mine:
        raise errors.OperationFailed("this host is not an approved fleet host (run 'secretbus fleet join')")
    info = enrol.describe(me, mine["pub"], mine["wrap"])
    if info.problem:
        raise errors.OperationFailed(f"this host's own fleet record does not hold up: {info.problem}")
    compare, ops = _rewrap(keys, new, me, mine)
    ok, _, _ = client.txn([tx.value_is(keys.key_check, old_check.encode()), *compare],
                          [tx.put(keys.key_check, marker), *ops])
    if not ok:
        raise errors.OperationFailed("the fleet's key or this host's record changed while the rotation started; "
                                     "nothing written, try again")
    return marker


def _wrap_hosts(client: Etcd, keys: Keyspace, new: FleetKey, marker: bytes) -> int:
    """Step 1, the rest: each approved host's wrap of `new`, HOSTS_PER_TXN a transaction that
    requires the marker and the records it read (one changed meanwhile: read again, next pass);
    a host whose record does not hold up loses its wrap. How many hosts hold a wrap of `new`."""
    for _ in range(MAX_PASSES):
        if enrol.cluster_check(client, keys) != marker:
            raise errors.OperationFailed("the fleet key check changed during the rotation (another rotation?); "
                                         "nothing more written")
        _, kvs = client.range(keys.hosts, tx.prefix_end(keys.hosts))
        todo, done = [], 0
        for host_id, p in sorted(group_records(kvs, keys.parse_host).items()):
            if "wrap" not in p:
                continue        # pending: approved later, with the new key; or revoked
            info = enrol.describe(host_id, p.get("pub"), p["wrap"])
            if info.key_version == new.version and not info.problem:
                done += 1
            else:
                todo.append((host_id, p, info))
        if not todo:
            return done
        for first in range(0, len(todo), HOSTS_PER_TXN):
            compare, ops = [tx.value_is(keys.key_check, marker)], []
            for host_id, p, info in todo[first:first + HOSTS_PER_TXN]:
                if info.problem or "pub" not in p:
                    log.warning("fleet rotate: host %s gets no new key: %s", host_id, info.problem)
                    compare.append(tx.mod_is(keys.host_wrap(host_id), p["wrap"].mod_revision))
                    ops.append(tx.delete(keys.host_wrap(host_id)))
                    continue
                host_compare, host_ops = _rewrap(keys, new, host_id, p)
                compare += host_compare
                ops += host_ops
            client.txn(compare, ops)        # refused: its records changed; the next pass reads them again
    raise errors.OperationFailed(f"the fleet's host records kept changing during {MAX_PASSES} passes of the "
                                 "rotation; run 'fleet rotate' again to resume")


def _rewrap(keys: Keyspace, new: FleetKey, host_id: str, parts: dict[str, KV]) -> tuple[list[dict], list[dict]]:
    """A sound approved host's wrap of `new` (its old one retired by the put), written only if
    its wrap and public records are still the ones read."""
    record = enrol.HostRecord.decode(parts["pub"].value)
    return ([tx.mod_is(keys.host_wrap(host_id), parts["wrap"].mod_revision),
             tx.mod_is(keys.host_pub(host_id), parts["pub"].mod_revision)],
            [tx.put(keys.host_wrap(host_id), wrap(new, record.public, keys.cluster, host_id))])


def _own_new_key(client: Etcd, keys: Keyspace, host: HostKey, version: int, held: list[FleetKey]) -> FleetKey:
    for k in held:
        if k.version == version:
            return k
    _, kvs = client.range(keys.host_wrap(host.id))
    if not kvs:
        raise errors.OperationFailed("a rotation is under way but this host has no wrap of the new key")
    try:
        key = unwrap(kvs[0].value, host.private, keys.cluster, host.id)
    except WrapError as e:
        raise errors.OperationFailed(str(e)) from None
    if key.version != version:
        raise errors.OperationFailed(f"this host's wrap holds fleet key version {key.version}, "
                                     f"the rotation is to version {version}")
    return key


def _reseal_all(client: Etcd, keys: Keyspace, ring: Sealer, held: list[FleetKey], marker: bytes, lock: Lock,
                progress: Callable[[int], None] | None) -> int:
    """Steps 3 and 4: passes until one finds every record at the new version, then finish.
    A record no key here opens (damaged, or of a key this host never held) is logged and left:
    it was unreadable before the rotation too."""
    by_version = {k.version: Sealer(keys.cluster, k) for k in held}
    done = 0
    broken: set[str] = set()
    for _ in range(MAX_PASSES):
        lock.check()
        rev, kvs = client.range(keys.secrets, tx.prefix_end(keys.secrets))
        by_uuid = group_records(kvs, keys.parse)
        stale = [(u, p) for u, p in sorted(by_uuid.items()) if "def" in p and u not in broken
                 and any(record_version(kv.value) != ring.key_version for kv in p.values())]
        if not stale:
            ok, _, _ = client.txn([tx.value_is(keys.key_check, marker), tx.unchanged_since(keys.secrets, rev),
                                   tx.unchanged_since(keys.prefix + b"usage/", rev)],
                                  [tx.put(keys.key_check, ring.check_value.encode())])
            if ok:
                if broken:
                    log.error("fleet rotate: %d secrets could not be opened and keep their old sealing: %s",
                              len(broken), ", ".join(sorted(broken)))
                return done
            continue
        fence, batch = tx.value_is(keys.key_check, marker), _Batch()
        for uuid, parts in stale:
            plan = _plan(keys, ring, by_version, uuid, parts)
            if plan is None:
                broken.add(uuid)
                continue
            if not batch.fits(plan):
                lock.check()
                done = batch.commit(client, fence, done, progress)
                batch = _Batch()
            batch.plans.append(plan)
        lock.check()
        done = batch.commit(client, fence, done, progress)
    raise errors.OperationFailed(f"the fleet's secrets kept changing during {MAX_PASSES} passes of the "
                                 "rotation; run 'fleet rotate' again to resume")


_Plan = tx.TxnPart     # one secret's re-sealing: what it requires unchanged, what it writes


@dataclass
class _Batch:
    plans: list[_Plan] = field(default_factory=list)

    def fits(self, plan: _Plan) -> bool:
        return not self.plans or (len(self.plans) < BATCH and tx.fits(self.plans, plan))

    def commit(self, client: Etcd, fence: dict, done: int, progress: Callable[[int], None] | None) -> int:
        """One transaction for the batch (`fence`: the rotation marker still there); if a record
        changed meanwhile, one per secret: the others still go, the changed one is seen again
        by the next pass. Returns `done` counted on."""
        if not self.plans:
            return done
        if _txn(client, fence, self.plans):
            written = len(self.plans)
        elif len(self.plans) > 1:
            written = sum(1 for p in self.plans if _txn(client, fence, [p]))
        else:
            written = 0
        for _ in range(written):
            done += 1
            if progress is not None:
                progress(done)
        return done


def _txn(client: Etcd, fence: dict, plans: list[_Plan]) -> bool:
    ok, _, _ = client.txn([fence, *(c for p in plans for c in p.compare)], [op for p in plans for op in p.ops])
    return ok


def _plan(keys: Keyspace, ring: Sealer, by_version: dict[int, Sealer], uuid: str,
          parts: dict[str, KV]) -> _Plan | None:
    """One secret under the new key, its usage index renamed, to be written only if its
    records are unchanged; None if it cannot be opened (logged, left as it is)."""
    d_kv, v_kv = parts["def"], parts.get("value")
    try:
        gen, plain = ring.open("def", uuid, d_kv.value)
        rec = json.loads(plain)
        d, inc = parse_secret_xml(rec["xml"]), str(rec["inc"])
        records = [(keys.definition(uuid), ring.seal("def", uuid, gen, plain))]
        if v_kv is not None:
            vgen, value = ring.open("value", uuid, v_kv.value, extra=inc)
            records.append((keys.value(uuid), ring.seal("value", uuid, vgen, value, extra=inc)))
    except (SealError, ValueError, KeyError, TypeError, errors.SecretError) as e:
        log.error("fleet rotate: secret %s left as it is: %s", uuid, getattr(e, "message", e),
                  extra={"SECRET_UUID": uuid})
        return None
    compare = [tx.mod_is(keys.definition(uuid), d_kv.mod_revision),
               tx.mod_is(keys.value(uuid), v_kv.mod_revision) if v_kv is not None else tx.absent(keys.value(uuid))]
    ops = [tx.put(k, v) for k, v in records]
    old_version = record_version(d_kv.value)
    if d.usage_type != UsageType.NONE and old_version in by_version:
        old_usage = keys.usage(by_version[old_version].usage_index(d.usage_type, d.usage_id or ""))
        new_usage = keys.usage(ring.usage_index(d.usage_type, d.usage_id or ""))
        if old_usage != new_usage:
            ops += [tx.delete(old_usage), tx.put(new_usage, uuid.encode())]
    return _Plan(compare, ops)

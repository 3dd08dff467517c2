"""Enrolment of hosts in etcd (research/fleet.md §6.3): join, approve, pick-up, revoke, leave.

A joining host publishes `hosts/<id>/pub` (its X25519 public key; the id is derived from it).
An operator runs `fleet approve ID` on an enrolled host, which wraps the fleet key for that
public key into `hosts/<id>/wrap` in one transaction that also requires the pub record to be
the one it checked. The joined host (a later `fleet join`, or the service at start-up) unwraps
it, checks it against the cluster's key check value and seals it locally. There is no
auto-approval: a wrap is only ever written by a host that holds the fleet key, for an id an
operator typed.

Everything here talks to etcd through `Etcd`; nothing reads or prints key bytes.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from secretbus.core import errors
from secretbus.fleet import etcd as tx
from secretbus.fleet.enrol_records import HostRecord, RecordError
from secretbus.fleet.enrol_wrap import WrapError, unwrap, wrap, wrap_version
from secretbus.fleet.etcd import KV, Etcd
from secretbus.fleet.hostkey import HostKey, fingerprint
from secretbus.fleet.keyfile import init_fleet_key, seal_choice
from secretbus.fleet.keyspace import HOST_ID, Keyspace, group_records
from secretbus.fleet.presence import alive_since
from secretbus.fleet.seal import ROTATING, FleetKey, cluster_checks

log = logging.getLogger("secretbus.fleet")

POLL = 0.5     # seconds before `join --wait` watches again after its watch broke


@dataclass(frozen=True)
class HostInfo:
    id: str
    hostname: str
    joined: str
    fingerprint: str
    approved: bool
    key_version: int | None
    problem: str = ""        # why the record is not sound ("" when it is)
    up_since: str | None = None     # its service's presence record (presence.py): connected since


def check_id(text: str) -> str:
    if not HOST_ID.fullmatch(text):
        raise errors.InvalidArg(f"'{text}' is not a fleet host id (32 hex digits, as 'fleet join' prints)")
    return text


def _one(client: Etcd, key: bytes) -> KV | None:
    _, kvs = client.range(key)
    return kvs[0] if kvs else None


def cluster_check(client: Etcd, keys: Keyspace) -> bytes | None:
    kv = _one(client, keys.key_check)
    return kv.value if kv is not None else None


def require_cluster_key(client: Etcd, keys: Keyspace, key: FleetKey, *, current: bool = True) -> bytes:
    """This host's fleet key is the cluster's (else it must not hand it out): its check value.
    `current`: the cluster's current key, no rotation under way (to wrap it for a host); else
    any key the cluster's check accepts (a key picked up mid-rotation)."""
    mine = key.check_value(keys.cluster).encode()
    theirs = cluster_check(client, keys)
    if theirs is None:
        raise errors.OperationFailed(f"fleet cluster '{keys.cluster}' has no fleet key in etcd yet "
                                     "(run 'secretbus fleet init' on the first host)")
    if current and theirs.startswith(ROTATING.encode()):
        raise errors.OperationFailed(f"the fleet key of cluster '{keys.cluster}' is being rotated "
                                     "('secretbus fleet rotate'); try again when it is done")
    if (theirs != mine) if current else (mine.decode() not in cluster_checks(theirs)):
        raise errors.OperationFailed(f"this host's fleet key is not the one of fleet cluster '{keys.cluster}'")
    return mine


# -- the joining host ------------------------------------------------------------------------
def publish(client: Etcd, keys: Keyspace, host: HostKey, hostname: str) -> bool:
    """Publish this host's public record; False if it was there already (a repeated join).
    A record under our id with another public key is refused, never overwritten."""
    key = keys.host_pub(host.id)
    ok, _, responses = client.txn([tx.absent(key)], [tx.put(key, HostRecord.new(host.public, hostname).encode())],
                                  [tx.get(key)])
    if ok:
        return True
    kvs = responses[0].get("response_range", {}).get("kvs", []) if responses else []
    if not kvs:
        raise errors.OperationFailed(f"host {host.id}'s record changed in etcd meanwhile; run the command again")
    try:
        theirs = HostRecord.decode(KV.of(kvs[0]).value)
    except RecordError as e:
        raise errors.OperationFailed(f"host id {host.id} is already in etcd with an unreadable record ({e}); "
                                     "refusing to replace it") from None
    if theirs.public != host.public:
        raise errors.OperationFailed(f"host id {host.id} is already in etcd with another public key; "
                                     "refusing to replace it")
    return False


def pick_up(client: Etcd, keys: Keyspace, host: HostKey) -> FleetKey | None:
    """The fleet key an enrolled host wrapped for us, checked against the cluster; None if
    this host is not approved (yet)."""
    return _open_wrap(client, keys, host, _one(client, keys.host_wrap(host.id)))


def _open_wrap(client: Etcd, keys: Keyspace, host: HostKey, kv: KV | None) -> FleetKey | None:
    """pick_up's key from the wrap record `kv` (None: no wrap yet)."""
    if kv is None:
        return None
    try:
        key = unwrap(kv.value, host.private, keys.cluster, host.id)
    except WrapError as e:
        raise errors.OperationFailed(str(e)) from None
    require_cluster_key(client, keys, key, current=False)
    return key


def install(directory: Path, key: FleetKey, host: HostKey, *, with_key: str | None = None,
            environ: Mapping[str, str] = os.environ) -> Path:
    """Seal the picked-up fleet key locally, the way the host key is kept (raw or systemd-creds;
    without `with_key`, with the key type recorded at init or join, if any)."""
    if with_key is None and not host.raw:
        with_key = seal_choice(directory)
    return init_fleet_key(directory, raw=host.raw, with_key=with_key, environ=environ, key=key.key,
                          version=key.version)


def refresh(directory: Path, client: Etcd, keys: Keyspace, host: HostKey, held: list[FleetKey],
            environ: Mapping[str, str] = os.environ) -> FleetKey | None:
    """A key version wrapped for this host that it does not hold yet (after `fleet rotate`),
    picked up and sealed here; None when there is none."""
    key = pick_up(client, keys, host)
    if key is None or any(k.version == key.version for k in held):
        return None
    if held and key.version < max(k.version for k in held):
        return None       # (an older wrap: nothing new)
    install(directory, key, host, environ=environ)
    return key


def wait_for_approval(client: Etcd, keys: Keyspace, host: HostKey, seconds: float) -> FleetKey | None:
    """The fleet key once an enrolled host has wrapped it for us; None after `seconds`. It
    watches this host's wrap record, so an approval is picked up as it lands; a watch that
    breaks is opened again (POLL seconds later) from a new look at the record."""
    deadline = time.monotonic() + seconds
    while True:
        rev, kvs = client.range(keys.host_wrap(host.id))   # the watch starts after this look: it misses nothing
        key = _open_wrap(client, keys, host, kvs[0] if kvs else None)
        left = deadline - time.monotonic()
        if key is not None or left <= 0:
            return key
        try:
            _wait_for_change(client, keys.host_wrap(host.id), rev + 1, left)
        except tx.EtcdUnavailable:
            time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))


def _wait_for_change(client: Etcd, key: bytes, start: int, seconds: float) -> None:
    """Until `key` changes after revision `start - 1`, or `seconds` pass (the watch closed
    under it: a quiet watch has no timeout of its own)."""
    stream = client.watch(key, start)
    timer = threading.Timer(seconds, stream.close)
    timer.daemon = True
    timer.start()
    ends = time.monotonic() + seconds
    try:
        for _batch in stream:
            return
    except tx.EtcdUnavailable:
        if time.monotonic() < ends:
            raise
    finally:
        timer.cancel()
        stream.close()


# -- an enrolled host ------------------------------------------------------------------------
def approve(client: Etcd, keys: Keyspace, key: FleetKey, target: str) -> HostInfo:
    """Wrap `key` for host `target`: only a known, pending host whose public key still hashes to
    its id, in one transaction that fails if its record changed after we checked it."""
    check_id(target)
    pub = _one(client, keys.host_pub(target))
    if pub is None:
        raise errors.InvalidArg(f"no fleet host '{target}' has joined cluster '{keys.cluster}'")
    if _one(client, keys.host_wrap(target)) is not None:
        raise errors.OperationFailed(f"fleet host '{target}' is already approved")
    try:
        record = HostRecord.decode(pub.value)
    except RecordError as e:
        raise errors.OperationFailed(f"fleet host '{target}' has an unreadable record ({e}); refusing") from None
    if record.id != target:
        raise errors.OperationFailed(f"the public key published for fleet host '{target}' does not match its id "
                                     "(changed after it joined?); refusing")
    mine = require_cluster_key(client, keys, key)
    try:
        sealed = wrap(key, record.public, keys.cluster, target)
    except WrapError as e:
        raise errors.OperationFailed(str(e)) from None
    ok, _, _ = client.txn([tx.mod_is(keys.host_pub(target), pub.mod_revision), tx.absent(keys.host_wrap(target)),
                           tx.value_is(keys.key_check, mine)],
                          [tx.put(keys.host_wrap(target), sealed)])
    if not ok:
        raise errors.OperationFailed(f"fleet host '{target}' changed in etcd while it was being approved "
                                     "(its record, its approval or the cluster key); nothing written")
    return HostInfo(target, record.hostname, record.joined, record.fingerprint, True, key.version)


def enrol_self(client: Etcd, keys: Keyspace, host: HostKey, key: FleetKey, hostname: str) -> bool:
    """A host that holds the fleet key already (fleet init, init --from-file) records itself
    as approved; False if it was already."""
    publish(client, keys, host, hostname)
    if _one(client, keys.host_wrap(host.id)) is not None:
        return False
    approve(client, keys, key, host.id)
    return True


def revoke(client: Etcd, keys: Keyspace, target: str) -> HostInfo:
    """Delete a host's wrap and public record (one transaction)."""
    check_id(target)
    pub, wrapped = _one(client, keys.host_pub(target)), _one(client, keys.host_wrap(target))
    if pub is None and wrapped is None:
        raise errors.InvalidArg(f"no fleet host '{target}' in cluster '{keys.cluster}'")
    info = describe(target, pub, wrapped)
    compare = [tx.mod_is(k, kv.mod_revision) if kv is not None else tx.absent(k)
               for k, kv in ((keys.host_pub(target), pub), (keys.host_wrap(target), wrapped))]
    ok, _, _ = client.txn(compare, [tx.delete(keys.host_pub(target)), tx.delete(keys.host_wrap(target))])
    if not ok:
        raise errors.OperationFailed(f"fleet host '{target}' changed in etcd meanwhile; run the command again")
    return info


def forget(client: Etcd, keys: Keyspace, host_id: str) -> None:
    """`fleet leave`: this host's own records, whatever they hold."""
    client.txn([], [tx.delete(keys.host_pub(host_id)), tx.delete(keys.host_wrap(host_id)),
                    tx.delete(keys.host_alive(host_id))])


# -- listing ---------------------------------------------------------------------------------
def describe(host: str, pub: KV | None, wrapped: KV | None, alive: KV | None = None) -> HostInfo:
    problem, hostname, joined, fp = "", "?", "?", "?"
    since = alive_since(alive.value) if alive is not None else None
    if pub is None and wrapped is None:
        problem = "no records but its presence: revoked or left, and its service still connected"
    elif pub is None:
        problem = "no public record (approved, then its record was deleted)"
    else:
        try:
            record = HostRecord.decode(pub.value)
            hostname, joined, fp = record.hostname, record.joined, record.fingerprint
            if record.id != host:
                problem = "public key does not match the id"
        except RecordError as e:
            problem = str(e)
    version = None
    if wrapped is not None:
        try:
            version = wrap_version(wrapped.value)
        except WrapError as e:
            problem = problem or str(e)
    return HostInfo(host, hostname, joined, fp, wrapped is not None, version, problem, since)


def list_hosts(client: Etcd, keys: Keyspace) -> list[HostInfo]:
    _, kvs = client.range(keys.hosts, tx.prefix_end(keys.hosts))
    parts = group_records(kvs, keys.parse_host)
    return [describe(h, p.get("pub"), p.get("wrap"), p.get("alive")) for h, p in sorted(parts.items())]


# -- the service at start-up -----------------------------------------------------------------
def keys_at_start(directory: Path, client: Etcd, keys: Keyspace, host: HostKey, held: list[FleetKey],
                  environ: Mapping[str, str] = os.environ) -> list[FleetKey]:
    """The key ring to serve with: what this host holds, plus a wrap for it not picked up yet
    (approved while no `fleet join --wait` ran, or a rotation while it was down). Without any
    key of its own, a host that cannot pick one up does not start."""
    try:
        newer = refresh(directory, client, keys, host, held, environ)
    except tx.EtcdUnavailable as e:
        if held:
            return held       # served from the cache; the watch checks the key when etcd is back
        raise errors.ConfigError(f"this host joined fleet cluster '{keys.cluster}' as {host.id} but has no fleet "
                                 f"key yet, and etcd is unreachable to pick it up: {e}") from None
    except errors.SecretError as e:
        if held:
            log.error("fleet: cannot pick up a newer fleet key: %s", e.message)
            return held
        raise errors.ConfigError(f"fleet cluster '{keys.cluster}': {e.message}") from None
    if newer is not None:
        return held + [newer]
    if not held:
        raise errors.ConfigError(f"this host joined fleet cluster '{keys.cluster}' as {host.id} and is not "
                                 f"approved yet (run 'secretbus fleet approve {host.id}' on an enrolled host)")
    return held


def fingerprint_of(host: HostKey) -> str:
    return fingerprint(host.public)

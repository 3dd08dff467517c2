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

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secretbus.core import errors
from secretbus.fleet import etcd as tx
from secretbus.fleet.enrol_records import HostRecord, RecordError
from secretbus.fleet.enrol_wrap import WrapError, unwrap, wrap, wrap_version
from secretbus.fleet.etcd import KV, Etcd
from secretbus.fleet.hostkey import HostKey, fingerprint
from secretbus.fleet.keyfile import KEY_VERSION, init_fleet_key
from secretbus.fleet.keyspace import HOST_ID, Keyspace
from secretbus.fleet.seal import FleetKey

POLL = 0.5     # seconds between looks for the wrap while `join --wait` waits


@dataclass(frozen=True)
class HostInfo:
    id: str
    hostname: str
    joined: str
    fingerprint: str
    approved: bool
    key_version: int | None
    problem: str = ""        # why the record is not sound ("" when it is)


def check_id(text: str) -> str:
    if not HOST_ID.fullmatch(text):
        raise errors.InvalidArg(f"'{text}' is not a fleet host id (32 hex digits, as 'fleet join' prints)")
    return text


def value_is(key: bytes, value: bytes) -> dict[str, Any]:
    return {"key": tx.b64(key), "result": "EQUAL", "target": "VALUE", "value": tx.b64(value)}


def _one(client: Etcd, key: bytes) -> KV | None:
    _, kvs = client.range(key)
    return kvs[0] if kvs else None


def cluster_check(client: Etcd, keys: Keyspace) -> bytes | None:
    kv = _one(client, keys.key_check)
    return kv.value if kv is not None else None


def require_cluster_key(client: Etcd, keys: Keyspace, key: FleetKey) -> bytes:
    """This host's fleet key is the cluster's (else it must not hand it out): its check value."""
    mine = key.check_value(keys.cluster).encode()
    theirs = cluster_check(client, keys)
    if theirs is None:
        raise errors.OperationFailed(f"fleet cluster '{keys.cluster}' has no fleet key in etcd yet "
                                     "(run 'secretbus fleet init' on the first host)")
    if theirs != mine:
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
    kv = _one(client, keys.host_wrap(host.id))
    if kv is None:
        return None
    try:
        key = unwrap(kv.value, host.private, keys.cluster, host.id)
    except WrapError as e:
        raise errors.OperationFailed(str(e)) from None
    if key.version != KEY_VERSION:
        raise errors.OperationFailed(f"the wrap for host {host.id} holds fleet key version {key.version}; "
                                     f"this secretbus knows version {KEY_VERSION} only")
    require_cluster_key(client, keys, key)
    return key


def install(directory: Path, key: FleetKey, host: HostKey, *, with_key: str | None = None,
            environ: Mapping[str, str] = os.environ) -> Path:
    """Seal the picked-up fleet key locally, the way the host key is kept (raw or systemd-creds)."""
    return init_fleet_key(directory, raw=host.raw, with_key=with_key, environ=environ, key=key.key)


def wait_for_approval(client: Etcd, keys: Keyspace, host: HostKey, seconds: float,
                      sleep: Callable[[float], None] = time.sleep) -> FleetKey | None:
    deadline = time.monotonic() + seconds
    while True:
        key = pick_up(client, keys, host)
        if key is not None or time.monotonic() >= deadline:
            return key
        sleep(min(POLL, max(0.0, deadline - time.monotonic())))


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
                           value_is(keys.key_check, mine)],
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
    client.txn([], [tx.delete(keys.host_pub(host_id)), tx.delete(keys.host_wrap(host_id))])


# -- listing ---------------------------------------------------------------------------------
def describe(host: str, pub: KV | None, wrapped: KV | None) -> HostInfo:
    problem, hostname, joined, fp = "", "?", "?", "?"
    if pub is None:
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
    return HostInfo(host, hostname, joined, fp, wrapped is not None, version, problem)


def list_hosts(client: Etcd, keys: Keyspace) -> list[HostInfo]:
    _, kvs = client.range(keys.hosts, tx.prefix_end(keys.hosts))
    parts: dict[str, dict[str, KV]] = {}
    for kv in kvs:
        parsed = keys.parse_host(kv.key)
        if parsed is not None:
            parts.setdefault(parsed[0], {})[parsed[1]] = kv
    return [describe(h, p.get("pub"), p.get("wrap")) for h, p in sorted(parts.items())]


# -- the service at start-up -----------------------------------------------------------------
def key_at_start(directory: Path, client: Etcd, keys: Keyspace, host: HostKey,
                 environ: Mapping[str, str] = os.environ) -> FleetKey:
    """A joined host whose key is not sealed here yet: pick up its wrap now (the operator
    approved it while no `fleet join --wait` ran), seal it, and serve with it."""
    try:
        key = pick_up(client, keys, host)
    except tx.EtcdUnavailable as e:
        raise errors.ConfigError(f"this host joined fleet cluster '{keys.cluster}' as {host.id} but has no fleet "
                                 f"key yet, and etcd is unreachable to pick it up: {e}") from None
    except errors.SecretError as e:
        raise errors.ConfigError(f"fleet cluster '{keys.cluster}': {e.message}") from None
    if key is None:
        raise errors.ConfigError(f"this host joined fleet cluster '{keys.cluster}' as {host.id} and is not "
                                 f"approved yet (run 'secretbus fleet approve {host.id}' on an enrolled host)")
    install(directory, key, host, environ=environ)
    return key


def fingerprint_of(host: HostKey) -> str:
    return fingerprint(host.public)

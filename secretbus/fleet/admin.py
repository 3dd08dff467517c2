"""`secretbus fleet init | join | approve | revoke | leave | rotate | status` for one instance (its
paths and secret.conf). The enrolment itself is enrol.py; this wires paths, conf and etcd."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from secretbus.core import errors
from secretbus.fleet import enrol
from secretbus.fleet import etcd as tx
from secretbus.fleet import rotate as rotation
from secretbus.fleet.etcd import Etcd, EtcdUnavailable
from secretbus.fleet.hostkey import has_host_key, load_host_key, load_or_create_host_key, remove_host_key
from secretbus.fleet.keyfile import (
    SEAL_CHOICE_NAME,
    fleet_dir,
    has_fleet_key,
    init_fleet_key,
    load_fleet_key,
    load_fleet_keys,
    remember_seal_choice,
    remove_files,
    remove_fleet_key,
)
from secretbus.fleet.keyspace import Keyspace
from secretbus.fleet.seal import ROTATING, Sealer, record_version
from secretbus.fleet.setup import connect
from secretbus.fleet.store import CACHE_DIR
from secretbus.store.conf import SecretConf
from secretbus.store.crypto import KEY_SIZE
from secretbus.store.filestore import defined_uuids
from secretbus.store.keys import load_key
from secretbus.store.lock import InstanceLock
from secretbus.store.paths import InstancePaths


def init(paths: InstancePaths, conf: SecretConf, *, raw: bool = False, with_key: str | None = None,
         copy_from: Path | None = None, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Create this host's fleet key (or seal a copy of the first host's, `copy_from`), then
    register its fingerprint for the cluster in etcd if that is configured and reachable."""
    key = load_key(copy_from) if copy_from is not None else None
    if key is not None and len(key) != KEY_SIZE:
        raise errors.InvalidArg(f"a fleet key has {KEY_SIZE} bytes")
    path = init_fleet_key(fleet_dir(paths), raw=raw, with_key=with_key, environ=environ, key=key)
    if with_key is not None and not raw:
        remember_seal_choice(fleet_dir(paths), with_key)    # for the keys of later rotations
    lines = [f"Fleet key created at {path}"]
    if not conf.fleet_endpoints:
        lines.append(f"fleet_endpoints is not set in {_where(conf)}: nothing registered in etcd yet")
        return lines
    sealer = Sealer(conf.fleet_cluster, load_fleet_key(fleet_dir(paths), environ))
    keys = Keyspace(conf.fleet_cluster)
    mine = sealer.check_value.encode()
    try:
        client = connect(conf)
        client.txn([tx.absent(keys.key_check)], [tx.put(keys.key_check, mine)])
        _, kvs = client.range(keys.key_check)
    except EtcdUnavailable as e:
        lines.append(f"etcd unreachable ({e}): the service registers the key when it connects")
        return lines
    if not kvs or kvs[0].value != mine:
        raise errors.OperationFailed(f"fleet cluster '{conf.fleet_cluster}' in etcd has another fleet key; "
                                     f"remove {path} and copy the first host's key (--from-file)")
    lines.append(f"Fleet cluster '{conf.fleet_cluster}' uses this key")
    # The first host (and a hand-copied one) is enrolled by holding the key: it records itself
    # as an approved host, so that status lists it and it can approve others.
    host, _ = load_or_create_host_key(fleet_dir(paths), raw=raw, with_key=with_key, environ=environ)
    try:
        enrol.enrol_self(client, keys, host, load_fleet_key(fleet_dir(paths), environ), hostname())
    except EtcdUnavailable as e:
        lines.append(f"etcd unreachable ({e}): run 'secretbus fleet join' to record this host")
        return lines
    lines.append(f"This host is fleet host {host.id}")
    return lines


def hostname() -> str:
    return os.uname().nodename


def _where(conf: SecretConf) -> str:
    """The file fleet mode's keys are read from (secretbusd.conf: store/conf.py)."""
    return str(conf.fleet_file) if conf.fleet_file is not None else "secretbusd.conf"


def _etcd(conf: SecretConf) -> tuple[Etcd, Keyspace]:
    if not conf.fleet_endpoints:
        raise errors.ConfigError(f"fleet mode is off: fleet_endpoints is not set in {_where(conf)}")
    return connect(conf), Keyspace(conf.fleet_cluster)


def _unavailable(e: EtcdUnavailable) -> errors.SecretError:
    return errors.OperationFailed(f"fleet store unavailable: {e}")


def join(paths: InstancePaths, conf: SecretConf, *, announce: Callable[[str], None], note: Callable[[str], None],
         raw: bool = False, with_key: str | None = None, wait: float | None = None,
         environ: Mapping[str, str] = os.environ) -> bool:
    """Make (once) and publish this host's key pair, `announce` its id, then pick up the fleet
    key if an enrolled host approved it (waiting up to `wait` seconds). True once this host
    holds the fleet key."""
    client, keys = _etcd(conf)
    directory = fleet_dir(paths)
    host, made = load_or_create_host_key(directory, raw=raw, with_key=with_key, environ=environ)
    if with_key is not None and not host.raw:
        # The fleet keys this host seals later by itself (at start-up, after a rotation) too.
        remember_seal_choice(directory, with_key)
    try:
        if has_fleet_key(directory, environ):
            # (a key rotated while this host was down comes first: it is the one to record)
            newer = enrol.refresh(directory, client, keys, host, load_fleet_keys(directory, environ), environ)
            enrol.enrol_self(client, keys, host, load_fleet_key(directory, environ), hostname())
            announce(host.id)
            note("this host holds the fleet key: enrolled"
                 + (f" (picked up fleet key version {newer.version})" if newer is not None else ""))
            return True
        fresh = enrol.publish(client, keys, host, hostname())
        announce(host.id)
        if fresh or made:
            note(f"joined fleet cluster '{keys.cluster}' as {host.id} ({enrol.fingerprint_of(host)}); "
                 f"approve it on an enrolled host: secretbus fleet approve {host.id}")
        key = enrol.wait_for_approval(client, keys, host, wait or 0.0)
    except EtcdUnavailable as e:
        raise _unavailable(e) from None
    if key is None:
        if wait:
            note(f"not approved within {wait:g} seconds")
        else:
            note("not approved yet: run 'secretbus fleet join' again after 'fleet approve' "
                 "(the service also picks the key up when it starts)")
        return False
    path = enrol.install(directory, key, host, with_key=with_key, environ=environ)
    note(f"approved: fleet key sealed at {path}")
    return True


def approve(paths: InstancePaths, conf: SecretConf, target: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    client, keys = _etcd(conf)
    key = load_fleet_key(fleet_dir(paths), environ)
    try:
        info = enrol.approve(client, keys, key, target)
    except EtcdUnavailable as e:
        raise _unavailable(e) from None
    return [f"Fleet host {info.id} ({info.hostname}, joined {info.joined}) approved",
            f"public key fingerprint: {info.fingerprint}"]


def revoke(paths: InstancePaths, conf: SecretConf, target: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    client, keys = _etcd(conf)
    directory = fleet_dir(paths)
    if has_host_key(directory) and load_host_key(directory, environ).id == enrol.check_id(target):
        raise errors.InvalidArg(f"{target} is this host: use 'secretbus fleet leave'")
    try:
        info = enrol.revoke(client, keys, target)
    except EtcdUnavailable as e:
        raise _unavailable(e) from None
    return [f"Fleet host {info.id} ({info.hostname}) revoked: its wrap and record are deleted",
            "it keeps what it already decrypted; only 'secretbus fleet rotate' keeps new secrets from it, "
            "and its etcd user and certificate must be removed too (docs/fleet.md)"]


def rotate(paths: InstancePaths, conf: SecretConf, environ: Mapping[str, str] = os.environ) -> list[str]:
    """A new fleet key version for the approved hosts; every secret re-sealed (rotate.py)."""
    client, keys = _etcd(conf)
    directory = fleet_dir(paths)
    if not has_host_key(directory):
        raise errors.InvalidArg("this host has no fleet identity: run 'secretbus fleet join' first")
    try:
        r = rotation.rotate(client, keys, load_host_key(directory, environ), directory, environ=environ)
    except EtcdUnavailable as e:
        raise errors.OperationFailed(f"fleet store unavailable: {e} (run 'fleet rotate' again to resume)") from None
    return [f"Fleet key of cluster '{keys.cluster}' rotated to version {r.version}"
            + (" (an interrupted rotation resumed)" if r.resumed else ""),
            f"wrapped for {r.hosts} approved hosts; {r.resealed} secrets re-sealed"]


def leave(paths: InstancePaths, conf: SecretConf, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Delete this host's records in etcd first (refused, changing nothing, when etcd is
    unreachable), then its fleet key, host key and fleet cache here. Not while the service
    runs: it would go on serving (and caching) with the key it holds."""
    client, keys = _etcd(conf)
    directory = fleet_dir(paths)
    if not has_host_key(directory) and not has_fleet_key(directory, environ):
        raise errors.InvalidArg(f"this host is not in a fleet (nothing in '{directory}')")
    lock = InstanceLock(paths.lock_file)
    try:
        lock.acquire()
    except errors.LockHeld:
        raise errors.OperationFailed("the service of this instance is running: stop it before 'fleet leave'") from None
    try:
        return _leave(client, keys, directory, environ)
    finally:
        lock.release()


def _leave(client: Etcd, keys: Keyspace, directory: Path, environ: Mapping[str, str]) -> list[str]:
    lines = []
    if has_host_key(directory):
        host = load_host_key(directory, environ)
        try:
            enrol.forget(client, keys, host.id)
        except EtcdUnavailable as e:
            raise _unavailable(e) from None
        lines.append(f"Fleet host {host.id} left cluster '{keys.cluster}'")
    removed = (remove_fleet_key(directory) + remove_host_key(directory)
               + remove_files(directory, (SEAL_CHOICE_NAME,)) + _drop_cache(directory))
    lines.append(f"removed {len(removed)} files of the fleet state in {directory}")
    return lines


def _drop_cache(directory: Path) -> list[Path]:
    """The fleet's secrets cached here: this host no longer serves them."""
    cache = directory / CACHE_DIR
    try:
        names = tuple(sorted(p.name for p in cache.iterdir()))
    except FileNotFoundError:
        return []
    return remove_files(cache, names)


def _local_lines(paths: InstancePaths, in_fleet: set[str]) -> list[str]:
    """The secrets this host had before fleet mode: served here only until published."""
    local = defined_uuids(paths.config_dir)
    lines = [f"local secrets: {len(local - in_fleet)} (served by this host only; 'secretbus fleet publish' "
             "moves them into the fleet)"]
    shadowed = local & in_fleet
    if shadowed:
        lines.append(f"PROBLEM: {len(shadowed)} local copies of fleet secrets, e.g. {min(shadowed)} (the "
                     "fleet's are served; a copy is served again if the fleet's is undefined elsewhere and "
                     "this host restarts): 'secretbus fleet publish' removes the copies that are the same")
    return lines


def status(paths: InstancePaths, conf: SecretConf, environ: Mapping[str, str] = os.environ) -> list[str]:
    if not conf.fleet_endpoints:
        return [f"fleet mode: off (fleet_endpoints is not set in {_where(conf)})"]
    lines = [f"cluster: {conf.fleet_cluster}", f"endpoints: {', '.join(conf.fleet_endpoints)}",
             f"configuration: {_where(conf)}"]
    if conf.fleet_file is not None and conf.fleet_file == conf.path:
        lines.append("PROBLEM: fleet mode's keys are in secret.conf: move them to secretbusd.conf "
                     f"({paths.server_conf_file})")
    try:
        sealer = Sealer(conf.fleet_cluster, load_fleet_key(fleet_dir(paths), environ))
        lines.append(f"fleet key: {sealer.check_value}")
    except errors.SecretError as e:
        return lines + [f"fleet key: {errors.display(e)}"]
    keys = Keyspace(conf.fleet_cluster)
    try:
        client = connect(conf)
        rev, kvs = client.range(keys.secrets, tx.prefix_end(keys.secrets))
        _, check = client.range(keys.key_check)
    except EtcdUnavailable as e:
        return lines + [f"etcd: unavailable ({e})"]
    defs = [kv for kv in kvs if kv.key.endswith(b"/def")]
    if check and check[0].value.startswith(ROTATING.encode()):
        version = check[0].value.split()[1].decode()
        at_new = sum(1 for kv in defs if str(record_version(kv.value)) == version)
        # (a stopped rotation: 'fleet rotate' on an approved host resumes it from here)
        match = (f"being rotated (to version {version}: {at_new} of {len(defs)} secrets re-sealed; "
                 "fleet writes refused until done)")
    else:
        match = "matches" if check and check[0].value == sealer.check_value.encode() else "does NOT match"
    lines += [f"etcd: reachable, revision {rev}", f"cluster key: {match} this host's",
              f"fleet secrets: {len(defs)}"]
    lines += _local_lines(paths, {p[0] for kv in defs if (p := keys.parse(kv.key)) is not None})
    try:
        hosts = enrol.list_hosts(client, keys)
    except EtcdUnavailable as e:
        return lines + [f"hosts: etcd unavailable ({e})"]
    directory = fleet_dir(paths)
    me = load_host_key(directory, environ).id if has_host_key(directory) else None
    lines.append(f"this host: {me or 'has not joined'}")
    lines.append(f"hosts: {len(hosts)}")
    for h in hosts:
        state = f"approved key v{h.key_version}" if h.approved else "pending"
        up = f"up since {h.up_since}" if h.up_since else "down"
        lines.append(f"  {h.id}  {h.hostname}  {state}  {up}  joined {h.joined}  {h.fingerprint}"
                     + (f"  PROBLEM: {h.problem}" if h.problem else "") + ("  (this host)" if h.id == me else ""))
    return lines

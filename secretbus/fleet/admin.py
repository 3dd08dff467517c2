"""`secretbus fleet init | status` for one instance (its paths and secret.conf)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from secretbus.core import errors
from secretbus.fleet import etcd as tx
from secretbus.fleet.etcd import EtcdUnavailable
from secretbus.fleet.keyfile import fleet_dir, init_fleet_key, load_fleet_key
from secretbus.fleet.keyspace import Keyspace
from secretbus.fleet.seal import Sealer
from secretbus.fleet.setup import connect
from secretbus.store.conf import SecretConf
from secretbus.store.crypto import KEY_SIZE
from secretbus.store.keys import load_key
from secretbus.store.paths import InstancePaths


def init(paths: InstancePaths, conf: SecretConf, *, raw: bool = False, with_key: str | None = None,
         copy_from: Path | None = None, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Create this host's fleet key (or seal a copy of the first host's, `copy_from`), then
    register its fingerprint for the cluster in etcd if that is configured and reachable."""
    key = load_key(copy_from) if copy_from is not None else None
    if key is not None and len(key) != KEY_SIZE:
        raise errors.InvalidArg(f"a fleet key has {KEY_SIZE} bytes")
    path = init_fleet_key(fleet_dir(paths), raw=raw, with_key=with_key, environ=environ, key=key)
    lines = [f"Fleet key created at {path}"]
    if not conf.fleet_endpoints:
        lines.append("fleet_endpoints is not set in secret.conf: nothing registered in etcd yet")
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
    return lines


def status(paths: InstancePaths, conf: SecretConf, environ: Mapping[str, str] = os.environ) -> list[str]:
    if not conf.fleet_endpoints:
        return ["fleet mode: off (fleet_endpoints is not set)"]
    lines = [f"cluster: {conf.fleet_cluster}", f"endpoints: {', '.join(conf.fleet_endpoints)}"]
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
    match = "matches" if check and check[0].value == sealer.check_value.encode() else "does NOT match"
    lines += [f"etcd: reachable, revision {rev}", f"cluster key: {match} this host's",
              f"fleet secrets: {sum(1 for kv in kvs if kv.key.endswith(b'/def'))}"]
    return lines

"""Building the fleet store of an instance from its secret.conf (the fleet_* keys)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path

from secretbus.core import errors
from secretbus.core.model import UsageType
from secretbus.fleet import enrol
from secretbus.fleet.etcd import TLS, Etcd
from secretbus.fleet.hostkey import HostKey, has_host_key, load_host_key
from secretbus.fleet.keyfile import fleet_dir, has_fleet_key, load_fleet_keys
from secretbus.fleet.keyspace import Keyspace
from secretbus.fleet.seal import Sealer
from secretbus.fleet.store import FleetOptions, FleetStore
from secretbus.store.codec import ValueCodecs
from secretbus.store.conf import SecretConf
from secretbus.store.paths import InstancePaths


def fleet_options(conf: SecretConf) -> FleetOptions:
    types = None
    if conf.fleet_usage_types is not None:
        types = frozenset(UsageType[name.upper()] for name in conf.fleet_usage_types)
    return FleetOptions(conf.fleet_cluster, types, conf.fleet_private)


def connect(conf: SecretConf) -> Etcd:
    try:
        return Etcd(list(conf.fleet_endpoints), TLS(conf.fleet_ca_file, conf.fleet_cert_file, conf.fleet_key_file))
    except ValueError as e:
        raise errors.ConfigError(f"fleet_endpoints: {e}") from None


def open_fleet_store(paths: InstancePaths, conf: SecretConf, codecs: ValueCodecs,
                     environ: Mapping[str, str] = os.environ) -> FleetStore:
    """The instance's store in fleet mode: its usual directory becomes the fleet's local cache."""
    directory = fleet_dir(paths)
    options = fleet_options(conf)
    etcd = connect(conf)
    keys = Keyspace(options.cluster)
    held = load_fleet_keys(directory, environ) if has_fleet_key(directory, environ) else []
    host = load_host_key(directory, environ) if has_host_key(directory) else None
    if host is not None and not held:
        # Joined (fleet join) and approved since, with no `join --wait` to pick the key up. (A
        # key rotated while this host was down is picked up by the watch's key check, without
        # holding up the start when etcd is unreachable.)
        held = enrol.keys_at_start(directory, etcd, keys, host, held, environ)
    elif not held:
        held = load_fleet_keys(directory, environ)     # (raises: no key, no identity)
    store = FleetStore(paths.config_dir, codecs, etcd=etcd, sealer=Sealer(options.cluster, held[-1], held[:-1]),
                       options=options, state_dir=directory)
    if host is not None:
        store.key_refresh = partial(_refresh, store, directory, host, environ)
        store.host_id = host.id
    return store


def _refresh(store: FleetStore, directory: Path, host: HostKey, environ: Mapping[str, str]) -> Sealer | None:
    """A rotation seen at run time (a record of a newer key version, a new key check): pick up
    this host's newer wrap. None when there is none (a revoked host gets nothing new)."""
    held = load_fleet_keys(directory, environ)
    newer = enrol.refresh(directory, store.etcd, store.keys, host, held, environ)
    if newer is None and held[-1].version <= store.sealer.key_version:
        return None
    ring = held + ([newer] if newer is not None else [])
    return Sealer(store.keys.cluster, ring[-1], ring[:-1])

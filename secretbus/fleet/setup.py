"""Building the fleet store of an instance from its secret.conf (the fleet_* keys)."""
from __future__ import annotations

import os
from collections.abc import Mapping

from secretbus.core import errors
from secretbus.core.model import UsageType
from secretbus.fleet import enrol
from secretbus.fleet.etcd import TLS, Etcd
from secretbus.fleet.hostkey import has_host_key, load_host_key
from secretbus.fleet.keyfile import fleet_dir, has_fleet_key, load_fleet_key
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
    if not has_fleet_key(directory, environ) and has_host_key(directory):
        # Joined (fleet join) and approved since, with no `join --wait` to pick the key up.
        key = enrol.key_at_start(directory, etcd, Keyspace(options.cluster), load_host_key(directory, environ),
                                 environ)
    else:
        key = load_fleet_key(directory, environ)
    return FleetStore(paths.config_dir, codecs, etcd=etcd, sealer=Sealer(options.cluster, key), options=options,
                      state_dir=directory)

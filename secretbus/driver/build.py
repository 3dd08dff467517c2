"""The composition root: one instance built from its paths, conf → key → store → lock → driver.

The daemon, `secretbus.open` (embedded) and the CLI's direct-driver commands all build
their driver here, so the order and the kind → paths mapping live in one place.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from secretbus.core import errors
from secretbus.driver.driver import SecretDriver, Setup, StoreState
from secretbus.fleet.setup import fleet_options, open_fleet_store
from secretbus.fleet.store import FleetStore
from secretbus.fleet.sync import FleetSync
from secretbus.store.codec import ValueCodecs
from secretbus.store.conf import SecretConf, load_instance_conf
from secretbus.store.filestore import SecretStore
from secretbus.store.keys import codecs_for
from secretbus.store.lock import InstanceLock
from secretbus.store.paths import InstancePaths


def load_setup(paths: InstancePaths, environ: Mapping[str, str] | None = None,
               conf: SecretConf | None = None) -> Setup:
    """Read secret.conf and secretbusd.conf's fleet keys (unless `conf` is given) and the key
    they name; the store that serves with them."""
    if conf is None:
        conf = load_instance_conf(paths)
    env = os.environ if environ is None else environ
    codecs, description = codecs_for(conf, env, paths.config_dir)
    if conf.fleet_endpoints:
        return Setup(conf, open_fleet_store(paths, conf, codecs, env), description)
    return Setup(conf, SecretStore(paths.config_dir, codecs), description)


# Keys that shape a fleet store (etcd, the cluster, the key of its cache): a reload
# in fleet mode keeps the store it has, so changing one of them needs a restart.
FLEET_RESTART_KEYS = ("fleet_endpoints", "fleet_cluster", "fleet_ca_file", "fleet_cert_file", "fleet_key_file",
                      "encrypt_data", "secrets_encryption_key", "encryption_scheme")


def reload_setup(paths: InstancePaths, environ: Mapping[str, str] | None, now: Setup) -> Setup:
    """What a reload (SIGHUP) serves with, `now` being the current setup. Outside fleet mode:
    everything read anew. In fleet mode: the new secret.conf with the same fleet store (its
    watch, cache and etcd connection stay; what it publishes follows the new conf); fleet mode
    is not turned on or off, nor its connection or key changed, by a reload."""
    conf = load_instance_conf(paths)
    where = conf.fleet_file
    if not isinstance(now.store, FleetStore):
        if conf.fleet_endpoints:
            raise errors.ConfigError(f"{where}: fleet_endpoints: fleet mode starts with a restart of "
                                     "secretbusd, not a reload")
        return load_setup(paths, environ, conf)
    if not conf.fleet_endpoints:
        raise errors.ConfigError(f"{where}: fleet mode ends with a restart of secretbusd, not a reload")
    changed = [k for k in FLEET_RESTART_KEYS if getattr(conf, k) != getattr(now.conf, k)]
    if changed:
        raise errors.ConfigError(f"{where}: in fleet mode a change of {', '.join(changed)} needs a restart "
                                 "of secretbusd, not a reload")
    fleet_options(conf)          # the usage types must be valid before anything is swapped
    codecs, description = codecs_for(conf, os.environ if environ is None else environ, paths.config_dir)
    if description == now.key_description:
        return Setup(conf, now.store, now.key_description)
    if not _rotation_step(now.store.codecs, codecs):
        raise errors.ConfigError(f"{where}: in fleet mode the encryption key changes only by "
                                 "'secretbus rotate-key' (or a restart)")
    return Setup(conf, now.store, description, codecs=codecs)


def _rotation_step(now: ValueCodecs, new: ValueCodecs) -> bool:
    """Whether `new` follows `now` in a key rotation (store/rotation.py): it starts (the new
    writer retires the current one) or ends (the writer stays, nothing is retired any more)."""
    kid_now, kid_new = getattr(now.writer, "key_id", None), getattr(new.writer, "key_id", None)
    if kid_now is None or kid_new is None:
        return False
    starts = kid_new != kid_now and kid_now in new.retiring
    ends = kid_new == kid_now and bool(now.retiring) and not new.retiring
    return starts or ends


def open_instance(paths: InstancePaths, *, conf: SecretConf | None = None,
                  environ: Mapping[str, str] | None = None, take_lock: bool = True) -> SecretDriver:
    """A driver serving the instance at `paths`, holding its single-instance lock.
    Its `conf`, `key_description` and store come from the same reading of secret.conf
    (or `conf`, for the first load; a reload reads the file)."""
    setup = load_setup(paths, environ, conf)
    setup.store.prepare()
    lock = InstanceLock(paths.lock_file) if take_lock else None
    if lock is not None:
        lock.acquire()
    fleet = setup.store if isinstance(setup.store, FleetStore) else None
    try:
        driver = SecretDriver(setup, reload_setup=lambda: reload_setup(paths, environ, driver.setup), lock=lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if fleet is not None:
        _attach_fleet(driver, fleet)
    return driver


def _attach_fleet(driver: SecretDriver, store: FleetStore) -> None:
    """The watch applies other hosts' changes through the driver; lookup misses ask etcd."""
    sync = FleetSync(store, driver.apply_remote)
    driver.catch_up = store.catch_up
    store.options_source = lambda: fleet_options(driver.conf)

    def state() -> StoreState:
        now = store.status
        return StoreState(now.state.value, now.reason)
    driver.state_source = state
    store.cell.watch(lambda *_: driver.store_state_changed())
    driver.on_close(sync.stop)
    sync.start()


"""The composition root: one instance built from its paths, conf → key → store → lock → driver.

The daemon, `secretbus.open` (embedded) and the CLI's direct-driver commands all build
their driver here, so the order and the kind → paths mapping live in one place.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial

from secretbus.driver.driver import SecretDriver, Setup
from secretbus.store.conf import SecretConf, load_conf
from secretbus.store.filestore import SecretStore
from secretbus.store.keys import codecs_for
from secretbus.store.lock import InstanceLock
from secretbus.store.paths import InstancePaths


def load_setup(paths: InstancePaths, environ: Mapping[str, str] | None = None,
               conf: SecretConf | None = None) -> Setup:
    """Read secret.conf (unless `conf` is given) and the key it names; the store that
    serves with them."""
    if conf is None:
        conf = load_conf(paths.conf_file)
    codecs, description = codecs_for(conf, os.environ if environ is None else environ)
    return Setup(conf, SecretStore(paths.config_dir, codecs), description)


def open_instance(paths: InstancePaths, *, conf: SecretConf | None = None,
                  environ: Mapping[str, str] | None = None, take_lock: bool = True) -> SecretDriver:
    """A driver serving the instance at `paths`, holding its single-instance lock.
    Its `conf`, `key_description` and store come from the same reading of secret.conf
    (or `conf`, for the first load; a reload reads the file)."""
    reader = partial(load_setup, paths, environ)
    setup = load_setup(paths, environ, conf)
    setup.store.prepare()
    lock = InstanceLock(paths.lock_file) if take_lock else None
    if lock is not None:
        lock.acquire()
    try:
        return SecretDriver(setup, reload_setup=reader, lock=lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


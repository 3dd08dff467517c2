"""`secretbus fleet publish [UUID]`: this host's secrets of before fleet mode into the fleet.

A secret this host had before fleet mode stays in the instance's own directory, served to this
host only (docs/fleet.md); publishing it is this explicit step. It opens the instance itself,
like `rewrite-values` and `fleet leave`, so the service must be stopped: one driver writes the
files. The rules per secret are FleetStore.publish's.
"""
from __future__ import annotations

from secretbus.core import errors
from secretbus.driver.build import open_instance
from secretbus.fleet.changes import Published, PublishResult
from secretbus.fleet.store import FleetStore
from secretbus.store.paths import InstancePaths

ONLINE_TIMEOUT = 30.0     # seconds for the first full read of the fleet (a resync) to finish


def publish(paths: InstancePaths, uuid: str | None = None,
            timeout: float = ONLINE_TIMEOUT) -> tuple[list[str], list[str]]:
    """(lines for stdout, lines for stderr); the second is empty when every secret named or
    found was published, was in the fleet already, or stays local by this host's conf."""
    try:
        driver = open_instance(paths)
    except errors.LockHeld:
        raise errors.OperationFailed("the service of this instance is running: stop it before "
                                     "'fleet publish'") from None
    try:
        store = driver.store
        if not isinstance(store, FleetStore):
            raise errors.ConfigError(f"fleet mode is off: fleet_endpoints is not set in {paths.server_conf_file}")
        if not store.cell.wait_online(timeout):
            raise errors.OperationFailed(f"fleet store unavailable: {store.status.reason}")
        results = driver.publish_to_fleet(uuid)
    finally:
        driver.close()
    return report(results, store.options.cluster)


def report(results: list[PublishResult], cluster: str) -> tuple[list[str], list[str]]:
    out: list[str] = []
    err: list[str] = []
    for r in results:
        if r.outcome is Published.PUBLISHED:
            out.append(f"Secret {r.uuid} published to fleet cluster '{cluster}'")
        elif r.outcome is Published.ALREADY:
            out.append(f"Secret {r.uuid} was in the fleet already, the same: its local copy is removed")
        elif r.outcome is Published.STAYS_LOCAL:
            out.append(f"Secret {r.uuid} stays local: {r.reason}")
        else:
            err.append(r.reason)
    moved = sum(1 for r in results if r.outcome in (Published.PUBLISHED, Published.ALREADY))
    out.append(f"{moved} of {len(results)} local secrets are in the fleet now")
    return out, err

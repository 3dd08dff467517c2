"""This host's presence in etcd: `hosts/<id>/alive`, a record on a lease the heartbeat renews.

`fleet status`, on any host, shows which hosts' services are connected to etcd now and since
when (research/fleet.md §6.3, "host presence through leased alive keys"): before a rotation or
a revocation an operator sees who is up. The record holds the hostname and the time the
presence began (UTC); nothing secret. Its lease (ALIVE_TTL seconds) ends by itself when the
service stops without saying so (a crash, a power loss, a network cut): etcd deletes the record.
A service that stops revokes it at once.

Presence never decides the host's state: a failure to renew or write it (etcd unreachable, or
a role without write access to `hosts/<id>/`, docs/fleet.md) is logged once per outage and
tried again at the next beat, and the host's reads and writes go on as the watch allows.
"""
from __future__ import annotations

import json
import logging
import threading
import time

from secretbus.fleet import etcd as tx
from secretbus.fleet.etcd import Etcd, EtcdUnavailable
from secretbus.fleet.keyspace import Keyspace

log = logging.getLogger("secretbus.fleet")

ALIVE_TTL = 10          # seconds: a host gone without revoking disappears from status within this
MAX_ALIVE_RECORD = 1024
STOP_WAIT = 1.0         # seconds a closing service waits for a beat under way


def alive_record(hostname: str, since: float) -> bytes:
    return json.dumps({"v": 1, "hostname": hostname,
                       "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))}, sort_keys=True).encode()


def alive_since(data: bytes) -> str | None:
    """The record's start time, or None for a record that is not one of ours."""
    if len(data) > MAX_ALIVE_RECORD:
        return None
    try:
        j = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    since = j.get("since") if isinstance(j, dict) and j.get("v") == 1 else None
    return since if isinstance(since, str) and len(since) <= 32 and since.isprintable() else None


class Presence:
    def __init__(self, etcd: Etcd, keys: Keyspace, host_id: str, hostname: str, ttl: int = ALIVE_TTL) -> None:
        self._etcd = etcd
        self._ttl = ttl
        self._key = keys.host_alive(host_id)
        self._hostname = hostname
        self._lease = 0
        self._failing = False
        self._mu = threading.Lock()      # beat (heartbeat thread) against stop (the closer)
        self._stopped = False

    def beat(self) -> None:
        """Renew the lease, or take a new one and write the record."""
        with self._mu:
            if self._stopped:
                return
            try:
                if self._lease and self._etcd.lease_keepalive(self._lease) > 0:
                    self._failing = False
                    return
                self._lease = 0         # expired (etcd was away longer than the TTL)
                lease = self._etcd.lease_grant(self._ttl)
                try:
                    self._etcd.txn([], [tx.put(self._key, alive_record(self._hostname, time.time()), lease)])
                except EtcdUnavailable:
                    self._revoke(lease)
                    raise
                self._lease = lease
                self._failing = False
            except EtcdUnavailable as e:
                if not self._failing:
                    log.warning("fleet: cannot record this host's presence in etcd (%s); "
                                "fleet status shows it down until this works", e)
                self._failing = True

    def stop(self) -> None:
        """Revoke the lease (the record goes with it); no beat after this."""
        self._stopped = True
        if not self._mu.acquire(timeout=STOP_WAIT):
            return          # a beat stuck on an unreachable etcd: the lease ends by itself
        try:
            lease, self._lease = self._lease, 0
        finally:
            self._mu.release()
        if lease:
            self._revoke(lease)

    def _revoke(self, lease: int) -> None:
        try:
            self._etcd.lease_revoke(lease)
        except EtcdUnavailable:
            pass        # it expires by itself within ALIVE_TTL

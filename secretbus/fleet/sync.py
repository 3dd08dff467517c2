"""The watcher: one watch on the fleet's prefix, applied in revision order through the driver.

Start-up and every compaction: a full read (quorum), applied as a diff. Then a watch from the
next revision; on a broken stream the state turns degraded (reads keep coming from the cache,
fleet writes are refused) and the watch resumes from the last applied revision when etcd
answers again. A heartbeat (a quorum read) notices a cluster that lost quorum or a network
that went silent while the stream looks open.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from functools import partial

from secretbus.fleet import etcd as tx
from secretbus.fleet.changes import RemoteChange
from secretbus.fleet.etcd import EtcdUnavailable, WatchStream
from secretbus.fleet.presence import Presence
from secretbus.fleet.seal import cluster_checks
from secretbus.fleet.status import FleetState
from secretbus.fleet.store import FleetStore

log = logging.getLogger("secretbus.fleet")

Apply = Callable[[Callable[[], list[RemoteChange]]], None]


class KeyMismatch(Exception):
    pass


class FleetSync:
    def __init__(self, store: FleetStore, apply: Apply, *, retry: float = 1.0, heartbeat: float = 2.0):
        """`apply(changes)` runs changes() under the driver's lock and announces the result
        (driver.apply_remote)."""
        self.store = store
        self.apply = apply
        self.retry = retry
        self.heartbeat = heartbeat
        self._stop = threading.Event()
        self._mu = threading.Lock()
        self._stream: WatchStream | None = None
        # This host's presence record (hosts/<id>/alive), renewed by the heartbeat; a host
        # without a fleet identity (a hand-copied key of the first increment) has none.
        self.presence = (Presence(store.etcd, store.keys, store.host_id, os.uname().nodename)
                         if store.host_id is not None else None)
        self._threads = [threading.Thread(target=self._run, name="fleet-watch", daemon=True),
                         threading.Thread(target=self._beat, name="fleet-heartbeat", daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._close_stream()
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout=10)
        if self.presence is not None:
            self.presence.stop()

    def _close_stream(self) -> None:
        with self._mu:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    # -- the watch loop ------------------------------------------------------------------
    def _run(self) -> None:
        resync = True
        while not self._stop.is_set():
            try:
                self._check_key(resync)
                if resync:
                    self._resync()
                    resync = False
                else:
                    self.store.etcd.revision()    # a quorum answers before we call it online
                resync = self._watch()
            except EtcdUnavailable as e:
                if not self._stop.is_set():
                    self.store.cell.set(FleetState.DEGRADED, str(e))
            except KeyMismatch as e:
                self.store.cell.set(FleetState.DEGRADED, str(e))
            except Exception:
                log.exception("fleet: the watch failed; resyncing")
                self.store.cell.set(FleetState.DEGRADED, "internal error in the fleet watch (see the log)")
                resync = True
            finally:
                self._close_stream()
            self._stop.wait(self.retry)

    def _watch(self) -> bool:
        """Follow the stream until it breaks; True when a full resync is needed."""
        stream = self.store.etcd.watch(self.store.keys.prefix, self.store.revision + 1)
        with self._mu:
            self._stream = stream
        if self._stop.is_set():
            return False
        self.store.cell.set(FleetState.ONLINE)
        if self.presence is not None:
            self.presence.beat()        # at once, not a heartbeat later
        for batch in stream:
            if batch.compact_revision:
                log.warning("fleet: the watch from revision %d was compacted (compacted up to %d); "
                            "full resync", self.store.revision + 1, batch.compact_revision)
                return True
            if batch.canceled:
                raise EtcdUnavailable(f"{stream.endpoint}: watch canceled by etcd")
            last = max(ev.kv.mod_revision for ev in batch.events)
            self.apply(partial(self.store.apply_events, batch.events, last))
        return False

    def _resync(self) -> None:
        prefix = self.store.keys.secrets
        rev, kvs = self.store.etcd.range(prefix, tx.prefix_end(prefix))
        changes: list[RemoteChange] = []

        def run(step: Callable[[], list[RemoteChange]]) -> list[RemoteChange]:
            done = step()
            changes.extend(done)
            return done
        for step in self.store.resync_steps(rev, kvs):
            if self._stop.is_set():
                return
            self.apply(partial(run, step))
        log.info("fleet: resynced %d secrets at revision %d (%d changes)",
                 sum(1 for kv in kvs if kv.key.endswith(b"/def")), rev, len(changes))

    def _check_key(self, resync: bool) -> None:
        """The cluster's key fingerprint must be one of ours (the first host to connect sets it);
        after a rotation this host missed, it picks up its newer key first. `resync`: a full
        read of the records follows."""
        key = self.store.keys.key_check
        mine = self.store.sealer.check_value.encode()
        _, kvs = self.store.etcd.range(key)
        if not kvs:
            self.store.etcd.txn([tx.absent(key)], [tx.put(key, mine)])
            _, kvs = self.store.etcd.range(key)

        def ours() -> bool:
            return bool(kvs) and bool(cluster_checks(kvs[0].value) & self.store.sealer.check_values)
        if not ours() and not (self.store.refresh_key() and ours()):
            raise KeyMismatch(f"this host's fleet key is not the one of fleet cluster '{self.store.options.cluster}'")
        if resync or kvs[0].mod_revision <= self.store.revision:
            # No record older than this check is read from here on (a full read follows, or the
            # watch goes on from after it): a rotation finished while this host was away leaves
            # it older versions to retire. A check that comes later is the watch's (_apply).
            self.store.retire_older_keys(cluster_checks(kvs[0].value))

    # -- heartbeat ----------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            state = self.store.cell.get()[0]
            with self._mu:
                watching = self._stream is not None
            if state is FleetState.CONNECTING or (state is FleetState.DEGRADED and not watching):
                continue        # the watch loop reconnects and says when it is online
            try:
                self.store.etcd.revision()
            except EtcdUnavailable as e:
                self.store.cell.set(FleetState.DEGRADED, str(e))
                self._close_stream()
                continue
            if state is FleetState.DEGRADED:
                # A write or catch-up failed (a timeout, say) while the watch stayed up: etcd
                # answers a quorum read again and the watch never broke, so nothing was missed.
                self.store.cell.set(FleetState.ONLINE)
            if self.presence is not None:
                self.presence.beat()

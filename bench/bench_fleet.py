#!/usr/bin/env python3
"""Fleet mode on a real etcd (started here, stopped by PID): two embedded hosts A and B.

    python bench/bench_fleet.py [--latency 200] [--writes 400] [--resync 2000] [--members 1] [--rotate]

Prints: define-to-visible-on-B latency (p50/p99, A defines, B's DEFINED event arrives),
define+set throughput from 16 threads on A, and B's full resync of N secrets (B reopened:
start-up from its cache plus the resync to ONLINE). With --rotate, then: `fleet rotate` of
all of them (fleet writes are refused meanwhile), one secret a transaction (as before
fleet/rotate.py's batches) and in batches, one after the other on the same secrets.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secretbus.core.model import EventId, Lifecycle  # noqa: E402
from tests.harness.etcd import EtcdCluster  # noqa: E402
from tests.test_fleet import make_host, uid, xml  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def rotations(a, etcd: EtcdCluster, total: int) -> None:
    """A enrols itself (a host identity, as `fleet init` gives), then rotates twice (A's
    service closed meanwhile: it was opened before it had a host identity, so it would not
    pick the new key up), and serves every secret again."""
    from secretbus.fleet import enrol, rotate
    from secretbus.fleet.etcd import Etcd
    from secretbus.fleet.hostkey import load_or_create_host_key
    from secretbus.fleet.keyfile import fleet_dir, load_fleet_key
    from secretbus.fleet.keyspace import Keyspace
    directory, keys, client = fleet_dir(a.paths), Keyspace("test"), Etcd(list(etcd.endpoints))
    a.close()
    host, _ = load_or_create_host_key(directory, raw=True)
    enrol.enrol_self(client, keys, host, load_fleet_key(directory), "bench-a")
    for batch in (1, rotate.BATCH):
        rotate.BATCH = batch
        t0 = time.perf_counter()
        r = rotate.rotate(client, keys, host, directory)
        dt = time.perf_counter() - t0
        assert r.resealed == total, r
        print(f"fleet rotate of {total} secrets, {batch} a transaction: {dt * 1000:.0f} ms "
              f"({total / dt:.0f} secrets/s; fleet writes refused meanwhile)")
    a.open()
    assert a.d.count() == total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=int, default=200)
    ap.add_argument("--writes", type=int, default=400)
    ap.add_argument("--resync", type=int, default=2000)
    ap.add_argument("--members", type=int, default=1, help="etcd cluster members (on loopback)")
    ap.add_argument("--rotate", action="store_true", help="also time fleet rotate of all the secrets")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sb-fleet-bench-"))
    etcd = EtcdCluster.create(tmp / "etcd", args.members)
    print(f"fleet bench: {args.members} etcd member(s) on loopback")
    hosts = []
    try:
        etcd.start()
        a, key = make_host(tmp, "a", etcd.endpoints, None)
        b, _ = make_host(tmp, "b", etcd.endpoints, key)
        hosts = [a.open(), b.open()]
        seen: dict[str, float] = {}
        cond = threading.Condition()

        def on_b(ev) -> None:
            if ev.event_id == EventId.LIFECYCLE and ev.lifecycle == Lifecycle.DEFINED:
                with cond:
                    seen[ev.uuid] = time.perf_counter()
                    cond.notify_all()
        b.d.subscribe(on_b)
        lat = []
        for i in range(args.latency):
            u = uid(10_000_000 + i)
            t0 = time.perf_counter()
            a.d.define_xml(xml(u, f"lat.{i}"))
            with cond:
                cond.wait_for(lambda u=u: u in seen, 30)
            lat.append((seen[u] - t0) * 1000)
        print(f"define-to-visible on B: p50 {pct(lat, .5):.2f} ms, p99 {pct(lat, .99):.2f} ms (n={len(lat)})")

        n_threads, per = 16, max(1, args.writes // 16)
        def writer(t: int) -> None:
            for j in range(per):
                u = uid(20_000_000 + t * 100_000 + j)
                a.d.define_xml(xml(u, f"w.{t}.{j}"))
                a.d.set_value(u, b"v" * 32)
        threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        ops = 2 * n_threads * per
        print(f"define+set, 16 threads on A: {ops / dt:.0f} ops/s ({ops} ops in {dt:.2f} s)")

        for i in range(args.resync - args.latency - n_threads * per):
            a.d.define_xml(xml(uid(30_000_000 + i), f"r.{i}"))
        total = len(a.d.list_secrets())
        b.close()
        t0 = time.perf_counter()
        b.open(online=False)
        opened = time.perf_counter() - t0
        assert b.store.cell.wait_online(120)
        ready = time.perf_counter() - t0
        print(f"B restart with {total} fleet secrets cached: open {opened * 1000:.0f} ms, "
              f"in sync (resync done, online) {ready * 1000:.0f} ms")
        b.close()
        shutil.rmtree(tmp / "b" / "etc" / "secretbus-fleet" / "cache")
        t0 = time.perf_counter()
        b.open()
        print(f"B full resync of {total} secrets into an empty cache: {(time.perf_counter() - t0) * 1000:.0f} ms")
        assert len(b.d.list_secrets()) == total
        if args.rotate:
            b.close()       # no host identity: it could not pick the new key up
            rotations(a, etcd, total)
        print(f"(median latency {statistics.median(lat):.2f} ms)")
    finally:
        for h in hosts:
            h.close()
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

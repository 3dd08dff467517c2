#!/usr/bin/env python3
"""Where the CPU of one D-Bus call goes, by process: client, dbus-daemon, journal, secretbusd.

    .venv/bin/python bench/bench_cpu_split.py [--seconds 6] [--calls Ping,GetValue,GetXMLDesc]
                                              [--store DIR] [--daemon-arg ARG ...]

On 2 CPUs a 16-in-flight rate is set by the sum of every process's CPU per call (they share
the CPUs), not by secretbusd's alone: this prints that sum for the service's own Peer.Ping and
for secretbus calls, so that a ratio such as issue 15's "GetValue ≥ 80 % of the service's own
Ping" can be read as what it asks of each process. The daemon, bus and journal stand-in are
bench_dbus.py's (its store, `--store`, reused); each call is sent with 16 in flight on one
connection for `--seconds`; CPU is /proc/PID/task/*/schedstat (daemon, bus, journal) and
getrusage (this client). `--daemon-arg=--audit=off` measures without the read audit.
"""
from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dbus as B  # noqa: E402
from journal_standin import JournalStandIn  # noqa: E402


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(a: argparse.Namespace) -> None:
    from harness.bus import PrivateBus
    procs = B.Procs()
    B.JOURNAL = JournalStandIn(Path(tempfile.mkdtemp(prefix="sb-journal-"))).start()
    B.DAEMON_ARGS[:] = a.daemon_arg
    try:
        root = Path(a.store) / "root"
        B.build_store(root, a.secrets)          # reused when bench_dbus.py built it already
        procs.bus = PrivateBus("session").start()
        client = await B.Client(procs.bus.address).connect()
        await client.send(B.m_dbus("AddMatch", sig="s", body=[
            f"type='signal',sender='{B.DBUS_NAME}',interface='{B.DBUS_NAME}',"
            f"member='NameOwnerChanged',arg0='{B.BUS_NAME}'"]))
        logdir = Path(tempfile.mkdtemp(prefix="sb-cpu-split-"))
        procs.dirs.append(logdir)
        daemon, *_ = await B.start_once(procs, client, root, procs.bus.address, logdir / "secretbusd.log",
                                        a.secrets)
        paths = [B.secret_path(B.uuid_of(i)) for i in range(min(a.secrets, 1000))]
        pids = {"secretbusd": daemon.pid, "dbus-daemon": procs.bus.pid, "journal": B.JOURNAL.proc.pid}
        print(f"# bench_cpu_split: 16 in flight, {a.seconds:g} s per call, {a.secrets:,} secrets, "
              f"daemon args {' '.join(a.daemon_arg) or '(none)'}; µs of CPU per call")
        print("| call | calls/s | client | dbus-daemon | journal | secretbusd | sum |\n|---|---|---|---|---|---|---|")
        for member in a.calls.split(","):
            def make(i: int, member: str = member) -> B.Message:
                if member == "Ping":
                    return B.Message(destination=B.BUS_NAME, path=B.CONNECT_PATH, interface=B.PEER_IFACE,
                                     member="Ping")
                return B.m_secret(paths[i % len(paths)], member, "u", [0])
            for i in range(200):                                # warm-up: pid lookups, caches
                await client.send(make(i))
            before = {k: B.cpu_ns(p) for k, p in pids.items()}
            mine, t0, n = own_cpu_s(), time.monotonic(), 0
            stop = t0 + a.seconds

            async def worker(k: int, stop: float = stop) -> None:
                nonlocal n
                i = k
                while time.monotonic() < stop:
                    await client.send(make(i))
                    i += B.INFLIGHT
                    n += 1
            await asyncio.gather(*(worker(k) for k in range(B.INFLIGHT)))
            dt = time.monotonic() - t0
            per = {k: (B.cpu_ns(p) - before[k]) / n / 1000 for k, p in pids.items()}
            per_client = (own_cpu_s() - mine) / n * 1e6
            total = per_client + sum(per.values())
            print(f"| {member} | {n / dt:,.0f} | {per_client:.1f} | {per['dbus-daemon']:.1f} | "
                  f"{per['journal']:.1f} | {per['secretbusd']:.1f} | {total:.1f} |")
        client.close()
    finally:
        procs.stop_all()
        B.JOURNAL.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--calls", default="Ping,GetValue,GetXMLDesc")
    ap.add_argument("--secrets", type=int, default=10_000)
    ap.add_argument("--store", default="/var/tmp/dbp-s10k", help="bench_dbus.py's --store (built if missing)")
    ap.add_argument("--daemon-arg", action="append", default=[], metavar="ARG")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()

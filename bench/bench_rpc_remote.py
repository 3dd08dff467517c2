#!/usr/bin/env python3
"""GetValue over libvirt RPC through each transport, from the same client, in one run.

    .venv/bin/python bench/bench_rpc_remote.py [--quick] [--transports unix,ssh] [--calls N]
                                               [--seconds S] [--rounds R] [--starts K] [--dir DIR]

One secretbusd (`--session --no-dbus --rpc-dir`, a store of --secrets libvirt-format secrets)
and, per transport, what it needs on loopback: `unix` is the socket itself; `ssh` a private
sshd (tests/harness/sshd.py: own host key, authorised key, known_hosts, no ~/.ssh) whose
sessions run `secretbus ssh-bridge` to that socket. Each transport is one URI for the same
client, `secretbus.open(URI)` (the synchronous RpcConnection):

  * "1 in flight": GetValue of one secret again and again: calls/s, p50 and p99 latency;
  * "16 in flight": 16 threads on one connection: calls/s;
  * "start to answer": `secretbus -q -c URI secret-get-value UUID` as a new process, wall time
    from its start to its exit with the value (median and best of --starts), which includes
    Python's start-up, the ssh handshake and the remote bridge's start-up.

Rows are interleaved per round (the order alternates) so that a burst of load hits every
transport alike; rates are medians over the rounds, latencies pool every call. Transports are
data: add one to TRANSPORTS (a name and a function giving the URI; it may start what it needs
through `Env.procs`). Every process is started in its own session and stopped by PID.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import bench_rpc  # noqa: E402

import secretbus  # noqa: E402

VALUE = bench_rpc.VALUE
INFLIGHT = 16


@dataclass
class Env:
    work: Path
    socket: Path                                   # secretbusd's RPC socket
    procs: bench_rpc.Procs
    cleanups: list[Callable[[], None]] = field(default_factory=list)


def unix_uri(env: Env) -> str:
    return f"secret:///session?socket={env.socket}"


def ssh_uri(env: Env) -> str:
    from harness.sshd import Sshd
    d = Sshd(programs=("secretbus",)).start()
    env.cleanups.append(d.cleanup)
    return d.uri(instance="session", socket=str(env.socket))


# name -> URI maker; the order is the table's.
TRANSPORTS: dict[str, Callable[[Env], str]] = {"unix": unix_uri, "ssh": ssh_uri}


def pct(sorted_lat: list[float], p: float) -> float:
    return sorted_lat[min(len(sorted_lat) - 1, int(p * len(sorted_lat)))] if sorted_lat else float("nan")


@dataclass
class Figures:
    rates1: list[float] = field(default_factory=list)
    lat: list[float] = field(default_factory=list)
    rates16: list[float] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)


def sequential(conn, uuid: str, calls: int, seconds: float, fig: Figures) -> None:
    end = time.monotonic() + seconds
    n, t0 = 0, time.perf_counter()
    while n < calls and time.monotonic() < end:
        t = time.perf_counter()
        if conn.secret_get_value(uuid) != VALUE:
            raise SystemExit("wrong value returned")
        fig.lat.append(time.perf_counter() - t)
        n += 1
    fig.rates1.append(n / (time.perf_counter() - t0))


def parallel(conn, uuid: str, calls: int, seconds: float, fig: Figures) -> None:
    end = time.monotonic() + seconds
    counts = [0] * INFLIGHT
    per = max(1, calls // INFLIGHT)

    def worker(i: int) -> None:
        while counts[i] < per and time.monotonic() < end:
            conn.secret_get_value(uuid)
            counts[i] += 1
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(INFLIGHT)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fig.rates16.append(sum(counts) / (time.perf_counter() - t0))


def start_to_answer(uri: str, uuid: str, fig: Figures) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SECRETBUS_DEFAULT_URI"}
    cli = [str(Path(sys.executable).parent / "secretbus")]
    if not Path(cli[0]).exists():
        cli = [sys.executable, "-m", "secretbus.cli"]
    t0 = time.perf_counter()
    r = subprocess.run([*cli, "-q", "-c", uri, "secret-get-value", uuid, "--plain"], capture_output=True,
                       timeout=60, env=env)
    took = time.perf_counter() - t0
    if r.returncode != 0 or r.stdout != VALUE:
        raise SystemExit(f"secretbus -c {uri.split('?')[0]} failed: {r.stderr.decode(errors='replace')[-500:]}")
    fig.starts.append(took)


def table(figs: dict[str, Figures]) -> str:
    out = ["| transport | GetValue calls/s (1 in flight) | p50 ms | p99 ms | calls/s (16 in flight) "
           "| start to answer, median ms | best ms |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, f in figs.items():
        lat = sorted(f.lat)
        out.append(f"| {name} | {statistics.median(f.rates1):,.0f} | {pct(lat, 0.5) * 1e3:.2f} | "
                   f"{pct(lat, 0.99) * 1e3:.2f} | {statistics.median(f.rates16):,.0f} | "
                   f"{statistics.median(f.starts) * 1e3:.0f} | {min(f.starts) * 1e3:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (seconds)")
    ap.add_argument("--transports", default=",".join(TRANSPORTS), help=f"of {', '.join(TRANSPORTS)}")
    ap.add_argument("--secrets", type=int, default=100)
    ap.add_argument("--calls", type=int, default=None, help="calls per measurement at most (3000; quick 50)")
    ap.add_argument("--seconds", type=float, default=None, help="time cap per measurement (2; quick 0.3)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds, rows interleaved (3; quick 1)")
    ap.add_argument("--starts", type=int, default=None, help="CLI start-ups timed per round (3; quick 1)")
    ap.add_argument("--dir", default=None, help="where the temporary store goes")
    a = ap.parse_args()
    calls = a.calls or (50 if a.quick else 3000)
    seconds = a.seconds or (0.3 if a.quick else 2.0)
    rounds = a.rounds or (1 if a.quick else 3)
    starts = a.starts or (1 if a.quick else 3)
    names = [n for n in a.transports.split(",") if n]
    unknown = [n for n in names if n not in TRANSPORTS]
    if unknown:
        raise SystemExit(f"unknown transport(s) {', '.join(unknown)}; known: {', '.join(TRANSPORTS)}")

    work = Path(tempfile.mkdtemp(prefix="sb-bench-remote-", dir=a.dir))
    work.chmod(0o755)
    procs = bench_rpc.Procs()
    env: Env | None = None
    try:
        store = work / "store"
        bench_rpc.build_store(store, a.secrets)
        server = bench_rpc.start_secretbusd(procs, work, store, a.secrets)
        env = Env(work, server.socket, procs)
        uuid = bench_rpc.uuid_of(0)
        uris = {n: TRANSPORTS[n](env) for n in names}
        with secretbus.open(uris[names[0]]) as conn:
            conn.secret_set_value(uuid, VALUE)
        conns = {n: secretbus.open(u) for n, u in uris.items()}
        try:
            figs = {n: Figures() for n in names}
            for r in range(rounds):
                order = names if r % 2 == 0 else names[::-1]
                for n in order:
                    sequential(conns[n], uuid, calls, seconds, figs[n])
                for n in order:
                    parallel(conns[n], uuid, calls, seconds, figs[n])
                for n in order:
                    for _ in range(starts):
                        start_to_answer(uris[n], uuid, figs[n])
        finally:
            for c in conns.values():
                c.close()
        print(f"secretbusd, {a.secrets} secrets, GetValue of a {len(VALUE)}-byte value, {rounds} round(s), "
              f"loadavg {os.getloadavg()[0]:.2f}")
        print(table(figs))
    finally:
        if env is not None:
            for fn in reversed(env.cleanups):
                fn()
        procs.stop_all()
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

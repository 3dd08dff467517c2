#!/usr/bin/env python3
"""What one audit record's datagram costs the sender: the first of a burst, which finds the
receiver asleep and wakes it, against the next ones of the same burst. The figures behind
the experiment of sending a loop pass's audit records together (bench/README, 2026-12-03: it
halved the stand-in's CPU per record and did not raise the GetValue rate; not kept).

    .venv/bin/python bench/bench_journal_send.py [--bursts 3000] [--size 16] [--gap-us 200]

The receiver is the benches' journald stand-in (journal_standin.py: its own process, the
queue length systemd sets); each burst sends `--size` records of a GetValue record's size
back to back on a non-blocking connected socket, then waits `--gap-us` so that the receiver
drains and sleeps. Prints the median and p90 wall time of each send by its place in the burst,
and the mean per record of a burst against sending each record alone.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from journal_standin import JournalStandIn  # noqa: E402

RECORD = 460          # bytes: a GetValue record of encode_allowed, about


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bursts", type=int, default=3000)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--gap-us", type=float, default=200.0)
    a = ap.parse_args()
    standin = JournalStandIn(Path(tempfile.mkdtemp(prefix="sb-journal-"))).start()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        s.connect(str(standin.path))
        s.setblocking(False)
        data = b"x" * RECORD
        per: list[list[float]] = [[] for _ in range(a.size)]
        full = 0
        pc = time.perf_counter
        for _ in range(a.bursts):
            for k in range(a.size):
                t = pc()
                try:
                    s.send(data)
                except BlockingIOError:
                    full += 1
                per[k].append(pc() - t)
            until = pc() + a.gap_us / 1e6
            while pc() < until:
                pass
        s.close()
    finally:
        received = standin.stop()
    print(f"# bench_journal_send: {a.bursts} bursts of {a.size} records of {RECORD} bytes, "
          f"{a.gap_us:g} µs apart; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{full} sends refused (queue full), {received} received")
    print("| send in the burst | median µs | p90 µs |\n|---|---|---|")
    for k, xs in enumerate(per, 1):
        xs.sort()
        print(f"| {k} | {statistics.median(xs) * 1e6:.1f} | {xs[int(len(xs) * 0.9)] * 1e6:.1f} |")
    first = statistics.mean(per[0]) * 1e6
    burst = statistics.mean(x for xs in per for x in xs) * 1e6
    print(f"\nmean per record: alone (the first of each burst) {first:.1f} µs, "
          f"in bursts of {a.size} {burst:.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Open a store of N encrypted persistent secrets and read every value; print the figures.

    python bench/bench_store.py [N=10000] [--scheme aes256gcm|aes256cbc|none]

Prints: time to create (once), time to open the store (load + decrypt all), time to read
every value through the API, time to re-write every value (`rewrite-values`, what a key
rotation's reload does), and peak RSS. Goal (issue 3): open <= 0.5 s for 10,000.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import secretbus  # noqa: E402


def populate(root: Path, n: int, scheme: str) -> None:
    (root / "etc").mkdir(parents=True, mode=0o700)
    if scheme != "none":
        key = root / "key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        (root / "etc" / "secret.conf").write_text(
            f'secrets_encryption_key = "{key}"\nencryption_scheme = "{scheme}"\n')
    else:
        (root / "etc" / "secret.conf").write_text("encrypt_data = 0\n")
    with secretbus.open(f"secret:///embed?root={root}") as c:
        for i in range(n):
            s = c.define_xml(f"<secret ephemeral='no' private='no'><uuid>{i:08x}-0000-4000-8000-{i:012x}</uuid>"
                             f"<description>bench {i}</description>"
                             f"<usage type='volume'><volume>/var/lib/libvirt/images/{i}.img</volume></usage>"
                             "</secret>")
            s.set_value(os.urandom(32))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=10000)
    ap.add_argument("--scheme", default="aes256gcm", choices=["aes256gcm", "aes256cbc", "none"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", help="where to build the store (default: a temp dir)")
    a = ap.parse_args()
    base = Path(a.dir or tempfile.mkdtemp(prefix="sb-bench-"))
    root = base / "root"
    try:
        t = time.perf_counter()
        populate(root, a.n, a.scheme)
        create = time.perf_counter() - t
        opens, reads = [], []
        for _ in range(a.runs):
            t = time.perf_counter()
            c = secretbus.open(f"secret:///embed?root={root}")
            opens.append(time.perf_counter() - t)
            t = time.perf_counter()
            secrets = c.list_secrets()
            for s in secrets:
                s.get_value()
            reads.append(time.perf_counter() - t)
            assert len(secrets) == a.n, len(secrets)
            c.close()
        with secretbus.open(f"secret:///embed?root={root}") as c:
            t = time.perf_counter()
            assert tuple(c.rewrite_values()) == (a.n, a.n, 0)
            rewrite = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"store bench: {a.n} persistent secrets, scheme {a.scheme}, {os.cpu_count()} cores, {a.runs} runs")
        print("| figure | value |\n|---|---|")
        print(f"| create (define + set value, fsync each) | {create:.2f} s |")
        print(f"| open store (load + decrypt all), median | {statistics.median(opens) * 1000:.0f} ms |")
        print(f"| open store, best / worst | {min(opens) * 1000:.0f} / {max(opens) * 1000:.0f} ms |")
        print(f"| read every value via API, median | {statistics.median(reads) * 1000:.0f} ms |")
        print(f"| re-write every value (rewrite-values) | {rewrite * 1000:.0f} ms ({a.n / rewrite:,.0f} values/s) |")
        print(f"| peak RSS of this process | {rss:.0f} MB |")
    finally:
        if not a.dir:
            shutil.rmtree(base)


if __name__ == "__main__":
    main()

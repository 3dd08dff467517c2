#!/usr/bin/env python3
"""What SCRAM-SHA-256 on the unix socket costs a connection, and `secretbus -c` start-up with it.

    .venv/bin/python bench/bench_rpc_scram.py [--connections N] [--cli-runs N]

One secretbusd (`--system --no-dbus --audit off`) with `auth_unix_rw = "sasl"` and the default
`auth_unix_ro` (polkit: a root peer needs nothing): the same client (secretbus.rpc.client, as
root) opens N connections one after another on each socket, alternating — connect, AUTH_LIST
(+ SCRAM on the rw socket: AUTH_SASL_INIT, START, STEP, 4096 PBKDF2 iterations on each side),
CONNECT_OPEN, one LookupByUUID, CONNECT_CLOSE — and reports the median and p99 of that time. Then
`secretbus -c URI secret-list` is run N times per socket (credentials from
LIBVIRT_AUTH_FILE on the rw one): wall time from start to exit, median and min. The daemon is
started in its own session and stopped by PID, on errors too.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from secretbus.rpc import protocol as P  # noqa: E402
from secretbus.rpc.client import AsyncRpcClient  # noqa: E402
from secretbus.rpc.sasl_client import SaslLogin  # noqa: E402
from secretbus.rpc.transport import UnixTransport  # noqa: E402

UUID = "6a0c2f4e-8d1b-4b7a-9c3e-5f1d2e3a4b5d"
HANDLE = {"uuid": uuidlib.UUID(UUID).bytes, "usageType": 0, "usageID": ""}
USER, PASSWORD = "bench", "bench-pass-not-secret"


def start(d: Path) -> tuple[subprocess.Popen, Path]:
    conf = d / "secretbusd.conf"
    conf.write_text('auth_unix_rw = "sasl"\n')
    conf.chmod(0o600)
    subprocess.run([sys.executable, "-m", "secretbus.cli", "sasl-passwd", USER, "--file",
                    str(d / "sasl-verifiers.json")], input=PASSWORD + "\n", text=True, check=True,
                   capture_output=True, cwd=REPO)
    log = open(d / "secretbusd.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "secretbus.daemon", "--system", "--root", str(d / "root"),
                             "--no-dbus", "--rpc-dir", str(d / "rpc"), "--audit", "off", "--config", str(conf)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while b"over libvirt RPC only" not in (d / "secretbusd.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"secretbusd did not start:\n{(d / 'secretbusd.log').read_text()}")
        time.sleep(0.05)
    return proc, d / "rpc"


async def one(sock: Path, login: SaslLogin | None) -> float:
    t0 = time.perf_counter()
    c = await AsyncRpcClient.connect(UnixTransport(sock))
    await c.open("secret:///system", keepalive=None, sasl=login)
    await c.call(P.Proc.SECRET_LOOKUP_BY_UUID, {"uuid": HANDLE["uuid"]})    # -ro answers it too
    await c.close()
    return time.perf_counter() - t0


async def setup(rw: Path, login: SaslLogin) -> None:
    c = await AsyncRpcClient.connect(UnixTransport(rw))
    await c.open("secret:///system", keepalive=None, sasl=login)
    xml = (f"<secret ephemeral='no' private='no'><uuid>{UUID}</uuid>"
           "<usage type='ceph'><name>bench-scram</name></usage></secret>")
    await c.call(P.Proc.SECRET_DEFINE_XML, {"xml": xml, "flags": 0})
    await c.call(P.Proc.SECRET_SET_VALUE, {"secret": HANDLE, "value": b"bench-value-0123456789", "flags": 0})
    await c.close()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def connections(rpc: Path, n: int, login: SaslLogin) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"unix, no auth (root, polkit mode)": [], "unix, SCRAM-SHA-256": []}
    for _ in range(n):
        out["unix, no auth (root, polkit mode)"].append(await one(rpc / "virtsecretd-sock-ro", None))
        out["unix, SCRAM-SHA-256"].append(await one(rpc / "virtsecretd-sock", login))
    return out


def cli(uri: str, env: dict[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", uri, "-r" if "-ro" in uri else "-q",
                            "secret-list"], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"secretbus -c {uri} failed: {r.stderr}")
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--cli-runs", type=int, default=7)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sb-bench-scram-") as tmp:
        d = Path(tmp)
        proc, rpc = start(d)
        try:
            auth = d / "auth.conf"
            auth.write_text(f"[credentials-b]\nauthname={USER}\npassword={PASSWORD}\n"
                            "[auth-libvirt-default]\ncredentials=b\n")
            auth.chmod(0o600)
            login = SaslLogin(authfile=str(auth))
            asyncio.run(setup(rpc / "virtsecretd-sock", login))
            res = asyncio.run(connections(rpc, a.connections, login))
            print(f"load average {os.getloadavg()[0]:.1f}; {a.connections} connections per socket, alternating")
            print("| connection (connect, auth, open, lookup, close) | median ms | p99 ms |")
            print("|---|---:|---:|")
            for name, xs in res.items():
                print(f"| {name} | {statistics.median(xs) * 1e3:.2f} | {pct(xs, 0.99) * 1e3:.2f} |")
            env = {**os.environ, "LIBVIRT_AUTH_FILE": str(auth)}
            print("| `secretbus -c URI secret-list`, start to exit | median ms | min ms |")
            print("|---|---:|---:|")
            for name, uri in (("-sock-ro, no auth", f"secret:///system?socket={rpc}/virtsecretd-sock-ro"),
                              ("-sock, SCRAM", f"secret:///system?socket={rpc}/virtsecretd-sock")):
                ts = cli(uri, env, a.cli_runs)
                print(f"| {name} | {statistics.median(ts) * 1e3:.0f} | {min(ts) * 1e3:.0f} |")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""GetValue over TLS and TCP/GSSAPI against the unix socket, from the same client, and `secretbus -c` start-up.

    .venv/bin/python bench/bench_rpc_tls.py [--seconds S] [--rounds R] [--cli-runs N] [--no-tcp]

One secretbusd (`--system --no-dbus --audit off`, its RPC sockets, a TLS listener on a free
loopback port with certificates made here with openssl, and a TCP listener with SASL GSSAPI,
whose Kerberos realm is a private KDC started here, tests/harness/kdc.py, with a `kinit`-ed
client; left out with --no-tcp or without krb5-kdc / python gssapi) serves one non-private
secret. TCP's figures include the SASL security layer: every frame wrapped and unwrapped with
the Kerberos session key (AES-256), both ways. The
project's asyncio client (secretbus.rpc.client) calls GetValue one call at a time for S
seconds per round on each transport, the transports alternating per round; rates are medians
over the rounds, p50/p99 pool every latency. Then `secretbus -c URI secret-list` is run N times
per transport: the wall time from start to its exit (its first and only answer), median and
min. The process is started in its own session and stopped by PID, on errors too.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from test_remote_tls import SERVER_EXT, Pki, free_port  # noqa: E402

from secretbus.rpc import protocol as P  # noqa: E402
from secretbus.rpc.client import AsyncRpcClient  # noqa: E402
from secretbus.rpc.tls_client import TlsTransport, tls_target  # noqa: E402
from secretbus.rpc.transport import Transport, UnixTransport  # noqa: E402

try:
    from harness.kdc import Kdc  # noqa: E402

    from secretbus.rpc.tcp_client import TcpTransport, tcp_target  # noqa: E402
except ImportError:         # no python gssapi: TLS and unix only
    Kdc = None  # type: ignore[assignment,misc]

UUID = "6a0c2f4e-8d1b-4b7a-9c3e-5f1d2e3a4b5c"


def start(d: Path, port: int, pki: Pki, tcp: str = "") -> tuple[subprocess.Popen, Path]:
    conf = d / "secretbusd.conf"
    conf.write_text(f'listen_tls = 1\ntls_port = "{port}"\nlisten_addr = "127.0.0.1"\n'
                    f'key_file = "{pki.d}/server.key"\ncert_file = "{pki.d}/server.pem"\n'
                    f'ca_file = "{pki.d}/ca.pem"\nremote_access = [ "x509:*=rw+values", "sasl:bench@*=rw+values" ]\n'
                    + tcp)
    conf.chmod(0o600)
    rpc = d / "rpc"
    log = open(d / "secretbusd.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "secretbus.daemon", "--system", "--root", str(d / "root"),
                             "--no-dbus", "--rpc-dir", str(rpc), "--audit", "off", "--config", str(conf)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while b"over libvirt RPC only" not in (d / "secretbusd.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"secretbusd did not start:\n{(d / 'secretbusd.log').read_text()}")
        time.sleep(0.05)
    return proc, rpc / "virtsecretd-sock"


async def opened(transport: Transport) -> AsyncRpcClient:
    c = await AsyncRpcClient.connect(transport)
    await c.open("secret:///system", keepalive=None)
    return c


async def setup(sock: Path) -> None:
    c = await opened(UnixTransport(sock))
    xml = (f"<secret ephemeral='no' private='no'><uuid>{UUID}</uuid>"
           "<usage type='ceph'><name>bench</name></usage></secret>")
    await c.call(P.Proc.SECRET_DEFINE_XML, {"xml": xml, "flags": 0})
    handle = {"uuid": uuidlib.UUID(UUID).bytes, "usageType": 0, "usageID": ""}
    await c.call(P.Proc.SECRET_SET_VALUE, {"secret": handle, "value": b"bench-value-0123456789", "flags": 0})
    await c.close()


async def run_round(transport: Transport, seconds: float, lat: list[float]) -> float:
    c = await opened(transport)
    args = {"secret": {"uuid": uuidlib.UUID(UUID).bytes, "usageType": 0, "usageID": ""}, "flags": 0}
    n = 0
    t_end = time.perf_counter() + seconds
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        if t0 >= t_end:
            break
        await c.call(P.Proc.SECRET_GET_VALUE, args)
        lat.append(time.perf_counter() - t0)
        n += 1
    rate = n / (time.perf_counter() - t_start)
    await c.close()
    return rate


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def cli_times(uri: str, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", uri, "secret-list"], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        out.append(time.perf_counter() - t0)
        if r.returncode != 0 or UUID not in r.stdout:
            raise SystemExit(f"secretbus -c {uri} failed: {r.stderr}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cli-runs", type=int, default=7)
    ap.add_argument("--no-tcp", action="store_true", help="leave out TCP with SASL GSSAPI (Kerberos)")
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="sb-bench-tls-"))
    proc = None
    kdc = None
    with_tcp = not a.no_tcp and Kdc is not None and os.path.exists("/usr/sbin/krb5kdc")
    try:
        pki = Pki(d)
        pki.ca()
        pki.cert("server", "/C=GB/O=secretbus test/CN=127.0.0.1", SERVER_EXT)
        client = pki.client_dir("bench", "bench-client")
        port = free_port()
        tcp_conf, tcp_port = "", free_port()
        if with_tcp:
            kdc = Kdc().start()
            kdc.add_user("bench")
            # This process (the client) and secretbusd (inheriting it) use the bench's realm.
            os.environ.update(kdc.kinit("bench"))
            os.environ["KRB5RCACHEDIR"] = str(kdc.dir)
            tcp_conf = f'listen_tcp = 1\ntcp_port = "{tcp_port}"\nsasl_keytab = "{kdc.keytab}"\n'
        proc, sock = start(d, port, pki, tcp_conf)
        asyncio.run(setup(sock))
        tls_uri = f"secret+tls://127.0.0.1:{port}/system?pkipath={client}"
        target = tls_target(tls_uri)
        assert target is not None
        transports: dict[str, Transport] = {"unix": UnixTransport(sock), "tls": TlsTransport(target)}
        uris = {"unix": f"secret:///system?socket={sock}", "tls": tls_uri}
        if with_tcp:
            uris["tcp+gssapi"] = f"secret+tcp://localhost:{tcp_port}/system"
            tcp = tcp_target(uris["tcp+gssapi"])
            assert tcp is not None
            transports["tcp+gssapi"] = TcpTransport(tcp)
        rates: dict[str, list[float]] = {k: [] for k in transports}
        lats: dict[str, list[float]] = {k: [] for k in transports}
        for r in range(a.rounds):
            order = list(transports) if r % 2 == 0 else list(reversed(transports))
            for k in order:
                rates[k].append(asyncio.run(run_round(transports[k], a.seconds, lats[k])))
        print(f"GetValue, one call at a time, {a.rounds} rounds x {a.seconds:g} s (cores: {os.cpu_count()})")
        print(f"{'transport':<12}{'calls/s':>10}{'p50 µs':>10}{'p99 µs':>10}{'calls':>9}")
        for k in transports:
            print(f"{k:<12}{statistics.median(rates[k]):>10.0f}{pct(lats[k], 0.5) * 1e6:>10.0f}"
                  f"{pct(lats[k], 0.99) * 1e6:>10.0f}{len(lats[k]):>9}")
        print(f"\nsecretbus -c URI secret-list, start to exit, {a.cli_runs} runs")
        for name, uri in uris.items():
            ts = cli_times(uri, a.cli_runs)
            print(f"{name:<12} median {statistics.median(ts) * 1e3:.0f} ms, min {min(ts) * 1e3:.0f} ms")
        return 0
    finally:
        if kdc is not None:
            kdc.cleanup()
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    sys.exit(main())

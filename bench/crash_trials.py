#!/usr/bin/env python3
"""Crash consistency: kill -9 secretbusd under load, restart it, check every acknowledged write.

    python bench/crash_trials.py [--trials 50] [--clients 4] [--inflight N] [--encrypted]

Each trial starts secretbusd on a private session bus over one store (kept across trials),
drives define / set-value / redefine / undefine from several clients (each owns a few
secrets and has at most one call in flight per secret), kills the daemon with SIGKILL at a
random moment, restarts it and compares what it serves with what was acknowledged:
a secret must be in its last acknowledged state, or in the state of the one call that was
in flight when the daemon died; an undefine in flight may also be cut between its two
unlinks (values go first), leaving the secret defined without a value, never a value file
that a new secret with that UUID would inherit. Also checks that no temp file survives the restart and
that no secret was skipped as damaged. `--inflight N` gives each client N calls in flight at
once (each on its own secrets), so that the daemon's group writer batches them: the kill then
lands in the middle of batches. Prints a table; exit status 1 on any violation.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from dbus_fast import Message, MessageType  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402
from harness import PrivateBus  # noqa: E402

from secretbus.bus.names import secret_path as spath  # noqa: E402
from secretbus.store.fsutil import is_spare_name  # noqa: E402

NAME = "org.libvirt.secret"
CONNECT = "/org/libvirt/secret"
ABSENT = ("absent",)


def defxml(uuid: str, desc: str) -> str:
    return (f"<secret ephemeral='no' private='no'><uuid>{uuid}</uuid><description>{desc}</description>"
            f"<usage type='volume'><volume>/images/{uuid}.img</volume></usage></secret>")


@dataclass
class Tracked:
    """What the daemon acknowledged for one secret, and the one call possibly in flight."""

    acked: tuple = ABSENT                 # ("present", description, value | None)
    in_flight: tuple | None = None        # the state the in-flight call would produce


@dataclass
class Stats:
    trials: int = 0
    acked_ops: int = 0
    lost: int = 0                         # acknowledged state not found after restart
    half: int = 0                         # state matching neither acked nor in-flight result
    cut_undefines: int = 0                # in-flight undefine cut after its value unlink
    orphans: int = 0                      # value files without their XML after a restart
    temp_left: int = 0
    skipped: int = 0
    notes: list[str] = field(default_factory=list)


def start_daemon(bus: PrivateBus, root: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "secretbus.daemon", "--session", "--root", str(root),
                                 "--bus-address", bus.address], stdout=f, stderr=f, env=env,
                                start_new_session=True)


async def call(bus: MessageBus, path: str, iface: str, member: str, sig: str, body: list, timeout=20.0):
    reply = await asyncio.wait_for(bus.call(Message(destination=NAME, path=path, interface=iface, member=member,
                                                    signature=sig, body=body)), timeout)
    if reply.message_type is MessageType.ERROR:
        raise RuntimeError(f"{reply.error_name}: {reply.body[0] if reply.body else ''}")
    return reply.body


async def wait_ready(address: str, proc: subprocess.Popen, timeout: float = 30) -> MessageBus:
    bus = await MessageBus(bus_address=address).connect()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"secretbusd exited with {proc.returncode}")
        try:
            await call(bus, CONNECT, "org.libvirt.Connect", "ListSecrets", "u", [0], timeout=2)
            return bus
        except Exception:  # noqa: BLE001 - not up yet
            await asyncio.sleep(0.05)
    raise RuntimeError("secretbusd did not answer")


async def client(address: str, groups: list[list[str]], state: dict[str, Tracked], stats: Stats,
                 rng: random.Random, seq: list[int]) -> None:
    """One connection with one call in flight per group of secrets."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        await asyncio.gather(*(writer(bus, g, state, stats, rng, seq) for g in groups if g),
                             return_exceptions=True)
    finally:
        bus.disconnect()


async def writer(bus: MessageBus, uuids: list[str], state: dict[str, Tracked], stats: Stats, rng: random.Random,
                 seq: list[int]) -> None:
    try:
        while True:
            uuid = rng.choice(uuids)
            t = state[uuid]
            seq[0] += 1
            n = seq[0]
            if t.acked is ABSENT or (t.acked[0] == "present" and rng.random() < 0.15):
                desc = f"d{n}"
                value = t.acked[2] if t.acked is not ABSENT else None
                t.in_flight = ("present", desc, value)
                await call(bus, CONNECT, "org.libvirt.Connect", "SecretDefineXML", "su", [defxml(uuid, desc), 0])
            elif rng.random() < 0.8:
                value = f"v{n}-{uuid}".encode()
                t.in_flight = ("present", t.acked[1], value)
                await call(bus, spath(uuid), "org.libvirt.Secret", "SetValue", "ayu", [value, 0])
            else:
                t.in_flight = ABSENT
                await call(bus, spath(uuid), "org.libvirt.Secret", "Undefine", "", [])
            t.acked, t.in_flight = t.in_flight, None
            stats.acked_ops += 1
    except Exception:  # noqa: BLE001 - the daemon was killed under us
        return


async def observe(bus: MessageBus, uuid: str) -> tuple:
    try:
        (xml,) = await call(bus, spath(uuid), "org.libvirt.Secret", "GetXMLDesc", "u", [0])
    except RuntimeError as e:
        if "NoSecret" in str(e) or "UnknownObject" in str(e):
            return ABSENT
        raise
    desc = xml.split("<description>")[1].split("</description>")[0]
    try:
        (value,) = await call(bus, spath(uuid), "org.libvirt.Secret", "GetValue", "u", [0])
        value = bytes(value)
    except RuntimeError as e:
        if "does not have a value" not in str(e):
            raise
        value = None
    return ("present", desc, value)


def orphan_values(d: Path) -> list[str]:
    """Value files whose secret has no XML: what a new secret with that UUID could inherit."""
    names = set(os.listdir(d))
    return sorted(n for n in names if n.rsplit(".", 1)[-1] in ("base64", "aes256gcm", "aes256cbc")
                  and f"{n.rsplit('.', 1)[0]}.xml" not in names)


async def trial(n: int, bus: PrivateBus, root: Path, log: Path, state: dict[str, Tracked], stats: Stats,
                clients: int, rng: random.Random, inflight: int = 1) -> None:
    proc = start_daemon(bus, root, log)
    check = await wait_ready(bus.address, proc)
    seq = [n * 1_000_000]
    names = list(state)
    writers = clients * inflight
    per = max(1, len(names) // writers)
    groups = [names[i * per:(i + 1) * per] for i in range(writers)]
    tasks = [asyncio.create_task(client(bus.address, groups[i * inflight:(i + 1) * inflight], state, stats, rng,
                                        seq)) for i in range(clients)]
    await asyncio.sleep(rng.uniform(0.1, 0.8))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    check.disconnect()
    # Restart and compare.
    temps_before = [p.name for p in (root / "etc" / "secrets").glob("*.new")]
    spares_before = [n for n in os.listdir(root / "etc" / "secrets") if is_spare_name(n)]
    proc = start_daemon(bus, root, log)
    check = await wait_ready(bus.address, proc)
    try:
        for uuid, t in state.items():
            seen = await observe(check, uuid)
            if seen == t.acked:
                pass
            elif t.in_flight is not None and seen == t.in_flight:
                t.acked = seen        # the in-flight call had completed before the kill
            elif t.in_flight is ABSENT and t.acked is not ABSENT and seen == (*t.acked[:2], None):
                stats.cut_undefines += 1
                t.acked = seen
            else:
                stats.lost += 1
                stats.notes.append(f"trial {n}: {uuid}: acked {t.acked!r:.60} in flight {t.in_flight!r:.60} "
                                   f"seen {seen!r:.60}")
                t.acked = seen
            t.in_flight = None
        # temp files and spare files (store/commit.py): start-up removes both
        stats.temp_left += len(list((root / "etc" / "secrets").glob("*.new")))
        stats.temp_left += len([n for n in os.listdir(root / "etc" / "secrets") if is_spare_name(n)])
        stats.orphans += len(orphan_values(root / "etc" / "secrets"))
        stats.trials += 1
        if temps_before or spares_before:
            stats.notes.append(f"trial {n}: {len(temps_before)} temp file(s) and {len(spares_before)} spare "
                               "file(s) found after the kill, removed at start")
    finally:
        check.disconnect()
        proc.terminate()
        proc.wait(20)


async def run(a: argparse.Namespace) -> Stats:
    base = Path(tempfile.mkdtemp(prefix="sb-crash-"))
    os.chmod(base, 0o755)
    root = base / "root"
    log = base / "secretbusd.log"
    stats = Stats()
    bus = PrivateBus("session").start()
    rng = random.Random(a.seed)
    try:
        if a.encrypted:
            (root / "etc").mkdir(parents=True, mode=0o700)
            key = base / "key"
            key.write_bytes(os.urandom(32))
            key.chmod(0o600)
            (root / "etc" / "secret.conf").write_text(f'secrets_encryption_key = "{key}"\n')
        # At least two secrets per writer, so that each writer moves between secrets.
        inflight = getattr(a, "inflight", 1)     # callers (tests/test_reliability.py) may leave it out
        count = max(a.secrets, 2 * a.clients * inflight)
        state = {f"{i:08x}-0000-4000-8000-{rng.getrandbits(48):012x}": Tracked() for i in range(count)}
        for n in range(a.trials):
            await trial(n, bus, root, log, state, stats, a.clients, rng, inflight)
        stats.skipped = log.read_text(errors="replace").count("skipping secret")
    finally:
        bus.stop()
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    return stats


def figures(size: str = "small") -> list[tuple[str, object, str]]:
    """Rows for bench/reliability.py: (figure, value, goal). small = CI-sized, full = the issue's."""
    trials = {"small": 8, "full": 50}.get(size, 50)
    a = argparse.Namespace(trials=trials, clients=4, secrets=24, encrypted=True, seed=int(time.time()), keep=False,
                           inflight=1)
    s = asyncio.run(run(a))
    return [("crash: trials (kill -9 + restart)", s.trials, f"= {trials}"),
            ("crash: acknowledged operations", s.acked_ops, "-"),
            ("crash: lost acknowledged writes", s.lost, "0"),
            ("crash: temp files left after restart", s.temp_left, "0"),
            ("crash: orphan value files after restart", s.orphans, "0"),
            ("crash: undefines cut between value and XML", s.cut_undefines, "-"),
            ("crash: secrets skipped as damaged", s.skipped, "0")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--inflight", type=int, default=1, help="calls in flight per client (group commit)")
    ap.add_argument("--secrets", type=int, default=24)
    ap.add_argument("--encrypted", action="store_true")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    a = ap.parse_args(argv)
    t = time.monotonic()
    s = asyncio.run(run(a))
    print(f"crash trials (seed {a.seed}, {a.clients} clients x {a.inflight} in flight, "
          f"{max(a.secrets, 2 * a.clients * a.inflight)} secrets, "
          f"{'encrypted' if a.encrypted else 'base64'} store, {time.monotonic() - t:.1f} s)")
    print("| figure | value |\n|---|---|")
    for k, v in (("trials (kill -9 + restart)", s.trials), ("acknowledged operations", s.acked_ops),
                 ("lost acknowledged writes", s.lost), ("temp files left after restart", s.temp_left),
                 ("orphan value files after restart", s.orphans),
                 ("undefines cut between value and XML", s.cut_undefines),
                 ("secrets skipped as damaged", s.skipped)):
        print(f"| {k} | {v} |")
    for note in s.notes[:20]:
        print("  " + note)
    ok = s.lost == 0 and s.temp_left == 0 and s.orphans == 0 and s.skipped == 0
    return 0 if ok and s.trials == a.trials else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""secretbusd over D-Bus: call rates and latencies, start-up, RSS and event-loop stalls.

    .venv/bin/python bench/bench_dbus.py [--quick] [--secrets N] [--calls N] [--rounds R]
                                         [--seconds S] [--starts K] [--store DIR] [--dir DIR]

Starts its own dbus-daemon (session-type policy) and secretbusd on it, with a store of N
(default 10,000) AES-256-GCM encrypted persistent secrets and its audit records (one per
GetValue) sent to a stand-in for journald's socket, as on a systemd host (journal_standin.py;
`--journal host`: the host's socket, absent without journald), and prints one markdown table:

  * bus floor: Peer.Ping and GetId answered by the bus daemon itself;
  * Peer.Ping answered by secretbusd (dbus-fast's own handler: the library floor);
  * every secretbus method, sequential and with 16 calls in flight on one connection,
    through a dbus-fast client that sends raw `Message`s;
  * GetValue through the project's synchronous client (secretbus.bus.client);
  * the goals of issue 4: GetValue 16-in-flight >= 30 % of the bus-floor Ping rate,
    ListSecrets (N secrets) p50/p99 <= 10 ms, start-up to the first answered ListSecrets
    <= 0.5 s, RSS <= 57 MB;
  * GetValue p99 alone and while another client runs SetValue (fsync) in a loop.

Each call figure is measured in R rounds (rows interleaved, so a burst of other load on the
machine hits every row alike) and the medians are printed. "svc µs/call" and "bus µs/call"
are CPU microseconds per call spent by secretbusd (all threads) and by dbus-daemon, from
/proc/PID/task/*/schedstat. VmHWM is reset after each measurement (/proc/PID/clear_refs)
so that the table can name the one that drove the peak.

The store is built once with the embedded API (define + set value, fsync each: about 2 ms a
secret). `--store DIR` keeps it in DIR and reuses it on the next run. Every process is
started in its own session, tracked by PID and stopped by PID, on errors and Ctrl-C too.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))      # journal_standin, when loaded as a module (tests)

from dbus_fast import Message, MessageType  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402
from journal_standin import JournalStandIn  # noqa: E402

from secretbus.bus.names import BUS_NAME, CONNECT_IFACE, CONNECT_PATH, PROPS_IFACE, SECRET_IFACE, secret_path  # noqa: E402

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
PEER_IFACE = "org.freedesktop.DBus.Peer"
VOLUME = 1                      # UsageType.VOLUME
INFLIGHT = 16
CALL_TIMEOUT = 60.0             # no single measurement may hang longer than its budget + this
SCRATCH_PREFIX = "ffffffff"     # uuids of secrets the Undefine+Define row creates and removes
GOAL_PING_SHARE = 30.0
GOAL_OWN_PING_SHARE = 80.0      # issue 15: GetValue against the service's own Peer.Ping
GOAL_LIST_MS = 10.0
GOAL_START_S = 0.5
GOAL_RSS_MB = 57.0


# -- store --------------------------------------------------------------------------------
def uuid_of(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i:012x}"


def usage_of(i: int) -> str:
    return f"/var/lib/libvirt/images/{i}.img"


def secret_xml(i: int, uuid: str | None = None, usage: str | None = None) -> str:
    return (f"<secret ephemeral='no' private='no'><uuid>{uuid or uuid_of(i)}</uuid>"
            f"<description>bench {i}</description>"
            f"<usage type='volume'><volume>{usage or usage_of(i)}</volume></usage></secret>")


def build_store(root: Path, n: int) -> float:
    """root/etc/secret.conf with a raw 0600 key, n encrypted secrets; returns seconds taken
    (0 when an earlier complete store of n secrets is reused)."""
    marker = root / f"populated-{n}"
    secrets_dir = root / "etc" / "secrets"
    if marker.exists():
        for p in secrets_dir.glob(SCRATCH_PREFIX + "-*"):   # left by an interrupted run
            p.unlink()
        return 0.0
    if root.exists():
        # Only ever delete a store this script built (a marker for another N) or nothing.
        if not any(root.glob("populated-*")) and any(root.iterdir()):
            raise SystemExit(f"{root} exists and was not built by this script; choose another --store")
        shutil.rmtree(root)
    root.mkdir(parents=True, mode=0o700)
    (root / "etc").mkdir(mode=0o700)
    key = root / "secret.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    (root / "etc" / "secret.conf").write_text(f'secrets_encryption_key = "{key}"\n')
    import secretbus
    t = time.perf_counter()
    with secretbus.open(f"secret:///embed?root={root}") as c:
        for i in range(n):
            c.define_xml(secret_xml(i)).set_value(os.urandom(32))
    took = time.perf_counter() - t
    marker.write_text(f"{n} secrets, built in {took:.1f} s\n")
    return took


# -- processes ----------------------------------------------------------------------------
class Procs:
    """Everything this run started; stop_all() stops each by PID and removes temp dirs."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.bus = None
        self.dirs: list[Path] = []

    def add(self, p: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        from harness.procs import stop_process
        stop_process(p)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(self.procs[:]):
            try:
                self.stop(p)
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                print(f"warning: could not stop pid {p.pid}: {e}", file=sys.stderr)
        if self.bus is not None:
            self.bus.stop()
            self.bus = None
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)      # log to our file, not the journal
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if JOURNAL is not None:
        env.update(JOURNAL.env())
    return env


def spawn_daemon(procs: Procs, root: Path, address: str, log: Path) -> subprocess.Popen:
    from harness.procs import spawn
    argv = [sys.executable, "-m", "secretbus.daemon", "--session", "--root", str(root),
            "--bus-address", address, *DAEMON_ARGS]
    return procs.add(spawn(argv, what="secretbusd", log=log, env=daemon_env()))


# Extra secretbusd arguments (--daemon-arg), e.g. "--audit=off" to measure without the read audit.
DAEMON_ARGS: list[str] = []
# Where the daemons' audit records go (--journal): the stand-in, or None for the host's socket.
JOURNAL: JournalStandIn | None = None


def host_journal() -> str:
    return "present" if os.path.exists("/run/systemd/journal/socket") else "absent"


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of `pid`, in ns (/proc/PID/task/*/schedstat)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass
    except FileNotFoundError:
        pass
    return total


class HwmTracker:
    """Which measurement drove VmHWM up: read it after each one, then reset it
    (`echo 5 > /proc/PID/clear_refs`; if that is not permitted, no attribution)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.start = kb(proc_status(pid)["VmHWM"])
        self.max, self.where = 0.0, ""
        self.resettable = self._reset()

    def _reset(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def check(self, label: str) -> None:
        hwm = kb(proc_status(self.pid)["VmHWM"])
        if hwm > self.max:
            self.max, self.where = hwm, label
        if self.resettable:
            self._reset()


def kb(v: str) -> float:
    """'1234 kB' -> MB"""
    return int(v.split()[0]) / 1024


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


# -- client -------------------------------------------------------------------------------
class CallFailed(Exception):
    pass


class Client:
    """A dbus-fast connection sending raw Messages."""

    def __init__(self, address: str):
        self.address = address
        self.bus: MessageBus | None = None

    async def connect(self) -> Client:
        self.bus = await asyncio.wait_for(MessageBus(bus_address=self.address).connect(), 30)
        return self

    async def send(self, msg: Message) -> list:
        reply = await self.bus.call(msg)
        if reply.message_type is MessageType.ERROR:
            raise CallFailed(f"{msg.member}: {reply.error_name}: {reply.body[0] if reply.body else ''}")
        return reply.body

    def close(self) -> None:
        if self.bus is not None and self.bus.connected:
            self.bus.disconnect()


def m_dbus(member: str, iface: str = DBUS_NAME, sig: str = "", body: list | None = None) -> Message:
    return Message(destination=DBUS_NAME, path=DBUS_PATH, interface=iface, member=member,
                   signature=sig, body=body or [])


def m_connect(member: str, sig: str, body: list) -> Message:
    return Message(destination=BUS_NAME, path=CONNECT_PATH, interface=CONNECT_IFACE, member=member,
                   signature=sig, body=body)


def m_secret(path: str, member: str, sig: str, body: list, iface: str = SECRET_IFACE) -> Message:
    return Message(destination=BUS_NAME, path=path, interface=iface, member=member, signature=sig, body=body)


Op = Callable[[int], Awaitable[object]]


@dataclass
class Sample:
    rate: float
    lat: list[float]
    svc_us: float | None = None
    bus_us: float | None = None


def pct(sorted_lat: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_lat:
        return float("nan")
    k = max(0, min(len(sorted_lat) - 1, math.ceil(p / 100 * len(sorted_lat)) - 1))
    return sorted_lat[k]


async def measure(op: Op, *, calls: int, inflight: int, seconds: float, warmup: int = 5,
                  pids: tuple[int, int] | None = None, start: int = 0) -> Sample:
    """Up to `calls` calls (fewer if `seconds` run out) with `inflight` workers; per-call latency."""
    for i in range(warmup):
        async with asyncio.timeout(CALL_TIMEOUT):
            await op(start + i)
    lat: list[float] = []
    counter = itertools.count(start + warmup)
    limit = start + warmup + calls
    perf = time.perf_counter

    async def worker() -> None:
        end = perf() + seconds
        while True:
            i = next(counter)
            if i >= limit:
                return
            t = perf()
            await op(i)
            t2 = perf()
            lat.append(t2 - t)
            if t2 > end:
                return

    c0 = (cpu_ns(pids[0]), cpu_ns(pids[1])) if pids else None
    t0 = perf()
    async with asyncio.timeout(seconds + CALL_TIMEOUT):
        await asyncio.gather(*(worker() for _ in range(inflight)))
    wall = perf() - t0
    s = Sample(len(lat) / wall, sorted(lat))
    if c0 and lat:
        s.svc_us = (cpu_ns(pids[0]) - c0[0]) / 1000 / len(lat)
        s.bus_us = (cpu_ns(pids[1]) - c0[1]) / 1000 / len(lat)
    return s


# -- the run ------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    op: Op
    modes: tuple[int, ...] = (1, INFLIGHT)
    samples: dict[int, list[Sample]] = field(default_factory=dict)
    max_calls: int | None = None     # e.g. ListSecrets with 10k secrets: fewer calls
    # Untimed, around each measurement: prepare(first, count) before (the Undefine row defines
    # the secrets it will undefine), tidy(first, count) after (undefines those left over).
    prepare: Callable[[int, int], Awaitable[None]] | None = None
    tidy: Callable[[int, int], Awaitable[None]] | None = None


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms" if x < 0.1 else f"{x * 1000:.0f} ms"


def summarise(samples: list[Sample]) -> tuple[int, float, float, float, float | None, float | None]:
    n = sum(len(s.lat) for s in samples)
    med = statistics.median
    svc = [s.svc_us for s in samples if s.svc_us is not None]
    bus = [s.bus_us for s in samples if s.bus_us is not None]
    return (n, med(s.rate for s in samples), med(pct(s.lat, 50) for s in samples),
            med(pct(s.lat, 99) for s in samples), med(svc) if svc else None, med(bus) if bus else None)


async def start_once(procs: Procs, client: Client, root: Path, address: str, log: Path,
                     n_expected: int) -> tuple[subprocess.Popen, float, float | None, float]:
    """Spawn secretbusd; seconds from spawn to the first successful ListSecrets reply, the
    daemon's own "ready in" figure (load + bus connect), and the CPU seconds it used so far.

    The client learns that the name is owned from NameOwnerChanged (no polling that would
    steal CPU from the starting daemon), then calls ListSecrets at once."""
    owned = asyncio.Event()

    def on_msg(msg: Message):
        if (msg.message_type is MessageType.SIGNAL and msg.member == "NameOwnerChanged"
                and msg.body and msg.body[0] == BUS_NAME and msg.body[2]):
            owned.set()
        return None

    client.bus.add_message_handler(on_msg)
    try:
        t0 = time.perf_counter()
        proc = spawn_daemon(procs, root, address, log)
        deadline = t0 + 60
        while True:
            try:
                await asyncio.wait_for(owned.wait(), 0.05)
            except TimeoutError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"secretbusd exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            if time.perf_counter() > deadline:
                raise RuntimeError("secretbusd did not take its name within 60 s")
            if not owned.is_set():
                continue
            try:
                (paths,) = await client.send(m_connect("ListSecrets", "u", [0]))
                break
            except CallFailed:
                owned.clear()        # owned and lost again? keep waiting
        took = time.perf_counter() - t0
        cpu = cpu_ns(proc.pid) / 1e9
    finally:
        client.bus.remove_message_handler(on_msg)
    if len(paths) < n_expected:
        raise RuntimeError(f"secretbusd lists {len(paths)} secrets, expected {n_expected}")
    m = re.search(r"ready in ([0-9.]+) s", log.read_text(errors="replace"))
    return proc, took, float(m.group(1)) if m else None, cpu


def writer_child(address: str, path: str, seconds: float, max_calls: int) -> None:
    """Hidden mode: SetValue in a loop on one secret for `seconds`; prints calls made."""
    async def run() -> None:
        c = await Client(address).connect()
        value = os.urandom(32)
        print("ready", flush=True)
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end and n < max_calls:
            await asyncio.wait_for(c.send(m_secret(path, "SetValue", "ayu", [value, 0])), CALL_TIMEOUT)
            n += 1
        print(n, flush=True)
        c.close()
    asyncio.run(run())


async def stall_test(procs: Procs, client: Client, address: str, read_path: str, write_path: str,
                     seconds: float, rounds: int, calls: int) -> dict:
    """GetValue (sequential) alone, then while a second client (own process) loops SetValue."""
    async def get(i: int):
        return await client.send(m_secret(read_path, "GetValue", "u", [0]))
    alone, busy, wrate = [], [], []
    for _ in range(rounds):
        alone.append(await measure(get, calls=calls, inflight=1, seconds=seconds))
        child = procs.add(subprocess.Popen(
            [sys.executable, __file__, "--writer-child", address, write_path, str(seconds + 1), str(calls)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, start_new_session=True))
        try:
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)
            if line.strip() != "ready":
                raise RuntimeError(f"writer child said {line!r}")
            await asyncio.sleep(0.1)
            t = time.perf_counter()
            busy.append(await measure(get, calls=calls, inflight=1, seconds=seconds))
            out = await asyncio.wait_for(asyncio.to_thread(child.communicate), seconds + CALL_TIMEOUT)
            wrate.append(int(out[0].split()[-1]) / (time.perf_counter() - t + 0.1))
        finally:
            procs.stop(child)
    return {"alone": alone, "busy": busy, "write_rate": statistics.median(wrate)}


def sync_client_bench(address: str, uuid: str, calls: int, seconds: float, rounds: int) -> list[Sample]:
    from secretbus.bus.client import DBusConnection
    from secretbus.store.paths import InstanceKind
    conn = DBusConnection.open(InstanceKind.SESSION, "secret:///session", bus_address=address)
    out = []
    try:
        s = conn.lookup_by_uuid(uuid)
        for _ in range(5):
            s.get_value()
        for _ in range(rounds):
            lat = []
            perf = time.perf_counter
            t0 = end = perf()
            end += seconds
            for _ in range(calls):
                t = perf()
                s.get_value()
                t2 = perf()
                lat.append(t2 - t)
                if t2 > end:
                    break
            out.append(Sample(len(lat) / (perf() - t0), sorted(lat)))
    finally:
        conn.close()
    return out


_main_task: asyncio.Task | None = None


async def run_bench(a, procs: Procs, root: Path, built_s: float) -> None:
    global _main_task
    _main_task = asyncio.current_task()
    from harness.bus import PrivateBus
    n = a.secrets
    load0 = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    procs.bus = PrivateBus("session").start()
    address = procs.bus.address
    bus_pid = procs.bus.pid
    logdir = Path(tempfile.mkdtemp(prefix="sb-bench-logs-"))
    procs.dirs.append(logdir)
    client = await Client(address).connect()
    await client.send(m_dbus("AddMatch", sig="s", body=[
        f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_NAME}',member='NameOwnerChanged',arg0='{BUS_NAME}'"]))

    # -- start-up, K times; the last daemon stays for the call benchmarks --------------
    starts, readies, cpus = [], [], []
    daemon = None
    for k in range(a.starts):
        if daemon is not None:
            procs.stop(daemon)
        daemon, took, ready, cpu = await start_once(procs, client, root, address,
                                                    logdir / f"secretbusd-{k}.log", n)
        starts.append(took)
        cpus.append(cpu)
        if ready is not None:
            readies.append(ready)
    pid = daemon.pid
    pids = (pid, bus_pid)
    status_start = proc_status(pid)

    # -- call rows ------------------------------------------------------------------------
    m = min(n, 1000)                           # secrets the read/write rows cycle through
    paths = [secret_path(uuid_of(i)) for i in range(m)]
    uuids = [uuid_of(i) for i in range(m)]
    usages = [usage_of(i) for i in range(m)]
    xmls = [secret_xml(i) for i in range(m)]
    value = os.urandom(32)
    send = client.send

    def fixed(msg_factory: Callable[[int], Message]) -> Op:
        return lambda i: send(msg_factory(i))

    def scratch_uuid(i: int) -> str:
        return f"{SCRATCH_PREFIX}-0000-4000-8000-{i:012x}"

    async def in_parallel(fn: Callable[[int], Awaitable[object]], first: int, count: int) -> None:
        sem = asyncio.Semaphore(INFLIGHT)

        async def one(i: int) -> None:
            async with sem:
                await fn(i)
        await asyncio.gather(*(one(i) for i in range(first, first + count)))

    async def define_scratch(i: int) -> None:
        await send(m_connect("SecretDefineXML", "su", [secret_xml(i, scratch_uuid(i), f"/bench/scratch/{i}"), 0]))

    async def undefine_scratch(i: int) -> None:
        await send(m_secret(secret_path(scratch_uuid(i)), "Undefine", "", []))

    async def undefine_left(first: int, count: int) -> None:
        async def one(i: int) -> None:
            try:
                await undefine_scratch(i)
            except Exception:  # noqa: BLE001 - undefined by the measurement already
                pass
        await in_parallel(one, first, count)

    async def undefine_define(i: int) -> None:
        u = f"{SCRATCH_PREFIX}-0000-4000-8000-{i:012x}"
        (path,) = await send(m_connect("SecretDefineXML", "su", [secret_xml(i, u, f"/bench/scratch/{i}"), 0]))
        await send(m_secret(path, "Undefine", "", []))

    rows = [
        Row("bus floor: Peer.Ping → dbus-daemon", fixed(lambda i: m_dbus("Ping", PEER_IFACE))),
        Row("bus floor: GetId → dbus-daemon", fixed(lambda i: m_dbus("GetId"))),
        Row("Peer.Ping → secretbusd (dbus-fast handler)", fixed(lambda i: Message(
            destination=BUS_NAME, path=CONNECT_PATH, interface=PEER_IFACE, member="Ping"))),
        Row(f"ListSecrets ({n:,} secrets)", fixed(lambda i: m_connect("ListSecrets", "u", [0])),
            max_calls=max(20, a.calls // 10) if n > 1000 else None),
        Row("SecretLookupByUUID", fixed(lambda i: m_connect("SecretLookupByUUID", "s", [uuids[i % m]]))),
        Row("SecretLookupByUsage", fixed(lambda i: m_connect("SecretLookupByUsage", "is", [VOLUME, usages[i % m]]))),
        Row("GetXMLDesc", fixed(lambda i: m_secret(paths[i % m], "GetXMLDesc", "u", [0]))),
        Row("GetValue", fixed(lambda i: m_secret(paths[i % m], "GetValue", "u", [0]))),
        Row("Properties.GetAll", fixed(lambda i: m_secret(paths[i % m], "GetAll", "s", [SECRET_IFACE], PROPS_IFACE))),
        Row("SetValue (fsync)", fixed(lambda i: m_secret(paths[i % m], "SetValue", "ayu", [value, 0]))),
        Row("SecretDefineXML (redefine, fsync)", fixed(lambda i: m_connect("SecretDefineXML", "su", [xmls[i % m], 0]))),
        Row("SecretDefineXML + Undefine (new secret; per pair)", undefine_define),
        Row("Undefine (of a secret defined before, untimed)", undefine_scratch,
            prepare=lambda first, count: in_parallel(define_scratch, first, count), tidy=undefine_left),
    ]
    get_value = next(row for row in rows if row.name == "GetValue")
    own_ping = next(row for row in rows if row.name.startswith("Peer.Ping → secretbusd"))
    if a.only:
        # the bus floor, GetValue and the service's Ping stay: the ratio rows are computed from them
        keep = [w.strip().lower() for w in a.only.split(",") if w.strip()]
        rows = [row for row in rows if row in (rows[0], get_value, own_ping)
                or any(w in row.name.lower() for w in keep)]
    t_calls = time.perf_counter()
    offset = 0
    peak = HwmTracker(pid)
    # Measured in this order: GetValue between the bus floor and the service's own Ping, so
    # that the ratios (taken per round, then the median) compare figures taken seconds apart.
    first = [rows[0], get_value, own_ping]
    order = first + [row for row in rows if row not in first]
    for r in range(a.rounds):
        for row in order:
            for mode in row.modes:
                calls = min(a.calls, row.max_calls or a.calls)
                if row.prepare is not None:
                    await row.prepare(offset, calls + 5)      # 5: measure's warm-up calls
                s = await measure(row.op, calls=calls, inflight=mode, seconds=a.seconds, pids=pids, start=offset)
                if row.tidy is not None:
                    await row.tidy(offset, calls + 5)
                offset += calls + 10
                row.samples.setdefault(mode, []).append(s)
                peak.check(f"{row.name}, {'sequential' if mode == 1 else f'{mode} in flight'}")
        print(f"  round {r + 1}/{a.rounds} done ({time.perf_counter() - t_calls:.0f} s)", file=sys.stderr)

    # -- the project's synchronous client -----------------------------------------------
    c0 = cpu_ns(pid), cpu_ns(bus_pid)
    sync = await asyncio.to_thread(sync_client_bench, address, uuids[0], a.calls, a.seconds, a.rounds)
    ncalls = sum(len(s.lat) for s in sync)
    sync_svc = (cpu_ns(pid) - c0[0]) / 1000 / ncalls
    sync_bus = (cpu_ns(bus_pid) - c0[1]) / 1000 / ncalls

    # -- event-loop stall ------------------------------------------------------------------
    stall = await stall_test(procs, client, address, paths[0], paths[min(1, m - 1)], a.stall_seconds,
                             a.rounds, a.calls * 10)

    peak.check("the sync-client and event-loop stall tests")
    st = proc_status(pid)
    client.close()
    procs.stop(daemon)

    # -- table ---------------------------------------------------------------------------
    kb_mb = kb
    load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    print()
    print(f"D-Bus bench: secretbusd with {n:,} encrypted (aes256gcm) persistent secrets on a private "
          f"session-type dbus-daemon; client dbus-fast raw Messages on one connection; "
          f"{os.cpu_count()} cores ({load0} at start, {load} at end); {a.rounds} round(s), medians; "
          f"store on {fs_type(root)}; audit records to "
          f"{JOURNAL.describe() if JOURNAL is not None else 'the host journal socket, ' + host_journal()}; "
          f"{time.strftime('%Y-%m-%d')}")
    print()
    print("| figure | mode | n | calls/s or value | p50 | p99 | svc µs/call | bus µs/call | goal |")
    print("|---|---|---|---|---|---|---|---|---|")

    def opt(x: float | None) -> str:
        return f"{x:.0f}" if x is not None else ""
    rates = {}
    for row in rows:
        for mode in row.modes:
            cnt, rate, p50, p99, svc, bus = summarise(row.samples[mode])
            rates[(row.name, mode)] = (rate, p50, p99)
            goal = ""
            if row.name.startswith("ListSecrets") and mode == 1:
                goal = f"p50/p99 ≤ {GOAL_LIST_MS:g} ms: {'met' if p99 <= GOAL_LIST_MS / 1000 else 'MISSED'}"
            label = "sequential" if mode == 1 else f"{mode} in flight"
            print(f"| {row.name} | {label} | {cnt} | {rate:,.0f} | {ms(p50)} | {ms(p99)} "
                  f"| {opt(svc)} | {opt(bus)} | {goal} |")
    cnt, rate, p50, p99, _, _ = summarise(sync)
    print(f"| GetValue via secretbus.bus.client (sync) | sequential | {cnt} | {rate:,.0f} | {ms(p50)} | {ms(p99)} "
          f"| {sync_svc:.0f} | {sync_bus:.0f} | |")
    def ratios(mode: int) -> list[float]:
        return [100 * g.rate / p.rate for g, p in zip(get_row.samples[mode], rows[0].samples[mode], strict=False)]
    get_row = get_value
    for mode in (INFLIGHT, 1):
        rs = ratios(mode)
        share = statistics.median(rs)
        label = "sequential" if mode == 1 else f"{mode}-in-flight"
        goal = (f"≥ {GOAL_PING_SHARE:g} %: {'met' if share >= GOAL_PING_SHARE else 'MISSED'}"
                if mode == INFLIGHT else "")
        print(f"| GetValue {label} / bus-floor Ping {label} | ratio per round, median | {len(rs)} | "
              f"{share:.0f} % (rounds: {', '.join(f'{x:.0f}' for x in rs)}) | | | | | {goal} |")
    # Issue 15: against the service's own Ping (dbus-fast answers it: the library's ceiling).
    own = [100 * g.rate / p.rate for g, p in zip(get_row.samples[INFLIGHT], own_ping.samples[INFLIGHT], strict=False)]
    share = statistics.median(own)
    print(f"| GetValue {INFLIGHT}-in-flight / Peer.Ping → secretbusd {INFLIGHT}-in-flight | ratio per round, median "
          f"| {len(own)} | {share:.0f} % (rounds: {', '.join(f'{x:.0f}' for x in own)}) | | | | | "
          f"≥ {GOAL_OWN_PING_SHARE:g} %: {'met' if share >= GOAL_OWN_PING_SHARE else 'MISSED'} |")
    med_start = statistics.median(starts)
    ready = f"; daemon's own 'ready in' {statistics.median(readies) * 1000:.0f} ms" if readies else ""
    print(f"| start-up: spawn → first ListSecrets reply ({n:,} secrets) | median of {len(starts)} | {len(starts)} | "
          f"{med_start * 1000:.0f} ms (min {min(starts) * 1000:.0f}, max {max(starts) * 1000:.0f}; daemon CPU "
          f"{statistics.median(cpus) * 1000:.0f} ms{ready}) | | | | | "
          f"≤ {GOAL_START_S * 1000:.0f} ms: {'met' if med_start <= GOAL_START_S else 'MISSED'} |")
    rss = kb_mb(st["VmRSS"])
    print(f"| RSS of secretbusd ({n:,} secrets) after the benchmarks | VmRSS | | {rss:.1f} MB (anon "
          f"{kb_mb(st['RssAnon']):.1f}, file {kb_mb(st['RssFile']):.1f}); "
          f"at start {kb_mb(status_start['VmRSS']):.1f} MB "
          f"| | | | | ≤ {GOAL_RSS_MB:g} MB: {'met' if rss <= GOAL_RSS_MB else 'MISSED'} |")
    where = f"; highest during {peak.where}: {peak.max:.1f} MB" if peak.resettable else \
        f"; VmHWM {kb_mb(st['VmHWM']):.1f} MB"
    worst = max(peak.start, peak.max if peak.resettable else kb_mb(st["VmHWM"]))
    print(f"| peak RSS of secretbusd | VmHWM | | start-up {peak.start:.1f} MB{where} | | | | | "
          f"≤ {GOAL_RSS_MB:g} MB: {'met' if worst <= GOAL_RSS_MB else 'MISSED'} |")
    for key, label in (("alone", "alone"), ("busy", f"while a 2nd client loops SetValue "
                                                    f"({stall['write_rate']:.0f} SetValue/s)")):
        cnt, rate, p50, p99, _, _ = summarise(stall[key])
        mx = statistics.median(s.lat[-1] for s in stall[key])
        print(f"| event-loop stall: GetValue | {label} | {cnt} | {rate:,.0f} | {ms(p50)} | {ms(p99)} | | | "
              f"max {ms(mx)} |")
    print()
    if built_s:
        print(f"store built in {built_s:.1f} s ({n:,} × define + set value, fsync each)")


def fs_type(path: Path) -> str:
    try:
        out = subprocess.run(["df", "--output=fstype", str(path)], capture_output=True, text=True, timeout=10)
        return out.stdout.split()[-1]
    except Exception:  # noqa: BLE001
        return "?"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--writer-child":
        _, _, address, path, seconds, max_calls = sys.argv
        writer_child(address, path, float(seconds), int(max_calls))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few secrets and calls (< 30 s)")
    ap.add_argument("--secrets", type=int, help="secrets in the store (default 10000; --quick: 300)")
    ap.add_argument("--calls", type=int, help="calls per measurement at most (default 3000; --quick: 200)")
    ap.add_argument("--seconds", type=float, help="time cap per measurement (default 2; --quick: 0.3)")
    ap.add_argument("--rounds", type=int, help="rounds; medians are printed (default 3; --quick: 1)")
    ap.add_argument("--starts", type=int, help="daemon starts timed (default 5; --quick: 2)")
    ap.add_argument("--stall-seconds", type=float, help="per stall measurement (default 3; --quick: 0.5)")
    ap.add_argument("--store", metavar="DIR", help="build the store in DIR and keep it for the next run")
    ap.add_argument("--dir", metavar="DIR", help="parent of the temporary store (default: $TMPDIR)")
    ap.add_argument("--only", metavar="WORDS", help="comma-separated words: only the rows whose name has "
                    "one (the bus floor and GetValue always run), e.g. --only setvalue,definexml,undefine")
    ap.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                    help="pass ARG to secretbusd (repeatable), e.g. --daemon-arg=--audit=off")
    ap.add_argument("--journal", choices=("standin", "host"), default="standin",
                    help="where secretbusd's audit records go: a stand-in for journald's socket that drops "
                         "them (default: a systemd host's cost without journald's own; journal_standin.py), "
                         "or the host's /run/systemd/journal/socket (absent on a host without journald: "
                         "each record then fails at once)")
    a = ap.parse_args()
    DAEMON_ARGS[:] = a.daemon_arg
    q = a.quick
    a.secrets = a.secrets if a.secrets is not None else (300 if q else 10000)
    a.calls = a.calls or (200 if q else 3000)
    a.seconds = a.seconds or (0.3 if q else 2.0)
    a.rounds = a.rounds or (1 if q else 3)
    a.starts = a.starts or (2 if q else 5)
    a.stall_seconds = a.stall_seconds or (0.5 if q else 3.0)
    if a.secrets < 2 or a.calls < 1:
        ap.error("need --secrets >= 2 and --calls >= 1")

    def on_signal(signum, frame):
        # Inside asyncio.run: cancel the main task (as asyncio does for Ctrl-C); else unwind.
        t = _main_task
        if t is not None and not t.done():
            t.get_loop().call_soon_threadsafe(t.cancel)
        else:
            raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    global JOURNAL
    procs = Procs()
    try:
        if a.journal == "standin":
            jdir = Path(tempfile.mkdtemp(prefix="sb-bench-journal-"))
            procs.dirs.append(jdir)
            JOURNAL = JournalStandIn(jdir).start()
        if a.store:
            root = Path(a.store).resolve() / "root"
        else:
            base = Path(tempfile.mkdtemp(prefix="sb-bench-dbus-", dir=a.dir))
            procs.dirs.append(base)
            root = base / "root"
        t = time.perf_counter()
        print(f"building/checking the store of {a.secrets:,} secrets in {root} ...", file=sys.stderr)
        built = build_store(root, a.secrets)
        print(f"  store ready ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
        asyncio.run(run_bench(a, procs, root, built))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; cleaning up", file=sys.stderr)
        sys.exit(130)
    finally:
        procs.stop_all()
        if JOURNAL is not None:
            received = JOURNAL.stop()
            print(f"journal stand-in: {'?' if received is None else received} records received", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Root's GetValue while hostile local users run attacks 1-3 of issue 12 at once.

    .venv/bin/python bench/bench_attacks.py [--duration 60] [--baseline S] [--secrets 300]
        [--outsiders 3] [--signal-mb 28] [--slow-conns 3] [--rcvbuf 4096] [--renew 10]
        [--listers 4] [--timeout 5] [--reuse] [--no-check] [--keep]

Run as root. It starts, and stops by PID, everything itself: a private system-type dbus-daemon
(Debian's default-deny system policy and the project's dbus/org.libvirt.secret.conf, the
bus's default limits: 32 MiB messages, 127 MiB queued per connection, 128 pending replies),
a real polkitd with the project's actions and no rules (a "member" has no extra polkit rules),
and `secretbusd --system --root DIR --bus-address ADDR` as root with an emulated journal for
its audit records. The store: `--secrets` volume secrets with 200-character descriptions
(GetManagedObjects ~100 KB a reply at 300) and root's ceph secret with a value.

Phases, one after the other:
 1. baseline (`--baseline`, default a third of the duration, at least 3 s): root's loop alone;
 2. attacks (`--duration`, default 60 s): the same loop while these run at once, each attacker
    a separate process of Debian's python3 run through setpriv as a real unprivileged user:
    (1) `--outsiders` processes as sbtest-other (not in group libvirt), each sending unicast
        `aai` signals of `--signal-mb` MiB to org.libvirt.secret as fast as the bus reads
        them (the message is built once; the attacker reads the bus's answers);
    (2) one process as sbtest-member (group libvirt) holding `--slow-conns` connections with
        a `--rcvbuf` receive buffer that send GetManagedObjects and ListSecrets as fast as the
        bus takes them and never read a reply; every `--renew` seconds the oldest connection
        is replaced by a fresh one (fresh per-connection budgets, queued replies dropped);
    (3) one process as sbtest-member running `--listers` loops of: new connection,
        ListSecrets (one getattr check per secret for a new connection), disconnect.

Root's loop: GetValue of root's secret, one call at a time, each on a new connection (as
virsh and `secretbus` make one per command; `--reuse`: one connection for all), the call
bounded by `--timeout` (a timeout is an error; its latency counts as the timeout). Latency is
the call only (send to reply); connecting is measured apart. Meanwhile secretbusd's VmRSS is
read from /proc/PID/status every 0.5 s (the maximum is shown), and CPU seconds of secretbusd,
dbus-daemon and polkitd over each phase from /proc/PID/stat.

Printed: per phase, root's GetValue count, p50 / p99 / max latency, errors and timeouts,
connect p99, max RSS and CPU; what each attacker managed (so a run whose attack did not
happen is visible); the goals of issue 12. Exit status: 0 when, under the attacks, root's
GetValue p99 < 50 ms, max RSS < 100 MB and no root call failed; 2 when not (`--no-check`: 0
whatever the figures); 1 on errors.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402
from harness.procs import remove_tree  # noqa: E402

BUS_NAME = "org.libvirt.secret"
CONNECT_PATH = "/org/libvirt/secret"
MEMBER, OTHER = "sbtest-member", "sbtest-other"
BUS_CONF = REPO / "dbus" / "org.libvirt.secret.conf"
ACTIONS = ("sbbench-attacks.org.libvirt.api.secret.policy",
           (REPO / "polkit" / "org.libvirt.api.secret.policy").read_text())
ROOT_UUID = "5b7e5700-0000-4000-8004-000000000001"
ROOT_PATH = "/org/libvirt/secret/secret/_" + ROOT_UUID.replace("-", "_")
ROOT_VALUE = b"bench-attacks root value"
DESCRIPTION = 200
P99_GOAL_MS = 50.0
RSS_GOAL_MB = 100.0
RSS_INTERVAL = 0.5

# The attackers: run as a test user with /usr/bin/python3 and the copied packages, from a
# directory that also holds tests/harness/rawclient.py. Each prints "ready", waits for a line
# on stdin, attacks for SECONDS and prints one JSON line of what it managed (the slow readers
# also stop at a second line on stdin, so a test can end them when it has seen enough).
ATTACK = r'''
import asyncio, json, os, select, socket, struct, sys, time
import rawclient

def signal_message(serial, destination, rows):
    """A unicast SIGNAL, little-endian, body `aai` of `rows` rows of 1024 int32."""
    fields = bytearray()
    for code, sig, value in ((1, "o", "/org/libvirt/secret"), (2, "s", "org.libvirt.Flood"),
                             (3, "s", "Flood"), (6, "s", destination), (8, "g", "aai")):
        fields += b"\0" * (-len(fields) % 8)
        fields += bytes([code, 1]) + sig.encode() + b"\0"
        raw = value.encode()
        if sig == "g":
            fields += bytes([len(raw)]) + raw + b"\0"
        else:
            fields += b"\0" * (-len(fields) % 4)
            fields += struct.pack("<I", len(raw)) + raw + b"\0"
    row = struct.pack("<I", 4096) + struct.pack("<1024i", *range(1024))
    body = struct.pack("<I", len(row) * rows) + row * rows
    head = bytearray(b"l\x04\x00\x01" + struct.pack("<III", len(body), serial, len(fields))) + fields
    head += b"\0" * (-len(head) % 8)
    return bytearray(head + body)

def count_messages(buf, counts):
    """Consume whole messages from `buf`; count them by type. Returns the rest."""
    while len(buf) >= 16:
        body_len, _s, fields_len = struct.unpack("<III", buf[4:16])
        total = 16 + fields_len + (-fields_len % 8) + body_len
        if len(buf) < total:
            break
        counts[buf[1]] = counts.get(buf[1], 0) + 1
        buf = buf[total:]
    return buf

def signals(addr, seconds, mb):
    s, _ = rawclient.connect(addr)
    s.setblocking(False)
    rows = max(1, int(mb * (1 << 20)) // 4100)
    msg = signal_message(2, "org.libvirt.secret", rows)
    print("ready", flush=True)
    sys.stdin.readline()
    sent, serial, off, inbuf, counts = 0, 2, 0, b"", {}
    view = memoryview(msg)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r, w, _ = select.select([s], [s], [], 0.1)
        if r:
            chunk = s.recv(65536)
            if not chunk:
                break
            inbuf = count_messages(inbuf + chunk, counts)
        if w:
            try:
                off += s.send(view[off:])
            except BlockingIOError:
                continue
            if off == len(msg):
                sent, off, serial = sent + 1, 0, serial + 1
                struct.pack_into("<I", msg, 8, serial)
    # the bus's answers to the last sends
    end = time.monotonic() + 2
    while counts.get(3, 0) < sent and time.monotonic() < end:
        if select.select([s], [], [], 0.1)[0]:
            chunk = s.recv(65536)
            if not chunk:
                break
            inbuf = count_messages(inbuf + chunk, counts)
    return {"sent": sent, "bytes": sent * len(msg), "errors": counts.get(3, 0)}

def slow(addr, seconds, conns, rcvbuf, renew, target):
    dest = "org.libvirt.secret"
    def calls():
        serial = 2
        while target == "bus":          # the control: the bus daemon's own GetId
            serial += 1
            yield rawclient.method_call(serial, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                        "org.freedesktop.DBus", "GetId")
        while True:
            serial += 1
            yield rawclient.method_call(serial, dest, "/org/libvirt/secret",
                                        "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
            serial += 1
            yield rawclient.method_call(serial, dest, "/org/libvirt/secret", "org.libvirt.Connect",
                                        "ListSecrets", 0)
    def new():
        s = rawclient.connect(addr, rcvbuf)[0]
        s.setblocking(False)
        return [s, calls(), b""]
    socks = [new() for _ in range(conns)]      # connected before the start, as the others are
    print("ready", flush=True)
    sys.stdin.readline()
    opened, sent = conns, 0
    deadline = time.monotonic() + seconds
    next_renew = time.monotonic() + renew if renew > 0 else float("inf")
    checked = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() - checked > 0.1:          # a second line (or EOF) ends it early
            checked = time.monotonic()
            if select.select([sys.stdin], [], [], 0)[0]:
                break
        if time.monotonic() >= next_renew:
            socks.pop(0)[0].close()         # leaves with its replies unread
            socks.append(new())
            opened += 1
            next_renew += renew
        progress = False
        for c in socks:
            if not c[2]:
                c[2] = next(c[1])
            try:
                n = c[0].send(c[2])
            except BlockingIOError:
                continue
            progress = True
            c[2] = c[2][n:]
            if not c[2]:
                sent += 1
        if not progress:
            time.sleep(0.002)
    for c in socks:
        c[0].close()
    return {"sent": sent, "connections": opened}

async def lists(addr, seconds, workers):
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    deadline, sizes, errors = time.monotonic() + seconds, [], {}
    async def loop():
        while time.monotonic() < deadline:
            try:
                bus = await asyncio.wait_for(MessageBus(bus_address=addr).connect(), 30)
            except Exception as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            try:
                r = await asyncio.wait_for(bus.call(Message(
                    destination="org.libvirt.secret", path="/org/libvirt/secret", interface="org.libvirt.Connect",
                    member="ListSecrets", signature="u", body=[0])), 30)
                if r.message_type == MessageType.ERROR:
                    errors[r.error_name] = errors.get(r.error_name, 0) + 1
                else:
                    sizes.append(len(r.body[0]))
            except Exception as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            finally:
                bus.disconnect()
    await asyncio.gather(*(loop() for _ in range(workers)))
    return {"lists": len(sizes), "sizes": sorted(set(sizes)), "errors": errors}

def main():
    mode, addr, seconds, *rest = sys.argv[1:]
    seconds = float(seconds)
    if mode == "signals":
        out = signals(addr, seconds, float(rest[0]))
    elif mode == "slow":
        out = slow(addr, seconds, int(rest[0]), int(rest[1]), float(rest[2]), rest[3])
    else:
        out = asyncio.run(lists(addr, seconds, int(rest[0])))
    print(json.dumps(out), flush=True)
    os._exit(0)      # sockets left unread must not delay the exit

main()
'''


# --------------------------------------------------------------------------------------
# figures

@dataclass
class Phase:
    name: str
    seconds: float
    latencies: list[float] = field(default_factory=list)   # every call, a timeout as the timeout
    connects: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)        # GetId to dbus-daemon after each GetValue
    errors: dict[str, int] = field(default_factory=dict)   # kind -> count (timeouts included)
    timeouts: int = 0
    slow_at: list[float] = field(default_factory=list)     # phase seconds at which a call took > 1 s
    max_rss_mb: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)     # process -> CPU seconds in the phase

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """VmRSS of `pid` every RSS_INTERVAL seconds; `peak` is the maximum since reset()."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(RSS_INTERVAL)

    def reset(self) -> None:
        self.peak = rss_mb(self.pid)

    def stop(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------------------
# root's loop

async def root_loop(address: str, phase: Phase, timeout: float, reuse: bool) -> None:
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    def fail(kind: str) -> None:
        phase.errors[kind] = phase.errors.get(kind, 0) + 1

    shared = None
    begin = time.monotonic()
    deadline = begin + phase.seconds
    while time.monotonic() < deadline:
        if phase.latencies and phase.latencies[-1] > 1.0:
            phase.slow_at.append(time.monotonic() - begin)
        bus = shared
        if bus is None:
            t0 = time.monotonic()
            try:
                bus = await asyncio.wait_for(MessageBus(bus_address=address).connect(), timeout)
            except Exception as e:  # noqa: BLE001 - every failure counts, timeouts too
                phase.connects.append(time.monotonic() - t0)
                phase.latencies.append(timeout)
                fail(f"connect: {type(e).__name__}")
                continue
            phase.connects.append(time.monotonic() - t0)
            if reuse:
                shared = bus
        t0 = time.monotonic()
        try:
            r = await asyncio.wait_for(bus.call(Message(destination=BUS_NAME, path=ROOT_PATH,
                                                        interface="org.libvirt.Secret", member="GetValue",
                                                        signature="u", body=[0])), timeout)
            phase.latencies.append(time.monotonic() - t0)
            if r.message_type is MessageType.ERROR:
                fail(str(r.error_name))
            elif r.body != [ROOT_VALUE]:
                fail("wrong value")
        except TimeoutError:
            phase.latencies.append(timeout)
            phase.timeouts += 1
            fail("timeout")
        except Exception as e:  # noqa: BLE001 - every failure counts
            phase.latencies.append(time.monotonic() - t0)
            fail(type(e).__name__)
        # The bus floor on the same connection: dbus-daemon alone answers GetId.
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(bus.call(Message(destination="org.freedesktop.DBus",
                                                    path="/org/freedesktop/DBus",
                                                    interface="org.freedesktop.DBus", member="GetId")), timeout)
            phase.floor.append(time.monotonic() - t0)
        except Exception:  # noqa: BLE001 - a floor sample lost; root's figures are the GetValue ones
            phase.floor.append(timeout)
        finally:
            if not reuse:
                bus.disconnect()
    if shared is not None:
        shared.disconnect()


# --------------------------------------------------------------------------------------
# the stack

def write_store(root: Path, n: int) -> None:
    """`n` volume secrets with DESCRIPTION-character descriptions, and root's secret with a value
    (libvirt's layout, plain base64: no key configured)."""
    store = root / "etc" / "secrets"
    store.mkdir(mode=0o700, parents=True)
    (root / "etc").chmod(0o700)
    for i in range(n):
        uuid = f"5b7e5700-0000-4000-8001-{i:012x}"
        (store / f"{uuid}.xml").write_text(
            f"<secret ephemeral='no' private='no'>\n  <description>{'d' * DESCRIPTION}</description>\n"
            f"  <uuid>{uuid}</uuid>\n  <usage type='volume'>\n    <volume>/var/lib/sbbench/a/{i}.img"
            "</volume>\n  </usage>\n</secret>\n")
    (store / f"{ROOT_UUID}.xml").write_text(
        f"<secret ephemeral='no' private='no'>\n  <uuid>{ROOT_UUID}</uuid>\n  <usage type='ceph'>\n"
        "    <name>sbbench-attacks root</name>\n  </usage>\n</secret>\n")
    (store / f"{ROOT_UUID}.base64").write_text(base64.b64encode(ROOT_VALUE).decode())
    for f in store.iterdir():
        f.chmod(0o600)


class QuietBus(harness.PrivateBus):
    """A bus whose log goes to /dev/null: dbus-daemon logs one line per call it refuses
    (max_replies_per_connection), ~25,000 lines a second under attack 2, and a log file
    that fast stalls it in write() now and then (`--bus-log null`)."""

    @property
    def log_path(self) -> Path:
        return Path("/dev/null")


class Stack:
    """Everything the run started, stopped in reverse order by PID (also on errors and signals)."""

    def __init__(self, keep: bool, bus_log: str = "file") -> None:
        self.keep = keep
        self.bus_log = bus_log
        self.bus: harness.PrivateBus | None = None
        self.polkitd: harness.Polkitd | None = None
        self.daemon: harness.Secretbusd | None = None
        self.attackers: list[tuple[str, subprocess.Popen]] = []
        self.dirs: list[Path] = []

    def start(self, secrets: int) -> None:
        root = harness.public_tempdir("sb-bench-attacks-root-")
        self.dirs.append(root)
        write_store(root, secrets)
        kind = QuietBus if self.bus_log == "null" else harness.PrivateBus
        self.bus = kind("system", policy_files=[BUS_CONF]).start()
        self.polkitd = harness.Polkitd(self.bus, actions=[ACTIONS]).start()
        self.daemon = harness.Secretbusd(self.bus, system=True, root=root).start()

    def attacker(self, label: str, user: str, *args: str) -> subprocess.Popen:
        if not any(d.name.startswith("sb-bench-attacks-bin-") for d in self.dirs):
            d = harness.public_tempdir("sb-bench-attacks-bin-")
            self.dirs.append(d)
            shutil.copyfile(Path(harness.__file__).parent / "rawclient.py", d / "rawclient.py")
            (d / "attack.py").write_text(ATTACK)
            for f in d.iterdir():
                f.chmod(0o644)
        d = next(d for d in self.dirs if d.name.startswith("sb-bench-attacks-bin-"))
        unpriv = harness.unpriv_python()
        assert self.bus is not None
        argv = harness.as_user(user, unpriv.argv(str(d / "attack.py"), args[0], self.bus.address, *args[1:]))
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=open(d / f"{label}.err", "wb"), env=unpriv.env(harness.user_env(user)),
                             cwd="/", start_new_session=True, text=True)
        harness.procs.STARTED[p.pid] = f"attacker {label}"
        self.attackers.append((label, p))
        return p

    def attacker_err(self, label: str) -> str:
        d = next((d for d in self.dirs if d.name.startswith("sb-bench-attacks-bin-")), None)
        f = d / f"{label}.err" if d else None
        return f.read_text(errors="replace")[-2000:] if f and f.exists() else ""

    def stop(self) -> None:
        for _, p in self.attackers:
            harness.stop_process(p)
            if p.stdout:
                p.stdout.close()
            if p.stdin:
                try:
                    p.stdin.close()
                except BrokenPipeError:
                    pass
        if self.daemon is not None:
            self.daemon.cleanup()       # its root is one of self.dirs: kept with --keep
        for part in (self.polkitd, self.bus):
            if part is not None:
                part.stop()
        for d in self.dirs:
            if self.keep:
                print(f"kept: {d}", file=sys.stderr)
            else:
                remove_tree(d)


# --------------------------------------------------------------------------------------
# a run

@dataclass
class Result:
    phases: list[Phase]
    attacks: dict[str, list[dict]]
    config: dict[str, object]
    load: tuple[float, float]
    daemon_alive: bool


def run_phase(stack: Stack, sampler: RssSampler, phase: Phase, timeout: float, reuse: bool) -> None:
    assert stack.bus and stack.daemon and stack.daemon.proc and stack.polkitd and stack.polkitd.proc
    assert stack.bus.proc is not None
    pids = {"secretbusd": stack.daemon.proc.pid, "dbus-daemon": stack.bus.proc.pid,
            "polkitd": stack.polkitd.proc.pid}
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    sampler.reset()
    asyncio.run(root_loop(stack.bus.address, phase, timeout, reuse))
    phase.max_rss_mb = max(sampler.peak, rss_mb(pids["secretbusd"]))
    phase.cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}


def run(a: argparse.Namespace, stack: Stack, progress=lambda s: None) -> Result:
    load0 = os.getloadavg()[0]
    harness.ensure_user(MEMBER, ["libvirt"])
    harness.ensure_user(OTHER)
    progress(f"starting bus, polkitd, secretbusd ({a.secrets} secrets) ...")
    stack.start(a.secrets)
    assert stack.daemon and stack.daemon.proc
    sampler = RssSampler(stack.daemon.proc.pid)
    sampler.start()
    try:
        base = Phase("baseline", a.baseline)
        progress(f"baseline: root's GetValue loop alone for {a.baseline:g} s ...")
        run_phase(stack, sampler, base, a.timeout, a.reuse)
        secs = f"{a.duration:g}"
        for i in range(a.outsiders):
            stack.attacker(f"outsider{i}", OTHER, "signals", secs, f"{a.signal_mb:g}")
        if a.slow_conns:
            stack.attacker("slow", MEMBER if a.slow_target == "service" else OTHER, "slow", secs,
                           str(a.slow_conns), str(a.rcvbuf), f"{a.renew:g}", a.slow_target)
        if a.listers:
            stack.attacker("lists", MEMBER, "lists", secs, str(a.listers))
        for label, p in stack.attackers:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "ready":
                raise SystemExit(f"attacker {label} did not start: {line!r} {stack.attacker_err(label)}")
        for _, p in stack.attackers:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        attack = Phase("attacks", a.duration)
        progress(f"attacks: {len(stack.attackers)} attacker processes and root's loop for {secs} s ...")
        run_phase(stack, sampler, attack, a.timeout, a.reuse)
        attack.cpu["attackers"] = sum(cpu_seconds(p.pid) for _, p in stack.attackers)   # exited, not reaped
        attacks: dict[str, list[dict]] = {}
        for label, p in stack.attackers:
            try:
                out, _ = p.communicate(timeout=60)
                got = json.loads(out.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                got = {"failed": stack.attacker_err(label).strip().splitlines()[-1:] or ["no output"]}
            attacks.setdefault(label.rstrip("0123456789"), []).append(got)
        attack.max_rss_mb = max(attack.max_rss_mb, sampler.peak)
    finally:
        sampler.stop()
    alive = stack.daemon.proc.poll() is None
    config = {k: getattr(a, k) for k in ("duration", "baseline", "secrets", "outsiders", "signal_mb",
                                          "slow_conns", "rcvbuf", "renew", "slow_target", "listers", "timeout",
                                          "reuse", "bus_log")}
    return Result([base, attack], attacks, config, (load0, os.getloadavg()[0]), alive)


# --------------------------------------------------------------------------------------
# report

def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def goals(r: Result) -> list[tuple[str, str, bool]]:
    att = r.phases[-1]
    p99 = percentile(att.latencies, 0.99) * 1000
    return [(f"root GetValue p99 under attack < {P99_GOAL_MS:g} ms", f"{p99:.1f} ms", p99 < P99_GOAL_MS),
            (f"secretbusd max RSS under attack < {RSS_GOAL_MB:g} MB", f"{att.max_rss_mb:.1f} MB",
             att.max_rss_mb < RSS_GOAL_MB),
            ("root GetValue errors and timeouts under attack", str(att.failed), att.failed == 0),
            ("secretbusd still running", "yes" if r.daemon_alive else "no", r.daemon_alive)]


def report(r: Result) -> list[str]:
    c = r.config
    out = [f"bench_attacks: private system bus + polkitd (actions, no rules) + secretbusd --system, "
           f"{c['secrets']} secrets; {os.cpu_count()} CPUs; load average {r.load[0]:.2f} at start, "
           f"{r.load[1]:.2f} at end",
           f"attacks at once: (1) {c['outsiders']} outsiders ({OTHER}) sending {c['signal_mb']:g} MiB unicast "
           f"signals; (2) {c['slow_conns']} {MEMBER} connections, rcvbuf {c['rcvbuf']}, GetManagedObjects + "
           f"ListSecrets never read (renewed every {c['renew']:g} s); (3) {c['listers']} {MEMBER} loops of new "
           f"connection + ListSecrets",
           f"root: GetValue, one at a time, {'one connection' if c['reuse'] else 'a new connection each'}, "
           f"timeout {c['timeout']:g} s; RSS sampled every {RSS_INTERVAL:g} s; dbus-daemon log: {c['bus_log']}",
           "",
           "| phase | s | root GetValue | p50 ms | p99 ms | max ms | errors | timeouts | connect p99 ms "
           "| bus GetId p50 / p99 ms | max RSS MB | CPU s secretbusd / dbus-daemon / polkitd / attackers |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in r.phases:
        cpu = " / ".join(f"{p.cpu.get(k, 0):.1f}" for k in ("secretbusd", "dbus-daemon", "polkitd", "attackers"))
        out.append(f"| {p.name} | {p.seconds:g} | {p.calls} | {ms(percentile(p.latencies, 0.5))} "
                   f"| {ms(percentile(p.latencies, 0.99))} | {ms(max(p.latencies, default=float('nan')))} "
                   f"| {p.failed} | {p.timeouts} | {ms(percentile(p.connects, 0.99))} "
                   f"| {ms(percentile(p.floor, 0.5))} / {ms(percentile(p.floor, 0.99))} "
                   f"| {p.max_rss_mb:.1f} | {cpu} |")
    for p in r.phases:
        if p.slow_at:
            out.append(f"root calls over 1 s ({p.name}) ended at s: " + ", ".join(f"{t:.1f}" for t in p.slow_at[:20]))
        if p.errors:
            out.append(f"root errors ({p.name}): " + ", ".join(f"{k} × {v}" for k, v in sorted(p.errors.items())))
    out.append("")
    sig = r.attacks.get("outsider", [])
    if sig:
        sent = sum(x.get("sent", 0) for x in sig)
        gib = sum(x.get("bytes", 0) for x in sig) / (1 << 30)
        errs = sum(x.get("errors", 0) for x in sig)
        out.append(f"attack 1, outsiders: {sent} signals sent ({gib:.2f} GiB), {errs} error replies from the bus"
                   + "".join(f"; failed: {x['failed']}" for x in sig if "failed" in x))
    for x in r.attacks.get("slow", []):
        what = "calls sent" if c["slow_target"] == "service" else f"GetId calls to dbus-daemon sent by {OTHER}"
        out.append(f"attack 2, slow readers: {x.get('sent', 0)} {what} over {x.get('connections', 0)} "
                   f"connections, none read" + (f"; failed: {x['failed']}" if "failed" in x else ""))
    for x in r.attacks.get("lists", []):
        out.append(f"attack 3, ListSecrets loops: {x.get('lists', 0)} lists of {x.get('sizes')} paths, "
                   f"errors {x.get('errors')}" + (f"; failed: {x['failed']}" if "failed" in x else ""))
    out.append("")
    out += [f"goal: {name}: {value} -> {'met' if ok else 'MISSED'}" for name, value, ok in goals(r)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the attack phase (default 60)")
    ap.add_argument("--baseline", type=float, help="seconds of the baseline phase (default duration/3, >= 3)")
    ap.add_argument("--secrets", type=int, default=300, help="secrets in the store (default 300)")
    ap.add_argument("--outsiders", type=int, default=3, help="attack 1: outsider processes (default 3)")
    ap.add_argument("--signal-mb", type=float, default=28.0, help="attack 1: MiB per signal (default 28)")
    ap.add_argument("--slow-conns", type=int, default=3, help="attack 2: connections never read (default 3)")
    ap.add_argument("--rcvbuf", type=int, default=4096, help="attack 2: their SO_RCVBUF (default 4096)")
    ap.add_argument("--renew", type=float, default=10.0,
                    help="attack 2: replace the oldest connection every S seconds (0: never; default 10)")
    ap.add_argument("--slow-target", choices=("service", "bus"), default="service",
                    help="attack 2 calls secretbusd (default), or, as a control, GetId of the bus daemon "
                         "itself, sent by an outsider: what the bus alone suffers from such a caller")
    ap.add_argument("--listers", type=int, default=4, help="attack 3: ListSecrets loops (default 4)")
    ap.add_argument("--timeout", type=float, default=5.0, help="root's per-call timeout (default 5)")
    ap.add_argument("--reuse", action="store_true", help="root uses one connection for all its calls")
    ap.add_argument("--bus-log", choices=("file", "null"), default="file",
                    help="dbus-daemon's log: a file in its temp dir (default), or /dev/null")
    ap.add_argument("--no-check", action="store_true", help="only print: exit 0 whatever the figures")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (store, logs)")
    a = ap.parse_args(argv)
    a.baseline = a.baseline if a.baseline is not None else max(3.0, a.duration / 3)
    if os.geteuid() != 0:
        print("run as root (starts dbus-daemon, polkitd and secretbusd, switches users)", file=sys.stderr)
        return 1

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    stack = Stack(a.keep, a.bus_log)
    try:
        r = run(a, stack, progress=lambda s: print(s, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        stack.stop()
    print("\n".join(report(r)), flush=True)
    if a.no_check:
        return 0
    return 0 if all(ok for _, _, ok in goals(r)) else 2


if __name__ == "__main__":
    sys.exit(main())

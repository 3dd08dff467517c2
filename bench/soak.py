#!/usr/bin/env python3
"""Load and soak: many concurrent clients, root and non-root, on a system bus with polkit.

    python bench/soak.py [--size small|full] [--clients N] [--calls N] [--root-share 0.5]
                         [--shared 32] [--connections 4] [--seed S] [--timeout 30]
                         [--no-prime] [--trace-memory] [--keep] [--json FILE]

Run as root. It starts, and stops by PID, everything itself: a private system-type
dbus-daemon with the project's bus policy (dbus/org.libvirt.secret.conf), a real polkitd with
the project's actions and the example rules (group libvirt gets write / save / delete /
read-secure), and `secretbusd --system --root DIR --bus-address ADDR` as root.

Clients are separate processes, each with one dbus-fast connection and one call in flight,
every call bounded by a timeout: root ones are plain subprocesses of this Python; non-root
ones run as `sbtest-member` (group libvirt) through setpriv with Debian's python3 and the
copied packages (tests/harness `unpriv_python`). Each makes `calls` calls drawn from a fixed
mix (weights in MIX): SecretLookupByUUID / ByUsage, ListSecrets, GetManagedObjects,
GetXMLDesc, GetValue, SetValue, Properties.Get / GetAll, and now and then SecretDefineXML /
Undefine of the client's own "churn" secret; and, evenly spaced, a few reconnects (a new
connection, so a new unique name: the service must drop what it cached for the old one;
CONNECTIONS_PER_CLIENT, --connections).

Targets: `shared` secrets defined (with a value) before the clients start and never
undefined — the first of them private, readable by sbtest-member (secret.conf
private_value_readers) but not by root — and one churn secret per client, which only that
client defines and undefines but every client may touch.

Expected errors (everything else is unexpected, goal 0):
  * org.libvirt.Error.NoSecret on a call that targets ANOTHER client's churn secret (it may
    have just been undefined, or have no value yet);
  * org.libvirt.Error.NoSecret on the client's OWN churn secret when the client knows it is
    undefined, and on GetValue of it when it was defined without a value since (someone
    else may have set one in between, so success is fine then too);
  * org.libvirt.Error.InvalidSecret "secret is private" on GetValue of the private secret by
    a root client (and only then: root reading it, or sbtest-member refused, is unexpected);
  * org.libvirt.Error.OperationFailed "... changed while the request was being authorised; try
    again" on SetValue of ANOTHER client's churn secret: its owner undefined and redefined it
    (with another description) while the call's access was checked, each of the three times
    the service checked it (errors.ChangedMeanwhile: the driver acts only on the definition
    that was checked).
Also unexpected: any error on a shared secret, a success where NoSecret was certain (own
churn secret undefined), a client-side timeout or exception, a ListSecrets /
GetManagedObjects answer without every shared secret, a GetValue whose bytes were not
written by a client (corrupt value), a GetXMLDesc / Properties answer for the wrong secret,
and a client process that dies.

Phases: every client first primes (uncounted calls: defines, sets, undefines and redefines
its churn secret, waits until every client has, then reads, sets and GetAll's every secret
once and lists them), so that secretbusd's polkit decision cache holds every (caller,
permission, secret) this client will need — the cache is bounded (16,384 entries) and is
not what the drift figure is after (--no-prime leaves it to fill during the measured part:
+3 to 7 % drift). After each reconnect the new name's entries fill again while the old
name's are dropped, which is steady state. Then it makes the first 10 % of its calls (warm-up: allocator pools, dict
sizes), then all wait at a barrier; the daemon's VmRSS is read
(/proc/PID/status) as "after warm-up"; the clients make the other 90 % (latencies and
calls/s are over this part) while VmRSS is sampled every 0.5 s; all wait at a second barrier
(still connected) and VmRSS is read as "at end". Drift = end / warm-up - 1 (goal < 10 %).
The daemon's open fds are compared the same way, and its log is searched for
ERROR / CRITICAL lines and tracebacks; polkitd's log for its runaway-script watchdog (a
polkitd stall of 15 s, seen when rules files change under load: secretbusd's checks time
out after 5 s and it denies, fail-closed, so those calls count as unexpected errors). When
anything unexpected happened, the logs are copied to a kept /tmp/sb-soak-logs-* directory.
`figures(size)` returns the rows for bench/reliability.py.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402
from harness.journal import JournalSocket  # noqa: E402
from harness.procs import remove_tree  # noqa: E402

BUS_NAME = "org.libvirt.secret"
MEMBER = "sbtest-member"
BUS_CONF = REPO / "dbus" / "org.libvirt.secret.conf"
POLICY = REPO / "polkit" / "org.libvirt.api.secret.policy"
RULES_EXAMPLE = REPO / "polkit" / "50-secretbus-libvirt-group.rules.example"

SIZES = {"small": (8, 300), "full": (32, 5000)}

# Call kinds and their weights (per 1,000 calls).
MIX = {
    "SecretLookupByUUID": 120,
    "SecretLookupByUsage": 70,
    "ListSecrets": 70,
    "GetManagedObjects": 20,
    "GetXMLDesc": 140,
    "GetValue": 180,
    "SetValue": 100,
    "Properties.GetAll": 140,
    "Properties.Get": 100,
    "SecretDefineXML": 30,
    "Undefine": 30,
}
# Each client also reconnects (new bus connection, so a new unique name: the service must
# forget what it cached for the old one) at evenly spaced points, so that it uses this many
# connections in all. Few on purpose: a fresh name starts with an empty polkit decision
# cache, so every (permission, secret) it touches costs a CheckAuthorization round trip. With
# connections living ~100 calls (1 % reconnects) those misses dominated the read latencies
# (GetValue p50 57 ms instead of ~1 ms at 32 x 5,000).
CONNECTIONS_PER_CLIENT = 4
CHURN_SHARE = 0.2       # per-secret calls aimed at a churn secret instead of a shared one

CLIENT = r'''
import asyncio, json, os, random, sys, time
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

NAME = "org.libvirt.secret"
CONNECT = "/org/libvirt/secret"
CI, SI, PI = "org.libvirt.Connect", "org.libvirt.Secret", "org.freedesktop.DBus.Properties"
NOSECRET = "org.libvirt.Error.NoSecret"
INVALID = "org.libvirt.Error.InvalidSecret"
FAILED = "org.libvirt.Error.OperationFailed"
CHANGED = "changed while the request was being authorised; try again"
USAGE_VOLUME = 1

from secretbus.bus.names import secret_path as spath

def usage(u):
    return "/var/lib/sbsoak/" + u + ".img"

def defxml(u, desc):
    return ("<secret ephemeral='no' private='no'><uuid>%s</uuid><description>%s</description>"
            "<usage type='volume'><volume>%s</volume></usage></secret>" % (u, desc, usage(u)))

async def main():
    spec = json.loads(sys.argv[1])
    cid, calls, warm, timeout = spec["id"], spec["calls"], spec["warm"], spec["timeout"]
    shared, churn = spec["shared"], spec["churn"]
    own = churn[cid]
    private = spec["private"]
    root = os.getuid() == 0
    rng = random.Random(spec["seed"])
    kinds = list(spec["mix"])
    weights = [spec["mix"][k] for k in kinds]
    shared_paths = {spath(u) for u in shared}
    state = {"present": spec["own_present"], "value": False}   # own churn secret
    lat = {k: [] for k in kinds + ["Reconnect"]}
    counts = {k: 0 for k in kinds + ["Reconnect"]}
    expected = {}
    unexpected = {}
    samples = []
    loop = asyncio.get_running_loop()
    conn = [await asyncio.wait_for(MessageBus(bus_address=spec["address"]).connect(), timeout)]
    names = [conn[0].unique_name]

    async def call(path, iface, member, sig="", body=()):
        msg = Message(destination=NAME, path=path, interface=iface, member=member,
                      signature=sig, body=list(body))
        return await asyncio.wait_for(conn[0].call(msg), timeout)

    class Ok:
        message_type = MessageType.METHOD_RETURN
        body = []

    async def reconnect():
        conn[0].disconnect()
        await asyncio.wait_for(conn[0].wait_for_disconnect(), timeout)
        conn[0] = await asyncio.wait_for(MessageBus(bus_address=spec["address"]).connect(), timeout)
        names.append(conn[0].unique_name)
        return Ok()

    def target(fixed=None):
        if fixed is not None:
            return fixed, ("own" if fixed == own else "other" if fixed in churn else "shared")
        if rng.random() < spec["churn_share"]:
            u = rng.choice(churn)
            return u, ("own" if u == own else "other")
        return rng.choice(shared), "shared"

    async def one(kind, n, fixed=None):
        """-> (reply, target kind, NoSecret certain?, NoSecret allowed?, answer check, effect)"""
        if kind == "Reconnect":
            r = await reconnect()
            return r, "-", False, False, lambda b: names[-1] not in names[:-1], None
        if kind == "SecretDefineXML":
            r = await call(CONNECT, CI, "SecretDefineXML", "su", [defxml(own, "c%d-%d" % (cid, n)), 0])
            return r, "own", False, False, lambda b: b[0] == spath(own), "define"
        if kind == "Undefine":
            r = await call(spath(own), SI, "Undefine")
            return r, "own", False, False, None, "undefine"
        if kind == "ListSecrets":
            r = await call(CONNECT, CI, "ListSecrets", "u", [0])
            return r, "-", False, False, lambda b: shared_paths <= set(b[0]), None
        if kind == "GetManagedObjects":
            r = await call(CONNECT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
            return r, "-", False, False, lambda b: shared_paths <= set(b[0]), None
        u, t = target(fixed)
        certain = t == "own" and not state["present"]
        allowed = t == "other" or certain or (t == "own" and kind == "GetValue" and not state["value"])
        p = spath(u)
        if kind == "SecretLookupByUUID":
            r = await call(CONNECT, CI, "SecretLookupByUUID", "s", [u])
            check = lambda b: b[0] == p
        elif kind == "SecretLookupByUsage":
            r = await call(CONNECT, CI, "SecretLookupByUsage", "is", [USAGE_VOLUME, usage(u)])
            check = lambda b: b[0] == p
        elif kind == "GetXMLDesc":
            r = await call(p, SI, "GetXMLDesc", "u", [0])
            check = lambda b: ("<uuid>%s</uuid>" % u) in b[0]
        elif kind == "GetValue":
            r = await call(p, SI, "GetValue", "u", [0])
            check = lambda b: bytes(b[0]).startswith(b"soak:")
            if u == private and root:
                t = "private"      # root is not in private_value_readers: "secret is private"
        elif kind == "SetValue":
            value = b"soak:%d:%d:" % (cid, n) + b"v" * rng.randrange(0, 64)
            r = await call(p, SI, "SetValue", "ayu", [value, 0])
            check = None
        elif kind == "Properties.GetAll":
            r = await call(p, PI, "GetAll", "s", [SI])
            check = lambda b: b[0]["UUID"].value == u and b[0]["UsageID"].value == usage(u)
        elif kind == "Properties.Get":
            r = await call(p, PI, "Get", "ss", [SI, "UsageID"])
            check = lambda b: b[0].value == usage(u)
        else:
            raise ValueError(kind)
        return r, t, certain, allowed, check, ("setvalue-own" if kind == "SetValue" and t == "own" else None)

    def bump(d, key):
        d[key] = d.get(key, 0) + 1

    def note(kind, t, what):
        bump(unexpected, "%s: %s" % (kind, what.split(":")[0] if what.startswith("client.") else what[:120]))
        if len(samples) < 10:
            samples.append("client %d %s on %s secret: %s" % (cid, kind, t, what[:300]))

    async def do(kind, n, record, fixed=None):
        """One call, judged: expected / unexpected error, wrong answer, own state updated."""
        t0 = time.perf_counter()
        try:
            r, t, certain, allowed, check, effect = await one(kind, n, fixed)
        except asyncio.TimeoutError:
            note(kind, "?", "client.Timeout after %g s" % timeout)
            return
        except Exception as e:
            note(kind, "?", "client.%s: %s" % (type(e).__name__, e))
            return
        secs = time.perf_counter() - t0
        if record:
            lat[kind].append(round(secs * 1e6))
        if r.message_type == MessageType.ERROR:
            msg = r.body[0] if r.body else ""
            if r.error_name == NOSECRET and allowed:
                bump(expected, "%s NoSecret on %s churn secret" % (kind, t))
            elif r.error_name == INVALID and t == "private" and msg == "Invalid secret: secret is private":
                bump(expected, "GetValue InvalidSecret (secret is private) by root")
            elif r.error_name == FAILED and t == "other" and kind == "SetValue" and msg.endswith(CHANGED):
                bump(expected, "SetValue OperationFailed (redefined while authorised) on other churn secret")
            else:
                note(kind, t, "%s: %s" % (r.error_name, msg))
            return
        if certain or t == "private":
            note(kind, t, "success although the own churn secret is undefined" if certain
                 else "root read a private secret")
            return
        try:
            if check is not None and not check(r.body):
                note(kind, t, "wrong answer")
                return
        except Exception as e:
            note(kind, t, "wrong answer (%s)" % type(e).__name__)
            return
        if effect == "define":
            state["present"] = True
        elif effect == "undefine":
            state["present"], state["value"] = False, False
        elif effect == "setvalue-own":
            state["value"] = True

    every = spec["reconnect_every"]

    async def run(lo, hi, record):
        for n in range(lo, hi):
            kind = rng.choices(kinds, weights)[0]
            if every and n % every == every // 2:
                kind = "Reconnect"
            elif kind == "Undefine" and not state["present"]:
                kind = "SecretDefineXML"
            counts[kind] += 1
            await do(kind, n, record)

    async def prime():
        """Uncounted calls that fill the service's polkit decision cache for this client: every
        permission it will ever need on every secret (own churn secret: define, write, delete,
        save), so that "after warm-up" means caches at their working size."""
        n = -1
        for kind in ("SecretDefineXML", "SetValue", "Undefine", "SecretDefineXML", "SetValue"):
            await do(kind, n, False, own)
            n -= 1
        await barrier("own")          # every churn secret exists now (until clients run on)
        await do("ListSecrets", n, False)
        for u in shared + churn:
            for kind in ("Properties.GetAll", "GetXMLDesc", "GetValue", "SetValue"):
                n -= 1
                await do(kind, n, False, u)

    async def barrier(word):
        print(json.dumps({"phase": word}), flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            raise SystemExit(3)

    if spec["prime"]:
        await prime()
    await run(0, warm, False)
    await barrier("warm")
    t0 = time.monotonic()
    await run(warm, calls, True)
    secs = time.monotonic() - t0
    await barrier("done")
    out = {"id": cid, "uid": os.getuid(), "names": len(names), "secs": secs,
           "counts": counts, "lat": lat, "expected": expected, "unexpected": unexpected,
           "samples": samples}
    conn[0].disconnect()
    print(json.dumps(out), flush=True)

asyncio.run(main())
'''


# --trace-memory: the daemon under tracemalloc; SIGUSR1 writes a snapshot to $SBSOAK_SNAPSHOT.N
# (N counts up), taken in the main thread between two callbacks of the event loop.
TRACE_LAUNCHER = """
import os, signal, sys, tracemalloc
tracemalloc.start(12)
n = [0]
def dump(*_):
    n[0] += 1
    path = os.environ["SBSOAK_SNAPSHOT"] + ".%d" % n[0]
    tracemalloc.take_snapshot().dump(path + ".tmp")
    os.rename(path + ".tmp", path)
signal.signal(signal.SIGUSR1, dump)
import secretbus.daemon
sys.exit(secretbus.daemon.main(sys.argv[1:]))
"""


def usage(uuid: str) -> str:
    return f"/var/lib/sbsoak/{uuid}.img"


def write_store(root: Path, shared: list[str], private: str) -> None:
    """libvirt's layout, written before start: <uuid>.xml and <uuid>.base64, 0600 in 0700;
    `private` (one of `shared`) is a private secret; secret.conf lets sbtest-member read it."""
    import base64
    etc = root / "etc"
    store = etc / "secrets"
    store.mkdir(parents=True, mode=0o700)
    etc.chmod(0o700)
    for i, u in enumerate(shared):
        f = store / f"{u}.xml"
        f.write_text(f"<secret ephemeral='no' private='{'yes' if u == private else 'no'}'>\n  <uuid>{u}</uuid>\n"
                     f"  <description>shared {i}</description>\n"
                     f"  <usage type='volume'>\n    <volume>{usage(u)}</volume>\n  </usage>\n</secret>\n")
        f.chmod(0o600)
        v = store / f"{u}.base64"
        v.write_text(base64.b64encode(b"soak:seed:%d:" % i).decode())
        v.chmod(0o600)
    (etc / "secret.conf").write_text(f'private_value_readers = [ "{MEMBER}" ]\n')


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "Threads"):
                    out[k] = int(v.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        fields = st[st.rindex(")") + 2:].split()
        out["cpu_ticks"] = int(fields[11]) + int(fields[12])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class Sampler(threading.Thread):
    """VmRSS of `pid` every `interval` s until stop()."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.wait(self.interval):
            rss = proc_status(self.pid).get("VmRSS")
            if rss is not None:
                self.samples.append((time.monotonic() - t0, rss))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


class Clients:
    """The client processes; line-oriented reads from all their stdouts at once."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.errs: list[Path] = []
        self.bufs: list[bytes] = []
        self.eof: list[bool] = []

    def start(self, argv: list[str], env: dict, err: Path) -> None:
        with open(err, "wb") as f:
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f, env=env,
                                 cwd="/", start_new_session=True)
        harness.procs.STARTED[p.pid] = "soak client"
        self.procs.append(p)
        self.errs.append(err)
        self.bufs.append(b"")
        self.eof.append(False)

    def lines(self, timeout: float) -> list[dict | None]:
        """The next JSON line of every client (None for a client that has exited)."""
        got: dict[int, dict | None] = {}
        for i in range(len(self.procs)):
            if b"\n" in self.bufs[i]:
                got[i] = self._pop(i)
            elif self.eof[i]:
                got[i] = None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for i, p in enumerate(self.procs):
                if i not in got:
                    sel.register(p.stdout.fileno(), selectors.EVENT_READ, i)
            while len(got) < len(self.procs):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.procs) - len(got)} clients silent for {timeout:.0f} s")
                for key, _ in sel.select(left):
                    i = key.data
                    chunk = os.read(key.fd, 1 << 20)
                    if not chunk:
                        self.eof[i] = True
                        got[i] = self._pop(i) if b"\n" in self.bufs[i] else None
                        sel.unregister(key.fd)
                        continue
                    self.bufs[i] += chunk
                    if b"\n" in self.bufs[i]:
                        got[i] = self._pop(i)
                        sel.unregister(key.fd)
        return [got[i] for i in range(len(self.procs))]

    def _pop(self, i: int) -> dict:
        line, self.bufs[i] = self.bufs[i].split(b"\n", 1)
        return json.loads(line)

    def release(self) -> None:
        for p in self.procs:
            try:
                p.stdin.write(b"go\n")
                p.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass

    def stderr(self, i: int) -> str:
        try:
            return self.errs[i].read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        for p in self.procs:
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except (BrokenPipeError, OSError):
                    pass
            harness.stop_process(p)


@dataclass
class SoakResult:
    clients: int
    calls: int
    root_clients: int
    member_clients: int
    seconds: float = 0.0                     # main phase wall time (after the warm-up barrier)
    warmup_seconds: float = 0.0              # clients started -> warm-up barrier (priming included)
    total_seconds: float = 0.0               # everything, set-up included
    main_calls: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    latencies: dict[str, list[int]] = field(default_factory=dict)   # µs, main phase
    expected: dict[str, int] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    dead_clients: int = 0
    connections: int = 0
    uids: dict[int, int] = field(default_factory=dict)               # uid -> clients
    warm: dict[str, int] = field(default_factory=dict)
    end: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)              # after every client left
    rss_series: list[tuple[float, int]] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    memory_diff: list[str] = field(default_factory=list)             # --trace-memory
    logs_kept: str = ""                                              # on failure: a copy of the logs
    polkit_failures: int = 0         # secretbusd: "polkit check ... failed, denying" (timeout / error)
    polkitd_stalls: int = 0          # polkitd: "Terminating runaway script after 15 seconds"
    load: tuple[float, float] = (0.0, 0.0)

    @property
    def unexpected_total(self) -> int:
        return sum(self.unexpected.values())

    @property
    def expected_total(self) -> int:
        return sum(self.expected.values())

    @property
    def rate(self) -> float:
        return self.main_calls / self.seconds if self.seconds else 0.0

    @property
    def drift(self) -> float:
        """VmRSS at end / after warm-up - 1, in percent."""
        if not self.warm.get("VmRSS") or not self.end.get("VmRSS"):
            return float("nan")
        return 100.0 * (self.end["VmRSS"] / self.warm["VmRSS"] - 1)

    def pct(self, kind: str, q: float) -> float:
        xs = sorted(self.latencies.get(kind) or ())
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, int(q * len(xs)))] / 1000.0


def _snapshot(daemon: subprocess.Popen, path: Path) -> None:
    os.kill(daemon.pid, signal.SIGUSR1)
    harness.wait_until(path.exists, timeout=60, interval=0.1, what=f"tracemalloc snapshot {path.name}",
                       proc=daemon)


def _compare(a: Path, b: Path, top: int = 15) -> list[str]:
    """The biggest growths between two snapshots, by allocation site (traceback)."""
    import tracemalloc
    first, second = tracemalloc.Snapshot.load(str(a)), tracemalloc.Snapshot.load(str(b))
    out = [f"traced: {sum(s.size for s in first.statistics('filename')) / 1e6:.2f} MB after warm-up, "
           f"{sum(s.size for s in second.statistics('filename')) / 1e6:.2f} MB at end"]
    grew = sorted((st for st in second.compare_to(first, "traceback") if st.size_diff > 0),
                  key=lambda st: -st.size_diff)
    for st in grew[:top]:
        frames = [f"{Path(f.filename).name}:{f.lineno}" for f in reversed(st.traceback)]
        out.append(f"{st.size_diff / 1024:+9.1f} KiB {st.count_diff:+7d} blocks  " + " < ".join(frames[:7]))
    return out


def run(clients: int = 8, calls: int = 300, *, root_share: float = 0.5, shared: int = 32,
        seed: int | None = None, timeout: float = 30.0, keep: bool = False,
        connections: int = CONNECTIONS_PER_CLIENT, prime: bool = True, trace_memory: bool = False,
        progress=None) -> SoakResult:
    """The whole soak, set-up and tear-down included."""
    if os.geteuid() != 0:
        raise PermissionError("the soak runs as root (dbus-daemon, polkitd, secretbusd, setpriv)")
    t_start = time.monotonic()
    say = progress or (lambda s: None)
    seed = int(time.time()) if seed is None else seed
    rng = random.Random(seed)
    n_root = round(clients * root_share)
    res = SoakResult(clients, calls, n_root, clients - n_root)
    res.load = (os.getloadavg()[0], 0.0)
    shared_uuids = [f"50a65000-0000-4000-8000-{rng.getrandbits(48):012x}" for _ in range(shared)]
    churn_uuids = [f"50a65c00-{i:04x}-4000-8000-{rng.getrandbits(48):012x}" for i in range(clients)]

    user = harness.ensure_user(MEMBER, ["libvirt"])
    unpriv = harness.unpriv_python() if res.member_clients else None
    tmp = harness.public_tempdir("sb-soak-")
    bus = pk = daemon = None
    cl = Clients()
    # Under systemd journald takes the audit records of value reads (required on the system bus).
    journal = JournalSocket(tmp / "journal.socket").start()
    try:
        script = tmp / "client.py"
        script.write_text(CLIENT)
        script.chmod(0o644)
        root = tmp / "root"
        root.mkdir(mode=0o755)
        write_store(root, shared_uuids, shared_uuids[0])
        bus = harness.PrivateBus("system", policy_files=[BUS_CONF]).start()
        pk = harness.Polkitd(bus, actions=[("sbsoak.org.libvirt.api.secret.policy", POLICY.read_text())],
                             rules=[("50-sbsoak-libvirt-group.rules", RULES_EXAMPLE.read_text())]).start()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DBUS_", "NOTIFY_SOCKET", "LISTEN_", "CREDENTIALS_DIRECTORY", "JOURNAL_STREAM"))}
        env["PYTHONPATH"] = str(REPO)
        env["SECRETBUS_JOURNAL_SOCKET"] = str(journal.path)
        log = tmp / "secretbusd.log"
        if trace_memory:
            (tmp / "launch.py").write_text(TRACE_LAUNCHER)
            env["SBSOAK_SNAPSHOT"] = str(tmp / "snapshot")
            cmd = [sys.executable, str(tmp / "launch.py")]
        else:
            cmd = [sys.executable, "-m", "secretbus.daemon"]
        daemon = harness.spawn([*cmd, "--system", "--root", str(root), "--bus-address", bus.address],
                               what="secretbusd (soak)", log=log, env=env)
        bus.wait_for_name(BUS_NAME, proc=daemon, log=log, timeout=30)
        say(f"stack up ({time.monotonic() - t_start:.1f} s): {clients} clients "
            f"({n_root} root, {res.member_clients} {MEMBER}) x {calls} calls, {shared} shared secrets")

        warm = max(1, calls // 10)
        t_clients = time.monotonic()
        for i in range(clients):
            spec = {"id": i, "address": bus.address, "calls": calls, "warm": warm, "timeout": timeout,
                    "seed": rng.getrandbits(32), "shared": shared_uuids, "churn": churn_uuids,
                    "own_present": False, "mix": MIX, "churn_share": CHURN_SHARE, "prime": prime,
                    "private": shared_uuids[0],
                    "reconnect_every": calls // (connections - 1) if connections > 1 else 0}
            err = tmp / f"client-{i}.err"
            if i < n_root:
                cl.start([sys.executable, str(script), json.dumps(spec)], dict(env), err)
            else:
                base = harness.user_env(user, {k: v for k, v in env.items() if k != "PYTHONPATH"})
                cl.start(harness.as_user(user, unpriv.argv(str(script), json.dumps(spec))), unpriv.env(base), err)
        # Generous caps: a stalled daemon shows up as client-side call timeouts long before.
        if prime:
            cl.lines(120.0)
            cl.release()
        first = cl.lines(max(120.0, calls * 0.1) + (300.0 if prime else 0))
        res.warm = proc_status(daemon.pid)
        res.warmup_seconds = time.monotonic() - t_clients
        if trace_memory:
            _snapshot(daemon, tmp / "snapshot.1")
        say(f"warm-up done; daemon VmRSS {res.warm.get('VmRSS', 0) / 1024:.1f} MB")
        sampler = Sampler(daemon.pid)
        sampler.start()
        t0 = time.monotonic()
        cl.release()
        try:
            second = cl.lines(max(300.0, calls * 0.5))
        finally:
            sampler.stop()
        res.seconds = time.monotonic() - t0
        res.end = proc_status(daemon.pid)
        if trace_memory:
            _snapshot(daemon, tmp / "snapshot.2")
            res.memory_diff = _compare(tmp / "snapshot.1", tmp / "snapshot.2")
        res.rss_series = sampler.samples
        cl.release()
        results = cl.lines(60)
        for i, (a, b, r) in enumerate(zip(first, second, results, strict=False)):
            if a is None or b is None or r is None or "counts" not in r:
                res.dead_clients += 1
                res.samples.append(f"client {i} died: {cl.stderr(i).strip()[-500:]}")
                continue
            res.uids[r["uid"]] = res.uids.get(r["uid"], 0) + 1
            res.connections += r["names"]
            for k, v in r["counts"].items():
                res.counts[k] = res.counts.get(k, 0) + v
            for k, xs in r["lat"].items():
                res.latencies.setdefault(k, []).extend(xs)
                res.main_calls += len(xs)
            for d, src in ((res.expected, r["expected"]), (res.unexpected, r["unexpected"])):
                for k, v in src.items():
                    d[k] = d.get(k, 0) + v
            res.samples += r["samples"]
        for p in cl.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.3)
        res.after = proc_status(daemon.pid)
        if daemon.poll() is not None:
            res.samples.append(f"secretbusd exited with {daemon.returncode}")
            res.unexpected["secretbusd exited during the soak"] = 1
        res.log_errors = [line for line in log.read_text(errors="replace").splitlines()
                          if " ERROR " in line or " CRITICAL " in line or "Traceback" in line]
        res.polkit_failures = sum("failed, denying" in line for line in res.log_errors)
        res.polkitd_stalls = pk.log().count("Terminating runaway script")
    finally:
        cl.stop()
        harness.stop_process(daemon)
        journal.close()
        failed = res.unexpected_total or res.dead_clients or res.log_errors or sys.exc_info()[0] is not None
        if failed or keep:
            # Logs outlive the run when something went wrong (polkitd's and the bus's dirs go on stop).
            keep_dir = Path(tempfile.mkdtemp(prefix="sb-soak-logs-"))
            for src in [tmp / "secretbusd.log", *sorted(tmp.glob("client-*.err")),
                        *(x.log_path for x in (pk, bus) if x is not None and x.dir is not None)]:
                if src.exists():
                    shutil.copyfile(src, keep_dir / src.name)
            res.logs_kept = str(keep_dir)
            say(f"logs kept in {keep_dir}")
        for part in (pk, bus):
            if part is not None:
                part.stop()
        if not keep:
            remove_tree(tmp)
        else:
            say(f"kept {tmp}")
    res.load = (res.load[0], os.getloadavg()[0])
    res.total_seconds = time.monotonic() - t_start
    return res


def _ms(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"


def rows(res: SoakResult) -> list[tuple[str, object, str]]:
    """(figure, value, goal) rows; goals in bench/reliability.py's syntax."""
    p = "soak: "
    out: list[tuple[str, object, str]] = [
        (p + "clients x calls", f"{res.clients} x {res.calls} ({res.root_clients} root, "
                                f"{res.member_clients} {MEMBER}; by uid: "
                                f"{', '.join(f'{u}: {n}' for u, n in sorted(res.uids.items()))})", "-"),
        (p + "calls made", sum(res.counts.values()), f"= {res.clients * res.calls}"),
        (p + "unexpected errors", res.unexpected_total, "0"),
        (p + "client processes that died", res.dead_clients, "0"),
        (p + "expected errors (NoSecret on churn secrets, private GetValue by root, SetValue across a redefine)",
         res.expected_total, "-"),
        (p + "bus connections made by the clients", res.connections, "-"),
        (p + "calls/s overall (after warm-up)", round(res.rate), "-"),
        (p + "seconds: priming + warm-up / measured part", f"{res.warmup_seconds:.1f} / {res.seconds:.1f}", "-"),
    ]
    for kind in [*MIX, "Reconnect"]:
        if res.latencies.get(kind):
            out.append((p + f"{kind} p50 / p99 ms (n={len(res.latencies[kind])})",
                        f"{_ms(res.pct(kind, 0.5))} / {_ms(res.pct(kind, 0.99))}", "-"))
    mb = lambda d: f"{d.get('VmRSS', 0) / 1024:.1f} MB"  # noqa: E731
    peak = max([r for _, r in res.rss_series] + [res.warm.get("VmRSS", 0), res.end.get("VmRSS", 0)])
    out += [
        (p + "daemon VmRSS after warm-up / at end / peak sampled / clients gone",
         f"{mb(res.warm)} / {mb(res.end)} / {peak / 1024:.1f} MB / {mb(res.after)}", "-"),
        (p + "daemon VmRSS drift after warm-up (%)", round(res.drift, 1), "< 10"),
        (p + "daemon open fds, end - warm-up", res.end.get("fds", 0) - res.warm.get("fds", 0), "0"),
        (p + "daemon error log lines", len(res.log_errors), "0"),
        (p + "of which polkit checks that failed (timeout or error; the caller is denied)", res.polkit_failures, "0"),
        (p + "polkitd stalls ('Terminating runaway script after 15 seconds')", res.polkitd_stalls, "-"),
    ]
    cpu = res.end.get("cpu_ticks", 0) - res.warm.get("cpu_ticks", 0)
    if res.main_calls:
        out.append((p + "daemon CPU per call (µs, after warm-up)",
                    round(cpu / os.sysconf("SC_CLK_TCK") / res.main_calls * 1e6), "-"))
    return out


def figures(size: str = "small") -> list[tuple[str, object, str]]:
    """Rows for bench/reliability.py: small = 8 clients x 300 calls, full = 32 x 5,000."""
    clients, calls = SIZES.get(size, SIZES["full"])
    return rows(run(clients, calls))


def _unwind_on_signals() -> None:
    """SIGTERM / SIGHUP unwind like Ctrl-C, so every process started is stopped by PID."""
    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--clients", type=int, help="override the size's client count")
    ap.add_argument("--calls", type=int, help="override the size's calls per client")
    ap.add_argument("--root-share", type=float, default=0.5, help="fraction of clients that run as root")
    ap.add_argument("--shared", type=int, default=32, help="shared secrets (never undefined)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--timeout", type=float, default=30.0, help="per-call timeout in the clients")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (store, logs)")
    ap.add_argument("--connections", type=int, default=CONNECTIONS_PER_CLIENT,
                    help="bus connections per client over its run (reconnects evenly spaced)")
    ap.add_argument("--no-prime", action="store_true",
                    help="skip the priming sweep (polkit decision cache fills during the measured part)")
    ap.add_argument("--trace-memory", action="store_true",
                    help="run the daemon under tracemalloc and show what grew after warm-up (slower)")
    ap.add_argument("--json", metavar="FILE", help="also write the raw result (latencies included) here")
    a = ap.parse_args(argv)
    _unwind_on_signals()
    clients, calls = SIZES[a.size]
    clients, calls = a.clients or clients, a.calls or calls
    res = run(clients, calls, root_share=a.root_share, shared=a.shared, seed=a.seed, timeout=a.timeout,
              keep=a.keep, connections=a.connections, prime=not a.no_prime, trace_memory=a.trace_memory,
              progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"soak: {clients} clients x {calls} calls on a private system bus with polkitd; "
          f"{os.cpu_count()} CPUs; load average {res.load[0]:.2f} at start, {res.load[1]:.2f} at end; "
          f"{res.total_seconds:.1f} s in all")
    print("| figure | value | goal |\n|---|---|---|")
    for f, v, g in rows(res):
        print(f"| {f} | {v} | {g} |")
    if res.unexpected:
        print("\nunexpected errors by kind:")
        for k, v in sorted(res.unexpected.items(), key=lambda kv: -kv[1]):
            print(f"  {v:6d}  {k}")
    if res.expected:
        print("\nexpected errors by kind:")
        for k, v in sorted(res.expected.items(), key=lambda kv: -kv[1]):
            print(f"  {v:6d}  {k}")
    for s in res.samples[:20]:
        print("  " + s)
    for line in res.log_errors[:10]:
        print("  log: " + line)
    if res.logs_kept:
        print(f"\nlogs (secretbusd, polkitd, dbus-daemon, clients' stderr) kept in {res.logs_kept}")
    if a.trace_memory:
        print("\n(--trace-memory: tracemalloc's own bookkeeping grows with the heap, so VmRSS drift is not judged)")
    if res.memory_diff:
        print("\nPython allocations that grew after warm-up (tracemalloc, by traceback, innermost first):")
        for line in res.memory_diff:
            print("  " + line)
    series = res.rss_series
    if series:
        step = max(1, len(series) // 12)
        print("\nVmRSS samples (s: MB): " + ", ".join(f"{t:.0f}: {r / 1024:.1f}" for t, r in series[::step]))
    if a.json:
        Path(a.json).write_text(json.dumps(res.__dict__, default=str))
    ok = (res.unexpected_total == 0 and res.dead_clients == 0 and (a.trace_memory or res.drift < 10)
          and not res.log_errors and sum(res.counts.values()) == clients * calls)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

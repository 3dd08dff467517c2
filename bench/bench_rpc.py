#!/usr/bin/env python3
"""secretbusd against libvirt's own libvirtd 9.0 over libvirt RPC, from the same clients, in one run.

    .venv/bin/python bench/bench_rpc.py [--quick] [--secrets N] [--calls N] [--seconds S]
                                        [--rounds R] [--no-libvirtd] [--no-ceiling] [--dir DIR]
                                        [--audit MODE]

Builds one store of N (default 10,000) persistent volume secrets in libvirt's layout
(`<uuid>.xml` + `<uuid>.base64`: libvirt 9.0 has no encryption at rest, so both servers
read and write the same plain format) and gives each server its own copy:

  * secretbusd: `--session --root DIR --no-dbus --rpc-dir DIR` (its RPC front end only), its
    audit records (one per GetValue) sent to a stand-in for journald's socket, as on a systemd
    host (journal_standin.py; `--journal host`: the host's socket, absent without journald);
  * libvirtd 9.0 (Debian's `libvirt-daemon`; apt-get installed if missing) in its own mount
    namespace (`unshare -m`): tmpfs over /run (so /run/libvirt is private), the private
    config dir bound over /etc/libvirt (libvirtd.conf with its socket dir in DIR, no auth;
    the secrets dir holds the copy), and a driver dir holding only the secret driver bound
    over libvirt's connection-driver dir (no network, storage, qemu… drivers).

Two clients, each against both servers, rows interleaved per round (the order alternates)
so that a burst of load on the machine hits both alike:

  * python3-libvirt (Debian's /usr/bin/python3), one call at a time, as an application uses it;
  * the project's asyncio client (secretbus.rpc.client) with 16 calls in flight on one
    connection (max_client_requests: libvirtd works on at most 5 of them at once, its default;
    secretbusd on all 16, its default, so that they share a group commit).

A third server on the read rows (`--no-ceiling`: without it): bench/null_rpc.py, which answers
with replies made once at start and does no work per call, on secretbusd's own event loop (which
polls for 50 µs before it sleeps, core/busypoll.py). Its rate is each client's ceiling on
this machine (the client's own CPU and the wake-ups between two processes): where it is under
1.5× libvirtd's, no server could meet the read goal with that client here.

Rows: lookup (LookupByUUID), GetValue, GetXMLDesc, ListAll (all N secrets), define (a new
secret), set (its value) and undefine (it again). Each read row is first run untimed (up to
WARM_CALLS calls or WARM_SECONDS, ListAll a few calls) on the same connection: after 2 s idle,
libvirtd's CPU per call here is 4–5× its steady figure (80–100 against 19 µs) for its next
~5,000 calls with 16 in flight (secretbusd's ~1.3×, ~1,000 calls), so an unwarmed first row
measured libvirtd waking up, not its rate. Rates are medians over the rounds; p50/p99
pool every latency. "srv µs/call" is the server's CPU (all threads, /proc/PID/task/*/schedstat)
per call. The goal of issue 13: every read ≥ 1.5× libvirtd's rate, every write ≥ 1×. Every
process is started in its own session and stopped by PID, on errors and Ctrl-C too.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))      # journal_standin, when loaded as a module (tests)

from journal_standin import JournalStandIn  # noqa: E402

from secretbus.rpc import protocol as P  # noqa: E402
from secretbus.rpc.client import AsyncRpcClient  # noqa: E402
from secretbus.rpc.transport import UnixTransport  # noqa: E402

READS = ("lookup", "value", "xml", "list")
WRITES = ("define", "set", "undefine")
LABELS = {"lookup": "LookupByUUID", "value": "GetValue", "xml": "GetXMLDesc", "list": "ListAll",
          "define": "DefineXML (new)", "set": "SetValue", "undefine": "Undefine"}
GOAL = {**{op: 1.5 for op in READS}, **{op: 1.0 for op in WRITES}}
INFLIGHT = 16
HANDLES = 256                  # secrets the value/xml rows pick from (looked up untimed)
WARM_CALLS, WARM_SECONDS = 6000, 0.4   # untimed calls before each read row (at most --calls, --seconds)
WARM_LIST = 3                  # ListAll of N secrets: a few calls warm it
DEBIAN_PYTHON = "/usr/bin/python3"
LIBVIRTD = Path("/usr/sbin/libvirtd")
DRIVER_DIR = Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver")
VALUE = b"bench-value-32-bytes-long-abcdef"
NULL = "no-work server"         # bench/null_rpc.py, the read rows only


# -- the store ------------------------------------------------------------------------------
def uuid_of(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i:012x}"


def volume_of(i: int) -> str:
    return f"/var/lib/libvirt/images/{i}.img"


def scratch_uuid(tag: int, i: int) -> str:
    return f"ffffffff-{tag:04x}-4000-8000-{i:012x}"


def secret_xml(uuid: str, usage: str) -> str:
    # libvirt's canonical form, as both servers write it
    return (f"<secret ephemeral='no' private='no'>\n  <uuid>{uuid}</uuid>\n  <usage type='volume'>\n"
            f"    <volume>{usage}</volume>\n  </usage>\n</secret>\n")


def build_store(d: Path, n: int) -> None:
    import base64
    d.mkdir(mode=0o700, parents=True)
    value = base64.b64encode(VALUE).decode()
    for i in range(n):
        u = uuid_of(i)
        for name, text in ((f"{u}.xml", secret_xml(u, volume_of(i))), (f"{u}.base64", value)):
            fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)


# -- servers --------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    open_name: str                 # CONNECT_OPEN's name
    socket: Path
    proc: subprocess.Popen

    @property
    def uri(self) -> str:          # for python3-libvirt
        return f"{self.open_name}?socket={self.socket}"


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], what: str, log: Path, **kw: Any) -> subprocess.Popen:
        from harness.procs import spawn
        p = spawn(argv, what=what, log=log, **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        from harness.procs import stop_process
        for p in reversed(self.procs):
            try:
                stop_process(p)
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                print(f"warning: could not stop pid {p.pid}: {e}", file=sys.stderr)
        self.procs.clear()


async def _probe(socket: Path, name: str) -> int:
    c = await AsyncRpcClient.connect(UnixTransport(socket))
    try:
        await c.open(name, keepalive=None)
        return int((await c.call(P.Proc.CONNECT_NUM_OF_SECRETS))["num"])
    finally:
        await c.close()


def wait_ready(s: Server, n: int, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if s.proc.poll() is not None:
            raise SystemExit(f"{s.name} exited with {s.proc.returncode}:\n{log.read_text()[-2000:]}")
        if s.socket.exists():
            try:
                if asyncio.run(_probe(s.socket, s.open_name)) == n:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{s.name} not ready after {timeout} s:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)


def start_secretbusd(procs: Procs, work: Path, store: Path, n: int, audit: str | None = None,
                     journal: JournalStandIn | None = None) -> Server:
    root, sock = work / "sb-root", work / "sb-sock"
    (root / "etc").mkdir(mode=0o700, parents=True)
    shutil.copytree(store, root / "etc" / "secrets")
    sock.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "LISTEN_FDS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if journal is not None:
        env.update(journal.env())
    log = work / "secretbusd.log"
    p = procs.spawn([sys.executable, "-m", "secretbus.daemon", "--session", "--root", str(root), "--no-dbus",
                     "--rpc-dir", str(sock), *(["--audit", audit] if audit else [])], "secretbusd", log, env=env)
    s = Server("secretbusd", "secret:///session", sock / "virtsecretd-sock", p)
    wait_ready(s, n, log)
    return s


def start_null(procs: Procs, work: Path, n: int) -> Server:
    """bench/null_rpc.py: the read rows' replies made once, no work per call (the clients' ceiling)."""
    sock = work / "null-sock"
    sock.mkdir(mode=0o700)
    log = work / "null.log"
    p = procs.spawn([sys.executable, str(REPO / "bench" / "null_rpc.py"), str(sock / "sock"), str(n)], "null_rpc", log)
    s = Server(NULL, "secret:///session", sock / "sock", p)
    wait_ready(s, n, log)
    return s


def ensure_libvirtd() -> None:
    if LIBVIRTD.exists():
        return
    print("libvirtd missing: apt-get install libvirt-daemon", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600",
                    "libvirt-daemon"], check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


# $4, if not empty: a private system bus's socket, bound where libvirt's GDBus connects to it (so
# a polkitd on that bus is the one libvirtd asks; tests/test_libvirtd_polkit_diff.py); $5: its
# extra options (--listen: the TLS and TCP listeners of its conf).
LIBVIRTD_NS = """set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/libvirt
if [ -n "${4:-}" ]; then
  mkdir -p /run/dbus
  : > /run/dbus/system_bus_socket
  mount --bind "$4" /run/dbus/system_bus_socket
fi
mount --bind "$1/etc" /etc/libvirt
mount --bind "$1/drivers" "$2"
exec "$3" ${5:-} -f "$1/etc/libvirtd.conf"
"""
# libvirtd.conf lines of the benchmark's libvirtd: root only, no authentication
AUTH_NONE = ('unix_sock_rw_perms = "0700"', 'unix_sock_ro_perms = "0700"', 'auth_unix_rw = "none"',
             'auth_unix_ro = "none"', 'log_outputs = "3:stderr"')


def start_libvirtd(procs: Procs, work: Path, store: Path, n: int, conf: Iterable[str] = AUTH_NONE,
                   bus_socket: str | None = None, public: bool = False, listen: bool = False,
                   env: dict[str, str] | None = None) -> Server:
    """libvirtd with only its secret driver and a copy of `store`, in its own mount namespace,
    ready when it serves `n` secrets (asked as root). `conf`: its libvirtd.conf lines besides
    the socket directory; `bus_socket`: a private system bus for it (its polkit); `public`: its
    socket directory reachable by every uid (the sockets' perms are `conf`'s); `listen`: its
    TLS and TCP listeners as `conf` says; `env`: added to its environment."""
    ensure_libvirtd()
    lv = work / "lv"
    (lv / "etc").mkdir(mode=0o700, parents=True)
    shutil.copytree(store, lv / "etc" / "secrets")
    (lv / "sock").mkdir(mode=0o755 if public else 0o700)
    if public:
        for d in (work, lv):
            d.chmod(0o755)
    (lv / "drivers").mkdir()
    shutil.copy2(DRIVER_DIR / "libvirt_driver_secret.so", lv / "drivers")
    (lv / "etc" / "libvirtd.conf").write_text(
        f'unix_sock_dir = "{lv / "sock"}"\n' + "".join(f"{c}\n" for c in conf))
    (lv / "ns.sh").write_text(LIBVIRTD_NS)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DBUS_", "NOTIFY_SOCKET", "LISTEN_"))}
    log = work / "libvirtd.log"
    p = procs.spawn(["unshare", "-m", "--propagation", "private", "sh", str(lv / "ns.sh"), str(lv),
                     str(DRIVER_DIR), str(LIBVIRTD), bus_socket or "", "--listen" if listen else ""], "libvirtd",
                    log, env={**environ, **(env or {})})
    s = Server("libvirtd", "secret:///system", lv / "sock" / "libvirt-sock", p)
    wait_ready(s, n, log)
    return s


# -- measurements ---------------------------------------------------------------------------
@dataclass
class Sample:
    calls: int
    seconds: float
    lat: list[float]               # seconds per call
    cpu_ns: int = 0

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0


def cpu_ns(pid: int) -> int:
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        pass
    return total


PY_CHILD = r"""
import json, random, sys, time
import libvirt
libvirt.registerErrorHandler(lambda *a: None, None)
import os
uri, group, max_calls, seconds, n, tag, handles, pid, warm, warm_s, warm_list = sys.argv[1:]
max_calls, seconds, n, tag, handles = int(max_calls), float(seconds), int(n), int(tag), int(handles)
warm, warm_s, warm_list = int(warm), float(warm_s), int(warm_list)

def cpu_ns():
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total
conn = libvirt.open(uri)
rnd = random.Random(tag)
uuid_of = lambda i: f"{i:08x}-0000-4000-8000-{i:012x}"
scratch = lambda i: f"ffffffff-{tag:04x}-4000-8000-{i:012x}"
xml = lambda u: (f"<secret ephemeral='no' private='no'>\n  <uuid>{u}</uuid>\n  <usage type='volume'>\n"
                 f"    <volume>/bench/{u}</volume>\n  </usage>\n</secret>\n")
out = {}

def run(name, fn, items, timed=True, warm=0):
    t_warm = time.perf_counter() + warm_s
    for i, item in enumerate(items):      # untimed, the same calls
        if i >= warm or time.perf_counter() > t_warm:
            break
        fn(item)
    lat = []
    c0 = cpu_ns()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    for i, item in enumerate(items):
        if i >= max_calls or (timed and time.perf_counter() > deadline):
            break
        t = time.perf_counter()
        fn(item)
        lat.append(time.perf_counter() - t)
    out[name] = [len(lat), time.perf_counter() - t0, lat, cpu_ns() - c0]
    return len(lat)

def randoms():
    while True:
        yield rnd.randrange(n)

if group == "reads":
    hs = [conn.secretLookupByUUIDString(uuid_of(rnd.randrange(n))) for _ in range(handles)]
    run("lookup", lambda i: conn.secretLookupByUUIDString(uuid_of(i)), randoms(), warm=warm)
    run("value", lambda i: hs[i % len(hs)].value(), randoms(), warm=warm)
    run("xml", lambda i: hs[i % len(hs)].XMLDesc(0), randoms(), warm=warm)
    run("list", lambda i: conn.listAllSecrets(0), randoms(), warm=warm_list)
else:
    k = run("define", lambda i: conn.secretDefineXML(xml(scratch(i))), range(max_calls))
    hs = [conn.secretLookupByUUIDString(scratch(i)) for i in range(k)]
    run("set", lambda s: s.setValue(b"bench-value-32-bytes-long-abcdef"), hs, timed=False)
    run("undefine", lambda s: s.undefine(), hs, timed=False)
conn.close()
print(json.dumps(out))
"""


def warm_up(a: argparse.Namespace) -> tuple[int, float, int]:
    """Each read row's untimed calls, its time cap for them, and ListAll's calls."""
    return min(WARM_CALLS, a.calls), min(WARM_SECONDS, a.seconds), min(WARM_LIST, a.calls)


def py_measure(s: Server, group: str, a: argparse.Namespace, tag: int) -> dict[str, Sample]:
    r = subprocess.run([DEBIAN_PYTHON, "-c", PY_CHILD, s.uri, group, str(a.calls if group == "reads" else a.writes),
                        str(a.seconds), str(a.secrets), str(tag), str(HANDLES), str(s.proc.pid),
                        *map(str, warm_up(a))],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"python3-libvirt against {s.name} failed:\n{r.stderr[-2000:]}")
    return {op: Sample(c, secs, lat, cpu) for op, (c, secs, lat, cpu) in json.loads(r.stdout).items()}


async def _pump(c: AsyncRpcClient, proc: int, items: Iterator[Any], *, max_calls: int, seconds: float | None,
                cpu: Callable[[], int]) -> Sample:
    lat: list[float] = []
    t0 = time.perf_counter()
    deadline = None if seconds is None else t0 + seconds
    c0 = cpu()
    state = {"n": 0}

    async def worker() -> None:
        while state["n"] < max_calls and (deadline is None or time.perf_counter() < deadline):
            try:
                args = next(items)
            except StopIteration:
                return
            state["n"] += 1
            t = time.perf_counter()
            await c.call(proc, args)
            lat.append(time.perf_counter() - t)
    await asyncio.gather(*(worker() for _ in range(INFLIGHT)))
    return Sample(len(lat), time.perf_counter() - t0, lat, cpu() - c0)


async def raw_measure(s: Server, group: str, a: argparse.Namespace, tag: int) -> dict[str, Sample]:
    c = await AsyncRpcClient.connect(UnixTransport(s.socket))
    await c.open(s.open_name, keepalive=None)
    rnd = random.Random(tag)
    pid = s.proc.pid

    def cpu() -> int:
        return cpu_ns(pid)

    def handle(u: str) -> dict[str, Any]:
        return {"uuid": uuidlib.UUID(u).bytes, "usageType": 1, "usageID": ""}

    def randoms(make: Callable[[int], Any]) -> Iterator[Any]:
        while True:
            yield make(rnd.randrange(a.secrets))
    out: dict[str, Sample] = {}
    try:
        if group == "reads":
            warm_calls, warm_s, warm_list = warm_up(a)
            for op, proc, make, warm in (
                    ("lookup", P.Proc.SECRET_LOOKUP_BY_UUID, lambda i: {"uuid": uuidlib.UUID(uuid_of(i)).bytes},
                     warm_calls),
                    ("value", P.Proc.SECRET_GET_VALUE, lambda i: {"secret": handle(uuid_of(i)), "flags": 0},
                     warm_calls),
                    ("xml", P.Proc.SECRET_GET_XML_DESC, lambda i: {"secret": handle(uuid_of(i)), "flags": 0},
                     warm_calls),
                    ("list", P.Proc.CONNECT_LIST_ALL_SECRETS, lambda i: {"need_results": 1, "flags": 0},
                     warm_list)):
                items = randoms(make)
                await _pump(c, proc, items, max_calls=warm, seconds=warm_s, cpu=cpu)   # untimed
                out[op] = await _pump(c, proc, items, max_calls=a.calls, seconds=a.seconds, cpu=cpu)
        else:
            uuids = [scratch_uuid(tag, i) for i in range(a.writes)]
            d = await _pump(c, P.Proc.SECRET_DEFINE_XML, iter({"xml": secret_xml(u, f"/bench/{u}"), "flags": 0}
                                                               for u in uuids), max_calls=a.writes,
                            seconds=a.seconds, cpu=cpu)
            done = uuids[:d.calls]
            out["define"] = d
            out["set"] = await _pump(c, P.Proc.SECRET_SET_VALUE, iter({"secret": handle(u), "value": VALUE,
                                     "flags": 0} for u in done), max_calls=len(done), seconds=None, cpu=cpu)
            out["undefine"] = await _pump(c, P.Proc.SECRET_UNDEFINE, iter({"secret": handle(u)} for u in done),
                                          max_calls=len(done), seconds=None, cpu=cpu)
    finally:
        await c.close()
    return out


# -- report ---------------------------------------------------------------------------------
def fs_type(path: Path) -> str:
    try:
        out = subprocess.run(["df", "--output=fstype", str(path)], capture_output=True, text=True, timeout=10)
        return out.stdout.split()[-1]
    except Exception:  # noqa: BLE001
        return "?"


def pct(sorted_lat: list[float], p: float) -> float:
    if not sorted_lat:
        return float("nan")
    return sorted_lat[min(len(sorted_lat) - 1, int(round(p / 100 * (len(sorted_lat) - 1))))]


@dataclass
class Cell:
    samples: list[Sample] = field(default_factory=list)

    def rate(self) -> float:
        return statistics.median(x.rate for x in self.samples) if self.samples else float("nan")

    def lat(self, p: float) -> float:
        return pct(sorted(v for x in self.samples for v in x.lat), p) * 1000

    def cpu_us(self) -> float:
        calls = sum(x.calls for x in self.samples)
        return sum(x.cpu_ns for x in self.samples) / calls / 1000 if calls else float("nan")


def table(cells: dict[tuple[str, str, str], Cell], servers: list[str]) -> str:
    """One row per (client, call): each server's figures, then secretbusd ÷ libvirtd against the
    goal; with the no-work server, its rate (reads) and that rate ÷ libvirtd's: under the goal,
    no server could meet it with that client here."""
    ceiling = NULL in servers
    servers = [s for s in servers if s != NULL]
    head = ["client", "call"]
    for s in servers:
        head += [f"{s} calls/s", "p50 ms", "p99 ms", "srv µs/call"]
    if len(servers) == 2:
        head += ["ratio", "goal"]
    if ceiling:
        head += [f"{NULL} calls/s", "its ÷ libvirtd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for client in ("python3-libvirt", f"asyncio ×{INFLIGHT}"):
        for op in (*READS, *WRITES):
            if not any((client, op, s) in cells for s in servers):
                continue                 # not measured (--only)
            row = [client, LABELS[op]]
            rates = []
            for s in servers:
                c = cells.get((client, op, s), Cell())
                rates.append(c.rate())
                row += [f"{c.rate():,.0f}", f"{c.lat(50):.2f}", f"{c.lat(99):.2f}", f"{c.cpu_us():.0f}"]
            if len(servers) == 2:
                ratio = rates[0] / rates[1] if rates[1] else float("nan")
                row += [f"{ratio:.2f}×", ("yes" if ratio >= GOAL[op] else "NO") + f" (≥ {GOAL[op]:g})"]
            if ceiling:
                null = cells.get((client, op, NULL))
                if null is None:
                    row += ["–", "–"]
                else:
                    lv = rates[1] if len(rates) == 2 else 0.0
                    row += [f"{null.rate():,.0f}", f"{null.rate() / lv:.2f}×" if lv > 0 else "–"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few secrets and calls")
    ap.add_argument("--secrets", type=int, help="secrets in the store (default 10000; --quick: 50)")
    ap.add_argument("--calls", type=int, help="read calls per measurement at most (default 3000; --quick: 30)")
    ap.add_argument("--writes", type=int, help="define/set/undefine calls per measurement (default 300; --quick: 10)")
    ap.add_argument("--seconds", type=float, help="time cap per measurement (default 2; --quick: 0.3)")
    ap.add_argument("--rounds", type=int, help="rounds; rates are medians (default 3; --quick: 1)")
    ap.add_argument("--no-libvirtd", action="store_true", help="secretbusd only (no comparison)")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="without the no-work server (bench/null_rpc.py) that shows each client's ceiling on the reads")
    ap.add_argument("--only", choices=("reads", "writes"), help="measure only the read or the write rows")
    ap.add_argument("--dir", metavar="DIR", help="parent of the temporary directory (default: $TMPDIR)")
    ap.add_argument("--audit", choices=("required", "best-effort", "off"),
                    help="secretbusd's --audit (default: the session's, best-effort). libvirtd keeps no record "
                         "of value reads; secretbusd writes one per GetValue to the journal")
    ap.add_argument("--journal", choices=("standin", "host"), default="standin",
                    help="where secretbusd's audit records go: a stand-in for journald's socket that drops "
                         "them (default: a systemd host's cost without journald's own; journal_standin.py), "
                         "or the host's /run/systemd/journal/socket (absent on a host without journald: "
                         "each record then fails at once)")
    a = ap.parse_args()
    q = a.quick
    a.secrets = a.secrets or (50 if q else 10000)
    a.calls = a.calls or (30 if q else 3000)
    a.writes = a.writes or (10 if q else 300)
    a.seconds = a.seconds or (0.3 if q else 2.0)
    a.rounds = a.rounds or (1 if q else 3)
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="sb-bench-rpc-", dir=a.dir))
    procs = Procs()
    journal = JournalStandIn(work).start() if a.journal == "standin" else None
    try:
        store = work / "store"
        t = time.perf_counter()
        build_store(store, a.secrets)
        print(f"store: {a.secrets} secrets in libvirt's layout ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
        servers = [start_secretbusd(procs, work, store, a.secrets, a.audit, journal)]
        if not a.no_libvirtd:
            servers.append(start_libvirtd(procs, work, store, a.secrets))
        if not a.no_ceiling and a.only != "writes":
            servers.append(start_null(procs, work, a.secrets))
        cells: dict[tuple[str, str, str], Cell] = {}
        tag = 0
        for r in range(a.rounds):
            order = servers if r % 2 == 0 else servers[::-1]
            for group in (a.only,) if a.only else ("reads", "writes"):
                for s in order:
                    if s.name == NULL and group != "reads":
                        continue
                    tag += 1
                    for op, x in py_measure(s, group, a, tag).items():
                        cells.setdefault(("python3-libvirt", op, s.name), Cell()).samples.append(x)
                    tag += 1
                    for op, x in asyncio.run(raw_measure(s, group, a, tag)).items():
                        cells.setdefault((f"asyncio ×{INFLIGHT}", op, s.name), Cell()).samples.append(x)
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
        load1 = os.getloadavg()
        procs.stop_all()
        if journal is not None:
            received = journal.stop()
            where = f"{journal.describe()}: {'?' if received is None else received} records received"
        else:
            where = f"journal socket {'present' if os.path.exists('/run/systemd/journal/socket') else 'absent'}"
        print(f"# bench_rpc: {a.secrets} secrets, ≤ {a.calls} reads / {a.writes} writes per measurement, "
              f"{a.seconds:g} s cap, {a.rounds} rounds; secretbusd audit {a.audit or 'best-effort'} ({where}); "
              f"{os.cpu_count()} CPUs, load average "
              f"{load0[0]:.2f} at start, {load1[0]:.2f} at end; stores on {fs_type(work)}\n")
        print(table(cells, [s.name for s in servers]))
        if any(s.name == NULL for s in servers):
            print(f"\n{NULL}: bench/null_rpc.py, every reply made once at start (no store, no checks, no audit); "
                  "its rate is the most a server could give that client on this machine.")
    finally:
        procs.stop_all()
        if journal is not None:
            journal.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

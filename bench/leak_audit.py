#!/usr/bin/env python3
"""Leak audit: secret values (and the encryption key) must appear nowhere the service writes.

    python bench/leak_audit.py [--keep]

Run as root. Every value stored in the run is a fresh random sentinel; the audit then looks for
each sentinel (and the key) in raw form, as base64 at all three byte alignments, as hex (lower
and upper case) and as Python's repr escaping, in:

  - the daemon's stderr (started with -v, so debug logging is on);
  - every journal entry it sent: logging goes to an emulated journald (harness/journal.py: the
    native-protocol socket at /run/systemd/journal/socket, JOURNAL_STREAM set), all fields;
  - every D-Bus message the service sent (signals, replies, errors, its polkit calls) except
    the replies to GetValue, which carry the value by design: a root `dbus-monitor --pcap`
    records each bus from before the daemon starts;
  - every D-Bus error reply on the bus, whoever sent it (dbus-daemon's AccessDenied too);
  - the CLI's stderr, and its stdout except that of secret-get-value;
  - files: the instance root (secret.conf, the encrypted store, the lock file; the key file is
    not searched for the key), and files created or modified during the run under /tmp,
    /var/tmp, /dev/shm, /run and /root (this audit's own inputs and captures excepted);
  - the logs of the other daemons (dbus-daemon, polkitd);
  - core dumps: any core file that appeared; and, separately, a deliberate crash (SIGABRT with
    RLIMIT_CORE unlimited, core_pattern permitting) of a daemon holding a value.

Scenarios: (1) session bus, root daemon, encrypted store: D-Bus calls that set, replace, read and
refuse values (private, bad flags, too large, wrong signature, unknown object, read-only
property), ephemeral->persistent, persistent->ephemeral, undefine, SIGHUP reload, restart; the
CLI with --file, --plain, base64 files, --interactive, invalid base64, an unknown UUID, a value
on the command line, secret-event listening. (2) system bus with the shipped bus policy, real
polkitd with the shipped actions and a rule that denies one secret to group libvirt: root,
sbtest-member (libvirt, private_value_readers) and sbtest-other (bus-denied) set and read
values, over D-Bus and with the CLI. (3) the crash.

Also in-process: the driver keeps values in bytearrays and zeroes them when a value is replaced,
a secret undefined, a reload drops it, or the driver closes (`wipe_check()`).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import resource
import secrets as pysecrets
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402
from corruption import CONNECT_PATH, SyncBus, spath  # noqa: E402
from harness.journal import JournalSocket, stream_env  # noqa: E402
from harness.procs import remove_tree  # noqa: E402

BUS_NAME = "org.libvirt.secret"
SECRET = "org.libvirt.Secret"
CONNECT = "org.libvirt.Connect"
MEMBER, OTHER = "sbtest-member", "sbtest-other"
BUS_CONF = REPO / "dbus" / "org.libvirt.secret.conf"
POLICY = REPO / "polkit" / "org.libvirt.api.secret.policy"
SCAN_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/root")

CATEGORIES = {
    "stderr": "daemon stderr",
    "journal": "journal entries (all fields)",
    "dbus": "D-Bus messages sent by the service (except GetValue replies)",
    "dbus-errors": "D-Bus error replies (any sender)",
    "cli": "CLI stderr and non-value stdout",
    "files": "files outside the encrypted store",
    "store": "encrypted store files",
    "other-logs": "dbus-daemon and polkitd logs",
    "core": "core dumps found after the scenarios",
}


# -- what to look for ----------------------------------------------------------------------
def forms(value: bytes) -> list[tuple[str, bytes]]:
    """Representations a leak could take. base64 depends on where the value starts modulo 3,
    so for each alignment the part of the encoding fixed by the value alone is searched."""
    out = [("raw", value), ("hex", value.hex().encode()), ("HEX", value.hex().upper().encode()),
           ("repr", repr(value)[2:-1].encode())]
    for j in range(3):
        sub = value[j:]
        sub = sub[:len(sub) // 3 * 3]
        if len(sub) >= 12:
            out.append((f"base64@{j}", base64.b64encode(sub)))
            out.append((f"urlsafe-base64@{j}", base64.urlsafe_b64encode(sub)))
    seen, uniq = set(), []
    for name, f in out:
        if f not in seen:
            seen.add(f)
            uniq.append((name, f))
    return uniq


def sentinel(tag: str) -> bytes:
    """A fresh value: printable part (found even when escaped) + binary part (NUL, 0xff)."""
    return f"SbLeak-{tag}-".encode() + pysecrets.token_hex(10).encode() + b"\x00\xff" + os.urandom(14)


@dataclass
class Hit:
    category: str
    where: str
    label: str
    form: str


@dataclass
class Scanner:
    needles: list[tuple[str, str, bytes]] = field(default_factory=list)    # (label, form, bytes)
    places: Counter = field(default_factory=Counter)
    hits: list[Hit] = field(default_factory=list)
    values: int = 0

    def add(self, label: str, value: bytes) -> bytes:
        self.values += 1
        self.needles += [(label, name, f) for name, f in forms(value)]
        return value

    def scan(self, category: str, where: str, data: bytes, skip_labels: frozenset[str] = frozenset()) -> None:
        self.places[category] += 1
        for label, name, f in self.needles:
            if label not in skip_labels and f in data:
                self.hits.append(Hit(category, where, label, name))

    def count(self, category: str) -> int:
        return sum(1 for h in self.hits if h.category == category)


# -- D-Bus capture ---------------------------------------------------------------------------
class PcapMonitor:
    """`dbus-monitor --pcap` (as root) on a bus; `messages()` parses what it captured."""

    def __init__(self, address: str, path: Path, bus_log=None):
        self.path = path
        self.out = open(path, "wb")
        self.proc = harness.spawn(["dbus-monitor", "--address", address, "--pcap"], what="dbus-monitor",
                                  log=path.with_suffix(".log"), stdout=self.out)
        harness.wait_until(lambda: path.stat().st_size >= 24, timeout=10, proc=self.proc,
                           what="dbus-monitor pcap header")
        if bus_log is not None:     # dbus-daemon says so once the connection is a monitor
            harness.wait_until(lambda: "became a monitor" in bus_log(), timeout=10, proc=self.proc,
                               what="dbus-monitor becoming a monitor")
        else:
            time.sleep(0.2)

    def stop(self) -> None:
        time.sleep(0.2)        # let the last messages through
        harness.stop_process(self.proc)
        self.out.close()

    def messages(self) -> list[tuple[bytes, object]]:
        from dbus_fast._private.unmarshaller import Unmarshaller
        data = self.path.read_bytes()
        out, pos = [], 24
        while pos + 16 <= len(data):
            _, _, incl, _ = struct.unpack_from("<IIII", data, pos)
            pos += 16
            pkt = data[pos:pos + incl]
            pos += incl
            try:
                msg = Unmarshaller(io.BytesIO(pkt), negotiate_unix_fd=False).unmarshall()
            except Exception:  # noqa: BLE001 - keep the raw bytes in the scan anyway
                msg = None
            out.append((pkt, msg))
        return out


def scan_capture(sc: Scanner, mon: PcapMonitor, name: str) -> int:
    """Scan the service's messages (but not GetValue replies) and all error replies."""
    from dbus_fast import MessageType
    msgs = mon.messages()
    owners = set()
    getvalue_calls = set()
    for _, m in msgs:
        if m is None:
            continue
        if m.message_type is MessageType.SIGNAL and m.member == "NameOwnerChanged" and m.body[0] == BUS_NAME:
            if m.body[2]:
                owners.add(m.body[2])
        if m.message_type is MessageType.METHOD_CALL and m.member == "GetValue" and m.interface in (SECRET, None):
            getvalue_calls.add((m.sender, m.serial))
    n = 0
    for raw, m in msgs:
        if m is None:
            sc.scan("dbus", f"{name}: unparsable message", raw)
            continue
        if m.message_type is MessageType.ERROR:
            sc.scan("dbus-errors", f"{name}: error {m.error_name} from {m.sender}", raw)
            n += 1
        if m.sender in owners:
            if m.message_type is MessageType.METHOD_RETURN and (m.destination, m.reply_serial) in getvalue_calls:
                continue
            sc.scan("dbus", f"{name}: {m.message_type.name} {m.member or m.error_name or ''} from the service", raw)
            n += 1
    return n


# -- running clients -------------------------------------------------------------------------
RUNNER = r'''
import asyncio, base64, json, sys
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

def dec(x):
    if isinstance(x, dict) and "b64" in x:
        return base64.b64decode(x["b64"])
    if isinstance(x, list):
        return [dec(i) for i in x]
    return x

def enc(x):
    if isinstance(x, (bytes, bytearray)):
        return {"b64": base64.b64encode(bytes(x)).decode()}
    if isinstance(x, list):
        return [enc(i) for i in x]
    return x if isinstance(x, (str, int, float, bool, type(None))) else repr(x)

async def main():
    calls = json.loads(sys.stdin.read())
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    out = []
    for c in calls:
        r = await bus.call(Message(destination="org.libvirt.secret", path=c["path"], interface=c["iface"],
                                   member=c["member"], signature=c["sig"], body=dec(c["body"])))
        if r.message_type is MessageType.ERROR:
            out.append({"ok": False, "error": r.error_name, "message": r.body[0] if r.body else ""})
        else:
            out.append({"ok": True, "body": enc(r.body)})
    bus.disconnect()
    print(json.dumps(out))

asyncio.run(main())
'''


def _enc(x):
    if isinstance(x, (bytes, bytearray)):
        return {"b64": base64.b64encode(bytes(x)).decode()}
    if isinstance(x, list):
        return [_enc(i) for i in x]
    return x


def run_calls(py: harness.UnprivPython, user: str, address: str, calls: list[tuple]) -> list[dict]:
    """[(path, iface, member, sig, body)] as `user`; values travel on stdin, never in argv."""
    spec = [{"path": p, "iface": i, "member": m, "sig": s, "body": _enc(list(b))} for p, i, m, s, b in calls]
    r = py.run(user, "-c", RUNNER, address, input=json.dumps(spec), timeout=60)
    if r.returncode != 0:
        raise harness.HarnessError(f"client as {user} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def xml(uuid: str, *, eph="no", priv="no", vol: str | None = None) -> str:
    return (f"<secret ephemeral='{eph}' private='{priv}'><uuid>{uuid}</uuid>"
            f"<usage type='volume'><volume>{vol or '/var/lib/sbleak/' + uuid + '.img'}</volume></usage></secret>")


def uuid_for(n: int) -> str:
    return f"5b1eac00-0000-4000-8000-{n:012x}"


# -- results -------------------------------------------------------------------------------
@dataclass
class Result:
    scanner: Scanner = field(default_factory=Scanner)
    expected_failures: int = 0          # calls that had to fail and did
    unexpected: list[str] = field(default_factory=list)   # calls that behaved otherwise
    cores_found: int = 0
    crash: str = "not run"              # "core written", "no core", "n/a: ..."
    crash_hits: int = 0
    crash_key_hits: int = 0
    wipe_checked: int = 0
    wipe_zeroed: int = 0
    wipe_notes: list[str] = field(default_factory=list)
    journal_entries: int = 0
    journal_memfd: int = 0
    seconds: float = 0.0

    def hits(self, category: str | None = None) -> int:
        return self.scanner.count(category) if category else len(self.scanner.hits)


def expect_error(res: Result, what: str, reply, name_part: str) -> None:
    ok = (not reply.ok if hasattr(reply, "ok") else not reply["ok"])
    err = reply.error if hasattr(reply, "error") else reply.get("error")
    if ok and name_part in (err or ""):
        res.expected_failures += 1
    else:
        res.unexpected.append(f"{what}: expected {name_part}, got {reply}")


def expect_ok(res: Result, what: str, reply, value: bytes | None = None) -> None:
    ok = reply.ok if hasattr(reply, "ok") else reply["ok"]
    if not ok:
        res.unexpected.append(f"{what}: failed: {reply}")
        return
    if value is not None:
        body = reply.body if hasattr(reply, "body") else reply["body"]
        got = bytes(body[0]) if hasattr(reply, "body") else base64.b64decode(body[0]["b64"])
        if got != value:
            res.unexpected.append(f"{what}: wrong value")


# -- scenario 1: session bus, D-Bus and CLI -------------------------------------------------------
def scenario_session(res: Result, base: Path, journal: JournalSocket) -> None:
    sc = res.scanner
    private = base / "private"              # inputs and captures: never scanned as output
    root = base / "session-root"
    root.mkdir(mode=0o755)
    key = root / "key"
    key.write_bytes(sc.add("session key", os.urandom(32)))
    key.chmod(0o600)
    conf = f'secrets_encryption_key = "{key}"\n'
    log = root / "secretbusd.log"
    log.touch()
    bus = mon = daemon = c = None
    cli_env = {k: v for k, v in os.environ.items() if k != "SECRETBUS_DEFAULT_URI"}
    cli_env["PYTHONPATH"] = str(REPO)
    cli_runs: list[tuple[str, subprocess.CompletedProcess, bool]] = []

    def cli(what: str, *args: str, stdin: bytes | None = None, value_out: bool = False):
        p = subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", "secret:///session", *args],
                           input=stdin, capture_output=True, env=cli_env, timeout=60)
        cli_runs.append((what, p, value_out))
        return p

    def start():
        return harness.Secretbusd(bus, root=root, conf=conf, args=("-v",), env=stream_env(log)).start()

    try:
        bus = harness.PrivateBus("session").start()
        cli_env["DBUS_SESSION_BUS_ADDRESS"] = bus.address
        mon = PcapMonitor(bus.address, private / "session.pcap", bus.log)
        daemon = start()
        events = subprocess.Popen([sys.executable, "-m", "secretbus.cli", "-c", "secret:///session", "secret-event",
                                   "--event", "lifecycle", "--loop", "--timeout", "60"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env)
        events2 = subprocess.Popen([sys.executable, "-m", "secretbus.cli", "-c", "secret:///session", "secret-event",
                                    "--event", "value-changed", "--loop", "--timeout", "60"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env)
        time.sleep(0.5)
        c = SyncBus(bus.address)
        P1, P2, E1, P3, NOPE = uuid_for(1), uuid_for(2), uuid_for(3), uuid_for(4), uuid_for(0xdead)
        define = lambda x: c.call(CONNECT_PATH, CONNECT, "SecretDefineXML", "su", [x, 0])  # noqa: E731
        setv = lambda u, v, f=0: c.call(spath(u), SECRET, "SetValue", "ayu", [v, f])       # noqa: E731
        getv = lambda u: c.call(spath(u), SECRET, "GetValue", "u", [0])                    # noqa: E731
        expect_ok(res, "define P1", define(xml(P1)))
        v1 = sc.add("v1", sentinel("v1"))
        expect_ok(res, "set P1", setv(P1, v1))
        expect_ok(res, "get P1", getv(P1), v1)
        v2 = sc.add("v2 replaces v1", sentinel("v2"))
        expect_ok(res, "replace P1", setv(P1, v2))
        expect_ok(res, "get P1 again", getv(P1), v2)
        expect_ok(res, "define P2 private", define(xml(P2, priv="yes")))
        v3 = sc.add("v3 private", sentinel("v3"))
        expect_ok(res, "set P2", setv(P2, v3))
        expect_error(res, "get private P2", getv(P2), "InvalidSecret")
        expect_ok(res, "define E1 ephemeral", define(xml(E1, eph="yes")))
        v4 = sc.add("v4 ephemeral", sentinel("v4"))
        expect_ok(res, "set E1", setv(E1, v4))
        expect_ok(res, "E1 ephemeral -> persistent", define(xml(E1)))
        expect_ok(res, "get E1", getv(E1), v4)
        v5 = sc.add("v5 bad flags", sentinel("v5"))
        expect_error(res, "set with flags 1", setv(P1, v5, 1), "InvalidArg")
        v6 = sc.add("v6 too large", sentinel("v6"))
        expect_error(res, "set too large", setv(P1, v6 * (65536 // len(v6) + 1)), "RPCError")
        v7 = sc.add("v7 wrong signature", pysecrets.token_hex(20).encode())
        expect_error(res, "set with signature su", c.call(spath(P1), SECRET, "SetValue", "su", [v7.decode(), 0]),
                     "InvalidArgs")
        v8 = sc.add("v8 unknown secret", sentinel("v8"))
        expect_error(res, "set unknown secret", setv(NOPE, v8), "NoSecret")
        expect_error(res, "set bad object path", c.call("/org/libvirt/secret/secret/_x", SECRET, "SetValue", "ayu",
                                                        [v8, 0]), "UnknownObject")
        from dbus_fast import Variant
        v9 = sc.add("v9 property set", sentinel("v9"))
        expect_error(res, "Properties.Set", c.call(spath(P1), "org.freedesktop.DBus.Properties", "Set", "ssv",
                                                   [SECRET, "UUID", Variant("ay", v9)]), "PropertyReadOnly")
        # CLI
        private.mkdir(exist_ok=True)
        (private / "p3.xml").write_text(xml(P3))
        p = cli("define", "secret-define", str(private / "p3.xml"))
        if p.returncode:
            res.unexpected.append(f"cli define: {p.stderr!r}")
        v10 = sc.add("v10 cli --plain file", sentinel("v10"))
        (private / "v10").write_bytes(v10)
        cli("set --file --plain", "secret-set-value", P3, "--file", str(private / "v10"), "--plain")
        v11 = sc.add("v11 cli base64 file", sentinel("v11"))
        (private / "v11").write_bytes(base64.b64encode(v11) + b"\n")
        cli("set --file base64", "secret-set-value", P3, "--file", str(private / "v11"))
        p = cli("get (base64)", "secret-get-value", P3, value_out=True)
        if p.stdout.strip() != base64.b64encode(v11):
            res.unexpected.append("cli get-value: wrong value")
        v12 = sc.add("v12 cli interactive", ("SbLeak-v12-" + pysecrets.token_hex(16)).encode())
        cli("set --interactive", "secret-set-value", P3, "--interactive", stdin=v12 + b"\n")
        p = cli("get --plain", "secret-get-value", P3, "--plain", value_out=True)
        if p.stdout != v12 + b"\n":     # the value, then virsh's trailing blank line
            res.unexpected.append("cli get-value --plain: wrong value")
        v13 = sc.add("v13 cli invalid base64", ("SbLeak-v13-" + pysecrets.token_hex(16) + "!*").encode())
        (private / "v13").write_bytes(v13)
        p = cli("set invalid base64", "secret-set-value", P3, "--file", str(private / "v13"))
        res.expected_failures += p.returncode == 1
        v14 = sc.add("v14 cli unknown uuid", sentinel("v14"))
        (private / "v14").write_bytes(v14)
        p = cli("set unknown uuid", "secret-set-value", NOPE, "--file", str(private / "v14"), "--plain")
        res.expected_failures += p.returncode == 1
        v15 = sc.add("v15 cli argv", sentinel("v15"))
        cli("set from argv", "secret-set-value", P3, base64.b64encode(v15).decode())
        v16 = sc.add("v16 cli private", sentinel("v16"))
        (private / "v16").write_bytes(v16)
        cli("set private", "secret-set-value", P2, "--file", str(private / "v16"), "--plain")
        p = cli("get private", "secret-get-value", P2)
        res.expected_failures += p.returncode == 1
        # Reload, persistent -> ephemeral, undefine, restart.
        daemon.signal(signal.SIGHUP)
        harness.wait_until(lambda: "reloaded" in "".join(journal.messages()), timeout=20, what="reload")
        expect_ok(res, "P1 persistent -> ephemeral", define(xml(P1, eph="yes")))
        expect_ok(res, "undefine P2", c.call(spath(P2), SECRET, "Undefine", "", []))
        c.close()
        c = None
        daemon.stop()
        daemon = start()
        c = SyncBus(bus.address)
        expect_ok(res, "get E1 after restart", getv(E1), v4)
        expect_ok(res, "get P3 after restart", getv(P3), v15)
        c.close()
        c = None
        for ev in (events, events2):
            ev.send_signal(signal.SIGINT)       # "event loop interrupted", then the counts
            out, err = ev.communicate(timeout=20)
            cli_runs.append(("secret-event", subprocess.CompletedProcess(ev.args, ev.returncode, out, err), False))
            if b"event '" not in out:
                res.unexpected.append(f"secret-event saw no events: {out[-200:]!r} {err[-200:]!r}")
    finally:
        if c is not None:
            c.close()
        if daemon is not None:
            daemon.stop()
        if mon is not None:
            mon.stop()
    try:
        scan_capture(sc, mon, "session bus")
        for what, p, value_out in cli_runs:
            sc.scan("cli", f"cli {what}: stderr", p.stderr)
            if not value_out:
                sc.scan("cli", f"cli {what}: stdout", p.stdout)
        sc.scan("stderr", "session daemon", log.read_bytes())
        sc.scan("other-logs", "session dbus-daemon", bus.log().encode())
        scan_tree(sc, root, skip={key: frozenset({"session key"})})
    finally:
        bus.stop()


def scan_tree(sc: Scanner, top: Path, skip: dict[Path, frozenset[str]] | None = None) -> None:
    skip = skip or {}
    for dirpath, _, files in os.walk(top):
        for f in files:
            p = Path(dirpath) / f
            try:
                data = p.read_bytes()
            except OSError:
                continue
            store = p.parent.name == "secrets" and p.parent.parent.name == "etc" and not f.endswith(".log")
            sc.scan("store" if store else "files", str(p), data, skip.get(p, frozenset()))


# -- scenario 2: system bus and polkit --------------------------------------------------------
def rules_for(denied: str, ours: list[str]) -> str:
    names = ", ".join(json.dumps(u) for u in ours)
    return f"""// sbtest leak audit: decides only for its own secrets
polkit.addRule(function(action, subject) {{
    var ours = [{names}];
    var u = action.lookup("secret_uuid");
    if (action.id.indexOf("org.libvirt.api.secret.") != 0 || ours.indexOf(u) < 0) {{
        return polkit.Result.NOT_HANDLED;
    }}
    if (u == {json.dumps(denied)} && subject.user != "root") {{
        return polkit.Result.NO;
    }}
    if (subject.isInGroup("libvirt")) {{
        return polkit.Result.YES;
    }}
    return polkit.Result.NOT_HANDLED;
}});
"""


def scenario_polkit(res: Result, base: Path, journal: JournalSocket) -> None:
    sc = res.scanner
    users = harness.UserPair(harness.ensure_user(MEMBER, ["libvirt"]), harness.ensure_user(OTHER))
    py = harness.unpriv_python()
    private = base / "private"
    private.mkdir(exist_ok=True)
    root = base / "system-root"
    root.mkdir(mode=0o755)
    key = root / "key"
    key.write_bytes(sc.add("system key", os.urandom(32)))
    key.chmod(0o600)
    conf = f'secrets_encryption_key = "{key}"\nprivate_value_readers = [ "{MEMBER}" ]\n'
    log = root / "secretbusd.log"
    log.touch()
    S1, S2, S3 = uuid_for(0x11), uuid_for(0x12), uuid_for(0x13)
    bus = pk = mon = daemon = c = None
    try:
        bus = harness.PrivateBus("system", policy_files=(BUS_CONF,)).start()
        pk = harness.Polkitd(bus, actions=[("sbtest-leak.org.libvirt.api.secret.policy", POLICY.read_text())],
                             rules=[("10-sbtest-leak.rules", rules_for(S3, [S1, S2, S3]))]).start()
        mon = PcapMonitor(bus.address, private / "system.pcap", bus.log)
        # Its audit records of value reads go to the same emulated journald, and are scanned too.
        daemon = harness.Secretbusd(bus, system=True, root=root, conf=conf, args=("-v",),
                                    env={**stream_env(log), "SECRETBUS_JOURNAL_SOCKET": str(journal.path)}).start()
        c = SyncBus(bus.address)
        for u, priv in ((S1, "no"), (S2, "yes"), (S3, "no")):
            expect_ok(res, f"root define {u}", c.call(CONNECT_PATH, CONNECT, "SecretDefineXML", "su",
                                                      [xml(u, priv=priv), 0]))
        w = {u: sc.add(f"system {u}", sentinel("sys")) for u in (S1, S2, S3)}
        for u in (S1, S2, S3):
            expect_ok(res, f"root set {u}", c.call(spath(u), SECRET, "SetValue", "ayu", [w[u], 0]))
        expect_ok(res, "root get S1", c.call(spath(S1), SECRET, "GetValue", "u", [0]), w[S1])
        expect_error(res, "root get private S2", c.call(spath(S2), SECRET, "GetValue", "u", [0]), "InvalidSecret")
        m1 = sc.add("member set S1", sentinel("m1"))
        m3 = sc.add("member set S3 (denied)", sentinel("m3"))
        o1 = sc.add("other set S1 (bus-denied)", sentinel("o1"))
        r = run_calls(py, MEMBER, bus.address, [
            (spath(S1), SECRET, "GetValue", "u", [0]),
            (spath(S2), SECRET, "GetValue", "u", [0]),
            (spath(S3), SECRET, "GetValue", "u", [0]),
            (spath(S3), SECRET, "SetValue", "ayu", [m3, 0]),
            (spath(S1), SECRET, "SetValue", "ayu", [m1, 0]),
            (spath(S1), SECRET, "GetValue", "u", [0]),
        ])
        expect_ok(res, "member get S1", r[0], w[S1])
        expect_ok(res, "member get private S2 (reader)", r[1], w[S2])
        expect_error(res, "member get S3", r[2], "AccessDenied")
        expect_error(res, "member set S3", r[3], "AccessDenied")
        expect_ok(res, "member set S1", r[4])
        expect_ok(res, "member get S1 again", r[5], m1)
        r = run_calls(py, OTHER, bus.address, [
            (spath(S1), SECRET, "GetValue", "u", [0]),
            (spath(S1), SECRET, "SetValue", "ayu", [o1, 0]),
        ])
        expect_error(res, "other get S1", r[0], "AccessDenied")
        expect_error(res, "other set S1", r[1], "AccessDenied")
        # The CLI as the member, over the system bus.
        m4 = sc.add("member cli set S3 (denied)", sentinel("m4"))
        vf = private / "m4"
        vf.write_bytes(m4)
        vf.chmod(0o644)
        private.chmod(0o755)
        base.chmod(0o755)
        cli_env = py.env(harness.user_env(users.member), DBUS_SYSTEM_BUS_ADDRESS=bus.address)
        cli_env.pop("SECRETBUS_DEFAULT_URI", None)
        for what, args, value_out in (
                ("set S3 denied", ["secret-set-value", S3, "--file", str(vf), "--plain"], False),
                ("get S3 denied", ["secret-get-value", S3], False),
                ("get S2 private reader", ["secret-get-value", S2, "--plain"], True),
                ("list", ["secret-list"], False)):
            p = harness.run_as(users.member, py.argv("-m", "secretbus.cli", "-c", "secret:///system", *args),
                               env=cli_env, text=False)
            sc.scan("cli", f"cli as member {what}: stderr", p.stderr)
            if not value_out:
                sc.scan("cli", f"cli as member {what}: stdout", p.stdout)
            elif p.stdout != w[S2] + b"\n":     # the value, then virsh's trailing blank line
                res.unexpected.append(f"cli as member {what}: wrong value")
        daemon.signal(signal.SIGHUP)
        time.sleep(0.5)
    finally:
        if c is not None:
            c.close()
        if daemon is not None:
            daemon.stop()
        if mon is not None:
            mon.stop()
        if pk is not None:
            sc.scan("other-logs", "polkitd", pk.log().encode())
            pk.stop()
    try:
        scan_capture(sc, mon, "system bus")
        sc.scan("stderr", "system daemon", log.read_bytes())
        sc.scan("other-logs", "system dbus-daemon", bus.log().encode())
        scan_tree(sc, root, skip={key: frozenset({"system key"})})
    finally:
        bus.stop()


# -- scenario 3: a crash -------------------------------------------------------------------------
def scenario_crash(res: Result, base: Path) -> None:
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern.startswith("|") or "/" in pattern:
        # Piped to a collector (systemd-coredump, apport) or written elsewhere: not ours to read.
        res.crash = f"n/a: core_pattern is {pattern!r}"
        return
    crash_dir = base / "crash"
    crash_dir.mkdir(mode=0o755)
    root = base / "crash-root"
    root.mkdir(mode=0o755)
    (root / "etc").mkdir(mode=0o700)
    key_bytes = os.urandom(32)
    key = root / "key"
    key.write_bytes(key_bytes)
    key.chmod(0o600)
    (root / "etc" / "secret.conf").write_text(f'secrets_encryption_key = "{key}"\n')
    value = sentinel("crash")

    def unlimited_core():
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    bus = proc = c = None
    try:
        bus = harness.PrivateBus("session").start()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = harness.spawn([sys.executable, "-m", "secretbus.daemon", "--session", "--root", str(root),
                              "--bus-address", bus.address], what="secretbusd (crash)", log=base / "crash.log",
                             env=env, cwd=str(crash_dir), preexec_fn=unlimited_core)
        bus.wait_for_name(BUS_NAME, proc=proc, log=base / "crash.log")
        c = SyncBus(bus.address)
        u = uuid_for(0xc0)
        c.call(CONNECT_PATH, CONNECT, "SecretDefineXML", "su", [xml(u), 0])
        c.call(spath(u), SECRET, "SetValue", "ayu", [value, 0])
        got = c.call(spath(u), SECRET, "GetValue", "u", [0])
        if not got.ok or bytes(got.body[0]) != value:
            res.unexpected.append("crash scenario: value not served")
        c.close()
        c = None
        os.kill(proc.pid, signal.SIGABRT)
        proc.wait(30)
        harness.stop_process(proc)
        cores = [p for p in crash_dir.iterdir() if p.name.startswith("core")]
        if not cores:
            res.crash = "no core dump written"
            return
        res.crash = f"core dump written ({sum(p.stat().st_size for p in cores) // 1024} KiB)"
        data = b"".join(p.read_bytes() for p in cores)
        res.crash_hits = sum(1 for _, f in forms(value) if f in data)
        res.crash_key_hits = sum(1 for _, f in forms(key_bytes) if f in data)
    finally:
        if c is not None:
            c.close()
        if proc is not None:
            harness.stop_process(proc)
        if bus is not None:
            bus.stop()


# -- files the run left elsewhere -------------------------------------------------------------
def scan_new_files(sc: Scanner, since: float, exclude: list[Path]) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since - 1))
    for top in SCAN_DIRS:
        if not os.path.isdir(top):
            continue
        r = subprocess.run(["find", top, "-xdev", "-type", "f", "-newermt", stamp, "-size", "-64M", "-print0"],
                           capture_output=True, timeout=120)
        for name in r.stdout.split(b"\0"):
            if not name:
                continue
            p = Path(os.fsdecode(name))
            if any(p == e or e in p.parents for e in exclude):
                continue
            try:
                data = p.read_bytes()
            except OSError:
                continue
            sc.scan("files", str(p), data)


def find_cores(sc: Scanner, since: float, extra_dirs: list[Path]) -> int:
    found = 0
    candidates = [Path("/")] + extra_dirs
    for d in candidates:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            p = d / n
            if n.startswith("core") and p.is_file() and p.stat().st_mtime >= since - 1:
                found += 1
                sc.scan("core", str(p), p.read_bytes())
    cd = Path("/var/lib/systemd/coredump")
    if cd.is_dir():
        for p in cd.iterdir():
            if p.stat().st_mtime >= since - 1:
                found += 1
                sc.scan("core", str(p), p.read_bytes())   # compressed: only counted, in effect
    return found


# -- in-process: wiping ---------------------------------------------------------------------------
def wipe_check() -> tuple[int, int, list[str]]:
    """(checked, zeroed, notes): hold the driver's own bytearrays and see them zeroed."""
    import tempfile

    from secretbus.driver.build import open_instance
    from secretbus.store.paths import InstancePaths
    checked = zeroed = 0
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        drv = open_instance(InstancePaths.embed(tmp))
        try:
            def buf(u):
                b = drv._table.get(u).value
                if not isinstance(b, bytearray):
                    notes.append(f"{u}: value held as {type(b).__name__}, not bytearray")
                return b

            def check(what, b, n):
                nonlocal checked, zeroed
                checked += 1
                if bytes(b) == b"\0" * n:
                    zeroed += 1
                else:
                    notes.append(f"{what}: not zeroed")
            a, e, p = uuid_for(0xa1), uuid_for(0xa2), uuid_for(0xa3)
            drv.define_xml(xml(a))
            drv.define_xml(xml(e, eph="yes"))
            drv.define_xml(xml(p))
            for u in (a, e, p):
                drv.set_value(u, sentinel("w"))
            n = len(sentinel("w"))
            b = buf(a)
            drv.set_value(a, b"replacement")
            check("persistent value replaced", b, n)
            b = buf(e)
            drv.set_value(e, b"x")
            check("ephemeral value replaced", b, n)
            b = buf(e)
            drv.undefine(e)
            check("ephemeral secret undefined", b, 1)
            b = buf(a)
            drv.undefine(a)
            check("persistent secret undefined", b, len(b"replacement"))
            # A reload that finds the secret's files gone drops it: its buffer is wiped.
            b = buf(p)
            for f in Path(tmp, "etc", "secrets").iterdir():
                f.unlink()
            drv.reload()
            check("secret dropped by a reload", b, n)
            q = uuid_for(0xa4)
            drv.define_xml(xml(q))
            drv.set_value(q, sentinel("w"))
            b = buf(q)
            drv.reload()                    # re-read from disk: a new buffer, the old one wiped
            check("value re-read by a reload", b, n)
            b = buf(q)
        finally:
            drv.close()
        check("driver closed", b, n)
    return checked, zeroed, notes


# -- the audit -------------------------------------------------------------------------------
def run(size: str = "small", keep: bool = False, crash: bool = True) -> Result:
    t0 = time.monotonic()
    since = time.time()
    res = Result()
    base = harness.public_tempdir("sb-leak-")
    (base / "private").mkdir(mode=0o755)
    try:
        with JournalSocket() as journal:
            scenario_session(res, base, journal)
            scenario_polkit(res, base, journal)
            time.sleep(0.2)
            for i, raw in enumerate(journal.raw):
                res.scanner.scan("journal", f"journal entry {i}", raw)
            res.journal_entries = len(journal.raw)
            res.journal_memfd = journal.memfd_entries
        if crash:
            scenario_crash(res, base)
        res.cores_found = find_cores(res.scanner, since, [base / "session-root", base / "system-root"])
        scan_new_files(res.scanner, since, exclude=[base / "private", base / "crash", base / "crash-root",
                                                     base / "session-root", base / "system-root"])
        res.wipe_checked, res.wipe_zeroed, res.wipe_notes = wipe_check()
    finally:
        if keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            remove_tree(base)
    res.seconds = time.monotonic() - t0
    return res


def rows(r: Result) -> list[tuple[str, object, str]]:
    sc = r.scanner
    out = [("leak: sentinel values and keys searched (raw, base64 x3, hex, repr)", sc.values, "-"),
           ("leak: places scanned", sum(sc.places.values()), "-"),
           ("leak: places scanned by channel", ", ".join(f"{c} {sc.places[c]}" for c in CATEGORIES), "-"),
           ("leak: journal entries received", r.journal_entries, "> 0")]
    for cat, text in CATEGORIES.items():
        out.append((f"leak: hits in {text}", sc.count(cat), "0"))
    out += [("leak: total hits", len(sc.hits), "0"),
            ("leak: calls that misbehaved (not a leak; scenario check)", len(r.unexpected), "0"),
            ("leak: core dumps left by the scenarios", r.cores_found, "0"),
            ("leak: deliberate crash (SIGABRT, RLIMIT_CORE unlimited)", r.crash, "-"),
            ("leak: value forms in the crashed daemon's core", r.crash_hits, "0"),
            ("leak: key forms in the crashed daemon's core", r.crash_key_hits, "0"),
            ("wipe: held value buffers zeroed (replace, undefine, reload, close)", r.wipe_zeroed,
             f"= {r.wipe_checked}")]
    return out


def figures(size: str = "small") -> list[tuple[str, object, str]]:
    return rows(run(size))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--no-crash", action="store_true", help="skip the deliberate crash")
    a = ap.parse_args(argv)
    r = run(keep=a.keep, crash=not a.no_crash)
    print(f"leak audit ({r.seconds:.1f} s; {r.journal_entries} journal entries, {r.journal_memfd} via memfd)")
    print("| figure | value | goal |\n|---|---|---|")
    for name, value, goal in rows(r):
        print(f"| {name} | {value} | {goal} |")
    for h in r.scanner.hits[:30]:
        print(f"  HIT {h.category}: {h.label} as {h.form} in {h.where}")
    for u in r.unexpected[:30]:
        print(f"  UNEXPECTED {u}")
    for n in r.wipe_notes:
        print(f"  WIPE {n}")
    bad = r.scanner.hits or r.unexpected or r.cores_found or r.crash_hits or r.crash_key_hits \
        or r.wipe_zeroed != r.wipe_checked
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""polkit on the system bus, end to end: real dbus-daemon with the shipped bus policy, real
polkitd with the shipped actions (and the example rules), real users through setpriv, and
secretbusd started as root with `--system --root DIR --bus-address ADDR`.

Clients: gdbus / busctl for one-shot calls (each is a new connection, so a new unique name and
a fresh polkit check), and a small dbus-fast client (`PyClient`, run as the user with Debian's
python3) where one connection has to outlive a change (polkitd stopping, rules reloading).
A root `dbus-monitor` on the bus (`PkMonitor`) records every CheckAuthorization call, so the
tests can count polkit checks (cache hits make none) and read the flags that were sent.

The permission matrix is printed; see it with `pytest -s tests/test_polkit.py -k matrix`
(or `-rP`).
"""
from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import harness
import pytest
from harness import busctl, gdbus
from harness.procs import remove_tree

REPO = Path(__file__).resolve().parents[1]
BUS_CONF = REPO / "dbus" / "org.libvirt.secret.conf"
POLICY = REPO / "polkit" / "org.libvirt.api.secret.policy"
RULES_EXAMPLE = REPO / "polkit" / "50-secretbus-libvirt-group.rules.example"

# Each test polkitd has private actions/rules dirs (tests/harness/polkit.py); the names
# are our own anyway.
ACTIONS_FILE = ("sbtest-polkit.org.libvirt.api.secret.policy", POLICY.read_text())
RULES_FILE = ("50-sbtest-polkit-libvirt-group.rules", RULES_EXAMPLE.read_text())

BUS_NAME = "org.libvirt.secret"
CONNECT_PATH = "/org/libvirt/secret"
CONNECT = "org.libvirt.Connect"
SECRET = "org.libvirt.Secret"
PK_NAME = "org.freedesktop.PolicyKit1"
READER = "sbtest-member"   # in secret.conf private_value_readers
USAGE_VOLUME = 1

pytestmark = [pytest.mark.integration, pytest.mark.bus_policy(BUS_CONF)]


# --------------------------------------------------------------------------------------
# secretbusd

class Secretbusd(harness.Secretbusd):
    """secretbusd --system on `bus`, as root, with `readers` as private_value_readers and
    `secrets` volume secrets written into the store (libvirt's layout) before it starts."""

    def __init__(self, bus: harness.PrivateBus, readers=(READER,), secrets: int = 0, args=()):
        listed = ", ".join(json.dumps(r) for r in readers)
        super().__init__(bus, system=True, conf=f"private_value_readers = [ {listed} ]\n", args=tuple(args))
        self.secrets = secrets

    def start(self, **kw) -> Secretbusd:
        if self.secrets:   # <config dir>/<uuid>.xml, 0600 in a 0700 dir
            store = self.root / "etc" / "secrets"
            store.mkdir(mode=0o700, parents=True)
            for i in range(self.secrets):
                uuid = many_uuid(i)
                f = store / f"{uuid}.xml"
                f.write_text(f"<secret ephemeral='no' private='no'>\n  <uuid>{uuid}</uuid>\n"
                             f"  <usage type='volume'>\n    <volume>/var/lib/sbtest/many/{i}.img</volume>\n"
                             "  </usage>\n</secret>\n")
                f.chmod(0o600)
        return super().start(**kw)


def many_uuid(i: int) -> str:
    return f"5b7e5700-0000-4000-8001-{i:012x}"


@pytest.fixture
def make_secretbusd():
    daemons = []

    def make(bus, **kw) -> Secretbusd:
        d = Secretbusd(bus, **kw)
        daemons.append(d)
        return d.start()

    yield make
    for d in reversed(daemons):
        d.cleanup()


# --------------------------------------------------------------------------------------
# results of calls

@dataclass
class Result:
    ok: bool
    error: str | None = None      # D-Bus error name
    message: str = ""
    out: object = None            # gdbus: stdout text; PyClient: reply body
    secs: float = 0.0

    def code(self) -> str:
        """Short form for tables and comparisons: ok, bus-denied, denied:<action>, private, …"""
        if self.ok:
            return "ok"
        if self.error == "org.freedesktop.DBus.Error.AccessDenied":
            return "bus-denied"
        if self.error == "org.libvirt.Error.AccessDenied":
            m = re.search(r"'org\.libvirt\.api\.(?:secret|connect)\.([a-z-]+)'", self.message)
            return f"denied:{m.group(1)}" if m else "denied:?"
        if self.error == "org.libvirt.Error.InvalidSecret" and self.message == "Invalid secret: secret is private":
            return "private"
        return f"{(self.error or '?').rsplit('.', 1)[-1]}: {self.message}"


_GDBUS_ERROR = re.compile(r"GDBus\.Error:([A-Za-z0-9_.]+): (.*)", re.S)


def g(bus, user, path, method, *args, interactive=False) -> Result:
    """One call with gdbus (a new connection) as `user` (None: root)."""
    t0 = time.monotonic()
    r = gdbus(bus.address, "call", *(["--interactive"] if interactive else []),
              "--dest", BUS_NAME, "--object-path", path, "--method", method, *args, user=user)
    secs = time.monotonic() - t0
    if r.returncode == 0:
        return Result(True, out=r.stdout.strip(), secs=secs)
    m = _GDBUS_ERROR.search(r.stderr)
    if not m:
        raise AssertionError(f"gdbus failed without a D-Bus error: {r.stderr!r}")
    return Result(False, m.group(1), m.group(2).strip(), secs=secs)


_GLIB_ESCAPES = {"b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}


def gdbus_bytes(out: str) -> bytes:
    """The `ay` in gdbus's printout: `([byte 0x68, 0x69],)`, or GLib's bytestring form
    `(b'hi',)` when the bytes end in their only NUL (a random value does about one time in 256):
    g_strescape'd (octal and C escapes), in '' or "", the NUL not shown."""
    m = re.fullmatch(r"""\(b(['"])(.*)\1,\)""", out.strip(), re.S)
    if m is None:
        return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", out))
    text, data, i = m.group(2), bytearray(), 0
    while i < len(text):
        if text[i] != "\\":
            data += text[i].encode("ascii")
            i += 1
            continue
        octal = re.match(r"[0-7]{1,3}", text[i + 1:i + 4])
        if octal:
            data.append(int(octal.group(), 8))
            i += 1 + len(octal.group())
        else:
            data.append(_GLIB_ESCAPES.get(text[i + 1], ord(text[i + 1])))
            i += 2
    return bytes(data) + b"\0"


def test_gdbus_bytes_reads_both_of_gdbus_forms():
    """The bytestring form, as gdbus printed a value that ended in NUL (test_audit failed on it)."""
    out = ("(b'Y\\230\\271\\247P\\204\\034g\\312\\272\\207\\367\\232\\220\\305\\231\\303"
           "\\036\\200\\336W\\r\\245',)")
    assert gdbus_bytes(out) == (b"Y\x98\xb9\xa7P\x84\x1cg\xca\xba\x87\xf7\x9a\x90\xc5\x99\xc3\x1e\x80\xde"
                                b"W\r\xa5\x00")
    assert gdbus_bytes("(b\"it's\\n\",)") == b"it's\n\0"
    assert gdbus_bytes("([byte 0x68, 0x00, 0x69],)") == b"h\0i"


@pytest.mark.integration
def test_gdbus_bytes_reads_what_real_gdbus_prints(session_bus, make_secretbusd):
    """Values that end in their only NUL, with quotes, backslashes and every other byte, read
    back through gdbus itself."""
    make_secretbusd(session_bus)
    uuid = "5b7e5700-0000-4000-8004-000000000001"
    r = g(session_bus, None, CONNECT_PATH, f"{CONNECT}.SecretDefineXML", secret_xml(uuid, False, "/v/gdbus.img"), "0")
    assert r.ok, r
    forms = set()
    for value in (b"plain\0", b"it's\0", b'say "x"\0', b"both ' and \"\\\0", bytes(range(1, 256)) + b"\0",
                  b"no nul", b"\0inner\0"):
        assert g(session_bus, None, secret_path(uuid), f"{SECRET}.SetValue", gdbus_ay(value), "0").ok
        r = g(session_bus, None, secret_path(uuid), f"{SECRET}.GetValue", "0")
        assert r.ok and gdbus_bytes(r.out) == value, (value, r.out)
        forms.add(r.out[:2])
    assert forms == {"(b", "(["}        # both of gdbus's forms were read


def gdbus_ay(value: bytes) -> str:
    return "[" + ", ".join(f"byte 0x{b:02x}" for b in value) + "]"


# --------------------------------------------------------------------------------------
# a persistent client (one connection kept across changes), run as a test user

PYCLIENT = r'''
import asyncio, json, sys, time
from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

def enc(v):
    if isinstance(v, (bytes, bytearray)):
        return {"b": v.hex()}
    if isinstance(v, list):
        return [enc(x) for x in v]
    return v

def dec(v):
    if isinstance(v, dict) and set(v) == {"b"}:
        return bytes.fromhex(v["b"])
    if isinstance(v, list):
        return [dec(x) for x in v]
    return v

def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

async def main():
    addr = sys.argv[1]
    bus = await MessageBus(bus_address=addr).connect()
    loop = asyncio.get_running_loop()
    out({"name": bus.unique_name})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        req = json.loads(line)
        if req["op"] == "reconnect":
            bus.disconnect()
            bus = await MessageBus(bus_address=addr).connect()
            out({"name": bus.unique_name})
            continue
        flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if req.get("interactive") else MessageFlag.NONE
        msg = Message(destination=req["dest"], path=req["path"], interface=req["iface"],
                      member=req["member"], signature=req["sig"], body=dec(req["body"]), flags=flags)
        t0 = time.monotonic()
        try:
            reply = await asyncio.wait_for(bus.call(msg), req.get("timeout", 30))
        except Exception as e:
            out({"ok": False, "error": "client." + type(e).__name__, "message": str(e),
                 "secs": time.monotonic() - t0})
            continue
        secs = time.monotonic() - t0
        if reply.message_type == MessageType.ERROR:
            out({"ok": False, "error": reply.error_name,
                 "message": reply.body[0] if reply.body else "", "secs": secs})
        else:
            out({"ok": True, "body": enc(reply.body), "secs": secs})

asyncio.run(main())
'''


class PyClient:
    """A dbus-fast client process running as `user`; one bus connection until reconnect()."""

    def __init__(self, unpriv, user, bus, script: Path):
        self.bus = bus
        argv = harness.as_user(user, unpriv.argv(str(script), bus.address))
        self.stderr_path = script.parent / f"pyclient-{os.getpid()}-{time.monotonic_ns()}.err"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, env=unpriv.env(harness.user_env(user)),
                                         cwd="/", start_new_session=True)
        self._buf = b""
        self.name = self._read(30)["name"]

    def _read(self, timeout: float) -> dict:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError(f"client gave no answer within {timeout} s")
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"client exited: {self.stderr_path.read_text()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        self.proc.stdin.flush()

    def call(self, path, iface, member, sig="", body=(), *, interactive=False,
             dest=BUS_NAME, timeout=30) -> Result:
        body = [{"b": v.hex()} if isinstance(v, bytes) else v for v in body]
        self._send(dict(op="call", dest=dest, path=path, iface=iface, member=member, sig=sig,
                        body=body, interactive=interactive, timeout=timeout))
        r = self._read(timeout + 10)
        out = r.get("body")
        if out is not None:
            out = [bytes.fromhex(v["b"]) if isinstance(v, dict) else v for v in out]
        return Result(r["ok"], r.get("error"), r.get("message", ""), out, r["secs"])

    def reconnect(self) -> str:
        self._send({"op": "reconnect"})
        self.name = self._read(30)["name"]
        return self.name

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        harness.stop_process(self.proc)
        self.proc.stdout.close()


@pytest.fixture
def pyclient(unpriv_python):
    """Factory: pyclient(user, bus) -> PyClient, closed after the test."""
    d = harness.public_tempdir("sb-pk-client-")
    script = d / "pyclient.py"
    script.write_text(PYCLIENT)
    script.chmod(0o644)
    clients = []

    def make(user, bus) -> PyClient:
        c = PyClient(unpriv_python, user, bus, script)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()
    remove_tree(d)


# --------------------------------------------------------------------------------------
# counting polkit checks

@dataclass(frozen=True)
class Check:
    sender: str            # who asked polkit (secretbusd's unique name)
    subject: str | None    # system-bus-name subject (the caller), None for other kinds
    action: str
    flags: int


class PkMonitor:
    """dbus-monitor (root, BecomeMonitor) recording CheckAuthorization calls on `bus`."""

    MATCH = (f"type='method_call',destination='{PK_NAME}',"
             "interface='org.freedesktop.PolicyKit1.Authority',member='CheckAuthorization'")

    def __init__(self, bus):
        self.bus = bus
        self.dir = harness.public_tempdir("sb-pk-monitor-")
        self.log_path = self.dir / "monitor.log"
        self._sentinels = 0
        self.proc = harness.spawn(["stdbuf", "-oL", "dbus-monitor", "--address", bus.address,
                                   "--monitor", self.MATCH], what="dbus-monitor", log=self.log_path)
        self.sync()

    def _blocks(self) -> list[str]:
        text = self.log_path.read_text(errors="replace")
        return [b for b in re.split(r"^(?=method call )", text, flags=re.M)
                if b.startswith("method call ") and "member=CheckAuthorization" in b]

    def all_checks(self) -> list[Check]:
        checks = []
        for b in self._blocks():
            sender = re.search(r"sender=(\S+)", b).group(1)
            subj = re.search(r'string "name"\s+variant\s+string "([^"]*)"', b)
            action = re.search(r'^\s*string "((?:org|sbtest)\.[^"]+)"', b, re.M).group(1)
            flags = int(re.findall(r"^\s*uint32 (\d+)", b, re.M)[-1])
            checks.append(Check(sender, subj.group(1) if subj else None, action, flags))
        return checks

    def checks(self, subject: str | None = None) -> list[Check]:
        """secretbus checks (sentinels left out), optionally only those about `subject`."""
        return [c for c in self.all_checks() if c.action.startswith("org.libvirt.")
                and (subject is None or c.subject == subject)]

    def sync(self) -> None:
        """Return once every CheckAuthorization sent so far is in the log: send one of our
        own (a made-up action id) through the same bus and wait for it to show up."""
        self._sentinels += 1
        action = f"sbtest.sentinel.n{self._sentinels}"
        argv = harness.check_authorization_argv(self.bus.address, action)
        deadline = time.monotonic() + 10
        while True:
            subprocess.run(argv, capture_output=True, timeout=10)
            try:
                harness.wait_until(lambda: any(c.action == action for c in self.all_checks()),
                                   timeout=1, what="dbus-monitor sentinel", proc=self.proc,
                                   log=self.log_path)
                return
            except harness.HarnessError:
                if time.monotonic() > deadline:
                    raise

    def stop(self) -> None:
        harness.stop_process(self.proc)
        remove_tree(self.dir)


@pytest.fixture
def make_monitor():
    mons = []

    def make(bus) -> PkMonitor:
        m = PkMonitor(bus)
        mons.append(m)
        return m

    yield make
    for m in mons:
        m.stop()


# --------------------------------------------------------------------------------------
# the permission model (spec §5.2, DESIGN §6), from which every expected cell is derived

METHODS = ("ListSecrets", "SecretLookupByUUID", "SecretLookupByUsage", "SecretDefineXML",
           "GetXMLDesc", "SetValue", "GetValue", "Undefine")
PERMS = {
    "ListSecrets": ("search-secrets",),
    "SecretLookupByUUID": ("getattr",),
    "SecretLookupByUsage": ("getattr",),
    "SecretDefineXML": ("write", "save"),
    "GetXMLDesc": ("read",),
    "SetValue": ("write",),
    "GetValue": ("read-secure",),
    "Undefine": ("delete",),
}
DEFAULT_YES = frozenset({"search-secrets", "getattr", "read"})          # the policy's defaults
ALL_PERMS = frozenset(p for ps in PERMS.values() for p in ps)
EXAMPLE_RULES = frozenset({"write", "save", "delete", "read-secure"})   # group libvirt


@dataclass(frozen=True)
class Role:
    label: str
    user: object                  # harness.User, or None for root
    uid: int
    bus_admits: bool              # dbus/org.libvirt.secret.conf: root and group libvirt
    granted: frozenset            # what polkit says yes to


def expected(role: Role, private: bool, method: str, readers: frozenset[int]) -> str:
    if not role.bus_admits:
        return "bus-denied"
    for perm in PERMS[method]:
        if perm not in role.granted:
            return f"denied:{perm}"
    if method == "GetValue" and private and role.uid not in readers:
        return "private"
    return "ok"


def roles(users, *, rules: bool) -> list[Role]:
    member_granted = DEFAULT_YES | (EXAMPLE_RULES if rules else frozenset())
    return [
        Role("root", None, 0, True, ALL_PERMS),                          # polkit: uid 0 always
        Role("libvirt member" + ("" if rules else " (no rules)"), users.member, users.member.uid,
             True, member_granted),
        Role("other user", users.other, users.other.uid, False, DEFAULT_YES),
    ]


def uuid_for(tag: int, role_no: int, private: bool) -> str:
    return f"5b7e5700-0000-4000-8000-{tag:04x}{role_no:04x}{int(private):04x}"


def secret_path(uuid: str) -> str:
    return f"{CONNECT_PATH}/secret/_{uuid.replace('-', '_')}"


def secret_xml(uuid: str, private: bool, volume: str) -> str:
    return (f"<secret ephemeral='no' private='{'yes' if private else 'no'}'><uuid>{uuid}</uuid>"
            f"<usage type='volume'><volume>{volume}</volume></usage></secret>")


TARGET, NEW = 1, 2


def volume_for(role_no: int, private: bool, tag: int = TARGET) -> str:
    return f"/var/lib/sbtest/{tag}-{role_no}-{'private' if private else 'public'}.img"


def orig_value(role_no: int, private: bool) -> bytes:
    return f"orig-{role_no}-{int(private)}".encode()


def new_value(role_no: int, private: bool) -> bytes:
    return f"new-{role_no}-{int(private)}".encode()


def root_define(bus, uuid: str, private: bool, volume: str, value: bytes | None) -> None:
    r = g(bus, None, CONNECT_PATH, f"{CONNECT}.SecretDefineXML", secret_xml(uuid, private, volume), "0")
    assert r.ok, r
    if value is not None:
        r = g(bus, None, secret_path(uuid), f"{SECRET}.SetValue", gdbus_ay(value), "0")
        assert r.ok, r


def setup_targets(bus, role_list) -> None:
    """Root defines the secret each role works on (same for every role: the target of the
    lookups, GetXMLDesc, SetValue, GetValue, Undefine)."""
    for n, _ in enumerate(role_list):
        for private in (True, False):
            root_define(bus, uuid_for(TARGET, n, private), private, volume_for(n, private),
                        orig_value(n, private))


def run_row(bus, role_no: int, role: Role, private: bool) -> dict[str, Result]:
    """The eight calls for one (role, private) pair, in this order; contents are checked
    for every call that succeeds."""
    u = role.user
    target = uuid_for(TARGET, role_no, private)
    tpath = secret_path(target)
    res: dict[str, Result] = {}
    res["ListSecrets"] = r = g(bus, u, CONNECT_PATH, f"{CONNECT}.ListSecrets", "0")
    if r.ok:
        assert tpath in r.out, r
    res["SecretLookupByUUID"] = r = g(bus, u, CONNECT_PATH, f"{CONNECT}.SecretLookupByUUID", target)
    if r.ok:
        assert r.out == f"(objectpath '{tpath}',)", r
    res["SecretLookupByUsage"] = r = g(bus, u, CONNECT_PATH, f"{CONNECT}.SecretLookupByUsage",
                                       str(USAGE_VOLUME), volume_for(role_no, private))
    if r.ok:
        assert r.out == f"(objectpath '{tpath}',)", r
    new = uuid_for(NEW, role_no, private)
    res["SecretDefineXML"] = r = g(bus, u, CONNECT_PATH, f"{CONNECT}.SecretDefineXML",
                                   secret_xml(new, private, volume_for(role_no, private, NEW)), "0")
    if r.ok:
        assert r.out == f"(objectpath '{secret_path(new)}',)", r
    res["GetXMLDesc"] = r = g(bus, u, tpath, f"{SECRET}.GetXMLDesc", "0")
    if r.ok:
        assert f"<uuid>{target}</uuid>" in r.out and f"private='{'yes' if private else 'no'}'" in r.out, r
    res["SetValue"] = r = g(bus, u, tpath, f"{SECRET}.SetValue", gdbus_ay(new_value(role_no, private)), "0")
    res["GetValue"] = r = g(bus, u, tpath, f"{SECRET}.GetValue", "0")
    if r.ok:
        want = new_value(role_no, private) if res["SetValue"].ok else orig_value(role_no, private)
        assert gdbus_bytes(r.out) == want, r
    res["Undefine"] = g(bus, u, tpath, f"{SECRET}.Undefine")
    return res


def check_after(bus, role_no: int, private: bool, res: dict[str, Result]) -> None:
    """As root: denied calls changed nothing, allowed ones took effect."""
    target, new = uuid_for(TARGET, role_no, private), uuid_for(NEW, role_no, private)
    r = g(bus, None, CONNECT_PATH, f"{CONNECT}.SecretLookupByUUID", target)
    assert r.ok != res["Undefine"].ok, (target, r)
    if not r.ok:
        assert r.error == "org.libvirt.Error.NoSecret", r
    r = g(bus, None, CONNECT_PATH, f"{CONNECT}.SecretLookupByUUID", new)
    assert r.ok == res["SecretDefineXML"].ok, (new, r)
    if not private and not res["Undefine"].ok:   # root may read public values only
        r = g(bus, None, secret_path(target), f"{SECRET}.GetValue", "0")
        want = new_value(role_no, private) if res["SetValue"].ok else orig_value(role_no, private)
        assert r.ok and gdbus_bytes(r.out) == want, r


def format_matrix(title: str, rows: list[tuple[str, dict[str, str]]]) -> str:
    head = ["caller / secret", *METHODS]
    table = [head] + [[label, *(cells[m] for m in METHODS)] for label, cells in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [title]
    for i, row in enumerate(table):
        lines.append(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run_matrix(bus, role_list, readers: frozenset[int], title: str) -> None:
    setup_targets(bus, role_list)
    rows, mismatches = [], []
    for n, role in enumerate(role_list):
        for private in (True, False):
            res = run_row(bus, n, role, private)
            cells = {}
            for m in METHODS:
                got, want = res[m].code(), expected(role, private, m, readers)
                cells[m] = got if got == want else f"{got} (WANT {want})"
                if got != want:
                    mismatches.append((role.label, private, m, res[m]))
            rows.append((f"{role.label} / {'private' if private else 'public'}", cells))
            check_after(bus, n, private, res)
    print()
    print(format_matrix(title, rows))
    assert not mismatches, mismatches


def denial_messages_name_the_action(result: Result, perm: str) -> None:
    assert result.error == "org.libvirt.Error.AccessDenied", result
    assert f"'org.libvirt.api.secret.{perm}'" in result.message, result


def member_call(bus, users, method, path, *args, **kw) -> Result:
    return g(bus, users.member, path, method, *args, **kw)


# ======================================================================================
# tests

def test_policy_file_matches_access_model():
    """The shipped actions are exactly secretbus's permissions, with libvirt's texts: the API
    actions in one file, libvirt's socket actions (RPC authentication) in another."""
    from lxml import etree

    from secretbus.access.permissions import SOCKET_AUTH, Perm
    doc = etree.parse(str(POLICY))
    actions = {a.get("id"): a for a in doc.iter("action")}
    assert set(actions) == {p.value for p in Perm if p not in SOCKET_AUTH}
    unix = etree.parse(str(POLICY.with_name("org.libvirt.unix.policy")))
    socket_actions = {a.get("id"): a for a in unix.iter("action")}
    assert set(socket_actions) == {p.value for p in SOCKET_AUTH}
    for aid, desc, defaults in (("org.libvirt.unix.monitor", "Monitor local virtualized systems", ("yes",) * 3),
                                ("org.libvirt.unix.manage", "Manage local virtualized systems",
                                 ("auth_admin_keep",) * 3)):
        a = socket_actions[aid]
        d = a.find("defaults")
        assert a.findtext("description") == desc
        assert (d.findtext("allow_any"), d.findtext("allow_inactive"), d.findtext("allow_active")) == defaults
    texts = {
        "org.libvirt.api.connect.search-secrets": ("List secrets", "Listing secrets requires authorization"),
        "org.libvirt.api.connect.getattr": ("Access connection", "Accessing the connection requires authorization"),
        "org.libvirt.api.connect.read": ("Read host", "Reading the host configuration requires authorization"),
        "org.libvirt.api.connect.write": ("Write host", "Writing the host configuration requires authorization"),
        "org.libvirt.api.secret.getattr": ("Access secret", "Accessing secret requires authorization"),
        "org.libvirt.api.secret.read": ("Read secret", "Reading secret configuration requires authorization"),
        "org.libvirt.api.secret.write": ("Write secret", "Writing secret configuration requires authorization"),
        "org.libvirt.api.secret.read-secure": ("Read secure secret",
                                               "Reading secure secret configuration requires authorization"),
        "org.libvirt.api.secret.save": ("Save secret", "Saving secret configuration requires authorization"),
        "org.libvirt.api.secret.delete": ("Delete secret", "Deleting secret configuration requires authorization"),
    }
    for aid, (desc, msg) in texts.items():
        a = actions[aid]
        assert (a.findtext("description"), a.findtext("message")) == (desc, msg)
        d = a.find("defaults")
        got = (d.findtext("allow_any"), d.findtext("allow_inactive"), d.findtext("allow_active"))
        perm = aid.rsplit(".", 1)[1]
        assert got == (("yes",) * 3 if perm in DEFAULT_YES else ("no", "no", "auth_admin_keep")), aid
    assert doc.findtext("vendor") == "Libvirt Project"


def test_matrix_with_example_rules(system_bus, make_polkitd, make_secretbusd, test_users):
    """{root, libvirt member, other} x 8 methods x {private, public}; the example rules."""
    make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[RULES_FILE])
    make_secretbusd(system_bus)
    readers = frozenset({test_users.member.uid})
    run_matrix(system_bus, roles(test_users, rules=True), readers,
               "polkit matrix, example rules installed (private_value_readers = [sbtest-member])")


def test_matrix_defaults_without_rules(system_bus, make_polkitd, make_secretbusd, test_users):
    """Only the actions file: the libvirt member may list, look up and read XML, nothing else;
    denials are org.libvirt.Error.AccessDenied naming the action."""
    make_polkitd(system_bus, actions=[ACTIONS_FILE])
    make_secretbusd(system_bus)
    readers = frozenset({test_users.member.uid})
    run_matrix(system_bus, roles(test_users, rules=False), readers,
               "polkit matrix, action defaults only (no rules)")
    # the messages: which action was refused
    root_define(system_bus, uuid_for(9, 9, False), False, "/var/lib/sbtest/msg.img", b"x")
    path = secret_path(uuid_for(9, 9, False))
    denial_messages_name_the_action(member_call(system_bus, test_users, f"{SECRET}.SetValue", path,
                                                gdbus_ay(b"y"), "0"), "write")
    denial_messages_name_the_action(member_call(system_bus, test_users, f"{SECRET}.GetValue", path, "0"),
                                    "read-secure")
    denial_messages_name_the_action(member_call(system_bus, test_users, f"{SECRET}.Undefine", path),
                                    "delete")


def test_define_needs_write_and_save(system_bus, make_polkitd, make_secretbusd, test_users):
    """DefineXML checks write, then save: a rule granting write alone is not enough."""
    write_only = ("50-sbtest-polkit-write-only.rules", """
polkit.addRule(function(action, subject) {
    if (action.id == "org.libvirt.api.secret.write" && subject.isInGroup("libvirt"))
        return polkit.Result.YES;
    return polkit.Result.NOT_HANDLED;
});
""")
    make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[write_only])
    make_secretbusd(system_bus)
    uuid = uuid_for(7, 1, False)
    r = member_call(system_bus, test_users, f"{CONNECT}.SecretDefineXML", CONNECT_PATH,
                    secret_xml(uuid, False, "/var/lib/sbtest/ws.img"), "0")
    denial_messages_name_the_action(r, "save")
    root_define(system_bus, uuid, False, "/var/lib/sbtest/ws.img", None)
    r = member_call(system_bus, test_users, f"{SECRET}.SetValue", secret_path(uuid), gdbus_ay(b"w"), "0")
    assert r.ok, r


DETAILS_RULES = ("50-sbtest-polkit-details.rules", """
// read-secure by libvirt's details: the usage id (per usage type) or the uuid
polkit.addRule(function(action, subject) {
    if (action.id != "org.libvirt.api.secret.read-secure" || !subject.isInGroup("libvirt"))
        return polkit.Result.NOT_HANDLED;
    if (action.lookup("connect_driver") != "secret")
        return polkit.Result.NO;
    if (action.lookup("secret_usage_volume") == "/var/lib/sbtest/ok.img" ||
        action.lookup("secret_usage_ceph") == "client.ok secret" ||
        action.lookup("secret_usage_target") == "iqn.2013-07.com.example:ok" ||
        action.lookup("secret_usage_name") == "ok" ||
        action.lookup("secret_uuid") == "5b7e5700-0000-4000-8000-000300000001")
        return polkit.Result.YES;
    return polkit.Result.NO;
});
""")


def test_rules_see_libvirt_details(system_bus, make_polkitd, make_secretbusd, test_users):
    """Rules can decide per secret with libvirt's detail keys (connect_driver, secret_uuid,
    secret_usage_volume|ceph|target|name; vtpm uses secret_usage_name too)."""
    make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[DETAILS_RULES])
    make_secretbusd(system_bus)
    cases = [  # (usage type, element, usage id, granted)
        ("volume", "volume", "/var/lib/sbtest/ok.img", True),
        ("volume", "volume", "/var/lib/sbtest/no.img", False),
        ("ceph", "name", "client.ok secret", True),
        ("ceph", "name", "client.no secret", False),
        ("iscsi", "target", "iqn.2013-07.com.example:ok", True),
        ("iscsi", "target", "iqn.2013-07.com.example:no", False),
        ("tls", "name", "ok", True),
        ("tls", "name", "no", False),
        ("vtpm", "name", "ok", True),
        ("vtpm", "name", "no", False),
        (None, None, None, False),                 # usage none: only the uuid could match
    ]
    for n, (usage, elem, uid, granted) in enumerate(cases):
        uuid = uuid_for(3, 0, False)[:-4] + f"{n + 2:04x}"
        body = f"<usage type='{usage}'><{elem}>{uid}</{elem}></usage>" if usage else ""
        r = g(system_bus, None, CONNECT_PATH, f"{CONNECT}.SecretDefineXML",
              f"<secret ephemeral='no' private='no'><uuid>{uuid}</uuid>{body}</secret>", "0")
        assert r.ok, r
        assert g(system_bus, None, secret_path(uuid), f"{SECRET}.SetValue", gdbus_ay(b"v"), "0").ok
        r = member_call(system_bus, test_users, f"{SECRET}.GetValue", secret_path(uuid), "0")
        assert r.code() == ("ok" if granted else "denied:read-secure"), (usage, uid, r)
    by_uuid = uuid_for(3, 0, True)      # ...-000300000001: granted by secret_uuid alone
    root_define(system_bus, by_uuid, False, "/var/lib/sbtest/by-uuid.img", b"u")
    assert member_call(system_bus, test_users, f"{SECRET}.GetValue", secret_path(by_uuid), "0").ok


def test_polkitd_gone_fails_closed(system_bus, make_polkitd, make_secretbusd, test_users, pyclient):
    """polkitd stopping drops the whole cache (NameOwnerChanged), so even a connection that
    was allowed a moment ago is refused; refusals come at once (the bus answers ServiceUnknown).
    A polkitd that hangs costs one timeout (5 s) per uncached check, then a refusal; what was
    cached stays valid until max age, since nothing told secretbusd that anything changed.
    Root is decided by secretbusd itself (polkit authorises uid 0 for everything; DESIGN §12:
    root never waits behind others' checks), so root is served with polkitd gone."""
    pk = make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[RULES_FILE])
    sbd = make_secretbusd(system_bus, args=("--polkit-timeout", "5"))
    uuid = uuid_for(5, 1, False)
    root_define(system_bus, uuid, False, "/var/lib/sbtest/gone.img", b"value")
    path = secret_path(uuid)
    client = pyclient(test_users.member, system_bus)

    def value(c=client) -> Result:
        return c.call(path, SECRET, "GetValue", "u", [0])

    r = value()
    assert r.ok and r.out == [b"value"], r
    assert client.call(CONNECT_PATH, CONNECT, "ListSecrets", "u", [0]).ok
    assert g(system_bus, None, path, f"{SECRET}.GetValue", "0").ok

    pk.stop()
    harness.wait_until(lambda: not system_bus.name_has_owner(PK_NAME), timeout=5, what="polkitd gone")
    # every gated call is refused now, quickly: the cached "yes" went with polkitd. New
    # connections call with their own signature: gdbus would introspect the secret first,
    # and that (getattr, refused too) answers UnknownObject, so gdbus would guess 'i'.
    member2 = pyclient(test_users.member, system_bus)
    gone = {
        "cached connection GetValue": value(),
        "cached connection ListSecrets": client.call(CONNECT_PATH, CONNECT, "ListSecrets", "u", [0]),
        "member GetValue (new connection)": value(member2),
        "member LookupByUUID": g(system_bus, test_users.member, CONNECT_PATH,
                                 f"{CONNECT}.SecretLookupByUUID", uuid),
    }
    for what, r in gone.items():
        assert r.code().startswith("denied:"), (what, r)
        assert r.secs < 2.0, (what, r)
    r = g(system_bus, None, path, f"{SECRET}.GetValue", "0")
    assert r.ok and gdbus_bytes(r.out) == b"value" and r.secs < 2.0, ("root GetValue", r)
    assert "dropping" in sbd.log() and "polkitd restarted" in sbd.log()
    assert "failed, denying" in sbd.log()

    # a new polkitd: allowed again, without restarting secretbusd
    pk2 = make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[RULES_FILE])
    r = value()
    assert r.ok and r.out == [b"value"], r

    # a hung polkitd: uncached checks time out (--polkit-timeout 5) and are refused; the cached one stays
    member3 = pyclient(test_users.member, system_bus)    # a new connection: nothing cached
    os.kill(pk2.pid, signal.SIGSTOP)
    try:
        r = value(member3)
        assert r.code() == "denied:read-secure", r
        assert 4.0 < r.secs < 10.0, r
        r = value()
        assert r.ok and r.secs < 1.0, r
    finally:
        os.kill(pk2.pid, signal.SIGCONT)


def test_bus_policy_passes_polkit_signals(system_bus, make_polkitd):
    """The owner of org.libvirt.secret must receive polkit's Changed broadcast, or the cache
    outlives rule changes. (A default-context `<deny send_destination="org.libvirt.secret"/>`
    without send_type="method_call" also refuses broadcast signals to that name's owner.)"""
    import asyncio

    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    pk = make_polkitd(system_bus, actions=[ACTIONS_FILE])
    match = (f"type='signal',sender='{PK_NAME}',interface='org.freedesktop.PolicyKit1.Authority',"
             "member='Changed',path='/org/freedesktop/PolicyKit1/Authority'")

    async def changed_signals() -> int:
        bus = await MessageBus(bus_address=system_bus.address).connect()
        try:
            got = []
            bus.add_message_handler(lambda m: got.append(m) if (
                m.message_type is MessageType.SIGNAL and m.member == "Changed") else None)
            await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                   interface="org.freedesktop.DBus", member="AddMatch",
                                   signature="s", body=[match]))
            await bus.request_name(BUS_NAME)
            noop = "polkit.addRule(function(a, s) { return polkit.Result.NOT_HANDLED; });\n"
            with pk.add_files(rules=[("50-sbtest-polkit-noop.rules", noop)]):
                for _ in range(100):
                    if got:
                        break
                    await asyncio.sleep(0.02)
            return len(got)
        finally:
            bus.disconnect()

    assert asyncio.run(changed_signals()) > 0, (
        "polkit's Changed signal does not reach the owner of org.libvirt.secret: "
        "dbus/org.libvirt.secret.conf refuses it")


def test_rules_added_and_removed_during_the_run(system_bus, make_polkitd, make_secretbusd,
                                                test_users, pyclient, make_monitor):
    """polkit's Changed signal empties the cache: one connection sees a rules file appear and
    disappear without secretbusd restarting (the cached denial would otherwise last max age)."""
    pk = make_polkitd(system_bus, actions=[ACTIONS_FILE])
    sbd = make_secretbusd(system_bus)
    mon = make_monitor(system_bus)
    uuid = uuid_for(6, 1, False)
    root_define(system_bus, uuid, False, "/var/lib/sbtest/reload.img", b"before")
    path = secret_path(uuid)
    client = pyclient(test_users.member, system_bus)

    def set_value(v: bytes) -> Result:
        return client.call(path, SECRET, "SetValue", "ayu", [v, 0])

    assert set_value(b"a").code() == "denied:write"
    assert set_value(b"b").code() == "denied:write"
    mon.sync()
    assert [c.action for c in mon.checks(client.name)] == ["org.libvirt.api.secret.write"]  # denial cached

    rules = pk.add_files(rules=[RULES_FILE]).install()
    try:
        r = harness.wait_until(lambda: (x := set_value(b"after")).ok and x, timeout=5, interval=0.05,
                               what="rules file taking effect")
        assert r.ok
        pk.wait_for_log("Reloading rules")
        assert "polkit rules or actions changed" in sbd.log()
        assert gdbus_bytes(g(system_bus, None, path, f"{SECRET}.GetValue", "0").out) == b"after"
    finally:
        rules.uninstall()
    r = harness.wait_until(lambda: (x := set_value(b"gone")).code() == "denied:write" and x,
                           timeout=5, interval=0.05, what="rules removal taking effect")
    assert r.error == "org.libvirt.Error.AccessDenied"


def test_reconnecting_caller_is_checked_again(system_bus, make_polkitd, make_secretbusd,
                                              test_users, pyclient, make_monitor):
    """Decisions are cached per unique name: repeated calls on one connection cost one polkit
    check; a new connection (new unique name) is checked afresh."""
    make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[RULES_FILE])
    make_secretbusd(system_bus)
    mon = make_monitor(system_bus)
    uuid = uuid_for(8, 1, True)
    root_define(system_bus, uuid, True, "/var/lib/sbtest/reconnect.img", b"private value")
    path = secret_path(uuid)
    client = pyclient(test_users.member, system_bus)
    first = client.name
    for _ in range(5):
        r = client.call(path, SECRET, "GetValue", "u", [0])
        assert r.ok and r.out == [b"private value"], r
    second = client.reconnect()
    assert second != first
    for _ in range(3):
        assert client.call(path, SECRET, "GetValue", "u", [0]).ok
    mon.sync()
    read_secure = "org.libvirt.api.secret.read-secure"
    assert [c.action for c in mon.checks(first)] == [read_secure]
    assert [c.action for c in mon.checks(second)] == [read_secure]
    # each gdbus call is a new connection: one read-secure check each (read-secure is cached per
    # connection); the getattr of the Introspect gdbus makes first is cached per uid: one at most
    def counts() -> tuple[int, int]:
        actions = [c.action for c in mon.checks()]
        return actions.count(read_secure), actions.count("org.libvirt.api.secret.getattr")
    before = counts()
    for _ in range(3):
        assert g(system_bus, test_users.member, path, f"{SECRET}.GetValue", "0").ok
    mon.sync()
    after = counts()
    assert after[0] - before[0] == 3 and after[1] - before[1] <= 1, (before, after)


def test_interactive_flag(system_bus, make_polkitd, make_secretbusd, test_users, pyclient,
                          make_monitor):
    """ALLOW_INTERACTIVE_AUTHORIZATION on the call becomes flags=1 on CheckAuthorization.
    Without an authentication agent (no sessions here) an auth_admin answer is still a refusal,
    returned promptly, and such challenge answers are never cached."""
    rules = ("50-sbtest-polkit-interactive.rules", """
polkit.addRule(function(action, subject) {
    if (!subject.isInGroup("libvirt"))
        return polkit.Result.NOT_HANDLED;
    if (action.id == "org.libvirt.api.secret.read-secure")
        return polkit.Result.YES;
    if (action.id == "org.libvirt.api.secret.delete")
        return polkit.Result.AUTH_ADMIN;
    return polkit.Result.NOT_HANDLED;
});
""")
    make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[rules])
    make_secretbusd(system_bus)
    mon = make_monitor(system_bus)
    uuid = uuid_for(4, 1, False)
    root_define(system_bus, uuid, False, "/var/lib/sbtest/interactive.img", b"v")
    path = secret_path(uuid)

    def last_flags() -> int:
        mon.sync()
        return mon.checks()[-1].flags

    def bc(*opts) -> subprocess.CompletedProcess:
        return busctl(system_bus.address, *opts, "call", BUS_NAME, path, SECRET, "GetValue", "u", "0",
                      user=test_users.member)

    assert g(system_bus, test_users.member, path, f"{SECRET}.GetValue", "0").ok
    assert last_flags() == 0
    assert g(system_bus, test_users.member, path, f"{SECRET}.GetValue", "0", interactive=True).ok
    assert last_flags() == 1
    r = bc("--allow-interactive-authorization=no")
    assert r.returncode == 0 and r.stdout.strip() == "ay 1 118", r
    assert last_flags() == 0
    r = bc("--allow-interactive-authorization=yes")
    assert r.returncode == 0 and r.stdout.strip() == "ay 1 118", r
    assert last_flags() == 1

    client = pyclient(test_users.member, system_bus)
    for interactive in (False, False, True):
        r = client.call(path, SECRET, "Undefine", interactive=interactive)
        assert r.code() == "denied:delete" and r.secs < 3.0, r
    mon.sync()
    got = [(c.action, c.flags) for c in mon.checks(client.name)]
    delete = "org.libvirt.api.secret.delete"
    assert got == [(delete, 0), (delete, 0), (delete, 1)]   # challenges are never cached
    assert g(system_bus, None, CONNECT_PATH, f"{CONNECT}.SecretLookupByUUID", uuid).ok


def test_without_the_actions_file_nobody_gets_anything(system_bus, make_polkitd, make_secretbusd,
                                                      test_users):
    """polkitd (122) answers CheckAuthorization for an action no actions file declares with the
    error "Action … is not registered"; secretbusd fails closed. So the package must install an
    actions file (ours, or libvirt's org.libvirt.api.policy). Root alone is decided without
    polkit (uid 0 is always authorised; DESIGN §12)."""
    make_polkitd(system_bus)
    sbd = make_secretbusd(system_bus)
    r = g(system_bus, test_users.member, CONNECT_PATH, f"{CONNECT}.ListSecrets", "0")
    assert r.code() == "denied:search-secrets", r
    assert "is not registered" in sbd.log()
    assert g(system_bus, None, CONNECT_PATH, f"{CONNECT}.ListSecrets", "0").ok


@pytest.mark.parametrize("who", ["member", "root"])
def test_list_many_secrets(system_bus, make_polkitd, make_secretbusd, test_users, who):
    """ListSecrets filters every secret through getattr: with 300 secrets each caller still
    sees all 300 (the first call is uncached), twice, and the service stays on the bus."""
    make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[RULES_FILE])
    sbd = make_secretbusd(system_bus, secrets=300)
    user = test_users.member if who == "member" else None
    for _ in range(2):
        r = g(system_bus, user, CONNECT_PATH, f"{CONNECT}.ListSecrets", "0")
        assert r.ok, (r, sbd.log()[-2000:])
        got = set(re.findall(r"'(/org/libvirt/secret/secret/_[0-9a-f_]+)'", r.out))
        assert got == {secret_path(many_uuid(i)) for i in range(300)}, f"{len(got)} of 300"

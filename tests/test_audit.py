"""The audit trail of value reads (issue 12, "beyond libvirt"; access/audit.py).

Unit tests of the record, the native-protocol encoding and the modes; then the real thing:
a private system-type bus with the shipped policy, real polkitd with a rule that lets group
libvirt read every value but one, secretbusd as root, the real `sbtest-member` through
setpriv, and the real systemd-journald (in a mount namespace of its own, its socket and
journal files in a test directory; tests/harness/journal.py `Journald`) that the daemon is
pointed at with SECRETBUS_JOURNAL_SOCKET. Records are read back with real journalctl, and
`secretbus audit --directory` is the CLI reading those same journal files.
"""
from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path

import harness
import pytest
from harness.journal import Journald, JournalSocket, parse_entries, parse_entry
from harness.procs import remove_tree
from test_polkit import ACTIONS_FILE, BUS_CONF, PYCLIENT, SECRET, PyClient, g, gdbus_bytes, root_define, secret_path

from secretbus.access import audit
from secretbus.access.audit import AuditFailed, AuditMode, Auditor, AuditRecord, Outcome, Reason
from secretbus.access.journal import JournalWriter, encode_entry
from secretbus.core.model import SecretDef, UsageType

REPO = Path(__file__).resolve().parents[1]
MSGID = f"MESSAGE_ID={audit.MESSAGE_ID}"

READABLE = "5b7e5700-0000-4000-8000-a0d100000001"     # group libvirt may read it
HIDDEN = "5b7e5700-0000-4000-8000-a0d100000002"       # the rule refuses read-secure on it
PRIVATE = "5b7e5700-0000-4000-8000-a0d100000003"      # private='yes', nobody in private_value_readers
RULE = ("50-sbtest-audit.rules", f"""
polkit.addRule(function(action, subject) {{
    if (action.id == "org.libvirt.api.secret.read-secure" && subject.isInGroup("libvirt") &&
        action.lookup("secret_uuid") != "{HIDDEN}") {{
        return polkit.Result.YES;
    }}
    return polkit.Result.NOT_HANDLED;
}});
""")


def secret(uuid: str = READABLE, private: bool = False) -> SecretDef:
    return SecretDef(uuid=uuid, usage_type=UsageType.VOLUME, usage_id="/var/lib/sbtest/audit.img",
                     private=private)


def value_forms(value: bytes) -> list[bytes]:
    """The forms a value could leak in: raw, base64 (with and without padding), hex."""
    b64 = base64.b64encode(value)
    return [value, b64, b64.rstrip(b"="), value.hex().encode(), value.hex().upper().encode()]


def assert_no_value(fields: dict, value: bytes) -> None:
    for name, v in fields.items():
        data = v if isinstance(v, bytes) else (bytes(v) if isinstance(v, list) and all(
            isinstance(x, int) for x in v) else str(v).encode())
        for form in value_forms(value):
            assert form not in data, f"value (as {form[:8]!r}...) in field {name}"


# -- unit: the record, the encoding, the modes ------------------------------------------------
class FailingSink:
    def __init__(self, exc: Exception):
        self.exc = exc
        self.tries = 0

    async def send(self, fields):
        self.tries += 1
        raise self.exc


class ListSink:
    def __init__(self):
        self.sent: list[dict[str, str]] = []

    async def send(self, fields):
        self.sent.append(fields)


def record(outcome=Outcome.ALLOWED, reason=None, uid=1000, d=None) -> AuditRecord:
    return AuditRecord("dbus", outcome, d or secret(), uid, 4242, ":1.7", reason)


def test_record_fields_name_who_what_when_and_how():
    f = record().fields()
    assert f["MESSAGE_ID"] == audit.MESSAGE_ID
    assert (f["SECRET_UUID"], f["SECRET_USAGE_TYPE"], f["SECRET_USAGE_ID"]) == (
        READABLE, "volume", "/var/lib/sbtest/audit.img")
    assert (f["CALLER_UID"], f["CALLER_PID"], f["CALLER_PEER"]) == ("1000", "4242", ":1.7")
    assert (f["AUDIT_OUTCOME"], f["AUDIT_FRONT_END"], f["SECRET_OPERATION"]) == ("allowed", "dbus", "GetValue")
    assert int(f["AUDIT_TIME_USEC"]) > 1_600_000_000_000_000
    assert "AUDIT_REASON" not in f and "AUDIT_SUPPRESSED" not in f     # empty fields are left out
    d = record(Outcome.DENIED, Reason.PRIVATE, uid=None).fields()
    assert (d["AUDIT_OUTCOME"], d["AUDIT_REASON"], d["PRIORITY"]) == ("denied", "private", "4")
    assert "CALLER_UID" not in d and "uid ?" in d["MESSAGE"]


def test_allowed_record_encoded_in_one_step_has_the_same_fields():
    """audit.encode_allowed (the value read's fast path) gives exactly the fields of
    encode_entry(AuditRecord(...).fields()), the time aside; None where only the general
    encoding can (a newline in a value)."""
    volume = secret()
    plain = SecretDef("5ca1ab1e-0000-4000-8000-000000000042")          # usage none, no usage id
    for d, uid, pid, peer in [(volume, 1000, 4242, ":1.7"), (volume, None, None, ""), (plain, 0, 1, ":1.9"),
                              (SecretDef(READABLE, usage_type=UsageType.CEPH, usage_id="client.ä"), 5, None, "p")]:
        for fe in ("dbus", "rpc"):
            fast = parse_entry(audit.encode_allowed(fe, d, uid, pid, peer))
            slow = parse_entry(encode_entry(AuditRecord(fe, Outcome.ALLOWED, d, uid, pid, peer).fields()))
            t_fast, t_slow = int(fast.pop("AUDIT_TIME_USEC")[0]), int(slow.pop("AUDIT_TIME_USEC")[0])
            assert fast == slow and abs(t_fast - t_slow) < 10_000_000
    assert audit.encode_allowed("dbus", SecretDef(READABLE, usage_type=UsageType.VOLUME, usage_id="a\nb"),
                                0, 1, ":1.1") is None


class _EncodedSink:
    def __init__(self, fail: bool = False):
        self.sent: list[bytes] = []
        self.fail = fail

    async def send(self, fields):
        raise AssertionError("not awaited here")

    def send_now_encoded(self, data: bytes) -> bool:
        if self.fail:
            raise OSError(2, "No such file or directory")
        self.sent.append(data)
        return True


def test_allowed_now_writes_one_record_and_fails_closed_when_required():
    sink = _EncodedSink()
    assert Auditor(sink, AuditMode.REQUIRED).allowed_now("dbus", secret(), 1000, 4242, ":1.7") is True
    (data,) = sink.sent
    assert parse_entry(data)["SECRET_UUID"] == [READABLE.encode()]
    with pytest.raises(AuditFailed):
        Auditor(_EncodedSink(fail=True), AuditMode.REQUIRED).allowed_now("dbus", secret(), 1000, 4242, ":1.7")
    assert Auditor(_EncodedSink(fail=True), AuditMode.BEST_EFFORT).allowed_now("dbus", secret(), 0, 1, ":1.1")
    off = _EncodedSink()
    assert Auditor(off, AuditMode.OFF).allowed_now("dbus", secret(), 0, 1, ":1.1") and off.sent == []


def test_native_encoding_text_and_binary_forms_round_trip():
    fields = {"MESSAGE": "one line", "SECRET_USAGE_ID": "two\nlines", "EMPTY": ""}
    data = encode_entry(fields)
    assert b"MESSAGE=one line\n" in data
    assert b"SECRET_USAGE_ID\n" + (9).to_bytes(8, "little") + b"two\nlines\n" in data
    assert parse_entry(data) == {k: [v.encode()] for k, v in fields.items()}
    for bad in ("lower", "_TRUSTED", "A-B", "X" * 65, ""):
        with pytest.raises(ValueError):
            encode_entry({bad: "x"})


def test_required_refuses_best_effort_goes_on_off_writes_nothing():
    sink = FailingSink(FileNotFoundError(2, "No such file or directory"))
    with pytest.raises(AuditFailed) as e:
        asyncio.run(Auditor(sink, AuditMode.REQUIRED).write(record()))
    assert e.value.display() == "operation failed: audit record could not be written"
    asyncio.run(Auditor(sink, AuditMode.BEST_EFFORT).write(record()))
    tries = sink.tries
    asyncio.run(Auditor(sink, AuditMode.OFF).write(record()))
    assert sink.tries == tries == 2
    assert AuditMode.default(system=True) is AuditMode.REQUIRED
    assert AuditMode.default(system=False) is AuditMode.BEST_EFFORT


def test_repeated_denials_are_folded_allowed_reads_never(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(audit.time, "monotonic", lambda: now[0])
    sink = ListSink()
    a = Auditor(sink, AuditMode.REQUIRED)

    async def run():
        for _ in range(5):
            await a.write(record(Outcome.DENIED, Reason.ACCESS))
            await a.write(record())
        await a.write(record(Outcome.DENIED, Reason.ACCESS, uid=1001))   # another caller: its own
        now[0] += audit.DENIAL_WINDOW
        await a.write(record(Outcome.DENIED, Reason.ACCESS))
    asyncio.run(run())
    outcomes = [(f["AUDIT_OUTCOME"], f.get("CALLER_UID"), f.get("AUDIT_SUPPRESSED")) for f in sink.sent]
    assert outcomes == [("denied", "1000", None)] + [("allowed", "1000", None)] * 5 + [
        ("denied", "1001", None), ("denied", "1000", "4")]


def test_writer_fails_without_a_journal_and_reconnects_after_a_restart(tmp_path):
    path = tmp_path / "journal.socket"
    w = JournalWriter(str(path))

    async def send():
        await w.send({"MESSAGE": "hello", "MESSAGE_ID": audit.MESSAGE_ID})
    with pytest.raises(FileNotFoundError):
        asyncio.run(send())
    with JournalSocket(path) as j:
        asyncio.run(send())
        j.wait_for(lambda e: e.get("MESSAGE") == [b"hello"], timeout=5)
    with pytest.raises(OSError):          # journald stopped: the socket is gone
        asyncio.run(send())
    with JournalSocket(path) as j:        # a new journald at the same path: found again
        asyncio.run(send())
        j.wait_for(lambda e: e.get("MESSAGE") == [b"hello"], timeout=5)
    w.close()


def test_caller_pids_are_cached_bounded_forgotten_and_unknown_on_failure():
    asked: list[str] = []

    async def lookup(sender: str) -> int:
        asked.append(sender)
        if sender == ":1.gone":
            raise TimeoutError
        return 100 + len(asked)

    pids = audit.CallerPids(lookup, max_entries=2)

    async def run():
        return [await pids(s) for s in (":1.1", ":1.1", ":1.2", ":1.3", ":1.1", ":1.gone")]
    assert asyncio.run(run()) == [101, 101, 102, 103, 104, None]    # :1.1 was the oldest: asked again
    assert asked == [":1.1", ":1.2", ":1.3", ":1.1", ":1.gone"]
    pids.forget(":1.1")
    assert asyncio.run(pids(":1.1")) == 106


# -- the real thing ------------------------------------------------------------------------------
needs_journald = pytest.mark.skipif(not Journald.available(), reason="needs systemd-journald and journalctl")


@pytest.fixture
def clients(unpriv_python):
    """Factory: clients(user, bus) -> test_polkit.PyClient (one connection, as `user`)."""
    d = harness.public_tempdir("sb-audit-client-")
    script = d / "pyclient.py"
    script.write_text(PYCLIENT)
    script.chmod(0o644)
    made: list[PyClient] = []

    def make(user, bus) -> PyClient:
        made.append(PyClient(unpriv_python, user, bus, script))
        return made[-1]
    yield make
    for c in made:
        c.close()
    remove_tree(d)


@pytest.fixture
def journald():
    j = Journald()
    j.start()
    yield j
    j.cleanup()


def start_daemon(make_secretbusd, bus, journal_socket: Path | str, *args: str):
    return make_secretbusd(bus, system=True, conf="private_value_readers = [ ]\n", args=args,
                           env={"SECRETBUS_JOURNAL_SOCKET": str(journal_socket)})


def define_all(bus) -> dict[str, bytes]:
    values = {u: os.urandom(24) for u in (READABLE, HIDDEN, PRIVATE)}
    for u, v in values.items():
        root_define(bus, u, u == PRIVATE, f"/var/lib/sbtest/audit-{u[-1]}.img", v)
    return values


@needs_journald
@pytest.mark.integration
@pytest.mark.bus_policy(BUS_CONF)
def test_reads_allowed_and_denied_are_each_one_record_without_the_value(
        system_bus, make_polkitd, make_secretbusd, test_users, clients, journald):
    make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[RULE])
    sbd = start_daemon(make_secretbusd, system_bus, journald.socket)
    values = define_all(system_bus)
    member = clients(test_users.member, system_bus)

    r = member.call(secret_path(READABLE), SECRET, "GetValue", "u", [0])
    assert r.ok and r.out == [values[READABLE]], r
    allowed = journald.wait_for(MSGID, f"SECRET_UUID={READABLE}")
    assert len(allowed) == 1
    rec = allowed[0]
    assert rec["AUDIT_OUTCOME"] == "allowed" and rec["AUDIT_FRONT_END"] == "dbus"
    assert rec["CALLER_UID"] == str(test_users.member.uid)
    assert rec["CALLER_PID"] == str(member.proc.pid)          # setpriv execs: this is the client
    assert rec["CALLER_PEER"] == member.name
    assert (rec["SECRET_USAGE_TYPE"], rec["SECRET_USAGE_ID"]) == ("volume", "/var/lib/sbtest/audit-1.img")
    assert rec["_PID"] == str(sbd.proc.pid) and rec["SYSLOG_IDENTIFIER"] == "secretbusd"  # journald's own

    r = member.call(secret_path(HIDDEN), SECRET, "GetValue", "u", [0])
    assert not r.ok and r.error == "org.libvirt.Error.AccessDenied", r
    r = member.call(secret_path(PRIVATE), SECRET, "GetValue", "u", [0])
    assert not r.ok and r.error == "org.libvirt.Error.InvalidSecret", r
    (hidden,) = journald.wait_for(MSGID, f"SECRET_UUID={HIDDEN}")
    (private,) = journald.wait_for(MSGID, f"SECRET_UUID={PRIVATE}")
    for rec, reason in ((hidden, "access"), (private, "private")):
        assert (rec["AUDIT_OUTCOME"], rec["AUDIT_REASON"]) == ("denied", reason)
        assert (rec["CALLER_UID"], rec["CALLER_PEER"]) == (str(test_users.member.uid), member.name)

    # Root reads too (polkit always says yes to uid 0), through another connection.
    r = g(system_bus, None, secret_path(READABLE), f"{SECRET}.GetValue", "0")
    assert r.ok and gdbus_bytes(r.out) == values[READABLE]
    recs = journald.wait_for(MSGID, f"SECRET_UUID={READABLE}", count=2)
    assert [x["CALLER_UID"] for x in recs] == [str(test_users.member.uid), "0"]

    # Not one value in any field of any record, nor anywhere in the journal files.
    everything = journald.read()
    assert len([e for e in everything if e.get("MESSAGE_ID") == audit.MESSAGE_ID]) == 4
    for entry in everything:
        for v in values.values():
            assert_no_value(entry, v)
    blob = b"".join(p.read_bytes() for p in journald.files.rglob("*.journal"))
    for v in values.values():
        for form in value_forms(v):
            assert form not in blob


@needs_journald
@pytest.mark.integration
@pytest.mark.bus_policy(BUS_CONF)
def test_no_journal_no_value_on_the_system_bus(system_bus, make_polkitd, make_secretbusd, journald):
    """journald stops while the service runs: the read is refused and nothing is returned;
    once journald is back at its socket, reads are recorded and answered again."""
    make_polkitd(system_bus, actions=[ACTIONS_FILE])
    start_daemon(make_secretbusd, system_bus, journald.socket)
    values = define_all(system_bus)
    r = g(system_bus, None, secret_path(READABLE), f"{SECRET}.GetValue", "0")
    assert r.ok and gdbus_bytes(r.out) == values[READABLE]
    journald.stop()
    r = g(system_bus, None, secret_path(READABLE), f"{SECRET}.GetValue", "0")
    assert not r.ok, r
    assert (r.error, r.message) == ("org.libvirt.Error.OperationFailed",
                                    "operation failed: audit record could not be written")
    journald.start()
    r = g(system_bus, None, secret_path(READABLE), f"{SECRET}.GetValue", "0")
    assert r.ok and gdbus_bytes(r.out) == values[READABLE]
    assert len(journald.wait_for(MSGID, f"SECRET_UUID={READABLE}", count=2)) == 2


@pytest.mark.integration
@pytest.mark.bus_policy(BUS_CONF)
def test_no_journal_socket_at_all(system_bus, make_polkitd, make_secretbusd, tmp_path):
    """Nothing at the socket path: required refuses; best-effort (the session bus's default,
    or chosen for the system bus) answers."""
    make_polkitd(system_bus, actions=[ACTIONS_FILE])
    missing = tmp_path / "no-journal" / "socket"
    start_daemon(make_secretbusd, system_bus, missing)
    define_all(system_bus)
    r = g(system_bus, None, secret_path(READABLE), f"{SECRET}.GetValue", "0")
    assert (r.ok, r.error, r.out) == (False, "org.libvirt.Error.OperationFailed", None), r
    assert "audit record could not be written" in r.message
    r = g(system_bus, None, secret_path(PRIVATE), f"{SECRET}.GetValue", "0")
    assert r.error == "org.libvirt.Error.InvalidSecret", r     # a denial stays a denial


@pytest.mark.integration
@pytest.mark.bus_policy(BUS_CONF)
def test_best_effort_reads_on_without_a_journal(system_bus, session_bus, make_polkitd, make_secretbusd, tmp_path):
    missing = tmp_path / "no-journal" / "socket"
    for bus, system, args in ((system_bus, True, ("--audit", "best-effort")), (session_bus, False, ())):
        if system:
            make_polkitd(bus, actions=[ACTIONS_FILE])
        sbd = make_secretbusd(bus, system=system, args=args, env={"SECRETBUS_JOURNAL_SOCKET": str(missing)})
        value = define_all(bus)[READABLE]
        r = g(bus, None, secret_path(READABLE), f"{SECRET}.GetValue", "0")
        assert r.ok and gdbus_bytes(r.out) == value, (system, r)
        log = harness.wait_until(lambda d=sbd: (lambda t: t if "audit records could not be written" in t
                                                 else None)(d.log()), timeout=5, what="the best-effort warning")
        assert log.count("audit records could not be written") == 1


@needs_journald
@pytest.mark.integration
@pytest.mark.bus_policy(BUS_CONF)
def test_secretbus_audit_prints_the_records_of_a_secret(system_bus, make_polkitd, make_secretbusd,
                                                      test_users, clients, journald):
    make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[RULE])
    start_daemon(make_secretbusd, system_bus, journald.socket)
    values = define_all(system_bus)
    member = clients(test_users.member, system_bus)
    assert member.call(secret_path(READABLE), SECRET, "GetValue", "u", [0]).ok
    assert not member.call(secret_path(HIDDEN), SECRET, "GetValue", "u", [0]).ok
    journald.wait_for(MSGID, count=2)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "secretbus.cli", "audit", "--directory", str(journald.files),
                               *args], capture_output=True, timeout=60, cwd=REPO)
    r = cli("--secret", READABLE.upper())        # any libvirt UUID spelling
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["Time", "Outcome", "UID", "PID", "Caller", "Via", "Secret", "Usage"]
    (row,) = [x for x in lines[2:] if x.strip()]
    assert " allowed " in row and f" {test_users.member.uid} " in row and f" {member.proc.pid} " in row
    assert f" {member.name} " in row and " dbus " in row and row.rstrip().endswith(
        f"{READABLE}   volume /var/lib/sbtest/audit-1.img")
    r = cli("--secret", HIDDEN, "--since", "2000-01-01")
    assert r.returncode == 0 and " denied (access) " in r.stdout.decode(), r
    r = cli("--since", "tomorrow")
    assert r.returncode == 0 and [x for x in r.stdout.decode().splitlines()[2:] if x.strip()] == []
    r = cli()
    assert len([x for x in r.stdout.decode().splitlines()[2:] if x.strip()]) == 2
    for v in values.values():
        for form in value_forms(v):
            assert form not in r.stdout
    r = cli("--secret", "not-a-uuid")
    assert r.returncode == 1 and b"invalid secret UUID 'not-a-uuid'" in r.stderr


def test_no_journal_is_known_before_a_record_is_built(tmp_path):
    """JournalWriter.available: no socket file, no send tried and no record encoded (the
    no-journald host's every read); required still refuses, best-effort counts the loss."""
    path = tmp_path / "journal.socket"
    w = JournalWriter(str(path))
    assert w.available() is False
    with pytest.raises(AuditFailed):
        Auditor(w, AuditMode.REQUIRED).allowed_now("rpc", secret(), 0, 1, "rpc-1")
    with pytest.raises(AuditFailed):
        Auditor(w, AuditMode.REQUIRED).write_now(record())
    best = Auditor(w, AuditMode.BEST_EFFORT)
    assert best.allowed_now("rpc", secret(), 0, 1, "rpc-1") and best.write_now(record())
    assert best._failures == 2
    with JournalSocket(path) as j:
        assert w.available() is True
        assert Auditor(w, AuditMode.REQUIRED).allowed_now("rpc", secret(), 0, 1, "rpc-1") is True
        j.wait_for(lambda e: e.get("CALLER_PEER") == [b"rpc-1"], timeout=5)
    w.close()


def test_held_records_go_in_one_send_and_fail_as_one():
    """Auditor.hold: records held go with send_held in one datagram (none before); a datagram
    journald refuses is every record lost: required refuses them all, best-effort counts each."""
    class Sink:
        def __init__(self, now: bool | None = True):
            self.now, self.sent, self.later = now, [], []

        def available(self):
            return True

        def send_now_encoded(self, data):
            if self.now is None:
                raise OSError(5, "Input/output error")
            if self.now:
                self.sent.append(data)
            return self.now

        async def send_encoded(self, data):
            self.later.append(data)

        async def send(self, fields):
            raise AssertionError("held records are not sent one by one")

    sink = Sink()
    a = Auditor(sink, AuditMode.REQUIRED)
    held = a.hold()
    assert held is not None and a.send_held(held) is None and sink.sent == []     # nothing held: nothing sent
    for i in range(3):
        assert a.allowed_now("rpc", secret(f"5b7e5700-0000-4000-8000-a0d10000010{i}"), 0, 1, "rpc-1", held)
    assert a.write_now(record(), held) and sink.sent == [] and len(held) == 4
    assert a.send_held(held) is None and len(held) == 0
    (data,) = sink.sent
    assert [e["SECRET_UUID"][0][-1:] for e in parse_entries(data)] == [b"0", b"1", b"2", b"1"]

    for mode, failures in ((AuditMode.REQUIRED, 2), (AuditMode.BEST_EFFORT, 2)):
        a = Auditor(Sink(now=None), mode)
        held = a.hold()
        a.allowed_now("rpc", secret(), 0, 1, "rpc-1", held)
        a.allowed_now("rpc", secret(), 0, 1, "rpc-1", held)
        if mode is AuditMode.REQUIRED:
            with pytest.raises(AuditFailed):
                a.send_held(held)
        else:
            assert a.send_held(held) is None
        assert a._failures == failures and len(held) == 0

    full = Sink(now=False)
    a = Auditor(full, AuditMode.REQUIRED)
    held = a.hold()
    a.allowed_now("rpc", secret(), 0, 1, "rpc-1", held)
    waits = a.send_held(held)
    assert waits is not None and waits[1] == 1 and full.later == []
    asyncio.run(a.send_held_later(*waits))
    assert full.later == [waits[0]]
    assert Auditor(full, AuditMode.OFF).hold() is None
    assert Auditor(RecordOnlySink(), AuditMode.REQUIRED).hold() is None


class RecordOnlySink:
    async def send(self, fields):
        pass


@needs_journald
@pytest.mark.integration
def test_the_real_journald_keeps_every_record_of_one_datagram(journald):
    """What send_held sends: the fast format, the general one (an identity), and a usage id
    with a newline (its binary-safe field) in one datagram are three records in journald."""
    w = JournalWriter(str(journald.socket))
    a = Auditor(w, AuditMode.REQUIRED)
    held = a.hold()
    uuids = [f"5b7e5700-0000-4000-8000-a0d10000020{i}" for i in range(3)]
    a.allowed_now("rpc", secret(uuids[0]), 0, 1, "rpc-1", held)
    a.write_now(AuditRecord("rpc", Outcome.ALLOWED, secret(uuids[1]), 0, 1, "rpc-1", identity="uid 5 (elevated)"),
                held)
    odd = SecretDef(uuid=uuids[2], usage_type=UsageType.VOLUME, usage_id="/v/a\nb.img")
    a.allowed_now("rpc", odd, 0, 1, "rpc-1", held)
    assert a.send_held(held) is None
    recs = {r["SECRET_UUID"]: r for r in journald.wait_for(MSGID, "CALLER_PEER=rpc-1", count=3)}
    assert set(recs) == set(uuids)
    assert recs[uuids[1]]["CALLER_IDENTITY"] == "uid 5 (elevated)"
    assert recs[uuids[2]]["SECRET_USAGE_ID"] == "/v/a\nb.img"
    w.close()

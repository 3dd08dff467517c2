"""GetValue answered without a task (execute.py's fast path): still one audit record per value,
fail closed without journald, and the slow path when the record cannot go out at once.

Real secretbusd on a private session bus, a real systemd-journald at a private socket, one
dbus-fast connection doing many reads (the first read of a connection looks its pid up and
takes the awaiting path; the later ones are answered at once).
"""
from __future__ import annotations

import asyncio
import os

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from harness.journal import Journald
from test_audit import (
    ACTIONS_FILE,
    BUS_CONF,
    HIDDEN,
    MSGID,
    RULE,
    clients,  # noqa: F401 - the fixture
    define_all,
    needs_journald,
    start_daemon,
)
from test_polkit import SECRET, secret_path

from secretbus.access.audit import AuditMode, Auditor, AuditRecord, Outcome
from secretbus.core.model import SecretDef, UsageType

READABLE = "5b7e5700-0000-4000-8000-a0d100000001"
READS = 25


async def _reads(address: str, n: int) -> tuple[list[bytes], list[tuple[str, str]]]:
    bus = await MessageBus(bus_address=address).connect()
    try:
        values, errors = [], []
        for _ in range(n):
            r = await bus.call(Message(destination="org.libvirt.secret", path=secret_path(READABLE),
                                       interface=SECRET, member="GetValue", signature="u", body=[0]))
            if r.message_type is MessageType.ERROR:
                errors.append((r.error_name, r.body[0] if r.body else ""))
            else:
                values.append(bytes(r.body[0]))
        return values, errors
    finally:
        bus.disconnect()


async def _reads_in_flight(address: str, n: int) -> list[bytes]:
    """One read (it looks the pid up), then `n` with 16 in flight (answered inline, several per loop pass)."""
    bus = await MessageBus(bus_address=address).connect()
    slots = asyncio.Semaphore(16)

    async def call() -> Message:
        async with slots:
            return await bus.call(Message(destination="org.libvirt.secret", path=secret_path(READABLE),
                                          interface=SECRET, member="GetValue", signature="u", body=[0]))
    try:
        first = await asyncio.wait_for(call(), 10)
        replies = [first] + list(await asyncio.wait_for(asyncio.gather(*(call() for _ in range(n))), 10))
        failed = [r.error_name for r in replies if r.message_type is MessageType.ERROR]
        assert failed == []          # names only: a reply's body is the value
        return [bytes(r.body[0]) for r in replies]
    finally:
        bus.disconnect()


@pytest.fixture
def journald():
    j = Journald()
    j.start()
    yield j
    j.cleanup()


@needs_journald
@pytest.mark.integration
@pytest.mark.parametrize("in_flight", [False, True], ids=["one-at-a-time", "16-in-flight"])
def test_every_fast_read_is_one_record_with_uid_and_pid(session_bus, make_secretbusd, journald, in_flight):
    make_secretbusd(session_bus, args=("--audit", "required"),
                    env={"SECRETBUS_JOURNAL_SOCKET": str(journald.socket)})
    value = define_all(session_bus)[READABLE]
    n = 4 * READS if in_flight else READS
    if in_flight:          # several reads answered in each loop pass
        values = asyncio.run(_reads_in_flight(session_bus.address, n - 1))
    else:
        values, errors = asyncio.run(_reads(session_bus.address, n))
        assert errors == []
    assert len(values) == n and all(v == value for v in values)   # no value printed
    recs = journald.wait_for(MSGID, f"SECRET_UUID={READABLE}", count=n)
    assert len(recs) == n
    assert {(r["AUDIT_OUTCOME"], r["CALLER_UID"], r["CALLER_PID"]) for r in recs} == {
        ("allowed", str(os.getuid()), str(os.getpid()))}
    for r in recs:
        assert all(v not in str(r) for v in (value.hex(), repr(value)))


@pytest.mark.integration
def test_fast_reads_fail_closed_without_a_journal(session_bus, make_secretbusd, tmp_path):
    make_secretbusd(session_bus, args=("--audit", "required"),
                    env={"SECRETBUS_JOURNAL_SOCKET": str(tmp_path / "none" / "socket")})
    define_all(session_bus)
    values, errors = asyncio.run(_reads(session_bus.address, 5))
    assert values == []
    assert errors == [("org.libvirt.Error.OperationFailed",
                       "operation failed: audit record could not be written")] * 5


class NotNowSink:
    """A journal whose queue is full for `send_now`: the awaited path must write it."""

    def __init__(self):
        self.now = 0
        self.sent: list[dict[str, str]] = []

    def send_now(self, fields):
        self.now += 1
        return False

    async def send(self, fields):
        self.sent.append(fields)


def test_write_now_leaves_a_record_it_cannot_send_to_the_awaited_write():
    d = SecretDef(uuid=READABLE, usage_type=UsageType.VOLUME, usage_id="/x")
    rec = AuditRecord("dbus", Outcome.ALLOWED, d, 0, 1, ":1.1")
    sink = NotNowSink()
    a = Auditor(sink, AuditMode.REQUIRED)
    assert a.write_now(rec) is False and sink.sent == []
    asyncio.run(a.write(rec))
    assert len(sink.sent) == 1 and sink.now == 1
    # Denials are never written by write_now (they are folded by the awaited path).
    assert a.write_now(AuditRecord("dbus", Outcome.DENIED, d, 0, 1, ":1.1")) is False


# -- the system bus: reads answered inline once polkit's decision is cached ----------------------


@needs_journald
@pytest.mark.integration
@pytest.mark.bus_policy(BUS_CONF)
def test_cached_decisions_answer_inline_and_every_read_is_still_recorded(
        system_bus, make_polkitd, make_secretbusd, test_users, clients, journald):  # noqa: F811
    """A member allowed read-secure by a polkit rule reads 10 times on one connection (the
    first asks polkit, the rest use the cached yes and are answered inline): 10 values, 10
    records; a secret the rule refuses stays refused each time (a cached no takes the awaiting
    path, with its denied record folded as before)."""
    make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[RULE])
    start_daemon(make_secretbusd, system_bus, journald.socket)
    values = define_all(system_bus)
    member = clients(test_users.member, system_bus)
    for _ in range(10):
        r = member.call(secret_path(READABLE), SECRET, "GetValue", "u", [0])
        assert r.ok, r.error
        if r.out != [values[READABLE]]:
            pytest.fail("wrong value")       # not the values themselves: never printed
        r = member.call(secret_path(HIDDEN), SECRET, "GetValue", "u", [0])
        assert not r.ok and r.error == "org.libvirt.Error.AccessDenied", r
    recs = journald.wait_for(MSGID, f"SECRET_UUID={READABLE}", count=10)
    assert len(recs) == 10
    assert {(x["AUDIT_OUTCOME"], x["CALLER_UID"], x["CALLER_PEER"]) for x in recs} == {
        ("allowed", str(test_users.member.uid), member.name)}
    (denied,) = journald.wait_for(MSGID, f"SECRET_UUID={HIDDEN}")      # repeats folded
    assert denied["AUDIT_OUTCOME"] == "denied"

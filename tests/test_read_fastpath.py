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
from test_audit import MSGID, define_all, needs_journald
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


@pytest.fixture
def journald():
    j = Journald()
    j.start()
    yield j
    j.cleanup()


@needs_journald
@pytest.mark.integration
def test_every_fast_read_is_one_record_with_uid_and_pid(session_bus, make_secretbusd, journald):
    make_secretbusd(session_bus, args=("--audit", "required"),
                    env={"SECRETBUS_JOURNAL_SOCKET": str(journald.socket)})
    value = define_all(session_bus)[READABLE]
    values, errors = asyncio.run(_reads(session_bus.address, READS))
    assert errors == [] and values == [value] * READS
    recs = journald.wait_for(MSGID, f"SECRET_UUID={READABLE}", count=READS)
    assert len(recs) == READS
    assert {(r["AUDIT_OUTCOME"], r["CALLER_UID"], r["CALLER_PID"]) for r in recs} == {
        ("allowed", str(os.getuid()), str(os.getpid()))}
    for r in recs:
        assert value.hex() not in str(r) and repr(value) not in str(r)


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

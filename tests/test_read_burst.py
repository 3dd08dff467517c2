"""Value reads of one loop pass share a burst of audit records (bus/burst.py): every reply still
goes after its own record, a record the journal cannot take now sends that read the awaiting
way, and a record that cannot be written at all (required mode) gives no value.

The D-Bus service without a bus (test_dispatch's Harness), with a real Auditor on a sink that
logs what it takes, in order with the replies the stand-in connection sends.
"""
from __future__ import annotations

import asyncio

import pytest
from dbus_fast import Message, MessageType
from fixtures import U1
from fixtures import secret_xml as xml
from test_dispatch import P1, VALUE, FakeBus, Harness, ok

from secretbus.access.audit import AuditMode, Auditor, CallerPids
from secretbus.bus.auditing import ReadAudit
from secretbus.bus.burst import RecordBurst
from secretbus.bus.names import CONNECT_IFACE, CONNECT_PATH, SECRET_IFACE
from secretbus.bus.service import SecretService

READS = 8


class LoggingBus(FakeBus):
    def __init__(self, log: list[tuple[str, int]]):
        super().__init__()
        self.log = log

    def send(self, msg):
        if msg.message_type is not MessageType.SIGNAL:
            self.log.append(("reply", msg.reply_serial))
        return super().send(msg)


class Sink:
    """A journal: `full` makes send_now_encoded refuse (its queue is full), `broken` fail."""

    def __init__(self, log: list[tuple[str, int]]):
        self.log = log
        self.full = False
        self.broken = False
        self.now: list[bytes] = []
        self.awaited: list[dict[str, str]] = []

    def available(self) -> bool:
        return True

    def send_now_encoded(self, data: bytes) -> bool:
        if self.broken:
            raise OSError(5, "Input/output error")
        if self.full:
            return False
        self.now.append(data)
        self.log.append(("record", len(self.now)))
        return True

    def send_now(self, fields) -> bool:
        return False

    async def send(self, fields) -> None:
        if self.broken:
            raise OSError(5, "Input/output error")
        self.awaited.append(dict(fields))
        self.log.append(("record", -len(self.awaited)))


class AuditedHarness(Harness):
    def __init__(self, tmp_path, mode: AuditMode):
        super().__init__(tmp_path)
        self.log: list[tuple[str, int]] = []
        self.bus = LoggingBus(self.log)
        self.sink = Sink(self.log)
        self.mode = mode

    async def __aenter__(self):
        async def pid(sender: str) -> int:
            return 4242
        audit = ReadAudit(Auditor(self.sink, self.mode), self.access, CallerPids(pid))
        self.service = SecretService(self.driver, self.bus, self.access, audit=audit)
        self.service.attach()
        return self

    def fire(self, n: int) -> list[int]:
        """`n` GetValue calls delivered in one loop pass, as dbus-fast's reader does."""
        serials = []
        for _ in range(n):
            self.serial += 1
            msg = Message(destination="org.libvirt.secret", path=P1, interface=SECRET_IFACE,
                          member="GetValue", signature="u", body=[0], serial=self.serial, sender=":1.42")
            assert self.bus.handlers[0](msg) is True        # held or awaiting: no reply inline
            serials.append(self.serial)
        return serials

    async def replies(self, serials: list[int]) -> dict[int, Message]:
        for _ in range(200):
            got = {m.reply_serial: m for m in self.bus.sent if m.reply_serial in serials}
            if len(got) == len(serials):
                return got
            await asyncio.sleep(0.01)
        raise AssertionError("replies missing")


async def _ready(h: AuditedHarness) -> None:
    ok(await h.call(CONNECT_PATH, CONNECT_IFACE, "SecretDefineXML", "su", [xml(), 0]))
    ok(await h.call(P1, SECRET_IFACE, "SetValue", "ayu", [VALUE, 0]))
    assert ok(await h.call(P1, SECRET_IFACE, "GetValue", "u", [0])) == [VALUE]   # looks the pid up
    h.log.clear()


def test_a_pass_of_reads_sends_its_records_back_to_back_then_each_reply(tmp_path):
    async def main():
        async with AuditedHarness(tmp_path, AuditMode.REQUIRED) as h:
            await _ready(h)
            serials = h.fire(READS)
            assert h.log == [] and len(h.service._runner.burst) == READS
            assert h.service._runner.budget.active(":1.42")       # in flight until answered
            got = await h.replies(serials)
            assert all(m.message_type is MessageType.METHOD_RETURN and m.body == [VALUE] for m in got.values())
            assert h.log[:READS] == [("record", i) for i in range(1, READS + 1)]
            assert [k for k, _ in h.log[READS:]] == ["reply"] * READS
            recs = h.sink.now[-READS:]
            assert all(U1.encode() in r and b"CALLER_PID=4242" in r and VALUE not in r for r in recs)
            assert not h.service._runner.budget.active(":1.42")   # every call released
    asyncio.run(main())


def test_a_record_the_journal_cannot_take_now_is_awaited_before_its_value(tmp_path):
    async def main():
        async with AuditedHarness(tmp_path, AuditMode.REQUIRED) as h:
            await _ready(h)
            h.sink.full = True
            before = len(h.sink.awaited)
            serials = h.fire(3)
            got = await h.replies(serials)
            assert all(m.body == [VALUE] for m in got.values())
            # Each value went after a record written the awaiting way.
            assert len(h.sink.awaited) == before + 3 and len(h.log) == 6
            records = replies = 0
            for kind, _ in h.log:        # never more values out than records written
                records += kind == "record"
                replies += kind == "reply"
                assert replies <= records
    asyncio.run(main())


@pytest.mark.parametrize("mode, value_returned", [(AuditMode.REQUIRED, False), (AuditMode.BEST_EFFORT, True)])
def test_a_record_that_cannot_be_written_follows_the_mode(tmp_path, mode, value_returned):
    async def main():
        async with AuditedHarness(tmp_path, mode) as h:
            await _ready(h)
            h.sink.broken = True
            got = await h.replies(h.fire(4))
            for m in got.values():
                if value_returned:
                    assert m.body == [VALUE]
                else:
                    assert m.message_type is MessageType.ERROR
                    assert m.body == ["operation failed: audit record could not be written"]
                    assert VALUE not in repr(m.body).encode()
    asyncio.run(main())


def test_one_failing_answer_does_not_drop_the_others():
    async def main():
        answered, waited, flushed = [], [], []

        def answer(item, failed):
            if item == 1:
                raise RuntimeError("boom")
            answered.append((item, failed))

        def send(d, record):
            if record == b"full":
                return False
            if record == b"bad":
                raise OSError("no")
            return True
        from secretbus.core.model import SecretDef
        d = SecretDef(U1)
        burst: RecordBurst[int] = RecordBurst(asyncio.get_running_loop(), send, answer, waited.append,
                                              lambda: flushed.append(1))
        for i, rec in enumerate([b"a", b"b", b"full", b"bad"]):
            burst.hold(d, rec, i)
        await asyncio.sleep(0)
        assert answered[0] == (0, None) and waited == [2]
        assert answered[1][0] == 3 and isinstance(answered[1][1], OSError)
        assert flushed == [1] and len(burst) == 0
    asyncio.run(main())

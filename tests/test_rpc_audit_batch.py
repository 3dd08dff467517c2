"""The value reads that one read of an RPC connection brings: their audit records go to the
journal together, in one datagram, before any of those values is written to the client
(rpc/connection.py `_out`, access/audit.py `HeldRecords`).

A real driver, the real Procedures, Guard and Auditor; the journal is a stand-in with
JournalWriter's methods that logs, with the transport, the order of what was sent where. The
real journald reading several entries from one datagram is tests/test_audit.py's."""
from __future__ import annotations

import asyncio
import uuid as uuidlib
from typing import Any

import pytest
from harness.journal import parse_entries
from test_rpc_framing import FakeTransport

from secretbus.access.audit import AuditMode, Auditor
from secretbus.core.model import InstanceKind
from secretbus.driver.build import open_instance
from secretbus.rpc import protocol as P
from secretbus.rpc import xdr
from secretbus.rpc.connection import Connection, RpcLimits
from secretbus.rpc.frame import LENGTH_SIZE, Header, decode_frame, encode_frame
from secretbus.rpc.guard import Guard
from secretbus.rpc.identity import SystemToken
from secretbus.rpc.procedures import Procedures
from secretbus.rpc.session import Peer, Session
from secretbus.store.paths import InstancePaths

N = 16
UUIDS = [f"5b7e5700-0000-4000-8002-{i:012x}" for i in range(N)]
VALUES = {u: f"value-{i}".encode() for i, u in enumerate(UUIDS)}
AUDIT_FAILED = "operation failed: audit record could not be written"


class Journal:
    """JournalWriter's side the Auditor uses. `now`: what send_now_encoded does ("take",
    "full": journald's queue is full, "broken": an error); `later`: what the awaited send does
    ("take", "broken"). Every datagram taken is logged in `order` as ("journal", data)."""

    def __init__(self, order: list[tuple[str, bytes]], now: str = "take", later: str = "take"):
        self.order, self.now, self.later = order, now, later
        self.gate: asyncio.Future[None] | None = None     # the awaited send waits for it, if set

    def available(self) -> bool:
        return True

    def send_now_encoded(self, data: bytes) -> bool:
        if self.now == "broken":
            raise OSError(5, "Input/output error")
        if self.now == "full":
            return False
        self.order.append(("journal", data))
        return True

    async def send_encoded(self, data: bytes) -> None:
        if self.gate is not None:
            await self.gate
        if self.later == "broken":
            raise TimeoutError()
        self.order.append(("journal", data))

    def send_now(self, fields: Any) -> bool:
        raise AssertionError("records are held, never sent one by one here")

    async def send(self, fields: Any) -> None:
        raise AssertionError("records are held, never sent one by one here")


class Client(FakeTransport):
    def __init__(self, order: list[tuple[str, bytes]]):
        super().__init__()
        self.order = order

    def write(self, data: Any) -> None:
        self.order.append(("client", bytes(data)))
        super().write(data)

    def frames(self) -> list[tuple[Header, bytes]]:
        out, data = [], bytes(self.out)
        while data:
            n = int.from_bytes(data[:LENGTH_SIZE], "big")
            out.append(decode_frame(data[:n]))
            data = data[n:]
        return out


def call(proc: int, serial: int, args: Any) -> bytes:
    return encode_frame(Header(P.REMOTE_PROGRAM, 1, proc, P.MsgType.CALL, serial, P.Status.OK),
                        xdr.encode(P.PROCS[proc].args, args))


def get_value(serial: int, u: str) -> bytes:
    handle = {"uuid": uuidlib.UUID(u).bytes, "usageType": 1, "usageID": ""}
    return call(P.Proc.SECRET_GET_VALUE, serial, {"secret": handle, "flags": 0})


class Rig:
    def __init__(self, tmp_path, mode: AuditMode, now: str = "take", later: str = "take"):
        self.driver = open_instance(InstancePaths.for_kind(InstanceKind.SESSION, tmp_path / "root"))
        for i, u in enumerate(UUIDS):
            self.driver.define_xml(f"<secret ephemeral='no' private='no'><uuid>{u}</uuid>"
                                   f"<usage type='volume'><volume>/v/{i}.img</volume></usage></secret>")
            self.driver.set_value(u, VALUES[u])
        token = SystemToken(tmp_path / "common" / "system.token")
        token.ensure()
        self.order: list[tuple[str, bytes]] = []
        self.journal = Journal(self.order, now, later)
        auditor = Auditor(self.journal, mode)
        guard = Guard(system=False, auditor=auditor)
        table = Procedures(self.driver, None, token, system=False, guard=guard).table()  # type: ignore[arg-type]
        session = Session(Peer(pid=4242, uid=1000, gid=1000), socket_readonly=False, trusted=True,
                          authenticated=True, opened=True)
        self.conn = Connection(session, table, RpcLimits(), lambda _c: None, None, auditor)
        self.t = Client(self.order)
        self.conn.connection_made(self.t)

    def replies(self) -> dict[int, tuple[int, Any]]:
        """serial -> (status, the value read, the reply of another call, or the error message)"""
        out = {}
        for h, payload in self.t.frames():
            if h.status == P.Status.OK:
                ret = xdr.decode(P.PROCS[h.proc].ret, payload)
                out[h.serial] = (h.status, bytes(ret["value"]) if h.proc == P.Proc.SECRET_GET_VALUE else ret)
            else:
                out[h.serial] = (h.status, xdr.decode(P.REMOTE_ERROR, payload)["message"])
        return out

    def close(self) -> None:
        self.conn.close()
        self.driver.close()


def records(data: bytes) -> list[str]:
    """The SECRET_UUID of each record in one datagram."""
    return [e["SECRET_UUID"][0].decode() for e in parse_entries(data)]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("mode", [AuditMode.REQUIRED, AuditMode.BEST_EFFORT])
def test_one_read_of_sixteen_value_calls_is_one_datagram_then_one_write(tmp_path, mode):
    async def main() -> None:
        r = Rig(tmp_path, mode)
        r.conn.data_received(b"".join(get_value(i, u) for i, u in enumerate(UUIDS)))
        await settle()
        assert [where for where, _ in r.order] == ["journal", "client"]
        assert records(r.order[0][1]) == UUIDS
        assert r.replies() == {i: (P.Status.OK, VALUES[u]) for i, u in enumerate(UUIDS)}
        # the next read: its own datagram, before its own reply
        r.conn.data_received(get_value(99, UUIDS[3]))
        await settle()
        assert [where for where, _ in r.order] == ["journal", "client"] * 2
        assert records(r.order[2][1]) == [UUIDS[3]]
        r.close()
    asyncio.run(main())


def test_reads_of_other_calls_mixed_in_are_answered_in_the_same_write(tmp_path):
    async def main() -> None:
        r = Rig(tmp_path, AuditMode.REQUIRED)
        lookup = call(P.Proc.SECRET_LOOKUP_BY_UUID, 50, {"uuid": uuidlib.UUID(UUIDS[0]).bytes})
        r.conn.data_received(get_value(1, UUIDS[1]) + lookup + get_value(2, UUIDS[2]))
        await settle()
        assert [where for where, _ in r.order] == ["journal", "client"]
        assert records(r.order[0][1]) == [UUIDS[1], UUIDS[2]]
        assert [h.serial for h, _ in r.t.frames()] == [1, 50, 2]
        r.close()
    asyncio.run(main())


def test_required_a_datagram_journald_refuses_turns_that_reads_values_into_errors(tmp_path):
    """audit = required: no record kept, no value; the other replies of the read go out."""
    async def main() -> None:
        r = Rig(tmp_path, AuditMode.REQUIRED, now="broken")
        lookup = call(P.Proc.SECRET_LOOKUP_BY_UUID, 50, {"uuid": uuidlib.UUID(UUIDS[0]).bytes})
        r.conn.data_received(b"".join(get_value(i, u) for i, u in enumerate(UUIDS[:4])) + lookup)
        await settle()
        got = r.replies()
        assert {s: got[s] for s in range(4)} == {s: (P.Status.ERROR, AUDIT_FAILED) for s in range(4)}
        assert got[50][0] == P.Status.OK
        assert all(v not in bytes(r.t.out) for v in VALUES.values())
        assert r.conn._auditor is not None and r.conn._auditor._failures == 4
        r.close()
    asyncio.run(main())


def test_best_effort_a_datagram_journald_refuses_is_counted_and_the_values_go_out(tmp_path):
    async def main() -> None:
        r = Rig(tmp_path, AuditMode.BEST_EFFORT, now="broken")
        r.conn.data_received(b"".join(get_value(i, u) for i, u in enumerate(UUIDS)))
        await settle()
        assert r.replies() == {i: (P.Status.OK, VALUES[u]) for i, u in enumerate(UUIDS)}
        assert r.conn._auditor is not None and r.conn._auditor._failures == N
        r.close()
    asyncio.run(main())


@pytest.mark.parametrize("later", ["take", "broken"])
def test_a_full_journal_holds_the_values_and_the_reading_until_it_takes_them(tmp_path, later):
    """journald's queue is full: the read's replies wait for the awaited send (and nothing
    more of the connection is read meanwhile); then the values, or (it never took them,
    required) the errors."""
    async def main() -> None:
        r = Rig(tmp_path, AuditMode.REQUIRED, now="full", later=later)
        r.journal.gate = asyncio.get_running_loop().create_future()
        r.conn.data_received(b"".join(get_value(i, u) for i, u in enumerate(UUIDS[:3])))
        await settle()
        assert r.order == [] and r.conn.unread > 0
        r.conn.data_received(get_value(7, UUIDS[7]))         # the next read waits in the kernel
        await settle()
        assert r.order == [] and r.t.paused
        r.journal.now = "take"
        r.journal.gate.set_result(None)
        await settle()
        got = r.replies()
        if later == "take":
            assert [where for where, _ in r.order] == ["journal", "client", "journal", "client"]
            assert records(r.order[0][1]) == UUIDS[:3] and records(r.order[2][1]) == [UUIDS[7]]
            assert got == {**{i: (P.Status.OK, VALUES[u]) for i, u in enumerate(UUIDS[:3])},
                           7: (P.Status.OK, VALUES[UUIDS[7]])}
        else:
            assert {s: got[s] for s in range(3)} == {s: (P.Status.ERROR, AUDIT_FAILED) for s in range(3)}
            assert got[7] == (P.Status.OK, VALUES[UUIDS[7]])      # taken at once this time
        assert not r.t.paused and r.conn.unread == 0
        r.close()
    asyncio.run(main())

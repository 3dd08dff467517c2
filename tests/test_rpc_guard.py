"""Unit tests of the RPC access logic (pure logic; test_rpc_polkit.py runs it for real): polkit's
unix-process subject in the one PolkitAccess both front ends share, AUTH_POLKIT's two steps,
per-connection decisions dropped with the connection, the subject of a connection (peer or
identity), the start time parser, and the ordered, filtered event delivery."""
from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from secretbus.access.busport import BusError
from secretbus.access.permissions import Caller, Perm, UnixProcess
from secretbus.access.polkit import CallerUids, PolkitAccess
from secretbus.core.model import EventId, Lifecycle, SecretDef, SecretEvent, UsageType
from secretbus.rpc.events import EventHub
from secretbus.rpc.guard import EventVisibility, Guard
from secretbus.rpc.identity import Identity
from secretbus.rpc.session import Peer, Session, parse_start_time, start_time_of


class Port:
    """A bus with a scriptable polkit: CheckAuthorization recorded in `checks` as (subject
    kind, subject fields, action, flags) and answered by `answer(action, flags)` -> (authorized,
    challenge), held while `gate` is clear."""

    def __init__(self, uids: dict[str, int] | None = None):
        self.uids = uids or {}
        self.checks: list[tuple[str, dict[str, Any], str, int]] = []
        self.answer = lambda action, flags, details: (True, False)
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = False

    async def call(self, destination, path, interface, member, signature, body, timeout):
        if member == "AddMatch":
            return []
        if member == "GetNameOwner":
            return [":1.polkit"]
        if member == "GetConnectionUnixUser":
            return [self.uids[body[0]]]
        assert member == "CheckAuthorization"
        kind, fields = body[0]
        self.checks.append((kind, {k: v.value for k, v in fields.items()}, body[1], body[3]))
        await self.gate.wait()
        if self.fail:
            raise BusError("org.freedesktop.DBus.Error.ServiceUnknown", "polkitd went away")
        authorized, challenge = self.answer(body[1], body[3], body[2])
        return [(authorized, challenge, {})]

    def watch(self, handler) -> None:
        pass

    def unwatch(self, handler) -> None:
        pass


async def make(uids: dict[str, int] | None = None, **kw) -> tuple[Port, PolkitAccess]:
    port = Port(uids)
    caller_uids = CallerUids(port)
    await caller_uids.start()
    access = PolkitAccess(port, caller_uids, **kw)
    await access.start()
    return port, access


def secret(i: int, private: bool = False) -> SecretDef:
    return SecretDef(uuid=f"5b7e5700-0000-4000-8001-{i:012x}", usage_type=UsageType.VOLUME, usage_id=f"/v/{i}.img",
                     private=private)


def rpc(name: str, uid: int, pid: int = 4000) -> Caller:
    return Caller(name, False, UnixProcess(pid, 777, uid))


def test_unix_process_subject_and_one_cache_with_dbus():
    async def run():
        port, access = await make({":1.1": 1000})
        access.process_open("rpc-1")
        assert await access.allowed(rpc("rpc-1", 1000), Perm.READ_SECURE, secret(1))
        kind, fields, action, flags = port.checks[0]
        assert (kind, fields, action, flags) == ("unix-process", {"pid": 4000, "start-time": 777, "uid": 1000},
                                                 "org.libvirt.api.secret.read-secure", 0)
        # getattr is per uid: a D-Bus caller of uid 1000 decided it, the RPC connection reads it
        await access.caller_uid(Caller(":1.1"))
        assert await access.allowed(Caller(":1.1"), Perm.GETATTR, secret(2))
        assert access.cached(rpc("rpc-1", 1000), Perm.GETATTR, secret(2)) is True
        assert access.cached(rpc("rpc-9", 1001), Perm.GETATTR, secret(2)) is None     # another uid
        assert port.checks[1][0] == "system-bus-name" and len(port.checks) == 2
        # root's process is decided without polkit
        port.answer = lambda action, flags, details: (False, False)
        assert await access.allowed(rpc("rpc-2", 0), Perm.DELETE, secret(1))
        assert len(port.checks) == 2
    asyncio.run(run())


class ListClient:
    def __init__(self, pid: int, uid: int = 1000):
        self.session = Session(Peer(pid, uid, uid, start_time=777), socket_readonly=False, trusted=False,
                               authenticated=True, opened=True)


def test_a_uids_lists_share_one_round_of_getattr_checks():
    """1,000 lists of a uid arriving while nothing is cached once started 10,000 waits each on
    the same checks, all woken in one loop step (root waited up to a second, test_rpc_attack_lists.py);
    now the uid's first list asks, the others wait for it with one future and then read the
    cache. Each list gets what its uid may see; a list whose connection closes (its task
    cancelled) does not cancel the checks the others wait for."""
    async def run():
        port, access = await make()
        guard = Guard(system=True)
        guard.attach(access)
        port.answer = lambda action, flags, details: (not details.get("secret_usage_volume", "").endswith(
            ("1.img", "3.img")), False)
        defs = [secret(i) for i in range(40)]
        want = [d.uuid for d in defs if not d.usage_id.endswith(("1.img", "3.img"))]
        asked = 0
        allowed = access.allowed

        async def counted(*a, **kw):
            nonlocal asked
            asked += 1
            return await allowed(*a, **kw)
        access.allowed = counted                # type: ignore[method-assign]
        port.gate.clear()
        clients = [ListClient(5000 + i) for i in range(20)]
        for c in clients:
            access.process_open(c.session.name)
        tasks = [asyncio.ensure_future(guard.listing(c, lambda: defs, lambda ds: [d.uuid for d in ds]))
                 for c in clients]
        await asyncio.sleep(0.05)
        tasks[0].cancel()                      # the list that asks goes away
        port.gate.set()
        results = await asyncio.gather(*tasks[1:])
        assert all(r == want for r in results)
        getattr_checks = [c for c in port.checks if c[2] == "org.libvirt.api.secret.getattr"]
        assert len(getattr_checks) == len(defs), len(getattr_checks)
        # one wait per secret in all (the first list's), not one per secret per list
        assert asked <= len(defs) + len(clients), asked
        assert not guard.lists.rounds
    asyncio.run(run())


def test_per_connection_decisions_go_with_the_connection():
    async def run():
        port, access = await make()
        c = rpc("rpc-1", 1000)
        access.process_open("rpc-1")
        assert await access.allowed(c, Perm.WRITE, secret(1))
        assert access.cached(c, Perm.WRITE, secret(1)) is True
        assert access.sizes()["decisions"] == 1 and access.sizes()["rpc_processes"] == 1
        access.process_closed("rpc-1")
        assert access.cached(c, Perm.WRITE, secret(1)) is None
        # a check still running when its connection closed keeps nothing
        port.gate.clear()
        access.process_open("rpc-2")
        task = asyncio.create_task(access.allowed(rpc("rpc-2", 1000), Perm.WRITE, secret(1)))
        await asyncio.sleep(0.01)
        access.process_closed("rpc-2")
        port.gate.set()
        assert await task
        assert access.sizes() == {**access.sizes(), "decisions": 0, "decision_senders": 0, "rpc_processes": 0}
    asyncio.run(run())


def test_rpc_and_dbus_callers_of_a_uid_share_its_fair_slots():
    async def run():
        port, access = await make({":1.7": 1001}, max_concurrent=4, per_uid=2)
        port.gate.clear()
        for i in range(20):        # uid 1000 floods over RPC
            access.process_open(f"rpc-{i}")
        flood = [asyncio.create_task(access.allowed(rpc(f"rpc-{i}", 1000), Perm.WRITE, secret(i)))
                 for i in range(20)]
        await asyncio.sleep(0.01)
        assert len(port.checks) == 2                 # its share, not all four slots
        await access.caller_uid(Caller(":1.7"))
        other = asyncio.create_task(access.allowed(Caller(":1.7"), Perm.WRITE, secret(99)))
        await asyncio.sleep(0.01)
        assert len(port.checks) == 3 and port.checks[-1][0] == "system-bus-name"     # not behind the flood
        port.gate.set()
        assert await other and all(await asyncio.gather(*flood))
    asyncio.run(run())


def test_authenticate_asks_interactively_only_after_a_challenge():
    async def run():
        port, access = await make()
        c = Caller("rpc-1", True, UnixProcess(4000, 777, 1000))
        port.answer = lambda action, flags, details: (True, False)
        assert await access.authenticate(c, Perm.UNIX_MANAGE) == (True, False)
        assert [(a, f) for _, _, a, f in port.checks] == [("org.libvirt.unix.manage", 0)]
        assert port.checks[0][1] == {"pid": 4000, "start-time": 777, "uid": 1000}
        port.checks.clear()
        port.answer = lambda action, flags, details: (flags == 1, flags == 0)     # an agent answers yes
        assert await access.authenticate(c, Perm.UNIX_MANAGE) == (True, False)
        assert [f for _, _, _, f in port.checks] == [0, 1]
        port.checks.clear()
        port.answer = lambda action, flags, details: (False, False)               # policy says no: no second ask
        assert await access.authenticate(c, Perm.UNIX_MONITOR) == (False, False)
        assert len(port.checks) == 1
        port.fail = True                                                  # polkit cannot be asked
        assert await access.authenticate(c, Perm.UNIX_MANAGE) == (False, False)
        assert await access.authenticate(Caller("rpc-2", True, UnixProcess(1, 1, 0)), Perm.UNIX_MANAGE) == \
            (True, False)                                                 # root: not asked
        # AUTH_POLKIT passes no details, as libvirt
        assert access.cached(c, Perm.UNIX_MANAGE, None) is None
    asyncio.run(run())


def session(uid: int = 1000, identity: Identity | None = None, start: int = 777) -> Session:
    s = Session(Peer(4000, uid, uid, start), socket_readonly=False, trusted=uid == 0, authenticated=True,
                opened=True)
    s.identity = identity
    return s


def test_the_subject_is_the_identity_when_a_root_peer_set_one():
    assert session().subject() == UnixProcess(4000, 777, 1000)
    assert session(start=0).subject() is None                    # start time unknown: no check passes
    full = {"unix-user-id": 1000, "process-id": 555, "process-time": 99}
    assert session(0, Identity(full, False)).subject() == UnixProcess(555, 99, 1000)
    for missing in full:
        fields = {k: v for k, v in full.items() if k != missing}
        assert session(0, Identity(fields, True)).subject() is None, missing
    assert session(0, Identity({**full, "unix-user-id": 2**31}, False)).subject() is None


def test_guard_fails_closed_and_decides_root_itself():
    async def run():
        guard = Guard(system=True)
        root, user = session(0), session(1000)
        assert not guard.checked(root) and guard.checked(user)
        assert not await guard.allowed(user, Perm.GETATTR, secret(1))           # no polkit attached
        assert await guard.allowed(session(0, Identity({"unix-user-id": 0, "process-id": 5, "process-time": 6},
                                                       True)), Perm.READ_SECURE, secret(1))
        assert guard.checked(session(0, Identity({}, True)))                    # an identity is checked
        assert not await guard.allowed(session(0, Identity({}, True)), Perm.GETATTR, secret(1))
        assert not Guard(system=False).checked(user)                            # the session instance
    asyncio.run(run())


def test_start_time_is_field_22_even_after_a_strange_command_name():
    line = b"4242 (a) b ) (c) S " + b" ".join(str(n).encode() for n in range(4, 22)) + b" 31337 0 0\n"
    assert parse_start_time(line) == 31337
    assert parse_start_time(b"1 (x) S 0") == 0
    own = start_time_of(os.getpid())
    assert own > 0 and own == start_time_of(os.getpid())
    assert start_time_of(2**22 + 12345) == 0       # above pid_max: no such process


class Sink:
    def __init__(self, s: Session):
        self.session = s
        self.got: list[int] = []

    def send_message(self, proc: int, payload: bytes) -> None:
        self.got.append(proc)


def test_events_reach_only_those_allowed_getattr_in_order():
    async def run():
        port, access = await make()
        guard = Guard(system=True)
        guard.attach(access)
        hub = EventHub(asyncio.get_running_loop(), EventVisibility(guard))
        root, member = Sink(session(0)), Sink(session(1000))
        for sink in (root, member):
            hub.register(sink, 0, None)
            hub.register(sink, 1, None)
        hidden, shown = secret(1), secret(2)
        port.answer = lambda action, flags, details: (details.get("secret_uuid") != hidden.uuid, False)
        port.gate.clear()

        def ev(d: SecretDef, eid: EventId) -> SecretEvent:
            return SecretEvent(eid, d.uuid, d.usage_type, d.usage_id or "",
                               Lifecycle.DEFINED if eid == EventId.LIFECYCLE else None, 0, d)
        hub.deliver(ev(hidden, EventId.LIFECYCLE))
        hub.deliver(ev(shown, EventId.VALUE_CHANGED))
        assert root.got == [] and member.got == []      # both wait behind the first, undecided, event
        port.gate.set()
        await asyncio.sleep(0.05)
        assert root.got == [382, 383] and member.got == [383]        # in order; hidden's never to member
        assert [c[2] for c in port.checks] == ["org.libvirt.api.secret.getattr"] * 2
        hub.deliver(ev(shown, EventId.LIFECYCLE))        # decided from the cache now: at once
        hub.deliver(ev(hidden, EventId.LIFECYCLE))
        assert root.got == [382, 383, 382, 382] and member.got == [383, 382]
        assert len(port.checks) == 2
        await hub.close()
    asyncio.run(run())


# -- libvirt's @acl lines, procedure by procedure -------------------------------------------
class RecordingAccess:
    """An access control that records every check and refuses the permissions in `deny`."""

    enabled = True

    def __init__(self, deny: frozenset[Perm] = frozenset()):
        self.deny = deny
        self.asked: list[tuple[Perm, str | None]] = []

    async def allowed(self, caller: Caller, perm: Perm, d: SecretDef | None) -> bool:
        assert caller.process is not None and caller.process.uid == 1000
        self.asked.append((perm, d.uuid if d else None))
        await asyncio.sleep(0)           # a real check waits: the connection must await it
        return perm not in self.deny

    async def caller_uid(self, caller: Caller) -> int | None:
        return 1000


class AclClient:
    def __init__(self, opened: bool = True):
        self.session = Session(Peer(4242, 1000, 1000, start_time=777), socket_readonly=False, trusted=False,
                               authenticated=True, opened=opened)

    def send_message(self, proc: int, payload: bytes) -> None:
        pass


def _acl_setup(tmp_path, deny=frozenset()):
    from secretbus.core.model import InstanceKind
    from secretbus.driver.build import open_instance
    from secretbus.rpc.identity import SystemToken
    from secretbus.rpc.procedures import Procedures
    from secretbus.store.paths import InstancePaths
    driver = open_instance(InstancePaths.for_kind(InstanceKind.SYSTEM, tmp_path / "root"))
    token = SystemToken(tmp_path / "common" / "system.token")
    token.ensure()
    guard = Guard(system=True)
    access = RecordingAccess(frozenset(deny))
    guard.attach(access)  # type: ignore[arg-type]
    return driver, token, guard, access, Procedures


def _call(procs, client, proc: int, args: Any) -> Any:
    """One procedure as the connection runs it: the handler, its checks awaited, a write's act."""
    async def run():
        ret = procs.table()[proc].fn(client, args)
        if asyncio.iscoroutine(ret):
            ret = await ret
        if procs.table()[proc].writes:
            ret = await ret()           # the write is submitted to the driver and awaited
        return ret
    return asyncio.get_event_loop().run_until_complete(run())


SECRET_XML = ("<secret ephemeral='no' private='no'><uuid>5b7e5700-0000-4000-8001-00000000000a</uuid>"
              "<usage type='volume'><volume>/v/acl.img</volume></usage></secret>")
UUID_A = "5b7e5700-0000-4000-8001-00000000000a"


def test_every_procedure_asks_the_acl_of_its_remote_protocol_line(tmp_path):
    """A non-root peer's calls each ask exactly the actions of libvirt's `@acl` lines (then the
    `@aclfilter` per listed secret), in libvirt's order, and nothing for those with none."""
    import uuid as uuidlib

    from secretbus.rpc import protocol as P
    driver, token, guard, access, Procedures = _acl_setup(tmp_path)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        procs = Procedures(driver, EventHub(loop), token, system=True, guard=guard)
        h = {"uuid": uuidlib.UUID(UUID_A).bytes, "usageType": 1, "usageID": ""}
        Pr, G, CR = P.Proc, Perm.CONNECT_GETATTR, Perm.CONNECT_READ
        fresh = AclClient(opened=False)
        cases: list[tuple[Any, int, Any, list[tuple[Perm, str | None]]]] = [
            (fresh, Pr.CONNECT_SUPPORTS_FEATURE, {"feature": 10}, []),
            (fresh, Pr.CONNECT_OPEN, {"name": "secret:///system", "flags": 0}, [(G, None)]),
            (fresh, Pr.CONNECT_SUPPORTS_FEATURE, {"feature": 14}, []),
            (fresh, Pr.CONNECT_SUPPORTS_FEATURE, {"feature": 15}, []),
            (fresh, Pr.CONNECT_SUPPORTS_FEATURE, {"feature": 9}, [(G, None)]),
            (fresh, Pr.CONNECT_REGISTER_CLOSE_CALLBACK, None, [(G, None)]),
            (fresh, Pr.CONNECT_GET_TYPE, None, [(G, None)]),
            (fresh, Pr.CONNECT_GET_URI, None, [(G, None)]),
            (fresh, Pr.CONNECT_GET_LIB_VERSION, None, [(G, None)]),
            (fresh, Pr.CONNECT_IS_SECURE, None, []),
            (fresh, Pr.SECRET_DEFINE_XML, {"xml": SECRET_XML, "flags": 0}, [(Perm.WRITE, UUID_A), (Perm.SAVE, UUID_A)]),
            (fresh, Pr.CONNECT_NUM_OF_SECRETS, None, [(Perm.SEARCH_SECRETS, None), (Perm.GETATTR, UUID_A)]),
            (fresh, Pr.CONNECT_LIST_SECRETS, {"maxuuids": 5}, [(Perm.SEARCH_SECRETS, None), (Perm.GETATTR, UUID_A)]),
            (fresh, Pr.CONNECT_LIST_ALL_SECRETS, {"need_results": 1, "flags": 0},
             [(Perm.SEARCH_SECRETS, None), (Perm.GETATTR, UUID_A)]),
            (fresh, Pr.SECRET_LOOKUP_BY_UUID, {"uuid": h["uuid"]}, [(Perm.GETATTR, UUID_A)]),
            (fresh, Pr.SECRET_LOOKUP_BY_USAGE, {"usageType": 1, "usageID": "/v/acl.img"}, [(Perm.GETATTR, UUID_A)]),
            (fresh, Pr.SECRET_GET_XML_DESC, {"secret": h, "flags": 0}, [(Perm.READ, UUID_A)]),
            (fresh, Pr.SECRET_SET_VALUE, {"secret": h, "value": b"v", "flags": 0}, [(Perm.WRITE, UUID_A)]),
            (fresh, Pr.SECRET_GET_VALUE, {"secret": h, "flags": 0}, [(Perm.READ_SECURE, UUID_A)]),
            (fresh, Pr.CONNECT_SECRET_EVENT_REGISTER_ANY, {"eventID": 0, "secret": None},
             [(Perm.SEARCH_SECRETS, None)]),
            (fresh, Pr.CONNECT_SECRET_EVENT_DEREGISTER_ANY, {"callbackID": 0}, [(CR, None)]),
            (fresh, Pr.CONNECT_UNREGISTER_CLOSE_CALLBACK, None, [(G, None)]),
            (fresh, Pr.SECRET_UNDEFINE, {"secret": h}, [(Perm.DELETE, UUID_A)]),
            (fresh, Pr.CONNECT_CLOSE, None, []),
        ]
        for client, proc, args, want in cases:
            access.asked.clear()
            _call(procs, client, proc, args)
            assert access.asked == want, (P.Proc(proc).name, access.asked)
        assert driver.count() == 0                          # the define and undefine both ran
    finally:
        loop.close()
        asyncio.set_event_loop(None)
        driver.close()


def test_connect_level_refusals_change_nothing(tmp_path):
    """Refused connect.getattr: the connection stays unopened; refused connect.read: the
    event registration stays; SET_IDENTITY from a non-root peer: refused before any check."""
    import pytest

    from secretbus.core import errors
    from secretbus.rpc import protocol as P
    driver, token, guard, access, Procedures = _acl_setup(tmp_path, deny={Perm.CONNECT_GETATTR, Perm.CONNECT_READ})
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        procs = Procedures(driver, EventHub(loop), token, system=True, guard=guard)
        c = AclClient(opened=False)
        with pytest.raises(errors.AccessDenied, match="'secret' denied access"):
            _call(procs, c, P.Proc.CONNECT_OPEN, {"name": "secret:///system", "flags": 0})
        assert not c.session.opened
        for proc in (P.Proc.CONNECT_GET_TYPE, P.Proc.CONNECT_GET_LIB_VERSION, P.Proc.CONNECT_REGISTER_CLOSE_CALLBACK):
            with pytest.raises(errors.AccessDenied):
                _call(procs, c, proc, None)
        assert not c.session.close_callback
        cb = _call(procs, c, P.Proc.CONNECT_SECRET_EVENT_REGISTER_ANY, {"eventID": 1, "secret": None})["callbackID"]
        with pytest.raises(errors.AccessDenied):
            _call(procs, c, P.Proc.CONNECT_SECRET_EVENT_DEREGISTER_ANY, {"callbackID": cb})
        assert cb in c.session.callbacks and len(procs.hub) == 1
        access.asked.clear()
        with pytest.raises(errors.AccessDenied):
            _call(procs, c, P.Proc.CONNECT_SET_IDENTITY, {"params": [], "flags": 0})
        assert access.asked == [] and c.session.identity is None
        # fail closed: no access control attached (no bus connection) refuses the open too
        guard.detach(access)
        with pytest.raises(errors.AccessDenied):
            _call(procs, AclClient(opened=False), P.Proc.CONNECT_OPEN, {"name": "secret:///system", "flags": 0})
    finally:
        loop.close()
        asyncio.set_event_loop(None)
        driver.close()


def test_event_registrations_are_bounded_per_connection_and_per_uid(tmp_path):
    """Any local user may register for events (the read-only socket, connect:search_secrets);
    every event is matched against every registration. A connection holds at most
    MAX_PER_CONNECTION, an untrusted uid at most MAX_PER_UID over its connections; a refusal
    changes nothing, and what is deregistered or dropped with its connection counts no more."""
    import pytest

    from secretbus.core import errors
    from secretbus.rpc import events
    from secretbus.rpc import protocol as P
    driver, token, guard, access, Procedures = _acl_setup(tmp_path)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    reg, dereg = P.Proc.CONNECT_SECRET_EVENT_REGISTER_ANY, P.Proc.CONNECT_SECRET_EVENT_DEREGISTER_ANY
    try:
        procs = Procedures(driver, EventHub(loop), token, system=True, guard=guard)
        per_conn = events.MAX_PER_CONNECTION
        conns = [AclClient() for _ in range(events.MAX_PER_UID // per_conn + 1)]
        first = conns[0]
        ids = [_call(procs, first, reg, {"eventID": i % 2, "secret": None})["callbackID"]
               for i in range(per_conn)]
        with pytest.raises(errors.OperationFailed, match="this connection has 64 event callbacks"):
            _call(procs, first, reg, {"eventID": 0, "secret": None})
        assert len(first.session.callbacks) == per_conn == len(procs.hub)
        _call(procs, first, dereg, {"callbackID": ids[0]})
        _call(procs, first, reg, {"eventID": 0, "secret": None})      # room again
        for c in conns[1:-1]:
            for _ in range(per_conn):
                _call(procs, c, reg, {"eventID": 0, "secret": None})
        assert len(procs.hub) == events.MAX_PER_UID
        last = conns[-1]
        with pytest.raises(errors.OperationFailed, match="this user has 256 event callbacks"):
            _call(procs, last, reg, {"eventID": 0, "secret": None})
        assert not last.session.callbacks and len(procs.hub) == events.MAX_PER_UID
        procs.hub.drop(conns[1], conns[1].session.callbacks)           # its connection closed
        conns[1].session.callbacks.clear()
        _call(procs, last, reg, {"eventID": 0, "secret": None})
        # root (and the session's own user) is counted per connection only
        root = AclClient()
        root.session.trusted = True
        for _ in range(per_conn):
            _call(procs, root, reg, {"eventID": 1, "secret": None})
        assert len(root.session.callbacks) == per_conn
    finally:
        loop.close()
        asyncio.set_event_loop(None)
        driver.close()


class RecordSink:
    def __init__(self):
        self.sent: list[dict[str, str]] = []

    async def send(self, fields):
        self.sent.append(dict(fields))


def test_best_effort_records_follow_the_value_required_ones_precede_it():
    """best-effort: the value is returned first, its record written in the next loop callback
    (the answer does not depend on it); required: no value before its record is kept."""
    from secretbus.access.audit import AuditMode, Auditor

    async def run(mode: AuditMode) -> tuple[int, int]:
        sink = RecordSink()
        guard = Guard(system=False, auditor=Auditor(sink, mode))
        client = AclClient()
        client.session.trusted = True               # the session's own user: not checked
        got = guard.value_read(client, secret(1), lambda: "v")
        if asyncio.iscoroutine(got):                # required: the record is awaited first
            got = await got
        assert got == "v"
        at_return = len(sink.sent)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return at_return, len(sink.sent)
    assert asyncio.run(run(AuditMode.BEST_EFFORT)) == (0, 1)
    assert asyncio.run(run(AuditMode.REQUIRED)) == (1, 1)


class NowSink(RecordSink):
    """A journal that takes a record at once (JournalWriter.send_now), or refuses it (full)."""

    def __init__(self, take: bool):
        super().__init__()
        self.take = take

    def send_now(self, fields):
        if self.take:
            self.sent.append(dict(fields))
        return self.take


def test_a_value_read_writes_its_record_at_once_when_the_journal_takes_it():
    """No coroutine, no deferred callback: the record is written before the value is returned,
    in both modes; when journald cannot take it at once, the paths above (deferred / awaited)."""
    from secretbus.access.audit import AuditMode, Auditor

    async def run(mode: AuditMode, take: bool) -> tuple[bool, int, int]:
        sink = NowSink(take)
        guard = Guard(system=False, auditor=Auditor(sink, mode))
        client = AclClient()
        client.session.trusted = True
        got = guard.value_read(client, secret(1), lambda: "v")
        waited = asyncio.iscoroutine(got)
        if waited:
            got = await got
        assert got == "v"
        at_return = len(sink.sent)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return waited, at_return, len(sink.sent)
    for mode in (AuditMode.BEST_EFFORT, AuditMode.REQUIRED):
        assert asyncio.run(run(mode, True)) == (False, 1, 1)
    assert asyncio.run(run(AuditMode.BEST_EFFORT, False)) == (False, 0, 1)
    assert asyncio.run(run(AuditMode.REQUIRED, False)) == (True, 1, 1)


class EncodedSink(NowSink):
    """A journal with JournalWriter's encoded fast path and its word on whether one listens."""

    def __init__(self, listening: bool = True):
        super().__init__(True)
        self.listening = listening
        self.encoded: list[bytes] = []

    def available(self) -> bool:
        return self.listening

    def send_now_encoded(self, data: bytes) -> bool:
        self.encoded.append(data)
        return True


def test_a_plain_peers_record_is_encoded_in_one_step_with_the_same_fields():
    """A local peer acting as itself: the record goes in encode_allowed's one format and says
    what Guard._rec's does; a SASL name (or a set identity) takes the general record, which
    names it. Without a journal nothing is built: required refuses the value, best-effort
    answers."""
    from harness.journal import parse_entry

    from secretbus.access.audit import AuditFailed, AuditMode, Auditor, Outcome
    from secretbus.access.journal import encode_entry

    d = secret(1)
    sink = EncodedSink()
    guard = Guard(system=False, auditor=Auditor(sink, AuditMode.REQUIRED))
    client = AclClient()
    client.session.trusted = True
    assert guard.value_read(client, d, lambda: "v") == "v"
    (data,) = sink.encoded
    fast = parse_entry(data)
    slow = parse_entry(encode_entry(Guard._rec(client.session, d, Outcome.ALLOWED, None).fields()))
    fast.pop("AUDIT_TIME_USEC"), slow.pop("AUDIT_TIME_USEC")
    assert fast == slow and fast["CALLER_PID"] == [b"4242"] and fast["CALLER_PEER"] == [client.session.name.encode()]
    assert sink.sent == []

    client.session.sasl_user = "alice"
    assert guard.value_read(client, d, lambda: "v") == "v"
    (fields,) = sink.sent
    assert fields["CALLER_IDENTITY"] == "SASL user 'alice'" and len(sink.encoded) == 1

    for mode in (AuditMode.REQUIRED, AuditMode.BEST_EFFORT):
        gone = EncodedSink(listening=False)
        guard = Guard(system=False, auditor=Auditor(gone, mode))
        client = AclClient()
        client.session.trusted = True
        if mode is AuditMode.REQUIRED:
            with pytest.raises(AuditFailed):
                guard.value_read(client, d, lambda: "v")
        else:
            assert guard.value_read(client, d, lambda: "v") == "v"
        assert gone.encoded == [] and gone.sent == []


def test_unchecked_lookups_and_xml_give_the_checked_paths_bytes(tmp_path):
    """A connection that is not checked (root, the session's user) gets its lookup and
    GetXMLDesc replies without the check's closure: the same bytes as a checked one's, and as
    the codec makes of the plain values."""
    import uuid as uuidlib

    from secretbus.core.secretxml import format_secret_xml
    from secretbus.rpc import protocol as P
    from secretbus.rpc.handles import wire_secret
    from secretbus.rpc.xdr import encode
    driver, token, guard, access, Procedures = _acl_setup(tmp_path)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        procs = Procedures(driver, EventHub(loop), token, system=True, guard=guard)
        driver.define_xml(SECRET_XML)
        d = driver.lookup_by_uuid(UUID_A)
        h = {"uuid": uuidlib.UUID(UUID_A).bytes, "usageType": 1, "usageID": ""}
        checked, root = AclClient(), AclClient()
        root.session.peer = Peer(1, 0, 0, start_time=5)
        root.session.trusted = True
        assert guard.checked(checked.session) and not guard.checked(root.session)
        Pr = P.Proc
        for proc, args, plain in [
                (Pr.SECRET_LOOKUP_BY_UUID, {"uuid": h["uuid"]}, {"secret": wire_secret(d)}),
                (Pr.SECRET_LOOKUP_BY_USAGE, {"usageType": 1, "usageID": "/v/acl.img"}, {"secret": wire_secret(d)}),
                (Pr.SECRET_GET_XML_DESC, {"secret": h, "flags": 0}, {"xml": format_secret_xml(d)})]:
            ret = P.PROCS[proc].ret
            access.asked.clear()
            fast = encode(ret, _call(procs, root, proc, args))
            assert access.asked == []
            assert fast == encode(ret, _call(procs, checked, proc, args)) == encode(ret, plain)
            assert access.asked != []
    finally:
        loop.close()
        asyncio.set_event_loop(None)
        driver.close()

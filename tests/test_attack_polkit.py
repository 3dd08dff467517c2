"""Issue 12, the polkit items: attacks by local users on the access layer, each run for real
(private system-type bus with the shipped policy, real polkitd, real secretbusd as root, the
attacker a real unprivileged user through setpriv), and unit tests of the logic behind them.

 3  queue starvation: a member looping new connections with ListSecrets over 300 secrets
    must not delay root's GetValue (root is decided without polkit, getattr is cached per uid,
    checks in flight are shared fairly between uids).
 9  denial log flood: 2,000 denied calls make one log line and one summary.
10  forged polkit `Changed`: only the owner of org.freedesktop.PolicyKit1 empties the cache.
12  interactive checks: at most two in flight per uid, never in the shared slots; more are
    refused at once.
13  reload: private_value_readers are resolved before anything is replaced.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import time
from typing import Any

import harness
import pytest
import test_polkit
from harness.procs import remove_tree
from test_polkit import (
    ACTIONS_FILE,
    BUS_CONF,
    BUS_NAME,
    CONNECT,
    CONNECT_PATH,
    READER,
    RULES_FILE,
    SECRET,
    g,
    gdbus_bytes,
    many_uuid,
    root_define,
    secret_path,
)

from secretbus.access.busport import BusError, Signal
from secretbus.access.denials import DenialLog
from secretbus.access.fairslots import FairSlots
from secretbus.access.permissions import Caller, Perm
from secretbus.access.polkit import DBUS_NAME, PK_IFACE, PK_NAME, PK_PATH, CallerUids, PolkitAccess
from secretbus.core.model import SecretDef, UsageType

# test_polkit's fixtures, by name
make_secretbusd = test_polkit.make_secretbusd
make_monitor = test_polkit.make_monitor
pyclient = test_polkit.pyclient

BUS_POLICY = pytest.mark.bus_policy(BUS_CONF)
READ_SECURE = "org.libvirt.api.secret.read-secure"

# ======================================================================================
# unit tests: a stand-in bus (BusPort) with a scriptable polkit


class FakePort:
    """GetConnectionUnixUser from `uids`, GetNameOwner from `owner`, CheckAuthorization
    recorded in `checks` and answered by `answer(action)`, held while `gate` is clear."""

    def __init__(self, uids: dict[str, int]):
        self.uids = uids
        self.owner: str | None = ":1.polkit"
        self.checks: list[tuple[str, str, int]] = []    # (subject, action, flags)
        self.answer = lambda action: True
        self.gate = asyncio.Event()
        self.gate.set()
        self.handlers: list[Any] = []
        self.gone: set[str] = set()

    async def call(self, destination, path, interface, member, signature, body, timeout):
        if member == "AddMatch":
            return []
        if member == "GetNameOwner":
            if self.owner is None:
                raise BusError("org.freedesktop.DBus.Error.NameHasNoOwner", "no owner")
            return [self.owner]
        if member == "GetConnectionUnixUser":
            return [self.uids[body[0]]]
        assert member == "CheckAuthorization"
        self.checks.append((body[0][1]["name"].value, body[1], body[3]))
        await asyncio.wait_for(self.gate.wait(), timeout)
        if body[0][1]["name"].value in self.gone:       # polkitd cannot find a subject that left
            raise BusError("org.freedesktop.DBus.Error.NameHasNoOwner", "Could not get UID of name")
        return [(self.answer(body[1]), False, {})]

    def watch(self, handler) -> None:
        self.handlers.append(handler)

    def unwatch(self, handler) -> None:
        self.handlers.remove(handler)

    def emit(self, sig: Signal) -> None:
        for h in list(self.handlers):
            h(sig)


def secret(i: int) -> SecretDef:
    return SecretDef(uuid=many_uuid(i), usage_type=UsageType.VOLUME, usage_id=f"/v/{i}.img")


async def make_access(uids: dict[str, int], **kw) -> tuple[FakePort, PolkitAccess]:
    port = FakePort(uids)
    caller_uids = CallerUids(port)
    await caller_uids.start()
    access = PolkitAccess(port, caller_uids, **kw)
    await access.start()
    return port, access


def test_unit_root_is_decided_without_polkit():
    async def run():
        port, access = await make_access({":1.9": 0})
        root = Caller(":1.9")
        port.answer = lambda action: False      # polkit would say no: it is not asked
        for perm in Perm:
            assert await access.allowed(root, perm, secret(1))
        assert await access.allowed(Caller(":1.9", interactive=True), Perm.DELETE, None)
        assert access.cached(root, Perm.GETATTR, secret(2)) is True
        assert port.checks == []
    asyncio.run(run())


def test_unit_unknown_uid_is_left_to_polkit_per_connection():
    async def run():
        port, access = await make_access({})          # every uid lookup fails
        port.answer = lambda action: False
        c = Caller(":1.5")
        assert not await access.allowed(c, Perm.GETATTR, None)
        assert not await access.allowed(c, Perm.GETATTR, None)
        # Asked each time: a caller whose uid is not known gets nothing cached (it may have left,
        # and then no entry would ever be dropped for it).
        assert port.checks == [(":1.5", "org.libvirt.api.secret.getattr", 0)] * 2
        assert access.cached(Caller(":1.6"), Perm.GETATTR, None) is None
    asyncio.run(run())


def test_unit_cheap_reads_cached_per_uid_the_rest_per_connection():
    async def run():
        port, access = await make_access({":1.1": 1000, ":1.2": 1000, ":1.3": 1001})
        a, b, other = Caller(":1.1"), Caller(":1.2"), Caller(":1.3")
        for c in (a, b):
            await access.caller_uid(c)
            assert await access.allowed(c, Perm.GETATTR, secret(1))
            assert await access.allowed(c, Perm.READ, secret(1))
            assert await access.allowed(c, Perm.READ_SECURE, secret(1))
            assert await access.allowed(c, Perm.WRITE, secret(1))
        got = [(s, act.rsplit(".", 1)[1]) for s, act, _ in port.checks]
        assert got == [(":1.1", "getattr"), (":1.1", "read"), (":1.1", "read-secure"), (":1.1", "write"),
                       (":1.2", "read-secure"), (":1.2", "write")]
        assert access.cached(b, Perm.GETATTR, secret(1)) is True            # without awaiting
        assert access.cached(other, Perm.GETATTR, secret(1)) is None        # another uid
        # the uid's entries outlive a connection that leaves; the per-name ones go with it
        access._forget(":1.1")
        assert access.cached(b, Perm.GETATTR, secret(1)) is True
        # polkit's Changed (from polkitd) still empties everything, uid entries included
        port.emit(Signal(":1.polkit", PK_PATH, PK_IFACE, "Changed", []))
        assert access.cached(b, Perm.GETATTR, secret(1)) is None
    asyncio.run(run())


def test_unit_concurrent_connections_of_a_uid_share_one_check():
    async def run():
        senders = {f":1.{i}": 1000 for i in range(10, 20)}
        port, access = await make_access(senders)
        port.gate.clear()
        tasks = [asyncio.create_task(access.allowed(Caller(s), Perm.GETATTR, secret(7))) for s in senders]
        await asyncio.sleep(0.01)
        port.gate.set()
        assert all(await asyncio.gather(*tasks))
        assert len(port.checks) == 1
    asyncio.run(run())


def test_unit_a_shared_check_whose_subject_left_is_asked_again_by_the_others(caplog):
    """Per-uid decisions are shared while pending; when the connection whose name was the
    subject leaves, polkitd cannot answer. That failure is not an answer about the other
    connections of the uid: each asks with its own name (their lists came out short)."""
    async def run():
        port, access = await make_access({":1.1": 1000, ":1.2": 1000, ":1.3": 1000})
        port.gate.clear()
        first = asyncio.create_task(access.allowed(Caller(":1.1"), Perm.GETATTR, secret(7)))
        await asyncio.sleep(0.01)
        others = [asyncio.create_task(access.allowed(Caller(s), Perm.GETATTR, secret(7))) for s in (":1.2", ":1.3")]
        await asyncio.sleep(0.01)
        port.gone.add(":1.1")
        port.gate.set()
        assert await first is False                              # fail closed for the one that left
        assert await asyncio.gather(*others) == [True, True]
        assert [c[0] for c in port.checks] == [":1.1", ":1.2", ":1.3"]   # each asked with its own name
        assert access.cached(Caller(":1.3"), Perm.GETATTR, secret(7)) is True
    with caplog.at_level(logging.DEBUG, logger="secretbus.polkit"):
        asyncio.run(run())
    # a caller that leaves is not an error of ours: no ERROR line an attacker could repeat
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_unit_changed_only_from_polkitd():
    async def run():
        port, access = await make_access({":1.1": 1000})
        c = Caller(":1.1")
        assert await access.allowed(c, Perm.WRITE, secret(1))
        forged = [Signal(":1.66", PK_PATH, PK_IFACE, "Changed", []),       # a member, unicast or not
                  Signal(None, PK_PATH, PK_IFACE, "Changed", []),
                  Signal(":1.polkit", "/elsewhere", PK_IFACE, "Changed", [])]
        for sig in forged:
            port.emit(sig)
        assert access.cached(c, Perm.WRITE, secret(1)) is True
        assert access.stats["changed_ignored"] == 3 and access.stats["flushes"] == 0
        # polkitd restarts under a new unique name: the old name's signals no longer count
        port.emit(Signal(DBUS_NAME, "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged",
                         [PK_NAME, ":1.polkit", ":1.200"]))
        assert await access.allowed(c, Perm.WRITE, secret(1))
        port.emit(Signal(":1.polkit", PK_PATH, PK_IFACE, "Changed", []))
        assert access.cached(c, Perm.WRITE, secret(1)) is True
        port.emit(Signal(":1.200", PK_PATH, PK_IFACE, "Changed", []))
        assert access.cached(c, Perm.WRITE, secret(1)) is None
        # polkitd gone: nobody's Changed counts
        port.emit(Signal(DBUS_NAME, "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged",
                         [PK_NAME, ":1.200", ""]))
        assert access._pk_owner is None
    asyncio.run(run())


def test_unit_polkitd_absent_at_start():
    async def run():
        port = FakePort({})
        port.owner = None
        uids = CallerUids(port)
        access = PolkitAccess(port, uids)
        await access.start()
        assert access._pk_owner is None
        port.emit(Signal(":1.3", PK_PATH, PK_IFACE, "Changed", []))
        assert access.stats["flushes"] == 0
    asyncio.run(run())


def test_unit_a_flooding_uid_does_not_take_the_others_slots():
    async def run():
        flood = {f":1.{i}": 1000 for i in range(100, 400)}
        port, access = await make_access({**flood, ":1.7": 1001}, max_concurrent=8, per_uid=4)
        port.gate.clear()
        tasks = [asyncio.create_task(access.allowed(Caller(s), Perm.WRITE, secret(i)))
                 for i, s in enumerate(flood)]
        await asyncio.sleep(0.01)
        assert len(port.checks) == 4                  # uid 1000 holds its share, the rest wait
        other = asyncio.create_task(access.allowed(Caller(":1.7"), Perm.WRITE, secret(1)))
        await asyncio.sleep(0.01)
        assert port.checks[-1][0] == ":1.7"           # asked at once, not behind 296 others
        port.gate.set()
        assert await other and all(await asyncio.gather(*tasks))
        assert len(port.checks) == 301 and access._slots.free == 8
    asyncio.run(run())


def test_unit_interactive_checks_have_their_own_small_limit():
    async def run():
        port, access = await make_access({":1.1": 1000, ":1.2": 1000, ":1.3": 1001},
                                         max_concurrent=4, per_uid=4)
        port.gate.clear()
        slow = [asyncio.create_task(access.allowed(Caller(s, interactive=True), Perm.DELETE, secret(1)))
                for s in (":1.1", ":1.2")]
        await asyncio.sleep(0.01)
        assert access._slots.free == 4                # no shared slot is held
        t0 = time.monotonic()
        assert not await access.allowed(Caller(":1.1", interactive=True), Perm.DELETE, secret(2))
        assert time.monotonic() - t0 < 0.5 and access.stats["interactive_refused"] == 1
        third = asyncio.create_task(access.allowed(Caller(":1.3", interactive=True), Perm.DELETE, secret(1)))
        plain = asyncio.create_task(access.allowed(Caller(":1.1"), Perm.DELETE, secret(3)))
        await asyncio.sleep(0.01)
        assert [f for _, _, f in port.checks] == [1, 1, 1, 0]    # another uid, and a plain check
        port.gate.set()
        assert all(await asyncio.gather(*slow, third, plain))
        assert access._interactive == {} and access._interactive_in_flight == 0
    asyncio.run(run())


def test_unit_fair_slots_round_robin_and_cancel():
    async def run():
        slots = FairSlots(2, per_key=2)
        order: list[str] = []
        await slots.acquire("a")
        await slots.acquire("a")

        async def want(key: str) -> None:
            await slots.acquire(key)
            order.append(key)

        waiters = [asyncio.create_task(want(k)) for k in ("a", "a", "a", "b", "c")]
        await asyncio.sleep(0)
        cancelled = asyncio.create_task(want("d"))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        for _ in range(5):
            slots.release(order[-1] if order else "a")
            await asyncio.sleep(0)
        await asyncio.gather(*waiters)
        assert order == ["a", "b", "c", "a", "a"]
        assert slots.waiting("d") == 0
    asyncio.run(run())


class _Lines(list):
    def warning(self, fmt, *args, **kw):
        self.append(fmt % args)


def test_unit_denial_log_is_bounded():
    now = [0.0]
    lines = _Lines()
    dl = DenialLog(window=60, max_uids=2, clock=lambda: now[0], logger=lines)  # type: ignore[arg-type]
    for i in range(2000):
        dl.denied(1000, f":1.{i}", READ_SECURE)    # new connections do not earn new lines
    dl.denied(1000, ":1.1", "org.libvirt.api.secret.write")
    assert len(lines) == 2 and lines[0].startswith(f"denied {READ_SECURE} to :1.0 (uid 1000)")
    now[0] = 61
    dl.denied(1000, ":1.9", READ_SECURE)
    assert re.fullmatch(rf"uid 1000: 1999 more denials of {re.escape(READ_SECURE)} since \S+", lines[2])
    assert lines[3].startswith(f"denied {READ_SECURE}") and len(lines) == 4
    dl.denied(1001, ":1.2", READ_SECURE)
    dl.denied(1002, ":1.3", READ_SECURE)            # over max_uids: only counted
    assert len(lines) == 5 and len(dl._windows) == 2
    dl.flush()
    assert lines[-1] == "1 more denials of callers of other uids" and dl._windows == {}


# ======================================================================================
# the attacks

ATTACK = r'''
import asyncio, json, sys, time
from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

DEST, CONNECT_PATH = "org.libvirt.secret", "/org/libvirt/secret"

def call(member, path=CONNECT_PATH, iface="org.libvirt.Connect", sig="u", body=(0,), flags=MessageFlag.NONE):
    return Message(destination=DEST, path=path, interface=iface, member=member, signature=sig,
                   body=list(body), flags=flags)

async def lists(addr, seconds, workers):
    """Loop: connect, ListSecrets, disconnect; `workers` loops at once."""
    deadline, sizes, errors = time.monotonic() + seconds, [], []
    async def loop():
        while time.monotonic() < deadline:
            bus = await MessageBus(bus_address=addr).connect()
            try:
                r = await asyncio.wait_for(bus.call(call("ListSecrets")), 30)
                if r.message_type == MessageType.ERROR:
                    errors.append(r.error_name)
                else:
                    sizes.append(len(r.body[0]))
            except Exception as e:
                errors.append(type(e).__name__)
            finally:
                bus.disconnect()
    print("go", flush=True)
    await asyncio.gather(*(loop() for _ in range(workers)))
    return {"lists": len(sizes), "sizes": sorted(set(sizes)), "errors": errors[:5], "nerrors": len(errors)}

async def calls(addr, path, n, conns, interactive, timeout):
    """`n` GetValue calls at once over `conns` connections; each one's result and time."""
    buses = [await MessageBus(bus_address=addr).connect() for _ in range(conns)]
    flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else MessageFlag.NONE
    async def one(i):
        t0 = time.monotonic()
        try:
            r = await asyncio.wait_for(buses[i % conns].call(
                call("GetValue", path, "org.libvirt.Secret", flags=flags)), timeout)
            res = r.error_name if r.message_type == MessageType.ERROR else "ok"
        except Exception as e:
            res = "client." + type(e).__name__
        return [res, time.monotonic() - t0]
    # At most 64 in flight in all, spread evenly: a global bound would let calls pile up on a
    # connection whose calls are slow (past the service's 32 per connection: LimitsExceeded).
    sems = [asyncio.Semaphore(max(1, 64 // conns)) for _ in range(conns)]
    async def bounded(i):
        async with sems[i % conns]:
            return await one(i)
    out = await asyncio.gather(*(bounded(i) for i in range(n)))
    for b in buses:
        b.disconnect()
    return out

async def changed(addr):
    """polkit's Changed, forged: unicast to the service and broadcast."""
    bus = await MessageBus(bus_address=addr).connect()
    for dest in (DEST, None):
        for _ in range(5):
            await bus.send(Message(message_type=MessageType.SIGNAL, destination=dest,
                                   path="/org/freedesktop/PolicyKit1/Authority",
                                   interface="org.freedesktop.PolicyKit1.Authority", member="Changed"))
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="GetId"))   # flushed and delivered
    bus.disconnect()
    return {"sent": 10}

async def main():
    mode, addr, *rest = sys.argv[1:]
    if mode == "lists":
        out = await lists(addr, float(rest[0]), int(rest[1]))
    elif mode == "calls":
        out = await calls(addr, rest[0], int(rest[1]), int(rest[2]), rest[3] == "1", float(rest[4]))
    else:
        out = await changed(addr)
    print(json.dumps(out), flush=True)

asyncio.run(main())
'''


@pytest.fixture
def attacker(unpriv_python, test_users):
    """attacker(bus, *args) -> Popen of the ATTACK script as sbtest-member (stdout piped)."""
    d = harness.public_tempdir("sb-attack-")
    script = d / "attack.py"
    script.write_text(ATTACK)
    script.chmod(0o644)
    procs: list[subprocess.Popen] = []

    def start(bus, mode: str, *args: str) -> subprocess.Popen:
        user = test_users.member
        argv = harness.as_user(user, unpriv_python.argv(str(script), mode, bus.address, *args))
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(d / f"{mode}.err", "wb"),
                             env=unpriv_python.env(harness.user_env(user)), cwd="/",
                             start_new_session=True, text=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        harness.stop_process(p)
        p.stdout.close()
    remove_tree(d)


def result(p: subprocess.Popen, timeout: float) -> Any:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


async def root_getvalue_latencies(address: str, path: str, seconds: float) -> list[float]:
    """Root's GetValue, each on a new connection (as virsh makes one per command, so no
    per-connection cache helps): the call's time, connecting left out."""
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    lat: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        bus = await MessageBus(bus_address=address).connect()
        try:
            t0 = time.monotonic()
            r = await asyncio.wait_for(bus.call(Message(destination=BUS_NAME, path=path, interface=SECRET,
                                                        member="GetValue", signature="u", body=[0])), 30)
            lat.append(time.monotonic() - t0)
            assert r.message_type is MessageType.METHOD_RETURN and r.body == [b"root's value"], r
        finally:
            bus.disconnect()
    return lat


@BUS_POLICY
def test_attack_3_list_loop_does_not_starve_root(system_bus, make_polkitd, make_secretbusd, test_users,
                                                  attacker, make_monitor):
    """Item 3: a member loops new connections, each listing 300 secrets (300 getattr), 4 loops
    at once, for 4 s; root's GetValue (a new connection each) p99 meanwhile stays far from the
    seconds it reached when every member connection's 300 checks queued in front of root's."""
    make_polkitd(system_bus, actions=[ACTIONS_FILE])
    make_secretbusd(system_bus, secrets=300)
    mon = make_monitor(system_bus)
    uuid = "5b7e5700-0000-4000-8003-000000000001"
    root_define(system_bus, uuid, False, "/var/lib/sbtest/root-starve.img", b"root's value")
    p = attacker(system_bus, "lists", "4", "4")
    assert p.stdout.readline().strip() == "go"
    lat = asyncio.run(root_getvalue_latencies(system_bus.address, secret_path(uuid), 4.0))
    got = result(p, 60)
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(f"\nroot GetValue under the ListSecrets loop: {len(lat)} calls, p50 {lat[len(lat) // 2] * 1000:.1f} ms,"
          f" p99 {p99 * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms; member: {got}")
    assert got["lists"] >= 4 and got["sizes"] == [301], got      # the attack ran, lists were whole
    assert p99 < 0.2, f"root's GetValue p99 {p99 * 1000:.0f} ms under the attack (goal: 50 ms)"
    # one check per secret for the member's uid, however many connections it made
    mon.sync()
    getattr_checks = [c for c in mon.checks() if c.action == "org.libvirt.api.secret.getattr"]
    assert len(getattr_checks) <= 301 * 2, (len(getattr_checks), got["lists"])
    assert not any(c.subject and c.action == READ_SECURE for c in mon.checks()), "root asked polkit"


def denial_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "denied" in line or "more denials" in line]


@BUS_POLICY
def test_attack_9_denials_do_not_flood_the_log(system_bus, make_polkitd, make_secretbusd, test_users, attacker):
    """Item 9: 2,000 denied GetValue calls (member without rules, 4 connections) leave one
    denial line and, at the latest on shutdown, one summary line with the count."""
    make_polkitd(system_bus, actions=[ACTIONS_FILE])
    sbd = make_secretbusd(system_bus)
    uuid = "5b7e5700-0000-4000-8009-000000000001"
    root_define(system_bus, uuid, False, "/var/lib/sbtest/flood.img", b"v")
    out = result(attacker(system_bus, "calls", secret_path(uuid), "2000", "16", "0", "30"), 120)
    assert [r for r, _ in out].count("org.libvirt.Error.AccessDenied") == 2000, \
        [x for x in out if x[0] != "org.libvirt.Error.AccessDenied"][:5]
    lines = denial_lines(sbd.log())
    assert len(lines) <= 2, lines[:5]
    assert lines and READ_SECURE in lines[0] and f"uid {test_users.member.uid}" in lines[0], lines
    sbd.stop()
    lines = denial_lines(sbd.log())
    assert len(lines) <= 3, lines[:5]
    assert any(f"uid {test_users.member.uid}: 1999 more denials of {READ_SECURE}" in x for x in lines), lines


@BUS_POLICY
def test_attack_10_forged_changed_keeps_the_cache(system_bus, make_polkitd, make_secretbusd, test_users,
                                                  attacker, pyclient, make_monitor):
    """Item 10: a member sends polkit's Changed signal (unicast to the service, and broadcast);
    the cache is not emptied: a cached decision needs no new check. (The bus policy may drop
    the unicast one already; the unit test above shows the service's own check.)"""
    make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[RULES_FILE])
    sbd = make_secretbusd(system_bus)
    mon = make_monitor(system_bus)
    uuid = "5b7e5700-0000-4000-8010-000000000001"
    root_define(system_bus, uuid, False, "/var/lib/sbtest/changed.img", b"v")
    client = pyclient(test_users.member, system_bus)
    assert client.call(secret_path(uuid), SECRET, "GetValue", "u", [0]).ok
    assert result(attacker(system_bus, "changed"), 30) == {"sent": 10}
    time.sleep(0.5)
    assert client.call(secret_path(uuid), SECRET, "GetValue", "u", [0]).ok
    mon.sync()
    assert [c.action for c in mon.checks(client.name)] == [READ_SECURE], "the forged Changed emptied the cache"
    assert "polkit rules or actions changed" not in sbd.log()


@BUS_POLICY
def test_attack_12_interactive_checks_are_limited(system_bus, make_polkitd, make_secretbusd, test_users,
                                                  attacker):
    """Item 12: with polkitd not answering (as when it waits for an authentication agent), a
    member's 8 interactive calls: 2 wait for polkit, 6 are refused at once."""
    pk = make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[RULES_FILE])
    make_secretbusd(system_bus)
    uuid = "5b7e5700-0000-4000-8012-000000000001"
    root_define(system_bus, uuid, False, "/var/lib/sbtest/interactive.img", b"v")
    os.kill(pk.pid, signal.SIGSTOP)
    try:
        out = result(attacker(system_bus, "calls", secret_path(uuid), "8", "8", "1", "3"), 60)
        # root is not held up either
        assert g(system_bus, None, secret_path(uuid), f"{SECRET}.GetValue", "0").ok
    finally:
        os.kill(pk.pid, signal.SIGCONT)
    refused = [s for r, s in out if r == "org.libvirt.Error.AccessDenied"]
    waited = [r for r, s in out if r == "client.TimeoutError"]
    assert len(refused) == 6 and len(waited) == 2, out
    assert max(refused) < 1.5, out


@BUS_POLICY
def test_attack_13_reload_with_unknown_reader_keeps_everything(system_bus, make_polkitd, make_secretbusd,
                                                               test_users):
    """Item 13: a reload whose private_value_readers name no user keeps the old readers and the
    old secrets (a secret added to the store meanwhile stays unseen); a good reload swaps both."""
    make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[RULES_FILE])
    sbd = make_secretbusd(system_bus, readers=(READER,))
    private = "5b7e5700-0000-4000-8013-000000000001"
    root_define(system_bus, private, True, "/var/lib/sbtest/reload-private.img", b"private value")
    path = secret_path(private)

    def member_value() -> str:
        r = g(system_bus, test_users.member, path, f"{SECRET}.GetValue", "0")
        return "ok" if r.ok and gdbus_bytes(r.out) == b"private value" else r.code()

    assert member_value() == "ok"
    planted = "5b7e5700-0000-4000-8013-000000000002"
    f = sbd.root / "etc" / "secrets" / f"{planted}.xml"
    f.write_text(f"<secret ephemeral='no' private='no'><uuid>{planted}</uuid>"
                 "<usage type='volume'><volume>/var/lib/sbtest/planted.img</volume></usage></secret>\n")
    f.chmod(0o600)
    conf = sbd.root / "etc" / "secret.conf"

    def reload(text: str, expect: str) -> None:
        n = sbd.log().count(expect)
        conf.write_text(text)
        sbd.signal(signal.SIGHUP)
        harness.wait_until(lambda: sbd.log().count(expect) > n, timeout=10, what=expect)

    def planted_visible() -> bool:
        return g(system_bus, None, CONNECT_PATH, f"{CONNECT}.SecretLookupByUUID", planted).ok

    reload('private_value_readers = [ "sbtest-no-such-user" ]\n', "reload failed")
    assert "unknown user 'sbtest-no-such-user'" in sbd.log()
    assert not planted_visible(), "the failed reload replaced the secrets"
    assert member_value() == "ok", "the failed reload replaced the readers"

    reload("private_value_readers = [ ]\n", "reloaded:")
    assert planted_visible()
    assert member_value() == "private", "the reload did not reach the private-value rule"

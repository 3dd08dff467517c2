"""Group commit of writes (issue 15): batches share their syncs, writes to one secret keep
their order, a failed write changes nothing. Real files in a temp store (embedded driver) and a
real secretbusd on a private bus; the only hook is Writes.gate, which holds the I/O thread so
that a batch queues up deterministically."""
from __future__ import annotations

import asyncio
import os
import signal
import threading

import harness
import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from fixtures import secret_xml
from harness.gate import Gate

import secretbus
from secretbus.bus.client import DBusConnection
from secretbus.bus.names import BUS_NAME, CONNECT_IFACE, CONNECT_PATH, SECRET_IFACE, secret_path
from secretbus.core import errors
from secretbus.core.model import EventId, Lifecycle
from secretbus.store.paths import InstanceKind

UUIDS = [f"6c0a1b2e-0000-4000-8000-{i:012x}" for i in range(16)]


@pytest.fixture
def driver(tmp_path):
    c = secretbus.open(f"secret:///embed?root={tmp_path / 'inst'}")
    yield c.driver
    gate = c.driver.writes.gate
    if isinstance(getattr(gate, "__self__", None), Gate):
        gate.__self__.open()      # a failed test must not leave the I/O thread held
    c.close()


def cfg(tmp_path):
    return tmp_path / "inst" / "etc" / "secrets"


def test_concurrent_writes_share_one_directory_fsync(driver):
    for u in UUIDS:
        driver.define_xml(secret_xml(u, usage=None))
    before = driver.writes.stats.batches, driver.writes.stats.dir_syncs
    gate = Gate(driver)
    futures = [driver.submit_set_value(u, f"v-{u}".encode()) for u in UUIDS]
    assert gate.held.wait(10)
    assert not any(f.done() for f in futures)            # nothing is answered before it is durable
    for u in UUIDS:                                      # nor shown: the table is the durable state
        with pytest.raises(errors.NoSecret, match="does not have a value"):
            driver.get_value(u)
    gate.open()
    for f in futures:
        f.result(10)
    st = driver.writes.stats
    # The first write may have been taken alone; the 15 queued behind it form one batch.
    assert st.batches - before[0] <= 2
    assert st.largest >= len(UUIDS) - 1
    assert st.dir_syncs - before[1] <= 2
    for u in UUIDS:
        assert driver.get_value(u) == f"v-{u}".encode()


def test_writes_to_one_secret_apply_in_order_with_their_events(driver, tmp_path):
    u = UUIDS[0]
    events: list[tuple[EventId, Lifecycle | None, str | None]] = []
    driver.subscribe(lambda ev: events.append((ev.event_id, ev.lifecycle, ev.definition.description
                                               if ev.definition else None)))
    gate = Gate(driver)
    expected: list[tuple[EventId, Lifecycle | None, str | None]] = []
    futures = []
    for i in range(40):
        d = driver.parse_definition(secret_xml(u, desc=f"gen{i}", usage=None))
        futures.append(driver.submit_define(d))
        expected.append((EventId.LIFECYCLE, Lifecycle.DEFINED, f"gen{i}"))
        futures.append(driver.submit_set_value(u, f"value-{i}".encode()))
        expected.append((EventId.VALUE_CHANGED, None, f"gen{i}"))
        if i % 10 == 9:
            futures.append(driver.submit_undefine(u))
            expected.append((EventId.LIFECYCLE, Lifecycle.UNDEFINED, f"gen{i}"))
    d = driver.parse_definition(secret_xml(u, desc="last", usage=None))
    futures.append(driver.submit_define(d))
    expected.append((EventId.LIFECYCLE, Lifecycle.DEFINED, "last"))
    futures.append(driver.submit_set_value(u, b"the last value"))
    expected.append((EventId.VALUE_CHANGED, None, "last"))
    gate.open()
    for f in futures:
        f.result(10)        # none fails: each was checked against the state the one before left
    assert events == expected
    assert driver.get_value(u) == b"the last value"
    assert "<description>last</description>" in driver.get_xml_desc(u)
    driver.writes.gate = None
    # and on disk: what a restart would load
    (loaded,) = [x for x in driver.store.load().secrets if x.definition.uuid == u]
    assert (loaded.value, loaded.definition.description) == (b"the last value", "last")


def test_a_failed_write_in_a_batch_changes_nothing_and_spares_the_others(driver, tmp_path):
    good, bad = UUIDS[1], UUIDS[2]
    for u in (good, bad):
        driver.define_xml(secret_xml(u, usage=None))
        driver.set_value(u, b"old")
    gate = Gate(driver)
    f_good = driver.submit_set_value(good, b"new")
    f_bad = driver.submit_set_value(bad, b"new")
    assert gate.held.wait(10)
    # A directory where the new value file must go: its rename fails (EISDIR), a real error.
    name = next(n for n in os.listdir(cfg(tmp_path)) if n.startswith(bad) and not n.endswith(".xml"))
    os.rename(cfg(tmp_path) / name, cfg(tmp_path) / (name + ".keep"))
    os.mkdir(cfg(tmp_path) / name)
    (cfg(tmp_path) / name / "x").write_bytes(b"")
    gate.open()
    f_good.result(10)
    with pytest.raises(errors.SystemError, match="cannot write"):
        f_bad.result(10)
    assert driver.get_value(good) == b"new"
    assert driver.get_value(bad) == b"old"               # the table shows what is on disk
    assert not [n for n in os.listdir(cfg(tmp_path)) if n.endswith(".new")]


def test_sync_write_from_an_event_callback_is_written_at_once(driver, tmp_path):
    """An embedded handler runs in the thread that finishes the write (the I/O thread for a
    batched one); a write it makes, to the same secret or another, is done there and then
    (as before group commit), durable, its events nested in the handler's."""
    u, other = UUIDS[3], UUIDS[4]
    driver.define_xml(secret_xml(u, usage=None))
    driver.define_xml(secret_xml(other, usage=None))
    seen: list[tuple[str, bytes]] = []

    def cb(ev):
        if ev.event_id != EventId.VALUE_CHANGED:
            return
        seen.append((ev.uuid, driver.get_value(ev.uuid)))
        if ev.uuid == u and driver.get_value(u) == b"x":
            driver.set_value(u, b"from callback")       # the same secret: its keys are this write's
            driver.set_value(other, b"other from callback")
    driver.subscribe(cb)
    driver.set_value(u, b"x")
    assert seen == [(u, b"x"), (u, b"from callback"), (other, b"other from callback")]
    assert driver.get_value(u) == b"from callback"
    # also when the write was applied at once in the caller's thread (no files: ephemeral)
    e = UUIDS[6]
    driver.define_xml(secret_xml(e, eph="yes", usage=None))
    driver.subscribe(lambda ev: ev.uuid == e and ev.event_id == EventId.VALUE_CHANGED
                     and driver.get_value(e) == b"y" and driver.set_value(e, b"y2"))
    driver.set_value(e, b"y")
    assert driver.get_value(e) == b"y2"
    # the nested writes went through the store like any other: no temp file is left
    assert [n for n in os.listdir(cfg(tmp_path)) if n.endswith(".new")] == []


# -- over the bus: one client pipelines its writes to one secret -------------------------------
def test_pipelined_writes_to_one_secret_over_dbus(session_bus, make_secretbusd):
    """60 SetValue calls to one secret sent at once, with 60 to a second secret between them:
    every one succeeds, each secret ends with its last value (also after a restart), one
    signal per call. (The front ends look the secret
    up when the call arrives, so a pipelined redefine would be refused as changed meanwhile:
    the driver-level test above mixes defines and undefines.)"""
    d = make_secretbusd(session_bus)
    u, other = UUIDS[4], UUIDS[5]
    n = 60

    async def main() -> tuple[list[Message], list[str]]:
        bus = await MessageBus(bus_address=session_bus.address).connect()
        for x in (u, other):
            await bus.call(Message(destination=BUS_NAME, path=CONNECT_PATH, interface=CONNECT_IFACE,
                                   member="SecretDefineXML", signature="su", body=[secret_xml(x, usage=None), 0]))
        signals: list[str] = []

        def on(msg: Message) -> None:
            if msg.message_type is MessageType.SIGNAL and msg.member == "SecretValueChanged":
                signals.append(msg.body[0])
        bus.add_message_handler(on)
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                               body=[f"type='signal',sender='{BUS_NAME}',member='SecretValueChanged'"]))
        calls = [Message(destination=BUS_NAME, path=secret_path(x), interface=SECRET_IFACE, member="SetValue",
                         signature="ayu", body=[f"{x}-{i}".encode(), 0])
                 for i in range(n) for x in (u, other)]
        replies: list[Message] = []
        # Up to 32 calls in flight per caller (bus/limits.py): waves of 30, each sent at once.
        for k in range(0, len(calls), 30):
            replies += await asyncio.wait_for(asyncio.gather(*(bus.call(m) for m in calls[k:k + 30])), 30)
        for _ in range(50):
            if len(signals) >= 2 * n:
                break
            await asyncio.sleep(0.05)
        bus.disconnect()
        return replies, signals

    replies, signals = asyncio.run(main())
    assert [r.body for r in replies if r.message_type is MessageType.ERROR] == []
    # one signal per call (the order between two secrets is not promised, only per secret)
    assert sorted(signals) == sorted(secret_path(x) for _ in range(n) for x in (u, other))
    d.stop()
    with harness.Secretbusd(session_bus, root=d.root):
        c = DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10,
                                bus_address=session_bus.address)
        try:
            for x in (u, other):
                assert c.lookup_by_uuid(x).get_value() == f"{x}-{n - 1}".encode()
        finally:
            c.close()


def test_batch_data_syncs_work_in_a_forked_child(driver, tmp_path):
    """The helper threads that fdatasync a batch's files are per process: a forked child (the
    store's crash tests fork) gets its own instead of a dead copy of its parent's."""
    from secretbus.store.commit import commit_batch

    def batch(tag: str) -> list:
        return [driver.store.plan_value(driver.parse_definition(secret_xml(u, usage=None)), f"{tag}{u}".encode())
                for u in UUIDS[8:16]]
    for u in UUIDS[8:16]:
        driver.define_xml(secret_xml(u, usage=None))
    assert commit_batch(batch("parent")).errors == [None] * 8       # the parent's pool is running
    pid = os.fork()
    if pid == 0:    # child: a hang would be killed by the alarm
        signal.alarm(10)
        try:
            ok = commit_batch(batch("child")).errors == [None] * 8
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    (loaded,) = [x for x in driver.store.load().secrets if x.definition.uuid == UUIDS[8]]
    assert loaded.value == f"child{UUIDS[8]}".encode()


def test_a_write_submitted_while_the_mutex_is_held_does_not_block_its_caller(driver):
    """A reload (or the fleet store's etcd write) holds the driver's mutex for long: a write
    submitted meanwhile from an event loop returns its future at once, is started by the I/O
    thread once the mutex is free, and keeps its place before later writes to its secret."""
    import time
    u = UUIDS[7]
    driver.define_xml(secret_xml(u, usage=None))
    order: list[bytes] = []
    driver.subscribe(lambda ev: ev.uuid == u and order.append(driver.get_value(u)))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with driver._mutex:        # what reload() holds while it loads the store
            held.set()
            release.wait(10)
    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(10)
    t0 = time.monotonic()
    first = driver.submit_set_value(u, b"first")
    assert time.monotonic() - t0 < 0.5 and not first.done()
    release.set()
    second = driver.submit_set_value(u, b"second")
    first.result(10)
    second.result(10)
    t.join()
    assert order == [b"first", b"second"]
    assert driver.get_value(u) == b"second"

"""Issue 12, items 5 and 8, as attacks on the real thing: a private system-type bus with the
shipped policy, real polkitd with rules written by the test, secretbusd as root, and the
unprivileged `sbtest-member` (group libvirt) through setpriv.

5. A secret that polkit hides from members (getattr denied) must not reach them in any
   signal, however they listen (the project's client, a raw subscriber, an eavesdropping
   AddMatch), and Introspect on its path answers as for no object at all.
8. A member granted write/save for one usage must not redefine another usage's secret of the
   same UUID, and must not destroy a stored value (persistent -> ephemeral) without delete.
"""
from __future__ import annotations

import asyncio
import json
import os
import selectors
import subprocess
import time
from pathlib import Path

import harness
import pytest
from test_polkit import ACTIONS_FILE, Result, g, gdbus_ay, gdbus_bytes

from secretbus.access.permissions import Perm
from secretbus.bus.handlers import redefine_checks
from secretbus.core import errors
from secretbus.core.secretxml import parse_secret_xml

BUS_CONF = str(Path(__file__).resolve().parents[1] / "dbus" / "org.libvirt.secret.conf")
CONNECT_PATH = "/org/libvirt/secret"
CONNECT = "org.libvirt.Connect"
SECRET = "org.libvirt.Secret"

HIDDEN = "5b7e5700-0000-4000-8012-000000000005"
VISIBLE = "5b7e5700-0000-4000-8012-000000000006"
ABSENT = "5b7e5700-0000-4000-8012-00000000dead"
HIDDEN_WORDS = ("hidden-usage", "hidden-desc", HIDDEN, HIDDEN.replace("-", "_"))


def path_of(uuid: str) -> str:
    return f"{CONNECT_PATH}/secret/_{uuid.replace('-', '_')}"


def ceph_xml(uuid: str, name: str, desc: str, *, ephemeral: bool = False) -> str:
    return (f"<secret ephemeral='{'yes' if ephemeral else 'no'}' private='no'><uuid>{uuid}</uuid>"
            f"<description>{desc}</description><usage type='ceph'><name>{name}</name></usage></secret>")


def tls_xml(uuid: str, name: str, *, ephemeral: bool) -> str:
    return (f"<secret ephemeral='{'yes' if ephemeral else 'no'}' private='no'><uuid>{uuid}</uuid>"
            f"<usage type='tls'><name>{name}</name></usage></secret>")


# ======================================================================================
# 5. signals and Introspect of a hidden secret

HIDE_RULES = ("50-sbtest-attack-hide.rules", f"""
// Members may not see one secret at all (getattr on it denied); everything else by default.
polkit.addRule(function(action, subject) {{
    if (action.id == "org.libvirt.api.secret.getattr" &&
        action.lookup("secret_uuid") == "{HIDDEN}" && subject.isInGroup("libvirt"))
        return polkit.Result.NO;
    return polkit.Result.NOT_HANDLED;
}});
""")

# Prints one JSON line per signal it receives about secrets. Modes: "client" (the project's
# DBusConnection.subscribe), "subscriber" (dbus-fast: AddMatch + Connect.Subscribe), and
# "eavesdrop" (dbus-fast: an eavesdropping AddMatch on everything, no subscription).
LISTENER = r'''
import asyncio, json, sys, threading
mode, addr = sys.argv[1], sys.argv[2]

def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

if mode == "client":
    from secretbus.bus.client import DBusConnection
    from secretbus.store.paths import InstanceKind
    conn = DBusConnection.open(InstanceKind.SYSTEM, "secret:///system", bus_address=addr, timeout=10)
    def handler(secret, ev):
        life = -1 if ev.lifecycle is None else int(ev.lifecycle)
        out({"member": "event", "text": f"{ev.uuid} {int(ev.event_id)} {life} {ev.usage_id}"})
    conn.subscribe(handler)
    out({"member": "listening", "text": ""})
    sys.stdin.read()
    conn.close()
    sys.exit(0)

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

async def main():
    bus = await MessageBus(bus_address=addr).connect()
    def seen(m):
        if m.message_type is MessageType.SIGNAL and m.sender != "org.freedesktop.DBus":
            out({"member": m.member, "path": m.path, "destination": m.destination, "text": repr(m.body)})
    bus.add_message_handler(seen)
    # Eavesdropping: the bus may refuse such rules from a user (then say so); a plain rule
    # for every signal is added in any case (it would catch every broadcast).
    rules = (["eavesdrop='true'", "type='signal',eavesdrop='true'", "type='signal'"] if mode == "eavesdrop"
             else ["type='signal',sender='org.libvirt.secret'"])
    for r in rules:
        reply = await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                       interface="org.freedesktop.DBus", member="AddMatch",
                                       signature="s", body=[r]))
        if reply.message_type is not MessageType.METHOD_RETURN:
            assert "eavesdrop" in r, reply.body
            out({"member": "refused", "path": "", "destination": None, "text": r})
    if mode == "subscriber":
        reply = await bus.call(Message(destination="org.libvirt.secret", path="/org/libvirt/secret",
                                       interface="org.libvirt.Connect", member="Subscribe"))
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
    out({"member": "listening", "path": "", "destination": None, "text": ""})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
'''


class Listener:
    """LISTENER as `user` in `mode`; `lines` collects what it printed."""

    def __init__(self, unpriv, user, bus, mode: str):
        self.proc = subprocess.Popen(
            harness.as_user(user, unpriv.argv("-c", LISTENER, mode, bus.address)),
            env=unpriv.env(harness.user_env(user)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd="/", start_new_session=True)
        self.mode = mode
        self.lines: list[dict] = []
        self._buf = b""
        self.wait_for(lambda line: line["member"] == "listening", 30)

    def wait_for(self, pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None and self.proc.stderr is not None
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                for line in self._take():
                    if pred(line):
                        return True
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return False
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"{self.mode} listener exited: {self.proc.stderr.read()!r}")
                self._buf += chunk

    def _take(self) -> list[dict]:
        *full, self._buf = self._buf.split(b"\n")
        new = [json.loads(x) for x in full if x]
        self.lines += new
        return new

    def stop(self) -> list[dict]:
        try:
            out, err = self.proc.communicate(b"", timeout=15)
        finally:
            harness.stop_process(self.proc)
        self._buf += out
        self._take()
        assert self.proc.returncode == 0, err
        return self.lines

    def kill(self) -> None:
        harness.stop_process(self.proc)


def _root(bus, method: str, path: str, *args: str) -> Result:
    r = g(bus, None, path, method, *args)
    assert r.ok, r
    return r


def about_hidden(lines: list[dict]) -> list[dict]:
    return [x for x in lines if any(w in json.dumps(x) for w in HIDDEN_WORDS)]


@pytest.mark.bus_policy(BUS_CONF)
def test_hidden_secret_never_reaches_a_member(system_bus, make_polkitd, make_secretbusd, test_users,
                                              unpriv_python):
    make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[HIDE_RULES])
    make_secretbusd(system_bus, system=True)
    member = test_users.member
    listeners = []
    try:
        for mode in ("client", "subscriber", "eavesdrop"):
            listeners.append(Listener(unpriv_python, member, system_bus, mode))
        client, subscriber, eavesdrop = listeners
        # Root's whole life cycle of both secrets: define, value, redefine (new description:
        # PropertiesChanged), undefine. The hidden one goes first, so once the visible one's
        # last event has arrived, everything about the hidden one has been delivered or not.
        for uuid, name in ((HIDDEN, "hidden-usage"), (VISIBLE, "visible-usage")):
            desc = "hidden-desc" if uuid == HIDDEN else "visible-desc"
            _root(system_bus, f"{CONNECT}.SecretDefineXML", CONNECT_PATH, ceph_xml(uuid, name, desc), "0")
            _root(system_bus, f"{SECRET}.SetValue", path_of(uuid), gdbus_ay(b"v"), "0")
            _root(system_bus, f"{CONNECT}.SecretDefineXML", CONNECT_PATH, ceph_xml(uuid, name, desc + "-2"), "0")
        # Introspect: the hidden path answers exactly as a path of no secret.
        hidden = g(system_bus, member, path_of(HIDDEN), "org.freedesktop.DBus.Introspectable.Introspect")
        absent = g(system_bus, member, path_of(ABSENT), "org.freedesktop.DBus.Introspectable.Introspect")
        visible = g(system_bus, member, path_of(VISIBLE), "org.freedesktop.DBus.Introspectable.Introspect")
        assert absent.error == "org.freedesktop.DBus.Error.UnknownObject", absent
        assert (hidden.error, hidden.message.replace(HIDDEN.replace("-", "_"), "X")) == \
            (absent.error, absent.message.replace(ABSENT.replace("-", "_"), "X")), hidden
        assert visible.ok and "org.libvirt.Secret" in str(visible.out), visible
        assert g(system_bus, None, path_of(HIDDEN), "org.freedesktop.DBus.Introspectable.Introspect").ok
        for uuid in (HIDDEN, VISIBLE):
            _root(system_bus, f"{SECRET}.Undefine", path_of(uuid))

        vis = VISIBLE.replace("-", "_")
        assert subscriber.wait_for(lambda x: x["member"] == "SecretEvent" and vis in x["path"] + x["text"]
                                   and ", 1, 0]" in x["text"], 15), subscriber.lines
        assert client.wait_for(lambda x: x["text"].startswith(VISIBLE + " 0 1 "), 15), \
            client.lines
        eavesdrop.wait_for(lambda x: False, 1)     # let anything misdirected arrive
        got = {lst.mode: lst.stop() for lst in listeners}
    finally:
        for lst in listeners:
            lst.kill()
    for mode, lines in got.items():
        assert about_hidden(lines) == [], (mode, about_hidden(lines))
    # Not subscribed (and eavesdropping refused or not): nothing of the service's at all.
    assert [x for x in got["eavesdrop"] if x["path"].startswith(CONNECT_PATH)] == [], got["eavesdrop"]
    # The visible secret's signals all reached the subscriber, addressed to it alone.
    members = {x["member"] for x in got["subscriber"] if vis in x["path"] + x["text"]}
    assert {"InterfacesAdded", "SecretValueChanged", "PropertiesChanged", "SecretEvent",
            "InterfacesRemoved"} <= members, got["subscriber"]
    assert {x["destination"] for x in got["subscriber"] if x["member"] != "listening"} == {
        next(x for x in got["subscriber"] if x["member"] != "listening")["destination"]}
    client_events = [x["text"] for x in got["client"] if x["member"] == "event"]
    # (uuid, event id, lifecycle, usage id): defined, value changed, undefined
    for want in (f"{VISIBLE} 0 0 visible-usage", f"{VISIBLE} 1 -1 visible-usage", f"{VISIBLE} 0 1 visible-usage"):
        assert want in client_events, client_events


# ======================================================================================
# 8. redefine

TLS_GRANT = ("50-sbtest-attack-tls-grant.rules", """
// Members may write and save TLS secrets named shared-x, nothing else (no delete).
polkit.addRule(function(action, subject) {
    if ((action.id == "org.libvirt.api.secret.write" || action.id == "org.libvirt.api.secret.save") &&
        action.lookup("secret_usage_name") == "shared-x" && subject.isInGroup("libvirt"))
        return polkit.Result.YES;
    return polkit.Result.NOT_HANDLED;
});
""")

CEPH = "5b7e5700-0000-4000-8012-000000000008"
TLS = "5b7e5700-0000-4000-8012-000000000009"


@pytest.mark.bus_policy(BUS_CONF)
def test_redefine_is_checked_against_the_existing_secret(system_bus, make_polkitd, make_secretbusd,
                                                         test_users):
    make_polkitd(system_bus, actions=[ACTIONS_FILE], rules=[TLS_GRANT])
    daemon = make_secretbusd(system_bus, system=True)
    member = test_users.member
    _root(system_bus, f"{CONNECT}.SecretDefineXML", CONNECT_PATH, ceph_xml(CEPH, "shared-x", "root's"), "0")
    _root(system_bus, f"{SECRET}.SetValue", path_of(CEPH), gdbus_ay(b"ceph-key"), "0")
    store = daemon.root / "etc" / "secrets"
    files = sorted(p.name for p in store.iterdir() if p.name.startswith(CEPH))

    # The attack: the member's grant is for TLS shared-x; the secret is root's Ceph shared-x.
    for ephemeral in (True, False):
        r = g(system_bus, member, CONNECT_PATH, f"{CONNECT}.SecretDefineXML",
              tls_xml(CEPH, "shared-x", ephemeral=ephemeral), "0")
        assert r.code() == "denied:write", r
    assert gdbus_bytes(str(_root(system_bus, f"{SECRET}.GetValue", path_of(CEPH), "0").out)) == b"ceph-key"
    assert "<usage type='ceph'>" in str(_root(system_bus, f"{SECRET}.GetXMLDesc", path_of(CEPH), "0").out)
    assert sorted(p.name for p in store.iterdir() if p.name.startswith(CEPH)) == files

    # Within the grant: a TLS shared-x secret may be redefined, but not made ephemeral
    # (that deletes its stored value: delete is needed, and not granted).
    _root(system_bus, f"{SECRET}.Undefine", path_of(CEPH))    # usage ids are unique across types
    _root(system_bus, f"{CONNECT}.SecretDefineXML", CONNECT_PATH, tls_xml(TLS, "shared-x", ephemeral=False), "0")
    _root(system_bus, f"{SECRET}.SetValue", path_of(TLS), gdbus_ay(b"tls-key"), "0")
    r = g(system_bus, member, CONNECT_PATH, f"{CONNECT}.SecretDefineXML", tls_xml(TLS, "shared-x", ephemeral=True), "0")
    assert r.code() == "denied:delete", r
    assert gdbus_bytes(str(_root(system_bus, f"{SECRET}.GetValue", path_of(TLS), "0").out)) == b"tls-key"
    assert any(p.name.startswith(TLS) and not p.name.endswith(".xml") for p in store.iterdir())
    r = g(system_bus, member, CONNECT_PATH, f"{CONNECT}.SecretDefineXML",
          tls_xml(TLS, "shared-x", ephemeral=False), "0")
    assert r.ok, r


# -- the pure parts -------------------------------------------------------------------------
def test_redefine_checks():
    ceph = parse_secret_xml(ceph_xml(CEPH, "shared-x", "d"))
    tls_eph = parse_secret_xml(tls_xml(CEPH, "shared-x", ephemeral=True))
    tls = parse_secret_xml(tls_xml(CEPH, "shared-x", ephemeral=False))
    assert redefine_checks(None, tls) == ()
    assert redefine_checks(ceph, tls) == ((Perm.WRITE, ceph), (Perm.SAVE, ceph))
    assert redefine_checks(ceph, tls_eph) == ((Perm.WRITE, ceph), (Perm.SAVE, ceph), (Perm.DELETE, ceph))
    assert redefine_checks(tls_eph, tls) == ((Perm.WRITE, tls_eph), (Perm.SAVE, tls_eph))


def test_define_compare_and_set(tmp_path):
    """The definition checked is the one acted on: a change in between refuses the define."""
    from secretbus.driver.build import open_instance
    from secretbus.store.paths import InstancePaths
    driver = open_instance(InstancePaths.embed(tmp_path))
    ceph = driver.define(parse_secret_xml(ceph_xml(CEPH, "shared-x", "one")))
    driver.set_value(CEPH, b"k")
    checked = driver.find(CEPH)
    driver.define(parse_secret_xml(ceph_xml(CEPH, "shared-x", "two")))   # meanwhile
    with pytest.raises(errors.OperationFailed, match="changed while the request was being authorised"):
        driver.define(parse_secret_xml(tls_xml(CEPH, "shared-x", ephemeral=True)), expect=checked)
    now = driver.find(CEPH)
    assert now is not None and now.description == "two" and driver.get_value(CEPH) == b"k"
    with pytest.raises(errors.OperationFailed):
        driver.define(parse_secret_xml(tls_xml(TLS, "shared-x", ephemeral=False)), expect=ceph)   # absent
    assert driver.find(TLS) is None
    assert driver.define(parse_secret_xml(ceph_xml(CEPH, "shared-x", "three")),
                         expect=driver.find(CEPH)).description == "three"
    # SetValue and Undefine: checked on one definition, acted on only if it is still the one.
    with pytest.raises(errors.OperationFailed, match="changed while"):
        driver.set_value(CEPH, b"other", expect=checked)
    with pytest.raises(errors.OperationFailed, match="changed while"):
        driver.undefine(CEPH, expect=checked)
    assert driver.get_value(CEPH) == b"k"
    current = driver.find(CEPH)
    driver.set_value(CEPH, b"new", expect=current)
    driver.undefine(CEPH, expect=current)
    assert driver.find(CEPH) is None
    driver.close()


# -- the emitter's delivery, without a bus ---------------------------------------------------
class _Bus:
    connected = True

    def __init__(self):
        self.sent: list = []

    def send(self, msg):
        self.sent.append(msg)


class _Access:
    """getattr allowed to every subscriber but ":1.bad" on HIDDEN; `cache` decides whether
    decisions are known without awaiting (the emitter then sends at once)."""

    enabled = True

    def __init__(self, cache: bool):
        self.cache, self.asked = cache, 0

    def _ok(self, caller, perm, d) -> bool:
        return not (caller.sender == ":1.bad" and d.uuid == HIDDEN)

    def cached(self, caller, perm, d):
        return self._ok(caller, perm, d) if self.cache else None

    async def caller_uid(self, caller) -> int | None:
        return None

    async def allowed(self, caller, perm, d) -> bool:
        self.asked += 1
        await asyncio.sleep(0)
        return self._ok(caller, perm, d)


@pytest.mark.parametrize("cache", [True, False])
def test_announcer_unicasts_only_what_each_subscriber_may_see(cache):
    from secretbus.bus.emit import Announcer
    from secretbus.core.model import EventId, Lifecycle, SecretEvent, UsageType

    async def main():
        bus, access = _Bus(), _Access(cache)
        a = Announcer(bus, None, access)
        a.reset([])
        for uuid in (HIDDEN, VISIBLE):     # nobody subscribed: nothing sent, nothing asked
            d = parse_secret_xml(ceph_xml(uuid, uuid[-4:], "d"))
            a.emit(SecretEvent(EventId.LIFECYCLE, uuid, UsageType.CEPH, d.usage_id or "", Lifecycle.DEFINED, 0, d))
        assert bus.sent == [] and access.asked == 0
        a.subscribers.add(":1.bad")
        a.subscribers.add(":1.good")
        for uuid in (HIDDEN, VISIBLE):
            d = a.exported[uuid]
            a.emit(SecretEvent(EventId.VALUE_CHANGED, uuid, UsageType.CEPH, d.usage_id or "", None, 0, d))
        await a.close()
        got = [(m.destination, m.member, m.body[0]) for m in bus.sent]
        assert got == [(":1.good", "SecretValueChanged", path_of(HIDDEN)),
                       (":1.bad", "SecretValueChanged", path_of(VISIBLE)),
                       (":1.good", "SecretValueChanged", path_of(VISIBLE))], got
        a.subscribers.gone(":1.good")
        bus.sent.clear()
        a.emit(SecretEvent(EventId.LIFECYCLE, HIDDEN, UsageType.CEPH, "", Lifecycle.UNDEFINED, 0, None))
        await a.close()
        assert bus.sent == [] and HIDDEN not in a.exported       # only :1.bad is left: hidden from it
    asyncio.run(main())


def test_announcer_broadcasts_with_access_off():
    from secretbus.access.permissions import AllowAll
    from secretbus.bus.emit import Announcer
    from secretbus.core.model import EventId, SecretEvent, UsageType

    async def main():
        bus = _Bus()
        a = Announcer(bus, None, AllowAll())
        d = parse_secret_xml(ceph_xml(HIDDEN, "x", "d"))
        a.reset([d])
        a.emit(SecretEvent(EventId.VALUE_CHANGED, HIDDEN, UsageType.CEPH, "x", None, 0, d))
        assert [(m.destination, m.member) for m in bus.sent] == [(None, "SecretValueChanged")]
    asyncio.run(main())


def test_subscriptions_are_bounded():
    from secretbus.bus.emit import Subscriptions
    subs = Subscriptions(limit=2, root_reserve=0)
    subs.add(":1.1")
    subs.add(":1.2")
    subs.add(":1.2")                     # again: no new entry
    with pytest.raises(errors.OperationFailed, match="too many event subscribers"):
        subs.add(":1.3")
    subs.gone(":1.1")
    subs.add(":1.3")
    assert subs.snapshot() == [":1.2", ":1.3"]


def test_subscriptions_are_bounded_per_uid_and_root_keeps_a_reserve():
    from secretbus.bus.emit import Subscriptions
    subs = Subscriptions(limit=10, per_uid=3, root_reserve=2)
    for i in range(3):
        subs.add(f":1.{i}", 1000)
    subs.add(":1.0", 1000)                        # again: no new entry
    with pytest.raises(errors.OperationFailed, match="this user already has 3 event subscriptions"):
        subs.add(":1.3", 1000)                    # one member cannot take every slot...
    for i in range(4, 9):
        subs.add(f":1.{i}", 1000 + i)             # ...others still subscribe, up to limit - reserve
    with pytest.raises(errors.OperationFailed, match=r"too many event subscribers \(8\)"):
        subs.add(":1.9", 1009)
    with pytest.raises(errors.OperationFailed, match="too many"):
        subs.add(":1.10", None)                   # unknown uid: no reserve either
    subs.add(":1.20", 0)
    subs.add(":1.21", 0)                          # root: the reserve, no per-uid bound
    with pytest.raises(errors.OperationFailed, match=r"too many event subscribers \(10\)"):
        subs.add(":1.22", 0)
    subs.gone(":1.0")
    subs.discard(":1.1")
    subs.add(":1.3", 1000)                        # slots come back when connections leave
    assert subs.sizes() == {"subscribers": 9, "subscriber_uids": 7}
    for name in subs.snapshot():
        subs.gone(name)
    assert subs.sizes() == {"subscribers": 0, "subscriber_uids": 0}


# -- one member cannot take every subscription slot ----------------------------------------
# argv: ADDRESS N. N connections, each calls Connect.Subscribe and stays; prints each result
# as JSON, then waits for a line on stdin, closes them all and prints "closed".
SUBSCRIBER_FLOOD = r'''
import asyncio, json, sys
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
async def main():
    addr, n = sys.argv[1], int(sys.argv[2])
    buses, results = [], []
    for _ in range(n):
        bus = await MessageBus(bus_address=addr).connect()
        buses.append(bus)
        r = await bus.call(Message(destination="org.libvirt.secret", path="/org/libvirt/secret",
                                   interface="org.libvirt.Connect", member="Subscribe"))
        results.append("ok" if r.message_type == MessageType.METHOD_RETURN else f"{r.error_name}: {r.body[0]}")
    print(json.dumps(results), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for b in buses:
        b.disconnect()
    print("closed", flush=True)
asyncio.run(main())
'''


@pytest.mark.bus_policy(BUS_CONF)
def test_one_member_cannot_take_every_subscription(system_bus, make_polkitd, make_secretbusd, test_users,
                                                   unpriv_python):
    """A member subscribes on 65 connections: the 65th is refused (64 per uid), root still
    subscribes, and the member's slots come back when its connections leave."""
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus
    from test_attack_fairness import _tables

    from secretbus.bus.emit import SUBSCRIBERS_PER_UID

    make_polkitd(system_bus, actions=[ACTIONS_FILE])
    daemon = make_secretbusd(system_bus, system=True)
    member = test_users.member
    p = subprocess.Popen(harness.as_user(member, unpriv_python.argv("-c", SUBSCRIBER_FLOOD, system_bus.address,
                                                                   str(SUBSCRIBERS_PER_UID + 1))),
                         env=unpriv_python.env(harness.user_env(member)), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/", start_new_session=True)
    try:
        assert p.stdout is not None and p.stdin is not None
        results = json.loads(p.stdout.readline() or "null")
        assert results is not None, p.stderr.read() if p.poll() is not None else "no output"
        assert results[:SUBSCRIBERS_PER_UID] == ["ok"] * SUBSCRIBERS_PER_UID, results
        assert results[-1].startswith("org.libvirt.Error.OperationFailed: ") and \
            f"this user already has {SUBSCRIBERS_PER_UID} event subscriptions" in results[-1], results[-1]

        async def root_subscribes():
            bus = await MessageBus(bus_address=system_bus.address).connect()
            r = await bus.call(Message(destination="org.libvirt.secret", path=CONNECT_PATH,
                                       interface=CONNECT, member="Subscribe"))
            return bus, r
        root_bus, r = asyncio.run(root_subscribes())
        try:
            assert r.message_type is MessageType.METHOD_RETURN, r.body
            assert _tables(daemon)["subscribers"] == SUBSCRIBERS_PER_UID + 1
            p.stdin.write("go\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "closed"
            deadline = time.monotonic() + 10
            while _tables(daemon)["subscribers"] != 1:       # root's is left
                assert time.monotonic() < deadline, _tables(daemon)
                time.sleep(0.2)
        finally:
            root_bus.disconnect()
        r2 = unpriv_python.run(member, "-c", SUBSCRIBER_FLOOD, system_bus.address, "1", input="\n", timeout=60)
        assert r2.returncode == 0 and json.loads(r2.stdout.splitlines()[0]) == ["ok"], r2.stderr
    finally:
        harness.stop_process(p)

"""secretbusd on private buses, exercised through the project's client and through busctl / gdbus."""
from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import harness
import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from fixtures import U1, U2, secret_xml
from harness import programs
from harness.events import EventWatch
from lxml import etree

import secretbus
from secretbus.bus.client import DBusConnection
from secretbus.core import errors
from secretbus.core.model import EventId, Lifecycle, ListFlags, UsageType
from secretbus.store.paths import InstanceKind

REPO = Path(__file__).resolve().parents[1]
NAME = "org.libvirt.secret"
CONNECT = "/org/libvirt/secret"
P1 = "/org/libvirt/secret/secret/_f52a81b2_424e_490c_823d_6bd4235bc572"
SENTINEL = b"dbus-S3ntinel\x00\x01\xff"


def xml(uuid=U1, *, desc="d", **kw):
    return secret_xml(uuid, desc=desc, **kw)


@pytest.fixture
def daemon(session_bus, make_secretbusd):
    return make_secretbusd(session_bus)


@pytest.fixture
def conn(session_bus, daemon):
    c = DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10, bus_address=session_bus.address)
    yield c
    c.close()


def busctl(bus, *args, **kw):
    return harness.busctl(bus.address, *args, **kw)


def bcall(bus, path, iface, member, sig="", *args, **kw):
    return busctl(bus, "call", NAME, path, iface, member, *([sig, *map(str, args)] if sig else []), **kw)


# -- the project's client ------------------------------------------------------------
def test_client_full_api(conn, daemon):
    s = conn.define_xml(xml())
    assert (s.uuid, s.usage_type, s.usage_id) == (U1, UsageType.CEPH, "client.admin")
    s.set_value(SENTINEL)
    assert s.get_value() == SENTINEL
    s.set_value(b"")
    assert s.get_value() == b""                       # empty is a real value over D-Bus too
    assert conn.lookup_by_uuid(U1.upper()) == s
    assert conn.lookup_by_usage(UsageType.CEPH, "client.admin").uuid == U1
    assert s.xml_desc() == (f"<secret ephemeral='no' private='no'>\n  <uuid>{U1}</uuid>\n"
                            "  <description>d</description>\n  <usage type='ceph'>\n"
                            "    <name>client.admin</name>\n  </usage>\n</secret>\n")
    conn.define_xml(xml(U2, eph="yes", priv="yes", usage="vtpm", uid="tpm0"))
    assert [x.uuid for x in conn.list_secrets()] == sorted([U1, U2])
    assert [x.uuid for x in conn.list_secrets(ListFlags.EPHEMERAL)] == [U2]
    assert [x.uuid for x in conn.list_secrets(ListFlags.NO_PRIVATE)] == [U1]
    s.undefine()
    assert [x.uuid for x in conn.list_secrets()] == [U2]
    assert SENTINEL.hex() not in daemon.log() and base64.b64encode(SENTINEL).decode() not in daemon.log()


def test_client_errors_map_to_project_exceptions(conn):
    with pytest.raises(errors.NoSecret, match=f"no secret with matching uuid '{U1}'"):
        conn.lookup_by_uuid(U1)
    with pytest.raises(errors.InvalidArg):
        conn.lookup_by_uuid("zzz")
    with pytest.raises(errors.ConfigUnsupported, match="unknown secret usage type passphrase"):
        conn.define_xml("<secret><usage type='passphrase'><name>x</name></usage></secret>")
    s = conn.define_xml(xml(priv="yes"))
    s.set_value(SENTINEL)
    with pytest.raises(errors.InvalidSecret, match="^secret is private$") as ei:
        s.get_value()
    assert SENTINEL.hex() not in str(ei.value)
    with pytest.raises(errors.InvalidArg, match="internal_call"):
        s.get_value(internal_call=True)
    with pytest.raises(errors.RPCError, match="^value length greater than maximum: 65537 > 65536$"):
        s.set_value(b"x" * 65537)
    with pytest.raises(errors.InternalError, match="already defined for use with client.admin"):
        conn.define_xml(xml(U2))
    with pytest.raises(errors.InvalidArg, match=r"^unsupported flags \(0x2\) in function secretGetXMLDesc$"):
        s.xml_desc(2)
    with pytest.raises(errors.InvalidArg, match=r"^unsupported flags \(0x1\) in function secretSetValue$"):
        s.set_value(b"x", 1)
    with pytest.raises(errors.XMLDetail, match=r"^\(definition_of_secret\):1: Opening and ending tag mismatch: "
                                              r"secret line 1 and sec$"):
        conn.define_xml("<secret></sec>")


def test_client_events(conn, session_bus):
    got, lock = [], threading.Lock()
    done = threading.Event()

    def handler(sec, ev):
        with lock:
            got.append((sec.uuid, ev.event_id, ev.lifecycle))
            if len(got) == 4:
                done.set()
    conn.subscribe(handler)
    values = []
    conn.subscribe(lambda sec, ev: values.append(sec.uuid), EventId.VALUE_CHANGED)
    s = conn.define_xml(xml())
    conn.define_xml(xml(desc="changed"))
    s.set_value(b"v")
    s.undefine()
    assert done.wait(10), got
    assert got == [(U1, EventId.LIFECYCLE, Lifecycle.DEFINED), (U1, EventId.LIFECYCLE, Lifecycle.DEFINED),
                   (U1, EventId.VALUE_CHANGED, None), (U1, EventId.LIFECYCLE, Lifecycle.UNDEFINED)]
    assert values == [U1]


def test_two_clients_concurrently(conn, session_bus):
    other = DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10,
                                bus_address=session_bus.address)
    try:
        seen = threading.Event()
        other.subscribe(lambda sec, ev: seen.set(), EventId.VALUE_CHANGED)
        s = conn.define_xml(xml())
        failures = []

        def writer(c, tag):
            try:
                for i in range(50):
                    c.lookup_by_uuid(U1).set_value(f"{tag}-{i}".encode())
                    c.lookup_by_uuid(U1).get_value()
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))
        threads = [threading.Thread(target=writer, args=(c, t)) for c, t in ((conn, "a"), (other, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert failures == []
        assert s.get_value() in (b"a-49", b"b-49")
        assert seen.wait(5)
    finally:
        other.close()


def test_open_by_uri_honours_bus_address_env(session_bus, daemon, monkeypatch):
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", session_bus.address)
    for uri in ("secret:///session", "secret+unix:///session"):
        with secretbus.open(uri) as c:
            assert c.list_secrets() == []


# -- real clients nobody here wrote ----------------------------------------------------
def test_busctl_and_gdbus_every_method(session_bus, daemon):
    b = session_bus
    r = bcall(b, CONNECT, "org.libvirt.Connect", "SecretDefineXML", "su", xml(), 0)
    assert r.returncode == 0 and r.stdout.strip() == f'o "{P1}"'
    r = bcall(b, P1, "org.libvirt.Secret", "SetValue", "ayu", 3, 1, 0, 255, 0)
    assert r.returncode == 0, r.stderr
    assert bcall(b, P1, "org.libvirt.Secret", "GetValue", "u", 0).stdout.strip() == "ay 3 1 0 255"
    assert bcall(b, CONNECT, "org.libvirt.Connect", "ListSecrets", "u", 0).stdout.strip() == f'ao 1 "{P1}"'
    assert bcall(b, CONNECT, "org.libvirt.Connect", "SecretLookupByUUID", "s", U1).stdout.strip() == f'o "{P1}"'
    assert bcall(b, CONNECT, "org.libvirt.Connect", "SecretLookupByUsage", "is", 2,
                 "client.admin").stdout.strip() == f'o "{P1}"'
    r = harness.gdbus(b.address, "call", "--dest", NAME, "--object-path", P1,
                      "--method", "org.libvirt.Secret.GetXMLDesc", "0")
    assert r.returncode == 0 and "<name>client.admin</name>" in r.stdout
    for prop, expect in (("UUID", f's "{U1}"'), ("UsageID", 's "client.admin"'), ("UsageType", "i 2"),
                         ("Description", 's "d"'), ("Ephemeral", "b false"), ("Private", "b false")):
        r = busctl(b, "get-property", NAME, P1, "org.libvirt.Secret", prop)
        assert r.stdout.strip() == expect, (prop, r.stdout, r.stderr)
    r = harness.gdbus(b.address, "call", "--dest", NAME, "--object-path", CONNECT,
                      "--method", "org.freedesktop.DBus.ObjectManager.GetManagedObjects")
    assert P1 in r.stdout and "'UsageID': <'client.admin'>" in r.stdout
    r = busctl(b, "set-property", NAME, P1, "org.libvirt.Secret", "Description", "s", "x")
    assert r.returncode != 0 and "read-only" in r.stderr
    assert bcall(b, P1, "org.libvirt.Secret", "Undefine").returncode == 0
    r = bcall(b, P1, "org.libvirt.Secret", "GetValue", "u", 0)
    assert r.returncode != 0


def test_error_names_and_wrong_signatures(session_bus, daemon):
    b = session_bus
    r = harness.gdbus(b.address, "call", "--dest", NAME, "--object-path", CONNECT,
                      "--method", "org.libvirt.Connect.SecretLookupByUUID", U1)
    assert "org.libvirt.Error.NoSecret" in r.stderr and f"no secret with matching uuid '{U1}'" in r.stderr
    r = harness.gdbus(b.address, "call", "--dest", NAME, "--object-path", CONNECT,
                      "--method", "org.libvirt.Connect.SecretDefineXML", "<bogus/>", "0")
    assert "org.libvirt.Error.XMLError" in r.stderr and "expecting root element of 'secret'" in r.stderr
    # gdbus and busctl check types against introspection; dbus-send sends what it is told.
    for args in (["uint32:42"], ["string:x", "string:y"], []):
        r = subprocess.run(["dbus-send", f"--bus={b.address}", "--print-reply", f"--dest={NAME}", CONNECT,
                            "org.libvirt.Connect.SecretLookupByUUID", *args],
                           capture_output=True, text=True, timeout=30)
        assert "Error org.freedesktop.DBus.Error.InvalidArgs" in r.stderr, (args, r.stderr)
    r = harness.gdbus(b.address, "call", "--dest", NAME, "--object-path", CONNECT,
                      "--method", "org.libvirt.Connect.NoSuchMethod")
    assert "org.freedesktop.DBus.Error.UnknownMethod" in r.stderr


def test_raw_error_reply_carries_libvirts_prefixed_text(session_bus, daemon):
    """What any D-Bus client sees, without the project's client stripping the prefix."""
    async def main():
        bus = await MessageBus(bus_address=session_bus.address).connect()
        try:
            return await bus.call(Message(destination=NAME, path=CONNECT, interface="org.libvirt.Connect",
                                          member="SecretLookupByUUID", signature="s", body=[U2]))
        finally:
            bus.disconnect()
    reply = asyncio.run(main())
    assert reply.message_type is MessageType.ERROR
    assert reply.error_name == "org.libvirt.Error.NoSecret"
    assert reply.body == [f"Secret not found: no secret with matching uuid '{U2}'"]
    r = busctl(session_bus, "call", NAME, P1, "org.libvirt.Secret", "GetValue", "u", "0")
    assert r.returncode != 0 and f"Secret not found: no secret with matching uuid '{U1}'" in r.stderr


def test_connect_properties_over_the_bus(session_bus, daemon):
    expect = {"Encrypted": "b false", "Secure": "b true", "LibVersion": "t 12001000", "Version": "t 1000",
              "Hostname": f's "{socket.gethostname()}"', "FleetState": 's "local"', "FleetStateReason": 's ""'}
    for prop, want in expect.items():
        r = busctl(session_bus, "get-property", NAME, CONNECT, "org.libvirt.Connect", prop)
        assert r.returncode == 0 and r.stdout.strip() == want, (prop, r.stdout, r.stderr)
    r = busctl(session_bus, "set-property", NAME, CONNECT, "org.libvirt.Connect", "Secure", "b", "false")
    assert r.returncode != 0 and "read-only" in r.stderr


def test_signals_seen_by_gdbus_monitor(session_bus, daemon):
    mon = subprocess.Popen(["gdbus", "monitor", "--address", session_bus.address, "--dest", NAME],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)
        bcall(session_bus, CONNECT, "org.libvirt.Connect", "SecretDefineXML", "su", xml(), 0)
        bcall(session_bus, P1, "org.libvirt.Secret", "SetValue", "ayu", 1, 7, 0)
        bcall(session_bus, P1, "org.libvirt.Secret", "Undefine")
        time.sleep(0.5)
    finally:
        mon.terminate()
        out = mon.communicate(timeout=10)[0]
    assert f"org.libvirt.Connect.SecretEvent (objectpath '{P1}', 0, 0)" in out
    assert f"org.libvirt.Connect.SecretValueChanged (objectpath '{P1}',)" in out
    assert f"org.libvirt.Connect.SecretEvent (objectpath '{P1}', 1, 0)" in out
    assert "org.freedesktop.DBus.ObjectManager.InterfacesAdded" in out
    assert "org.freedesktop.DBus.ObjectManager.InterfacesRemoved" in out


def _interface(xml_text: str, name: str) -> bytes:
    root = etree.fromstring(xml_text.encode(), etree.XMLParser(load_dtd=False, no_network=True,
                                                                resolve_entities=False))
    found = root.xpath("interface[@name=$n]", n=name)
    assert isinstance(found, list) and len(found) == 1 and isinstance(found[0], etree._Element)
    return etree.tostring(found[0], method="c14n")


def test_runtime_introspection_equals_files(session_bus, daemon, conn):
    conn.define_xml(xml())
    for path, iface, file in ((CONNECT, "org.libvirt.Connect", "org.libvirt.Connect.xml"),
                              (P1, "org.libvirt.Secret", "org.libvirt.Secret.xml")):
        r = harness.gdbus(session_bus.address, "introspect", "--dest", NAME, "--object-path", path, "--xml")
        assert r.returncode == 0, r.stderr
        shipped = (REPO / "dbus" / "interfaces" / file).read_text()
        assert _interface(r.stdout, iface) == _interface(shipped, iface)
        # One copy: dbus/interfaces is the packaged directory.
        assert (REPO / "dbus" / "interfaces" / file).resolve() == \
            (REPO / "secretbus" / "bus" / "interfaces" / file).resolve()
    r = busctl(session_bus, "tree", NAME)
    assert P1 in r.stdout


# -- the CLI over the bus ----------------------------------------------------------------
def _cli(bus, *args, input=None):
    env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": bus.address, "PYTHONPATH": str(REPO)}
    env.pop("SECRETBUS_DEFAULT_URI", None)
    return subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", "secret:///session", *args],
                          input=input, capture_output=True, timeout=60, env=env)


def test_cli_over_session_bus_and_secret_event(session_bus, daemon, tmp_path):
    f = tmp_path / "s.xml"
    f.write_text(xml())
    # Ended by SIGINT once both events are in (virsh's way out of a loop; its --timeout is the
    # differential test's, test_cli_virsh_diff.py).
    ev = EventWatch([sys.executable, "-m", "secretbus.cli", "-c", "secret:///session", "secret-event",
                     "--event", "lifecycle", "--loop", "--timeout", "30"],
                    env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": session_bus.address, "PYTHONPATH": str(REPO)})
    time.sleep(1.5)
    assert _cli(session_bus, "secret-define", str(f)).stdout == f"Secret {U1} created\n\n".encode()
    raw = tmp_path / "v"
    raw.write_bytes(SENTINEL)
    assert _cli(session_bus, "secret-set-value", U1, "--file", str(raw), "--plain").returncode == 0
    assert _cli(session_bus, "secret-get-value", U1, "--plain").stdout == SENTINEL + b"\n"   # virsh's blank line
    assert f" {U1}   ceph client.admin\n".encode() in _cli(session_bus, "secret-list").stdout
    assert _cli(session_bus, "secret-undefine", U1).stdout == f"Secret {U1} deleted\n\n".encode()
    out, err = ev.until(f"secret {U1}: Undefined")
    assert out == (f"event 'lifecycle' for secret {U1}: Defined\n"
                   f"event 'lifecycle' for secret {U1}: Undefined\n"
                   "event loop interrupted\nevents received: 2\n\n"), err


def test_cli_event_loop_ends_when_the_bus_goes_away(session_bus, daemon):
    """The bus daemon gone (restarted at the same address): `secret-event` says so and ends, as
    over RPC and as virsh does when its server goes (test_rpc_clients.py); the handlers of a
    library connection are told "end of file". Not after close()."""
    lost: list[str] = []
    conn = DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10, bus_address=session_bus.address)
    conn.on_lost(lost.append)
    assert conn.is_alive()
    quiet = DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10,
                                bus_address=session_bus.address)
    closed: list[str] = []
    quiet.on_lost(closed.append)
    quiet.close()
    ev = subprocess.Popen([sys.executable, "-m", "secretbus.cli", "-c", "secret:///session", "secret-event",
                           "--event", "lifecycle", "--loop"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": session_bus.address, "PYTHONPATH": str(REPO)})
    try:
        time.sleep(1.5)
        session_bus.restart()
        out, err = ev.communicate(timeout=20)
        harness.wait_until(lambda: not conn.is_alive(), timeout=10, what="virConnectIsAlive false")
    finally:
        harness.stop_process(ev)
        conn.close()
    assert (ev.returncode, out) == (1, b"events received: 0\n\n"), (out, err)
    assert err == (b"error: Disconnected from secret:///session due to end of file\n"
                   b"error: internal error: client socket is closed\n"), err
    harness.wait_until(lambda: lost, timeout=10, what="the library's close callback")
    assert lost == ["end of file"] and closed == [] and not quiet.is_alive()


def test_cli_reports_service_not_running(session_bus):
    r = _cli(session_bus, "secret-list")
    assert r.returncode == 1 and b"error:" in r.stderr


# -- daemon behaviour ----------------------------------------------------------------------
def test_notify_reload_and_sigterm(session_bus, make_secretbusd, notify_socket):
    d = make_secretbusd(session_bus, env=notify_socket.env())
    notify_socket.wait_for(b"READY=1")
    conn = DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10,
                               bus_address=session_bus.address)
    try:
        conn.define_xml(xml()).set_value(b"v")
        # A secret written behind the daemon's back appears on reload (SIGHUP).
        cfg = d.root / "etc" / "secrets"
        (cfg / f"{U2}.xml").write_text(
            f"<secret ephemeral='no' private='no'>\n  <uuid>{U2}</uuid>\n</secret>\n")
        d.signal(signal.SIGHUP)
        notify_socket.wait_for(b"RELOADING=1")
        notify_socket.wait_for(b"READY=1")
        assert conn.lookup_by_uuid(U2).uuid == U2
        # A broken secret.conf: the reload fails and the old state stays.
        (d.root / "etc" / "secret.conf").write_text("encrypt_data = 'x'\n")
        d.signal(signal.SIGHUP)
        notify_socket.wait_for(b"RELOADING=1")
        notify_socket.wait_for(b"READY=1")
        assert conn.lookup_by_uuid(U1).get_value() == b"v"
        assert "reload failed, keeping the previous state" in d.log()
    finally:
        conn.close()
    d.signal(signal.SIGTERM)
    notify_socket.wait_for(b"STOPPING=1")
    assert d.wait(20) == 0


def test_second_daemon_on_same_store_or_name_fails(session_bus, make_secretbusd, daemon):
    other = harness.Secretbusd(session_bus)       # another store, same bus name
    other.start(wait=False)
    try:
        assert other.wait(20) == 1
        assert "cannot own org.libvirt.secret" in other.log()
    finally:
        other.cleanup()
    same = harness.Secretbusd(session_bus, root=daemon.root)
    same.start(wait=False)
    assert same.wait(20) != 0
    assert "already holds the lock" in same.log()


# -- system-type bus: the bus policy ----------------------------------------------------------
@pytest.mark.bus_policy(str(REPO / "dbus" / "org.libvirt.secret.conf"))
@pytest.mark.polkit(actions=[str(REPO / "polkit" / "org.libvirt.api.secret.policy")])
def test_system_bus_policy(system_bus, polkitd, make_secretbusd, test_users):
    make_secretbusd(system_bus, system=True)
    ok = bcall(system_bus, CONNECT, "org.libvirt.Connect", "ListSecrets", "u", 0)
    assert ok.returncode == 0, ok.stderr
    member = bcall(system_bus, CONNECT, "org.libvirt.Connect", "ListSecrets", "u", 0, user=test_users.member)
    assert member.returncode == 0, member.stderr
    other = bcall(system_bus, CONNECT, "org.libvirt.Connect", "ListSecrets", "u", 0, user=test_users.other)
    assert other.returncode != 0 and ("Access denied" in other.stderr or "AccessDenied" in other.stderr)
    # Nobody but root may own the name.
    for user in (test_users.member, test_users.other):
        r = harness.gdbus(system_bus.address, "call", "--dest", "org.freedesktop.DBus",
                          "--object-path", "/org/freedesktop/DBus",
                          "--method", "org.freedesktop.DBus.RequestName", NAME, "4", user=user)
        assert "AccessDenied" in r.stderr, (user, r.stdout, r.stderr)




@pytest.mark.bus_policy(str(REPO / "dbus" / "org.libvirt.secret.conf"))
@pytest.mark.polkit(actions=[str(REPO / "polkit" / "org.libvirt.api.secret.policy")])
def test_signals_reach_only_root_and_group(system_bus, polkitd, make_secretbusd, test_users, unpriv_python):
    """Events name secrets and their usage: a user outside group libvirt must not see them."""
    make_secretbusd(system_bus, system=True)
    listeners = {}
    for who in (test_users.member, test_users.other):
        listeners[who.name] = subprocess.Popen(
            harness.as_user(who, unpriv_python.argv("-c", programs.source("count_secret_signals"),
                                                    system_bus.address, "3")),
            env=unpriv_python.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    for p in listeners.values():
        assert p.stdout is not None and p.stdout.readline().strip() == "listening"
    assert bcall(system_bus, CONNECT, "org.libvirt.Connect", "SecretDefineXML", "su", xml(), 0).returncode == 0
    counts = {name: int(p.communicate(timeout=30)[0].strip()) for name, p in listeners.items()}
    assert counts[test_users.member.name] >= 2          # InterfacesAdded + SecretEvent
    assert counts[test_users.other.name] == 0


def test_sigterm_finishes_in_flight_calls(session_bus, make_secretbusd):
    d = make_secretbusd(session_bus)
    conns = [DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10,
                                 bus_address=session_bus.address) for _ in range(4)]
    uuids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(4)]
    for c, u in zip(conns, uuids, strict=True):
        c.define_xml(xml(u, uid=u))
    acked: dict[str, tuple[bytes | None, bytes]] = {}   # (last acknowledged, the one in flight)
    unexpected: list[str] = []

    def writer(c, u):
        n = 0
        last: bytes | None = None
        while True:
            n += 1
            value = f"{u}-{n}".encode()
            try:
                c.lookup_by_uuid(u).set_value(value)
            except errors.SecretError as e:
                acked[u] = (last, value)              # value may or may not have landed
                if not ("shutting down" in e.message or "not running" in e.message
                        or "lost" in e.message or "closed" in e.message or "NoReply" in e.message
                        or "no reply" in e.message or "disconnected" in e.message.lower()):
                    unexpected.append(e.message)
                return
            last = value
    threads = [threading.Thread(target=writer, args=cu) for cu in zip(conns, uuids, strict=True)]
    for t in threads:
        t.start()
    time.sleep(0.7)
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0
    for t in threads:
        t.join(30)
    for c in conns:
        c.close()
    assert unexpected == []
    again = harness.Secretbusd(session_bus, root=d.root).start()
    try:
        with DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10,
                                 bus_address=session_bus.address) as after:
            for u in uuids:
                last, maybe = acked[u]
                assert last is not None
                assert after.lookup_by_uuid(u).get_value() in (last, maybe)
    finally:
        again.cleanup()

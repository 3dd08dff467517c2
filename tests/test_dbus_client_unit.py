"""Unit tests of the D-Bus client that need no bus: error mapping, reply checking, wire
encoding, address lookup, connection failures, the loop thread, and the signal decoding /
filter / event dispatch fed with synthetic messages. The client against a real dbus-daemon
and secretbusd is tested in test_dbus.py."""
from __future__ import annotations

import asyncio
import codecs
import logging
import queue
import socket
import threading
import time

import pytest
from dbus_fast import Message, MessageType, Variant
from fixtures import U1

from secretbus.bus import events, signals, wire
from secretbus.bus.calls import check_reply
from secretbus.bus.client import DBusConnection, default_address, error_from_reply
from secretbus.bus.names import BUS_NAME
from secretbus.core import clientargs, errors
from secretbus.core.loopthread import LoopThread
from secretbus.core.model import EventId, Lifecycle, ListFlags, SecretEvent, UsageType
from secretbus.store.paths import InstanceKind

P1 = "/org/libvirt/secret/secret/_f52a81b2_424e_490c_823d_6bd4235bc572"
OWNER = ":1.42"


# -- error mapping ------------------------------------------------------------------------
@pytest.mark.parametrize("name,text,uuid,cls,message", [
    ("org.libvirt.Error.NoSecret", "no secret with matching uuid 'x'", None, errors.NoSecret,
     "no secret with matching uuid 'x'"),
    ("org.libvirt.Error.InvalidSecret", "secret is private", None, errors.InvalidSecret, "secret is private"),
    ("org.libvirt.Error.AccessDenied", "'org.libvirt.api.secret.read-secure' denied access", None,
     errors.AccessDenied, "'org.libvirt.api.secret.read-secure' denied access"),
    ("org.libvirt.Error.SomethingNew", "text", None, errors.OperationFailed, "text"),
    ("org.freedesktop.DBus.Error.AccessDenied", "Rejected send message", None, errors.AccessDenied,
     "Rejected send message"),
    ("org.freedesktop.DBus.Error.ServiceUnknown", "The name org.libvirt.secret was not provided", None,
     errors.OperationFailed, "secretbus service is not running on the session bus "
     "(org.freedesktop.DBus.Error.ServiceUnknown: The name org.libvirt.secret was not provided)"),
    ("org.freedesktop.DBus.Error.Spawn.ChildExited", "exited 1", None, errors.OperationFailed,
     "secretbus service is not running on the session bus (org.freedesktop.DBus.Error.Spawn.ChildExited: exited 1)"),
    ("org.freedesktop.DBus.Error.UnknownObject", "no secret object at /x", U1, errors.NoSecret,
     f"no secret with matching uuid '{U1}'"),
    ("org.freedesktop.DBus.Error.UnknownObject", "no object at /x", None, errors.OperationFailed,
     "org.freedesktop.DBus.Error.UnknownObject: no object at /x"),
    ("org.freedesktop.DBus.Error.NoReply", "recipient disconnected", None, errors.OperationFailed,
     "no reply from org.libvirt.secret: recipient disconnected"),
    ("org.freedesktop.DBus.Error.InvalidArgs", "bad", None, errors.OperationFailed,
     "org.freedesktop.DBus.Error.InvalidArgs: bad"),
])
def test_error_from_reply(name, text, uuid, cls, message):
    e = error_from_reply(name, text, uuid=uuid)
    assert type(e) is cls and e.message == message


def test_error_names_the_bus():
    e = error_from_reply("org.freedesktop.DBus.Error.NameHasNoOwner", "t", bus="system bus")
    assert "not running on the system bus" in e.message


# -- argument helpers -----------------------------------------------------------------------
def test_u32():
    assert wire.u32(0) == 0 and wire.u32(0xFFFFFFFF) == 0xFFFFFFFF
    assert wire.u32(-1) == 0xFFFFFFFF          # as C's unsigned int: same server message as embedded
    for bad in (2 ** 32, -(2 ** 31) - 1):
        with pytest.raises(errors.InvalidArg):
            wire.u32(bad)
    with pytest.raises(errors.InvalidArg):
        wire.u32("1")


def test_wire_safe():
    assert clientargs.wire_safe("ok é ☃")
    assert not clientargs.wire_safe("a\0b")
    assert not clientargs.wire_safe("\udc80")


def test_fits_int32():
    assert wire.fits_int32(0) and wire.fits_int32(-(2 ** 31)) and wire.fits_int32(2 ** 31 - 1)
    assert not wire.fits_int32(2 ** 31) and not wire.fits_int32("1") and not wire.fits_int32(None)


def test_value_bytes():
    assert wire.value_bytes(bytearray(b"a\0b")) == b"a\0b" and wire.value_bytes(memoryview(b"x")) == b"x"
    assert len(wire.value_bytes(b"x" * 65537)) == 65537      # the size rule is the service's
    with pytest.raises(errors.InvalidArg, match="^value in virSecretSetValue must be bytes$"):
        wire.value_bytes("text")
    with pytest.raises(errors.InvalidArg, match="^a secret value of 33554432 bytes does not fit in a D-Bus message$"):
        wire.value_bytes(bytes(wire.MESSAGE_MAX))


def test_check_reply():
    call = Message(destination="org.libvirt.secret", path="/org/libvirt/secret", interface="org.libvirt.Connect",
                   member="ListSecrets", signature="u", body=[0], serial=7)
    ok = Message.new_method_return(call, "ao", [[P1]])
    assert check_reply(ok, "org.libvirt.Connect.ListSecrets", "ao", bus="session bus") == [[P1]]
    with pytest.raises(errors.OperationFailed, match="^unexpected reply to org.libvirt.Connect.ListSecrets: "
                       "signature 'ao', expected 's'$"):
        check_reply(ok, "org.libvirt.Connect.ListSecrets", "s", bus="session bus")
    err = Message.new_error(call, "org.libvirt.Error.NoSecret", "Secret not found: no secret with matching uuid 'x'")
    with pytest.raises(errors.NoSecret, match="^no secret with matching uuid 'x'$"):
        check_reply(err, "m", "ao", bus="session bus")
    gone = Message.new_error(call, "org.freedesktop.DBus.Error.UnknownObject", "no object")
    with pytest.raises(errors.NoSecret, match=f"^no secret with matching uuid '{U1}'$"):
        check_reply(gone, "m", "", bus="session bus", uuid=U1)
    with pytest.raises(errors.OperationFailed, match="^the connection is closed$"):
        check_reply(None, "m", "", bus="session bus")


def test_default_address(monkeypatch, tmp_path):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/x/system")
    assert default_address(InstanceKind.SYSTEM) == "unix:path=/x/system"
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS")
    assert default_address(InstanceKind.SYSTEM) == "unix:path=/var/run/dbus/system_bus_socket"
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/x/session")
    assert default_address(InstanceKind.SESSION) == "unix:path=/x/session"
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(errors.OperationFailed, match="DBUS_SESSION_BUS_ADDRESS is not set"):
        default_address(InstanceKind.SESSION)
    with socket.socket(socket.AF_UNIX) as s:     # sd-bus's fallback: $XDG_RUNTIME_DIR/bus
        s.bind(str(tmp_path / "bus"))
        assert default_address(InstanceKind.SESSION) == f"unix:path={tmp_path}/bus"


# -- opening ----------------------------------------------------------------------------------
def _client_threads():
    return [t for t in threading.enumerate() if t.name.startswith("secretbus-")]


def test_open_fails_cleanly_without_a_bus(tmp_path):
    before = len(_client_threads())
    addr = f"unix:path={tmp_path}/nothing"
    with pytest.raises(errors.OperationFailed,
                       match=f"^cannot connect to the system bus at {addr}: No such file or directory$"):
        DBusConnection.open(InstanceKind.SYSTEM, "secret:///system", bus_address=addr)
    with pytest.raises(errors.OperationFailed, match="session bus at bogus:x=y: .*unknown address transport"):
        DBusConnection.open(InstanceKind.SESSION, "secret:///session", bus_address="bogus:x=y")
    assert len(_client_threads()) == before


def test_open_times_out_on_a_silent_peer(tmp_path):
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(tmp_path / "mute"))
        srv.listen(1)                       # accepts the connection, never speaks
        t0 = time.monotonic()
        with pytest.raises(errors.OperationFailed, match="no answer within 0.3 s"):
            DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=0.3,
                                bus_address=f"unix:path={tmp_path}/mute")
        assert time.monotonic() - t0 < 3


def test_open_rejects_embed_and_bad_timeout():
    with pytest.raises(errors.InvalidArg):
        DBusConnection.open(InstanceKind.EMBED, "secret:///embed?root=/x")
    with pytest.raises(errors.InvalidArg):
        DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=0)


# -- a connection object that never connects --------------------------------------------------
@pytest.fixture
def offline():
    c = DBusConnection(InstanceKind.SESSION, "secret:///session", "unix:path=/nonexistent",
                       timeout=1, interactive=False)
    yield c
    c.close()


def test_local_checks_need_no_round_trip(offline):
    with pytest.raises(errors.InvalidArg, match="^uuidstr in virSecretLookupByUUIDString must be a valid UUID$"):
        offline.secret_get_value("not-a-uuid")
    with pytest.raises(errors.InvalidArg, match="^internal_call is only available on embedded connections$"):
        offline.secret_get_value(U1, internal_call=True)
    with pytest.raises(errors.InvalidArg, match="must be bytes"):
        offline.secret_set_value(U1, "text")
    with pytest.raises(errors.InvalidArg, match="does not fit in a D-Bus message"):
        offline.secret_set_value(U1, bytes(wire.MESSAGE_MAX))
    with pytest.raises(errors.InvalidArg, match="flags 4294967296 do not fit in 32 bits"):
        offline.secret_set_value(U1, b"v", 2 ** 32)
    with pytest.raises(errors.InvalidArg, match="must not be NULL"):
        offline.lookup_by_usage(2, None)
    with pytest.raises(errors.NoSecret, match="no secret with matching usage 'a\x00b'"):
        offline.lookup_by_usage(2, "a\0b")
    with pytest.raises(errors.XMLDetail, match=r"^\(definition_of_secret\):1: .*Char 0x0 out of allowed range$"):
        offline.define_xml("<secret>\0</secret>")
    with pytest.raises(errors.InvalidArg, match="eventID"):
        offline.subscribe(lambda s, e: None, 7)
    with pytest.raises(errors.InvalidArg, match="callback 5 is not registered"):
        offline.unsubscribe(5)


def test_define_bytes_is_decoded_as_declared():
    doc = "<?xml version='1.0' encoding='ISO-8859-1'?><secret><description>é</description></secret>"
    assert wire.xml_text(doc.encode("latin-1")) == doc
    assert wire.xml_text(doc.replace("ISO-8859-1", "UTF-8").encode()) == doc.replace("ISO-8859-1", "UTF-8")
    plain = "<secret><description>é ☃</description></secret>"
    assert wire.xml_text(plain.encode()) == plain                         # no declaration: UTF-8
    assert wire.xml_text(codecs.BOM_UTF8 + plain.encode()) == plain
    assert wire.xml_text(plain.encode("utf-16")) == plain                 # with its BOM
    utf16 = "<?xml version='1.0' encoding='UTF-16'?>" + plain
    assert wire.xml_text(utf16.encode("utf-16-le")) == utf16              # no BOM: '<?' tells
    assert wire.xml_text(utf16.encode("utf-16-be")) == utf16
    assert wire.xml_text(bytearray(plain.encode())) == plain


_BODY = f"<secret><uuid>{U1}</uuid><description>é ☃ x</description></secret>"
_DECLS = ["", "<?xml version='1.0'?>", "<?xml version=\"1.0\" encoding=\"UTF-8\"?>",
          "<?xml version='1.0' encoding='ISO-8859-1'?>", "<?xml version='1.0' encoding='UTF-16'?>",
          "<?xml version='1.0'  encoding = 'windows-1252' standalone='yes'?>", "<?xml version='1.1'?>"]


@pytest.mark.parametrize("decl", _DECLS)
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "latin-1"])
def test_wire_text_means_what_the_bytes_mean(decl, encoding):
    """The service parses the string the client sends; it must read the same definition the
    embedded driver reads from the bytes (or both refuse the document)."""
    from secretbus.core.secretxml import parse_secret_xml
    data = (decl + _BODY).encode(encoding, "replace")
    try:
        expected = parse_secret_xml(data)
    except errors.SecretError:
        with pytest.raises(errors.SecretError):
            parse_secret_xml(wire.xml_text(data))
        return
    assert parse_secret_xml(wire.xml_text(data)) == expected


def _driver_error(doc):
    from secretbus.core.secretxml import parse_secret_xml
    with pytest.raises(errors.SecretError) as ei:
        parse_secret_xml(doc)
    return type(ei.value), ei.value.message


@pytest.mark.parametrize("doc", [
    b"<?xml version='1.0' encoding='X-NO-SUCH'?><secret/>",
    b"<?xml version='1.0' encoding='UTF-16'?><secret/>",                  # 8-bit text that claims UTF-16
    b"<secret><description>\xff</description></secret>",                  # not UTF-8 at all
    "<secret><description>\udc80</description></secret>",                 # cannot be UTF-8
    "<secret><description>a\0b</description></secret>",                   # no NUL in a D-Bus string
    "<secret>" + " " * wire.MESSAGE_MAX + "</secret>",                    # the codec's own size limit
])
def test_define_documents_that_cannot_travel(doc):
    """What cannot be put on the wire gets the embedded driver's error for the same document."""
    with pytest.raises(errors.XMLError) as ei:
        wire.xml_text(doc)
    assert (type(ei.value), ei.value.message) == _driver_error(doc)


def test_define_rejects_other_types():
    with pytest.raises(errors.InvalidArg, match="^secret XML must be str or bytes$"):
        wire.xml_text(None)


def test_repr_has_no_secrets(offline):
    assert repr(offline) == "<DBusConnection secret:///session session bus unix:path=/nonexistent open>"



# -- the loop thread ----------------------------------------------------------------------------
def _dbus_loop(timeout):
    """The loop thread as the D-Bus client makes it."""
    return LoopThread(timeout, "secretbus-dbus", kind="D-Bus", peer=BUS_NAME)


def test_loop_thread_bounds_every_wait():
    lt = _dbus_loop(0.2)
    lt.start()
    try:
        async def add(a, b):
            return a + b
        assert lt.submit(add(1, 2)) == 3
        t0 = time.monotonic()
        with pytest.raises(errors.OperationFailed, match="^no reply from org.libvirt.secret within 0.2 s$"):
            lt.submit(asyncio.sleep(30), 0.3)
        assert time.monotonic() - t0 < 2

        async def nested():
            inner = asyncio.sleep(0)
            try:
                lt.submit(inner)
            except errors.OperationFailed as e:
                return e.message
        assert lt.submit(nested()) == "a secretbus D-Bus connection cannot be called from its own event loop"
        lt.closed = True
        with pytest.raises(errors.OperationFailed, match="^the connection is closed$"):
            lt.submit(add(1, 1))
    finally:
        lt.stop()
    assert lt.loop.is_closed() and not lt.alive()
    lt.stop()                                   # idempotent


def test_loop_thread_never_started_stops_cleanly():
    lt = _dbus_loop(1)
    lt.stop()
    assert lt.loop.is_closed()


# -- signal decoding (pure): bus/signals.py -----------------------------------------------------------------------
def _sig(path, iface, member, sig, body, sender=OWNER):
    return Message(message_type=MessageType.SIGNAL, path=path, interface=iface, member=member,
                   signature=sig, body=body, sender=sender)


def _props(utype=2, uid="client.admin"):
    return {"UUID": Variant("s", U1), "UsageType": Variant("i", utype), "UsageID": Variant("s", uid),
            "Description": Variant("s", "d")}


CONNECT = ("/org/libvirt/secret", "org.libvirt.Connect")


def test_match_rules():
    rules = signals.match_rules()
    assert len(rules) == 5 and len(set(rules)) == 5
    assert rules[0] == ("type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',"
                        "interface='org.freedesktop.DBus',member='NameOwnerChanged',arg0='org.libvirt.secret'")
    for r in rules[1:]:            # only the service's well-known name may send the rest
        assert r.startswith("type='signal',sender='org.libvirt.secret',")
    assert any("member='SecretEvent'" in r and "path='/org/libvirt/secret'" in r for r in rules)
    assert any("member='SecretValueChanged'" in r for r in rules)
    assert any("member='InterfacesAdded'" in r for r in rules)
    assert any("member='PropertiesChanged'" in r and "path_namespace='/org/libvirt/secret/secret'" in r
               and "arg0='org.libvirt.Secret'" in r for r in rules)


def test_decode_signal():
    d = signals.decode_signal
    assert d(_sig(*CONNECT, "SecretEvent", "oii", [P1, 1, 0])) == signals.LifecycleSignal(U1, P1,
                                                                                           Lifecycle.UNDEFINED, 0)
    assert d(_sig(*CONNECT, "SecretValueChanged", "o", [P1])) == signals.ValueChangedSignal(U1, P1)
    assert d(_sig("/org/libvirt/secret", "org.freedesktop.DBus.ObjectManager", "InterfacesAdded", "oa{sa{sv}}",
                  [P1, {"org.libvirt.Secret": _props(9, "x")}])) == signals.UsageSeen(U1, 0, "x")   # unknown type
    assert d(_sig(P1, "org.freedesktop.DBus.Properties", "PropertiesChanged", "sa{sv}as",
                  ["org.libvirt.Secret", {"UsageID": Variant("s", "y")}, []])) == signals.UsageChanged(U1, None, "y")
    junk = [
        _sig(*CONNECT, "SecretEvent", "oii", [P1, 7, 0]),                # no such lifecycle
        _sig(*CONNECT, "SecretEvent", "oii", ["/bad", 0, 0]),            # not a secret path
        _sig(*CONNECT, "SecretEvent", "oi", [P1, 0]),                    # wrong signature
        _sig("/elsewhere", "org.libvirt.Connect", "SecretValueChanged", "o", [P1]),
        _sig(*CONNECT, "Unknown", "o", [P1]),
        _sig("/org/libvirt/secret", "org.freedesktop.DBus.ObjectManager", "InterfacesAdded", "oa{sa{sv}}",
             [P1, {"org.freedesktop.DBus.Properties": {}}]),
        _sig(P1, "org.freedesktop.DBus.Properties", "PropertiesChanged", "sa{sv}as", ["other.Iface", {}, []]),
        _sig("/org/libvirt/secret", "org.freedesktop.DBus.Properties", "PropertiesChanged", "sa{sv}as",
             ["org.libvirt.Secret", {}, []]),
    ]
    assert [d(m) for m in junk] == [None] * len(junk)


def test_decode_owner_change():
    msg = _sig("/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged", "sss",
               ["org.libvirt.secret", ":1.1", ""], sender="org.freedesktop.DBus")
    assert signals.decode_owner_change(msg) == signals.OwnerChanged(None)
    other = _sig("/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged", "sss",
                 ["org.example", "", ":1.2"], sender="org.freedesktop.DBus")
    assert signals.decode_owner_change(other) is None


def test_usage_from_props():
    assert signals.usage_from_props(_props()) == (U1, 2, "client.admin")
    with pytest.raises(errors.OperationFailed, match="incomplete"):
        signals.usage_from_props({"UUID": Variant("s", U1)})
    with pytest.raises(errors.OperationFailed, match="invalid"):
        signals.usage_from_props({**_props(), "UUID": Variant("s", "nope")})
    assert [signals.known_usage(t) for t in (0, 5, 6, -1)] == [0, 5, 0, 0]


def test_usage_cache_keeps_the_most_recent():
    c = events.UsageCache(limit=2)
    c.remember("a", 1, "x")
    c.remember("b", 1, "y")
    c.remember("a", 2, "x2")          # refreshed: now the most recent
    c.remember("c", 1, "z")
    assert "b" not in c and c.get("a") == (2, "x2") and len(c) == 2
    assert c.pop("a") == (2, "x2") and c.pop("a") is None


# -- the signal feed --------------------------------------------------------------------------------
def _drain(q):
    out = []
    while not q.empty():
        out.append(q.get())
    return out


@pytest.fixture
def feed():
    f = events.SignalFeed(None, events.UsageCache(), queue.SimpleQueue())
    f.rules = ["rule"]            # as if subscribed
    f.owner = OWNER
    return f


def test_signals_from_others_are_ignored(feed):
    feed.on_message(_sig(*CONNECT, "SecretValueChanged", "o", [P1], sender=":1.99"))
    feed.on_message(_sig(*CONNECT, "SecretValueChanged", "o", [P1], sender="org.freedesktop.DBus"))
    # a peer posing as the bus daemon cannot take over the name
    feed.on_message(_sig("/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged", "sss",
                         ["org.libvirt.secret", OWNER, ":1.99"], sender=":1.99"))
    assert _drain(feed.events) == [] and feed.owner == OWNER


def test_no_events_before_listening(feed):
    feed.rules = []
    feed.on_message(_sig(*CONNECT, "SecretValueChanged", "o", [P1]))
    assert _drain(feed.events) == []


def test_signal_flow_and_usage_cache(feed):
    f = feed
    f.on_message(_sig("/org/libvirt/secret", "org.freedesktop.DBus.ObjectManager", "InterfacesAdded",
                      "oa{sa{sv}}", [P1, {"org.libvirt.Secret": _props()}]))
    f.on_message(_sig(*CONNECT, "SecretEvent", "oii", [P1, 0, 0]))
    f.on_message(_sig(P1, "org.freedesktop.DBus.Properties", "PropertiesChanged", "sa{sv}as",
                      ["org.libvirt.Secret", {"UsageType": Variant("i", 4)}, []]))
    f.on_message(_sig(*CONNECT, "SecretValueChanged", "o", [P1]))
    f.on_message(_sig(*CONNECT, "SecretEvent", "oii", [P1, 1, 0]))
    f.on_message(_sig(*CONNECT, "SecretEvent", "oii", [P1, 7, 0]))  # junk
    f.on_message(_sig(*CONNECT, "SecretEvent", "oii", ["/bad", 0, 0]))
    assert _drain(f.events) == [
        (EventId.LIFECYCLE, U1, P1, Lifecycle.DEFINED, 0, (2, "client.admin")),
        (EventId.VALUE_CHANGED, U1, P1, None, 0, (4, "client.admin")),
        (EventId.LIFECYCLE, U1, P1, Lifecycle.UNDEFINED, 0, (4, "client.admin")),
    ]
    assert U1 not in f.cache          # forgotten after UNDEFINED
    # a change of a secret this connection has not seen is not cached (it would be incomplete)
    f.on_message(_sig(P1, "org.freedesktop.DBus.Properties", "PropertiesChanged", "sa{sv}as",
                      ["org.libvirt.Secret", {"UsageType": Variant("i", 4)}, []]))
    assert U1 not in f.cache


def test_malformed_signal_is_logged_not_raised(feed, caplog):
    bad = {"org.libvirt.Secret": {"UUID": Variant("s", U1)}}       # no usage properties
    with caplog.at_level(logging.WARNING, logger="secretbus.client"):
        feed.on_message(_sig("/org/libvirt/secret", "org.freedesktop.DBus.ObjectManager", "InterfacesAdded",
                             "oa{sa{sv}}", [P1, bad]))
    assert "ignored a malformed org.freedesktop.DBus.ObjectManager.InterfacesAdded signal" in caplog.text
    assert U1 not in feed.cache


def test_owner_change_is_tracked(feed):
    f = feed
    f.cache.remember(U1, 2, "x")
    f.on_message(_sig("/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged", "sss",
                      ["org.libvirt.secret", OWNER, ":1.50"], sender="org.freedesktop.DBus"))
    assert f.owner == ":1.50" and len(f.cache) == 0
    f.on_message(_sig(*CONNECT, "SecretValueChanged", "o", [P1]))
    assert _drain(f.events) == []                   # the old owner is no longer trusted
    f.on_message(_sig(*CONNECT, "SecretValueChanged", "o", [P1], sender=":1.50"))
    assert len(_drain(f.events)) == 1


def test_farewell_removes_every_rule(feed):
    feed.rules = signals.match_rules()
    bye, *msgs = feed.farewell()
    assert (bye.destination, bye.path, bye.interface, bye.member) == \
        ("org.libvirt.secret", "/org/libvirt/secret", "org.libvirt.Connect", "Unsubscribe")
    assert [m.body[0] for m in msgs] == signals.match_rules() and feed.rules == []
    assert all(m.member == "RemoveMatch" and m.destination == "org.freedesktop.DBus" for m in msgs)
    assert feed.farewell() == []          # nothing subscribed: nothing to say


def test_connection_routes_signals_to_its_feed(offline):
    offline._signals.rules = ["rule"]
    offline._signals.owner = OWNER
    offline._signals.on_message(_sig(*CONNECT, "SecretValueChanged", "o", [P1]))
    assert _drain(offline._signals.events) == [(EventId.VALUE_CHANGED, U1, P1, None, 0, None)]


# -- the dispatcher -----------------------------------------------------------------------------------
def _dispatcher(lookup=lambda path, uuid: None, closed=lambda: False):
    from secretbus.core.api import Secret
    q = queue.SimpleQueue()
    return events.Dispatcher(q, lookup=lookup, handle=lambda u, t, i: Secret(None, u, t, i), closed=closed)


def test_dispatch_filters_and_survives_handler_errors(caplog):
    d = _dispatcher()
    got = []

    def boom(sec, ev):
        raise RuntimeError("handler failure")
    d.subs = {1: (boom, lambda ev: True),
              2: (lambda s, e: got.append(("all", s.uuid, s.usage_type, s.usage_id, e.lifecycle)), lambda ev: True),
              3: (lambda s, e: got.append(("value", e.event_id)), lambda ev: ev.event_id == EventId.VALUE_CHANGED)}
    d.events.put(events.Pending(EventId.LIFECYCLE, U1, P1, Lifecycle.UNDEFINED, 0, (5, "tpm")))
    d.events.put(events.Pending(EventId.LIFECYCLE, U1, P1, Lifecycle.UNDEFINED, 0, None))   # unknown: NONE / ""
    d.events.put(None)
    with caplog.at_level(logging.ERROR, logger="secretbus.client"):
        d.run()
    assert got == [("all", U1, UsageType.VTPM, "tpm", Lifecycle.UNDEFINED),
                   ("all", U1, UsageType.NONE, "", Lifecycle.UNDEFINED)]
    assert caplog.text.count("secret event handler 1 failed") == 2


def test_dispatch_asks_once_for_an_unknown_secret():
    asked = []
    d = _dispatcher(lookup=lambda path, uuid: asked.append((path, uuid)) or (2, "ceph-id"))
    got = []
    d.subs = {1: (lambda s, e: got.append((s.usage_type, s.usage_id, e)), lambda ev: True)}
    d.events.put(events.Pending(EventId.VALUE_CHANGED, U1, P1, None, 0, None))
    d.events.put(None)
    d.run()
    assert asked == [(P1, U1)]
    assert got == [(UsageType.CEPH, "ceph-id", SecretEvent(EventId.VALUE_CHANGED, U1, UsageType.CEPH, "ceph-id"))]


def test_dispatch_skips_events_nobody_wants():
    d = _dispatcher(lookup=lambda path, uuid: pytest.fail("no lookup for an unwanted event"))
    d.subs = {1: (lambda s, e: pytest.fail("not wanted"), lambda ev: ev.event_id == EventId.LIFECYCLE)}
    d.events.put(events.Pending(EventId.VALUE_CHANGED, U1, P1, None, 0, None))
    d.events.put(None)
    d.run()


def test_subscribers_add_and_remove():
    d = _dispatcher()
    hooks = []
    a = d.add(lambda s, e: None, lambda ev: True, first=lambda: hooks.append("first"))
    b = d.add(lambda s, e: None, lambda ev: True, first=lambda: hooks.append("again"))
    assert hooks == ["first"] and a != b
    d.remove(a, last=lambda: hooks.append("last"))
    assert hooks == ["first"]
    d.remove(b, last=lambda: hooks.append("last"))
    assert hooks == ["first", "last"]
    with pytest.raises(errors.InvalidArg, match="^callback 1 is not registered$"):
        d.remove(a, last=lambda: None)
    d.close()
    assert not [t for t in threading.enumerate() if t.name == "secretbus-events" and t.is_alive()]


def test_subscribe_fails_cleanly_when_the_first_hook_fails():
    d = _dispatcher()

    def fail():
        raise errors.OperationFailed("no bus")
    with pytest.raises(errors.OperationFailed, match="no bus"):
        d.add(lambda s, e: None, lambda ev: True, first=fail)
    assert d.subs == {}
    closed = _dispatcher(closed=lambda: True)
    with pytest.raises(errors.OperationFailed, match="^the connection is closed$"):
        closed.add(lambda s, e: None, lambda ev: True, first=lambda: None)


# -- the connection over a fake call layer --------------------------------------------------------
U2 = "0a1b2c3d-0000-4000-8000-000000000002"
P2 = "/org/libvirt/secret/secret/_0a1b2c3d_0000_4000_8000_000000000002"


class FakeCalls:
    """Canned replies by (member, path); an exception instance is raised."""

    def __init__(self, replies):
        self.replies = replies
        self.seen = []

    async def call(self, path, iface, member, sig, body, reply_sig, *, uuid=None, **kw):
        self.seen.append((member, path, body))
        r = self.replies[(member, path)]
        if isinstance(r, Exception):
            raise r
        return r

    async def disconnect(self, farewell):
        pass


@pytest.fixture
def faked():
    made = []

    def make(replies):
        c = DBusConnection(InstanceKind.SESSION, "secret:///session", "unix:path=/nonexistent",
                           timeout=2, interactive=False)
        c._calls = FakeCalls(replies)
        c._loop.start()
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


DOC = f"<secret><uuid>{U1}</uuid><usage type='ceph'><name>from-doc</name></usage></secret>"


def test_define_takes_the_usage_from_the_service(faked):
    c = faked({("SecretDefineXML", "/org/libvirt/secret"): [P1], ("GetAll", P1): [_props(2, "from-service")]})
    s = c.define_xml(DOC, 0)
    assert (s.uuid, s.usage_type, s.usage_id) == (U1, UsageType.CEPH, "from-service")
    assert [m for m, _, _ in c._calls.seen] == ["SecretDefineXML", "GetAll"]
    assert c._calls.seen[0][2] == [DOC, 0]          # the document travels as it is


def test_define_without_getattr_uses_the_accepted_document(faked):
    c = faked({("SecretDefineXML", "/org/libvirt/secret"): [P1],
               ("GetAll", P1): errors.AccessDenied("'org.libvirt.api.secret.getattr' denied access")})
    s = c.define_xml(DOC.encode())
    assert (s.uuid, s.usage_type, s.usage_id) == (U1, UsageType.CEPH, "from-doc")


def test_define_refuses_an_odd_object_path(faked):
    c = faked({("SecretDefineXML", "/org/libvirt/secret"): ["/not/a/secret"]})
    with pytest.raises(errors.OperationFailed, match="unexpected object path /not/a/secret"):
        c.define_xml(DOC)


def test_service_errors_reach_the_caller_unchanged(faked):
    c = faked({("SetValue", P1): errors.InvalidArg("secret value is larger than 65536 bytes")})
    with pytest.raises(errors.InvalidArg, match="^secret value is larger than 65536 bytes$"):
        c.secret_set_value(U1, b"x" * 65537)
    assert c._calls.seen == [("SetValue", P1, [b"x" * 65537, 0])]   # no local size rule


def test_list_fills_in_what_the_object_manager_missed(faked):
    c = faked({("ListSecrets", "/org/libvirt/secret"): [[P1, P2]],
               ("GetManagedObjects", "/org/libvirt/secret"): [{P1: {"org.libvirt.Secret": _props(5, "tpm")}}],
               ("GetAll", P2): errors.NoSecret(f"no secret with matching uuid '{U2}'")})
    assert [(s.uuid, s.usage_type, s.usage_id) for s in c.list_secrets()] == [(U1, UsageType.VTPM, "tpm")]
    c._calls.replies[("GetAll", P2)] = [{**_props(), "UUID": Variant("s", U2)}]
    assert [s.uuid for s in c.list_secrets(ListFlags.NO_PRIVATE)] == [U1, U2]
    assert c._calls.seen[-3][2] == [int(ListFlags.NO_PRIVATE)]


def test_lookup_by_usage_trusts_the_exact_match(faked):
    c = faked({("SecretLookupByUsage", "/org/libvirt/secret"): [P1]})
    s = c.lookup_by_usage(UsageType.CEPH, "client.admin")
    assert (s.uuid, s.usage_type, s.usage_id) == (U1, UsageType.CEPH, "client.admin")
    assert [m for m, _, _ in c._calls.seen] == ["SecretLookupByUsage"]     # no second round trip

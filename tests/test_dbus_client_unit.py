"""Unit tests of the D-Bus client that need no bus: error mapping, argument checks, address
lookup, connection failures, and the signal filter / event dispatch fed with synthetic messages.
The client against a real dbus-daemon and secretbusd is tested in test_dbus.py."""
from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
from dbus_fast import Message, MessageType, Variant

from secretbus.bus.client import DBusConnection, _u32, _wire_safe, default_address, error_from_reply
from secretbus.core import errors
from secretbus.core.model import EventId, Lifecycle, UsageType
from secretbus.store.paths import InstanceKind

U1 = "f52a81b2-424e-490c-823d-6bd4235bc572"
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
    assert _u32(0) == 0 and _u32(0xFFFFFFFF) == 0xFFFFFFFF
    assert _u32(-1) == 0xFFFFFFFF          # as C's unsigned int: same server message as embedded
    for bad in (2 ** 32, -(2 ** 31) - 1):
        with pytest.raises(errors.InvalidArg):
            _u32(bad)
    with pytest.raises(errors.InvalidArg):
        _u32("1")


def test_wire_safe():
    assert _wire_safe("ok é ☃")
    assert not _wire_safe("a\0b")
    assert not _wire_safe("\udc80")


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
    c._loop.close()


def test_local_checks_need_no_round_trip(offline):
    with pytest.raises(errors.InvalidArg, match="^uuidstr in virSecretLookupByUUIDString must be a valid UUID$"):
        offline.secret_get_value("not-a-uuid")
    with pytest.raises(errors.InvalidArg, match="^internal_call is only available on embedded connections$"):
        offline.secret_get_value(U1, internal_call=True)
    with pytest.raises(errors.InvalidArg, match="must be bytes"):
        offline.secret_set_value(U1, "text")
    with pytest.raises(errors.InvalidArg, match="larger than 65536 bytes"):
        offline.secret_set_value(U1, b"x" * 65537)
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


def test_define_bytes_is_decoded_as_declared(offline):
    doc = "<?xml version='1.0' encoding='ISO-8859-1'?><secret><description>é</description></secret>"
    assert offline._xml_for_bus(doc.encode("latin-1")) == doc
    assert offline._xml_for_bus(doc.replace("ISO-8859-1", "UTF-8").encode()) == doc.replace("ISO-8859-1", "UTF-8")


def test_repr_has_no_secrets(offline):
    assert repr(offline) == "<DBusConnection secret:///session session bus unix:path=/nonexistent open>"


# -- signals ------------------------------------------------------------------------------------
def _sig(path, iface, member, sig, body, sender=OWNER):
    return Message(message_type=MessageType.SIGNAL, path=path, interface=iface, member=member,
                   signature=sig, body=body, sender=sender)


def _props(utype=2, uid="client.admin"):
    return {"UUID": Variant("s", U1), "UsageType": Variant("i", utype), "UsageID": Variant("s", uid),
            "Description": Variant("s", "d")}


def _drain(c):
    out = []
    while not c._events.empty():
        out.append(c._events.get())
    return out


@pytest.fixture
def listening(offline):
    offline._rules = ["rule"]            # as if subscribed
    offline._owner = OWNER
    return offline


def test_signals_from_others_are_ignored(listening):
    listening._on_message(_sig("/org/libvirt/secret", "org.libvirt.Connect", "SecretValueChanged", "o", [P1],
                               sender=":1.99"))
    assert _drain(listening) == []


def test_signal_flow_and_usage_cache(listening):
    c = listening
    c._on_message(_sig("/org/libvirt/secret", "org.freedesktop.DBus.ObjectManager", "InterfacesAdded",
                       "oa{sa{sv}}", [P1, {"org.libvirt.Secret": _props()}]))
    c._on_message(_sig("/org/libvirt/secret", "org.libvirt.Connect", "SecretEvent", "oii", [P1, 0, 0]))
    c._on_message(_sig(P1, "org.freedesktop.DBus.Properties", "PropertiesChanged", "sa{sv}as",
                       ["org.libvirt.Secret", {"UsageType": Variant("i", 4)}, []]))
    c._on_message(_sig("/org/libvirt/secret", "org.libvirt.Connect", "SecretValueChanged", "o", [P1]))
    c._on_message(_sig("/org/libvirt/secret", "org.libvirt.Connect", "SecretEvent", "oii", [P1, 1, 0]))
    c._on_message(_sig("/org/libvirt/secret", "org.libvirt.Connect", "SecretEvent", "oii", [P1, 7, 0]))  # junk
    c._on_message(_sig("/org/libvirt/secret", "org.libvirt.Connect", "SecretEvent", "oii", ["/bad", 0, 0]))
    assert _drain(c) == [
        (EventId.LIFECYCLE, U1, P1, Lifecycle.DEFINED, 0, (2, "client.admin")),
        (EventId.VALUE_CHANGED, U1, P1, None, 0, (4, "client.admin")),
        (EventId.LIFECYCLE, U1, P1, Lifecycle.UNDEFINED, 0, (4, "client.admin")),
    ]
    assert U1 not in c._usage_cache          # forgotten after UNDEFINED


def test_owner_change_is_tracked(listening):
    c = listening
    c._usage_cache[U1] = (2, "x")
    c._on_message(_sig("/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged", "sss",
                       ["org.libvirt.secret", OWNER, ":1.50"], sender="org.freedesktop.DBus"))
    assert c._owner == ":1.50" and c._usage_cache == {}
    c._on_message(_sig("/org/libvirt/secret", "org.libvirt.Connect", "SecretValueChanged", "o", [P1]))
    assert _drain(c) == []                   # the old owner is no longer trusted
    c._on_message(_sig("/org/libvirt/secret", "org.libvirt.Connect", "SecretValueChanged", "o", [P1],
                       sender=":1.50"))
    assert len(_drain(c)) == 1


def test_dispatch_filters_and_survives_handler_errors(listening, caplog):
    c = listening
    got = []

    def boom(sec, ev):
        raise RuntimeError("handler failure")
    c._subs = {1: (boom, lambda ev: True),
               2: (lambda s, e: got.append(("all", s.uuid, s.usage_type, s.usage_id, e.lifecycle)), lambda ev: True),
               3: (lambda s, e: got.append(("value", e.event_id)), lambda ev: ev.event_id == EventId.VALUE_CHANGED)}
    c._events.put((EventId.LIFECYCLE, U1, P1, Lifecycle.UNDEFINED, 0, (5, "tpm")))
    c._events.put((EventId.LIFECYCLE, U1, P1, Lifecycle.UNDEFINED, 0, None))   # unknown: NONE / ""
    c._events.put(None)
    with caplog.at_level(logging.ERROR, logger="secretbus.client"):
        c._dispatch_loop()
    assert got == [("all", U1, UsageType.VTPM, "tpm", Lifecycle.UNDEFINED),
                   ("all", U1, UsageType.NONE, "", Lifecycle.UNDEFINED)]
    assert caplog.text.count("secret event handler 1 failed") == 2

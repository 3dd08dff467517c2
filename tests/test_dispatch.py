"""The D-Bus service without a bus: messages straight into the dispatcher, replies and
signals caught by a stand-in connection. Needs no root, no dbus-daemon, no polkitd."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.introspection import Interface, Method
from fixtures import U1, U2
from fixtures import secret_xml as xml
from lxml import etree

from secretbus.access.permissions import AllowAll, Caller, Perm
from secretbus.bus import introspection
from secretbus.bus.dispatch import ObjectType
from secretbus.bus.execute import MethodSpec, specs_of
from secretbus.bus.handlers import LIBVIRT_COMPAT, ConnectHandlers, SecretHandlers, encode_version
from secretbus.bus.names import (
    CONNECT_IFACE,
    CONNECT_PATH,
    INTROSPECT_IFACE,
    OM_IFACE,
    PROPS_IFACE,
    SECRET_IFACE,
    SECRETS_PATH,
    error_from_dbus,
    secret_path,
    uuid_from_path,
)
from secretbus.bus.service import SecretService
from secretbus.core import errors
from secretbus.core.model import SecretDef
from secretbus.driver.build import open_instance
from secretbus.store.paths import InstancePaths

REPO = Path(__file__).resolve().parents[1]
P1 = secret_path(U1)
VALUE = b"dispatch-S3ntinel\x00\xff"


class FakeBus:
    """Stands in for a dbus-fast MessageBus: keeps the handler, collects what is sent."""

    connected = True

    def __init__(self):
        self.sent: list[Message] = []
        self.handlers = []

    def add_message_handler(self, h):
        self.handlers.append(h)

    def send(self, msg):
        self.sent.append(msg)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class Recorder:
    """Access control that records each check and denies what it is told to deny."""

    enabled = True

    def __init__(self, deny=(), uid=1000):
        self.deny, self.uid, self.checks = set(deny), uid, []

    async def allowed(self, caller: Caller, perm: Perm, d: SecretDef | None) -> bool:
        self.checks.append((perm, d.uuid if d else None))
        return (perm, d.uuid if d else None) not in self.deny and perm not in self.deny

    async def caller_uid(self, caller: Caller) -> int | None:
        return self.uid


class Harness:
    def __init__(self, tmp_path, access=None, private_readers=frozenset()):
        self.driver = open_instance(InstancePaths.embed(tmp_path))
        self.bus = FakeBus()
        self.access = access or AllowAll()
        self.private_readers = private_readers
        self.serial = 0

    async def __aenter__(self):
        self.service = SecretService(self.driver, self.bus, self.access, private_readers=self.private_readers)
        self.service.attach()
        return self

    async def __aexit__(self, *exc):
        await self.service.drain()
        self.driver.close()

    async def call(self, path, iface, member, sig="", body=(), flags=MessageFlag.NONE) -> Message | None:
        """One call as the bus would deliver it; the reply, however it comes back."""
        self.serial += 1
        msg = Message(destination="org.libvirt.secret", path=path, interface=iface, member=member,
                      signature=sig, body=list(body), serial=self.serial, sender=":1.42", flags=flags)
        before = len(self.bus.sent)
        out = self.bus.handlers[0](msg)
        if isinstance(out, Message) or out is None:
            return out
        for _ in range(200):          # answered from a task (access checks, worker thread)
            replies = [m for m in self.bus.sent[before:] if m.reply_serial == self.serial]
            if replies or flags & MessageFlag.NO_REPLY_EXPECTED:
                return replies[0] if replies else None
            await asyncio.sleep(0.01)
        raise AssertionError(f"no reply to {member}")

    def signals(self, member):
        return [m for m in self.bus.sent if m.message_type is MessageType.SIGNAL and m.member == member]


def ok(reply: Message | None) -> list:
    assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, \
        (reply.error_name, reply.body) if reply is not None else None
    return reply.body


def err(reply: Message | None) -> tuple[str, str]:
    assert reply is not None and reply.message_type is MessageType.ERROR and reply.error_name, reply
    return reply.error_name, reply.body[0]


def run(coro):
    return asyncio.run(coro)


# -- the model and the declarations -------------------------------------------------------
def _iface_c14n(text: str, name: str) -> bytes:
    root = etree.fromstring(text.encode(), etree.XMLParser(load_dtd=False, no_network=True, resolve_entities=False))
    found = root.xpath("interface[@name=$n]", n=name)
    assert isinstance(found, list) and len(found) == 1 and isinstance(found[0], etree._Element)
    return etree.tostring(found[0], method="c14n")


def test_introspection_sends_each_interface_exactly_as_shipped(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            ok(await h.call(CONNECT_PATH, CONNECT_IFACE, "SecretDefineXML", "su", [xml(), 0]))
            for path, name in ((CONNECT_PATH, CONNECT_IFACE), (P1, SECRET_IFACE)):
                (got,) = ok(await h.call(path, "org.freedesktop.DBus.Introspectable", "Introspect"))
                assert _iface_c14n(got, name) == _iface_c14n(introspection.file_text(name), name)
            (tree,) = ok(await h.call(SECRETS_PATH, "org.freedesktop.DBus.Introspectable", "Introspect"))
            assert f'<node name="_{U1.replace("-", "_")}" />' in tree
            (root,) = ok(await h.call("/", None, "Introspect"))
            assert '<node name="org" />' in root
            name, _ = err(await h.call(secret_path(U2), "org.freedesktop.DBus.Introspectable", "Introspect"))
            assert name == "org.freedesktop.DBus.Error.UnknownObject"
    run(main())


def test_dbus_interfaces_is_the_packaged_copy():
    link = REPO / "dbus" / "interfaces"
    assert link.is_symlink() and link.resolve() == (REPO / "secretbus" / "bus" / "interfaces").resolve()


def test_every_declared_method_is_in_the_xml_with_its_signature():
    for handlers, ifaces in ((ConnectHandlers(None), [CONNECT_IFACE]), (SecretHandlers(None), [SECRET_IFACE])):
        # As the service builds them: secrets answer Introspect themselves (behind getattr).
        model = [introspection.STANDARD[INTROSPECT_IFACE], introspection.STANDARD[PROPS_IFACE],
                 introspection.STANDARD[OM_IFACE],
                 *map(introspection.packaged, ifaces)]
        specs = [s for s, _ in specs_of(handlers)]
        obj = ObjectType.build(model, specs)
        assert len(obj.entries) == len(specs)
        declared = {(s.iface, s.member) for s in specs}
        in_xml = {(i.name, m.name) for i in model if i.name in ifaces for m in i.methods}
        assert in_xml <= declared, in_xml - declared     # no method of the XML goes unanswered


def test_a_handler_the_xml_does_not_declare_is_refused_at_start():
    iface = Interface("x.Y", methods=[Method("M")])
    with pytest.raises(ValueError, match="not in the interface XML"):
        ObjectType.build([iface], [MethodSpec("x.Y", "Other", "")])
    with pytest.raises(ValueError, match="the XML says ''"):
        ObjectType.build([iface], [MethodSpec("x.Y", "M", "u")])


def test_permissions_are_libvirts():
    want = {
        "ListSecrets": ((Perm.SEARCH_SECRETS,), Perm.GETATTR, False),
        "SecretDefineXML": ((Perm.WRITE, Perm.SAVE), None, True),
        "SecretLookupByUUID": ((Perm.GETATTR,), None, False),
        "SecretLookupByUsage": ((Perm.GETATTR,), None, False),
        "GetManagedObjects": ((Perm.SEARCH_SECRETS,), Perm.GETATTR, False),
        "GetValue": ((Perm.READ_SECURE,), None, False),
        "SetValue": ((Perm.WRITE,), None, True),
        "GetXMLDesc": ((Perm.READ,), None, False),
        "Undefine": ((Perm.DELETE,), None, True),
        "Subscribe": ((Perm.SEARCH_SECRETS,), None, False),      # as virConnectSecretEventRegisterAny
        "Unsubscribe": ((), None, False),
        "Introspect": ((Perm.GETATTR,), None, False),            # of a secret object
    }
    got = {s.member: (s.perms, s.each, s.writes)
           for h in (ConnectHandlers(None), SecretHandlers(None)) for s, _ in specs_of(h) if s.iface != PROPS_IFACE}
    assert got == want


# -- routing ----------------------------------------------------------------------------
def test_routing_errors(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            assert err(await h.call("/nowhere", CONNECT_IFACE, "ListSecrets", "u", [0]))[0] == \
                "org.freedesktop.DBus.Error.UnknownObject"
            assert err(await h.call(SECRETS_PATH + "/x", SECRET_IFACE, "Frobnicate"))[0] == \
                "org.freedesktop.DBus.Error.UnknownObject"
            assert err(await h.call(CONNECT_PATH, CONNECT_IFACE, "NoSuchMethod"))[0] == \
                "org.freedesktop.DBus.Error.UnknownMethod"
            assert err(await h.call("/org", CONNECT_IFACE, "ListSecrets", "u", [0]))[0] == \
                "org.freedesktop.DBus.Error.UnknownMethod"
            for sig, body in (("", []), ("s", ["x"]), ("uu", [1, 2])):
                name, text = err(await h.call(CONNECT_PATH, CONNECT_IFACE, "ListSecrets", sig, body))
                assert name == "org.freedesktop.DBus.Error.InvalidArgs" and "'u'" in text
            assert await h.call(CONNECT_PATH, "org.freedesktop.DBus.Peer", "Ping") is None  # dbus-fast's
            assert await h.call("/nowhere", "org.freedesktop.DBus.Peer", "Ping") is None
            # No interface named: found by member.
            assert ok(await h.call(CONNECT_PATH, None, "ListSecrets", "u", [0])) == [[]]
            assert h.service.calls == 1
    run(main())


# -- the secret methods ---------------------------------------------------------------------
def test_methods_replies_and_signals(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            assert ok(await h.call(CONNECT_PATH, CONNECT_IFACE, "SecretDefineXML", "su", [xml(), 0])) == [P1]
            ok(await h.call(P1, SECRET_IFACE, "SetValue", "ayu", [VALUE, 0]))
            assert ok(await h.call(P1, SECRET_IFACE, "GetValue", "u", [0])) == [VALUE]
            assert ok(await h.call(CONNECT_PATH, CONNECT_IFACE, "ListSecrets", "u", [0])) == [[P1]]
            assert ok(await h.call(CONNECT_PATH, CONNECT_IFACE, "SecretLookupByUUID", "s", [U1])) == [P1]
            assert ok(await h.call(CONNECT_PATH, CONNECT_IFACE, "SecretLookupByUsage", "is",
                                   [2, "client.admin"])) == [P1]
            (desc,) = ok(await h.call(P1, SECRET_IFACE, "GetXMLDesc", "u", [0]))
            assert "<name>client.admin</name>" in desc
            assert ok(await h.call(P1, PROPS_IFACE, "Get", "ss", [SECRET_IFACE, "UsageID"])) == \
                [Variant("s", "client.admin")]
            (objs,) = ok(await h.call(CONNECT_PATH, OM_IFACE, "GetManagedObjects"))
            assert objs[P1][SECRET_IFACE]["UUID"] == Variant("s", U1)
            name, text = err(await h.call(P1, PROPS_IFACE, "Set", "ssv", [SECRET_IFACE, "UsageID", Variant("s", "x")]))
            assert name == "org.freedesktop.DBus.Error.PropertyReadOnly" and "read-only" in text
            ok(await h.call(P1, SECRET_IFACE, "Undefine"))
            # The path list memo follows the table (P1's list was kept above).
            assert ok(await h.call(CONNECT_PATH, CONNECT_IFACE, "ListSecrets", "u", [0])) == [[]]
            assert [m.body for m in h.signals("SecretEvent")] == [[P1, 0, 0], [P1, 1, 0]]
            assert [m.body for m in h.signals("SecretValueChanged")] == [[P1]]
            assert len(h.signals("InterfacesAdded")) == 1 and len(h.signals("InterfacesRemoved")) == 1
            assert not any(VALUE in repr(m.body).encode() for m in h.bus.sent
                           if m.message_type is not MessageType.METHOD_RETURN)
    run(main())


def test_error_replies_carry_libvirts_prefixed_text(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            name, text = err(await h.call(CONNECT_PATH, CONNECT_IFACE, "SecretLookupByUUID", "s", [U2]))
            assert name == "org.libvirt.Error.NoSecret"
            assert text == f"Secret not found: no secret with matching uuid '{U2}'"
            back = error_from_dbus(name, text)
            assert isinstance(back, errors.NoSecret) and str(back.message) == f"no secret with matching uuid '{U2}'"
            ok(await h.call(CONNECT_PATH, CONNECT_IFACE, "SecretDefineXML", "su", [xml(), 0]))
            name, text = err(await h.call(P1, SECRET_IFACE, "GetValue", "u", [1]))
            assert (name, text) == ("org.libvirt.Error.InvalidArg",
                                    "unsupported flags (0x1) in function secretGetValue")
            name, text = err(await h.call(P1, SECRET_IFACE, "SetValue", "ayu", [b"x" * 65537, 0]))
            assert (name, text) == ("org.libvirt.Error.RPCError", "value length greater than maximum: 65537 > 65536")
            name, _ = err(await h.call(CONNECT_PATH, CONNECT_IFACE, "SecretDefineXML", "su", ["<bogus/>", 0]))
            assert name == "org.libvirt.Error.XMLError"
    run(main())


def test_no_reply_expected_sends_no_reply(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            assert await h.call(CONNECT_PATH, CONNECT_IFACE, "ListSecrets", "u", [0],
                                flags=MessageFlag.NO_REPLY_EXPECTED) is None
            assert not [m for m in h.bus.sent if m.message_type is MessageType.METHOD_RETURN]
    run(main())


# -- access control --------------------------------------------------------------------------
def test_access_checks_and_filtering(tmp_path):
    async def main():
        acc = Recorder(deny={(Perm.GETATTR, U2), Perm.READ_SECURE})
        async with Harness(tmp_path, acc) as h:
            for u, uid in ((U1, "a"), (U2, "b")):
                ok(await h.call(CONNECT_PATH, CONNECT_IFACE, "SecretDefineXML", "su", [xml(u, uid=uid), 0]))
            assert acc.checks[:2] == [(Perm.WRITE, U1), (Perm.SAVE, U1)]
            acc.checks.clear()
            assert ok(await h.call(CONNECT_PATH, CONNECT_IFACE, "ListSecrets", "u", [0])) == [[P1]]
            assert acc.checks[0] == (Perm.SEARCH_SECRETS, None)
            assert sorted(acc.checks[1:]) == sorted([(Perm.GETATTR, U1), (Perm.GETATTR, U2)])
            name, text = err(await h.call(P1, SECRET_IFACE, "GetValue", "u", [0]))
            assert name == "org.libvirt.Error.AccessDenied" and Perm.READ_SECURE.value in text
            name, _ = err(await h.call(CONNECT_PATH, CONNECT_IFACE, "SecretLookupByUUID", "s", [U2]))
            assert name == "org.libvirt.Error.AccessDenied"
            acc.deny.add(Perm.SEARCH_SECRETS)
            assert err(await h.call(CONNECT_PATH, PROPS_IFACE, "GetAll", "s", [CONNECT_IFACE]))[0] == \
                "org.libvirt.Error.AccessDenied"
    run(main())


@pytest.mark.parametrize("uid, readable", [(0, False), (107, True)])
def test_private_values_only_to_listed_readers(tmp_path, uid, readable):
    async def main():
        async with Harness(tmp_path, Recorder(uid=uid), private_readers=frozenset({107})) as h:
            ok(await h.call(CONNECT_PATH, CONNECT_IFACE, "SecretDefineXML", "su", [xml(priv="yes"), 0]))
            ok(await h.call(P1, SECRET_IFACE, "SetValue", "ayu", [VALUE, 0]))
            reply = await h.call(P1, SECRET_IFACE, "GetValue", "u", [0])
            if readable:
                assert ok(reply) == [VALUE]
            else:
                assert err(reply) == ("org.libvirt.Error.InvalidSecret", "Invalid secret: secret is private")
    run(main())


# -- connect properties ------------------------------------------------------------------------
def test_connect_properties(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            (props,) = ok(await h.call(CONNECT_PATH, PROPS_IFACE, "GetAll", "s", [CONNECT_IFACE]))
            assert set(props) == {"Encrypted", "Hostname", "LibVersion", "Secure", "Version",
                                  "FleetState", "FleetStateReason"}
            assert props["FleetState"] == Variant("s", "local") and props["FleetStateReason"] == Variant("s", "")
            assert props["Encrypted"] == Variant("b", False) and props["Secure"] == Variant("b", True)
            assert props["LibVersion"] == Variant("t", LIBVIRT_COMPAT) == Variant("t", 12_001_000)
            assert props["Version"] == Variant("t", encode_version("0.1.0"))
            assert ok(await h.call(CONNECT_PATH, PROPS_IFACE, "Get", "ss", ["", "Secure"])) == [Variant("b", True)]
            name, _ = err(await h.call(CONNECT_PATH, PROPS_IFACE, "Get", "ss", [CONNECT_IFACE, "Nope"]))
            assert name == "org.freedesktop.DBus.Error.UnknownProperty"
            name, _ = err(await h.call(CONNECT_PATH, PROPS_IFACE, "GetAll", "s", [SECRET_IFACE]))
            assert name == "org.freedesktop.DBus.Error.UnknownInterface"
            name, _ = err(await h.call(CONNECT_PATH, PROPS_IFACE, "Set", "ssv",
                                       [CONNECT_IFACE, "Secure", Variant("b", False)]))
            assert name == "org.freedesktop.DBus.Error.PropertyReadOnly"
    run(main())


def test_model_properties_match_what_is_served():
    served = {
        CONNECT_IFACE: {"Encrypted": "b", "Hostname": "s", "LibVersion": "t", "Secure": "b", "Version": "t",
                        "FleetState": "s", "FleetStateReason": "s"},
        SECRET_IFACE: {"UUID": "s", "UsageID": "s", "UsageType": "i", "Description": "s", "Ephemeral": "b",
                       "Private": "b"},
    }
    for name, props in served.items():
        assert {p.name: p.signature for p in introspection.packaged(name).properties} == props


def test_encode_version():
    assert encode_version("12.1.0") == 12_001_000 and encode_version("0.1.0") == 1000
    assert encode_version("9.0") == 9_000_000 and encode_version("x") == 0


def test_the_package_constant_is_the_installed_version():
    """The service answers Version from secretbus.__version__ (no importlib.metadata at start-up):
    it must be what pyproject.toml ships."""
    import importlib.metadata

    import secretbus
    assert secretbus.__version__ == importlib.metadata.version("secretbus")


def test_path_helpers():
    assert uuid_from_path(secret_path(U1)) == U1
    assert uuid_from_path(secret_path(U1).upper()) is None and uuid_from_path(CONNECT_PATH) is None


class SlowUids(Recorder):
    """Access control whose uid answers wait for `gate`, as the bus daemon's answer to
    GetConnectionUnixUser waits behind everything it queued for us."""

    def __init__(self):
        super().__init__()
        self.gate: asyncio.Future[None] | None = None

    def known_uid(self, caller: Caller) -> tuple[bool, int | None]:
        return (self.gate is None, self.uid if self.gate is None else None)

    async def caller_uid(self, caller: Caller) -> int | None:
        if self.gate is not None:
            await self.gate
        return self.uid


def _new_connections_write(h: Harness) -> tuple[list[tuple[int, int, str, str]], int]:
    """8 connections each send 20 SetValue of 64 KiB to P1: (those answered at once, each
    as (connection, call, error name, text); how many are still waiting)."""
    value, calls = bytes(65536), {}
    before = len(h.bus.sent)
    for c in range(8):
        for i in range(20):
            h.serial += 1
            calls[h.serial] = (c, i)
            h.bus.handlers[0](Message(destination="org.libvirt.secret", path=P1, interface=SECRET_IFACE,
                                      member="SetValue", signature="ayu", body=[value, 0], serial=h.serial,
                                      sender=f":1.{100 + c}"))
    answered = [(*calls[m.reply_serial], *err(m)) for m in h.bus.sent[before:] if m.reply_serial in calls]
    return answered, len(calls) - len(answered)


def test_writes_waiting_for_their_uid_are_bounded_together(tmp_path):
    """8 new connections send 20 SetValue of 64 KiB each before the bus daemon tells their
    uid: those over the 8 MiB the waiting writes share are refused at once (each connection's
    first is taken), not held; once the uid is known the rest are served."""
    async def main():
        acc = SlowUids()
        async with Harness(tmp_path, acc) as h:
            ok(await h.call(CONNECT_PATH, CONNECT_IFACE, "SecretDefineXML", "su", [xml(U1), 0]))
            gate = acc.gate = asyncio.get_running_loop().create_future()
            try:
                refused, waiting = _new_connections_write(h)
            finally:
                gate.set_result(None)          # else the waiting writes would hold the exit forever
                acc.gate = None
            assert waiting == 129 and len(refused) == 31       # 8 MiB of 64 KiB, and the 8th's first
            assert {(c, name) for c, _i, name, _t in refused} == {
                (6, "org.freedesktop.DBus.Error.LimitsExceeded"), (7, "org.freedesktop.DBus.Error.LimitsExceeded")}
            assert all("whose user is not known yet" in t for *_x, t in refused)
            assert (7, 0) not in {(c, i) for c, i, *_y in refused}
            for _ in range(300):
                await asyncio.sleep(0.01)
                if h.service._runner.writes.sizes() == {"writing_uids": 0, "writing_unknown_senders": 0}:
                    break
            assert h.service._runner.writes.sizes() == {"writing_uids": 0, "writing_unknown_senders": 0}

    run(main())

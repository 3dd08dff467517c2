"""Driver rules of spec §2 through the embedded connection (the public Python API)."""
from __future__ import annotations

import os
import stat

import pytest
from fixtures import U1, store_files
from fixtures import U1_NEXT as U2
from fixtures import secret_xml as xml

import secretbus
from secretbus.core import errors
from secretbus.core.model import EventId, Lifecycle, ListFlags, UsageType
from secretbus.core.uuids import parse_uuid
from secretbus.driver.build import open_instance
from secretbus.store.paths import InstancePaths

U3 = "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f"


@pytest.fixture
def root(tmp_path):
    return tmp_path / "inst"


@pytest.fixture
def conn(root):
    c = secretbus.open(f"secret:///embed?root={root}")
    yield c
    c.close()


def reopen(conn, root):
    conn.close()
    return secretbus.open(f"secret:///embed?root={root}")


def test_define_new_creates_xml_only(conn, root):
    s = conn.define_xml(xml())
    assert (s.uuid, s.usage_type, s.usage_id) == (U1, UsageType.CEPH, "client.admin")
    cfg = root / "etc" / "secrets"
    assert sorted(os.listdir(cfg)) == [f"{U1}.xml"]
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o700
    assert stat.S_IMODE((cfg / f"{U1}.xml").stat().st_mode) == 0o600
    assert (cfg / f"{U1}.xml").read_text() == s.xml_desc()


def test_missing_uuid_is_generated(conn):
    s = conn.define_xml(xml(uuid=None))
    assert parse_uuid(s.uuid) == s.uuid
    assert conn.lookup_by_uuid(s.uuid) == s


def test_lookup_errors(conn):
    with pytest.raises(errors.InvalidArg, match="must be a valid UUID"):
        conn.lookup_by_uuid("nope")
    with pytest.raises(errors.NoSecret, match=f"no secret with matching uuid '{U2}'"):
        conn.lookup_by_uuid(U2)
    with pytest.raises(errors.NoSecret, match="no secret with matching usage 'x'"):
        conn.lookup_by_usage(UsageType.CEPH, "x")


def test_lookup_lenient_uuid_and_usage(conn):
    conn.define_xml(xml())
    assert conn.lookup_by_uuid(U1.upper().replace("-", "")).uuid == U1
    assert conn.lookup_by_usage(UsageType.CEPH, "client.admin").uuid == U1
    # Type must match too, and NONE never matches.
    with pytest.raises(errors.NoSecret):
        conn.lookup_by_usage(UsageType.TLS, "client.admin")
    conn.define_xml(xml(U2, usage=None))
    with pytest.raises(errors.NoSecret):
        conn.lookup_by_usage(UsageType.NONE, "")


def test_usage_must_be_unique(conn):
    conn.define_xml(xml())
    with pytest.raises(errors.InternalError,
                       match=f"a secret with UUID {U1} is already defined for use with client.admin"):
        conn.define_xml(xml(U2))
    # Many NONE secrets may coexist; same id under another type is fine.
    conn.define_xml(xml(U2, usage="tls"))
    conn.define_xml(xml(U3, usage=None))
    conn.define_xml(xml("11111111-2222-3333-4444-555555555555", usage=None))
    assert len(conn.list_secrets()) == 4


def test_redefine_rules(conn):
    s = conn.define_xml(xml(priv="yes"))
    s.set_value(b"v1")
    with pytest.raises(errors.InternalError,
                       match=f"a secret with UUID {U1} is already defined for use with client.admin"):
        conn.define_xml(xml(uid="other"))
    with pytest.raises(errors.InternalError, match="cannot change private flag on existing secret"):
        conn.define_xml(xml(priv="no"))
    # Description changes, value is kept.
    conn.define_xml(xml(priv="yes", desc="new"))
    assert "<description>new</description>" in s.xml_desc()
    assert s.get_value(internal_call=True) == b"v1"


def test_redefine_cannot_take_another_secrets_usage(conn):
    conn.define_xml(xml(U1, usage="ceph", uid="x"))
    conn.define_xml(xml(U2, usage="tls", uid="x"))
    with pytest.raises(errors.InternalError, match=f"UUID {U2} is already defined for use with x"):
        conn.define_xml(xml(U1, usage="tls", uid="x"))


def test_define_refuses_what_would_not_load_after_restart(conn, root, monkeypatch):
    from secretbus.driver import rules
    # 200 000 apostrophes format to 1.2 MB ("&apos;"), over the store's 1 MiB read limit.
    with pytest.raises(errors.XMLError, match="description is longer than 131072 characters"):
        conn.define_xml(xml(desc="'" * 200_000))
    with pytest.raises(errors.XMLError, match="usage id is longer than 4096 characters"):
        conn.define_xml(xml(usage="volume", uid="/" + "v" * 4096))
    # The formatted size is checked too, whatever the per-field limits say.
    monkeypatch.setattr(rules, "DESCRIPTION_MAX", 10**7)
    with pytest.raises(errors.XMLError, match=r"would be 1200\d+ bytes when stored, more than 1048576"):
        conn.define_xml(xml(desc="'" * 200_000))
    assert os.listdir(root / "etc" / "secrets") == [] and conn.list_secrets() == []
    monkeypatch.undo()
    # At the limits, a definition is stored and loads again.
    s = conn.define_xml(xml(desc="'" * 131072, usage="volume", uid="/" + "&apos;" * 4095))
    s.set_value(b"v")
    stored = s.xml_desc()
    assert len(stored.encode()) > 800_000
    conn = reopen(conn, root)
    assert conn.lookup_by_uuid(U1).get_value() == b"v"
    assert conn.lookup_by_uuid(U1).xml_desc() == stored
    conn.close()


def test_values(conn, root):
    s = conn.define_xml(xml())
    with pytest.raises(errors.NoSecret, match=f"secret '{U1}' does not have a value"):
        s.get_value()
    s.set_value(b"a\0b\xff")
    assert s.get_value() == b"a\0b\xff"
    # Empty is a real, stored, empty value (libvirt quirk 3 fixed) and survives a restart.
    s.set_value(b"")
    assert s.get_value() == b""
    conn = reopen(conn, root)
    assert conn.lookup_by_uuid(U1).get_value() == b""
    big = bytes(range(256)) * 256
    conn.lookup_by_uuid(U1).set_value(big)
    with pytest.raises(errors.RPCError) as ei:
        conn.lookup_by_uuid(U1).set_value(big + b"x")
    assert ei.value.display() == "value length greater than maximum: 65537 > 65536"
    assert ei.value.code == 39
    assert conn.lookup_by_uuid(U1).get_value() == big
    conn.close()


def test_private_value_refused_except_internal_call(conn):
    s = conn.define_xml(xml(priv="yes"))
    s.set_value(b"pw")
    with pytest.raises(errors.InvalidSecret, match="^secret is private$"):
        s.get_value()
    assert s.get_value(internal_call=True) == b"pw"
    with pytest.raises(errors.InvalidArg, match="unsupported flags"):
        s.get_value(1)


def test_flags_checked(conn):
    # libvirt's virCheckFlags names the driver function (secret_driver.c), not the public API.
    s = conn.define_xml(xml())
    s.set_value(b"v")
    calls = [("0x2", "secretDefineXML", lambda: conn.define_xml(xml(), 2)),
             ("0x10", "secretConnectListAllSecrets", lambda: conn.list_secrets(0x10)),
             ("0x1", "secretSetValue", lambda: s.set_value(b"x", 1)),
             ("0x4", "secretGetValue", lambda: s.get_value(4)),
             ("0x80000000", "secretGetXMLDesc", lambda: s.xml_desc(-(2 ** 31)))]
    for shown, function, call in calls:
        with pytest.raises(errors.InvalidArg) as ei:
            call()
        # libvirt's virCheckFlags reports no "invalid argument: " before it (libvirtd 9.0)
        assert ei.value.display() == f"unsupported flags ({shown}) in function {function}"
    assert s.get_value() == b"v"                 # the refused SetValue changed nothing


def test_define_validate_flag(conn):
    bad = xml(usage="volume", uid="relative/path")
    conn.define_xml(bad)   # accepted without validation, like libvirt
    with pytest.raises(errors.XMLInvalidSchema):
        conn.define_xml(xml(U2, usage="volume", uid="rel"), 1)


def test_list_flags(conn):
    conn.define_xml(xml(U1, eph="no", priv="no", usage="ceph", uid="a"))
    conn.define_xml(xml(U2, eph="yes", priv="no", usage="ceph", uid="b"))
    conn.define_xml(xml(U3, eph="yes", priv="yes", usage="ceph", uid="c"))

    def ids(flags):
        return [s.uuid for s in conn.list_secrets(flags)]
    assert ids(0) == sorted([U1, U2, U3])
    assert ids(ListFlags.EPHEMERAL) == sorted([U2, U3])
    assert ids(ListFlags.NO_EPHEMERAL) == [U1]
    assert ids(ListFlags.EPHEMERAL | ListFlags.NO_EPHEMERAL) == sorted([U1, U2, U3])
    assert ids(ListFlags.PRIVATE) == [U3]
    assert ids(ListFlags.NO_PRIVATE | ListFlags.EPHEMERAL) == [U2]
    assert ids(ListFlags.PRIVATE | ListFlags.NO_EPHEMERAL) == []
    assert ids(0xF) == sorted([U1, U2, U3])


def test_list_view_is_kept_until_the_table_changes(conn):
    calls = []

    def uuids(defs):
        calls.append(len(defs))
        return [d.uuid for d in defs]
    drv = conn.driver
    conn.define_xml(xml(U1, uid="a"))
    assert drv.list_view(0, uuids) == [U1]
    assert drv.list_view(0, uuids) == [U1] and calls == [1]          # cached
    assert drv.list_view(ListFlags.EPHEMERAL, uuids) == [] and calls == [1, 0]
    conn.define_xml(xml(U2, uid="b"))
    assert drv.list_view(0, uuids) == [U1, U2] and calls == [1, 0, 2]  # the table changed
    with pytest.raises(errors.InvalidArg, match="unsupported flags"):
        drv.list_view(0x10, uuids)


def test_ephemeral_never_touches_disk(conn, root):
    s = conn.define_xml(xml(eph="yes"))
    s.set_value(b"mem")
    assert os.listdir(root / "etc" / "secrets") == []
    conn = reopen(conn, root)
    assert conn.list_secrets() == []
    conn.close()


def test_persistent_survives_restart(conn, root):
    s = conn.define_xml(xml())
    s.set_value(b"disk")
    conn = reopen(conn, root)
    assert conn.lookup_by_uuid(U1).get_value() == b"disk"
    conn.close()


def test_persistent_to_ephemeral_removes_xml_and_value(conn, root):
    s = conn.define_xml(xml())
    s.set_value(b"v")
    conn.define_xml(xml(eph="yes"))
    assert store_files(root / "etc" / "secrets") == []   # libvirt leaves the XML (quirk 1)
    assert s.get_value() == b"v"
    conn = reopen(conn, root)
    assert conn.list_secrets() == []
    conn.close()


def test_ephemeral_to_persistent_writes_value_then_xml(conn, root):
    s = conn.define_xml(xml(eph="yes"))
    s.set_value(b"keep")
    conn.define_xml(xml(eph="no"))
    files = sorted(os.listdir(root / "etc" / "secrets"))
    assert files == [f"{U1}.base64", f"{U1}.xml"]
    conn = reopen(conn, root)
    assert conn.lookup_by_uuid(U1).get_value() == b"keep"
    conn.close()


def test_undefine(conn, root):
    s = conn.define_xml(xml())
    s.set_value(b"v")
    s.undefine()
    assert store_files(root / "etc" / "secrets") == []
    with pytest.raises(errors.NoSecret):
        conn.lookup_by_uuid(U1)
    with pytest.raises(errors.NoSecret):
        s.undefine()
    # The usage id is free again.
    conn.define_xml(xml(U2))


def test_events(conn):
    got = []
    sub = conn.subscribe(lambda sec, ev: got.append((sec.uuid, ev.event_id, ev.lifecycle)))
    only_values = []
    conn.subscribe(lambda sec, ev: only_values.append(sec.uuid), EventId.VALUE_CHANGED)
    s = conn.define_xml(xml())
    conn.define_xml(xml(desc="again"))
    s.set_value(b"x")
    with pytest.raises(errors.InvalidArg):
        s.set_value(b"x", 4)     # failed operations emit nothing
    s.undefine()
    assert got == [(U1, EventId.LIFECYCLE, Lifecycle.DEFINED), (U1, EventId.LIFECYCLE, Lifecycle.DEFINED),
                   (U1, EventId.VALUE_CHANGED, None), (U1, EventId.LIFECYCLE, Lifecycle.UNDEFINED)]
    assert only_values == [U1]
    conn.unsubscribe(sub)
    with pytest.raises(errors.InvalidArg):
        conn.unsubscribe(sub)
    with pytest.raises(errors.InvalidArg, match="must be less than 2"):
        conn.subscribe(lambda *a: None, 2)


def test_events_carry_the_definition(conn):
    defs = []
    conn.driver.subscribe(lambda ev: defs.append((ev.event_id, ev.lifecycle, ev.definition)))
    s = conn.define_xml(xml(desc="one"))
    conn.define_xml(xml(desc="two"))
    s.set_value(b"x")
    s.undefine()
    descs = [(e, lc, d.uuid, d.description) for e, lc, d in defs]
    assert descs == [(EventId.LIFECYCLE, Lifecycle.DEFINED, U1, "one"),
                     (EventId.LIFECYCLE, Lifecycle.DEFINED, U1, "two"),
                     (EventId.VALUE_CHANGED, None, U1, "two"),
                     (EventId.LIFECYCLE, Lifecycle.UNDEFINED, U1, "two")]


def test_event_filter_by_secret(conn):
    got = []
    conn.subscribe(lambda sec, ev: got.append(sec.uuid), None, U2)
    conn.define_xml(xml(U1, uid="a"))
    conn.define_xml(xml(U2, uid="b"))
    assert got == [U2]


def test_an_embedded_connection_is_alive_until_closed(root):
    c = secretbus.open(f"secret:///embed?root={root}")
    lost: list[str] = []
    c.on_lost(lost.append)           # never called: nothing on the other side to go away
    assert c.is_alive()
    c.close()
    assert not c.is_alive() and lost == []


def test_second_driver_on_same_root_is_refused(conn, root):
    with pytest.raises(errors.OperationFailed, match="already holds the lock"):
        secretbus.open(f"secret:///embed?root={root}")


def test_uri_errors(tmp_path):
    with pytest.raises(errors.InvalidArg, match="root parameter is required"):
        secretbus.open("secret:///embed")
    with pytest.raises(errors.InvalidArg, match="absolute"):
        secretbus.open("secret:///embed?root=rel")
    with pytest.raises(errors.InternalError, match="unexpected secret URI path '/foo'"):
        secretbus.open("secret:///foo")
    with pytest.raises(errors.NoSupport, match="not supported yet"):
        secretbus.open("secret+libssh2://host/system")
    with pytest.raises(errors.InvalidArg):
        secretbus.open("qemu:///system")


def test_errors_map_to_dbus_names():
    assert errors.NoSecret("x").dbus_name == "org.libvirt.Error.NoSecret"
    assert errors.NoSecret("x").code == 66
    assert isinstance(errors.from_dbus("org.libvirt.Error.InvalidSecret", "secret is private"),
                      errors.InvalidSecret)
    names = {c.kind for c in errors.ALL_ERRORS}
    for needed in ("NoSecret", "InvalidSecret", "XMLError", "InvalidArg", "AccessDenied", "OperationFailed",
                   "XMLDetail", "RPCError"):
        assert needed in names


@pytest.mark.parametrize("cls,code,prefix", [
    (errors.InternalError, 1, "internal error: "),
    (errors.NoSupport, 3, "this function is not supported by the connection driver: "),
    (errors.InvalidArg, 8, "invalid argument: "),
    (errors.InvalidArgCheck, 8, ""),
    (errors.OperationFailed, 9, "operation failed: "),
    (errors.XMLError, 27, "XML error: "),
    (errors.OperationDenied, 29, "operation forbidden: "),
    (errors.XMLDetail, 35, ""),
    (errors.SystemError, 38, ""),
    (errors.RPCError, 39, ""),
    (errors.InvalidSecret, 65, "Invalid secret: "),
    (errors.NoSecret, 66, "Secret not found: "),
    (errors.ConfigUnsupported, 67, "unsupported configuration: "),
    (errors.AccessDenied, 88, "access denied: "),
    (errors.XMLInvalidSchema, 92, "XML document failed to validate against schema: "),
    (errors.InvalidEncrKey, 114, ""),
])
def test_codes_and_prefixes_are_libvirts(cls, code, prefix):
    # virerror.c's virErrorMsgStrings (libvirt 9.0): the text each code puts before a message.
    assert (cls.code, cls.prefix) == (code, prefix)
    err = cls("m")
    assert err.display() == prefix + "m"
    back = errors.from_dbus(err.dbus_name, err.display())
    assert type(back) is cls and back.message == "m"


def test_oversized_value_changes_nothing(conn):
    s = conn.define_xml(xml())
    s.set_value(b"old")
    with pytest.raises(errors.RPCError, match=r"^value length greater than maximum: 65537 > 65536$"):
        s.set_value(b"n" * 65537)
    assert s.get_value() == b"old"


def test_value_of_a_looked_up_definition_follows_get_value(tmp_path):
    """The front ends' GetValue reads `value_of(d)` (no second UUID parse): the value while `d`
    is the table's; get_value's answer and error once it was redefined, lost its value, or went."""
    drv = open_instance(InstancePaths.embed(tmp_path / "inst"))
    try:
        d = drv.define_xml(xml())
        with pytest.raises(errors.NoSecret, match="does not have a value"):
            drv.value_of(d)
        drv.set_value(U1, b"v1")
        assert drv.value_of(d) == b"v1"
        d2 = drv.define_xml(xml(desc="redefined"))          # d is no longer the table's
        drv.set_value(U1, b"v2")
        assert drv.value_of(d) == drv.get_value(U1) == b"v2"
        priv = drv.define_xml(xml(U2, priv="yes", uid="client.private"))
        drv.set_value(U2, b"p")
        with pytest.raises(errors.InvalidSecret, match="secret is private"):
            drv.value_of(priv)
        assert drv.value_of(priv, internal_call=True) == b"p"
        drv.undefine(U1)
        with pytest.raises(errors.NoSecret, match=f"no secret with matching uuid '{U1}'"):
            drv.value_of(d2)
    finally:
        drv.close()

"""The cases of tests/test_libvirtd_diff.py: python3-libvirt (Debian's, /usr/bin/python3) and
virsh against one server, libvirtd 9.0 or secretbusd, each result printed normalised.

argv: URI WORKDIR
stdout: one JSON object {case name: result}; a result is {"ok": …} or {"err": [code, domain,
message]}, UUIDs in messages replaced by their names (U_…, <generated>, <uuid>) and WORKDIR by
<work>. A secret value is never printed: values are {"len": n, "sha256": …}.

Every case is one `case("name", fn)` line (the test module reads the names from this file);
they run in order, on one connection, and later cases see the secrets earlier ones left.
"""
import base64
import hashlib
import json
import re
import subprocess
import sys

import libvirt

uri, work = sys.argv[1:3]
out = {}

UUIDS = {   # name -> UUID; each case family uses its own secrets
    "U_VOL": "00000000-0000-4000-8000-000000000001",
    "U_CEPH": "00000000-0000-4000-8000-000000000002",
    "U_ISCSI": "00000000-0000-4000-8000-000000000003",
    "U_TLS": "00000000-0000-4000-8000-000000000004",
    "U_VTPM": "00000000-0000-4000-8000-000000000005",
    "U_NONE": "00000000-0000-4000-8000-000000000006",
    "U_EPH": "00000000-0000-4000-8000-000000000007",
    "U_EPH_PRIV": "00000000-0000-4000-8000-000000000008",
    "U_DESC": "00000000-0000-4000-8000-000000000009",
    "U_RE": "00000000-0000-4000-8000-00000000000a",       # redefined again and again
    "U_RE2": "00000000-0000-4000-8000-00000000000b",
    "U_TOEPH": "00000000-0000-4000-8000-00000000000c",    # persistent -> ephemeral, left so (row 1)
    "U_EMPTY": "00000000-0000-4000-8000-00000000000d",    # the empty value (row 3)
    "U_SPARE": "00000000-0000-4000-8000-00000000000e",    # never defined
    "U_GONE": "00000000-0000-4000-8000-00000000000f",     # defined, undefined
    "U_UPPER": "00000000-0000-4000-8000-0000000000ab",    # defined in upper case, no dashes
    "U_VIRSH": "00000000-0000-4000-8000-000000000010",
    "U_EXTRA": "00000000-0000-4000-8000-000000000011",
    "U_VALID": "00000000-0000-4000-8000-000000000012",
    "U_NS": "00000000-0000-4000-8000-000000000013",      # libvirt defines it, we refuse
    "U_DTD": "00000000-0000-4000-8000-000000000014",     # libvirt defines it, we refuse
    "U_BIG": "00000000-0000-4000-8000-000000000015",
    "U_HOLD": "00000000-0000-4000-8000-000000000017",
    "U_MOVE": "00000000-0000-4000-8000-000000000018",
    "U_GONE2": "00000000-0000-4000-8000-000000000016",
}
NAMES = {v: k for k, v in UUIDS.items()}
G = {}          # generated UUIDs -> "<generated>"
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
USAGE = {"volume": (libvirt.VIR_SECRET_USAGE_TYPE_VOLUME, "volume"),
         "ceph": (libvirt.VIR_SECRET_USAGE_TYPE_CEPH, "name"),
         "iscsi": (libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, "target"),
         "tls": (libvirt.VIR_SECRET_USAGE_TYPE_TLS, "name"),
         "vtpm": (libvirt.VIR_SECRET_USAGE_TYPE_VTPM, "name")}


def norm(v):
    if isinstance(v, str):
        v = UUID_RE.sub(lambda m: NAMES.get(m.group(0).lower(), G.get(m.group(0).lower(), "<uuid>")), v)
        return v.replace(work, "<work>")
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    if isinstance(v, dict):
        return {k: norm(x) for k, x in v.items()}
    return v


def digest(b):
    return {"len": len(b), "sha256": hashlib.sha256(b).hexdigest()}


def case(name, fn):
    assert name not in out, name
    try:
        out[name] = {"ok": norm(fn())}
    except libvirt.libvirtError as e:
        out[name] = {"err": norm([e.get_error_code(), e.get_error_domain(), e.get_error_message()])}


def xml(uuid=None, eph="no", priv="no", usage="ceph", uid="client.admin", desc=None, raw_uuid=None):
    attrs = f" ephemeral='{eph}' private='{priv}'" if eph is not None else ""
    parts = [f"<secret{attrs}>"]
    if raw_uuid is not None:
        parts.append(f"<uuid>{raw_uuid}</uuid>")
    elif uuid is not None:
        parts.append(f"<uuid>{UUIDS[uuid]}</uuid>")
    if desc is not None:
        parts.append(f"<description>{desc}</description>")
    if usage is not None:
        parts.append(f"<usage type='{usage}'><{USAGE[usage][1]}>{uid}</{USAGE[usage][1]}></usage>")
    return "".join(parts) + "</secret>"


def define(doc, flags=0):
    return define_on(conn, doc, flags)


def define_on(c, doc, flags=0):
    s = c.secretDefineXML(doc, flags)
    return [s.UUIDString(), s.usageType(), s.usageID(), s.XMLDesc(0)]


def define_once(doc, flags=0):
    """define(), then undefine what was defined: a case one server refuses leaves nothing behind."""
    r = define(doc, flags)
    conn.secretLookupByUUIDString(r[0]).undefine()
    return r


def uuid_bytes(name):
    return bytes.fromhex(UUIDS[name].replace("-", ""))


def by_uuid(name):
    return conn.secretLookupByUUIDString(UUIDS[name])


def value(name):
    return digest(by_uuid(name).value(0))


def listall(flags):
    return sorted(norm(s.UUIDString()) for s in conn.listAllSecrets(flags))


def virsh(*args, input=None):
    r = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, input=input, timeout=30)
    return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}


def virsh_value(*args):
    r = virsh(*args)
    r["stdout"] = digest(r["stdout"].encode())
    return r


libvirt.registerErrorHandler(lambda ctx, err: None, None)   # errors come back as exceptions only
libvirt.virEventRegisterDefaultImpl()        # event registration needs one (never run: no event is awaited)
conn = libvirt.open(uri)

# -- the connection --------------------------------------------------------------------------
case("conn_type", conn.getType)
case("conn_lib_version", conn.getLibVersion)
case("conn_uri", lambda: conn.getURI().split("?")[0])
case("conn_is_secure", conn.isSecure)
case("conn_is_encrypted", conn.isEncrypted)
case("conn_is_alive", conn.isAlive)
case("conn_hostname", conn.getHostname)
case("conn_version", conn.getVersion)
case("list_empty", lambda: [conn.numOfSecrets(), conn.listSecrets(), listall(0)])

# -- define: every usage type, none, the flag combinations ------------------------------------
case("def_volume", lambda: define(xml("U_VOL", usage="volume", uid="/var/lib/libvirt/images/a.img")))
case("def_ceph_private", lambda: define(xml("U_CEPH", priv="yes", uid="client.admin")))
case("def_iscsi", lambda: define(xml("U_ISCSI", usage="iscsi", uid="iqn.2013-07.com.example:t1")))
case("def_tls", lambda: define(xml("U_TLS", usage="tls", uid="mumblyfratz")))
case("def_vtpm_private", lambda: define(xml("U_VTPM", priv="yes", usage="vtpm", uid="vTPMvTPMvTPM")))
case("def_no_usage", lambda: define(xml("U_NONE", usage=None)))
case("def_ephemeral", lambda: define(xml("U_EPH", eph="yes", usage="tls", uid="eph-tls")))
case("def_ephemeral_private", lambda: define(xml("U_EPH_PRIV", eph="yes", priv="yes", usage=None)))
case("def_no_attributes", lambda: define(xml("U_DESC", eph=None, usage=None)))
case("def_description", lambda: define(xml("U_DESC", usage=None, desc="a &amp; b &lt;c&gt; \"q\" 'a'")))
case("def_usage_id_spaces", lambda: define(xml("U_RE2", usage="ceph", uid=" client.admin secret ")))
case("def_empty_attributes", lambda: define(f"<secret ephemeral='' private=''><uuid>{UUIDS['U_GONE']}</uuid></secret>"))
case("def_usage_type_none", lambda: define(f"<secret><uuid>{UUIDS['U_GONE']}</uuid><usage type='none'/></secret>"))
case("re_from_no_usage", lambda: define(xml("U_GONE", usage="tls", uid="x")))
case("def_unknown_children", lambda: define(f"<secret foo='bar'><uuid>{UUIDS['U_EXTRA']}</uuid><extra>1</extra>"
                                            "<usage type='tls' x='y'><name>n-extra</name><z/></usage></secret>"))
case("def_undashed_upper_uuid", lambda: define(xml(raw_uuid=UUIDS["U_UPPER"].replace("-", "").upper(), usage=None)))
case("def_uuid_dash_after_last_pair", lambda: define(xml(raw_uuid=UUIDS["U_SPARE"] + "-", usage=None)))
case("def_uuid_dash_before_first_pair", lambda: define(xml(raw_uuid="-" + UUIDS["U_UPPER"], usage=None)))
case("def_uuid_space_after_last_pair", lambda: define(xml(raw_uuid=UUIDS["U_UPPER"] + " \t", usage=None)))
case("def_spaced_uuid", lambda: define(xml(raw_uuid=" " + " ".join(UUIDS["U_UPPER"].replace("-", "")[i:i + 2]
                                                                   for i in range(0, 32, 2)) + " ", usage=None)))


def generated(doc):
    s = conn.secretDefineXML(doc, 0)
    u = s.UUIDString()
    G[u] = "<generated>"
    r = [u[14], s.XMLDesc(0)]      # the version digit: 4
    s.undefine()
    return r


case("def_missing_uuid", lambda: generated(xml(None, usage="tls", uid="generated")))
case("def_empty_uuid", lambda: generated(xml(raw_uuid="", usage=None)))
case("def_blank_uuid", lambda: generated(xml(raw_uuid="  ", usage=None)))
case("def_validate_ok", lambda: define(xml("U_VALID", usage="tls", uid="validated"), 1))
case("def_validate_relative_volume", lambda: define(xml("U_SPARE", usage="volume", uid="rel.img"), 1))
case("def_validate_usage_none", lambda: define("<secret><usage type='none'/></secret>", 1))
case("def_bad_flags", lambda: define(xml("U_SPARE"), 2))
# errors of the parser
case("def_malformed_uuid", lambda: define(xml(raw_uuid="not-a-uuid")))
case("def_short_uuid", lambda: define(xml(raw_uuid=UUIDS["U_SPARE"][:-1])))
case("def_not_well_formed", lambda: define("<secret><uuid>"))
case("def_not_xml", lambda: define("this is not xml"))
case("def_empty_string", lambda: define(""))
case("def_wrong_root", lambda: define(f"<foo><uuid>{UUIDS['U_SPARE']}</uuid></foo>"))
case("def_namespaced_root", lambda: define_once(f"<x:secret xmlns:x='urn:x'><uuid>{UUIDS['U_NS']}</uuid></x:secret>"))
case("def_ephemeral_maybe", lambda: define(xml("U_SPARE", eph="maybe")))
case("def_private_1", lambda: define(xml("U_SPARE", priv="1")))
case("def_usage_no_type", lambda: define("<secret><usage><name>x</name></usage></secret>"))
case("def_usage_passphrase", lambda: define("<secret><usage type='passphrase'><name>x</name></usage></secret>"))
case("def_usage_unknown", lambda: define("<secret><usage type='bogus'/></secret>"))
for _t, (_n, _child) in USAGE.items():
    case(f"def_{_t}_missing_child", lambda t=_t: define(f"<secret><usage type='{t}'/></secret>"))
    case(f"def_{_t}_empty_id", lambda t=_t, c=_child: define(f"<secret><usage type='{t}'><{c}></{c}></usage></secret>"))
case("def_dtd", lambda: define_once("<!DOCTYPE secret [<!ENTITY e 'x'>]><secret><description>&e;</description>"
                               f"<uuid>{UUIDS['U_DTD']}</uuid></secret>"))


def own_connection(doc):
    """On a connection of its own (a server may drop it), then whether this one still works."""
    c = libvirt.open(uri)
    try:
        s = c.secretDefineXML(doc, 0)
        r = [s.UUIDString(), len(s.XMLDesc(0))]
        s.undefine()
        return r
    finally:
        try:
            c.close()
        except libvirt.libvirtError:
            pass


case("def_large_1mib", lambda: own_connection(xml("U_BIG", desc="d" * ((1 << 20) - 200), usage=None)))
case("def_oversize_1_5mib", lambda: own_connection(xml("U_BIG", desc="d" * (3 << 19), usage=None)))
case("def_oversize_2mib", lambda: own_connection(xml("U_BIG", desc="d" * (2 << 20), usage=None)))
case("def_oversize_3mib", lambda: own_connection(xml("U_BIG", desc="d" * (3 << 20), usage=None)))
case("def_oversize_5mib", lambda: own_connection(xml("U_BIG", desc="d" * (5 << 20), usage=None)))

# -- redefine -------------------------------------------------------------------------------
case("re_base", lambda: define(xml("U_RE", usage="ceph", uid="re-x")))
case("re_base_value", lambda: by_uuid("U_RE").setValue(b"re-value"))
case("re_description", lambda: define(xml("U_RE", usage="ceph", uid="re-x", desc="now described")))
case("re_value_kept", lambda: value("U_RE"))
case("re_usage_id_changed", lambda: define(xml("U_RE", usage="ceph", uid="re-y")))
case("re_usage_removed", lambda: define(xml("U_RE", usage=None)))
case("re_type_changed_same_id", lambda: define(xml("U_RE", usage="tls", uid="re-x")))
case("re_private_on", lambda: define(xml("U_RE", priv="yes", usage="tls", uid="re-x")))
case("re_private_off", lambda: define(xml("U_RE", priv="no", usage="tls", uid="re-x")))
case("re_persistent_to_ephemeral", lambda: define(xml("U_RE", eph="yes", priv="yes", usage="tls", uid="re-x")))
case("re_value_after_ephemeral", lambda: value("U_RE"))
case("re_ephemeral_to_persistent", lambda: define(xml("U_RE", priv="yes", usage="tls", uid="re-x")))
case("re_list_after", lambda: [listall(libvirt.VIR_CONNECT_LIST_SECRETS_EPHEMERAL),
                               listall(libvirt.VIR_CONNECT_LIST_SECRETS_PRIVATE)])
case("re_dup_usage_new_uuid", lambda: define(xml("U_SPARE", usage="tls", uid="re-x")))
case("re_dup_usage_private_new_uuid", lambda: define(xml("U_SPARE", priv="yes", usage="iscsi",
                                                         uid="iqn.2013-07.com.example:t1")))
case("re_dup_no_usage_new_uuid", lambda: define(xml("U_SPARE", usage=None)) and by_uuid("U_SPARE").undefine())
# U_RE2 holds ceph " client.admin secret "; U_CEPH holds ceph client.admin
case("re_type_into_held_usage", lambda: define(xml("U_RE2", usage="iscsi", uid="iqn.2013-07.com.example:t1")))
case("re_type_into_held_usage_same_id", lambda: define(xml("U_CEPH", priv="yes", usage="tls", uid="client.admin")))


def type_into_held_usage():
    """ceph x -> tls x while another secret holds tls x (research §9.2); both undefined after."""
    try:
        define(xml("U_HOLD", usage="tls", uid="shared-id"))
        define(xml("U_MOVE", usage="ceph", uid="shared-id"))
        r = define(xml("U_MOVE", usage="tls", uid="shared-id"))
        return [r, sorted(norm(s.UUIDString()) for s in conn.listAllSecrets(0) if s.usageID() == "shared-id")]
    finally:
        for n in ("U_HOLD", "U_MOVE"):
            by_uuid(n).undefine()


case("re_type_into_held_usage_of_same_id", type_into_held_usage)
case("re_type_changed_back", lambda: define(xml("U_CEPH", priv="yes", usage="ceph", uid="client.admin")))
case("re_toeph_base", lambda: define(xml("U_TOEPH", usage="volume", uid="/toeph.img")))
case("re_toeph_value", lambda: by_uuid("U_TOEPH").setValue(b"toeph-value"))
case("re_toeph", lambda: define(xml("U_TOEPH", eph="yes", usage="volume", uid="/toeph.img")))

# -- lookups --------------------------------------------------------------------------------
case("lookup_uuid_string", lambda: by_uuid("U_TLS").UUIDString())
case("lookup_uuid_string_upper", lambda: conn.secretLookupByUUIDString(UUIDS["U_TLS"].upper()).UUIDString())
case("lookup_uuid_string_miss", lambda: by_uuid("U_SPARE").UUIDString())
case("lookup_uuid_string_invalid", lambda: conn.secretLookupByUUIDString("nope").UUIDString())
case("lookup_uuid_bytes", lambda: conn.secretLookupByUUID(uuid_bytes("U_VOL")).UUIDString())
case("lookup_uuid_bytes_miss", lambda: conn.secretLookupByUUID(uuid_bytes("U_SPARE")).UUIDString())
for _t, (_n, _c) in USAGE.items():
    case(f"lookup_usage_{_t}_miss", lambda n=_n: conn.secretLookupByUsage(n, "nope").UUIDString())
case("lookup_usage_volume", lambda: conn.secretLookupByUsage(1, "/var/lib/libvirt/images/a.img").UUIDString())
case("lookup_usage_ceph", lambda: conn.secretLookupByUsage(2, "client.admin").UUIDString())
case("lookup_usage_iscsi", lambda: conn.secretLookupByUsage(3, "iqn.2013-07.com.example:t1").UUIDString())
case("lookup_usage_tls", lambda: conn.secretLookupByUsage(4, "mumblyfratz").UUIDString())
case("lookup_usage_vtpm", lambda: conn.secretLookupByUsage(5, "vTPMvTPMvTPM").UUIDString())
case("lookup_usage_ephemeral", lambda: conn.secretLookupByUsage(4, "eph-tls").UUIDString())
case("lookup_usage_spaces", lambda: conn.secretLookupByUsage(2, " client.admin secret ").UUIDString())
case("lookup_usage_wrong_type", lambda: conn.secretLookupByUsage(4, "client.admin").UUIDString())
case("lookup_usage_none", lambda: conn.secretLookupByUsage(0, "").UUIDString())
case("lookup_usage_type_99", lambda: conn.secretLookupByUsage(99, "x").UUIDString())
case("lookup_usage_type_negative", lambda: conn.secretLookupByUsage(-1, "x").UUIDString())
case("lookup_handle_usage", lambda: [[s.usageType(), s.usageID()] for s in
                                     (by_uuid(n) for n in ("U_VOL", "U_CEPH", "U_NONE", "U_EPH"))])

# -- values ---------------------------------------------------------------------------------
case("value_none_set", lambda: value("U_TLS"))
case("value_set_normal", lambda: by_uuid("U_TLS").setValue(b"tls passphrase"))
case("value_get_normal", lambda: value("U_TLS"))
case("value_set_binary", lambda: by_uuid("U_VOL").setValue(b"\x00bin\x00\xff\x00"))
case("value_get_binary", lambda: value("U_VOL"))
case("value_set_max", lambda: by_uuid("U_ISCSI").setValue(bytes(range(256)) * 256))
case("value_get_max", lambda: value("U_ISCSI"))
case("value_set_over_max", lambda: by_uuid("U_ISCSI").setValue(b"o" * 65537))
case("value_get_after_over_max", lambda: value("U_ISCSI"))
case("value_set_empty_base", lambda: define(xml("U_EMPTY", usage=None)) and by_uuid("U_EMPTY").setValue(b"old"))
case("value_set_empty", lambda: by_uuid("U_EMPTY").setValue(b""))
case("value_get_after_empty", lambda: value("U_EMPTY"))
case("value_set_private", lambda: by_uuid("U_CEPH").setValue(b"ceph key"))
case("value_get_private", lambda: value("U_CEPH"))
case("value_set_ephemeral", lambda: by_uuid("U_EPH").setValue(b"eph value"))
case("value_get_ephemeral", lambda: value("U_EPH"))
case("value_set_bad_flags", lambda: by_uuid("U_TLS").setValue(b"x", 1))
case("value_get_bad_flags", lambda: digest(by_uuid("U_TLS").value(1)))
case("value_get_unchanged", lambda: value("U_TLS"))
case("xml_bad_flags", lambda: by_uuid("U_TLS").XMLDesc(1))
case("xml_every_secret", lambda: {NAMES.get(s.UUIDString(), "?"): s.XMLDesc(0) for s in conn.listAllSecrets(0)})


def after_undefine():
    s = conn.secretDefineXML(xml("U_GONE2", usage="tls", uid="gone"), 0)
    s.setValue(b"gone value")
    first = s.undefine()
    r = [first]
    for fn in (lambda: s.undefine(), lambda: digest(s.value(0)), lambda: s.setValue(b"x"), lambda: s.XMLDesc(0),
               lambda: s.UUIDString(), lambda: conn.secretLookupByUsage(4, "gone").UUIDString()):
        try:
            r.append({"ok": fn()})
        except libvirt.libvirtError as e:
            r.append({"err": [e.get_error_code(), e.get_error_domain(), e.get_error_message()]})
    return r


case("undefine_then_use", after_undefine)

# -- lists ----------------------------------------------------------------------------------
case("list_num", conn.numOfSecrets)
case("list_uuids", lambda: sorted(norm(conn.listSecrets())))
for _f in range(16):
    case(f"list_all_flags_{_f}", lambda f=_f: listall(f))
case("list_all_flags_16", lambda: listall(16))
case("list_all_flags_high", lambda: listall(1 << 31))

# -- a read-only connection, events ---------------------------------------------------------
ro = libvirt.openReadOnly(uri)
case("ro_list", lambda: sorted(norm(s.UUIDString()) for s in ro.listAllSecrets(0)))
case("ro_xml", lambda: ro.secretLookupByUUIDString(UUIDS["U_TLS"]).XMLDesc(0))
case("ro_get_value", lambda: digest(ro.secretLookupByUUIDString(UUIDS["U_TLS"]).value(0)))
case("ro_set_value", lambda: ro.secretLookupByUUIDString(UUIDS["U_TLS"]).setValue(b"ro"))
case("ro_undefine", lambda: ro.secretLookupByUUIDString(UUIDS["U_TLS"]).undefine())
case("ro_define", lambda: define_on(ro, xml("U_SPARE")))
case("ro_value_unchanged", lambda: value("U_TLS"))
ro.close()


def register(secret, event_id):
    cb = conn.secretEventRegisterAny(secret, event_id, lambda *a: None, None)
    return [cb >= 0, conn.secretEventDeregisterAny(cb)]


case("event_register", lambda: register(by_uuid("U_TLS"), libvirt.VIR_SECRET_EVENT_ID_LIFECYCLE))
case("event_register_all", lambda: register(None, libvirt.VIR_SECRET_EVENT_ID_VALUE_CHANGED))

# -- virsh ----------------------------------------------------------------------------------
with open(f"{work}/virsh.xml", "w") as f:
    f.write(xml("U_VIRSH", usage="tls", uid="virsh-tls"))
with open(f"{work}/virsh-bad.xml", "w") as f:
    f.write("<secret><usage type='ceph'/></secret>")
case("virsh_define", lambda: virsh("secret-define", f"{work}/virsh.xml"))
case("virsh_define_bad", lambda: virsh("secret-define", f"{work}/virsh-bad.xml"))
case("virsh_define_missing_file", lambda: virsh("secret-define", f"{work}/no-such.xml"))
case("virsh_list", lambda: virsh("secret-list"))
case("virsh_list_private", lambda: virsh("secret-list", "--private"))
case("virsh_list_no_ephemeral", lambda: virsh("secret-list", "--no-ephemeral"))
case("virsh_dumpxml", lambda: virsh("secret-dumpxml", UUIDS["U_VIRSH"]))
case("virsh_dumpxml_missing", lambda: virsh("secret-dumpxml", UUIDS["U_SPARE"]))
case("virsh_dumpxml_invalid", lambda: virsh("secret-dumpxml", "nope"))
case("virsh_set_value", lambda: virsh("secret-set-value", UUIDS["U_VIRSH"], "--base64",
                                      base64.b64encode(b"virsh value").decode()))
case("virsh_get_value", lambda: virsh_value("secret-get-value", UUIDS["U_VIRSH"]))
case("virsh_get_value_private", lambda: virsh_value("secret-get-value", UUIDS["U_CEPH"]))
case("virsh_get_value_none", lambda: virsh_value("secret-get-value", UUIDS["U_NONE"]))
case("virsh_undefine", lambda: virsh("secret-undefine", UUIDS["U_VIRSH"]))
case("virsh_undefine_again", lambda: virsh("secret-undefine", UUIDS["U_VIRSH"]))

# -- what is left for the store tests ---------------------------------------------------------
case("final_xml", lambda: {NAMES.get(s.UUIDString(), "?"): s.XMLDesc(0) for s in conn.listAllSecrets(0)})
conn.close()
print(json.dumps(out))

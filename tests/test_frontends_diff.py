"""Differential test of secretbusd's two front ends against each other: one daemon serving
D-Bus and libvirt RPC at once, the same calls through each, the answers compared.

What is compared is what the server sent (tests/harness/frontends.py): D-Bus calls are raw
dbus-fast messages (the error name, `org.libvirt.Error.<Kind>`, and its text), RPC calls raw
frames on the project's codec (the `remote_error`'s code, as the kind `core/errors.py` gives
that code, and its message). A secret is named by [UUID, usage type, usage id]: D-Bus's object
path and its properties, RPC's `remote_nonnull_secret`. Values: length and SHA-256, never printed.

- The session instance (no polkit): CASES run in order, first all on D-Bus, then (the store
  emptied) all on RPC, so each case sees the same secrets on both. A case whose answers differ
  is in TRIAGE: documented (docs/libvirt-differences.md, the row named, asserting what it says)
  or unclear (both answers asserted, the reason given). A bug not fixed yet would be in XFAIL
  (strict, asserting the right answer); there is none.
- Inputs that never reach an RPC server as they are (a UUID string: libvirt's client parses it
  and sends 16 bytes; a value over 65536 bytes: its client refuses it before sending) are
  compared with what python3-libvirt says over the RPC socket: that is what an RPC user gets.
- Values set on one front end read on the other; events: changes made on either, seen on both
  with the same content (RPC's also with the usage).
- The system instance with polkit (root; sbtest-member under test_rpc_polkit.py's kind of
  rules; sbtest-other, outside group libvirt): the same calls from the same store as each user
  on both, the refusals as polkit/README.md documents them; and the events a subscribed member
  is sent on both, filtered alike by getattr.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import harness
import pytest
from harness import programs
from harness.frontends import (
    KIND_OF_CODE,
    U32_MAX,
    DBusSide,
    Failure,
    RpcSide,
    dbus_event,
    digest,
    handle,
    rpc_event,
)
from harness.procs import remove_tree

import secretbus
from secretbus.core.model import VALUE_MAX
from secretbus.rpc import protocol as P

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
DEBIAN_PYTHON = "/usr/bin/python3"

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
    "U_EMPTY": "00000000-0000-4000-8000-00000000000d",    # the empty value (row 3)
    "U_SPARE": "00000000-0000-4000-8000-00000000000e",    # never defined (for long)
    "U_UPPER": "00000000-0000-4000-8000-0000000000ab",    # defined in upper case, no dashes
    "U_VALID": "00000000-0000-4000-8000-000000000012",
    "U_GONE": "00000000-0000-4000-8000-000000000016",     # defined, undefined
    "U_HOLD": "00000000-0000-4000-8000-000000000017",
    "U_MOVE": "00000000-0000-4000-8000-000000000018",
}
NAMES = {v: k for k, v in UUIDS.items()}
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
USAGE = {"volume": (1, "volume"), "ceph": (2, "name"), "iscsi": (3, "target"), "tls": (4, "name"),
         "vtpm": (5, "name")}


def norm(v: Any) -> Any:
    """UUIDs in results and messages by their names (an unknown one, a generated UUID: <uuid>)."""
    if isinstance(v, str):
        return UUID_RE.sub(lambda m: NAMES.get(m.group(0).lower(), "<uuid>"), v)
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    if isinstance(v, dict):
        return {norm(k): norm(x) for k, x in v.items()}
    return v


Side = DBusSide | RpcSide


# -- the cases --------------------------------------------------------------------------------
CASES: list[tuple[str, Callable[..., Any]]] = []   # fn(side)


def case(name: str, fn: Callable[..., Any]) -> None:
    assert name not in dict(CASES), name
    CASES.append((name, fn))


def attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        return {"ok": norm(fn())}
    except Failure as e:
        return {"err": [e.kind, norm(e.text)]}


def run_cases(side: Side) -> dict[str, Any]:
    return {name: attempt(lambda fn=fn: fn(side)) for name, fn in CASES}   # type: ignore[misc]


def xml(uuid: str | None = None, eph: str | None = "no", priv: str = "no", usage: str | None = "ceph",
        uid: str = "client.admin", desc: str | None = None, raw_uuid: str | None = None) -> str:
    attrs = f" ephemeral='{eph}' private='{priv}'" if eph is not None else ""
    parts = [f"<secret{attrs}>"]
    if raw_uuid is not None:
        parts.append(f"<uuid>{raw_uuid}</uuid>")
    elif uuid is not None:
        parts.append(f"<uuid>{UUIDS[uuid]}</uuid>")
    if desc is not None:
        parts.append(f"<description>{desc}</description>")
    if usage is not None:
        child = USAGE[usage][1]
        parts.append(f"<usage type='{usage}'><{child}>{uid}</{child}></usage>")
    return "".join(parts) + "</secret>"


def full(s: Side, doc: str, flags: int = 0) -> list[Any]:
    """define, and the XML the server then gives back."""
    r = s.define(doc, flags)
    return [r, s.xml_desc(r[0])]


def generated(s: Side, doc: str) -> list[Any]:
    """A define without a UUID: the version digit of the one made, the XML, then undefined."""
    r = s.define(doc)
    out = [r[0][14], r[1:], s.xml_desc(r[0])]
    s.undefine(r[0])
    return out


def val(n: str) -> bytes:
    """A value of its own per secret name (never printed)."""
    return hashlib.sha256(b"frontends-diff-" + n.encode()).digest()


V_MAX = bytes(range(256)) * (VALUE_MAX // 256)
U = UUIDS

# define: each usage type, none, flags valid and not
case("def_volume", lambda s: full(s, xml("U_VOL", usage="volume", uid="/var/lib/libvirt/images/a.img")))
case("def_ceph_private", lambda s: full(s, xml("U_CEPH", priv="yes")))
case("def_iscsi", lambda s: full(s, xml("U_ISCSI", usage="iscsi", uid="iqn.2013-07.com.example:t1")))
case("def_tls", lambda s: full(s, xml("U_TLS", usage="tls", uid="mumblyfratz")))
case("def_vtpm_private", lambda s: full(s, xml("U_VTPM", priv="yes", usage="vtpm", uid="vTPMvTPMvTPM")))
case("def_no_usage", lambda s: full(s, xml("U_NONE", usage=None)))
case("def_ephemeral", lambda s: full(s, xml("U_EPH", eph="yes", usage="tls", uid="eph-tls")))
case("def_ephemeral_private", lambda s: full(s, xml("U_EPH_PRIV", eph="yes", priv="yes", usage=None)))
case("def_no_attributes", lambda s: full(s, xml("U_DESC", eph=None, usage=None)))
case("def_description", lambda s: full(s, xml("U_DESC", usage=None, desc="a &amp; b &lt;c&gt; \"q\" 'a'")))
case("def_usage_type_none", lambda s: full(s, f"<secret><uuid>{U['U_GONE']}</uuid><usage type='none'/></secret>"))
case("def_usage_type_none_gone", lambda s: s.undefine(U["U_GONE"]))
case("def_undashed_upper_uuid", lambda s: full(s, xml(raw_uuid=U["U_UPPER"].replace("-", "").upper(), usage=None)))
case("def_missing_uuid", lambda s: generated(s, xml(None, usage="tls", uid="generated")))
case("def_empty_uuid", lambda s: generated(s, xml(raw_uuid="", usage=None)))
case("def_validate_ok", lambda s: full(s, xml("U_VALID", usage="tls", uid="validated"), 1))
case("def_validate_relative_volume", lambda s: s.define(xml("U_SPARE", usage="volume", uid="rel.img"), 1))
case("def_validate_usage_none", lambda s: s.define("<secret><usage type='none'/></secret>", 1))
for _f in (2, 3, 4, 0x400, 1 << 31, U32_MAX):
    case(f"def_flags_{_f:#x}", lambda s, f=_f: s.define(xml("U_SPARE"), f))
# what the parser and the driver refuse
case("def_malformed_uuid", lambda s: s.define(xml(raw_uuid="not-a-uuid")))
case("def_short_uuid", lambda s: s.define(xml(raw_uuid=U["U_SPARE"][:-1])))
case("def_not_well_formed", lambda s: s.define("<secret><uuid>"))
case("def_not_xml", lambda s: s.define("this is not xml"))
case("def_empty_string", lambda s: s.define(""))
case("def_wrong_root", lambda s: s.define(f"<foo><uuid>{U['U_SPARE']}</uuid></foo>"))
case("def_namespaced_root", lambda s: s.define(f"<x:secret xmlns:x='urn:x'><uuid>{U['U_SPARE']}</uuid></x:secret>"))
case("def_ephemeral_maybe", lambda s: s.define(xml("U_SPARE", eph="maybe")))
case("def_private_1", lambda s: s.define(xml("U_SPARE", priv="1")))
case("def_usage_no_type", lambda s: s.define("<secret><usage><name>x</name></usage></secret>"))
case("def_usage_unknown", lambda s: s.define("<secret><usage type='bogus'/></secret>"))
for _t, (_n, _child) in USAGE.items():
    case(f"def_{_t}_missing_child", lambda s, t=_t: s.define(f"<secret><usage type='{t}'/></secret>"))
    case(f"def_{_t}_empty_id",
         lambda s, t=_t, c=_child: s.define(f"<secret><usage type='{t}'><{c}></{c}></usage></secret>"))
case("def_dtd", lambda s: s.define("<!DOCTYPE secret [<!ENTITY e 'x'>]><secret><description>&e;</description>"
                                   f"<uuid>{U['U_SPARE']}</uuid></secret>"))
case("def_description_too_long", lambda s: s.define(xml("U_SPARE", usage=None, desc="d" * (128 * 1024 + 1))))
case("def_usage_id_too_long", lambda s: s.define(xml("U_SPARE", usage="tls", uid="i" * 4097)))
case("def_oversize_1_5mib", lambda s: s.define(xml("U_SPARE", usage=None, desc="d" * (3 << 19))))
case("def_spare_still_free", lambda s: s.lookup_uuid(U["U_SPARE"]))
# what the document may carry around and inside the <secret>
_DOC = xml("U_SPARE", usage="tls", uid="doc")
for _name, _doc in (("decl", "<?xml version='1.0'?>" + _DOC),
                    ("decl_utf8", "<?xml version='1.0' encoding='UTF-8'?>" + _DOC),
                    ("decl_latin1", "<?xml version='1.0' encoding='ISO-8859-1'?>" + _DOC),
                    ("decl_utf16", "<?xml version='1.0' encoding='UTF-16'?>" + _DOC),
                    ("bom", "\ufeff" + _DOC), ("leading_space", "\n  " + _DOC), ("trailing_garbage", _DOC + "x"),
                    ("two_roots", _DOC + "<secret/>"), ("comment", "<!-- c -->" + _DOC),
                    ("pi", "<?pi x?>" + _DOC), ("cdata_usage", _DOC.replace(">doc<", "><![CDATA[doc]]><")),
                    ("unicode", xml("U_SPARE", usage="tls", uid="d\u00e9j\u00e0-\u2713-\U0001f600",
                                    desc="\u00e9\u2713\U0001f600")),
                    ("control_char", xml("U_SPARE", usage="tls", uid="a&#1;b")),
                    ("char_ref", xml("U_SPARE", usage="tls", uid="a&#233;b"))):
    case(f"doc_{_name}", lambda s, d=_doc: [attempt(lambda: full(s, d)), attempt(lambda: s.undefine(U["U_SPARE"]))])
case("lookup_usage_unicode_missing", lambda s: s.lookup_usage(4, "d\u00e9j\u00e0"))

# redefine
case("re_base", lambda s: s.define(xml("U_RE", usage="ceph", uid="re-x")))
case("re_base_value", lambda s: s.set_value(U["U_RE"], val("U_RE")))
case("re_description", lambda s: full(s, xml("U_RE", usage="ceph", uid="re-x", desc="now described")))
case("re_value_kept", lambda s: s.get_value(U["U_RE"]))
case("re_usage_id_changed", lambda s: s.define(xml("U_RE", usage="ceph", uid="re-y")))
case("re_usage_removed", lambda s: s.define(xml("U_RE", usage=None)))
case("re_type_changed_same_id", lambda s: full(s, xml("U_RE", usage="tls", uid="re-x")))
case("re_private_on", lambda s: s.define(xml("U_RE", priv="yes", usage="tls", uid="re-x")))
case("re_private_off", lambda s: s.define(xml("U_RE", priv="no", usage="tls", uid="re-x")))
case("re_persistent_to_ephemeral", lambda s: full(s, xml("U_RE", eph="yes", priv="yes", usage="tls", uid="re-x")))
case("re_value_after_ephemeral", lambda s: s.get_value(U["U_RE"]))
case("re_ephemeral_to_persistent", lambda s: full(s, xml("U_RE", priv="yes", usage="tls", uid="re-x")))
case("re_list_after", lambda s: [s.list(1), s.list(4)])
case("re_dup_usage_new_uuid", lambda s: s.define(xml("U_SPARE", usage="tls", uid="re-x")))
case("re_dup_usage_private_new_uuid",
     lambda s: s.define(xml("U_SPARE", priv="yes", usage="iscsi", uid="iqn.2013-07.com.example:t1")))
case("re_dup_no_usage_new_uuid", lambda s: [s.define(xml("U_SPARE", usage=None)), s.undefine(U["U_SPARE"])])
case("re_type_into_held_usage", lambda s: s.define(xml("U_RE2", usage="iscsi", uid="iqn.2013-07.com.example:t1")))
case("re_type_into_held_usage_same_id", lambda s: s.define(xml("U_CEPH", priv="yes", usage="tls", uid="client.admin")))
case("re_type_changed_back", lambda s: s.define(xml("U_CEPH", priv="yes", usage="ceph", uid="client.admin")))
case("re_hold_base", lambda s: [s.define(xml("U_HOLD", usage="tls", uid="shared-id")),
                                s.define(xml("U_MOVE", usage="ceph", uid="shared-id"))])
case("re_type_into_held_usage_of_same_id", lambda s: s.define(xml("U_MOVE", usage="tls", uid="shared-id")))
case("re_hold_gone", lambda s: [s.undefine(U["U_HOLD"]), s.undefine(U["U_MOVE"])])

# lookups: by UUID (the wire form of a valid one; strings: test_uuid_strings_as_rpc_users_see_them)
for _name in ("U_VOL", "U_CEPH", "U_NONE", "U_EPH", "U_UPPER", "U_RE"):
    case(f"lookup_uuid_{_name}", lambda s, n=_name: s.lookup_uuid(U[n]))
case("lookup_uuid_missing", lambda s: s.lookup_uuid(U["U_SPARE"]))
case("lookup_uuid_nil", lambda s: s.lookup_uuid("00000000-0000-0000-0000-000000000000"))
# by usage: each type, found and missing
for _t, _id in (("volume", "/var/lib/libvirt/images/a.img"), ("ceph", "client.admin"),
                ("iscsi", "iqn.2013-07.com.example:t1"), ("tls", "mumblyfratz"), ("vtpm", "vTPMvTPMvTPM")):
    case(f"lookup_usage_{_t}", lambda s, t=USAGE[_t][0], i=_id: s.lookup_usage(t, i))
    case(f"lookup_usage_{_t}_missing", lambda s, t=USAGE[_t][0]: s.lookup_usage(t, "nope"))
case("lookup_usage_ephemeral", lambda s: s.lookup_usage(4, "eph-tls"))
case("lookup_usage_wrong_type", lambda s: s.lookup_usage(4, "client.admin"))
case("lookup_usage_case", lambda s: s.lookup_usage(2, "CLIENT.ADMIN"))
case("lookup_usage_empty_id", lambda s: s.lookup_usage(2, ""))
case("lookup_usage_type_none_empty", lambda s: s.lookup_usage(0, ""))
case("lookup_usage_type_none", lambda s: s.lookup_usage(0, "client.admin"))
for _ty in (6, 99, -1, 2**31 - 1, -2**31):
    case(f"lookup_usage_type_{_ty}", lambda s, t=_ty: s.lookup_usage(t, "client.admin"))

# GetXMLDesc
for _f in (0, 1, 2, 1 << 31, U32_MAX):
    case(f"xml_flags_{_f:#x}", lambda s, f=_f: s.xml_desc(U["U_TLS"], f))
case("xml_missing", lambda s: s.xml_desc(U["U_SPARE"]))
case("xml_missing_bad_flags", lambda s: s.xml_desc(U["U_SPARE"], 1))
case("xml_every_secret", lambda s: {u: s.xml_desc(u) for u in s.list(0)})

# values: sizes 0, 1, 65536, 65537; flags; private; ephemeral; none set; no secret
case("value_none_set", lambda s: s.get_value(U["U_TLS"]))
case("value_set_1", lambda s: s.set_value(U["U_TLS"], val("U_TLS")[:1]))
case("value_get_1", lambda s: s.get_value(U["U_TLS"]))
case("value_set_binary", lambda s: s.set_value(U["U_VOL"], b"\x00" + val("U_VOL") + b"\x00\xff\x00"))
case("value_get_binary", lambda s: s.get_value(U["U_VOL"]))
case("value_set_max", lambda s: s.set_value(U["U_ISCSI"], V_MAX))
case("value_get_max", lambda s: s.get_value(U["U_ISCSI"]))
case("value_set_over_max", lambda s: s.set_value(U["U_ISCSI"], b"o" * (VALUE_MAX + 1)))
case("value_get_after_over_max", lambda s: s.get_value(U["U_ISCSI"]))
case("value_set_empty_base", lambda s: [s.define(xml("U_EMPTY", usage=None)), s.set_value(U["U_EMPTY"], b"old")])
case("value_set_empty", lambda s: s.set_value(U["U_EMPTY"], b""))
case("value_get_after_empty", lambda s: s.get_value(U["U_EMPTY"]))
case("value_set_empty_none_before", lambda s: s.set_value(U["U_NONE"], b""))
case("value_get_empty_none_before", lambda s: s.get_value(U["U_NONE"]))
case("value_set_empty_bad_flags", lambda s: s.set_value(U["U_TLS"], b"", 1))
case("value_set_private", lambda s: s.set_value(U["U_CEPH"], val("U_CEPH")))
case("value_get_private", lambda s: s.get_value(U["U_CEPH"]))
case("value_get_private_no_value", lambda s: s.get_value(U["U_VTPM"]))
case("value_set_ephemeral", lambda s: s.set_value(U["U_EPH"], val("U_EPH")))
case("value_get_ephemeral", lambda s: s.get_value(U["U_EPH"]))
for _f in (1, 2, 1 << 31, U32_MAX):
    case(f"value_set_flags_{_f:#x}", lambda s, f=_f: s.set_value(U["U_TLS"], b"x", f))
    case(f"value_get_flags_{_f:#x}", lambda s, f=_f: s.get_value(U["U_TLS"], f))
case("value_get_unchanged", lambda s: s.get_value(U["U_TLS"]))
case("value_set_missing", lambda s: s.set_value(U["U_SPARE"], b"x"))
case("value_get_missing", lambda s: s.get_value(U["U_SPARE"]))
case("value_set_missing_bad_flags", lambda s: s.set_value(U["U_SPARE"], b"x", 1))
case("value_get_missing_bad_flags", lambda s: s.get_value(U["U_SPARE"], 1))
case("value_set_over_max_missing", lambda s: s.set_value(U["U_SPARE"], b"o" * (VALUE_MAX + 1)))


# undefine, twice, and what is left of the secret
def after_undefine(s: Side) -> list[Any]:
    s.define(xml("U_GONE", usage="tls", uid="gone"))
    s.set_value(U["U_GONE"], val("U_GONE"))
    g = U["U_GONE"]
    return [attempt(f) for f in (lambda: s.undefine(g), lambda: s.undefine(g), lambda: s.get_value(g),
                                 lambda: s.set_value(g, b"x"), lambda: s.xml_desc(g), lambda: s.lookup_uuid(g),
                                 lambda: s.lookup_usage(4, "gone"), lambda: s.list(0))]


case("undefine_then_use", after_undefine)
case("undefine_missing", lambda s: s.undefine(U["U_SPARE"]))
case("undefine_ephemeral", lambda s: [s.undefine(U["U_EPH_PRIV"]), attempt(lambda: s.lookup_uuid(U["U_EPH_PRIV"]))])

# lists: every flag combination, and flags libvirt does not know
for _f in [*range(16), 16, 0x400, 1 << 31, U32_MAX]:
    case(f"list_flags_{_f:#x}", lambda s, f=_f: s.list(f))
case("final_xml", lambda s: {u: s.xml_desc(u) for u in s.list(0)})


# -- the servers --------------------------------------------------------------------------------
def empty_store(side: Side) -> None:
    for u in side.list(0):
        side.undefine(u)
    assert side.list(0) == []


@pytest.fixture(scope="module")
def served():
    """One session secretbusd on a private bus serving D-Bus and RPC (--rpc-dir), running this
    checkout's code."""
    assert Path(secretbus.__file__).resolve().is_relative_to(REPO), secretbus.__file__
    bus = harness.PrivateBus("session").start()
    rpc_dir = harness.public_tempdir("sb-rpc-")
    d = harness.Secretbusd(bus, args=("--rpc-dir", str(rpc_dir)))
    try:
        d.start()
        assert d.proc is not None
        env = Path(f"/proc/{d.proc.pid}/environ").read_bytes().split(b"\0")
        assert f"PYTHONPATH={REPO}".encode() in [e.split(b":")[0] for e in env], "the daemon runs another checkout"
        yield SimpleNamespace(bus=bus, daemon=d, sock=rpc_dir / "virtsecretd-sock",
                              uri=f"secret:///session?socket={rpc_dir}/virtsecretd-sock")
    finally:
        d.cleanup()
        remove_tree(rpc_dir)
        bus.stop()


@pytest.fixture(scope="module")
def runs(served):
    out = {}
    for side in (DBusSide(served.bus.address), RpcSide(served.sock)):
        try:
            out[side.label] = run_cases(side)
            empty_store(side)
        finally:
            side.close()
    return SimpleNamespace(dbus=out["dbus"], rpc=out["rpc"])


# -- the triage ---------------------------------------------------------------------------------
# A checker gets (D-Bus's results, RPC's results, case name). Every case not here must be
# answered alike.
NULL_VALUE = ["InvalidArg", "value in virSecretSetValue must not be NULL"]
OVER_MAX = ["RPCError", f"value length greater than maximum: {VALUE_MAX + 1} > {VALUE_MAX}"]
UNDECODABLE = ["RPCError", "Unable to decode message payload"]


def _row3_empty_refused(db, rpc, name):
    # docs/libvirt-differences.md row 3: over RPC an empty value is libvirt's NULL and refused
    # (before the flags are looked at); over D-Bus it is a real value.
    assert rpc[name] == {"err": NULL_VALUE}
    assert db[name] == ({"ok": None} if name != "value_set_empty_bad_flags"
                        else {"err": ["InvalidArg", "unsupported flags (0x1) in function secretSetValue"]})


def _row3_empty_kept(db, rpc, name):
    # Row 3: D-Bus returns the empty value it stored; over RPC the value before it is still
    # there (U_EMPTY's "old"), or there is none (U_NONE).
    assert db[name] == {"ok": digest(b"")}
    want = {"ok": digest(b"old")} if name == "value_get_after_empty" else \
        {"err": ["NoSecret", f"Secret not found: secret '{NAMES[U['U_NONE']]}' does not have a value"]}
    assert rpc[name] == want


def _over_max_not_decoded(db, rpc, name):
    # Unclear (not in the docs): a value over 65536 bytes. The D-Bus front end answers with the
    # check libvirt's remote driver makes before it sends (docs/libvirt-differences.md, "Error
    # texts": VIR_ERR_RPC `value length greater than maximum`); the RPC server cannot read such
    # an opaque (remote_secret_value is bounded to 65536) and says so, as libvirtd 9.0 does
    # (tests/test_libvirtd_wire_diff.py). No libvirt client sends one: python3-libvirt refuses it
    # with D-Bus's text (test_uuid_strings_as_rpc_users_see_them). The D-Bus front end looks up
    # the path before the arguments (as libvirt-dbus, see _lookup_before_flags): a missing
    # secret is NoSecret there.
    assert db[name] == {"err": OVER_MAX if name == "value_set_over_max" else
                        ["NoSecret", "Secret not found: no secret with matching uuid 'U_SPARE'"]}
    assert rpc[name] == {"err": UNDECODABLE}


def _lookup_before_flags(db, rpc, name):
    # Unclear (not in the docs): a missing secret asked with bad flags. Over D-Bus the object
    # path is looked up before the method's arguments are looked at, as libvirt-dbus does
    # (virtDBusSecretGetVirSecret, then the libvirt call with the flags): NoSecret. Over RPC the
    # flags are checked first, as libvirt's secret driver does (virCheckFlags before
    # secObjFromSecret): InvalidArg. Each front end answers as its libvirt counterpart.
    fn = {"xml": "secretGetXMLDesc", "value_set": "secretSetValue", "value_get": "secretGetValue"}
    func = next(v for k, v in fn.items() if name.startswith(k))
    assert db[name] == {"err": ["NoSecret", "Secret not found: no secret with matching uuid 'U_SPARE'"]}
    assert rpc[name] == {"err": ["InvalidArg", f"unsupported flags (0x1) in function {func}"]}


TRIAGE: dict[str, Callable[[Any, Any, str], None]] = {
    "value_set_empty": _row3_empty_refused,
    "value_set_empty_none_before": _row3_empty_refused,
    "value_set_empty_bad_flags": _row3_empty_refused,
    "value_get_after_empty": _row3_empty_kept,
    "value_get_empty_none_before": _row3_empty_kept,
    "value_set_over_max": _over_max_not_decoded,
    "value_set_over_max_missing": _over_max_not_decoded,
    "xml_missing_bad_flags": _lookup_before_flags,
    "value_set_missing_bad_flags": _lookup_before_flags,
    "value_get_missing_bad_flags": _lookup_before_flags,
}
# Bugs not fixed yet: the case asserts the right answer, and fails until it is fixed (none now).
XFAIL: dict[str, str] = {}
NAMES_OF_CASES = [n for n, _ in CASES]


def _param(name: str) -> Any:
    if name in XFAIL:
        return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=XFAIL[name]))
    return name


def test_every_case_ran(runs):
    assert list(runs.dbus) == list(runs.rpc) == NAMES_OF_CASES
    assert set(TRIAGE) <= set(NAMES_OF_CASES) and set(XFAIL) <= set(NAMES_OF_CASES)
    # The cases do reach the driver: most define, find or list something, and fail alike only
    # where they should.
    assert sum("ok" in r for r in runs.dbus.values()) > 60
    assert sum("err" in r for r in runs.dbus.values()) > 60


@pytest.mark.parametrize("name", [_param(n) for n in NAMES_OF_CASES])
def test_case(runs, name):
    check = TRIAGE.get(name)
    if check is None:
        assert runs.dbus[name] == runs.rpc[name]
    else:
        check(runs.dbus, runs.rpc, name)


def test_no_value_in_the_log(runs, served):
    log = served.daemon.log()
    for n in UUIDS:
        assert val(n).hex() not in log and base64.b64encode(val(n)).decode() not in log


def test_values_across_front_ends(served):
    """A value set on one front end is the value read on the other; an empty one set over
    D-Bus (row 3: a real value there) is read over RPC as empty too, not as no value."""
    db, rpc = DBusSide(served.bus.address), RpcSide(served.sock)
    u = UUIDS["U_VOL"]
    try:
        rpc.define(xml("U_VOL", usage="volume", uid="/across.img"))
        got = []
        for setter, getter, value in ((db, rpc, val("a")), (rpc, db, val("b") * 2048), (db, rpc, b""),
                                      (rpc, db, b"\0")):
            setter.set_value(u, value)
            got.append([getter.get_value(u), setter.get_value(u)])
        assert got == [[digest(v), digest(v)] for v in (val("a"), val("b") * 2048, b"", b"\0")]
    finally:
        empty_store(db)
        db.close()
        rpc.close()


# -- inputs an RPC client never sends as they are -----------------------------------------------
UUID_STRINGS = [
    UUIDS["U_TLS"], UUIDS["U_TLS"].upper(), UUIDS["U_TLS"].replace("-", ""),
    " " + " ".join(UUIDS["U_TLS"].replace("-", "")[i:i + 2] for i in range(0, 32, 2)) + " ",
    "\t" + UUIDS["U_TLS"] + "\n", UUIDS["U_TLS"][:9] + "-" + UUIDS["U_TLS"][9:],
    UUIDS["U_SPARE"], "nope", "", UUIDS["U_TLS"][:-1], UUIDS["U_TLS"] + "0", UUIDS["U_TLS"][1:] + "-",
    "0000000-00000-4000-8000-000000000004", UUIDS["U_TLS"].replace("-", "_"),
]


def test_uuid_strings_as_rpc_users_see_them(served, tmp_path):
    """A UUID string: D-Bus's SecretLookupByUUID against python3-libvirt's
    secretLookupByUUIDString over the RPC socket (its client parses the string; the server gets
    16 bytes or nothing). And a value over 65536 bytes: D-Bus's answer is that client's."""
    if not Path(DEBIAN_PYTHON).exists():
        pytest.skip("Debian's python3 (python3-libvirt) not installed")
    db = DBusSide(served.bus.address)
    try:
        db.define(xml("U_TLS", usage="tls", uid="strings"))
        try:
            r = subprocess.run([DEBIAN_PYTHON, "-c", programs.source("libvirt_uuid_strings"), served.uri,
                                UUIDS["U_TLS"], json.dumps(UUID_STRINGS)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr[-2000:]
            lv = json.loads(r.stdout)
            ours = [attempt(functools.partial(lambda s: db.lookup_uuid(s)[0], s)) for s in UUID_STRINGS]
            over = attempt(lambda: db.set_value(UUIDS["U_TLS"], b"o" * (VALUE_MAX + 1)))
        finally:
            empty_store(db)
    finally:
        db.close()

    def as_kind(res: dict[str, Any]) -> dict[str, Any]:
        if "err" in res:
            code, _domain, msg = res["err"]
            return {"err": [KIND_OF_CODE.get(code, f"code {code}"), norm(msg)]}
        return {"ok": norm(res["ok"])}
    theirs = [as_kind(x) for x in lv["lookup"]]
    assert ours == theirs
    assert sum("ok" in x for x in ours) == 6 and sum("err" in x for x in ours) == len(UUID_STRINGS) - 6
    assert over == as_kind(lv["set_over_max"]) == {"err": OVER_MAX}


# -- events: a change on either front end, seen on both -----------------------------------------
def _rpc_events(side: RpcSide, n: int, deadline: float) -> list[tuple[int, list[Any]]]:
    """(callback id, event) of the MESSAGE frames seen, until `n` of them or the deadline."""
    out: list[tuple[int, list[Any]]] = []
    while len(out) < n and time.monotonic() < deadline:
        try:
            ev = rpc_event(*side.wait_message(max(0.05, deadline - time.monotonic())))
        except TimeoutError:
            break
        if ev is not None:
            out.append(ev)
    return out


def _dbus_events(side: DBusSide, n: int, deadline: float) -> list[list[Any]]:
    while len(side.signals) < n and time.monotonic() < deadline:
        side.pump(0.02)
    out = [e for e in map(dbus_event, side.signals) if e is not None]
    side.signals.clear()
    return out


def test_events_seen_alike_on_both(served):
    db, rpc = DBusSide(served.bus.address), RpcSide(served.sock)
    actor = RpcSide(served.sock)        # changes over RPC come from another connection
    try:
        cb_life = rpc.call(P.Proc.CONNECT_SECRET_EVENT_REGISTER_ANY, {"eventID": 0, "secret": None})["callbackID"]
        cb_value = rpc.call(P.Proc.CONNECT_SECRET_EVENT_REGISTER_ANY, {"eventID": 1, "secret": None})["callbackID"]
        # libvirt's per-secret registration; D-Bus's equivalent is a match rule on arg0
        cb_one = rpc.call(P.Proc.CONNECT_SECRET_EVENT_REGISTER_ANY,
                          {"eventID": 0, "secret": handle(UUIDS["U_RE2"])})["callbackID"]
        tls, re2 = UUIDS["U_TLS"], UUIDS["U_RE2"]
        steps: list[tuple[Side, Callable[[Side], Any]]] = [
            (db, lambda s: s.define(xml("U_TLS", usage="tls", uid="ev"))),
            (actor, lambda s: s.set_value(tls, val("U_TLS"))),
            (actor, lambda s: s.define(xml("U_TLS", usage="tls", uid="ev", desc="again"))),
            (db, lambda s: s.set_value(tls, b"")),                       # row 3: a value over D-Bus
            (actor, lambda s: attempt(lambda: s.set_value(tls, b""))),  # refused: no event
            (db, lambda s: attempt(lambda: s.define(xml("U_TLS", usage="tls", uid="other")))),  # refused
            (actor, lambda s: s.define(xml("U_RE2", eph="yes", usage="ceph", uid="ev2"))),
            (db, lambda s: s.set_value(re2, val("U_RE2"))),
            (db, lambda s: s.undefine(tls)),
            (actor, lambda s: s.undefine(re2)),
        ]
        for side, step in steps:
            step(side)
        want = [["lifecycle", tls, 4, "ev", 0, 0], ["value-changed", tls, 4, "ev"], ["lifecycle", tls, 4, "ev", 0, 0],
                ["value-changed", tls, 4, "ev"], ["lifecycle", re2, 2, "ev2", 0, 0], ["value-changed", re2, 2, "ev2"],
                ["lifecycle", tls, 4, "ev", 1, 0], ["lifecycle", re2, 2, "ev2", 1, 0]]
        deadline = time.monotonic() + 10
        got_rpc = _rpc_events(rpc, len(want) + 2, deadline)          # + the per-secret ones
        got_db = _dbus_events(db, len(want), deadline)
        time.sleep(0.2)                                              # nothing more arrives
        got_rpc += _rpc_events(rpc, 1, time.monotonic() + 0.05)
        got_db += _dbus_events(db, len(want) + 1, time.monotonic() + 0.05)
    finally:
        for s in (db, rpc, actor):
            s.close()
    # RPC events carry the usage, D-Bus signals only the path: compared on the UUID, event, detail
    assert [e for cb, e in got_rpc if cb in (cb_life, cb_value)] == want
    assert [[e[0], e[1], *e[4:]] for e in want] == got_db
    assert [e for cb, e in got_rpc if cb == cb_one] == [w for w in want if w[1] == re2 and w[0] == "lifecycle"]
    assert {cb for cb, _ in got_rpc} == {cb_life, cb_value, cb_one}



# -- the system instance with polkit: access, as root and as the test users ---------------------
BUS_CONF = REPO / "dbus" / "org.libvirt.secret.conf"
ACTIONS = [(f"sbtest-fediff.{n}", (REPO / "polkit" / n).read_text())
           for n in ("org.libvirt.api.secret.policy", "org.libvirt.unix.policy")]
ACCESS = {
    "A_OPEN": "7a0f0002-0000-4000-8000-000000000001",      # member may read and write its value
    "A_VISIBLE": "7a0f0002-0000-4000-8000-000000000002",   # member sees it, may not read or write its value
    "A_HIDDEN": "7a0f0002-0000-4000-8000-000000000003",    # member may not even see it
    "A_PRIVATE": "7a0f0002-0000-4000-8000-000000000004",   # private; member may read-secure it, and is a reader
    "A_PRIV2": "7a0f0002-0000-4000-8000-000000000006",     # private; member may not read-secure it
    "A_NEW": "7a0f0002-0000-4000-8000-000000000005",       # never defined
}
RULES = [("50-sbtest-fediff.rules", f"""
polkit.addRule(function(action, subject) {{
    var uuid = action.lookup("secret_uuid");
    if (action.id == "org.libvirt.unix.manage" && subject.isInGroup("libvirt"))
        return polkit.Result.YES;
    if (uuid == "{ACCESS['A_HIDDEN']}")
        return polkit.Result.NO;
    if ((action.id == "org.libvirt.api.secret.read-secure" || action.id == "org.libvirt.api.secret.write") &&
            (uuid == "{ACCESS['A_OPEN']}" || uuid == "{ACCESS['A_PRIVATE']}") && subject.isInGroup("libvirt"))
        return polkit.Result.YES;
    return polkit.Result.NOT_HANDLED;
}});
""")]
ACCESS_NAMES = {v: k for k, v in ACCESS.items()}


def access_xml(name: str, private: str = "no") -> str:
    return (f"<secret ephemeral='no' private='{private}'><uuid>{ACCESS[name]}</uuid><usage type='volume'>"
            f"<volume>/var/lib/sbtest/fediff-{name}.img</volume></usage></secret>")


def access_calls() -> list[list[Any]]:
    """The calls each front end gets, in order: [label, operation, args...]."""
    calls: list[list[Any]] = []
    for n, u in ACCESS.items():
        calls += [[f"lookup_uuid_{n}", "lookup_uuid", u], [f"xml_{n}", "xml_desc", u],
                  [f"get_value_{n}", "get_value", u]]
    return calls + [
        ["lookup_usage_A_HIDDEN", "lookup_usage", 1, "/var/lib/sbtest/fediff-A_HIDDEN.img"],
        ["lookup_usage_A_VISIBLE", "lookup_usage", 1, "/var/lib/sbtest/fediff-A_VISIBLE.img"],
        ["list", "list", 0], ["list_private", "list", 4],
        ["set_value_A_OPEN", "set_value", ACCESS["A_OPEN"], "hex:" + val("A_OPEN2").hex()],
        ["get_value_A_OPEN_after", "get_value", ACCESS["A_OPEN"]],
        ["set_value_A_OPEN_back", "set_value", ACCESS["A_OPEN"], "hex:" + val("A_OPEN").hex()],
        ["set_value_A_VISIBLE", "set_value", ACCESS["A_VISIBLE"], "hex:00"],
        ["set_value_A_HIDDEN", "set_value", ACCESS["A_HIDDEN"], "hex:00"],
        ["get_value_bad_flags_A_HIDDEN", "get_value", ACCESS["A_HIDDEN"], 1],
        ["xml_bad_flags_A_HIDDEN", "xml_desc", ACCESS["A_HIDDEN"], 1],
        ["define_A_NEW", "define", access_xml("A_NEW")],
        ["define_bad_flags", "define", access_xml("A_NEW"), 2],
        ["define_malformed", "define", "<secret>"],
        ["define_clash_A_HIDDEN", "define", access_xml("A_HIDDEN").replace(ACCESS["A_HIDDEN"], ACCESS["A_NEW"])],
        ["redefine_A_HIDDEN", "define", access_xml("A_HIDDEN")],
        ["redefine_A_PRIVATE_public", "define", access_xml("A_PRIVATE")],
        ["set_value_empty_A_HIDDEN", "set_value", ACCESS["A_HIDDEN"], "hex:"],
        ["set_value_over_max_A_HIDDEN", "set_value", ACCESS["A_HIDDEN"], "hex:" + "00" * (VALUE_MAX + 1)],
        ["redefine_A_VISIBLE", "define", access_xml("A_VISIBLE")],
        ["undefine_A_VISIBLE", "undefine", ACCESS["A_VISIBLE"]],
        ["undefine_A_HIDDEN", "undefine", ACCESS["A_HIDDEN"]],
    ]


@pytest.fixture
def system_served(system_bus, make_polkitd, make_secretbusd, rpc_dir, test_users, unpriv_python):
    """secretbusd --system (D-Bus and RPC, polkit asked for every call but root's; member in
    private_value_readers) with five secrets root defines over D-Bus before each front end's
    turn; `.run(user)` runs access_calls() as `user` on both."""
    make_polkitd(system_bus, actions=ACTIONS, rules=RULES)
    d = make_secretbusd(system_bus, system=True, args=("--rpc-dir", str(rpc_dir)),
                        conf=f'private_value_readers = [ "{test_users.member.name}" ]\n')
    src = (Path(harness.__file__).resolve().parent / "frontends.py").read_text()

    def reset() -> None:
        """The five secrets with their values, and nothing else (root, over D-Bus)."""
        root = DBusSide(system_bus.address)
        try:
            empty_store(root)
            for n, priv in (("A_OPEN", "no"), ("A_VISIBLE", "no"), ("A_HIDDEN", "no"), ("A_PRIVATE", "yes"),
                            ("A_PRIV2", "yes")):
                root.define(access_xml(n, priv))
                root.set_value(ACCESS[n], val(n))
        finally:
            root.close()

    def run(user: Any) -> tuple[dict[str, Any], ...]:
        """access_calls() as `user` (None: root, in a process of its own too) on each front end,
        each from the same store: D-Bus's answers, RPC's."""
        out: list[dict[str, Any]] = []
        for side in ("dbus", "rpc"):
            reset()
            spec = {"dbus": system_bus.address, "rpc": str(rpc_dir / "virtsecretd-sock"), "uri": "secret:///system",
                    "steps": [[c[0], side, *c[1:]] for c in access_calls()]}
            r = unpriv_python.run(user, "-c", src, input=json.dumps(spec) + "\n", timeout=60)
            assert r.returncode == 0, r.stderr[-3000:]
            out.append(json.loads(UUID_RE.sub(lambda m: ACCESS_NAMES.get(m.group(0), "<uuid>"), r.stdout)))
        return tuple(out)
    return SimpleNamespace(daemon=d, run=run, reset=reset, users=test_users)


DENIED_RPC = {"err": ["AccessDenied", "access denied: 'secret' denied access"]}
ACTION_OF = {"redefine_A_PRIVATE_public": "save",     # write granted (the rules), save not
             "lookup": "getattr", "xml": "read", "get_value": "read-secure", "set_value": "write",
             "define": "write", "redefine": "write", "undefine": "delete"}
# What member may not do (tests/test_rpc_polkit.py's rules): A_HIDDEN nothing; A_VISIBLE look
# and read its XML; A_PRIV2 not its value; write, save and delete nothing but A_OPEN's and A_PRIVATE's
# values (auth_admin_keep, no agent).
MEMBER_DENIED = {"get_value_A_VISIBLE", "lookup_uuid_A_HIDDEN", "xml_A_HIDDEN", "get_value_A_HIDDEN",
                 "lookup_usage_A_HIDDEN", "set_value_A_VISIBLE", "set_value_A_HIDDEN", "define_A_NEW",
                 "redefine_A_VISIBLE", "undefine_A_VISIBLE", "undefine_A_HIDDEN", "define_clash_A_HIDDEN",
                 "redefine_A_HIDDEN", "redefine_A_PRIVATE_public", "set_value_empty_A_HIDDEN",
                 "get_value_A_PRIV2"}


@pytest.mark.bus_policy(BUS_CONF)
@pytest.mark.parametrize("who", ["root", "member", "other"])
def test_access_alike_on_both(system_served, who):
    """The system instance, polkit asked for every call of a non-root caller on both front ends
    (root: decided by the service, as polkit would): the same calls from the same store."""
    db, rpc = system_served.run(None if who == "root" else getattr(system_served.users, who))
    labels = [c[0] for c in access_calls()]
    assert list(db) == list(rpc) == labels
    if who == "other":
        # Documented (polkit/README.md, "How a call on the system bus is let through", 1; DESIGN
        # §9): a user outside group libvirt never reaches the service on D-Bus (the bus policy:
        # dbus-daemon's AccessDenied), and over RPC is refused org.libvirt.unix.manage at
        # authentication (auth_admin_keep, no agent: VIR_ERR_AUTH_UNAVAILABLE, 94), as libvirt.
        for k in labels:
            assert db[k]["err"][0] == "org.freedesktop.DBus.Error.AccessDenied", (k, db[k])
            assert "Rejected send message" in db[k]["err"][1]
            assert rpc[k] == {"open": ["code 94", "authentication unavailable: no polkit agent available to "
                                                  "authenticate action 'org.libvirt.unix.manage'"]}, (k, rpc[k])
        return
    denied = set()
    for k in labels:
        if k == "set_value_empty_A_HIDDEN" and who == "root":
            # docs/libvirt-differences.md row 3: over RPC an empty value is refused as NULL
            # (before any check); over D-Bus it is a value (root may write it).
            assert db[k] == {"ok": None} and rpc[k] == {"err": NULL_VALUE}
        elif k == "set_value_empty_A_HIDDEN":
            # row 3 too: RPC refuses the NULL before any check; D-Bus asks, and is refused.
            assert rpc[k] == {"err": NULL_VALUE}
            assert db[k] == {"err": ["AccessDenied", "access denied: 'org.libvirt.api.secret.write' denied access"]}
            denied.add(k)
        elif k == "set_value_over_max_A_HIDDEN":
            # as value_set_over_max above (unclear): D-Bus's size check, RPC's undecodable opaque,
            # both before any access check
            assert db[k] == {"err": OVER_MAX} and rpc[k] == {"err": UNDECODABLE}
        elif k == "get_value_A_PRIVATE" and who == "member":
            # Documented (DESIGN §6 and §9, docs/libvirt-differences.md row 7): member is in
            # private_value_readers and granted read-secure: D-Bus returns the private value;
            # over RPC private values go to an elevated identity (system token) only.
            assert db[k] == {"ok": digest(val("A_PRIVATE"))}
            assert rpc[k] == {"err": ["InvalidSecret", "Invalid secret: secret is private"]}
        elif rpc[k] == DENIED_RPC:
            # Documented (polkit/README.md, same section, 2 and 3): a refusal over D-Bus names the
            # action, `'<action id>' denied access`; over RPC it is libvirt's `'secret' denied
            # access` (the action is in the log only).
            action = next(a for p, a in ACTION_OF.items() if k.startswith(p))
            want = f"access denied: 'org.libvirt.api.secret.{action}' denied access"
            assert db[k] == {"err": ["AccessDenied", want]}, k
            denied.add(k)
        else:
            assert db[k] == rpc[k], k
    assert denied == (set() if who == "root" else MEMBER_DENIED)
    # and what was allowed did happen (the same on both, above)
    seen = ["A_OPEN", "A_VISIBLE", "A_HIDDEN", "A_PRIVATE", "A_PRIV2"]
    assert db["list"] == {"ok": [n for n in seen if who == "root" or n != "A_HIDDEN"]}
    assert db["get_value_A_OPEN_after"] == {"ok": digest(val("A_OPEN2"))}
    assert rpc["get_value_A_PRIVATE"] == {"err": ["InvalidSecret", "Invalid secret: secret is private"]}
    if who == "root":         # not a reader: refused the private values on both
        assert db["get_value_A_PRIV2"] == rpc["get_value_A_PRIV2"] == rpc["get_value_A_PRIVATE"]
    assert ("ok" in db["define_A_NEW"]) == ("ok" in db["undefine_A_HIDDEN"]) == (who == "root")


@pytest.mark.bus_policy(BUS_CONF)
def test_system_events_filtered_alike(system_served, rpc_dir, system_bus, unpriv_python):
    """member subscribed on D-Bus (Connect.Subscribe) and registered over RPC; root changes
    secrets member may and may not getattr, on each front end: member is told the same on
    both, and nothing of A_HIDDEN (DESIGN §12: events reach only callers allowed getattr)."""
    system_served.reset()
    user = system_served.users.member
    src = (Path(harness.__file__).resolve().parent / "frontends.py").read_text()
    spec = {"dbus": system_bus.address, "rpc": str(rpc_dir / "virtsecretd-sock"), "uri": "secret:///system",
            "until": ACCESS["A_NEW"], "timeout": 15}
    proc = subprocess.Popen(harness.as_user(user, unpriv_python.argv("-c", src)),
                            env=unpriv_python.env(harness.user_env(user)), cwd="/", text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(spec) + "\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "ready\n", proc.stderr.read() if proc.stderr else ""
        db, rpc = DBusSide(system_bus.address), RpcSide(rpc_dir / "virtsecretd-sock", "secret:///system")
        try:
            o, h, new = ACCESS["A_OPEN"], ACCESS["A_HIDDEN"], ACCESS["A_NEW"]
            db.set_value(h, val("x"))
            rpc.set_value(o, val("y"))
            rpc.define(access_xml("A_HIDDEN"))
            db.define(access_xml("A_NEW"))
            db.set_value(o, val("z"))
            rpc.undefine(h)
            rpc.set_value(new, val("w"))
            db.undefine(new)
        finally:
            db.close()
            rpc.close()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    got = json.loads(out)
    o, new = ACCESS["A_OPEN"], ACCESS["A_NEW"]
    want = [["value-changed", o], ["lifecycle", new, 0, 0], ["value-changed", o], ["value-changed", new],
            ["lifecycle", new, 1, 0]]
    assert got["dbus"] == got["rpc"] == want

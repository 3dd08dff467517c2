"""The canonical-layout fast path of parse_secret_xml gives exactly what libxml2 gives."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_secretxml import DATA, SHARED, secret_defs

from secretbus.core import errors
from secretbus.core.secretxml import _parse_canonical, _parse_full, format_secret_xml

SETTINGS = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def full(data: bytes):
    try:
        return _parse_full(data, False, "(test)", False)
    except errors.SecretError as e:
        return type(e)


@SETTINGS
@given(secret_defs())
def test_fast_path_equals_libxml2_on_canonical_documents(d):
    data = format_secret_xml(d).encode()
    fast = _parse_canonical(data)
    if fast is not None:       # text that needed escaping goes the full way; that is fine
        assert fast == full(data) == d


@SETTINGS
@given(secret_defs(), st.data())
def test_fast_path_never_disagrees_on_mutated_documents(d, data):
    doc = bytearray(format_secret_xml(d).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(doc) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            doc[i] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            doc[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        elif len(doc) > 1:
            del doc[i]
    fast = _parse_canonical(bytes(doc))
    if fast is not None:
        assert fast == full(bytes(doc))


def test_fast_path_is_taken_for_the_golden_files():
    # the project's canonical fixtures with a usage, and libvirt's inputs when present
    files = sorted((DATA / "canonical").glob("usage-*.xml")) + sorted(SHARED.glob("usage-*.xml"))
    assert len(files) >= 6
    for f in files + [DATA / "invalid" / "usage-passphrase.xml"]:
        if "passphrase" in f.name:
            assert _parse_canonical(f.read_bytes()) is None
            continue
        assert _parse_canonical(f.read_bytes()) == full(f.read_bytes()), f.name


def test_fast_path_declines_what_it_cannot_vouch_for():
    base = ("<secret ephemeral='no' private='no'>\n  <uuid>f52a81b2-424e-490c-823d-6bd4235bc572</uuid>\n"
            "  <usage type='ceph'>\n    <{child}>{text}</{child}>\n  </usage>\n</secret>\n")
    assert _parse_canonical(base.format(child="name", text="ok").encode()) is not None
    for child, text in (("volume", "ok"),            # wrong child for ceph
                        ("name", "a&amp;b"),          # needs unescaping
                        ("name", ""),                 # empty means absent
                        ("name", "x\ry"),             # libxml2 normalises CR
                        ("name", "\uffff")):          # not an XML character
        assert _parse_canonical(base.format(child=child, text=text).encode()) is None, (child, text)

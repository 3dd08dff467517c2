"""The XDR codec and the framing of libvirt's RPC: captured frames decode and re-encode byte for
byte, every bound holds, and hypothesis round-trips every declared type."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secretbus.rpc import protocol as P
from secretbus.rpc import xdr
from secretbus.rpc.frame import Header, decode_frame, encode_frame, frame_length

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "data" / "rpc" / "rpc-fixtures.json"
SHARED = HERE.parent.parent / "shared" / "conformance" / "rpc" / "rpc-fixtures.json"


def _frames(path: Path) -> list[dict]:
    return json.loads(path.read_text())


FRAMES = _frames(FIXTURES)
# The shared captures, when this checkout has them beside it, are an extra check: any frame
# they hold that the repository's copy lacks is round-tripped too.
EXTRA = [f for f in _frames(SHARED) if f not in FRAMES] if SHARED.exists() else []


@pytest.mark.parametrize("fx", FRAMES + EXTRA, ids=[f["label"] for f in FRAMES + EXTRA])
def test_captured_frame_round_trips(fx):
    data = bytes.fromhex(fx["hex"])
    assert len(data) == fx["len"]
    header, payload = decode_frame(data)
    t = P.payload_type(header.prog, header.proc, header.type, header.status)
    assert t is not None, f"no payload type for {header}"
    value = xdr.decode(t, payload)
    assert encode_frame(header, xdr.encode(t, value)) == data


def test_the_repository_copy_holds_every_shared_capture():
    assert EXTRA == [], [f["label"] for f in EXTRA]


def _one(label: str) -> tuple[Header, object]:
    fx = next(f for f in FRAMES if f["label"].startswith(label))
    header, payload = decode_frame(bytes.fromhex(fx["hex"]))
    return header, xdr.decode(P.payload_type(header.prog, header.proc, header.type, header.status), payload)


def test_decoded_values_are_what_the_research_says():
    h, v = _one("CONNECT_OPEN call")
    assert (h.prog, h.vers, h.proc, h.type, h.serial) == (P.REMOTE_PROGRAM, 1, P.Proc.CONNECT_OPEN, 0, 2)
    assert v == {"name": "secret:///system", "flags": 0}
    _, v = _one("SECRET_SET_VALUE call")
    assert v["value"] == b"ABCDEFG" and v["secret"]["usageID"] == "client.admin secret"
    h, v = _one("SECRET_GET_VALUE error")
    assert h.status == P.Status.ERROR
    assert (v["code"], v["domain"], v["message"]) == (65, 30, "Invalid secret: secret is private")
    assert (v["str1"], v["str2"], v["int1"], v["int2"]) == ("Invalid secret: %s", "secret is private", -1, -1)
    h, v = _one("SECRET_EVENT_VALUE_CHANGED")
    assert (h.type, h.serial, v["callbackID"]) == (P.MsgType.MESSAGE, 1, 1)
    _, v = _one("AUTH_SASL_START call")
    assert v["data"].startswith(b"n,")      # char data<>: four bytes on the wire per byte


def test_frame_length_bounds():
    with pytest.raises(xdr.XdrError):
        frame_length(struct.pack(">I", 27))          # shorter than a header
    with pytest.raises(xdr.XdrError):
        frame_length(struct.pack(">I", 0xFFFFFFFF))  # beyond the protocol maximum
    with pytest.raises(xdr.XdrError):
        frame_length(struct.pack(">I", 4 + 1025), limit=1024)
    assert frame_length(struct.pack(">I", 28)) == 24


def test_bounds_are_checked_before_allocating():
    huge = struct.pack(">I", 0xFFFFFFF0)
    for t in (xdr.Opaque(16), xdr.String(16), xdr.Array(xdr.INT, 16), xdr.CharArray(16)):
        with pytest.raises(xdr.XdrError, match="maximum"):
            xdr.decode(t, huge)
    # within the maximum but beyond the data
    with pytest.raises(xdr.XdrError, match="truncated"):
        xdr.decode(xdr.Array(xdr.INT, 1 << 20), struct.pack(">I", 1 << 20))
    with pytest.raises(xdr.XdrError):
        xdr.encode(xdr.Opaque(2), b"abc")
    with pytest.raises(xdr.XdrError):
        xdr.encode(P.PROCS[P.Proc.SECRET_SET_VALUE].args,
                   {"secret": {"uuid": bytes(16), "usageType": 0, "usageID": ""},
                    "value": bytes(P.REMOTE_SECRET_VALUE_MAX + 1), "flags": 0})


@pytest.mark.parametrize("data,why", [
    (struct.pack(">I", 1) + b"a\x01\x00\x00", "padding"),
    (struct.pack(">I", 1) + b"\x00\x00\x00\x00", "NUL"),
    (struct.pack(">I", 2) + b"\xff\xfe\x00\x00", "UTF-8"),
    (struct.pack(">I", 1) + b"a\x00\x00\x00" + b"x", "trailing"),
])
def test_strict_strings(data, why):
    with pytest.raises(xdr.XdrError, match=why):
        xdr.decode(xdr.String(8), data)


def _handle_wire(usage: bytes, pad: bytes | None = None) -> bytes:
    pad = bytes(-len(usage) % 4) if pad is None else pad
    return bytes(range(16)) + struct.pack(">iI", 5, len(usage)) + usage + pad


def _one_by_one(t: xdr.Array, data: bytes) -> list:
    r = xdr.Reader(data)
    n = xdr.UINT.unpack(r)
    out = [t.elem.unpack(r) for _ in range(n)]
    assert not r.remaining()
    return out


def test_an_array_of_handles_decodes_in_one_loop_with_every_check_of_one_handle():
    secrets = P.PROCS[P.Proc.CONNECT_LIST_ALL_SECRETS].ret.fields[0][1]
    assert secrets._many is not None        # the fast path is the one taken for ListAll
    good = [_handle_wire(u) for u in (b"", b"a", b"ab", b"abc", b"abcd", "caf\u00e9".encode())]
    data = struct.pack(">I", len(good)) + b"".join(good)
    assert xdr.decode(secrets, data) == _one_by_one(secrets, data)
    assert xdr.decode(secrets, data)[5] == {"uuid": bytes(range(16)), "usageType": 5, "usageID": "caf\u00e9"}
    for bad, why in [(_handle_wire(b"a", b"\0\0\1"), "padding"), (_handle_wire(b"a\0b"), "NUL"),
                     (_handle_wire(b"\xff\xfe"), "UTF-8"), (_handle_wire(b"abcde")[:-4], "truncated"),
                     (bytes(range(16)) + struct.pack(">iI", 5, P.REMOTE_STRING_MAX + 1), "maximum"),
                     (_handle_wire(b"")[:-2], "truncated")]:
        data = struct.pack(">I", 2) + good[1] + bad
        for decode in (lambda d: xdr.decode(secrets, d), lambda d: _one_by_one(secrets, d)):
            with pytest.raises(xdr.XdrError, match=why):
                decode(data)


def test_optional_and_union_discriminants():
    with pytest.raises(xdr.XdrError):
        xdr.decode(P.REMOTE_STRING, struct.pack(">I", 2))
    with pytest.raises(xdr.XdrError):
        xdr.decode(P.TYPED_PARAM_VALUE, struct.pack(">i", 99))
    assert xdr.decode(P.REMOTE_STRING, struct.pack(">I", 0)) is None


# -- hypothesis ------------------------------------------------------------------------
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
_secret = st.fixed_dictionaries({"uuid": st.binary(min_size=16, max_size=16),
                                 "usageType": st.integers(-2**31, 2**31 - 1), "usageID": _text})
_param_value = st.one_of(
    st.tuples(st.just(1), st.integers(-2**31, 2**31 - 1)), st.tuples(st.just(2), st.integers(0, 2**32 - 1)),
    st.tuples(st.just(3), st.integers(-2**63, 2**63 - 1)), st.tuples(st.just(4), st.integers(0, 2**64 - 1)),
    st.tuples(st.just(5), st.floats(allow_nan=False)), st.tuples(st.just(6), st.integers(0, 1)),
    st.tuples(st.just(7), _text))


def _strategy(t: xdr.XdrType):
    if t is xdr.INT:
        return st.integers(-2**31, 2**31 - 1)
    if t is xdr.UINT:
        return st.integers(0, 2**32 - 1)
    if t is xdr.HYPER:
        return st.integers(-2**63, 2**63 - 1)
    if t is xdr.UHYPER:
        return st.integers(0, 2**64 - 1)
    if t is xdr.VOID:
        return st.none()
    if t is P.NONNULL_SECRET:
        return _secret
    if t is P.TYPED_PARAM_VALUE:
        return _param_value
    if isinstance(t, xdr.String):
        return _text
    if isinstance(t, xdr.FixedOpaque):
        return st.binary(min_size=t.size, max_size=t.size)
    if isinstance(t, (xdr.Opaque, xdr.CharArray)):
        return st.binary(max_size=min(t.maximum, 64))
    if isinstance(t, xdr.Array):
        return st.lists(_strategy(t.elem), max_size=min(t.maximum, 5))
    if isinstance(t, xdr.Optional):
        return st.one_of(st.none(), _strategy(t.elem))
    if isinstance(t, xdr.Struct):
        return st.fixed_dictionaries({n: _strategy(ft) for n, ft in t.fields})
    raise AssertionError(f"no strategy for {t.name}")


_ALL_TYPES = sorted({(f"{p.name}.{k}", t) for p in P.Proc if p in P.PROCS
                     for k, t in (("args", P.PROCS[p].args), ("ret", P.PROCS[p].ret))}
                    | {("error", P.REMOTE_ERROR), ("lifecycle", P.LIFECYCLE_MSG),
                       ("value_changed", P.VALUE_CHANGED_MSG)}, key=lambda x: x[0])


@pytest.mark.parametrize("t", [t for _, t in _ALL_TYPES], ids=[n for n, _ in _ALL_TYPES])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip(t, data):
    value = data.draw(_strategy(t))
    wire = xdr.encode(t, value)
    assert len(wire) % 4 == 0
    assert xdr.decode(t, wire) == value


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([t for _, t in _ALL_TYPES]))
def test_random_bytes_decode_or_fail_cleanly(data, t):
    try:
        value = xdr.decode(t, data)
    except xdr.XdrError:
        return
    assert xdr.encode(t, value) == data     # strict decoding: what decodes re-encodes exactly


@given(st.integers(0, 2**32 - 1), st.integers(-2**31, 2**31 - 1), st.binary(max_size=64))
def test_frame_round_trip(serial, proc, payload):
    payload = payload + bytes(-len(payload) % 4)
    h = Header(P.REMOTE_PROGRAM, 1, proc, P.MsgType.CALL, serial, P.Status.OK)
    h2, p2 = decode_frame(encode_frame(h, payload))
    assert (h2, bytes(p2)) == (h, payload)

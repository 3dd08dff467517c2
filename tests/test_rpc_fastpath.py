"""The RPC server's fast paths give the bytes and the answers of the slow ones: packed secret
handles and listings (rpc/handles.py, xdr.Encoded), eager coroutines (core/eager.py) and the
reply frame without a Header (frame.encode_reply)."""
from __future__ import annotations

import asyncio
import uuid as uuidlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secretbus.core.eager import run_eager
from secretbus.core.model import SecretDef, UsageType
from secretbus.rpc import protocol as P
from secretbus.rpc import xdr
from secretbus.rpc.frame import Header, encode_frame, encode_reply
from secretbus.rpc.handles import SLACK, PackedHandles, uuid_bytes, uuid_text, wire_secret

LIST_RET = P.PROCS[P.Proc.CONNECT_LIST_ALL_SECRETS].ret
LOOKUP_RET = P.PROCS[P.Proc.SECRET_LOOKUP_BY_UUID].ret

usages = st.sampled_from([UsageType.NONE, UsageType.VOLUME, UsageType.CEPH, UsageType.ISCSI, UsageType.TLS,
                          UsageType.VTPM])


@st.composite
def defs(draw: st.DrawFn) -> SecretDef:
    ut = draw(usages)
    uid = None if ut is UsageType.NONE else draw(st.text(st.characters(blacklist_characters="\0",
                                                                         blacklist_categories=("Cs",)),
                                                         min_size=1, max_size=40))
    return SecretDef(str(uuidlib.UUID(bytes=draw(st.binary(min_size=16, max_size=16)))), usage_type=ut, usage_id=uid)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=16))
def test_uuid_text_and_bytes_are_the_uuid_modules(raw):
    assert uuid_text(raw) == str(uuidlib.UUID(bytes=raw))
    assert uuid_bytes(uuid_text(raw)) == raw


@settings(max_examples=100, deadline=None)
@given(st.lists(defs(), max_size=30))
def test_packed_listing_is_the_generic_encoding(ds):
    """The array and each handle, packed from the cache, are byte for byte what the codec makes
    of the plain values, and decode back to them."""
    h = PackedHandles(lambda: len(ds))
    plain = {"secrets": [wire_secret(d) for d in ds], "ret": len(ds)}
    fast = {"secrets": h.array(ds), "ret": len(ds)}
    assert xdr.encode(LIST_RET, fast) == xdr.encode(LIST_RET, plain)
    assert xdr.decode(LIST_RET, xdr.encode(LIST_RET, fast)) == plain
    for d in ds:
        assert xdr.encode(LOOKUP_RET, {"secret": h.handle(d)}) == xdr.encode(LOOKUP_RET, {"secret": wire_secret(d)})


def test_a_changed_definition_is_packed_again_and_the_cache_stays_bounded():
    u = "0d5f0b7e-1a2b-4c3d-8e9f-0123456789ab"
    table = [SecretDef(u, usage_type=UsageType.CEPH, usage_id="client.admin")]
    h = PackedHandles(lambda: len(table))
    first = h.packed(table[0])
    assert h.packed(table[0]) is first                     # the same definition: the cached bytes
    redefined = SecretDef(u, usage_type=UsageType.CEPH, usage_id="client.other")
    assert xdr.decode(P.NONNULL_SECRET, h.packed(redefined))["usageID"] == "client.other"
    # Secrets that come and go (a define/undefine loop) never grow it past 2 × table + slack.
    for i in range(3 * SLACK):
        h.packed(SecretDef(str(uuidlib.UUID(int=i)), usage_type=UsageType.NONE))
        assert len(h) <= 2 * len(table) + SLACK + 1


def test_encoded_stands_only_where_a_struct_or_array_does():
    # A string field given pre-packed bytes is still refused: only structs and arrays take them.
    with pytest.raises(xdr.XdrError):
        xdr.encode(P.PROCS[P.Proc.CONNECT_GET_TYPE].ret, {"type": xdr.Encoded(b"\0\0\0\0")})


def test_encode_reply_is_the_reply_header_frame():
    call = Header(P.REMOTE_PROGRAM, 1, P.Proc.SECRET_GET_VALUE, P.MsgType.CALL, 7, P.Status.OK)
    for status in (P.Status.OK, P.Status.ERROR):
        assert encode_reply(call, b"abcd", status) == encode_frame(call.reply(status), b"abcd")
    assert call.reply().type == P.MsgType.REPLY and call.reply().serial == 7


# -- eager coroutines --------------------------------------------------------------------
def _run(make_coro, *, ticks: int = 5):
    """run_eager on a fresh loop: (whether it finished at once, what done() got)."""
    got: list = []

    async def main():
        loop = asyncio.get_running_loop()
        task = run_eager(loop, make_coro(), lambda r, e: got.append((r, e)))
        at_once = task is None and len(got) == 1
        if task is not None:
            await task
        return at_once
    at_once = asyncio.run(main())
    return at_once, got


def test_a_coroutine_that_never_waits_finishes_before_run_eager_returns():
    async def quick():
        return 42
    assert _run(quick) == (True, [(42, None)])


def test_a_failure_without_waiting_is_reported_at_once():
    async def fails():
        raise ValueError("no")
    at_once, got = _run(fails)
    assert at_once and got[0][0] is None and isinstance(got[0][1], ValueError)


def test_a_coroutine_that_waits_continues_in_a_task_with_its_futures_outcomes():
    async def waits():
        await asyncio.sleep(0)                       # a bare yield
        loop = asyncio.get_running_loop()
        f = loop.create_future()
        loop.call_later(0.01, f.set_result, 5)
        v = await f
        g = loop.create_future()
        loop.call_soon(g.set_exception, KeyError("k"))
        try:
            await g
        except KeyError:
            v += 1
        return v
    assert _run(waits) == (False, [(6, None)])


def test_coroutines_started_at_once_may_all_wait_for_one_future():
    """Each first step that waits on the same future (one uid lookup, one gate): on 3.11 the
    second was refused "await wasn't used with future" until the first's task had run."""
    from secretbus.core.eager import run_eager

    async def main() -> list[tuple[object, object]]:
        loop = asyncio.get_running_loop()
        gate = loop.create_future()
        got: list[tuple[object, object]] = []

        async def waits(i: int) -> int:
            await gate
            return i
        tasks = [run_eager(loop, waits(i), lambda r, e: got.append((r, e))) for i in range(3)]
        assert all(t is not None for t in tasks) and got == []
        gate.set_result(None)
        await asyncio.gather(*(t for t in tasks if t is not None))
        return got
    assert sorted(asyncio.run(main()), key=lambda x: str(x[0])) == [(0, None), (1, None), (2, None)]


def test_a_failure_after_waiting_is_reported_by_the_task():
    async def late():
        await asyncio.sleep(0.01)
        raise RuntimeError("late")
    at_once, got = _run(late)
    assert not at_once and len(got) == 1 and isinstance(got[0][1], RuntimeError)


def test_a_structs_fixed_prefix_decodes_as_field_by_field():
    """The one-unpack prefix (uuid + usageType of a handle) gives the generic decoder's values
    and refuses what it refuses: truncation anywhere, a bad string after the prefix."""
    d = SecretDef("0d5f0b7e-1a2b-4c3d-8e9f-0123456789ab", usage_type=UsageType.CEPH, usage_id="client.admin")
    data = xdr.encode(P.NONNULL_SECRET, wire_secret(d))
    assert P.NONNULL_SECRET._prefix is not None
    assert xdr.decode(P.NONNULL_SECRET, data) == wire_secret(d)
    for cut in range(len(data)):
        with pytest.raises(xdr.XdrError):
            xdr.decode(P.NONNULL_SECRET, data[:cut])
    bad = data[:20] + (2).to_bytes(4, "big") + b"a\0\0\0"          # a NUL inside usageID
    with pytest.raises(xdr.XdrError):
        xdr.decode(P.NONNULL_SECRET, bad)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_value_reply_packed_in_one_step_is_the_generic_encoding(value):
    from secretbus.rpc.procedures import _value_reply
    ret = P.PROCS[P.Proc.SECRET_GET_VALUE].ret
    assert xdr.encode(ret, _value_reply(value)) == xdr.encode(ret, {"value": value})
    assert xdr.decode(ret, xdr.encode(ret, _value_reply(value))) == {"value": value}


def test_a_value_over_the_protocols_maximum_is_still_refused_by_the_codec():
    from secretbus.rpc.procedures import _value_reply
    with pytest.raises(xdr.XdrError):
        xdr.encode(P.PROCS[P.Proc.SECRET_GET_VALUE].ret, _value_reply(b"x" * (P.REMOTE_SECRET_VALUE_MAX + 1)))

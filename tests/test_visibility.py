"""access/visibility.py: which secrets of a list a caller may see, for both front ends.

A fake access control (pure logic): `cached` answers from a dict, `allowed` waits on a gate,
counts its calls and the most in flight at once, and caches what it decided, as PolkitAccess
does for the per-uid getattr decisions.
"""
from __future__ import annotations

import asyncio

import pytest

from secretbus.access.permissions import UID_SCOPED, Caller, Perm, UnixProcess
from secretbus.access.visibility import BATCH, ListFilter
from secretbus.core.model import SecretDef, UsageType


def secret(i: int) -> SecretDef:
    return SecretDef(uuid=f"5b7e5700-0000-4000-8002-{i:012x}", usage_type=UsageType.VOLUME, usage_id=f"/v/{i}.img")


def caller(name: str, uid: int = 1000) -> Caller:
    return Caller(name, False, UnixProcess(4000, 777, uid))


def odd_hidden(d: SecretDef) -> bool:
    return int(d.uuid[-12:], 16) % 2 == 0


class FakeAccess:
    def __init__(self, decide=odd_hidden) -> None:
        self.decide = decide
        self.cache: dict[tuple[int, str], bool] = {}
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls = 0
        self.in_flight = 0
        self.most = 0

    def cached(self, c: Caller, perm: Perm, d: SecretDef | None) -> bool | None:
        assert c.process is not None and d is not None
        return self.cache.get((c.process.uid, d.uuid))

    async def allowed(self, c: Caller, perm: Perm, d: SecretDef | None) -> bool:
        assert c.process is not None and d is not None
        self.calls += 1
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0)          # a real check always waits for its answer
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        ok = self.decide(d)
        self.cache[(c.process.uid, d.uuid)] = ok
        return ok

    async def caller_uid(self, c: Caller) -> int | None:
        return c.process.uid if c.process else None


DEFS = [secret(i) for i in range(100)]
WANT = [d for d in DEFS if odd_hidden(d)]


def start(lists: ListFilter, access: FakeAccess, name: str, uid: int | None = 1000, *,
          perm: Perm = Perm.GETATTR, defs: list[SecretDef] = DEFS, **kw) -> asyncio.Future:
    """A list of `name` (of `uid`) under way in a task."""
    who = caller(name, 1000 if uid is None else uid)
    return asyncio.ensure_future(lists.visible(access, who, perm, defs, uid=uid, **kw))


def test_cached_decisions_are_read_without_asking():
    async def run():
        access, lists = FakeAccess(), ListFilter()
        for d in DEFS:
            access.cache[(1000, d.uuid)] = odd_hidden(d)
        assert await lists.visible(access, caller(":1.1"), Perm.GETATTR, DEFS, uid=1000) == WANT
        assert access.calls == 0
    asyncio.run(run())


def test_the_missing_ones_are_asked_a_batch_at_a_time_and_the_order_kept():
    async def run():
        access, lists = FakeAccess(), ListFilter()
        for d in DEFS[::3]:
            access.cache[(1000, d.uuid)] = odd_hidden(d)
        assert await lists.visible(access, caller(":1.1"), Perm.GETATTR, DEFS, uid=1000) == WANT
        assert access.calls == len(DEFS) - len(DEFS[::3])
        assert access.most == BATCH
        assert lists.rounds == 0
    asyncio.run(run())


def test_lists_of_one_uid_share_one_round_and_other_uids_do_not():
    async def run():
        access, lists = FakeAccess(), ListFilter()
        access.gate.clear()
        mine = [start(lists, access, f":1.{i}") for i in range(20)]
        theirs = start(lists, access, ":2.1", 1001)
        await asyncio.sleep(0.01)
        assert lists.rounds == 2
        access.gate.set()
        assert all(r == WANT for r in await asyncio.gather(*mine))
        assert await theirs == WANT
        assert access.calls == 2 * len(DEFS)       # once per uid, not once per list
        assert lists.rounds == 0
    asyncio.run(run())


def test_a_round_goes_on_for_those_who_wait_and_stops_when_none_does():
    async def run():
        access, lists = FakeAccess(), ListFilter()
        access.gate.clear()
        first = start(lists, access, ":1.1")
        await asyncio.sleep(0.01)
        second = start(lists, access, ":1.2")
        await asyncio.sleep(0.01)
        first.cancel()                  # the list that asks goes away; the other still waits
        await asyncio.sleep(0.01)
        assert lists.rounds == 1
        access.gate.set()
        assert await second == WANT
        assert access.calls == len(DEFS)

        # alone, a list that goes away takes its checks with it
        access2, lists2 = FakeAccess(), ListFilter()
        access2.gate.clear()
        lone = start(lists2, access2, ":1.3")
        await asyncio.sleep(0.01)
        lone.cancel()
        await asyncio.sleep(0.01)
        assert lists2.rounds == 0
        access2.gate.set()
        await asyncio.sleep(0.01)
        assert access2.calls == BATCH            # the first batch only; nothing more is asked
    asyncio.run(run())


def test_stop_ends_the_list_and_the_waiters_ask_for_themselves():
    class Gone(Exception):
        pass

    async def run():
        access, lists = FakeAccess(), ListFilter()
        access.gate.clear()
        stopped = False

        def stop() -> None:
            if stopped:
                raise Gone
        first = start(lists, access, ":1.1", stop=stop)
        await asyncio.sleep(0.01)
        second = start(lists, access, ":1.2")
        await asyncio.sleep(0.01)
        stopped = True
        access.gate.set()
        with pytest.raises(Gone):
            await first
        assert await second == WANT
        assert access.calls == len(DEFS)      # the first batch by the stopped list, the rest by the other
        assert lists.rounds == 0
    asyncio.run(run())


def test_turns_are_taken_around_each_pass():
    async def run():
        access, lists = FakeAccess(), ListFilter()
        turns = 0

        class Turn:
            async def __aenter__(self) -> None:
                nonlocal turns
                turns += 1

            async def __aexit__(self, *exc: object) -> None:
                return None
        assert await lists.visible(access, caller(":1.1"), Perm.GETATTR, DEFS, uid=1000, turn=Turn) == WANT
        assert turns == 2          # the cache pass, and the filter after the checks
    asyncio.run(run())


def test_without_a_uid_nothing_is_shared():
    async def run():
        access, lists = FakeAccess(), ListFilter()
        access.gate.clear()
        tasks = [start(lists, access, f":1.{i}", None, defs=DEFS[:10]) for i in range(3)]
        await asyncio.sleep(0.01)
        assert lists.rounds == 0
        access.gate.set()
        assert all(r == [d for d in DEFS[:10] if odd_hidden(d)] for r in await asyncio.gather(*tasks))
        assert access.calls == 30
    asyncio.run(run())


def test_per_connection_decisions_are_not_shared():
    """Only decisions polkit.py keeps per uid (UID_SCOPED) are shared by a uid's lists: a
    check decided per connection is no answer for another connection of the uid."""
    async def run():
        assert Perm.WRITE not in UID_SCOPED
        access, lists = FakeAccess(), ListFilter()
        access.gate.clear()
        tasks = [start(lists, access, f":1.{i}", perm=Perm.WRITE, defs=DEFS[:10]) for i in range(3)]
        await asyncio.sleep(0.01)
        assert lists.rounds == 0
        access.gate.set()
        await asyncio.gather(*tasks)
        assert access.calls == 30
    asyncio.run(run())


def test_a_list_that_finds_a_round_being_stopped_asks_for_itself():
    """The round's only list goes away and, in the same loop step, another list of the uid
    finds the round still registered: the round's cancellation is not that list's."""
    async def run():
        access, lists = FakeAccess(), ListFilter()
        access.gate.clear()
        first = start(lists, access, ":1.1")
        await asyncio.sleep(0.01)
        first.cancel()
        second = start(lists, access, ":1.2")
        await asyncio.sleep(0.01)
        access.gate.set()
        assert await second == WANT
        assert first.cancelled()
        assert lists.rounds == 0
    asyncio.run(run())

"""Which secrets of a list one caller may see: a check per secret (libvirt's ACL filter of
list calls), the one mechanism under both front ends (bus/execute.py, rpc/guard.py).

- Decisions the access control holds already are read in one pass, without an await each
  (10,000 cache lookups, no wake-ups).
- The rest are asked at most BATCH at a time: a uid has only so many polkit slots anyway
  (access/fairslots.py), and each of a caller's many lists must not hold a pending coroutine
  per secret (tens of thousands of them: the daemon's RSS).
- Lists of one uid that find checks missing while another of its lists asks already wait for
  that round with one future and then read the cache again, rather than each waiting on every
  check itself (1,000 lists x 2,000 waits, all woken in one loop step, held root up for a
  second: tests/test_rpc_attack_lists.py). Decisions of the permissions listed are per uid
  (`UID_SCOPED`, access/permissions.py), so what one list learns holds for the others. A round goes on
  while any list waits for it (one that goes away does not cancel the checks the others wait
  for) and is cancelled when none does.
- `turn`: the front end's lane (core/lane.py), taken around each pass over the list; `stop`:
  called between batches, raises when the list's answer would be wasted (its caller reads
  nothing).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from secretbus.access.permissions import UID_SCOPED, AccessControl, Caller, Perm
from secretbus.core.model import SecretDef

BATCH = 32     # checks of one list in flight at once

Turn = Callable[[], contextlib.AbstractAsyncContextManager[None]]


def _no_turn() -> contextlib.AbstractAsyncContextManager[None]:
    return contextlib.nullcontext()


class Abandoned(Exception):
    """The round a list waited for was stopped: it asks for itself."""


class _Round:
    """The checks one list started, with the lists waiting for them."""

    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Future[dict[str, bool]]) -> None:
        self.task = task
        self.waiters = 0

    async def wait(self) -> dict[str, bool]:
        """The round's answers; `Abandoned` if it was stopped (its lists had all gone) while
        this one waited, a cancellation of the caller's own task as ever."""
        self.waiters += 1
        try:
            return await asyncio.shield(self.task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if self.task.cancelled() and not (me is not None and me.cancelling()):
                raise Abandoned() from None
            raise
        finally:
            self.waiters -= 1
            if not self.waiters and not self.task.done():
                self.task.cancel()          # nobody wants the answers any more


class ListFilter:
    def __init__(self, batch: int = BATCH) -> None:
        self.batch = batch
        self._rounds: dict[tuple[int, Perm], _Round] = {}

    @property
    def rounds(self) -> int:
        """Rounds of checks under way (a bounded table: one per uid and permission)."""
        return len(self._rounds)

    async def visible(self, access: AccessControl, caller: Caller, perm: Perm, defs: list[SecretDef], *,
                      uid: int | None, turn: Turn = _no_turn,
                      stop: Callable[[], None] | None = None) -> list[SecretDef]:
        """The defs `caller` (of `uid`, None if unknown) may `perm`, in their order."""
        cached: Callable[..., bool | None] | None = getattr(access, "cached", None)
        async with turn():
            known, missing = _known(cached, caller, perm, defs)
        asked: dict[str, bool] = {}
        if missing:
            key = (uid, perm) if uid is not None and cached is not None and perm in UID_SCOPED else None
            running = self._rounds.get(key) if key is not None else None
            if running is not None:
                with contextlib.suppress(Exception):
                    await running.wait()    # its failure (its caller went away) is no answer for this list
                async with turn():
                    known, missing = _known(cached, caller, perm, defs)
            if missing:
                asked = await self._ask(access, caller, perm, missing, key, stop)
        async with turn():
            return [d for d, k in zip(defs, known, strict=True) if (k if k is not None else asked[d.uuid])]

    async def _ask(self, access: AccessControl, caller: Caller, perm: Perm, missing: list[SecretDef],
                   key: tuple[int, Perm] | None, stop: Callable[[], None] | None) -> dict[str, bool]:
        round_ = _Round(asyncio.ensure_future(self._checks(access, caller, perm, missing, stop)))
        if key is not None and key not in self._rounds:
            self._rounds[key] = round_

            def done(_: object) -> None:
                if self._rounds.get(key) is round_:
                    del self._rounds[key]
            round_.task.add_done_callback(done)
        return await round_.wait()

    async def _checks(self, access: AccessControl, caller: Caller, perm: Perm, missing: list[SecretDef],
                      stop: Callable[[], None] | None) -> dict[str, bool]:
        asked: dict[str, bool] = {}
        for i in range(0, len(missing), self.batch):
            if stop is not None:
                stop()
            batch = missing[i:i + self.batch]
            oks = await asyncio.gather(*(access.allowed(caller, perm, d) for d in batch))
            asked.update(zip((d.uuid for d in batch), oks, strict=True))
        return asked


def _known(cached: Callable[..., bool | None] | None, caller: Caller, perm: Perm,
           defs: list[SecretDef]) -> tuple[list[bool | None], list[SecretDef]]:
    """The cached decision of each def (None: not known), and the defs without one."""
    known: list[bool | None] = [None] * len(defs) if cached is None else [cached(caller, perm, d) for d in defs]
    return known, [d for d, k in zip(defs, known, strict=True) if k is None]

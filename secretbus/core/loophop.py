"""Calls handed from other threads to an event loop, several per wake-up.

`loop.call_soon_threadsafe` writes to the loop's self-pipe every time, and each write wakes
the loop thread, which then contends for the GIL with the thread still handing over. A
write batch finishing answers 16 calls and announces 16 events: 32 wake-ups and as many GIL
hand-overs, and the loop sends each call's reply in a separate iteration (py-spy and strace on
secretbusd during 16-in-flight Undefine). `post` queues the call and wakes the loop only if
no wake-up is pending; inside `held()` a thread wakes no loop at all until the block ends.
Order is kept: one loop's calls run in the order they were posted, in one loop callback.
"""
from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_hops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hops] = weakref.WeakKeyDictionary()
_made = threading.Lock()
_local = threading.local()     # .held: posters to wake when this thread's held() block ends


class Hops:
    """The calls queued for one loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # weak: the registry's value must not keep its key (the loop) alive
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._woken = False                  # a _run is scheduled (or deferred by held())

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) on the loop soon. Dropped if the loop has closed (as asyncio drops a
        concurrent future's result for a closed loop)."""
        with self._lock:
            self._calls.append((fn, args))
            if self._woken:
                return
            self._woken = True
        held: set[Hops] | None = getattr(_local, "held", None)
        if held is not None:
            held.add(self)
        else:
            self._wake()

    def _wake(self) -> None:
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("the loop is gone")
            loop.call_soon_threadsafe(self._run)
        except RuntimeError:                 # the loop has closed: nobody is left to tell
            with self._lock:
                self._calls.clear()
                self._woken = False

    def _run(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, deque()
            self._woken = False
        for fn, args in calls:
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - one failed call must not lose the others
                loop = self._loop()
                if loop is not None:
                    loop.call_exception_handler({"message": "exception in a posted call", "exception": e})


def hops(loop: asyncio.AbstractEventLoop) -> Hops:
    """The one Hops of `loop`."""
    h = _hops.get(loop)
    if h is None:
        with _made:
            h = _hops.get(loop)
            if h is None:
                h = _hops[loop] = Hops(loop)
    return h


@contextmanager
def held() -> Iterator[None]:
    """Within the block, this thread's posts wake no loop; each loop posted to is woken once
    at the end. Nested blocks wake at the end of the outermost."""
    if getattr(_local, "held", None) is not None:
        yield
        return
    mine: set[Hops] = set()
    _local.held = mine
    try:
        yield
    finally:
        _local.held = None
        for h in mine:
            h._wake()


def wrap(fut: Any, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[Any]:
    """asyncio.wrap_future for a concurrent.futures.Future, its outcome handed over by post."""
    loop = loop or asyncio.get_running_loop()
    out: asyncio.Future[Any] = loop.create_future()
    if fut.done():                           # finished already (nothing to write): no hop
        _copy(fut, out)
        return out
    h = hops(loop)
    fut.add_done_callback(lambda f: h.post(_copy, f, out))
    return out


def _copy(f: Any, out: asyncio.Future[Any]) -> None:
    if out.done():
        return                               # cancelled meanwhile
    if f.cancelled():
        out.cancel()
    elif (e := f.exception()) is not None:
        out.set_exception(e)
    else:
        out.set_result(f.result())

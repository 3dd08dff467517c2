"""core/loophop.py: calls handed to an event loop from other threads, one wake-up per batch."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest

from secretbus.core import loophop


def test_posts_in_a_held_block_wake_the_loop_once_and_run_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        h = loophop.hops(loop)
        assert loophop.hops(loop) is h
        wakes = []
        real = loop.call_soon_threadsafe

        def counting(*a):
            wakes.append(a)
            return real(*a)
        loop.call_soon_threadsafe = counting          # type: ignore[method-assign]
        ran: list[int] = []
        done = asyncio.Event()

        def other_thread():
            with loophop.held():
                for i in range(10):
                    h.post(ran.append, i)
                assert wakes == []                    # nothing woken inside the block
            h.post(loop.call_soon, done.set)
        t = threading.Thread(target=other_thread)
        t.start()
        await asyncio.wait_for(done.wait(), 5)
        t.join()
        assert ran == list(range(10))
        assert 1 <= len(wakes) <= 2                   # the block's one, maybe one for the last post
    asyncio.run(main())


def test_wrap_hands_over_result_and_error():
    async def main():
        ok: Future[int] = Future()
        bad: Future[int] = Future()
        w_ok, w_bad = loophop.wrap(ok), loophop.wrap(bad)
        threading.Thread(target=lambda: (ok.set_result(7), bad.set_exception(KeyError("k")))).start()
        assert await asyncio.wait_for(w_ok, 5) == 7
        with pytest.raises(KeyError):
            await asyncio.wait_for(w_bad, 5)
        done: Future[int] = Future()
        done.set_result(3)
        assert await loophop.wrap(done) == 3          # finished already: no hop
    asyncio.run(main())


def test_a_post_to_a_closed_loop_is_dropped():
    loop = asyncio.new_event_loop()
    h = loophop.hops(loop)
    loop.close()
    h.post(print, "never")                            # no exception, nothing queued
    assert not h._calls and not h._woken


def test_the_registry_does_not_keep_a_loop_alive():
    import gc
    import weakref
    loop = asyncio.new_event_loop()
    loophop.hops(loop).post(print, "never run")
    ref = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert ref() is None

"""Run a call's coroutine at once, and make it a task only if it really has to wait.

Most checked calls never wait: the polkit decision is in the cache, the audit record goes out
in one non-blocking send. A task per call would cost a loop iteration and the task machinery
(about a third of a lookup's server time). So the coroutine's first step runs here, in the
caller's frame; only a coroutine that suspends continues in a task. Python 3.12's
`eager_start` does this with the current task set right; on 3.11 the first step runs under
the reading task, which matters only to `asyncio.timeout()` (none in the call paths; 3.11's
`wait_for` does not look at the current task).

Used by both front ends (the RPC connection, the D-Bus call runner). With `context`, the first
step and the task run in that context, as a task of their own would (a call's context
variables, e.g. the caller uid of its log records, stay out of the reader's context).
"""
from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

Done = Callable[[Any, BaseException | None], None]     # (result, error): exactly one is set


def run_eager(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
              done: Done, context: contextvars.Context | None = None) -> asyncio.Task[None] | None:
    """Run `coro`; `done(result, error)` when it ends. None when it ended at once (done has
    been called), else the task that finishes it. `context`: run in it (else the current one)."""
    if sys.version_info >= (3, 12):
        task = asyncio.Task(_report(coro, done), loop=loop, eager_start=True,  # type: ignore[call-arg]
                            context=context)
        return None if task.done() else task
    try:
        yielded = coro.send(None) if context is None else context.run(coro.send, None)
    except StopIteration as e:
        done(e.value, None)
        return None
    except Exception as e:  # noqa: BLE001 - the call's failure, for its error reply
        done(None, e)
        return None
    if asyncio.isfuture(yielded):
        # As Task.__step does at once: while the flag this await set is up, the next coroutine
        # to await the same future is refused ("await wasn't used with future").
        yielded._asyncio_future_blocking = False
    return loop.create_task(_resume(coro, yielded, done), context=context)


async def _report(coro: Coroutine[Any, Any, Any], done: Done) -> None:
    try:
        result = await coro
    except Exception as e:  # noqa: BLE001
        done(None, e)
    else:
        done(result, None)


async def _resume(coro: Coroutine[Any, Any, Any], yielded: Any, done: Done) -> None:
    """What a task does for `coro` after its first step yielded `yielded`."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            if yielded is None:          # a bare yield (asyncio.sleep(0))
                await asyncio.sleep(0)
            elif asyncio.isfuture(yielded):
                yielded._asyncio_future_blocking = False
                waiter: asyncio.Future[None] = loop.create_future()
                yielded.add_done_callback(partial(_wake, waiter))
                await waiter             # the future's own outcome is the coroutine's to read
            else:
                yielded = coro.throw(RuntimeError(f"coroutine yielded {type(yielded).__name__}, not a future"))
                continue
            yielded = coro.send(None)
    except StopIteration as e:
        done(e.value, None)
    except Exception as e:  # noqa: BLE001
        done(None, e)
    finally:
        coro.close()


def _wake(waiter: asyncio.Future[None], _done: object) -> None:
    if not waiter.done():
        waiter.set_result(None)

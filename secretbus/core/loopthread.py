"""A private asyncio event loop in a daemon thread, and running coroutines on it from
synchronous callers with a bounded wait.

Both clients (D-Bus and RPC) run on one: dbus-fast has no default call timeout, so every
wait here is bounded: a caller never blocks longer than the wait it passes (the connection's
timeout plus a margin, by default), even if the loop itself is stuck.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from secretbus.core import errors

CLOSED = "the connection is closed"


def _run(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


class LoopThread:
    """The loop and its thread. `closed` is the gate: once set, no new coroutine is accepted."""

    def __init__(self, timeout: float, name: str, *, kind: str, peer: str):
        """`kind` ("D-Bus", "RPC") and `peer` (who fails to answer) name the client in errors."""
        self.timeout = timeout
        self.kind, self.peer = kind, peer
        self.loop = asyncio.new_event_loop()
        self.closed = False
        self._thread = threading.Thread(target=_run, args=(self.loop,), name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def in_loop(self) -> bool:
        """Whether the current thread is the loop's own (where waiting would deadlock)."""
        return threading.get_ident() == self._thread.ident

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, coro: Coroutine[Any, Any, Any], wait: float | None = None) -> Any:
        """Run `coro` on the loop and wait for it (at most `wait` s, default timeout + 1)."""
        if self.in_loop():
            coro.close()
            raise errors.OperationFailed(f"a secretbus {self.kind} connection cannot be called from its own event loop")
        if self.closed or self.loop.is_closed():
            coro.close()
            raise errors.OperationFailed(CLOSED)
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:
            coro.close()
            raise errors.OperationFailed(CLOSED) from None
        try:
            return fut.result(self.timeout + 1 if wait is None else wait)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise errors.OperationFailed(f"no reply from {self.peer} within {self.timeout:g} s") from None
        except concurrent.futures.CancelledError:
            raise errors.OperationFailed(CLOSED) from None
        except BaseException:
            fut.cancel()
            raise

    def call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn(*args)` on the loop thread soon; nothing happens once the loop is gone."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    def finish(self, coro: Coroutine[Any, Any, Any], wait: float = 5) -> None:
        """Run a last coroutine even though `closed` is set; wait for it unless called from the
        loop itself. Raises what the coroutine raised, or TimeoutError."""
        if not self._thread.is_alive():
            coro.close()
            return
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        if not self.in_loop():
            fut.result(wait)

    def stop(self, wait: float = 5) -> None:
        """Stop the loop and join its thread (unless called from it). Idempotent."""
        if self.loop.is_closed():
            return
        if self._thread.ident is None:        # never started
            self.loop.close()
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return
        if not self.in_loop():
            self._thread.join(wait)

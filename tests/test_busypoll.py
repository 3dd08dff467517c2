"""core/busypoll: the daemon's loop polls after I/O on a marked socket for at most its spin,
then sleeps; nothing else makes it poll."""
from __future__ import annotations

import argparse
import asyncio
import selectors
import socket
import threading
import time

import pytest

from secretbus.core import busypoll
from secretbus.core.busypoll import PollingSelector
from secretbus.daemon import parse_args


class Counted(PollingSelector):
    """Counts the selects without waiting (the polls) and with (the sleeps). Its window is
    long (a loaded machine must not end it between two lines of a test) unless one is given."""

    def __init__(self, spin: float, window: float = 60.0) -> None:
        super().__init__(spin, window)
        self.reset()

    def reset(self) -> None:
        self.polls = self.sleeps = 0


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def counted(monkeypatch, pair):
    """make(spin): a Counted selector watching the pair's first socket for reads."""
    made: list[Counted] = []

    def make(spin: float, window: float = 60.0) -> Counted:
        sel = Counted(spin, window)
        sel.register(pair[0], selectors.EVENT_READ)
        made.append(sel)
        inner = selectors.EpollSelector.select

        def select(self, timeout=None):
            if self is sel:
                if timeout == 0:
                    sel.polls += 1
                else:
                    sel.sleeps += 1
            return inner(self, timeout)
        monkeypatch.setattr(selectors.EpollSelector, "select", select)
        return sel
    yield make
    for sel in made:
        sel.close()


def _after_io(sel: PollingSelector, a: socket.socket, b: socket.socket, mark: bool = True) -> None:
    """A first select that returns an event on `a`, as after a request (`a` marked first)."""
    if mark:
        sel.mark(a.fileno())
    b.send(b"x")
    assert sel.select(1.0)
    a.recv(16)


def test_a_request_during_the_poll_is_taken_without_sleeping(counted, pair) -> None:
    a, b = pair
    sel = counted(2.0)                        # long: a loaded machine may start the timer late
    _after_io(sel, a, b)
    sel.reset()
    threading.Timer(0.02, b.send, (b"y",)).start()
    t = time.perf_counter()
    ready = sel.select(None)
    assert [k.fileobj for k, _ in ready] == [a]
    assert time.perf_counter() - t < 1.5
    assert sel.polls > 1 and sel.sleeps == 0


def test_the_poll_stops_at_its_spin_then_the_select_sleeps_the_rest(counted, pair) -> None:
    a, b = pair
    sel = counted(0.3)
    _after_io(sel, a, b)
    sel.reset()
    cpu, t = time.thread_time(), time.perf_counter()
    assert sel.select(0.4) == []
    wall, used = time.perf_counter() - t, time.thread_time() - cpu
    assert 0.38 <= wall < 0.6          # the timeout, not the spin added to it (0.7)
    assert used < 0.3 + 0.1            # CPU: the spin, then asleep
    assert sel.polls > 1 and sel.sleeps == 1


def test_no_poll_after_a_wake_up_without_io(counted, pair) -> None:
    # a timer's wake-up (select returned nothing): the next select sleeps at once
    a, _ = pair
    sel = counted(0.5)
    assert sel.select(0.01) == []
    sel.reset()
    cpu = time.thread_time()
    assert sel.select(0.05) == []
    assert sel.polls == 0 and sel.sleeps == 1
    assert time.thread_time() - cpu < 0.02


def test_a_select_that_does_not_wait_keeps_the_poll_for_the_next(counted, pair) -> None:
    # asyncio selects with timeout 0 between the callbacks a request caused: finding nothing
    # then is no sign of idleness, and the select that would sleep afterwards still polls.
    a, b = pair
    sel = counted(2.0)
    _after_io(sel, a, b)
    assert sel.select(0) == [] and sel.select(0) == []
    sel.reset()
    threading.Timer(0.02, b.send, (b"y",)).start()
    assert [k.fileobj for k, _ in sel.select(None)] == [a]
    assert sel.polls > 1 and sel.sleeps == 0


def test_no_poll_after_io_on_a_socket_not_marked(counted, pair) -> None:
    # the D-Bus connection, asyncio's self-pipe: their I/O makes no poll
    a, b = pair
    sel = counted(0.5)
    _after_io(sel, a, b, mark=False)
    sel.reset()
    assert sel.select(0.02) == []
    assert sel.polls == 0 and sel.sleeps == 1


def test_no_poll_once_unmarked_or_after_the_window(counted, pair) -> None:
    a, b = pair
    sel = counted(0.5, window=0.05)
    _after_io(sel, a, b)
    assert sel.marked == {a.fileno()}
    time.sleep(0.1)                           # no marked I/O for longer than the window
    sel.reset()
    assert sel.select(0.02) == [] and sel.polls == 0
    _after_io(sel, a, b)
    sel.mark(a.fileno(), False)
    assert sel.marked == frozenset()
    time.sleep(0.1)
    _after_io(sel, a, b, mark=False)          # the same fd's I/O, no longer marked
    sel.reset()
    assert sel.select(0.02) == [] and sel.polls == 0


def test_no_poll_when_asyncio_asks_not_to_wait(counted, pair) -> None:
    a, b = pair
    sel = counted(0.5)
    _after_io(sel, a, b)
    sel.reset()
    t = time.perf_counter()
    assert sel.select(0) == []
    assert time.perf_counter() - t < 0.1 and sel.polls == 1


def test_the_daemon_loop_serves_with_the_poll_and_without() -> None:
    async def echo_once() -> bytes:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        try:
            for i in range(50):            # one at a time, as python3-libvirt calls
                await loop.sock_sendall(b, bytes([i]))
                got = await loop.sock_recv(a, 1)
                assert got == bytes([i])
            return got
        finally:
            a.close()
            b.close()
    for us in (0, 50):
        loop = busypoll.new_event_loop(us)
        try:
            assert isinstance(getattr(loop, "_selector", None), PollingSelector) == (us > 0)
            assert loop.run_until_complete(echo_once()) == bytes([49])
        finally:
            loop.close()


@pytest.mark.parametrize("text, ok", [("0", 0), ("50", 50), ("1000", 1000), ("1001", None), ("-1", None),
                                      ("5.5", None), ("x", None)])
def test_poll_us_option(text: str, ok: int | None) -> None:
    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError):
            busypoll.poll_us_arg(text)
        with pytest.raises(SystemExit):
            parse_args(["--poll-us", text])
    else:
        assert busypoll.poll_us_arg(text) == ok
        assert parse_args(["--poll-us", text]).poll_us == ok


def test_poll_us_default() -> None:
    assert parse_args([]).poll_us == busypoll.DEFAULT_POLL_US > 0

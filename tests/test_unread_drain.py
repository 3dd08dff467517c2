"""The unread-replies bound and a client that reads: its calls wait while it drains, never dropped.

A client with 16 ListSecrets of 10,000 secrets in flight (~720 KB each) has more than the
2 MiB bound queued in dbus-daemon while it reads as fast as it can, and the bus always holds
the one reply it is delivering. Those calls used to be dropped for good (the bench hung);
a caller that stops reading must still be refused as before.
"""
from __future__ import annotations

import asyncio

from secretbus.bus import unread as U
from secretbus.bus.unread import UnreadReplies


def test_a_caller_that_read_everything_while_nothing_was_sent_counts_as_reading():
    async def main():
        answers = [1000, 0]

        async def ask(sender: str) -> int:
            return answers.pop(0)

        u = UnreadReplies(ask, bound=4000, recheck=3000, probation=1000)
        u.sent(":1.2", 1000)                   # over probation: a question (all 1000 unread)
        assert await u.settle(":1.2", rounds=1) == 1000
        assert u.sizes()["unread_readers"] == 0
        # Nothing sent since; the bus now holds nothing for it: it has read.
        assert await u.settle(":1.2", rounds=1) == 0
        assert u.sizes()["unread_readers"] == 1
    asyncio.run(main())


def test_a_draining_reader_is_waited_for_and_one_that_stops_is_refused(monkeypatch):
    monkeypatch.setattr(U, "DRAIN_PAUSE", 0.001)
    monkeypatch.setattr(U, "DRAIN_STALL", 0.05)

    async def main():
        # The bus always holds one 3000-byte reply in delivery while 3000 more are sent
        # after each question; the answers go down against what was outstanding: it reads.
        queue = {":1.2": 3000}

        async def ask(sender: str) -> int:
            return queue[sender]

        u = UnreadReplies(ask, bound=3000, recheck=1000, probation=3000)
        u.sent(":1.2", 3000)
        await u.settle(":1.2", rounds=1)       # the first answer: 3000 of 3000 unread, no reader yet
        assert u.sizes()["unread_readers"] == 0
        u.sent(":1.2", 3000)                   # over: 3000 known (+ 3000 since)
        settling = asyncio.create_task(u.settle(":1.2"))
        for _ in range(20):                    # it reads one reply per question, and more are sent
            await asyncio.sleep(0.002)
            u.sent(":1.2", 10)
        assert not settling.done()             # still over the bound, but draining: waited for
        queue[":1.2"] = 0                      # it caught up
        assert await asyncio.wait_for(settling, 1) == 0

        # The same caller stops reading: answers stay where they are, no progress, refused.
        queue[":1.2"] = 6000
        u.sent(":1.2", 6000)
        await u.settle(":1.2", rounds=1)
        await asyncio.sleep(0.06)              # past DRAIN_STALL since its last progress
        assert await asyncio.wait_for(u.settle(":1.2"), 1) >= 6000

        # A caller never shown to read is refused after its `rounds` questions, as before.
        queue[":1.9"] = 9000
        u.sent(":1.9", 9000)
        assert await asyncio.wait_for(u.settle(":1.9"), 1) >= 9000
        u.forget(":1.2")
        u.forget(":1.9")
        assert u.sizes() == {"unread_tracked": 0, "unread_blocked": 0, "unread_asking": 0, "unread_readers": 0}
    asyncio.run(main())

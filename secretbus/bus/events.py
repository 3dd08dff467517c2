"""The client's event feed: the match rules it adds, a small usage cache, who may send
signals, and the thread that calls subscribers (decoding is `secretbus.bus.signals`).

Signals arrive on the loop thread (`SignalFeed.on_message`), which only updates the usage
cache and queues events; a second daemon thread ("secretbus-events", `Dispatcher`) calls the
handlers in arrival order. Handlers may therefore call the connection (e.g. re-read a value
after SecretValueChanged), as they can on an embedded connection; an exception in a handler
is logged, never propagated.

Signals are accepted only from the current owner of `org.libvirt.secret` (tracked with
GetNameOwner and NameOwnerChanged), so another peer cannot fake events with directed signals.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

from dbus_fast import Message, MessageFlag, MessageType

from secretbus.bus.calls import Calls, bus_message
from secretbus.bus.names import BUS_NAME, CONNECT_IFACE, CONNECT_PATH, DBUS_NAME
from secretbus.bus.signals import (
    LifecycleSignal,
    Signal,
    UsageSeen,
    ValueChangedSignal,
    decode_owner_change,
    decode_signal,
    match_rules,
)
from secretbus.core import errors
from secretbus.core.api import EventHandler, LostHandler, Secret, tell_lost
from secretbus.core.loopthread import CLOSED
from secretbus.core.model import EventId, Lifecycle, SecretEvent, UsageType

log = logging.getLogger("secretbus.client")

CACHE_MAX = 16384
Usage = tuple[int, str]                  # (usage type, usage id)
Wanted = Callable[[SecretEvent], bool]


# -- loop side ----------------------------------------------------------------------------
class UsageCache:
    """uuid -> (usage type, usage id) of the secrets this connection has seen, most recent
    last, at most CACHE_MAX. Loop thread only."""

    def __init__(self, limit: int = CACHE_MAX):
        self._items: collections.OrderedDict[str, Usage] = collections.OrderedDict()
        self._limit = limit

    def remember(self, uuid: str, utype: int, uid: str) -> None:
        self._items[uuid] = (utype, uid)
        self._items.move_to_end(uuid)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)

    def get(self, uuid: str) -> Usage | None:
        return self._items.get(uuid)

    def pop(self, uuid: str) -> Usage | None:
        return self._items.pop(uuid, None)

    def clear(self) -> None:
        self._items.clear()

    def __contains__(self, uuid: object) -> bool:
        return uuid in self._items

    def __len__(self) -> int:
        return len(self._items)


class Pending(NamedTuple):
    """An event waiting for the dispatcher; `usage` None if the cache did not know it."""

    event_id: EventId
    uuid: str
    path: str
    lifecycle: Lifecycle | None
    detail: int
    usage: Usage | None


class SignalFeed:
    """Loop thread: the match rules, the trusted owner of the service's name, the usage
    cache, and events queued for the dispatcher."""

    def __init__(self, calls: Calls, cache: UsageCache, events: queue.SimpleQueue[Pending | str | None]):
        self._calls = calls
        self.cache = cache
        self.events = events
        self.rules: list[str] = []
        self.owner: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self) -> None:
        """Add the match rules, learn the name's owner and subscribe, in one round trip.
        The match rules see broadcasts (session bus); on the system bus the service sends
        its signals to subscribers alone, each only those about secrets it may see."""
        rules = match_rules()
        calls = [self._calls.call_bus("AddMatch", "s", [r], "") for r in rules]
        calls.append(self._subscribe("Subscribe"))
        calls.append(self._calls.call_bus("GetNameOwner", "s", [BUS_NAME], "s"))
        res = await asyncio.gather(*calls, return_exceptions=True)
        self.rules = [r for r, ok in zip(rules, res, strict=False) if not isinstance(ok, BaseException)]
        failed = [e for e in res[:-1] if isinstance(e, BaseException)]
        if failed:
            await self.unlisten()
            raise failed[0]
        owner = res[-1]
        self.owner = owner[0] if not isinstance(owner, BaseException) else None

    def _subscribe(self, member: str) -> Coroutine[Any, Any, list[Any]]:
        return self._calls.call(CONNECT_PATH, CONNECT_IFACE, member, "", [], "")

    async def _resubscribe(self) -> None:
        """A new owner of the name (the service restarted) knows no subscribers."""
        try:
            await self._subscribe("Subscribe")
        except errors.SecretError as e:
            log.warning("could not subscribe to the restarted service's events: %s", e)

    async def unlisten(self) -> None:
        rules, self.rules = self.rules, []
        await asyncio.gather(self._subscribe("Unsubscribe"),
                             *(self._calls.call_bus("RemoveMatch", "s", [r], "") for r in rules),
                             return_exceptions=True)

    def farewell(self) -> list[Message]:
        """Unsubscribe and RemoveMatch messages (no reply wanted) for closing; forgets the rules."""
        rules, self.rules = self.rules, []
        if not rules:
            return []
        bye = Message(destination=BUS_NAME, path=CONNECT_PATH, interface=CONNECT_IFACE, member="Unsubscribe",
                      flags=MessageFlag.NO_REPLY_EXPECTED)
        return [bye, *(bus_message("RemoveMatch", "s", [r], flags=MessageFlag.NO_REPLY_EXPECTED) for r in rules)]

    def on_message(self, msg: Message) -> None:
        """Every message this connection receives passes here first."""
        if msg.message_type is not MessageType.SIGNAL:
            return None
        try:
            self._on_signal(msg)
        except Exception:  # noqa: BLE001 - a malformed signal must not break the connection
            log.warning("ignored a malformed %s.%s signal", msg.interface, msg.member)
        return None

    def _on_signal(self, msg: Message) -> None:
        if msg.sender == DBUS_NAME:
            change = decode_owner_change(msg)
            if change is not None and change.owner != self.owner:
                self.owner = change.owner
                self.cache.clear()       # a restarted service may hold other definitions
                if change.owner is not None and self.rules:
                    task = asyncio.get_running_loop().create_task(self._resubscribe())
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            return
        if not self.rules or self.owner is None or msg.sender != self.owner:
            return
        sig = decode_signal(msg)
        if sig is not None:
            self._apply(sig)

    def _apply(self, sig: Signal) -> None:
        cache = self.cache
        if isinstance(sig, LifecycleSignal):
            usage = cache.pop(sig.uuid) if sig.lifecycle is Lifecycle.UNDEFINED else cache.get(sig.uuid)
            self.events.put(Pending(EventId.LIFECYCLE, sig.uuid, sig.path, sig.lifecycle, sig.detail, usage))
        elif isinstance(sig, ValueChangedSignal):
            self.events.put(Pending(EventId.VALUE_CHANGED, sig.uuid, sig.path, None, 0, cache.get(sig.uuid)))
        elif isinstance(sig, UsageSeen):
            cache.remember(*sig)
        else:
            old = cache.get(sig.uuid)
            if old is not None:          # only what this connection has seen is kept current
                cache.remember(sig.uuid, old[0] if sig.usage_type is None else sig.usage_type,
                               old[1] if sig.usage_id is None else sig.usage_id)


# -- handler side -------------------------------------------------------------------------
class Dispatcher:
    """The subscribers and the thread that calls them.

    `lookup(path, uuid)` asks the service for the usage of a secret the cache did not know
    (None if it cannot tell); `handle(uuid, type, id)` makes the handle passed to handlers.
    """

    def __init__(self, events: queue.SimpleQueue[Pending | str | None], *,
                 lookup: Callable[[str, str], Usage | None],
                 handle: Callable[[str, int, str], Secret],
                 closed: Callable[[], bool]):
        self.events = events
        self._lookup = lookup
        self._handle = handle
        self._closed = closed
        # Copy-on-write: replaced under _lock, read by the thread without locking.
        self._lock = threading.Lock()
        self.subs: dict[int, tuple[EventHandler, Wanted]] = {}
        self.lost_handlers: list[LostHandler] = []
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None

    def add(self, handler: EventHandler, wanted: Wanted, *, first: Callable[[], None]) -> int:
        """Register `handler`; `first()` runs (and may fail) before the first one is added."""
        with self._lock:
            if self._closed():
                raise errors.OperationFailed(CLOSED)
            if not self.subs:
                first()
                self._start()
            sub_id = next(self._ids)
            self.subs = {**self.subs, sub_id: (handler, wanted)}
        return sub_id

    def add_lost(self, handler: LostHandler) -> bool:
        """Register a handler of the connection's loss; True for the first."""
        with self._lock:
            if self._closed():
                raise errors.OperationFailed(CLOSED)
            self.lost_handlers.append(handler)
            self._start()
            return len(self.lost_handlers) == 1

    def _start(self) -> None:
        """(under _lock)"""
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="secretbus-events", daemon=True)
            self._thread.start()

    def remove(self, sub_id: int, *, last: Callable[[], None]) -> None:
        """Unregister `sub_id`; `last()` runs after the last one is gone (failures are logged)."""
        with self._lock:
            if sub_id not in self.subs:
                raise errors.InvalidArg(f"callback {sub_id} is not registered")
            subs = dict(self.subs)
            del subs[sub_id]
            self.subs = subs
            if not subs and not self._closed():
                try:
                    last()
                except errors.SecretError:
                    log.debug("could not remove D-Bus match rules", exc_info=True)

    def clear(self) -> None:
        """Drop every subscriber: nothing is delivered any more."""
        with self._lock:
            self.subs = {}

    def close(self, wait: float = 5) -> None:
        """Drop every subscriber and end the thread (joined unless called from a handler)."""
        self.clear()
        if self._thread is not None:
            self.events.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join(wait)

    def run(self) -> None:
        """The events thread: call the handlers, in arrival order, until None arrives (a str:
        the bus connection was lost, why)."""
        while True:
            item = self.events.get()
            if item is None:
                return
            if isinstance(item, str):
                tell_lost(self.lost_handlers, item)
                continue
            self._deliver(item)

    def _deliver(self, item: Pending) -> None:
        probe = SecretEvent(item.event_id, item.uuid, UsageType.NONE, "", item.lifecycle, item.detail)
        targets = [(sid, h) for sid, (h, wanted) in self.subs.items() if wanted(probe)]
        if not targets:
            return
        usage = item.usage
        if usage is None and item.lifecycle is not Lifecycle.UNDEFINED and not self._closed():
            usage = self._lookup(item.path, item.uuid)     # a secret not seen yet: ask once
        utype, uid = usage or (UsageType.NONE, "")
        ev = SecretEvent(item.event_id, item.uuid, UsageType(utype), uid, item.lifecycle, item.detail)
        handle = self._handle(item.uuid, utype, uid)
        for sid, handler in targets:
            if sid not in self.subs:
                continue      # unsubscribed while an earlier handler ran
            try:
                handler(handle, ev)
            except Exception:  # noqa: BLE001
                log.exception("secret event handler %d failed", sid)

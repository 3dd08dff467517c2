"""polkit checks for the system bus, with a decision cache.

Subject is the caller's `system-bus-name`; action ids and details are libvirt's (permissions.py).
The bus is reached through a `BusPort` (busport.py): no D-Bus library below the front ends.
Fails closed: polkitd absent, slow or erroring means "no" (logged, not cached).
Cached per (unique name, action, details); a caller's entries go when its name leaves the
bus, all entries go on polkit's `Changed` signal (rules or actions reloaded) or when polkitd
restarts, and each entry expires after `max_age` seconds. Challenge results are never cached.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable

from secretbus.access.busport import BusPort, Signal, Typed
from secretbus.access.permissions import Caller, Perm, details_for
from secretbus.core.model import SecretDef

log = logging.getLogger("secretbus.polkit")

PK_NAME = "org.freedesktop.PolicyKit1"
PK_PATH = "/org/freedesktop/PolicyKit1/Authority"
PK_IFACE = "org.freedesktop.PolicyKit1.Authority"
DBUS_NAME = "org.freedesktop.DBus"
DBUS = (DBUS_NAME, "/org/freedesktop/DBus", "org.freedesktop.DBus")   # destination, path, interface
ALLOW_USER_INTERACTION = 1

# Only names that vanish matter to the uid cache: arg2 (new owner) empty.
_NAME_GONE = ("type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
              "member='NameOwnerChanged',arg2=''")
_Key = tuple[str, str, tuple[tuple[str, str], ...]]   # (sender, action id, details)
_POLKIT_MATCHES = (
    f"type='signal',sender='{PK_NAME}',interface='{PK_IFACE}',member='Changed',path='{PK_PATH}'",
    f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{PK_NAME}'",
)


class CallerUids:
    """The uid of each caller as the bus daemon knows it, per unique name; forgotten when the
    name leaves the bus (unique names are never reused). Listeners hear of departed names.

    Bounded like the polkit checks (DESIGN.md §12): one lookup in flight per sender (callers
    of the same name share it), at most `max_concurrent` lookups on the bus at once (dbus-daemon
    refuses our pending calls past 128, and a refused lookup denies), at most `max_entries`
    uids kept (oldest dropped). A lookup that ends after its caller left stores nothing.
    """

    def __init__(self, bus: BusPort, timeout: float = 5.0, *, max_concurrent: int = 32,
                 max_entries: int = 16384):
        self.bus = bus
        self.timeout = timeout
        self.max_entries = max_entries
        self._uids: OrderedDict[str, int] = OrderedDict()
        self._pending: dict[str, asyncio.Future[int | None]] = {}
        self._left: set[str] = set()        # senders that left while their lookup ran
        self._slots = asyncio.Semaphore(max_concurrent)
        self._on_gone: list[Callable[[str], None]] = []

    async def start(self) -> None:
        self.bus.watch(self._on_signal)
        await self.bus.call(*DBUS, "AddMatch", "s", [_NAME_GONE], self.timeout)

    def close(self) -> None:
        self.bus.unwatch(self._on_signal)

    def when_gone(self, callback: Callable[[str], None]) -> None:
        self._on_gone.append(callback)

    def known(self, sender: str) -> bool:
        """Whether `sender` is a caller still on the bus whose uid we hold."""
        return sender in self._uids

    def sizes(self) -> dict[str, int]:
        return {"uids": len(self._uids), "uid_lookups": len(self._pending), "uid_left": len(self._left)}

    def _on_signal(self, sig: Signal) -> None:
        if sig.member == "NameOwnerChanged" and sig.sender == DBUS_NAME and not sig.body[2]:
            name = sig.body[0]
            self._uids.pop(name, None)
            if name in self._pending:
                self._left.add(name)
            for callback in self._on_gone:
                callback(name)

    async def __call__(self, sender: str) -> int | None:
        uid = self._uids.get(sender)
        if uid is not None:
            return uid
        pending = self._pending.get(sender)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._pending[sender] = fut
        try:
            uid = await self._lookup(sender)
            if uid is not None and sender not in self._left:
                self._uids[sender] = uid
                if len(self._uids) > self.max_entries:
                    self._uids.popitem(last=False)
            fut.set_result(uid)
            return uid
        finally:
            del self._pending[sender]
            self._left.discard(sender)
            if not fut.done():
                fut.set_result(None)     # cancelled: those sharing it are denied, not stuck

    async def _lookup(self, sender: str) -> int | None:
        try:
            async with self._slots:
                (uid,) = await self.bus.call(*DBUS, "GetConnectionUnixUser", "s", [sender], self.timeout)
        except Exception as e:  # noqa: BLE001
            log.error("cannot find the uid of %s: %s %s", sender, type(e).__name__, e)
            return None
        return int(uid)


class PolkitAccess:
    enabled = True

    # polkitd 122 can stall for 15 s ("Terminating runaway script"); a shorter timeout turns
    # every such stall into denials for everyone. Clients wait 25 s by default.
    def __init__(self, bus: BusPort, uids: CallerUids, *, timeout: float = 20.0, max_age: float = 60.0,
                 max_entries: int = 16384, cache: bool = True, max_concurrent: int = 64):
        self.bus = bus
        self.uids = uids
        self.timeout = timeout
        self.max_age = max_age
        self.max_entries = max_entries
        self.cache_enabled = cache
        self._cache: OrderedDict[_Key, tuple[float, bool]] = OrderedDict()
        self._by_sender: dict[str, set[_Key]] = {}
        self._pending: dict[_Key, asyncio.Future[bool]] = {}
        self._generation = 0
        # dbus-daemon allows 128 pending calls per connection; listing many secrets
        # must not exceed that (the excess would be refused, i.e. silently denied).
        self._slots = asyncio.Semaphore(max_concurrent)
        self.stats = {"checks": 0, "hits": 0, "errors": 0}

    async def start(self) -> None:
        """Listen for polkit reloads and restarts; `uids` (started by the caller) reports
        callers that left."""
        self.uids.when_gone(self._forget)
        self.bus.watch(self._on_signal)
        for rule in _POLKIT_MATCHES:
            await self.bus.call(*DBUS, "AddMatch", "s", [rule], self.timeout)

    def close(self) -> None:
        self.bus.unwatch(self._on_signal)

    # -- invalidation -------------------------------------------------------------
    def _on_signal(self, sig: Signal) -> None:
        if sig.member == "NameOwnerChanged" and sig.sender == DBUS_NAME and sig.body[0] == PK_NAME:
            self.flush("polkitd restarted")
        elif sig.member == "Changed" and sig.interface == PK_IFACE:
            self.flush("polkit rules or actions changed")

    def flush(self, why: str) -> None:
        if self._cache:
            log.info("dropping %d cached authorisations: %s", len(self._cache), why)
        self._generation += 1
        self._cache.clear()
        self._by_sender.clear()

    def _forget(self, sender: str) -> None:
        for key in self._by_sender.pop(sender, ()):
            self._cache.pop(key, None)

    def _evict(self, key: _Key) -> None:
        del self._cache[key]
        keys = self._by_sender.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_sender[key[0]]      # no empty sets left in the index

    # -- checks -------------------------------------------------------------------
    @staticmethod
    def _key(caller: Caller, perm: Perm, details: dict[str, str]) -> _Key:
        return (caller.sender, perm.value, tuple(sorted(details.items())))

    def cached(self, caller: Caller, perm: Perm, d: SecretDef | None) -> bool | None:
        """The cached decision, or None when polkit must be asked."""
        key = self._key(caller, perm, details_for(d))
        hit = self._cache.get(key)
        if hit is None or hit[0] <= time.monotonic():
            return None
        self._cache.move_to_end(key)
        self.stats["hits"] += 1
        return hit[1]

    async def allowed(self, caller: Caller, perm: Perm, d: SecretDef | None) -> bool:
        hit = self.cached(caller, perm, d)
        if hit is not None:
            return hit
        details = details_for(d)
        key = self._key(caller, perm, details)
        pending = self._pending.get(key)
        if pending is not None and not caller.interactive:
            return await asyncio.shield(pending)
        fut = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            ok = await self._check(caller, perm, details, key)
            fut.set_result(ok)
            return ok
        finally:
            if not fut.done():
                fut.set_result(False)
            self._pending.pop(key, None)

    async def _check(self, caller: Caller, perm: Perm, details: dict[str, str], key: _Key) -> bool:
        self.stats["checks"] += 1
        generation = self._generation
        subject = ["system-bus-name", {"name": Typed("s", caller.sender)}]
        flags = ALLOW_USER_INTERACTION if caller.interactive else 0
        try:
            async with self._slots:
                reply = await self.bus.call(PK_NAME, PK_PATH, PK_IFACE, "CheckAuthorization", "(sa{sv})sa{ss}us",
                                            [subject, perm.value, details, flags, ""],
                                            self.timeout if not caller.interactive else max(self.timeout, 120))
        except Exception as e:  # noqa: BLE001 - fail closed on anything
            self.stats["errors"] += 1
            log.error("polkit check of %s for %s failed, denying: %s %s", perm.value, caller.sender,
                      type(e).__name__, e)
            return False
        authorized, challenge, _ = reply[0]
        # A caller that left meanwhile (its uid forgotten) gets nothing cached: no entry
        # would ever be dropped for it.
        if (self.cache_enabled and not challenge and generation == self._generation
                and self.uids.known(caller.sender)):
            self._store(key, caller.sender, bool(authorized))
        return bool(authorized)

    def _store(self, key: _Key, sender: str, ok: bool) -> None:
        now = time.monotonic()
        # Jitter: decisions made together (a ListSecrets of thousands) must not all expire
        # together and send the next call to polkit thousands of times at once.
        self._cache[key] = (now + self.max_age * random.uniform(0.75, 1.0), ok)
        self._cache.move_to_end(key)
        self._by_sender.setdefault(sender, set()).add(key)
        # Drop expired entries from the old end, then whatever is over the bound.
        while self._cache:
            oldest, (expires, _) = next(iter(self._cache.items()))
            if expires > now and len(self._cache) <= self.max_entries:
                break
            self._evict(oldest)

    async def caller_uid(self, caller: Caller) -> int | None:
        return await self.uids(caller.sender)

    def sizes(self) -> dict[str, int]:
        return {"decisions": len(self._cache), "decision_senders": len(self._by_sender),
                "checks_pending": len(self._pending)}

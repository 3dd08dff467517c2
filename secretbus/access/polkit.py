"""polkit checks for both front ends, with one decision cache.

Subject is the caller's `system-bus-name` on D-Bus, `unix-process` (pid, start time, uid) for
an RPC connection; action ids and details are libvirt's (permissions.py). The two share the
cache, its per-uid entries and the fair per-uid slots: a uid is one uid whichever way it calls.
The bus is reached through a `BusPort` (busport.py): no D-Bus library below the front ends.
Fails closed: polkitd absent, slow or erroring means "no" (logged, not cached).

uid 0 is decided here, without asking polkit: polkit authorises uid 0 for every action, and
root's calls must never wait behind the checks of other callers (DESIGN §12).
Checks in flight are bounded per uid (fairslots.py); interactive ones, which may wait for an
authentication agent for minutes, have their own small per-uid limit and never take the
shared slots.
Cheap read decisions (search-secrets, getattr, read) are cached per (uid, action, details),
the others per (unique name, action, details); a caller's per-name entries go when its name
leaves the bus, all entries go on polkit's `Changed` signal (accepted only from the current
owner of org.freedesktop.PolicyKit1) or when polkitd restarts, and each entry expires after
`max_age` seconds. Challenge results are never cached.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from secretbus.access.busport import BusError, BusPort, Signal, Typed
from secretbus.access.fairslots import FairSlots
from secretbus.access.permissions import UID_SCOPED, Caller, Perm, details_of, known_uid
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
# (scope, action id, details); scope is the unique name, or the uid for UID_SCOPED actions.
_Key = tuple[str | int, str, tuple[tuple[str, str], ...]]

ROOT = 0
NO_OWNER = "org.freedesktop.DBus.Error.NameHasNoOwner"     # the caller left the bus
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

    def cached(self, sender: str) -> int | None:
        """`sender`'s uid if it is held already (no lookup, no await)."""
        return self._uids.get(sender)

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
            level = logging.DEBUG if getattr(e, "name", None) == NO_OWNER else logging.ERROR   # it left
            log.log(level, "cannot find the uid of %s: %s %s", sender, type(e).__name__, e)
            return None
        return int(uid)


class PolkitAccess:
    enabled = True

    # polkitd 122 can stall for 15 s ("Terminating runaway script"); a shorter timeout turns
    # every such stall into denials for everyone. Clients wait 25 s by default.
    def __init__(self, bus: BusPort, uids: CallerUids, *, timeout: float = 20.0, max_age: float = 60.0,
                 max_entries: int = 16384, cache: bool = True, max_concurrent: int = 64,
                 per_uid: int = 16, interactive_per_uid: int = 2, interactive_total: int = 16):
        self.bus = bus
        self.uids = uids
        self.timeout = timeout
        self.max_age = max_age
        self.max_entries = max_entries
        self.cache_enabled = cache
        self._cache: OrderedDict[_Key, tuple[float, bool]] = OrderedDict()
        self._by_sender: dict[str, set[_Key]] = {}
        self._pending: dict[_Key, asyncio.Future[bool | None]] = {}
        self._generation = 0
        # dbus-daemon allows 128 pending calls per connection; listing many secrets
        # must not exceed that (the excess would be refused, i.e. silently denied).
        # Interactive checks come on top: at most interactive_total, so 64 + 16 stay under it.
        self._slots = FairSlots(max_concurrent, per_uid)
        self.interactive_per_uid = interactive_per_uid
        self.interactive_total = interactive_total
        self._interactive: dict[int | str, int] = {}
        self._interactive_in_flight = 0
        self._pk_owner: str | None = None     # unique name of polkitd, None while it is gone
        # RPC connections (Caller.process) still open: only theirs may get per-name entries,
        # and process_closed() drops those (D-Bus names go with NameOwnerChanged).
        self._processes: set[str] = set()
        self._owner_changes = 0
        self.stats = {"checks": 0, "hits": 0, "errors": 0, "root": 0, "flushes": 0,
                      "interactive_refused": 0, "changed_ignored": 0}

    async def start(self) -> None:
        """Listen for polkit reloads and restarts; `uids` (started by the caller) reports
        callers that left."""
        self.uids.when_gone(self._forget)
        self.bus.watch(self._on_signal)
        for rule in _POLKIT_MATCHES:
            await self.bus.call(*DBUS, "AddMatch", "s", [rule], self.timeout)
        # After the match: an owner change from now on is seen as a signal, and a signal
        # handled while this call was out is newer than its reply.
        seen = self._owner_changes
        try:
            (owner,) = await self.bus.call(*DBUS, "GetNameOwner", "s", [PK_NAME], self.timeout)
        except BusError:
            owner = None                      # polkitd not running (yet): checks fail closed
        if seen == self._owner_changes:
            self._pk_owner = owner

    def close(self) -> None:
        self.bus.unwatch(self._on_signal)

    # -- invalidation -------------------------------------------------------------
    def _on_signal(self, sig: Signal) -> None:
        if sig.member == "NameOwnerChanged" and sig.sender == DBUS_NAME and sig.body[0] == PK_NAME:
            self._owner_changes += 1
            self._pk_owner = sig.body[2] or None
            self.flush("polkitd restarted")
        elif sig.member == "Changed" and sig.interface == PK_IFACE:
            # Anyone may send a signal that looks like polkit's (unicast to us, or a broadcast
            # another match lets through); only polkitd's own empties the cache.
            if sig.sender is None or sig.sender != self._pk_owner or sig.path != PK_PATH:
                self.stats["changed_ignored"] += 1
                if self.stats["changed_ignored"] in (1, 10, 100) or self.stats["changed_ignored"] % 1000 == 0:
                    log.warning("ignoring a polkit Changed signal from %s, not polkitd (%d so far)",
                                sig.sender, self.stats["changed_ignored"])
                return
            self.flush("polkit rules or actions changed")

    def flush(self, why: str) -> None:
        if self._cache:
            log.info("dropping %d cached authorisations: %s", len(self._cache), why)
        self.stats["flushes"] += 1
        self._generation += 1
        self._cache.clear()
        self._by_sender.clear()

    def _forget(self, sender: str) -> None:
        for key in self._by_sender.pop(sender, ()):
            self._cache.pop(key, None)

    def process_open(self, sender: str) -> None:
        """An RPC connection named `sender` will ask with a unix-process subject."""
        self._processes.add(sender)

    def process_closed(self, sender: str) -> None:
        """That connection closed: its per-connection decisions go."""
        self._processes.discard(sender)
        self._forget(sender)

    def _uid_of(self, caller: Caller) -> int | None:
        """The uid polkit's subject has: the process's (from SO_PEERCRED or a root peer's
        SET_IDENTITY), or the bus's word for a unique name (None: not known yet)."""
        if caller.process is not None:
            return caller.process.uid
        return self.uids.cached(caller.sender)

    def _live(self, caller: Caller) -> bool:
        """Whether entries kept for `caller` would be dropped when it goes."""
        if caller.process is not None:
            return caller.sender in self._processes
        return self.uids.known(caller.sender)

    def _evict(self, key: _Key) -> None:
        del self._cache[key]
        scope = key[0]
        if isinstance(scope, str):
            entries = self._by_sender.get(scope)
            if entries is not None:
                entries.discard(key)
                if not entries:
                    del self._by_sender[scope]

    # -- checks -------------------------------------------------------------------
    def _key(self, caller: Caller, perm: Perm, details: dict[str, str], uid: int | None = None) -> _Key:
        scope: str | int = caller.sender
        if perm in UID_SCOPED:
            uid = self._uid_of(caller) if uid is None else uid
            if uid is not None:
                scope = uid
        return (scope, perm.value, tuple(sorted(details.items())))

    def cached(self, caller: Caller, perm: Perm, d: SecretDef | None) -> bool | None:
        """The cached decision, or None when polkit must be asked."""
        if self._uid_of(caller) == ROOT:
            self.stats["root"] += 1
            return True
        key = self._key(caller, perm, details_of(perm, d))
        hit = self._cache.get(key)
        if hit is None or hit[0] <= time.monotonic():
            return None
        self._cache.move_to_end(key)
        self.stats["hits"] += 1
        return hit[1]

    async def allowed(self, caller: Caller, perm: Perm, d: SecretDef | None) -> bool:
        # A uid that cannot be found (logged there) only loses root's shortcut and the
        # per-uid entries: polkit still decides, per connection.
        uid = await self.caller_uid(caller)
        details = details_of(perm, d)
        key = self._key(caller, perm, details, uid)
        hit = self.cached(caller, perm, d)
        if hit is not None:
            return hit
        pending = self._pending.get(key)
        if pending is not None and not caller.interactive:
            shared = await asyncio.shield(pending)
            if shared is not None:
                return shared
            # That check failed for its own subject (a connection of this uid that left, a
            # timeout): no answer about this caller, which asks with its own name (not joining
            # another shared check: its subject may be leaving too).
            hit = self.cached(caller, perm, d)
            if hit is not None:
                return hit
        return await self._own_check(caller, perm, details, key)

    async def _own_check(self, caller: Caller, perm: Perm, details: dict[str, str], key: _Key) -> bool:
        """A check with `caller` as the subject, shared with the same key's callers meanwhile
        (None to them when it failed rather than answered: they ask again themselves)."""
        fut: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        ok: bool | None = None
        try:
            ok = await self._check(caller, perm, details, key)
            return bool(ok)
        finally:
            fut.set_result(ok)
            if self._pending.get(key) is fut:
                del self._pending[key]

    async def _check(self, caller: Caller, perm: Perm, details: dict[str, str], key: _Key) -> bool | None:
        """polkit's answer, or None when there is none (denied: fail closed)."""
        self.stats["checks"] += 1
        generation = self._generation
        # Slots are per uid; a caller whose uid is not known here is its own queue.
        uid = self._uid_of(caller)
        who: int | str = caller.sender if uid is None else uid
        try:
            if caller.interactive:
                reply = await self._interactive_call(who, caller, perm, details)
                if reply is None:
                    return False
            else:
                async with self._slots.slot(who):
                    reply = await self._call(caller, perm, details, 0, self.timeout)
        except Exception as e:  # noqa: BLE001 - fail closed on anything
            self.stats["errors"] += 1
            # A caller that left is no failure of ours, and any user can leave often: not logged.
            level = logging.DEBUG if getattr(e, "name", None) == NO_OWNER else logging.ERROR
            log.log(level, "polkit check of %s for %s failed, denying: %s %s", perm.value, caller.sender,
                    type(e).__name__, e)
            return None
        authorized, challenge, _ = reply[0]
        # A caller that left meanwhile (its uid forgotten) gets nothing cached: no entry
        # would ever be dropped for it.
        if (self.cache_enabled and not challenge and generation == self._generation
                and self._live(caller)):
            self._store(key, caller.sender, bool(authorized))
        return bool(authorized)

    async def _interactive_call(self, who: int | str, caller: Caller, perm: Perm,
                                details: dict[str, str]) -> list[Any] | None:
        """An interactive check may wait for the user at an authentication agent for up to
        120 s: it gets its own small allowance per uid instead of a shared slot, and a caller
        over it is refused at once (None)."""
        held = self._interactive.get(who, 0)
        if held >= self.interactive_per_uid or self._interactive_in_flight >= self.interactive_total:
            self.stats["interactive_refused"] += 1
            log.debug("refusing an interactive check of %s for %s: %d in flight for its uid",
                      perm.value, caller.sender, held)
            return None
        self._interactive[who] = held + 1
        self._interactive_in_flight += 1
        try:
            return await self._call(caller, perm, details, ALLOW_USER_INTERACTION, max(self.timeout, 120))
        finally:
            self._interactive_in_flight -= 1
            left = self._interactive[who] - 1
            if left:
                self._interactive[who] = left
            else:
                del self._interactive[who]

    async def authenticate(self, caller: Caller, perm: Perm) -> tuple[bool, bool]:
        """libvirt's AUTH_POLKIT: (authorized, challenge) for `caller`'s process, never cached
        (once per connection). First without interaction, in the uid's fair share of the slots
        (a uid's parallel connections queue there rather than being refused); only a challenge
        is asked again with interaction, if the caller allows it, in the small interactive
        allowance. Fails closed: (False, False) when polkit cannot be asked."""
        uid = self._uid_of(caller)
        if uid == ROOT:
            self.stats["root"] += 1
            return True, False
        who: int | str = caller.sender if uid is None else uid
        self.stats["checks"] += 1
        try:
            async with self._slots.slot(who):
                reply = await self._call(caller, perm, {}, 0, self.timeout)
            authorized, challenge, _ = reply[0]
            if authorized or not challenge or not caller.interactive:
                return bool(authorized), bool(challenge)
            again = await self._interactive_call(who, caller, perm, {})
            if again is None:
                return False, True          # over the allowance: still "an agent is needed"
            reply = again
        except Exception as e:  # noqa: BLE001 - fail closed on anything
            self.stats["errors"] += 1
            log.error("polkit check of %s for %s failed, denying: %s %s", perm.value, caller.sender,
                      type(e).__name__, e)
            return False, False
        authorized, challenge, _ = reply[0]
        return bool(authorized), bool(challenge)

    @staticmethod
    def subject(caller: Caller) -> list[Any]:
        """polkit's (sa{sv}) subject for `caller`."""
        p = caller.process
        if p is not None:
            return ["unix-process", {"pid": Typed("u", p.pid), "start-time": Typed("t", p.start_time),
                                     "uid": Typed("i", p.uid)}]
        return ["system-bus-name", {"name": Typed("s", caller.sender)}]

    async def _call(self, caller: Caller, perm: Perm, details: dict[str, str], flags: int,
                    timeout: float) -> list[Any]:
        subject = self.subject(caller)
        return await self.bus.call(PK_NAME, PK_PATH, PK_IFACE, "CheckAuthorization", "(sa{sv})sa{ss}us",
                                   [subject, perm.value, details, flags, ""], timeout)

    def _store(self, key: _Key, sender: str, ok: bool) -> None:
        now = time.monotonic()
        # Jitter: decisions made together (a ListSecrets of thousands) must not all expire
        # together and send the next call to polkit thousands of times at once.
        self._cache[key] = (now + self.max_age * random.uniform(0.75, 1.0), ok)
        self._cache.move_to_end(key)
        if isinstance(key[0], str):           # per-name entries go with the name
            self._by_sender.setdefault(sender, set()).add(key)
        # Drop expired entries from the old end, then whatever is over the bound.
        while self._cache:
            oldest, (expires, _) = next(iter(self._cache.items()))
            if expires > now and len(self._cache) <= self.max_entries:
                break
            self._evict(oldest)

    async def caller_uid(self, caller: Caller) -> int | None:
        if caller.process is not None:
            return caller.process.uid
        return await self.uids(caller.sender)     # cached there, dropped when the caller leaves

    def known_uid(self, caller: Caller) -> tuple[bool, int | None]:
        """(True, what caller_uid would give) when that needs no await, else (False, None)."""
        if caller.process is not None:
            return True, caller.process.uid
        return known_uid(self.uids, caller.sender)

    def sizes(self) -> dict[str, int]:
        per_uid = sum(1 for key in self._cache if isinstance(key[0], int))
        return {"decisions": len(self._cache) - per_uid, "uid_decisions": per_uid,
                "rpc_processes": len(self._processes),
                "decision_senders": len(self._by_sender), "checks_pending": len(self._pending)}

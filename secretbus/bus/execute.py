"""Authorise, then execute: the one path every secret-service method call takes.

A handler declares its method with one `@method(...)` line (signature, permissions,
whether it writes) and, called with the message, returns a `Prepared`: what it found
before any access check (the secret checked, the candidates to filter) and the action.
`CallRunner` then checks the permissions (skipped when access control is off), filters
the candidates, and runs the action: inline for reads; a write is checked and planned
inline too, and awaited while the driver's I/O thread commits it (driver/writer.py), so
fsync never stalls the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from dbus_fast import Message, MessageFlag, MessageType

from secretbus.access.denials import DenialLog
from secretbus.access.disclosure import disclosed
from secretbus.access.permissions import AccessControl, Caller, Perm
from secretbus.access.visibility import ListFilter
from secretbus.bus import compat
from secretbus.bus.auditing import ReadAudit
from secretbus.bus.dispatch import Reply, error
from secretbus.bus.limits import LIMITS_EXCEEDED, Bounds, CallerBudget, Refused, UidWrites, write_size
from secretbus.bus.names import UNKNOWN_OBJECT, error_name, error_text
from secretbus.bus.sizes import reply_size
from secretbus.bus.unread import Ask, UnreadReplies
from secretbus.core import errors, logsetup
from secretbus.core.eager import run_eager
from secretbus.core.lane import LargeReplyLane
from secretbus.core.model import SecretDef
from secretbus.driver.writer import until_unchanged

log = logging.getLogger("secretbus.dbus")


@dataclass(frozen=True)
class MethodSpec:
    iface: str
    member: str
    signature: str                  # input signature; the dispatcher checks it against the XML
    perms: tuple[Perm, ...] = ()    # all needed, on the Prepared's target
    each: Perm | None = None        # the candidates are filtered by this permission
    writes: bool = False            # writes files: submitted to the driver, awaited (its I/O thread commits it)
    audit: bool = False             # a value read: each reply or refusal is an audit record
    hidden: bool = False            # a denial answers UnknownObject (the object's existence is private)


F = TypeVar("F", bound=Callable[..., Any])


def method(iface: str, member: str, signature: str, *, perms: tuple[Perm, ...] = (),
           each: Perm | None = None, writes: bool = False, audit: bool = False,
           hidden: bool = False) -> Callable[[F], F]:
    """Declare the handler of `iface.member` (firewalld's style: the spec sits on the handler)."""
    spec = MethodSpec(iface, member, signature, perms, each, writes, audit, hidden)

    def mark(fn: F) -> F:
        fn.dbus_method = spec  # type: ignore[attr-defined]
        return fn
    return mark


def specs_of(obj: object) -> list[tuple[MethodSpec, Callable[[Message], Prepared]]]:
    """The declared handlers of `obj`, bound."""
    found = []
    for name in dir(type(obj)):
        spec = getattr(getattr(type(obj), name), "dbus_method", None)
        if isinstance(spec, MethodSpec):
            found.append((spec, getattr(obj, name)))
    return found


@dataclass(frozen=True)
class Grant:
    """What the access checks left: the candidates the caller may see, and whether it is
    one of secret.conf's `private_value_readers` (only asked for private values)."""

    visible: Sequence[SecretDef] = ()
    private_reader: bool = False
    uid: int | None = None                # the caller's, when access control looked it up


@dataclass(frozen=True)
class Prepared:
    # -> the reply body; a write's act (spec.writes) submits it to the driver and returns an
    # awaitable of the body: planned here on the loop, committed by the driver's I/O thread.
    act: Callable[[Grant], Any]
    target: SecretDef | None = None       # what the permissions are checked on (None: the connection)
    candidates: Sequence[SecretDef] = ()  # filtered by the spec's `each` permission
    private: bool = False                 # a private value: the caller's uid decides
    large: bool = False                   # a reply that can be ~1 MB (lists)
    # Further checks on other definitions (a redefine: the one it replaces), all needed.
    also: tuple[tuple[Perm, SecretDef], ...] = ()


@dataclass(frozen=True)
class Bound:
    """What the dispatcher routes to: a spec and its bound handler."""

    spec: MethodSpec
    prepare: Callable[[Message], Prepared]

    @property
    def iface(self) -> str:
        return self.spec.iface

    @property
    def member(self) -> str:
        return self.spec.member

    @property
    def signature(self) -> str:
        return self.spec.signature


class Unanswered(Exception):
    """The call of a caller over the unread bound: dropped without a reply (execute.py)."""


class DBusFailure(Exception):
    """A reply with a freedesktop error name (unknown object or property, read-only...)."""

    def __init__(self, name: str, text: str):
        super().__init__(text)
        self.name, self.text = name, text


# dbus-daemon's max_message_size (system.conf and session.conf: 32 MiB); a bigger message
# gets the sender disconnected.
BUS_MESSAGE_MAX = 32 << 20
LARGE_REPLY = 256 << 10   # over this, a reply is refused while the outgoing backlog is full
ERROR_BYTES = 512         # what an error reply costs the caller's queue, about
ROOT = 0                  # polkit always allows uid 0: never queued behind others
LANE_HOLD = 1.0           # s: the most a large reply holds the lane waiting for the bus to take it
LANE_BACKLOG = 32 << 10   # bytes in our writer's queue over which every non-root reply takes the lane


# As ints: an IntFlag `&` builds a new flag member, ~0.25 µs on every call.
_NO_REPLY = int(MessageFlag.NO_REPLY_EXPECTED)
_INTERACTIVE = int(MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)


def _finished(_result: object, error: BaseException | None) -> None:
    """`_finish` answers every failure itself; anything reaching here is a bug (type only)."""
    if error is not None:
        log.error("internal error finishing a call: %s", type(error).__name__)


def reply(msg: Message, sig: str, body: list[Any]) -> Message | bool:
    if int(msg.flags) & _NO_REPLY:
        return True
    return Message.new_method_return(msg, sig, body)


def too_large(size: int, limit: int) -> errors.SecretError:
    return errors.OperationFailed(
        f"reply would be up to {size} bytes, more than the bus accepts ({limit}); "
        "use ListSecrets with flags, or Properties.GetAll on each secret")


def error_reply(msg: Message, e: Exception) -> Message:
    if isinstance(e, errors.SecretError):
        return error(msg, error_name(e), error_text(e))
    if isinstance(e, DBusFailure):
        return error(msg, e.name, e.text)
    # Unexpected: the caller learns nothing; the log gets the type and the stack,
    # never the exception text (it could quote an argument).
    log.error("internal error in %s.%s: %s", msg.interface, msg.member, type(e).__name__,
              exc_info=(type(e), e, e.__traceback__) if log.isEnabledFor(logging.DEBUG) else None)
    return error(msg, "org.libvirt.Error.InternalError", "internal error")


class CallRunner:
    def __init__(self, bus: Any, access: AccessControl, private_readers: frozenset[int], *,
                 audit: ReadAudit | None = None, bounds: Bounds | None = None,
                 max_message: int = BUS_MESSAGE_MAX, unread: Ask | None = None):
        self.bus = bus
        self.audit = audit if audit is not None and audit.active else None
        self.access = access
        self.private_readers = private_readers
        self.max_message = max_message
        # Per caller: calls in flight (until the bus took the reply) and reply bytes queued.
        self.budget = CallerBudget(bounds or Bounds())
        # Per uid but root: bytes of its writes waiting for the writer (per-secret order).
        self.writes = UidWrites(self.budget.bounds.write_bytes_per_uid)
        # Per caller: replies it left unread in the bus daemon (which would stall us all).
        self.unread = UnreadReplies(unread)
        self._loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        self.denials = DenialLog()   # one line per (uid, action), then a summary per minute
        self.unanswered = 0          # calls of callers over the unread bound, dropped
        self.lane = LargeReplyLane()  # large replies of all but root, one at a time
        self.lists = ListFilter()     # which secrets of a list a caller may see

    def run(self, msg: Message, spec: MethodSpec, prepare: Callable[[Message], Prepared], out_sig: str) -> Reply:
        """Reply now when nothing needs awaiting, else finish in a task."""
        sender = msg.sender or ""
        # A caller that leaves replies unread gets none while it stays over the bound: an
        # error reply would sit in the bus too, counted against us, and a flood of refusals
        # costs as much as serving. Unanswered, its calls pile up as pending replies in the
        # bus, which refuses its calls itself past max_replies_per_connection (128).
        suspect = self.unread.over(sender)
        try:
            self.budget.admit(sender)
        except Refused as e:
            if suspect:
                self.unanswered += 1
                return True
            self.unread.sent(sender, ERROR_BYTES)
            return error(msg, LIMITS_EXCEEDED, str(e))
        if suspect:
            self._spawn(self._when_read(msg, spec, prepare, out_sig, sender))
            return True
        return self._start(msg, spec, prepare, out_sig, sender)

    async def _when_read(self, msg: Message, spec: MethodSpec, prepare: Callable[[Message], Prepared],
                         out_sig: str, sender: str) -> None:
        """The call of a caller over the unread bound: served once the bus says it has read
        (a caller that has read since the last question waits one round trip), else dropped."""
        if await self.unread.settle(sender):
            self.unanswered += 1
            self.budget.release(sender)
            return
        out = self._start(msg, spec, prepare, out_sig, sender)
        if isinstance(out, Message) and self.bus.connected:
            self.bus.send(out).add_done_callback(lambda f: f.cancelled() or f.exception())

    def _start(self, msg: Message, spec: MethodSpec, prepare: Callable[[Message], Prepared], out_sig: str,
               sender: str) -> Reply:
        """An admitted call: its reply when nothing needs awaiting (released here), else a task."""
        out: Reply = None
        try:
            prep = prepare(msg)
            if not spec.writes and not prep.private and not prep.large:
                caller = Caller(msg.sender, bool(int(msg.flags) & _INTERACTIVE))
                decided, uid = self._decided(caller, spec, prep)
                if decided and spec.audit and self.audit is not None:
                    # A value read: answered here too when its audit record can be written at
                    # once (uid and pid known, journald's queue not full); else the path below
                    # does it all again, awaiting what it must (the act only reads).
                    body = prep.act(Grant(prep.candidates, False, uid))
                    if self.audit.allowed_now(caller, prep.target):   # AuditFailed: no value
                        out = self._measured(msg, out_sig, body, uid)
                elif decided:
                    out = self._measured(msg, out_sig, prep.act(Grant(prep.candidates, False, uid)), uid)
        except Refused as e:
            out = error(msg, LIMITS_EXCEEDED, str(e))
        except Exception as e:   # noqa: BLE001 - every failure becomes a clean error reply
            out = error_reply(msg, e)
        if out is not None:      # answered here: dbus-fast sends it
            if isinstance(out, Message) and out.message_type is MessageType.ERROR:
                self._count(sender, ERROR_BYTES)
            self.budget.release(sender)
            return out
        caller = Caller(msg.sender, bool(int(msg.flags) & _INTERACTIVE))
        # Run at once: a read whose checks are cached and whose audit record goes out in one
        # non-blocking send never waits, so it needs no task (its creation, a loop iteration
        # before it starts: latency on every call). Only a call that really
        # waits (polkit, a uid lookup, the writer thread, the lane) continues in a task,
        # in a context of its own as a task would have (its log records' caller uid).
        task = run_eager(self._loop, self._finish(msg, caller, spec, out_sig, prep, prepare), _finished,
                         contextvars.copy_context())
        if task is not None:
            self._track(task)
        return True

    def _decided(self, caller: Caller, spec: MethodSpec, prep: Prepared) -> tuple[bool, int | None]:
        """(True, uid) when this read needs no await: access control off, or every check a
        cached yes for a caller whose uid is known; (False, None) sends it the awaiting way
        (a check to ask or refuse, a list to filter, a non-root reply while our writer is
        backed up, which takes the lane)."""
        access = self.access
        if not access.enabled:
            return True, None
        cached = getattr(access, "cached", None)
        if cached is None or spec.each is not None or prep.also:
            return False, None
        ok, uid = self._known_uid(caller)
        if not ok or uid is None or (uid != ROOT and self.budget.backlog >= LANE_BACKLOG):
            return False, None
        for perm in spec.perms:
            if cached(caller, perm, prep.target) is not True:
                return False, None
        return True, uid

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._track(self._loop.create_task(coro))

    def _track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _measured(self, msg: Message, out_sig: str, body: list[Any], uid: int | None) -> Message | bool:
        """The reply, unless it is more than the bus accepts, or large while the outgoing
        backlog is full (root's replies excepted: root is never starved by others)."""
        size = reply_size(out_sig, body)
        self._count(msg.sender or "", size)
        if size > self.max_message:
            raise too_large(size, self.max_message)
        if size > LARGE_REPLY and uid != 0 and self.budget.over_backlog():
            raise Refused(f"{self.budget.backlog} bytes of replies wait for the bus to take them "
                          f"(bound {self.budget.bounds.backlog}): large replies are refused until "
                          "then; use ListSecrets with flags, or ask each secret")
        return reply(msg, out_sig, body)

    async def _finish(self, msg: Message, caller: Caller, spec: MethodSpec, out_sig: str, prep: Prepared,
                      prepare: Callable[[Message], Prepared]) -> None:
        uid: int | None = None
        sender = caller.sender or ""
        in_lane = False
        async with contextlib.AsyncExitStack() as lane:
            try:
                # No reply is built for a caller over the unread bound (it would sit in the
                # bus, counted against us), nothing is done for it, and no polkit check is
                # spent on it (the uid's slots are its other connections' too): dropped.
                if await self._still_over(sender):
                    raise Unanswered
                uid, grant = await self._authorise(msg, caller, spec, prep, lane)
                if await self._still_over(sender):
                    raise Unanswered
                if uid != ROOT and (prep.large or self.budget.backlog >= LANE_BACKLOG):
                    # One large reply at a time, fair across uids and connections, the loop's
                    # sockets polled between (lane.py); held until the bus has the message.
                    # While our writer holds a backlog, every reply but root's takes the lane:
                    # twenty 20 KB lists queued at once are as far ahead of root's as one 400 KB.
                    await lane.enter_async_context(self.lane.turn(sender if uid is None else uid, sender))
                    in_lane = True
                    # Its replies built while it waited; one that is reading them is waited for
                    # (the lane is held meanwhile: it is its turn), any other is dropped at once.
                    if self.unread.over(sender) and (not self.unread.draining(sender)
                                                     or await self._still_over(sender)):
                        raise Unanswered
                if spec.writes:
                    body = await self._write(msg, caller, spec, prepare, prep, grant)
                else:
                    body = prep.act(grant)
                    if spec.audit and self.audit:    # no record, no value (AuditFailed)
                        await self.audit.allowed(caller, prep.target)
                out = self._measured(msg, out_sig, body, uid)
            except Unanswered:
                self.unanswered += 1
                out = True
            except Refused as e:
                out = error(msg, LIMITS_EXCEEDED, str(e))
            except Exception as e:  # noqa: BLE001 - every failure becomes a clean error reply
                # A refused write may name another secret: only to who may getattr it.
                told = (await disclosed(e, partial(self.access.allowed, caller, Perm.GETATTR))
                        if spec.writes and self.access.enabled else e)
                out = error_reply(msg, told)
                if spec.audit and self.audit:
                    try:
                        await self.audit.denied(caller, prep.target, e, prep.private)
                    except Exception as failed:  # noqa: BLE001 - the refusal stands without its record
                        log.error("no audit record of a refused read: %s", type(failed).__name__)
            # Always reached: the call stays counted in flight until its reply is sent.
            sending = self._send(sender, out)
            if sending is not None and in_lane:
                # The lane is held until our socket took the whole reply: what the bus reads
                # from us is then never more than one large reply (and the socket buffer)
                # ahead of root's; under a flood it reads us slowly: 2 MiB ahead took ~1.5 s.
                await asyncio.wait([sending], timeout=LANE_HOLD)

    async def _still_over(self, sender: str) -> bool:
        """Whether `sender` is over the unread bound, asking the bus once more when it seems
        so (it may have read since). Checked right before a reply is built: from there to
        `_count` nothing awaits on the read path but a GetValue's audit record (a small
        reply), so the bound holds within one reply."""
        if not self.unread.over(sender):
            return False
        return bool(await self.unread.settle(sender))

    def _send(self, sender: str, out: Message | bool) -> asyncio.Future[None] | None:
        """Send without awaiting (no lock is ever held across a send): the call stays in
        flight, and its bytes counted, until the bus has taken the reply (the future)."""
        if not isinstance(out, Message) or not self.bus.connected:
            self.budget.release(sender)
            return None
        if out.message_type is MessageType.ERROR:
            self._count(sender, ERROR_BYTES)
        fut = self.bus.send(out)
        n = compat.queued_bytes(self.bus, fut)
        if n:
            self.budget.queued(sender, n)
        fut.add_done_callback(lambda f: self._sent(sender, n, f))
        return fut

    def _count(self, sender: str, n: int) -> None:
        """Bytes of a reply to `sender` for the unread-replies bound; not for a caller that
        left (its counters are gone: nothing may bring them back)."""
        if self.budget.active(sender):
            self.unread.sent(sender, n)

    def _sent(self, sender: str, n: int, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled():
            fut.exception()     # retrieved: a lost connection is the daemon's business
        if n:
            self.budget.taken(sender, n)
        self.budget.release(sender)

    def forget(self, sender: str) -> None:
        """`sender` left the bus: drop its counters (late releases are no-ops)."""
        self.budget.forget(sender)
        self.unread.forget(sender)

    async def _authorise(self, msg: Message, caller: Caller, spec: MethodSpec, prep: Prepared,
                         held: contextlib.AsyncExitStack) -> tuple[int | None, Grant]:
        """(uid, grant), or raise the refusal; what the call holds until its reply goes on `held`."""
        uid = None
        if spec.audit and self.audit:
            self.audit.prefetch(caller)
        size = write_size(msg.body) if spec.writes else 0
        if spec.writes or prep.private or self.access.enabled:
            # A write waiting for its uid holds its arguments too (UidWrites.take_unknown).
            unknown = (self.writes.take_unknown(caller.sender or "", size)
                       if spec.writes and not self._known_uid(caller)[0] else None)
            try:
                # Who did it goes into the log records of this request (journal CALLER_UID).
                uid = await self.access.caller_uid(caller)
            finally:
                if unknown is not None:
                    self.writes.give_unknown(*unknown)
            logsetup.caller_uid.set(uid)
        if spec.writes and uid != ROOT:
            # Counted before its checks, which may wait for polkit with the arguments held.
            held.callback(self.writes.give, uid, self.writes.take(uid, size))
        return uid, await self._check(msg, caller, spec, prep, uid)

    async def _check(self, msg: Message, caller: Caller, spec: MethodSpec, prep: Prepared,
                     uid: int | None) -> Grant:
        """The call's access checks on `prep`; its grant, or raise the refusal."""
        if self.access.enabled:
            checks = [(perm, prep.target) for perm in spec.perms] + list(prep.also)
            for perm, d in checks:
                if not await self.access.allowed(caller, perm, d):
                    self.denials.denied(uid, caller.sender, perm.value,
                                        {"SECRET_UUID": d.uuid if d else "", "SECRET_OPERATION": msg.member})
                    if spec.hidden:
                        raise DBusFailure(UNKNOWN_OBJECT, f"no object at {msg.path}")
                    raise errors.AccessDenied(f"'{perm.value}' denied access")
        visible = prep.candidates
        if spec.each is not None and self.access.enabled:
            visible = await self._filter(caller, spec.each, list(visible), uid)
        return Grant(visible, prep.private and uid is not None and uid in self.private_readers, uid)

    async def _write(self, msg: Message, caller: Caller, spec: MethodSpec, prepare: Callable[[Message], Prepared],
                     prep: Prepared, grant: Grant) -> list[Any]:
        """A write's act. If its secret was redefined while it was checked (the driver refuses
        to act on a definition nobody checked), it is prepared and checked again on the secret
        as it is now, as if it had come after that change (driver/writer.py until_unchanged)."""
        async def again() -> list[Any]:
            now = prepare(msg)
            return await now.act(await self._check(msg, caller, spec, now, grant.uid))
        return await until_unchanged(prep.act(grant), again)

    def _known_uid(self, caller: Caller) -> tuple[bool, int | None]:
        """(True, uid) when caller_uid(caller) needs no question to the bus daemon."""
        known = getattr(self.access, "known_uid", None)
        if known is None:
            return False, None
        ok, uid = known(caller)
        return bool(ok), uid

    async def _filter(self, caller: Caller, perm: Perm, defs: list[SecretDef], uid: int | None) -> list[SecretDef]:
        """The defs `caller` may see (access/visibility.py)."""
        sender = caller.sender or ""

        def stop() -> None:
            if self.unread.over(sender):
                raise Unanswered          # it will get no reply: the rest of the checks would be waste
        return await self.lists.visible(self.access, caller, perm, defs, uid=uid, stop=stop)

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        self.denials.close()

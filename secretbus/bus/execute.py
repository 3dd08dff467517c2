"""Authorise, then execute: the one path every secret-service method call takes.

A handler declares its method with one `@method(...)` line (signature, permissions,
whether it writes) and, called with the message, returns a `Prepared`: what it found
before any access check (the secret checked, the candidates to filter) and the action.
`CallRunner` then checks the permissions (skipped when access control is off), filters
the candidates, and runs the action: inline for reads, in one worker thread for
anything that writes files, so fsync never stalls the event loop.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from dbus_fast import Message, MessageFlag

from secretbus.access.permissions import AccessControl, Caller, Perm
from secretbus.bus.dispatch import Reply, error
from secretbus.bus.names import UNKNOWN_OBJECT, error_name, error_text
from secretbus.core import errors, logsetup
from secretbus.core.model import SecretDef

log = logging.getLogger("secretbus.dbus")


@dataclass(frozen=True)
class MethodSpec:
    iface: str
    member: str
    signature: str                  # input signature; the dispatcher checks it against the XML
    perms: tuple[Perm, ...] = ()    # all needed, on the Prepared's target
    each: Perm | None = None        # the candidates are filtered by this permission
    writes: bool = False            # writes files: runs in the worker thread
    hidden: bool = False            # a denial answers UnknownObject (the object's existence is private)


F = TypeVar("F", bound=Callable[..., Any])


def method(iface: str, member: str, signature: str, *, perms: tuple[Perm, ...] = (),
           each: Perm | None = None, writes: bool = False, hidden: bool = False) -> Callable[[F], F]:
    """Declare the handler of `iface.member` (firewalld's style: the spec sits on the handler)."""
    spec = MethodSpec(iface, member, signature, perms, each, writes, hidden)

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


@dataclass(frozen=True)
class Prepared:
    act: Callable[[Grant], list[Any]]     # -> the reply body
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


class DBusFailure(Exception):
    """A reply with a freedesktop error name (unknown object or property, read-only...)."""

    def __init__(self, name: str, text: str):
        super().__init__(text)
        self.name, self.text = name, text


def reply(msg: Message, sig: str, body: list[Any]) -> Message | bool:
    if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
        return True
    return Message.new_method_return(msg, sig, body)


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
    def __init__(self, bus: Any, access: AccessControl, private_readers: frozenset[int]):
        self.bus = bus
        self.access = access
        self.private_readers = private_readers
        self._loop = asyncio.get_running_loop()
        # One worker keeps writes in arrival order; the driver serialises them anyway.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secretbus-io")
        self._large_replies = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()

    def run(self, msg: Message, spec: MethodSpec, prepare: Callable[[Message], Prepared], out_sig: str) -> Reply:
        """Reply now when nothing needs awaiting, else finish in a task."""
        try:
            prep = prepare(msg)
            if not self.access.enabled and not spec.writes and not prep.private and not prep.large:
                return reply(msg, out_sig, prep.act(Grant(prep.candidates)))
        except Exception as e:   # noqa: BLE001 - every failure becomes a clean error reply
            return error_reply(msg, e)
        caller = Caller(msg.sender, bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION))
        task = self._loop.create_task(self._finish(msg, caller, spec, out_sig, prep))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _finish(self, msg: Message, caller: Caller, spec: MethodSpec, out_sig: str, prep: Prepared) -> None:
        try:
            grant = await self._authorise(msg, caller, spec, prep)
            if spec.writes:
                # run_in_executor does not carry context variables over; copy them.
                ctx = contextvars.copy_context()
                body = await self._loop.run_in_executor(self._executor, ctx.run, prep.act, grant)
            elif prep.large:
                # One big reply in the socket queue at a time: 16 concurrent lists of 10,000
                # paths would otherwise hold 16 marshalled copies (~0.7 MB each) at once.
                async with self._large_replies:
                    out = reply(msg, out_sig, prep.act(grant))
                    if isinstance(out, Message) and self.bus.connected:
                        await self.bus.send(out)
                    return
            else:
                body = prep.act(grant)
            out = reply(msg, out_sig, body)
        except Exception as e:  # noqa: BLE001 - every failure becomes a clean error reply
            out = error_reply(msg, e)
        if isinstance(out, Message) and self.bus.connected:
            self.bus.send(out)

    async def _authorise(self, msg: Message, caller: Caller, spec: MethodSpec, prep: Prepared) -> Grant:
        uid = None
        if spec.writes or prep.private or self.access.enabled:
            # Who did it goes into the log records of this request (journal CALLER_UID).
            uid = await self.access.caller_uid(caller)
            logsetup.caller_uid.set(uid)
        if self.access.enabled:
            checks = [(perm, prep.target) for perm in spec.perms] + list(prep.also)
            for perm, d in checks:
                if not await self.access.allowed(caller, perm, d):
                    log.warning("denied %s to %s", perm.value, caller.sender,
                                extra={"SECRET_UUID": d.uuid if d else "", "SECRET_OPERATION": msg.member})
                    if spec.hidden:
                        raise DBusFailure(UNKNOWN_OBJECT, f"no object at {msg.path}")
                    raise errors.AccessDenied(f"'{perm.value}' denied access")
        visible = prep.candidates
        if spec.each is not None and self.access.enabled:
            visible = await self._filter(caller, spec.each, list(visible))
        return Grant(visible, prep.private and uid is not None and uid in self.private_readers)

    async def _filter(self, caller: Caller, perm: Perm, defs: list[SecretDef]) -> list[SecretDef]:
        """The defs `caller` may see; cached decisions are read without awaiting each one."""
        cached = getattr(self.access, "cached", None)
        known = [cached(caller, perm, d) if cached else None for d in defs]
        missing = [d for d, k in zip(defs, known, strict=True) if k is None]
        asked = dict(zip((d.uuid for d in missing),
                         await asyncio.gather(*(self.access.allowed(caller, perm, d) for d in missing)), strict=True))
        return [d for d, k in zip(defs, known, strict=True) if (k if k is not None else asked[d.uuid])]

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        self._executor.shutdown(wait=True)

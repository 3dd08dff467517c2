"""Authentication and authorisation of RPC calls, and the audit of the values they read.

The rules are libvirt's (research §4.1, §4.3) over secretbus's one access layer:
- a non-root peer of the system instance authenticates with AUTH_POLKIT: polkit action
  `org.libvirt.unix.manage` on the rw socket, `org.libvirt.unix.monitor` on the ro one, subject
  `unix-process` of the peer (pid, start time, uid), interaction allowed;
- every call of the system instance is then checked with the `org.libvirt.api.*` action and
  details the D-Bus front end uses, subject `unix-process` of the connection's identity (the
  peer, or what a root peer set with SET_IDENTITY), without interaction; list calls and events
  are filtered by `getattr`. A root peer acting as itself is decided here (polkit authorises
  uid 0 anyway), so its calls never wait for polkit.
- it fails closed: no polkit connection (the bus is away), an identity without pid, uid and
  start time, or any error means "denied".

The access control (access/polkit.py's PolkitAccess: its one decision cache and fair per-uid
slots, shared with D-Bus) belongs to the daemon's bus connection; the daemon attaches it here
while it has one. Each value read (allowed or refused) is an audit record (access/audit.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

from secretbus.access.audit import AuditFailed, AuditMode, Auditor, AuditRecord, Outcome, Reason
from secretbus.access.denials import DenialLog
from secretbus.access.disclosure import disclosed
from secretbus.access.fairslots import FairSlots
from secretbus.access.permissions import AccessControl, Caller, Perm
from secretbus.access.visibility import ListFilter
from secretbus.core import errors
from secretbus.core.eager import run_eager
from secretbus.core.lane import LargeReplyLane
from secretbus.core.model import SecretDef
from secretbus.rpc import protocol as P
from secretbus.rpc.failures import AUTH_FAILED, AUTH_FAILED_PREFIX, RemoteFailure
from secretbus.rpc.remote import RemotePolicy
from secretbus.rpc.session import Session

log = logging.getLogger("secretbus.rpc")

FRONT_END = "rpc"
CONNECT_DRIVER = "secret"        # libvirt names the hypervisor driver in its denial text
AUTH_UNAVAILABLE = 94            # VIR_ERR_AUTH_UNAVAILABLE
AUTH_UNAVAILABLE_PREFIX = "authentication unavailable: "
ROOT = 0
# Lists of untrusted callers under way at once, per uid (remote host) and in all (_list_slot);
# they are built one at a time in the lane anyway.
LISTS_PER_UID = 4
LISTS_TOTAL = 64

T = TypeVar("T")
Checks = Sequence[tuple[Perm, SecretDef | None]]


class HasSession(Protocol):
    session: Session


def denied() -> errors.AccessDenied:
    """libvirt's sanitised denial: the action stays in the log, not in the reply."""
    return errors.AccessDenied(f"'{CONNECT_DRIVER}' denied access")


class Guard:
    def __init__(self, *, system: bool, auditor: Auditor | None = None):
        self.system = system
        self.auditor = auditor if auditor is not None and auditor.active else None
        self.access: AccessControl | None = None
        self.denials = DenialLog()
        self._warned: set[str] = set()     # refusals not for polkit to log: once each until attached again
        # Rights of remote (TLS) callers, from secretbusd.conf; None: every remote check fails.
        self.remote: RemotePolicy | None = None
        self._pending_records: set[asyncio.Task[None]] = set()     # deferred records still being sent
        # The lists of untrusted callers (their getattr filter and their reply, each holding the
        # loop for a millisecond or more at thousands of secrets): one at a time, turns round
        # the uids (remote hosts) and their connections, the loop's sockets polled between.
        self.lane = LargeReplyLane()
        self.lists = ListFilter()     # which secrets of a list a connection may see
        self._list_slots = FairSlots(LISTS_TOTAL, LISTS_PER_UID)

    # -- the daemon's side ----------------------------------------------------------
    def attach(self, access: AccessControl | None) -> None:
        """The access control of the bus connection the daemon has now (None: none)."""
        self.access = access
        self._warned.clear()

    def detach(self, access: AccessControl | None) -> None:
        if self.access is access:
            self.access = None

    def closed(self, session: Session) -> None:
        """A connection ended: its per-connection decisions go (and none are kept for it after)."""
        session.closed = True
        forget = getattr(self.access, "process_closed", None)
        if forget is not None:
            forget(session.name)

    def close(self) -> None:
        self.denials.close()
        close = getattr(self.auditor.sink if self.auditor else None, "close", None)
        if close is not None:
            close()             # the auditor's journal connection

    # -- who is asking ----------------------------------------------------------------
    def checked(self, s: Session) -> bool:
        """Whether calls of this connection are checked: the system instance, other than a
        root peer acting as itself (the session instance serves only its own user). A remote
        caller always is."""
        if s.remote is not None:
            return True
        return self.system and (s.identity is not None or not s.trusted)

    def _caller(self, s: Session, *, interactive: bool = False, peer: bool = False) -> Caller | None:
        process = s.peer.process if peer else s.subject()
        if process is None or (peer and process.start_time <= 0):
            return None
        return Caller(s.name, interactive, process)

    def _access(self, s: Session) -> AccessControl | None:
        access = self.access
        opened = getattr(access, "process_open", None)
        if opened is not None and not s.closed:
            opened(s.name)
        return access

    # -- AUTH_POLKIT --------------------------------------------------------------------
    async def authenticate(self, s: Session) -> Any:
        perm = Perm.UNIX_MONITOR if s.socket_readonly else Perm.UNIX_MANAGE
        caller = self._caller(s, interactive=True, peer=True)
        access = self._access(s) if self.system else None
        authenticate = getattr(access, "authenticate", None)
        ok = challenge = False
        if caller is None:
            self._warn_once("no-start-time", "RPC peer pid %d uid %d refused: its start time cannot be read, "
                            "polkit cannot be asked about it", s.peer.pid, s.peer.uid)
        elif authenticate is None:
            self._warn_once("no-polkit", "RPC peer pid %d uid %d refused: polkit cannot be asked (no bus "
                            "connection); other refusals for this reason are not logged", s.peer.pid, s.peer.uid)
        else:
            ok, challenge = await authenticate(caller, perm)
        if ok:
            s.authenticated = True
            return {"complete": 1}
        self.denials.denied(s.peer.uid, f"RPC peer pid {s.peer.pid}", perm.value)
        if challenge:
            raise RemoteFailure(AUTH_UNAVAILABLE, P.FROM_POLKIT,
                                f"no polkit agent available to authenticate action '{perm.value}'",
                                AUTH_UNAVAILABLE_PREFIX)
        raise RemoteFailure(AUTH_FAILED, P.FROM_POLKIT, "access denied by policy", AUTH_FAILED_PREFIX)

    def _warn_once(self, why: str, msg: str, *args: object) -> None:
        """A local user looping connections must not flood the log."""
        if why not in self._warned:
            self._warned.add(why)
            log.warning(msg, *args)

    # -- per-call checks ------------------------------------------------------------------
    def _remote_allows(self, s: Session, perm: Perm) -> bool:
        """A remote caller's grant in the configuration in force (fails closed without one)."""
        return s.remote is not None and self.remote is not None and self.remote.allows(s.remote, perm)

    async def allowed(self, s: Session, perm: Perm, d: SecretDef | None, *, as_peer: bool = False) -> bool:
        """`as_peer`: decide for the connected process, not the identity it set."""
        if s.remote is not None:
            return self._remote_allows(s, perm)
        caller = self._caller(s, peer=as_peer)
        if caller is None or caller.process is None:
            return False
        if caller.process.uid == ROOT:
            return True                # polkit's own answer for uid 0, without the wait
        access = self._access(s)
        if access is None:
            return False
        return await access.allowed(caller, perm, d)

    def cached(self, s: Session, perm: Perm, d: SecretDef | None) -> bool | None:
        """The decision without awaiting, None when polkit must be asked."""
        if not self.checked(s):
            return True
        if s.remote is not None:
            return self._remote_allows(s, perm)
        caller = self._caller(s)
        if caller is None or caller.process is None:
            return False
        if caller.process.uid == ROOT:
            return True
        cached = getattr(self.access, "cached", None)
        return cached(caller, perm, d) if cached is not None else None

    async def require(self, s: Session, checks: Checks, operation: str, *, as_peer: bool = False) -> None:
        for perm, d in checks:
            if not await self.allowed(s, perm, d, as_peer=as_peer):
                subject = s.subject()
                self.denials.denied(subject.uid if subject else None, f"RPC {s.name} (peer pid {s.peer.pid})",
                                    perm.value, {"SECRET_UUID": d.uuid if d else "", "SECRET_OPERATION": operation})
                raise denied()

    def then(self, c: HasSession, checks: Checks, operation: str, act: Callable[[], T], *,
             as_peer: bool = False) -> T | Awaitable[T]:
        """`act()` once `checks` pass: at once when the connection is not checked, else a
        coroutine (the connection awaits it)."""
        if not self.checked(c.session):
            return act()

        async def checked() -> T:
            await self.require(c.session, checks, operation, as_peer=as_peer)
            return act()
        return checked()

    async def disclosing(self, s: Session, pending: Awaitable[T]) -> T:
        """`pending` (a write's outcome), its refusal told as access/disclosure.py allows."""
        try:
            return await pending
        except errors.NamesSecret as e:
            if not self.checked(s):
                raise
            raise await disclosed(e, partial(self.allowed, s, Perm.GETATTR)) from None

    def listing(self, c: HasSession, defs: Callable[[], list[SecretDef]],
                build: Callable[[list[SecretDef]], T]) -> T | Awaitable[T]:
        """`build(the defs() the connection may getattr)`, after search-secrets (libvirt's
        ACL filter: the others are left out silently)."""
        if not self.checked(c.session):
            return build(defs())

        async def checked() -> T:
            s = c.session
            await self.require(s, [(Perm.SEARCH_SECRETS, None)], "list")
            async with self._list_slot(s):
                shown = await self.visible(s, defs())
                async with self._turn(s):
                    return build(shown)
        return checked()

    def _list_slot(self, s: Session) -> contextlib.AbstractAsyncContextManager[None]:
        """One of LISTS_PER_UID lists of an untrusted uid (remote host) at once: each holds
        copies of the whole listing while it waits for its checks and turns, and 64
        connections × 16 lists in flight were 1,024 of them (+53 MB at 2,000 secrets)."""
        who = s.bounds
        return contextlib.nullcontext() if who is None else self._list_slots.slot(who)

    def _turn(self, s: Session) -> contextlib.AbstractAsyncContextManager[None]:
        """A turn in the lane for a connection whose calls share bounds (Session.bounds);
        trusted ones (root, also when it acts for a user) never wait for others'."""
        who = s.bounds
        return contextlib.nullcontext() if who is None else self.lane.turn(who, s.name)

    async def visible(self, s: Session, defs: list[SecretDef]) -> list[SecretDef]:
        """The defs `s` may getattr (access/visibility.py); an untrusted caller's passes over
        the list take turns in the lane, polkit is asked outside it (a slow answer holds up no
        other caller's list)."""
        if s.remote is not None:
            return defs if self._remote_allows(s, Perm.GETATTR) else []
        caller = self._caller(s)
        if caller is None or caller.process is None:
            return []
        if caller.process.uid == ROOT:
            return defs
        access = self._access(s)
        if access is None:
            return []
        return await self.lists.visible(access, caller, Perm.GETATTR, defs, uid=caller.process.uid,
                                        turn=lambda: self._turn(s))

    # -- value reads ------------------------------------------------------------------------
    def value_read(self, c: HasSession, d: SecretDef, read: Callable[[], T]) -> T | Awaitable[T]:
        """`read()` after read-secure, with an audit record of the value returned or refused
        (no record in required mode: no value)."""
        s = c.session
        if not self.checked(s) and self.auditor is None:
            return read()
        if (self.auditor is not None and self.cached(s, Perm.READ_SECURE, d) is True
                and not (s.remote is not None and d.private)):
            # Allowed without asking anyone (an unchecked connection, root, a cached yes): read
            # and write the record now, if journald takes it at once. A coroutine, the
            # deferred record and the loop turns they cost were 40 % of an RPC GetValue.
            try:
                value = read()
            except Exception:   # noqa: BLE001 - a refusal: the path below records it (read() only reads)
                return self._value_read(s, d, read)
            if self._write_now(self.auditor, s, d):   # AuditFailed: no value
                return value
            if self._deferred_ok:
                self._defer(s, d)
                return value
            return self._then_value(s, d, value)
        return self._value_read(s, d, read)

    @classmethod
    def _write_now(cls, auditor: Auditor, s: Session, d: SecretDef) -> bool:
        """auditor.write_now of the allowed read's record; a local peer acting as itself (no
        identity set, no SASL name: the record of _rec with uid, pid and name only) in
        encode_allowed's one format, a third of the record's cost."""
        if s.remote is None and s.identity is None and s.sasl_user is None:
            return auditor.allowed_now(FRONT_END, d, s.peer.uid, s.peer.pid, s.name, s.held)
        return auditor.write_now(cls._rec(s, d, Outcome.ALLOWED, None), s.held)

    async def _then_value(self, s: Session, d: SecretDef, value: T) -> T:
        """The record journald could not take at once, awaited before the value goes out."""
        await self._record(s, d, Outcome.ALLOWED, None)
        return value

    def _value_read(self, s: Session, d: SecretDef, read: Callable[[], T]) -> Awaitable[T]:
        async def run() -> T:
            try:
                if self.checked(s):
                    await self.require(s, [(Perm.READ_SECURE, d)], "get-value")
                if s.remote is not None and d.private:
                    # Never over a remote transport, whatever the grant (the driver's own text).
                    raise errors.InvalidSecret("secret is private")
                value = read()
                if self._deferred_ok and s.held is None:
                    self._defer(s, d)
                else:
                    await self._record(s, d, Outcome.ALLOWED, None)
                return value
            except AuditFailed:
                raise
            except Exception as e:
                reason = (Reason.ACCESS if isinstance(e, errors.AccessDenied)
                          else Reason.PRIVATE if isinstance(e, errors.InvalidSecret) and d.private else None)
                if reason is not None:
                    try:
                        await self._record(s, d, Outcome.DENIED, reason)
                    except AuditFailed:
                        pass        # logged there; the caller is refused anyway
                raise
        return run()

    @property
    def _deferred_ok(self) -> bool:
        """best-effort: the answer does not depend on the record, so the value goes out first
        and its record right after (the same loop turn's next callback), off the reply path."""
        return self.auditor is not None and self.auditor.mode is AuditMode.BEST_EFFORT

    def _defer(self, s: Session, d: SecretDef) -> None:
        loop = asyncio.get_running_loop()
        loop.call_soon(self._record_now, loop, s, d)

    def _record_now(self, loop: asyncio.AbstractEventLoop, s: Session, d: SecretDef) -> None:
        task = run_eager(loop, self._record(s, d, Outcome.ALLOWED, None), _record_done)
        if task is not None:
            self._pending_records.add(task)
            task.add_done_callback(self._pending_records.discard)

    async def _record(self, s: Session, d: SecretDef, outcome: Outcome, reason: Reason | None) -> None:
        if self.auditor is None:
            return
        if outcome is Outcome.ALLOWED and s.held is not None and self._write_now(self.auditor, s, d):
            return      # held with the rest of what this connection answers now (Session.held)
        await self.auditor.write(self._rec(s, d, outcome, reason))

    @staticmethod
    def _rec(s: Session, d: SecretDef, outcome: Outcome, reason: Reason | None) -> AuditRecord:
        if s.remote is not None:        # no uid, no pid: the certificate's DN is who asked
            return AuditRecord(FRONT_END, outcome, d, None, None, s.name, reason, identity=s.remote.describe())
        ident = s.identity
        identity = "" if ident is None else f"{ident.describe()}{' (elevated)' if ident.elevated else ''}"
        if s.sasl_user is not None:        # auth_unix_* = "sasl": the name joins the peer's identity
            identity = f"SASL user '{s.sasl_user}'" + (f", {identity}" if identity else "")
        return AuditRecord(FRONT_END, outcome, d, s.peer.uid, s.peer.pid, s.name, reason, identity=identity)

    # -- events ---------------------------------------------------------------------------
    def event_decided(self, s: Session, d: SecretDef | None) -> bool | None:
        if not self.checked(s):
            return True
        return False if d is None else self.cached(s, Perm.GETATTR, d)

    async def event_allowed(self, s: Session, d: SecretDef | None) -> bool:
        if not self.checked(s):
            return True
        return d is not None and await self.allowed(s, Perm.GETATTR, d)


def _record_done(_result: object, error: BaseException | None) -> None:
    if error is not None:    # best-effort writes log their own failures; anything else is a bug
        log.error("deferred audit record failed: %s", type(error).__name__)


class EventVisibility:
    """The guard as events.EventFilter: a sink is a connection, its session says who it is."""

    def __init__(self, guard: Guard):
        self.guard = guard

    def decided(self, sink: object, d: SecretDef | None) -> bool | None:
        return self.guard.event_decided(_session_of(sink), d)

    async def allowed(self, sink: object, d: SecretDef | None) -> bool:
        return await self.guard.event_allowed(_session_of(sink), d)


def _session_of(sink: object) -> Session:
    s = getattr(sink, "session", None)
    if not isinstance(s, Session):
        raise TypeError("an event sink without a session")
    return s

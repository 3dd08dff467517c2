"""The D-Bus front end's side of the value-read audit (access/audit.py): who the caller is.

The uid comes from the access layer (as the bus daemon reports it, cached per unique name),
the pid from the bus daemon (GetConnectionUnixProcessID, cached per unique name until the
name leaves the bus). execute.CallRunner calls `allowed` before a value goes out (an
AuditFailed there means the value is not sent) and `denied` when access control or the
private-value rule refused it.
"""
from __future__ import annotations

from secretbus.access.audit import AuditFailed, Auditor, AuditRecord, CallerPids, Outcome, Reason
from secretbus.access.busport import BusPort
from secretbus.access.permissions import AccessControl, Caller
from secretbus.access.polkit import DBUS
from secretbus.core import errors
from secretbus.core.model import SecretDef

FRONT_END = "dbus"


def pid_lookup(port: BusPort, timeout: float = 5.0) -> CallerPids:
    async def lookup(sender: str) -> int:
        (pid,) = await port.call(*DBUS, "GetConnectionUnixProcessID", "s", [sender], timeout)
        return int(pid)
    return CallerPids(lookup)


class ReadAudit:
    def __init__(self, auditor: Auditor, access: AccessControl, pids: CallerPids):
        self.auditor = auditor
        self.access = access
        self.pids = pids

    @property
    def active(self) -> bool:
        return self.auditor.active

    async def _record(self, caller: Caller, d: SecretDef, outcome: Outcome, reason: Reason | None) -> None:
        uid = await self.access.caller_uid(caller)
        pid = await self.pids(caller.sender)
        await self.auditor.write(AuditRecord(FRONT_END, outcome, d, uid, pid, caller.sender, reason))

    def prefetch(self, caller: Caller) -> None:
        """Start looking up the caller's pid now (while its uid is looked up) rather than
        after the access checks: one bus round trip less on a value read's path."""
        if caller.sender:
            self.pids.prefetch(caller.sender)

    def allowed_now(self, caller: Caller, d: SecretDef | None) -> bool:
        """`allowed` without awaiting when the uid and pid are known and the journal takes the
        record at once: True when done (AuditFailed as `allowed`), False when `allowed` must
        be awaited (nothing was written)."""
        if d is None:
            raise AuditFailed()
        known = getattr(self.access, "known_uid", None)
        pid = self.pids.cached(caller.sender) if caller.sender else None
        if known is None or pid is None:
            return False
        ok, uid = known(caller)
        if not ok:
            return False
        return self.auditor.allowed_now(FRONT_END, d, uid, pid, caller.sender)

    async def allowed(self, caller: Caller, d: SecretDef | None) -> None:
        """Record a read about to return its value; AuditFailed (required mode) stops it."""
        if d is None:            # GetValue always has its secret; refuse rather than go unrecorded
            raise AuditFailed()
        await self._record(caller, d, Outcome.ALLOWED, None)

    async def denied(self, caller: Caller, d: SecretDef | None, e: Exception, private: bool) -> None:
        """Record a refused read, if `e` is a refusal; the caller gets `e` either way."""
        if d is None:
            return
        if isinstance(e, errors.AccessDenied):
            reason = Reason.ACCESS
        elif isinstance(e, errors.InvalidSecret) and private:
            reason = Reason.PRIVATE
        else:
            return               # not a refusal (the secret went away, a store error...)
        try:
            await self._record(caller, d, Outcome.DENIED, reason)
        except AuditFailed:
            pass                 # already logged; the caller is refused anyway

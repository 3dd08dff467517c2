"""The audit trail of value reads: one journal record per GetValue, allowed or denied.

Every front end (D-Bus now, libvirt RPC next) builds an `AuditRecord` for each read that
returns a value and each one refused by access control or the private-value rule, and hands
it to the one `Auditor`. A record names who (uid, pid, unique name or peer), which secret
(UUID, usage), when and through which front end; it never holds the value. In `required`
mode a record that cannot be written raises `AuditFailed` and the front end must not return
the value (fail closed); `best-effort` logs the failure and goes on; `off` writes nothing.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from secretbus.access.journal import BATCH_BYTES, encode_entry, join_entries
from secretbus.core import errors
from secretbus.core.model import SecretDef

log = logging.getLogger("secretbus.audit")

# The record type's own id, for `journalctl MESSAGE_ID=...` (made once with uuid4, never reused).
MESSAGE_ID = "63b3172d74704f8da05016cf4730d35f"
IDENTIFIER = "secretbusd"
WARN_EVERY = 60.0     # seconds between repeated best-effort failure warnings
DENIAL_WINDOW = 60.0  # seconds: one denied record per (uid, secret, reason) in each
DENIAL_KEYS = 4096    # (uid, secret, reason) windows kept; the oldest go first
GET_VALUE = "GetValue"     # the operation of an audit record of a value read
NO_JOURNAL = os.strerror(errno.ENOENT)    # why a record is lost when the sink says none listens


class AuditMode(enum.StrEnum):
    REQUIRED = "required"         # no record, no value (the system bus's default)
    BEST_EFFORT = "best-effort"   # a lost record is logged (the session bus's default)
    OFF = "off"

    @classmethod
    def default(cls, system: bool) -> AuditMode:
        return cls.REQUIRED if system else cls.BEST_EFFORT


class Outcome(enum.StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"


class Reason(enum.StrEnum):
    ACCESS = "access"     # access control (polkit) refused read-secure
    PRIVATE = "private"   # the private-value rule: the caller is not a private value reader


class AuditFailed(errors.OperationFailed, own_kind=False):
    """The record could not be written; in required mode the value is not returned."""

    def __init__(self) -> None:
        super().__init__("audit record could not be written")


@dataclass(frozen=True)
class AuditRecord:
    front_end: str                 # "dbus", "rpc"
    outcome: Outcome
    secret: SecretDef
    uid: int | None                # None: the front end could not find it
    pid: int | None
    peer: str                      # D-Bus unique name, or the RPC peer
    reason: Reason | None = None   # why it was denied
    operation: str = GET_VALUE
    suppressed: int = 0            # like denials not recorded since the last record of this one
    identity: str = ""             # RPC: the identity a root peer set (SET_IDENTITY), if any
    usec: int = field(default_factory=lambda: time.time_ns() // 1000)   # wall clock, microseconds

    def fields(self) -> dict[str, str]:
        """The journal fields (SECRET_UUID and CALLER_UID as in every other log record)."""
        d = self.secret
        who = f"uid {_text(self.uid)} pid {_text(self.pid)} ({self.peer or '?'})"
        verdict = self.outcome.value if self.reason is None else f"{self.outcome.value} ({self.reason.value})"
        out = {
            "MESSAGE": f"secret value read {verdict}: secret {d.uuid} for {who} via {self.front_end}",
            "MESSAGE_ID": MESSAGE_ID,
            "PRIORITY": "5" if self.outcome is Outcome.ALLOWED else "4",   # notice / warning
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            "SECRET_UUID": d.uuid,
            "SECRET_USAGE_TYPE": d.usage_type.xml_name,
            "SECRET_USAGE_ID": d.usage_id or "",
            "SECRET_OPERATION": self.operation,
            "AUDIT_OUTCOME": self.outcome.value,
            "AUDIT_REASON": self.reason.value if self.reason else "",
            "AUDIT_FRONT_END": self.front_end,
            "AUDIT_TIME_USEC": str(self.usec),
            "CALLER_UID": _text(self.uid, ""),
            "CALLER_PID": _text(self.pid, ""),
            "CALLER_PEER": self.peer,
            "AUDIT_SUPPRESSED": str(self.suppressed) if self.suppressed else "",
            "CALLER_IDENTITY": self.identity,
        }
        return {k: v for k, v in out.items() if v != ""}


def _text(n: int | None, unknown: str = "?") -> str:
    return unknown if n is None else str(n)


# The fields every allowed GetValue record of a front end has, in the native journal protocol.
_ALLOWED_CONST: dict[str, str] = {}


def encode_allowed(front_end: str, d: SecretDef, uid: int | None, pid: int | None, peer: str) -> bytes | None:
    """encode_entry(AuditRecord(front_end, ALLOWED, d, uid, pid, peer).fields()), made in one
    format (a value read's record: a third of its service CPU when built field by field);
    None for a value that needs the general encoding (a newline in the usage or the peer).
    tests/test_audit.py checks that both give the same fields."""
    usage_id = d.usage_id or ""
    if "\n" in usage_id or "\n" in peer:
        return None
    const = _ALLOWED_CONST.get(front_end)
    if const is None:
        const = _ALLOWED_CONST.setdefault(front_end, (
            f"MESSAGE_ID={MESSAGE_ID}\nPRIORITY=5\nSYSLOG_IDENTIFIER={IDENTIFIER}\n"
            f"SECRET_OPERATION=GetValue\nAUDIT_OUTCOME={Outcome.ALLOWED.value}\nAUDIT_FRONT_END={front_end}\n"))
    usec = time.time_ns() // 1000
    utype = d.usage_type.xml_name
    text = (f"MESSAGE=secret value read {Outcome.ALLOWED.value}: secret {d.uuid} for uid {_text(uid)} "
            f"pid {_text(pid)} ({peer or '?'}) via {front_end}\n{const}SECRET_UUID={d.uuid}\n"
            + (f"SECRET_USAGE_TYPE={utype}\n" if utype else "")
            + (f"SECRET_USAGE_ID={usage_id}\n" if usage_id else "")
            + f"AUDIT_TIME_USEC={usec}\n"
            + (f"CALLER_UID={uid}\n" if uid is not None else "")
            + (f"CALLER_PID={pid}\n" if pid is not None else "")
            + (f"CALLER_PEER={peer}\n" if peer else ""))
    return text.encode("utf-8", "replace")


class HeldRecords:
    """Records of allowed reads held back to be sent together (Auditor.hold): a front end that
    answers several reads in one step sends their records in one datagram before any of those
    values goes out, which wakes journald once for the step instead of once per value (each
    wake-up was about 11 µs of a 25 µs RPC value read). It is the front end's to send: `full`
    says when, `take` gives the datagram."""

    __slots__ = ("_parts", "size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, data: bytes) -> None:
        self._parts.append(data)
        self.size += len(data)

    @property
    def full(self) -> bool:
        return self.size >= BATCH_BYTES

    def take(self) -> tuple[bytes, int]:
        """The held records as one datagram and how many they are; none are held after."""
        data, n = join_entries(self._parts), len(self._parts)
        self._parts, self.size = [], 0
        return data, n


class RecordSink(Protocol):
    async def send(self, fields: dict[str, str]) -> None:
        """Write one record; raise OSError when it was not kept."""


class Auditor:
    """Writes value-read records to `sink` (the journal) under `mode`."""

    def __init__(self, sink: RecordSink, mode: AuditMode):
        self.sink = sink
        # What the sink can do, found once (a value read asks on every call).
        self._send_encoded: Callable[[bytes], bool] | None = getattr(sink, "send_now_encoded", None)
        self._sink_available: Callable[[], bool] | None = getattr(sink, "available", None)
        self._send_encoded_later: Callable[[bytes], Awaitable[None]] | None = getattr(sink, "send_encoded", None)
        self.mode = mode
        self._failures = 0
        self._warned_at = float("-inf")
        # Repeated denials are folded (a caller looping on a refused read must not flood the
        # journal into rate-limiting us, which would drop the records of real reads).
        self._denials: dict[tuple[int | None, str, Reason | None], list[float]] = {}

    @property
    def active(self) -> bool:
        return self.mode is not AuditMode.OFF

    async def write(self, rec: AuditRecord) -> None:
        """Write `rec`; AuditFailed when it cannot be written in required mode."""
        if not self.active:
            return
        if rec.outcome is Outcome.DENIED:
            folded = self._fold(rec)
            if folded is None:
                return
            rec = folded
        try:
            await self.sink.send(rec.fields())
        except (OSError, ValueError) as e:
            self._failed(rec.secret.uuid, rec.operation, e)

    def hold(self) -> HeldRecords | None:
        """Somewhere to hold allowed reads' records for `write_now(held=)`, or None when this
        auditor writes nothing or its sink cannot take records encoded and together."""
        if not self.active or self._send_encoded is None or self._send_encoded_later is None:
            return None
        return HeldRecords()

    def write_now(self, rec: AuditRecord, held: HeldRecords | None = None) -> bool:
        """`write` for an allowed read without awaiting: True when it is done (written, or
        lost in best-effort mode; AuditFailed in required mode, as `write`), False when
        nothing was sent and `write` must be awaited (the sink cannot send at once). With
        `held` (from `hold`), the record is added to it, to go with `send_held`: the value must
        not go out before."""
        if not self.active:
            return True
        send_now = getattr(self.sink, "send_now", None)
        if (send_now is None and held is None) or rec.outcome is not Outcome.ALLOWED:
            return False
        if not self._available():
            self._failed(rec.secret.uuid, rec.operation, NO_JOURNAL)
            return True
        if held is not None:
            try:
                held.add(encode_entry(rec.fields()))
            except ValueError as e:
                self._failed(rec.secret.uuid, rec.operation, e)
            return True
        assert send_now is not None
        try:
            return bool(send_now(rec.fields()))
        except (OSError, ValueError) as e:
            self._failed(rec.secret.uuid, rec.operation, e)
            return True

    def allowed_now(self, front_end: str, d: SecretDef, uid: int | None, pid: int | None, peer: str,
                    held: HeldRecords | None = None) -> bool:
        """write_now(AuditRecord(front_end, ALLOWED, d, uid, pid, peer), held), the record
        encoded in one step (encode_allowed) when the sink takes encoded entries."""
        if not self.active:
            return True
        send_encoded = self._send_encoded
        if send_encoded is None:
            return self.write_now(AuditRecord(front_end, Outcome.ALLOWED, d, uid, pid, peer))
        if not self._available():        # no journald: nothing to encode for
            self._failed(d.uuid, GET_VALUE, NO_JOURNAL)
            return True
        data = encode_allowed(front_end, d, uid, pid, peer)
        if data is None:
            return self.write_now(AuditRecord(front_end, Outcome.ALLOWED, d, uid, pid, peer), held)
        if held is not None:
            held.add(data)
            return True
        try:
            return bool(send_encoded(data))
        except (OSError, ValueError) as e:
            self._failed(d.uuid, GET_VALUE, e)
            return True

    def send_held(self, held: HeldRecords) -> tuple[bytes, int] | None:
        """Send what `held` holds, in one datagram, without awaiting. None when that is done
        (sent; or lost, in best-effort mode; AuditFailed in required mode: none of those
        values may go out); else the datagram and its count, which journald could not take at
        once: `await send_held_later(...)` before the values go out."""
        if not len(held):
            return None
        data, n = held.take()
        assert self._send_encoded is not None       # hold() gave `held`
        try:
            if self._send_encoded(data):
                return None
        except (OSError, ValueError) as e:
            self._failed("", GET_VALUE, e, n)
            return None
        return data, n

    async def send_held_later(self, data: bytes, n: int) -> None:
        """send_held's datagram that had to wait: sent (within the sink's timeout), lost
        (best-effort) or AuditFailed (required)."""
        assert self._send_encoded_later is not None     # hold() gave what was held
        try:
            await self._send_encoded_later(data)
        except (OSError, ValueError) as e:
            self._failed("", GET_VALUE, e, n)

    def _available(self) -> bool:
        """The sink's own word that nothing listens (journal.JournalWriter.available), if it
        has one: the record is lost (or, required, the read refused) without being built."""
        available = self._sink_available
        return available is None or available()

    def _fold(self, rec: AuditRecord) -> AuditRecord | None:
        """None when a like denial was recorded less than DENIAL_WINDOW ago (it is counted),
        else `rec` with the count of those folded since."""
        key = (rec.uid, rec.secret.uuid, rec.reason)
        now = time.monotonic()
        window = self._denials.pop(key, None)
        if window is not None and now - window[0] < DENIAL_WINDOW:
            window[1] += 1
            self._denials[key] = window
            return None
        if len(self._denials) >= DENIAL_KEYS:
            self._denials.pop(next(iter(self._denials)))     # insertion order: the oldest
        self._denials[key] = [now, 0]
        return dataclasses.replace(rec, suppressed=int(window[1])) if window and window[1] else rec

    def _failed(self, uuid: str, operation: str, e: Exception | str, n: int = 1) -> None:
        """`n` records lost (n > 1: sent together, of no one secret; counted each, logged once)."""
        self._failures += n
        why = e if isinstance(e, str) else getattr(e, "strerror", None) or type(e).__name__
        if self.mode is AuditMode.REQUIRED:
            if n == 1:
                log.error("audit record could not be written (%s); value not returned", why,
                          extra={"SECRET_UUID": uuid, "SECRET_OPERATION": operation})
            else:
                log.error("audit records of %d value reads could not be written (%s); values not returned",
                          n, why, extra={"SECRET_OPERATION": operation})
            raise AuditFailed() from None
        # best-effort: the reads go on, the log says so (once a minute, with a count).
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning("audit records could not be written (%s); %d lost so far, reads continue "
                        "(audit = best-effort)", why, self._failures)


class CallerPids:
    """The pid of each caller as the bus daemon knows it, per unique name, at most `max_entries`
    (oldest dropped); `forget` is called when a name leaves the bus. `lookup` is the bus call
    (GetConnectionUnixProcessID); a failure gives None (the record says "unknown").

    One lookup per name at a time, shared: `prefetch` starts it while the caller's uid is
    being looked up (two round trips through a loaded bus in parallel, not one after the
    other: each costs root's GetValue tens of ms under attack)."""

    def __init__(self, lookup: Callable[[str], Awaitable[int]], max_entries: int = 4096):
        self._lookup = lookup
        self._pids: dict[str, int] = {}
        self._pending: dict[str, asyncio.Task[int | None]] = {}
        self.max_entries = max_entries

    def forget(self, sender: str) -> None:
        self._pids.pop(sender, None)
        task = self._pending.pop(sender, None)
        if task is not None:
            task.cancel()

    def prefetch(self, sender: str) -> None:
        """Start the lookup of `sender`'s pid, unless known or on its way (no await)."""
        if sender not in self._pids and sender not in self._pending and len(self._pending) < self.max_entries:
            task = asyncio.get_running_loop().create_task(self._fetch(sender))
            self._pending[sender] = task
            task.add_done_callback(
                lambda t: self._pending.pop(sender, None) if self._pending.get(sender) is t else None)

    def cached(self, sender: str) -> int | None:
        """`sender`'s pid when it is known already (no lookup, no await)."""
        return self._pids.get(sender)

    def sizes(self) -> dict[str, int]:
        return {"pids": len(self._pids), "pid_lookups": len(self._pending)}

    async def __call__(self, sender: str) -> int | None:
        pid = self._pids.get(sender)
        if pid is not None:
            return pid
        task = self._pending.get(sender)
        if task is None:
            return await self._fetch(sender)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():          # the name left meanwhile: unknown, as a failed lookup
                return None
            raise

    async def _fetch(self, sender: str) -> int | None:
        try:
            pid = int(await self._lookup(sender))
        except Exception as e:  # noqa: BLE001 - the record is still written, with pid unknown
            log.debug("cannot find the pid of %s: %s", sender, type(e).__name__)
            return None
        if len(self._pids) >= self.max_entries:
            self._pids.pop(next(iter(self._pids)))    # dicts keep insertion order: the oldest
        self._pids[sender] = pid
        return pid

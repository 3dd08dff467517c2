"""`secretbus audit`: the value-read audit records (access/audit.py), read back with journalctl.

journalctl does the reading (`-o json MESSAGE_ID=<the record id> [SECRET_UUID=...] [--since]`),
from the system journal, or from `--directory`/`--file` journal files (another machine's,
a test's). Arguments go to it as a list, each option glued to its value, so no word of the
user's can become an option of journalctl's.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass

from secretbus.access.audit import MESSAGE_ID

TIMEOUT = 120     # seconds: a large journal takes a while, a stuck one must not hang the CLI


class AuditReadError(Exception):
    """journalctl could not be run or failed; the text says why."""


@dataclass(frozen=True)
class Query:
    since: str | None = None
    secret: str | None = None        # canonical UUID
    directory: str | None = None
    file: str | None = None


def journalctl_argv(q: Query) -> list[str]:
    exe = shutil.which("journalctl")
    if exe is None:
        raise AuditReadError("journalctl not found: the audit records are in the systemd journal")
    argv = [exe, "--no-pager", "--quiet", "--output=json"]
    if q.directory:
        argv.append(f"--directory={q.directory}")
    if q.file:
        argv.append(f"--file={q.file}")
    if q.since:
        argv.append(f"--since={q.since}")
    argv.append(f"MESSAGE_ID={MESSAGE_ID}")
    if q.secret:
        argv.append(f"SECRET_UUID={q.secret}")
    return argv


def read_records(q: Query) -> list[dict[str, str]]:
    try:
        r = subprocess.run(journalctl_argv(q), capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AuditReadError(f"cannot run journalctl: {e}") from None
    if r.returncode != 0:
        why = r.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AuditReadError(f"journalctl failed: {why[-1] if why else f'exit status {r.returncode}'}")
    records = []
    for line in r.stdout.decode("utf-8", "replace").splitlines():
        if line.strip():
            entry = json.loads(line)
            records.append({k: _text(v) for k, v in entry.items()})
    return records


def _text(v: object) -> str:
    """journalctl's JSON gives non-UTF-8 values as byte arrays, repeated fields as lists."""
    if isinstance(v, list):
        if all(isinstance(x, int) for x in v):
            return bytes(v).decode("utf-8", "replace")
        return ",".join(_text(x) for x in v)
    return "" if v is None else str(v)


HEADER = ["Time", "Outcome", "UID", "PID", "Caller", "Via", "Secret", "Usage"]


def row(rec: dict[str, str]) -> list[str]:
    usec = rec.get("AUDIT_TIME_USEC") or rec.get("__REALTIME_TIMESTAMP") or "0"
    when = time.strftime("%Y-%m-%d %H:%M:%S%z", time.localtime(int(usec) / 1e6)) if usec.isdigit() else usec
    outcome = rec.get("AUDIT_OUTCOME", "?")
    if rec.get("AUDIT_REASON"):
        outcome += f" ({rec['AUDIT_REASON']})"
    if rec.get("AUDIT_SUPPRESSED"):
        outcome += f" +{rec['AUDIT_SUPPRESSED']} folded"
    usage = " ".join(filter(None, [rec.get("SECRET_USAGE_TYPE", ""), rec.get("SECRET_USAGE_ID", "")]))
    return [when, outcome, rec.get("CALLER_UID", "?"), rec.get("CALLER_PID", "?"), rec.get("CALLER_PEER", "?"),
            rec.get("AUDIT_FRONT_END", "?"), rec.get("SECRET_UUID", "?"), usage]

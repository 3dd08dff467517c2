"""Processes and directories the harness creates: every daemon is tracked by PID and stopped by PID."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

# pid -> description of every daemon the harness started and has not yet reaped.
STARTED: dict[int, str] = {}


class HarnessError(RuntimeError):
    pass


def public_tempdir(prefix: str) -> Path:
    """A fresh directory, mode 0755, under the system temp dir (reachable by other uids,
    unlike pytest's tmp_path which lives under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def remove_tree(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def spawn(argv: list[str], *, what: str, log: Path, **kw) -> subprocess.Popen:
    """Start a daemon in its own session (so that its leftovers share its process group),
    stdin from /dev/null, stderr (and stdout unless given) appended to `log`."""
    with open(log, "ab") as logf:
        kw.setdefault("stdout", logf)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=logf,
                                start_new_session=True, cwd=kw.pop("cwd", "/"), **kw)
    STARTED[proc.pid] = what
    return proc


def stop_process(proc: subprocess.Popen | None, *, timeout: float = 5.0) -> None:
    """SIGTERM the process, SIGKILL it after `timeout`, reap it, then kill whatever is left in
    its process group (children it started, e.g. bus-activated services)."""
    if proc is None:
        return
    pid = proc.pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    STARTED.pop(pid, None)
    # The group id stays allocated while any member lives, so it cannot name a stranger.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_until(predicate, *, timeout: float, interval: float = 0.02, what: str,
               proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `predicate` until it returns a true value (returned); fail early if `proc` dies."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"{what}: process exited with {proc.returncode}{log_tail(log)}")
        if time.monotonic() > deadline:
            raise HarnessError(f"{what}: timed out after {timeout} s{log_tail(log)}")
        time.sleep(interval)


def log_tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n--- " + str(log) + "\n" + "\n".join(text) if text else ""


def leftover_processes() -> dict[int, str]:
    """Daemons started by the harness that are still alive (should be empty between tests)."""
    return {pid: what for pid, what in STARTED.items() if pid_alive(pid)}

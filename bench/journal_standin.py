"""A stand-in for journald's native socket, so that the benches measure a real host's audit path.

Every value read writes an audit record to the journal (access/audit.py). On a host without
journald (this project's CI and bench machines) the record's send fails at once (no socket
file), a path a systemd host never takes; with journald the daemon pays one `send` per record
and the wake-up of the receiver. The stand-in is that receiver without journald's own work: a
datagram socket that takes every entry and drops it, the daemon pointed at it with
SECRETBUS_JOURNAL_SOCKET (the project's own override, journal.py). systemd sets
`net.unix.max_dgram_qlen` to 512 on boot (sysctl.d/50-default.conf, the receiver's queue; the
kernel's default is 10), so as root the stand-in runs in its own network namespace with 512, as
journald would; otherwise with the host's value. It counts the records it received (by their
MESSAGE_ID lines: one datagram may carry several), so a bench can say that they reached it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

QLEN = 512        # systemd's net.unix.max_dgram_qlen

_DRAIN = r"""
import signal, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(sys.argv[1])
n = 0
def stop(*_):
    print(n, flush=True)
    raise SystemExit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
def entries(d):          # a datagram may hold several, each with one MESSAGE_ID line
    return d.count(b"\nMESSAGE_ID=") + d.startswith(b"MESSAGE_ID=")
while True:
    n += entries(s.recv(1 << 17))
    try:                 # whatever queued meanwhile, without a wake-up each
        while True:
            n += entries(s.recv(1 << 17, socket.MSG_DONTWAIT))
    except BlockingIOError:
        pass
"""


class JournalStandIn:
    def __init__(self, directory: Path):
        self.path = directory / "journal-socket"
        self.proc: subprocess.Popen[str] | None = None
        self.namespaced = False
        self.received: int | None = None

    def env(self) -> dict[str, str]:
        return {"SECRETBUS_JOURNAL_SOCKET": str(self.path)}

    def start(self) -> JournalStandIn:
        argv = [sys.executable, "-c", _DRAIN, str(self.path)]
        unshare = shutil.which("unshare")
        if os.geteuid() == 0 and unshare:
            # exec keeps the pid: the process stopped later is the drainer itself.
            argv = [unshare, "-n", "--", "sh", "-c",
                    f'echo {QLEN} > /proc/sys/net/unix/max_dgram_qlen && exec "$@"', "sh", *argv]
            self.namespaced = True
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.wait(5)
            raise RuntimeError(f"journal stand-in did not start (status {self.proc.returncode})")
        return self

    def stop(self) -> int | None:
        """Records received, None if it could not say."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                out, _ = p.communicate(timeout=5)
                self.received = int(out.split()[-1]) if out.split() else None
            except (subprocess.TimeoutExpired, ValueError):
                p.kill()
                p.wait()
        self.path.unlink(missing_ok=True)
        return self.received

    def describe(self) -> str:
        return (f"journal stand-in (SECRETBUS_JOURNAL_SOCKET, max_dgram_qlen "
                f"{QLEN if self.namespaced else 'of the host'})")

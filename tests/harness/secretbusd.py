"""Start the project's own daemon, `secretbusd`, on a private bus for a test."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .bus import PrivateBus
from .journal import JournalSocket
from .procs import public_tempdir, remove_tree, spawn, stop_process

BUS_NAME = "org.libvirt.secret"


class Secretbusd:
    """`python -m secretbus.daemon --session|--system --root DIR --bus-address ADDR …`.

    `root` defaults to a fresh 0755 temp dir (its etc/ and run/ are made 0700 by the daemon).
    `conf` is written to DIR/etc/secret.conf before start. `.log()` is everything it printed.
    On the system bus the value-read audit is required by default: unless the test names a
    journal socket (SECRETBUS_JOURNAL_SOCKET in `env`) or an `--audit` mode, `.journal` is an
    emulated one (DIR/journal.socket) that receives the audit records.
    """

    def __init__(self, bus: PrivateBus, *, system: bool = False, root: Path | None = None,
                 conf: str | None = None, args: tuple[str, ...] = (), env: dict | None = None):
        self.bus = bus
        self.system = system
        self._own_root = root is None
        self.root = root or public_tempdir("sb-root-")
        self.conf = conf
        self.args = args
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "secretbusd.log"
        self.journal: JournalSocket | None = None

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "secretbus.daemon", "--system" if self.system else "--session",
                "--root", str(self.root), "--bus-address", self.bus.address, *self.args]

    def start(self, *, wait: bool = True, timeout: float = 20) -> Secretbusd:
        if self.conf is not None:
            (self.root / "etc").mkdir(mode=0o700, exist_ok=True)
            (self.root / "etc" / "secret.conf").write_text(self.conf)
        env = {**os.environ, **(self.env or {})}
        if (self.system and self.journal is None and "SECRETBUS_JOURNAL_SOCKET" not in (self.env or {})
                and not any(a.startswith("--audit") for a in self.args)):
            self.journal = JournalSocket(self.root / "journal.socket").start()
        if self.journal is not None:
            env["SECRETBUS_JOURNAL_SOCKET"] = str(self.journal.path)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                          env.get("PYTHONPATH")]))
        self.proc = spawn(self.argv, what="secretbusd", log=self.log_path, env=env)
        if wait:
            self.bus.wait_for_name(BUS_NAME, timeout=timeout, proc=self.proc, log=self.log_path)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int = signal.SIGHUP) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        stop_process(self.proc)
        return self.proc.returncode if self.proc else None

    def cleanup(self) -> None:
        self.stop()
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if self._own_root:
            remove_tree(self.root)

    def __enter__(self) -> Secretbusd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

"""A `secret-event --loop` watcher (virsh or the secretbus CLI) that ends as soon as it has
printed what the test waits for, instead of at the end of its --timeout.

virsh (and `secretbus secret-event`) end their event loop on SIGINT, print
"event loop interrupted" and then the count of events received, as after a timeout."""
from __future__ import annotations

import signal
import subprocess
import threading
import time


class EventWatch:
    """`argv` started with its stdout read as it comes; `until(*needles)` waits until every
    needle has appeared (or `timeout` s), then interrupts it and returns (stdout, stderr)."""

    def __init__(self, argv: list[str], **popen):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
        self._out: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self._out.append(line)

    def text(self) -> str:
        with self._lock:
            return "".join(self._out)

    def until(self, *needles: str, timeout: float = 20) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if all(n in self.text() for n in needles):
                break
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.finish()

    def finish(self, timeout: float = 20) -> tuple[str, str]:
        """Wait for it to end by itself (its --timeout); (stdout, stderr)."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.kill()
        self._reader.join(timeout=5)
        assert self.proc.stderr is not None
        return self.text(), self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

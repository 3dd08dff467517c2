"""Holds a driver's I/O thread before its next batch (Writes.gate), so that writes queue up."""
from __future__ import annotations

import threading

from secretbus.driver.driver import SecretDriver


class Gate:
    """Holds the I/O thread before its next batch until `open()`."""

    def __init__(self, driver: SecretDriver, timeout: float = 10) -> None:
        self.held = threading.Event()
        self.go = threading.Event()
        self.timeout = timeout
        driver.writes.gate = self.wait

    def wait(self) -> None:
        self.held.set()
        assert self.go.wait(self.timeout)

    def open(self) -> None:
        self.go.set()

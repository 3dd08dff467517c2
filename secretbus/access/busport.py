"""What the access layer needs of a message bus, without any D-Bus library: one call
function and a signal feed. The D-Bus front end adapts its connection to this
(bus/polkit.py); another front end can hand in its own."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class BusError(Exception):
    """The bus answered a call with an error reply (name and text as sent)."""

    def __init__(self, name: str, text: str):
        super().__init__(f"{name}: {text}")
        self.name, self.text = name, text


@dataclass(frozen=True)
class Typed:
    """A variant value (`v`) in a call body: its signature and the value."""

    signature: str
    value: Any


@dataclass(frozen=True)
class Signal:
    sender: str | None
    path: str | None
    interface: str | None
    member: str | None
    body: list[Any]


SignalHandler = Callable[[Signal], None]


class BusPort(Protocol):
    async def call(self, destination: str, path: str, interface: str, member: str,
                   signature: str, body: list[Any], timeout: float) -> list[Any]:
        """The reply body; BusError on an error reply, TimeoutError after `timeout` seconds."""

    def watch(self, handler: SignalHandler) -> None:
        """Pass every signal this connection receives to `handler` (match rules are the caller's)."""

    def unwatch(self, handler: SignalHandler) -> None: ...

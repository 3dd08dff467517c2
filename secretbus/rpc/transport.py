"""Transports of the RPC client: something that yields an asyncio stream pair.

Only the local unix socket exists now; ssh (a child's stdio), TCP and TLS plug in here as
other `Transport`s without the client changing (DESIGN §10).
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from secretbus.core import errors

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
READ_LIMIT = 1024 * 1024        # StreamReader buffer; frames are read with readexactly


class Transport(Protocol):
    def describe(self) -> str:
        """Where it leads, for error messages (never a credential)."""

    async def open(self) -> Streams:
        """A connected stream pair; errors.OperationFailed when it cannot be had."""


@dataclass(frozen=True)
class UnixTransport:
    path: Path

    def describe(self) -> str:
        return str(self.path)

    async def open(self) -> Streams:
        try:
            return await asyncio.open_unix_connection(os.fspath(self.path), limit=READ_LIMIT)
        except OSError as e:
            # libvirt's wording, so that scripts matching virsh's error see the same text.
            raise errors.SystemError(f"Failed to connect socket to '{self.path}': {e.strerror or e}") from None

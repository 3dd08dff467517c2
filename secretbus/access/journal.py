"""journald's native protocol, written directly so that a lost record is an error.

libsystemd's sd_journal_send() ignores a missing socket (ENOENT is dropped), so a caller
cannot tell whether a record was kept. Here an entry is one datagram of fields, each
`NAME=value\\n`, or `NAME\\n` + little-endian u64 length + value + `\\n` when the value holds
a newline (systemd's docs/JOURNAL_NATIVE_PROTOCOL.md), sent to journald's socket; any send
error raises. Several entries may share one datagram, each after an empty line
(journald-native.c's entry separator; tests/test_audit.py sends them to the real journald).
"""
from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
from collections.abc import Mapping, Sequence

DEFAULT_SOCKET = "/run/systemd/journal/socket"
# Test-only, harmless: only whoever sets the daemon's environment (root, its unit) moves it.
SOCKET_ENV = "SECRETBUS_JOURNAL_SOCKET"
SEND_TIMEOUT = 2.0      # seconds to wait for room in journald's queue before giving up
# Entries sent together stop growing here: far below what one datagram may hold (the socket's
# send buffer, net.core.wmem_default: 208 KiB), so a batch never fails for its size alone.
BATCH_BYTES = 64 * 1024

# journald keeps only names of A-Z, 0-9 and _ (not leading), at most 64 characters.
_FIELD_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")


def encode_entry(fields: Mapping[str, str | bytes]) -> bytes:
    """One native-protocol entry; ValueError for a name journald would drop."""
    # The common case, every audit record: text values on one line each. One join and one
    # encode for the entry instead of one per field (a third of a record's cost).
    text: list[str] = []
    for name, value in fields.items():
        if type(value) is not str or "\n" in value:
            return _encode_fields(fields)
        if name not in _KEYS:
            _key(name)
        text.append(f"{name}={value}\n")
    return "".join(text).encode("utf-8", "replace")


def join_entries(entries: Sequence[bytes]) -> bytes:
    """Entries (each from encode_entry, ending in a newline) as one datagram: an empty line
    between two entries ends the first."""
    return b"\n".join(entries)


def _encode_fields(fields: Mapping[str, str | bytes]) -> bytes:
    """Field by field: bytes values, and values holding a newline (length-prefixed)."""
    parts: list[bytes] = []
    for name, value in fields.items():
        key = _KEYS.get(name)
        if key is None:
            key = _key(name)
        data = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
        if b"\n" in data:
            parts.append(key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key + b"=" + data + b"\n")
    return b"".join(parts)


# Checked names, encoded: the same ~17 names make every record (one RPC or D-Bus value
# read each), and a regex match per field was most of a record's cost. Bounded all the same.
_KEYS: dict[str, bytes] = {}
_KEYS_MAX = 256


def _key(name: str) -> bytes:
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"invalid journal field name {name!r}")
    key = name.encode("ascii")
    if len(_KEYS) < _KEYS_MAX:
        _KEYS[name] = key
    return key


def socket_path() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class JournalWriter:
    """Sends entries to journald over one non-blocking datagram socket, connected so that a
    full journald queue is waited for (asynchronously, bounded) instead of blocking the loop.
    A journald restart makes a new socket: on a refused send it reconnects once."""

    def __init__(self, path: str | None = None, *, timeout: float = SEND_TIMEOUT):
        self.path = path or socket_path()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._slow = asyncio.Lock()    # one waiter on the fd at a time (asyncio allows one writer)

    def _connected(self) -> socket.socket:
        if self._sock is None:
            # No journald (no socket file): one stat, not a socket made and closed per record.
            os.stat(self.path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                s.setblocking(False)
                s.connect(self.path)
            except BaseException:
                s.close()
                raise
            self._sock = s
        return self._sock

    def available(self) -> bool:
        """False when there is no journald to send to (no socket file), without raising: on a
        host without journald a stat's exception, a record built and its loss were most of
        every value read's audit cost. True says only that a send may be tried."""
        return self._sock is not None or os.access(self.path, os.F_OK)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def send(self, fields: Mapping[str, str | bytes]) -> None:
        """Send one entry; OSError (or TimeoutError) if journald did not take it."""
        self._connected()            # no journald: fail before encoding a record nobody takes
        await self.send_encoded(encode_entry(fields))

    async def send_encoded(self, data: bytes) -> None:
        """`send` of what is encoded already: one entry, or several (join_entries)."""
        for attempt in (1, 2):
            try:
                await self._send(data)
                return
            except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
                # journald restarted (a new socket at the path) or stopped: reconnect once.
                self.close()
                if attempt == 2:
                    raise

    def send_now(self, fields: Mapping[str, str | bytes]) -> bool:
        """Send one entry without awaiting: True when journald took it, False when nothing was
        sent and `send` must do it (its queue is full, or it restarted: `send` reconnects);
        OSError when there is no journald or a partial send."""
        sock = self._connected()      # no journald: fail before encoding
        return self.send_now_encoded(encode_entry(fields), sock)

    def send_now_encoded(self, data: bytes, sock: socket.socket | None = None) -> bool:
        """send_now of what is encoded already: one entry (encode_entry), or several (join_entries)."""
        if sock is None:
            sock = self._connected()
        try:
            sent = sock.send(data)
        except (BlockingIOError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
            return False
        if sent != len(data):
            raise OSError(f"journal took {sent} of {len(data)} bytes")
        return True

    async def _send(self, data: bytes) -> None:
        sock = self._connected()
        try:
            sent = sock.send(data)
        except BlockingIOError:
            async with self._slow:
                loop = asyncio.get_running_loop()
                await asyncio.wait_for(loop.sock_sendall(sock, data), self.timeout)
            return
        if sent != len(data):
            raise OSError(f"journal took {sent} of {len(data)} bytes")

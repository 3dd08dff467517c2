"""The SASL security layer on a stream: after GSSAPI negotiated confidentiality, every byte
either way is SASL-encoded, as libvirt's virnetsocket.c and Cyrus SASL's GSSAPI plugin do it.

On the wire, the stream is a sequence of packets, each a 4-byte big-endian length and a GSS-API
wrap token (encrypted) of at most the peer's negotiated maximum buffer size; the plaintext is
cut into chunks that fit (`gss_wrap_size_limit`), and packet boundaries have nothing to do with
RPC frame boundaries (virNetSocketWriteSASL encodes whatever the write buffer holds, up to the
limit; the reader decodes a byte stream). A packet longer than this side's advertised maximum,
one that does not unwrap, or one that was not encrypted ends the connection.

`LayeredStreamProtocol` is asyncio's StreamReaderProtocol over a `LayeredTransport`: until
`arm()` it passes bytes through unchanged, so that the SASL exchange itself runs in the clear;
`arm(layer, after_next_write=True)` (server) decodes from now on and encodes from the write
after the next one, because libvirt's server sends its final AUTH_SASL_STEP reply in the clear
and only then turns the layer on (virNetServerClientDispatchWrite). The client arms both at once.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

log = logging.getLogger("secretbus.rpc.sasl")

LENGTH = 4


class LayerError(Exception):
    """A packet that breaks the layer: the connection ends (the text names no data)."""


class Wrapper(Protocol):
    """The GSS-API context's per-message calls (gssapi.SecurityContext has them)."""

    def wrap(self, message: bytes, encrypt: bool) -> Any: ...

    def unwrap(self, message: bytes) -> Any: ...


class SecurityLayer:
    """Encode and decode for one connection. `chunk`: the largest plaintext per packet (so that
    its wrap token fits the peer's buffer); `recv_max`: the largest token this side accepts."""

    def __init__(self, ctx: Wrapper, chunk: int, recv_max: int, ssf: int):
        if chunk <= 0:
            raise LayerError("the peer's maximum buffer is too small for any data")
        self._ctx = ctx
        self.chunk = chunk
        self.recv_max = recv_max
        self.ssf = ssf
        self._buf = bytearray()

    def encode(self, data: bytes | bytearray | memoryview) -> bytes:
        view = memoryview(data)
        out = bytearray()
        for i in range(0, len(view), self.chunk):
            try:
                w = self._ctx.wrap(bytes(view[i:i + self.chunk]), True)
            except Exception as e:  # noqa: BLE001 - gssapi's errors have no common base worth naming
                raise LayerError(f"GSS-API wrap failed: {type(e).__name__}") from None
            if not w.encrypted:
                raise LayerError("GSS-API did not encrypt")
            out += len(w.message).to_bytes(LENGTH, "big")
            out += w.message
        return bytes(out)

    def decode(self, data: bytes) -> bytes:
        """The plaintext of every whole packet so far; a partial one waits for its rest."""
        buf = self._buf
        buf += data
        out = bytearray()
        while len(buf) >= LENGTH:
            n = int.from_bytes(buf[:LENGTH], "big")
            if n == 0 or n > self.recv_max:
                raise LayerError(f"SASL packet of {n} bytes (the limit is {self.recv_max})")
            if len(buf) < LENGTH + n:
                break
            token = bytes(buf[LENGTH:LENGTH + n])
            del buf[:LENGTH + n]
            try:
                u = self._ctx.unwrap(token)
            except Exception as e:  # noqa: BLE001
                raise LayerError(f"GSS-API unwrap failed: {type(e).__name__}") from None
            if not u.encrypted:
                raise LayerError("a SASL packet that was not encrypted")
            out += u.message
        return bytes(out)


class LayeredTransport(asyncio.Transport):
    """The connection's transport, encoding what is written once the layer is on."""

    def __init__(self, inner: asyncio.Transport):
        super().__init__()
        self._inner = inner
        self.layer: SecurityLayer | None = None      # encoding writes
        self._pending: SecurityLayer | None = None   # on after the next write

    def arm(self, layer: SecurityLayer, *, after_next_write: bool) -> None:
        if after_next_write:
            self._pending = layer
        else:
            self.layer = layer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        layer = self.layer
        if layer is None:
            self._inner.write(data)
            if self._pending is not None:
                self.layer, self._pending = self._pending, None
            return
        try:
            self._inner.write(layer.encode(data))
        except LayerError as e:
            log.warning("closing a connection: %s", e)
            self._inner.abort()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return self.layer is None and self._inner.can_write_eof()

    def write_eof(self) -> None:
        self._inner.write_eof()

    # -- everything else is the connection's own ---------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()


OnConnect = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "LayeredStreamProtocol"], Awaitable[None]]


class LayeredStreamProtocol(asyncio.StreamReaderProtocol):
    """A StreamReaderProtocol whose reader gets decoded bytes once the layer is armed."""

    layered: LayeredTransport

    def __init__(self, reader: asyncio.StreamReader, on_connect: OnConnect | None = None):
        """`on_connect(reader, writer, protocol)`: a server's connection handler."""
        cb = None
        if on_connect is not None:
            def cb(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> Awaitable[None]:
                return on_connect(r, w, self)
        super().__init__(reader, cb)
        self._reading: SecurityLayer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.layered = LayeredTransport(transport)
        super().connection_made(self.layered)

    def arm(self, layer: SecurityLayer, *, after_next_write: bool = False) -> None:
        """Decode everything received from now on; encode writes (after the next one)."""
        self._reading = layer
        self.layered.arm(layer, after_next_write=after_next_write)

    @property
    def secured(self) -> bool:
        return self._reading is not None

    def data_received(self, data: bytes) -> None:
        layer = self._reading
        if layer is not None:
            try:
                data = layer.decode(data)
            except LayerError as e:
                log.warning("closing a connection: %s", e)
                self.layered.abort()
                return
            if not data:
                return
        super().data_received(data)

"""The libvirt RPC client: asyncio, on the same codec as the server (xdr.py, protocol.py, frame.py).

`AsyncRpcClient` owns one stream pair (any `transport.Transport`). Calls go out with serials
0, 1, 2, … and any number may be in flight: replies are matched by serial, so they may come
back in any order. The reader task also answers keepalive PINGs and hands event MESSAGEs to
`on_event`. When the stream ends every pending call fails with OperationFailed, and `on_lost`
is told why (libvirt's close callback: end of file, keepalive timeout or an I/O error), unless
this side closed it.

Keepalive as libvirt's client does it (virkeepalive.c, virsh's -k/-K): once the server has
said it speaks the keepalive program, a connection silent for `interval` seconds is PINGed,
and after `count` PINGs without a frame back it is closed ("keepalive timeout"): a server
host that vanished without a FIN ends an event loop instead of leaving it waiting for ever.

Error replies become the project's exception classes (core/errors.py) by libvirt's code, with
libvirt's prefix taken off the message so that `display()` prints what virsh prints. The
synchronous `Connection` over this client is `secretbus.rpc.facade.RpcConnection`.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from secretbus.core import errors
from secretbus.rpc import protocol as P
from secretbus.rpc.frame import LENGTH_SIZE, Header, encode_frame, frame_length, parse_header
from secretbus.rpc.transport import Transport
from secretbus.rpc.xdr import XdrError, XdrType, decode, encode

if TYPE_CHECKING:
    from secretbus.rpc.sasl_client import SaslLogin

log = logging.getLogger("secretbus.rpc.client")

EventCallback = Callable[[int, dict[str, Any]], None]      # (procedure, decoded message)
CONNECT_RO = 1                   # VIR_CONNECT_RO
AUTH_FAILED = 45                 # VIR_ERR_AUTH_FAILED
_SERIAL_MOD = 2 ** 32
_PONG = encode_frame(Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PONG, P.MsgType.MESSAGE, 0, P.Status.OK))
_PING = encode_frame(Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PING, P.MsgType.MESSAGE, 0, P.Status.OK))


@dataclass(frozen=True)
class KeepAlive:
    """virsh's defaults (-k 5, -K 6). interval <= 0: never PING (the server's PINGs are still
    answered); count 0: closed after one silent interval, without a PING (libvirt's rule)."""
    interval: float = 5.0
    count: int = 6


DEFAULT_KEEPALIVE = KeepAlive()


class Lost(enum.Enum):
    """Why the server's side of a connection ended (libvirt's virConnectCloseReason, as virsh
    names them: "Disconnected from URI due to …")."""
    ERROR = "error"
    EOF = "end of file"
    KEEPALIVE = "keepalive timeout"


LostCallback = Callable[[Lost, str], None]      # (reason, the text pending calls fail with)

# -- errors ----------------------------------------------------------------------------------
_BY_CODE: dict[int, type[errors.SecretError]] = {}
for _cls in errors.ALL_ERRORS:
    _BY_CODE.setdefault(_cls.code, _cls)
_OTHER: dict[int, type[errors.SecretError]] = {}


def _other_class(code: int) -> type[errors.SecretError]:
    """A code the project has no class for (auth failures, …): an OperationFailed that keeps
    libvirt's code and the server's whole message."""
    cls = _OTHER.get(code)
    if cls is None:
        cls = type(f"RemoteError{code}", (errors.OperationFailed,), {"__module__": __name__},
                   code=code, prefix="", own_kind=False)
        _OTHER[code] = cls
    return cls


remote_error_class = _other_class     # for the classes of other modules (rpc/sasl_client.py)


def error_from_remote(body: dict[str, Any]) -> errors.SecretError:
    """The exception for a `remote_error` reply."""
    code = body.get("code")
    message = body.get("message") or ""
    if not isinstance(code, int):
        return errors.OperationFailed("malformed error reply from the server")
    if code == errors.RPCError.code and message.startswith("unknown procedure"):
        # libvirt's client does the same (virnetclientprogram.c): an old server lacks the call.
        return errors.NoSupport(message)
    return errors.rebuild(_BY_CODE.get(code) or _other_class(code), message)


def auth_failed(message: str) -> errors.SecretError:
    return _other_class(AUTH_FAILED)("authentication failed: " + message)


# -- the client ------------------------------------------------------------------------------
class AsyncRpcClient:
    """One connection. Use from one event loop; every coroutine is cancellation-safe (a
    cancelled call's late reply is dropped)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, where: str,
                 on_event: EventCallback | None = None, max_frame: int = P.MESSAGE_MAX):
        self.where = where
        self.on_event = on_event
        self.on_lost: LostCallback | None = None
        self._loop = asyncio.get_running_loop()
        self._last_rx = self._loop.time()
        self._pinger: asyncio.Task[None] | None = None
        self._reader, self._writer = reader, writer
        self._max_frame = max_frame
        self._serial = 0
        self._pending: dict[int, tuple[asyncio.Future[Any], XdrType]] = {}
        self._lost: str | None = None          # why the stream ended (None while it is up)
        self._transport: Transport | None = None   # set by connect(); asked why the stream ended
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, transport: Transport, **kw: Any) -> AsyncRpcClient:
        reader, writer = await transport.open()
        client = cls(reader, writer, where=transport.describe(), **kw)
        client._transport = transport
        return client

    @property
    def closed(self) -> bool:
        return self._lost is not None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- calls ---------------------------------------------------------------------
    def send(self, proc: int, args: Any = None) -> asyncio.Future[Any]:
        """Send one call now; the future resolves to its decoded return value (or raises)."""
        if self._lost is not None:
            raise errors.OperationFailed(self._lost)
        spec = P.PROCS[proc]
        try:
            payload = encode(spec.args, args)
        except XdrError as e:
            # The arguments cannot travel (an int out of range, a string too long, …); the
            # text names the XDR type and its limit, never the value.
            raise errors.InvalidArg(f"cannot encode the arguments of procedure {proc}: {e}") from None
        serial = self._serial
        self._serial = (serial + 1) % _SERIAL_MOD
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[serial] = (fut, spec.ret)
        fut.add_done_callback(self._forget(serial))
        self._writer.write(encode_frame(Header(P.REMOTE_PROGRAM, P.PROTOCOL_VERSION, proc, P.MsgType.CALL,
                                               serial, P.Status.OK), payload))
        return fut

    def _forget(self, serial: int) -> Callable[[asyncio.Future[Any]], None]:
        def done(_f: asyncio.Future[Any]) -> None:
            self._pending.pop(serial, None)
        return done

    async def call(self, proc: int, args: Any = None) -> Any:
        fut = self.send(proc, args)
        if self._writer.transport.get_write_buffer_size() > 0:
            await self._drain()
        return await fut

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError as e:
            self._lose(f"the connection to {self.where} was lost: {e.strerror or type(e).__name__}", Lost.ERROR)

    # -- the libvirt connection handshake ------------------------------------------
    async def open(self, name: str | None, *, readonly: bool = False,
                   keepalive: KeepAlive | None = DEFAULT_KEEPALIVE, sasl: SaslLogin | None = None) -> None:
        """AUTH_LIST (+ AUTH_POLKIT or SASL), keepalive negotiation, CONNECT_OPEN: what virsh
        sends. `sasl`: where SCRAM's credentials come from, if the server asks (None: refused).
        `keepalive` None: not negotiated (as python3-libvirt without an event loop)."""
        types = (await self.call(P.Proc.AUTH_LIST))["types"]
        if types and P.AuthType.NONE not in types:
            if P.AuthType.SASL in types and P.AuthType.POLKIT not in types:
                from secretbus.rpc.sasl_client import SaslLogin, scram  # it builds on this module
                await scram(self.call, sasl if sasl is not None else SaslLogin())
            elif P.AuthType.POLKIT not in types:
                raise auth_failed(f"the server offers authentication types {types}, none of which this "
                                  "client speaks")
            elif not (await self.call(P.Proc.AUTH_POLKIT))["complete"]:
                raise auth_failed("polkit authentication did not complete")
        if keepalive is not None:
            # The server then pings this connection when idle, and drops it if we are gone.
            answer = await self.call(P.Proc.CONNECT_SUPPORTS_FEATURE, {"feature": P.Feature.PROGRAM_KEEPALIVE})
            if answer.get("supported") and keepalive.interval > 0:
                self._pinger = self._loop.create_task(self._keepalive(keepalive))
        await self.call(P.Proc.CONNECT_OPEN, {"name": name, "flags": CONNECT_RO if readonly else 0})

    async def _keepalive(self, ka: KeepAlive) -> None:
        """PING after `ka.interval` s without a frame from the server; after `ka.count`
        unanswered, close (any frame counts as an answer, as in virKeepAliveCheckMessage)."""
        sent, pinged = 0, self._loop.time()
        while self._lost is None:
            await asyncio.sleep(ka.interval)
            if self._last_rx > pinged:
                sent = 0            # heard from since the last PING
            if self._loop.time() - self._last_rx < ka.interval:
                continue
            if sent >= ka.count:
                silence = (f"no answer to {sent} keepalive ping{'' if sent == 1 else 's'}" if sent
                           else f"silent for {ka.interval:g} s (keepalive count 0)")
                self._lose(f"the connection to {self.where} was closed: {silence}", Lost.KEEPALIVE)
                return
            sent, pinged = sent + 1, self._loop.time()
            self._writer.write(_PING)

    async def close(self, *, goodbye: bool = True, wait: float = 5.0) -> None:
        """CONNECT_CLOSE (when `goodbye` and the stream is up), then close the stream."""
        if goodbye and self._lost is None:
            with contextlib.suppress(errors.SecretError, TimeoutError):
                async with asyncio.timeout(wait):
                    await self.call(P.Proc.CONNECT_CLOSE)
        self._lose("the connection is closed", None)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), wait)
        aclose = getattr(self._transport, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    # -- reading -------------------------------------------------------------------
    async def _read_loop(self) -> None:
        why, reason = f"the connection to {self.where} was lost: the server closed it", Lost.EOF
        try:
            while True:
                word = await self._reader.readexactly(LENGTH_SIZE)
                body = await self._reader.readexactly(frame_length(word, self._max_frame))
                self._last_rx = self._loop.time()
                self._dispatch(body)
        except asyncio.IncompleteReadError:
            pass
        except XdrError as e:
            why, reason = f"the connection to {self.where} was dropped: {e}", Lost.ERROR
            log.warning("RPC server %s sent a frame out of bounds: %s", self.where, e)
        except ConnectionError as e:
            why, reason = f"the connection to {self.where} was lost: {e.strerror or type(e).__name__}", Lost.ERROR
        # A transport that knows better (ssh: "authentication failed", "no remote helper") says so.
        failure = getattr(self._transport, "failure", None)
        if failure is not None and self._lost is None:
            with contextlib.suppress(Exception):
                why = await failure() or why
        self._lose(why, reason)

    def _dispatch(self, body: bytes) -> None:
        header, payload = parse_header(body)
        if header.prog == P.KEEPALIVE_PROGRAM:
            if header.type == P.MsgType.MESSAGE and header.proc == P.KeepAlive.PING:
                self._writer.write(_PONG)
            return
        if header.prog != P.REMOTE_PROGRAM:
            return
        if header.type == P.MsgType.REPLY:
            entry = self._pending.get(header.serial)
            if entry is None or entry[0].done():
                return                      # a cancelled call's late reply
            fut, ret_type = entry
            try:
                if header.status == P.Status.ERROR:
                    fut.set_exception(error_from_remote(decode(P.REMOTE_ERROR, payload)))
                else:
                    fut.set_result(decode(ret_type, payload))
            except XdrError:
                fut.set_exception(errors.RPCError("Unable to decode message payload"))
        elif header.type == P.MsgType.MESSAGE and self.on_event is not None:
            msg_type = P.MESSAGES.get(header.proc)
            if msg_type is None:
                return
            try:
                msg = decode(msg_type, payload)
            except XdrError:
                log.warning("RPC server %s sent an event that does not decode (procedure %d)",
                            self.where, header.proc)
                return
            try:
                self.on_event(header.proc, msg)
            except Exception:  # noqa: BLE001 - a subscriber's bug must not end the connection
                log.exception("RPC event callback failed")

    def _lose(self, why: str, reason: Lost | None) -> None:
        """The stream is done: `reason` None when this side closed it (nobody is told)."""
        if self._lost is not None:
            return
        self._lost = why
        for fut, _ in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(errors.OperationFailed(why))
        self._pending.clear()
        if self._pinger is not None and self._pinger is not asyncio.current_task():
            self._pinger.cancel()
        with contextlib.suppress(Exception):
            self._writer.close()
        if reason is not None and self.on_lost is not None:
            try:
                self.on_lost(reason, why)
            except Exception:  # noqa: BLE001 - a subscriber's bug must not hide the loss
                log.exception("RPC close callback failed")

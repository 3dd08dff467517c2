"""One client connection: read frames, dispatch calls, write replies and events, keepalive.

Bounds (DESIGN §12): a frame larger than the limit closes the connection before it is read;
at most `max_requests` calls are in flight (then the connection is not read until one
finishes, so a flood waits in the kernel's buffer, not in ours); a reply waits while the
client's unread output is above the transport's high-water mark; an event that finds more
than `max_unread` bytes unread drops the client. One client stalls only itself.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import CoroutineType
from typing import Any

from secretbus.core import errors
from secretbus.core.eager import run_eager
from secretbus.rpc import protocol as P
from secretbus.rpc.failures import RemoteFailure, daemon_internal, error_body, rpc_failure
from secretbus.rpc.frame import LENGTH_SIZE, Header, encode_frame, encode_reply, frame_length, parse_header
from secretbus.rpc.procedures import Handler
from secretbus.rpc.session import Session
from secretbus.rpc.xdr import XdrError, XdrType, decode, encode

log = logging.getLogger("secretbus.rpc")

WRITE_HIGH_WATER = 256 * 1024
_PONG = encode_frame(Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PONG, P.MsgType.MESSAGE, 0, P.Status.OK))
_PING = encode_frame(Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PING, P.MsgType.MESSAGE, 0, P.Status.OK))


@dataclass(frozen=True)
class RpcLimits:
    max_clients: int = 5000              # libvirt's max_clients
    max_clients_per_uid: int = 64        # other than uid 0
    root_reserve: int = 64               # connections only uid 0 may take
    max_requests: int = 5                # libvirt's max_client_requests
    max_frame: int = 2 * 1024 * 1024     # inbound; the largest call (a define) is < 1.1 MiB
    max_unread: int = 16 * 1024 * 1024   # queued output before an event drops the client
    keepalive_interval: float = 5.0      # libvirt's keepalive_interval
    keepalive_count: int = 5             # unanswered pings before the client is dropped


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Session,
                 table: dict[int, Handler], limits: RpcLimits,
                 on_close: Callable[[Connection], None]):
        self.reader, self.writer = reader, writer
        self.session = session
        self._table = table
        self._limits = limits
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(limits.max_requests)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._last_rx = self._loop.time()
        self._pings = 0
        self.calls = 0
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    # -- reading ------------------------------------------------------------------
    async def serve(self) -> None:
        ka = self._loop.create_task(self._keepalive())
        try:
            while not self._closed:
                word = await self.reader.readexactly(LENGTH_SIZE)
                n = frame_length(word, self._limits.max_frame)
                body = await self.reader.readexactly(n)
                self._last_rx, self._pings = self._loop.time(), 0
                await self._slots.acquire()
                self._handle(body)
        except XdrError as e:
            log.warning("closing RPC client pid %d uid %d: %s", self.session.peer.pid, self.session.peer.uid, e)
            self.close(abort=True)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            ka.cancel()
            self.close()

    def _handle(self, body: bytes) -> None:
        """Dispatch one frame; the slot taken for it is released when it is answered."""
        release = True
        try:
            header, payload = parse_header(body)
            if header.prog == P.KEEPALIVE_PROGRAM:
                if header.type == P.MsgType.MESSAGE and header.proc == P.KeepAlive.PING:
                    self._send(_PONG)
                return
            if header.prog != P.REMOTE_PROGRAM or header.vers != P.PROTOCOL_VERSION:
                self._reply_error(header, rpc_failure(f"Cannot find program {header.prog} version {header.vers}"))
                return
            if header.type != P.MsgType.CALL:
                return      # libvirt drops what is not a call (streams are not served)
            if header.status != P.Status.OK:
                self._reply_error(header, rpc_failure(f"Unexpected message status {header.status}"))
                return
            release = self._call(header, payload)
        finally:
            if release:
                self._slots.release()

    def _call(self, header: Header, payload: memoryview) -> bool:
        """Run one call; False when a task now owns the slot."""
        self.calls += 1
        try:
            handler, ret_type, args = self._admit(header, payload)
            ret = handler.fn(self, args)
            if handler.writes:
                # The act that submits the write (after the checks, if a coroutine makes them).
                self._track(self._loop.create_task(self._finish(header, ret_type, ret)))
                return False
            if type(ret) is CoroutineType:
                # Access checks and audit: run at once; a task only if one really waits.
                return self._start(header, ret_type, ret)
        except Exception as e:  # noqa: BLE001 - every failure is an error reply
            self._reply_error(header, e)
            return True
        return self._reply(header, ret_type, ret)

    def _start(self, header: Header, ret_type: XdrType, coro: CoroutineType[Any, Any, Any]) -> bool:
        """Run a handler's coroutine at once; False when a task now owns the slot."""
        now: list[tuple[Any, BaseException | None]] = []
        later = False

        def done(result: Any, error: BaseException | None) -> None:
            if not later:
                now.append((result, error))     # answered below, the caller releases the slot
            elif self._answer(header, ret_type, result, error):
                self._slots.release()
        task = run_eager(self._loop, coro, done)
        if task is None:
            return self._answer(header, ret_type, *now[0])
        later = True
        self._track(task)
        return False

    def _answer(self, header: Header, ret_type: XdrType, result: Any, error: BaseException | None) -> bool:
        if error is not None:
            self._reply_error(header, error)
            return True
        return self._reply(header, ret_type, result)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _admit(self, header: Header, payload: memoryview) -> tuple[Handler, XdrType, Any]:
        """libvirt's dispatch rules in its order: a known procedure, authenticated, arguments that
        decode, the connection opened, and no change or value asked of a read-only connection."""
        handler = self._table.get(header.proc)
        spec = P.PROCS.get(header.proc)
        s = self.session
        if handler is None or spec is None:
            raise rpc_failure(f"unknown procedure: {header.proc}")
        if not s.authenticated and not handler.pre_auth:
            raise rpc_failure("authentication required")
        try:
            args = decode(spec.args, payload)
        except XdrError:
            raise rpc_failure("Unable to decode message payload") from None
        if not s.opened and not handler.pre_open:
            raise daemon_internal("hypervisor connection not open")
        if handler.denied_readonly and s.readonly:
            raise errors.OperationDenied(f"read only access prevents {handler.denied_readonly}")
        return handler, spec.ret, args

    async def _finish(self, header: Header, ret_type: XdrType, ret: Any) -> None:
        """Await the write's checks, submit its act to the driver (planned here, on the loop;
        committed by the driver's I/O thread), await it, reply."""
        try:
            if type(ret) is CoroutineType:
                ret = await ret
            ret = await ret()
            if self._reply(header, ret_type, ret):
                self._slots.release()
        except Exception as e:  # noqa: BLE001
            self._reply_error(header, e)
            self._slots.release()

    # -- writing ------------------------------------------------------------------
    def _reply(self, header: Header, ret_type: XdrType, ret: Any) -> bool:
        """Send a reply; False when the slot is released only once the client has read it."""
        try:
            payload = encode(ret_type, ret)
        except XdrError as e:
            self._reply_error(header, rpc_failure(f"Unable to encode message payload: {e}"))
            return True
        self._send(encode_reply(header, payload))
        if self._closed or self.writer.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
            return True
        self._track(self._loop.create_task(self._drained()))
        return False

    async def _drained(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionError:
            pass
        finally:
            self._slots.release()

    def _reply_error(self, header: Header, e: BaseException) -> None:
        if not isinstance(e, (errors.SecretError, RemoteFailure)):
            # The type only: an exception's text could quote an argument.
            log.error("internal error in RPC procedure %d: %s", header.proc, type(e).__name__)
        self._send(encode_reply(header, encode(P.REMOTE_ERROR, error_body(e)), P.Status.ERROR))

    def _send(self, frame: bytes) -> None:
        if not self._closed:
            self.writer.write(frame)

    def send_message(self, proc: int, payload: bytes) -> None:
        """An event (type MESSAGE, serial 1 as libvirtd sends them)."""
        if self._closed:
            return
        if self.writer.transport.get_write_buffer_size() > self._limits.max_unread:
            log.warning("dropping RPC client pid %d uid %d: it does not read its events",
                        self.session.peer.pid, self.session.peer.uid)
            self.close(abort=True)
            return
        self._send(encode_frame(Header(P.REMOTE_PROGRAM, P.PROTOCOL_VERSION, proc, P.MsgType.MESSAGE, 1,
                                       P.Status.OK), payload))

    async def _keepalive(self) -> None:
        """Once the client asked for keepalive: PING after an idle interval, drop after
        `keepalive_count` unanswered ones (any frame from the client counts as an answer)."""
        interval = self._limits.keepalive_interval
        while not self._closed:
            await asyncio.sleep(interval)
            if not self.session.keepalive or self._loop.time() - self._last_rx < interval:
                continue
            if self._pings >= self._limits.keepalive_count:
                log.info("dropping RPC client pid %d uid %d: no answer to %d keepalive pings",
                         self.session.peer.pid, self.session.peer.uid, self._pings)
                self.close(abort=True)
                return
            self._pings += 1
            self._send(_PING)

    def close(self, *, abort: bool = False) -> None:
        """Stop serving; `abort` discards unread output (a client that does not read)."""
        if self._closed:
            return
        self._closed = True
        if abort:
            self.writer.transport.abort()
        else:
            self.writer.close()
        self._on_close(self)

    async def drain_tasks(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

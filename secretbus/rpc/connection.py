"""One client connection: read frames, dispatch calls, write replies and events, keepalive.

Bounds (DESIGN §12): a frame larger than libvirt's own bound (before authentication:
PRE_AUTH_FRAME) closes the connection before it is read; an authenticated call over
`max_frame` but within libvirt's bound (a define of 2 to 4 MiB, which libvirt takes) is read
past, keeping only its header, and refused; at most `max_requests` calls are in flight (then the
connection is not read until one finishes, so a flood waits in the kernel's buffer, not in
ours); the frames of an untrusted local uid, being read or in flight, take their bytes from
what all its connections share (uidshare.py; a frame that does not fit is not read either); a
reply's slot is held while the client's unread output is above the transport's high-water
mark, and no frame at all is read while the client leaves more than that unread (an error
reply or a PONG holds no slot: a flood of bad calls, never read, grew our buffer without end);
an event that finds more than `max_unread` bytes unread, or a reply or event that finds
this connection behind while its uid's connections together leave `uid_max_unread`, drops
the client. One client stalls only itself, and its uid's other connections.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import CoroutineType
from typing import Any

from secretbus.access.audit import AuditFailed, Auditor
from secretbus.core import busypoll, errors, secretxml
from secretbus.core.eager import run_eager
from secretbus.rpc import protocol as P
from secretbus.rpc.failures import RemoteFailure, error_body, not_open, rpc_failure, unknown_procedure
from secretbus.rpc.frame import LENGTH_SIZE, Header, encode_frame, encode_reply, frame_length, parse_header, without_fds
from secretbus.rpc.procedures import Handler
from secretbus.rpc.session import Session
from secretbus.rpc.uidshare import UID_FRAME_BYTES, UidShare
from secretbus.rpc.xdr import XdrError, XdrType, decode, encode

log = logging.getLogger("secretbus.rpc")

WRITE_HIGH_WATER = 256 * 1024
# Frames over LARGE_FRAME (defines with a long description, or junk) held per connection, being
# read or in flight: at most MAX_LARGE, so 16 calls in flight hold 16 small ones but never 16 of
# max_frame. An untrusted local uid's frames share its UidShare's bytes besides (uidshare.py).
LARGE_FRAME = 64 * 1024
MAX_LARGE = 2
# Before authentication only AUTH_* calls are served; the largest is a SASL step with its 64 KiB
# of data at 4 bytes a byte (char data<>), so an unauthenticated peer's frame is no larger.
PRE_AUTH_FRAME = 320 * 1024
STREAM_READ = 256 * 1024        # serve_stream's read size (what a selector transport reads at once)
# The replies of one read are written together (one send, one wake-up of the client) up to
# this size; a larger one goes out at once.
OUT_BYTES = 64 * 1024
_PONG = encode_frame(Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PONG, P.MsgType.MESSAGE, 0, P.Status.OK))
_PING = encode_frame(Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PING, P.MsgType.MESSAGE, 0, P.Status.OK))


@dataclass(frozen=True)
class RpcLimits:
    max_clients: int = 5000              # libvirt's max_clients
    max_clients_per_uid: int = 64        # other than uid 0
    # Remote (TLS, TCP) connections together, whatever their hosts: 64 a host, 77 hosts could
    # take every slot but root's and lock the local users out (secretbusd.conf's
    # max_remote_clients; the daemon's default is half of max_clients).
    max_remote_clients: int = 2500
    root_reserve: int = 64               # connections only uid 0 may take
    # Calls in flight per connection (secretbusd.conf's max_client_requests). libvirt's default
    # is 5; 16 lets one connection's writes share a group commit of up to 16 (each batch pays
    # two journal commits for its fsyncs), and the D-Bus side allows 32. What it holds at most:
    # 16 calls' decoded arguments, of which at most MAX_LARGE over LARGE_FRAME (each ≤ max_frame),
    # so about 2 × 2 MiB + 14 × 64 KiB, plus one read and one partial frame, per connection (with
    # 5 of max_frame, libvirt's bound is larger); connections per uid are capped below.
    max_requests: int = 16
    max_frame: int = 2 * 1024 * 1024     # inbound; the largest call (a define) is < 1.1 MiB
    max_unread: int = 16 * 1024 * 1024   # queued output before an event drops the client
    # Frame bytes held (being read or in flight) by all connections of one untrusted local uid
    # (uidshare.py; at least max_frame): 64 connections × 16 calls could hold far more.
    uid_frame_bytes: int = UID_FRAME_BYTES
    # Output all connections of such a uid leave unread: over it, one of them that is itself
    # behind is dropped when an event comes (64 × max_unread would be a GiB).
    uid_max_unread: int = 16 * 1024 * 1024
    keepalive_interval: float = 5.0      # libvirt's keepalive_interval; <= 0: the server never pings
    keepalive_count: int = 5             # unanswered pings before the client is dropped


class Connection(asyncio.Protocol):
    """A unix connection is served as an asyncio Protocol: `data_received` parses every whole
    frame of what arrived and dispatches it at once, and a reply goes out with
    `transport.write` in the same loop step (a StreamReader costs a loop iteration and two
    futures per frame, which was most of a call's latency). A wrapped transport (TLS, the SASL
    layer) keeps its StreamReader: `serve_stream` feeds the same parser from it.

    Calls in flight are counted in `_busy`; a whole frame that finds them all taken is kept
    (with the rest of its read) and reading stops until a call ends, so what a flood sends
    waits in the kernel's buffer: one read (≤ 256 KiB) and one partial frame (≤ max_frame)
    are all that is held here per connection.

    What the calls of one read answer at once goes out together (`_out`, at most OUT_BYTES),
    after the audit records of the values among it (`Session.held`): one send to the client
    and one to journald for a read of 16 calls, not 16 of each. No value leaves before its
    record was taken; a record that cannot be written (audit = required) turns that read's
    value replies into errors."""

    def __init__(self, session: Session, table: dict[int, Handler], limits: RpcLimits,
                 on_close: Callable[[Connection], None], share: UidShare | None = None,
                 auditor: Auditor | None = None):
        """`share`: what this peer's uid shares with its other connections (None:
        this connection's own bounds only, as for root and the session's own user);
        `auditor`: the value reads' audit (its records held and sent with each read's replies)."""
        self.session = session
        self._table = table
        self._limits = limits
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._fd = -1                       # the socket, marked for core/busypoll while served
        self._busy = 0                      # calls in flight (each holds a slot until answered)
        # Calls in flight that hold something: id(header) -> (header, frame size); each over
        # LARGE_FRAME, and with a share every one (its size taken from the share)
        self._held: dict[int, tuple[Header, int]] = {}
        self._large = 0                     # frames over LARGE_FRAME held: in flight + being read
        self._share = share
        if share is not None:
            share.connections.add(self)
        self._reading = 0                   # the size held for the frame being read (0: none)
        self._granted = 0                   # bytes the budget gave this waiting connection
        self._chunks: list[bytes] = []      # a partial frame, joined once `_need` bytes are in
        self._have = 0
        self._need = LENGTH_SIZE
        self._stalled: tuple[bytes, int] | None = None    # (data, offset) waiting for a slot or a read
        self._output_wait: asyncio.Task[None] | None = None  # resumes reading once the client has read
        self._skip_left = 0                 # bytes still to read past of an oversized call
        self._skip_size = 0
        self._skip_head = bytearray()       # its header, to answer it
        self._reader_wait: asyncio.Future[None] | None = None   # serve_stream, while stalled
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._stream_drain: Callable[[], Awaitable[None]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ka: asyncio.Task[None] | None = None
        self._closed = False
        self._last_rx = self._loop.time()
        self._pings = 0
        self.calls = 0
        # The replies of the read being answered (None: none is), the value replies among them
        # (index, header), and the records those need first (None: no audit, or none to hold).
        self._out: list[bytes] | None = None
        self._out_size = 0
        self._values: list[tuple[int, Header]] = []
        self._auditor = auditor
        self._records = auditor.hold() if auditor is not None else None
        self._waiting: asyncio.Task[None] | None = None   # replies waiting for journald to take their records
        self._waiting_size = 0

    @property
    def in_flight(self) -> int:
        return self._busy

    @property
    def unread(self) -> int:
        """Bytes written and not yet taken by the client (or made and not yet written)."""
        queued = self._out_size + self._waiting_size
        return queued + self.transport.get_write_buffer_size() if self.transport is not None else queued

    # -- the transport ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        if self._fd >= 0:
            busypoll.mark(self._loop, self._fd)     # a client of one call at a time finds the loop awake
        if self._limits.keepalive_interval > 0:
            self._ka = self._loop.create_task(self._keepalive())

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()        # which wakes a reply waiting for the client to read

    def eof_received(self) -> bool:
        return False        # the client is done: close (what is queued is still written)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve a stream pair (TLS, SASL layer): its reads go through the same parser."""
        self._stream_drain = writer.drain
        self.connection_made(writer.transport)
        try:
            while not self._closed:
                if self._stalled is not None:
                    self._reader_wait = self._loop.create_future()
                    await self._reader_wait
                    continue
                data = await reader.read(STREAM_READ)
                if not data:
                    break
                self.data_received(data)
        except ConnectionError:
            pass
        finally:
            self.close()

    # -- reading ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._skip_left:
            pos = self._skip(data, 0)
            if pos is not None and pos < len(data):
                self._parse(data, pos)
            return
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return              # a large frame arriving in pieces is joined once, not per piece
            data = b"".join(self._chunks)
            self._chunks.clear()
        self._parse(data, 0)

    def _parse(self, data: bytes, pos: int) -> None:
        """Answer the whole frames of `data` from `pos`, their replies (and the audit records of
        their values) sent together at the end."""
        if self._out is not None:
            self._frames(data, pos)     # a call that ended resumed a stalled frame: the same step
            return
        self._out = []
        self.session.held = self._records
        try:
            self._frames(data, pos)
        finally:
            self.session.held = None
            self._flush_out()
            self._out = None

    def _frames(self, data: bytes, pos: int) -> None:
        end = len(data)
        limit = self._limits.max_frame
        need = LENGTH_SIZE
        try:
            while end - pos >= LENGTH_SIZE:
                if self._waiting is not None:
                    self._stall(data, pos)          # until journald took the records of replies before
                    return
                if self.unread > WRITE_HIGH_WATER:
                    self._stall(data, pos)          # until the client reads what it made us write
                    self._wait_output()
                    return
                n = frame_length(data[pos:pos + LENGTH_SIZE],
                                 P.MESSAGE_MAX if self.session.authenticated else min(limit, PRE_AUTH_FRAME))
                if n > limit:
                    self._skip_left, self._skip_size = n, n
                    skipped = self._skip(data, pos + LENGTH_SIZE)
                    if skipped is None or self._closed:
                        return
                    pos = skipped
                    continue
                need = LENGTH_SIZE + n
                if not self._reading and (n > LARGE_FRAME or self._share is not None):
                    # Held from its length word on: a frame that must wait stays in the kernel.
                    if not self._hold(n):
                        self._stall(data, pos)
                        return
                    self._reading = n
                if end - pos < need:
                    break
                self._last_rx, self._pings = self._loop.time(), 0
                if self._busy >= self._limits.max_requests:
                    self._stall(data, pos)
                    return
                self._busy += 1
                held, self._reading = self._reading, 0      # its call holds it now
                self._handle(memoryview(data)[pos + LENGTH_SIZE:pos + need], held)
                pos += need
                need = LENGTH_SIZE
                if self._closed:
                    return
        except XdrError as e:
            log.warning("closing RPC client pid %d uid %d: %s", self.session.peer.pid, self.session.peer.uid, e)
            self.close(abort=True)
            return
        if pos < end:
            self._chunks.append(data[pos:])
            self._have, self._need = end - pos, need

    def _skip(self, data: bytes, pos: int) -> int | None:
        """Read past an oversized call in `data` from `pos`, keeping its header; once it has all
        gone by, answer it. Where the next frame starts, or None if `data` ends first."""
        take = min(self._skip_left, len(data) - pos)
        head = self._skip_head
        if len(head) < P.HEADER_SIZE:
            head += data[pos:pos + min(take, P.HEADER_SIZE - len(head))]
        self._skip_left -= take
        self._last_rx, self._pings = self._loop.time(), 0
        if self._skip_left:
            return None
        self._skip_head = bytearray()
        self._oversized(bytes(head), self._skip_size)
        return pos + take

    def _oversized(self, head: bytes, n: int) -> None:
        """Answer a call of `n` bytes, over max_frame, read past: a define as one over the XML
        size limit (what libvirt's 4 MiB string would let through), any other call with an RPC
        error. What is not a call of ours gets nothing, as a frame this size never did."""
        header, _ = parse_header(head)
        if header.prog != P.REMOTE_PROGRAM or header.vers != P.PROTOCOL_VERSION or header.type != P.MsgType.CALL:
            return
        if header.proc not in self._table:
            e: BaseException = unknown_procedure(header.proc)
        elif header.proc == P.Proc.SECRET_DEFINE_XML:
            e = secretxml.too_large()
        else:
            e = rpc_failure(f"message of {n} bytes is larger than the {self._limits.max_frame} this server reads")
        self._reply_error(header, e)

    def _wait_output(self) -> None:
        """Resume the stalled reading once the client has read its output down (one task)."""
        if self._output_wait is None and not self._closed:
            self._output_wait = self._loop.create_task(self._output_read())
            self._track(self._output_wait)

    async def _output_read(self) -> None:
        try:
            await self._until_read()
            if self.unread > WRITE_HIGH_WATER:
                await asyncio.sleep(0.01)   # never a busy loop if a drain says done too early
        finally:
            self._output_wait = None
            self._resume()

    def _stall(self, data: bytes, pos: int) -> None:
        self._stalled = (data, pos)
        if self._stream_drain is None and self.transport is not None:
            self.transport.pause_reading()

    def _hold(self, n: int) -> bool:
        """Hold a frame of `n` bytes (MAX_LARGE, the budget), or False: the connection waits."""
        large = n > LARGE_FRAME
        if large and self._large >= MAX_LARGE:
            return False            # until one of this connection's own ends (_release resumes)
        if self._granted:
            self._granted = 0       # the budget gave what this frame asked for
        elif self._share is not None and not self._share.take(self, n):
            return False            # until the uid's earlier frames are answered (frame_granted)
        self._large += large
        return True

    def _unhold(self, n: int) -> None:
        self._large -= n > LARGE_FRAME
        if self._share is not None:
            self._share.give(n)

    def frame_granted(self, n: int) -> None:
        """The budget gave this waiting connection the `n` bytes its next frame needs."""
        if self._closed:
            if self._share is not None:
                self._share.give(n)
            return
        self._granted = n
        self._loop.call_soon(self._resume)

    def _release(self, header: Header | None) -> None:
        """The call of `header` (None: a frame whose header did not parse) ended: its slot is
        free; a frame waiting for one is dispatched now."""
        self._busy -= 1
        if self._held and header is not None:
            held = self._held.pop(id(header), None)
            if held is not None:
                self._unhold(held[1])
        self._resume()

    def _resume(self) -> None:
        """Dispatch the frames a stall kept, if any, and read again."""
        stalled = self._stalled
        if stalled is None or self._closed:
            return
        self._stalled = None
        if self._stream_drain is None:
            if self.transport is not None:
                self.transport.resume_reading()
        elif self._reader_wait is not None and not self._reader_wait.done():
            self._reader_wait.set_result(None)
        self._parse(*stalled)

    def _handle(self, body: memoryview, held: int) -> None:
        """Dispatch one frame; the slot taken for it, and the `held` bytes, are released when
        it is answered."""
        release = True
        header: Header | None = None
        try:
            try:
                header, payload = parse_header(body)
                if header.type == P.MsgType.CALL_WITH_FDS:
                    header, payload = without_fds(header, payload)
            except XdrError:
                if held:
                    self._unhold(held)      # released below, held by no header
                raise
            if held:
                self._held[id(header)] = (header, held)
            if (header.prog == P.KEEPALIVE_PROGRAM and header.vers == P.PROTOCOL_VERSION
                    and header.type == P.MsgType.MESSAGE):
                # virKeepAliveCheckMessage: PING answered, PONG and unknown procedures ignored;
                # anything else of this program is looked up as a program, and not found.
                if header.proc == P.KeepAlive.PING:
                    self._send(_PONG)
                return
            if header.prog != P.REMOTE_PROGRAM or header.vers != P.PROTOCOL_VERSION:
                # Only a call is answered (virNetServerProcessMsg); other types are dropped.
                if header.type == P.MsgType.CALL:
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
                self._release(header)

    def _call(self, header: Header, payload: memoryview) -> bool:
        """Run one call; False when a task now owns the slot."""
        self.calls += 1
        try:
            handler, ret_type, args = self._admit(header, payload)
            ret = handler.fn(self, args)
            if handler.closes:
                # virNetServerClientDelayedClose: the reply goes out, then the connection closes.
                answered = self._reply(header, ret_type, ret)
                self.close()
                return answered
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
                self._release(header)
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
            raise unknown_procedure(header.proc)
        if not s.authenticated and not handler.pre_auth:
            raise rpc_failure("authentication required")
        try:
            args = decode(spec.args, payload)
        except XdrError:
            raise rpc_failure("Unable to decode message payload") from None
        if not s.opened and not handler.pre_open:
            # remoteGetSecretConn's text for the secret procedures, remoteGetHypervisorConn's else
            raise not_open(handler.secret)
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
                self._release(header)
        except Exception as e:  # noqa: BLE001
            self._reply_error(header, e)
            self._release(header)

    # -- writing ------------------------------------------------------------------
    def _reply(self, header: Header, ret_type: XdrType, ret: Any) -> bool:
        """Send a reply; False when the slot is released only once the client has read it."""
        try:
            payload = encode(ret_type, ret)
        except XdrError as e:
            self._reply_error(header, rpc_failure(f"Unable to encode message payload: {e}"))
            return True
        if self._behind_with_uid():
            # 64 connections × 16 lists of thousands, never read, held hundreds of MB here
            log.warning("dropping RPC client pid %d uid %d: it does not read its replies",
                        self.session.peer.pid, self.session.peer.uid)
            self.close(abort=True)
            return True
        if self._out is not None and header.proc == P.Proc.SECRET_GET_VALUE:
            self._values.append((len(self._out), header))    # out only after its audit record
        self._send(encode_reply(header, payload))
        if self._closed or self.transport is None or self.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
            return True
        self._track(self._loop.create_task(self._drained(header)))
        return False

    async def _drained(self, header: Header) -> None:
        """Hold the call's slot until the client has read the reply down to the low-water mark."""
        try:
            await self._until_read()
        finally:
            self._release(header)

    async def _until_read(self) -> None:
        """Until the client has read its output down to the low-water mark (or is gone)."""
        try:
            if self._stream_drain is not None:
                await self._stream_drain()
            elif self._write_paused and not self._closed:
                w = self._loop.create_future()
                self._drain_waiters.append(w)
                await w
        except ConnectionError:
            pass

    def _reply_error(self, header: Header, e: BaseException) -> None:
        if not isinstance(e, (errors.SecretError, RemoteFailure)):
            # The type only: an exception's text could quote an argument.
            log.error("internal error in RPC procedure %d: %s", header.proc, type(e).__name__)
        self._send(encode_reply(header, encode(P.REMOTE_ERROR, error_body(e)), P.Status.ERROR))

    def _send(self, frame: bytes) -> None:
        if self._closed or self.transport is None:
            return
        out = self._out
        if out is None:
            self.transport.write(frame)
            return
        out.append(frame)
        self._out_size += len(frame)
        if self._out_size >= OUT_BYTES or (self._records is not None and self._records.full):
            self._flush_out()

    def _flush_out(self) -> None:
        """Write the replies made so far in this step, after the records of their values."""
        out = self._out
        if not out:
            return
        values, self._values = self._values, []
        self._out, self._out_size = [], 0
        if self._records is not None and len(self._records):
            assert self._auditor is not None
            try:
                waits = self._auditor.send_held(self._records)
            except AuditFailed:
                waits = None
                _refuse_values(out, values)
            if waits is not None:
                self._write_after(waits, out, values)
                return
        self._write(out)

    def _write(self, out: list[bytes]) -> None:
        if not self._closed and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _write_after(self, records: tuple[bytes, int], out: list[bytes], values: list[tuple[int, Header]]) -> None:
        """journald's queue is full: these replies wait for it to take their records (within
        the journal's timeout), and this connection reads nothing more meanwhile."""
        assert self._auditor is not None
        auditor = self._auditor
        self._waiting_size = sum(map(len, out))

        async def write() -> None:
            try:
                await auditor.send_held_later(*records)
            except AuditFailed:
                _refuse_values(out, values)
            finally:
                self._waiting, self._waiting_size = None, 0
            self._write(out)
            self._resume()
        self._waiting = self._loop.create_task(write())
        self._track(self._waiting)

    def send_message(self, proc: int, payload: bytes) -> None:
        """An event (type MESSAGE, serial 1 as libvirtd sends them)."""
        if self._closed:
            return
        unread = self.unread
        if unread > self._limits.max_unread or self._behind_with_uid():
            log.warning("dropping RPC client pid %d uid %d: it does not read its events",
                        self.session.peer.pid, self.session.peer.uid)
            self.close(abort=True)
            return
        self._send(encode_frame(Header(P.REMOTE_PROGRAM, P.PROTOCOL_VERSION, proc, P.MsgType.MESSAGE, 1,
                                       P.Status.OK), payload))

    def _behind_with_uid(self) -> bool:
        """This connection is behind (over the high-water mark) while its uid's (or remote
        host's) connections together leave more than `uid_max_unread` unread: one that reads
        is never dropped for another's backlog. Without a share (root) nothing is read: it is
        asked on every reply."""
        return (self._share is not None and self.unread > WRITE_HIGH_WATER
                and self._share.unread_total() > self._limits.uid_max_unread)

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
        if self._out and not abort:
            self._flush_out()       # a reply of this step (CONNECT_CLOSE's) goes before the end
        self._closed = True
        if self._share is not None:
            self._share.connections.discard(self)
            self._share.cancel(self)
            if self._granted:
                self._share.give(self._granted)
                self._granted = 0
        if self._reading:                   # the frame being read will not be
            self._unhold(self._reading)
            self._reading = 0
        if self._fd >= 0:
            busypoll.mark(self._loop, self._fd, False)
        if self._ka is not None:
            self._ka.cancel()
        self._stalled = None
        if self._reader_wait is not None and not self._reader_wait.done():
            self._reader_wait.set_result(None)
        self._wake_drain()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        self._on_close(self)

    async def drain_tasks(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _refuse_values(out: list[bytes], values: list[tuple[int, Header]]) -> None:
    """The value replies among `out` become the error of a record that could not be written."""
    if values:
        error = encode(P.REMOTE_ERROR, error_body(AuditFailed()))
        for i, header in values:
            out[i] = encode_reply(header, error, P.Status.ERROR)

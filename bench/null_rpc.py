#!/usr/bin/env python3
"""A libvirt RPC server that does no work: the ceiling a client reaches on this machine.

    .venv/bin/python bench/null_rpc.py SOCKET N

Answers the calls bench_rpc.py's read rows make (and the handshake before them) with replies
made once at start: N secrets to count and list, a lookup echoing the UUID asked for, one
value, one XML. No store, no access check, no audit, no table: one parse of the length word and
header per call and one write, on secretbusd's loop (core/busypoll: it polls before it sleeps as
secretbusd does). A client's rate against it is the most any server could give that client here
(its own CPU and the wake-ups between the two processes), so bench_rpc.py prints it beside
secretbusd's and libvirtd's. Not a server for anything else: it checks nothing.
"""
from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rpc import VALUE, secret_xml, uuid_of, volume_of  # noqa: E402  (the store the others serve)

from secretbus.core import busypoll  # noqa: E402
from secretbus.rpc import protocol as P  # noqa: E402
from secretbus.rpc.frame import (  # noqa: E402
    LENGTH_SIZE,
    MIN_FRAME,
    Header,
    encode_frame,
    encode_reply,
    frame_length,
    parse_header,
)
from secretbus.rpc.xdr import encode  # noqa: E402

LOOKUP = P.Proc.SECRET_LOOKUP_BY_UUID
_PONG = encode_frame(Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PONG, P.MsgType.MESSAGE, 0, P.Status.OK))


def _secret(i: int) -> dict[str, object]:
    return {"uuid": uuid.UUID(uuid_of(i)).bytes, "usageType": 1, "usageID": volume_of(i)}


def canned(n: int) -> dict[int, bytes]:
    """Each procedure's reply payload; the lookup's is secret 0's, whose first 16 bytes (the
    UUID) are replaced per call by the UUID asked for."""
    rets = {
        P.Proc.AUTH_LIST: {"types": [P.AuthType.NONE]},
        P.Proc.CONNECT_OPEN: None,
        P.Proc.CONNECT_CLOSE: None,
        P.Proc.CONNECT_SUPPORTS_FEATURE: {"supported": 1},
        P.Proc.CONNECT_REGISTER_CLOSE_CALLBACK: None,
        P.Proc.CONNECT_UNREGISTER_CLOSE_CALLBACK: None,
        P.Proc.CONNECT_NUM_OF_SECRETS: {"num": n},
        P.Proc.CONNECT_LIST_ALL_SECRETS: {"secrets": [_secret(i) for i in range(n)], "ret": n},
        LOOKUP: {"secret": _secret(0)},
        P.Proc.SECRET_GET_VALUE: {"value": VALUE},
        P.Proc.SECRET_GET_XML_DESC: {"xml": secret_xml(uuid_of(0), volume_of(0))},
    }
    return {int(proc): encode(P.PROCS[proc].ret, ret) for proc, ret in rets.items()}


class Null(asyncio.Protocol):
    def __init__(self, replies: dict[int, bytes]) -> None:
        self.replies = replies
        self.lookup_tail = replies[LOOKUP][16:]     # after the UUID: usage type and id
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # as secretbusd's connections do: its loop polls after this socket's I/O (core/busypoll)
        busypoll.mark(asyncio.get_running_loop(), transport.get_extra_info("socket").fileno())

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, end, out = 0, len(buf), []
        while end - pos >= MIN_FRAME:
            size = LENGTH_SIZE + frame_length(buf[pos:pos + LENGTH_SIZE])    # XdrError: the connection is dropped
            if end - pos < size:
                break
            h, payload = parse_header(memoryview(buf)[pos + LENGTH_SIZE:pos + size])
            if h.prog == P.KEEPALIVE_PROGRAM:
                if h.proc == P.KeepAlive.PING:
                    out.append(_PONG)
            elif h.proc == LOOKUP:
                out.append(encode_reply(h, bytes(payload[:16]) + self.lookup_tail))
            else:
                reply = self.replies.get(h.proc)
                if reply is None:
                    sys.exit(f"null_rpc: procedure {h.proc} is not served")
                out.append(encode_reply(h, reply))
            pos += size
        self.buf = buf[pos:]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def serve(path: str, n: int) -> None:
    replies = canned(n)
    server = await asyncio.get_running_loop().create_unix_server(lambda: Null(replies), path)
    os.chmod(path, 0o700)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    # secretbusd's own loop, polling as long before it sleeps: the ceiling is that of a server
    # that wakes as fast as secretbusd does and then does nothing.
    with asyncio.Runner(loop_factory=lambda: busypoll.new_event_loop(busypoll.DEFAULT_POLL_US)) as r:
        r.run(serve(sys.argv[1], int(sys.argv[2])))

#!/usr/bin/env python3
"""A libvirt RPC server that does no work: the ceiling a client reaches on this machine.

    .venv/bin/python bench/null_rpc.py SOCKET N

Answers the calls bench_rpc.py's read rows make (and the handshake before them) with replies
made once at start: N secrets to count and list, a lookup echoing the UUID asked for, one
value, one XML. No store, no access check, no audit, no table: one parse of the 28-byte head
per call and one write. A client's rate against it is the most any server could give that
client here (its own CPU and the wake-ups between the two processes), so bench_rpc.py prints it
beside secretbusd's and libvirtd's. Not a server for anything else: it checks nothing.
"""
from __future__ import annotations

import asyncio
import os
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secretbus.rpc import protocol as P  # noqa: E402
from secretbus.rpc.frame import Header, encode_reply  # noqa: E402
from secretbus.rpc.xdr import encode  # noqa: E402

VALUE = b"bench-value-32-bytes-long-abcdef"
_HEAD = struct.Struct(">I6I")         # length word + header
USAGE_ID = "/var/lib/libvirt/images/0.img"


def uuid_bytes(i: int) -> bytes:
    return bytes.fromhex(f"{i:08x}000040008000{i:012x}")


def canned(n: int) -> dict[int, bytes]:
    """Each procedure's reply payload (the lookup's is made per call: it echoes the UUID)."""
    xml = ("<secret ephemeral='no' private='no'>\n  <uuid>00000000-0000-4000-8000-000000000000</uuid>\n"
           f"  <usage type='volume'>\n    <volume>{USAGE_ID}</volume>\n  </usage>\n</secret>\n")
    listed = [{"uuid": uuid_bytes(i), "usageType": 1, "usageID": f"/var/lib/libvirt/images/{i}.img"}
              for i in range(n)]
    rets = {
        P.Proc.AUTH_LIST: {"types": [P.AuthType.NONE]},
        P.Proc.CONNECT_OPEN: None,
        P.Proc.CONNECT_CLOSE: None,
        P.Proc.CONNECT_SUPPORTS_FEATURE: {"supported": 1},
        P.Proc.CONNECT_REGISTER_CLOSE_CALLBACK: None,
        P.Proc.CONNECT_UNREGISTER_CLOSE_CALLBACK: None,
        P.Proc.CONNECT_NUM_OF_SECRETS: {"num": n},
        P.Proc.CONNECT_LIST_ALL_SECRETS: {"secrets": listed, "ret": n},
        P.Proc.SECRET_GET_VALUE: {"value": VALUE},
        P.Proc.SECRET_GET_XML_DESC: {"xml": xml},
    }
    return {int(proc): encode(P.PROCS[proc].ret, ret) for proc, ret in rets.items()}


class Null(asyncio.Protocol):
    def __init__(self, replies: dict[int, bytes]) -> None:
        self.replies = replies
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        # The lookup's reply after its UUID: the usage type and a usage id (XDR string).
        uid = USAGE_ID.encode()
        self.lookup_tail = struct.pack(">iI", 1, len(uid)) + uid + b"\0" * (-len(uid) % 4)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, end, out = 0, len(buf), []
        while end - pos >= 28:
            length, prog, vers, proc, typ, serial, _status = _HEAD.unpack_from(buf, pos)
            if length < 28:
                sys.exit(f"null_rpc: a frame of {length} bytes")
            if end - pos < length:
                break
            if prog == P.KEEPALIVE_PROGRAM:
                if proc == P.KeepAlive.PING:
                    out.append(_HEAD.pack(28, prog, vers, P.KeepAlive.PONG, P.MsgType.MESSAGE, 0, 0))
            elif proc == P.Proc.SECRET_LOOKUP_BY_UUID:
                out.append(encode_reply(Header(prog, vers, proc, typ, serial, 0),
                                        buf[pos + 28:pos + 44] + self.lookup_tail))
            else:
                payload = self.replies.get(proc)
                if payload is None:
                    sys.exit(f"null_rpc: procedure {proc} is not served")
                out.append(encode_reply(Header(prog, vers, proc, typ, serial, 0), payload))
            pos += length
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
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))

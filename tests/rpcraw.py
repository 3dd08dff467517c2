"""A raw libvirt RPC client for the tests, on the project's own codec: exact frames, hostile
ones included, and the answers decoded."""
from __future__ import annotations

import socket
import struct
import time
import uuid as uuidlib
from typing import Any

from secretbus.rpc import protocol as P
from secretbus.rpc import xdr
from secretbus.rpc.frame import Header, decode_frame, encode_frame


class RemoteError(Exception):
    def __init__(self, body: dict):
        super().__init__(body["message"])
        self.body = body
        self.code, self.domain, self.message = body["code"], body["domain"], body["message"]


def handle(uuid: str, usage_type: int = 2, usage_id: str = "") -> dict[str, Any]:
    return {"uuid": uuidlib.UUID(uuid).bytes, "usageType": usage_type, "usageID": usage_id}


class RawClient:
    def __init__(self, path, timeout: float = 10):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.serial = 0
        self.messages: list[tuple[Header, Any]] = []    # MESSAGE frames seen while waiting for replies

    @classmethod
    def over(cls, sock: socket.socket, timeout: float = 10) -> RawClient:
        """A client on a connected socket (one end of a socketpair the server serves)."""
        c = cls.__new__(cls)
        c.sock, c.serial, c.messages = sock, 0, []
        sock.settimeout(timeout)
        return c

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_call(self, proc: int, payload: bytes = b"", *, prog: int = P.REMOTE_PROGRAM, serial: int | None = None,
                  msg_type: int = P.MsgType.CALL) -> int:
        s = self.serial if serial is None else serial
        self.serial = s + 1
        self.send_raw(encode_frame(Header(prog, 1, proc, msg_type, s, P.Status.OK), payload))
        return s

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("server closed the connection")
            buf += chunk
        return buf

    def read_frame(self) -> tuple[Header, bytes]:
        word = self._exact(4)
        (n,) = struct.unpack(">I", word)
        header, payload = decode_frame(word + self._exact(n - 4))
        return header, bytes(payload)

    def read_reply(self, serial: int) -> tuple[Header, Any]:
        while True:
            header, payload = self.read_frame()
            t = P.payload_type(header.prog, header.proc, header.type, header.status)
            value = xdr.decode(t, payload) if t is not None else payload
            if header.type == P.MsgType.REPLY and header.serial == serial:
                return header, value
            if header.prog == P.KEEPALIVE_PROGRAM and header.proc == P.KeepAlive.PING:
                self.send_raw(encode_frame(Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PONG, P.MsgType.MESSAGE,
                                                  0, P.Status.OK)))
                continue
            self.messages.append((header, value))

    def call(self, proc: int, args: Any = None) -> Any:
        spec = P.PROCS[proc]
        serial = self.send_call(proc, xdr.encode(spec.args, args))
        header, value = self.read_reply(serial)
        if header.status == P.Status.ERROR:
            raise RemoteError(value)
        return value

    def wait_message(self, timeout: float = 10) -> tuple[Header, Any]:
        deadline = time.monotonic() + timeout
        while not self.messages:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            header, payload = self.read_frame()
            t = P.payload_type(header.prog, header.proc, header.type, header.status)
            self.messages.append((header, xdr.decode(t, payload) if t is not None else payload))
        return self.messages.pop(0)

    def open(self, name: str | None = "secret:///session", flags: int = 0) -> RawClient:
        self.call(P.Proc.AUTH_LIST)
        self.call(P.Proc.CONNECT_OPEN, {"name": name, "flags": flags})
        return self

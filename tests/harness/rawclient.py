"""A minimal D-Bus client over a unix socket (stdlib only), for attacks no library makes easy:
a connection with a tiny receive buffer that sends calls and never reads the replies, or
many connections that leave with calls in flight.

It speaks just enough of the protocol: EXTERNAL auth with the process's uid, Hello, and
method calls (body-less or with one `u`). Run it as a test user with `RawClient.script()`:
`python3 rawclient.py ADDRESS MODE ...`; it runs only the stdlib, so any uid can run it
from this file once copied somewhere readable (tests/harness is under the repository).
"""
from __future__ import annotations

import os
import socket
import struct
import sys
import time

_FIELD = {"path": (1, "o"), "interface": (2, "s"), "member": (3, "s"), "destination": (6, "s"),
          "signature": (8, "g")}


def _pad(buf: bytearray, align: int) -> None:
    buf += b"\0" * (-len(buf) % align)


def method_call(serial: int, destination: str, path: str, interface: str, member: str,
                body_u: int | None = None) -> bytes:
    """A METHOD_CALL message, little-endian; body: nothing or one uint32."""
    body = b"" if body_u is None else struct.pack("<I", body_u)
    fields = {"path": path, "interface": interface, "member": member, "destination": destination}
    if body_u is not None:
        fields["signature"] = "u"
    arr = bytearray()
    for name, value in fields.items():
        code, sig = _FIELD[name]
        _pad(arr, 8)
        arr += bytes([code, 1]) + sig.encode() + b"\0"
        raw = value.encode()
        if sig == "g":
            arr += bytes([len(raw)]) + raw + b"\0"
        else:
            _pad(arr, 4)
            arr += struct.pack("<I", len(raw)) + raw + b"\0"
    head = bytearray(b"l\x01\x00\x01" + struct.pack("<III", len(body), serial, len(arr)))
    head += arr
    _pad(head, 8)
    return bytes(head) + body


def connect(address: str, rcvbuf: int | None = None, timeout: float = 10) -> tuple[socket.socket, str]:
    """Connected and authenticated, Hello done: (socket, unique name)."""
    if not address.startswith("unix:path="):
        raise ValueError("only unix:path= addresses")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(address[len("unix:path="):].split(",")[0])
    s.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
    line = _line(s)
    if not line.startswith(b"OK"):
        raise ConnectionError(f"auth refused: {line!r}")
    s.sendall(b"BEGIN\r\n")
    s.sendall(method_call(1, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello"))
    return s, _hello_name(s)


def _line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("bus closed during auth")
        buf += chunk
    return buf


def _hello_name(s: socket.socket) -> str:
    """Read messages until the Hello reply (serial 1); its body is the unique name."""
    buf = b""
    while True:
        while len(buf) < 16:
            buf += s.recv(4096)
        body_len, _serial, fields_len = struct.unpack("<III", buf[4:16])
        total = 16 + fields_len + (-fields_len % 8) + body_len
        while len(buf) < total:
            buf += s.recv(4096)
        msg, buf = buf[:total], buf[total:]
        if msg[1] == 2:          # METHOD_RETURN: the only one we await is Hello's
            body = msg[total - body_len:]
            (n,) = struct.unpack("<I", body[:4])
            return body[4:4 + n].decode()


def _main(argv: list[str]) -> int:
    """ADDRESS flood CONNS CALLS RCVBUF   | ADDRESS churn CONNS DELAY_MS PATH IFACE MEMBER [U]"""
    address, mode = argv[0], argv[1]
    dest = "org.libvirt.secret"
    if mode == "flood":            # connections that never read: GetManagedObjects each
        conns, calls, rcvbuf = int(argv[2]), int(argv[3]), int(argv[4])
        socks = [connect(address, rcvbuf)[0] for _ in range(conns)]
        for s in socks:
            s.setblocking(False)
        sent = 0
        pending = {s: [method_call(2 + i, dest, "/org/libvirt/secret", "org.freedesktop.DBus.ObjectManager",
                                   "GetManagedObjects") for i in range(calls)] for s in socks}
        out = {s: b"" for s in socks}
        deadline = time.monotonic() + 20
        while any(pending.values()) or any(out.values()):
            if time.monotonic() > deadline:
                break
            for s in socks:
                if not out[s] and pending[s]:
                    out[s] = pending[s].pop(0)
                if out[s]:
                    try:
                        n = s.send(out[s])
                        out[s] = out[s][n:]
                        if not out[s]:
                            sent += 1
                    except BlockingIOError:
                        time.sleep(0.001)
        print(f"sent {sent}", flush=True)
        sys.stdin.read()           # keep the connections (unread) until told to go
        return 0
    if mode == "churn":            # connections that leave with a call in flight
        conns, delay = int(argv[2]), int(argv[3]) / 1000
        path, iface, member = argv[4], argv[5], argv[6]
        arg = int(argv[7]) if len(argv) > 7 else None
        for i in range(conns):
            s, _ = connect(address)
            s.sendall(method_call(2, dest, path, iface, member, arg))
            time.sleep(delay * (i % 4) / 3)     # leave at different points of the call
            s.close()
        print(f"done {conns}", flush=True)
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

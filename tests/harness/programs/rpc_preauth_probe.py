"""A raw libvirt RPC client (no libvirt, stdlib only), run as a test user: what the server
answers before and after AUTH_POLKIT. argv: SOCKET_PATH; prints one JSON document:
{"auth_list": [types], "open_before_auth": [code, domain, message],
 "auth_polkit": {"complete": n} | [code, domain, message], "open_after_auth": null | [...]}
"""
import json
import socket
import struct
import sys

PROG, CALL, ERROR = 0x20008086, 0, 1
AUTH_LIST, AUTH_POLKIT, CONNECT_OPEN = 66, 70, 1

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(30)
sock.connect(sys.argv[1])
serial = 0


def read_exactly(n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return buf


def call(proc, payload=b""):
    global serial
    sock.sendall(struct.pack(">7I", 28 + len(payload), PROG, 1, proc, CALL, serial, 0) + payload)
    serial += 1
    (length,) = struct.unpack(">I", read_exactly(4))
    body = read_exactly(length - 4)
    status = struct.unpack(">I", body[20:24])[0]
    return status, body[24:]


def error(body):
    code, domain, present = struct.unpack(">iiI", body[:12])
    message = None
    if present:
        (n,) = struct.unpack(">I", body[12:16])
        message = body[16:16 + n].decode()
    return [code, domain, message]


out = {}
status, body = call(AUTH_LIST)
(count,) = struct.unpack(">I", body[:4])
out["auth_list"] = list(struct.unpack(f">{count}i", body[4:4 + 4 * count]))
open_args = struct.pack(">II", 0, 0)           # name: NULL, flags 0
status, body = call(CONNECT_OPEN, open_args)
out["open_before_auth"] = error(body) if status == ERROR else None
status, body = call(AUTH_POLKIT)
out["auth_polkit"] = error(body) if status == ERROR else {"complete": struct.unpack(">i", body[:4])[0]}
status, body = call(CONNECT_OPEN, open_args)
out["open_after_auth"] = error(body) if status == ERROR else None
print(json.dumps(out))

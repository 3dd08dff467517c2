"""The secret API of secretbusd's two front ends, each as the same small API over raw
messages, for tests/test_frontends_diff.py: D-Bus as dbus-fast messages (the error's name and
text as sent), libvirt RPC as frames on the project's codec (the `remote_error`'s code, as the
kind `core/errors.py` gives it, and its message). A result names a secret by
[UUID, usage type, usage id]; a value is its length and SHA-256, never the bytes.

Run as a program (`python -c SOURCE`, a JSON line on stdin, as a test user through setpriv with
harness.unpriv_python's copy on PYTHONPATH: it needs only secretbus and dbus-fast), it runs
`steps` ([label, "dbus"|"rpc", operation, args...]; "hex:…" arguments are bytes) on a D-Bus
connection to `dbus` and an RPC connection to `rpc` (socket path, CONNECT_OPEN of `uri`) and
prints {label: {"ok": result} | {"err": [kind, text]}} as JSON. With `until` (a UUID) instead of
`steps`, it listens for events on both (listen()).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from secretbus.bus import names as N
from secretbus.core import errors
from secretbus.rpc import protocol as P
from secretbus.rpc import xdr
from secretbus.rpc.frame import Header, decode_frame, encode_frame

CALL_TIMEOUT = 10.0
U32_MAX = 0xFFFFFFFF
KIND_OF_CODE = {c.code: c.kind for c in errors.ALL_ERRORS}


class Failure(Exception):
    """An error answer, as (kind, text): the D-Bus name's last part or the RPC code's kind."""

    def __init__(self, kind: str, text: str):
        super().__init__(kind, text)
        self.kind, self.text = kind, text


def digest(b: bytes) -> dict[str, Any]:
    return {"len": len(b), "sha256": hashlib.sha256(b).hexdigest()}


# -- the two front ends, each as the same small API ------------------------------------------
class DBusSide:
    """Raw dbus-fast calls on the connect object and the secrets' objects, each bounded."""

    label = "dbus"

    def __init__(self, address: str):
        self.loop = asyncio.new_event_loop()
        self.signals: list[Message] = []
        async def connect() -> MessageBus:
            return await MessageBus(bus_address=address).connect()     # constructed in the loop
        self.bus: MessageBus = self._run(connect())
        self.bus.add_message_handler(self._on_message)
        self._bus_call("AddMatch", "s", [f"type='signal',sender='{N.BUS_NAME}',interface='{N.CONNECT_IFACE}'"])

    def _on_message(self, msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL and msg.interface == N.CONNECT_IFACE:
            self.signals.append(msg)

    def _run(self, coro: Any, timeout: float = CALL_TIMEOUT) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(timeout):
                return await coro
        return self.loop.run_until_complete(bounded())

    def pump(self, seconds: float) -> None:
        """Let the loop read what the bus sends (signals) for `seconds`."""
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def close(self) -> None:
        self.bus.disconnect()
        self.pump(0.05)
        self.loop.close()

    def _bus_call(self, member: str, sig: str, body: list[Any]) -> Any:
        reply = self._run(self.bus.call(Message(destination=N.DBUS_NAME, path=N.DBUS_PATH, interface=N.DBUS_IFACE,
                                                member=member, signature=sig, body=body)))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        return reply.body

    def call(self, path: str, iface: str, member: str, sig: str = "", body: list[Any] | None = None) -> list[Any]:
        reply = self._run(self.bus.call(Message(destination=N.BUS_NAME, path=path, interface=iface, member=member,
                                                signature=sig, body=body or [])))
        if reply.message_type == MessageType.ERROR:
            name = reply.error_name or ""
            kind = name[len(errors.DBUS_ERROR_PREFIX):] if name.startswith(errors.DBUS_ERROR_PREFIX) else name
            raise Failure(kind, reply.body[0] if reply.body else "")
        return list(reply.body)

    def _connect(self, member: str, sig: str, *args: Any) -> list[Any]:
        return self.call(N.CONNECT_PATH, N.CONNECT_IFACE, member, sig, list(args))

    def _secret(self, uuid: str, member: str, sig: str = "", *args: Any) -> list[Any]:
        return self.call(N.secret_path(uuid), N.SECRET_IFACE, member, sig, list(args))

    def ref(self, path: str) -> list[Any]:
        """[UUID, usage type, usage id] of a secret's path: from the path and its properties."""
        uuid = N.uuid_from_path(path)
        (props,) = self.call(path, N.PROPS_IFACE, "GetAll", "s", [N.SECRET_IFACE])
        assert props["UUID"].value == uuid, (path, props["UUID"].value)
        return [uuid, props["UsageType"].value, props["UsageID"].value]

    def define(self, xml: str, flags: int = 0) -> list[Any]:
        return self.ref(self._connect("SecretDefineXML", "su", xml, flags)[0])

    def lookup_uuid(self, uuid: str) -> list[Any]:
        return self.ref(self._connect("SecretLookupByUUID", "s", uuid)[0])

    def lookup_usage(self, usage_type: int, usage_id: str) -> list[Any]:
        return self.ref(self._connect("SecretLookupByUsage", "is", usage_type, usage_id)[0])

    def xml_desc(self, uuid: str, flags: int = 0) -> str:
        return str(self._secret(uuid, "GetXMLDesc", "u", flags)[0])

    def set_value(self, uuid: str, value: bytes, flags: int = 0) -> None:
        assert self._secret(uuid, "SetValue", "ayu", value, flags) == []

    def get_value(self, uuid: str, flags: int = 0) -> dict[str, Any]:
        return digest(self._secret(uuid, "GetValue", "u", flags)[0])

    def undefine(self, uuid: str) -> None:
        assert self._secret(uuid, "Undefine") == []

    def list(self, flags: int = 0) -> list[str]:
        """ListSecrets(flags): the UUIDs of its paths, in its order."""
        paths = self._connect("ListSecrets", "u", flags)[0]
        return [str(N.uuid_from_path(p)) for p in paths]


def _u32(n: int) -> bytes:
    return struct.pack(">I", n & U32_MAX)


def handle(uuid: str) -> dict[str, Any]:
    # The server names a secret by UUID alone (usageType/usageID ignored, as in libvirt).
    return {"uuid": uuidlib.UUID(uuid).bytes, "usageType": 0, "usageID": ""}


class RpcSide:
    """Raw libvirt RPC frames on one connection (AUTH_LIST, CONNECT_OPEN), each call bounded."""

    label = "rpc"

    def __init__(self, socket_path: str | Path, uri: str = "secret:///session"):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CALL_TIMEOUT)
        self.sock.connect(str(socket_path))
        self.serial = 0
        self.messages: list[tuple[Header, Any]] = []    # MESSAGE frames (events) not yet taken
        (types,) = self.call(P.Proc.AUTH_LIST).values()
        if types == [P.AuthType.POLKIT]:                # a non-root peer of the system instance
            self.call(P.Proc.AUTH_POLKIT)
        self.call(P.Proc.CONNECT_OPEN, {"name": uri, "flags": 0})

    def close(self) -> None:
        self.sock.close()

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("the server closed the connection")
            buf += chunk
        return bytes(buf)

    def _frame(self) -> tuple[Header, Any]:
        """The next frame, decoded; a keepalive PING is answered and skipped."""
        while True:
            word = self._exact(4)
            header, payload = decode_frame(word + self._exact(struct.unpack(">I", word)[0] - 4))
            if header.prog == P.KEEPALIVE_PROGRAM:
                if header.proc == P.KeepAlive.PING:
                    self.sock.sendall(encode_frame(Header(P.KEEPALIVE_PROGRAM, 1, P.KeepAlive.PONG,
                                                          P.MsgType.MESSAGE, 0, P.Status.OK)))
                continue
            t = P.payload_type(header.prog, header.proc, header.type, header.status)
            return header, xdr.decode(t, bytes(payload)) if t is not None else bytes(payload)

    def raw_call(self, proc: int, payload: bytes) -> Any:
        serial, self.serial = self.serial, self.serial + 1
        self.sock.sendall(encode_frame(Header(P.REMOTE_PROGRAM, 1, proc, P.MsgType.CALL, serial, P.Status.OK),
                                       payload))
        while True:
            header, value = self._frame()
            if header.type == P.MsgType.REPLY and header.serial == serial:
                break
            self.messages.append((header, value))
        if header.status == P.Status.ERROR:
            raise Failure(KIND_OF_CODE.get(value["code"], f"code {value['code']}"), value["message"] or "")
        return value

    def wait_message(self, timeout: float) -> tuple[Header, Any]:
        """The next MESSAGE frame (TimeoutError when none comes within `timeout`)."""
        if self.messages:
            return self.messages.pop(0)
        self.sock.settimeout(timeout)
        try:
            return self._frame()
        finally:
            self.sock.settimeout(CALL_TIMEOUT)

    def call(self, proc: int, args: Any = None) -> Any:
        return self.raw_call(proc, xdr.encode(P.PROCS[proc].args, args))

    @staticmethod
    def ref(s: dict[str, Any]) -> list[Any]:
        return [str(uuidlib.UUID(bytes=s["uuid"])), s["usageType"], s["usageID"]]

    def define(self, xml: str, flags: int = 0) -> list[Any]:
        return self.ref(self.call(P.Proc.SECRET_DEFINE_XML, {"xml": xml, "flags": flags})["secret"])

    def lookup_uuid(self, uuid: str) -> list[Any]:
        return self.ref(self.call(P.Proc.SECRET_LOOKUP_BY_UUID, {"uuid": uuidlib.UUID(uuid).bytes})["secret"])

    def lookup_usage(self, usage_type: int, usage_id: str) -> list[Any]:
        return self.ref(self.call(P.Proc.SECRET_LOOKUP_BY_USAGE,
                                  {"usageType": usage_type, "usageID": usage_id})["secret"])

    def xml_desc(self, uuid: str, flags: int = 0) -> str:
        return str(self.call(P.Proc.SECRET_GET_XML_DESC, {"secret": handle(uuid), "flags": flags})["xml"])

    def set_value(self, uuid: str, value: bytes, flags: int = 0) -> None:
        # Packed by hand: the codec's bound (65536) would refuse a larger value before sending.
        payload = (xdr.encode(P.NONNULL_SECRET, handle(uuid)) + _u32(len(value)) + value
                   + b"\0" * (-len(value) % 4) + _u32(flags))
        assert self.raw_call(P.Proc.SECRET_SET_VALUE, payload) is None

    def get_value(self, uuid: str, flags: int = 0) -> dict[str, Any]:
        return digest(self.call(P.Proc.SECRET_GET_VALUE, {"secret": handle(uuid), "flags": flags})["value"])

    def undefine(self, uuid: str) -> None:
        assert self.call(P.Proc.SECRET_UNDEFINE, {"secret": handle(uuid)}) is None

    def list(self, flags: int = 0) -> list[str]:
        """CONNECT_LIST_ALL_SECRETS(need_results=1, flags): the UUIDs, in its order."""
        r = self.call(P.Proc.CONNECT_LIST_ALL_SECRETS, {"need_results": 1, "flags": flags})
        uuids = [self.ref(s)[0] for s in r["secrets"]]
        return uuids if r["ret"] == len(uuids) else ["count", r["ret"], *uuids]   # a wrong count shows


def attempt(fn: Any) -> dict[str, Any]:
    try:
        return {"ok": fn()}
    except Failure as e:
        return {"err": [e.kind, e.text]}


def _arg(a: Any) -> Any:
    return bytes.fromhex(a[4:]) if isinstance(a, str) and a.startswith("hex:") else a


def run_steps(spec: dict[str, Any]) -> dict[str, Any]:
    sides: dict[str, Any] = {}
    out: dict[str, Any] = {}
    try:
        for label, which, op, *args in spec["steps"]:
            if which not in sides:
                opened = attempt(lambda w=which: DBusSide(spec["dbus"]) if w == "dbus"
                                 else RpcSide(spec["rpc"], spec["uri"]))
                if "err" in opened:
                    out[label] = {"open": opened["err"]}
                    continue
                sides[which] = opened["ok"]
            out[label] = attempt(lambda s=sides[which], o=op, a=args: getattr(s, o)(*map(_arg, a)))
    finally:
        for s in sides.values():
            s.close()
    return out


def dbus_event(m: Message) -> list[Any] | None:
    """A SecretEvent / SecretValueChanged signal as ["lifecycle", UUID, event, detail] or
    ["value-changed", UUID]; None for any other signal."""
    if m.member == "SecretEvent":
        return ["lifecycle", N.uuid_from_path(m.body[0]), m.body[1], m.body[2]]
    if m.member == "SecretValueChanged":
        return ["value-changed", N.uuid_from_path(m.body[0])]
    return None


def rpc_event(header: Header, body: Any) -> tuple[int, list[Any]] | None:
    """(callback id, the event as dbus_event() gives it, with the usage type and id after the
    UUID: RPC events carry them) of an event MESSAGE; None for any other frame."""
    if header.proc == P.Proc.SECRET_EVENT_LIFECYCLE:
        return body["callbackID"], ["lifecycle", *RpcSide.ref(body["secret"]), body["event"], body["detail"]]
    if header.proc == P.Proc.SECRET_EVENT_VALUE_CHANGED:
        return body["callbackID"], ["value-changed", *RpcSide.ref(body["secret"])]
    return None


def listen(spec: dict[str, Any]) -> dict[str, Any]:
    """Subscribe on D-Bus (Connect.Subscribe) and register both event ids over RPC, print
    "ready", then collect what each front end delivers until both have shown the UNDEFINED
    event of `spec["until"]` (or `spec["timeout"]` seconds)."""
    db, rpc = DBusSide(spec["dbus"]), RpcSide(spec["rpc"], spec["uri"])
    try:
        db.call(N.CONNECT_PATH, N.CONNECT_IFACE, "Subscribe")
        for event_id in (0, 1):
            rpc.call(P.Proc.CONNECT_SECRET_EVENT_REGISTER_ANY, {"eventID": event_id, "secret": None})
        print("ready", flush=True)
        end = ["lifecycle", spec["until"], 1, 0]
        got: dict[str, list[Any]] = {"dbus": [], "rpc": []}
        deadline = time.monotonic() + spec["timeout"]
        while time.monotonic() < deadline and not all(g and g[-1] == end for g in got.values()):
            db.pump(0.02)
            got["dbus"] += [e for e in map(dbus_event, db.signals) if e is not None]
            db.signals.clear()
            try:
                ev = rpc_event(*rpc.wait_message(0.02))
            except TimeoutError:
                continue
            if ev is not None:
                got["rpc"].append([ev[1][0], ev[1][1], *ev[1][4:]])      # as D-Bus's: no usage
        return got
    finally:
        db.close()
        rpc.close()


if __name__ == "__main__":
    _spec = json.loads(sys.stdin.readline())
    print(json.dumps(listen(_spec) if "until" in _spec else run_steps(_spec)))

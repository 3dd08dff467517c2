"""Framing: a 4-byte big-endian length that counts itself, a 24-byte header, the XDR payload."""
from __future__ import annotations

import struct
from typing import NamedTuple

from secretbus.rpc.protocol import HEADER_SIZE, MESSAGE_MAX, MsgType, Status
from secretbus.rpc.xdr import XdrError

_LEN = struct.Struct(">I")
_HEADER = struct.Struct(">IIiiII")    # prog, vers, proc (an int), type, serial, status
_FRAME_HEAD = struct.Struct(">IIIiiII")   # the length word and the header, packed at once
LENGTH_SIZE = _LEN.size
MIN_FRAME = LENGTH_SIZE + HEADER_SIZE


class Header(NamedTuple):
    # A tuple, not a frozen dataclass: one is made for every frame, and a dataclass's
    # __init__ (object.__setattr__ per field) was a visible part of a lookup's cost.
    prog: int
    vers: int
    proc: int
    type: int
    serial: int
    status: int

    def reply(self, status: Status = Status.OK) -> Header:
        """The header of the answer to this call: prog, vers, proc and serial echoed."""
        return Header(self.prog, self.vers, self.proc, MsgType.REPLY, self.serial, status)


def frame_length(word: bytes, limit: int = MESSAGE_MAX) -> int:
    """The bytes still to read after the length word `word`; XdrError when out of bounds."""
    (total,) = _LEN.unpack(word)
    if total < MIN_FRAME or total - LENGTH_SIZE > min(limit, MESSAGE_MAX):
        raise XdrError(f"frame length {total} out of bounds")
    return total - LENGTH_SIZE


def parse_header(body: bytes | memoryview) -> tuple[Header, memoryview]:
    """Header and payload of a frame without its length word."""
    if len(body) < HEADER_SIZE:
        raise XdrError("frame shorter than its header")
    view = memoryview(body)
    return Header(*_HEADER.unpack_from(view)), view[HEADER_SIZE:]


def without_fds(header: Header, payload: memoryview) -> tuple[Header, memoryview]:
    """A CALL_WITH_FDS as libvirt reads it: the number of fds first (virNetMessageDecodeNumFDs).
    With 0 it is a plain call; none is ever passed to us, so one that announces any, or not even
    the count, is an XdrError (it ends the connection, as it does there)."""
    if len(payload) < 4 or int.from_bytes(payload[:4], "big") != 0:
        raise XdrError("a call with file descriptors")
    return header._replace(type=MsgType.CALL), payload[4:]


def encode_frame(header: Header, payload: bytes = b"") -> bytes:
    total = MIN_FRAME + len(payload)
    if total - LENGTH_SIZE > MESSAGE_MAX:
        raise XdrError("message larger than the protocol's maximum")
    return _FRAME_HEAD.pack(total, *header) + payload


def encode_reply(call: Header, payload: bytes = b"", status: int = Status.OK) -> bytes:
    """The frame answering `call` (prog, vers, proc and serial echoed), without a Header."""
    total = MIN_FRAME + len(payload)
    if total - LENGTH_SIZE > MESSAGE_MAX:
        raise XdrError("message larger than the protocol's maximum")
    return _FRAME_HEAD.pack(total, call.prog, call.vers, call.proc, MsgType.REPLY, call.serial, status) + payload


def decode_frame(data: bytes, limit: int = MESSAGE_MAX) -> tuple[Header, memoryview]:
    """A whole frame, length word included, as header and payload."""
    if len(data) < LENGTH_SIZE:
        raise XdrError("frame shorter than its length word")
    n = frame_length(data[:LENGTH_SIZE], limit)
    if len(data) != LENGTH_SIZE + n:
        raise XdrError("frame length does not match the data")
    return parse_header(data[LENGTH_SIZE:])

"""Framing: a 4-byte big-endian length that counts itself, a 24-byte header, the XDR payload."""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from secretbus.rpc.protocol import HEADER_SIZE, MESSAGE_MAX, MsgType, Status
from secretbus.rpc.xdr import XdrError

_LEN = struct.Struct(">I")
_HEADER = struct.Struct(">IIiiII")    # prog, vers, proc (an int), type, serial, status
LENGTH_SIZE = _LEN.size
MIN_FRAME = LENGTH_SIZE + HEADER_SIZE


@dataclass(frozen=True)
class Header:
    prog: int
    vers: int
    proc: int
    type: int
    serial: int
    status: int

    def reply(self, status: Status = Status.OK) -> Header:
        """The header of the answer to this call: prog, vers, proc and serial echoed."""
        return replace(self, type=MsgType.REPLY, status=status)


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


def encode_frame(header: Header, payload: bytes = b"") -> bytes:
    total = MIN_FRAME + len(payload)
    if total - LENGTH_SIZE > MESSAGE_MAX:
        raise XdrError("message larger than the protocol's maximum")
    return _LEN.pack(total) + _HEADER.pack(header.prog, header.vers, header.proc, header.type,
                                           header.serial, header.status) + payload


def decode_frame(data: bytes, limit: int = MESSAGE_MAX) -> tuple[Header, memoryview]:
    """A whole frame, length word included, as header and payload."""
    if len(data) < LENGTH_SIZE:
        raise XdrError("frame shorter than its length word")
    n = frame_length(data[:LENGTH_SIZE], limit)
    if len(data) != LENGTH_SIZE + n:
        raise XdrError("frame length does not match the data")
    return parse_header(data[LENGTH_SIZE:])

"""XDR (RFC 4506) with explicit bounds: the subset libvirt's remote protocol uses.

Types are small objects declared once as data (protocol.py) and used both ways:
`encode(t, value)` and `decode(t, data)`. Every variable-length item has a maximum, checked
before anything is allocated, so a hostile length word costs nothing. Decoding is strict
(non-zero padding, trailing bytes, bad UTF-8 or a NUL inside a string are errors) so that
what decodes re-encodes byte for byte. Values: ints, bytes, str, lists, None for an absent
optional, dicts for structs, (discriminant, value) pairs for unions, and, in place of a struct
or an array, an `Encoded` value: bytes packed before (the server keeps each secret's handle
packed, so that listing 10,000 secrets is a join, not 10,000 struct packs).
"""
from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")


class Encoded:
    """A struct or array value already packed as its type: `pack` appends it as it is.
    Whoever makes one vouches that `data` is a valid encoding of that type."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


class XdrError(ValueError):
    """Data that does not decode (or a value that does not encode) as the declared type.
    The text names the type and the limit, never the data."""


def _pad(n: int) -> int:
    return -n % 4


_ZEROS = (b"", b"\0", b"\0\0", b"\0\0\0")


class Reader:
    """The data as bytes (one copy of a memoryview): a slice is then the bytes a value needs,
    and numbers are read in place with unpack_from. Decoding 10,000 secret handles (a client's
    ListAll) is dominated by these few operations."""

    def __init__(self, data: bytes | memoryview):
        self.buf = data if type(data) is bytes else bytes(data)
        self.pos = 0
        self.end = len(self.buf)

    def take(self, n: int) -> bytes:
        pos = self.pos
        end = pos + n
        if n < 0 or end > self.end:
            raise XdrError("truncated data")
        self.pos = end
        return self.buf[pos:end]

    def padding(self, n: int) -> None:
        p = -n % 4
        if p:
            pos = self.pos
            if pos + p > self.end:
                raise XdrError("truncated data")
            if self.buf[pos:pos + p] != _ZEROS[p]:
                raise XdrError("non-zero padding")
            self.pos = pos + p

    def remaining(self) -> int:
        return self.end - self.pos


class XdrType:
    name = "?"

    def pack(self, out: bytearray, value: Any) -> None:
        raise NotImplementedError

    def unpack(self, r: Reader) -> Any:
        raise NotImplementedError


class _Number(XdrType):
    def __init__(self, name: str, fmt: struct.Struct, lo: int, hi: int):
        self.name, self._fmt, self._lo, self._hi = name, fmt, lo, hi

    def pack(self, out: bytearray, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not self._lo <= value <= self._hi:
            raise XdrError(f"{self.name}: value out of range")
        out += self._fmt.pack(value)

    def unpack(self, r: Reader) -> int:
        pos = r.pos
        end = pos + self._fmt.size
        if end > r.end:
            raise XdrError("truncated data")
        r.pos = end
        return int(self._fmt.unpack_from(r.buf, pos)[0])


INT = _Number("int", _I32, -2**31, 2**31 - 1)
UINT = _Number("unsigned int", _U32, 0, 2**32 - 1)
HYPER = _Number("hyper", _I64, -2**63, 2**63 - 1)
UHYPER = _Number("unsigned hyper", _U64, 0, 2**64 - 1)


class _Bool(XdrType):
    name = "bool"

    def pack(self, out: bytearray, value: Any) -> None:
        out += _I32.pack(1 if value else 0)

    def unpack(self, r: Reader) -> bool:
        v = INT.unpack(r)
        if v not in (0, 1):
            raise XdrError("bool: not 0 or 1")
        return v == 1


class _Double(XdrType):
    name = "double"

    def pack(self, out: bytearray, value: Any) -> None:
        out += _F64.pack(float(value))

    def unpack(self, r: Reader) -> float:
        return float(_F64.unpack(r.take(8))[0])


class _Void(XdrType):
    name = "void"

    def pack(self, out: bytearray, value: Any) -> None:
        if value is not None:
            raise XdrError("void: takes no value")

    def unpack(self, r: Reader) -> None:
        return None


BOOL = _Bool()
DOUBLE = _Double()
VOID = _Void()


def _length(r: Reader, name: str, maximum: int) -> int:
    n = UINT.unpack(r)
    if n > maximum:
        raise XdrError(f"{name}: length greater than maximum {maximum}")
    return n


class Opaque(XdrType):
    """`opaque x<max>`: a length word, the bytes, zero padding."""

    def __init__(self, maximum: int):
        self.maximum = maximum
        self.name = f"opaque<{maximum}>"

    def pack(self, out: bytearray, value: Any) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise XdrError(f"{self.name}: not bytes")
        n = len(value)
        if n > self.maximum:
            raise XdrError(f"{self.name}: length greater than maximum")
        out += _U32.pack(n)
        out += value
        out += bytes(_pad(n))

    def unpack(self, r: Reader) -> bytes:
        n = _length(r, self.name, self.maximum)
        data = r.take(n)
        r.padding(n)
        return data


class FixedOpaque(XdrType):
    """`opaque x[n]`: exactly n bytes, zero padding."""

    def __init__(self, size: int):
        self.size = size
        self.name = f"opaque[{size}]"

    def pack(self, out: bytearray, value: Any) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != self.size:
            raise XdrError(f"{self.name}: needs exactly {self.size} bytes")
        out += value
        out += bytes(_pad(self.size))

    def unpack(self, r: Reader) -> bytes:
        data = r.take(self.size)
        r.padding(self.size)
        return data


class String(XdrType):
    """`string x<max>`: like opaque, UTF-8, no NUL (libvirt's are C strings)."""

    def __init__(self, maximum: int):
        self.maximum = maximum
        self.name = f"string<{maximum}>"
        self._raw = Opaque(maximum)

    def pack(self, out: bytearray, value: Any) -> None:
        if not isinstance(value, str) or "\0" in value:
            raise XdrError(f"{self.name}: not a string without NUL")
        data = value.encode("utf-8")
        if len(data) > self.maximum:
            raise XdrError(f"{self.name}: length greater than maximum")
        self._raw.pack(out, data)

    def unpack(self, r: Reader) -> str:
        n = _length(r, self.name, self.maximum)
        data = r.take(n)
        r.padding(n)
        if b"\0" in data:
            raise XdrError(f"{self.name}: contains NUL")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise XdrError(f"{self.name}: not UTF-8") from None


class CharArray(XdrType):
    """`char data<max>` (the SASL structs): an array of XDR chars, 4 bytes per byte."""

    def __init__(self, maximum: int):
        self.maximum = maximum
        self.name = f"char<{maximum}>"

    def pack(self, out: bytearray, value: Any) -> None:
        if not isinstance(value, (bytes, bytearray)) or len(value) > self.maximum:
            raise XdrError(f"{self.name}: not bytes within the maximum")
        out += _U32.pack(len(value))
        for b in value:
            out += _I32.pack(b - 256 if b > 127 else b)   # XDR char is a signed int

    def unpack(self, r: Reader) -> bytes:
        n = _length(r, self.name, self.maximum)
        raw = r.take(4 * n)
        out = bytearray(n)
        for i in range(n):
            v = _I32.unpack_from(raw, 4 * i)[0]
            if not -128 <= v <= 127:
                raise XdrError(f"{self.name}: element out of range")
            out[i] = v & 0xFF
        return bytes(out)


class Array(XdrType):
    """`T x<max>`: a count word, then the elements."""

    def __init__(self, elem: XdrType, maximum: int):
        self.elem, self.maximum = elem, maximum
        self.name = f"{elem.name}<{maximum}>"
        # An array of secret handles (two fixed fields and a string) is decoded in one loop
        # (_unpack_many): a client's 10,000-secret ListAll took 9.1-9.5 ms element by element.
        self._many = _many_of(elem)

    def pack(self, out: bytearray, value: Any) -> None:
        if type(value) is Encoded:
            out += value.data
            return
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) > self.maximum:
            raise XdrError(f"{self.name}: not a sequence within the maximum")
        out += _U32.pack(len(value))
        for v in value:
            self.elem.pack(out, v)

    def unpack(self, r: Reader) -> list[Any]:
        n = _length(r, self.name, self.maximum)
        if n * 4 > r.remaining():    # every element takes at least 4 bytes: refuse before looping
            raise XdrError("truncated data")
        if self._many is not None:
            return _unpack_many(self.elem, self._many, r, n)
        return [self.elem.unpack(r) for _ in range(n)]


class Optional(XdrType):
    """`T *x`: a 0/1 word, then T when 1; None stands for absent."""

    def __init__(self, elem: XdrType):
        self.elem = elem
        self.name = f"{elem.name}*"

    def pack(self, out: bytearray, value: Any) -> None:
        if value is None:
            out += _U32.pack(0)
        else:
            out += _U32.pack(1)
            self.elem.pack(out, value)

    def unpack(self, r: Reader) -> Any:
        flag = UINT.unpack(r)
        if flag == 0:
            return None
        if flag != 1:
            raise XdrError(f"{self.name}: bad discriminant")
        return self.elem.unpack(r)


class Struct(XdrType):
    def __init__(self, name: str, *fields: tuple[str, XdrType]):
        self.name = name
        self.fields = fields
        # The leading run of fixed-size fields (numbers, opaque[4k]) is read with one
        # unpack_from: a secret handle's UUID and usage type at once (a client decoding a
        # 10,000-secret ListAll, the server every handle argument). Same values, same checks
        # (a fixed opaque of a multiple of 4 bytes has no padding to check).
        codes: list[str] = []
        for _fname, ftype in fields:
            code = _fixed_code(ftype)
            if code is None:
                break
            codes.append(code)
        self._prefix = struct.Struct(">" + "".join(codes)) if len(codes) > 1 else None
        self._prefix_names = tuple(f for f, _ in fields[:len(codes)])
        self._rest = fields[len(codes):] if self._prefix is not None else fields

    def pack(self, out: bytearray, value: Any) -> None:
        if type(value) is Encoded:
            out += value.data
            return
        if not isinstance(value, Mapping):
            raise XdrError(f"{self.name}: not a mapping")
        for fname, ftype in self.fields:
            if fname not in value:
                raise XdrError(f"{self.name}: missing field {fname}")
            ftype.pack(out, value[fname])

    def unpack(self, r: Reader) -> dict[str, Any]:
        prefix = self._prefix
        if prefix is None:
            return {fname: ftype.unpack(r) for fname, ftype in self.fields}
        pos = r.pos
        end = pos + prefix.size
        if end > r.end:
            raise XdrError("truncated data")
        r.pos = end
        out = dict(zip(self._prefix_names, prefix.unpack_from(r.buf, pos), strict=True))
        for fname, ftype in self._rest:
            out[fname] = ftype.unpack(r)
        return out


def _fixed_code(t: XdrType) -> str | None:
    """The struct format code of a fixed-size type read as is, None for any other."""
    if isinstance(t, _Number):
        return t._fmt.format[1:]
    if isinstance(t, FixedOpaque) and t.size % 4 == 0:
        return f"{t.size}s"
    return None


class Union(XdrType):
    """`union switch (int d) { case …: T; }`: value is (d, T's value); no default arm."""

    def __init__(self, name: str, arms: Mapping[int, XdrType]):
        self.name = name
        self.arms = dict(arms)

    def pack(self, out: bytearray, value: Any) -> None:
        try:
            disc, inner = value
        except (TypeError, ValueError):
            raise XdrError(f"{self.name}: not a (discriminant, value) pair") from None
        arm = self.arms.get(disc)
        if arm is None:
            raise XdrError(f"{self.name}: unknown discriminant")
        INT.pack(out, disc)
        arm.pack(out, inner)

    def unpack(self, r: Reader) -> tuple[int, Any]:
        disc = INT.unpack(r)
        arm = self.arms.get(disc)
        if arm is None:
            raise XdrError(f"{self.name}: unknown discriminant")
        return disc, arm.unpack(r)


def encode(t: XdrType, value: Any) -> bytes:
    if type(value) is Encoded:
        return value.data
    out = bytearray()
    t.pack(out, value)
    return bytes(out)


def decode(t: XdrType, data: bytes | memoryview) -> Any:
    """The whole of `data` as one `t`; trailing bytes are an error."""
    r = Reader(data)
    value = t.unpack(r)
    if r.remaining():
        raise XdrError(f"{t.name}: trailing data")
    return value


def _many_of(elem: XdrType) -> struct.Struct | None:
    """For a struct of two fixed fields and a trailing string: its fixed fields and the
    string's length word as one struct (read with one unpack_from per element); else None."""
    if type(elem) is not Struct or elem._prefix is None or len(elem._prefix_names) != 2:
        return None
    if len(elem._rest) != 1 or type(elem._rest[0][1]) is not String:
        return None
    return struct.Struct(elem._prefix.format + "I")


def _unpack_many(elem: Any, many: struct.Struct, r: Reader, n: int) -> list[dict[str, Any]]:
    """`n` of `elem` in a row with every check of its `unpack` (the fixed fields, then the
    string's bound, padding, NUL and UTF-8). Kept out of Struct itself: giving Struct the
    attribute slowed the client's lookups (~10 % client CPU per call, measured) for no reason
    found, while this form did not."""
    fname, ftype = elem._rest[0]
    unpack_from, size = many.unpack_from, many.size
    n0, n1 = elem._prefix_names
    maximum = ftype.maximum
    buf, pos, end = r.buf, r.pos, r.end
    out: list[dict[str, Any]] = []
    append = out.append
    for _ in range(n):
        head = pos + size
        if head > end:
            raise XdrError("truncated data")
        v0, v1, length = unpack_from(buf, pos)
        if length > maximum:
            raise XdrError(f"{ftype.name}: length greater than maximum {maximum}")
        stop = head + length
        pad = -length % 4
        if stop + pad > end:
            raise XdrError("truncated data")
        data = buf[head:stop]
        if pad and buf[stop:stop + pad] != _ZEROS[pad]:
            raise XdrError("non-zero padding")
        if b"\0" in data:
            raise XdrError(f"{ftype.name}: contains NUL")
        try:
            append({n0: v0, n1: v1, fname: data.decode("utf-8")})
        except UnicodeDecodeError:
            raise XdrError(f"{ftype.name}: not UTF-8") from None
        pos = stop + pad
    r.pos = pos
    return out

"""An upper bound of a reply's size on the wire, before it is sent.

dbus-daemon drops a connection that sends a message over its max_message_size (32 MiB on
the system bus), and dbus-fast's marshaller is private API. Lists are measured here instead:
the D-Bus marshalling rules give each value its bytes plus at most its alignment padding,
so the bound is never below the real size and a few percent above it. One walk of the
body, done only for replies that can grow with the store (lists), never for GetValue.
"""
from __future__ import annotations

from typing import Any

from dbus_fast import Variant

HEADER = 1024      # fixed header fields, reply serial, destination, signature: well below this


def _split(sig: str) -> list[str]:
    """The complete types in a signature."""
    out, i = [], 0
    while i < len(sig):
        j = _end(sig, i)
        out.append(sig[i:j])
        i = j
    return out


def _end(sig: str, i: int) -> int:
    c = sig[i]
    if c == "a":
        return _end(sig, i + 1)
    if c in "({":
        close = ")" if c == "(" else "}"
        depth, j = 0, i
        while True:
            if sig[j] in "({":
                depth += 1
            elif sig[j] in ")}":
                depth -= 1
                if depth == 0 and sig[j] == close:
                    return j + 1
            j += 1
    return i + 1


_FIXED = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4}


def value_size(sig: str, value: Any) -> int:
    """Bytes of `value` of single complete type `sig`, padding counted at its worst (7)."""
    c = sig[0]
    if c in _FIXED:
        return _FIXED[c] + 7
    if c in "so":
        return 4 + len(value.encode()) + 1 + 3
    if c == "g":
        return 1 + len(value.encode()) + 1
    if c == "v":
        v: Variant = value
        return 1 + len(v.signature) + 1 + value_size(v.signature, v.value)
    if c == "a":
        elem = sig[1:]
        total = 4 + 7 + 7
        if elem == "y":
            return total + len(value)
        if elem == "o":                       # object paths are ASCII: no encoding needed
            return total + sum(map(len, value)) + 8 * len(value)
        if elem[0] == "{":
            k, v2 = _split(elem[1:-1])
            return total + sum(8 + value_size(k, kk) + value_size(v2, vv) for kk, vv in value.items())
        return total + sum(value_size(elem, x) for x in value)
    if c == "(":
        return 7 + sum(value_size(t, x) for t, x in zip(_split(sig[1:-1]), value, strict=True))
    raise ValueError(f"cannot size type {sig!r}")


def reply_size(sig: str, body: list[Any]) -> int:
    """An upper bound of a method return with body `body` of signature `sig`."""
    types = _SPLITS.get(sig)
    if types is None:
        types = tuple(_split(sig))
        if len(_SPLITS) < _SPLITS_MAX:
            _SPLITS[sig] = types
    if len(types) == 1 and len(body) == 1:
        # One value, most replies (GetValue's "ay", a lookup's "o"): no generator and zip
        # per reply, which were most of this on every call.
        return HEADER + value_size(types[0], body[0])
    return HEADER + sum(value_size(t, v) for t, v in zip(types, body, strict=True))


# Reply signatures split once: they are the method table's out signatures, a handful.
_SPLITS: dict[str, tuple[str, ...]] = {}
_SPLITS_MAX = 256

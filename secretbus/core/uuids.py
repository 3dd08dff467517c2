"""UUID parsing with libvirt's leniency, always normalised to lowercase dashed form."""
from __future__ import annotations

import re
import uuid as _uuid

from secretbus.core import errors

_HEX = frozenset("0123456789abcdefABCDEF")
_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def parse_uuid(text: str) -> str | None:
    """Return the canonical form, or None if `text` is not a UUID by libvirt's rules.

    Leading/trailing whitespace is allowed; '-' or ' ' may come before and between hex *pairs*,
    not after the last (virUUIDParse allows only whitespace there); exactly 32 hex digits, any
    case.
    """
    if _CANONICAL.fullmatch(text):   # the common case, and the hot one at start-up
        return text
    s = text.strip(" \t\n\r\v\f")
    digits: list[str] = []
    i = 0
    n = len(s)
    while i < n:
        if s[i] in "- ":
            i += 1
            continue
        if i + 1 >= n or s[i] not in _HEX or s[i + 1] not in _HEX:
            return None
        digits.append(s[i:i + 2])
        i += 2
        if len(digits) == 16:
            break
    if len(digits) != 16 or i != n:        # (s is stripped: what follows is not whitespace)
        return None
    h = "".join(digits).lower()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def invalid_uuid() -> errors.InvalidArgCheck:
    """libvirt's refusal of a UUID string that is not one (virSecretLookupByUUIDString's check)."""
    return errors.arg_check("uuidstr", "virSecretLookupByUUIDString", "must be a valid UUID")


def canonical_uuid(text: object) -> str:
    """The canonical form of a UUID argument, or libvirt's error for one that is not
    (the driver and both clients say the same)."""
    canon = parse_uuid(text) if isinstance(text, str) else None
    if canon is None:
        raise invalid_uuid()
    return canon


def is_canonical(text: str) -> bool:
    return _CANONICAL.fullmatch(text) is not None


def generate() -> str:
    return str(_uuid.uuid4())

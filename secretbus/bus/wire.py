"""Encoding the client's Python arguments as D-Bus values.

Only what the wire itself demands is checked here (a 'u' must fit 32 bits, an 's' holds valid
UTF-8 without NUL, an 'ay' is bytes, a message fits through the bus). The API rules — value
size, flags, XML size, the private-value rule — belong to the driver, and the service answers
for them. Where an argument cannot be encoded at all, the error is the one the service (or
the embedded driver) gives for such an argument, so the caller sees no difference.
"""
from __future__ import annotations

import codecs
import re

from secretbus.core import errors

INT32 = (-(2 ** 31), 2 ** 31)
UINT32 = 2 ** 32
# dbus-daemon's default max_message_size on the system bus (the session bus allows more). A
# larger message never reaches the service: the daemon drops the whole connection instead.
MESSAGE_MAX = 32 * 1024 * 1024
_HEADROOM = 4096                    # header fields and the other arguments of one call


def u32(flags: int) -> int:
    """Flags for a 'u' argument. Negative values are taken as C's unsigned int would, so the
    service reports the same 'unsupported flags (0x...)' text as the embedded driver."""
    if not isinstance(flags, int):
        raise errors.InvalidArg(f"flags must be an integer, not {type(flags).__name__}")
    if not INT32[0] <= flags < UINT32:
        raise errors.InvalidArg(f"flags {flags} do not fit in 32 bits")
    return int(flags) & 0xFFFFFFFF


def fits_int32(n: object) -> bool:
    return isinstance(n, int) and INT32[0] <= n < INT32[1]


def wire_safe(text: str) -> bool:
    """A D-Bus string may hold no NUL and must be valid UTF-8 (no lone surrogates)."""
    if "\0" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fits(size: int) -> bool:
    return size <= MESSAGE_MAX - _HEADROOM


def value_bytes(value: bytes | bytearray | memoryview) -> bytes:
    """A secret value as an 'ay'."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise errors.InvalidArg("value in virSecretSetValue must be bytes")
    data = bytes(value)
    if not _fits(len(data)):
        raise errors.InvalidArg(f"a secret value of {len(data)} bytes does not fit in a D-Bus message")
    return data


# -- XML documents ----------------------------------------------------------------------
# XML 1.0 appendix F: a byte order mark, else the first bytes of '<?xml', name the encoding
# family; in an ASCII-compatible document the declaration names the encoding itself.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_NO_BOM_UTF16 = ((b"<\0?\0", "utf-16-le"), (b"\0<\0?", "utf-16-be"))
_DECLARATION = re.compile(rb"<\?xml\s[^>]*?\bencoding\s*=\s*(['\"])([A-Za-z][A-Za-z0-9._-]*)\1")


def _declared_encoding(data: bytes) -> str:
    for bom, name in _BOMS:
        if data.startswith(bom):
            return name
    for start, name in _NO_BOM_UTF16:
        if data.startswith(start):
            return name
    m = _DECLARATION.match(data)
    return m.group(2).decode("ascii") if m else "utf-8"


def _decode(data: bytes) -> str | None:
    """`data` as text, in the encoding its BOM or declaration names; None if it cannot be."""
    try:
        text = data.decode(_declared_encoding(data))
    except (LookupError, UnicodeDecodeError):
        return None
    # A declaration read as ASCII must still be there after decoding (not so for, e.g., an
    # 8-bit document that claims to be UTF-16).
    if data.startswith(b"<?xml") and not text.startswith("<?xml"):
        return None
    return text


def _driver_error(doc: str | bytes, fallback: str) -> errors.SecretError:
    """The embedded driver's error for a document that cannot travel (it reads bytes and
    surrogates itself), or an XMLError naming `fallback` if it would accept it."""
    from secretbus.core.secretxml import DOCUMENT_NAME, parse_secret_xml
    try:
        parse_secret_xml(doc)
    except errors.SecretError as e:
        return e
    return errors.XMLError(f"failed to parse xml document '{DOCUMENT_NAME}': {fallback}")


def xml_text(xml: str | bytes | bytearray | memoryview) -> str:
    """The document as a D-Bus string.

    Bytes are decoded as their BOM or XML declaration says, as the embedded driver reads
    them; the service re-encodes the string as UTF-8 whatever its declaration says.
    """
    if isinstance(xml, (bytes, bytearray, memoryview)):
        data = bytes(xml)
        if not _fits(len(data)):
            raise _driver_error(data, "document too large")
        text = _decode(data)
        if text is None:
            raise _driver_error(data, "unknown encoding")
    elif isinstance(xml, str):
        text = xml
    else:
        raise errors.InvalidArg("secret XML must be str or bytes")
    if not wire_safe(text):
        raise _driver_error(text, "invalid character")
    if len(text) * 4 > MESSAGE_MAX - _HEADROOM and not _fits(len(text.encode("utf-8"))):
        raise _driver_error(text, "document too large")
    return text

"""A client's Python arguments made ready for a wire, the same way for every front end.

The D-Bus client (bus/wire.py) and the RPC client (rpc/facade.py) both send flags as an
unsigned 32-bit word and an XML document as a string. What a caller passes is normalised here
once, so that `secretbus.open()` behaves alike whichever front end it reaches, and like the
embedded driver, which takes the same arguments directly. The API rules themselves (which
flags, value size, schema) stay with the driver; only what a wire cannot carry is refused here,
with the error the embedded driver gives for that argument.
"""
from __future__ import annotations

import codecs
import re

from secretbus.core import errors

INT32_MIN = -(2 ** 31)
UINT32 = 2 ** 32


def flags_u32(flags: int) -> int:
    """Flags as C's unsigned int would take them (libvirt's bindings do the same), so that the
    service reports the embedded driver's 'unsupported flags (0x...)' text for, e.g., -1. A bool
    is an int here, as it is to the embedded driver."""
    if not isinstance(flags, int):
        raise errors.InvalidArg(f"flags must be an integer, not {type(flags).__name__}")
    if not INT32_MIN <= flags < UINT32:
        raise errors.InvalidArg(f"flags {flags} do not fit in 32 bits")
    return int(flags) & 0xFFFFFFFF


def wire_safe(text: str) -> bool:
    """A wire string (D-Bus 's', libvirt's C string) holds no NUL and is valid UTF-8 (no lone
    surrogates)."""
    if "\0" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


def xml_document(xml: str | bytes | bytearray | memoryview, max_bytes: int) -> str:
    """The document as a wire string of at most `max_bytes` UTF-8 bytes.

    Bytes are decoded as their BOM or XML declaration says, as the embedded driver reads them;
    the service re-encodes the string as UTF-8 whatever its declaration says.
    """
    if isinstance(xml, (bytes, bytearray, memoryview)):
        data = bytes(xml)
        if len(data) > max_bytes:
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
    if len(text) * 4 > max_bytes and len(text.encode("utf-8")) > max_bytes:
        raise _driver_error(text, "document too large")
    return text

"""Encoding the client's Python arguments as D-Bus values.

Only what the wire itself demands is checked here (a 'u' must fit 32 bits, an 's' holds valid
UTF-8 without NUL, an 'ay' is bytes, a message fits through the bus). The API rules — value
size, flags, XML size, the private-value rule — belong to the driver, and the service answers
for them. Where an argument cannot be encoded at all, the error is the one the service (or
the embedded driver) gives for such an argument, so the caller sees no difference.
"""
from __future__ import annotations

from secretbus.core import errors
from secretbus.core.clientargs import INT32_MIN, xml_document
from secretbus.core.clientargs import flags_u32 as u32  # noqa: F401 (the D-Bus client's name for it)

INT32 = (INT32_MIN, 2 ** 31)
# dbus-daemon's default max_message_size on the system bus (the session bus allows more). A
# larger message never reaches the service: the daemon drops the whole connection instead.
MESSAGE_MAX = 32 * 1024 * 1024
_HEADROOM = 4096                    # header fields and the other arguments of one call


def fits_int32(n: object) -> bool:
    return isinstance(n, int) and INT32[0] <= n < INT32[1]


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


def xml_text(xml: str | bytes | bytearray | memoryview) -> str:
    """The document as a D-Bus string that fits in one message."""
    return xml_document(xml, MESSAGE_MAX - _HEADROOM)

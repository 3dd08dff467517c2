"""libvirt's argument rules, in one place: flags per call, the value size limit, definition
limits and the private-value rule. The driver applies them; a front end may call them
first (before an access check or a thread hop) instead of restating them.
"""
from __future__ import annotations

from secretbus.core import errors
from secretbus.core.model import DEFINE_VALIDATE, LIST_FLAGS_ALL, VALUE_MAX, SecretDef
from secretbus.core.secretxml import MAX_XML_BYTES, format_secret_xml

# Per-field limits: with XML escaping a character formats to at most 6 bytes ("&apos;"),
# so a definition within them always fits in MAX_XML_BYTES, the store's read limit.
DESCRIPTION_MAX = 128 * 1024   # characters
USAGE_ID_MAX = 4096            # characters; a volume path is at most PATH_MAX


def check_define_flags(flags: int) -> None:
    errors.unsupported_flags(flags, DEFINE_VALIDATE, "secretDefineXML")


def check_list_flags(flags: int) -> None:
    errors.unsupported_flags(flags, LIST_FLAGS_ALL, "secretConnectListAllSecrets")


def check_xml_desc_flags(flags: int) -> None:
    errors.unsupported_flags(flags, 0, "secretGetXMLDesc")


def check_get_value_flags(flags: int) -> None:
    errors.unsupported_flags(flags, 0, "secretGetValue")


def check_set_value_flags(flags: int) -> None:
    errors.unsupported_flags(flags, 0, "secretSetValue")


def check_value(value: object) -> bytes:
    """A new value: bytes of at most VALUE_MAX (values already stored may be larger)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise errors.InvalidArg("value in virSecretSetValue must be bytes")
    if len(value) > VALUE_MAX:
        # libvirt's remote driver refuses it before sending (REMOTE_SECRET_VALUE_MAX).
        raise errors.RPCError(f"value length greater than maximum: {len(value)} > {VALUE_MAX}")
    return bytes(value)


def check_readable(d: SecretDef, *, internal_call: bool) -> None:
    """A private value goes only to an internal caller (an in-process VM launcher, or a
    uid the service trusts); the service decides who that is."""
    if d.private and not internal_call:
        raise errors.InvalidSecret("secret is private")


def check_definition(d: SecretDef) -> None:
    """Refuse at define time what could not be loaded again after a restart."""
    if d.description is not None and len(d.description) > DESCRIPTION_MAX:
        raise errors.XMLError(f"secret description is longer than {DESCRIPTION_MAX} characters")
    if d.usage_id is not None and len(d.usage_id) > USAGE_ID_MAX:
        raise errors.XMLError(f"secret usage id is longer than {USAGE_ID_MAX} characters")
    size = len(format_secret_xml(d).encode("utf-8"))
    if size > MAX_XML_BYTES:
        raise errors.XMLError(f"secret XML would be {size} bytes when stored, "
                              f"more than {MAX_XML_BYTES}")

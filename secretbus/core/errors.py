"""Error types: each carries libvirt's error code, its D-Bus error name and the prefix libvirt
puts before the message when it reports it (`Secret not found: no secret with matching uuid …`).

Messages follow libvirt's wording. No message may ever contain a secret value or key:
callers build messages only from UUIDs, usage ids, paths and flag numbers.
"""
from __future__ import annotations

from typing import ClassVar

DBUS_ERROR_PREFIX = "org.libvirt.Error."


class SecretError(Exception):
    """Base class of every error the project raises on purpose.

    `code` is libvirt's virErrorNumber, `kind` the last part of the D-Bus error name and
    `prefix` libvirt's text for the code, which every front end puts before `message`.
    """

    code: ClassVar[int] = 1
    kind: ClassVar[str] = "InternalError"
    prefix: ClassVar[str] = "internal error: "

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def dbus_name(self) -> str:
        return DBUS_ERROR_PREFIX + self.kind

    def display(self) -> str:
        """The message as libvirt reports it: with its code's prefix."""
        return self.prefix + self.message


class InternalError(SecretError):
    """VIR_ERR_INTERNAL_ERROR"""


class NoSupport(SecretError):
    """VIR_ERR_NO_SUPPORT"""
    code, kind, prefix = 3, "NoSupport", "this function is not supported by the connection driver: "


class InvalidArg(SecretError):
    """VIR_ERR_INVALID_ARG"""
    code, kind, prefix = 8, "InvalidArg", "invalid argument: "


class OperationFailed(SecretError):
    """VIR_ERR_OPERATION_FAILED"""
    code, kind, prefix = 9, "OperationFailed", "operation failed: "


class XMLError(SecretError):
    """VIR_ERR_XML_ERROR"""
    code, kind, prefix = 27, "XMLError", "XML error: "


class XMLDetail(XMLError):
    """VIR_ERR_XML_DETAIL: libxml2's own error, already framed as `NAME:LINE: MESSAGE`
    (virerror.c formats this code as the bare message). An XMLError to callers that catch
    XML problems as one."""
    code, kind, prefix = 35, "XMLDetail", ""


class OperationDenied(SecretError):
    """VIR_ERR_OPERATION_DENIED"""
    code, kind, prefix = 29, "OperationDenied", "operation forbidden: "


class SystemError(SecretError):   # libvirt's name; always used as errors.SystemError
    """VIR_ERR_SYSTEM_ERROR: the message already names the failing call (libvirt adds no prefix)."""
    code, kind, prefix = 38, "SystemError", ""


class RPCError(SecretError):
    """VIR_ERR_RPC: a limit of libvirt's wire protocol (virerror.c formats it as the bare
    message, like VIR_ERR_SYSTEM_ERROR; "RPC error" is only its text when there is no message)."""
    code, kind, prefix = 39, "RPCError", ""


class InvalidSecret(SecretError):
    """VIR_ERR_INVALID_SECRET"""
    code, kind, prefix = 65, "InvalidSecret", "Invalid secret: "


class NoSecret(SecretError):
    """VIR_ERR_NO_SECRET"""
    code, kind, prefix = 66, "NoSecret", "Secret not found: "


class ConfigUnsupported(SecretError):
    """VIR_ERR_CONFIG_UNSUPPORTED"""
    code, kind, prefix = 67, "ConfigUnsupported", "unsupported configuration: "


class AccessDenied(SecretError):
    """VIR_ERR_ACCESS_DENIED"""
    code, kind, prefix = 88, "AccessDenied", "access denied: "


class XMLInvalidSchema(SecretError):
    """VIR_ERR_XML_INVALID_SCHEMA"""
    code, kind, prefix = 92, "XMLInvalidSchema", "XML document failed to validate against schema: "


class InvalidEncrKey(SecretError):
    """VIR_ERR_INVALID_ENCR_KEY_SECRET, added by libvirt 12.1 after 110 MULTIPLE_DOMAINS,
    111 NO_NETWORK_METADATA, 112 AGENT_COMMAND_TIMEOUT and 113 AGENT_COMMAND_FAILED."""
    code, kind, prefix = 114, "InvalidEncrKey", ""


class ConfigError(ConfigUnsupported):
    """A secret.conf or key problem found at start-up or reload. It travels as libvirt's
    VIR_ERR_CONFIG_UNSUPPORTED; its message already says "<file>:<line>: what", so no prefix."""
    prefix = ""


def _kinds(base: type[SecretError]) -> list[type[SecretError]]:
    """Every class below `base` with a D-Bus name of its own: ConfigError shares
    ConfigUnsupported's, and InternalError stands for the base class's."""
    out = []
    for c in base.__subclasses__():
        if c.kind != base.kind:
            out.append(c)
        out += _kinds(c)
    return out


ALL_ERRORS: tuple[type[SecretError], ...] = (InternalError, *_kinds(SecretError))
BY_DBUS_NAME: dict[str, type[SecretError]] = {DBUS_ERROR_PREFIX + c.kind: c for c in ALL_ERRORS}


def from_dbus(name: str, text: str) -> SecretError:
    """Rebuild the project's exception from a D-Bus error reply (`text` as `display()` made it)."""
    cls = BY_DBUS_NAME.get(name, OperationFailed)
    if cls.prefix and text.startswith(cls.prefix):
        text = text[len(cls.prefix):]
    return cls(text)


def display(err: SecretError) -> str:
    return err.display()


def unsupported_flags(flags: int, supported: int, function: str) -> None:
    extra = flags & ~supported
    if flags < 0 or extra:
        # Negative numbers are shown as the C unsigned int they would be.
        shown = extra if flags >= 0 else extra & 0xFFFFFFFF
        raise InvalidArg(f"unsupported flags (0x{shown:x}) in function {function}")

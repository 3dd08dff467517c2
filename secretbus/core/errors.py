"""Error types: each carries libvirt's error code and maps to one D-Bus error name.

Messages follow libvirt's wording. No message may ever contain a secret value or key:
callers build messages only from UUIDs, usage ids, paths and flag numbers.
"""
from __future__ import annotations

DBUS_ERROR_PREFIX = "org.libvirt.Error."


class SecretError(Exception):
    """Base class of every error the project raises on purpose."""

    code: int = 1          # VIR_ERR_INTERNAL_ERROR
    kind: str = "InternalError"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def dbus_name(self) -> str:
        return DBUS_ERROR_PREFIX + self.kind


def _kind(name: str, code: int, doc: str) -> type[SecretError]:
    cls = type(name, (SecretError,), {"code": code, "kind": name, "__doc__": doc})
    return cls


InternalError = _kind("InternalError", 1, "VIR_ERR_INTERNAL_ERROR")
NoSupport = _kind("NoSupport", 3, "VIR_ERR_NO_SUPPORT")
InvalidArg = _kind("InvalidArg", 8, "VIR_ERR_INVALID_ARG")
OperationFailed = _kind("OperationFailed", 9, "VIR_ERR_OPERATION_FAILED")
XMLError = _kind("XMLError", 27, "VIR_ERR_XML_ERROR")
OperationDenied = _kind("OperationDenied", 29, "VIR_ERR_OPERATION_DENIED")
SystemError_ = _kind("SystemError", 38, "VIR_ERR_SYSTEM_ERROR")
InvalidSecret = _kind("InvalidSecret", 65, "VIR_ERR_INVALID_SECRET")
NoSecret = _kind("NoSecret", 66, "VIR_ERR_NO_SECRET")
ConfigUnsupported = _kind("ConfigUnsupported", 67, "VIR_ERR_CONFIG_UNSUPPORTED")
AccessDenied = _kind("AccessDenied", 88, "VIR_ERR_ACCESS_DENIED")
XMLInvalidSchema = _kind("XMLInvalidSchema", 92, "VIR_ERR_XML_INVALID_SCHEMA")
# libvirt 12.1 added VIR_ERR_INVALID_ENCR_KEY_SECRET right after 111.
InvalidEncrKey = _kind("InvalidEncrKey", 112, "VIR_ERR_INVALID_ENCR_KEY_SECRET")
ConfigError = _kind("ConfigError", 67, "secret.conf or key problem found at start-up")

ALL_ERRORS: tuple[type[SecretError], ...] = (
    InternalError, NoSupport, InvalidArg, OperationFailed, XMLError, OperationDenied,
    SystemError_, InvalidSecret, NoSecret, ConfigUnsupported, AccessDenied,
    XMLInvalidSchema, InvalidEncrKey, ConfigError,
)
BY_DBUS_NAME: dict[str, type[SecretError]] = {
    DBUS_ERROR_PREFIX + c.kind: c for c in ALL_ERRORS if c is not ConfigError
}


def from_dbus(name: str, message: str) -> SecretError:
    """Rebuild the project's exception from a D-Bus error reply."""
    return BY_DBUS_NAME.get(name, OperationFailed)(message)


def unsupported_flags(flags: int, supported: int, function: str) -> None:
    extra = flags & ~supported
    if flags < 0 or extra:
        # Negative numbers are shown as the C unsigned int they would be.
        shown = extra if flags >= 0 else extra & 0xFFFFFFFF
        raise InvalidArg(f"unsupported flags (0x{shown:x}) in function {function}")


# How libvirt prefixes a message of each kind when it prints it (virsh "error: ..." lines).
_DISPLAY_PREFIX = {
    1: "internal error: ", 3: "this function is not supported by the connection driver: ",
    8: "invalid argument: ", 9: "operation failed: ", 27: "XML error: ",
    29: "operation forbidden: ", 65: "Invalid secret: ", 66: "Secret not found: ",
    67: "unsupported configuration: ", 88: "access denied: ",
    92: "XML document failed to validate against schema: ",
}


def display(err: SecretError) -> str:
    if isinstance(err, ConfigError):
        return err.message
    return _DISPLAY_PREFIX.get(err.code, "") + err.message

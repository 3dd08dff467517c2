"""Error types: each carries libvirt's error code, its D-Bus error name and the prefix libvirt
puts before the message when it reports it (`Secret not found: no secret with matching uuid …`).

Messages follow libvirt's wording. No message may ever contain a secret value or key:
callers build messages only from UUIDs, usage ids, paths and flag numbers.
"""
from __future__ import annotations

from typing import ClassVar

from secretbus.core.model import SecretDef

DBUS_ERROR_PREFIX = "org.libvirt.Error."


class SecretError(Exception):
    """Base class of every error the project raises on purpose.

    `code` is libvirt's virErrorNumber, `kind` the last part of the D-Bus error name (the
    class name unless a subclass shares its parent's) and `prefix` libvirt's text for the
    code, which every front end puts before `message`. A subclass states them in its class
    line: `class NoSecret(SecretError, code=66, prefix="Secret not found: ")`.
    """

    code: ClassVar[int] = 1
    kind: ClassVar[str] = "InternalError"
    prefix: ClassVar[str] = "internal error: "

    def __init_subclass__(cls, *, code: int | None = None, prefix: str | None = None,
                          own_kind: bool = True, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if code is not None:
            cls.code = code
        if prefix is not None:
            cls.prefix = prefix
        if own_kind:
            cls.kind = cls.__name__

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def dbus_name(self) -> str:
        return DBUS_ERROR_PREFIX + self.kind

    def display(self) -> str:
        """The message as libvirt reports it: with its code's prefix."""
        return self.prefix + self.message


class NamesSecret(SecretError, own_kind=False):
    """A refusal whose text says what a caller may not be allowed to know of the secret
    `holder` (a usage clash's holder, a usage, why its files did not load). `hidden()` is the
    same refusal without it, for a caller that may not getattr `holder` (access/disclosure.py
    decides). Mixed into the error of libvirt's code: `class UsageClash(InternalError, NamesSecret)`."""

    holder: SecretDef

    def hidden(self) -> SecretError:
        raise NotImplementedError


# libvirt's names for the codes are in each docstring; virerror.c gives the prefixes.

class InternalError(SecretError):
    """VIR_ERR_INTERNAL_ERROR: what libvirt itself reports this way (usage clashes, malformed
    elements), and anything unexpected, which a front end answers without detail."""


class UsageClash(InternalError, NamesSecret, own_kind=False):
    """A define of `d` whose usage the secret `holder` (a UUID) holds: libvirt's text names
    that UUID. `holder` becomes that secret as polkit is asked about it (its UUID and the usage
    it shares with `d`)."""

    def __init__(self, holder: str, d: SecretDef):
        super().__init__(f"a secret with UUID {holder} is already defined for use with {d.usage_id}")
        self.holder = SecretDef(holder, usage_type=d.usage_type, usage_id=d.usage_id)

    def hidden(self) -> InternalError:
        return InternalError(f"another secret is already defined for use with {self.holder.usage_id}")


class UsageChange(InternalError, NamesSecret, own_kind=False):
    """A redefine that would change the usage id of the secret `holder`: libvirt's text names
    its current usage."""

    def __init__(self, holder: SecretDef):
        super().__init__(f"a secret with UUID {holder.uuid} is already defined for use with "
                         f"{holder.usage_id or '(null)'}")
        self.holder = holder

    def hidden(self) -> InternalError:
        return InternalError(f"a secret with UUID {self.holder.uuid} is already defined for another usage")


class NoSupport(SecretError, code=3, prefix="this function is not supported by the connection driver: "):
    """VIR_ERR_NO_SUPPORT"""


class InvalidArg(SecretError, code=8, prefix="invalid argument: "):
    """VIR_ERR_INVALID_ARG: argument types, URIs, SET_IDENTITY's parameters."""


class InvalidArgCheck(InvalidArg, prefix="", own_kind=False):
    """VIR_ERR_INVALID_ARG from libvirt's argument checks (virCheckFlags, virCheckNonNullArg,
    virCheckNonNegativeArg, virReportInvalidArg: flags, NULL values and usage ids, UUID
    strings, event ids): they call virRaiseErrorFull with their own text, so libvirt puts no
    "invalid argument: " before it (libvirtd 9.0, tests/test_libvirtd_diff.py). `function` and
    `argument` are what libvirt puts in str1 and str2 (None in one rebuilt from a reply)."""

    def __init__(self, message: str, *, function: str | None = None, argument: str | None = None):
        super().__init__(message)
        self.function, self.argument = function, argument


def arg_check(argument: str, function: str, rule: str) -> InvalidArgCheck:
    """libvirt's virCheck…Arg refusal: `ARGUMENT in FUNCTION RULE` ("must not be NULL")."""
    return InvalidArgCheck(f"{argument} in {function} {rule}", function=function, argument=argument)


class OperationFailed(SecretError, code=9, prefix="operation failed: "):
    """VIR_ERR_OPERATION_FAILED: the service cannot be reached or could not do what was asked
    for a reason outside the request (it is shutting down, a reply got lost)."""


class NotLoaded(OperationFailed, NamesSecret, own_kind=False):
    """A define of a UUID whose files are in the store but did not load: overwriting them is
    refused. The reason (a key missing, damage, a usage clash, which names another secret) is
    told to who may getattr the secret; `holder` is its definition if the XML was readable."""

    def __init__(self, holder: SecretDef, reason: str):
        super().__init__(f"secret {holder.uuid} exists in the store but could not be loaded ({reason}); "
                         "its files are left untouched until it loads")
        self.holder = holder

    def hidden(self) -> SecretError:
        return OperationFailed(f"secret {self.holder.uuid} exists in the store but could not be loaded; "
                               "its files are left untouched until it loads")


class LockHeld(OperationFailed, own_kind=False):
    """The instance's single-instance lock is held by another driver (its service, most
    often): the commands that open the instance themselves say what to do about it."""


class ChangedMeanwhile(OperationFailed, own_kind=False):
    """A write checked on one definition of its secret, which was replaced or redefined before
    the write could act (the driver's compare-and-set: nothing is done unchecked). The front
    ends look the secret up and check the write again on what it is now, up to `retries`
    times, before they answer this; libvirt, checking under the secret's lock, never
    refuses for it."""

    retries: ClassVar[int] = 2

    def __init__(self, uuid: str):
        super().__init__(f"secret {uuid} changed while the request was being authorised; try again")


class XMLError(SecretError, code=27, prefix="XML error: "):
    """VIR_ERR_XML_ERROR"""


class XMLRootError(XMLError, own_kind=False):
    """VIR_ERR_XML_ERROR of the root element check, which libvirt makes in its XML utilities
    (virxml.c), not in the secret parser: an RPC front end reports it from VIR_FROM_XML."""


class XMLDetail(XMLError, code=35, prefix=""):
    """VIR_ERR_XML_DETAIL: libxml2's own error, already framed as `NAME:LINE: MESSAGE`
    (virerror.c formats this code as the bare message). An XMLError to callers that catch
    XML problems as one."""


class OperationDenied(SecretError, code=29, prefix="operation forbidden: "):
    """VIR_ERR_OPERATION_DENIED: a read-only connection asked for a change."""


class SystemError(SecretError, code=38, prefix=""):   # libvirt's name; used as errors.SystemError
    """VIR_ERR_SYSTEM_ERROR: the message already names the failing call (libvirt adds no prefix)."""


class RPCError(SecretError, code=39, prefix=""):
    """VIR_ERR_RPC: a limit of libvirt's wire protocol (virerror.c formats it as the bare
    message, like VIR_ERR_SYSTEM_ERROR; "RPC error" is only its text when there is no message)."""


class InvalidSecret(SecretError, code=65, prefix="Invalid secret: "):
    """VIR_ERR_INVALID_SECRET: a private value asked for."""


class NoSecret(SecretError, code=66, prefix="Secret not found: "):
    """VIR_ERR_NO_SECRET: no secret with that UUID or usage, or no value set yet."""


class ConfigUnsupported(SecretError, code=67, prefix="unsupported configuration: "):
    """VIR_ERR_CONFIG_UNSUPPORTED"""


class AccessDenied(SecretError, code=88, prefix="access denied: "):
    """VIR_ERR_ACCESS_DENIED: polkit (or the bus policy) said no, or could not be asked; the
    message names the permission as libvirt does."""


class XMLInvalidSchema(SecretError, code=92, prefix="XML document failed to validate against schema: "):
    """VIR_ERR_XML_INVALID_SCHEMA (made in libvirt's XML utilities, so VIR_FROM_XML over RPC)"""


class InvalidEncrKey(SecretError, code=114, prefix=""):
    """VIR_ERR_INVALID_ENCR_KEY_SECRET, added by libvirt 12.1 after 110 MULTIPLE_DOMAINS,
    111 NO_NETWORK_METADATA, 112 AGENT_COMMAND_TIMEOUT and 113 AGENT_COMMAND_FAILED."""


class ConfigError(ConfigUnsupported, prefix="", own_kind=False):
    """A secret.conf or key problem found at start-up or reload. It travels as libvirt's
    VIR_ERR_CONFIG_UNSUPPORTED; its message already says "<file>:<line>: what", so no prefix."""


def _kinds(base: type[SecretError]) -> list[type[SecretError]]:
    """Every class below `base` with a D-Bus name of its own: ConfigError shares
    ConfigUnsupported's, and InternalError stands for the base class's."""
    out = []
    for c in base.__subclasses__():
        if c.kind != base.kind:
            out.append(c)
        out += _kinds(c)
    return out


def _unprefixed(base: type[SecretError]) -> dict[str, type[SecretError]]:
    """kind -> the class of that kind whose texts carry no prefix, where its kind's has one
    (ConfigError, InvalidArgCheck)."""
    out = {}
    for c in base.__subclasses__():
        if not c.prefix and c.kind == base.kind and base.prefix:
            out[c.kind] = c
        out.update(_unprefixed(c))
    return out


ALL_ERRORS: tuple[type[SecretError], ...] = (InternalError, *_kinds(SecretError))
BY_DBUS_NAME: dict[str, type[SecretError]] = {DBUS_ERROR_PREFIX + c.kind: c for c in ALL_ERRORS}
_UNPREFIXED = _unprefixed(SecretError)


def rebuild(cls: type[SecretError], text: str) -> SecretError:
    """The exception of `cls`'s kind for `text` as a server's `display()` made it: without the
    prefix it starts with, or, when it has none, of the kind's class without one, so that
    `display()` gives `text` back (libvirt's own argument checks have no prefix)."""
    if cls.prefix:
        if text.startswith(cls.prefix):
            return cls(text[len(cls.prefix):])
        cls = _UNPREFIXED.get(cls.kind, cls)
    return cls(text)


def from_dbus(name: str, text: str) -> SecretError:
    """Rebuild the project's exception from a D-Bus error reply (`text` as `display()` made it)."""
    return rebuild(BY_DBUS_NAME.get(name, OperationFailed), text)


def display(err: SecretError) -> str:
    return err.display()


def unsupported_flags(flags: int, supported: int, function: str) -> None:
    extra = flags & ~supported
    if flags < 0 or extra:
        # Negative numbers are shown as the C unsigned int they would be.
        shown = extra if flags >= 0 else extra & 0xFFFFFFFF
        raise InvalidArgCheck(f"unsupported flags (0x{shown:x}) in function {function}",
                              function=function, argument="flags")

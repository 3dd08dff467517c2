"""`remote_error` bodies as libvirt fills them: code, domain, the message with its prefix,
str1 the format ("Secret not found: %s") and str2 the detail (virerror.c, research §1.3).

The driver's errors (core/errors.py) keep their code and prefix; the domain is VIR_FROM_SECRET
unless the error is the protocol's own. Texts are built from the error's message only, which
by the project's rule never carries a value.
"""
from __future__ import annotations

from typing import Any

from secretbus.core import errors
from secretbus.rpc import protocol as P


class RemoteFailure(Exception):
    """An error reply decided by the RPC layer itself: its own code and domain."""

    def __init__(self, code: int, domain: int, message: str, prefix: str = ""):
        super().__init__(prefix + message)
        self.code, self.domain, self.message, self.prefix = code, domain, message, prefix


def rpc_failure(message: str) -> RemoteFailure:
    """VIR_ERR_RPC from VIR_FROM_RPC: unknown procedure, undecodable payload, bad program…"""
    return RemoteFailure(errors.RPCError.code, P.FROM_RPC, message)


def unknown_procedure(proc: int) -> RemoteFailure:
    """What libvirt answers for a procedure it does not serve (clients turn it into NoSupport)."""
    return rpc_failure(f"unknown procedure: {proc}")


def daemon_internal(message: str, domain: int = P.FROM_RPC) -> RemoteFailure:
    """VIR_ERR_INTERNAL_ERROR raised by libvirt's remote dispatcher (VIR_FROM_RPC), or by its
    generic driver code (`domain` VIR_FROM_NONE: virConnectValidateURIPath)."""
    return RemoteFailure(errors.InternalError.code, domain, message, errors.InternalError.prefix)


def not_open(secret: bool = False) -> RemoteFailure:
    """A call before CONNECT_OPEN: remoteGetSecretConn's text for a secret procedure,
    remoteGetHypervisorConn's for the others."""
    return daemon_internal("connection not open" if secret else "hypervisor connection not open")


AUTH_FAILED = 45                 # VIR_ERR_AUTH_FAILED
AUTH_FAILED_PREFIX = "authentication failed: "
NO_CONNECT = 5                   # VIR_ERR_NO_CONNECT
NO_CONNECT_PREFIX = "no connection driver available for "

_DOMAIN = {errors.RPCError: P.FROM_RPC, errors.AccessDenied: P.FROM_ACCESS,
           errors.XMLRootError: P.FROM_XML, errors.XMLInvalidSchema: P.FROM_XML}


def error_body(e: BaseException) -> dict[str, Any]:
    if isinstance(e, RemoteFailure):
        code, domain, prefix, detail = e.code, e.domain, e.prefix, e.message
    elif isinstance(e, errors.SecretError):
        code, domain, prefix, detail = e.code, _DOMAIN.get(type(e), P.FROM_SECRET), e.prefix, e.message
    else:
        # Unexpected: the caller learns nothing of it (the text could quote an argument).
        code, domain, prefix, detail = errors.InternalError.code, P.FROM_SECRET, errors.InternalError.prefix, \
            "unexpected failure"
    str1, str2, ints = prefix + "%s", detail, -1
    if isinstance(e, errors.InvalidArgCheck) and e.function is not None and e.argument is not None:
        # virReportInvalidArg (virCheckFlags, virCheckNonNullArg…): str1 the function, str2
        # the argument's name, int1 and int2 0 (virerror.h; libvirtd 9.0)
        str1, str2, ints = e.function, e.argument, 0
    return {
        "code": code, "domain": domain, "message": prefix + detail, "level": P.ERR_LEVEL_ERROR,
        "dom": None, "str1": str1, "str2": str2, "str3": None,
        "int1": ints, "int2": ints, "net": None,
    }

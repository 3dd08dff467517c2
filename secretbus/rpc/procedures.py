"""The procedures this server answers, with libvirt's semantics (research §2.1, §1.4, §4.2).

Each entry of `Procedures.table()` says when it may run (before authentication, before
CONNECT_OPEN), whether it writes (then it runs in the writer thread, so fsync never stalls
the loop) and which public API a read-only connection is refused. The driver's rules and
errors are the same as on D-Bus: every argument goes through the driver's own checks.
"""
from __future__ import annotations

import logging
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from secretbus.core import errors
from secretbus.core.model import LIBVIRT_COMPAT
from secretbus.driver import rules
from secretbus.driver.driver import SecretDriver
from secretbus.rpc import protocol as P
from secretbus.rpc.events import EventHub, EventSink, wire_secret
from secretbus.rpc.failures import (
    AUTH_FAILED,
    AUTH_FAILED_PREFIX,
    NO_CONNECT,
    NO_CONNECT_PREFIX,
    RemoteFailure,
    daemon_internal,
    rpc_failure,
)
from secretbus.rpc.identity import Identity, SystemToken, parse_params
from secretbus.rpc.session import Session

log = logging.getLogger("secretbus.rpc")

CONNECT_RO = 1                # VIR_CONNECT_RO in CONNECT_OPEN's flags


class Client(EventSink, Protocol):
    session: Session


Fn = Callable[[Client, Any], Any]


@dataclass(frozen=True)
class Handler:
    fn: Fn
    pre_auth: bool = False          # AUTH_*: allowed before authentication
    pre_open: bool = False          # allowed before CONNECT_OPEN
    writes: bool = False            # runs in the writer thread
    denied_readonly: str | None = None   # the public API a read-only connection is refused


def _uuid(handle: dict[str, Any]) -> str:
    """A secret handle names its secret by UUID only; usageType/usageID are ignored, as in libvirt."""
    return str(uuidlib.UUID(bytes=handle["uuid"]))


def _not_offered(_c: Client, _a: Any) -> Any:
    raise RemoteFailure(AUTH_FAILED, P.FROM_RPC, "SASL authentication is not offered by this server",
                        AUTH_FAILED_PREFIX)


class Procedures:
    def __init__(self, driver: SecretDriver, hub: EventHub, token: SystemToken, *, system: bool):
        self.driver = driver
        self.hub = hub
        self.token = token
        self.system = system
        self.uri = "secret:///system" if system else "secret:///session"

    def table(self) -> dict[int, Handler]:
        Pr = P.Proc
        return {
            Pr.AUTH_LIST: Handler(self.auth_list, pre_auth=True, pre_open=True),
            Pr.AUTH_POLKIT: Handler(self.auth_polkit, pre_auth=True, pre_open=True),
            Pr.AUTH_SASL_INIT: Handler(_not_offered, pre_auth=True, pre_open=True),
            Pr.AUTH_SASL_START: Handler(_not_offered, pre_auth=True, pre_open=True),
            Pr.AUTH_SASL_STEP: Handler(_not_offered, pre_auth=True, pre_open=True),
            Pr.CONNECT_OPEN: Handler(self.connect_open, pre_open=True),
            Pr.CONNECT_CLOSE: Handler(self.connect_close, pre_open=True),
            Pr.CONNECT_SUPPORTS_FEATURE: Handler(self.supports_feature, pre_open=True),
            Pr.CONNECT_GET_TYPE: Handler(lambda c, a: {"type": "secret"}),
            Pr.CONNECT_GET_URI: Handler(lambda c, a: {"uri": self.uri}),
            Pr.CONNECT_IS_SECURE: Handler(lambda c, a: {"secure": 1}),   # a local unix socket
            Pr.CONNECT_GET_LIB_VERSION: Handler(lambda c, a: {"lib_ver": LIBVIRT_COMPAT}),
            Pr.CONNECT_GET_VERSION: Handler(self._no_support("virConnectGetVersion")),
            Pr.CONNECT_GET_HOSTNAME: Handler(self._no_support("virConnectGetHostname")),
            Pr.CONNECT_REGISTER_CLOSE_CALLBACK: Handler(self.register_close_callback),
            Pr.CONNECT_UNREGISTER_CLOSE_CALLBACK: Handler(self.unregister_close_callback),
            Pr.CONNECT_SET_IDENTITY: Handler(self.set_identity),
            Pr.CONNECT_NUM_OF_SECRETS: Handler(lambda c, a: {"num": len(self.driver.list_secrets(0))}),
            Pr.CONNECT_LIST_SECRETS: Handler(self.list_secrets),
            Pr.CONNECT_LIST_ALL_SECRETS: Handler(self.list_all_secrets),
            Pr.SECRET_LOOKUP_BY_UUID: Handler(
                lambda c, a: {"secret": wire_secret(self.driver.lookup_by_uuid(str(uuidlib.UUID(bytes=a["uuid"]))))}),
            Pr.SECRET_LOOKUP_BY_USAGE: Handler(
                lambda c, a: {"secret": wire_secret(self.driver.lookup_by_usage(a["usageType"], a["usageID"]))}),
            Pr.SECRET_DEFINE_XML: Handler(
                lambda c, a: {"secret": wire_secret(self.driver.define_xml(a["xml"], a["flags"]))},
                writes=True, denied_readonly="virSecretDefineXML"),
            Pr.SECRET_GET_XML_DESC: Handler(
                lambda c, a: {"xml": self.driver.get_xml_desc(_uuid(a["secret"]), a["flags"])}),
            Pr.SECRET_SET_VALUE: Handler(self.set_value, writes=True, denied_readonly="virSecretSetValue"),
            Pr.SECRET_GET_VALUE: Handler(self.get_value, denied_readonly="virSecretGetValue"),
            Pr.SECRET_UNDEFINE: Handler(lambda c, a: self.driver.undefine(_uuid(a["secret"])),
                                        writes=True, denied_readonly="virSecretUndefine"),
            Pr.CONNECT_SECRET_EVENT_REGISTER_ANY: Handler(self.event_register),
            Pr.CONNECT_SECRET_EVENT_DEREGISTER_ANY: Handler(self.event_deregister),
        }

    # -- authentication -------------------------------------------------------------
    def auth_list(self, c: Client, _a: Any) -> Any:
        s = c.session
        if s.trusted:
            s.authenticated = True
            return {"types": [P.AuthType.NONE]}
        return {"types": [P.AuthType.POLKIT]}

    def auth_polkit(self, c: Client, _a: Any) -> Any:
        s = c.session
        if s.trusted:
            s.authenticated = True
            return {"complete": 1}
        # This increment serves uid 0 (and the session's own user) only: polkit's
        # unix-process check for other users comes next. Fail closed, with a clear reason.
        raise RemoteFailure(
            AUTH_FAILED, P.FROM_POLKIT,
            f"uid {s.peer.uid} may not use this socket: secretbusd's RPC front end serves only root "
            "on the system instance (polkit authentication of other users is not implemented yet)",
            AUTH_FAILED_PREFIX)

    # -- the connection -------------------------------------------------------------
    def connect_open(self, c: Client, a: Any) -> Any:
        s = c.session
        if s.opened:
            # libvirt's quirk: the refused second open also closes the first.
            self._close(c)
            raise daemon_internal("connection already open")
        self._check_name(a["name"])
        s.opened = True
        s.open_readonly = bool(a["flags"] & CONNECT_RO)
        return None

    def _check_name(self, name: str | None) -> None:
        if name is None:
            return          # no URI: the client probes, then asks GET_URI
        u = urlsplit(name)
        if u.scheme != "secret" or u.netloc:
            raise RemoteFailure(NO_CONNECT, P.FROM_NONE, name, NO_CONNECT_PREFIX)
        want = urlsplit(self.uri).path
        if u.path != want:
            # Unknown query parameters are accepted, as libvirt does.
            raise errors.InternalError(f"unexpected secret URI path '{u.path}', try {self.uri}")

    def connect_close(self, c: Client, _a: Any) -> Any:
        self._close(c)
        return None

    def _close(self, c: Client) -> None:
        self.hub.drop(c, c.session.callbacks)
        c.session.callbacks.clear()
        c.session.close_driver_connection()

    def supports_feature(self, c: Client, a: Any) -> Any:
        feature = a["feature"]
        if feature == P.Feature.PROGRAM_KEEPALIVE:
            c.session.keepalive = True        # the server pings it from now on
            return {"supported": 1}
        if feature in (P.Feature.REMOTE_EVENT_CALLBACK, P.Feature.REMOTE_CLOSE_CALLBACK):
            return {"supported": 1}
        if not c.session.opened:
            raise daemon_internal("hypervisor connection not open")
        return {"supported": 0}

    def register_close_callback(self, c: Client, _a: Any) -> Any:
        c.session.close_callback = True
        return None

    def unregister_close_callback(self, c: Client, _a: Any) -> Any:
        c.session.close_callback = False
        return None

    @staticmethod
    def _no_support(api: str) -> Fn:
        def fn(_c: Client, _a: Any) -> Any:
            raise RemoteFailure(errors.NoSupport.code, P.FROM_DOMAIN, api, errors.NoSupport.prefix)
        return fn

    # -- listing ----------------------------------------------------------------------
    def list_secrets(self, c: Client, a: Any) -> Any:
        maxuuids = a["maxuuids"]
        if maxuuids > P.REMOTE_SECRET_LIST_MAX:
            raise rpc_failure("maxuuids > REMOTE_SECRET_LIST_MAX")
        if maxuuids < 0:
            raise errors.InvalidArg("maxuuids in virConnectListSecrets must be greater than or equal to 0")
        return {"uuids": [d.uuid for d in self.driver.list_secrets(0)[:maxuuids]]}

    def list_all_secrets(self, c: Client, a: Any) -> Any:
        defs = self.driver.list_secrets(a["flags"])
        if len(defs) > P.REMOTE_SECRET_LIST_MAX:
            raise rpc_failure(f"Too many secrets '{len(defs)}' for limit '{P.REMOTE_SECRET_LIST_MAX}'")
        return {"secrets": [wire_secret(d) for d in defs] if a["need_results"] else [], "ret": len(defs)}

    # -- values -----------------------------------------------------------------------
    def set_value(self, c: Client, a: Any) -> Any:
        if not a["value"]:
            # XDR decodes an empty opaque as NULL; libvirt 9.0 refuses it so (verified).
            raise errors.InvalidArg("value in virSecretSetValue must not be NULL")
        self.driver.set_value(_uuid(a["secret"]), a["value"], a["flags"])
        return None

    def get_value(self, c: Client, a: Any) -> Any:
        s = c.session
        uuid = _uuid(a["secret"])
        rules.check_get_value_flags(a["flags"])        # flags first, as the driver checks them
        d = self.driver.lookup_by_uuid(uuid)
        value = self.driver.get_value(uuid, 0, internal_call=s.elevated)
        if s.elevated and s.identity is not None and d.private:
            log.info("private value of secret %s returned to an elevated identity (%s) of peer pid %d",
                     uuid, s.identity.describe(), s.peer.pid,
                     extra={"SECRET_UUID": uuid, "SECRET_OPERATION": "get-value"})
        return {"value": value}

    # -- identity ---------------------------------------------------------------------
    def set_identity(self, c: Client, a: Any) -> Any:
        """Only root peers (libvirt's own daemons) may act for someone else."""
        s = c.session
        if s.peer.uid != 0:
            raise errors.AccessDenied("only a root peer may set the identity of a connection")
        errors.unsupported_flags(a["flags"], 0, "virConnectSetIdentity")
        fields = parse_params(a["params"])
        offered = fields.pop("system.token", None)
        elevated = offered is not None and self.token.matches(offered)
        s.identity = Identity(fields, elevated)
        return None

    # -- events -----------------------------------------------------------------------
    def event_register(self, c: Client, a: Any) -> Any:
        secret = a["secret"]
        cb = self.hub.register(c, a["eventID"], _uuid(secret) if secret is not None else None)
        c.session.callbacks.add(cb)
        return {"callbackID": cb}

    def event_deregister(self, c: Client, a: Any) -> Any:
        cb = a["callbackID"]
        if cb not in c.session.callbacks:
            raise rpc_failure(f"callbackID {cb} not registered")
        self.hub.deregister(c, cb)
        c.session.callbacks.discard(cb)
        return None

"""The procedures this server answers, with libvirt's semantics (research §2.1, §1.4, §4.2).

Each entry of `Procedures.table()` says when it may run (before authentication, before
CONNECT_OPEN), whether it writes (then it returns the act that submits the write to the
driver, whose I/O thread commits it, so fsync never stalls the loop) and which public API a
read-only connection is refused. The driver's rules and errors are the same as on D-Bus:
every argument goes through the driver's own checks. Access checks (guard.py) come in
libvirt's order: flags, then the lookup, then the ACL; a handler of a checked connection
returns a coroutine that the connection awaits.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from secretbus.access.permissions import Perm, redefine_checks
from secretbus.core import errors
from secretbus.core.model import LIBVIRT_COMPAT, SecretDef
from secretbus.core.secretxml import format_secret_xml
from secretbus.driver import rules
from secretbus.driver.driver import ANY, SecretDriver
from secretbus.driver.writer import outcome, until_unchanged
from secretbus.rpc import protocol as P
from secretbus.rpc import remote_auth
from secretbus.rpc.events import EventHub, EventSink
from secretbus.rpc.failures import (
    AUTH_FAILED,
    AUTH_FAILED_PREFIX,
    NO_CONNECT,
    NO_CONNECT_PREFIX,
    RemoteFailure,
    daemon_internal,
    not_open,
    rpc_failure,
)
from secretbus.rpc.guard import Guard
from secretbus.rpc.handles import PackedHandles, PerDefinition, uuid_text, wire_secret
from secretbus.rpc.identity import Identity, SystemToken, parse_params
from secretbus.rpc.session import Session
from secretbus.rpc.xdr import Encoded, encode

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
    writes: bool = False            # returns (or its coroutine returns) the act that submits the write
    denied_readonly: str | None = None   # the public API a read-only connection is refused
    secret: bool = False            # a secret driver's procedure (before CONNECT_OPEN: "connection not open")
    closes: bool = False            # the connection is closed once it is answered (CONNECT_CLOSE)


def _none(_: None) -> None:
    return None


def _value_reply(value: bytes) -> Any:
    """GetValue's reply (a struct of the one opaque) packed in one step, a third of the codec's
    cost; the codec, whose bound refuses it, for a value over the protocol's maximum."""
    n = len(value)
    if n > P.REMOTE_SECRET_VALUE_MAX:
        return {"value": value}
    return Encoded(n.to_bytes(4, "big") + value + _PAD[-n % 4])


_PAD = (b"", b"\0", b"\0\0", b"\0\0\0")


def _uuid(handle: dict[str, Any]) -> str:
    """A secret handle names its secret by UUID only; usageType/usageID are ignored, as in libvirt."""
    return uuid_text(handle["uuid"])


class Procedures:
    def __init__(self, driver: SecretDriver, hub: EventHub, token: SystemToken, *, system: bool,
                 guard: Guard | None = None):
        self.driver = driver
        self.hub = hub
        self.token = token
        self.system = system
        self.guard = guard or Guard(system=system)
        self.uri = "secret:///system" if system else "secret:///session"
        self.handles = PackedHandles(lambda: self.driver.count())
        # GetXMLDesc's reply, formatted and packed once per definition (flags are always 0).
        self.xml_replies = PerDefinition(lambda: self.driver.count(), self._xml_reply)
        # The driver keeps what these derive from a listing until the table changes
        # (list_view: one long-lived function each, it is part of the cache key).
        self._derive_list = self._packed_list
        self._derive_uuids = self._uuid_list

    def table(self) -> dict[int, Handler]:
        Pr = P.Proc
        return {
            Pr.AUTH_LIST: Handler(self.auth_list, pre_auth=True, pre_open=True),
            Pr.AUTH_POLKIT: Handler(self.auth_polkit, pre_auth=True, pre_open=True),
            Pr.AUTH_SASL_INIT: Handler(remote_auth.sasl_init, pre_auth=True, pre_open=True),
            Pr.AUTH_SASL_START: Handler(remote_auth.sasl_start, pre_auth=True, pre_open=True),
            Pr.AUTH_SASL_STEP: Handler(self._sasl_step, pre_auth=True, pre_open=True),
            Pr.CONNECT_OPEN: Handler(self.connect_open, pre_open=True),
            Pr.CONNECT_CLOSE: Handler(self.connect_close, pre_open=True, closes=True),
            Pr.CONNECT_SUPPORTS_FEATURE: Handler(self.supports_feature, pre_open=True),
            # @acl: connect:getattr (remote_protocol.x), as every connection-level call below
            # unless it says otherwise; IS_SECURE, CLOSE and the AUTH_* have none.
            Pr.CONNECT_GET_TYPE: Handler(self._connect_getattr("get-type", lambda: {"type": "secret"})),
            Pr.CONNECT_GET_URI: Handler(self._connect_getattr("get-uri", lambda: {"uri": self.uri})),
            Pr.CONNECT_IS_SECURE: Handler(lambda c, a: {"secure": 1}),   # a local unix socket
            Pr.CONNECT_GET_LIB_VERSION: Handler(
                self._connect_getattr("get-lib-version", lambda: {"lib_ver": LIBVIRT_COMPAT})),
            Pr.CONNECT_GET_VERSION: Handler(self._no_support("virConnectGetVersion")),
            Pr.CONNECT_GET_HOSTNAME: Handler(self._no_support("virConnectGetHostname")),
            Pr.CONNECT_REGISTER_CLOSE_CALLBACK: Handler(self.register_close_callback),
            Pr.CONNECT_UNREGISTER_CLOSE_CALLBACK: Handler(self.unregister_close_callback),
            Pr.CONNECT_SET_IDENTITY: Handler(self.set_identity),
            Pr.CONNECT_NUM_OF_SECRETS: Handler(self.num_of_secrets, secret=True),
            Pr.CONNECT_LIST_SECRETS: Handler(self.list_secrets, secret=True),
            Pr.CONNECT_LIST_ALL_SECRETS: Handler(self.list_all_secrets, secret=True),
            Pr.SECRET_LOOKUP_BY_UUID: Handler(
                lambda c, a: self._found(c, self.driver.lookup_by_uuid(uuid_text(a["uuid"]))), secret=True),
            Pr.SECRET_LOOKUP_BY_USAGE: Handler(
                lambda c, a: self._found(c, self.driver.lookup_by_usage(a["usageType"], a["usageID"])), secret=True),
            Pr.SECRET_DEFINE_XML: Handler(self.define_xml, writes=True, denied_readonly="virSecretDefineXML",
                                          secret=True),
            Pr.SECRET_GET_XML_DESC: Handler(self.get_xml_desc, secret=True),
            Pr.SECRET_SET_VALUE: Handler(self.set_value, writes=True, denied_readonly="virSecretSetValue", secret=True),
            Pr.SECRET_GET_VALUE: Handler(self.get_value, denied_readonly="virSecretGetValue", secret=True),
            Pr.SECRET_UNDEFINE: Handler(self.undefine, writes=True, denied_readonly="virSecretUndefine", secret=True),
            Pr.CONNECT_SECRET_EVENT_REGISTER_ANY: Handler(self.event_register, secret=True),
            Pr.CONNECT_SECRET_EVENT_DEREGISTER_ANY: Handler(self.event_deregister, secret=True),
        }

    # -- authentication -------------------------------------------------------------
    def auth_list(self, c: Client, _a: Any) -> Any:
        s = c.session
        if s.sasl is not None and not s.authenticated:
            # auth_tls = "sasl", or auth_unix_* = "sasl": root peers too (libvirt bypasses polkit
            # for uid 0, never SASL).
            return {"types": [P.AuthType.SASL]}
        if s.trusted or s.authenticated:
            # A root peer under polkit, auth_unix_* = "none", a TLS caller authenticated by its
            # certificate (auth_tls = "none"), or after AUTH_POLKIT / SASL, as libvirtd answers.
            s.authenticated = True
            return {"types": [P.AuthType.NONE]}
        return {"types": [P.AuthType.POLKIT]}

    def _sasl_step(self, c: Client, a: Any) -> Any:
        return remote_auth.sasl_step(c, a, self.guard.remote)

    def auth_polkit(self, c: Client, _a: Any) -> Any:
        s = c.session
        if s.sasl is not None and not s.authenticated:
            # libvirt: "client tried invalid PolicyKit init request" (SASL is this socket's auth).
            raise RemoteFailure(AUTH_FAILED, P.FROM_RPC, "authentication failed", AUTH_FAILED_PREFIX)
        if s.trusted or s.authenticated:
            s.authenticated = True
            return {"complete": 1}
        if not self.system:
            # The session instance serves its own user only (its socket is 0600 anyway).
            raise RemoteFailure(AUTH_FAILED, P.FROM_POLKIT,
                                f"uid {s.peer.uid} may not use this user's session instance", AUTH_FAILED_PREFIX)
        return self.guard.authenticate(s)

    # -- the connection -------------------------------------------------------------
    def _connect_getattr(self, operation: str, answer: Callable[[], Any]) -> Fn:
        return lambda c, _a: self.guard.then(c, [(Perm.CONNECT_GETATTR, None)], operation, answer)

    def connect_open(self, c: Client, a: Any) -> Any:
        s = c.session
        if s.opened:
            # libvirt's quirk: the refused second open also closes the first.
            self._close(c)
            raise daemon_internal("connection already open")
        self._check_name(a["name"])
        readonly = bool(a["flags"] & CONNECT_RO)

        def opened() -> None:
            s.opened = True
            s.open_readonly = readonly
        # secretConnectOpen's connect:getattr, after the URI check as there; a refusal leaves
        # the connection unopened.
        return self.guard.then(c, [(Perm.CONNECT_GETATTR, None)], "open", opened)

    def _check_name(self, name: str | None) -> None:
        if name is None:
            return          # no URI: the client probes, then asks GET_URI
        u = urlsplit(name)
        if u.scheme != "secret" or u.netloc:
            # libvirt shows an empty name as NULL: "<null>" (libvirtd 9.0)
            raise RemoteFailure(NO_CONNECT, P.FROM_NONE, name or "<null>", NO_CONNECT_PREFIX)
        want = urlsplit(self.uri).path
        if u.path != want:
            # Unknown query parameters are accepted, as libvirt does. The check is
            # virConnectValidateURIPath's (src/driver.c), from VIR_FROM_NONE.
            raise daemon_internal(f"unexpected secret URI path '{u.path}', try {self.uri}", P.FROM_NONE)

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
        if not c.session.opened:
            # remoteDispatchConnectSupportsFeature asks for the connection before the rest
            raise not_open()
        if feature in (P.Feature.FD_PASSING, P.Feature.REMOTE_EVENT_CALLBACK, P.Feature.REMOTE_CLOSE_CALLBACK):
            return {"supported": 1}         # answered by libvirt's dispatcher itself, unchecked
        # Any other feature is the driver's question: connect:getattr.
        return self.guard.then(c, [(Perm.CONNECT_GETATTR, None)], "supports-feature", lambda: {"supported": 0})

    def register_close_callback(self, c: Client, _a: Any) -> Any:
        def act() -> None:
            c.session.close_callback = True
        return self.guard.then(c, [(Perm.CONNECT_GETATTR, None)], "register-close-callback", act)

    def unregister_close_callback(self, c: Client, _a: Any) -> Any:
        def act() -> None:
            c.session.close_callback = False
        return self.guard.then(c, [(Perm.CONNECT_GETATTR, None)], "unregister-close-callback", act)

    @staticmethod
    def _no_support(api: str) -> Fn:
        def fn(_c: Client, _a: Any) -> Any:
            raise RemoteFailure(errors.NoSupport.code, P.FROM_DOMAIN, api, errors.NoSupport.prefix)
        return fn

    # -- lookups and XML ----------------------------------------------------------------
    def _found(self, c: Client, d: SecretDef) -> Any:
        # The lookups' reply struct is the handle alone, so its packed handle is the reply.
        if not self.guard.checked(c.session):
            return self.handles.handle(d)
        return self.guard.then(c, [(Perm.GETATTR, d)], "lookup", lambda: self.handles.handle(d))

    def get_xml_desc(self, c: Client, a: Any) -> Any:
        rules.check_xml_desc_flags(a["flags"])
        uuid = _uuid(a["secret"])
        d = self.driver.lookup_by_uuid(uuid)
        if not self.guard.checked(c.session):
            return self.xml_replies.get(d)          # no check to wait for: d is the one now
        # The definition now (it may have changed or gone while the check ran), as the driver's
        # get_xml_desc would read it.
        return self.guard.then(c, [(Perm.READ, d)], "get-xml-desc",
                               lambda: self.xml_replies.get(self.driver.lookup_by_uuid(uuid)))

    @staticmethod
    def _xml_reply(d: SecretDef) -> Encoded:
        return Encoded(encode(P.PROCS[P.Proc.SECRET_GET_XML_DESC].ret, {"xml": format_secret_xml(d)}))

    # -- listing ----------------------------------------------------------------------
    # An unchecked connection (root, the session's user) gets the driver's cached listing;
    # a checked one the secrets it may getattr, packed from the per-definition cache.
    def num_of_secrets(self, c: Client, _a: Any) -> Any:
        if not self.guard.checked(c.session):
            return {"num": self.driver.count()}
        return self.guard.listing(c, self.driver.list_secrets, lambda defs: {"num": len(defs)})

    def _uuid_list(self, defs: list[SecretDef]) -> list[str]:
        return [d.uuid for d in defs]

    def list_secrets(self, c: Client, a: Any) -> Any:
        maxuuids = a["maxuuids"]
        if maxuuids > P.REMOTE_SECRET_LIST_MAX:
            raise rpc_failure("maxuuids > REMOTE_SECRET_LIST_MAX")
        if maxuuids < 0:
            raise rpc_failure("maxuuids must be non-negative")    # the dispatcher's check (libvirtd 9.0)
        if not self.guard.checked(c.session):
            return {"uuids": self.driver.list_view(0, self._derive_uuids)[:maxuuids]}
        return self.guard.listing(c, self.driver.list_secrets,
                                  lambda defs: {"uuids": [d.uuid for d in defs[:maxuuids]]})

    def _packed_list(self, defs: list[SecretDef]) -> tuple[int, Encoded | None]:
        """(count, the packed array, None when over the protocol's maximum)."""
        return len(defs), self._array(defs)

    def _array(self, defs: Sequence[SecretDef]) -> Encoded | None:
        return self.handles.array(defs) if len(defs) <= P.REMOTE_SECRET_LIST_MAX else None

    @staticmethod
    def _list_reply(n: int, array: Encoded | None, need_results: int) -> Any:
        if not need_results:
            return {"secrets": [], "ret": n}
        if array is None:
            raise rpc_failure(f"Too many secrets '{n}' for limit '{P.REMOTE_SECRET_LIST_MAX}'")
        return {"secrets": array, "ret": n}

    def list_all_secrets(self, c: Client, a: Any) -> Any:
        need = a["need_results"]
        if not self.guard.checked(c.session):
            n, array = self.driver.list_view(a["flags"], self._derive_list)
            return self._list_reply(n, array, need)
        flags = a["flags"]
        rules.check_list_flags(flags)          # bad flags are refused before any check, as before
        return self.guard.listing(c, lambda: self.driver.list_secrets(flags),
                                  lambda defs: self._list_reply(len(defs), self._array(defs) if need else None, need))

    # -- writes: each returns the act that submits it to the driver (on the loop, once the
    # checks passed) and returns an awaitable of the reply ----------------------------------
    def _expect(self, c: Client, d: SecretDef | None) -> SecretDef | None | object:
        """A checked write acts only on the definition its checks saw (compare-and-set)."""
        return d if self.guard.checked(c.session) else ANY

    def _retried(self, c: Client, once: Callable[[], Any]) -> Any:
        """`once()`: a write looked up, checked and acted on. A checked one is done again on
        its secret as it is now if the secret was redefined while it was checked (the driver
        refuses to act on a definition nobody checked; driver/writer.py until_unchanged), as on
        D-Bus. The first attempt too runs in the connection's task for the call."""
        if not self.guard.checked(c.session):
            return once()

        async def attempt() -> Any:
            act = await once()
            return await act()
        return lambda: until_unchanged(attempt(), attempt)

    def define_xml(self, c: Client, a: Any) -> Any:
        def once() -> Any:
            d = self.driver.parse_definition(a["xml"], a["flags"])   # flags, size and parse: the driver's rules
            old = self.driver.find(d.uuid)
            expect = self._expect(c, old)

            def act() -> Any:     # its refusal may name another secret: told as the guard allows
                return self.guard.disclosing(c.session, outcome(self.driver.submit_define(d, expect=expect),
                                                                lambda nd: {"secret": wire_secret(nd)}))
            return self.guard.then(c, [(Perm.WRITE, d), (Perm.SAVE, d), *redefine_checks(old, d)], "define",
                                   lambda: act)
        return self._retried(c, once)

    def set_value(self, c: Client, a: Any) -> Any:
        if not a["value"]:
            # XDR decodes an empty opaque as NULL; libvirt 9.0 refuses it so (verified).
            raise errors.arg_check("value", "virSecretSetValue", "must not be NULL")
        rules.check_set_value_flags(a["flags"])
        uuid, value, flags = _uuid(a["secret"]), a["value"], a["flags"]

        def once() -> Any:
            d = self.driver.lookup_by_uuid(uuid)
            expect = self._expect(c, d)
            return self.guard.then(c, [(Perm.WRITE, d)], "set-value",
                                   lambda: lambda: outcome(self.driver.submit_set_value(uuid, value, flags,
                                                                                        expect=expect), _none))
        return self._retried(c, once)

    def undefine(self, c: Client, a: Any) -> Any:
        uuid = _uuid(a["secret"])

        def once() -> Any:
            d = self.driver.lookup_by_uuid(uuid)
            expect = self._expect(c, d)
            return self.guard.then(c, [(Perm.DELETE, d)], "undefine",
                                   lambda: lambda: outcome(self.driver.submit_undefine(uuid, expect=expect), _none))
        return self._retried(c, once)

    # -- values -----------------------------------------------------------------------
    def get_value(self, c: Client, a: Any) -> Any:
        s = c.session
        uuid = _uuid(a["secret"])
        rules.check_get_value_flags(a["flags"])        # flags first, as the driver checks them
        d = self.driver.lookup_by_uuid(uuid)

        def read() -> Any:
            value = self.driver.value_of(d, internal_call=s.elevated)
            if s.elevated and s.identity is not None and d.private:
                log.info("private value of secret %s returned to an elevated identity (%s) of peer pid %d",
                         uuid, s.identity.describe(), s.peer.pid,
                         extra={"SECRET_UUID": uuid, "SECRET_OPERATION": "get-value"})
            return _value_reply(value)
        return self.guard.value_read(c, d, read)

    # -- identity ---------------------------------------------------------------------
    def set_identity(self, c: Client, a: Any) -> Any:
        """Only root peers (libvirt's own daemons) may act for someone else."""
        s = c.session
        if s.peer.uid != 0:
            raise errors.AccessDenied("only a root peer may set the identity of a connection")
        errors.unsupported_flags(a["flags"], 0, "virConnectSetIdentity")
        fields = parse_params(a["params"])
        offered = fields.pop("system.token", None)

        def act() -> None:
            elevated = offered is not None and self.token.matches(offered)
            s.identity = Identity(fields, elevated)
        # @acl: connect:write. libvirt asks the current identity, which for the first
        # SET_IDENTITY is the peer; asked for the peer every time, so that a root daemon may
        # switch the identity of a connection it reuses (only root peers get here, and polkit
        # grants root everything: this check is libvirt's, its answer for root is yes).
        return self.guard.then(c, [(Perm.CONNECT_WRITE, None)], "set-identity", act, as_peer=True)

    # -- events -----------------------------------------------------------------------
    def event_register(self, c: Client, a: Any) -> Any:
        secret = a["secret"]
        event_id = self.hub.event_id(a["eventID"])

        def register() -> Any:
            if c.session.closed:
                # Closed while its check ran: a registration now would never be dropped.
                raise daemon_internal("connection closed")
            s = c.session
            cb = self.hub.register(c, event_id, _uuid(secret) if secret is not None else None,
                                   owner=s.bounds,
                                   held=len(s.callbacks))
            c.session.callbacks.add(cb)
            return {"callbackID": cb}
        # libvirt's connect:search_secrets; each event is then filtered by getattr (events.py).
        return self.guard.then(c, [(Perm.SEARCH_SECRETS, None)], "event-register", register)

    def event_deregister(self, c: Client, a: Any) -> Any:
        cb = a["callbackID"]
        if cb not in c.session.callbacks:
            raise rpc_failure(f"callbackID {cb} not registered")

        def act() -> None:
            if cb not in c.session.callbacks:       # dropped while the check ran
                raise rpc_failure(f"callbackID {cb} not registered")
            self.hub.deregister(c, cb)
            c.session.callbacks.discard(cb)
        # libvirt looks the callback up first, then the driver asks connect:read.
        return self.guard.then(c, [(Perm.CONNECT_READ, None)], "event-deregister", act)

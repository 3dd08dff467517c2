"""SASL GSSAPI (RFC 4752) with Kerberos: the server side of `secret+tcp://` (auth_tcp = "sasl").

The exchange, as unmodified virsh runs it with Cyrus SASL's GSSAPI plugin
(libsasl2-modules-gssapi-mit) and libvirt's AUTH_SASL_* calls:

1. AUTH_SASL_INIT → "GSSAPI" (the only mechanism on plain TCP: SCRAM-SHA-256 has no
   security layer, and libvirt demands SSF ≥ tcp_min_ssf there);
2. AUTH_SASL_START {mech GSSAPI, AP-REQ} … AUTH_SASL_STEP: GSS-API context establishment with
   the service key from the keytab (`sasl_keytab`, else $KRB5_KTNAME, else /etc/krb5.keytab);
   the ticket must be for a `libvirt/<host>` principal, as libvirt's client asks for
   `libvirt@<host in the URI>`;
3. once the context is up, the server's wrapped 4-byte offer: layer mask (we offer only
   confidentiality, 4) and our maximum buffer (24-bit big-endian); the client answers with its
   choice, its maximum buffer and an optional authorisation id, wrapped; it must choose
   confidentiality, and an authorisation id other than its own principal is refused;
4. the negotiated SSF (the context's key strength, GSS_C_SEC_CONTEXT_SASL_SSF, as Cyrus asks)
   must reach tcp_min_ssf (56 by default, libvirt's);
5. then the user name is the client principal with its realm (`fred@REALM`; Cyrus's plugin
   drops the realm of the server's default realm, which would let two realms' "fred" meet in
   one name: docs/libvirt-differences.md); after the final reply every byte is SASL-encoded
   (rpc/sasl_layer.py).

Every token is bounded (libvirt's REMOTE_AUTH_SASL_DATA_MAX); a failure at any step ends SASL on
the connection (one attempt each). No key or ticket content is ever logged or sent back.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import gssapi
import gssapi.raw

from secretbus.rpc import protocol as P
from secretbus.rpc.failures import AUTH_FAILED, AUTH_FAILED_PREFIX, RemoteFailure
from secretbus.rpc.sasl_layer import SecurityLayer

log = logging.getLogger("secretbus.rpc.sasl")

MECH = "GSSAPI"
SERVICE = "libvirt"                  # libvirt's SASL service name: libvirt/<host>@REALM
DEFAULT_KEYTAB = "/etc/krb5.keytab"
LAYER_NONE, LAYER_INTEGRITY, LAYER_CONFIDENTIALITY = 1, 2, 4
MAX_TOKEN = 65536                    # REMOTE_AUTH_SASL_DATA_MAX
MAX_BUFFER = 65536                   # the largest wrapped packet we accept after authentication
MIN_PEER_BUFFER = 1024               # a peer that takes less cannot carry an RPC header sensibly
K5_SSF = 56                          # Cyrus's value when the mechanism cannot say (K5_MAX_SSF)
# GSS_C_SEC_CONTEXT_SASL_SSF (MIT krb5 ≥ 1.12, gssapi_ext.h): the context's key strength for
# SASL, a 4-byte big-endian integer (256 for aes256-cts), what Cyrus's plugin asks too.
_SASL_SSF_OID = gssapi.raw.OID.from_int_seq("1.2.840.113554.1.2.2.5.15")

OnLayer = Callable[[SecurityLayer], None]


def keytab_path(configured: str | None) -> str:
    return configured or os.environ.get("KRB5_KTNAME") or DEFAULT_KEYTAB


def _failed(why: str) -> RemoteFailure:
    return RemoteFailure(AUTH_FAILED, P.FROM_RPC, why, AUTH_FAILED_PREFIX)


def gss_reason(e: Exception) -> str:
    """The GSS-API's own words (e.g. "Ticket expired"), never a token."""
    if isinstance(e, gssapi.exceptions.GSSError):
        try:
            minor = [m for m in e.get_all_statuses(e.min_code, False) if m] if e.min_code else []
        except Exception:  # noqa: BLE001 - a message table that fails: fall back to the major
            minor = []
        major = [m for m in e.get_all_statuses(e.maj_code, True) if m]
        return "; ".join(minor or major)[:300] or type(e).__name__
    return type(e).__name__


def check_keytab(keytab: str | None) -> str | None:
    """Why the service keys cannot be used (for a warning at start), or None."""
    try:
        gssapi.Credentials(usage="accept", store={"keytab": keytab_path(keytab)})
    except Exception as e:  # noqa: BLE001
        return gss_reason(e)
    return None


def context_ssf(ctx: gssapi.SecurityContext) -> int:
    try:
        values = gssapi.raw.inquire_sec_context_by_oid(ctx, _SASL_SSF_OID)
    except Exception:  # noqa: BLE001 - an older mechanism: Cyrus's fixed value
        return K5_SSF
    if not values or len(values[0]) != 4:
        return K5_SSF
    return int.from_bytes(values[0], "big")


class GssapiExchange:
    """GSSAPI on one connection: `user` and `layer` once it succeeded, then `layer_on()`
    (called by the caller after its own checks) turns the layer on for the connection."""

    def __init__(self, keytab: str | None, min_ssf: int, on_layer: OnLayer):
        self.keytab = keytab_path(keytab)
        self.min_ssf = min_ssf
        self._on_layer = on_layer
        self._ctx: gssapi.SecurityContext | None = None
        # start → context → (offered →) offer-sent → done; or failed
        self._state = "start"
        self._principal: str | None = None
        self.user: str | None = None
        self.layer: SecurityLayer | None = None

    def init(self) -> dict[str, Any]:
        return {"mechlist": MECH}

    def start(self, mech: str, data: bytes | None) -> dict[str, Any]:
        if self._state != "start":
            raise _failed("SASL authentication already attempted on this connection")
        if mech != MECH:
            self._state = "failed"
            shown = mech[:40].encode("unicode_escape").decode("ascii")     # the client's text: no newlines
            log.warning("SASL mechanism '%s' refused: only GSSAPI is offered on plain TCP", shown)
            raise _failed(f"unsupported SASL mechanism '{shown}': only GSSAPI is offered on plain TCP")
        try:
            creds = gssapi.Credentials(usage="accept", store={"keytab": self.keytab})
        except Exception as e:  # noqa: BLE001
            self._state = "failed"
            log.error("cannot read the service keys in '%s': %s", self.keytab, gss_reason(e))
            raise _failed("the server has no usable Kerberos service key") from None
        self._ctx = gssapi.SecurityContext(creds=creds, usage="accept")
        self._state = "context"
        return self._context_step(data)

    def step(self, data: bytes | None) -> dict[str, Any]:
        if self._state == "context":
            return self._context_step(data)
        if self._state == "offered":
            return self._after_ap_rep(data)
        if self._state == "offer-sent":
            return self._answer(data)
        raise _failed("no SASL exchange in progress")

    def _fail(self, why: str) -> RemoteFailure:
        self._state = "failed"
        log.warning("GSSAPI authentication%s failed: %s",
                    f" of '{self._principal}'" if self._principal else "", why)
        return _failed(why)

    def _token(self, data: bytes | None) -> bytes:
        token = bytes(data or b"")
        if len(token) > MAX_TOKEN:
            raise self._fail(f"SASL token of {len(token)} bytes")
        return token

    def _context_step(self, data: bytes | None) -> dict[str, Any]:
        ctx = self._ctx
        assert ctx is not None
        token = self._token(data)
        if not token:
            raise self._fail("empty GSSAPI token")
        try:
            out = ctx.step(token)
        except Exception as e:  # noqa: BLE001 - expired, unknown or forged tickets all land here
            raise self._fail(f"GSSAPI: {gss_reason(e)}") from None
        if not ctx.complete:
            return _reply(out or b"")
        try:
            self._principal = str(ctx.initiator_name)
            target = str(ctx.target_name)
        except Exception as e:  # noqa: BLE001
            raise self._fail(f"GSSAPI: {gss_reason(e)}") from None
        if not target.startswith(SERVICE + "/"):
            # A key in the keytab for another service (host/…) must not log anyone in here.
            raise self._fail(f"the ticket is for '{target}', not a {SERVICE}/<host> principal")
        flags = ctx.actual_flags
        if not flags & gssapi.RequirementFlag.confidentiality:
            raise self._fail("the GSS-API context offers no confidentiality")
        if not flags & gssapi.RequirementFlag.out_of_sequence_detection:
            # Without it a wrapped call (a define, a set-value) could be replayed or reordered by
            # someone on the path; Cyrus's client always asks for it (GSS_C_SEQUENCE_FLAG).
            raise self._fail("the GSS-API context has no sequence detection")
        self._state = "offered"
        if out:
            return _reply(out)             # the AP-REP; the client answers with an empty token
        return self._offer()

    def _offer(self) -> dict[str, Any]:
        ctx = self._ctx
        assert ctx is not None
        offer = bytes([LAYER_CONFIDENTIALITY]) + MAX_BUFFER.to_bytes(3, "big")
        try:
            wrapped = ctx.wrap(offer, False).message      # integrity only, as RFC 4752 says
        except Exception as e:  # noqa: BLE001
            raise self._fail(f"GSSAPI: {gss_reason(e)}") from None
        self._state = "offer-sent"
        return _reply(wrapped)

    def _after_ap_rep(self, data: bytes | None) -> dict[str, Any]:
        """The client's empty answer to our AP-REP: now the offer (Cyrus refuses data here too)."""
        if self._token(data):
            raise self._fail("unexpected GSSAPI token before the security layer offer")
        return self._offer()

    def _answer(self, data: bytes | None) -> dict[str, Any]:
        ctx = self._ctx
        assert ctx is not None and self._principal is not None
        token = self._token(data)
        try:
            u = ctx.unwrap(token)
        except Exception as e:  # noqa: BLE001
            raise self._fail(f"GSSAPI: {gss_reason(e)}") from None
        msg = bytes(u.message)
        if len(msg) < 4:
            raise self._fail("the security layer answer is too short")
        if not msg[0] & LAYER_CONFIDENTIALITY:
            # (Cyrus also takes a choice with more bits than 4 as confidentiality: broken clients.)
            raise self._fail(f"the client chose security layer {msg[0]}; confidentiality (4) is required")
        peer_max = int.from_bytes(msg[1:4], "big")
        if peer_max < MIN_PEER_BUFFER:
            raise self._fail(f"the client's maximum buffer of {peer_max} bytes is too small")
        authzid = msg[4:]
        if authzid and authzid != self._principal.encode():
            raise self._fail("an authorisation id other than the client's own principal is not supported")
        ssf = context_ssf(ctx)
        if ssf < self.min_ssf:
            raise self._fail(f"negotiated SSF {ssf} was not strong enough (tcp_min_ssf is {self.min_ssf})")
        try:
            chunk = ctx.get_wrap_size_limit(peer_max, True)
        except Exception as e:  # noqa: BLE001
            raise self._fail(f"GSSAPI: {gss_reason(e)}") from None
        self.layer = SecurityLayer(ctx, chunk, MAX_BUFFER, ssf)
        self.user = self._principal
        self._state = "done"
        return {"complete": 1, "nil": 1, "data": b""}

    def layer_on(self) -> None:
        """After the caller accepted `user`: every byte after the final reply is encoded."""
        assert self.layer is not None
        self._on_layer(self.layer)


def _reply(data: bytes) -> dict[str, Any]:
    return {"complete": 0, "nil": 0, "data": data}

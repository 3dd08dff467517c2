"""The AUTH_SASL_* procedures for remote connections (rpc/sasl.py does SCRAM itself,
rpc/sasl_gssapi.py GSSAPI on plain TCP).

Without an exchange on the connection (a unix socket under polkit or none, or TLS with
auth_tls = "none") they answer as before: SASL is not offered. Once SCRAM succeeded the user
must pass sasl_allowed_username_list, and on TLS match a remote_access grant (by DN or user
name), else the authentication fails and nothing is served; then the connection is
authenticated and its identity carries the user name.

On a unix socket (auth_unix_rw / auth_unix_ro = "sasl") the SASL name is added to the peer's
identity, as libvirt's virNetServerClientCreateIdentity does: the rights stay those of the
peer's uid (polkit's per-call checks, root unchecked), since libvirt's access driver decides by
the process (pid, start time, uid), never by the SASL name; remote_access is not consulted.
"""
from __future__ import annotations

import logging
from typing import Any, Protocol

from secretbus.rpc import protocol as P
from secretbus.rpc.failures import AUTH_FAILED, AUTH_FAILED_PREFIX, RemoteFailure
from secretbus.rpc.remote import RemotePolicy
from secretbus.rpc.session import Session

log = logging.getLogger("secretbus.rpc.sasl")


class HasSession(Protocol):
    session: Session


def _not_offered() -> RemoteFailure:
    return RemoteFailure(AUTH_FAILED, P.FROM_RPC, "authentication failed",
                         AUTH_FAILED_PREFIX)


def sasl_init(c: HasSession, _a: Any) -> Any:
    s = c.session
    if s.sasl is None or s.authenticated:
        raise _not_offered()
    return s.sasl.init()


def sasl_start(c: HasSession, a: Any) -> Any:
    s = c.session
    if s.sasl is None or s.authenticated:
        raise _not_offered()
    return s.sasl.start(a["mech"], None if a["nil"] else a["data"])


def sasl_step(c: HasSession, a: Any, policy: RemotePolicy | None) -> Any:
    s = c.session
    if s.sasl is None or s.authenticated:
        raise _not_offered()
    ret = s.sasl.step(None if a["nil"] else a["data"])
    if not ret["complete"]:
        return ret               # GSSAPI: context establishment and layer negotiation go on
    user = s.sasl.user
    assert user is not None
    where = f"remote client {s.remote.address}" if s.remote is not None else \
        f"RPC peer pid {s.peer.pid} uid {s.peer.uid}"
    if policy is None or not policy.conf.sasl_user_allowed(user):
        log.warning("%s refused: SASL user '%s' is not in sasl_allowed_username_list", where, user)
        raise RemoteFailure(AUTH_FAILED, P.FROM_RPC, "SASL user is not allowed", AUTH_FAILED_PREFIX)
    if s.remote is None:
        s.sasl_user = user
        s.authenticated = True
        log.info("%s authenticated: SASL user '%s'", where, user)
        return ret
    who = s.remote.with_sasl_user(user)
    if policy.rights(who) is None:
        log.warning("remote client %s refused: no remote_access grant matches %s", s.remote.address,
                    who.describe())
        raise RemoteFailure(AUTH_FAILED, P.FROM_RPC, "no access granted to this identity", AUTH_FAILED_PREFIX)
    s.remote = who
    s.authenticated = True
    layer_on = getattr(s.sasl, "layer_on", None)
    if layer_on is not None:
        layer_on()               # GSSAPI on TCP: every byte after this reply is SASL-encoded
    log.info("remote client %s authenticated: %s", who.address, who.describe())
    return ret

"""Who a remote (TLS, TCP) caller is, and what it may do (DESIGN §10; issue 14 item 5).

A remote caller has no pid and no uid: polkit cannot be asked about it (libvirt's own polkit
access driver refuses such identities too). Its identity is the verified certificate's DN and/or
its SASL user name (over plain TCP, the Kerberos principal GSSAPI authenticated), and its rights
come from secretbusd.conf's `remote_access` grants, looked up at every check in the
configuration in force, so a SIGHUP that takes a grant away takes it away from open
connections too:

    ro          list, lookup, XML, events          (search-secrets, getattr, read)
    rw          + define, set value, undefine      (write, save, delete)
    rw+values   + GetValue of non-private secrets  (read-secure)

Private values are never sent over a remote transport, whatever the grant.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from secretbus.access.permissions import Perm
from secretbus.rpc.serverconf import Kind, Rights, ServerConf

# Every grant may open the connection and manage its own event registrations (libvirt's
# connect.getattr / connect.read); connect.write (SET_IDENTITY) is for local root peers only.
_RO = frozenset({Perm.CONNECT_GETATTR, Perm.CONNECT_READ, Perm.SEARCH_SECRETS, Perm.GETATTR, Perm.READ})
_RW = _RO | {Perm.WRITE, Perm.SAVE, Perm.DELETE}
PERMS: dict[Rights, frozenset[Perm]] = {
    Rights.RO: _RO,
    Rights.RW: _RW,
    Rights.RW_VALUES: _RW | {Perm.READ_SECURE},
}


# An IPv6 peer is counted by its /64: one interface picks addresses in it at will (privacy
# addresses, or any of 2^64 bound on purpose), so a host keyed by its full address would get
# max_clients_per_uid connections per address, all the slots from one machine.
V6_HOST_PREFIX = 64


def host_of(address: str) -> str:
    """Whose bounds a peer at "host:port" (tls.peer_address; "[v6]:port") counts in: an IPv4
    address, an IPv6 /64 ("[2001:db8::]/64"; a v4-mapped one as its IPv4 address)."""
    host = address.rpartition(":")[0]
    if not host.startswith("["):
        return host
    try:
        ip = ipaddress.IPv6Address(host[1:-1].partition("%")[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    net = ipaddress.IPv6Network((ip, V6_HOST_PREFIX), strict=False)
    return f"[{net.network_address}]/{V6_HOST_PREFIX}"


@dataclass(frozen=True)
class RemoteIdentity:
    kind: Kind
    name: str            # the DN in GnuTLS's string form (what virt-pki-query-dn prints); for a
    #                      TCP caller (kind SASL) the SASL user, "" until SASL succeeded
    address: str         # host:port of the peer, for the logs
    sasl_user: str | None = None     # after SCRAM over TLS (auth_tls = "sasl") or GSSAPI over TCP

    @property
    def host(self) -> str:
        return host_of(self.address)

    def describe(self) -> str:
        if self.kind is Kind.SASL:       # plain TCP: the SASL user is the whole identity
            return f"SASL user '{self.name}' from {self.address}"
        user = f" SASL user '{self.sasl_user}'" if self.sasl_user is not None else ""
        return f"x509 DN '{self.name}'{user} from {self.address}"

    def with_sasl_user(self, user: str) -> RemoteIdentity:
        if self.kind is Kind.SASL:
            return replace(self, name=user, sasl_user=user)
        return replace(self, sasl_user=user)


class RemotePolicy:
    """The grants of the configuration in force; `update()` on reload."""

    def __init__(self, conf: ServerConf):
        self.conf = conf

    def update(self, conf: ServerConf) -> None:
        self.conf = conf

    def rights(self, who: RemoteIdentity) -> Rights | None:
        """The first grant matching the DN or the SASL user; None: refused. With
        auth_tls = "sasl" nothing is granted before SASL succeeded."""
        conf = self.conf
        if who.kind is Kind.X509 and not conf.dn_allowed(who.name):
            return None          # taken off tls_allowed_dn_list since it connected
        if who.sasl_user is None and (conf.auth_tls == "sasl" or who.kind is Kind.SASL):
            return None          # SASL still to come (a TCP caller is nobody before it)
        if who.sasl_user is not None and not conf.sasl_user_allowed(who.sasl_user):
            return None
        names = {who.kind: who.name}
        if who.sasl_user is not None:
            names[Kind.SASL] = who.sasl_user
        for g in conf.remote_access:
            name = names.get(g.kind)
            if name is not None and g.matches(g.kind, name):
                return g.rights
        return None

    def may_connect(self, who: RemoteIdentity) -> bool:
        """At the TLS handshake: the DN list, and a grant unless SASL is still to come."""
        if not self.conf.dn_allowed(who.name):
            return False
        return self.conf.auth_tls == "sasl" or self.rights(who) is not None

    def allows(self, who: RemoteIdentity, perm: Perm) -> bool:
        rights = self.rights(who)
        return rights is not None and perm in PERMS[rights]

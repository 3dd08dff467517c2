"""The TCP listener (libvirt's `secret+tcp://host/system`, port 16509): SASL GSSAPI only.

Plain TCP has no transport security, so, as libvirt's `auth_tcp = "sasl"` with a
`tcp_min_ssf`, nothing is served before Kerberos authentication negotiated a confidentiality
layer (rpc/sasl_gssapi.py); from the final AUTH_SASL_STEP reply on, every byte is SASL-encoded
(rpc/sasl_layer.py). SCRAM-SHA-256 is not offered here: it has no security layer.

Bounds, as the TLS listener's: at most MAX_PENDING connections (per address:
MAX_PENDING_PER_ADDRESS) may be unauthenticated at once, the rest are closed at once; each
has REMOTE_AUTH_TIMEOUT to authenticate (server.py); then the RPC server's own limits apply
(clients, calls in flight, frame size, unread output). SASL steps run only on whole frames, so
a client that stalls mid-authentication holds only its own connection.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

from secretbus.rpc.netcheck import require_sockets, warn_if_isolated
from secretbus.rpc.remote import RemoteIdentity, RemotePolicy, host_of
from secretbus.rpc.sasl_gssapi import GssapiExchange, check_keytab, keytab_path
from secretbus.rpc.sasl_layer import LayeredStreamProtocol, SecurityLayer
from secretbus.rpc.serverconf import Kind, ServerConf
from secretbus.rpc.session import SaslMechanism
from secretbus.rpc.tls import MAX_PENDING, MAX_PENDING_PER_ADDRESS, peer_address
from secretbus.rpc.transport import READ_LIMIT

log = logging.getLogger("secretbus.rpc.tcp")

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter, RemoteIdentity, SaslMechanism | None],
                 Awaitable[None]]


class TcpListener:
    def __init__(self, conf: ServerConf, policy: RemotePolicy, serve: Serve):
        self.conf = conf
        self.policy = policy
        self._serve = serve
        self._server: asyncio.AbstractServer | None = None
        self._pending: Counter[str] = Counter()
        self.refused = 0            # connections closed for the pending-authentication bound

    @property
    def where(self) -> tuple[str, int]:
        return self.conf.listen_addr, self.conf.tcp_port

    @property
    def pending(self) -> int:
        return sum(self._pending.values())

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host = self.conf.listen_addr or None        # None: every address, as libvirtd's ""

        def protocol() -> LayeredStreamProtocol:
            return LayeredStreamProtocol(asyncio.StreamReader(limit=READ_LIMIT, loop=loop), self._accept)
        server = await loop.create_server(protocol, host, self.conf.tcp_port, reuse_address=True,
                                          backlog=1024)
        require_sockets(server, "TCP", self.conf.listen_addr, self.conf.tcp_port)
        self._server = server
        log.info("serving libvirt RPC over TCP (SASL GSSAPI) on %s port %d", self.conf.listen_addr or "*",
                 self.conf.tcp_port)
        warn_if_isolated("TCP")
        self._check_keytab()

    def _check_keytab(self) -> None:
        # Read again at each connection (a new keytab counts at once), so only a warning here.
        why = check_keytab(self.conf.sasl_keytab)
        if why is not None:
            log.warning("the Kerberos service keys in '%s' cannot be used yet: %s; every TCP client will be "
                        "refused until they can", keytab_path(self.conf.sasl_keytab), why)

    def reload(self, conf: ServerConf) -> None:
        """Keytab, tcp_min_ssf and lists for the connections from now on."""
        self.conf = conf
        self._check_keytab()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()        # the port now; the RPC server ends its connections itself
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      proto: LayeredStreamProtocol) -> None:
        address = peer_address(writer)
        host = host_of(address)
        if self.pending >= MAX_PENDING or self._pending[host] >= MAX_PENDING_PER_ADDRESS:
            log.warning("TCP client %s refused: too many unauthenticated connections", address)
            self.refused += 1
            writer.transport.abort()
            return
        self._pending[host] += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._pending[host] -= 1
                if self._pending[host] <= 0:
                    del self._pending[host]

        def on_layer(layer: SecurityLayer) -> None:
            # Authenticated: the final reply goes in the clear, every later byte encoded.
            proto.arm(layer, after_next_write=True)
            release()
        exchange = GssapiExchange(self.conf.sasl_keytab, self.conf.tcp_min_ssf, on_layer)
        try:
            await self._serve(reader, writer, RemoteIdentity(Kind.SASL, "", address), exchange)
        finally:
            release()

"""The remote listeners secretbusd.conf asks for, kept in line with it across reloads.

`apply(conf)` at start and on every SIGHUP: the grants are swapped first (an open remote
connection is judged by the new ones from its next call); a TLS listener is started, stopped,
or moved when listen_tls / listen_addr / tls_port changed, and otherwise keeps its socket and
re-reads its certificate, key, CA and CRL for the connections to come. A reload whose files do
not load raises ConfigError before anything changed.
"""
from __future__ import annotations

import logging

from secretbus.rpc.remote import RemotePolicy
from secretbus.rpc.server import RpcServer
from secretbus.rpc.serverconf import ServerConf
from secretbus.rpc.tls import HANDSHAKE_TIMEOUT, TlsListener, server_context

log = logging.getLogger("secretbus.rpc")


class RemoteListeners:
    def __init__(self, server: RpcServer, *, handshake_timeout: float = HANDSHAKE_TIMEOUT):
        self.server = server
        self.policy: RemotePolicy | None = None
        self.tls: TlsListener | None = None
        self._handshake_timeout = handshake_timeout

    async def apply(self, conf: ServerConf) -> None:
        if conf.listen_tcp:
            log.warning("listen_tcp = 1 is not served: TCP with SASL is not implemented (use TLS)")
        if conf.listen_tls:
            server_context(conf)          # every file loads, or nothing changes
        if self.policy is None:
            self.policy = RemotePolicy(conf)
            self.server.guard.remote = self.policy
        else:
            self.policy.update(conf)
        tls = self.tls
        if tls is not None and (not conf.listen_tls or tls.where != (conf.listen_addr, conf.tls_port)):
            await tls.stop()
            self.tls = tls = None
            log.info("TLS listener stopped")
        if conf.listen_tls:
            if tls is None:
                tls = TlsListener(conf, self.policy, self.server.serve_remote,
                                  handshake_timeout=self._handshake_timeout)
                await tls.start()
                self.tls = tls
            else:
                tls.reload(conf)

    async def stop(self) -> None:
        if self.tls is not None:
            await self.tls.stop()
            self.tls = None

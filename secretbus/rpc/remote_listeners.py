"""The remote listeners secretbusd.conf asks for, kept in line with it across reloads.

`apply(conf)` at start and on every SIGHUP: the grants are swapped first (an open remote
connection is judged by the new ones from its next call); a TLS listener is started, stopped,
or moved when listen_tls / listen_addr / tls_port changed, and otherwise keeps its socket and
re-reads its certificate, key, CA and CRL for the connections to come. A reload whose files do
not load raises ConfigError before anything changed.
"""
from __future__ import annotations

import errno
import logging

from secretbus.rpc.remote import RemotePolicy
from secretbus.rpc.server import RpcServer
from secretbus.rpc.serverconf import ServerConf
from secretbus.rpc.tls import HANDSHAKE_TIMEOUT, TlsListener

log = logging.getLogger("secretbus.rpc")


class RemoteListeners:
    def __init__(self, server: RpcServer, *, handshake_timeout: float = HANDSHAKE_TIMEOUT):
        self.server = server
        self.policy: RemotePolicy | None = None
        self.tls: TlsListener | None = None
        self._handshake_timeout = handshake_timeout

    async def apply(self, conf: ServerConf) -> None:
        """Make the listeners and grants those of `conf`; on any failure (a file that does not
        load, a port that cannot be bound) the previous listener and grants stay as they were."""
        if conf.listen_tcp:
            log.warning("listen_tcp = 1 is not served: TCP with SASL is not implemented (use TLS)")
        old = self.tls
        if conf.listen_tls and old is not None and old.where == (conf.listen_addr, conf.tls_port):
            old.reload(conf)              # same socket, certificates read again (or ConfigError)
            self._set_policy(conf)
            return
        new: TlsListener | None = None
        if conf.listen_tls:
            new = TlsListener(conf, self._policy_for(conf), self.server.serve_remote,
                              handshake_timeout=self._handshake_timeout)
            await self._start_replacing(new, old)
        elif old is not None:
            await old.stop()
            log.info("TLS listener stopped")
        self._set_policy(conf)
        if old is not None and new is not None:
            await old.stop()              # no-op when _start_replacing stopped it already
            log.info("TLS listener on %s port %d replaced", *old.where)
        self.tls = new

    def _policy_for(self, conf: ServerConf) -> RemotePolicy:
        # One policy object for the server's life: open connections see every update.
        if self.policy is None:
            # The server's, when it was built with the configuration (its unix sockets' auth
            # mode follows this policy too).
            self.policy = self.server.guard.remote or RemotePolicy(conf)
            self.server.guard.remote = self.policy
        return self.policy

    def _set_policy(self, conf: ServerConf) -> None:
        self._policy_for(conf).update(conf)

    @staticmethod
    async def _start_replacing(new: TlsListener, old: TlsListener | None) -> None:
        """Start `new` beside `old`; if its port is `old`'s (only the address changed), `old`
        must go first, and comes back when `new` cannot start."""
        try:
            await new.start()
            return
        except OSError as e:
            if old is None or old.where[1] != new.where[1] or e.errno != errno.EADDRINUSE:
                raise
        await old.stop()
        try:
            await new.start()
        except OSError:
            await old.start()
            raise

    async def stop(self) -> None:
        if self.tls is not None:
            await self.tls.stop()
            self.tls = None

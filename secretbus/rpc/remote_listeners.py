"""The remote listeners secretbusd.conf asks for, kept in line with it across reloads.

`apply(conf)` at start and on every SIGHUP: the grants are swapped first (an open remote
connection is judged by the new ones from its next call); the TLS and the TCP listener are
each started, stopped, or moved when listen_tls / listen_tcp / listen_addr / the port changed,
and otherwise keep their socket: TLS re-reads its certificate, key, CA and CRL, TCP takes the
new keytab and tcp_min_ssf, for the connections to come. A reload whose files do not load
raises ConfigError before anything changed.

The TCP listener needs python's `gssapi` (Kerberos); it is imported only when listen_tcp = 1,
so that a host without it still serves unix and TLS.
"""
from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from secretbus.core import errors
from secretbus.rpc.netcheck import require_ip_sockets
from secretbus.rpc.remote import RemotePolicy
from secretbus.rpc.server import RpcServer
from secretbus.rpc.serverconf import ServerConf
from secretbus.rpc.tls import HANDSHAKE_TIMEOUT, TlsListener

if TYPE_CHECKING:
    from secretbus.rpc.tcp import TcpListener

log = logging.getLogger("secretbus.rpc")


class Listener(Protocol):
    @property
    def where(self) -> tuple[str, int]: ...

    def reload(self, conf: ServerConf) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


_L = TypeVar("_L", bound=Listener)


class RemoteListeners:
    def __init__(self, server: RpcServer, *, handshake_timeout: float = HANDSHAKE_TIMEOUT):
        self.server = server
        self.policy: RemotePolicy | None = None
        self.tls: TlsListener | None = None
        self.tcp: TcpListener | None = None
        self._handshake_timeout = handshake_timeout

    async def apply(self, conf: ServerConf) -> None:
        """Make the listeners and grants those of `conf`; on any failure (a file that does not
        load, a port that cannot be bound) the previous listeners and grants stay as they were
        (a TCP failure after a TLS change leaves the TLS change made, and is raised)."""
        require_ip_sockets(conf)
        make_tcp = _tcp_factory() if conf.listen_tcp else None
        policy = self._policy_for(conf)
        tls, old_tls = await self._switch(
            self.tls, conf, (conf.listen_addr, conf.tls_port) if conf.listen_tls else None, "TLS",
            lambda: TlsListener(conf, policy, self.server.serve_remote, handshake_timeout=self._handshake_timeout))
        self.tls = tls
        try:
            tcp, old_tcp = await self._switch(
                self.tcp, conf, (conf.listen_addr, conf.tcp_port) if conf.listen_tcp else None, "TCP",
                lambda: make_tcp(conf, policy, self.server.serve_remote) if make_tcp else None)
        finally:
            self._set_policy(conf)
            if old_tls is not None:
                await old_tls.stop()      # no-op when _start_replacing stopped it already
                log.info("TLS listener on %s port %d replaced", *old_tls.where)
        self.tcp = tcp
        if old_tcp is not None:
            await old_tcp.stop()
            log.info("TCP listener on %s port %d replaced", *old_tcp.where)

    async def _switch(self, old: _L | None, conf: ServerConf, where: tuple[str, int] | None, what: str,
                      make: Callable[[], _L | None]) -> tuple[_L | None, _L | None]:
        """(the listener to keep, the old one to stop once the policy is set)."""
        if where is not None and old is not None and old.where == where:
            old.reload(conf)              # same socket, files read again (or ConfigError)
            return old, None
        if where is None:
            if old is not None:
                await old.stop()
                log.info("%s listener stopped", what)
            return None, None
        new = make()
        assert new is not None
        await self._start_replacing(new, old)
        return new, old

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
    async def _start_replacing(new: Listener, old: Listener | None) -> None:
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
        for listener in (self.tls, self.tcp):
            if listener is not None:
                await listener.stop()
        self.tls = self.tcp = None


def _tcp_factory() -> type[TcpListener]:
    try:
        from secretbus.rpc.tcp import TcpListener
    except ImportError as e:
        raise errors.ConfigError(f"listen_tcp = 1 needs python's gssapi module for SASL GSSAPI (Kerberos): "
                                 f"{e.msg}") from None
    return TcpListener

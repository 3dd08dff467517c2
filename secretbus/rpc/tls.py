"""The TLS listener (libvirt's `secret+tls://host/system`, port 16514; research §3.5).

What libvirt's client expects, each found by experiment:
- the TLS handshake directly on the TCP connection, no RPC before it;
- then, inside TLS, one byte `\\x01` once the server accepts the client's certificate and DN,
  or the connection closes: the client reports "server verification (of our certificate or IP
  address) failed";
- no TLS 1.3 session tickets: GnuTLS reads one while waiting for that byte and fails with
  "Unable to read TLS confirmation: Resource temporarily unavailable" (num_tickets = 0, and
  OP_NO_TICKET for TLS 1.2).

Client certificates are required and verified against the CA (and the CRL, when there is
one: a revoked certificate fails the handshake); the DN, in GnuTLS's string form, must match
tls_allowed_dn_list and some remote_access grant, else nothing is served.

A client that stalls mid-handshake holds only itself: handshakes run on the event loop side
by side, each bounded by HANDSHAKE_TIMEOUT, and at most MAX_PENDING (per address:
MAX_PENDING_PER_ADDRESS) may be under way; the rest are closed at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from secretbus.core import errors
from secretbus.rpc.netcheck import require_sockets, warn_if_isolated
from secretbus.rpc.remote import RemoteIdentity, RemotePolicy, host_of
from secretbus.rpc.sasl import SaslExchange, VerifierStore
from secretbus.rpc.serverconf import Kind, ServerConf

log = logging.getLogger("secretbus.rpc.tls")

CONFIRM = b"\x01"               # virnetserverclient.c: the server's "you are accepted"
HANDSHAKE_TIMEOUT = 10.0
MAX_PENDING = 256
MAX_PENDING_PER_ADDRESS = 32

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter, RemoteIdentity, SaslExchange | None], Awaitable[None]]


def server_context(conf: ServerConf) -> ssl.SSLContext:
    """The context of the files in `conf`, read now; a file that does not load is a ConfigError
    naming it (the key's contents never appear)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(conf.cert_file, conf.key_file)
    except (OSError, ssl.SSLError) as e:
        raise errors.ConfigError(f"cannot load the server certificate '{conf.cert_file}' and key "
                                 f"'{conf.key_file}': {_why(e)}") from None
    _load_verify(ctx, conf.ca_file, "CA certificate")
    crl = conf.crl_path()
    if crl is not None:
        _load_verify(ctx, crl, "CRL")
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def _load_verify(ctx: ssl.SSLContext, path: str, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as e:
        raise errors.ConfigError(f"cannot load the {what} '{path}': {_why(e)}") from None


def _why(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return getattr(e, "reason", None) or type(e).__name__


def dn_string(der: bytes) -> str:
    """The subject DN as GnuTLS (and so libvirt's tls_allowed_dn_list, virt-pki-query-dn)
    writes it: the RDNs in certificate order, RFC 4514 escaping, '+' within an RDN."""
    from cryptography import x509  # here: ~14 ms of start-up for daemons that serve no TLS
    cert = x509.load_der_x509_certificate(der)
    return ",".join(rdn.rfc4514_string() for rdn in cert.subject.rdns)


LINGER = 2.0


def _spare(writer: asyncio.StreamWriter) -> socket.socket | None:
    sock = writer.get_extra_info("socket")
    try:
        spare = socket.socket(fileno=os.dup(sock.fileno()))
    except (AttributeError, OSError):
        return None
    spare.setblocking(False)
    return spare


async def _linger(spare: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    try:
        spare.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(LINGER):
            while await loop.sock_recv(spare, 4096):
                pass
    except (TimeoutError, OSError):
        pass


def peer_address(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return "?"


class TlsListener:
    def __init__(self, conf: ServerConf, policy: RemotePolicy, serve: Serve, *,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, verifiers: Path | None = None):
        """`verifiers`: the SASL verifier store, where the conf does not name one."""
        self.conf = conf
        self.context = server_context(conf)
        self.policy = policy
        self._serve = serve
        self.handshake_timeout = handshake_timeout
        self._verifiers = verifiers or Path("/etc/secretbus")
        self._server: asyncio.AbstractServer | None = None
        self._pending: Counter[str] = Counter()
        self.refused = 0            # connections closed before the confirmation byte

    @property
    def where(self) -> tuple[str, int]:
        return self.conf.listen_addr, self.conf.tls_port

    @property
    def pending(self) -> int:
        return sum(self._pending.values())

    async def start(self) -> None:
        host = self.conf.listen_addr or None        # None: every address, as libvirtd's ""
        server = await asyncio.start_server(self._accept, host, self.conf.tls_port, reuse_address=True,
                                            backlog=1024)
        require_sockets(server, "TLS", self.conf.listen_addr, self.conf.tls_port)
        self._server = server
        log.info("serving libvirt RPC over TLS on %s port %d", self.conf.listen_addr or "*", self.conf.tls_port)
        warn_if_isolated("TLS")

    def reload(self, conf: ServerConf) -> None:
        """New certificates (and CA, CRL) for the connections from now on; a failure keeps the old."""
        self.context = server_context(conf)
        self.conf = conf

    async def stop(self) -> None:
        if self._server is not None:
            # close() frees the port now; wait_closed() would (Python 3.12+) also wait for every
            # connection it accepted, which the RPC server owns and ends itself.
            self._server.close()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = peer_address(writer)
        host = host_of(address)
        if self.pending >= MAX_PENDING or self._pending[host] >= MAX_PENDING_PER_ADDRESS:
            log.warning("TLS client %s refused: too many handshakes under way", address)
            self.refused += 1
            writer.transport.abort()
            return
        self._pending[host] += 1
        spare = _spare(writer)
        try:
            who = await self._handshake(writer, address)
            if who is None:
                self.refused += 1
                await self._close(writer, spare)
                return
        finally:
            self._pending[host] -= 1
            if self._pending[host] <= 0:
                del self._pending[host]
            if spare is not None:
                spare.close()
        sasl = None
        if self.conf.auth_tls == "sasl":
            sasl = SaslExchange(VerifierStore(self.conf.verifier_path(self._verifiers)))
        await self._serve(reader, writer, who, sasl)

    async def _close(self, writer: asyncio.StreamWriter, spare: socket.socket | None) -> None:
        """Close with TLS's close_notify when the handshake was done: libvirt's client then reads
        no confirmation byte and says "server verification (of our certificate or IP address)
        failed" (an abort would show it as an I/O error).

        A failed handshake (asyncio has closed its socket already) is ended through `spare`, a
        duplicate of the connection's fd: what the client still sends is read until it closes
        (at most LINGER s), so the kernel sends FIN, not RST. After an RST, the client's next
        write raised SIGPIPE, which kills virsh."""
        if writer.get_extra_info("ssl_object") is None:
            writer.transport.abort()
            if spare is not None:
                await _linger(spare)
            return
        writer.close()
        try:
            async with asyncio.timeout(2):
                await writer.wait_closed()
        except (TimeoutError, ssl.SSLError, OSError):
            writer.transport.abort()

    async def _handshake(self, writer: asyncio.StreamWriter, address: str) -> RemoteIdentity | None:
        """The handshake, the DN and grant checks and the confirmation byte; None: refused (logged)."""
        try:
            async with asyncio.timeout(self.handshake_timeout + 1):
                await writer.start_tls(self.context, ssl_handshake_timeout=self.handshake_timeout)
        except TimeoutError:
            log.info("TLS client %s refused: no handshake within %g s", address, self.handshake_timeout)
            return None
        except ConnectionAbortedError as e:
            if "taking longer" in str(e):        # asyncio's own handshake timeout says so
                log.info("TLS client %s refused: no handshake within %g s", address, self.handshake_timeout)
            else:
                log.warning("TLS client %s refused: handshake failed: %s", address, _why(e))
            return None
        except (ssl.SSLError, OSError, ConnectionError) as e:
            # An untrusted, revoked or missing client certificate ends up here.
            log.warning("TLS client %s refused: handshake failed: %s", address, _why(e))
            return None
        obj = writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True) if obj is not None else None
        if not der:
            log.warning("TLS client %s refused: no client certificate", address)
            return None
        dn = dn_string(der)
        who = RemoteIdentity(Kind.X509, dn, address)
        if not self.policy.conf.dn_allowed(dn):
            log.warning("TLS client %s refused: DN '%s' is not in tls_allowed_dn_list", address, dn)
            return None
        if not self.policy.may_connect(who):
            log.warning("TLS client %s refused: no remote_access grant matches DN '%s'", address, dn)
            return None
        writer.write(CONFIRM)
        try:
            await writer.drain()
        except ConnectionError:
            return None
        log.info("TLS client %s accepted: DN '%s'", address, dn)
        return who

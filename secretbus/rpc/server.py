"""The RPC server: unix listeners on libvirt's virtsecretd socket paths, one driver behind them.

A socket path that a live process serves is never taken over: the server connects first and
only a stale socket (connection refused) is unlinked; anything that is not a socket is left
alone. On stop it removes only the socket files it made (same inode).

Under socket activation systemd passes the listeners (rpc/activation.py): each is matched to
the rw or ro socket by its name (the .socket unit's), else by the path it is bound to, and a
socket that matches neither, or whose name and path disagree, is refused (a read-only socket
must never be served read-write). A socket systemd did not pass is bound as usual. Passed
sockets belong to systemd: never chmod-ed or unlinked here.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from secretbus.driver.driver import SecretDriver
from secretbus.rpc.activation import ActivationError, Passed, listening_unix_stream
from secretbus.rpc.connection import Connection, RpcLimits
from secretbus.rpc.events import EventHub
from secretbus.rpc.guard import EventVisibility, Guard
from secretbus.rpc.identity import SystemToken
from secretbus.rpc.paths import RO_SOCKET_NAME, SOCKET_NAME, SYSTEM_DIR, session_dir
from secretbus.rpc.procedures import Procedures
from secretbus.rpc.remote import RemoteIdentity, RemotePolicy
from secretbus.rpc.sasl import SaslExchange, VerifierStore
from secretbus.rpc.serverconf import ServerConf
from secretbus.rpc.session import Peer, SaslMechanism, Session, peer_of
from secretbus.rpc.uidshare import UidShare

log = logging.getLogger("secretbus.rpc")

# The names systemd gives the passed sockets (FileDescriptorName=, by default the .socket
# unit's name): secretbus's units, or libvirt's own units pointed at secretbusd.service.
RW_UNIT_NAMES = frozenset({"secretbusd.socket", "virtsecretd.socket"})
RO_UNIT_NAMES = frozenset({"secretbusd-ro.socket", "virtsecretd-ro.socket"})


# A remote caller's peer: no process, no user (never uid 0, never a polkit subject).
REMOTE_PEER = Peer(pid=0, uid=-1, gid=-1)
REMOTE_AUTH_TIMEOUT = 30.0        # seconds a remote client has to pass SASL
VERIFIER_DIR = Path("/etc/secretbus")   # the SASL verifier store's, when secretbusd.conf is not a file


class SocketBusy(Exception):
    """The path is served by a live process, or is not a socket."""


@dataclass(frozen=True)
class Listen:
    path: Path
    readonly: bool
    mode: int


def socket_plan(system: bool, rpc_dir: str | None = None, root: str | None = None) -> list[Listen]:
    """libvirt's paths: system rw + ro (0666, as with polkit), session rw only (0600, in 0700).
    `rpc_dir` moves them; else a store kept under `root` (secretbusd --root) has them in
    root/run/libvirt, so that an instance on a private store never claims the host's sockets."""
    if rpc_dir is not None:
        base = Path(rpc_dir)
    elif root is not None:
        base = Path(root) / "run" / "libvirt"
    elif system:
        base = SYSTEM_DIR
    else:
        base = session_dir()
    if system:
        return [Listen(base / SOCKET_NAME, False, 0o666), Listen(base / RO_SOCKET_NAME, True, 0o666)]
    return [Listen(base / SOCKET_NAME, False, 0o600)]


def _claim(path: Path) -> None:
    """Make `path` free to bind: refuse a live or non-socket one, unlink a stale socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketBusy(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        log.info("removing stale socket %s", path)
        path.unlink()
        return
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketBusy(f"cannot probe {path}: {e.strerror}") from None
        return
    finally:
        probe.close()
    raise SocketBusy(f"{path} is served by another process (libvirt's virtsecretd?); not taking it over")


def _bind(listen: Listen) -> socket.socket:
    listen.path.parent.mkdir(mode=0o755 if listen.mode & 0o077 else 0o700, parents=True, exist_ok=True)
    _claim(listen.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(listen.path))
        os.chmod(listen.path, listen.mode)
        sock.listen(1024)      # a burst of connections waits in the kernel, not refused
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bound_path(sock: socket.socket) -> str:
    name = sock.getsockname()
    return name if isinstance(name, str) else ""       # bytes: an abstract address


def match_passed(plan: list[Listen], passed: list[Passed]) -> dict[int, socket.socket]:
    """Which entry of `plan` each passed socket serves: {index in plan: socket}."""
    out: dict[int, socket.socket] = {}
    opened: list[socket.socket] = []
    try:
        for p in passed:
            sock = listening_unix_stream(p)
            opened.append(sock)
            index = _plan_index(plan, p.name, _bound_path(sock))
            if index in out:
                raise ActivationError(f"systemd passed two sockets for {plan[index].path}")
            out[index] = sock
    except BaseException:
        # None of a set that does not fit is served; systemd keeps its own copies.
        wrapped = {sock.fileno() for sock in opened}
        for sock in opened:
            sock.close()
        for p in passed:
            if p.fd not in wrapped:
                try:
                    os.close(p.fd)
                except OSError:
                    pass
        raise
    return out


def _plan_index(plan: list[Listen], name: str, path: str) -> int:
    by_path = [i for i, listen in enumerate(plan) if str(listen.path) == path]
    if name not in RW_UNIT_NAMES and name not in RO_UNIT_NAMES:
        if by_path:
            return by_path[0]
        raise ActivationError(f"systemd passed a socket named {name!r} bound to {path!r}: neither a known "
                              f"socket unit name nor one of {', '.join(str(x.path) for x in plan)}")
    ro = name in RO_UNIT_NAMES
    kind = "read-only" if ro else "read-write"
    by_name = [i for i, listen in enumerate(plan) if listen.readonly == ro]
    if not by_name:
        raise ActivationError(f"systemd passed {name}, but this instance has no {kind} socket")
    if by_path and by_path[0] != by_name[0]:
        # A unit named read-only on the read-write path (or the reverse): serve neither.
        raise ActivationError(f"systemd passed {name} ({kind}) bound to {path}, which is not its path")
    return by_name[0]


class _UnixAccept(asyncio.Protocol):
    """A unix connection's first protocol: admits the peer and hands the transport to its
    Connection (which is then the transport's protocol), or aborts it."""

    def __init__(self, server: RpcServer, readonly: bool):
        self._server = server
        self._readonly = readonly

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        try:
            conn = self._server._accept(transport, self._readonly)
        except BaseException:
            transport.abort()           # fail closed: a peer whose session failed is not left open
            raise
        if conn is not None:
            transport.set_protocol(conn)
            conn.connection_made(transport)


class RpcServer:
    def __init__(self, driver: SecretDriver, *, system: bool, plan: list[Listen],
                 limits: RpcLimits | None = None, passed: list[Passed] | None = None,
                 guard: Guard | None = None, conf: ServerConf | None = None):
        """`passed`: the listeners systemd passed (socket activation), matched to `plan` at start;
        `guard`: authentication, access checks and audit (the daemon attaches polkit to it);
        `conf`: secretbusd.conf, whose auth_unix_rw / auth_unix_ro decide how a unix peer
        authenticates. It becomes the guard's RemotePolicy, which reloads update (remote_listeners.py),
        so a SIGHUP switches the mode for the connections that come next."""
        self.driver = driver
        self.guard = guard or Guard(system=system)
        if conf is not None and self.guard.remote is None:
            self.guard.remote = RemotePolicy(conf)
        self.system = system
        self.plan = plan
        self.passed = list(passed or [])
        self.limits = limits or RpcLimits()
        self._servers: list[asyncio.AbstractServer] = []
        self._made: list[tuple[Path, int]] = []     # (path, inode) of the sockets this server bound
        # Each connection, and whom it counts for: its peer's uid, or a remote host (Session.bounds).
        self._conns: dict[Connection, int | str] = {}
        self._per_uid: Counter[int | str] = Counter()
        self._remote = 0                    # connections of remote (TLS, TCP) callers
        self._shares: dict[int | str, UidShare] = {}   # what each untrusted uid or remote host shares
        self._sub: int | None = None
        self.hub: EventHub | None = None
        self._table: dict = {}
        self._calls_done = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.hub = EventHub(loop, EventVisibility(self.guard))
        token = SystemToken(self.plan[0].path.parent / "common" / "system.token")
        token.ensure()
        self._table = Procedures(self.driver, self.hub, token, system=self.system, guard=self.guard).table()
        given: dict[int, socket.socket] = {}
        try:
            given, self.passed = match_passed(self.plan, self.passed), []
            for i, listen in enumerate(self.plan):
                sock = given.pop(i, None)
                origin = " (socket from systemd)" if sock is not None else ""
                if sock is None:
                    sock = _bind(listen)
                    self._made.append((listen.path, os.stat(listen.path).st_ino))
                sock.setblocking(False)
                server = await loop.create_unix_server(self._acceptor(listen.readonly), sock=sock)
                self._servers.append(server)
                log.info("serving libvirt RPC on %s%s%s", _bound_path(sock) or listen.path,
                         " (read-only)" if listen.readonly else "", origin)
        except BaseException:
            for sock in given.values():
                sock.close()
            await self.stop()
            raise
        self._sub = self.driver.subscribe(self.hub.driver_callback())

    # -- connections --------------------------------------------------------------
    def _acceptor(self, readonly: bool) -> Callable[[], asyncio.Protocol]:
        return lambda: _UnixAccept(self, readonly)

    def _accept(self, transport: asyncio.Transport, readonly: bool) -> Connection | None:
        """The Connection that serves a new unix peer, or None (refused, aborted)."""
        peer = peer_of(transport.get_extra_info("socket"))
        if peer is None or not self._admit(peer.uid):
            transport.abort()
            return None
        trusted = peer.uid == 0 if self.system else peer.uid == os.geteuid()
        return self._add(self._unix_session(peer, readonly, trusted))

    def _add(self, session: Session) -> Connection:
        """The Connection for `session`, counted for its uid or remote host (and sharing its
        bounds, unless trusted)."""
        key = session.bounds
        counted = session.peer.uid if key is None else key
        share = None if key is None else self._shares.get(key)
        if share is None and key is not None:
            if len(self._shares) > 2 * len(self._per_uid) + 64:
                # Those _forget kept because a closed connection's call held bytes, given back since.
                self._shares = {k: v for k, v in self._shares.items() if not v.idle}
            share = self._shares[key] = UidShare(max(self.limits.uid_frame_bytes, self.limits.max_frame))
        conn = Connection(session, self._table, self.limits, self._forget, share, self.guard.auditor)
        self._conns[conn] = counted
        self._per_uid[counted] += 1
        self._remote += session.remote is not None
        return conn

    def _unix_session(self, peer: Peer, readonly: bool, trusted: bool) -> Session:
        """The session of a unix peer under the auth_unix_* mode in force (libvirt's rules):
        polkit: root (the session's own user) needs nothing, others AUTH_POLKIT; none: served,
        each call still checked on the system instance; sasl: SCRAM first, root too. The
        session instance never serves another user, whatever the mode (fail closed)."""
        policy = self.guard.remote
        conf = policy.conf if policy is not None else ServerConf()
        mode = conf.unix_auth(self.system, readonly)
        if not self.system and not trusted:
            mode = "polkit"                    # AUTH_POLKIT refuses them on the session instance
        if mode == "sasl":
            store = VerifierStore(conf.verifier_path(VERIFIER_DIR))
            return Session(peer, socket_readonly=readonly, trusted=trusted, sasl=SaslExchange(store))
        authenticated = trusted or mode == "none"
        return Session(peer, socket_readonly=readonly, trusted=trusted, authenticated=authenticated)

    async def serve_remote(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           who: RemoteIdentity, sasl: SaslMechanism | None = None) -> None:
        """A remote (TLS, TCP) caller, authenticated by its transport (or, with `sasl`, once SCRAM
        or GSSAPI passed): served like a local one, with no peer pid or uid (REMOTE_PEER) and its rights
        from remote_access (guard.py); its host shares one set of bounds, as an untrusted local uid."""
        host = who.host
        if (not self._table or len(self._conns) >= self.limits.max_clients - self.limits.root_reserve
                or self._per_uid[host] >= self.limits.max_clients_per_uid
                or self._remote >= self.limits.max_remote_clients):
            log.warning("refusing remote RPC client %s: connection limit", who.describe())
            writer.transport.abort()
            return
        session = Session(REMOTE_PEER, socket_readonly=False, trusted=False, authenticated=sasl is None,
                          remote=who, sasl=sasl)
        conn = self._add(session)
        timer = None
        if sasl is not None:
            # An unauthenticated remote client must not hold a connection slot for ever.
            def expire() -> None:
                if not session.authenticated:
                    log.info("dropping remote RPC client %s: not authenticated within %g s", who.address,
                             REMOTE_AUTH_TIMEOUT)
                    conn.close(abort=True)
            timer = asyncio.get_running_loop().call_later(REMOTE_AUTH_TIMEOUT, expire)
        try:
            await conn.serve_stream(reader, writer)
        finally:
            if timer is not None:
                timer.cancel()

    def _admit(self, uid: int) -> bool:
        lim = self.limits
        total = len(self._conns)
        if uid == 0:
            return total < lim.max_clients
        if total >= lim.max_clients - lim.root_reserve or self._per_uid[uid] >= lim.max_clients_per_uid:
            log.debug("refusing an RPC connection of uid %d: connection limit", uid)
            return False
        return True

    def _forget(self, conn: Connection) -> None:
        key = self._conns.pop(conn, None)
        if key is not None:
            self._remote -= conn.session.remote is not None
            self._calls_done += conn.calls
            self._per_uid[key] -= 1
            if self._per_uid[key] <= 0:
                del self._per_uid[key]
            share = self._shares.get(key)
            if share is not None and share.idle and key not in self._per_uid:
                del self._shares[key]       # (one that a closed connection's call still holds stays)
            if self.hub is not None:
                self.hub.drop(conn, conn.session.callbacks)
            self.guard.closed(conn.session)

    # -- for the daemon -------------------------------------------------------------
    @property
    def calls(self) -> int:
        """Calls answered so far (the daemon's idle watch compares it)."""
        return self._calls_done + sum(c.calls for c in self._conns)

    @property
    def clients(self) -> int:
        return len(self._conns)

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self._conns)

    @property
    def unread(self) -> int:
        """Bytes written to the clients that they have not read yet, all connections."""
        return sum(c.unread for c in self._conns)

    async def stop(self) -> None:
        if self._sub is not None:
            self.driver.unsubscribe(self._sub)
            self._sub = None
        for server in self._servers:
            server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.close(abort=True)      # replies still on their way are dropped; writes finish
        for conn in conns:
            await conn.drain_tasks()
        self._servers.clear()
        if self.hub is not None:
            await self.hub.close()
        self.guard.close()
        for path, ino in self._made:
            try:
                if os.stat(path).st_ino == ino:
                    path.unlink()
            except FileNotFoundError:
                pass
        self._made.clear()

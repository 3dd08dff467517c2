"""The RPC server: unix listeners on libvirt's virtsecretd socket paths, one driver behind them.

A socket path that a live process serves is never taken over: the server connects first and
only a stale socket (connection refused) is unlinked; anything that is not a socket is left
alone. On stop it removes only the socket files it made (same inode).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from secretbus.driver.driver import SecretDriver
from secretbus.rpc.connection import Connection, RpcLimits
from secretbus.rpc.events import EventHub
from secretbus.rpc.identity import SystemToken
from secretbus.rpc.paths import RO_SOCKET_NAME, SOCKET_NAME, SYSTEM_DIR, session_dir
from secretbus.rpc.procedures import Procedures
from secretbus.rpc.session import Session, peer_of

log = logging.getLogger("secretbus.rpc")


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


class RpcServer:
    def __init__(self, driver: SecretDriver, *, system: bool, plan: list[Listen],
                 limits: RpcLimits | None = None):
        self.driver = driver
        self.system = system
        self.plan = plan
        self.limits = limits or RpcLimits()
        self._servers: list[asyncio.AbstractServer] = []
        self._made: list[tuple[Path, int]] = []     # (path, inode) of the sockets this server bound
        self._conns: set[Connection] = set()
        self._per_uid: Counter[int] = Counter()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secretbus-rpc-io")
        self._sub: int | None = None
        self.hub: EventHub | None = None
        self._table: dict = {}
        self._calls_done = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.hub = EventHub(loop)
        token = SystemToken(self.plan[0].path.parent / "common" / "system.token")
        token.ensure()
        self._table = Procedures(self.driver, self.hub, token, system=self.system).table()
        try:
            for listen in self.plan:
                sock = _bind(listen)
                self._made.append((listen.path, os.stat(listen.path).st_ino))
                server = await asyncio.start_unix_server(self._acceptor(listen.readonly), sock=sock)
                self._servers.append(server)
                log.info("serving libvirt RPC on %s%s", listen.path, " (read-only)" if listen.readonly else "")
        except BaseException:
            await self.stop()
            raise
        self._sub = self.driver.subscribe(self.hub.driver_callback())

    # -- connections --------------------------------------------------------------
    def _acceptor(self, readonly: bool) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._accept(reader, writer, readonly)
        return accept

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, readonly: bool) -> None:
        peer = peer_of(writer.get_extra_info("socket"))
        if peer is None or not self._admit(peer.uid):
            writer.transport.abort()
            return
        trusted = peer.uid == 0 if self.system else peer.uid == os.geteuid()
        session = Session(peer, socket_readonly=readonly, trusted=trusted, authenticated=trusted)
        conn = Connection(reader, writer, session, self._table, self.limits, self._executor, self._forget)
        self._conns.add(conn)
        self._per_uid[peer.uid] += 1
        await conn.serve()

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
        if conn in self._conns:
            self._conns.discard(conn)
            self._calls_done += conn.calls
            uid = conn.session.peer.uid
            self._per_uid[uid] -= 1
            if self._per_uid[uid] <= 0:
                del self._per_uid[uid]
            if self.hub is not None:
                self.hub.drop(conn, conn.session.callbacks)

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
        self._executor.shutdown(wait=True)
        for path, ino in self._made:
            try:
                if os.stat(path).st_ino == ino:
                    path.unlink()
            except FileNotFoundError:
                pass
        self._made.clear()

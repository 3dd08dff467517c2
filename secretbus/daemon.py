"""`secretbusd`: the secret service on the system or session bus.

    secretbusd --system                      # /etc/libvirt/secrets, polkit on every call
    secretbusd --session                     # ~/.config/libvirt/secrets, the user's bus
    secretbusd --session --root DIR --bus-address unix:path=...   # tests, private buses

Beside D-Bus it serves libvirt's RPC protocol on virtsecretd's sockets (secretbus/rpc/), from
the same driver: `--no-rpc` / `--no-dbus` turn a front end off, `--rpc-dir DIR` moves the sockets.
Started by systemd's secretbusd.socket / secretbusd-ro.socket, it serves the sockets systemd
passes (LISTEN_FDS, LISTEN_FDNAMES) instead of binding them.

Remote access (DESIGN §10, docs/remote.md): secretbusd.conf (`--config FILE`; by default
/etc/secretbus/secretbusd.conf, the session's $XDG_CONFIG_HOME/secretbus/, --root DIR's DIR/etc/)
turns on the TLS and TCP (Kerberos) listeners and grants remote callers their rights.

sd_notify READY/RELOADING/STOPPING/STATUS; SIGHUP reloads secret.conf, the key and the
store, and secretbusd.conf (listeners added, removed or moved, certificates re-read); a failed
reload of either keeps its old state; SIGTERM finishes in-flight calls, exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from dbus_fast import BusType
from dbus_fast.aio import MessageBus
from dbus_fast.constants import NameFlag, RequestNameReply

from secretbus.access.audit import AuditMode, Auditor
from secretbus.access.journal import JournalWriter
from secretbus.access.permissions import AccessControl, AllowAll
from secretbus.bus import connect as busconn
from secretbus.bus.auditing import ReadAudit, pid_lookup
from secretbus.bus.execute import BUS_MESSAGE_MAX
from secretbus.bus.names import BUS_NAME
from secretbus.bus.polkit import CallerUids, PolkitAccess
from secretbus.bus.service import SecretService
from secretbus.core import busypoll, errors
from secretbus.core.gil import shorten_switch_interval
from secretbus.core.logsetup import flush_held, setup_daemon_logging
from secretbus.core.malloc import give_back_freed_memory
from secretbus.core.model import VERSION, InstanceKind
from secretbus.driver.build import open_instance
from secretbus.driver.driver import SecretDriver
from secretbus.notify import notify, reloading
from secretbus.procsec import no_core_dumps
from secretbus.rpc import activation
from secretbus.rpc.activation import ActivationError, Passed
from secretbus.rpc.connection import RpcLimits
from secretbus.rpc.guard import Guard
from secretbus.rpc.remote_listeners import RemoteListeners
from secretbus.rpc.server import RpcServer, SocketBusy, socket_plan
from secretbus.rpc.serverconf import ServerConf, load_serverconf
from secretbus.rpc.tls import HANDSHAKE_TIMEOUT
from secretbus.store.conf import resolve_readers
from secretbus.store.paths import InstancePaths

log = logging.getLogger("secretbus.daemon")

EXIT_CONFIG = 78   # EX_CONFIG: bad secret.conf or key, as systemd's status table reads it
LOST = -1          # a session's outcome: the bus connection went away (never an exit status)
# A bus that accepts the socket but never finishes auth/Hello must not hold the daemon (or its
# reconnect loop) forever: dbus-fast's connect() has no timeout of its own.
CONNECT_TIMEOUT = 25.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="secretbusd", description="libvirt-compatible secret service on D-Bus")
    p.add_argument("--version", action="version", version=f"%(prog)s (secretbus) {VERSION}")     # libvirtd's form
    bus = p.add_mutually_exclusive_group()
    bus.add_argument("--system", action="store_true", help="serve the system bus, authorise with polkit")
    bus.add_argument("--session", action="store_true", help="serve the user's session bus (default)")
    p.add_argument("--root", metavar="DIR", help="keep the store under DIR (DIR/etc/secrets, DIR/run/secrets, "
                   "DIR/etc/secret.conf) instead of the instance's standard places")
    p.add_argument("--bus-address", metavar="ADDR", help="connect to this bus instead of the standard one")
    p.add_argument("--timeout", type=float, default=0, metavar="SECS",
                   help="exit after SECS idle seconds (never while an ephemeral secret exists); 0 = never")
    p.add_argument("--no-polkit", action="store_true",
                   help="with --system: skip polkit (only for a private bus whose policy admits root alone)")
    p.add_argument("--polkit-timeout", type=float, default=20.0, metavar="SECS",
                   help="how long to wait for polkitd before denying (default 20: polkitd 122 can "
                        "stall 15 s)")
    p.add_argument("--audit", choices=[m.value for m in AuditMode], metavar="MODE",
                   help="audit records of value reads in the journal: required (no record, no value; "
                        "the system bus's default), best-effort (the session bus's default) or off")
    p.add_argument("--max-message-size", type=int, default=BUS_MESSAGE_MAX, metavar="BYTES",
                   help="the bus's max_message_size: larger replies are refused with a clear error "
                        "(default 33554432, dbus-daemon's)")
    p.add_argument("--no-rpc", action="store_true", help="do not serve libvirt's RPC protocol")
    p.add_argument("--no-dbus", action="store_true", help="do not serve D-Bus (libvirt's RPC protocol only)")
    p.add_argument("--rpc-dir", metavar="DIR", help="make the RPC sockets (virtsecretd-sock[-ro]) in DIR "
                   "instead of /run/libvirt or $XDG_RUNTIME_DIR/libvirt")
    p.add_argument("--config", metavar="FILE", help="the server configuration (secretbusd.conf: remote "
                   "listeners and grants) instead of /etc/secretbus/secretbusd.conf or "
                   "$XDG_CONFIG_HOME/secretbus/secretbusd.conf; it must exist")
    p.add_argument("--tls-handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT, metavar="SECS",
                   help="close a TLS client whose handshake takes longer (default 10)")
    p.add_argument("--poll-us", type=busypoll.poll_us_arg, default=busypoll.DEFAULT_POLL_US, metavar="US",
                   help="after handling I/O, poll the sockets up to US µs before sleeping, so that a client "
                        f"making one call at a time finds the daemon awake (default {busypoll.DEFAULT_POLL_US}; "
                        f"0 to {busypoll.MAX_POLL_US}; 0: never)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


# Builds the access control once the bus is up: polkit on the system bus, none on a session bus.
AccessFactory = Callable[[MessageBus, CallerUids], Awaitable[AccessControl]]
BusFactory = Callable[[], Awaitable[MessageBus]]


def polkit_access(timeout: float, cls: Callable[..., PolkitAccess] = PolkitAccess) -> AccessFactory:
    """Access through polkitd; `cls` lets a bench measure a variant of PolkitAccess."""
    async def make(bus: MessageBus, uids: CallerUids) -> AccessControl:
        access = cls(bus, uids, timeout=timeout)
        await access.start()
        return access
    return make


async def allow_all(bus: MessageBus, uids: CallerUids) -> AccessControl:
    return AllowAll(uids)


def bus_factory(address: str | None, system: bool) -> BusFactory:
    async def connect() -> MessageBus:
        return await asyncio.wait_for(busconn.connect(address, BusType.SYSTEM if system else BusType.SESSION), 30)
    return connect


class Daemon:
    """One driver served by its front ends (D-Bus, libvirt RPC), built by main() (or a test)
    from its parts."""

    service: SecretService | None = None     # made in run(), once the bus is connected

    def __init__(self, driver: SecretDriver, *, access: AccessFactory, connect: BusFactory | None,
                 system: bool, idle_timeout: float = 0, audit: AuditMode | None = None,
                 max_message: int = BUS_MESSAGE_MAX,
                 reconnect_for: float = 60.0, backoff: tuple[float, float] = (0.2, 5.0),
                 rpc: RpcServer | None = None, rpc_optional: bool = False,
                 serverconf: ServerConf | None = None, serverconf_required: bool = False,
                 serverconf_path: Path | None = None, tls_handshake_timeout: float = HANDSHAKE_TIMEOUT):
        """`connect` None: no D-Bus front end; `rpc`: the libvirt RPC front end, if served;
        `rpc_optional`: when its sockets cannot be made, serve D-Bus alone (logged);
        `serverconf`: secretbusd.conf (its remote listeners need `rpc`), re-read from its path on
        SIGHUP (`serverconf_required`: named by --config, so it must stay there), or from
        `serverconf_path` where a file created later is looked for."""
        self.driver = driver
        self.rpc = rpc
        self.serverconf = serverconf or ServerConf()
        self._serverconf_required = serverconf_required
        self._serverconf_default = serverconf_path
        self._tls_handshake_timeout = tls_handshake_timeout
        self.remote: RemoteListeners | None = None
        self._rpc_optional = rpc_optional and connect is not None
        self._max_message = max_message
        self._reconnect_for = reconnect_for
        self._backoff = backoff
        self._readers: frozenset[int] = frozenset()
        self._tables: Callable[[], dict[str, int]] | None = None
        self.system = system
        self.audit_mode = audit or AuditMode.default(system)
        self._make_access = access
        self._connect = connect
        self._idle_timeout = idle_timeout
        self.stop_event = asyncio.Event()
        self._reloading = False

    @property
    def _bus_kind(self) -> str:
        return "system" if self.system else "session"

    async def run(self, readers: frozenset[int], t0: float | None = None) -> int:
        """Serve until SIGTERM/SIGINT or idle timeout; the exit status."""
        t0 = time.monotonic() if t0 is None else t0
        self._readers = readers
        # From the first instant: a SIGTERM while the sockets or the bus are being set up
        # must still end in the clean stop below (sockets removed), not the default death.
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_event.set)
        if self.rpc is not None:
            try:
                await self.rpc.start()      # before the bus name: clients that see it find the sockets
            except (SocketBusy, ActivationError, OSError) as e:
                if not self._rpc_optional:
                    log.error("cannot serve libvirt RPC: %s", e)
                    return 1
                # libvirt's virtsecretd holds the sockets, or the unit's sandbox keeps
                # /run/libvirt read-only: the D-Bus service must not be lost for that.
                log.error("cannot serve libvirt RPC, serving D-Bus only: %s", e)
                self.rpc = None
        if self.rpc is not None:
            self.remote = RemoteListeners(self.rpc, handshake_timeout=self._tls_handshake_timeout)
            try:
                await self.remote.apply(self.serverconf)
            except (errors.SecretError, OSError) as e:
                log.error("cannot serve remote access: %s", _shown(e))
                notify(f"STATUS=failed: cannot serve remote access: {_shown(e)}")   # systemctl status shows it
                await self.rpc.stop()
                return EXIT_CONFIG if isinstance(e, errors.SecretError) else 1
        else:
            for key, what in (("listen_tls", "TLS"), ("listen_tcp", "TCP")):
                if getattr(self.serverconf, key):
                    log.error("%s = 1 needs the RPC front end, which is not served: no %s listener", key, what)
        try:
            if self._connect is None:
                return await self._serve(None, t0)
            return await self._run_bus(t0, self._connect)
        finally:
            if self.remote is not None:
                await self.remote.stop()
            if self.rpc is not None:
                await self.rpc.stop()

    async def _run_bus(self, t0: float, connect: BusFactory) -> int:
        """The D-Bus front end. A lost bus is reconnected (name re-acquired, objects
        re-announced) with backoff; exit 1 only if the first connection fails or the bus
        stays away for `reconnect_for` seconds."""
        lost_at: float | None = None
        delay = self._backoff[0]
        while True:
            try:
                bus = await self._connect_unless_stopped(connect)
                if bus is None:
                    return 0
            except Exception as e:  # noqa: BLE001
                if lost_at is None or time.monotonic() - lost_at >= self._reconnect_for:
                    log.error("cannot connect to the %s bus: %s", self._bus_kind, e)
                    return 1
                log.warning("cannot reconnect to the %s bus yet (%s); retrying in %.1f s",
                            self._bus_kind, type(e).__name__, delay)
                if await self._stopped_within(delay):
                    return 0
                delay = min(delay * 2, self._backoff[1])
                continue
            status = await self._session(bus, t0, reconnected=lost_at is not None)
            if status != LOST:
                return status
            log.warning("lost the %s bus; reconnecting", self._bus_kind)
            notify("STATUS=bus connection lost, reconnecting")
            lost_at, delay = time.monotonic(), self._backoff[0]
            if await self._stopped_within(delay):
                return 0

    async def _connect_unless_stopped(self, connect: BusFactory) -> MessageBus | None:
        """A connected bus, or None when SIGTERM came first; TimeoutError after CONNECT_TIMEOUT."""
        attempt = asyncio.ensure_future(connect())
        stop = asyncio.ensure_future(self.stop_event.wait())
        try:
            done, _ = await asyncio.wait((attempt, stop), timeout=CONNECT_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if attempt in done:
            return attempt.result()
        attempt.cancel()
        if stop in done:
            return None
        raise TimeoutError(f"no answer within {CONNECT_TIMEOUT:.0f} s")

    async def _stopped_within(self, secs: float) -> bool:
        try:
            await asyncio.wait_for(self.stop_event.wait(), secs)
        except TimeoutError:
            return False
        return True

    async def _session(self, bus: MessageBus, t0: float, *, reconnected: bool) -> int:
        """One bus connection, served until it ends: an exit status, or LOST."""
        uids = CallerUids(bus)
        access: AccessControl | None = None
        journal = JournalWriter()
        try:
            await uids.start()
            access = await self._make_access(bus, uids)
            if self.rpc is not None:
                self.rpc.guard.attach(access)     # one access layer (cache, fair slots) for both
            pids = pid_lookup(uids.bus)
            uids.when_gone(pids.forget)
            audit = ReadAudit(Auditor(journal, self.audit_mode), access, pids)
            service = self.service = SecretService(self.driver, bus, access, private_readers=self._readers,
                                                   audit=audit, max_message=self._max_message)
            uids.when_gone(service.caller_left)
            service.attach()
            if not await self._own_name(bus):
                return LOST if reconnected else 1
            self._tables = lambda: {**service.table_sizes(), **uids.sizes(),
                                    **getattr(access, "sizes", dict)()}
            return await self._serve(bus, t0)
        except Exception as e:  # noqa: BLE001 - a bus that broke while we set up
            if not reconnected or bus.connected:
                raise
            log.warning("the %s bus went away while reconnecting: %s", self._bus_kind, type(e).__name__)
            return LOST
        finally:
            if self.rpc is not None:
                self.rpc.guard.detach(access)
            getattr(access, "close", lambda: None)()
            uids.close()
            journal.close()
            if bus.connected:
                bus.disconnect()

    @staticmethod
    async def _own_name(bus: MessageBus) -> bool:
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            return True
        log.error("cannot own %s on the bus (%s): another instance runs, or the bus policy refuses",
                  BUS_NAME, reply.name)
        return False

    def log_tables(self) -> None:
        """SIGUSR1: the per-caller tables' sizes, one log line (what the tests read)."""
        sizes = self._tables() if self._tables else {}
        log.info("tables: %s", " ".join(f"{k}={v}" for k, v in sorted(sizes.items())))

    async def _serve(self, bus: MessageBus | None, t0: float) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        loop.add_signal_handler(signal.SIGUSR1, self.log_tables)
        n = self.driver.count()
        where = f"as {BUS_NAME} on the {self._bus_kind} bus" if bus is not None else "over libvirt RPC only"
        log.info("serving %d secrets %s (ready in %.3f s; %s)", n, where, time.monotonic() - t0,
                 self.driver.key_description or "values not encrypted")
        notify("READY=1", f"STATUS=serving {n} secrets")
        lost = bus.wait_for_disconnect() if bus is not None else asyncio.Event().wait()
        waiters = [asyncio.create_task(self.stop_event.wait()), asyncio.create_task(lost)]
        if self._idle_timeout > 0:
            waiters.append(asyncio.create_task(self._idle_watch(self._idle_timeout)))
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        lost_bus = waiters[1] in done and not self.stop_event.is_set()
        if waiters[1] in done and not waiters[1].cancelled():
            waiters[1].exception()            # retrieved: how it broke does not matter here
        if lost_bus:
            if self.service is not None:
                await self.service.drain()    # their replies have nowhere to go; let them end
            return LOST
        notify("STOPPING=1", "STATUS=stopping")
        log.info("stopping (signal or idle timeout)")
        if self.service is not None:
            await self.service.drain()
        return 0

    def _activity(self) -> tuple[int, int]:
        """Calls taken so far and calls in flight, over both front ends."""
        fronts: list[SecretService | RpcServer] = [f for f in (self.service, self.rpc) if f is not None]
        return sum(f.calls for f in fronts), sum(f.in_flight for f in fronts)

    async def _idle_watch(self, timeout: float) -> None:
        """Exit after `timeout` idle seconds; an ephemeral secret would be lost, so never then."""
        last_calls, idle_since = -1, time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            calls, in_flight = self._activity()
            busy = calls != last_calls or in_flight or self.driver.has_ephemeral()
            if busy:
                last_calls, idle_since = calls, time.monotonic()
            elif time.monotonic() - idle_since >= timeout:
                log.info("idle for %.0f s, exiting", timeout)
                return

    async def reload(self) -> None:
        if self._reloading:
            return
        self._reloading = True
        reloading()
        try:
            failed = await self._reload_store()
            try:
                # Independent of secret.conf's outcome: a bad store must not pin the listeners.
                await self._reload_serverconf()
            except errors.SecretError as e:
                log.error("reload of the server configuration failed, keeping the previous one: %s",
                          errors.display(e))
                failed = failed or errors.display(e)
            if failed is None:
                notify("READY=1", f"STATUS=serving {self.driver.count()} secrets")
            else:
                notify("READY=1", f"STATUS=reload failed, previous state kept: {failed}")
        finally:
            self._reloading = False

    async def _reload_store(self) -> str | None:
        """secret.conf, the key and the store; the error's text when it failed (state kept)."""
        try:
            # The readers are resolved from the new conf before the driver swaps anything, so an
            # unknown name keeps the old state and the old readers alike.
            readers: list[frozenset[int]] = []
            report = await asyncio.get_running_loop().run_in_executor(
                None, self.driver.reload, lambda conf: readers.append(resolve_readers(conf)))
            self._readers = readers[0]
            if self.service is not None:
                self.service.private_readers = self._readers
                self.service.refresh()
            log.info("reloaded: %d secrets, %d skipped (%s)", report.loaded, len(report.skipped),
                     self.driver.key_description or "values not encrypted")
            return None
        except errors.SecretError as e:
            log.error("reload failed, keeping the previous state: %s", errors.display(e))
            return errors.display(e)

    async def _reload_serverconf(self) -> None:
        """secretbusd.conf again, from the path it was read from; listeners follow it."""
        path = self.serverconf.path
        if path is None and not self._serverconf_required:
            path = self._serverconf_default
        if path is None:
            return
        conf = await asyncio.get_running_loop().run_in_executor(
            None, lambda: load_serverconf(path, required=self._serverconf_required))
        if self.remote is not None:
            try:
                await self.remote.apply(conf)
            except OSError as e:
                raise errors.OperationFailed(f"cannot listen as {path} asks: {e.strerror or e}") from None
        self.serverconf = conf
        log.info("reloaded %s: TLS listener %s, TCP listener %s", path,
                 f"on port {conf.tls_port}" if conf.listen_tls else "off",
                 f"on port {conf.tcp_port}" if conf.listen_tcp else "off")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_rpc and args.no_dbus:
        parser.error("--no-rpc and --no-dbus leave nothing to serve")
    return args


def rpc_front_end(args: argparse.Namespace, driver: SecretDriver, system: bool, root: str | None,
                  passed: list[Passed], serverconf: ServerConf | None = None) -> RpcServer | None:
    """libvirt's RPC protocol on virtsecretd's sockets (those systemd `passed`, the rest bound
    here), unless --no-rpc. Its value reads are audited like D-Bus's; the daemon attaches the bus
    connection's polkit access control to it while there is one (without, non-root peers are
    refused: fail closed)."""
    if args.no_rpc:
        if passed:
            log.warning("--no-rpc: not serving the %d socket(s) systemd passed", len(passed))
            activation.close_all(passed)
        return None
    mode = AuditMode(args.audit) if args.audit else AuditMode.default(system)
    guard = Guard(system=system, auditor=Auditor(JournalWriter(), mode))
    conf = serverconf or ServerConf()
    # secretbusd.conf's max_clients / max_client_requests / keepalive_* (libvirtd.conf's) and
    # max_remote_clients (ours), read at start only.
    limits = RpcLimits(max_clients=conf.max_clients, max_requests=conf.max_client_requests,
                       root_reserve=min(RpcLimits.root_reserve, conf.max_clients // 2),
                       max_remote_clients=conf.remote_clients(),
                       keepalive_interval=conf.keepalive_interval, keepalive_count=conf.keepalive_count)
    return RpcServer(driver, system=system, plan=socket_plan(system, args.rpc_dir, root), guard=guard,
                     passed=passed, limits=limits, conf=conf)


def take_sockets() -> list[Passed]:
    """The sockets systemd passed; LISTEN_* are unset from here on. Bad variables are logged
    and the sockets ignored (the RPC front end then binds its own, or finds them busy)."""
    try:
        return activation.take_listen_fds()
    except ActivationError as e:
        log.error("ignoring the sockets systemd passed: %s", e)
        return []


def main(argv: list[str] | None = None, *, polkit: Callable[..., PolkitAccess] = PolkitAccess) -> int:
    """secretbusd; `polkit` is the access-control class on the system bus (benches vary it)."""
    args = parse_args(argv)
    setup_daemon_logging(verbose=args.verbose)
    passed = take_sockets()
    no_core_dumps()
    give_back_freed_memory()
    shorten_switch_interval()
    os.umask(0o077)
    t0 = time.monotonic()
    system = bool(args.system)
    paths_root = os.path.abspath(args.root) if args.root else None
    paths = InstancePaths.for_kind(InstanceKind.SYSTEM if system else InstanceKind.SESSION, paths_root)
    if args.config is not None:
        paths = paths.with_server_conf(args.config)
    notify("STATUS=loading secrets")
    try:
        driver = open_instance(paths)
    except errors.SecretError as e:
        return _config_failure(e)
    try:
        readers = resolve_readers(driver.conf)
    except errors.SecretError as e:
        driver.close()
        return _config_failure(e)
    conf_path = paths.server_conf_file
    try:
        serverconf = load_serverconf(conf_path, required=paths.server_conf_named)
    except errors.SecretError as e:
        driver.close()
        return _config_failure(e)
    access = polkit_access(args.polkit_timeout, polkit) if system and not args.no_polkit else allow_all
    connect = None if args.no_dbus else bus_factory(args.bus_address, system)
    daemon = Daemon(driver, access=access, connect=connect, system=system, idle_timeout=args.timeout,
                    max_message=args.max_message_size, audit=AuditMode(args.audit) if args.audit else None,
                    rpc=rpc_front_end(args, driver, system, paths_root, passed, serverconf),
                    rpc_optional=args.rpc_dir is None, serverconf=serverconf,
                    serverconf_required=paths.server_conf_named, serverconf_path=conf_path,
                    tls_handshake_timeout=args.tls_handshake_timeout)
    try:
        with asyncio.Runner(loop_factory=lambda: busypoll.new_event_loop(args.poll_us)) as runner:
            return runner.run(daemon.run(readers, t0))
    except KeyboardInterrupt:
        return 0
    finally:
        driver.close()
        flush_held()


def _shown(e: BaseException) -> str:
    return errors.display(e) if isinstance(e, errors.SecretError) else f"{type(e).__name__}: {e}"


def _config_failure(e: errors.SecretError) -> int:
    log.error("cannot start: %s", errors.display(e))
    notify(f"STATUS=failed: {errors.display(e)}")
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())

"""Whether a TLS or TCP listener really listens, and if not, why, in words an administrator
can act on.

asyncio's create_server() skips every address whose socket() fails ("a bad family/type/
protocol combination") and then returns a server with no socket at all: under the shipped
systemd unit (RestrictAddressFamilies=AF_UNIX) `listen_tls = 1` would log "serving" and
listen nowhere. `require_ip_sockets()` (before anything is built: the same sandbox hides the
certificates, which would otherwise be the error shown) and `require_sockets()` (after
create_server, whatever the cause) turn that into a configuration error naming the unit's
sandbox and the drop-in that opens it, so the daemon exits 78 (EX_CONFIG, which the unit's
RestartPreventExitStatus= keeps from a restart loop), or a reload keeps its previous state.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
from pathlib import Path

from secretbus.core import errors
from secretbus.rpc.serverconf import ServerConf

log = logging.getLogger("secretbus.rpc")

# Where the admin installs the shipped systemd/secretbusd-network.conf (docs/remote.md).
NETWORK_DROPIN = "/etc/systemd/system/secretbusd.service.d/network.conf"
SHIPPED_DROPIN = "secretbusd-network.conf"
PROC_NET_DEV = Path("/proc/self/net/dev")


def ip_sockets_forbidden() -> bool:
    """True when this process may create neither AF_INET nor AF_INET6 sockets (seccomp's
    RestrictAddressFamilies= answers EAFNOSUPPORT); other failures are not this case."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.socket(family, socket.SOCK_STREAM).close()
            return False
        except OSError as e:
            if e.errno != errno.EAFNOSUPPORT:
                return False
    return True


def sandbox_hint() -> str:
    return (f"secretbusd.service's sandbox has no network (RestrictAddressFamilies=AF_UNIX, "
            f"PrivateNetwork=yes); to serve remote clients install its drop-in {SHIPPED_DROPIN} as "
            f"{NETWORK_DROPIN} (scripts/install.sh --with-network), then systemctl daemon-reload "
            f"and restart secretbusd")


def require_ip_sockets(conf: ServerConf) -> None:
    """Before the listeners are built (their certificates and keytab read): when this process
    may create no IP socket, the sandbox is the cause to report, not the files it hides too."""
    wanted = [f"{key} = 1 ({what} port {port})" for key, what, port in
              (("listen_tls", "TLS", conf.tls_port), ("listen_tcp", "TCP", conf.tcp_port)) if getattr(conf, key)]
    if wanted and ip_sockets_forbidden():
        raise errors.ConfigError(f"cannot serve {' and '.join(wanted)}: this process may not create IP sockets "
                                 f"(Address family not supported): {sandbox_hint()}")


def require_sockets(server: asyncio.Server, what: str, addr: str, port: int) -> None:
    """Raise ConfigError (after closing `server`) when it got no listening socket."""
    if server.sockets:
        return
    server.close()
    where = f"{addr or '*'} port {port}"
    if ip_sockets_forbidden():
        raise errors.ConfigError(f"cannot serve the {what} listener on {where}: this process may not "
                                 f"create IP sockets (Address family not supported): {sandbox_hint()}")
    raise errors.ConfigError(f"cannot serve the {what} listener on {where}: no socket could be created "
                             f"for that address")


def only_loopback(proc_net_dev: Path = PROC_NET_DEV) -> bool:
    """True when this network namespace has no interface but lo (PrivateNetwork=yes)."""
    try:
        lines = proc_net_dev.read_text().splitlines()[2:]
    except OSError:
        return False
    names = [line.split(":", 1)[0].strip() for line in lines if ":" in line]
    return names == ["lo"]


def warn_if_isolated(what: str) -> None:
    """A listener in a private network namespace works, for nobody outside it: say so once."""
    if only_loopback():
        log.warning("the %s listener is in a network namespace whose only interface is lo: clients on "
                    "other hosts cannot reach it (%s)", what, sandbox_hint())

"""TCP (and UDP) ports for the servers the tests start on loopback: libvirtd, secretbusd's TLS
and TCP listeners, the KDC, sshd, etcd.

A port from bind(0) comes from the kernel's ephemeral range (ip_local_port_range, 32768–60999
here), the range every outgoing connection takes its source port from: between the probe and
the server's own bind another connection may take it, and the server fails with "Address
already in use" (libvirtd did, once, in CI). These ports come from below that range, where the
kernel never picks one by itself; each is probed free on every address (IPv4 and IPv6, TCP and
UDP) and is never handed out twice in one process.
"""
from __future__ import annotations

import errno
import random
import socket
from pathlib import Path

LOW = 20000                          # well above the ports of system services
_rng = random.Random()               # its own: tests that seed the global one must not matter
_given: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    for family, kind, addr in ((socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0"),
                               (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0"),
                               (socket.AF_INET6, socket.SOCK_STREAM, "::"),
                               (socket.AF_INET6, socket.SOCK_DGRAM, "::")):
        try:
            s = socket.socket(family, kind)
        except OSError:
            continue                  # no IPv6 here
        with s:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((addr, port))
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL:
                    continue
                return False
    return True


def free_port() -> int:
    """A port nothing uses now, outside the ephemeral range, not given before."""
    high = max(LOW + 1000, _ephemeral_low() - 1)
    for _ in range(2000):
        port = _rng.randint(LOW, high)
        if port not in _given and _bindable(port):
            _given.add(port)
            return port
    raise RuntimeError(f"no free port in {LOW}-{high}")

"""The two servers the differential tests compare: Debian's libvirtd 9.0 with only its secret
driver (bench/bench_rpc.py's `start_libvirtd`: a private socket directory in its own mount
namespace, auth none) and secretbusd as the system instance serving RPC only. Both are opened
as `secret:///system`, so that private values and the URI compare like for like."""
from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from .benchmods import load_bench
from .secretbusd import Secretbusd

bench_rpc = load_bench("bench_rpc")


def missing_libvirtd() -> str | None:
    """Why libvirtd 9.0 with its secret driver cannot be started here, or None."""
    if not bench_rpc.LIBVIRTD.exists():
        return "libvirtd 9.0 (libvirt-daemon) not installed"
    if not (bench_rpc.DRIVER_DIR / "libvirt_driver_secret.so").exists():
        return "libvirtd's secret driver (libvirt_driver_secret.so) missing"
    return None


def accepting(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:`port` (a libvirtd's TLS or TCP listener)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _ready(start: Callable[[], Any]) -> Any:
    try:
        return start()
    except SystemExit as e:          # bench_rpc's way of failing (the server's log is in it)
        pytest.fail(str(e))


def start_libvirtd(procs: Any, work: Path, store: Path, n: int) -> Any:
    """libvirtd with a copy of `store` (its config dir: work/lv/etc/secrets), added to `procs`
    (a bench_rpc.Procs), ready when it serves `n` secrets: a bench_rpc.Server."""
    return _ready(lambda: bench_rpc.start_libvirtd(procs, work, store, n))


def start_libvirtd_on_bus(procs: Any, work: Path, bus_socket: str, conf_lines: Iterable[str],
                          n: int = 0) -> Any:
    """libvirtd as start_libvirtd, but with an empty store, its system bus being the private
    bus at `bus_socket` (so a polkitd on that bus is the one it asks), `conf_lines` in its
    libvirtd.conf (e.g. auth_unix_rw = "polkit", access_drivers = [ "polkit" ],
    unix_sock_rw_perms = "0777") and its socket directory work/lv/sock reachable by any uid.
    Ready when it serves `n` secrets (to root, which polkit auth lets in without asking):
    a bench_rpc.Server on work/lv/sock/libvirt-sock."""
    why = missing_libvirtd()
    if why:
        pytest.skip(why)
    empty = work / "empty-store"
    empty.mkdir(mode=0o700, parents=True)
    return _ready(lambda: bench_rpc.start_libvirtd(procs, work, empty, n, conf=tuple(conf_lines),
                                                   bus_socket=bus_socket, public=True))


def start_secretbusd(daemons: list[Secretbusd], work: Path, store: Path | None, n: int) -> Any:
    """secretbusd --system --no-dbus --rpc-dir with a copy of `store` (its config dir:
    work/sb-root/etc/secrets), added to `daemons` (its harness emulates the journal the system
    instance's value-read audit requires), ready when it serves `n` secrets: a bench_rpc.Server."""
    root, sock = work / "sb-root", work / "sb-sock"
    (root / "etc").mkdir(mode=0o700, parents=True)
    if store is not None:
        shutil.copytree(store, root / "etc" / "secrets")
    sock.mkdir(mode=0o700)
    no_bus: Any = SimpleNamespace(address="unix:path=/nonexistent")     # --no-dbus: never used
    d = Secretbusd(no_bus, system=True, root=root, args=("--no-dbus", "--rpc-dir", str(sock)))
    daemons.append(d)
    d.start(wait=False)
    s = bench_rpc.Server("secretbusd", "secret:///system", sock / "virtsecretd-sock", d.proc)
    _ready(lambda: bench_rpc.wait_ready(s, n, d.log_path, timeout=30))
    return s

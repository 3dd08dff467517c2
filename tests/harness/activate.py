#!/usr/bin/env python3
"""Socket activation as systemd does it, for tests: bind the listening sockets, put them at
fds 3, 4, … with LISTEN_FDS / LISTEN_PID / LISTEN_FDNAMES set, and exec the command (so it
keeps this PID, which LISTEN_PID names).

    activate.py --socket NAME:MODE:PATH [--socket ...] [--unset-names] -- COMMAND [ARG]...

NAME is what systemd puts in LISTEN_FDNAMES (FileDescriptorName=, by default the .socket unit's
name), MODE is SocketMode= (octal). The parent directory is made 0755 (systemd's default
DirectoryMode=); a stale socket file at PATH is replaced, anything else at PATH is refused.
`--unset-names` leaves LISTEN_FDNAMES out, as a systemd older than 227 would.
`socket_specs()` reads the specs from .socket unit files (ListenStream=, SocketMode=,
FileDescriptorName=), with their paths moved for a test.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

SELF = Path(__file__).resolve()
FIRST_FD = 3


@dataclass(frozen=True)
class SocketSpec:
    name: str
    mode: int
    path: Path

    def arg(self) -> str:
        return f"{self.name}:{self.mode:o}:{self.path}"

    @classmethod
    def parse(cls, text: str) -> SocketSpec:
        name, mode, path = text.split(":", 2)
        return cls(name, int(mode, 8), Path(path))


def _unit_values(path: Path) -> dict[str, str]:
    """The [Socket] keys of a unit file (the last value of each)."""
    out: dict[str, str] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Socket" and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def socket_specs(units: list[Path], move: dict[str, Path] | None = None) -> list[SocketSpec]:
    """What systemd would bind for these .socket units; `move` maps a unit's directory (e.g.
    /run/libvirt) to a test directory."""
    specs = []
    for unit in units:
        keys = _unit_values(unit)
        path = keys["ListenStream"]
        for old, new in (move or {}).items():
            if path.startswith(old.rstrip("/") + "/"):
                path = str(new) + path[len(old.rstrip("/")):]
        specs.append(SocketSpec(keys.get("FileDescriptorName", unit.name), int(keys.get("SocketMode", "0666"), 8),
                                Path(path)))
    return specs


def argv(specs: list[SocketSpec], *, names: bool = True) -> list[str]:
    """The launcher's command line, to which the command is appended."""
    return [sys.executable, str(SELF), *[x for s in specs for x in ("--socket", s.arg())],
            *([] if names else ["--unset-names"]), "--"]


def bind(spec: SocketSpec) -> socket.socket:
    spec.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        st = spec.path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SystemExit(f"activate: {spec.path} exists and is not a socket")
        spec.path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(spec.path))
    os.chmod(spec.path, spec.mode)
    sock.listen(socket.SOMAXCONN)
    return sock


def main(args: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", action="append", default=[], type=SocketSpec.parse, metavar="NAME:MODE:PATH")
    p.add_argument("--unset-names", action="store_true")
    p.add_argument("command", nargs=argparse.REMAINDER)
    ns = p.parse_args(args)
    if ns.command[:1] != ["--"] or len(ns.command) < 2:
        p.error("missing -- COMMAND")
    socks = [bind(s) for s in ns.socket]
    # Out of the way first (above every target fd), then onto 3, 4, … without FD_CLOEXEC.
    high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, FIRST_FD + len(socks)) for s in socks]
    for s in socks:
        s.close()
    for i, fd in enumerate(high):
        os.dup2(fd, FIRST_FD + i, inheritable=True)
        os.close(fd)
    env = dict(os.environ)
    env.update(LISTEN_FDS=str(len(socks)), LISTEN_PID=str(os.getpid()))
    if ns.unset_names:
        env.pop("LISTEN_FDNAMES", None)
    else:
        env["LISTEN_FDNAMES"] = ":".join(s.name for s in ns.socket)
    cmd = ns.command[1:]
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main(sys.argv[1:])

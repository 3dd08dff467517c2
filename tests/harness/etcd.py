"""Real etcd (Debian's etcd-server) for the fleet tests: one member or a three-member cluster
on loopback, in a temporary directory, on free ports; every member is stopped by PID."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.procs import spawn, stop_process, wait_until

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Member:
    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    root: Path
    members: list[Member] = field(default_factory=list)
    token: str = "secretbus-test"

    @classmethod
    def create(cls, root: Path, size: int = 1) -> EtcdCluster:
        root.mkdir(parents=True, exist_ok=True)
        c = cls(root)
        for i in range(size):
            name = f"m{i}"
            c.members.append(Member(name, root / name, free_port(), free_port(), root / f"{name}.log"))
        return c

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, member: Member | None = None, *, new: bool = True) -> None:
        for m in [member] if member is not None else self.members:
            self._start(m, new)
        for m in [member] if member is not None else self.members:
            wait_until(lambda m=m: self.healthy(m), timeout=60, interval=0.1,
                       what=f"etcd {m.name} on {m.client_url}", proc=m.proc, log=m.log)

    def _start(self, m: Member, new: bool) -> None:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        argv = [ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", initial, "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new",
                # loopback, a loaded machine: quick elections but tolerant of stalls
                "--heartbeat-interval", "100", "--election-timeout", "1500"]
        m.proc = spawn(argv, what=f"etcd {m.name}", log=m.log)

    def healthy(self, m: Member) -> bool:
        try:
            with urllib.request.urlopen(m.client_url + "/health", timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def stop(self, member: Member | None = None) -> None:
        for m in [member] if member is not None else self.members:
            stop_process(m.proc)
            m.proc = None

    def kill(self, member: Member) -> None:
        if member.proc is not None:
            member.proc.kill()
        self.stop(member)

    def dump(self) -> bytes:
        """Every key and value etcd holds now (raw), for scanning."""
        out = subprocess.run(["etcdctl", "--endpoints", ",".join(self.endpoints), "get", "", "--from-key",
                              "-w", "json"], capture_output=True, check=True,
                             env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
        return out.stdout

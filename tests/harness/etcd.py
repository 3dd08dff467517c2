"""Real etcd (Debian's etcd-server) for the fleet tests: one member or a three-member cluster
on loopback, in a temporary directory, on free ports; every member is stopped by PID."""
from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.ports import free_port
from tests.harness.procs import spawn, stop_process, wait_until

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, d: Path, client_cn: str = "secretbus-host") -> Pki:
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=secretbus test CA")
        # etcd 3.4's gRPC gateway dials its own gRPC server with the server certificate: it
        # needs clientAuth too when --client-cert-auth is on.
        for name, cn, ext in (("server", "127.0.0.1",
                               "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"),
                              ("client", client_cn, "extendedKeyUsage=clientAuth")):
            (d / f"{name}.ext").write_text(ext + "\n")
            run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
            run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
        for k in d.glob("*.key"):
            k.chmod(0o600)
        return cls(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


@dataclass
class Member:
    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    log: Path
    proc: subprocess.Popen | None = None
    scheme: str = "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    root: Path
    members: list[Member] = field(default_factory=list)
    token: str = "secretbus-test"
    pki: Pki | None = None      # clients over TLS with client certificates (--client-cert-auth)

    @classmethod
    def create(cls, root: Path, size: int = 1, pki: Pki | None = None) -> EtcdCluster:
        root.mkdir(parents=True, exist_ok=True)
        c = cls(root, pki=pki)
        for i in range(size):
            name = f"m{i}"
            c.members.append(Member(name, root / name, free_port(), free_port(), root / f"{name}.log",
                                    scheme="https" if pki else "http"))
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
        if self.pki is not None:
            argv += ["--cert-file", str(self.pki.server_cert), "--key-file", str(self.pki.server_key),
                     "--trusted-ca-file", str(self.pki.ca), "--client-cert-auth"]
        m.proc = spawn(argv, what=f"etcd {m.name}", log=m.log)

    def healthy(self, m: Member) -> bool:
        ctx = None
        if self.pki is not None:
            ctx = ssl.create_default_context(cafile=str(self.pki.ca))
            ctx.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        try:
            with urllib.request.urlopen(m.client_url + "/health", timeout=2, context=ctx) as r:
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

"""A private OpenSSH server on loopback for the secret+ssh:// tests, and a client set-up for it.

`Sshd(...).start()` runs Debian's /usr/sbin/sshd in the foreground on a free 127.0.0.1 port with
its own host key, its own sshd_config and one authorised client key for each of `users`, and
`stop()` ends it by PID. Nothing of the machine's ssh set-up is used or changed:

* server: `-f` names our sshd_config (no PAM: pubkey only, keys from our own directory);
  `SetEnv PATH=` gives the sessions a bin directory holding exactly the programs the test wants
  the remote side to have (`programs`: "secretbus", "virt-ssh-helper", "nc"), so "no bridge",
  "only virt-ssh-helper" and "only nc" are all real remote hosts;
* `libvirt_run=DIR`: sshd runs in its own mount namespace where /run is a fresh tmpfs and DIR is
  bind-mounted at /run/libvirt, so that the remote side's *default* socket
  (/var/run/libvirt/virtsecretd-sock, which virt-ssh-helper and `ssh-bridge` pick with mode=auto)
  is the test's secretbusd, while the host's /run/libvirt is never touched;
* client: `ssh_command` is a wrapper for libvirt's `command=` URI parameter that runs
  /usr/bin/ssh with `-F client/ssh_config` (our known_hosts, IdentitiesOnly, no global files), so
  neither virsh nor secretbus reads or writes ~/.ssh. `uri()` builds a secret+ssh:// URI.

Test user: `ensure_ssh_user()` makes `sbtest-ssh`, a non-root system user with a real shell
(sshd runs the remote command through it) and a non-locked password field ('*': with UsePAM no,
sshd refuses accounts whose password starts with '!').
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

from .ports import free_port
from .procs import HarnessError, log_tail, public_tempdir, remove_tree, spawn, stop_process
from .users import LOCK_FILE, User, lookup_user

SSHD = "/usr/sbin/sshd"          # sshd re-executes itself and insists on an absolute path
SSH = "/usr/bin/ssh"
SSH_USER = "sbtest-ssh"
REPO = Path(__file__).resolve().parents[2]
BASE_PROGRAMS = ("sh", "grep", "id", "which")  # what the remote scripts (ours, libvirt's) need


def ensure_ssh_user(name: str = SSH_USER) -> User:
    import fcntl
    import pwd
    os.makedirs(os.path.dirname(LOCK_FILE), exist_ok=True)
    with open(LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", "--home-dir", "/",
                            "--shell", "/bin/sh", "--password", "*", name], check=True, capture_output=True)
    return lookup_user(name)


def _keygen(path: Path, comment: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return Path(f"{path}.pub").read_text().strip()


def _which(name: str) -> str:
    for d in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    raise HarnessError(f"{name} is not installed (scripts/setup.sh installs it)")


class Sshd:
    def __init__(self, *, users: tuple[str, ...] = ("root",), programs: tuple[str, ...] = ("secretbus", "nc"),
                 libvirt_run: Path | None = None, secretbus_pythonpath: str | None = None):
        self.users = users
        self.programs = programs
        self.libvirt_run = libvirt_run
        # Where the remote `secretbus` finds the package (a copy other uids can read, for
        # non-root users; the repository otherwise).
        self.secretbus_pythonpath = secretbus_pythonpath or str(REPO)
        self.dir = public_tempdir("sb-sshd-")
        self.client_dir = self.dir / "client"
        self.bin = self.dir / "bin"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "sshd.log"

    # -- files ------------------------------------------------------------------------
    @property
    def keyfile(self) -> Path:
        return self.client_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.client_dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.client_dir / "ssh_config"

    @property
    def ssh_command(self) -> Path:
        return self.client_dir / "ssh"

    def _bin_dir(self) -> None:
        self.bin.mkdir(mode=0o755)
        for name in BASE_PROGRAMS + tuple(p for p in self.programs if p != "secretbus"):
            (self.bin / name).symlink_to(_which(name))
        if "secretbus" in self.programs:
            wrapper = self.bin / "secretbus"
            python = sys.executable if self.secretbus_pythonpath == str(REPO) else "/usr/bin/python3"
            wrapper.write_text("#!/bin/sh\n"
                               f"PYTHONPATH={shlex.quote(self.secretbus_pythonpath)} "
                               f"exec {shlex.quote(python)} -m secretbus.cli \"$@\"\n")
            wrapper.chmod(0o755)

    def _client_files(self, host_pub: str) -> None:
        self.client_dir.mkdir(mode=0o700)
        _keygen(self.keyfile, "secretbus-test-client")
        key_type, key = host_pub.split()[:2]
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {key_type} {key}\n")
        self.ssh_config.write_text(
            "# secretbus tests: nothing from ~/.ssh or /etc/ssh/ssh_config\n"
            f"UserKnownHostsFile {self.known_hosts}\n"
            "GlobalKnownHostsFile /dev/null\n"
            "StrictHostKeyChecking yes\n"
            "IdentitiesOnly yes\n"
            "BatchMode yes\n"
            "ConnectTimeout 10\n")
        self.ssh_command.write_text(f"#!/bin/sh\nexec {SSH} -F {shlex.quote(str(self.ssh_config))} \"$@\"\n")
        self.ssh_command.chmod(0o755)

    def _server_files(self) -> Path:
        keys = self.dir / "authorized_keys"
        keys.mkdir(mode=0o755)
        pub = Path(f"{self.keyfile}.pub").read_text()
        for user in self.users:
            (keys / user).write_text(pub)
            (keys / user).chmod(0o644)
        conf = self.dir / "sshd_config"
        conf.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\n"
            f"HostKey {self.dir / 'host_ed25519_key'}\nPidFile none\n"
            "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            f"AuthorizedKeysFile {keys}/%u\n"
            # The key files sit under /tmp (world-writable, sticky), which StrictModes rejects
            # as a parent directory; they are root-owned 0644 in root-owned 0755 directories.
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            f"AllowUsers {' '.join(self.users)}\n"
            f"SetEnv PATH={self.bin}\n"
            "PrintMotd no\nPrintLastLog no\nPermitUserEnvironment no\nX11Forwarding no\nAllowTcpForwarding no\n"
            "LogLevel VERBOSE\n")
        return conf

    # -- running ------------------------------------------------------------------------
    def _argv(self, conf: Path) -> list[str]:
        sshd = [SSHD, "-D", "-e", "-f", str(conf)]
        if self.libvirt_run is None:
            return sshd
        setup = ("mount -t tmpfs -o mode=0755 sb-sshd-run /run && mkdir -m 0755 /run/sshd /run/libvirt && "
                 f"mount --bind {shlex.quote(str(self.libvirt_run))} /run/libvirt && exec \"$@\"")
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", setup, "sh", *sshd]

    def start(self, timeout: float = 20) -> Sshd:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)   # sshd's privilege-separation directory
        host_pub = _keygen(self.dir / "host_ed25519_key", "secretbus-test-host")
        self._bin_dir()
        for attempt in range(3):
            self.port = free_port()
            if attempt == 0:
                self._client_files(host_pub)
            else:
                key_type, key = host_pub.split()[:2]
                self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {key_type} {key}\n")
            conf = self._server_files() if attempt == 0 else self._rewrite_port()
            self.proc = spawn(self._argv(conf), what="sshd", log=self.log_path)
            if self._wait_listening(timeout):
                return self
            stop_process(self.proc)
        raise HarnessError(f"sshd did not start{log_tail(self.log_path)}")

    def _rewrite_port(self) -> Path:
        conf = self.dir / "sshd_config"
        lines = [f"Port {self.port}" if ln.startswith("Port ") else ln for ln in conf.read_text().splitlines()]
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False       # e.g. the port was taken meanwhile: try another
            if "Server listening on" in self.log():
                return True
            time.sleep(0.02)
        raise HarnessError(f"sshd: not listening after {timeout} s{log_tail(self.log_path)}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        remove_tree(self.dir)

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- clients --------------------------------------------------------------------------
    def uri(self, user: str = "root", instance: str = "system", *, hermetic: bool = True, **params: str) -> str:
        """secret+ssh://user@127.0.0.1:PORT/instance?keyfile=…&known_hosts=…&no_tty=1[&command=…]&…;
        `hermetic` adds command= (our ssh wrapper: no ~/.ssh)."""
        q: dict[str, str] = {"keyfile": str(self.keyfile), "known_hosts": str(self.known_hosts), "no_tty": "1"}
        if hermetic:
            q["command"] = str(self.ssh_command)
        q.update(params)
        return f"secret+ssh://{user}@127.0.0.1:{self.port}/{instance}?{urlencode(q)}"

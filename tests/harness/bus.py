"""Private dbus-daemon instances and the busctl / gdbus command-line clients."""
from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import time
from pathlib import Path
from xml.sax.saxutils import escape

from .procs import HarnessError, log_tail, public_tempdir, remove_tree, spawn, stop_process, wait_until
from .users import User, run_as

DOCTYPE = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
"""

# The bus owner's own uid is the only one admitted (dbus-daemon's default with no <allow user>).
SESSION_POLICY = """\
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
"""

# Debian's /usr/share/dbus-1/system.conf default-deny policy, but any uid may connect.
SYSTEM_POLICY = """\
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Containers1"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>
  <!-- as Debian's org.freedesktop.PolicyKit1.conf: polkitd owns its name, anyone may call it -->
  <policy user="polkitd">
    <allow own="org.freedesktop.PolicyKit1"/>
    <allow send_interface="org.freedesktop.PolicyKit1.AuthenticationAgent"/>
  </policy>
  <policy context="default">
    <allow send_destination="org.freedesktop.PolicyKit1"/>
  </policy>
"""

KINDS = ("session", "system")


class PrivateBus:
    """A dbus-daemon of our own, on a socket in a fresh 0755 directory.

    kind="session": allow-all policy; only the bus owner's uid may connect. The owner is root,
      or `user` (the daemon switches to that user with <user>, as a real session bus runs as
      its user; root may then not connect).
    kind="system": Debian's default-deny system policy, any uid may connect, polkitd may own
      org.freedesktop.PolicyKit1, and <includedir> of `policy_dir`, into which `policy_files`
      are copied before start (or later with add_policy()).
    `extra_config` is raw XML inserted into <busconfig> (e.g. <servicedir>).
    """

    def __init__(self, kind: str = "session", *, user: User | str | None = None,
                 policy_files=(), extra_config: str = "", start_timeout: float = 10):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        self.kind = kind
        self.user = user.name if isinstance(user, User) else user
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self._policy_files = list(policy_files)
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    # paths -------------------------------------------------------------
    @property
    def socket_path(self) -> str:
        return str(self.dir / "socket")

    @property
    def address(self) -> str:
        return f"unix:path={self.socket_path}"

    @property
    def policy_dir(self) -> Path:
        return self.dir / "policy.d"

    @property
    def config_path(self) -> Path:
        return self.dir / "bus.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "dbus-daemon.log"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def env(self) -> dict[str, str]:
        """Environment variables pointing clients of this kind at this bus."""
        var = "DBUS_SYSTEM_BUS_ADDRESS" if self.kind == "system" else "DBUS_SESSION_BUS_ADDRESS"
        return {var: self.address}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # life cycle ----------------------------------------------------------
    def config_text(self) -> str:
        parts = [DOCTYPE, "<busconfig>\n", f"  <type>{self.kind}</type>\n"]
        if self.user:
            parts.append(f"  <user>{escape(self.user)}</user>\n")
        parts += [f"  <listen>unix:path={escape(self.socket_path)}</listen>\n",
                  "  <auth>EXTERNAL</auth>\n",
                  SESSION_POLICY if self.kind == "session" else SYSTEM_POLICY,
                  f"  <includedir>{escape(str(self.policy_dir))}</includedir>\n",
                  self.extra_config, "</busconfig>\n"]
        return "".join(parts)

    def start(self) -> PrivateBus:
        t0 = time.monotonic()
        self.dir = public_tempdir(f"sb-{self.kind}bus-")
        try:
            self.policy_dir.mkdir(mode=0o755)
            for f in self._policy_files:
                self._copy_policy(f)
            self.config_path.write_text(self.config_text())
            self.proc = spawn(["dbus-daemon", f"--config-file={self.config_path}", "--nofork",
                               "--nopidfile", "--print-address=1"],
                              what=f"dbus-daemon ({self.kind})", log=self.log_path,
                              stdout=subprocess.PIPE)
            with self.proc.stdout:
                line = _read_line(self.proc, self.start_timeout)
            if not line.startswith("unix:path="):
                raise HarnessError(f"dbus-daemon did not start: {line!r}{log_tail(self.log_path)}")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        remove_tree(self.dir)

    def restart(self) -> None:
        """Kill the bus daemon and start a new one at the same address: every client loses
        its connection (as when the system bus restarts)."""
        stop_process(self.proc)
        Path(self.socket_path).unlink(missing_ok=True)
        self.proc = spawn(["dbus-daemon", f"--config-file={self.config_path}", "--nofork",
                           "--nopidfile", "--print-address=1"],
                          what=f"dbus-daemon ({self.kind})", log=self.log_path, stdout=subprocess.PIPE)
        with self.proc.stdout:
            line = _read_line(self.proc, self.start_timeout)
        if not line.startswith("unix:path="):
            raise HarnessError(f"dbus-daemon did not restart: {line!r}{log_tail(self.log_path)}")

    def __enter__(self) -> PrivateBus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # policy ------------------------------------------------------------
    def _copy_policy(self, src) -> Path:
        src = Path(src)
        if not src.name.endswith(".conf"):
            raise ValueError(f"dbus-daemon only includes *.conf files: {src}")
        dest = self.policy_dir / src.name
        shutil.copyfile(src, dest)
        dest.chmod(0o644)
        return dest

    def add_policy(self, src, *, reload: bool = True) -> Path:
        """Copy a policy file into the include dir; reload the running bus synchronously."""
        dest = self._copy_policy(src)
        if reload and self.proc is not None:
            self.reload()
        return dest

    def reload(self) -> None:
        busctl(self.address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
               "org.freedesktop.DBus", "ReloadConfig", check=True)

    # queries -----------------------------------------------------------
    def name_has_owner(self, name: str) -> bool:
        r = busctl(self.address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                   "org.freedesktop.DBus", "NameHasOwner", "s", name)
        return r.returncode == 0 and r.stdout.strip() == "b true"

    def wait_for_name(self, name: str, *, timeout: float = 10,
                      proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
        """Wait until `name` has an owner; fail early if `proc` (the would-be owner) exits."""
        wait_until(lambda: self.name_has_owner(name), timeout=timeout, proc=proc, log=log,
                   what=f"waiting for {name} on {self.address}")


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line `proc` prints, within `timeout` seconds."""
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"no output within {timeout} s")
            if sel.select(left):
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
    return buf.decode(errors="replace").strip()


def busctl(address: str, *args: str, user=None, timeout: float = 30, check: bool = False,
           **kw) -> subprocess.CompletedProcess:
    """`busctl --address=ADDRESS ARGS…` (as `user` if given), text output captured."""
    return run_as(user, ["busctl", f"--address={address}", "--no-pager", *args],
                  timeout=timeout, check=check, **kw)


def gdbus(address: str, command: str, *args: str, user=None, timeout: float = 30,
          check: bool = False, **kw) -> subprocess.CompletedProcess:
    """`gdbus COMMAND --address ADDRESS ARGS…` (as `user` if given), text output captured."""
    return run_as(user, ["gdbus", command, "--address", address, *args],
                  timeout=timeout, check=check, **kw)

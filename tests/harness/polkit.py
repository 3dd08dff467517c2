"""polkitd attached to a private system-type bus, and polkit action / rules files for a run."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from .bus import PrivateBus
from .procs import public_tempdir, remove_tree, spawn, stop_process, wait_until

POLKITD = "/usr/lib/polkit-1/polkitd"
ACTIONS_DIR = Path("/usr/share/polkit-1/actions")
RULES_DIR = Path("/etc/polkit-1/rules.d")
BUS_NAME = "org.freedesktop.PolicyKit1"
AUTHORITY_PATH = "/org/freedesktop/PolicyKit1/Authority"
AUTHORITY_IFACE = "org.freedesktop.PolicyKit1.Authority"


def _source(item) -> tuple[str, bytes]:
    """A file to install: a path, or a (file name, text) pair."""
    if isinstance(item, tuple):
        name, content = item
        return name, content.encode() if isinstance(content, str) else content
    path = Path(item)
    return path.name, path.read_bytes()


class PolkitFiles:
    """Installs polkit actions (*.policy → the actions dir) and rules (*.rules → the rules dir,
    root-owned 0644 so that user polkitd can read them); uninstall() removes them and puts
    back any file of the same name that was there before. The dirs default to the host's
    (/usr/share/polkit-1/actions, /etc/polkit-1/rules.d); a `Polkitd` gives its own private
    ones (`Polkitd.add_files`). polkitd watches both, but installing before it starts avoids
    the reload delay."""

    def __init__(self, actions=(), rules=(), *, actions_dir: Path = ACTIONS_DIR, rules_dir: Path = RULES_DIR):
        self._items = ([(Path(actions_dir), ".policy", a) for a in actions]
                       + [(Path(rules_dir), ".rules", r) for r in rules])
        self._installed: list[tuple[Path, bytes | None, int | None]] = []

    def install(self) -> PolkitFiles:
        try:
            for directory, suffix, item in self._items:
                name, content = _source(item)
                if not name.endswith(suffix) or "/" in name:
                    raise ValueError(f"polkit ignores {name!r} in {directory} (needs *{suffix})")
                self.add(directory / name, content)
        except BaseException:
            self.uninstall()
            raise
        return self

    def add(self, dest: Path, content: bytes) -> None:
        old = old_mode = None
        if dest.exists():
            old, old_mode = dest.read_bytes(), dest.stat().st_mode & 0o7777
        self._installed.append((dest, old, old_mode))
        tmp = dest.with_name(f".{dest.name}.sbtest")
        tmp.write_bytes(content)
        os.chown(tmp, 0, 0)
        tmp.chmod(0o644)
        os.replace(tmp, dest)  # polkitd's inotify sees one complete file

    def uninstall(self) -> None:
        while self._installed:
            dest, old, old_mode = self._installed.pop()
            if old is None:
                dest.unlink(missing_ok=True)
            else:
                dest.write_bytes(old)
                dest.chmod(old_mode)

    def __enter__(self) -> PolkitFiles:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


# polkitd reads actions and rules from fixed host directories. Each test polkitd runs in a
# private mount namespace with its own empty directories bound over them, so tests (and
# anything else on the machine) never see each other's files, and a crashed run leaves
# nothing behind in the host's polkit configuration.
_PRIVATE_DIRS = """set -e
mount --bind "$1" /usr/share/polkit-1/actions
mount --bind "$2" /etc/polkit-1/rules.d
mount --bind "$3" /usr/share/polkit-1/rules.d
exec "$4"
"""


class Polkitd:
    """/usr/lib/polkit-1/polkitd (it drops to user polkitd by itself) on `bus`, a running
    system-type PrivateBus, with private actions and rules directories (`actions_dir`,
    `rules_dir`). start() installs `actions` / `rules` there, starts the daemon and returns
    once it owns org.freedesktop.PolicyKit1. Nothing touches the host's system bus or its
    polkit files, so a polkitd already serving the host is left alone."""

    def __init__(self, bus: PrivateBus, *, actions=(), rules=(), start_timeout: float = 15):
        if bus.kind != "system":
            raise ValueError("polkitd needs a system-type bus")
        self.bus = bus
        self._actions, self._rules = actions, rules
        self.files: PolkitFiles | None = None
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @property
    def actions_dir(self) -> Path:
        return self.dir / "actions"

    @property
    def rules_dir(self) -> Path:
        return self.dir / "rules.d"

    def add_files(self, actions=(), rules=()) -> PolkitFiles:
        """Files for this polkitd's private dirs (call .install(), or use as a context manager)."""
        return PolkitFiles(actions, rules, actions_dir=self.actions_dir, rules_dir=self.rules_dir)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.dir / "polkitd.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Polkitd:
        if not os.access(POLKITD, os.X_OK):
            raise FileNotFoundError(f"{POLKITD} not found (apt-get install polkitd)")
        t0 = time.monotonic()
        self.dir = public_tempdir("sb-polkitd-")
        try:
            for d in (self.actions_dir, self.rules_dir, self.dir / "share-rules.d"):
                d.mkdir(mode=0o755)
            self.files = self.add_files(self._actions, self._rules).install()
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("DBUS_", "NOTIFY_SOCKET", "LISTEN_"))}
            env["DBUS_SYSTEM_BUS_ADDRESS"] = self.bus.address
            # unshare and sh exec in place: the PID we track is polkitd's own.
            argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _PRIVATE_DIRS, "sh",
                    str(self.actions_dir), str(self.rules_dir), str(self.dir / "share-rules.d"), POLKITD]
            self.proc = spawn(argv, what="polkitd", log=self.log_path, env=env)
            self.bus.wait_for_name(BUS_NAME, timeout=self.start_timeout, proc=self.proc,
                                   log=self.log_path)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        if self.files is not None:
            self.files.uninstall()
        remove_tree(self.dir)

    def __enter__(self) -> Polkitd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_for_log(self, text: str, *, timeout: float = 5) -> None:
        """Wait until polkitd's log contains `text` (e.g. "Reloading rules")."""
        wait_until(lambda: text in self.log(), timeout=timeout, what=f"polkitd log {text!r}",
                   proc=self.proc, log=self.log_path)


def check_authorization_argv(address: str, action: str, *, pid: str | int = "$$",
                             details: str = "{}", flags: int = 0) -> list[str]:
    """argv that asks polkit (CheckAuthorization, subject unix-process) whether process `pid`
    may do `action`. With pid "$$" it runs gdbus through `sh -c 'exec …'`, so the subject is
    the gdbus process itself (whoever runs it). Output: `((authorized, challenge, {details}),)`."""
    script = ('exec gdbus call --address "$1" --dest org.freedesktop.PolicyKit1'
              f' --object-path {AUTHORITY_PATH} --method {AUTHORITY_IFACE}.CheckAuthorization'
              f""" "('unix-process', {{'pid': <uint32 {pid}>, 'start-time': <uint64 0>}})" """
              '"$2" "$3" "$4" ""')
    return ["sh", "-c", script, "sh", address, action, details, str(flags)]


def parse_check_result(stdout: str) -> tuple[bool, bool]:
    """(authorized, challenge) from gdbus's printout of CheckAuthorization's reply."""
    text = stdout.strip()
    if not text.startswith("(("):
        raise ValueError(f"unexpected CheckAuthorization output: {stdout!r}")
    first, second = [t.strip() for t in text[2:].split(",")[:2]]
    return first == "true", second == "true"

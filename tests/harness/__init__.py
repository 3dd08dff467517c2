"""Integration-test harness: private dbus-daemons, polkitd, test users, unprivileged Python,
a NOTIFY_SOCKET stand-in, and the busctl / gdbus clients. Every process it starts is tracked
by PID (procs.STARTED) and stopped by PID; nothing depends on the host's buses or PID 1."""
from .benchmods import load_bench
from .bus import PrivateBus, busctl, gdbus
from .diskdir import disk_tempdir
from .notify import Notification, NotifySocket
from .polkit import Polkitd, PolkitFiles, check_authorization_argv, parse_check_result
from .procs import HarnessError, leftover_processes, pid_alive, public_tempdir, spawn, stop_process, wait_until
from .secretbusd import Secretbusd
from .unpriv import UnprivPython, unpriv_python
from .users import User, UserPair, as_user, ensure_user, lookup_user, run_as, user_env

__all__ = [
    "HarnessError", "load_bench", "Notification", "Secretbusd", "NotifySocket", "PolkitFiles", "Polkitd", "PrivateBus",
    "UnprivPython", "User", "as_user", "busctl", "check_authorization_argv", "disk_tempdir", "ensure_user",
    "gdbus", "leftover_processes", "lookup_user", "parse_check_result", "pid_alive",
    "public_tempdir", "run_as", "spawn", "stop_process", "unpriv_python", "user_env",
    "UserPair", "wait_until",
]

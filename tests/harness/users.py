"""Test users and running commands as them (setpriv)."""
from __future__ import annotations

import fcntl
import grp
import os
import pwd
import subprocess
from dataclasses import dataclass
from typing import NamedTuple

from .procs import HarnessError

LOCK_FILE = "/run/lock/secretbus-test-users.lock"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[str, ...]  # supplementary groups from /etc/group

    @property
    def home(self) -> str:
        return pwd.getpwuid(self.uid).pw_dir


class UserPair(NamedTuple):
    """The two test users of the `test_users` fixture."""
    member: User  # in group libvirt
    other: User   # in no extra group


def _supplementary(name: str) -> tuple[str, ...]:
    return tuple(sorted(g.gr_name for g in grp.getgrall() if name in g.gr_mem))


def lookup_user(name: str) -> User:
    pw = pwd.getpwnam(name)
    return User(name, pw.pw_uid, pw.pw_gid, _supplementary(name))


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")


def ensure_group(name: str) -> None:
    try:
        grp.getgrnam(name)
    except KeyError:
        _run(["groupadd", "--system", name])


def ensure_user(name: str, groups=()) -> User:
    """A system user without home directory or login shell whose supplementary groups are
    exactly `groups` (groups are created when missing). Idempotent; safe across processes."""
    want = tuple(sorted(set(groups)))
    os.makedirs(os.path.dirname(LOCK_FILE), exist_ok=True)
    with open(LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for g in want:
            ensure_group(g)
        try:
            pwd.getpwnam(name)
        except KeyError:
            _run(["useradd", "--system", "--no-create-home", "--user-group",
                  "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                  *(["--groups", ",".join(want)] if want else []), name])
        if _supplementary(name) != want:
            _run(["usermod", "--groups", ",".join(want), name])
    user = lookup_user(name)
    if user.groups != want:
        raise HarnessError(f"user {name}: groups {user.groups}, wanted {want}")
    return user


def _user(user: User | str) -> User:
    return user if isinstance(user, User) else lookup_user(user)


def as_user(user: User | str, argv: list[str]) -> list[str]:
    """`argv` prefixed so that it runs with the user's uid, primary gid and /etc/group groups."""
    u = _user(user)
    return ["setpriv", f"--reuid={u.uid}", f"--regid={u.gid}", "--init-groups", "--", *argv]


def user_env(user: User | str, base: dict | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: our environment) with HOME/USER/LOGNAME of `user` and without
    XDG_RUNTIME_DIR, plus `extra`."""
    u = _user(user)
    env = dict(os.environ if base is None else base)
    env.pop("XDG_RUNTIME_DIR", None)
    env.update(HOME=u.home, USER=u.name, LOGNAME=u.name)
    env.update(extra)
    return env


def run_as(user: User | str | None, argv: list[str], *, env: dict | None = None,
           timeout: float = 30, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run `argv` as `user` (None or "root": as ourselves) from cwd "/", capturing text output."""
    if user is None or user == "root":
        cmd, env = argv, env
    else:
        cmd, env = as_user(user, argv), env if env is not None else user_env(user)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("cwd", "/")
    return subprocess.run(cmd, env=env, timeout=timeout, check=check, **kw)

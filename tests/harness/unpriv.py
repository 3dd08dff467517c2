"""The project's Python code, runnable by other uids.

The repository and its .venv may sit under /root (0700), so other users can neither read the
package nor the venv. Once per test session the `secretbus` package and the installed
distributions it needs at run time (its requirements, recursively, without extras) are copied
into a 0755 directory; other users then run Debian's /usr/bin/python3 with PYTHONPATH on it.
The venv is made from that same interpreter, so compiled extensions load.
"""
from __future__ import annotations

import atexit
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .procs import HarnessError, public_tempdir, remove_tree
from .users import run_as, user_env

PYTHON = "/usr/bin/python3"
PACKAGE = "secretbus"


def _requirements(dist: md.Distribution) -> list[str]:
    names = []
    for req in dist.requires or ():
        try:
            from packaging.requirements import Requirement
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                names.append(r.name)
        except ImportError:  # packaging missing: skip anything with an extra marker
            if "extra" not in req.partition(";")[2]:
                names.append(re.match(r"[A-Za-z0-9._-]+", req).group())
    return names


def runtime_distributions(root: str = PACKAGE) -> list[md.Distribution]:
    """`root`'s distribution and everything it requires at run time."""
    seen: dict[str, md.Distribution] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        dist = md.distribution(name)
        seen[key] = dist
        todo += _requirements(dist)
    return list(seen.values())


class UnprivPython:
    """`argv(*args)` / `env()` run Python code with the copied packages; `run(user, *args)`
    runs it as `user` through setpriv."""

    python = PYTHON

    def __init__(self):
        t0 = time.monotonic()
        self._check_abi()
        self.dir = public_tempdir("sb-pylib-")
        self.site = self.dir / "site"
        try:
            self._copy()
        except BaseException:
            remove_tree(self.dir)
            raise
        self.copy_seconds = time.monotonic() - t0

    @staticmethod
    def _check_abi() -> None:
        out = subprocess.run([PYTHON, "-c", "import sys; print(sys.implementation.cache_tag)"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        if out != sys.implementation.cache_tag:
            raise HarnessError(f"{PYTHON} is {out!r} but the tests run {sys.implementation.cache_tag}"
                               f" ({sys.executable}): make the venv with {PYTHON}")

    def _copy(self) -> None:
        pkg = Path(__import__(PACKAGE).__file__).parent
        shutil.copytree(pkg, self.site / PACKAGE)
        for dist in runtime_distributions():
            base = Path(dist.locate_file(""))
            for f in dist.files or ():
                # no console scripts (../../bin), no editable-install hooks, no top-level .pth
                if ".." in f.parts or f.parts[0].startswith("__editable__") or f.suffix == ".pth":
                    continue
                src, dest = base / f, self.site / f
                if src.is_file():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest)
        for path in [self.dir, *self.dir.rglob("*")]:  # readable by all, writable by none
            path.chmod(0o755 if path.is_dir() else (0o755 if path.stat().st_mode & 0o111 else 0o644))

    @property
    def pythonpath(self) -> str:
        return str(self.site)

    def argv(self, *args: str) -> list[str]:
        return [PYTHON, *args]

    def env(self, base: dict | None = None, **extra: str) -> dict[str, str]:
        """`base` (default: our environment) with PYTHONPATH on the copy, no user site, no
        bytecode writes, plus `extra`."""
        env = dict(os.environ if base is None else base)
        env.update(PYTHONPATH=self.pythonpath, PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONHOME", None)
        env.update(extra)
        return env

    def run(self, user, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        """`/usr/bin/python3 ARGS…` as `user` (None: as ourselves) with these packages."""
        base = user_env(user, env) if user not in (None, "root") else env
        return run_as(user, self.argv(*args), env=self.env(base), **kw)

    def close(self) -> None:
        remove_tree(self.dir)


_instance: UnprivPython | None = None


def unpriv_python() -> UnprivPython:
    """The per-process copy, made on first use and removed at exit."""
    global _instance
    if _instance is None:
        _instance = UnprivPython()
        atexit.register(_instance.close)
    return _instance

"""The project's Python code, runnable by other uids.

The repository and its .venv may sit under /root (0700), so other users can neither read the
package nor the venv. Once per test session the `secretbus` package and the installed
distributions it needs at run time (its requirements, recursively, without extras) are copied
into a 0755 directory; other users then run Debian's /usr/bin/python3 with PYTHONPATH on it.
The venv is made from that same interpreter, so compiled extensions load.

A distribution's file list (RECORD) is not trusted to be complete: an sdist installed the legacy
way (pip without `wheel`) records no compiled modules. So each top-level package a distribution
owns is copied as a whole directory, and the copy is checked by importing every module in it
that is compiled, before any test relies on it.
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
                m = re.match(r"[A-Za-z0-9._-]+", req)
                if m:
                    names.append(m.group())
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


_IGNORE = shutil.ignore_patterns("__pycache__")
_METADATA = (".dist-info", ".egg-info")


def _top_levels(dist: md.Distribution) -> set[str]:
    """The top-level names (packages, modules, metadata dirs) `dist` installed into
    site-packages: from its file list, and from top_level.txt for what the list lacks."""
    names = set()
    for f in dist.files or ():
        # no console scripts (../../bin), no editable-install hooks, no top-level .pth
        if ".." in f.parts or f.parts[0].startswith("__editable__") or f.suffix == ".pth":
            continue
        names.add(f.parts[0])
    for name in (dist.read_text("top_level.txt") or "").split():
        names.add(name)
    return names


def _copy_distribution(dist: md.Distribution, site: Path) -> None:
    base = Path(str(dist.locate_file("")))
    for name in _top_levels(dist):
        # a module listed by its import name: name.py, or a compiled name.<abi>.so
        sources = [base / name] if (base / name).exists() else \
            [*base.glob(f"{name}.py"), *base.glob(f"{name}.*.so"), *base.glob(f"{name}.so")]
        for src in sources:
            dest = site / src.relative_to(base)
            if src.is_dir():
                # the whole package, also the modules its file list forgot (metadata: as listed)
                if not src.name.endswith(_METADATA):
                    shutil.copytree(src, dest, ignore=_IGNORE, dirs_exist_ok=True)
            elif src.is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
    for f in dist.files or ():
        if f.parts[0].endswith(_METADATA) and (base / f).is_file():
            (site / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(base / f, site / f)


def _module_name(rel: Path) -> str:
    """systemd/_daemon.cpython-311-x86_64-linux-gnu.so -> systemd._daemon"""
    return ".".join([*rel.parts[:-1], rel.name.split(".", 1)[0]])


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
        pkg = Path(str(__import__(PACKAGE).__file__)).parent
        shutil.copytree(pkg, self.site / PACKAGE, ignore=_IGNORE)
        for dist in runtime_distributions():
            _copy_distribution(dist, self.site)
        for path in [self.dir, *self.dir.rglob("*")]:  # readable by all, writable by none
            path.chmod(0o755 if path.is_dir() else (0o755 if path.stat().st_mode & 0o111 else 0o644))
        self._check_compiled_modules()

    def _check_compiled_modules(self) -> None:
        """Import every compiled module of the copy with PYTHON, so that a copy missing one
        fails here, naming it, rather than later as a puzzling failure of a test's client."""
        names = sorted({_module_name(p.relative_to(self.site)) for p in self.site.rglob("*.so")})
        code = ("import importlib, sys\n"
                "bad = []\n"
                "for n in sys.argv[1:]:\n"
                "    try: importlib.import_module(n)\n"
                "    except Exception as e: bad.append(f'{n}: {type(e).__name__}: {e}')\n"
                "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
        r = subprocess.run([PYTHON, "-c", code, PACKAGE, *names], env=self.env(), cwd="/",
                           capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise HarnessError(f"the copy in {self.site} does not import: {r.stdout.strip()}{r.stderr[-2000:]}")

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

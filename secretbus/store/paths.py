"""Where each kind of instance keeps its store, lock and secret.conf: the one kind → paths
mapping (system: /etc/libvirt, session: $XDG_CONFIG_HOME/libvirt, embedded: under a root)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from secretbus.core.model import InstanceKind

__all__ = ["InstanceKind", "InstancePaths"]   # InstanceKind lives in core; kept importable here


@dataclass(frozen=True)
class InstancePaths:
    kind: InstanceKind
    config_dir: Path   # <uuid>.xml and value files
    state_dir: Path    # driver.pid lock
    conf_file: Path    # secret.conf

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "driver.pid"

    @classmethod
    def for_kind(cls, kind: InstanceKind, root: str | Path | None = None) -> InstancePaths:
        """The paths of a `kind` instance; an embedded one (kind EMBED, or any kind given a
        `root`, as `secretbusd --root` does) lives under `root`."""
        if root is not None:
            return cls.embed(root)
        if kind is InstanceKind.EMBED:
            raise ValueError("an embedded instance needs a root directory")
        return cls.system() if kind is InstanceKind.SYSTEM else cls.session()

    @classmethod
    def system(cls) -> InstancePaths:
        return cls(InstanceKind.SYSTEM, Path("/etc/libvirt/secrets"),
                   Path("/run/libvirt/secrets"), Path("/etc/libvirt/secret.conf"))

    @classmethod
    def session(cls, environ: os._Environ[str] | dict[str, str] | None = None) -> InstancePaths:
        env = os.environ if environ is None else environ
        home = Path(env.get("HOME") or os.path.expanduser("~"))
        config = Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "libvirt"
        runtime = env.get("XDG_RUNTIME_DIR")
        # libvirt falls back to the cache dir when there is no runtime dir.
        run = Path(runtime) / "libvirt" if runtime else Path(env.get("XDG_CACHE_HOME") or home / ".cache") / "libvirt"
        return cls(InstanceKind.SESSION, config / "secrets", run / "secrets" / "run", config / "secret.conf")

    @classmethod
    def embed(cls, root: str | Path) -> InstancePaths:
        r = Path(root)
        # Unlike libvirt's embedded driver, an embedded instance reads its own secret.conf.
        return cls(InstanceKind.EMBED, r / "etc" / "secrets", r / "run" / "secrets", r / "etc" / "secret.conf")

"""Where each kind of instance keeps its store, lock, secret.conf and secretbusd.conf: the one
kind → paths mapping (system: /etc/libvirt and /etc/secretbus, session: $XDG_CONFIG_HOME/libvirt
and …/secretbus, embedded: under a root)."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from secretbus.core.model import InstanceKind

__all__ = ["InstanceKind", "InstancePaths"]   # InstanceKind lives in core; kept importable here


@dataclass(frozen=True)
class InstancePaths:
    kind: InstanceKind
    config_dir: Path   # <uuid>.xml and value files
    state_dir: Path    # driver.pid lock
    conf_file: Path    # secret.conf
    # secretbusd.conf (DESIGN §10, §11: the remote listeners and fleet mode); named by
    # `--config FILE` it must exist (server_conf_named), at its default place it may not.
    server_conf_file: Path
    server_conf_named: bool = False

    def with_server_conf(self, path: str | Path) -> InstancePaths:
        """These paths with secretbusd.conf at `path` (`--config FILE`), which must exist."""
        return replace(self, server_conf_file=Path(os.path.abspath(path)), server_conf_named=True)

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
        return cls(InstanceKind.SYSTEM, Path("/etc/libvirt/secrets"), Path("/run/libvirt/secrets"),
                   Path("/etc/libvirt/secret.conf"), Path("/etc/secretbus/secretbusd.conf"))

    @classmethod
    def session(cls, environ: os._Environ[str] | dict[str, str] | None = None) -> InstancePaths:
        env = os.environ if environ is None else environ
        home = Path(env.get("HOME") or os.path.expanduser("~"))
        xdg_config = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
        config = xdg_config / "libvirt"
        runtime = env.get("XDG_RUNTIME_DIR")
        # libvirt falls back to the cache dir when there is no runtime dir.
        run = Path(runtime) / "libvirt" if runtime else Path(env.get("XDG_CACHE_HOME") or home / ".cache") / "libvirt"
        return cls(InstanceKind.SESSION, config / "secrets", run / "secrets" / "run", config / "secret.conf",
                   xdg_config / "secretbus" / "secretbusd.conf")

    @classmethod
    def embed(cls, root: str | Path) -> InstancePaths:
        r = Path(root)
        # Unlike libvirt's embedded driver, an embedded instance reads its own secret.conf.
        return cls(InstanceKind.EMBED, r / "etc" / "secrets", r / "run" / "secrets", r / "etc" / "secret.conf",
                   r / "etc" / "secretbusd.conf")

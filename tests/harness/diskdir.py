"""Temporary directories on a file system that is not temporary (not tmpfs/ramfs).

systemd-creds, left to choose its key (no --with-key), refuses a host key that lies on a
temporary file system ("host key located on temporary file system"). /tmp is a tmpfs on many
machines (Debian 13's default, chroots, containers), so tests that make a private host key
(SYSTEMD_CREDENTIAL_SECRET) put it in one of these directories instead.
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from .procs import HarnessError

TEMPORARY_FS = {"tmpfs", "ramfs"}


def fs_type(path: Path | str) -> str:
    """The file system type of `path` as stat(1) names it (ext2/ext3, tmpfs, xfs, …)."""
    r = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, timeout=10)
    if r.returncode:
        raise HarnessError(f"stat -f {path}: {r.stderr.strip()}")
    return r.stdout.strip()


def disk_tempdir(prefix: str) -> Path:
    """A fresh 0700 directory on the first non-temporary of: the temp dir, /var/tmp, the
    repository. The caller removes it."""
    candidates = [Path(tempfile.gettempdir()), Path("/var/tmp"), Path(__file__).resolve().parents[2]]
    for base in candidates:
        if base.is_dir() and fs_type(base) not in TEMPORARY_FS:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    raise HarnessError(f"no directory on a non-temporary file system among {[str(c) for c in candidates]}")

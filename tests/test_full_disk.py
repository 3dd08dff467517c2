"""Full disk: writes that fail for lack of space answer a clear error over D-Bus and through the
CLI and leave the previous value and XML intact, also after a restart; once space is back the
same writes succeed. The scenario is bench/corruption.py's `full_disk()` (its docstring lists
the writes); here it runs on a 1 MiB tmpfs (ENOSPC) and with RLIMIT_FSIZE set on the running
daemon (EFBIG), the stand-in where mounting is not allowed.

tests/test_store.py covers atomic_write's clean-up with a faked ENOSPC in-process; this adds
the real errno from the kernel, the daemon, the bus, the CLI and the restart.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from harness import load_bench as _bench

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


corruption = _bench("corruption")

WRITES = [
    "SetValue 64 KiB, 16 KiB free (D-Bus)",
    "DefineXML, ephemeral -> persistent, value written but XML not (D-Bus)",
    "SetValue, replacing a value (D-Bus)",
    "SetValue, first value (D-Bus)",
    "DefineXML, redefine (D-Bus)",
    "DefineXML, new secret (D-Bus)",
    "DefineXML, ephemeral -> persistent (D-Bus)",
    "secret-set-value (CLI)",
    "secret-define, redefine (CLI)",
    "secret-define, new secret (CLI)",
]


def _can_mount_tmpfs(tmp_path) -> bool:
    d = tmp_path / "probe"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True)
    if r.returncode == 0:
        subprocess.run(["umount", str(d)], check=True)
    return r.returncode == 0


def _check(r, cause: str) -> None:
    assert [a.what for a in r.attempts] == WRITES
    for a in r.attempts:
        assert a.failed, a
        assert a.clear, a
        assert cause in a.detail, a
        assert a.intact, a
    assert r.intact_after_restart
    assert r.temp_files_left == 0
    assert r.recovered and r.recovered_after_restart
    assert corruption.disk_ok(r)
    # The error went to the log as well, without a traceback.
    assert "Traceback" not in r.log


def test_full_tmpfs(tmp_path):
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("mounting a tmpfs is not allowed here (test_file_size_limit covers EFBIG)")
    r = corruption.full_disk("tmpfs")
    assert r.mode == "tmpfs"
    _check(r, "No space left on device")


def test_file_size_limit():
    r = corruption.full_disk("fsize")
    assert r.mode == "fsize"
    _check(r, "File too large")
    rows = dict((name, (value, goal)) for name, value, goal in corruption.disk_rows(r))
    assert rows["full disk: previous value and XML intact, also after restart"] == ("yes", "yes")

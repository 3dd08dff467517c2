"""bench/bench_rpc.py cannot rot: a tiny run against secretbusd only (no libvirtd needed)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_rpc.py"


def _has_python_libvirt() -> bool:
    return subprocess.run(["/usr/bin/python3", "-c", "import libvirt"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_python_libvirt(), reason="python3-libvirt not installed")
def test_bench_rpc_smoke(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--no-libvirtd", "--secrets", "20", "--calls", "10",
                        "--writes", "4", "--seconds", "0.2", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| python3-libvirt") or
            line.startswith("| asyncio")]
    assert len(rows) == 14, r.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        rate = float(cells[2].replace(",", ""))
        assert rate > 0, row                   # every call was made and answered
        assert re.fullmatch(r"\d+\.\d\d", cells[3]) and re.fullmatch(r"\d+\.\d\d", cells[4]), row
        # The no-work server (bench/null_rpc.py) answered every read row's calls of both
        # clients; the write rows are not its to measure.
        write = cells[1] in ("DefineXML (new)", "SetValue", "Undefine")
        assert cells[-2:] == ["–", "–"] if write else float(cells[-2].replace(",", "")) > 0, row
    assert list(tmp_path.iterdir()) == []      # its temporary directory is gone

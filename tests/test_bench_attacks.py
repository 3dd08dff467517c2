"""bench/bench_attacks.py cannot rot: a 3-second run (every attack, real bus, polkitd, users)
must print every figure, name each attack's effect and exit 0 with --no-check."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.skipif(not Path("/usr/lib/polkit-1/polkitd").exists(), reason="polkitd not installed")
def test_bench_attacks_prints_its_figures(test_users, unpriv_python):
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench_attacks.py"), "--duration", "3",
                        "--baseline", "2", "--no-check"], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    print(out)
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (baseline|attacks) \| (.*)$", out, re.M)}
    assert set(rows) == {"baseline", "attacks"}, out
    for name, row in rows.items():
        cells = [c.strip() for c in row.split("|")]
        calls, p50, p99, peak = int(cells[1]), float(cells[2]), float(cells[3]), float(cells[4])
        assert calls > 0 and 0 < p50 <= p99 <= peak, (name, cells)
        assert float(cells[9]) > 10, (name, cells)            # max RSS MB: a running daemon
    assert re.search(r"^attack 1, outsiders: \d+ signals sent", out, re.M), out
    assert re.search(r"^attack 2, slow readers: [1-9]\d* calls sent", out, re.M), out
    assert re.search(r"^attack 3, ListSecrets loops: [1-9]\d* lists of \[[0-9, ]+\] paths", out, re.M), out
    assert len(re.findall(r"^goal: .* -> (met|MISSED)$", out, re.M)) == 4, out
    assert "secretbusd still running: yes" in out

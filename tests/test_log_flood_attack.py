"""Any local user could flood secretbusd's log (core/logflood.py): a real `secretbusd --system`
serving RPC, and Debian's python3 as an unprivileged test user connecting thousands of times to
the read-only socket, each time sending a length word over the bound (which closes the
connection with a warning). journald would rate-limit the service and drop the value-read audit
records with the rest, and push old records out; now the daemon logs the burst, then 20 a second,
and counts the rest in summary lines. Every attempt is either logged or counted."""
from __future__ import annotations

import re
import subprocess
import time

import harness
import pytest
from harness.procs import stop_process
from test_rpc_uid_memory import DEBIAN_PYTHON, daemon, root_is_served  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

JUNK = r"""
import socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
t, done = time.monotonic(), 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    s.sendall(b"\xff\xff\xff\xff")
    try:
        while s.recv(4096):
            pass
    except OSError:
        pass
    s.close()
    done += 1
print(done, time.monotonic() - t, flush=True)
"""
ATTEMPTS = 3000
LINE = "closing RPC client pid"


def test_one_user_cannot_flood_the_log(daemon, test_users, tmp_path):  # noqa: F811 - the fixture
    proc, rw, ro = daemon
    log = tmp_path / "secretbusd.log"
    started = time.monotonic()
    r = subprocess.run(harness.as_user(test_users.other, [DEBIAN_PYTHON, "-c", JUNK, str(ro), str(ATTEMPTS)]),
                       env=harness.user_env(test_users.other), capture_output=True, text=True, cwd="/", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    done = int(r.stdout.split()[0])
    assert done == ATTEMPTS
    assert root_is_served(rw) < 2
    took = time.monotonic() - started
    stop_process(proc)                    # at exit the daemon tells what it still holds back
    text = log.read_text()
    logged = [x for x in text.splitlines() if LINE in x and "left out" not in x]
    summary = re.compile(r'(\d+) records like "closing RPC client pid[^"]*" were left out')
    told = [int(m.group(1)) for m in summary.finditer(text)]
    assert len(logged) <= 200 + 20 * took + 5, (len(logged), took)
    assert told, text[-2000:]
    assert len(logged) + sum(told) == ATTEMPTS, (len(logged), told)

"""One unprivileged local user cannot make secretbusd hold its frames (DESIGN §12): a real
`secretbusd --system --no-dbus` serving RPC in a 0755 directory, and Debian's python3 run as
the test user (setpriv) opening the uid's 64 connections, each sending most of the largest
frame it may send and never the rest. Before the uid's frame budget that held 64 × 2 MiB; the
daemon's resident memory is read from /proc while the attacker holds on, and root is served
meanwhile."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import harness
import pytest
from harness.procs import spawn, stop_process
from rpcraw import RawClient

from secretbus.rpc import protocol as P

pytestmark = pytest.mark.integration
DEBIAN_PYTHON = "/usr/bin/python3"
MiB = 1 << 20

# Connects `n` times, sends each connection all of a frame of `size` bytes but its last byte,
# as fast as the daemon takes it (for at most 4 s), says how much it sent and how many of its
# connections were closed, then holds them open.
ATTACK = r"""
import select, socket, struct, sys, time
path, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
left, socks, closed, sent = {}, [], 0, 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.setblocking(False)
    socks.append(s)
    left[s] = memoryview(struct.pack(">I", size) + bytes(size - 5))
deadline = time.monotonic() + 4
while left and time.monotonic() < deadline:
    _, ready, _ = select.select([], list(left), [], 0.5)
    for s in ready:
        try:
            k = s.send(left[s][:1 << 16])
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            closed += 1
            del left[s]
            continue
        sent += k
        left[s] = left[s][k:]
        if not left[s]:
            del left[s]
print(sent, closed, flush=True)
time.sleep(120)
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def daemon(tmp_path, rpc_dir):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True, mode=0o700)
    # The read-only socket lets anyone in without asking polkit: every frame up to 2 MiB is
    # then allowed (the read-write one, with no polkitd to ask, never authenticates anybody).
    (root / "etc" / "secretbusd.conf").write_text('auth_unix_ro = "none"\n')
    log = tmp_path / "secretbusd.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = spawn([sys.executable, "-m", "secretbus.daemon", "--system", "--no-dbus", "--root", str(root),
                  "--rpc-dir", str(rpc_dir)], what="secretbusd", log=log, env=env)
    rw, ro = rpc_dir / "virtsecretd-sock", rpc_dir / "virtsecretd-sock-ro"
    deadline = time.monotonic() + 30
    while not (rw.exists() and ro.exists()):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    yield proc, rw, ro
    stop_process(proc)


def attack(user: harness.User, path: Path, size: int) -> tuple[subprocess.Popen, int, int]:
    p = subprocess.Popen(harness.as_user(user, [DEBIAN_PYTHON, "-c", ATTACK, str(path), "64", str(size)]),
                         env=harness.user_env(user), stdout=subprocess.PIPE, text=True, cwd="/")
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, "the attacker ended early"
    sent, closed = map(int, line.split())
    return p, sent, closed


def root_is_served(rw: Path) -> float:
    t = time.monotonic()
    with RawClient(rw, timeout=5) as c:
        c.open("secret:///system")
        assert c.call(P.Proc.CONNECT_NUM_OF_SECRETS) == {"num": 0}
    return time.monotonic() - t


def test_one_users_half_sent_frames_are_bounded(daemon, test_users):
    proc, rw, ro = daemon
    root_is_served(rw)
    before = rss_kib(proc.pid)
    p, sent, closed = attack(test_users.other, ro, 2 * MiB)
    try:
        grown = rss_kib(proc.pid) - before
        assert closed == 0 and sent > 8 * MiB      # the attack did happen
        # The uid's budget (8 MiB) and one stalled read per connection (≤ 256 KiB): ~24 MiB.
        # Without it the daemon took 64 × 2 MiB.
        assert grown < 48 * 1024, f"secretbusd grew by {grown} KiB"
        assert root_is_served(rw) < 2
    finally:
        p.kill()
        p.wait()
    root_is_served(rw)


def test_before_authentication_a_large_frame_closes_the_connection(daemon, test_users):
    proc, rw, _ro = daemon
    before = rss_kib(proc.pid)
    p, sent, closed = attack(test_users.other, rw, 2 * MiB)
    try:
        assert closed == 64, f"{closed} of 64 connections closed, {sent} bytes taken"
        assert rss_kib(proc.pid) - before < 16 * 1024
    finally:
        p.kill()
        p.wait()
    root_is_served(rw)

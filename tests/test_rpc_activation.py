"""Socket activation of the RPC front end: the sockets systemd passes (LISTEN_FDS, LISTEN_PID,
LISTEN_FDNAMES) are served instead of bound, matched to the read-write and read-only socket by
their names or paths, checked to be listening AF_UNIX stream sockets, and never unlinked.

Run for real: tests/harness/activate.py binds the sockets and execs secretbusd as systemd does,
and systemd's own `systemd-socket-activate` starts it on the first connection; unmodified virsh
and python3-libvirt are the clients."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import harness
import pytest
from fixtures import U1, secret_xml
from harness import activate
from harness.activate import SocketSpec
from harness.procs import remove_tree

from secretbus.rpc.activation import ActivationError, Passed
from secretbus.rpc.server import RO_SOCKET_NAME, SOCKET_NAME, match_passed, socket_plan

REPO = Path(__file__).resolve().parents[1]
DEBIAN_PYTHON = "/usr/bin/python3"
RW_NAME, RO_NAME = "secretbusd.socket", "secretbusd-ro.socket"


# -- the environment protocol, in a process that really has the fds -------------------------------
PROBE = r"""
import json, os, subprocess, sys
from secretbus.rpc import activation
try:
    passed = activation.take_listen_fds()
except activation.ActivationError as e:
    passed, error = [], str(e)
else:
    error = None
child = subprocess.run(["env"], capture_output=True, text=True).stdout
print(json.dumps({
    "passed": [[p.name, p.fd] for p in passed],
    "cloexec": [not os.get_inheritable(p.fd) for p in passed],
    "left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "child": sorted(line.split("=")[0] for line in child.splitlines() if line.startswith("LISTEN_")),
    "error": error,
}))
"""


def probe(argv_prefix: list[str], env_extra: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    r = subprocess.run([*argv_prefix, sys.executable, "-c", PROBE], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def sockdir():
    d = harness.public_tempdir("sb-act-")
    yield d
    remove_tree(d)


def specs(d: Path, *pairs: tuple[str, str]) -> list[SocketSpec]:
    return [SocketSpec(name, 0o666, d / fname) for name, fname in pairs]


def test_listen_fds_are_taken_and_the_variables_unset(sockdir):
    two = specs(sockdir, (RW_NAME, SOCKET_NAME), (RO_NAME, RO_SOCKET_NAME))
    got = probe(activate.argv(two))
    assert got == {"passed": [[RW_NAME, 3], [RO_NAME, 4]], "cloexec": [True, True], "left": [], "child": [],
                   "error": None}
    # Without LISTEN_FDNAMES (systemd < 227) every fd is "unknown", as sd_listen_fds_with_names() says.
    got = probe(activate.argv(two, names=False))
    assert got["passed"] == [["unknown", 3], ["unknown", 4]] and got["left"] == []


def test_listen_fds_meant_for_another_process_are_ignored_and_unset():
    got = probe([], {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"})
    assert got == {"passed": [], "cloexec": [], "left": [], "child": [], "error": None}


@pytest.mark.parametrize("env, message", [
    ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "only-one"}, "LISTEN_FDNAMES names 1 sockets, LISTEN_FDS says 2"),
    ({"LISTEN_FDS": "x"}, "are not numbers"),
    ({"LISTEN_FDS": "100000"}, "out of range"),
])
def test_bad_listen_variables_are_refused(sockdir, env, message):
    # LISTEN_PID must be the probe's own pid: the launcher sets it, the test overrides the rest.
    launcher = activate.argv(specs(sockdir, (RW_NAME, SOCKET_NAME), (RO_NAME, RO_SOCKET_NAME)))
    wrapper = ["env", *[f"{k}={v}" for k, v in env.items()]]
    got = probe(launcher + wrapper)
    assert got["passed"] == [] and message in got["error"] and got["left"] == []


# -- matching passed sockets to the plan (pure logic over real sockets) ----------------------------
def listener(path: Path, kind: int = socket.SOCK_STREAM, *, listen: bool = True) -> int:
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(str(path))
    if listen:
        s.listen(8)
    return s.detach()


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_passed_sockets_match_by_name_then_by_path(sockdir):
    plan = socket_plan(True, str(sockdir))
    elsewhere = sockdir / "renamed"          # a drop-in may move ListenStream=: the name decides
    fds = [listener(elsewhere), listener(sockdir / RO_SOCKET_NAME)]
    got = match_passed(plan, [Passed(RW_NAME, fds[0]), Passed("unknown", fds[1])])
    try:
        assert sorted(got) == [0, 1] and [got[0].fileno(), got[1].fileno()] == fds
        assert not plan[0].readonly and plan[1].readonly
        assert got[0].getsockname() == str(elsewhere) and got[1].getsockname() == str(plan[1].path)
    finally:
        for s in got.values():
            s.close()
    # libvirt's own unit names, too (its virtsecretd*.socket pointed at secretbusd.service)
    fd = listener(sockdir / "elsewhere-ro")
    got = match_passed(plan, [Passed("virtsecretd-ro.socket", os.dup(fd))])
    assert list(got) == [1]
    got[1].close()
    os.close(fd)


@pytest.mark.parametrize("case, message", [
    ("ro-name-on-rw-path", "which is not its path"),
    ("rw-name-on-ro-path", "which is not its path"),
    ("unknown-name-and-path", "neither a known socket unit name nor one of"),
    ("two-for-one", "two sockets for"),
    ("ro-on-session", "this instance has no read-only socket"),
])
def test_passed_sockets_that_do_not_fit_are_refused_all(sockdir, case, message):
    """Fail closed: a read-only unit's socket is never served read-write (or the reverse), and
    nothing of a bad set is served (every socket closed)."""
    plan = socket_plan(case != "ro-on-session", str(sockdir))
    rw, ro = sockdir / SOCKET_NAME, sockdir / RO_SOCKET_NAME
    layout = {                               # (name, where it is bound) of each passed socket
        "ro-name-on-rw-path": [(RO_NAME, rw)],
        "rw-name-on-ro-path": [(RW_NAME, ro), (RO_NAME, sockdir / "x")],
        "unknown-name-and-path": [("other.socket", sockdir / "other")],
        "two-for-one": [(RW_NAME, rw), (RW_NAME, sockdir / "y")],
        "ro-on-session": [(RO_NAME, ro)],
    }[case]
    passed = [Passed(name, listener(path)) for name, path in layout]
    with pytest.raises(ActivationError, match=message):
        match_passed(plan, passed)
    assert all(closed(p.fd) for p in passed)


def test_passed_fds_that_are_not_listening_unix_stream_sockets_are_refused(sockdir):
    plan = socket_plan(True, str(sockdir))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    r, w = os.pipe()
    cases = [
        (tcp.detach(), "AF_INET SOCK_STREAM"),
        (listener(sockdir / SOCKET_NAME, listen=False), "AF_UNIX SOCK_STREAM, not listening"),
        (listener(sockdir / RO_SOCKET_NAME, socket.SOCK_DGRAM, listen=False), "AF_UNIX SOCK_DGRAM"),
        (r, "is not a socket"),
    ]
    try:
        for fd, message in cases:
            with pytest.raises(ActivationError, match=message):
                match_passed(plan, [Passed(RW_NAME, fd)])
    finally:
        for fd, _ in cases:
            if not closed(fd):
                os.close(fd)
        os.close(w)


# -- secretbusd socket-activated, with libvirt's own clients ----------------------------------------
class Activated(harness.Secretbusd):
    """secretbusd exec'd by harness/activate.py with `sockets` (or by `launcher`)."""

    def __init__(self, bus, *, launcher: list[str], **kw):
        super().__init__(bus, **kw)
        self.launcher = launcher

    @property
    def argv(self) -> list[str]:
        return self.launcher + super().argv


@pytest.fixture
def start(session_bus):
    started: list[Activated] = []

    def make(launcher: list[str], rpc_dir: Path, *, ready: bool = True, system: bool = True,
             args: tuple[str, ...] = ("--no-dbus",)) -> Activated:
        d = Activated(session_bus, launcher=launcher, system=system, args=(*args, "--rpc-dir", str(rpc_dir)))
        started.append(d)
        d.start(wait="--no-dbus" not in args)
        if ready and "--no-dbus" in args:
            harness.wait_until(lambda: "over libvirt RPC only" in d.log(), timeout=30, what="secretbusd's RPC",
                               proc=d.proc, log=d.log_path)
        return d
    yield make
    for d in started:
        d.cleanup()


def virsh(path: Path, *args: str, ro: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", *(["-r"] if ro else []), "-c", f"secret:///system?socket={path}", *args],
                          capture_output=True, text=True, timeout=60)


needs_virsh = pytest.mark.skipif(shutil.which("virsh") is None, reason="virsh (libvirt-clients) not installed")


def inodes(*paths: Path) -> dict[Path, int]:
    return {p: p.stat().st_ino for p in paths}


@needs_virsh
def test_activated_daemon_serves_the_passed_sockets(start, sockdir, tmp_path):
    rw, ro = sockdir / SOCKET_NAME, sockdir / RO_SOCKET_NAME
    d = start(activate.argv(specs(sockdir, (RW_NAME, SOCKET_NAME), (RO_NAME, RO_SOCKET_NAME))), sockdir)
    made = inodes(rw, ro)
    assert f"serving libvirt RPC on {rw} (socket from systemd)" in d.log()
    assert f"serving libvirt RPC on {ro} (read-only) (socket from systemd)" in d.log()
    xml = tmp_path / "s.xml"
    xml.write_text(secret_xml())
    r = virsh(rw, "secret-define", str(xml))
    assert r.returncode == 0 and f"Secret {U1} created" in r.stdout, r.stderr
    assert virsh(rw, "secret-set-value", U1, "--base64", "QUJD").returncode == 0
    r = virsh(ro, "secret-get-value", U1, ro=True)          # the -ro unit's socket is read-only
    assert r.returncode == 1 and "read only access prevents virSecretGetValue" in r.stderr, r.stderr
    r = subprocess.run([DEBIAN_PYTHON, "-c", "import libvirt, sys; c = libvirt.openReadOnly(sys.argv[1]); "
                        "print([s.UUIDString() for s in c.listAllSecrets()])", f"secret:///system?socket={ro}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == str([U1]), r.stderr
    assert inodes(rw, ro) == made                  # nothing re-bound
    assert d.stop() == 0
    assert inodes(rw, ro) == made                  # systemd's sockets: left for systemd (RemoveOnStop=)


@needs_virsh
def test_a_socket_not_passed_is_bound_and_a_live_one_never_taken_over(start, sockdir):
    """Only secretbusd.socket passed: the daemon binds the -ro path itself (and removes it on
    stop) — unless a live process serves it, which is never taken over."""
    rw, ro = sockdir / SOCKET_NAME, sockdir / RO_SOCKET_NAME
    only_rw = activate.argv(specs(sockdir, (RW_NAME, SOCKET_NAME)))
    d = start(only_rw, sockdir)
    assert f"serving libvirt RPC on {rw} (socket from systemd)" in d.log()
    assert f"serving libvirt RPC on {ro} (read-only)" in d.log() and f"{ro} (read-only) (socket" not in d.log()
    assert virsh(ro, "secret-list", ro=True).returncode == 0
    rw_ino = rw.stat().st_ino
    assert d.stop() == 0
    assert not ro.exists() and rw.stat().st_ino == rw_ino

    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(ro))
    live.listen(1)
    live_ino = ro.stat().st_ino
    try:
        d = start(only_rw, sockdir, ready=False)
        assert d.wait(30) == 1          # --rpc-dir: not serving its sockets is fatal
        assert "served by another process" in d.log() and "not taking it over" in d.log()
        assert ro.exists() and ro.stat().st_ino == live_ino
        live.settimeout(5)
        probe_client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe_client.connect(str(ro))           # still the live process's socket
        conn, _ = live.accept()
        conn.close()
        probe_client.close()
    finally:
        live.close()


def test_misnamed_sockets_are_not_served(start, sockdir):
    """secretbusd-ro.socket bound to the read-write path: the daemon refuses to serve (fatal
    with --rpc-dir; at the default places it would serve D-Bus alone)."""
    swapped = activate.argv([SocketSpec(RO_NAME, 0o666, sockdir / SOCKET_NAME),
                             SocketSpec(RW_NAME, 0o666, sockdir / RO_SOCKET_NAME)])
    d = start(swapped, sockdir, ready=False)
    assert d.wait(30) == 1
    assert "cannot serve libvirt RPC" in d.log() and "which is not its path" in d.log()


def test_bad_listen_variables_leave_the_passed_sockets_alone(start, sockdir):
    """LISTEN_FDNAMES that does not fit LISTEN_FDS: the sockets are ignored, and the daemon
    does not take over their (live) paths either."""
    launcher = activate.argv(specs(sockdir, (RW_NAME, SOCKET_NAME), (RO_NAME, RO_SOCKET_NAME)))
    d = start(launcher + ["env", "LISTEN_FDNAMES=one"], sockdir, ready=False)
    assert d.wait(30) == 1
    log = d.log()
    assert "ignoring the sockets systemd passed: LISTEN_FDNAMES names 1 sockets, LISTEN_FDS says 2" in log
    assert "served by another process" in log


def test_no_rpc_closes_the_passed_sockets_and_serves_dbus(start, sockdir, session_bus):
    launcher = activate.argv(specs(sockdir, (RW_NAME, SOCKET_NAME), (RO_NAME, RO_SOCKET_NAME)))
    d = start(launcher, sockdir, system=False, args=("--no-rpc",))     # waits for the bus name
    assert "--no-rpc: not serving the 2 socket(s) systemd passed" in d.log()
    assert d.proc is not None
    assert not [f for f in os.listdir(f"/proc/{d.proc.pid}/fd") if int(f) in (3, 4)
                and os.readlink(f"/proc/{d.proc.pid}/fd/{f}").startswith("socket:")
                and _is_listener(d.proc.pid, int(f))]


def _is_listener(pid: int, fd: int) -> bool:
    """Whether fd of pid is one of the unix listening sockets (by inode in /proc/net/unix)."""
    ino = os.readlink(f"/proc/{pid}/fd/{fd}")[len("socket:["):-1]
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[6] == ino:
                return parts[3] == "00010000"      # __SO_ACCEPTCON: listening
    return False


@needs_virsh
def test_unnamed_sockets_match_by_path(start, sockdir, tmp_path):
    d = start(activate.argv(specs(sockdir, (RW_NAME, SOCKET_NAME), (RO_NAME, RO_SOCKET_NAME)), names=False),
              sockdir)
    assert "(read-only) (socket from systemd)" in d.log()
    xml = tmp_path / "s.xml"
    xml.write_text(secret_xml())
    r = virsh(sockdir / RO_SOCKET_NAME, "secret-define", str(xml), ro=True)
    assert r.returncode == 1 and "read only access prevents virSecretDefineXML" in r.stderr, r.stderr
    assert virsh(sockdir / SOCKET_NAME, "secret-define", str(xml)).returncode == 0


@needs_virsh
@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_started_by_systemd_socket_activate_on_the_first_connection(start, sockdir, tmp_path):
    """systemd's own implementation of the protocol: it listens, and execs secretbusd when the
    first client connects; that client (queued in the backlog meanwhile) is served."""
    rw, ro = sockdir / SOCKET_NAME, sockdir / RO_SOCKET_NAME
    keep = ["PATH", "PYTHONPATH", "SECRETBUS_JOURNAL_SOCKET"]
    launcher = ["systemd-socket-activate", "-l", str(rw), "-l", str(ro), f"--fdname={RW_NAME}:{RO_NAME}",
                *[x for k in keep for x in ("-E", k)]]
    d = start(launcher, sockdir, ready=False)
    harness.wait_until(lambda: d.log().count("Listening on") == 2, timeout=20, what="systemd-socket-activate",
                       proc=d.proc, log=d.log_path)
    assert "over libvirt RPC only" not in d.log()           # not started yet
    xml = tmp_path / "s.xml"
    xml.write_text(secret_xml())
    r = virsh(rw, "secret-define", str(xml))                 # this connection starts it
    assert r.returncode == 0 and f"Secret {U1} created" in r.stdout, r.stderr + d.log()
    assert "(socket from systemd)" in d.log() and "over libvirt RPC only" in d.log()
    r = virsh(ro, "secret-set-value", U1, "--base64", "QUJD", ro=True)
    assert r.returncode == 1 and "read only access prevents" in r.stderr

"""libvirt's own clients, unmodified (Debian 12's virsh 9.0 and python3-libvirt 9.0), against
secretbusd's RPC sockets: every secret-* command, read-only connections, python's API, and
one driver seen from D-Bus and RPC at once."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import harness
import pytest
from fixtures import U1, U2, secret_xml
from harness import programs
from harness.events import EventWatch
from harness.procs import remove_tree

from secretbus.bus.client import DBusConnection
from secretbus.core.model import EventId, Lifecycle
from secretbus.store.paths import InstanceKind

SENTINEL = b"rpc-S3ntinel\x00\x01\xff"
DEBIAN_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(shutil.which("virsh") is None, reason="virsh (libvirt-clients) not installed")


@pytest.fixture
def sessiond(session_bus, make_secretbusd, rpc_dir):
    return make_secretbusd(session_bus, args=("--rpc-dir", str(rpc_dir)))


def rpc_only(bus, make_secretbusd, rpc_dir: Path, *, system: bool):
    """secretbusd serving RPC only (no bus name to wait for: its READY log line instead)."""
    d = make_secretbusd(bus, system=system, wait=False, args=("--no-dbus", "--rpc-dir", str(rpc_dir)))
    harness.wait_until(lambda: "over libvirt RPC only" in d.log(), timeout=20, what="secretbusd's RPC sockets",
                       proc=d.proc, log=d.log_path)
    return d


@pytest.fixture
def systemd_(session_bus, make_secretbusd, rpc_dir):
    """The system instance, RPC only (its bus address is never used)."""
    return rpc_only(session_bus, make_secretbusd, rpc_dir, system=True)


def uri(rpc_dir: Path, kind: str = "session", ro: bool = False) -> str:
    return f"secret:///{kind}?socket={rpc_dir}/virtsecretd-sock{'-ro' if ro else ''}"


def virsh(u: str, *args: str, ro: bool = False, user=None, input: str | None = None,
          timeout: float = 30) -> subprocess.CompletedProcess:
    return harness.run_as(user, ["virsh", *(["-r"] if ro else []), "-c", u, *args], timeout=timeout, input=input)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def define_file(tmp_path: Path, **kw) -> str:
    f = tmp_path / "s.xml"
    f.write_text(secret_xml(**kw))
    f.chmod(0o644)
    return str(f)


def test_virsh_every_secret_command(sessiond, rpc_dir, tmp_path):
    u = uri(rpc_dir)
    assert f"Secret {U1} created" in ok(virsh(u, "secret-define", define_file(tmp_path)))
    out = ok(virsh(u, "secret-list"))
    assert U1 in out and "ceph client.admin" in out
    assert ok(virsh(u, "secret-list", "--private")).count(U1) == 0
    assert "Secret value set" in ok(virsh(u, "secret-set-value", U1, "--base64",
                                          base64.b64encode(SENTINEL).decode()))
    assert ok(virsh(u, "secret-get-value", U1)).strip() == base64.b64encode(SENTINEL).decode()
    assert f"<uuid>{U1}</uuid>" in ok(virsh(u, "secret-dumpxml", U1))
    assert f"Secret {U1} deleted" in ok(virsh(u, "secret-undefine", U1))
    r = virsh(u, "secret-dumpxml", U1)
    assert r.returncode == 1 and f"Secret not found: no secret with matching uuid '{U1}'" in r.stderr
    bad = tmp_path / "bad.xml"
    bad.write_text("<secret><uuid>not-a-uuid</uuid></secret>")
    bad.chmod(0o644)
    r = virsh(u, "secret-define", str(bad))
    assert r.returncode == 1 and "malformed uuid element" in r.stderr, r.stderr
    assert "UUID" not in ok(virsh(u, "secret-list")).split("---")[-1]      # nothing left defined
    assert SENTINEL.hex() not in sessiond.log() and base64.b64encode(SENTINEL).decode() not in sessiond.log()


def test_virsh_errors_are_libvirts(sessiond, rpc_dir, tmp_path):
    u = uri(rpc_dir)
    ok(virsh(u, "secret-define", define_file(tmp_path, priv="yes")))
    r = virsh(u, "secret-get-value", U1)
    assert r.returncode == 1 and "Invalid secret: secret is private" in r.stderr
    f = tmp_path / "clash.xml"
    f.write_text(secret_xml(U2))              # same usage, other UUID
    f.chmod(0o644)
    r = virsh(u, "secret-define", str(f))
    assert r.returncode == 1 and f"a secret with UUID {U1} is already defined for use with client.admin" in r.stderr
    r = virsh(u, "version")      # GET_TYPE works; a secret driver has no hypervisor version (as libvirt's)
    assert "Using API: secret" in r.stdout
    assert "this function is not supported by the connection driver: virConnectGetVersion" in r.stderr


def test_virsh_read_only(systemd_, rpc_dir, tmp_path):
    rw, ro = uri(rpc_dir, "system"), uri(rpc_dir, "system", ro=True)
    ok(virsh(rw, "secret-define", define_file(tmp_path)))
    ok(virsh(rw, "secret-set-value", U1, "--base64", base64.b64encode(SENTINEL).decode()))
    assert U1 in ok(virsh(ro, "secret-list", ro=True))
    assert f"<uuid>{U1}</uuid>" in ok(virsh(ro, "secret-dumpxml", U1, ro=True))
    for cmd in (["secret-get-value", U1], ["secret-undefine", U1],
                ["secret-set-value", U1, "--base64", "QUJD"], ["secret-define", define_file(tmp_path)]):
        r = virsh(ro, *cmd, ro=True)
        assert r.returncode == 1 and "operation forbidden: read only access prevents virSecret" in r.stderr, cmd
        # the rw socket with -r is read-only too (CONNECT_OPEN flag 1)
        r = virsh(rw, *cmd, ro=True)
        assert r.returncode == 1 and "read only access prevents" in r.stderr, cmd
    assert ok(virsh(rw, "secret-get-value", U1)).strip() == base64.b64encode(SENTINEL).decode()


def test_virsh_non_root_is_refused_without_polkit(systemd_, rpc_dir, test_users, tmp_path):
    """RPC only (--no-dbus): no bus connection, so polkit cannot be asked: fail closed."""
    for u in (uri(rpc_dir, "system"), uri(rpc_dir, "system", ro=True)):
        r = virsh(u, "secret-list", user=test_users.member)
        assert r.returncode == 1 and "authentication failed: access denied by policy" in r.stderr, r.stderr
    assert "polkit cannot be asked" in systemd_.log()
    ok(virsh(uri(rpc_dir, "system"), "secret-list"))        # root still served


def test_virsh_secret_event_across_keepalive(session_bus, make_secretbusd, rpc_dir, tmp_path):
    """Both sides ping every second and drop the other after one unanswered ping
    (secretbusd.conf's keepalive_interval/count, virsh's -k/-K): a missing PONG either way
    ends the watchers within the 3.5 s of silence below."""
    conf = tmp_path / "secretbusd.conf"
    conf.write_text("keepalive_interval = 1\nkeepalive_count = 1\n")
    make_secretbusd(session_bus, args=("--rpc-dir", str(rpc_dir), "--config", str(conf)))
    u = uri(rpc_dir)
    ka = ["-k", "1", "-K", "1"]
    ev = EventWatch(["virsh", *ka, "-c", u, "secret-event", "--event", "lifecycle", "--loop", "--timeout", "30"])
    vc = EventWatch(["virsh", *ka, "-c", u, "secret-event", "--event", "value-changed", "--loop", "--timeout", "30"])
    try:
        time.sleep(1.5)
        ok(virsh(u, "secret-define", define_file(tmp_path)))
        time.sleep(3.5)         # > 3 intervals: the server pings, virsh pings, both answer
        assert ev.proc.poll() is None and vc.proc.poll() is None, (ev.text(), vc.text())
        ok(virsh(u, "secret-set-value", U1, "--base64", "QUJD"))
        ok(virsh(u, "secret-undefine", U1))
        out, err = ev.until(f"secret {U1}: Undefined")
        out2, err2 = vc.until(f"event 'value-changed' for secret {U1}")
    finally:
        ev.kill()
        vc.kill()
    assert f"event 'lifecycle' for secret {U1}: Defined" in out, (out, err)
    assert f"event 'lifecycle' for secret {U1}: Undefined" in out
    assert "events received: 2" in out
    assert f"event 'value-changed' for secret {U1}" in out2 and "events received: 1" in out2, (out2, err2)


def _watchers(rpc_dir: Path, *top: str) -> dict[str, subprocess.Popen]:
    """`secret-event --loop` (no timeout) by virsh and by secretbus, with the same options."""
    from test_cli import entry_point
    u = uri(rpc_dir)
    env = {**os.environ, "LC_ALL": "C"}
    return {name: subprocess.Popen([*prog, *top, "-c", u, "secret-event", "--event", "lifecycle", "--loop"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for name, prog in (("virsh", ["virsh"]), ("secretbus", entry_point()))}


def _ended(watchers: dict[str, subprocess.Popen], timeout: float) -> dict[str, tuple[int, str, str]]:
    out = {}
    try:
        for name, p in watchers.items():
            o, e = p.communicate(timeout=timeout)
            out[name] = (p.returncode, o, e)
    finally:
        for p in watchers.values():
            harness.stop_process(p)
    return out


def test_an_event_loop_ends_when_the_server_goes_away_as_virshs(session_bus, make_secretbusd, rpc_dir):
    """virsh's close callback: "Disconnected from URI due to end of file", the loop ends, the
    deregistration's error, status 1. secretbus waited for its --timeout, or for ever."""
    d = make_secretbusd(session_bus, args=("--rpc-dir", str(rpc_dir)))
    watchers = _watchers(rpc_dir)
    time.sleep(1.5)                             # both connected and registered
    d.proc.terminate()
    got = _ended(watchers, 20)
    assert got["virsh"] == got["secretbus"], got
    rc, out, err = got["secretbus"]
    assert rc == 1 and out == "events received: 0\n\n", got
    assert err == (f"error: Disconnected from {uri(rpc_dir)} due to end of file\n"
                   "error: internal error: client socket is closed\n"), got


def test_a_stopped_server_ends_the_event_loop_by_keepalive_as_virshs(session_bus, make_secretbusd, rpc_dir):
    """-k 1 -K 2: a server that stopped answering (SIGSTOP: no FIN, as a host that vanished)
    is given up after about 3 s with "keepalive timeout", by both programs alike."""
    d = make_secretbusd(session_bus, args=("--rpc-dir", str(rpc_dir)))
    watchers = _watchers(rpc_dir, "-k", "1", "-K", "2")
    time.sleep(1.5)
    d.proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        got = _ended(watchers, 20)
        took = time.monotonic() - t0
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert got["virsh"] == got["secretbus"], got
    assert got["secretbus"][2].startswith(f"error: Disconnected from {uri(rpc_dir)} due to keepalive timeout\n")
    assert 2 < took < 10, took


def test_python_libvirt_api(sessiond, rpc_dir):
    r = subprocess.run([DEBIAN_PYTHON, "-c", programs.source("libvirt_python_client"), uri(rpc_dir), U1,
                        "client.admin", SENTINEL.hex()], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["type"] == "secret" and got["lib_version"] == 12_001_000
    assert got["is_secure"] == 1 and got["is_encrypted"] == 0
    assert got["define"] == U1 and got["num"] == 1 and got["list"] == [U1] and got["list_all"] == [U1]
    assert got["list_all_private"] == []
    assert got["list_all_bad_flags"]["error"][:2] == [8, 30]
    assert "unsupported flags (0x400) in function secretConnectListAllSecrets" in got["list_all_bad_flags"]["error"][2]
    assert got["by_usage"] == U1 and got["usage"] == [2, "client.admin"]
    assert got["by_usage_missing"]["error"] == [66, 30, "Secret not found: no secret with matching usage 'nope'"]
    assert got["no_value_yet"]["error"] == [66, 30, f"Secret not found: secret '{U1}' does not have a value"]
    assert got["set_value"] == 0 and got["value"] == SENTINEL.hex()
    assert got["value_bad_flags"]["error"][:2] == [8, 30]
    assert got["hostname"]["error"][0] == 3        # VIR_ERR_NO_SUPPORT, as from libvirt's secret driver
    assert got["undefine"] == 0 and got["lookup_gone"]["error"][0] == 66
    assert SENTINEL.hex() not in sessiond.log()


def test_one_driver_two_front_ends(session_bus, sessiond, rpc_dir, tmp_path):
    u = uri(rpc_dir)
    conn = DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10,
                               bus_address=session_bus.address)
    try:
        seen: list = []
        conn.subscribe(lambda _s, e: seen.append(e), EventId.LIFECYCLE)
        ev = subprocess.Popen(["virsh", "-c", u, "secret-event", "--event", "lifecycle", "--timeout", "8"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.5)
            conn.define_xml(secret_xml())              # defined on D-Bus, event seen over RPC
            out, err = ev.communicate(timeout=20)
        finally:
            if ev.poll() is None:
                ev.kill()
                ev.wait()
        assert f"event 'lifecycle' for secret {U1}: Defined" in out, (out, err)
        ok(virsh(u, "secret-set-value", U1, "--base64", base64.b64encode(SENTINEL).decode()))
        assert conn.lookup_by_uuid(U1).get_value() == SENTINEL    # set over RPC, read over D-Bus
        ok(virsh(u, "secret-undefine", U1))        # undefined over RPC, event seen on D-Bus
        assert conn.list_secrets() == []
        harness.wait_until(lambda: any(e.uuid == U1 and e.lifecycle == Lifecycle.UNDEFINED for e in seen),
                           timeout=10, what="the D-Bus event of an undefine over RPC")
    finally:
        conn.close()


def test_virtqemud_flow_with_python_set_identity(systemd_, rpc_dir, tmp_path):
    """A private value goes to an identity carrying the host's system.token, and only to it."""
    rw = uri(rpc_dir, "system")
    ok(virsh(rw, "secret-define", define_file(tmp_path, priv="yes")))
    ok(virsh(rw, "secret-set-value", U1, "--base64", base64.b64encode(SENTINEL).decode()))
    token_file = rpc_dir / "common" / "system.token"
    token = token_file.read_text()
    assert len(token) == 32 and oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert oct(token_file.parent.stat().st_mode & 0o777) == "0o700"

    def run(tok: str, user=None, who: str = "self") -> dict:
        r = harness.run_as(user, [DEBIAN_PYTHON, "-c", programs.source("libvirt_set_identity"), rw, U1, tok, who],
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    assert run(token) == {"value": SENTINEL.hex()}
    assert run("-")["error"] == [65, 30, "Invalid secret: secret is private"]
    assert run("0" * 32)["error"] == [65, 30, "Invalid secret: secret is private"]
    # The checks use the identity (libvirt's current identity): one polkit cannot be asked
    # about (no start time; and here no polkit at all) is refused, token or not.
    assert run(token, who="alice")["error"] == [88, 55, "access denied: 'secret' denied access"]
    assert SENTINEL.hex() not in systemd_.log()
    assert token not in systemd_.log()
    assert "returned to an elevated identity (user root uid 0 pid" in systemd_.log()


# -- the daemon's sockets -----------------------------------------------------------------
def _listening(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def test_a_live_default_socket_is_left_alone_and_dbus_still_served(session_bus, make_secretbusd):
    root = harness.public_tempdir("sb-root-")
    live = _listening(root / "run" / "libvirt" / "virtsecretd-sock")
    try:
        d = make_secretbusd(session_bus, root=root)       # waits for the bus name: D-Bus served
        assert "cannot serve libvirt RPC, serving D-Bus only" in d.log()
        assert "served by another process" in d.log()
        live.close()
    finally:
        live.close()
        remove_tree(root)


def test_a_live_rpc_dir_socket_is_fatal(session_bus, make_secretbusd, rpc_dir):
    live = _listening(rpc_dir / "virtsecretd-sock")
    try:
        d = make_secretbusd(session_bus, wait=False, args=("--rpc-dir", str(rpc_dir)))
        assert d.wait(30) == 1
        assert "cannot serve libvirt RPC" in d.log()
    finally:
        live.close()


def test_front_ends_can_be_turned_off(session_bus, make_secretbusd, rpc_dir):
    make_secretbusd(session_bus, args=("--no-rpc", "--rpc-dir", str(rpc_dir)))
    assert not (rpc_dir / "virtsecretd-sock").exists()
    both = make_secretbusd(session_bus, wait=False, args=("--no-rpc", "--no-dbus"))
    assert both.wait(30) == 2 and "leave nothing to serve" in both.log()


def test_sockets_are_removed_on_stop(session_bus, make_secretbusd, rpc_dir):
    d = make_secretbusd(session_bus, args=("--rpc-dir", str(rpc_dir)))
    sock = rpc_dir / "virtsecretd-sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"       # the session instance's
    assert d.stop() == 0
    assert not sock.exists()


def test_sigterm_while_the_bus_never_answers(tmp_path, rpc_dir):
    """A bus that takes the connection and never speaks: SIGTERM still stops the daemon cleanly
    (dbus-fast's connect has no timeout; the daemon races it against the stop)."""
    path = tmp_path / "silent-bus"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(4)
    lsock.settimeout(30)
    silent = type("SilentBus", (), {"address": f"unix:path={path}"})()
    d = harness.Secretbusd(silent, args=("--rpc-dir", str(rpc_dir))).start(wait=False)
    try:
        conn, _ = lsock.accept()        # the daemon is now waiting for the bus, its RPC sockets made
        assert (rpc_dir / "virtsecretd-sock").exists()
        d.signal(signal.SIGTERM)
        assert d.wait(15) == 0, d.log()
        assert not (rpc_dir / "virtsecretd-sock").exists()
        conn.close()
    finally:
        d.cleanup()
        lsock.close()

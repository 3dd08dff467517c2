"""The integration-test harness itself: buses, bus policy, polkitd, users, NOTIFY_SOCKET,
unprivileged Python. Each daemon is checked to be gone (by PID) once stopped."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import harness
import pytest
from harness import busctl, gdbus, programs

pytestmark = pytest.mark.integration

DBUS = ("--dest", "org.freedesktop.DBus", "--object-path", "/org/freedesktop/DBus")
TEST_NAME = "org.example.SbTest"

THROWAWAY_POLICY = f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root">
    <allow own="{TEST_NAME}"/>
    <allow send_destination="{TEST_NAME}"/>
  </policy>
  <policy group="libvirt">
    <allow send_destination="{TEST_NAME}"/>
  </policy>
</busconfig>
"""

# Owns TEST_NAME on the bus given as argv[1]; Ping() -> "pong".


POLKIT_ACTIONS = ("org.example.sbtest.policy", """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE policyconfig PUBLIC "-//freedesktop//DTD PolicyKit Policy Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/PolicyKit/1/policyconfig.dtd">
<policyconfig>
  <vendor>secretbus tests</vendor>
  <action id="org.example.sbtest.read">
    <description>harness test action</description>
    <message>harness test action</message>
    <defaults><allow_any>no</allow_any><allow_inactive>no</allow_inactive><allow_active>no</allow_active></defaults>
  </action>
</policyconfig>
""")
POLKIT_RULES = ("50-sbtest.rules", """
polkit.addRule(function(action, subject) {
    if (action.id == "org.example.sbtest.read" && subject.isInGroup("libvirt"))
        return polkit.Result.YES;
    return polkit.Result.NOT_HANDLED;
});
""")


def request_name(bus, name, user=None):
    return gdbus(bus.address, "call", *DBUS, "--method", "org.freedesktop.DBus.RequestName",
                 name, "0", user=user)


def assert_stopped(thing):
    pid, directory = thing.pid, thing.dir
    thing.stop()
    assert not harness.pid_alive(pid)
    assert not directory.exists()


# buses ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["session", "system"])
def test_bus_starts_answers_and_stops(make_bus, kind):
    bus = make_bus(kind)
    assert bus.address == f"unix:path={bus.socket_path}"
    assert Path(bus.socket_path).is_socket()
    assert os.stat(bus.dir).st_mode & 0o777 == 0o755
    r = busctl(bus.address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
               "org.freedesktop.DBus", "GetId")
    assert r.returncode == 0 and r.stdout.startswith('s "'), r.stderr
    r = gdbus(bus.address, "call", *DBUS, "--method", "org.freedesktop.DBus.ListNames")
    assert r.returncode == 0 and "org.freedesktop.DBus" in r.stdout, r.stderr
    assert bus.env() == {f"DBUS_{kind.upper()}_BUS_ADDRESS": bus.address}
    assert_stopped(bus)


def test_session_bus_admits_only_its_owner(session_bus, test_users):
    assert request_name(session_bus, TEST_NAME).stdout.strip() == "(uint32 1,)"
    r = busctl(session_bus.address, "list", user=test_users.other)
    assert r.returncode != 0


def test_user_session_bus_admits_only_that_user(make_bus, test_users):
    bus = make_bus("session", user=test_users.member)
    r = busctl(bus.address, "list", user=test_users.member)
    assert r.returncode == 0, r.stderr
    assert "sbtest-member" in r.stdout
    assert busctl(bus.address, "list", user=test_users.other).returncode != 0
    assert busctl(bus.address, "list").returncode != 0  # root is a stranger there too
    assert_stopped(bus)


def test_system_bus_policy_include_dir(make_bus, test_users, tmp_path):
    policy = tmp_path / "org.example.SbTest.conf"
    policy.write_text(THROWAWAY_POLICY)
    bus = make_bus("system")
    # default-deny: nobody may own the name before the policy file is included
    assert "AccessDenied" in request_name(bus, TEST_NAME).stderr
    bus.add_policy(policy)
    assert (bus.policy_dir / policy.name).read_text() == THROWAWAY_POLICY
    assert request_name(bus, TEST_NAME).stdout.strip() == "(uint32 1,)"
    for user in test_users:
        r = request_name(bus, TEST_NAME, user=user)
        assert r.returncode != 0
        assert "org.freedesktop.DBus.Error.AccessDenied" in r.stderr
        assert "not allowed to own the service" in r.stderr


def test_system_bus_send_policy_by_group(system_bus, test_users, unpriv_python, tmp_path):
    policy = tmp_path / "org.example.SbTest.conf"
    policy.write_text(THROWAWAY_POLICY)
    system_bus.add_policy(policy)
    service = harness.spawn([sys.executable, "-c", programs.source("ping_service"), system_bus.address, TEST_NAME],
                            what="ping service", log=tmp_path / "service.log")
    try:
        system_bus.wait_for_name(TEST_NAME, proc=service, log=tmp_path / "service.log")
        ping = ("call", "--dest", TEST_NAME, "--object-path", "/org/example/SbTest",
                "--method", f"{TEST_NAME}.Ping")
        assert gdbus(system_bus.address, *ping).stdout.strip() == "('pong',)"
        r = gdbus(system_bus.address, *ping, user=test_users.member)
        assert r.stdout.strip() == "('pong',)", r.stderr
        r = gdbus(system_bus.address, *ping, user=test_users.other)
        assert r.returncode != 0 and "AccessDenied" in r.stderr
        # the same through dbus-fast, as an unprivileged Python client would do it
        r = unpriv_python.run(test_users.member, "-c", programs.source("ping_client"), system_bus.address, TEST_NAME)
        assert r.stdout.strip() == "pong", r.stderr
        r = unpriv_python.run(test_users.other, "-c", programs.source("ping_client"), system_bus.address, TEST_NAME)
        assert r.stdout.strip() == "org.freedesktop.DBus.Error.AccessDenied", r.stderr
    finally:
        harness.stop_process(service)
    assert not harness.pid_alive(service.pid)


@pytest.mark.bus_policy(Path(__file__))
def test_bus_policy_marker_rejects_non_conf(request):
    with pytest.raises(ValueError):
        request.getfixturevalue("system_bus")


# polkit --------------------------------------------------------------------------

def check(bus, action, user=None):
    r = harness.run_as(user, harness.check_authorization_argv(bus.address, action))
    assert r.returncode == 0, r.stderr
    return harness.parse_check_result(r.stdout)


@pytest.mark.polkit(actions=[POLKIT_ACTIONS])
def test_polkitd_answers_root(polkitd, system_bus):
    assert system_bus.name_has_owner("org.freedesktop.PolicyKit1")
    # uid 0 is always authorized, even for an action whose defaults say no
    assert check(system_bus, "org.example.sbtest.read") == (True, False)
    r = busctl(system_bus.address, "introspect", "org.freedesktop.PolicyKit1",
               "/org/freedesktop/PolicyKit1/Authority")
    assert ".CheckAuthorization" in r.stdout, r.stderr
    assert_stopped(polkitd)


@pytest.mark.polkit(actions=[POLKIT_ACTIONS], rules=[POLKIT_RULES])
def test_polkitd_with_installed_actions_and_rules(polkitd, system_bus, test_users):
    policy = polkitd.actions_dir / POLKIT_ACTIONS[0]
    rules = polkitd.rules_dir / POLKIT_RULES[0]
    # Private to this polkitd: nothing lands in the host's polkit directories.
    assert not (harness.polkit.ACTIONS_DIR / POLKIT_ACTIONS[0]).exists()
    assert not (harness.polkit.RULES_DIR / POLKIT_RULES[0]).exists()
    assert policy.read_text() == POLKIT_ACTIONS[1]
    assert rules.stat().st_mode & 0o777 == 0o644 and rules.stat().st_uid == 0
    assert check(system_bus, "org.example.sbtest.read") == (True, False)
    assert check(system_bus, "org.example.sbtest.read", test_users.member) == (True, False)
    assert check(system_bus, "org.example.sbtest.read", test_users.other) == (False, False)
    assert_stopped(polkitd)
    assert not policy.exists() and not rules.exists()


def test_polkit_rules_hot_reload(make_polkitd, system_bus, test_users):
    pk = make_polkitd(system_bus, actions=[POLKIT_ACTIONS])
    assert check(system_bus, "org.example.sbtest.read", test_users.member) == (False, False)
    with pk.add_files(rules=[POLKIT_RULES]):
        pk.wait_for_log("Reloading rules")
        harness.wait_until(
            lambda: check(system_bus, "org.example.sbtest.read", test_users.member)[0],
            timeout=5, what="polkitd picking up the rules")
    assert not (pk.rules_dir / POLKIT_RULES[0]).exists()


def test_polkit_files_restore_what_was_there():
    target = harness.polkit.RULES_DIR / "49-sbtest-restore.rules"
    target.write_text("// original\n")
    target.chmod(0o600)
    try:
        with harness.PolkitFiles(rules=[(target.name, "// replaced\n")]):
            assert target.read_text() == "// replaced\n"
        assert target.read_text() == "// original\n"
        assert target.stat().st_mode & 0o777 == 0o600
    finally:
        target.unlink(missing_ok=True)


def test_polkitd_rejects_session_bus_and_fails_fast_on_dead_bus(make_bus, make_polkitd):
    # a session-type bus is not accepted; a stopped bus makes polkitd exit, reported quickly
    with pytest.raises(ValueError):
        harness.Polkitd(make_bus("session"))
    bus = make_bus("system")
    bus.stop()
    t0 = time.monotonic()
    with pytest.raises(harness.HarnessError):
        make_polkitd(bus)
    assert time.monotonic() - t0 < 10


# users, unprivileged Python, NOTIFY_SOCKET ---------------------------------------

def test_users_and_setpriv(test_users):
    member, other = test_users
    assert member.groups == ("libvirt",) and other.groups == ()
    assert harness.ensure_user("sbtest-member", ["libvirt"]) == member  # idempotent
    r = harness.run_as(member, ["sh", "-c", "id -u; id -G"], check=True)
    uid, gids = r.stdout.split("\n")[:2]
    assert int(uid) == member.uid
    assert str(__import__("grp").getgrnam("libvirt").gr_gid) in gids.split()
    assert harness.as_user(other, ["true"])[:1] == ["setpriv"]
    r = harness.run_as(other, ["sh", "-c", "id -u; echo $HOME; pwd"], check=True)
    assert r.stdout.split() == [str(other.uid), other.home, "/"]


def test_unpriv_python_imports_as_other_user(unpriv_python, test_users):
    r = unpriv_python.run(test_users.other, "-c", programs.source("import_check"))
    assert r.returncode == 0, r.stderr
    path, writable = r.stdout.split()
    assert path.startswith(unpriv_python.pythonpath) and writable == "False"
    assert unpriv_python.argv("-V") == ["/usr/bin/python3", "-V"]
    assert unpriv_python.env()["PYTHONPATH"] == unpriv_python.pythonpath


def _fake_site(site: Path, meta: str, listed: list[str], extra: dict[str, str]) -> None:
    """A site-packages dir holding package `fakepkg` whose file list names only `listed`."""
    (site / "fakepkg").mkdir(parents=True)
    for rel in ["fakepkg/__init__.py", "fakepkg/_ext.cpython-311-x86_64-linux-gnu.so"]:
        (site / rel).write_text(rel)
    (site / meta).mkdir()
    (site / meta / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
    for name, text in extra.items():
        (site / meta / name).write_text(text)
    (site / meta / ("RECORD" if meta.endswith(".dist-info") else "SOURCES.txt")).write_text(
        "".join(f"{f},,\n" if meta.endswith(".dist-info") else f"{f}\n" for f in listed))


@pytest.mark.parametrize("meta,listed,extra", [
    # a RECORD that forgot the compiled module
    ("fakepkg-1.0.dist-info", ["fakepkg/__init__.py", "fakepkg-1.0.dist-info/METADATA"], {}),
    # a legacy `setup.py install` (pip without `wheel`): egg-info listing sources, no .so
    ("fakepkg-1.0.egg-info", ["setup.py", "fakepkg/__init__.py", "fakepkg/_ext.c"],
     {"top_level.txt": "fakepkg\nfakepkg/_ext\n"}),
], ids=["record", "legacy-egg-info"])
def test_unpriv_copy_includes_unlisted_compiled_modules(tmp_path, meta, listed, extra):
    import importlib.metadata as md

    from harness.unpriv import _copy_distribution
    site, out = tmp_path / "site", tmp_path / "out"
    _fake_site(site, meta, listed, extra)
    out.mkdir()
    _copy_distribution(md.PathDistribution(site / meta), out)
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "fakepkg/__init__.py" in copied
    assert "fakepkg/_ext.cpython-311-x86_64-linux-gnu.so" in copied
    assert not any(c.startswith(("setup.py", "_ext")) for c in copied)


def test_notify_socket_receives_from_other_user(notify_socket, unpriv_python, test_users):
    r = unpriv_python.run(test_users.other, "-c", programs.source("notify_ready"),
                          env={**os.environ, **notify_socket.env()})
    assert r.returncode == 0, r.stderr
    got = notify_socket.wait_for(b"READY=1", timeout=5)
    assert got.data == b"READY=1\nSTATUS=up"
    assert got.uid == test_users.other.uid and got.pid > 0
    assert notify_socket.messages() == [b"READY=1\nSTATUS=up"]
    with pytest.raises(harness.HarnessError):
        notify_socket.wait_for(b"READY=1", timeout=0.1)  # already consumed


def test_notify_socket_plain_datagram(notify_socket):
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"STATUS=starting", notify_socket.path)
        s.sendto(b"RELOADING=1", notify_socket.path)
    assert notify_socket.wait_for(b"STATUS=", timeout=5).data == b"STATUS=starting"
    assert notify_socket.wait_for(b"RELOADING=1", timeout=5).pid == os.getpid()


# cost ------------------------------------------------------------------------------

def test_startup_times(make_bus, make_polkitd, record_property):
    bus = make_bus("system")
    pk = make_polkitd(bus)
    record_property("system_bus_start_s", round(bus.startup_seconds, 4))
    record_property("polkitd_start_s", round(pk.startup_seconds, 4))
    assert bus.startup_seconds < 2
    assert pk.startup_seconds < 5


def test_no_leftover_harness_processes():
    assert harness.leftover_processes() == {}
    children = subprocess.run(["ps", "--no-headers", "-o", "pid,args", "--ppid", str(os.getpid())],
                              capture_output=True, text=True).stdout.splitlines()
    assert [c for c in children if " ps " not in f" {c} "] == []


def test_free_ports_are_outside_the_ephemeral_range_and_never_repeat():
    import socket

    from harness import ports
    low = ports._ephemeral_low()
    got = [ports.free_port() for _ in range(50)]
    assert len(set(got)) == 50 and all(ports.LOW <= p < low for p in got), got
    taken = ports.free_port()
    with socket.socket() as s:                # one in use is not handed out
        s.bind(("127.0.0.1", taken))
        assert not ports._bindable(taken)

"""Shared pytest fixtures: private buses, polkitd, test users (see tests/harness/).

Tests that use any of the integration fixtures are marked `integration` automatically and
skipped unless run as root. Every fixture stops what it started, by PID; the session ends
with an error if a harness-started daemon is still alive.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness.procs import remove_tree  # noqa: E402

MEMBER = "sbtest-member"  # in group libvirt
OTHER = "sbtest-other"    # in no extra group
LIBVIRT_GROUP = "libvirt"

INTEGRATION_FIXTURES = {"make_secretbusd", "session_bus", "system_bus", "polkitd", "test_users", "make_bus",
                        "make_polkitd", "unpriv_python", "notify_socket"}


def pytest_configure(config):
    for line in (
        "integration: uses real dbus-daemon / polkitd / systemd tools",
        "bus_policy(*paths): policy files copied into the system_bus fixture's include dir",
        "polkit(actions=(), rules=()): files the polkitd fixture installs for the test",
    ):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="integration test: needs root")
    for item in items:
        if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if os.geteuid() != 0 and item.get_closest_marker("integration"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_processes():
    yield
    left = harness.leftover_processes()
    if left:
        for pid in left:  # stop them so the next run starts clean, then report
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        pytest.fail(f"harness daemons still running at the end of the session: {left}")


@pytest.fixture(scope="session")
def test_users() -> harness.UserPair:
    """`sbtest-member` (group libvirt) and `sbtest-other` (no extra group), created if needed."""
    return harness.UserPair(harness.ensure_user(MEMBER, [LIBVIRT_GROUP]), harness.ensure_user(OTHER))


@pytest.fixture
def make_bus():
    """Factory: make_bus(kind="session"|"system", user=None, policy_files=(), extra_config="")
    -> a started harness.PrivateBus, stopped after the test."""
    buses = []

    def make(kind: str = "session", **kw) -> harness.PrivateBus:
        bus = harness.PrivateBus(kind, **kw)
        buses.append(bus)
        return bus.start()

    yield make
    for bus in reversed(buses):
        bus.stop()


@pytest.fixture
def session_bus(make_bus) -> harness.PrivateBus:
    """A private session-type bus owned by root (allow-all, only root may connect)."""
    return make_bus("session")


@pytest.fixture
def system_bus(request, make_bus) -> harness.PrivateBus:
    """A private system-type bus (default-deny policy, any uid connects, polkitd may own its
    name); files named by @pytest.mark.bus_policy(...) are in its include dir."""
    marker = request.node.get_closest_marker("bus_policy")
    return make_bus("system", policy_files=marker.args if marker else ())


@pytest.fixture
def make_polkitd():
    """Factory: make_polkitd(bus, actions=(), rules=()) -> a started harness.Polkitd; it and
    its installed files are removed after the test."""
    daemons = []

    def make(bus: harness.PrivateBus, **kw) -> harness.Polkitd:
        pk = harness.Polkitd(bus, **kw)
        daemons.append(pk)
        return pk.start()

    yield make
    for pk in reversed(daemons):
        pk.stop()


@pytest.fixture
def polkitd(request, system_bus, make_polkitd) -> harness.Polkitd:
    """polkitd on `system_bus`, with the actions/rules of @pytest.mark.polkit(actions=, rules=)."""
    marker = request.node.get_closest_marker("polkit")
    return make_polkitd(system_bus, **(marker.kwargs if marker else {}))


@pytest.fixture
def notify_socket():
    """A harness.NotifySocket (emulates systemd's NOTIFY_SOCKET)."""
    with harness.NotifySocket() as sock:
        yield sock


@pytest.fixture
def rpc_dir():
    """A 0755 directory for secretbusd's RPC sockets (--rpc-dir) that unprivileged clients reach."""
    d = harness.public_tempdir("sb-rpc-")
    yield d
    remove_tree(d)


@pytest.fixture
def disk_tmp_path():
    """Like tmp_path, but never on a tmpfs: for systemd-creds host keys (harness/diskdir.py)."""
    path = harness.disk_tempdir("sb-disk-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def unpriv_python() -> harness.UnprivPython:
    """The project's Python packages copied where any uid can import them."""
    return harness.unpriv_python()


@pytest.fixture
def make_secretbusd():
    """Factory: `make_secretbusd(bus, system=False, conf=None, args=(), env=None)` starts
    secretbusd on `bus` with a fresh store and waits until it owns org.libvirt.secret."""
    started: list[harness.Secretbusd] = []

    def make(bus: harness.PrivateBus, *, wait: bool = True, **kw) -> harness.Secretbusd:
        d = harness.Secretbusd(bus, **kw)
        started.append(d)
        return d.start(wait=wait)
    yield make
    for d in started:
        d.cleanup()

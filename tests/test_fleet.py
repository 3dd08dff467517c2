"""Fleet mode on a real etcd (Debian's etcd-server): several embedded drivers, each with its own
root (cache, host key, fleet state), share one etcd; a loopback proxy partitions one host."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from secretbus.core import errors
from secretbus.core.model import EventId, Lifecycle, SecretEvent, UsageType
from secretbus.driver.build import open_instance
from secretbus.driver.driver import SecretDriver
from secretbus.fleet import admin
from secretbus.fleet.changes import Published, PublishResult
from secretbus.fleet.keyfile import fleet_dir, init_fleet_key
from secretbus.fleet.status import FleetState
from secretbus.fleet.store import FleetStore
from secretbus.store.conf import load_instance_conf
from secretbus.store.keys import init_encryption
from secretbus.store.paths import InstancePaths
from tests.harness.bus import gdbus
from tests.harness.etcd import EtcdCluster
from tests.harness.gate import Gate
from tests.harness.tcpproxy import TcpProxy

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")

WAIT = 60     # generous: the machine is shared and loaded


def wait_for(pred: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def xml(uuid: str, usage: str = "", private: str = "no", desc: str = "", ephemeral: str = "no") -> str:
    body = f"<uuid>{uuid}</uuid>"
    if desc:
        body += f"<description>{desc}</description>"
    if usage:
        body += f"<usage type='ceph'><name>{usage}</name></usage>"
    return f"<secret ephemeral='{ephemeral}' private='{private}'>{body}</secret>"


def uid(n: int) -> str:
    return f"6a1e0c1e-0000-4000-8000-{n:012x}"


@dataclass
class Host:
    name: str
    root: Path
    endpoints: list[str]
    driver: SecretDriver | None = None
    events: list[SecretEvent] = field(default_factory=list)

    @property
    def paths(self) -> InstancePaths:
        return InstancePaths.embed(self.root)

    @property
    def d(self) -> SecretDriver:
        assert self.driver is not None
        return self.driver

    @property
    def store(self) -> FleetStore:
        s = self.d.store
        assert isinstance(s, FleetStore)
        return s

    def open(self, online: bool = True) -> Host:
        self.driver = open_instance(self.paths)
        self.driver.subscribe(self.events.append)
        if online:
            assert self.store.cell.wait_online(WAIT), self.store.status
        return self

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()
            self.driver = None

    def seen(self, uuid: str, event_id: EventId, lifecycle: Lifecycle | None = None) -> int:
        return sum(1 for e in list(self.events)
                   if e.uuid == uuid and e.event_id == event_id and e.lifecycle == lifecycle)

    def state(self) -> dict[str, tuple[object, bytes | None]]:
        out: dict[str, tuple[object, bytes | None]] = {}
        for s in self.d.list_secrets():
            try:
                v: bytes | None = self.d.get_value(s.uuid, internal_call=True)
            except errors.NoSecret:
                v = None
            out[s.uuid] = (s, v)
        return out


def make_host(base: Path, name: str, endpoints: list[str], fleet_key: bytes | None,
              extra_conf: str = "") -> tuple[Host, bytes]:
    root = base / name
    etc = root / "etc"
    etc.mkdir(parents=True)
    etc.chmod(0o700)
    init_encryption(etc / "host-key", raw=True)       # the local cache is encrypted under the host key
    ends = ", ".join(f'"{e}"' for e in endpoints)
    (etc / "secret.conf").write_text(f'secrets_encryption_key = "{etc / "host-key"}"\n')
    (etc / "secretbusd.conf").write_text(f'fleet_endpoints = [ {ends} ]\nfleet_cluster = "test"\n' + extra_conf)
    path = init_fleet_key(fleet_dir(InstancePaths.embed(root)), raw=True, key=fleet_key)
    return Host(name, root, endpoints), path.read_bytes()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    c = EtcdCluster.create(tmp_path / "etcd", 1)
    c.start()
    yield c
    c.stop()


@pytest.fixture
def hosts(tmp_path: Path, etcd: EtcdCluster) -> Iterator[list[Host]]:
    """Three hosts on the same etcd; the third reaches it through a proxy that can be cut."""
    proxy = TcpProxy(etcd.members[0].client_port)
    made: list[Host] = []
    key = None
    try:
        for name, ends in (("a", etcd.endpoints), ("b", etcd.endpoints), ("c", [proxy.url])):
            h, key = make_host(tmp_path, name, ends, key)
            h.proxy = proxy     # type: ignore[attr-defined]
            made.append(h.open())
        yield made
    finally:
        for h in made:
            h.close()
        proxy.close()


def test_define_on_a_is_served_by_b_with_events(hosts: list[Host]) -> None:
    a, b, _ = hosts
    u = uid(1)
    a.d.define_xml(xml(u, "client.one", desc="first"))
    a.d.set_value(u, b"v-one")
    wait_for(lambda: b.seen(u, EventId.VALUE_CHANGED), "the value event on b")
    assert b.seen(u, EventId.LIFECYCLE, Lifecycle.DEFINED) == 1
    assert b.d.get_value(u) == b"v-one"
    assert b.d.lookup_by_usage(UsageType.CEPH, "client.one").uuid == u
    # the writing host announced its own write once, not again from the watch
    time.sleep(0.5)
    assert a.seen(u, EventId.LIFECYCLE, Lifecycle.DEFINED) == 1
    assert a.seen(u, EventId.VALUE_CHANGED) == 1
    # b's local cache holds it, encrypted under b's host key; b's own store has nothing
    cache = fleet_dir(b.paths) / "cache"
    assert sorted(p.name for p in cache.iterdir()) == [f"{u}.aes256gcm", f"{u}.xml"]
    assert b"v-one" not in (cache / f"{u}.aes256gcm").read_bytes()
    assert not list(b.paths.config_dir.iterdir())
    # redefine on b reaches a; undefine on b reaches a
    b.d.define_xml(xml(u, "client.one", desc="second"))
    wait_for(lambda: a.d.lookup_by_uuid(u).description == "second", "the redefine on a")
    assert a.d.get_value(u) == b"v-one"
    b.d.undefine(u)
    wait_for(lambda: a.seen(u, EventId.LIFECYCLE, Lifecycle.UNDEFINED), "the undefine on a")
    with pytest.raises(errors.NoSecret):
        a.d.lookup_by_uuid(u)
    assert not list((fleet_dir(a.paths) / "cache").iterdir())


def test_a_lookup_right_after_a_remote_define_finds_it(hosts: list[Host]) -> None:
    """The migration race: defined on A, looked up on B at once (quorum read on the miss)."""
    a, b, _ = hosts
    for n in range(20):
        u = uid(100 + n)
        a.d.define_xml(xml(u, f"race.{n}"))
        a.d.set_value(u, b"value-%d" % n)
        assert b.d.lookup_by_uuid(u).uuid == u
        assert b.d.get_value(u) == b"value-%d" % n
    u = uid(200)
    a.d.define_xml(xml(u, "race.usage"))
    assert b.d.lookup_by_usage(UsageType.CEPH, "race.usage").uuid == u
    with pytest.raises(errors.NoSecret):
        b.d.lookup_by_uuid(uid(201))       # a real miss stays a miss


def test_concurrent_defines_of_one_usage_exactly_one_wins(hosts: list[Host]) -> None:
    drivers = [h.d for h in hosts[:2]]

    def define(i: int, rnd: int, barrier: threading.Barrier, results: list[object]) -> None:
        barrier.wait()
        try:
            results[i] = drivers[i].define_xml(xml(uid(300 + 10 * rnd + i), f"shared.{rnd}"))
        except errors.SecretError as e:
            results[i] = e
    for rnd in range(8):
        barrier = threading.Barrier(2)
        results: list[object] = [None, None]
        threads = [threading.Thread(target=define, args=(i, rnd, barrier, results)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [r for r in results if not isinstance(r, errors.SecretError)]
        lost = [r for r in results if isinstance(r, errors.SecretError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert "already defined for use with" in str(lost[0])
        winner = won[0].uuid     # type: ignore[attr-defined]
        for h in hosts:
            wait_for(lambda h=h, rnd=rnd: h.d.list_secrets() and any(
                s.usage_id == f"shared.{rnd}" for s in h.d.list_secrets()), f"round {rnd} on {h.name}")
            assert h.d.lookup_by_usage(UsageType.CEPH, f"shared.{rnd}").uuid == winner


def test_partitioned_host_serves_reads_refuses_writes_and_resumes(hosts: list[Host]) -> None:
    a, _, c = hosts
    proxy: TcpProxy = c.proxy    # type: ignore[attr-defined]
    keep, gone = uid(400), uid(401)
    for u in (keep, gone):
        a.d.define_xml(xml(u, f"p.{u[-3:]}"))
        a.d.set_value(u, b"before")
    wait_for(lambda: c.seen(gone, EventId.VALUE_CHANGED), "the values on c")
    proxy.cut()
    wait_for(lambda: c.store.status.state is FleetState.DEGRADED, "c degraded")
    assert c.store.status.reason
    # reads from the cache
    assert c.d.get_value(keep) == b"before"
    assert c.d.lookup_by_usage(UsageType.CEPH, f"p.{keep[-3:]}").uuid == keep
    # fleet writes refused with the text; nothing diverges locally
    for write in (lambda: c.d.define_xml(xml(uid(402), "p.new")),
                  lambda: c.d.set_value(keep, b"diverged"),
                  lambda: c.d.undefine(keep)):
        with pytest.raises(errors.OperationFailed, match="^fleet store unavailable: "):
            write()
    assert c.d.get_value(keep) == b"before"
    with pytest.raises(errors.NoSecret):
        c.d.lookup_by_uuid(uid(402))
    # local ephemeral secrets are unaffected
    c.d.define_xml(xml(uid(403), "p.local", ephemeral="yes"))
    c.d.set_value(uid(403), b"local")
    # meanwhile the rest of the fleet goes on
    new = uid(404)
    a.d.define_xml(xml(new, "p.404"))
    a.d.set_value(new, b"during")
    a.d.set_value(keep, b"after")
    a.d.undefine(gone)
    assert c.d.get_value(keep) == b"before"
    before = len(c.events)
    resyncs = c.store.resyncs
    proxy.restore()
    wait_for(lambda: c.store.status.state is FleetState.ONLINE, "c online again")
    wait_for(lambda: c.seen(gone, EventId.LIFECYCLE, Lifecycle.UNDEFINED), "the undefine on c")
    # resumed from its revision (no resync), every change announced in order
    assert c.store.resyncs == resyncs
    got = [(e.uuid, e.event_id, e.lifecycle) for e in c.events[before:]]
    assert got == [(new, EventId.LIFECYCLE, Lifecycle.DEFINED), (new, EventId.VALUE_CHANGED, None),
                   (keep, EventId.VALUE_CHANGED, None), (gone, EventId.LIFECYCLE, Lifecycle.UNDEFINED)]
    assert c.d.get_value(keep) == b"after" and c.d.get_value(new) == b"during"
    assert c.d.get_value(uid(403)) == b"local"
    c.d.set_value(keep, b"from-c")             # writes work again
    wait_for(lambda: a.d.get_value(keep) == b"from-c", "c's write on a")


def test_compacted_watch_resyncs_with_events_for_the_diff(hosts: list[Host]) -> None:
    a, b, c = hosts
    proxy: TcpProxy = c.proxy    # type: ignore[attr-defined]
    same, changed, gone, new = uid(500), uid(501), uid(502), uid(503)
    for u in (same, changed, gone):
        a.d.define_xml(xml(u, f"k.{u[-3:]}"))
        a.d.set_value(u, b"one")
    wait_for(lambda: c.seen(gone, EventId.VALUE_CHANGED), "the values on c")
    proxy.cut()
    wait_for(lambda: c.store.status.state is FleetState.DEGRADED, "c degraded")
    a.d.set_value(changed, b"two")
    a.d.set_value(changed, b"three")
    a.d.undefine(gone)
    a.d.define_xml(xml(new, "k.new"))
    a.d.set_value(new, b"fresh")
    rev = a.store.etcd.revision()
    a.store.etcd.compact(rev)
    before, resyncs = len(c.events), c.store.resyncs
    proxy.restore()
    wait_for(lambda: c.store.resyncs > resyncs, "c's resync")
    wait_for(lambda: c.store.status.state is FleetState.ONLINE, "c online again")
    got = sorted((e.uuid, e.event_id, e.lifecycle or 0) for e in c.events[before:])
    assert got == sorted([(changed, EventId.VALUE_CHANGED, 0), (gone, EventId.LIFECYCLE, Lifecycle.UNDEFINED),
                          (new, EventId.LIFECYCLE, Lifecycle.DEFINED), (new, EventId.VALUE_CHANGED, 0)])
    assert c.state() == a.state() == b.state()


def test_etcd_stopped_reads_served_writes_refused_restart_recovers(hosts: list[Host], etcd: EtcdCluster) -> None:
    a, b, _ = hosts
    u = uid(600)
    a.d.define_xml(xml(u, "down.600"))
    a.d.set_value(u, b"cached")
    wait_for(lambda: b.seen(u, EventId.VALUE_CHANGED), "the value on b")
    etcd.stop()
    for h in (a, b):
        wait_for(lambda h=h: h.store.status.state is FleetState.DEGRADED, f"{h.name} degraded")
        assert h.d.get_value(u) == b"cached"
        with pytest.raises(errors.OperationFailed, match="^fleet store unavailable: "):
            h.d.set_value(u, b"x")
    # a host restarted during the outage serves its cache
    b.close()
    b.open(online=False)
    assert b.store.status.state is not FleetState.ONLINE
    assert b.d.get_value(u) == b"cached"
    with pytest.raises(errors.OperationFailed, match="^fleet store unavailable: "):
        b.d.define_xml(xml(uid(601), "down.601"))
    reopened = len(b.events)
    etcd.start(new=False)
    for h in (a, b):
        assert h.store.cell.wait_online(WAIT), h.store.status
    a.d.define_xml(xml(uid(602), "down.602"))
    wait_for(lambda: b.seen(uid(602), EventId.LIFECYCLE, Lifecycle.DEFINED), "a define after recovery on b")
    # the resync after b's restart found its cache current: nothing to announce about u
    assert [e for e in b.events[reopened:] if e.uuid == u] == []


def test_etcd_holds_no_value_usage_or_description_in_clear(hosts: list[Host], etcd: EtcdCluster) -> None:
    a = hosts[0]
    marks = [b"Mark-Usage-7f3a", b"Mark-Desc-19c2", b"Mark-Value-55e1"]
    u = uid(700)
    a.d.define_xml(xml(u, marks[0].decode(), desc=marks[1].decode()))
    a.d.set_value(u, marks[2])
    a.d.define_xml(xml(uid(701), marks[0].decode() + "-2", private="yes"))
    a.d.set_value(uid(701), marks[2] + b"-private")
    dump = etcd.dump()
    import base64
    import json
    kvs = json.loads(dump)["kvs"]
    assert len(kvs) >= 5
    raw = b"".join(base64.b64decode(kv["key"]) + base64.b64decode(kv.get("value", "")) for kv in kvs)
    files = b"".join(p.read_bytes() for p in etcd.members[0].data_dir.rglob("*") if p.is_file())
    for m in marks:
        for blob in (raw, files):
            assert m not in blob and m.lower() not in blob.lower()
            assert base64.b64encode(m)[:12] not in blob


def test_a_host_with_another_fleet_key_is_refused(tmp_path: Path, etcd: EtcdCluster, hosts: list[Host]) -> None:
    hosts[0].d.define_xml(xml(uid(800), "key.800"))
    other, _ = make_host(tmp_path, "other", etcd.endpoints, os.urandom(32))
    other.open(online=False)
    try:
        wait_for(lambda: "fleet key" in other.store.status.reason, "the key mismatch")
        assert other.store.status.state is FleetState.DEGRADED
        assert other.d.list_secrets() == []
        with pytest.raises(errors.OperationFailed, match="^fleet store unavailable: .*fleet key"):
            other.d.define_xml(xml(uid(801), "key.801"))
    finally:
        other.close()


def test_three_member_cluster_survives_the_loss_of_one_member(tmp_path: Path) -> None:
    cluster = EtcdCluster.create(tmp_path / "etcd3", 3)
    made: list[Host] = []
    try:
        cluster.start()
        key = None
        for name in ("a", "b"):
            # each host prefers another member first
            ends = cluster.endpoints[len(made):] + cluster.endpoints[:len(made)]
            h, key = make_host(tmp_path, name, ends, key)
            made.append(h.open())
        a, b = made
        u = uid(900)
        a.d.define_xml(xml(u, "three.900"))
        a.d.set_value(u, b"one")
        wait_for(lambda: b.seen(u, EventId.VALUE_CHANGED), "the value on b")
        cluster.kill(cluster.members[1])        # b's first endpoint
        a.d.set_value(u, b"two")                # still a quorum: writes go on
        wait_for(lambda: b.d.get_value(u) == b"two", "the new value on b")
        wait_for(lambda: b.store.status.state is FleetState.ONLINE, "b online on another member")
        b.d.define_xml(xml(uid(901), "three.901"))
        wait_for(lambda: a.seen(uid(901), EventId.LIFECYCLE, Lifecycle.DEFINED), "b's define on a")
        assert a.state() == b.state()
    finally:
        for h in made:
            h.close()
        cluster.stop()


def test_cli_fleet_init_and_status(tmp_path: Path, etcd: EtcdCluster) -> None:
    import subprocess
    import sys

    def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", f"secret:///embed?root={root}",
                               "fleet", *args], capture_output=True, text=True, timeout=120)
    roots = []
    for name in ("one", "two", "three"):
        etc = tmp_path / name / "etc"
        etc.mkdir(parents=True, mode=0o700)
        (etc / "secretbusd.conf").write_text(f'fleet_endpoints = [ "{etcd.endpoints[0]}" ]\nfleet_cluster = "cli"\n')
        roots.append(tmp_path / name)
    r = cli(roots[0], "init", "--raw")
    assert r.returncode == 0 and "uses this key" in r.stdout, r
    first = roots[0] / "etc" / "secretbus-fleet" / "fleet-key"
    r = cli(roots[1], "init", "--raw", "--from-file", str(first))
    assert r.returncode == 0 and "uses this key" in r.stdout, r
    r = cli(roots[2], "init", "--raw")             # a key of its own: refused by the cluster
    assert r.returncode == 1 and "has another fleet key" in r.stderr, r
    r = cli(roots[1], "status")
    assert r.returncode == 0 and "cluster key: matches" in r.stdout and "fleet secrets: 0" in r.stdout, r
    assert first.read_bytes().hex() not in r.stdout + r.stderr


def test_secretbusd_serves_the_fleet_on_dbus(tmp_path: Path, etcd: EtcdCluster, session_bus, make_secretbusd) -> None:
    """A define on an embedded host reaches a secretbusd's D-Bus clients as signals; its D-Bus
    writes reach the fleet, and are refused with the fleet's text while etcd is down."""
    from secretbus.bus.client import DBusConnection
    from secretbus.core.model import InstanceKind
    a, key = make_host(tmp_path, "a", etcd.endpoints, None)
    a.open()
    d, _ = make_host(tmp_path, "d", etcd.endpoints, key)
    named = tmp_path / "d-secretbusd.conf"          # DESIGN §11: --config names the file of the fleet keys
    d.paths.server_conf_file.rename(named)
    daemon = make_secretbusd(session_bus, root=d.root, args=("--config", str(named)))
    conn = DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10,
                               bus_address=session_bus.address)
    got: list[SecretEvent] = []

    def fleet_state() -> str:
        r = gdbus(session_bus.address, "call", "--dest", "org.libvirt.secret", "--object-path",
                  "/org/libvirt/secret", "--method", "org.freedesktop.DBus.Properties.Get",
                  "org.libvirt.Connect", "FleetState")
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()
    monitor = subprocess.Popen(["gdbus", "monitor", "--address", session_bus.address, "--dest",
                                "org.libvirt.secret", "--object-path", "/org/libvirt/secret"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: fleet_state() == "(<'online'>,)", "FleetState online on D-Bus")
        # SIGHUP re-reads the --config file: a new cluster name needs a restart, and is refused
        named.write_text(named.read_text().replace('fleet_cluster = "test"', 'fleet_cluster = "other"'))
        daemon.signal()
        wait_for(lambda: f"{named}: in fleet mode a change of fleet_cluster needs a restart" in daemon.log(),
                 "the refused reload in the log")
        named.write_text(named.read_text().replace('fleet_cluster = "other"', 'fleet_cluster = "test"'))
        conn.subscribe(lambda s, ev: got.append(ev))
        u = uid(1000)
        a.d.define_xml(xml(u, "dbus.1000"))
        a.d.set_value(u, b"over-dbus")
        wait_for(lambda: any(e.uuid == u and e.event_id == EventId.VALUE_CHANGED for e in got), "the D-Bus signals")
        assert [(e.event_id, e.lifecycle) for e in got if e.uuid == u] == \
            [(EventId.LIFECYCLE, Lifecycle.DEFINED), (EventId.VALUE_CHANGED, None)]
        assert conn.lookup_by_usage(UsageType.CEPH, "dbus.1000").uuid == u
        assert conn.secret_get_value(u) == b"over-dbus"
        s = conn.define_xml(xml(uid(1001), "dbus.1001"))
        conn.secret_set_value(s.uuid, b"from-dbus")
        wait_for(lambda: a.seen(uid(1001), EventId.VALUE_CHANGED), "the D-Bus write on a")
        assert a.d.get_value(uid(1001)) == b"from-dbus"
        etcd.stop()
        wait_for(lambda: "fleet store unavailable" in daemon.log(), "the degraded state in the log")
        assert fleet_state() == "(<'degraded'>,)"
        assert conn.secret_get_value(u) == b"over-dbus"
        with pytest.raises(errors.OperationFailed, match="fleet store unavailable: "):
            conn.define_xml(xml(uid(1002), "dbus.1002"))
        assert "over-dbus" not in daemon.log() and "from-dbus" not in daemon.log()
        etcd.start(new=False)
        wait_for(lambda: fleet_state() == "(<'online'>,)", "FleetState online again")
        monitor.terminate()
        seen = monitor.communicate(timeout=10)[0]
        # PropertiesChanged on the Connect object, in order: degraded (with a reason), online
        changes = [line for line in seen.splitlines() if "FleetState" in line]
        assert any("'FleetState': <'degraded'>" in c and "'FleetStateReason': <''>" not in c for c in changes), seen
        assert "'FleetState': <'online'>" in changes[-1], seen
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait()
        conn.close()
        a.close()


def test_a_restarted_host_resyncs_from_its_cache_and_keeps_local_secrets(tmp_path: Path, etcd: EtcdCluster) -> None:
    a, key = make_host(tmp_path, "a", etcd.endpoints, None)
    b, _ = make_host(tmp_path, "b", etcd.endpoints, key, 'fleet_usage_types = [ "ceph" ]\n')
    a.open()
    b.open()
    try:
        s1, s2, s3, local = uid(1100), uid(1101), uid(1102), uid(1103)
        for u in (s1, s2):
            a.d.define_xml(xml(u, f"r.{u[-4:]}"))
            a.d.set_value(u, b"old")
        wait_for(lambda: b.seen(s2, EventId.VALUE_CHANGED), "the values on b")
        # a secret of a usage type b does not replicate stays on b
        b.d.define_xml(f"<secret ephemeral='no' private='no'><uuid>{local}</uuid>"
                       "<usage type='volume'><volume>/var/lib/images/local.img</volume></usage></secret>")
        b.d.set_value(local, b"mine")
        assert sorted(p.name for p in b.paths.config_dir.iterdir()) == [f"{local}.aes256gcm", f"{local}.xml"]
        b.close()
        a.d.undefine(s1)
        a.d.set_value(s2, b"new")
        a.d.define_xml(xml(s3, "r.s3"))
        b.open()
        assert a.state() == {k: v for k, v in b.state().items() if k != local}
        assert b.d.get_value(local) == b"mine"
        with pytest.raises(errors.NoSecret):
            a.d.lookup_by_uuid(local)
        # a restart with a current cache rewrites nothing
        cache = fleet_dir(b.paths) / "cache"
        before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
        b.close()
        b.open()
        assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before
        assert b.d.get_value(s2) == b"new"
    finally:
        a.close()
        b.close()


def test_a_failed_write_does_not_leave_the_host_degraded(hosts: list[Host]) -> None:
    """A write that times out marks the store degraded; with the watch still up, the heartbeat's
    quorum read brings it back online (no reconnect needed, nothing missed)."""
    a, b, _ = hosts
    a.store.cell.set(FleetState.DEGRADED, "simulated: a transaction timed out")
    with pytest.raises(errors.OperationFailed, match="^fleet store unavailable: simulated"):
        a.d.define_xml(xml(uid(1200), "hb.1200"))
    assert a.store.cell.wait_online(WAIT)
    a.d.define_xml(xml(uid(1200), "hb.1200"))
    wait_for(lambda: b.seen(uid(1200), EventId.LIFECYCLE, Lifecycle.DEFINED), "the define on b")


def test_the_largest_definition_the_rules_allow_replicates(hosts: list[Host]) -> None:
    """128 Ki characters of 4-byte UTF-8 in the description (the rules' limit) fit etcd's request limit."""
    from secretbus.driver.rules import DESCRIPTION_MAX
    a, b = hosts[0], hosts[1]
    big = "\U0001F511" * DESCRIPTION_MAX
    a.d.define_xml(xml(uid(1300), "big.1300", desc=big))
    assert b.d.lookup_by_uuid(uid(1300)).description == big
    assert a.store.status.state is FleetState.ONLINE


def test_secrets_a_host_had_before_fleet_mode_stay_local(tmp_path: Path, etcd: EtcdCluster) -> None:
    a, key = make_host(tmp_path, "a", etcd.endpoints, None)
    conf = a.paths.server_conf_file
    fleet_conf = conf.read_text()
    conf.write_text("")                                         # no fleet yet
    u = uid(1400)
    d = open_instance(a.paths)
    d.define_xml(xml(u, "old.1400"))
    d.set_value(u, b"kept")
    d.close()
    conf.write_text(fleet_conf)
    b, _ = make_host(tmp_path, "b", etcd.endpoints, key)
    a.open()
    b.open()
    try:
        assert a.d.get_value(u) == b"kept"
        a.d.define_xml(xml(u, "old.1400", desc="redefined"))
        assert a.d.get_value(u) == b"kept"
        a.d.set_value(u, b"kept-2")
        with pytest.raises(errors.NoSecret):
            b.d.lookup_by_uuid(u)
        a.close()
        a.open()
        assert a.d.get_value(u) == b"kept-2" and a.d.lookup_by_uuid(u).description == "redefined"
        assert not a.store.is_fleet(u)
    finally:
        a.close()
        b.close()


def test_rewrite_values_works_on_the_cache_while_etcd_is_down(tmp_path: Path, etcd: EtcdCluster) -> None:
    a, _ = make_host(tmp_path, "a", etcd.endpoints, None)
    a.open()
    try:
        u = uid(1500)
        a.d.define_xml(xml(u, "rw.1500"))
        a.d.set_value(u, b"rewritten")
        a.close()
        etcd.stop()
        a.open(online=False)
        before = (fleet_dir(a.paths) / "cache" / f"{u}.aes256gcm").read_bytes()
        assert tuple(a.d.rewrite_values()) == (1, 1, 0)
        assert (fleet_dir(a.paths) / "cache" / f"{u}.aes256gcm").read_bytes() != before   # new nonce
        a.close()
        a.open(online=False)
        assert a.d.get_value(u) == b"rewritten"
        with pytest.raises(errors.OperationFailed, match="^fleet store unavailable: "):
            a.d.set_value(u, b"changed")
    finally:
        a.close()


def test_a_resync_in_several_steps_applies_everything_a_step_at_a_time(
        tmp_path: Path, etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step of a resync is applied; its cache writes share one directory fsync
    (fleet/cachewrites.py: two steps here, not one fsync per secret), and what they wrote is
    what b serves after a restart."""
    from secretbus.fleet.store import RESYNC_STEP
    a, key = make_host(tmp_path, "a", etcd.endpoints, None)
    b, _ = make_host(tmp_path, "b", etcd.endpoints, key)
    a.open()
    try:
        n = RESYNC_STEP + 40
        for i in range(n):
            a.d.define_xml(xml(uid(20000 + i), f"big.{i}"))
        for i in range(0, n, 37):
            a.d.set_value(uid(20000 + i), f"value {i}".encode())
        cache = str(fleet_dir(b.paths) / "cache")
        real = os.fsync
        synced: list[int] = []

        def counting(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}") == cache:
                synced.append(fd)
            real(fd)
        monkeypatch.setattr(os, "fsync", counting)
        b.open()
        monkeypatch.setattr(os, "fsync", real)
        assert b.store.resyncs == 1
        assert b.state() == a.state() and len(b.state()) == n
        assert b.d.get_value(uid(20000)) == b"value 0"
        assert 1 <= len(synced) <= 4, len(synced)
        assert b.store.cache_writes.batches >= 2
        assert not [f for f in os.listdir(cache) if not f.endswith((".xml", ".aes256gcm"))]   # no temp or spare
        b.close()
        b.open(online=False)        # from the cache alone
        assert b.state() == a.state()
    finally:
        a.close()
        b.close()


def test_a_change_the_cache_cannot_write_is_logged_and_the_rest_of_its_batch_is_written(
        tmp_path: Path, etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    a, key = make_host(tmp_path, "a", etcd.endpoints, None)
    b, _ = make_host(tmp_path, "b", etcd.endpoints, key)
    a.open()
    try:
        us = [uid(22000 + i) for i in range(5)]
        for i, u in enumerate(us):
            a.d.define_xml(xml(u, f"failing.{i}"))
            a.d.set_value(u, f"value {i}".encode())
        bad = us[2]
        real = os.rename

        def rename(src: str, dst: str, **kw: object) -> None:
            if dst.startswith(bad):
                raise OSError(5, "Input/output error")
            real(src, dst, **kw)        # type: ignore[arg-type]
        monkeypatch.setattr(os, "rename", rename)
        with caplog.at_level(logging.ERROR, logger="secretbus.fleet"):
            b.open()
        monkeypatch.setattr(os, "rename", real)
        assert b.state() == a.state()       # served: the driver has every change
        cache = fleet_dir(b.paths) / "cache"
        assert sorted(f for f in os.listdir(cache)) == sorted(
            f"{u}.{sfx}" for u in us if u != bad for sfx in ("xml", "aes256gcm"))
        lines = [r.getMessage() for r in caplog.records if "cannot cache" in r.getMessage()]
        assert lines and all(bad in line and "Input/output error" in line for line in lines)
        assert not any("value " in r.getMessage() for r in caplog.records)
    finally:
        a.close()
        b.close()


def test_fleet_over_tls_with_client_certificates(tmp_path: Path) -> None:
    from tests.harness.etcd import Pki
    pki = Pki.create(tmp_path / "pki")
    cluster = EtcdCluster.create(tmp_path / "etcd-tls", 1, pki=pki)
    tls = (f'fleet_ca_file = "{pki.ca}"\nfleet_cert_file = "{pki.client_cert}"\n'
           f'fleet_key_file = "{pki.client_key}"\n')
    made: list[Host] = []
    try:
        cluster.start()
        assert cluster.endpoints[0].startswith("https://")
        a, key = make_host(tmp_path, "a", cluster.endpoints, None, tls)
        b, _ = make_host(tmp_path, "b", cluster.endpoints, key, tls)
        made += [a.open(), b.open()]
        u = uid(1600)
        a.d.define_xml(xml(u, "tls.1600"))
        a.d.set_value(u, b"over-tls")
        wait_for(lambda: b.seen(u, EventId.VALUE_CHANGED), "the value on b")
        assert b.d.get_value(u) == b"over-tls"
        # without a client certificate etcd refuses the host: it stays degraded
        c, _ = make_host(tmp_path, "c", cluster.endpoints, key, f'fleet_ca_file = "{pki.ca}"\n')
        made.append(c.open(online=False))
        wait_for(lambda: c.store.status.state is FleetState.DEGRADED, "c degraded")
        assert c.d.list_secrets() == []
        # a stopped watch over TLS ends cleanly (the stream is shut down, not left blocking)
        b.close()
        a.d.set_value(u, b"again")
    finally:
        for h in made:
            h.close()
        cluster.stop()


def test_a_reload_in_fleet_mode_keeps_the_store_and_follows_the_conf(hosts: list[Host]) -> None:
    """SIGHUP's driver.reload in fleet mode: the same store (watch, cache, connection) serves on,
    what the host publishes follows the new conf; changes that need a new store are refused and
    change nothing."""
    a, b, _ = hosts
    conf, secret_conf = a.paths.server_conf_file, a.paths.conf_file
    text, secret_text = conf.read_text(), secret_conf.read_text()
    store = a.store
    a.d.define_xml(xml(uid(700), "reload.700"))
    conf.write_text(text + "fleet_private = 0\n")
    summary = a.d.reload()
    assert a.store is store and summary.loaded == 1 and a.store.status.state is FleetState.ONLINE
    a.d.define_xml(xml(uid(701), "reload.701", private="yes"))     # now kept on a
    a.d.define_xml(xml(uid(702), "reload.702"))
    wait_for(lambda: b.seen(uid(702), EventId.LIFECYCLE, Lifecycle.DEFINED), "the public define on b")
    assert not b.seen(uid(701), EventId.LIFECYCLE, Lifecycle.DEFINED)
    assert not a.store.is_fleet(uid(701)) and a.store.is_fleet(uid(702))
    refused = {
        "fleet_cluster": (conf, text.replace('fleet_cluster = "test"', 'fleet_cluster = "other"')),
        "fleet_endpoints": (conf, text.replace("fleet_endpoints = [", 'fleet_endpoints = [ "http://127.0.0.1:1",')),
        "secrets_encryption_key": (secret_conf, secret_text.replace("host-key", "other-key")),
        "fleet mode ends": (conf, "\n".join(x for x in text.splitlines() if not x.startswith("fleet_endpoints"))),
        "both here and in": (secret_conf, secret_text + 'fleet_cluster = "test"\n'),
    }
    for what, (where, bad) in refused.items():
        where.write_text(bad)
        with pytest.raises(errors.ConfigError, match=what):
            a.d.reload()
        assert a.store is store and a.d.conf.fleet_private is False and a.d.count() == 3
        conf.write_text(text + "fleet_private = 0\n")
        secret_conf.write_text(secret_text)
    conf.write_text(text)
    a.d.reload()
    a.d.define_xml(xml(uid(703), "reload.703", private="yes"))     # published again
    wait_for(lambda: b.seen(uid(703), EventId.LIFECYCLE, Lifecycle.DEFINED), "the private define on b")


def test_a_reload_does_not_turn_fleet_mode_on(tmp_path: Path, etcd: EtcdCluster) -> None:
    h, _ = make_host(tmp_path, "plain", etcd.endpoints, None)
    conf = h.paths.server_conf_file
    text = conf.read_text()
    conf.write_text("\n".join(x for x in text.splitlines() if not x.startswith("fleet_endpoints")))
    d = open_instance(h.paths)
    try:
        assert not isinstance(d.store, FleetStore)
        conf.write_text(text)
        with pytest.raises(errors.ConfigError, match="fleet mode starts with a restart"):
            d.reload()
        assert not isinstance(d.store, FleetStore) and d.store_state().state == "local"
    finally:
        d.close()


def test_rotate_key_on_a_fleet_host_rewrites_its_cache_only(tmp_path: Path, etcd: EtcdCluster, session_bus,
                                                              make_secretbusd) -> None:
    """`secretbus rotate-key` on a host serving the fleet: its local cache (and local-only
    secrets) move to the new host key while it serves; etcd and the other hosts see nothing."""
    from secretbus.bus.client import DBusConnection
    from secretbus.core.model import InstanceKind
    from secretbus.fleet.store import CACHE_DIR
    from secretbus.store.crypto import gcm_key_id, key_id
    from secretbus.store.keys import load_key
    from tests.test_cli import entry_point
    a, key = make_host(tmp_path, "a", etcd.endpoints, None)
    a.open()
    d, _ = make_host(tmp_path, "d", etcd.endpoints, key, extra_conf="fleet_private = 0\n")
    daemon = make_secretbusd(session_bus, root=d.root)
    conn = DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10,
                               bus_address=session_bus.address)
    try:
        u, local = uid(1100), uid(1101)
        a.d.define_xml(xml(u, "rot.1100"))
        a.d.set_value(u, b"fleet-value")
        wait_for(lambda: _value_or_none(conn, u) == b"fleet-value", "the fleet value on d")
        conn.define_xml(xml(local, "rot.1101", private="yes"))      # fleet_private = 0: d's own
        conn.secret_set_value(local, b"local-value")
        old = load_key(d.paths.conf_file.parent / "host-key")
        dirs = [d.paths.config_dir, fleet_dir(d.paths) / CACHE_DIR]

        def kids() -> set[bytes | None]:
            return {gcm_key_id((x / f).read_bytes()) for x in dirs for f in os.listdir(x) if f.endswith(".aes256gcm")}
        assert kids() == {key_id(old)}
        seen_on_a = len(a.events)
        r = subprocess.run(entry_point() + ["-c", f"secret:///embed?root={d.root}", "rotate-key"],
                           capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr
        new = load_key(d.paths.conf_file.parent / "host-key")
        assert new != old and kids() == {key_id(new)}
        wait_for(lambda: not (d.paths.config_dir / "key-rotation").exists(), "the finished rotation's record gone")
        assert conn.secret_get_value(u) == b"fleet-value"
        assert a.d.get_value(u) == b"fleet-value" and a.events[seen_on_a:] == []    # nothing went to etcd
        daemon.stop()
        daemon = make_secretbusd(session_bus, root=d.root)
        conn.close()
        conn = DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10,
                                   bus_address=session_bus.address)
        assert conn.secret_get_value(u) == b"fleet-value"
        assert "skipped 0" in daemon.log() or "skipped" not in daemon.log()
        for secret in (old.hex(), new.hex(), "fleet-value", "local-value"):
            assert secret not in daemon.log()
    finally:
        conn.close()
        a.close()


def _value_or_none(conn, u: str) -> bytes | None:
    try:
        return conn.secret_get_value(u)
    except errors.SecretError:
        return None


def test_three_secretbusd_hosts_on_a_three_member_cluster(tmp_path: Path, make_bus, make_secretbusd) -> None:
    """Issue 16's set-up with the real daemons: three secretbusd, each with its own root and
    bus, on a three-member etcd. A define over D-Bus on A is served by B and C with signals
    there; the same usage defined at once on B and C wins on exactly one; with one etcd member
    killed everything goes on; values stay equal everywhere."""
    from secretbus.bus.client import DBusConnection
    from secretbus.core.model import InstanceKind
    cluster = EtcdCluster.create(tmp_path / "etcd3", 3)
    conns: list[DBusConnection] = []
    try:
        cluster.start()
        key = None
        got: list[list[SecretEvent]] = [[], [], []]
        for i, name in enumerate(("a", "b", "c")):
            ends = cluster.endpoints[i:] + cluster.endpoints[:i]     # each prefers another member
            h, key = make_host(tmp_path, name, ends, key)
            bus = make_bus("session")
            make_secretbusd(bus, root=h.root)
            c = DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10, bus_address=bus.address)
            c.subscribe(lambda s, ev, i=i: got[i].append(ev))
            conns.append(c)
        a, b, c = conns
        u = uid(1200)
        a.define_xml(xml(u, "three-d.1200"))
        a.secret_set_value(u, b"everywhere")
        for i in (1, 2):
            wait_for(lambda i=i: any(e.uuid == u and e.event_id == EventId.VALUE_CHANGED for e in got[i]),
                     f"the value's signal on host {i}")
            assert [(e.event_id, e.lifecycle) for e in got[i] if e.uuid == u] == \
                [(EventId.LIFECYCLE, Lifecycle.DEFINED), (EventId.VALUE_CHANGED, None)]
            assert conns[i].secret_get_value(u) == b"everywhere"
        # the same usage from B and C at once: exactly one wins fleet-wide
        results: list[object] = [None, None]

        def define(j: int, conn: DBusConnection) -> None:
            try:
                results[j] = conn.define_xml(xml(uid(1201 + j), "three-d.race")).uuid
            except errors.SecretError as e:
                results[j] = e
        threads = [threading.Thread(target=define, args=(j, conn)) for j, conn in enumerate((b, c))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners = [r for r in results if isinstance(r, str)]
        assert len(winners) == 1, results
        for conn in conns:
            wait_for(lambda conn=conn: _lookup(conn, "three-d.race") == winners[0], "the winner everywhere")
        cluster.kill(cluster.members[1])           # b's first endpoint

        def write_on_b() -> bool:
            try:
                b.secret_set_value(u, b"after-kill")
            except errors.OperationFailed as e:    # refused until b is on another member
                assert e.message.startswith("fleet store unavailable: "), e.message
                return False
            return True
        wait_for(write_on_b, "b writing through another member")
        for conn in (a, c):
            wait_for(lambda conn=conn: _value_or_none(conn, u) == b"after-kill", "the write after the kill")
    finally:
        for conn in conns:
            conn.close()
        cluster.stop()


def _lookup(conn, usage: str) -> str | None:
    try:
        return conn.lookup_by_usage(UsageType.CEPH, usage).uuid
    except errors.SecretError:
        return None


def _before_fleet(h: Host, defs: list[tuple[str, str, bytes | None]]) -> None:
    """Define `defs` (uuid, xml, value) on `h` as a host without fleet mode would have them."""
    conf = h.paths.server_conf_file
    fleet_conf = conf.read_text()
    conf.write_text("")
    d = open_instance(h.paths)
    try:
        for u, text, value in defs:
            d.define_xml(text)
            if value is not None:
                d.set_value(u, value)
    finally:
        d.close()
        conf.write_text(fleet_conf)


def _outcomes(results: list[PublishResult]) -> dict[str, Published]:
    return {r.uuid: r.outcome for r in results}


def test_publish_moves_the_secrets_of_before_fleet_mode_into_the_fleet(tmp_path: Path, etcd: EtcdCluster) -> None:
    a, key = make_host(tmp_path, "a", etcd.endpoints, None, 'fleet_usage_types = [ "ceph", "volume" ]\n')
    b, _ = make_host(tmp_path, "b", etcd.endpoints, key)
    u1, u2, u3, u4, same, other = (uid(n) for n in range(2100, 2106))
    tls = f"<secret ephemeral='no' private='no'><uuid>{u3}</uuid><usage type='tls'><name>web</name></usage></secret>"
    _before_fleet(a, [(u1, xml(u1, "pub.one"), b"v-one"),
                      (u2, f"<secret ephemeral='no' private='no'><uuid>{u2}</uuid><usage type='volume'>"
                           "<volume>/var/lib/pub.img</volume></usage></secret>", None),
                      (u3, tls, b"v-tls"),
                      (u4, xml(u4, "pub.taken"), b"v-four"),
                      (same, xml(same, "pub.same"), b"v-same"),
                      (other, xml(other, "pub.other"), b"v-a")])
    # b had two of them before fleet mode too, defined by hand (libvirt's way of sharing a secret)
    _before_fleet(b, [(same, xml(same, "pub.same"), b"v-same"), (other, xml(other, "pub.other"), b"v-b")])
    a.open()
    b.open()
    try:
        b.d.define_xml(xml(uid(2199), "pub.taken"))          # a fleet secret holds u4's usage
        wait_for(lambda: a.store.is_fleet(uid(2199)), "b's define on a")
        assert not a.store.is_fleet(u1) and a.store.local_copies() == []

        results = a.d.publish_to_fleet()
        assert _outcomes(results) == {u1: Published.PUBLISHED, u2: Published.PUBLISHED, u3: Published.STAYS_LOCAL,
                                      u4: Published.REFUSED, same: Published.PUBLISHED, other: Published.PUBLISHED}
        why = {r.uuid: r.reason for r in results}
        assert why[u3] == "its usage type 'tls' is not in fleet_usage_types"
        assert why[u4] == f"a secret with UUID {uid(2199)} is already defined for use with pub.taken"
        # a serves what it served, from the cache now; its own directory keeps only what stays local
        assert a.d.get_value(u1) == b"v-one" and a.store.is_fleet(u1) and a.store.is_fleet(u2)
        assert sorted(p.name for p in a.paths.config_dir.glob("*.xml")) == sorted([f"{u3}.xml", f"{u4}.xml"])
        assert a.events == []         # nothing changed for a's callers
        # b learns the new ones with their events; for the two it has itself the fleet's copy wins
        wait_for(lambda: b.seen(u1, EventId.VALUE_CHANGED), "u1's value on b")
        assert b.seen(u1, EventId.LIFECYCLE, Lifecycle.DEFINED) == 1 and b.d.get_value(u1) == b"v-one"
        wait_for(lambda: b.d.get_value(other) == b"v-a", "the fleet's value of the clashing copy on b")
        assert b.store.local_copies() == sorted([same, other])

        # b publishes: the same copy is retired, the other is kept (and reported), nothing else changes
        results = b.d.publish_to_fleet()
        assert _outcomes(results) == {same: Published.ALREADY, other: Published.REFUSED}
        assert "the fleet has it with another definition or value" in results[1].reason
        assert not b.paths.config_dir.joinpath(f"{same}.xml").exists()
        assert b.paths.config_dir.joinpath(f"{other}.xml").exists() and b.d.get_value(other) == b"v-a"
        assert b.store.local_copies() == [other]
        # named: a secret that stays local by conf is refused, and one not here is NoSecret
        (r,) = a.d.publish_to_fleet(u3)
        assert r.outcome is Published.REFUSED and r.reason.endswith("is not in fleet_usage_types")
        (r,) = a.d.publish_to_fleet(u1)
        assert r.outcome is Published.REFUSED and r.reason.endswith("it is in the fleet already")
        with pytest.raises(errors.NoSecret):
            a.d.publish_to_fleet(uid(2198))

        # a published secret is a fleet secret everywhere: a write on a reaches b
        a.d.set_value(u1, b"v-one-2")
        wait_for(lambda: b.d.get_value(u1) == b"v-one-2", "a's new value on b")
        # undefining the one b still has a copy of removes that copy too: it does not come back
        b.d.undefine(other)
        assert not b.paths.config_dir.joinpath(f"{other}.xml").exists()
        wait_for(lambda: not a.store.is_fleet(other), "the undefine on a")
        for h in (a, b):
            h.close()
            h.open()
        assert a.d.get_value(u1) == b"v-one-2" and b.d.get_value(u1) == b"v-one-2"
        assert a.d.get_value(u3) == b"v-tls" and not a.store.is_fleet(u3)
        for h in (a, b):
            with pytest.raises(errors.NoSecret):
                h.d.lookup_by_uuid(other)
    finally:
        a.close()
        b.close()


def _host_with_one_older_secret(tmp_path: Path, etcd: EtcdCluster, n: int, value: bytes) -> tuple[Host, str]:
    """A host (open) with one secret of before fleet mode, `uid(n)`, of value `value`."""
    a, _ = make_host(tmp_path, "a", etcd.endpoints, None)
    u = uid(n)
    _before_fleet(a, [(u, xml(u, f"older.{n}"), value)])
    return a.open(), u


def test_a_publish_cut_after_its_commit_is_finished_by_the_next(tmp_path: Path, etcd: EtcdCluster,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    a, u = _host_with_one_older_secret(tmp_path, etcd, 2200, b"v-cut")
    try:
        def crash(self: FleetStore, uuid: str) -> None:
            raise errors.SystemError("simulated crash")
        monkeypatch.setattr(FleetStore, "_remove_local_copy", crash)
        (r,) = a.d.publish_to_fleet()
        assert r.outcome is Published.REFUSED
        assert r.reason == f"secret {u} is in the fleet now, but its local copy stays: simulated crash " \
                           "(a second publish removes it)"
        monkeypatch.undo()
        # committed and cached, the local copy still there: the fleet's is served, also after a restart
        assert a.store.is_fleet(u) and a.store.local_copies() == [u]
        a.close()
        a.open()
        assert a.d.get_value(u) == b"v-cut" and a.store.local_copies() == [u]
        status = admin.status(a.paths, load_instance_conf(a.paths))
        assert "local secrets: 0 (served by this host only; 'secretbus fleet publish' moves them into the fleet)" \
            in status
        assert any(line.startswith("PROBLEM: 1 local copies of fleet secrets") and u in line for line in status)
        # and cut again between the copy's value file and its XML: the XML alone is retired too
        values = [p for p in a.paths.config_dir.glob(f"{u}.*") if p.suffix != ".xml"]
        assert values
        for p in values:
            p.unlink()
        (r,) = a.d.publish_to_fleet()
        assert r.outcome is Published.ALREADY and a.store.local_copies() == []
        assert not any("PROBLEM" in line for line in admin.status(a.paths, load_instance_conf(a.paths)))
        a.close()
        a.open()
        assert a.d.get_value(u) == b"v-cut" and a.store.is_fleet(u)
    finally:
        a.close()


def test_cli_fleet_publish_and_status(tmp_path: Path, etcd: EtcdCluster) -> None:
    import sys
    a, _ = make_host(tmp_path, "a", etcd.endpoints, None)
    u1, u2 = uid(2300), uid(2301)
    _before_fleet(a, [(u1, xml(u1, "cli.one"), b"cli-value-one"), (u2, xml(u2, "cli.two", private="yes"), b"v2")])

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", f"secret:///embed?root={a.root}",
                               "fleet", *args], capture_output=True, text=True, timeout=120)
    r = cli("status")
    assert r.returncode == 0 and "local secrets: 2 (served by this host only" in r.stdout, r
    a.open()
    try:
        r = cli("publish")                          # the instance is in use: refused, nothing changed
        assert r.returncode == 1 and "stop it before 'fleet publish'" in r.stderr, r
        assert not a.store.is_fleet(u1)
    finally:
        a.close()
    r = cli("publish", u1)
    assert r.returncode == 0 and r.stdout.splitlines()[:2] == [
        f"Secret {u1} published to fleet cluster 'test'", "1 of 1 local secrets are in the fleet now"], r
    r = cli("publish", "--config", str(tmp_path / "none.conf"))
    assert r.returncode == 1 and "none.conf" in r.stderr, r
    r = cli("publish")
    assert r.returncode == 0 and f"Secret {u2} published" in r.stdout, r
    r = cli("status")
    assert "fleet secrets: 2" in r.stdout and "local secrets: 0" in r.stdout and "PROBLEM" not in r.stdout, r
    assert b"cli-value-one".decode() not in r.stdout + r.stderr


def _count_txns(h: Host) -> list[int]:
    """Counts h's etcd transactions: [n]."""
    n = [0]
    real = h.store.etcd.txn

    def txn(*args: object, **kw: object) -> object:
        n[0] += 1
        return real(*args, **kw)  # type: ignore[arg-type]
    h.store.etcd.txn = txn  # type: ignore[method-assign]
    return n


def test_concurrent_fleet_writes_share_one_transaction(hosts: list[Host]) -> None:
    a, b, _ = hosts
    old = [uid(2400 + i) for i in range(6)]
    new = [uid(2410 + i) for i in range(6)]
    for i, u in enumerate(old):
        a.d.define_xml(xml(u, f"batch.{i}"))
        a.d.set_value(u, b"first")
    wait_for(lambda: all(b.store.is_fleet(u) for u in old), "the secrets on b")
    txns = _count_txns(a)
    gate = Gate(a.d, timeout=20)
    futures = [a.d.submit_set_value(u, b"second") for u in old[:3]]
    futures += [a.d.submit_undefine(u) for u in old[3:5]]
    futures.append(a.d.submit_define(a.d.parse_definition(xml(old[5], "batch.5", desc="again"))))
    futures += [a.d.submit_define(a.d.parse_definition(xml(u, f"batch.new.{i}"))) for i, u in enumerate(new)]
    assert gate.held.wait(20)
    gate.open()
    for f in futures:
        f.result(20)
    assert txns[0] <= 2, txns        # 12 writes: one transaction (the first may have gone alone)
    for h in (a, b):
        wait_for(lambda h=h: all(h.store.is_fleet(u) for u in new) and not h.store.is_fleet(old[3]),
                 f"the batch on {h.name}")
        assert [h.d.get_value(u) for u in old[:3]] == [b"second"] * 3
        assert h.d.lookup_by_uuid(old[5]).description == "again" and h.d.get_value(old[5]) == b"first"
        for u in old[3:5]:
            with pytest.raises(errors.NoSecret):
                h.d.lookup_by_uuid(u)
    assert b.seen(new[0], EventId.LIFECYCLE, Lifecycle.DEFINED) == 1
    assert a.seen(new[0], EventId.LIFECYCLE, Lifecycle.DEFINED) == 1          # announced once
    # a batch one of whose records another host changed meanwhile: the others still go
    gate = Gate(a.d, timeout=20)
    before = txns[0]
    futures = [a.d.submit_set_value(u, b"third") for u in old[:3]]
    assert gate.held.wait(20)
    b.d.define_xml(xml(old[1], "batch.1", desc="by b"))     # a's watch waits behind the held writes
    gate.open()
    outcomes = []
    for f in futures:
        try:
            f.result(20)
            outcomes.append("ok")
        except errors.OperationFailed as e:
            outcomes.append(str(e))
    assert outcomes == ["ok", f"secret {old[1]} was changed on another host meanwhile; try again", "ok"], outcomes
    assert txns[0] - before == 4           # the batch's, refused, then one each
    for h in (a, b):
        wait_for(lambda h=h: h.d.lookup_by_uuid(old[1]).description == "by b", f"b's redefine on {h.name}")
        wait_for(lambda h=h: h.d.get_value(old[0]) == b"third", f"the batch's values on {h.name}")
        assert h.d.get_value(old[1]) == b"second" and h.d.get_value(old[2]) == b"third"


def test_a_publish_keeps_the_local_copy_until_the_cache_has_the_fleets(tmp_path: Path, etcd: EtcdCluster,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    a, u = _host_with_one_older_secret(tmp_path, etcd, 2500, b"v-nocache")
    try:
        # every cache file of the commit fails (logged, as after any commit): the copy stays
        monkeypatch.setattr(a.store.cache_writes, "_commit", lambda plans: None)
        (r,) = a.d.publish_to_fleet()
        assert r.outcome is Published.REFUSED and r.reason == (
            f"secret {u} is in the fleet now, but its local copy stays: this host's fleet cache has no copy "
            "of it yet (the service's next start writes one) (a second publish removes it)")
        (r,) = a.d.publish_to_fleet()
        assert r.outcome is Published.REFUSED and r.reason.startswith(f"secret {u} is in the fleet, but its local")
        assert a.store.local_copies() == [u] and a.d.get_value(u) == b"v-nocache"
        monkeypatch.undo()
        a.close()
        a.open()                                  # the start's resync writes the cache
        (r,) = a.d.publish_to_fleet()
        assert r.outcome is Published.ALREADY and a.store.local_copies() == []
        a.close()
        a.open()
        assert a.d.get_value(u) == b"v-nocache" and a.store.is_fleet(u)
    finally:
        a.close()

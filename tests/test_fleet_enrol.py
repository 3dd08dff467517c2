"""Fleet enrolment on a real etcd (Debian's etcd-server): `fleet join | approve | revoke | leave |
status` through the CLI entry point (a subprocess per command, as an operator runs them) and
embedded hosts with their own roots (tests/test_fleet.py's); wrap and record parsing as units."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secretbus.core import errors
from secretbus.core.model import EventId
from secretbus.fleet import enrol
from secretbus.fleet.enrol_records import HostRecord, RecordError
from secretbus.fleet.enrol_wrap import WrapError, unwrap, wrap
from secretbus.fleet.etcd import TXN_OPS, Etcd, prefix_end
from secretbus.fleet.hostkey import HostKey, host_id, load_host_key
from secretbus.fleet.keyfile import fleet_dir, load_fleet_key, load_fleet_keys
from secretbus.fleet.keyspace import Keyspace
from secretbus.fleet.seal import FleetKey
from secretbus.store.keys import init_encryption
from secretbus.store.paths import InstancePaths
from tests.harness.etcd import EtcdCluster
from tests.test_fleet import WAIT, Host, uid, wait_for, xml

CLUSTER = "enrol"
KEYS = Keyspace(CLUSTER)
ID = re.compile(r"[0-9a-f]{32}")

needs_etcd = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")


# -- units: the wrap and the record ------------------------------------------------------
def _host() -> HostKey:
    return HostKey(X25519PrivateKey.generate(), True)


def test_a_wrap_opens_only_for_its_host_cluster_and_version() -> None:
    key, me, other = FleetKey(1, os.urandom(32)), _host(), _host()
    w = wrap(key, me.public, "c1", me.id)
    assert unwrap(w, me.private, "c1", me.id).key == key.key
    assert key.key not in w
    for private, cluster, host in ((other.private, "c1", me.id), (me.private, "c2", me.id),
                                   (me.private, "c1", other.id)):
        with pytest.raises(WrapError):
            unwrap(w, private, cluster, host)
    for i in range(len(w)):       # any changed byte, the header's key version included
        bad = bytearray(w)
        bad[i] ^= 1
        with pytest.raises(WrapError) as e:
            unwrap(bytes(bad), me.private, "c1", me.id)
        assert key.key.hex() not in str(e.value)
    with pytest.raises(WrapError):
        unwrap(w[:-1], me.private, "c1", me.id)
    with pytest.raises(WrapError):
        wrap(key, bytes(32), "c1", me.id)          # a low-order public key
    assert "key" not in repr(me).replace("HostKey", "")


def test_host_records_are_parsed_strictly() -> None:
    me = _host()
    r = HostRecord.new(me.public, "node\x1b[31m-1")
    back = HostRecord.decode(r.encode())
    assert back.public == me.public and back.id == me.id == host_id(me.public)
    assert back.hostname == "node?[31m-1"          # no terminal escapes reach the operator
    good = json.loads(r.encode())
    for bad in (b"not json", b"[]", json.dumps({**good, "v": 2}).encode(),
                json.dumps({**good, "pub": "!!"}).encode(),
                json.dumps({**good, "pub": base64.b64encode(b"x" * 31).decode()}).encode(),
                json.dumps({**good, "hostname": 5}).encode(), b" " * 5000):
        with pytest.raises(RecordError):
            HostRecord.decode(bad)
    for text in ("", "ABC", "0" * 31, "g" * 32, "../" + "0" * 29, "0" * 33):
        with pytest.raises(errors.InvalidArg):
            enrol.check_id(text)
        with pytest.raises(ValueError):
            KEYS.host_pub(text)


# -- integration: real etcd, CLI and embedded hosts ------------------------------------------
@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd-server is not installed")
    c = EtcdCluster.create(tmp_path / "etcd", 1)
    c.start()
    yield c
    c.stop()


class Fleet:
    """Hosts as embedded-instance roots; every fleet command through the CLI entry point."""

    def __init__(self, base: Path, etcd: EtcdCluster, environ: dict[str, str] | None = None):
        self.base, self.etcd = base, etcd
        self.environ = environ or dict(os.environ)
        self.outputs: list[str] = []       # everything any command printed, scanned for keys
        self.opened: list[Host] = []

    def root(self, name: str) -> Path:
        root = self.base / name
        etc = root / "etc"
        if not etc.exists():
            etc.mkdir(parents=True, mode=0o700)
            init_encryption(etc / "host-key", raw=True)      # the cache's at-rest key
            (etc / "secret.conf").write_text(f'secrets_encryption_key = "{etc / "host-key"}"\n')
            (etc / "secretbusd.conf").write_text(f'fleet_endpoints = [ "{self.etcd.endpoints[0]}" ]\n'
                                                 f'fleet_cluster = "{CLUSTER}"\n')
        return root

    def cli(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", f"secret:///embed?root={self.root(name)}",
                            "fleet", *args], capture_output=True, text=True, timeout=timeout, env=self.environ)
        self.outputs += [r.stdout, r.stderr]
        return r

    def join(self, name: str, *args: str) -> str:
        r = self.cli(name, "join", "--raw", *args)
        assert r.returncode == 0, r
        assert ID.fullmatch(r.stdout.rstrip("\n")) and r.stdout.count("\n") == 1, r   # the id, nothing else
        return r.stdout.strip()

    def host(self, name: str) -> Host:
        h = Host(name, self.root(name), self.etcd.endpoints)
        self.opened.append(h)
        return h

    def close(self) -> None:
        for h in self.opened:
            h.close()

    def client(self) -> Etcd:
        return Etcd(self.etcd.endpoints)

    def key_material(self) -> list[bytes]:
        """Every fleet key and host private key on disk, in each form a leak might take."""
        raw = [p.read_bytes() for p in self.base.glob("*/etc/secretbus-fleet/*-key*") if p.suffix != ".cred"]
        assert raw
        return [f for k in raw for f in (k, k.hex().encode(), base64.b64encode(k)[:20], base64.b64encode(k)[:-2])]


@pytest.fixture
def fleet(tmp_path: Path, etcd: EtcdCluster) -> Iterator[Fleet]:
    f = Fleet(tmp_path, etcd)
    yield f
    f.close()


def _init_first(fleet: Fleet) -> str:
    r = fleet.cli("a", "init", "--raw")
    assert r.returncode == 0, r
    m = re.search(r"This host is fleet host ([0-9a-f]{32})", r.stdout)
    assert m, r
    return m.group(1)


def test_join_approve_then_the_joined_host_serves_the_fleet(fleet: Fleet) -> None:
    a_id = _init_first(fleet)
    a = fleet.host("a").open()
    u = uid(1)
    a.d.define_xml(xml(u, "enrol.one", desc="joined"))
    a.d.set_value(u, b"value-for-b")

    b_id = fleet.join("b")
    assert b_id != a_id
    assert fleet.join("b") == b_id          # stable: a second join is the same host
    b = fleet.host("b")
    with pytest.raises(errors.ConfigError, match=f"not approved yet.*fleet approve {b_id}"):
        b.open()

    r = fleet.cli("a", "status")
    assert r.returncode == 0, r
    assert re.search(rf"{a_id} .* approved key v1 .*\(this host\)", r.stdout), r
    assert re.search(rf"{b_id} .* pending", r.stdout), r
    fp = load_host_key(fleet_dir(b.paths))
    r = fleet.cli("a", "approve", b_id)
    assert r.returncode == 0 and f"{b_id}" in r.stdout and enrol.fingerprint_of(fp) in r.stdout, r
    r = fleet.cli("a", "approve", b_id)
    assert r.returncode == 1 and "already approved" in r.stderr, r
    r = fleet.cli("a", "approve", "0" * 32)
    assert r.returncode == 1 and "no fleet host" in r.stderr, r
    r = fleet.cli("b", "approve", a_id)       # b holds no fleet key yet: it cannot approve anybody
    assert r.returncode == 1 and "no fleet key" in r.stderr, r

    assert fleet.join("b") == b_id            # picks the wrap up and seals the key here
    assert load_fleet_key(fleet_dir(b.paths)).key == load_fleet_key(fleet_dir(a.paths)).key
    b.open()
    assert b.d.get_value(u) == b"value-for-b"
    assert b.d.lookup_by_uuid(u).description == "joined"
    b.d.define_xml(xml(uid(2), "enrol.two"))  # and writes to the fleet
    wait_for(lambda: any(s.uuid == uid(2) for s in a.d.list_secrets()), "b's define on a")
    r = fleet.cli("b", "status")
    assert re.search(rf"{b_id} .* approved key v1 .*\(this host\)", r.stdout), r
    assert "hosts: 2" in r.stdout, r

    outputs = "".join(fleet.outputs).encode()
    for k in fleet.key_material():
        assert k not in outputs


def test_join_wait_picks_up_the_approval(fleet: Fleet) -> None:
    _init_first(fleet)
    proc = subprocess.Popen([sys.executable, "-m", "secretbus.cli", "-c", f"secret:///embed?root={fleet.root('b')}",
                             "fleet", "join", "--raw", "--wait", str(WAIT)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()          # printed before it waits
        assert ID.fullmatch(line.rstrip("\n")), line
        r = fleet.cli("a", "approve", line.strip())
        assert r.returncode == 0, r
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and out == "" and "approved: fleet key sealed" in err, (out, err)
    assert load_fleet_key(fleet_dir(InstancePaths.embed(fleet.root("b")))).key == \
        load_fleet_key(fleet_dir(InstancePaths.embed(fleet.root("a")))).key


class _CountingEtcd(Etcd):
    """The real client, recording each transaction's size and outcome, and counting reads."""
    txns: list[tuple[int, bool]]
    ranges = 0

    def txn(self, compare, success, failure=None):
        ok, rev, out = super().txn(compare, success, failure)
        self.txns.append((len(success), ok))
        return ok, rev, out

    def range(self, *args, **kw):
        self.ranges += 1
        return super().range(*args, **kw)


def test_join_wait_watches_for_the_approval(fleet: Fleet) -> None:
    """enrol.wait_for_approval watches the host's wrap record: the approval is picked up as it
    lands, with a handful of reads in all (polling read the record twice a second)."""
    import threading
    import time
    _init_first(fleet)
    b_id = fleet.join("b")
    b_dir = fleet_dir(InstancePaths.embed(fleet.root("b")))
    client = _CountingEtcd(list(fleet.etcd.endpoints))
    client.txns, client.ranges = [], 0
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(enrol.wait_for_approval(client, KEYS, load_host_key(b_dir),
                                                                                   30)))
    waiter.start()
    time.sleep(3)                        # unapproved meanwhile: polling read 12 times by now
    assert fleet.cli("a", "approve", b_id).returncode == 0
    approved = time.monotonic()
    waiter.join(30)
    took = time.monotonic() - approved
    assert isinstance(got[0], FleetKey) and got[0].key == load_fleet_key(fleet_dir(fleet.host("a").paths)).key
    assert client.ranges <= 5, client.ranges
    assert took < 2, took                # (generous: a loaded machine; the poll alone was up to 0.5 s)


def test_join_wait_times_out_unapproved(fleet: Fleet) -> None:
    _init_first(fleet)
    r = fleet.cli("b", "join", "--raw", "--wait", "1")
    assert r.returncode == 1 and ID.fullmatch(r.stdout.strip()) and "not approved within 1 seconds" in r.stderr, r
    assert not (fleet_dir(InstancePaths.embed(fleet.root("b"))) / "fleet-key").exists()


def test_the_service_picks_up_the_wrap_at_start(fleet: Fleet) -> None:
    _init_first(fleet)
    a = fleet.host("a").open()
    a.d.define_xml(xml(uid(10), "start.10"))
    a.d.set_value(uid(10), b"at-start")
    b_id = fleet.join("b")
    assert fleet.cli("a", "approve", b_id).returncode == 0
    b = fleet.host("b").open()                # no second join: the driver's start-up unwraps it
    assert b.d.get_value(uid(10)) == b"at-start"
    assert (fleet_dir(b.paths) / "fleet-key").exists()


def test_an_unapproved_host_cannot_read(fleet: Fleet) -> None:
    a_id = _init_first(fleet)
    a = fleet.host("a").open()
    a.d.define_xml(xml(uid(20), "unapproved.20"))
    a.d.set_value(uid(20), b"not-for-b")
    b_id = fleet.join("b")
    b_dir = fleet_dir(InstancePaths.embed(fleet.root("b")))
    b_key = load_host_key(b_dir)
    client = fleet.client()
    assert enrol.pick_up(client, KEYS, b_key) is None
    # a's wrap is in etcd for anyone to read; b's key does not open it
    _, kvs = client.range(KEYS.host_wrap(a_id))
    with pytest.raises(WrapError):
        unwrap(kvs[0].value, b_key.private, CLUSTER, b_id)
    # nor when someone with etcd access copies it to b's name
    client.txn([], [{"request_put": {"key": base64.b64encode(KEYS.host_wrap(b_id)).decode(),
                                     "value": base64.b64encode(kvs[0].value).decode()}}])
    with pytest.raises(errors.OperationFailed, match="does not open with this host's key"):
        enrol.pick_up(client, KEYS, b_key)
    with pytest.raises(errors.ConfigError, match="does not open"):
        fleet.host("b").open()
    assert not (b_dir / "fleet-key").exists()
    r = fleet.cli("b", "join", "--raw")
    assert r.returncode == 1 and "does not open" in r.stderr, r


def test_approve_refuses_a_public_key_changed_after_join(fleet: Fleet) -> None:
    _init_first(fleet)
    b_id = fleet.join("b")
    client = fleet.client()
    # someone with etcd access swaps b's public key for theirs before the approval
    mallory = _host()
    forged = HostRecord.new(mallory.public, "b").encode()
    client.txn([], [{"request_put": {"key": base64.b64encode(KEYS.host_pub(b_id)).decode(),
                                     "value": base64.b64encode(forged).decode()}}])
    r = fleet.cli("a", "approve", b_id)
    assert r.returncode == 1 and "does not match its id" in r.stderr, r
    assert client.range(KEYS.host_wrap(b_id))[1] == []
    r = fleet.cli("a", "status")
    assert re.search(rf"{b_id} .* pending .*PROBLEM: public key does not match the id", r.stdout), r


def test_approve_refuses_a_record_changed_during_the_approval(fleet: Fleet) -> None:
    """The wrap's transaction requires the pub record approve checked (its mod_revision)."""
    _init_first(fleet)
    b_id = fleet.join("b")
    a_key = load_fleet_key(fleet_dir(InstancePaths.embed(fleet.root("a"))))

    class Racing(Etcd):
        def txn(self, compare, success, failure=None):  # type: ignore[no-untyped-def]
            # the same bytes written again between approve's check and its transaction
            _, kvs = super().range(KEYS.host_pub(b_id))
            super().txn([], [{"request_put": {"key": base64.b64encode(KEYS.host_pub(b_id)).decode(),
                                              "value": base64.b64encode(kvs[0].value).decode()}}])
            return super().txn(compare, success, failure)
    with pytest.raises(errors.OperationFailed, match="changed in etcd while it was being approved"):
        enrol.approve(Racing(fleet.etcd.endpoints), KEYS, a_key, b_id)
    assert fleet.client().range(KEYS.host_wrap(b_id))[1] == []
    enrol.approve(fleet.client(), KEYS, a_key, b_id)       # unchanged: it goes through
    assert fleet.client().range(KEYS.host_wrap(b_id))[1] != []


def test_join_refuses_an_id_held_by_another_key(fleet: Fleet) -> None:
    _init_first(fleet)
    b_id = fleet.join("b")
    client = fleet.client()
    forged = HostRecord.new(_host().public, "b").encode()
    client.txn([], [{"request_put": {"key": base64.b64encode(KEYS.host_pub(b_id)).decode(),
                                     "value": base64.b64encode(forged).decode()}}])
    r = fleet.cli("b", "join", "--raw")
    assert r.returncode == 1 and r.stdout == "" and "with another public key" in r.stderr, r
    assert client.range(KEYS.host_pub(b_id))[1][0].value == forged        # not overwritten


def test_revoke_removes_the_wrap_and_the_record(fleet: Fleet) -> None:
    a_id = _init_first(fleet)
    b_id, c_id = fleet.join("b"), fleet.join("c")
    for h in (b_id, c_id):
        assert fleet.cli("a", "approve", h).returncode == 0
    assert fleet.join("b") == b_id              # b picked its key up; c not yet
    r = fleet.cli("a", "revoke", c_id)
    assert r.returncode == 0 and "revoked" in r.stdout and "fleet rotate" in r.stdout, r
    client = fleet.client()
    assert client.range(KEYS.host_wrap(c_id))[1] == [] and client.range(KEYS.host_pub(c_id))[1] == []
    c = load_host_key(fleet_dir(InstancePaths.embed(fleet.root("c"))))
    assert enrol.pick_up(client, KEYS, c) is None
    with pytest.raises(errors.ConfigError, match="not approved"):
        fleet.host("c").open()
    r = fleet.cli("a", "revoke", c_id)
    assert r.returncode == 1 and "no fleet host" in r.stderr, r
    r = fleet.cli("a", "revoke", a_id)
    assert r.returncode == 1 and "fleet leave" in r.stderr, r
    r = fleet.cli("a", "revoke", "nothex")
    assert r.returncode == 1 and "not a fleet host id" in r.stderr, r
    r = fleet.cli("b", "revoke", a_id)          # any enrolled host may revoke another
    assert r.returncode == 0, r
    r = fleet.cli("b", "status")
    assert a_id not in r.stdout and c_id not in r.stdout and "hosts: 1" in r.stdout, r


def test_leave_deletes_the_records_and_the_local_keys(fleet: Fleet) -> None:
    _init_first(fleet)
    a = fleet.host("a").open()
    a.d.define_xml(xml(uid(30), "leave.30"))
    a.d.set_value(uid(30), b"left")
    b_id = fleet.join("b")
    assert fleet.cli("a", "approve", b_id).returncode == 0
    b = fleet.host("b").open()
    assert b.d.get_value(uid(30)) == b"left"
    r = fleet.cli("b", "leave")
    assert r.returncode == 1 and "stop it" in r.stderr, r     # not under a running service
    assert fleet.client().range(KEYS.host_pub(b_id))[1] != []
    b.close()
    r = fleet.cli("b", "leave")
    assert r.returncode == 0 and f"{b_id} left" in r.stdout, r
    client = fleet.client()
    assert client.range(KEYS.host_pub(b_id))[1] == [] and client.range(KEYS.host_wrap(b_id))[1] == []
    d = fleet_dir(b.paths)
    assert sorted(p.name for p in d.iterdir()) == ["cache"] and not list((d / "cache").iterdir())
    r = fleet.cli("b", "leave")
    assert r.returncode == 1 and "not in a fleet" in r.stderr, r
    assert fleet.join("b") != b_id              # a new identity after leaving


def test_etcd_holds_no_key_material_in_clear(fleet: Fleet) -> None:
    _init_first(fleet)
    for name in ("b", "c"):
        h = fleet.join(name)
        assert fleet.cli("a", "approve", h).returncode == 0
        fleet.join(name)
    dump = fleet.etcd.dump()
    kvs = json.loads(dump)["kvs"]
    raw = b"".join(base64.b64decode(kv["key"]) + base64.b64decode(kv.get("value", "")) for kv in kvs)
    files = b"".join(p.read_bytes() for p in fleet.etcd.members[0].data_dir.rglob("*") if p.is_file())
    assert len(fleet.key_material()) == 4 * 6     # the fleet key on 3 hosts and 3 host keys
    for k in fleet.key_material():
        for blob in (raw, files, dump):
            assert k not in blob


def _sealed_fleet(tmp_path: Path, disk_tmp_path: Path, etcd: EtcdCluster) -> tuple[Fleet, dict[str, str]]:
    """A fleet whose commands seal with real systemd-creds and a private credential secret."""
    if shutil.which("systemd-creds") is None:
        pytest.skip("systemd-creds not installed")
    env = {**os.environ, "SYSTEMD_CREDENTIAL_SECRET": str(disk_tmp_path / "host.secret")}
    return Fleet(tmp_path, etcd, env), env


def _join_sealed(fleet: Fleet, n: int, value: bytes, with_key: str) -> tuple[str, Path]:
    """a: the first host, serving secret uid(n) with `value`; b joined with `with_key`: its id
    and fleet directory."""
    _init_first(fleet)
    a = fleet.host("a").open()
    a.d.define_xml(xml(uid(n), f"sealed.{n}"))
    a.d.set_value(uid(n), value)
    r = fleet.cli("b", "join", "--with-key", with_key)
    assert r.returncode == 0 and ID.fullmatch(r.stdout.strip()), r
    return r.stdout.strip(), fleet_dir(InstancePaths.embed(fleet.root("b")))


def test_join_with_a_sealed_host_key(tmp_path: Path, disk_tmp_path: Path, etcd: EtcdCluster) -> None:
    fleet, env = _sealed_fleet(tmp_path, disk_tmp_path, etcd)
    try:
        b_id, d = _join_sealed(fleet, 40, b"sealed-host", "host")
        sealed = (d / "host-key.cred").read_bytes()
        assert oct((d / "host-key.cred").stat().st_mode & 0o777) == "0o600"
        assert oct(d.stat().st_mode & 0o777) == "0o700"
        assert load_host_key(d, env).id == b_id and not (d / "host-key").exists()
        assert fleet.cli("a", "approve", b_id).returncode == 0
        r = fleet.cli("b", "join", "--with-key", "host")
        assert r.returncode == 0, r
        assert (d / "fleet-key.cred").exists() and not (d / "fleet-key").exists()
        fk = load_fleet_key(d, env)
        assert fk.key not in (d / "fleet-key.cred").read_bytes()
        assert load_host_key(d, env).private.private_bytes_raw() not in sealed
        old = dict(os.environ)
        os.environ.update(env)           # the embedded driver unseals with the environment's creds
        try:
            b = fleet.host("b").open()
            assert b.d.get_value(uid(40)) == b"sealed-host"
        finally:
            os.environ.clear()
            os.environ.update(old)
    finally:
        fleet.close()


def test_the_key_type_given_to_join_seals_the_fleet_key_picked_up_at_start(
        tmp_path: Path, disk_tmp_path: Path, etcd: EtcdCluster) -> None:
    """`fleet join --with-key=tpm2-absent` (systemd 252's null key: a credential that opens
    without this host's credential secret, unlike one sealed with `host`, the default here):
    the fleet key the service picks up at start, with no second join, is sealed the same way;
    `fleet leave` forgets the choice."""
    fleet, env = _sealed_fleet(tmp_path, disk_tmp_path, etcd)
    old = dict(os.environ)
    try:
        b_id, d = _join_sealed(fleet, 41, b"sealed-as-asked", "tpm2-absent")
        assert (d / "seal-with").read_text() == "tpm2-absent\n"
        assert oct((d / "seal-with").stat().st_mode & 0o777) == "0o600"
        assert fleet.cli("a", "approve", b_id).returncode == 0
        os.environ.update(env)           # the embedded driver seals and unseals with these creds
        b = fleet.host("b").open()
        assert b.d.get_value(uid(41)) == b"sealed-as-asked"
        b.close()
        assert (d / "fleet-key.cred").exists()
        elsewhere = {**env, "SYSTEMD_CREDENTIAL_SECRET": str(disk_tmp_path / "another.secret")}
        assert load_fleet_key(d, elsewhere).key == load_fleet_key(d, env).key
        assert fleet.cli("b", "leave").returncode == 0
        assert not (d / "seal-with").exists()
    finally:
        os.environ.clear()
        os.environ.update(old)
        fleet.close()


def _up(fleet: Fleet, name: str) -> dict[str, str]:
    """Each host of `fleet status` run on `name`: "up" or "down"."""
    r = fleet.cli(name, "status")
    assert r.returncode == 0, r
    found = re.findall(r"^  ([0-9a-f]{32})  \S+  (?:approved key v\d+|pending)  (up since \S+Z|down)  ", r.stdout, re.M)
    return {h: "down" if state == "down" else "up" for h, state in found}


def test_fleet_commands_read_the_keys_from_secretbusd_conf_or_config(fleet: Fleet) -> None:
    """DESIGN §11: fleet mode's keys are secretbusd.conf's; `--config FILE` names it as for
    secretbusd. Keys left in secret.conf (the first builds read them there) still work, and
    status says to move them."""
    a_id = _init_first(fleet)
    root = fleet.root("a")
    default = root / "etc" / "secretbusd.conf"
    r = fleet.cli("a", "status")
    assert r.returncode == 0 and f"configuration: {default}" in r.stdout and "PROBLEM" not in r.stdout, r
    named = fleet.base / "elsewhere.conf"
    default.rename(named)
    r = fleet.cli("a", "status")
    assert r.returncode == 0 and r.stdout.startswith(f"fleet mode: off (fleet_endpoints is not set in {default})"), r
    r = fleet.cli("a", "status", "--config", str(named))
    assert r.returncode == 0 and f"configuration: {named}" in r.stdout and a_id in r.stdout, r
    r = fleet.cli("a", "status", "--config", str(fleet.base / "missing.conf"))
    assert r.returncode == 1 and "No such file" in r.stderr, r
    secret_conf = root / "etc" / "secret.conf"
    secret_conf.write_text(secret_conf.read_text() + named.read_text())
    r = fleet.cli("a", "status")
    assert r.returncode == 0 and a_id in r.stdout, r
    assert f"configuration: {secret_conf}" in r.stdout and "PROBLEM: fleet mode's keys are in secret.conf" in r.stdout
    r = fleet.cli("a", "status", "--config", str(named))
    assert r.returncode == 1 and "set both here and in" in r.stderr, r


def test_status_shows_which_hosts_services_are_up(fleet: Fleet) -> None:
    """fleet/presence.py: a host whose service runs shows "up since", within a heartbeat; its
    service closing revokes the record at once; a host that joined and never started shows
    "down"."""
    a_id = _init_first(fleet)
    a = fleet.host("a").open()
    b_id = fleet.join("b")
    assert fleet.cli("a", "approve", b_id).returncode == 0
    wait_for(lambda: _up(fleet, "a") == {a_id: "up", b_id: "down"}, "a up, b down")
    b = fleet.host("b").open()
    wait_for(lambda: _up(fleet, "b") == {a_id: "up", b_id: "up"}, "both up")
    b.close()
    assert _up(fleet, "a") == {a_id: "up", b_id: "down"}
    a.close()
    assert _up(fleet, "a") == {a_id: "down", b_id: "down"}


def test_a_presence_not_renewed_ends_with_its_lease(etcd: EtcdCluster) -> None:
    """A service gone without revoking (kill -9, power loss, cut off): etcd drops the record
    when its lease runs out, and a beat after the lease ended takes a new one."""
    from secretbus.fleet.presence import Presence, alive_since
    keys, client = Keyspace(CLUSTER), Etcd(etcd.endpoints)
    me = "0123456789abcdef0123456789abcdef"
    p = Presence(client, keys, me, "crashing", ttl=2)
    p.beat()
    _, kvs = client.range(keys.host_alive(me))
    assert len(kvs) == 1 and alive_since(kvs[0].value)
    wait_for(lambda: not client.range(keys.host_alive(me))[1], "the record's lease to run out", timeout=15)
    p.beat()                 # the keepalive finds the lease gone: a new lease and record
    assert len(client.range(keys.host_alive(me))[1]) == 1
    p.stop()
    assert not client.range(keys.host_alive(me))[1]
    p.beat()                 # stopped: nothing written again
    assert not client.range(keys.host_alive(me))[1]


@needs_etcd
def test_fleet_commands_refuse_without_fleet_mode(tmp_path: Path) -> None:
    etc = tmp_path / "x" / "etc"
    etc.mkdir(parents=True, mode=0o700)
    for args in (["join", "--raw"], ["approve", "0" * 32], ["leave"], ["revoke", "0" * 32]):
        r = subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", f"secret:///embed?root={tmp_path / 'x'}",
                            "fleet", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "fleet_endpoints is not set" in r.stderr and r.stdout.strip() == "", (args, r)
    r = subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", f"secret:///embed?root={tmp_path / 'x'}",
                        "fleet", "approve"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "needs the id" in r.stderr, r
    assert not (etc / "secretbus-fleet").exists()


# -- fleet rotate ----------------------------------------------------------------------------
def _versions_in_etcd(fleet: Fleet) -> set[int | None]:
    from secretbus.fleet.seal import record_version
    _, kvs = fleet.client().range(KEYS.secrets, prefix_end(KEYS.secrets))
    return {record_version(kv.value) for kv in kvs}


def _enrolled(fleet: Fleet, *names: str) -> list[str]:
    ids = []
    for name in names:
        h = fleet.join(name)
        assert fleet.cli("a", "approve", h).returncode == 0
        assert fleet.join(name) == h
        ids.append(h)
    return ids


def test_rotate_keeps_approved_hosts_and_shuts_a_revoked_one_out(fleet: Fleet) -> None:
    from secretbus.fleet.seal import Sealer, SealError
    _init_first(fleet)
    a = fleet.host("a").open()
    old = uid(50)
    a.d.define_xml(xml(old, "rotate.old", desc="before"))
    a.d.set_value(old, b"before-rotation")
    b_id, c_id, d_id = _enrolled(fleet, "b", "c", "d")       # d stays down during the rotation
    b, c = fleet.host("b").open(), fleet.host("c").open()
    for h in (b, c):
        wait_for(lambda h=h: h.d.get_value(old) == b"before-rotation", f"the old secret on {h.name}")
    assert fleet.cli("a", "revoke", c_id).returncode == 0

    r = fleet.cli("a", "rotate")
    assert r.returncode == 0 and "rotated to version 2" in r.stdout and "wrapped for 3 approved hosts" in r.stdout, r
    assert _versions_in_etcd(fleet) == {2}
    a_dir = fleet_dir(a.paths)
    assert not (a_dir / "fleet-key").exists() and (a_dir / "fleet-key.v2").exists()   # v1 retired here

    new = uid(51)
    a.d.define_xml(xml(new, "rotate.new", desc="after"))
    a.d.set_value(new, b"after-rotation")
    # b (approved) picks its new wrap up at run time and serves old and new; its writes go on
    wait_for(lambda: b.seen(new, EventId.VALUE_CHANGED), "the new secret on b")
    assert b.d.get_value(new) == b"after-rotation" and b.d.get_value(old) == b"before-rotation"
    b.d.set_value(old, b"set-on-b")
    wait_for(lambda: a.d.get_value(old) == b"set-on-b", "b's write on a")
    # ...and retires v1 once the key check names v2 alone (the rotation has finished)
    wait_for(lambda: [k.version for k in load_fleet_keys(fleet_dir(b.paths))] == [2], "b retiring key v1")
    assert b.store.sealer.versions == [2] and b.d.get_value(old) == b"set-on-b"
    # c (revoked) kept what it had, gets nothing new, and cannot open the new records
    assert c.d.get_value(old) == b"before-rotation"
    with pytest.raises(errors.NoSecret):
        c.d.lookup_by_uuid(new)
    c_keys = load_fleet_keys(fleet_dir(c.paths))
    assert [k.version for k in c_keys] == [1]
    _, kvs = fleet.client().range(KEYS.definition(new))
    with pytest.raises(SealError):
        Sealer(CLUSTER, c_keys[0]).open("def", new, kvs[0].value)
    with pytest.raises(errors.OperationFailed, match="fleet store unavailable"):
        c.d.define_xml(xml(uid(52), "rotate.c"))
    c.close()
    c = fleet.host("c").open(online=False)     # nor after a restart: its old cache, degraded
    wait_for(lambda: "fleet key" in c.store.status.reason, "c's key mismatch")
    assert c.d.get_value(old, internal_call=True) == b"before-rotation"
    with pytest.raises(errors.NoSecret):
        c.d.lookup_by_uuid(new)
    # d, down during the rotation, picks its new key up when it starts (the watch's key check)
    d = fleet.host("d").open()
    assert d.d.get_value(new) == b"after-rotation" and d.d.get_value(old) == b"set-on-b"
    assert [k.version for k in load_fleet_keys(fleet_dir(d.paths))] == [2]      # and retires v1 at once
    assert d.store.sealer.versions == [2]
    r = fleet.cli("b", "status")
    assert re.search(rf"{b_id} .* approved key v2", r.stdout) and re.search(rf"{d_id} .* approved key v2", r.stdout)
    assert c_id not in r.stdout, r
    outputs = "".join(fleet.outputs).encode()
    for k in fleet.key_material():
        assert k not in outputs


CRASHING_ROTATION = """
import os, sys
from pathlib import Path
from secretbus.fleet import rotate
from secretbus.fleet.etcd import Etcd, prefix_end
from secretbus.fleet.hostkey import load_host_key
from secretbus.fleet.keyspace import Keyspace
endpoint, cluster, directory, after = sys.argv[1:]
rotate.LOCK_TTL = 2         # the lease this crash leaves: the resuming run waits 2 s, not 10
rotate.BATCH = 5            # so that the crash after 12 leaves some secrets at the old version
def crash(n):
    if n == int(after):
        os._exit(9)         # no cleanup, no lock release: as a killed process
rotate.rotate(Etcd([endpoint]), Keyspace(cluster), load_host_key(Path(directory)), Path(directory), progress=crash)
"""


def test_a_crash_mid_rotation_leaves_every_value_readable(fleet: Fleet) -> None:
    _init_first(fleet)
    a = fleet.host("a").open()
    values = {uid(600 + n): b"crash-value-%d" % n for n in range(30)}
    for u, v in values.items():
        a.d.define_xml(xml(u, f"crash.{u}"))
        a.d.set_value(u, v)
    _enrolled(fleet, "b")
    c_id = fleet.join("c")                                 # pending while the rotation crashes
    b = fleet.host("b").open()
    wait_for(lambda: all(b.d.get_value(u, internal_call=True) == v for u, v in values.items()), "b in sync")

    a_dir = fleet_dir(a.paths)
    r = subprocess.run([sys.executable, "-c", CRASHING_ROTATION, fleet.etcd.endpoints[0], CLUSTER, str(a_dir), "12"],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 9, r
    assert _versions_in_etcd(fleet) == {1, 2}              # half way
    # reads go on everywhere, writes wait for the rotation
    for h in (a, b):
        assert all(h.d.get_value(u, internal_call=True) == v for u, v in values.items()), h.name
    with pytest.raises(errors.OperationFailed, match="being rotated"):
        a.d.set_value(uid(600), b"during")
    r = fleet.cli("a", "status")
    assert "being rotated" in r.stdout, r
    m = re.search(r"to version 2: (\d+) of 30 secrets re-sealed", r.stdout)
    assert m and 0 < int(m.group(1)) < 30, r.stdout           # how far the stopped run came
    r = fleet.cli("a", "approve", c_id)
    assert r.returncode == 1 and "being rotated" in r.stderr, r
    # restart both hosts mid-rotation: every value is readable
    for h in (a, b):
        h.close()
        h.open()
        assert all(h.d.get_value(u, internal_call=True) == v for u, v in values.items()), h.name
        assert 1 in h.store.sealer.versions and (fleet_dir(h.paths) / "fleet-key").exists()   # not retired mid-way
    # run again: it resumes (once the crashed run's lock lease expired) and finishes
    r = fleet.cli("a", "rotate")
    assert r.returncode == 0 and "resumed" in r.stdout and "rotated to version 2" in r.stdout, r
    assert _versions_in_etcd(fleet) == {2}
    for h in (a, b):
        assert all(h.d.get_value(u, internal_call=True) == v for u, v in values.items()), h.name
    a.d.set_value(uid(600), b"after")
    wait_for(lambda: b.d.get_value(uid(600), internal_call=True) == b"after", "a's write on b")
    wait_for(lambda: b.store.sealer.versions == [2] and not (fleet_dir(b.paths) / "fleet-key").exists(),
             "b retiring key v1 once the resumed rotation finished")
    assert fleet.cli("a", "approve", c_id).returncode == 0    # approved after: with the new key only
    c = fleet.host("c").open()
    assert [k.version for k in load_fleet_keys(fleet_dir(c.paths))] == [2]
    assert all(c.d.get_value(u, internal_call=True) == v for u, v in values.items() if u != uid(600))
    assert c.d.get_value(uid(600), internal_call=True) == b"after"
    b.d.define_xml(xml(uid(700), "crash.new"))
    # the usage index moved with the key: v2's names only, so uniqueness holds for old secrets
    from secretbus.core.model import UsageType
    from secretbus.fleet.seal import Sealer
    v2 = Sealer(CLUSTER, load_fleet_key(a_dir))
    _, usage = fleet.client().range(KEYS.prefix + b"usage/", prefix_end(KEYS.prefix + b"usage/"))
    assert {kv.key for kv in usage} == {KEYS.usage(v2.usage_index(UsageType.CEPH, name))
                                        for name in [*(f"crash.{u}" for u in values), "crash.new"]}


class _CrashAfter(Etcd):
    """The real client, failing (as a killed run would stop) after `left` transactions."""
    left = -1

    def txn(self, compare, success, failure=None):
        if self.left == 0:
            raise RuntimeError("crash")
        self.left -= 1
        return super().txn(compare, success, failure)


def test_rotate_wraps_any_number_of_hosts_a_batch_at_a_time(fleet: Fleet, monkeypatch) -> None:
    """More approved hosts than one transaction holds (HOSTS_PER_TXN, 2 here; 60 at etcd's
    defaults) each get the new key, also when the run stops between two of those transactions
    and is run again; a host whose record no longer holds up loses its wrap."""
    from secretbus.fleet import rotate
    from secretbus.fleet.enrol_wrap import wrap_version
    from secretbus.fleet.hostkey import load_or_create_host_key
    monkeypatch.setattr(rotate, "HOSTS_PER_TXN", 2)
    _init_first(fleet)
    a = fleet.host("a").open()
    a.d.define_xml(xml(uid(90), "many.90"))
    a.d.set_value(uid(90), b"for-every-host")
    a.close()
    a_dir = fleet_dir(InstancePaths.embed(fleet.root("a")))
    client = fleet.client()
    others = {}
    for n in range(5):
        host, _ = load_or_create_host_key(fleet.base / f"h{n}", raw=True)
        enrol.publish(client, KEYS, host, f"h{n}")
        enrol.approve(client, KEYS, load_fleet_key(a_dir), host.id)
        others[host.id] = host
    broken = sorted(others)[2]       # its public record damaged after approval
    client.txn([], [{"request_put": {"key": base64.b64encode(KEYS.host_pub(broken)).decode(),
                                     "value": base64.b64encode(b"not a record").decode()}}])
    crashing = _CrashAfter(list(fleet.etcd.endpoints))
    crashing.left = 3                # the lock, the start, one transaction of wraps
    with pytest.raises(RuntimeError, match="crash"):
        rotate.rotate(crashing, KEYS, load_host_key(a_dir), a_dir, lock_wait=0)
    versions = {h: enrol.describe(h, None, kv).key_version
                for h in others for kv in client.range(KEYS.host_wrap(h))[1]}
    assert sorted(versions.values()) == [1, 1, 1, 2, 2], versions      # stopped half way
    result = rotate.rotate(fleet.client(), KEYS, load_host_key(a_dir), a_dir)
    assert result.resumed and result.version == 2 and result.hosts == 5, result   # a and four others
    for h, host in others.items():
        _, kvs = client.range(KEYS.host_wrap(h))
        if h == broken:
            assert kvs == []
            continue
        assert wrap_version(kvs[0].value) == 2
        assert enrol.pick_up(client, KEYS, host).version == 2
    assert _versions_in_etcd(fleet) == {2}


def test_rotate_leaves_an_unopenable_record_and_finishes(fleet: Fleet) -> None:
    _init_first(fleet)
    a = fleet.host("a").open()
    a.d.define_xml(xml(uid(80), "junk.80"))
    a.d.set_value(uid(80), b"fine")
    junk = b"SBF1" + bytes(60)          # a def record no key opens (damaged, or planted in etcd)
    fleet.client().txn([], [{"request_put": {"key": base64.b64encode(KEYS.definition(uid(81))).decode(),
                                             "value": base64.b64encode(junk).decode()}}])
    r = fleet.cli("a", "rotate")
    assert r.returncode == 0 and "1 secrets re-sealed" in r.stdout, r
    assert a.d.get_value(uid(80)) == b"fine"
    _, kvs = fleet.client().range(KEYS.definition(uid(81)))
    assert kvs[0].value == junk
    r = fleet.cli("a", "rotate")             # and again: version 3
    assert r.returncode == 0 and "rotated to version 3" in r.stdout, r
    a.d.set_value(uid(80), b"still-fine")
    assert a.d.get_value(uid(80)) == b"still-fine"




def test_rotate_reseals_in_batches_within_etcds_limits(fleet: Fleet) -> None:
    """fleet/rotate.py re-seals BATCH secrets a transaction, fewer when their records would
    pass etcd's request size (values of 60 KiB here: 30 of them in one transaction would be
    refused as too large); a batch that finds one record changed since it was read writes the
    others one by one, and the changed one is re-sealed by the next pass."""
    from secretbus.fleet import rotate
    _init_first(fleet)
    a = fleet.host("a").open()
    big = {uid(900 + n): os.urandom(60 * 1024) for n in range(30)}
    small = {uid(960 + n): b"small-%d" % n for n in range(60)}
    for u, v in {**big, **small}.items():
        a.d.define_xml(xml(u, f"batch.{u}"))
        a.d.set_value(u, v)
    a.close()
    a_dir = fleet_dir(InstancePaths.embed(fleet.root("a")))
    client = _CountingEtcd(list(fleet.etcd.endpoints))
    client.txns = []
    touched: list[int] = []

    def progress(n: int) -> None:
        # After the first batch: touch a small secret's value record (same bytes, new revision),
        # as a write that slipped in would, before its batch is sent.
        if not touched:
            touched.append(n)
            _, kvs = fleet.client().range(KEYS.value(uid(1019)))
            fleet.client().txn([], [{"request_put": {"key": base64.b64encode(KEYS.value(uid(1019))).decode(),
                                                     "value": base64.b64encode(kvs[0].value).decode()}}])
    result = rotate.rotate(client, KEYS, load_host_key(a_dir), a_dir, progress=progress)
    assert result.resealed == 90 and _versions_in_etcd(fleet) == {2}
    # Each secret: def and value put, its usage index renamed (4 operations). The others: the
    # lock (1), the start (2: the marker, one wrap) and the finish (1).
    reseals = [(n, ok) for n, ok in client.txns if n >= 4]
    assert sum(n for n, ok in reseals if ok) == 4 * 90, client.txns
    assert max(n for n, _ in reseals) <= TXN_OPS, client.txns
    # refused: the touched one's batch, then it alone (the others of the batch went one by one)
    refused = [n for n, ok in reseals if not ok]
    assert len(refused) == 2 and refused[0] > 4 and refused[1] == 4, client.txns
    assert len(reseals) < 40, client.txns                                 # 90 secrets: not one each
    a = fleet.host("a").open()
    assert all(a.d.get_value(u, internal_call=True) == v for u, v in {**big, **small}.items())


def test_the_rotation_lock_outlives_a_wait_longer_than_its_own_lease(etcd: EtcdCluster, monkeypatch) -> None:
    """A crashed run's lock (its lease not kept alive) is waited for; our own lease, granted
    before the wait, is kept alive meanwhile: once the crashed lease expires the lock is ours
    (before, our lease could expire first and the put failed with "requested lease not found")."""
    from secretbus.fleet import etcd as tx
    from secretbus.fleet import rotate
    client = Etcd(etcd.endpoints)
    crashed = client.lease_grant(6)
    ok, _, _ = client.txn([tx.absent(rotate.lock_key(KEYS))], [tx.put(rotate.lock_key(KEYS), b"crashed", crashed)])
    assert ok
    monkeypatch.setattr(rotate, "LOCK_TTL", 2)
    with rotate.Lock(client, KEYS, "me", wait=30) as lock:
        assert [kv.value for kv in client.range(rotate.lock_key(KEYS))[1]] == [b"me"]
        lock.check()

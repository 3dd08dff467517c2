"""Fleet mode's pure logic: sealing and its bindings, the usage index, keyspace names, the
fleet_* keys of secretbusd.conf (and of secret.conf, where the first builds read them), and the
fleet key files (raw and sealed with systemd-creds)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secretbus.core import errors
from secretbus.core.model import UsageType
from secretbus.core.virconf import is_fleet_key
from secretbus.fleet.keyfile import init_fleet_key, load_fleet_key, remember_seal_choice, seal_choice
from secretbus.fleet.keyspace import Keyspace
from secretbus.fleet.seal import FleetKey, Sealer, SealError
from secretbus.rpc.serverconf import parse_serverconf
from secretbus.store.conf import FLEET_OPTIONS, load_instance_conf, parse_conf, parse_fleet_keys
from secretbus.store.paths import InstancePaths

U1 = "6a1e0c1e-0000-4000-8000-000000000001"
U2 = "6a1e0c1e-0000-4000-8000-000000000002"


def sealer(cluster: str = "c1", key: bytes = b"k" * 32, version: int = 1) -> Sealer:
    return Sealer(cluster, FleetKey(version, key))


def test_a_record_opens_only_for_its_cluster_secret_kind_and_binding() -> None:
    s = sealer()
    rec = s.seal("value", U1, 7, b"the-value", extra="inc1")
    assert s.open("value", U1, rec, extra="inc1") == (7, b"the-value")
    assert b"the-value" not in rec
    for other, kind, uuid, extra in ((sealer("c2"), "value", U1, "inc1"), (s, "def", U1, "inc1"),
                                     (s, "value", U2, "inc1"), (s, "value", U1, "inc2"),
                                     (sealer(key=b"x" * 32), "value", U1, "inc1")):
        with pytest.raises(SealError) as e:
            other.open(kind, uuid, rec, extra=extra)
        assert "the-value" not in str(e.value)
    # the generation in the header is authenticated
    tampered = rec[:8] + (8).to_bytes(8, "big") + rec[16:]
    with pytest.raises(SealError):
        s.open("value", U1, tampered, extra="inc1")
    with pytest.raises(SealError, match="key version 1, this host has version 2"):
        sealer(version=2).open("value", U1, rec, extra="inc1")
    with pytest.raises(SealError, match="truncated"):
        s.open("value", U1, rec[:20], extra="inc1")


def test_the_usage_index_is_stable_opaque_and_per_type_and_cluster() -> None:
    s = sealer()
    a = s.usage_index(UsageType.CEPH, "client.admin")
    assert a == sealer().usage_index(UsageType.CEPH, "client.admin")
    assert "client" not in a and len(a) == 64
    assert a != s.usage_index(UsageType.TLS, "client.admin")
    assert a != sealer("c2").usage_index(UsageType.CEPH, "client.admin")
    assert a != sealer(key=b"x" * 32).usage_index(UsageType.CEPH, "client.admin")
    assert "k" * 32 not in repr(s) and "kkkk" not in repr(FleetKey(1, b"k" * 32))


def test_keyspace_parses_only_secret_keys() -> None:
    k = Keyspace("c1")
    assert k.parse(k.definition(U1)) == (U1, "def")
    assert k.parse(k.value(U1)) == (U1, "value")
    for key in (k.key_check, k.usage("ab"), k.secrets + b"../x/def", k.secrets + U1.upper().encode() + b"/def",
                Keyspace("c2").definition(U1)):
        assert k.parse(key) is None


def test_fleet_keys_of_secret_conf() -> None:
    c = parse_conf('fleet_endpoints = [ "http://127.0.0.1:2379", "https://e2:2379" ]\nfleet_cluster = "dc-1"\n'
                   'fleet_usage_types = [ "ceph", "volume" ]\nfleet_private = 0\n'
                   'fleet_ca_file = "/etc/pki/ca.pem"\n')
    assert c.fleet_endpoints == ("http://127.0.0.1:2379", "https://e2:2379")
    assert (c.fleet_cluster, c.fleet_usage_types, c.fleet_private, c.fleet_ca_file) == \
        ("dc-1", ("ceph", "volume"), False, "/etc/pki/ca.pem")
    assert parse_conf("").fleet_endpoints == () and parse_conf("").fleet_private
    for bad, msg in (('fleet_endpoints = [ "etcd:2379" ]', "http:// or https://"),
                     ('fleet_usage_types = [ "disk" ]', "unknown usage type"),
                     ('fleet_cluster = "a/b"', "fleet_cluster"), ("fleet_private = 2", "0 or 1"),
                     ('fleet_ca_file = "rel.pem"', "absolute")):
        with pytest.raises(errors.ConfigError, match=msg):
            parse_conf(bad)


SERVER_AND_FLEET = ('listen_tls = 0\nmax_clients = 20\n'
                    'fleet_endpoints = [ "http://127.0.0.1:2379" ]\nfleet_cluster = "dc-2"\nfleet_private = 0\n')


def _instance(tmp_path: Path, secret_conf: str | None = None, server_conf: str | None = None) -> InstancePaths:
    paths = InstancePaths.embed(tmp_path / "i")
    paths.conf_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path, text in ((paths.conf_file, secret_conf), (paths.server_conf_file, server_conf)):
        if text is not None:
            path.write_text(text)
            path.chmod(0o600)
    return paths


def test_fleet_keys_are_read_from_secretbusd_conf(tmp_path: Path, caplog) -> None:
    """DESIGN §11: fleet mode's keys are secretbusd.conf's; each reader of that file leaves the
    other's keys alone (no 'unknown key' warning for them), and a misspelt fleet key is
    reported once."""
    assert FLEET_OPTIONS and all(is_fleet_key(k) for k in FLEET_OPTIONS)
    paths = _instance(tmp_path, 'encrypt_data = 0\n', SERVER_AND_FLEET + 'fleet_endpoint = "typo"\n')
    with caplog.at_level("WARNING"):
        conf = load_instance_conf(paths)
        server = parse_serverconf(paths.server_conf_file.read_text(), str(paths.server_conf_file))
    assert (conf.fleet_endpoints, conf.fleet_cluster, conf.fleet_private) == (("http://127.0.0.1:2379",), "dc-2", False)
    assert conf.fleet_file == paths.server_conf_file and conf.encrypt_data is False
    assert server.max_clients == 20
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"{paths.server_conf_file}:6: unknown key 'fleet_endpoint' ignored"], warned


_TOKENS = [*FLEET_OPTIONS, "listen_tls", "max_clients", "remote_access", "fleet_x", "=", " = ", ";", "#", "\n",
           " ", '"', "'", '"""', "[", "]", ",", "0", "1", "-1", '"http://e:2379"', '"https://e"', '"etcd:1"',
           '"ceph"', '"disk"', '"/abs.pem"', '"rel"', '""', "[]", '[ "volume",\n "tls", ]', "\x00", "é"]


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=25).map("".join) | st.text(max_size=120))
def test_fuzz_both_readers_of_secretbusd_conf(text: str) -> None:
    """Any text: each reader of secretbusd.conf gives its values or a ConfigError naming the
    file and line; nothing else escapes (the fleet keys' checks are secret.conf's, fuzzed by
    bench/fuzz.py; here they run as the second reader of the server's file)."""
    for parse in (parse_fleet_keys, parse_serverconf):
        try:
            parse(text, "/etc/secretbus/secretbusd.conf")
        except errors.ConfigError as e:
            assert e.message.startswith("/etc/secretbus/secretbusd.conf:"), e.message


def test_no_secretbusd_conf_is_fleet_mode_off_and_says_where(tmp_path: Path) -> None:
    paths = _instance(tmp_path, 'encrypt_data = 0\n')
    conf = load_instance_conf(paths)
    assert conf.fleet_endpoints == () and conf.fleet_file == paths.server_conf_file
    with pytest.raises(errors.ConfigError, match="No such file"):
        load_instance_conf(paths.with_server_conf(tmp_path / "named.conf"))     # --config FILE must exist
    named = tmp_path / "named.conf"
    named.write_text(SERVER_AND_FLEET)
    assert load_instance_conf(paths.with_server_conf(named)).fleet_cluster == "dc-2"


def test_fleet_keys_in_secret_conf_still_work_with_a_warning(tmp_path: Path, caplog) -> None:
    paths = _instance(tmp_path, 'fleet_endpoints = [ "http://127.0.0.1:2379" ]\nfleet_cluster = "old"\n',
                      "listen_tls = 0\n")
    with caplog.at_level("WARNING"):
        conf = load_instance_conf(paths)
    assert conf.fleet_cluster == "old" and conf.fleet_file == paths.conf_file
    assert any("belong in" in r.getMessage() and str(paths.server_conf_file) in r.getMessage()
               for r in caplog.records)


def test_fleet_keys_in_both_files_are_refused(tmp_path: Path) -> None:
    paths = _instance(tmp_path, 'fleet_cluster = "old"\n', SERVER_AND_FLEET)
    with pytest.raises(errors.ConfigError, match="set both here and in .*secret.conf"):
        load_instance_conf(paths)


def test_a_secretbusd_conf_others_may_write_is_refused_for_fleet_mode_too(tmp_path: Path) -> None:
    """It names the etcd a host trusts and the TLS files it uses: the rule of remote access."""
    paths = _instance(tmp_path, None, SERVER_AND_FLEET)
    paths.server_conf_file.chmod(0o620)
    with pytest.raises(errors.ConfigError, match="writable by others"):
        load_instance_conf(paths)
    paths.server_conf_file.chmod(0o600)
    link = paths.server_conf_file.with_name("link.conf")
    link.symlink_to(paths.server_conf_file)
    with pytest.raises(errors.ConfigError, match="Failed to open"):
        load_instance_conf(paths.with_server_conf(link))


def _private_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fleet"
    return d


def test_raw_fleet_key_created_once_and_loaded(tmp_path: Path) -> None:
    d = _private_dir(tmp_path)
    path = init_fleet_key(d, raw=True)
    assert path.stat().st_mode & 0o777 == 0o600 and d.stat().st_mode & 0o777 == 0o700
    key = load_fleet_key(d, environ={})
    assert key.key == path.read_bytes() and key.version == 1
    with pytest.raises(errors.OperationFailed, match="already exists"):
        init_fleet_key(d, raw=True)
    other = init_fleet_key(tmp_path / "copy", raw=True, key=key.key)
    assert other.read_bytes() == key.key
    with pytest.raises(errors.ConfigError, match="no fleet key"):
        load_fleet_key(tmp_path / "none", environ={})


@pytest.mark.skipif(shutil.which("systemd-creds") is None or os.geteuid() != 0,
                    reason="needs systemd-creds as root")
def test_sealed_fleet_key_is_not_the_key_and_unseals(tmp_path: Path) -> None:
    d = _private_dir(tmp_path)
    key = os.urandom(32)
    path = init_fleet_key(d, key=key, environ=dict(os.environ))
    assert path.name == "fleet-key.cred" and key not in path.read_bytes()
    assert load_fleet_key(d, environ=dict(os.environ)).key == key
    # systemd passes it decrypted as a credential: that copy wins
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    (creds / "secretbus-fleet-key").write_bytes(b"c" * 32)
    (creds / "secretbus-fleet-key").chmod(0o600)
    assert load_fleet_key(d, environ={"CREDENTIALS_DIRECTORY": str(creds)}).key == b"c" * 32


def test_lookup_misses_ask_etcd_at_a_bounded_rate(tmp_path: Path) -> None:
    """A flood of misses costs etcd at most CATCH_UP_RATE reads a second (then misses stand)."""
    from secretbus.fleet import store as fleet_store
    from secretbus.fleet.etcd import Etcd
    from secretbus.fleet.status import FleetState
    from secretbus.store.codec import Base64Codec, ValueCodecs

    class CountingEtcd(Etcd):
        reads = 0

        def range(self, key, end=None, *, serializable=False):   # type: ignore[override]
            CountingEtcd.reads += 1
            return 1, []
    s = fleet_store.FleetStore(tmp_path / "c", ValueCodecs(Base64Codec(), {}), etcd=CountingEtcd(["http://127.0.0.1:1"]),
                               sealer=sealer(), options=fleet_store.FleetOptions("c1"), state_dir=tmp_path / "f")
    s.cell.set(FleetState.ONLINE)
    answers = [s.catch_up(uuid=U1) for _ in range(500)]
    assert not any(answers)
    assert int(fleet_store.CATCH_UP_RATE) <= CountingEtcd.reads <= int(fleet_store.CATCH_UP_RATE) + 10


def test_the_recorded_key_type_is_checked_both_ways(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    d.mkdir(mode=0o700)
    assert seal_choice(d) is None
    remember_seal_choice(d, "host+tpm2")
    assert seal_choice(d) == "host+tpm2"
    assert oct((d / "seal-with").stat().st_mode & 0o777) == "0o600"
    for bad in ("", "host\n--with-key=tpm2", "Host", "../x", "host tpm2"):
        with pytest.raises(errors.InvalidArg):
            remember_seal_choice(d, bad)
    assert seal_choice(d) == "host+tpm2"        # unchanged by the refusals
    (d / "seal-with").write_text("host\nrm -rf /\n")
    with pytest.raises(errors.ConfigError, match="does not name a systemd-creds key type"):
        seal_choice(d)


def test_presence_records_are_read_strictly() -> None:
    from secretbus.fleet.presence import MAX_ALIVE_RECORD, alive_record, alive_since
    assert alive_since(alive_record("host-a", 0)) == "1970-01-01T00:00:00Z"
    for bad in (b"", b"not json", b"[]", b'{"v": 2, "since": "x"}', b'{"v": 1}', b'{"v": 1, "since": 5}',
                b'{"v": 1, "since": "a\\nb"}', b'{"v": 1, "since": "' + b"9" * 40 + b'"}',
                b'{"v": 1, "since": "x", "pad": "' + b" " * MAX_ALIVE_RECORD + b'"}', b"\xff\xfe"):
        assert alive_since(bad) is None, bad


def test_a_transaction_parts_size_is_its_raw_keys_and_values():
    """etcd's request limit counts raw bytes, not the base64 the gateway carries (rotate.py's
    and the store's batches are bounded by it): every length of value, puts and deletes."""
    from secretbus.fleet import etcd as tx
    for n in range(70):
        part = tx.TxnPart([tx.absent(b"c")], [tx.put(b"key-" + bytes(n % 5), os.urandom(n)), tx.delete(b"gone"),
                                              tx.put(b"lease", b"v", lease=7)])
        assert part.size == (4 + n % 5 + n) + 4 + (5 + 1), n

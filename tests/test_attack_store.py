"""Issue 12, items 6 and 7: the store against a hostile local user, each attack run and shown
to fail.

Item 7 (a directory another user controls): the attacker is the real unprivileged user
`sbtest-other`; it prepares the directory through setpriv (a `driver.pid` symlink to a
root-owned file, pre-created temp names, a key directory), then root runs the embedded
driver, the daemon or `init-encryption` there. Each is refused with an error naming the
directory and why, and the target file is unchanged. The O_EXCL / O_NOFOLLOW / link-count
checks that stand behind the directory check are shown in a root-owned directory too.

Item 6 (downgrade around the authenticated encryption): whoever can write the store but
has no key (an offline disk, a restored backup; the test plays that part as root, since
the directory check now keeps other users out) plants a `.base64` beside a `.aes256gcm`,
flips `private` off or changes the usage in the XML, or puts back an old SBG1 file. The
daemon runs as root on a real system bus with real polkitd; the libvirt member, allowed
read-secure by the example rules, asks for the values over the bus and gets only what was
really stored: the edited secrets are skipped (log line naming them), nothing is deleted.
"""
from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
from pathlib import Path

import harness
import pytest
from harness.procs import public_tempdir, remove_tree

import secretbus
from secretbus.core import errors
from secretbus.core.model import SecretDef, UsageType
from secretbus.store import fsutil
from secretbus.store.codec import Binding, ValueCodecs
from secretbus.store.crypto import GcmCodec, key_id
from secretbus.store.filestore import SecretStore
from secretbus.store.keys import init_encryption, load_key
from secretbus.store.lock import InstanceLock

REPO = Path(__file__).resolve().parents[1]
U_PRIV = "0c7a51d2-6b1e-4f7a-9d0e-3a2b1c0d9e01"
U_PUB = "0c7a51d2-6b1e-4f7a-9d0e-3a2b1c0d9e02"
U_LEGACY = "0c7a51d2-6b1e-4f7a-9d0e-3a2b1c0d9e03"
U_USAGE = "0c7a51d2-6b1e-4f7a-9d0e-3a2b1c0d9e04"
V_PRIV = b"private-value-\x00-of-the-vm"
V_PUB = b"public-value-really-stored"
PLANTED = b"attacker-chosen-value"
VICTIM_TEXT = b"precious root-owned content\n"


def xml(uuid: str, private: bool, volume: str) -> str:
    return (f"<secret ephemeral='no' private='{'yes' if private else 'no'}'><uuid>{uuid}</uuid>"
            f"<usage type='volume'><volume>{volume}</volume></usage></secret>")


@pytest.fixture
def base():
    d = public_tempdir("sb-attack-")
    yield d
    remove_tree(d)


@pytest.fixture
def victim(base):
    v = base / "victim"
    v.write_bytes(VICTIM_TEXT)
    v.chmod(0o644)
    return v


def attacker_dir(base: Path, users, rel: str = "evil") -> Path:
    """A directory the attacker owns (as if it were in its home or /tmp)."""
    d = base / rel
    d.mkdir(parents=True, exist_ok=True)
    os.chown(d, users.other.uid, users.other.gid)
    d.chmod(0o755)
    return d


def as_attacker(users, script: str) -> None:
    r = harness.run_as(users.other, ["sh", "-ec", script])
    assert r.returncode == 0, r.stderr


def key_conf(root: Path) -> Path:
    """secret.conf naming a fresh key file beside the instance (root's, 0600)."""
    keyfile = root.parent / f"{root.name}.key"
    keyfile.write_bytes(os.urandom(32))
    keyfile.chmod(0o600)
    (root / "etc").mkdir(parents=True, exist_ok=True, mode=0o700)
    (root / "etc" / "secret.conf").write_text(f'secrets_encryption_key = "{keyfile}"\n')
    return keyfile


def open_embed(root: Path):
    return secretbus.open(f"secret:///embed?root={root}")


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# ======================================================================================
# item 7: a directory another user controls

@pytest.mark.parametrize("owned", ["root", "run", "run/secrets"])
def test_planted_lock_symlink_in_an_attacker_directory_is_refused(test_users, base, victim, owned):
    """The attacker owns the embedded root (or its run/ or run/secrets/) and points
    driver.pid at a root-owned file: root's driver refuses the directory, the file stays."""
    if owned == "root":
        root = attacker_dir(base, test_users)
    else:
        root = base / "inst"
        (root / "run").mkdir(parents=True)
        attacker_dir(root, test_users, owned)
    state = root / "run" / "secrets"
    as_attacker(test_users, f"mkdir -p '{state}'; ln -s '{victim}' '{state}/driver.pid'")
    with pytest.raises(errors.SecretError) as ei:
        open_embed(root)
    msg = str(ei.value)
    assert "refusing directory" in msg and f"owned by uid {test_users.other.uid}" in msg, msg
    assert victim.read_bytes() == VICTIM_TEXT and victim.stat().st_uid == 0


def test_daemon_refuses_an_attacker_directory(test_users, base, victim, session_bus):
    root = attacker_dir(base, test_users)
    as_attacker(test_users, f"mkdir -p '{root}/run/secrets' '{root}/etc/secrets'; "
                            f"ln -s '{victim}' '{root}/run/secrets/driver.pid'")
    r = subprocess.run([sys.executable, "-m", "secretbus.daemon", "--session", "--root", str(root),
                        "--bus-address", session_bus.address], env=daemon_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"refusing directory '{root}': owned by uid {test_users.other.uid}" in r.stderr, r.stderr
    assert victim.read_bytes() == VICTIM_TEXT


def test_pre_created_temp_files_in_an_attacker_directory_get_nothing(test_users, base):
    """The attacker owns the config dir and pre-creates world-readable files at every
    temp name the old code used: root refuses the directory; the files stay empty."""
    root = base / "inst"
    (root / "etc").mkdir(parents=True)
    cfg = attacker_dir(root / "etc", test_users, "secrets")
    names = [f"{U_PRIV}.xml.new", f"{U_PRIV}.aes256gcm.new", f"{U_PRIV}.base64.new"]
    as_attacker(test_users, "; ".join(f"touch '{cfg / n}'; chmod 666 '{cfg / n}'" for n in names))
    with pytest.raises(errors.SecretError) as ei:
        with open_embed(root) as c:
            c.define_xml(xml(U_PRIV, True, "/v/p")).set_value(V_PRIV)
    assert f"refusing directory '{cfg}'" in str(ei.value)
    for n in names:
        assert (cfg / n).read_bytes() == b""
    assert sorted(os.listdir(cfg)) == sorted(names)


def test_key_in_an_attacker_directory_or_owned_by_the_attacker_is_refused(test_users, base):
    evil = attacker_dir(base, test_users)
    as_attacker(test_users, f"head -c 32 /dev/urandom > '{evil}/key'; chmod 600 '{evil}/key'")
    with pytest.raises(errors.ConfigError) as ei:
        load_key(evil / "key")
    assert f"refusing directory '{evil}'" in str(ei.value)
    # The key file itself owned by the attacker, in root's directory.
    mine = base / "keys"
    mine.mkdir(mode=0o700)
    (mine / "key").write_bytes(os.urandom(32))
    (mine / "key").chmod(0o600)
    os.chown(mine / "key", test_users.other.uid, test_users.other.gid)
    with pytest.raises(errors.ConfigError) as ei:
        load_key(mine / "key")
    assert f"is owned by uid {test_users.other.uid}" in str(ei.value)


def test_init_encryption_refuses_an_attacker_directory(test_users, base, victim):
    evil = attacker_dir(base, test_users)
    # The attacker prepares the temp name and the final name's neighbourhood.
    as_attacker(test_users, f"ln -s '{victim}' '{evil}/k.init'")
    r = subprocess.run([sys.executable, "-m", "secretbus.cli", "init-encryption", "--raw",
                        "--key-path", str(evil / "k")], env=daemon_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0
    assert f"refusing directory '{evil}'" in r.stderr, r.stderr
    assert sorted(os.listdir(evil)) == ["k.init"] and victim.read_bytes() == VICTIM_TEXT
    with pytest.raises(errors.OperationFailed):
        init_encryption(evil / "sub" / "k", raw=True)
    assert not (evil / "sub").exists()


def test_lock_file_symlink_or_hard_link_is_not_written_through(base, victim):
    """Behind the directory check: driver.pid is opened O_NOFOLLOW without O_TRUNC and must
    be a regular file of ours with one link."""
    state = base / "state"
    state.mkdir(mode=0o700)
    lock = state / "driver.pid"
    lock.symlink_to(victim)
    with pytest.raises(errors.SystemError):
        InstanceLock(lock).acquire()
    lock.unlink()
    os.link(victim, lock)
    with pytest.raises(errors.SystemError) as ei:
        InstanceLock(lock).acquire()
    assert "one link" in str(ei.value)
    assert victim.read_bytes() == VICTIM_TEXT


def test_temp_files_are_exclusive_and_the_value_file_is_ours(test_users, base, monkeypatch):
    """A file at the (random) temp name is never opened: the write fails instead. A value
    file someone else owns is replaced by one of ours."""
    cfg = base / "secrets"
    cfg.mkdir(mode=0o700)
    store = SecretStore(cfg, ValueCodecs(writer=GcmCodec(os.urandom(32))))
    d = SecretDef(U_PRIV, private=True, usage_type=UsageType.VOLUME, usage_id="/v/p")
    monkeypatch.setattr(fsutil.secrets, "token_hex", lambda n: "f" * (2 * n))
    planted = cfg / f"{U_PRIV}.aes256gcm.{'f' * 12}.new"
    planted.write_bytes(b"")
    planted.chmod(0o666)
    os.chown(planted, test_users.other.uid, test_users.other.gid)
    with pytest.raises(errors.SystemError) as ei:
        store.write_value(d, V_PRIV)
    assert "File exists" in str(ei.value)
    assert planted.read_bytes() == b"" and not (cfg / f"{U_PRIV}.aes256gcm").exists()
    planted.unlink()
    planted.symlink_to(base / "elsewhere")
    with pytest.raises(errors.SystemError):
        store.write_value(d, V_PRIV)
    assert not (base / "elsewhere").exists()
    planted.unlink()
    monkeypatch.undo()
    old = cfg / f"{U_PRIV}.aes256gcm"
    old.write_bytes(b"x")
    os.chown(old, test_users.other.uid, test_users.other.gid)
    store.write_value(d, V_PRIV)
    st = old.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o600)


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_store_directory_writable_by_others_is_refused(base, mode):
    root = base / "inst"
    (root / "etc" / "secrets").mkdir(parents=True)
    (root / "etc" / "secrets").chmod(mode)
    with pytest.raises(errors.SecretError) as ei:
        open_embed(root)
    assert f"refusing directory '{root / 'etc' / 'secrets'}': mode {mode:04o}" in str(ei.value)


# ======================================================================================
# item 6: downgrade around the authenticated encryption (embedded, in-process)

def _store_with_secrets(root: Path) -> None:
    key_conf(root)
    with open_embed(root) as c:
        c.define_xml(xml(U_PRIV, True, "/v/p")).set_value(V_PRIV)
        c.define_xml(xml(U_PUB, False, "/v/q")).set_value(V_PUB)


def _cfg(root: Path) -> Path:
    return root / "etc" / "secrets"


def _snapshot(d: Path) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


def _plant(path: Path, data: bytes, newer_than: Path | None = None) -> None:
    path.write_bytes(data)
    path.chmod(0o600)
    if newer_than is not None:
        t = newer_than.stat().st_mtime_ns + 5 * 10**9
        os.utime(path, ns=(t, t))


def test_planted_base64_beside_gcm_is_ignored_even_if_newer(base, caplog):
    root = base / "inst"
    _store_with_secrets(root)
    cfg = _cfg(root)
    _plant(cfg / f"{U_PUB}.base64", base64.b64encode(PLANTED), newer_than=cfg / f"{U_PUB}.aes256gcm")
    _plant(cfg / f"{U_PRIV}.aes256cbc", base64.b64encode(os.urandom(32)),
           newer_than=cfg / f"{U_PRIV}.aes256gcm")
    with caplog.at_level(logging.WARNING), open_embed(root) as c:
        assert c.lookup_by_uuid(U_PUB).get_value() == V_PUB
        assert c.secret_get_value(U_PRIV, internal_call=True) == V_PRIV
    assert f"using {U_PUB}.aes256gcm and ignoring {U_PUB}.base64" in caplog.text
    assert PLANTED.decode() not in caplog.text


@pytest.mark.parametrize("edit", ["private flipped off", "usage changed"])
def test_edited_definition_is_detected_and_skipped(base, caplog, edit):
    root = base / "inst"
    _store_with_secrets(root)
    cfg = _cfg(root)
    edited = xml(U_PRIV, False, "/v/p") if edit == "private flipped off" else xml(U_PRIV, True, "/v/other")
    _plant(cfg / f"{U_PRIV}.xml", edited.encode())
    before = _snapshot(cfg)
    with caplog.at_level(logging.ERROR, logger="secretbus.store"), open_embed(root) as c:
        assert [s.uuid for s in c.list_secrets()] == [U_PUB]
        with pytest.raises(errors.NoSecret):
            c.lookup_by_uuid(U_PRIV)
        with pytest.raises(errors.OperationFailed):      # its files are kept, not overwritten
            c.define_xml(xml(U_PRIV, False, "/v/p"))
    line = next(r.getMessage() for r in caplog.records if U_PRIV in r.getMessage())
    assert f"skipping secret file '{U_PRIV}.xml': value file {U_PRIV}.aes256gcm" in line
    if edit == "private flipped off":
        assert "bound to private='yes' but the XML says private='no'" in line
    else:
        assert "private flag or usage, was changed" in line
    assert _snapshot(cfg) == before


def _sbg1(key: bytes, uuid: str, value: bytes) -> bytes:
    """An SBG1 file (the previous format) from its documented layout."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    kid, nonce = key_id(key), os.urandom(12)
    return base64.b64encode(b"SBG1" + kid + nonce
                            + AESGCM(key).encrypt(nonce, value, b"SBG1" + kid + uuid.encode()))


def test_sbg1_replay_with_private_flipped_is_refused_once_the_store_is_bound(base, caplog):
    """The attacker kept an SBG1 copy of the private secret's value (written before the
    upgrade) and puts it back with private='no': refused, because the store holds SBG2."""
    root = base / "inst"
    _store_with_secrets(root)
    key = load_key(root.parent / "inst.key")
    cfg = _cfg(root)
    _plant(cfg / f"{U_PRIV}.aes256gcm", _sbg1(key, U_PRIV, V_PRIV))
    _plant(cfg / f"{U_PRIV}.xml", xml(U_PRIV, False, "/v/p").encode())
    with caplog.at_level(logging.ERROR, logger="secretbus.store"), open_embed(root) as c:
        assert [s.uuid for s in c.list_secrets()] == [U_PUB]
    assert "unbound format (SBG1)" in caplog.text and "a downgrade?" in caplog.text


def test_sbg1_store_is_upgraded_once_at_load(base, caplog):
    """A store of the previous release (all SBG1) loads, and every value is rewritten in
    the bound format at once, so the downgrade rule applies from then on."""
    root = base / "inst"
    keyfile = key_conf(root)
    key = load_key(keyfile)
    cfg = _cfg(root)
    cfg.mkdir(mode=0o700)
    _plant(cfg / f"{U_PRIV}.xml", xml(U_PRIV, True, "/v/p").encode())
    _plant(cfg / f"{U_PRIV}.aes256gcm", _sbg1(key, U_PRIV, V_PRIV))
    with caplog.at_level(logging.INFO), open_embed(root) as c:
        assert c.secret_get_value(U_PRIV, internal_call=True) == V_PRIV
    assert f"rewrote the value of secret {U_PRIV} in the bound format" in caplog.text
    raw = base64.b64decode((cfg / f"{U_PRIV}.aes256gcm").read_bytes())
    assert raw[:4] == b"SBG2"
    assert GcmCodec(key).decode(Binding(U_PRIV, True, UsageType.VOLUME, "/v/p"),
                                (cfg / f"{U_PRIV}.aes256gcm").read_bytes()) == V_PRIV


def test_legacy_file_alone_is_read_only_by_rewrite_values(base, caplog):
    root = base / "inst"
    _store_with_secrets(root)
    cfg = _cfg(root)
    _plant(cfg / f"{U_LEGACY}.xml", xml(U_LEGACY, False, "/v/l").encode())
    _plant(cfg / f"{U_LEGACY}.base64", base64.b64encode(PLANTED))
    with caplog.at_level(logging.ERROR, logger="secretbus.store"), open_embed(root) as c:
        assert U_LEGACY not in [s.uuid for s in c.list_secrets()]
    assert (f"{U_LEGACY}.base64: legacy format, not read while the write scheme is aes256gcm; "
            "'secretbus rewrite-values' migrates it") in caplog.text
    assert (cfg / f"{U_LEGACY}.base64").exists()
    with open_embed(root) as c:                   # the administrator's explicit step
        assert c.rewrite_values() == (3, 3, 0)
        assert c.lookup_by_uuid(U_LEGACY).get_value() == PLANTED
    assert not (cfg / f"{U_LEGACY}.base64").exists() and (cfg / f"{U_LEGACY}.aes256gcm").exists()


def test_redefine_to_private_rebinds_so_flipping_back_is_detected(base, caplog):
    root = base / "inst"
    _store_with_secrets(root)
    with open_embed(root) as c:
        c.define_xml(xml(U_PUB, True, "/v/q"))            # no -> yes keeps the value
    cfg = _cfg(root)
    _plant(cfg / f"{U_PUB}.xml", xml(U_PUB, False, "/v/q").encode())
    with caplog.at_level(logging.ERROR, logger="secretbus.store"), open_embed(root) as c:
        with pytest.raises(errors.NoSecret):
            c.lookup_by_uuid(U_PUB)
    assert "bound to private='yes' but the XML says private='no'" in caplog.text


def test_crash_between_private_xml_and_rebind_serves_the_stricter_definition(base):
    """Redefine to private writes the XML first: a crash before the value is re-bound
    leaves XML private='yes' with a value bound to 'no'. That loads, as private, and is
    re-bound at once."""
    root = base / "inst"
    _store_with_secrets(root)
    cfg = _cfg(root)
    _plant(cfg / f"{U_PUB}.xml", xml(U_PUB, True, "/v/q").encode())
    with open_embed(root) as c:
        with pytest.raises(errors.InvalidSecret):
            c.lookup_by_uuid(U_PUB).get_value()
        assert c.secret_get_value(U_PUB, internal_call=True) == V_PUB
    _plant(cfg / f"{U_PUB}.xml", xml(U_PUB, False, "/v/q").encode())
    with open_embed(root) as c:
        assert U_PUB not in [s.uuid for s in c.list_secrets()]


def test_cbc_scheme_keeps_reading_libvirt_files(base):
    """With encryption_scheme = "aes256cbc" libvirt's files work as before (newest wins)."""
    root = base / "inst"
    keyfile = key_conf(root)
    conf = root / "etc" / "secret.conf"
    conf.write_text(conf.read_text() + 'encryption_scheme = "aes256cbc"\n')
    with open_embed(root) as c:
        c.define_xml(xml(U_PUB, False, "/v/q")).set_value(V_PUB)
    cfg = _cfg(root)
    assert sorted(os.listdir(cfg)) == [f"{U_PUB}.aes256cbc", f"{U_PUB}.xml"]
    _plant(cfg / f"{U_LEGACY}.xml", xml(U_LEGACY, False, "/v/l").encode())
    _plant(cfg / f"{U_LEGACY}.base64", base64.b64encode(b"libvirt plain"))
    with open_embed(root) as c:
        assert c.lookup_by_uuid(U_PUB).get_value() == V_PUB
        assert c.lookup_by_uuid(U_LEGACY).get_value() == b"libvirt plain"
    assert keyfile.exists()


# ======================================================================================
# item 6 over the system bus: real polkitd, the libvirt member as the reader

def _pk_files():
    import test_polkit as tp
    return tp


@pytest.mark.bus_policy(REPO / "dbus" / "org.libvirt.secret.conf")
def test_downgrades_fail_over_the_system_bus(system_bus, make_polkitd, test_users, base):
    tp = _pk_files()
    make_polkitd(system_bus, actions=[tp.ACTIONS_FILE], rules=[tp.RULES_FILE])
    root = base / "sys"
    key_conf(root)
    conf = root / "etc" / "secret.conf"
    conf.write_text(conf.read_text() + f'private_value_readers = [ "{test_users.member.name}" ]\n')
    with open_embed(root) as c:
        c.define_xml(xml(U_PRIV, True, "/v/p")).set_value(V_PRIV)
        c.define_xml(xml(U_PUB, False, "/v/q")).set_value(V_PUB)
        c.define_xml(xml(U_USAGE, False, "/v/u")).set_value(V_PUB + b"-u")
    cfg = _cfg(root)
    # The store writer without the key: unhide, re-target, and plant.
    _plant(cfg / f"{U_PRIV}.xml", xml(U_PRIV, False, "/v/p").encode())
    _plant(cfg / f"{U_USAGE}.xml", xml(U_USAGE, False, "/dev/attacker").encode())
    _plant(cfg / f"{U_PUB}.base64", base64.b64encode(PLANTED), newer_than=cfg / f"{U_PUB}.aes256gcm")
    _plant(cfg / f"{U_LEGACY}.xml", xml(U_LEGACY, False, "/v/l").encode())
    _plant(cfg / f"{U_LEGACY}.base64", base64.b64encode(PLANTED))
    before = _snapshot(cfg)
    d = harness.Secretbusd(system_bus, system=True, root=root)
    try:
        d.start()
        member = test_users.member
        got = tp.g(system_bus, member, tp.secret_path(U_PUB), f"{tp.SECRET}.GetValue", "0")
        assert got.ok and tp.gdbus_bytes(got.out) == V_PUB, got
        for u in (U_PRIV, U_USAGE, U_LEGACY):
            r = tp.g(system_bus, member, tp.CONNECT_PATH, f"{tp.CONNECT}.SecretLookupByUUID", u)
            assert not r.ok and r.error == "org.libvirt.Error.NoSecret", (u, r)
            r = tp.g(system_bus, member, tp.secret_path(u), f"{tp.SECRET}.GetValue", "0")
            assert not r.ok, (u, r)
        r = tp.g(system_bus, member, tp.CONNECT_PATH, f"{tp.CONNECT}.SecretLookupByUsage", "1", "/dev/attacker")
        assert r.error == "org.libvirt.Error.NoSecret", r
    finally:
        d.stop()
    log = d.log()
    for u, why in ((U_PRIV, "bound to private='yes' but the XML says private='no'"),
                   (U_USAGE, "private flag or usage, was changed"),
                   (U_LEGACY, "legacy format, not read while the write scheme is aes256gcm")):
        assert any(f"skipping secret file '{u}.xml'" in line and why in line for line in log.splitlines()), (u, log)
    assert f"using {U_PUB}.aes256gcm and ignoring {U_PUB}.base64" in log
    for v in (V_PRIV, PLANTED):
        assert v.decode("latin-1") not in log and base64.b64encode(v).decode() not in log
    assert _snapshot(cfg) == before

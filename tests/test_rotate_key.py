"""Online rotation of the local encryption key (`secretbus rotate-key`, store/rotation.py):
every step's crash state loads every value, a running service keeps serving every value
throughout, and no key byte is shown anywhere."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import harness
import pytest
from harness.procs import remove_tree
from test_cli import entry_point

from secretbus import cli_rotate
from secretbus.bus.client import DBusConnection
from secretbus.core import errors
from secretbus.core.model import InstanceKind
from secretbus.driver.build import open_instance
from secretbus.store import rotation
from secretbus.store.conf import load_conf
from secretbus.store.crypto import gcm_key_id, key_id
from secretbus.store.keys import CREDENTIAL_NAME, init_encryption, load_key
from secretbus.store.paths import InstancePaths

N = 12


def uid(n: int) -> str:
    return f"4075a7e0-0000-4000-8000-{n:012x}"


def value(n: int) -> bytes:
    return f"rot-S3ntinel-{n:04d}".encode()


def make_root(root: Path, environ: dict[str, str] | None = None) -> InstancePaths:
    """An embedded instance with N secrets with values: under a raw key named by secret.conf,
    or, with `environ`, under the key of its CREDENTIALS_DIRECTORY."""
    etc = root / "etc"
    etc.mkdir(parents=True, mode=0o700)
    if environ is None:
        init_encryption(etc / "key", raw=True)
        (etc / "secret.conf").write_text(f'secrets_encryption_key = "{etc / "key"}"\n')
    else:
        (etc / "secret.conf").write_text("encrypt_data = 1\n")
    paths = InstancePaths.embed(root)
    d = open_instance(paths, environ=environ)
    try:
        for n in range(N):
            d.define_xml(f"<secret ephemeral='no' private='{'yes' if n % 3 == 0 else 'no'}'><uuid>{uid(n)}</uuid>"
                         f"<usage type='volume'><volume>/v/{n}</volume></usage></secret>")
            d.set_value(uid(n), value(n))
    finally:
        d.close()
    return paths


def key_ids(paths: InstancePaths) -> set[bytes | None]:
    return {gcm_key_id((paths.config_dir / f).read_bytes())
            for f in os.listdir(paths.config_dir) if f.endswith(".aes256gcm")}


def assert_all_served(paths: InstancePaths, environ: dict[str, str] | None = None) -> None:
    d = open_instance(paths, environ=environ)
    try:
        assert d.skipped() == []
        for n in range(N):
            assert d.get_value(uid(n), internal_call=True) == value(n)
    finally:
        d.close()


def key_path(paths: InstancePaths) -> Path:
    return paths.conf_file.parent / "key"


# -- embedded (no service running) ------------------------------------------------------------
def test_rotate_key_with_no_service_running(tmp_path):
    paths = make_root(tmp_path / "root")
    old = load_key(key_path(paths))
    p = subprocess.run(entry_point() + ["-c", f"secret:///embed?root={tmp_path / 'root'}", "rotate-key"],
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    new = load_key(key_path(paths))
    assert new != old and key_ids(paths) == {key_id(new)}
    out = p.stdout + p.stderr
    assert f"key_id={key_id(old).hex()} -> key_id={key_id(new).hex()}".encode() in out
    for secret in (old, new, old.hex().encode(), new.hex().encode(), *(value(n) for n in range(N))):
        assert secret not in out
    assert not (paths.config_dir / rotation.RECORD_NAME).exists()          # step 4 done
    assert not key_path(paths).with_name("key.next").exists()
    assert oct(key_path(paths).stat().st_mode & 0o777) == "0o600"
    assert_all_served(paths)


@pytest.mark.parametrize("stop_after", ["record", "next key", "re-encrypted", "renamed"])
def test_every_crash_state_loads_every_value(tmp_path, stop_after):
    """The state a crash leaves after each step (and in the middle of step 2) loads every
    value, and running rotate-key again finishes the rotation."""
    paths = make_root(tmp_path / "root")
    conf = load_conf(paths.conf_file)
    kf = cli_rotate.key_file(conf, None, False)
    old = load_key(kf.path)
    new = os.urandom(32)
    rotation.write_record(paths.config_dir, old, new)
    if stop_after != "record":
        cli_rotate.write_next(kf, new, None, os.environ)
    if stop_after in ("re-encrypted", "renamed"):
        open_instance(paths).close()
        assert key_ids(paths) == {key_id(new)}
    if stop_after == "renamed":
        cli_rotate.commit_next(kf)
    assert_all_served(paths)                      # the crash state serves everything
    lines = cli_rotate.rotate_key(paths, load_conf(paths.conf_file))
    final = load_key(kf.path)
    # finishing resumes the recorded rotation; after the rename, the new key is current and a
    # new rotation starts from it
    assert (final == new) is (stop_after != "renamed") and key_id(final).hex() in lines[0]
    assert key_ids(paths) == {key_id(final)}
    assert not (paths.config_dir / rotation.RECORD_NAME).exists()
    assert_all_served(paths)


def test_a_store_half_under_each_key_loads_and_finishes(tmp_path):
    """Files under both keys at once (a crash in the middle of the re-writes)."""
    paths = make_root(tmp_path / "root")
    conf = load_conf(paths.conf_file)
    kf = cli_rotate.key_file(conf, None, False)
    old = load_key(kf.path)
    before = {f: (paths.config_dir / f).read_bytes() for f in os.listdir(paths.config_dir) if f.endswith(".aes256gcm")}
    new = os.urandom(32)
    rotation.write_record(paths.config_dir, old, new)
    cli_rotate.write_next(kf, new, None, os.environ)
    open_instance(paths).close()                  # everything under the new key now
    for name in sorted(before)[: len(before) // 2]:
        (paths.config_dir / name).write_bytes(before[name])     # half back under the old key
    assert key_ids(paths) == {key_id(old), key_id(new)}
    assert_all_served(paths)
    cli_rotate.rotate_key(paths, load_conf(paths.conf_file))
    assert key_ids(paths) == {key_id(new)} and load_key(kf.path) == new
    assert_all_served(paths)


def test_refusals_change_nothing(tmp_path):
    paths = make_root(tmp_path / "root")
    kf = key_path(paths)
    old = kf.read_bytes()
    (paths.config_dir / f"{uid(0)}.aes256cbc").write_bytes(b"AAAA")
    with pytest.raises(errors.OperationFailed, match="legacy format.*rewrite-values"):
        cli_rotate.rotate_key(paths, load_conf(paths.conf_file))
    (paths.config_dir / f"{uid(0)}.aes256cbc").unlink()
    assert kf.read_bytes() == old and not (paths.config_dir / rotation.RECORD_NAME).exists()
    paths.conf_file.write_text(paths.conf_file.read_text() + 'encryption_scheme = "aes256cbc"\n')
    with pytest.raises(errors.ConfigUnsupported, match="aes256gcm"):
        cli_rotate.rotate_key(paths, load_conf(paths.conf_file))
    assert kf.read_bytes() == old
    # a record that does not open under the loaded key is refused at load, naming no key byte
    paths.conf_file.write_text(f'secrets_encryption_key = "{kf}"\n')
    (paths.config_dir / rotation.RECORD_NAME).write_bytes(rotation.seal_record(os.urandom(32), os.urandom(32)))
    assert_all_served(paths)                      # about other keys: ignored, with a warning
    forged = bytearray(rotation.seal_record(old, os.urandom(32)))
    forged[-3] ^= 1
    (paths.config_dir / rotation.RECORD_NAME).write_bytes(bytes(forged))
    with pytest.raises(errors.ConfigError) as ei:
        open_instance(paths)
    assert old.hex() not in ei.value.message


# -- a running service --------------------------------------------------------------------------
def test_rotate_key_while_the_service_serves_every_value(tmp_path, session_bus, make_secretbusd):
    """The session service keeps answering GetValue for every secret, with the right value,
    from before the rotation to after it; then a restart loads the new key alone."""
    root = harness.public_tempdir("sb-rot-")
    try:
        paths = make_root(root)
        daemon = make_secretbusd(session_bus, root=root)
        conn = DBusConnection.open(InstanceKind.SESSION, "secret:///session", timeout=10,
                                   bus_address=session_bus.address)
        wrong: list[str] = []
        reads = [0]
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                for n in range(N):
                    if n % 3 == 0:
                        continue                      # private: not served over D-Bus
                    try:
                        if conn.secret_get_value(uid(n)) != value(n):
                            wrong.append(f"{n}: wrong value")
                    except errors.SecretError as e:
                        wrong.append(f"{n}: {type(e).__name__}")
                    reads[0] += 1
        t = threading.Thread(target=reader)
        t.start()
        try:
            time.sleep(0.3)
            old = load_key(key_path(paths))
            p = subprocess.run(entry_point() + ["-c", f"secret:///embed?root={root}", "rotate-key"],
                               capture_output=True, timeout=120)
            assert p.returncode == 0, p.stderr
            time.sleep(0.5)
        finally:
            stop.set()
            t.join(30)
        assert wrong == [] and reads[0] > 50, (wrong[:5], reads[0])
        new = load_key(key_path(paths))
        assert new != old and key_ids(paths) == {key_id(new)}
        harness.wait_until(lambda: not (paths.config_dir / rotation.RECORD_NAME).exists(), timeout=20,
                           what="the record removed by the service's reload with the new key")
        assert "rotating from key_id=" + key_id(old).hex() in daemon.log()
        conn.close()
        daemon.stop()
        for secret in (old.hex(), new.hex(), *(value(n).decode() for n in range(N))):
            assert secret not in daemon.log()
        assert_all_served(paths)
    finally:
        remove_tree(root)


def test_a_service_killed_in_the_middle_of_re_encrypting_serves_every_value(tmp_path, session_bus,
                                                                              make_secretbusd):
    root = harness.public_tempdir("sb-rot-")
    try:
        paths = make_root(root)
        kf = cli_rotate.key_file(load_conf(paths.conf_file), None, False)
        old = load_key(kf.path)
        new = os.urandom(32)
        rotation.write_record(paths.config_dir, old, new)
        cli_rotate.write_next(kf, new, None, os.environ)
        daemon = make_secretbusd(session_bus, root=root)
        daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(0.05)
        daemon.proc.kill()                           # kill -9 while it may be re-writing
        daemon.proc.wait(10)
        assert_all_served(paths)
        cli_rotate.rotate_key(paths, load_conf(paths.conf_file))
        assert key_ids(paths) == {key_id(new)} and load_key(kf.path) == new
        assert_all_served(paths)
    finally:
        remove_tree(root)


# -- a sealed credential (systemd-creds) --------------------------------------------------------
def test_rotate_a_sealed_credential(tmp_path, disk_tmp_path):
    if shutil.which("systemd-creds") is None:
        pytest.skip("systemd-creds not installed")
    env = {**os.environ, "SYSTEMD_CREDENTIAL_SECRET": str(disk_tmp_path / "host.secret")}
    sealed = disk_tmp_path / "creds" / CREDENTIAL_NAME
    init_encryption(sealed, with_key="host", environ=env)
    creds = disk_tmp_path / "run-creds"

    def unseal() -> bytes:
        """What systemd does for LoadCredentialEncrypted= at the service's start."""
        creds.mkdir(mode=0o700, exist_ok=True)
        (creds / CREDENTIAL_NAME).unlink(missing_ok=True)
        r = subprocess.run(["systemd-creds", "decrypt", f"--name={CREDENTIAL_NAME}", str(sealed),
                            str(creds / CREDENTIAL_NAME)], env=env, capture_output=True)
        assert r.returncode == 0, r.stderr
        (creds / CREDENTIAL_NAME).chmod(0o400)
        return (creds / CREDENTIAL_NAME).read_bytes()
    old = unseal()
    env_creds = {**env, "CREDENTIALS_DIRECTORY": str(creds)}
    root = tmp_path / "root"
    paths = make_root(root, environ=env_creds)
    assert key_ids(paths) == {key_id(old)}
    p = subprocess.run(entry_point() + ["-c", f"secret:///embed?root={root}", "rotate-key", "--key-path",
                                        str(sealed), "--with-key", "host"],
                       capture_output=True, timeout=120, env=env_creds)
    assert p.returncode == 0, p.stderr
    new = unseal()                                 # the next start
    assert new != old and key_ids(paths) == {key_id(new)}
    out = p.stdout + p.stderr
    for secret in (old, new, old.hex().encode(), new.hex().encode()):
        assert secret not in out
    assert_all_served(paths, environ=env_creds)

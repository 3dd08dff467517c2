"""Key precedence (spec §4.3 row by row), key loading, codec choice, and key creation
with the real systemd-creds (private host key via SYSTEMD_CREDENTIAL_SECRET)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from harness import programs

from secretbus.core import errors
from secretbus.store.codec import Base64Codec, Binding, Damage, ValueFileError
from secretbus.store.conf import SecretConf
from secretbus.store.crypto import CbcCodec, GcmCodec, NoKeyCodec, key_id
from secretbus.store.keys import CREDENTIAL_NAME, KeyChoice, codecs_for, init_encryption, load_key, resolve_key

UUID = "c37f5c0e-2a2b-4d7e-8c2f-0d7a0e7f4b11"
VALUE = b"sentinel-value"
NO_KEY_MSG = ("encrypt_data = 1 but no key: set secrets_encryption_key or provide the "
              "secrets-encryption-key credential")


def write_key(path: Path, key: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(key)
    path.chmod(mode)
    return path


@pytest.fixture
def conf_key(tmp_path) -> Path:
    return write_key(tmp_path / "conf.key", b"C" * 32)


@pytest.fixture
def cred_dir(tmp_path) -> Path:
    d = tmp_path / "creds"
    d.mkdir(mode=0o700)
    write_key(d / CREDENTIAL_NAME, b"D" * 32, 0o400)
    return d


@pytest.fixture
def empty_cred_dir(tmp_path) -> Path:
    d = tmp_path / "creds-empty"
    d.mkdir(mode=0o700)
    return d


# --- precedence, row by row ---------------------------------------------------------

def env(d: Path | None) -> dict[str, str]:
    return {} if d is None else {"CREDENTIALS_DIRECTORY": str(d)}


def test_row_conf_path_encrypt_unset(conf_key):
    assert resolve_key(SecretConf(secrets_encryption_key=str(conf_key)), env(None)) == \
        KeyChoice(True, conf_key, "secret.conf")


def test_row_conf_path_encrypt_1(conf_key):
    c = SecretConf(secrets_encryption_key=str(conf_key), encrypt_data=True)
    assert resolve_key(c, env(None)) == KeyChoice(True, conf_key, "secret.conf")


def test_row_conf_path_encrypt_0_reads_no_key(tmp_path):
    bad = write_key(tmp_path / "short.key", b"x", 0o644)   # would fail if read
    c = SecretConf(secrets_encryption_key=str(bad), encrypt_data=False)
    assert resolve_key(c, env(None)) == KeyChoice(False, bad, "secret.conf")
    codecs, desc = codecs_for(c, env(None))
    assert desc is None and isinstance(codecs.writer, Base64Codec)


def test_row_conf_path_beats_credential(conf_key, cred_dir):
    c = SecretConf(secrets_encryption_key=str(conf_key))
    assert resolve_key(c, env(cred_dir)) == KeyChoice(True, conf_key, "secret.conf")
    codecs, _ = codecs_for(c, env(cred_dir))
    assert codecs.writer.key_id == key_id(b"C" * 32)


def test_row_conf_path_missing_file_is_an_error_not_a_fallback(tmp_path, cred_dir):
    c = SecretConf(secrets_encryption_key=str(tmp_path / "absent.key"))
    assert resolve_key(c, env(cred_dir)).path == tmp_path / "absent.key"
    with pytest.raises(errors.ConfigError, match="Failed to open file"):
        codecs_for(c, env(cred_dir))


def test_row_conf_path_and_credential_encrypt_0(conf_key, cred_dir):
    c = SecretConf(secrets_encryption_key=str(conf_key), encrypt_data=False)
    assert resolve_key(c, env(cred_dir)) == KeyChoice(False, conf_key, "secret.conf")


def test_row_credential_encrypt_unset(cred_dir):
    choice = resolve_key(SecretConf(), env(cred_dir))
    assert choice == KeyChoice(True, cred_dir / CREDENTIAL_NAME, "credential")
    codecs, desc = codecs_for(SecretConf(), env(cred_dir))
    assert codecs.writer.key_id == key_id(b"D" * 32)
    assert str(cred_dir / CREDENTIAL_NAME) in desc


def test_row_credential_encrypt_1(cred_dir):
    assert resolve_key(SecretConf(encrypt_data=True), env(cred_dir)) == \
        KeyChoice(True, cred_dir / CREDENTIAL_NAME, "credential")


def test_row_credential_encrypt_0_reads_no_key(cred_dir):
    (cred_dir / CREDENTIAL_NAME).chmod(0o644)  # would be refused if read
    choice = resolve_key(SecretConf(encrypt_data=False), env(cred_dir))
    assert choice == KeyChoice(False, cred_dir / CREDENTIAL_NAME, "credential")
    assert codecs_for(SecretConf(encrypt_data=False), env(cred_dir))[1] is None


def test_row_credential_dir_without_the_file(empty_cred_dir):
    assert resolve_key(SecretConf(), env(empty_cred_dir)) == KeyChoice(False, None, "none")
    with pytest.raises(errors.ConfigError) as ei:
        resolve_key(SecretConf(encrypt_data=True), env(empty_cred_dir))
    assert str(ei.value) == NO_KEY_MSG


def test_row_nothing_encrypt_unset():
    assert resolve_key(SecretConf(), env(None)) == KeyChoice(False, None, "none")


def test_row_nothing_encrypt_0():
    assert resolve_key(SecretConf(encrypt_data=False), env(None)) == KeyChoice(False, None, "none")


def test_row_nothing_encrypt_1_is_a_clear_error_not_a_default_path():
    with pytest.raises(errors.ConfigError) as ei:
        resolve_key(SecretConf(encrypt_data=True), env(None))
    assert str(ei.value) == NO_KEY_MSG
    with pytest.raises(errors.ConfigError):
        codecs_for(SecretConf(encrypt_data=True), env(None))


def test_empty_credentials_directory_counts_as_unset():
    assert resolve_key(SecretConf(), {"CREDENTIALS_DIRECTORY": ""}) == KeyChoice(False, None, "none")


def test_secrets_encryption_key_env_var_is_not_used(conf_key):
    # libvirt's unit sets it but libvirt never reads it; neither do we.
    assert resolve_key(SecretConf(), {"SECRETS_ENCRYPTION_KEY": str(conf_key)}).encrypt is False


# --- load_key -------------------------------------------------------------------------

def test_load_key_exact_32(tmp_path):
    assert load_key(write_key(tmp_path / "k", b"K" * 32)) == b"K" * 32
    assert load_key(write_key(tmp_path / "k4", b"L" * 32, 0o400)) == b"L" * 32


@pytest.mark.parametrize("size", [0, 1, 31, 33, 34, 4096])
def test_load_key_wrong_size(tmp_path, size):
    p = write_key(tmp_path / "k", b"Q" * size)
    with pytest.raises(errors.InvalidEncrKey) as ei:
        load_key(p)
    assert str(ei.value) == f"Encryption key length must be '32' '{p}'"
    assert ei.value.code == 114     # VIR_ERR_INVALID_ENCR_KEY_SECRET


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o601])
def test_load_key_group_or_world_access_refused(tmp_path, mode):
    p = write_key(tmp_path / "k", b"Q" * 32, mode)
    with pytest.raises(errors.ConfigError) as ei:
        load_key(p)
    assert str(ei.value) == (f"key file '{p}' has mode {mode:04o}; it must not be accessible "
                             "by group or others (chmod 0600)")


def test_load_key_missing(tmp_path):
    p = tmp_path / "absent"
    with pytest.raises(errors.ConfigError) as ei:
        load_key(p)
    assert str(ei.value) == f"Failed to open file '{p}': No such file or directory"


def test_load_key_path_through_a_file(tmp_path):
    f = write_key(tmp_path / "f", b"Q" * 32)
    with pytest.raises(errors.ConfigError) as ei:
        load_key(f / "k")
    assert str(ei.value) == f"Failed to open file '{f / 'k'}': Not a directory"


def test_load_key_not_a_regular_file(tmp_path):
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)   # opening it would block: must be refused before open
    link = tmp_path / "link"
    link.symlink_to(write_key(tmp_path / "real", b"Q" * 32))
    for p in (d, fifo, link):
        with pytest.raises(errors.ConfigError) as ei:
            load_key(p)
        assert str(ei.value) == f"key file '{p}' is not a regular file"


def test_load_key_messages_never_contain_key_bytes(tmp_path):
    for size, mode in ((31, 0o600), (33, 0o600), (32, 0o644)):
        p = write_key(tmp_path / f"k{size}{mode}", b"Z" * size, mode)
        with pytest.raises(errors.SecretError) as ei:
            load_key(p)
        assert "ZZ" not in str(ei.value) and "5a5a" not in str(ei.value)


# --- codecs_for ---------------------------------------------------------------------

def test_codecs_gcm_default(conf_key):
    codecs, desc = codecs_for(SecretConf(secrets_encryption_key=str(conf_key)), {})
    assert isinstance(codecs.writer, GcmCodec)
    assert set(codecs.readers) == {"aes256gcm", "aes256cbc", "base64"}
    assert codecs.readers["aes256gcm"] is codecs.writer
    assert isinstance(codecs.readers["aes256cbc"], CbcCodec)
    assert isinstance(codecs.readers["base64"], Base64Codec)
    kid = key_id(b"C" * 32).hex()
    assert desc == f"aes256gcm key_id={kid} from secret.conf '{conf_key}'"
    assert (b"C" * 32).hex() not in desc


def test_codecs_cbc_scheme(conf_key):
    c = SecretConf(secrets_encryption_key=str(conf_key), encryption_scheme="aes256cbc")
    codecs, desc = codecs_for(c, {})
    assert isinstance(codecs.writer, CbcCodec) and codecs.readers["aes256cbc"] is codecs.writer
    assert isinstance(codecs.readers["aes256gcm"], GcmCodec)
    assert desc.startswith("aes256cbc key_id=")


def test_codecs_switching_scheme_keeps_old_files_readable(conf_key):
    gcm_conf = SecretConf(secrets_encryption_key=str(conf_key))
    cbc_conf = SecretConf(secrets_encryption_key=str(conf_key), encryption_scheme="aes256cbc")
    gcm_file = codecs_for(gcm_conf, {})[0].writer.encode(Binding(UUID), VALUE)
    cbc_file = codecs_for(cbc_conf, {})[0].writer.encode(Binding(UUID), VALUE)
    assert codecs_for(cbc_conf, {})[0].readers["aes256gcm"].decode(Binding(UUID), gcm_file) == VALUE
    assert codecs_for(gcm_conf, {})[0].readers["aes256cbc"].decode(Binding(UUID), cbc_file) == VALUE


def test_codecs_without_key_read_base64_and_report_no_key(conf_key):
    enc = codecs_for(SecretConf(secrets_encryption_key=str(conf_key)), {})[0]
    codecs, desc = codecs_for(SecretConf(), {})
    assert desc is None
    assert isinstance(codecs.writer, Base64Codec)
    assert set(codecs.readers) == {"aes256gcm", "aes256cbc", "base64"}
    for suffix in ("aes256gcm", "aes256cbc"):
        assert isinstance(codecs.readers[suffix], NoKeyCodec)
        with pytest.raises(ValueFileError) as ei:
            codecs.readers[suffix].decode(Binding(UUID), enc.readers[suffix].encode(Binding(UUID), VALUE))
        assert ei.value.damage is Damage.NO_KEY
    assert codecs.readers["base64"].decode(Binding(UUID), codecs.writer.encode(Binding(UUID), VALUE)) == VALUE


def test_codecs_bad_key_fails_start(tmp_path):
    p = write_key(tmp_path / "k", b"Q" * 16)
    with pytest.raises(errors.InvalidEncrKey):
        codecs_for(SecretConf(secrets_encryption_key=str(p)), {})


# --- init_encryption with the real systemd-creds ------------------------------------

@pytest.fixture
def creds_env(disk_tmp_path) -> dict[str, str]:
    if shutil.which("systemd-creds") is None:
        pytest.skip("systemd-creds not installed")
    # A private host key: never touches /var/lib/systemd/credential.secret. Not on a tmpfs,
    # where systemd-creds' default key choice refuses a host key.
    return {**os.environ, "SYSTEMD_CREDENTIAL_SECRET": str(disk_tmp_path / "host.secret")}


def decrypt(sealed: Path, out_dir: Path, environ: dict[str, str]) -> subprocess.CompletedProcess:
    """What systemd does for LoadCredentialEncrypted= (spec §4.5)."""
    out_dir.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(["systemd-creds", "decrypt", f"--name={CREDENTIAL_NAME}", str(sealed),
                           str(out_dir / CREDENTIAL_NAME)], env=environ, capture_output=True)


def test_init_sealed_then_loaded_as_credential(tmp_path, creds_env):
    sealed = tmp_path / "var/lib/libvirt/secrets" / CREDENTIAL_NAME
    assert init_encryption(sealed, with_key="host", environ=creds_env) == sealed
    st = sealed.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(sealed.parent.stat().st_mode) == 0o700
    assert st.st_size != 32
    assert sorted(os.listdir(sealed.parent)) == [CREDENTIAL_NAME]   # no temp file left

    creds = tmp_path / "run-creds"
    proc = decrypt(sealed, creds, creds_env)
    assert proc.returncode == 0, proc.stderr.decode()
    (creds / CREDENTIAL_NAME).chmod(0o400)
    key = (creds / CREDENTIAL_NAME).read_bytes()
    assert len(key) == 32 and key not in sealed.read_bytes()

    codecs, desc = codecs_for(SecretConf(), {"CREDENTIALS_DIRECTORY": str(creds)})
    assert isinstance(codecs.writer, GcmCodec)
    assert desc == (f"aes256gcm key_id={key_id(key).hex()} from credential "
                    f"'{creds / CREDENTIAL_NAME}'")
    data = codecs.writer.encode(Binding(UUID), VALUE)
    assert codecs.readers["aes256gcm"].decode(Binding(UUID), data) == VALUE


def test_init_default_key_choice(tmp_path, creds_env):
    sealed = init_encryption(tmp_path / "s" / CREDENTIAL_NAME, environ=creds_env)
    assert decrypt(sealed, tmp_path / "out", creds_env).returncode == 0
    assert len((tmp_path / "out" / CREDENTIAL_NAME).read_bytes()) == 32


def test_init_keys_are_fresh(tmp_path, creds_env):
    keys = []
    for name in ("a", "b"):
        sealed = init_encryption(tmp_path / name / CREDENTIAL_NAME, with_key="host", environ=creds_env)
        assert decrypt(sealed, tmp_path / f"out-{name}", creds_env).returncode == 0
        keys.append((tmp_path / f"out-{name}" / CREDENTIAL_NAME).read_bytes())
    assert keys[0] != keys[1]


def test_other_host_key_cannot_decrypt(tmp_path, disk_tmp_path, creds_env):
    sealed = init_encryption(tmp_path / "s" / CREDENTIAL_NAME, with_key="host", environ=creds_env)
    other = {**creds_env, "SYSTEMD_CREDENTIAL_SECRET": str(disk_tmp_path / "other-host.secret")}
    # Make the other host key exist first (encrypting anything creates it).
    subprocess.run(["systemd-creds", "encrypt", "--name=x", "-", str(tmp_path / "x")],
                   input=b"x", env=other, capture_output=True, check=True)
    proc = decrypt(sealed, tmp_path / "out", other)
    assert proc.returncode != 0
    assert b"Decryption failed" in proc.stderr
    out = tmp_path / "out" / CREDENTIAL_NAME
    assert not out.exists() or out.stat().st_size == 0


def test_init_refuses_to_overwrite(tmp_path, creds_env):
    sealed = init_encryption(tmp_path / "s" / CREDENTIAL_NAME, with_key="host", environ=creds_env)
    before = sealed.read_bytes()
    for raw in (False, True):
        with pytest.raises(errors.OperationFailed) as ei:
            init_encryption(sealed, raw=raw, environ=creds_env)
        assert str(ei.value) == f"key file '{sealed}' already exists; refusing to overwrite"
    assert sealed.read_bytes() == before


def test_init_refuses_dangling_symlink(tmp_path):
    p = tmp_path / CREDENTIAL_NAME
    p.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(errors.OperationFailed, match="already exists"):
        init_encryption(p, raw=True)
    assert not (tmp_path / "elsewhere").exists()


def test_init_systemd_creds_failure_reports_stderr(tmp_path, creds_env):
    p = tmp_path / "s" / CREDENTIAL_NAME
    with pytest.raises(errors.OperationFailed) as ei:
        init_encryption(p, with_key="bogus", environ=creds_env)
    assert "systemd-creds encrypt failed (exit status 1)" in str(ei.value)
    assert "Unknown key type: bogus" in str(ei.value)
    assert os.listdir(p.parent) == []   # neither the key nor a temp file


def test_init_without_systemd_creds(tmp_path):
    p = tmp_path / "s" / CREDENTIAL_NAME
    with pytest.raises(errors.OperationFailed, match="systemd-creds not found"):
        init_encryption(p, environ={"PATH": str(tmp_path / "no-bin")})
    assert not p.exists()


def test_init_raw(tmp_path):
    p = tmp_path / "new" / "dir" / "raw.key"
    assert init_encryption(p, raw=True) == p
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    key = load_key(p)
    assert len(key) == 32
    assert sorted(os.listdir(p.parent)) == ["raw.key"]
    codecs, desc = codecs_for(SecretConf(secrets_encryption_key=str(p)), {})
    assert codecs.writer.decode(Binding(UUID), codecs.writer.encode(Binding(UUID), VALUE)) == VALUE
    assert init_encryption(tmp_path / "other.key", raw=True).read_bytes() != key


def test_init_replaces_stale_temp_file(tmp_path):
    p = tmp_path / "raw.key"
    (tmp_path / "raw.key.init").write_bytes(b"stale")
    init_encryption(p, raw=True)
    assert len(p.read_bytes()) == 32
    assert sorted(os.listdir(tmp_path)) == ["raw.key"]


def test_init_parent_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(errors.OperationFailed) as ei:
        init_encryption(f / CREDENTIAL_NAME, raw=True)
    assert str(ei.value).startswith(f"cannot create key file '{f / CREDENTIAL_NAME}': ")


def test_credentials_directory_that_is_a_file_counts_as_no_credential(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"")
    assert resolve_key(SecretConf(), {"CREDENTIALS_DIRECTORY": str(f)}).encrypt is False


def test_unsearchable_credentials_directory_is_an_error_not_encryption_off(request):
    # EACCES must not be read as "no credential" (that would silently store plain values).
    # root can search any directory, so as root run the check as "nobody" in a child.
    import sys
    import tempfile
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        creds = base / "creds"
        creds.mkdir(mode=0o700)
        write_key(creds / CREDENTIAL_NAME, b"D" * 32, 0o400)
        code = programs.source("resolve_key")
        root = Path(__file__).resolve().parent.parent
        if os.geteuid() == 0:
            # The checkout (and its venv) may be unreachable for uid 65534: use the harness copy.
            py = request.getfixturevalue("unpriv_python")
            argv, env, kw = py.argv("-c", code, str(creds)), py.env(), {"user": 65534, "cwd": "/"}
        else:
            creds.chmod(0o000)
            argv, env = [sys.executable, "-c", code, str(creds)], {**os.environ, "PYTHONPATH": str(root)}
            kw = {"cwd": root}
        out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env, **kw).stdout.strip()
        assert out == f"Failed to open file '{creds / CREDENTIAL_NAME}': Permission denied"
    finally:
        creds.chmod(0o700)
        shutil.rmtree(base)

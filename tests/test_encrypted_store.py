"""Encryption at rest through the whole stack: secret.conf → key → codecs → store → driver."""
from __future__ import annotations

import base64
import logging
import os

import pytest
from fixtures import U1, secret_xml
from fixtures import U1_NEXT as U2

import secretbus
from secretbus.core import errors

SENTINEL = b"S3ntinel-\x00-value-\xff"


def make_root(tmp_path, conf_lines, key=None):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True, mode=0o700)
    keyfile = tmp_path / "key"
    keyfile.write_bytes(key or os.urandom(32))
    keyfile.chmod(0o600)
    text = "\n".join(line.replace("KEY", str(keyfile)) for line in conf_lines) + "\n"
    (root / "etc" / "secret.conf").write_text(text)
    return root, keyfile


def open_root(root):
    return secretbus.open(f"secret:///embed?root={root}")


def xml(uuid, name):
    return secret_xml(uuid, uid=name)


def scan_for_sentinel(directory, value=SENTINEL):
    forms = [value, base64.b64encode(value), value.hex().encode(), value.hex().upper().encode()]
    hits = []
    for dirpath, _, files in os.walk(directory):
        for f in files:
            data = open(os.path.join(dirpath, f), "rb").read()
            hits += [(f, form) for form in forms if form in data]
    return hits


@pytest.mark.parametrize("scheme", ["aes256gcm", "aes256cbc"])
def test_values_encrypted_and_round_trip(tmp_path, scheme):
    root, _ = make_root(tmp_path, ['secrets_encryption_key = "KEY"', f'encryption_scheme = "{scheme}"'])
    with open_root(root) as c:
        c.define_xml(xml(U1, "a")).set_value(SENTINEL)
    cfg = root / "etc" / "secrets"
    assert sorted(os.listdir(cfg)) == [f"{U1}.{scheme}", f"{U1}.xml"]
    assert scan_for_sentinel(root) == []
    with open_root(root) as c:
        assert c.lookup_by_uuid(U1).get_value() == SENTINEL


def test_legacy_base64_is_read_only_by_the_explicit_migration(tmp_path, caplog):
    # Issue 12.6: with aes256gcm the load no longer serves an unauthenticated file (it used
    # to, and to re-encrypt it at the next write); rewrite-values migrates it.
    root, _ = make_root(tmp_path, ["encrypt_data = 0"])
    with open_root(root) as c:
        c.define_xml(xml(U1, "a")).set_value(b"old")
        c.define_xml(xml(U2, "b")).set_value(b"other")
    (root / "etc" / "secret.conf").write_text(f'secrets_encryption_key = "{tmp_path / "key"}"\n')
    before = {n: (root / "etc" / "secrets" / n).read_bytes() for n in os.listdir(root / "etc" / "secrets")}
    with caplog.at_level(logging.ERROR, logger="secretbus.store"), open_root(root) as c:
        assert c.list_secrets() == []
        with pytest.raises(errors.OperationFailed):     # its files are not overwritten either
            c.define_xml(xml(U1, "a"))
    assert f"{U1}.base64: legacy format, not read while the write scheme is aes256gcm" in caplog.text
    assert {n: (root / "etc" / "secrets" / n).read_bytes()
            for n in os.listdir(root / "etc" / "secrets")} == before
    with open_root(root) as c:
        assert c.rewrite_values() == (2, 2, 0)
    names = sorted(os.listdir(root / "etc" / "secrets"))
    assert [n for n in names if not n.endswith(".xml")] == [f"{U1}.aes256gcm", f"{U2}.aes256gcm"]
    with open_root(root) as c:
        assert c.lookup_by_uuid(U1).get_value() == b"old"
        assert c.lookup_by_uuid(U2).get_value() == b"other"
        c.lookup_by_uuid(U1).set_value(SENTINEL)
    assert scan_for_sentinel(root) == []


def test_damage_is_detected_and_named(tmp_path, caplog):
    root, keyfile = make_root(tmp_path, ['secrets_encryption_key = "KEY"'])
    uuids = [f"00000000-0000-0000-0000-00000000000{i}" for i in range(5)]
    with open_root(root) as c:
        for i, u in enumerate(uuids):
            c.define_xml(xml(u, f"n{i}")).set_value(f"value-{i}".encode())
    cfg = root / "etc" / "secrets"
    f = [cfg / f"{u}.aes256gcm" for u in uuids]
    # 0: flipped bit, 1: truncated, 2 <- 3: moved (3's file copied over 2's), 4 healthy
    raw = bytearray(base64.b64decode(f[0].read_bytes()))
    raw[-5] ^= 0x01
    f[0].write_bytes(base64.b64encode(bytes(raw)))
    f[1].write_bytes(f[1].read_bytes()[:20])
    f[2].write_bytes(f[3].read_bytes())
    before = {p.name: p.read_bytes() for p in cfg.iterdir()}
    with caplog.at_level(logging.ERROR, logger="secretbus"):
        with open_root(root) as c:
            assert [s.uuid for s in c.list_secrets()] == [uuids[3], uuids[4]]
            assert c.lookup_by_uuid(uuids[4]).get_value() == b"value-4"
    assert {p.name: p.read_bytes() for p in cfg.iterdir()} == before   # nothing deleted or changed
    text = caplog.text
    assert f"{uuids[0]}.aes256gcm: failed authentication" in text
    assert f"{uuids[1]}.aes256gcm: truncated" in text
    assert f"{uuids[2]}.aes256gcm: belongs to another secret" in text and f"written for secret {uuids[3]}" in text
    for i in range(5):
        assert f"value-{i}" not in text


def test_wrong_key_skips_and_says_so(tmp_path, caplog):
    root, keyfile = make_root(tmp_path, ['secrets_encryption_key = "KEY"'])
    with open_root(root) as c:
        c.define_xml(xml(U1, "a")).set_value(b"v")
    keyfile.write_bytes(os.urandom(32))
    with caplog.at_level(logging.ERROR, logger="secretbus"):
        with open_root(root) as c:
            assert c.list_secrets() == []
    assert "encrypted with a different key" in caplog.text
    assert (root / "etc" / "secrets" / f"{U1}.aes256gcm").exists()


def test_encryption_off_makes_encrypted_values_unreadable_not_garbage(tmp_path, caplog):
    root, _ = make_root(tmp_path, ['secrets_encryption_key = "KEY"'])
    with open_root(root) as c:
        c.define_xml(xml(U1, "a")).set_value(b"v")
    (root / "etc" / "secret.conf").write_text("encrypt_data = 0\n")
    with caplog.at_level(logging.ERROR, logger="secretbus"):
        with open_root(root) as c:
            assert c.list_secrets() == []
    assert "no encryption key is loaded" in caplog.text


@pytest.mark.parametrize("content,message", [
    (b"short", "Encryption key length must be '32'"),
    (os.urandom(33), "Encryption key length must be '32'"),
])
def test_bad_key_is_a_startup_error(tmp_path, content, message):
    root, keyfile = make_root(tmp_path, ['secrets_encryption_key = "KEY"'], key=content)
    with pytest.raises(errors.SecretError, match=message) as ei:
        open_root(root)
    assert str(keyfile) in str(ei.value)


def test_bad_conf_is_a_startup_error_naming_file_and_line(tmp_path):
    root, _ = make_root(tmp_path, ["# comment", "encrypt_data = \"yes\""])
    with pytest.raises(errors.ConfigError, match=r"secret\.conf:2:"):
        open_root(root)


def test_secret_skipped_without_its_key_is_never_overwritten(tmp_path, caplog):
    root, _ = make_root(tmp_path, ['secrets_encryption_key = "KEY"'])
    with open_root(root) as c:
        c.define_xml(xml(U1, "a")).set_value(SENTINEL)
    cfg = root / "etc" / "secrets"
    before = {p.name: p.read_bytes() for p in cfg.iterdir()}
    conf = (root / "etc" / "secret.conf").read_text()
    (root / "etc" / "secret.conf").write_text("encrypt_data = 0\n")
    with caplog.at_level(logging.ERROR, logger="secretbus"):
        with open_root(root) as c:
            assert c.list_secrets() == []
            # Neither its UUID nor its usage is free while its files are there.
            with pytest.raises(errors.OperationFailed,
                               match=f"secret {U1} exists in the store but could not be loaded "
                                     r"\(value file .*no encryption key is loaded\)"):
                c.define_xml(xml(U1, "other"))
            with pytest.raises(errors.OperationFailed, match="could not be loaded"):
                c.define_xml(f"<secret ephemeral='yes'><uuid>{U1}</uuid></secret>")
            with pytest.raises(errors.InternalError, match=f"UUID {U1} is already defined for use with a"):
                c.define_xml(xml(U2, "a"))
            assert c.rewrite_values() == (0, 1, 1)
    assert {p.name: p.read_bytes() for p in cfg.iterdir()} == before
    (root / "etc" / "secret.conf").write_text(conf)
    with open_root(root) as c:
        assert c.lookup_by_uuid(U1).get_value() == SENTINEL


def test_rewrite_values_commits_a_batch_at_a_time_and_keeps_no_old_ciphertext(tmp_path, monkeypatch):
    """driver/rewrite.py: one directory fsync per REWRITE_BATCH values (not one per value), and
    the files the rewrite replaces are gone, not kept as spares holding the earlier ciphertexts."""
    from secretbus.driver.rewrite import REWRITE_BATCH
    root, _ = make_root(tmp_path, ['secrets_encryption_key = "KEY"'])
    cfg = root / "etc" / "secrets"
    n = REWRITE_BATCH + 20
    uuids = [f"5e0e0000-0000-4000-8000-{i:012x}" for i in range(n)]
    with open_root(root) as c:
        for i, u in enumerate(uuids):
            c.define_xml(xml(u, f"rw{i}")).set_value(b"value %d" % i)
        before = {u: (cfg / f"{u}.aes256gcm").read_bytes() for u in uuids}
        real, synced = os.fsync, []

        def counting(fd):
            if os.readlink(f"/proc/self/fd/{fd}") == str(cfg):
                synced.append(fd)
            real(fd)
        monkeypatch.setattr(os, "fsync", counting)
        assert c.rewrite_values() == (n, n, 0)
        monkeypatch.setattr(os, "fsync", real)
    assert 1 <= len(synced) <= 4, len(synced)
    assert sorted(os.listdir(cfg)) == sorted(f"{u}.{s}" for u in uuids for s in ("xml", "aes256gcm"))
    olds = set(before.values())
    for name in os.listdir(cfg):
        assert (cfg / name).read_bytes() not in olds      # every value has a new nonce
    with open_root(root) as c:
        assert [c.lookup_by_uuid(u).get_value() for u in uuids] == [b"value %d" % i for i in range(n)]


def test_a_value_the_rewrite_cannot_write_fails_alone(tmp_path, monkeypatch):
    """One file that cannot be renamed into place: that value keeps its old file and reports
    the error; the rest of its batch is rewritten (driver/rewrite.py)."""
    from secretbus.driver.rewrite import rewrite
    root, _ = make_root(tmp_path, ['secrets_encryption_key = "KEY"'])
    cfg = root / "etc" / "secrets"
    uuids = [f"5e0e0000-0000-4000-8000-{i:012x}" for i in range(5)]
    with open_root(root) as c:
        for i, u in enumerate(uuids):
            c.define_xml(xml(u, f"rw{i}")).set_value(b"value %d" % i)
        before = {u: (cfg / f"{u}.aes256gcm").read_bytes() for u in uuids}
        bad, real = uuids[3], os.rename

        def rename(src, dst, **kw):
            if dst.startswith(bad):
                raise OSError(5, "Input/output error")
            real(src, dst, **kw)
        monkeypatch.setattr(os, "rename", rename)
        d = c.driver
        results = dict(rewrite(d.store, [d._table.get(u) for u in uuids]))
        monkeypatch.setattr(os, "rename", real)
    assert [u for u, e in results.items() if e is not None] == [bad]
    assert "Input/output error" in results[bad].message
    assert [(cfg / f"{u}.aes256gcm").read_bytes() == before[u] for u in uuids] == [u == bad for u in uuids]
    assert not [n for n in os.listdir(cfg) if not n.endswith((".xml", ".aes256gcm"))]    # no temp file left
    with open_root(root) as c:
        assert [c.lookup_by_uuid(u).get_value() for u in uuids] == [b"value %d" % i for i in range(5)]

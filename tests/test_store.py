"""Store: libvirt's layout, durable writes, crash at every step, damaged and foreign files."""
from __future__ import annotations

import base64
import logging
import os
import stat

import pytest
from fixtures import U1, store_files
from fixtures import U1_NEXT as U2

import secretbus
from secretbus.store import commit, fsutil

U3 = "22e1353d-c27e-4d6d-bf15-465053e6ba0b"

LIBVIRT_XML = """<secret ephemeral='no' private='no'>
  <uuid>{uuid}</uuid>
  <usage type='ceph'>
    <name>{name}</name>
  </usage>
</secret>
"""


def open_root(root):
    return secretbus.open(f"secret:///embed?root={root}")


def cfg(root):
    return root / "etc" / "secrets"


def test_reads_a_directory_written_the_way_libvirt_writes_it(tmp_path):
    d = cfg(tmp_path)
    d.mkdir(parents=True)
    (d / f"{U1}.xml").write_text(LIBVIRT_XML.format(uuid=U1, name="one"))
    (d / f"{U1}.base64").write_bytes(base64.b64encode(b"libvirt-value\0"))
    (d / f"{U2}.xml").write_text(LIBVIRT_XML.format(uuid=U2, name="two"))   # no value yet
    with open_root(tmp_path) as c:
        assert c.lookup_by_uuid(U1).get_value() == b"libvirt-value\0"
        assert c.lookup_by_usage(2, "two").uuid == U2
        assert c.lookup_by_uuid(U1).xml_desc() == LIBVIRT_XML.format(uuid=U1, name="one")


def test_file_modes_after_each_operation(tmp_path):
    with open_root(tmp_path) as c:
        s = c.define_xml(f"<secret><uuid>{U1}</uuid></secret>")
        s.set_value(b"v")
        for name in os.listdir(cfg(tmp_path)):
            assert stat.S_IMODE((cfg(tmp_path) / name).stat().st_mode) == 0o600, name
        for d in (tmp_path / "etc", cfg(tmp_path), tmp_path / "run" / "secrets"):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        assert sorted(os.listdir(cfg(tmp_path))) == [f"{U1}.base64", f"{U1}.xml"]
        s.undefine()
        # Its files are spares now (store/commit.py), 0600 too, until the writer is idle.
        left = os.listdir(cfg(tmp_path))
        assert all(fsutil.is_spare_name(n) for n in left)
        for name in left:
            assert stat.S_IMODE((cfg(tmp_path) / name).stat().st_mode) == 0o600, name
        commit.drop_idle_spares()
        assert os.listdir(cfg(tmp_path)) == []


def test_bad_files_are_skipped_logged_and_kept(tmp_path, caplog):
    d = cfg(tmp_path)
    d.mkdir(parents=True)
    good = LIBVIRT_XML.format(uuid=U1, name="good")
    (d / f"{U1}.xml").write_text(good)
    (d / f"{U1}.base64").write_bytes(base64.b64encode(b"ok"))
    bad_files = {
        f"{U2}.xml": b"<secret><uuid>",                                    # malformed
        "11111111-1111-1111-1111-111111111111.xml": LIBVIRT_XML.format(   # uuid differs from name
            uuid=U3, name="x").encode(),
        "22222222-2222-2222-2222-222222222222.xml": LIBVIRT_XML.format(
            uuid="22222222-2222-2222-2222-222222222222", name="good").encode(),  # duplicate usage
        "33333333-3333-3333-3333-333333333333.xml": LIBVIRT_XML.format(
            uuid="33333333-3333-3333-3333-333333333333", name="badvalue").encode(),
        "33333333-3333-3333-3333-333333333333.base64": b"!!not base64!!",
        "foreign.txt": b"something else",
        "README": b"x",
    }
    for name, content in bad_files.items():
        (d / name).write_bytes(content)
    # The duplicate is the newer file; the older claim wins.
    os.utime(d / f"{U1}.xml", ns=(1_000_000_000, 1_000_000_000))
    before = sorted(os.listdir(d))
    with caplog.at_level(logging.WARNING, logger="secretbus"):
        with open_root(tmp_path) as c:
            assert [s.uuid for s in c.list_secrets()] == [U1]
            assert c.lookup_by_uuid(U1).get_value() == b"ok"
    assert sorted(os.listdir(d)) == before      # nothing deleted
    text = caplog.text
    assert f"{U2}.xml" in text and "invalid XML" in text
    assert "does not match secret file name '11111111-1111-1111-1111-111111111111.xml'" in text
    assert "already defined for use with good" in text
    assert "not valid base64" in text


def test_uuid_cannot_escape_config_dir(tmp_path):
    with open_root(tmp_path) as c:
        with pytest.raises(secretbus.core.errors.SecretError):
            c.define_xml("<secret><uuid>../../../../etc/passwd</uuid></secret>")
        with pytest.raises(secretbus.core.errors.InvalidArg):
            c.lookup_by_uuid("../x")
    assert sorted(os.listdir(cfg(tmp_path))) == []


def test_stale_temp_files_are_removed(tmp_path):
    d = cfg(tmp_path)
    d.mkdir(parents=True)
    (d / f"{U1}.xml").write_text(LIBVIRT_XML.format(uuid=U1, name="n"))
    (d / f"{U1}.base64.new").write_bytes(b"half")
    with open_root(tmp_path):
        pass
    assert os.listdir(d) == [f"{U1}.xml"]


def test_two_value_files_newest_is_used(tmp_path):
    d = cfg(tmp_path)
    d.mkdir(parents=True)
    (d / f"{U1}.xml").write_text(LIBVIRT_XML.format(uuid=U1, name="n"))
    old = d / f"{U1}.base64"
    old.write_bytes(base64.b64encode(b"old"))
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))
    with open_root(tmp_path) as c:
        c.lookup_by_uuid(U1)   # only base64 here
    # A crash between writing the new file and unlinking the old leaves both.
    (d / f"{U1}.aes256gcm").write_bytes(b"x")   # unreadable without key -> newer but undecodable
    with open_root(tmp_path) as c:
        assert c.list_secrets() == []          # skipped, reported, not garbage
    os.unlink(d / f"{U1}.aes256gcm")
    with open_root(tmp_path) as c:
        assert c.lookup_by_uuid(U1).get_value() == b"old"


def test_value_larger_than_the_write_limit_still_loads(tmp_path):
    """libvirt's embedded driver has no 64 KiB limit: what it stored is served; only new
    writes are limited."""
    d = cfg(tmp_path)
    d.mkdir(parents=True)
    big = os.urandom(65536 * 3 + 1)
    (d / f"{U1}.xml").write_text(LIBVIRT_XML.format(uuid=U1, name="big"))
    (d / f"{U1}.base64").write_bytes(base64.b64encode(big))
    with open_root(tmp_path) as c:
        s = c.lookup_by_uuid(U1)
        assert s.get_value() == big
        assert c.rewrite_values() == (1, 1, 0)          # rewriting keeps it whole
        with pytest.raises(secretbus.core.errors.RPCError, match="^value length greater than maximum: 196609 > 65536$"):
            s.set_value(big)
    with open_root(tmp_path) as c:
        assert c.lookup_by_uuid(U1).get_value() == big


def test_read_limit_is_not_below_the_write_limit():
    from secretbus.core.secretxml import MAX_XML_BYTES
    from secretbus.store.filestore import XML_READ_LIMIT
    assert XML_READ_LIMIT >= MAX_XML_BYTES


def test_stale_value_file_is_not_inherited_by_a_new_secret(tmp_path):
    """A value file without its XML (an interrupted undefine of old) is cleared by a define."""
    d = cfg(tmp_path)
    d.mkdir(parents=True)
    (d / f"{U1}.base64").write_bytes(base64.b64encode(b"stale"))
    (d / f"{U2}.base64").write_bytes(base64.b64encode(b"stale too"))
    with open_root(tmp_path) as c:
        s = c.define_xml(f"<secret><uuid>{U1}</uuid></secret>")
        with pytest.raises(secretbus.core.errors.NoSecret):
            s.get_value()
        assert f"{U1}.base64" not in os.listdir(d)
        # An ephemeral secret made persistent without a value likewise.
        c.define_xml(f"<secret ephemeral='yes'><uuid>{U2}</uuid></secret>")
        assert f"{U2}.base64" in os.listdir(d)          # ephemeral: the disk is not touched
        c.define_xml(f"<secret><uuid>{U2}</uuid></secret>")
        assert store_files(d) == [f"{U1}.xml", f"{U2}.xml"]
    with open_root(tmp_path) as c:
        for u in (U1, U2):
            with pytest.raises(secretbus.core.errors.NoSecret, match="does not have a value"):
                c.lookup_by_uuid(u).get_value()


# -- crash at every step of a write -----------------------------------------------------
_STEP_CALLS = ("open", "write", "pwrite", "ftruncate", "fsync", "fdatasync", "rename", "link", "unlink")


def _crash_child(root: str, op: str, crash_at: int) -> None:
    """Run `op` in a forked child that dies (os._exit) at the crash_at-th file syscall."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            count = [0]
            real = {n: getattr(os, n) for n in _STEP_CALLS}

            def wrap(name):
                def f(*a, **kw):
                    count[0] += 1
                    if count[0] == crash_at:
                        os._exit(77)
                    return real[name](*a, **kw)
                return f
            c = open_root(root)
            for n in _STEP_CALLS:
                setattr(os, n, wrap(n))
            if op == "set":
                c.lookup_by_uuid(U1).set_value(b"new-value")
            elif op == "set-twice":
                # the second write's temp file is the spare the first one left (store/commit.py)
                c.lookup_by_uuid(U1).set_value(b"mid-value-longer")
                c.lookup_by_uuid(U1).set_value(b"new-value")
            elif op == "define":
                c.define_xml(f"<secret><uuid>{U1}</uuid><description>new</description>"
                             "<usage type='tls'><name>t</name></usage></secret>")
            elif op == "undefine":
                c.lookup_by_uuid(U1).undefine()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("op", ["set", "set-twice", "define", "undefine"])
def test_crash_at_each_step_leaves_old_or_new(tmp_path, op):
    step = 1
    outcomes = set()
    while True:
        root = tmp_path / f"r{step}"
        with open_root(root) as c:
            s = c.define_xml(f"<secret><uuid>{U1}</uuid><description>old</description>"
                             "<usage type='tls'><name>t</name></usage></secret>")
            s.set_value(b"old-value")
        rc = _crash_child(str(root), op, step)
        assert rc in (0, 77), rc
        with open_root(root) as c:
            names = os.listdir(cfg(root))
            assert not [n for n in names if n.endswith(".new") or fsutil.is_spare_name(n)]
            if op in ("set", "set-twice"):
                v = c.lookup_by_uuid(U1).get_value()
                assert v in (b"old-value", b"new-value", b"mid-value-longer")
                outcomes.add(v)
                if rc == 0:
                    assert v == b"new-value"
            elif op == "define":
                desc = c.lookup_by_uuid(U1).xml_desc()
                assert ("<description>old</description>" in desc) or ("<description>new</description>" in desc)
                assert c.lookup_by_uuid(U1).get_value() == b"old-value"
                outcomes.add("new" if "new</description>" in desc else "old")
            else:
                present = [s.uuid for s in c.list_secrets()]
                if present:
                    # Values go first: the secret is whole, or left without a value.
                    try:
                        assert c.lookup_by_uuid(U1).get_value() == b"old-value"
                    except secretbus.core.errors.NoSecret:
                        assert names == [f"{U1}.xml"]
                else:
                    # Never an orphan value file once the XML is gone ...
                    assert names == []
                outcomes.add(bool(present))
                if rc == 0:
                    assert not present
                if not present:
                    # ... and a new secret with this UUID never inherits the old value.
                    c.define_xml(f"<secret><uuid>{U1}</uuid></secret>")
                    with pytest.raises(secretbus.core.errors.NoSecret):
                        c.lookup_by_uuid(U1).get_value()
        if op == "undefine" and not present:
            with open_root(root) as c:
                with pytest.raises(secretbus.core.errors.NoSecret):
                    c.lookup_by_uuid(U1).get_value()
        if rc == 0:
            break
        step += 1
        assert step < 80
    # every state was observed: old and new (and the one in between)
    assert len(outcomes) == (3 if op == "set-twice" else 2), outcomes


def test_atomic_write_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def boom(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        fsutil.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_open_dir_checks_every_directory_on_the_way(tmp_path):
    """Above the leaf, a directory others may write to is refused unless sticky (like /tmp),
    since whoever can rename entries there can swap the leaf; the leaf must be ours."""
    top = tmp_path / "top"
    leaf = top / "mid" / "leaf"
    leaf.mkdir(parents=True, mode=0o700)
    (top / "mid").chmod(0o777)
    with pytest.raises(fsutil.UnsafeDirectory) as ei:
        fsutil.open_dir(leaf)
    assert f"refusing directory '{top / 'mid'}': mode 0777" in str(ei.value)
    (top / "mid").chmod(0o1777)
    os.close(fsutil.open_dir(leaf))
    # created components are private and the result is verified too
    fd = fsutil.open_dir(top / "new" / "deeper", create=True)
    os.close(fd)
    assert (top / "new" / "deeper").stat().st_mode & 0o777 == 0o700


def test_atomic_write_never_follows_a_symlink_at_the_target(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    (d / "f").symlink_to(outside)
    fsutil.atomic_write(d / "f", b"new")
    assert outside.read_bytes() == b"keep"
    assert not (d / "f").is_symlink() and (d / "f").read_bytes() == b"new"


# -- which value files a write removes ------------------------------------------------------
def _plain_store(d):
    from secretbus.store.codec import Base64Codec, ValueCodecs
    from secretbus.store.filestore import SecretStore
    return SecretStore(d, ValueCodecs(writer=Base64Codec()))


def _defn(uuid):
    from secretbus.core.secretxml import parse_secret_xml
    return parse_secret_xml(f"<secret><uuid>{uuid}</uuid></secret>")


def _unlinked(plan):
    from secretbus.store.commit import Unlink
    return [s.name for s in plan.steps if isinstance(s, Unlink)]


def test_a_write_removes_only_the_value_files_that_may_exist(tmp_path):
    from secretbus.store.commit import commit_now
    d = cfg(tmp_path)
    d.mkdir(parents=True, mode=0o700)
    for u in (U1, U2):
        (d / f"{u}.xml").write_text(LIBVIRT_XML.format(uuid=u, name=u))
    (d / f"{U1}.base64").write_bytes(base64.b64encode(b"old"))
    (d / f"{U2}.aes256cbc").write_bytes(b"stale file of another scheme")
    (d / f"{U2}.base64").write_bytes(base64.b64encode(b"old too"))
    store = _plain_store(d)
    # Before a load nothing is known: every other scheme's file is removed.
    assert _unlinked(store.plan_value(_defn(U1), b"v")) == [f"{U1}.aes256gcm", f"{U1}.aes256cbc"]
    store.load()
    assert _unlinked(store.plan_value(_defn(U1), b"v")) == []
    p = store.plan_value(_defn(U2), b"new")
    assert _unlinked(p) == [f"{U2}.aes256cbc"]          # found at load: removed
    commit_now(p)
    live = sorted(n for n in os.listdir(d) if not fsutil.is_spare_name(n))
    assert live == sorted([f"{U1}.xml", f"{U1}.base64", f"{U2}.xml", f"{U2}.base64"])
    assert _unlinked(store.plan_value(_defn(U2), b"newer")) == []   # gone, known to be gone
    # An undefine removes every scheme's file, known or not: none stays under its name (each
    # is a spare until the writer is idle, store/commit.py).
    (d / f"{U1}.aes256gcm").write_bytes(b"appeared behind our back")
    commit_now(store.plan_delete_values(U1))
    assert not [n for n in os.listdir(d) if n.startswith(U1) and not n.endswith(".xml")]
    # ... and what it removed is known: a new value removes nothing more.
    assert _unlinked(store.plan_value(_defn(U1), b"v")) == []


def test_a_failed_write_keeps_what_it_was_removing_known(tmp_path, monkeypatch):
    from secretbus.store.commit import commit_batch
    d = cfg(tmp_path)
    d.mkdir(parents=True, mode=0o700)
    (d / f"{U1}.xml").write_text(LIBVIRT_XML.format(uuid=U1, name="n"))
    (d / f"{U1}.aes256cbc").write_bytes(b"stale")
    store = _plain_store(d)
    store.load()

    def no_rename(*a, **kw):
        raise OSError(5, "Input/output error")
    with monkeypatch.context() as m:
        m.setattr(os, "rename", no_rename)
        assert commit_batch([store.plan_value(_defn(U1), b"v")]).errors[0] is not None
    assert (d / f"{U1}.aes256cbc").exists()
    assert _unlinked(store.plan_value(_defn(U1), b"v")) == [f"{U1}.aes256cbc"]


def test_a_value_file_appearing_behind_our_back_loses_at_load(tmp_path):
    d = cfg(tmp_path)
    with open_root(tmp_path) as c:
        s = c.define_xml(f"<secret><uuid>{U1}</uuid></secret>")
        s.set_value(b"first")
        stale = d / f"{U1}.aes256cbc"
        stale.write_bytes(b"not ours")
        os.utime(stale, ns=(1_000_000_000, 1_000_000_000))     # older than what follows
        s.set_value(b"second")                                 # not known: left in place
        assert stale.exists()
    with open_root(tmp_path) as c:
        assert c.lookup_by_uuid(U1).get_value() == b"second"   # the newest file wins
        c.lookup_by_uuid(U1).set_value(b"third")               # found at load: removed now
    assert not stale.exists()

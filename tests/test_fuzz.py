"""Fuzzing, CI-sized: bench/fuzz.py's parts with fewer inputs (the long run is `bench/fuzz.py --size full`).

Each part must end with no failure, except the kinds listed in KNOWN_BUGS: those are open
bugs in secretbus/, each with a strict-xfail reproducer below. When one is fixed, its
reproducer XPASSes (and fails the run): remove the xfail mark and its KNOWN_BUGS entry.
Reproducers of bugs the fuzzer found that are fixed stay as regression tests.
"""
from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest
from fixtures import U1
from harness import load_bench as _bench

from secretbus.store.codec import Binding

REPO = Path(__file__).resolve().parents[1]

fuzz = _bench("fuzz")

# part (Result.name) -> {failure kind (Result.kinds key): the strict-xfail reproducer tracking it}
KNOWN_BUGS: dict[str, dict[str, str]] = {}


def assert_clean(res) -> None:
    assert res.tried > 0
    known = KNOWN_BUGS.get(res.name, {})
    unexpected = {k: n for k, n in res.kinds.items() if k not in known}
    if unexpected:
        examples = [text for kind, text in res.failed if kind in unexpected][:5]
        pytest.fail(f"{res.name}: {sum(unexpected.values())} failure(s) of kind(s) {sorted(unexpected)} "
                    f"in {res.tried} inputs:\n" + "\n".join(examples))


# -- parsers, codecs, store loading (in-process) -------------------------------------------------

def test_fuzz_xml_parser():
    assert_clean(fuzz.fuzz_xml(1200, quiet=True))


def test_fuzz_secret_conf():
    assert_clean(fuzz.fuzz_conf(1500, quiet=True))


def test_fuzz_value_files():
    for res in fuzz.fuzz_values(400, quiet=True):
        assert_clean(res)


def test_fuzz_store_loading_regular_files():
    """Random, damaged, misnamed, foreign, oversized, non-UTF-8-named files and symlinks."""
    assert_clean(fuzz.fuzz_store(100, quiet=True, specials=False))


def test_fuzz_store_loading_with_directories_and_fifos():
    assert_clean(fuzz.fuzz_store(60, quiet=True, specials=True))


def test_internal_error_texts_are_libvirts_only():
    assert fuzz.internal_error_ok("malformed uuid element")
    assert fuzz.internal_error_ok("Ceph usage specified, but name is missing")
    assert fuzz.internal_error_ok(f"a secret with UUID {U1} is already defined for use with /x\ny")
    assert not fuzz.internal_error_ok("internal error")


def test_the_checks_catch_what_they_should(tmp_path):
    """The store check flags a temp file, an orphan value file, an unparsable .xml."""
    import base64
    d = tmp_path / "secrets"
    d.mkdir()
    (d / f"{U1}.xml").write_text(fuzz.format_secret_xml(fuzz._good_def(U1)))
    (d / f"{U1}.aes256gcm").write_bytes(fuzz.GcmCodec(fuzz.KEY).encode(Binding.of(fuzz._good_def(U1)), b"v"))
    (d / f"{U1}.xml.new").write_text("x")
    (d / f"{fuzz.UUID_POOL[1]}.base64").write_bytes(base64.b64encode(b"x"))
    (d / f"{fuzz.UUID_POOL[2]}.xml").write_text("<secret>")
    res = fuzz.Result("check", quiet=True)
    fuzz._check_store_dir(d, {U1}, res)
    assert set(res.kinds) == {"store: unexpected file (temp file left?)", "store: value file without .xml",
                              "store: .xml does not parse"}


# -- bugs the fuzzer found: regression tests, and strict-xfail reproducers of open ones --------

@pytest.mark.parametrize("text", ['secrets_encryption_key = "/etc/key\x00x"\n',
                                  'secrets_encryption_key = """/etc/key\x00x"""\n',
                                  'private_value_readers = [ "qemu\x00" ]\n'])
def test_conf_nul_in_key_path_or_reader_is_a_config_error(text):
    """Found by fuzzing: a NUL reached os.lstat / pwd.getpwnam, whose ValueError made
    secretbusd exit 1 with a traceback (not 78) and a SIGHUP reload never send READY=1."""
    from secretbus.core import errors
    from secretbus.store.conf import parse_conf, resolve_readers
    from secretbus.store.keys import codecs_for
    with pytest.raises(errors.ConfigError):
        conf = parse_conf(text)
        codecs_for(conf, {})
        resolve_readers(conf)


def _store(tmp_path: Path):
    from secretbus.store.codec import Base64Codec, ValueCodecs
    from secretbus.store.filestore import SecretStore
    d = tmp_path / "secrets"
    d.mkdir()
    return d, SecretStore(d, ValueCodecs(writer=Base64Codec()))


@pytest.mark.parametrize("name", [f"{U1}.xml.new", "notes.new"])
def test_store_directory_named_new_does_not_break_loading(tmp_path, name):
    """Found by fuzzing: stale-temp cleanup unlinked every '*.new' name, and a directory so
    named raised IsADirectoryError out of load() (no start-up; a reload without READY=1)."""
    d, store = _store(tmp_path)
    (d / name).mkdir()
    report = store.load()
    assert report.secrets == []
    assert (d / name).is_dir()   # not ours to remove


@pytest.mark.parametrize("suffix", ["xml", "aes256gcm", "base64"])
def test_store_fifo_does_not_hang_loading(tmp_path, suffix):
    """Found by fuzzing: a FIFO in the store blocked start-up forever in open()."""
    from secretbus.store.codec import ValueCodecs
    from secretbus.store.crypto import GcmCodec
    from secretbus.store.filestore import SecretStore
    d, _ = _store(tmp_path)
    store = SecretStore(d, ValueCodecs(writer=GcmCodec(fuzz.KEY), readers={"base64": fuzz.Base64Codec()}))
    if suffix != "xml":
        (d / f"{U1}.xml").write_text(fuzz.format_secret_xml(fuzz._good_def(U1)))
    fifo = d / f"{U1}.{suffix}"
    os.mkfifo(fifo)
    done = threading.Event()
    t = threading.Thread(target=lambda: (store.load(), done.set()), daemon=True)
    t.start()
    finished = done.wait(2)
    if not finished:   # let the stuck reader go: a writer that opens and closes gives it EOF
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert finished, "store.load() blocked opening a FIFO"


def _raw_call(bus_address: str, path: str, iface: str | None, member: str, sig: str = "", body=()):
    import asyncio

    from dbus_fast import Message

    from secretbus.bus import connect as busconn

    async def go():
        bus = await busconn.connect(bus_address)
        try:
            return await asyncio.wait_for(bus.call(Message(destination=fuzz.NAME, path=path, interface=iface,
                                                           member=member, signature=sig, body=list(body))), 10)
        finally:
            bus.disconnect()
    return asyncio.run(go())


def test_dbus_introspectable_answers_only_introspect(session_bus, make_secretbusd):
    """Found by fuzzing: any member and signature on Introspectable got the XML."""
    make_secretbusd(session_bus)
    for path in (fuzz.CONNECT, "/", fuzz.SECRETS):
        r = _raw_call(session_bus.address, path, fuzz.INTRO, "SetValue", "ayu", [b"x", 0])
        assert r.error_name == "org.freedesktop.DBus.Error.UnknownMethod", (path, r.message_type, r.body)
        r = _raw_call(session_bus.address, path, fuzz.INTRO, "Introspect", "s", ["x"])
        assert r.error_name == "org.freedesktop.DBus.Error.InvalidArgs", (path, r.message_type, r.body)


def test_dbus_paths_under_the_connect_object_are_unknown_objects(session_bus, make_secretbusd):
    """Found by fuzzing: /org/libvirt/secret/secret/x and the like fell through to dbus-fast
    (Properties with interface '' -> NotSupported; GetManagedObjects, any signature -> {})."""
    make_secretbusd(session_bus)
    for path in (fuzz.SECRETS + "/x", fuzz.CONNECT + "/x/y"):
        r = _raw_call(session_bus.address, path, fuzz.PROPS, "GetAll", "s", [""])
        assert r.error_name == "org.freedesktop.DBus.Error.UnknownObject", (path, r.error_name, r.body)
        r = _raw_call(session_bus.address, path, fuzz.OM, "GetManagedObjects", "u", [0])
        assert r.error_name == "org.freedesktop.DBus.Error.UnknownObject", (path, r.error_name, r.body)


def test_dbus_paths_outside_the_tree_are_unknown_objects(session_bus, make_secretbusd):
    make_secretbusd(session_bus)
    path = "/foo"
    assert not fuzz.served(path)
    r = _raw_call(session_bus.address, path, fuzz.PROPS, "GetAll", "s", [""])
    assert r.error_name in fuzz.ALLOWED_FD, (r.error_name, r.body)
    r = _raw_call(session_bus.address, path, fuzz.OM, "GetManagedObjects", "u", [0])
    assert r.error_name in fuzz.ALLOWED_FD, (r.message_type, r.body)


# -- D-Bus (integration: a private bus and secretbusd) ---------------------------------------

def test_fuzz_dbus_methods(session_bus, make_secretbusd):
    t0 = time.monotonic()
    res = fuzz.fuzz_dbus(1500, quiet=True, bus=session_bus,
                         start_daemon=lambda root, conf: make_secretbusd(session_bus, root=root, conf=conf))
    assert res.tried >= 1500
    assert_clean(res)
    assert time.monotonic() - t0 < 60

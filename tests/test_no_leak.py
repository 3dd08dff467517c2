"""No leak: secret values and the key appear nowhere the service writes, and the service zeroes the
buffers that held a value once the value is replaced or the secret undefined.

The audit is bench/leak_audit.py's (its docstring lists the scenarios and the places searched);
the tests here run it at CI size and first prove that its probes would see a leak: the sentinel
forms, the emulated journald (native protocol and memfd), and the D-Bus capture's split between
the service's messages and the GetValue replies it must skip. docs/security.md says what can and
cannot be wiped in Python.
"""
from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import harness
import pytest
from fixtures import U1, U2
from harness import load_bench as _bench
from harness import programs
from harness.journal import JournalSocket

import secretbus
from secretbus.core import errors
from secretbus.driver.build import open_instance
from secretbus.driver.driver import SecretDriver
from secretbus.store.paths import InstancePaths

REPO = Path(__file__).resolve().parents[1]

leak = _bench("leak_audit")

U3 = "22e1353d-c27e-4d6d-bf15-465053e6ba0b"


# -- the probes see what they must ------------------------------------------------------------
def test_every_form_of_a_sentinel_is_found():
    value = leak.sentinel("t")
    for k in range(3):
        sc = leak.Scanner()
        sc.add("v", value)
        data = b"x" * k + value + b"tail"
        for where, blob in (("raw", b"log: " + data), ("b64", base64.b64encode(data)),
                            ("urlsafe", base64.urlsafe_b64encode(data)), ("hex", data.hex().encode()),
                            ("HEX", data.hex().upper().encode()), ("repr", repr(data).encode())):
            sc.scan("t", where, blob)
        assert {h.where for h in sc.hits} == {"raw", "b64", "urlsafe", "hex", "HEX", "repr"}, k
    sc = leak.Scanner()
    sc.add("v", value)
    sc.scan("t", "clean", os.urandom(4096) + b"SbLeak-t-")     # the prefix alone is no hit
    assert sc.hits == []


@pytest.mark.integration
def test_journal_emulation_receives_native_entries_and_memfds():
    value = leak.sentinel("journal")
    code = programs.source("journal_send")
    with JournalSocket() as j:
        r = subprocess.run([sys.executable, "-c", code, value.hex()], capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        j.wait_for(lambda e: "BIG" in e)
        entries = j.snapshot()
        assert j.memfd_entries == 1 and j.errors == []
    small = [e for e in entries if "SECRET_UUID" in e][0]
    assert small["RAW"] == [value + b"\nwith newline"]          # binary field, length-prefixed
    assert small["MESSAGE"] == [b"hex " + value.hex().encode()]
    assert len([e for e in entries if "BIG" in e][0]["MESSAGE"][0]) == 12 << 20
    sc = leak.Scanner()
    sc.add("v", value)
    for i, raw in enumerate(j.raw):
        sc.scan("journal", str(i), raw)
    assert {h.form for h in sc.hits} >= {"raw", "hex"}
    assert not Path("/run/systemd/journal/socket").exists()


FAKE_SERVICE = r'''
import asyncio, sys
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

async def main():
    v = bytes.fromhex(sys.argv[2])
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    def handler(msg):
        if msg.message_type is not MessageType.METHOD_CALL or msg.member in ("Hello",):
            return None
        if msg.member == "GetValue":
            return Message.new_method_return(msg, "ay", [v])          # by design
        bus.send(Message.new_signal("/org/libvirt/secret", "org.libvirt.Connect", "Leak", "s", [v.hex()]))
        return Message.new_error(msg, "org.libvirt.Error.InternalError", "oops " + v.hex())
    bus.add_message_handler(handler)
    await bus.request_name("org.libvirt.secret")
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
'''


@pytest.mark.integration
def test_capture_sees_the_services_messages_but_not_getvalue_replies(session_bus, tmp_path):
    """A stand-in service that leaks in an error and a signal: both are caught; its GetValue
    reply (the value by design) is not counted."""
    value = leak.sentinel("bus")
    private = harness.public_tempdir("sb-leakctl-")
    mon = leak.PcapMonitor(session_bus.address, private / "cap.pcap", session_bus.log)
    fake = harness.spawn([sys.executable, "-c", FAKE_SERVICE, session_bus.address, value.hex()],
                         what="fake service", log=private / "fake.log", stdout=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert fake.stdout.readline().strip() == b"ready"
        c = leak.SyncBus(session_bus.address)
        r = c.call(leak.spath(U1), leak.SECRET, "GetValue", "u", [0])
        assert r.ok and bytes(r.body[0]) == value
        r = c.call(leak.spath(U1), leak.SECRET, "SetValue", "ayu", [b"whatever", 0])
        assert not r.ok and value.hex() in r.message
        c.close()
    finally:
        harness.stop_process(fake)
        mon.stop()
    sc = leak.Scanner()
    sc.add("v", value)
    leak.scan_capture(sc, mon, "control")
    harness.procs.remove_tree(private)
    where = sorted({(h.category, h.where.split(": ", 1)[1].rsplit(" from", 1)[0]) for h in sc.hits})
    assert where == [("dbus", "ERROR org.libvirt.Error.InternalError"), ("dbus", "SIGNAL Leak"),
                     ("dbus-errors", "error org.libvirt.Error.InternalError")]


# -- the audit ----------------------------------------------------------------------------------
@pytest.mark.integration
def test_no_value_or_key_leaks_from_dbus_cli_and_polkit_scenarios(test_users):
    r = leak.run(crash=False)
    hits = [f"{h.category}: {h.label} as {h.form} in {h.where}" for h in r.scanner.hits]
    assert hits == []
    assert r.unexpected == []                    # the scenarios did what they meant to
    assert r.expected_failures >= 15
    assert r.cores_found == 0
    assert r.journal_entries > 20                # the daemon really logged to the journal
    for cat in ("stderr", "journal", "dbus", "dbus-errors", "cli", "files", "store", "other-logs"):
        assert r.scanner.places[cat] > 0, cat
    assert r.wipe_zeroed == r.wipe_checked > 0, r.wipe_notes
    for name, value, goal in leak.rows(r):
        if goal == "0" and "core" not in name:
            assert value == 0, name


@pytest.mark.integration
def test_core_dump_of_a_crashed_daemon_holds_no_value_or_key():
    res = leak.Result()
    base = harness.public_tempdir("sb-leakcrash-")
    try:
        leak.scenario_crash(res, base)
    finally:
        harness.procs.remove_tree(base)
    if res.crash.startswith("n/a"):
        pytest.skip(res.crash)
    assert res.unexpected == []
    assert (res.crash_hits, res.crash_key_hits) == (0, 0), res.crash


# -- wiping ---------------------------------------------------------------------------------------
def _xml(uuid, eph="no"):
    return (f"<secret ephemeral='{eph}' private='no'><uuid>{uuid}</uuid>"
            f"<usage type='volume'><volume>/v/{uuid}</volume></usage></secret>")


def _held(drv: SecretDriver, uuid: str) -> bytearray:
    buf = drv._table.get(uuid).value
    assert type(buf) is bytearray        # a mutable buffer the driver can zero in place
    return buf


def _zeroed(buf: bytearray, n: int) -> bool:
    return len(buf) == n and not any(buf)


def test_replaced_and_undefined_values_are_zeroed(tmp_path):
    drv = open_instance(InstancePaths.embed(tmp_path))
    try:
        v1, v2 = b"first \x00 secret", b"second secret"
        for u, eph in ((U1, "no"), (U2, "yes")):
            drv.define_xml(_xml(u, eph))
            drv.set_value(u, v1)
        held = _held(drv, U1)
        assert bytes(held) == v1
        drv.set_value(U1, v2)
        assert _zeroed(held, len(v1))                              # replaced: zeroed in place
        assert drv.get_value(U1) == v2
        held_eph = _held(drv, U2)
        drv.set_value(U2, v2)
        assert _zeroed(held_eph, len(v1))
        held, held_eph = _held(drv, U1), _held(drv, U2)
        drv.undefine(U1)
        drv.undefine(U2)
        assert _zeroed(held, len(v2)) and _zeroed(held_eph, len(v2))   # undefined: zeroed
        # An empty value is a value; replacing it is harmless.
        drv.define_xml(_xml(U3))
        drv.set_value(U3, b"")
        drv.set_value(U3, v1)
        held = _held(drv, U3)
    finally:
        drv.close()
    assert _zeroed(held, len(v1))                                  # closed: zeroed


def test_reload_zeroes_the_buffers_it_replaces_or_drops(tmp_path):
    drv = open_instance(InstancePaths.embed(tmp_path))
    try:
        drv.define_xml(_xml(U1))
        drv.set_value(U1, b"value one")
        drv.define_xml(_xml(U2))
        drv.set_value(U2, b"value two")
        drv.define_xml(_xml(U3, "yes"))
        drv.set_value(U3, b"ephemeral")
        kept_eph = _held(drv, U3)
        h1, h2 = _held(drv, U1), _held(drv, U2)
        for f in (tmp_path / "etc" / "secrets").glob(f"{U2}.*"):
            f.unlink()                                             # U2 vanished from disk
        drv.reload()
        assert _zeroed(h1, 9)                                      # re-read into a new buffer
        assert bytes(_held(drv, U1)) == b"value one"               # loaded values: bytearrays too
        assert _zeroed(h2, 9)                                      # dropped
        assert bytes(kept_eph) == b"ephemeral"                     # ephemeral: kept, still in use
        assert _held(drv, U3) is kept_eph
    finally:
        drv.close()


def test_a_failed_write_leaves_the_current_value_unwiped(tmp_path, monkeypatch):
    drv = open_instance(InstancePaths.embed(tmp_path))
    try:
        drv.define_xml(_xml(U1))
        drv.set_value(U1, b"current")
        held = _held(drv, U1)

        def full(*a, **kw):
            raise errors.SystemError("cannot write 'x': No space left on device")
        monkeypatch.setattr(drv.store, "write_value", full)
        with pytest.raises(errors.SystemError):
            drv.set_value(U1, b"new")
        assert _held(drv, U1) is held and bytes(held) == b"current"
    finally:
        drv.close()


def test_what_cannot_be_wiped_is_a_copy(tmp_path):
    """get_value hands out an immutable copy (documented in docs/security.md): zeroing the
    driver's buffer does not reach it, and nothing in Python can zero a bytes object safely."""
    with secretbus.open(f"secret:///embed?root={tmp_path}") as c:
        s = c.define_xml(_xml(U1))
        s.set_value(b"value")
        out = s.get_value()
        assert type(out) is bytes
        s.set_value(b"other")
        assert out == b"value"


def test_bench_wipe_check_agrees():
    checked, zeroed, notes = leak.wipe_check()
    assert checked == zeroed == 7, notes

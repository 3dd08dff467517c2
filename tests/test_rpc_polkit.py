"""The RPC front end's authentication and authorisation, end to end: a private system-type
dbus-daemon with the shipped bus policy, real polkitd with the shipped actions (secretbus's
org.libvirt.api.secret.* and libvirt's org.libvirt.unix.*), secretbusd --system serving D-Bus
and RPC from one driver, and Debian's unmodified python3-libvirt and virsh run as the test
users through setpriv against its sockets (in a 0755 --rpc-dir they can reach).

Root defines the secrets (a root peer needs no authentication and polkit is not asked).
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import harness
import pytest
from harness import programs
from harness.events import EventWatch

from secretbus.access.audit import MESSAGE_ID

REPO = Path(__file__).resolve().parents[1]
BUS_CONF = REPO / "dbus" / "org.libvirt.secret.conf"
API_ACTIONS = ("sbtest-rpc.org.libvirt.api.secret.policy",
               (REPO / "polkit" / "org.libvirt.api.secret.policy").read_text())
UNIX_ACTIONS = ("sbtest-rpc.org.libvirt.unix.policy", (REPO / "polkit" / "org.libvirt.unix.policy").read_text())
DEBIAN_PYTHON = "/usr/bin/python3"

OPEN = "7a0f0001-0000-4000-8000-000000000001"       # member may read and write its value
VISIBLE = "7a0f0001-0000-4000-8000-000000000002"    # member sees it, may not read or write its value
HIDDEN = "7a0f0001-0000-4000-8000-000000000003"     # member may not even see it
LATER = "7a0f0001-0000-4000-8000-000000000004"      # member sees it (defined during the event test)
PRIVATE = "7a0f0001-0000-4000-8000-000000000005"    # private; member may read-secure it

RULES = ("50-sbtest-rpc.rules", f"""
polkit.addRule(function(action, subject) {{
    var uuid = action.lookup("secret_uuid");
    if (action.id == "org.libvirt.unix.manage" && subject.isInGroup("libvirt"))
        return polkit.Result.YES;
    if (uuid == "{HIDDEN}")
        return polkit.Result.NO;
    if ((action.id == "org.libvirt.api.secret.read-secure" || action.id == "org.libvirt.api.secret.write") &&
            (uuid == "{OPEN}" || uuid == "{PRIVATE}") && subject.isInGroup("libvirt"))
        return polkit.Result.YES;
    return polkit.Result.NOT_HANDLED;
}});
""")

pytestmark = [pytest.mark.integration, pytest.mark.bus_policy(BUS_CONF),
              pytest.mark.skipif(shutil.which("virsh") is None, reason="virsh (libvirt-clients) not installed")]


def start(system_bus, make_polkitd, make_secretbusd, rpc_dir: Path, rules=()):
    make_polkitd(system_bus, actions=[API_ACTIONS, UNIX_ACTIONS], rules=list(rules))
    return make_secretbusd(system_bus, system=True, args=("--rpc-dir", str(rpc_dir)))


def uri(rpc_dir: Path, ro: bool = False) -> str:
    return f"secret:///system?socket={rpc_dir}/virtsecretd-sock{'-ro' if ro else ''}"


def xml(uuid: str, name: str) -> str:
    return (f"<secret ephemeral='no' private='no'><uuid>{uuid}</uuid>"
            f"<usage type='volume'><volume>/var/lib/sbtest/rpc-{name}.img</volume></usage></secret>")


def root_define(rpc_dir: Path, tmp_path: Path, uuid: str, name: str, value: bytes | None = None,
                private: bool = False) -> None:
    f = tmp_path / f"{name}.xml"
    f.write_text(xml(uuid, name).replace("private='no'", "private='yes'") if private else xml(uuid, name))
    r = harness.run_as(None, ["virsh", "-c", uri(rpc_dir), "secret-define", str(f)])
    assert r.returncode == 0, r.stderr
    if value is not None:
        r = harness.run_as(None, ["virsh", "-c", uri(rpc_dir), "secret-set-value", uuid, "--base64",
                                  base64.b64encode(value).decode()])
        assert r.returncode == 0, r.stderr


def client(user, u: str, *steps) -> dict:
    r = harness.run_as(user, [DEBIAN_PYTHON, "-c", programs.source("libvirt_acl_client"), u,
                              json.dumps([list(s) for s in steps])], timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def audit_records(sbd, uuid: str) -> list[dict[str, str]]:
    out = []
    for e in list(sbd.journal.entries):
        fields = {k: v[0].decode() for k, v in e.items()}
        if fields.get("MESSAGE_ID") == MESSAGE_ID and fields.get("SECRET_UUID") == uuid:
            out.append(fields)
    return out


DENIED = [88, 55, "access denied: 'secret' denied access"]


def test_without_a_rule_non_root_may_only_monitor(system_bus, make_polkitd, make_secretbusd, rpc_dir,
                                                  test_users, tmp_path):
    """org.libvirt.unix.manage is auth_admin_keep (libvirt's default): with no agent, the rw
    socket refuses; org.libvirt.unix.monitor is yes: the ro socket serves, read-only."""
    sbd = start(system_bus, make_polkitd, make_secretbusd, rpc_dir)
    root_define(rpc_dir, tmp_path, OPEN, "open", b"open-value")
    for user in test_users:
        got = client(user, uri(rpc_dir), ("list_all",))
        assert got["open"] == [94, 60, "authentication unavailable: no polkit agent available to authenticate "
                                       "action 'org.libvirt.unix.manage'"], got
        got = client(user, uri(rpc_dir, ro=True), ("list_all",), ("xml", OPEN), ("value", OPEN))
        assert got["open"] is None and got["steps"][0] == [OPEN], got
        assert f"<uuid>{OPEN}</uuid>" in got["steps"][1]
        assert got["steps"][2]["error"][0] == 29          # read-only: no values
    r = harness.run_as(test_users.member, ["virsh", "-c", uri(rpc_dir), "secret-list"])
    assert r.returncode == 1 and "authentication unavailable" in r.stderr, r.stderr
    assert b"open-value".hex() not in sbd.log()


def test_calls_are_allowed_and_denied_per_rule_and_audited(system_bus, make_polkitd, make_secretbusd, rpc_dir,
                                                           test_users, tmp_path):
    sbd = start(system_bus, make_polkitd, make_secretbusd, rpc_dir, rules=[RULES])
    for uuid, name in ((OPEN, "open"), (VISIBLE, "visible"), (HIDDEN, "hidden")):
        root_define(rpc_dir, tmp_path, uuid, name, f"{name}-value".encode())
    got = client(test_users.member, uri(rpc_dir),
                 ("list_all",), ("num",), ("list",),
                 ("lookup", HIDDEN), ("lookup_usage", 1, "/var/lib/sbtest/rpc-hidden.img"), ("xml", HIDDEN),
                 ("lookup", VISIBLE), ("xml", VISIBLE),
                 ("value", OPEN), ("value", VISIBLE),
                 ("set_value", OPEN, b"new-open".hex()), ("set_value", VISIBLE, b"x".hex()),
                 ("define", xml("7a0f0001-0000-4000-8000-0000000000ff", "new")), ("undefine", OPEN))
    assert got["open"] is None, got
    (list_all, num, listed, lookup_hidden, usage_hidden, xml_hidden, lookup_visible, xml_visible,
     value_open, value_visible, set_open, set_visible, define, undefine) = got["steps"]
    assert list_all == [OPEN, VISIBLE] and num == 2 and listed == [OPEN, VISIBLE]     # HIDDEN filtered out
    assert lookup_hidden == {"error": DENIED} and usage_hidden == {"error": DENIED}
    assert xml_hidden["error"][0] == 88
    assert lookup_visible == VISIBLE and f"<uuid>{VISIBLE}</uuid>" in xml_visible
    assert value_open == b"open-value".hex()
    assert value_visible == {"error": DENIED}
    assert set_open == 0 and set_visible == {"error": DENIED}
    assert define == {"error": DENIED} and undefine == {"error": DENIED}

    # Root sees everything, and the member's write.
    root = client(None, uri(rpc_dir), ("list_all",), ("value", OPEN))
    assert root["steps"] == [[OPEN, VISIBLE, HIDDEN], b"new-open".hex()]

    # Not in group libvirt: no org.libvirt.unix.manage, no connection at all.
    other = client(test_users.other, uri(rpc_dir), ("list_all",))
    assert other["open"][:2] == [94, 60], other

    # Audit: the value returned and the one refused, each with the peer's uid and pid.
    harness.wait_until(lambda: audit_records(sbd, OPEN) and audit_records(sbd, VISIBLE), timeout=10,
                       what="the audit records of the RPC reads")
    (allowed,) = [r for r in audit_records(sbd, OPEN) if r["CALLER_UID"] == str(test_users.member.uid)]
    (refused,) = audit_records(sbd, VISIBLE)
    for rec in (allowed, refused):
        assert rec["AUDIT_FRONT_END"] == "rpc" and rec["CALLER_PID"] == str(got["pid"])
        assert rec["CALLER_UID"] == str(test_users.member.uid) and rec["CALLER_PEER"].startswith("rpc-")
        assert "CALLER_IDENTITY" not in rec
    assert allowed["AUDIT_OUTCOME"] == "allowed"
    assert (refused["AUDIT_OUTCOME"], refused["AUDIT_REASON"]) == ("denied", "access")
    (root_read,) = [r for r in audit_records(sbd, OPEN) if r["CALLER_UID"] == "0"]
    assert root_read["CALLER_PID"] == str(root["pid"]) and root_read["AUDIT_OUTCOME"] == "allowed"
    log = sbd.log()
    for v in (b"open-value", b"new-open", b"visible-value"):
        assert v.hex() not in log and v.decode() not in log
    # The connections are gone, and so is everything kept for them (per-uid decisions stay).
    tables = table_sizes(sbd)
    assert tables["rpc_processes"] == 0 and tables["decisions"] == 0 and tables["decision_senders"] == 0, tables
    assert tables["uid_decisions"] > 0, tables


def table_sizes(sbd) -> dict[str, int]:
    """SIGUSR1: the daemon logs its per-caller tables; the newest such line, parsed."""
    before = sbd.log().count("tables:")
    sbd.signal(signal.SIGUSR1)
    harness.wait_until(lambda: sbd.log().count("tables:") > before, timeout=10, what="the tables log line")
    line = sbd.log().split("tables:")[-1].splitlines()[0]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


CONNECT_RULES = ("50-sbtest-rpc-connect.rules", """
polkit.addRule(function(action, subject) {
    if (action.id == "org.libvirt.unix.manage")
        return polkit.Result.YES;
    if (action.id == "org.libvirt.api.connect.getattr" && !subject.isInGroup("libvirt"))
        return polkit.Result.NO;
    if (action.id == "org.libvirt.api.connect.read" && subject.isInGroup("libvirt"))
        return polkit.Result.NO;
    return polkit.Result.NOT_HANDLED;
});
""")


def test_connect_level_acls_as_libvirts_remote_protocol_names_them(system_bus, make_polkitd, make_secretbusd,
                                                                   rpc_dir, test_users, tmp_path):
    """CONNECT_OPEN, GET_TYPE, GET_LIB_VERSION ask org.libvirt.api.connect.getattr and event
    deregistration connect.read, as libvirt's @acl lines say: a user refused getattr cannot even
    open; one refused read registers an event callback but cannot deregister it. With the
    shipped defaults (both "yes") the read-only socket serves a user without any rule."""
    start(system_bus, make_polkitd, make_secretbusd, rpc_dir, rules=[CONNECT_RULES])
    root_define(rpc_dir, tmp_path, OPEN, "open")
    other = client(test_users.other, uri(rpc_dir), ("list_all",))
    assert other["open"] == DENIED and other["steps"] == [], other
    got = client(test_users.member, uri(rpc_dir), ("type",), ("lib_version",), ("list_all",), ("event_cycle",))
    assert got["open"] is None, got
    assert got["steps"][:3] == ["secret", 12001000, [OPEN]], got
    assert got["steps"][3] == {"error": DENIED}, got
    # root is never asked: everything above works for it
    got = client(None, uri(rpc_dir), ("type",), ("event_cycle",))
    assert got["open"] is None and got["steps"] == ["secret", None], got


def test_connect_level_defaults_let_anyone_open_read_only(system_bus, make_polkitd, make_secretbusd, rpc_dir,
                                                          test_users, tmp_path):
    start(system_bus, make_polkitd, make_secretbusd, rpc_dir)
    root_define(rpc_dir, tmp_path, OPEN, "open")
    for user in test_users:
        got = client(user, uri(rpc_dir, ro=True), ("type",), ("lib_version",), ("list_all",), ("event_cycle",))
        assert got["open"] is None and got["steps"] == ["secret", 12001000, [OPEN], None], got


def test_events_reach_a_non_root_client_only_for_secrets_it_may_see(system_bus, make_polkitd, make_secretbusd,
                                                                    rpc_dir, test_users, tmp_path):
    start(system_bus, make_polkitd, make_secretbusd, rpc_dir, rules=[RULES])
    argv = harness.as_user(test_users.member, ["virsh", "-c", uri(rpc_dir), "secret-event", "--event", "lifecycle",
                                               "--loop", "--timeout", "30"])
    ev = EventWatch(argv, env=harness.user_env(test_users.member), cwd="/")
    try:
        time.sleep(3)       # registered (virsh connects, authenticates, registers)
        root_define(rpc_dir, tmp_path, HIDDEN, "hidden")
        root_define(rpc_dir, tmp_path, LATER, "later")
        # Events come in order: once LATER's has come, HIDDEN's would have come before it.
        out, err = ev.until(f"secret {LATER}: Defined")
    finally:
        ev.kill()
    assert f"event 'lifecycle' for secret {LATER}: Defined" in out, (out, err)
    assert HIDDEN not in out and "events received: 1" in out, out


def test_nothing_but_authentication_before_it(system_bus, make_polkitd, make_secretbusd, rpc_dir, test_users):
    """A raw client as each user: AUTH_LIST offers polkit, any other call before AUTH_POLKIT
    is refused as libvirt does, and AUTH_POLKIT decides by the rule."""
    start(system_bus, make_polkitd, make_secretbusd, rpc_dir, rules=[RULES])

    def probe(user, name: str) -> dict:
        r = harness.run_as(user, [DEBIAN_PYTHON, "-c", programs.source("rpc_preauth_probe"), str(rpc_dir / name)])
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    required = [39, 7, "authentication required"]
    assert probe(test_users.member, "virtsecretd-sock") == {
        "auth_list": [2], "open_before_auth": required, "auth_polkit": {"complete": 1}, "open_after_auth": None}
    got = probe(test_users.other, "virtsecretd-sock")
    assert got["auth_list"] == [2] and got["open_before_auth"] == required
    assert got["auth_polkit"][:2] == [94, 60] and got["open_after_auth"] == required
    got = probe(test_users.other, "virtsecretd-sock-ro")       # monitor: yes for anyone
    assert got["auth_polkit"] == {"complete": 1} and got["open_after_auth"] is None
    root = probe(None, "virtsecretd-sock")          # root: nothing to authenticate
    assert root["auth_list"] == [0] and root["open_before_auth"] is None


def test_an_identity_set_by_a_root_peer_is_checked_and_audited(system_bus, make_polkitd, make_secretbusd, rpc_dir,
                                                              test_users, tmp_path):
    """virtqemud's flow with polkit: a root peer acts for a user's process (SET_IDENTITY with its
    pid, start time and uid); the checks are that user's, and the host's token elevates it to
    private values. The audit record names the peer and the identity."""
    sbd = start(system_bus, make_polkitd, make_secretbusd, rpc_dir, rules=[RULES])
    root_define(rpc_dir, tmp_path, PRIVATE, "private", b"luks-pass", private=True)
    root_define(rpc_dir, tmp_path, VISIBLE, "visible", b"visible-value")
    token = (rpc_dir / "common" / "system.token").read_text()
    user_proc = subprocess.Popen(harness.as_user(test_users.member, ["sleep", "60"]), env=harness.user_env(
        test_users.member), cwd="/")
    try:
        def as_identity(uuid: str, tok: str) -> dict:
            r = harness.run_as(None, [DEBIAN_PYTHON, "-c", programs.source("libvirt_set_identity"), uri(rpc_dir),
                                      uuid, tok, f"pid:{user_proc.pid}"], timeout=60)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        assert as_identity(PRIVATE, token) == {"value": b"luks-pass".hex()}
        assert as_identity(PRIVATE, "-")["error"] == [65, 30, "Invalid secret: secret is private"]
        assert as_identity(VISIBLE, token)["error"] == DENIED        # the user may not read-secure it
    finally:
        user_proc.kill()
        user_proc.wait()
    harness.wait_until(lambda: len(audit_records(sbd, PRIVATE)) >= 2 and audit_records(sbd, VISIBLE), timeout=10,
                       what="the audit records of the reads")
    allowed = [r for r in audit_records(sbd, PRIVATE) if r["AUDIT_OUTCOME"] == "allowed"]
    refused = [r for r in audit_records(sbd, PRIVATE) if r["AUDIT_OUTCOME"] == "denied"]
    assert len(allowed) == 1 and len(refused) == 1, audit_records(sbd, PRIVATE)
    who = f"user {test_users.member.name} uid {test_users.member.uid} pid {user_proc.pid}"
    assert allowed[0]["CALLER_UID"] == "0" and allowed[0]["CALLER_IDENTITY"] == f"{who} (elevated)"
    assert refused[0]["AUDIT_REASON"] == "private" and refused[0]["CALLER_IDENTITY"] == who
    (visible,) = audit_records(sbd, VISIBLE)
    assert visible["AUDIT_REASON"] == "access" and visible["CALLER_IDENTITY"] == f"{who} (elevated)"
    assert b"luks-pass".hex() not in sbd.log() and token not in sbd.log()


def many(i: int) -> str:
    return f"7a0f0002-0000-4000-8000-{i:012x}"


def test_a_flooding_user_does_not_stall_root(system_bus, make_polkitd, make_secretbusd, rpc_dir, test_users,
                                             tmp_path):
    """The member floods value reads of 200 secrets (read-secure: one polkit check per secret and
    connection, all denied), a new connection each round, on 4 connections at once; root's
    value reads over RPC meanwhile are decided without polkit and stay fast."""
    sbd = start(system_bus, make_polkitd, make_secretbusd, rpc_dir, rules=[RULES])
    uuids = [many(i) for i in range(200)]
    got = client(None, uri(rpc_dir), *(("define", xml(u, f"many-{i}")) for i, u in enumerate(uuids)),
                 *(("set_value", u, b"v".hex()) for u in uuids[:1]))
    assert got["steps"][:200] == uuids and got["steps"][200] == 0

    def loop(user, mode: str, secs: float, which: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            harness.as_user(user, [DEBIAN_PYTHON, "-c", programs.source("libvirt_loop"), mode, uri(rpc_dir),
                                   str(secs), json.dumps(which)]) if user is not None else
            [DEBIAN_PYTHON, "-c", programs.source("libvirt_loop"), mode, uri(rpc_dir), str(secs), json.dumps(which)],
            env=harness.user_env(user) if user is not None else None, cwd="/", stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)

    floods = [loop(test_users.member, "flood", 9, uuids) for _ in range(4)]
    try:
        time.sleep(2)
        root = loop(None, "latency", 6, uuids[:1])
        out, err = root.communicate(timeout=60)
        assert root.returncode == 0, err
        lat = json.loads(out)
        results = []
        for f in floods:
            fout, ferr = f.communicate(timeout=60)
            assert f.returncode == 0, ferr
            results.append(json.loads(fout))
    finally:
        for p in floods:
            if p.poll() is None:
                p.kill()
                p.wait()
    calls = sum(r["calls"] for r in results)
    assert calls > 400 and all(set(r["errors"]) == {"88"} for r in results), results     # every one denied
    # Generous: a loaded 2-core machine; without the fair slots and root's shortcut root
    # would wait behind thousands of polkit checks.
    assert lat["calls"] > 50 and lat["max"] < 2.0 and lat["p50"] < 0.2, lat
    print(f"\nflood: {calls} denied value reads by uid {test_users.member.uid} in 9 s on 4 connections; "
          f"root meanwhile: {lat['calls']} reads, p50 {lat['p50'] * 1000:.1f} ms, max {lat['max'] * 1000:.1f} ms")
    tables = table_sizes(sbd)
    assert tables["rpc_processes"] == 0 and tables["decision_senders"] == 0, tables


def test_a_rules_change_reaches_an_open_rpc_connection(system_bus, make_polkitd, make_secretbusd, rpc_dir,
                                                       test_users, tmp_path):
    """One decision cache for both front ends, emptied when polkitd reloads: a connection that
    stays open is decided afresh by the new rules, both ways."""
    pk = make_polkitd(system_bus, actions=[API_ACTIONS, UNIX_ACTIONS], rules=[RULES])
    sbd = make_secretbusd(system_bus, system=True, args=("--rpc-dir", str(rpc_dir)))
    root_define(rpc_dir, tmp_path, OPEN, "open", b"open-value")
    repl = subprocess.Popen(harness.as_user(test_users.member, [DEBIAN_PYTHON, "-c", programs.source("libvirt_repl"),
                                                                uri(rpc_dir)]),
                            env=harness.user_env(test_users.member), cwd="/", stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "pid" in json.loads(repl.stdout.readline())

        def ask(*cmd) -> object:
            repl.stdin.write(json.dumps(list(cmd)) + "\n")
            repl.stdin.flush()
            return json.loads(repl.stdout.readline())

        assert ask("value", OPEN) == b"open-value".hex()
        assert ask("value", OPEN) == b"open-value".hex()          # cached for this connection
        deny = pk.add_files(rules=[("40-sbtest-rpc-deny.rules", f"""
polkit.addRule(function(action, subject) {{
    if (action.id == "org.libvirt.api.secret.read-secure" && action.lookup("secret_uuid") == "{OPEN}")
        return polkit.Result.NO;
}});
""")]).install()
        try:
            harness.wait_until(lambda: ask("value", OPEN) == {"error": DENIED}, timeout=10, interval=0.1,
                               what="the new rule reaching the open RPC connection")
            assert "polkit rules or actions changed" in sbd.log()
        finally:
            deny.uninstall()
        harness.wait_until(lambda: ask("value", OPEN) == b"open-value".hex(), timeout=10, interval=0.1,
                           what="the removed rule reaching the open RPC connection")
    finally:
        repl.stdin.close()
        try:
            repl.wait(timeout=10)
        except subprocess.TimeoutExpired:
            repl.kill()
            repl.wait()

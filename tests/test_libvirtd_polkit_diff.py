"""Differential test of polkit-gated access: Debian 12's libvirtd 9.0 (only its secret driver,
`auth_unix_rw = auth_unix_ro = "polkit"`, `access_drivers = [ "polkit" ]`) and secretbusd
(the system instance, RPC and D-Bus) ask the same real polkitd, on one private system-type
bus, with one rules file. python3-libvirt runs as the test users through setpriv
(`sbtest-member`, group libvirt; `sbtest-other`, no group) and makes the same calls on each
server; every answer (result, or the error's code, domain and message) is compared.

Root defines the same secrets on both first (uid 0 needs no rule: polkit authorises it
without running the rules). Values are compared by length and SHA-256 only.

A case whose answers differ is in TRIAGE: deliberate (the row of docs/libvirt-differences.md
that says so; asserting ours and libvirt's answer, so that a change on either side shows), or
in XFAIL: a bug not fixed yet, asserting libvirt's answer (strict). What differs, all on purpose:
row 9 (a vTPM secret's usage reaches the rules as secret_usage_name; libvirt passes none),
row 14 (a redefine is also checked against the existing definition, so the member can neither
turn a volume secret, even one it may not see, into "its" ceph secret, nor make a secret
ephemeral without `delete`), with what those redefines leave behind on libvirtd, and row 15
(SET_IDENTITY from root peers only: on libvirtd a member granted connect.write names pid 1 as
its identity and then passes every check as root); unclear: the wording of that SET_IDENTITY
refusal. Everything
else is answered alike: authentication (manage/monitor), every per-secret check and detail
(volume path, ceph, tls name, iscsi target, uuid), list filtering, the read-only refusals,
the private-value refusal, event filtering, and the connection-level checks libvirt makes
(connect.getattr at open, connect.read at event deregistration, search-secrets for lists and
event registration), which secretbusd makes too (polkit/README.md; row 15's last sentence,
"not asked", predates that).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import harness
import pytest
from harness import programs, reference
from harness.polkit import POLKITD
from harness.procs import remove_tree

pytestmark = pytest.mark.integration     # root: libvirtd, polkitd and setpriv
bench_rpc = harness.load_bench("bench_rpc")
REPO = Path(__file__).resolve().parents[1]
DEBIAN_PYTHON = "/usr/bin/python3"
BUS_CONF = REPO / "dbus" / "org.libvirt.secret.conf"
# One declaration of each action for polkitd (libvirt's ids, texts and defaults): the same
# files serve both servers.
ACTIONS = [(f"sbtest-pkdiff.{name}", (REPO / "polkit" / name).read_text())
           for name in ("org.libvirt.api.secret.policy", "org.libvirt.unix.policy")]
LIBVIRTD_CONF = ['unix_sock_rw_perms = "0777"', 'unix_sock_ro_perms = "0777"', 'auth_unix_rw = "polkit"',
                 'auth_unix_ro = "polkit"', 'access_drivers = [ "polkit" ]']


def _u(i: int) -> str:
    return f"7a0fd1ff-0000-4000-8000-{i:012x}"


(VOL_A, VOL_B, HIDDEN, CEPH, NOREAD, PRIV, VTPM, TLS, REDEF, EPH, NEW, NEWVOL, NEW_RO, TLS_OK,
 ISCSI_OK) = (_u(i) for i in range(1, 16))
EV_VIS, EV_HID, SENTINEL = _u(0x20), _u(0x21), _u(0x22)
MISSING = _u(0xff)
IMAGES = "/var/lib/images/"

RULES = ("50-sbtest-pkdiff.rules", """
polkit.addRule(function(action, subject) {
    if (action.id.indexOf("org.libvirt.") != 0)
        return polkit.Result.NOT_HANDLED;
    var member = subject.isInGroup("libvirt");
    var uuid = action.lookup("secret_uuid");
    var vol = action.lookup("secret_usage_volume");
    var ceph = action.lookup("secret_usage_ceph");
    var name = action.lookup("secret_usage_name");
    var target = action.lookup("secret_usage_target");
    switch (action.id) {
    case "org.libvirt.unix.manage":
        return member ? polkit.Result.YES : polkit.Result.NOT_HANDLED;
    case "org.libvirt.unix.monitor":
        return polkit.Result.YES;
    case "org.libvirt.api.connect.search-secrets":
        return action.lookup("connect_driver") == "secret" ? polkit.Result.YES : polkit.Result.NO;
    case "org.libvirt.api.secret.getattr":
        if ((vol && vol.indexOf("IMAGES") == 0) || ceph || uuid == "VTPM" || name == "tls-ok" ||
                target == "iqn.2026-12.test:ok")
            return polkit.Result.YES;
        return polkit.Result.NO;
    case "org.libvirt.api.secret.read":
        return (vol || ceph || name || target) && ceph != "client.noread" ? polkit.Result.YES : polkit.Result.NO;
    case "org.libvirt.api.secret.read-secure":
        return member && (uuid == "VOL_A" || uuid == "PRIV") ? polkit.Result.YES : polkit.Result.NO;
    case "org.libvirt.api.secret.write":
    case "org.libvirt.api.secret.save":
        return member && ceph ? polkit.Result.YES : polkit.Result.NO;
    case "org.libvirt.api.secret.delete":
        return polkit.Result.NO;
    }
    return polkit.Result.NOT_HANDLED;
});
""".replace("IMAGES", IMAGES).replace('"VTPM"', f'"{VTPM}"').replace('"VOL_A"', f'"{VOL_A}"')
          .replace('"PRIV"', f'"{PRIV}"'))


def xml(uuid: str, kind: str, usage: str, *, private: bool = False, ephemeral: bool = False) -> str:
    inner = {"volume": f"<volume>{usage}</volume>", "ceph": f"<name>{usage}</name>",
             "iscsi": f"<target>{usage}</target>", "tls": f"<name>{usage}</name>",
             "vtpm": f"<name>{usage}</name>"}[kind]
    return (f"<secret ephemeral='{'yes' if ephemeral else 'no'}' private='{'yes' if private else 'no'}'>"
            f"<uuid>{uuid}</uuid><usage type='{kind}'>{inner}</usage></secret>")


# uuid: (type, usage id, private); every one gets a value
SECRETS = {
    VOL_A: ("volume", IMAGES + "a.img", False),     # visible; member may read its value
    VOL_B: ("volume", IMAGES + "b.img", False),     # visible; no value access
    HIDDEN: ("volume", "/srv/hidden/h.img", False),  # getattr refused
    CEPH: ("ceph", "client.admin secret", False),   # visible; member may write and save it
    NOREAD: ("ceph", "client.noread", False),       # visible; read (XMLDesc) refused
    PRIV: ("volume", IMAGES + "p.img", True),       # private; member may read-secure it
    VTPM: ("vtpm", "vtpm-ok", False),               # visible by its uuid; read needs a usage detail
    TLS: ("tls", "tls-hidden", False),              # getattr refused
    TLS_OK: ("tls", "tls-ok", False),               # visible by its secret_usage_name
    ISCSI_OK: ("iscsi", "iqn.2026-12.test:ok", False),  # visible by its secret_usage_target
    REDEF: ("volume", IMAGES + "r.img", False),     # member redefines it as ceph of the same id
    EPH: ("ceph", "client.eph", False),             # member redefines it ephemeral
}
USAGE_TYPE = {"volume": 1, "ceph": 2, "iscsi": 3, "tls": 4, "vtpm": 5}


def value_of(uuid: str) -> bytes:
    return f"value-of-{uuid[-2:]}".encode()


def S(label: str, *step: Any) -> tuple[str, list[Any]]:
    return label, list(step)


READS = [
    S("num", "num"), S("list", "list"), S("list_all", "list_all"),
    S("lookup_vol_a", "lookup", VOL_A), S("lookup_hidden", "lookup", HIDDEN), S("lookup_tls", "lookup", TLS),
    S("lookup_vtpm", "lookup", VTPM), S("lookup_missing", "lookup", MISSING),
    S("usage_vol_a", "lookup_usage", 1, IMAGES + "a.img"), S("usage_hidden", "lookup_usage", 1, "/srv/hidden/h.img"),
    S("usage_ceph", "lookup_usage", 2, "client.admin secret"), S("usage_tls", "lookup_usage", 4, "tls-hidden"),
    S("usage_vtpm", "lookup_usage", 5, "vtpm-ok"), S("usage_tls_ok", "lookup_usage", 4, "tls-ok"),
    S("usage_iscsi_ok", "lookup_usage", 3, "iqn.2026-12.test:ok"),
    S("usage_missing", "lookup_usage", 1, "/nonexistent"),
    S("xml_vol_a", "xml", VOL_A), S("xml_ceph", "xml", CEPH), S("xml_noread", "xml", NOREAD),
    S("xml_vtpm", "xml", VTPM), S("xml_tls_ok", "xml", TLS_OK), S("xml_iscsi_ok", "xml", ISCSI_OK),
    S("xml_hidden", "xml", HIDDEN),
    S("value_vol_a", "value", VOL_A), S("value_vol_b", "value", VOL_B), S("value_priv", "value", PRIV),
    S("value_ceph", "value", CEPH), S("value_hidden", "value", HIDDEN),
]
WRITES = [
    S("set_value_ceph", "set_value", CEPH, b"member-set".hex()),
    S("set_value_vol_a", "set_value", VOL_A, b"member-set".hex()),
    S("set_value_hidden", "set_value", HIDDEN, b"member-set".hex()),
    S("undefine_vol_b", "undefine", VOL_B), S("undefine_ceph", "undefine", CEPH),
    S("undefine_hidden", "undefine", HIDDEN),
    S("define_new_ceph", "define", xml(NEW, "ceph", "client.new")),
    S("define_new_volume", "define", xml(NEWVOL, "volume", IMAGES + "new.img")),
    S("redefine_ceph_same", "define", xml(CEPH, "ceph", "client.admin secret")),
    S("redefine_volume_as_ceph", "define", xml(REDEF, "ceph", IMAGES + "r.img")),
    S("redefine_ceph_ephemeral", "define", xml(EPH, "ceph", "client.eph", ephemeral=True)),
    S("redefine_hidden_as_ceph", "define", xml(HIDDEN, "ceph", "/srv/hidden/h.img")),
    S("list_all_after", "list_all"),
    S("set_identity_self", "set_identity", "self"),
]
RO_STEPS = [
    S("num", "num"), S("list_all", "list_all"), S("lookup_vol_a", "lookup", VOL_A),
    S("lookup_hidden", "lookup", HIDDEN), S("xml_vol_a", "xml", VOL_A), S("xml_noread", "xml", NOREAD),
    S("value_vol_a", "value", VOL_A), S("set_value_ceph", "set_value", CEPH, b"ro-set".hex()),
    S("define_new", "define", xml(NEW_RO, "ceph", "client.new-ro")), S("undefine_ceph", "undefine", CEPH),
]
# Root afterwards: what the member's writes did.
ROOT_AFTER = [
    S("list_all", "list_all"), S("xml_redef", "xml", REDEF), S("xml_eph", "xml", EPH), S("xml_hidden", "xml", HIDDEN),
    S("value_ceph", "value", CEPH), S("value_eph", "value", EPH), S("value_vol_a", "value", VOL_A),
]
EVENT_TRIGGER = [
    ["define", xml(EV_VIS, "volume", IMAGES + "ev.img")], ["define", xml(EV_HID, "volume", "/srv/hidden/ev.img")],
    ["set_value", EV_VIS, b"ev".hex()], ["set_value", EV_HID, b"ev".hex()],
    ["undefine", EV_VIS], ["undefine", EV_HID], ["define", xml(SENTINEL, "volume", IMAGES + "sentinel.img")],
]
SCENARIOS: list[tuple[str, str, str, list[tuple[str, list[Any]]]]] = [
    # name, user ("member" | "other"), how it connects ("rw": the rw socket; "ro": the read-only
    # socket; "rw+ro": openReadOnly, i.e. CONNECT_OPEN flag 1, on the rw socket), steps
    # (read-only ones first: the member's redefines below change what libvirtd then shows)
    ("member_ro", "member", "ro", RO_STEPS),
    ("other_rw", "other", "rw", [S("list_all", "list_all")]),
    ("other_ro", "other", "ro", RO_STEPS),
    ("member_rw_flag_ro", "member", "rw+ro", RO_STEPS),
    ("other_rw_flag_ro", "other", "rw+ro", [S("list_all", "list_all")]),
    ("member_rw", "member", "rw", READS + WRITES),
]
# Later phases: a rules file of higher priority (40-) installed while both servers run (polkitd
# reloads it; secretbusd drops its cached decisions on polkitd's Changed signal), for the
# connection-level actions. phase: (rules, probe (user, action, details, authorized while
# installed), scenarios)
PHASES: dict[str, tuple[str, tuple[str, str, str, bool], list[Any]]] = {
    "connect_acls": ("""
polkit.addRule(function(action, subject) {
    if (action.id == "org.libvirt.api.connect.getattr" && subject.isInGroup("libvirt"))
        return polkit.Result.NO;
    if (action.id == "org.libvirt.api.connect.read" && !subject.isInGroup("libvirt"))
        return polkit.Result.NO;
    return polkit.Result.NOT_HANDLED;
});
""", ("member", "org.libvirt.api.connect.getattr", "{}", False), [
        ("member_rw", "member", "rw", [S("list_all", "list_all"), S("lookup_vol_a", "lookup", VOL_A)]),
        ("other_ro", "other", "ro", [S("list_all", "list_all"), S("event_cycle", "event_cycle")]),
    ]),
    "no_search_identity": ("""
polkit.addRule(function(action, subject) {
    if (action.id == "org.libvirt.api.connect.search-secrets" && !subject.isInGroup("libvirt"))
        return polkit.Result.NO;
    if (action.id == "org.libvirt.api.connect.write" && subject.isInGroup("libvirt"))
        return polkit.Result.YES;
    return polkit.Result.NOT_HANDLED;
});
""", ("other", "org.libvirt.api.connect.search-secrets", "{'connect_driver': 'secret'}", False), [
        # with connect.write, the member names pid 1 (root's) as its connection's identity
        ("member_rw", "member", "rw", [S("set_identity_pid1", "set_identity", "1"), S("value_vol_b", "value", VOL_B),
                                       S("lookup_hidden", "lookup", HIDDEN)]),
        ("other_ro", "other", "ro", [S("num", "num"), S("list", "list"), S("list_all", "list_all"),
                                     S("event_cycle", "event_cycle"), S("lookup_vol_a", "lookup", VOL_A)]),
    ]),
}


def _case_names(scenarios: list[Any], prefix: str = "") -> list[str]:
    return [f"{prefix}{name}:{label}" for name, _, _, steps in scenarios for label, _ in [("open", None), *steps]]


CASES = (_case_names(SCENARIOS) + [f"root_after:{label}" for label, _ in ROOT_AFTER]
         + ["events:member_rw", "events:other_ro"]
         + [c for phase, (_, _, scen) in PHASES.items() for c in _case_names(scen, f"{phase}/")])


def _missing() -> str | None:
    why = reference.missing_libvirtd()
    if why:
        return why
    if not Path(POLKITD).exists():
        return f"polkitd ({POLKITD}) not installed"
    if not Path(DEBIAN_PYTHON).exists() or subprocess.run([DEBIAN_PYTHON, "-c", "import libvirt"],
                                                           capture_output=True).returncode != 0:
        return "python3-libvirt not installed"
    if shutil.which("setpriv") is None or shutil.which("dbus-daemon") is None:
        return "setpriv or dbus-daemon missing"
    return None


def client(user: Any, uri: str, steps: list[list[Any]]) -> dict[str, Any]:
    r = harness.run_as(user, [DEBIAN_PYTHON, "-c", programs.source("libvirt_polkit_client"), uri,
                              json.dumps(steps)], timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def listener(user: Any, uri: str) -> subprocess.Popen:
    argv = [DEBIAN_PYTHON, "-c", programs.source("libvirt_polkit_client"), uri,
            json.dumps([["events", SENTINEL, 15]])]
    p = subprocess.Popen(harness.as_user(user, argv), env=harness.user_env(user), cwd="/", stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    line = p.stdout.readline()
    assert json.loads(line or "{}").get("ready") is True, (line, p.stderr.read() if p.poll() is not None else "")
    return p


def run_scenarios(uri: str, ro_uri: str, who: dict[str, Any], scenarios: list[Any],
                  prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, user, how, steps in scenarios:
        got = client(who[user], {"rw": uri, "ro": ro_uri, "rw+ro": f"readonly:{uri}"}[how], [s for _, s in steps])
        out[f"{prefix}{name}:open"] = got["open"]
        results = got["steps"] if got["open"] is None else [{"not_run": "open failed"}] * len(steps)
        assert len(results) == len(steps), got
        for (label, _), result in zip(steps, results, strict=True):
            out[f"{prefix}{name}:{label}"] = result
    return out


def run_server(uri: str, ro_uri: str, who: dict[str, Any]) -> dict[str, Any]:
    """Every scenario of the first phase on one server: {case: result}."""
    setup = [["define", xml(u, kind, usage, private=private)] for u, (kind, usage, private) in SECRETS.items()]
    setup += [["set_value", u, value_of(u).hex()] for u in SECRETS]
    got = client(None, uri, setup)
    assert got["open"] is None and got["steps"] == list(SECRETS) + [0] * len(SECRETS), got
    out = run_scenarios(uri, ro_uri, who, SCENARIOS)
    got = client(None, uri, [s for _, s in ROOT_AFTER])
    for (label, _), result in zip(ROOT_AFTER, got["steps"], strict=True):
        out[f"root_after:{label}"] = result
    listeners = {"events:member_rw": listener(who["member"], uri), "events:other_ro": listener(who["other"], ro_uri)}
    try:
        got = client(None, uri, EVENT_TRIGGER)
        assert got["steps"] == [EV_VIS, EV_HID, 0, 0, 0, 0, SENTINEL], got
        for case, p in listeners.items():
            stdout, stderr = p.communicate(timeout=30)
            assert p.returncode == 0, stderr[-3000:]
            res = json.loads(stdout)
            out[case] = res if res["open"] else res["steps"][0]
    finally:
        for p in listeners.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def polkit_says(bus: Any, user: Any, action: str, details: str) -> bool:
    """polkitd's answer for a process of `user` (asked by root: only root may pass details)."""
    proc = subprocess.Popen(harness.as_user(user, ["sleep", "30"]), env=harness.user_env(user), cwd="/")
    try:
        r = harness.run_as(None, harness.check_authorization_argv(bus.address, action, pid=proc.pid,
                                                                 details=details))
    finally:
        proc.kill()
        proc.wait()
    assert r.returncode == 0, r.stderr
    return harness.parse_check_result(r.stdout)[0]


def cache_empty(sbd: Any) -> bool:
    """SIGUSR1: secretbusd logs its per-caller tables; True when it holds no decision."""
    before = sbd.log().count("tables:")
    sbd.signal(signal.SIGUSR1)
    harness.wait_until(lambda: sbd.log().count("tables:") > before, timeout=10, what="the tables log line",
                       proc=sbd.proc, log=sbd.log_path)
    tables = dict(re.findall(r"(\w+)=(\d+)", sbd.log().split("tables:")[-1].splitlines()[0]))
    return tables["decisions"] == "0" and tables["uid_decisions"] == "0"


def rules_changed(sbd: Any, bus: Any, probe: tuple[Any, str, str, bool], install: Callable[[], Any]) -> Any:
    """Run `install` (a rules change); return once polkitd answers `probe` as the new rules say
    and secretbusd holds no decision cached before (it empties its cache on polkitd's Changed,
    and no call reaches it meanwhile)."""
    user, action, details, authorized = probe
    result = install()
    harness.wait_until(lambda: polkit_says(bus, user, action, details) == authorized, timeout=10, interval=0.1,
                       what=f"polkitd answering {action} by the new rules")
    harness.wait_until(lambda: cache_empty(sbd), timeout=10, interval=0.1,
                       what="secretbusd dropping its cached decisions", log=sbd.log_path)
    return result


@pytest.fixture(scope="module")
def runs():
    why = _missing()
    if why:
        pytest.skip(why)
    users = harness.UserPair(harness.ensure_user("sbtest-member", ["libvirt"]), harness.ensure_user("sbtest-other"))
    work = harness.public_tempdir("sb-pkdiff-")
    procs = bench_rpc.Procs()
    bus = pk = sbd = None
    rpc_dir = work / "sb-sock"
    try:
        bus = harness.PrivateBus("system", policy_files=[BUS_CONF]).start()
        pk = harness.Polkitd(bus, actions=ACTIONS, rules=[RULES]).start()
        lv = reference.start_libvirtd_on_bus(procs, work / "l", bus.socket_path, LIBVIRTD_CONF)
        rpc_dir.mkdir(mode=0o755)
        sbd = harness.Secretbusd(bus, system=True, args=("--rpc-dir", str(rpc_dir))).start()
        # the daemon runs this checkout's code (its PYTHONPATH starts here)
        assert sbd.proc is not None
        environ = dict(e.partition("=")[::2] for e in Path(f"/proc/{sbd.proc.pid}/environ").read_text().split("\0"))
        assert environ["PYTHONPATH"].split(":")[0] == str(REPO), environ.get("PYTHONPATH")
        who = {"member": users.member, "other": users.other}
        uris = {"libvirtd": (lv.uri, lv.uri + "-ro"),
                "secretbusd": (f"secret:///system?socket={rpc_dir}/virtsecretd-sock",
                               f"secret:///system?socket={rpc_dir}/virtsecretd-sock-ro")}
        out = {name: run_server(*u, who) for name, u in uris.items()}
        for phase, (rules, (user, action, details, authorized), scenarios) in PHASES.items():
            probe = (who[user], action, details, authorized)
            files = rules_changed(sbd, bus, probe, pk.add_files(rules=[(f"40-sbtest-pkdiff-{phase}.rules",
                                                                            rules)]).install)
            try:
                for name, u in uris.items():
                    out[name].update(run_scenarios(*u, who, scenarios, f"{phase}/"))
            finally:
                rules_changed(sbd, bus, (*probe[:3], not authorized), files.uninstall)
        for log in (sbd.log(), (work / "l" / "libvirtd.log").read_text(errors="replace")):
            for uuid in SECRETS:
                assert value_of(uuid).decode() not in log and value_of(uuid).hex() not in log
        yield SimpleNamespace(lv=out["libvirtd"], sb=out["secretbusd"], pk=pk)
    finally:
        if sbd is not None:
            sbd.cleanup()
        procs.stop_all()
        if pk is not None:
            pk.stop()
        if bus is not None:
            bus.stop()
        remove_tree(work)


DENIED = [88, 55, "access denied: 'secret' denied access"]


def digest(value: bytes) -> dict[str, Any]:
    return {"len": len(value), "sha256": hashlib.sha256(value).hexdigest()}


def test_libvirtd_asks_the_private_polkitd_with_these_rules(runs):
    """The oracle is really gated by the rules (not auth none, not the no-op access driver):
    grants and refusals by action and detail, as the rules file says."""
    lv = runs.lv
    assert lv["other_rw:open"][:2] == [94, 60] and "org.libvirt.unix.manage" in lv["other_rw:open"][2]
    assert lv["member_rw:open"] is None and lv["other_ro:open"] is None
    assert lv["member_rw:lookup_hidden"] == {"error": DENIED} and lv["member_rw:lookup_vol_a"] == VOL_A
    assert lv["member_rw:value_vol_a"] == digest(value_of(VOL_A))
    assert lv["member_rw:value_vol_b"] == {"error": DENIED}
    assert lv["member_rw:define_new_ceph"] == NEW and lv["member_rw:define_new_volume"] == {"error": DENIED}
    assert HIDDEN not in lv["member_rw:list_all"] and VOL_A in lv["member_rw:list_all"]
    # the usage details reach the rules: volume path prefix, ceph, tls name, iscsi target
    assert lv["member_rw:xml_vol_a"] == formatted(VOL_A, "volume", IMAGES + "a.img")
    assert lv["member_rw:usage_tls_ok"] == TLS_OK and lv["member_rw:usage_iscsi_ok"] == ISCSI_OK
    assert lv["member_rw:usage_tls"] == {"error": DENIED} and lv["member_rw:xml_noread"] == {"error": DENIED}
    assert lv["member_ro:value_vol_a"]["error"][0] == 29     # read-only socket: no values


# -- the triage --------------------------------------------------------------------------------
# A checker gets (libvirtd's results, secretbusd's results, case name); every other case must be
# answered alike. Each asserts libvirtd's answer too: a change on either side shows.
Checker = Callable[[dict[str, Any], dict[str, Any], str], None]
ELEMENT = {"volume": "volume", "ceph": "name", "iscsi": "target", "tls": "name", "vtpm": "name"}


def formatted(uuid: str, kind: str, usage: str, *, ephemeral: bool = False) -> str:
    """GetXMLDesc's text of a secret (libvirt's format, which both servers produce)."""
    el = ELEMENT[kind]
    return (f"<secret ephemeral='{'yes' if ephemeral else 'no'}' private='no'>\n  <uuid>{uuid}</uuid>\n"
            f"  <usage type='{kind}'>\n    <{el}>{usage}</{el}>\n  </usage>\n</secret>\n")


def _vtpm_usage_name(lv, sb, case):
    # Row 9: libvirt passes no usage detail for a vTPM secret, so a rule keyed on the usage
    # (here: read needs one) refuses it; secretbus passes secret_usage_name.
    assert lv[case] == {"error": DENIED}
    assert sb[case] == formatted(VTPM, "vtpm", "vtpm-ok")


def _redefine_checked_on_the_old_definition(uuid: str) -> Checker:
    # Row 14: libvirt checks write and save on the new definition only (a ceph usage, which the
    # rules grant), so the member redefines a volume secret it may not write (REDEF), one it may
    # not even see (HIDDEN), or turns a ceph secret ephemeral without delete (EPH). secretbus
    # checks write and save on the existing definition too, and delete when it turns ephemeral.
    def check(lv, sb, case):
        assert lv[case] == uuid
        assert sb[case] == {"error": DENIED}
    return check


def _hidden_taken_over(lv, sb, case):
    # Row 14's consequence: on libvirtd HIDDEN is now the member's ceph secret, so it lists it.
    assert HIDDEN not in sb[case] and NEW in sb[case]
    assert lv[case] == sorted([*sb[case], HIDDEN])


def _root_sees(uuid: str, kind_lv: str, usage_lv: str, kind_sb: str, usage_sb: str, *,
               ephemeral_lv: bool = False) -> Checker:
    # Row 14's consequence, as root reads it: libvirtd holds the member's redefinition,
    # secretbusd the definition root made.
    def check(lv, sb, case):
        assert lv[case] == formatted(uuid, kind_lv, usage_lv, ephemeral=ephemeral_lv)
        assert sb[case] == formatted(uuid, kind_sb, usage_sb)
    return check


ROOT_PEERS_ONLY = [88, 55, "access denied: only a root peer may set the identity of a connection"]


def _set_identity_wording(lv, sb, case):
    # Unclear (documented nowhere): both refuse a non-root peer's SET_IDENTITY with 88/55, libvirt
    # because connect.write defaults to no (so a rule could grant it), secretbus because only
    # root peers may (row 15), and its message says so instead of libvirt's "'secret' denied
    # access". Asserting both.
    assert lv[case] == {"error": DENIED}
    assert sb[case] == {"error": ROOT_PEERS_ONLY}


def _identity_root_peers_only(lv, sb, case):
    # Row 15: libvirt lets any rw client that a rule grants connect.write name any identity, here
    # pid 1's (root), and then asks polkit about that process; secretbus takes SET_IDENTITY from
    # root peers only.
    assert lv[case] == "set"
    assert sb[case] == {"error": ROOT_PEERS_ONLY}


def _as_root_after_set_identity(expected_lv: Any) -> Checker:
    # Row 15's consequence: as "pid 1" the member passes every check on libvirtd (polkit
    # authorises root), reading a value and seeing a secret the rules refuse it.
    def check(lv, sb, case):
        assert lv[case] == expected_lv
        assert sb[case] == {"error": DENIED}
    return check


TRIAGE: dict[str, Checker] = {
    "member_rw:set_identity_self": _set_identity_wording,
    "no_search_identity/member_rw:set_identity_pid1": _identity_root_peers_only,
    "no_search_identity/member_rw:value_vol_b": _as_root_after_set_identity(digest(value_of(VOL_B))),
    "no_search_identity/member_rw:lookup_hidden": _as_root_after_set_identity(HIDDEN),
    "member_rw:xml_vtpm": _vtpm_usage_name,
    "member_rw:redefine_volume_as_ceph": _redefine_checked_on_the_old_definition(REDEF),
    "member_rw:redefine_ceph_ephemeral": _redefine_checked_on_the_old_definition(EPH),
    "member_rw:redefine_hidden_as_ceph": _redefine_checked_on_the_old_definition(HIDDEN),
    "member_rw:list_all_after": _hidden_taken_over,
    "connect_acls/other_ro:list_all": _hidden_taken_over,
    "root_after:xml_redef": _root_sees(REDEF, "ceph", IMAGES + "r.img", "volume", IMAGES + "r.img"),
    "root_after:xml_eph": _root_sees(EPH, "ceph", "client.eph", "ceph", "client.eph", ephemeral_lv=True),
    "root_after:xml_hidden": _root_sees(HIDDEN, "ceph", "/srv/hidden/h.img", "volume", "/srv/hidden/h.img"),
}
# Bugs not fixed yet: case -> why (asserting libvirt's answer, strict).
XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=XFAIL[c]))
                                  if c in XFAIL else c for c in CASES])
def test_same_answer(runs, case):
    lv, sb = runs.lv, runs.sb
    if case in TRIAGE:
        TRIAGE[case](lv, sb, case)
        return
    assert sb[case] == lv[case], (lv[case], sb[case])


def test_every_triaged_case_exists():
    assert set(TRIAGE) <= set(CASES) and set(XFAIL) <= set(CASES) and not set(TRIAGE) & set(XFAIL)

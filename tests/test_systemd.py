"""systemd integration: the units, the install layout, and the daemon run the way systemd
runs it — with real systemd-analyze, systemd-creds, dbus-daemon, polkitd and busctl.

Units are tested as installed: `scripts/install.sh DESTDIR=<tmp> PREFIX=/usr BINDIR=<this
venv's bin>` writes them with ExecStart= naming this venv's `secretbusd`/`secretbus` (the repo
copies name /usr/bin, which `systemd-analyze verify` would reject as not executable here).
`verify` puts each unit file's directory on its search path, so the Requires= between the
two system units resolves inside DESTDIR.

Without systemd as PID 1, the tests do its part themselves: the init unit's ExecStart seals a
key with `systemd-creds` and a private host key (SYSTEMD_CREDENTIAL_SECRET), the credential is
decrypted with `systemd-creds decrypt` into a 0700 CREDENTIALS_DIRECTORY as
LoadCredentialEncrypted= does, NOTIFY_SOCKET is a harness socket, the environment is
systemd's clean one, and ExecStart= is the unit's own line plus `--root` and `--bus-address`
for a private store and bus. The system instance talks to a real polkitd (which authorises
root, the caller here). The `sandboxed` variants also apply the unit's hardening with the
kernel mechanisms systemd uses (tests/systemd_sandbox.py: namespaces, read-only mounts,
procfs subset, no capabilities, seccomp filters).
"""
from __future__ import annotations

import base64
import configparser
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import harness
import pytest
import systemd_sandbox
from harness import activate, busctl
from harness.journal import JournalSocket

from secretbus.bus.names import BUS_NAME, CONNECT_PATH, secret_path
from secretbus.rpc.server import RO_UNIT_NAMES, RW_UNIT_NAMES, SYSTEM_DIR, socket_plan
from secretbus.store.keys import CREDENTIAL_NAME, SEALED_KEY_PATH
from secretbus.store.paths import InstancePaths

REPO = Path(__file__).resolve().parents[1]
SANDBOX = Path(__file__).with_name("systemd_sandbox.py")
BINDIR = Path(sysconfig.get_path("scripts"))   # this venv's console scripts
SYSTEM_UNIT, INIT_UNIT = "secretbusd.service", "secretbusd-init-encryption.service"
RW_SOCKET_UNIT, RO_SOCKET_UNIT = "secretbusd.socket", "secretbusd-ro.socket"
SYSTEM_UNITS = (SYSTEM_UNIT, INIT_UNIT, RW_SOCKET_UNIT, RO_SOCKET_UNIT)
LIBVIRT_SECRET_UNITS = {"virtsecretd.service", "virtsecretd.socket", "virtsecretd-ro.socket",
                        "virtsecretd-admin.socket"}
MAX_EXPOSURE = 2.0
CONNECT_IFACE, SECRET_IFACE = "org.libvirt.Connect", "org.libvirt.Secret"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not shutil.which("systemd-analyze") or not shutil.which("systemd-creds"),
                       reason="needs systemd-analyze and systemd-creds"),
]


# -- install ----------------------------------------------------------------------------------
@dataclass
class Installed:
    destdir: Path

    def path(self, p: str | Path) -> Path:
        return self.destdir / str(p).lstrip("/")

    @property
    def unitdir(self) -> Path:
        return self.path("/usr/lib/systemd/system")

    @property
    def userunitdir(self) -> Path:
        return self.path("/usr/lib/systemd/user")

    def unit(self, name: str) -> dict:
        return systemd_sandbox.service(systemd_sandbox.parse_unit(self.unitdir / name))


def run_install(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    for k in ("DESTDIR", "PREFIX", "BINDIR", "DATADIR"):   # only what the test passes
        env.pop(k, None)
    return subprocess.run(["bash", str(REPO / "scripts/install.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    for cmd in ("secretbusd", "secretbus"):
        if not (BINDIR / cmd).is_file():
            pytest.fail(f"{BINDIR / cmd} missing: install the package into this venv "
                        f"({sys.executable} -m pip install -e {REPO})")
    destdir = tmp_path_factory.mktemp("destdir")
    r = run_install(f"DESTDIR={destdir}", "PREFIX=/usr", f"BINDIR={BINDIR}")
    assert r.returncode == 0, r.stderr
    return Installed(destdir)


EXPECTED_FILES = {
    "dbus/org.libvirt.secret.conf": "/usr/share/dbus-1/system.d/org.libvirt.secret.conf",
    "dbus/system-services/org.libvirt.secret.service": "/usr/share/dbus-1/system-services/org.libvirt.secret.service",
    "dbus/services/org.libvirt.secret.service": "/usr/share/dbus-1/services/org.libvirt.secret.service",
    "dbus/interfaces/org.libvirt.Connect.xml": "/usr/share/dbus-1/interfaces/org.libvirt.Connect.xml",
    "dbus/interfaces/org.libvirt.Secret.xml": "/usr/share/dbus-1/interfaces/org.libvirt.Secret.xml",
    "systemd/secretbusd.service": "/usr/lib/systemd/system/secretbusd.service",
    "systemd/secretbusd-init-encryption.service": "/usr/lib/systemd/system/secretbusd-init-encryption.service",
    "systemd/secretbusd.socket": "/usr/lib/systemd/system/secretbusd.socket",
    "systemd/secretbusd-ro.socket": "/usr/lib/systemd/system/secretbusd-ro.socket",
    "systemd/user/secretbusd.service": "/usr/lib/systemd/user/secretbusd.service",
    "systemd/user/secretbusd.socket": "/usr/lib/systemd/user/secretbusd.socket",
}


def polkit_expected() -> dict[str, str]:
    out = {}
    for f in sorted((REPO / "polkit").glob("*")):
        if f.name.endswith(".policy"):
            out[f"polkit/{f.name}"] = f"/usr/share/polkit-1/actions/{f.name}"
        elif f.name.endswith(".rules"):
            out[f"polkit/{f.name}"] = f"/usr/share/polkit-1/rules.d/{f.name}"
        elif f.is_file():
            out[f"polkit/{f.name}"] = f"/usr/share/doc/secretbus/examples/{f.name}"
    return out


def test_install_layout_substitutes_bindir(installed):
    assert any(k.endswith(".policy") for k in polkit_expected()), "no polkit actions file in polkit/"
    for src, dest in {**EXPECTED_FILES, **polkit_expected()}.items():
        p = installed.path(dest)
        assert p.is_file(), f"{src} not installed at {dest}"
        assert p.stat().st_mode & 0o777 == 0o644, dest
        want = (REPO / src).read_text()
        if "/usr/bin/secretbus" in want:
            want = want.replace("/usr/bin/secretbus", f"{BINDIR}/secretbus")
        assert p.read_text() == want, dest
    texts = [installed.path(d).read_text() for d in EXPECTED_FILES.values()]
    if str(BINDIR) != "/usr/bin":
        assert not any("/usr/bin/secretbus" in t for t in texts)


def test_install_default_prefix_and_uninstall(tmp_path):
    r = run_install(f"DESTDIR={tmp_path}")
    assert r.returncode == 0, r.stderr
    for src, dest in EXPECTED_FILES.items():     # PREFIX=/usr: the repo files as they are
        assert (tmp_path / dest.lstrip("/")).read_bytes() == (REPO / src).read_bytes(), dest
    r = run_install("uninstall", f"DESTDIR={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    r = run_install(f"DESTDIR={tmp_path}", "BINDIR=relative/bin")
    assert r.returncode == 2 and "absolute" in r.stderr


# -- systemd-analyze ---------------------------------------------------------------------------
def analyze(*args: str, user: bool = False, tmp: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if user:  # a user manager's paths; no user manager need run
        env["XDG_RUNTIME_DIR"] = str(tmp)
    return subprocess.run(["systemd-analyze", *(["--user"] if user else []), *args],
                          capture_output=True, text=True, timeout=60, env=env, cwd="/")


def test_units_verify_without_warnings(installed, tmp_path):
    assert sorted(p.name for p in installed.unitdir.iterdir()) == sorted(SYSTEM_UNITS)
    r = analyze("verify", *(str(installed.unitdir / u) for u in SYSTEM_UNITS))
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "")
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    r = analyze("verify", str(installed.userunitdir / "secretbusd.service"),
                str(installed.userunitdir / RW_SOCKET_UNIT), user=True, tmp=xdg)
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "")


@pytest.mark.parametrize("unit, key", [(SYSTEM_UNIT, "ProtectClock="), (RO_SOCKET_UNIT, "SocketMode=")])
def test_verify_would_catch_a_warning(installed, tmp_path, unit, key):
    """The check above is not vacuous: a misspelt key is only a warning (rc 0, stderr)."""
    for u in SYSTEM_UNITS:
        shutil.copy(installed.unitdir / u, tmp_path / u)
    bad = tmp_path / unit
    bad.write_text(bad.read_text().replace(key, key[:-2] + "X="))
    r = analyze("verify", *(str(tmp_path / u) for u in SYSTEM_UNITS))
    assert r.returncode == 0 and key[:-2] + "X" in r.stderr


def exposure(unit: Path, *, user: bool = False, tmp: Path | None = None) -> float:
    r = analyze("security", "--offline=true", "--no-pager", str(unit), user=user, tmp=tmp)
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-500:]
    return float(m.group(1))


# `systemd-analyze security --offline=true` (systemd 252) before issue 12's hardening, for the
# record: the user unit was the weak one.
EXPOSURE_BEFORE = {SYSTEM_UNIT: 0.9, INIT_UNIT: 1.1, "user/" + SYSTEM_UNIT: 6.1}


@pytest.mark.parametrize("name", [SYSTEM_UNIT, INIT_UNIT, "user/" + SYSTEM_UNIT])
def test_security_exposure(installed, name, record_property, tmp_path):
    user = name.startswith("user/")
    unit = installed.userunitdir / SYSTEM_UNIT if user else installed.unitdir / name
    level = exposure(unit, user=user, tmp=tmp_path)
    record_property("exposure", level)
    print(f"{name}: exposure {level} (before issue 12: {EXPOSURE_BEFORE[name]})")
    assert level <= MAX_EXPOSURE


# -- what the units say ------------------------------------------------------------------------
def execstart(svc: dict) -> list[str]:
    (line,) = svc["ExecStart"]
    return shlex.split(line)


def test_system_unit_settings(installed):
    svc = installed.unit(SYSTEM_UNIT)
    unit = systemd_sandbox.parse_unit(installed.unitdir / SYSTEM_UNIT)["Unit"]
    assert svc["Type"] == ["notify"] and svc["BusName"] == [BUS_NAME]
    assert execstart(svc) == [f"{BINDIR}/secretbusd", "--system"]
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["Restart"] == ["on-failure"]
    assert svc["LoadCredentialEncrypted"] == [f"{CREDENTIAL_NAME}:{SEALED_KEY_PATH}"]
    assert INIT_UNIT in " ".join(unit["Requires"]) and INIT_UNIT in " ".join(unit["After"])
    assert set(" ".join(unit["Conflicts"]).split()) == LIBVIRT_SECRET_UNITS
    assert set(" ".join(unit["Wants"]).split()) == {RW_SOCKET_UNIT, RO_SOCKET_UNIT}
    assert {RW_SOCKET_UNIT, RO_SOCKET_UNIT} <= set(" ".join(unit["After"]).split())
    # The daemon may write exactly its config dir and libvirt's run dir, which holds its state
    # dir, the RPC sockets and libvirt's system.token (ProtectSystem=strict).
    system = InstancePaths.system()
    rw = {p for v in svc["ReadWritePaths"] for p in v.split()}
    assert svc["ProtectSystem"] == ["strict"]
    assert rw == {str(system.config_dir), str(SYSTEM_DIR)}
    assert system.state_dir.is_relative_to(SYSTEM_DIR)
    assert svc["CapabilityBoundingSet"] == [] and svc["UMask"] == ["0077"]   # the empty set
    assert svc["RestrictAddressFamilies"] == ["AF_UNIX"] and svc["PrivateNetwork"] == ["yes"]
    assert_limits(svc)
    # Root's files stay out of sight: /etc is an empty tmpfs with a few files bound back.
    assert svc["TemporaryFileSystem"] == ["/etc:ro"] and svc["ProtectHome"] == ["yes"]
    binds = {p.lstrip("-") for v in svc["BindReadOnlyPaths"] for p in v.split()}
    assert "/etc/libvirt" in binds and "/etc/passwd" in binds
    assert not {b for b in binds if any(k in b for k in ("shadow", "ssh", "ssl", "krb5"))}


def test_socket_units_settings(installed):
    """libvirt's paths and modes, as the daemon's own plan has them; names the daemon serves
    read-write and read-only; Conflicts= with libvirt's secret daemon and all its sockets."""
    plan = {listen.readonly: listen for listen in socket_plan(True)}
    for name, ro in ((RW_SOCKET_UNIT, False), (RO_SOCKET_UNIT, True)):
        sections = systemd_sandbox.parse_unit(installed.unitdir / name)
        sock, unit = sections["Socket"], sections["Unit"]
        assert sock["ListenStream"] == [str(plan[ro].path)]
        assert int(sock["SocketMode"][0], 8) == plan[ro].mode == 0o666
        assert sock["Service"] == [SYSTEM_UNIT]
        assert "FileDescriptorName" not in sock         # the unit's name, which the daemon knows
        assert name in (RO_UNIT_NAMES if ro else RW_UNIT_NAMES)
        assert set(" ".join(unit["Conflicts"]).split()) == LIBVIRT_SECRET_UNITS
        assert sections["Install"]["WantedBy"] == ["sockets.target"]
    ro_unit = systemd_sandbox.parse_unit(installed.unitdir / RO_SOCKET_UNIT)["Unit"]
    assert ro_unit["BindsTo"] == [RW_SOCKET_UNIT]
    also = systemd_sandbox.parse_unit(installed.unitdir / SYSTEM_UNIT)["Install"]["Also"]
    assert set(" ".join(also).split()) == {RW_SOCKET_UNIT, RO_SOCKET_UNIT}


def test_user_socket_unit_settings(installed, tmp_path, monkeypatch):
    """The session instance's socket: libvirt's session path (%t is $XDG_RUNTIME_DIR) as the
    daemon's own session plan has it (one read-write socket, 0600), served read-write by its
    name; the session service wants it, may write where the socket and libvirt's token go, and
    both conflict with libvirt's secret daemon units."""
    sections = systemd_sandbox.parse_unit(installed.userunitdir / RW_SOCKET_UNIT)
    sock, unit = sections["Socket"], sections["Unit"]
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (plan,) = socket_plan(False)
    assert sock["ListenStream"] == ["%t/libvirt/virtsecretd-sock"]
    assert plan.path == tmp_path / "libvirt" / "virtsecretd-sock" and not plan.readonly
    assert int(sock["SocketMode"][0], 8) == plan.mode == 0o600 and sock["DirectoryMode"] == ["0700"]
    assert sock["Service"] == [SYSTEM_UNIT] and RW_SOCKET_UNIT in RW_UNIT_NAMES
    assert set(" ".join(unit["Conflicts"]).split()) == LIBVIRT_SECRET_UNITS
    assert sections["Install"]["WantedBy"] == ["sockets.target"]
    svc_unit = systemd_sandbox.parse_unit(installed.userunitdir / SYSTEM_UNIT)["Unit"]
    assert svc_unit["Wants"] == [RW_SOCKET_UNIT] and svc_unit["After"] == [RW_SOCKET_UNIT]
    assert set(" ".join(svc_unit["Conflicts"]).split()) == LIBVIRT_SECRET_UNITS


def assert_limits(svc: dict) -> None:
    """MemoryMax= above MemoryHigh=, both in bytes of M; a TasksMax=."""
    high, top = (int(systemd_sandbox.last(svc, k, "0").rstrip("M")) for k in ("MemoryHigh", "MemoryMax"))
    assert 0 < high < top
    assert 16 <= int(systemd_sandbox.last(svc, "TasksMax", "0")) <= 128


def test_init_unit_settings(installed):
    sections = systemd_sandbox.parse_unit(installed.unitdir / INIT_UNIT)
    svc, unit = sections["Service"], sections["Unit"]
    assert "Install" not in sections
    assert svc["Type"] == ["oneshot"] and svc["RemainAfterExit"] == ["yes"]
    assert execstart(svc) == [f"{BINDIR}/secretbus", "init-encryption"]
    assert unit["ConditionPathExists"] == [f"!{SEALED_KEY_PATH}"]
    assert int(systemd_sandbox.last(svc, "MemoryMax", "0").rstrip("M")) > 0 and "TasksMax" in svc
    assert svc["TemporaryFileSystem"] == ["/etc:ro"]
    assert SYSTEM_UNIT in " ".join(unit["Before"]).split()
    rw = {p for v in svc["ReadWritePaths"] for p in v.split()}
    assert str(SEALED_KEY_PATH.parent) in rw


def test_user_unit_settings(installed):
    svc = systemd_sandbox.service(systemd_sandbox.parse_unit(installed.userunitdir / "secretbusd.service"))
    assert svc["Type"] == ["notify"] and svc["BusName"] == [BUS_NAME]
    assert execstart(svc) == [f"{BINDIR}/secretbusd", "--session", "--timeout", "120"]
    assert_limits(svc)
    # The namespaces a user manager can set up only inside a user namespace of its own.
    assert svc["PrivateUsers"] == ["yes"] and svc["ProtectSystem"] == ["strict"]
    assert svc["ConfigurationDirectory"] == ["libvirt/secrets"]
    assert set(" ".join(svc["RuntimeDirectory"]).split()) == {"libvirt/secrets", "libvirt/common"}
    # Besides those: libvirt's session socket directory (the RPC socket, when not passed).
    assert svc["ReadWritePaths"] == ["%t/libvirt"]


# -- bus activation files ----------------------------------------------------------------------
class _CaseKeepingParser(configparser.ConfigParser):
    def optionxform(self, optionstr: str) -> str:   # keys are case-sensitive (Exec=, Name=)
        return optionstr


def activation(path: Path) -> dict[str, str]:
    cp = _CaseKeepingParser(interpolation=None)
    cp.read(path)
    return dict(cp["D-BUS Service"])


def test_bus_activation_files_match_units(installed):
    system = activation(installed.path("/usr/share/dbus-1/system-services/org.libvirt.secret.service"))
    session = activation(installed.path("/usr/share/dbus-1/services/org.libvirt.secret.service"))
    assert system["Name"] == session["Name"] == BUS_NAME
    assert system["User"] == "root"
    # SystemdService= names the installed unit, whose ExecStart= is the Exec= line.
    sys_unit = installed.unitdir / system["SystemdService"]
    user_unit = installed.userunitdir / session["SystemdService"]
    assert sys_unit.is_file() and user_unit.is_file()
    for act, unit in ((system, sys_unit), (session, user_unit)):
        svc = systemd_sandbox.service(systemd_sandbox.parse_unit(unit))
        assert svc["BusName"] == [act["Name"]]
        assert shlex.split(act["Exec"]) == execstart(svc)
        assert os.access(shlex.split(act["Exec"])[0], os.X_OK)


def test_system_activation_file_is_read_by_dbus_daemon(installed, make_bus):
    """A system-type dbus-daemon lists the name from the installed system-services dir (it
    would start it through systemd, SystemdService=, which needs PID 1: not run here)."""
    servicedir = installed.path("/usr/share/dbus-1/system-services")
    bus = make_bus("system", extra_config=f"  <servicedir>{servicedir}</servicedir>\n")
    r = busctl(bus.address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
               "org.freedesktop.DBus", "ListActivatableNames", check=True)
    assert f'"{BUS_NAME}"' in r.stdout, bus.log()


def test_session_activation_by_dbus_daemon(installed, make_bus, tmp_path, monkeypatch):
    """dbus-daemon reads the installed session activation file and starts the service by
    its Exec= line on the first call (HOME/XDG_* point at tmp, inherited by the service)."""
    for var, sub in (("HOME", "home"), ("XDG_CONFIG_HOME", "config"), ("XDG_RUNTIME_DIR", "run")):
        (tmp_path / sub).mkdir(mode=0o700)
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)   # dbus-daemon passes its own
    servicedir = installed.path("/usr/share/dbus-1/services")
    bus = make_bus("session", extra_config=f"  <servicedir>{servicedir}</servicedir>\n")
    r = busctl(bus.address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
               "org.freedesktop.DBus", "ListActivatableNames", check=True)
    assert f'"{BUS_NAME}"' in r.stdout
    r = busctl(bus.address, "call", BUS_NAME, CONNECT_PATH, CONNECT_IFACE, "ListSecrets", "u", "0",
               timeout=30)
    assert (r.returncode, r.stdout.strip()) == (0, "ao 0"), r.stderr + bus.log()
    assert (tmp_path / "config/libvirt/secrets").is_dir()
    # The activated daemon (a child of dbus-daemon, in its process group) stops with the bus.


# -- running the daemon as systemd would -------------------------------------------------------
def systemd_env(**extra: str) -> dict[str, str]:
    """The environment systemd gives a system service (plus what the test adds)."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8", "INVOCATION_ID": uuidlib.uuid4().hex, **extra}
    if os.environ.get("SANDBOX_DENY"):  # SANDBOX_DENY=kill: a denied system call kills (SIGSYS)
        env["SANDBOX_DENY"] = os.environ["SANDBOX_DENY"]
    return env


def seal_key(installed: Installed, root: Path, *, sandboxed: bool) -> tuple[Path, dict[str, str]]:
    """The init unit's ExecStart (key path moved under `root`), with a private host key."""
    key = root / str(SEALED_KEY_PATH).lstrip("/")
    key.parent.mkdir(parents=True, mode=0o700)     # StateDirectory=, StateDirectoryMode=
    env = systemd_env(SYSTEMD_CREDENTIAL_SECRET=str(root / "host.secret"))
    argv = execstart(installed.unit(INIT_UNIT)) + ["--key-path", str(key)]
    if sandboxed:   # /var/lib/systemd (where systemd-creds makes the host key) is `root` here
        argv = [sys.executable, str(SANDBOX), "--unit", str(installed.unitdir / INIT_UNIT),
                "--map", f"{SEALED_KEY_PATH.parent}={key.parent}", "--map", f"/var/lib/systemd={root}",
                "--", *argv]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, umask=0o077)
    assert r.returncode == 0, r.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    # ConditionPathExists=! makes systemd skip the unit from now on; run anyway, it refuses.
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "already exists" in again.stderr
    return key, env


def load_credentials(svc: dict, root: Path, creds_env: dict[str, str]) -> Path:
    """LoadCredentialEncrypted=ID:PATH, done with systemd-creds: decrypt into a 0700 dir."""
    creds = root / "credentials"
    creds.mkdir(mode=0o700)
    for line in svc["LoadCredentialEncrypted"]:
        cred_id, path = line.split(":", 1)
        out = creds / cred_id
        subprocess.run(["systemd-creds", "decrypt", f"--name={cred_id}", str(root / path.lstrip("/")),
                        str(out)], env=creds_env, check=True, capture_output=True, timeout=60)
        out.chmod(0o400)
    return creds


@dataclass
class Daemon:
    proc: subprocess.Popen
    log: Path
    notify: harness.NotifySocket

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def daemon_argv(unit_file: Path, extra: list[str], *, sandboxed: bool, maps: dict[str, Path] | None = None,
                user: bool = False, dropins: Sequence[Path] = ()) -> list[str]:
    """The unit's ExecStart= (its drop-ins applied) + `extra`, optionally in its sandbox."""
    svc = systemd_sandbox.service(systemd_sandbox.parse_unit(unit_file, dropins))
    argv = execstart(svc) + extra
    if sandboxed:
        argv = [sys.executable, str(SANDBOX), "--unit", str(unit_file), *(["--user"] if user else []),
                *[x for d in dropins for x in ("--dropin", str(d))],
                *[x for k, v in (maps or {}).items() for x in ("--map", f"{k}={v}")], "--", *argv]
    return argv


def start_daemon(unit_file: Path, extra: list[str], env: dict[str, str], notify: harness.NotifySocket,
                 log: Path, *, sandboxed: bool, maps: dict[str, Path] | None = None,
                 user: bool = False, sockets: list[activate.SocketSpec] | None = None,
                 dropins: Sequence[Path] = ()) -> Daemon:
    """The unit's ExecStart= + `extra`, optionally inside the unit's sandbox (`user`: a user
    unit's; `dropins`: its drop-ins) and given `sockets` as systemd passes them
    (harness/activate.py, which execs in place like each sandbox stage: LISTEN_PID stays the
    daemon's); waits for READY=1."""
    svc = systemd_sandbox.service(systemd_sandbox.parse_unit(unit_file, dropins))
    argv = daemon_argv(unit_file, extra, sandboxed=sandboxed, maps=maps, user=user, dropins=dropins)
    if sockets:
        argv = activate.argv(sockets) + argv
    umask = int(systemd_sandbox.last(svc, "UMask", "0022"), 8)
    proc = harness.spawn(argv, what=f"secretbusd ({unit_file.name})", log=log,
                         env={**env, **notify.env()}, umask=umask)
    d = Daemon(proc, log, notify)
    try:
        ready = notify.wait_for(b"READY=1", timeout=20)
    except harness.HarnessError as e:
        harness.stop_process(proc)
        raise AssertionError(f"{e}\n{d.log_text()}") from None
    # NotifyAccess=main: the notification comes from the main PID (sandbox stages exec in place).
    assert ready.pid == proc.pid
    return d


def call(bus, *args: str) -> str:
    r = busctl(bus.address, "call", BUS_NAME, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def define(bus, xml: str) -> str:
    out = call(bus, CONNECT_PATH, CONNECT_IFACE, "SecretDefineXML", "su", xml, "0")
    return shlex.split(out)[1]


def set_value(bus, path: str, value: bytes) -> None:
    call(bus, path, SECRET_IFACE, "SetValue", "ayu", str(len(value)), *map(str, value), "0")


def get_value(bus, path: str) -> bytes:
    out = call(bus, path, SECRET_IFACE, "GetValue", "u", "0").split()
    assert out[0] == "ay" and int(out[1]) == len(out) - 2
    return bytes(int(x) for x in out[2:])


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def assert_sandboxed(pid: int, root: Path) -> None:
    st = proc_status(pid)
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0 and int(st["CapBnd"], 16) == 0
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")   # PrivateNetwork=
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    mounts, procfs = {}, []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:                  # later lines are mounted on top of earlier ones
            fields = line.split()
            mounts[fields[4]] = fields[5].split(",")
            if fields[4] == "/proc":
                procfs.append(line)
    assert "subset=pid" in procfs[-1] and "hidepid=invisible" in procfs[-1]   # ProcSubset=, ProtectProc=
    assert "ro" in mounts["/"]
    assert "rw" in mounts[str((root / "etc/secrets").resolve())]
    # TemporaryFileSystem=/etc:ro: root's files are gone from the daemon's view of /etc.
    assert "ro" in mounts["/etc"] and os.path.exists("/etc/shadow")
    assert not os.path.exists(f"/proc/{pid}/root/etc/shadow")
    assert os.path.exists(f"/proc/{pid}/root/etc/passwd")


@pytest.mark.parametrize("sandboxed, activated", [(False, False), (True, False), (True, True)],
                         ids=["plain", "sandboxed", "sandboxed-socket-activated"])
def test_system_service_end_to_end(installed, make_bus, make_polkitd, notify_socket, tmp_path, disk_tmp_path,
                                   sandboxed, activated):
    """D-Bus and libvirt RPC from one daemon run as the unit says: its RPC sockets bound by the
    daemon (in the sandbox: under ReadWritePaths=/run/libvirt), or made by the .socket units
    and passed to it."""
    root = disk_tmp_path / "root"   # holds the host key: not on a tmpfs (harness/diskdir.py)
    # ConfigurationDirectory= / RuntimeDirectory= with their modes (systemd makes them).
    svc = installed.unit(SYSTEM_UNIT)
    for sub in ("etc/secrets", "run/secrets"):
        (root / sub).mkdir(parents=True)
        (root / sub).chmod(0o700)
    rundir = root / "run/libvirt"          # /run/libvirt; --root puts the RPC sockets there
    rundir.mkdir(mode=0o755)
    sockets = activate.socket_specs([installed.unitdir / RW_SOCKET_UNIT, installed.unitdir / RO_SOCKET_UNIT],
                                    move={str(SYSTEM_DIR): rundir}) if activated else None
    _key, creds_env = seal_key(installed, root, sandboxed=sandboxed)
    creds = load_credentials(svc, root, creds_env)
    assert (creds / CREDENTIAL_NAME).stat().st_size == 32

    bus = make_bus("system", policy_files=[installed.path("/usr/share/dbus-1/system.d/org.libvirt.secret.conf")])
    # polkitd with the installed actions (it refuses actions it does not know, even for root)
    make_polkitd(bus, actions=sorted(installed.path("/usr/share/polkit-1/actions").glob("*.policy")))
    # Under systemd journald takes the audit records of value reads (required on the system bus).
    journal = JournalSocket(tmp_path / "journal.socket").start()
    env = systemd_env(CREDENTIALS_DIRECTORY=str(creds), RUNTIME_DIRECTORY="/run/libvirt/secrets",
                      CONFIGURATION_DIRECTORY="/etc/libvirt/secrets", SECRETBUS_JOURNAL_SOCKET=str(journal.path))
    system = InstancePaths.system()
    d = start_daemon(installed.unitdir / SYSTEM_UNIT, ["--root", str(root), "--bus-address", bus.address],
                     env, notify_socket, tmp_path / "secretbusd.log", sandboxed=sandboxed, sockets=sockets,
                     maps={str(system.config_dir): root / "etc/secrets", str(system.state_dir): root / "run/secrets",
                           str(SYSTEM_DIR): rundir})
    rw_sock, ro_sock = (rundir / listen.path.name for listen in socket_plan(True))
    made = {p: p.stat().st_ino for p in (rw_sock, ro_sock)} if activated else {}
    try:
        if sandboxed:
            assert_sandboxed(d.proc.pid, root)
        uuid = str(uuidlib.uuid4())
        value = b"e2e-" + os.urandom(12).hex().encode() + b"\x00\xff"
        path = define(bus, f"<secret ephemeral='no' private='no'><uuid>{uuid}</uuid>"
                           f"<usage type='volume'><volume>/var/lib/libvirt/images/e2e.img</volume></usage></secret>")
        assert path == secret_path(uuid)
        set_value(bus, path, value)

        store = root / "etc/secrets"
        assert sorted(p.name for p in store.iterdir()) == [f"{uuid}.aes256gcm", f"{uuid}.xml"]
        blob = (store / f"{uuid}.aes256gcm").read_bytes()
        assert (store / f"{uuid}.aes256gcm").stat().st_mode & 0o777 == 0o600
        assert base64.b64decode(blob, validate=True).startswith(b"SBG2")
        for form in (value, base64.b64encode(value), value.hex().encode(), value[:16]):
            assert form not in blob
        assert get_value(bus, path) == value
        check_rpc(d, rw_sock, ro_sock, uuid, bus, root, activated=activated)
        assert {p: p.stat().st_ino for p in made} == made        # served as passed, not re-bound

        d.proc.send_signal(signal.SIGHUP)                       # ExecReload=
        d.notify.wait_for(b"RELOADING=1")
        d.notify.wait_for(b"READY=1")
        assert get_value(bus, path) == value

        d.proc.send_signal(signal.SIGTERM)                      # systemctl stop
        d.notify.wait_for(b"STOPPING=1")
        assert d.proc.wait(15) == 0
        log = d.log_text()
        assert "key_id=" in log and value[:-2].decode() not in log and value.hex() not in log
        assert "Traceback" not in log, log
        assert [e["SECRET_UUID"] for e in journal.snapshot() if "AUDIT_OUTCOME" in e] == [[uuid.encode()]] * 2
        # Sockets systemd passed are systemd's (RemoveOnStop=): left in place; its own are removed.
        assert {p: p.stat().st_ino for p in made if p.exists()} == made
        if not activated:
            assert not rw_sock.exists() and not ro_sock.exists()
    finally:
        harness.stop_process(d.proc)
        journal.close()


def check_rpc(d: Daemon, rw_sock: Path, ro_sock: Path, uuid: str, bus, root: Path, *, activated: bool) -> None:
    """virsh over both RPC sockets of the running unit: what D-Bus defined is listed, a secret
    defined over RPC appears on D-Bus, the -ro socket refuses a write; libvirt's system.token
    made in the (sandboxed) /run/libvirt/common."""
    if shutil.which("virsh") is None:
        pytest.skip("virsh (libvirt-clients) not installed")
    rw, ro = (f"secret:///system?socket={p}" for p in (rw_sock, ro_sock))
    mode = {p: p.stat().st_mode & 0o777 for p in (rw_sock, ro_sock)}
    assert mode == {rw_sock: 0o666, ro_sock: 0o666}
    where = "(socket from systemd)" if activated else ""
    assert f"serving libvirt RPC on {rw_sock} {where}".strip() in d.log_text()
    assert f"serving libvirt RPC on {ro_sock} (read-only) {where}".strip() in d.log_text()

    def virsh(uri: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=60)
    r = virsh(ro, "secret-list")
    assert r.returncode == 0 and uuid in r.stdout, r.stderr + d.log_text()
    other = str(uuidlib.uuid4())
    xml = root / "other.xml"
    xml.write_text(f"<secret ephemeral='no' private='no'><uuid>{other}</uuid>"
                   f"<usage type='ceph'><name>client.rpc</name></usage></secret>")
    r = virsh(ro, "secret-define", str(xml))
    assert r.returncode == 1 and "read only access prevents virSecretDefineXML" in r.stderr, r.stderr
    r = virsh(rw, "secret-define", str(xml))
    assert r.returncode == 0 and f"Secret {other} created" in r.stdout, r.stderr
    assert secret_path(other) in call(bus, CONNECT_PATH, CONNECT_IFACE, "ListSecrets", "u", "0")
    assert (root / "etc/secrets" / f"{other}.xml").exists()
    assert virsh(rw, "secret-undefine", other).returncode == 0
    token = rw_sock.parent / "common" / "system.token"
    assert token.stat().st_mode & 0o777 == 0o600 and token.parent.stat().st_mode & 0o777 == 0o700
    assert len(token.read_text()) == 32


def test_bad_credential_fails_without_restart_loop(installed, make_bus, notify_socket, tmp_path):
    """A credential of the wrong size is a configuration error: the daemon exits with the
    status the unit's RestartPreventExitStatus= names, so Restart=on-failure does not loop."""
    from secretbus.daemon import EXIT_CONFIG
    svc = installed.unit(SYSTEM_UNIT)
    assert svc["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / CREDENTIAL_NAME).write_bytes(b"\x01" * 31)
    (creds / CREDENTIAL_NAME).chmod(0o400)
    bus = make_bus("system", policy_files=[installed.path("/usr/share/dbus-1/system.d/org.libvirt.secret.conf")])
    argv = execstart(svc) + ["--root", str(tmp_path / "root"), "--bus-address", bus.address, "--no-polkit"]
    r = subprocess.run(argv, env=systemd_env(CREDENTIALS_DIRECTORY=str(creds), **notify_socket.env()),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert "Encryption key length must be '32'" in r.stderr and "Traceback" not in r.stderr
    notify_socket.wait_for(b"STATUS=", timeout=5)
    assert not any(b"READY=1" in m for m in notify_socket.messages())


# -- idle exit ---------------------------------------------------------------------------------
IDLE = 2.0


def start_session(installed, bus, notify, tmp_path, *, sandboxed=False) -> Daemon:
    unit = installed.userunitdir / "secretbusd.service"
    svc = systemd_sandbox.service(systemd_sandbox.parse_unit(unit))
    argv = execstart(svc)
    assert argv[argv.index("--timeout") + 1] == "120"
    env = systemd_env(HOME=str(tmp_path), XDG_RUNTIME_DIR=str(tmp_path))
    root = tmp_path / "root"
    maps = {}
    if sandboxed:   # ConfigurationDirectory= / RuntimeDirectory= (systemd makes them), under root
        for spec, sub in (("%E", "etc/secrets"), ("%t", "run/secrets")):
            (root / sub).mkdir(parents=True, mode=0o700)
            maps[f"{spec}/libvirt/secrets"] = root / sub
        # ReadWritePaths=%t/libvirt and RuntimeDirectory=libvirt/common: where --root puts the
        # RPC socket and libvirt's token (root/run/libvirt).
        (root / "run/libvirt/common").mkdir(parents=True, mode=0o700)
        maps["%t/libvirt"] = root / "run/libvirt"
        maps["%t/libvirt/common"] = root / "run/libvirt/common"
    return start_daemon(unit, ["--timeout", str(IDLE), "--root", str(root), "--bus-address", bus.address],
                        env, notify, tmp_path / "secretbusd.log", sandboxed=sandboxed, maps=maps, user=True)


def test_idle_exit(installed, session_bus, notify_socket, tmp_path):
    d = start_session(installed, session_bus, notify_socket, tmp_path)
    t0 = time.monotonic()
    try:
        call(session_bus, CONNECT_PATH, CONNECT_IFACE, "ListSecrets", "u", "0")
        rc = d.proc.wait(IDLE + 5)
        took = time.monotonic() - t0
        assert rc == 0, d.log_text()
        assert took >= IDLE * 0.9
        d.notify.wait_for(b"STOPPING=1", timeout=1)
        assert "idle" in d.log_text()
    finally:
        harness.stop_process(d.proc)


def test_no_idle_exit_while_an_ephemeral_secret_exists(installed, session_bus, notify_socket, tmp_path):
    """Run under the user unit's own sandbox (seccomp, no new privileges) as well."""
    d = start_session(installed, session_bus, notify_socket, tmp_path, sandboxed=True)
    try:
        # The unit lets it write libvirt's session socket directory: it serves RPC there too.
        assert f"serving libvirt RPC on {tmp_path}/root/run/libvirt/virtsecretd-sock" in d.log_text()
        uuid = str(uuidlib.uuid4())
        path = define(session_bus, f"<secret ephemeral='yes' private='yes'><uuid>{uuid}</uuid>"
                                   f"<usage type='ceph'><name>client.e2e</name></usage></secret>")
        set_value(session_bus, path, b"ephemeral value")
        time.sleep(2 * IDLE + 0.5)
        assert d.proc.poll() is None, "exited although an ephemeral secret existed"
        assert not list((tmp_path / "root/etc/secrets").iterdir())     # in memory only
        call(session_bus, path, SECRET_IFACE, "Undefine")
        t0 = time.monotonic()
        assert d.proc.wait(IDLE + 5) == 0, d.log_text()
        assert time.monotonic() - t0 >= IDLE * 0.9
    finally:
        harness.stop_process(d.proc)


# -- the sandbox emulation is not vacuous ------------------------------------------------------
PROBE = r"""
import errno, mmap, os, socket, sys
def fails(fn, code):
    try:
        fn()
    except OSError as e:
        return e.errno == code
    return False
rw = sys.argv[1]
checks = {
    "AF_INET refused": fails(lambda: socket.socket(socket.AF_INET), errno.EAFNOSUPPORT),
    "AF_UNIX allowed": socket.socket(socket.AF_UNIX).close() is None,
    "W+X mapping refused": fails(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC), errno.EPERM),
    "setuid refused": fails(lambda: os.setuid(0), errno.EPERM),
    "/usr read-only": fails(lambda: open("/usr/.sbtest", "w"), errno.EROFS),
    "ReadWritePaths writable": open(os.path.join(rw, "probe"), "w").close() is None,
    "/proc/sys hidden": not os.path.exists("/proc/sys"),
    "only lo": [l.split(":")[0].strip() for l in open("/proc/self/net/dev").readlines()[2:]] == ["lo"],
    "umask 0077": os.umask(0o077) == 0o077,
    "/etc/passwd readable": open("/etc/passwd").read(1) != "",
    "no /etc/ssh": not os.path.exists("/etc/ssh"),
    "/root hidden": fails(lambda: os.listdir("/root"), errno.EACCES),
}
# Root's secret files, hidden whether or not root may read them (it has no capabilities, but
# owns /etc/shadow): probe each that the host has.
for path in sys.argv[2:]:
    checks[path + " unreadable"] = fails(lambda: open(path).read(1), errno.ENOENT) or \
        fails(lambda: open(path).read(1), errno.EACCES)
print(checks)
sys.exit(0 if all(checks.values()) else 1)
"""


# Files only root may read that the service never needs; the host must have the first one.
HOST_SECRETS = [p for p in ("/etc/shadow", "/etc/gshadow", "/var/backups/shadow.bak",
                            "/etc/ssh/ssh_host_ed25519_key") if os.path.exists(p)]


def test_sandbox_enforces_the_system_units_settings(installed, tmp_path):
    assert HOST_SECRETS[:1] == ["/etc/shadow"]
    with open("/etc/shadow") as f:          # what the service could read before issue 12
        assert f.read(1)
    rw = tmp_path / "secrets"
    rw.mkdir(mode=0o700)
    r = subprocess.run([sys.executable, str(SANDBOX), "--unit", str(installed.unitdir / SYSTEM_UNIT),
                        "--map", f"{InstancePaths.system().config_dir}={rw}",
                        "--map", f"{InstancePaths.system().state_dir}={rw}",
                        "--map", f"{SYSTEM_DIR}={rw}",
                        "--", sys.executable, "-c", PROBE, str(rw), *HOST_SECRETS],
                       capture_output=True, text=True, timeout=60, umask=0o077,
                       env={k: v for k, v in systemd_env().items() if k != "SANDBOX_DENY"})
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (rw / "probe").exists()


# -- the units' resource limits fit the daemon -------------------------------------------------
MANY = 10_000


def test_resource_limits_leave_headroom_at_10k_secrets(installed, session_bus, tmp_path):
    """MemoryHigh=/TasksMax= are at least twice what the daemon uses with 10k secrets
    loaded and listed (the figures the units' comments give)."""
    svc = installed.unit(SYSTEM_UNIT)
    high = int(systemd_sandbox.last(svc, "MemoryHigh", "0").rstrip("M")) << 20
    tasks = int(systemd_sandbox.last(svc, "TasksMax", "0"))
    root = tmp_path / "root"
    store = root / "etc" / "secrets"
    store.mkdir(parents=True, mode=0o700)
    for i in range(MANY):
        uuid = f"5b7e5700-0000-4000-8002-{i:012x}"
        (store / f"{uuid}.xml").write_text(
            f"<secret ephemeral='no' private='no'>\n  <uuid>{uuid}</uuid>\n  <usage type='volume'>\n"
            f"    <volume>/var/lib/sbtest/many/{i}.img</volume>\n  </usage>\n</secret>\n")
    d = harness.Secretbusd(session_bus, root=root).start(timeout=60)
    try:
        out = call(session_bus, CONNECT_PATH, CONNECT_IFACE, "ListSecrets", "u", "0")
        assert out.split()[:2] == ["ao", str(MANY)]
        assert d.proc is not None
        st = proc_status(d.proc.pid)
        peak, threads = int(st["VmHWM"].split()[0]) << 10, int(st["Threads"])
    finally:
        d.cleanup()
    print(f"{MANY} secrets: peak RSS {peak >> 20} MiB (MemoryHigh= {high >> 20} MiB), "
          f"{threads} threads (TasksMax= {tasks})")
    assert 2 * peak <= high and 2 * threads <= tasks

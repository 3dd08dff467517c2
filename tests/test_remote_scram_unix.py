"""SASL SCRAM-SHA-256 on the unix sockets (auth_unix_rw / auth_unix_ro = "sasl"), for real:
secretbusd --system on a 0755 --rpc-dir, Debian 12's unmodified virsh 9.0 and python3-libvirt
9.0 over `secret:///system?socket=…`, credentials from LIBVIRT_AUTH_FILE and the client's
mechanism from SASL_CONF_PATH (mech_list: scram-sha-256), as libvirt's docs set them up.

libvirt's rules, matched: root peers do not bypass SASL (only polkit); after SCRAM the SASL
name joins the peer's identity and the rights stay those of its uid (root: all; others:
polkit's per-call checks); private values go to no one who is not elevated.
"""
from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import harness
import pytest
from fixtures import U1, U2, secret_xml
from harness.events import EventWatch
from harness.procs import remove_tree
from rpcraw import RawClient, RemoteError

from secretbus.rpc import protocol as P

REPO = Path(__file__).resolve().parents[1]
SENTINEL = b"unix-scram-S3ntinel\x01"
B64 = base64.b64encode(SENTINEL).decode()
DEBIAN_PYTHON = "/usr/bin/python3"
USERS = (("fred", "fr3d-unix-pass"), ("bob", "b0b-unix-pass"))

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("virsh") is None, reason="virsh (libvirt-clients) not installed")]


def sasl_passwd(store: Path, user: str, password: str) -> None:
    r = subprocess.run([sys.executable, "-m", "secretbus.cli", "sasl-passwd", user, "--file", str(store)],
                       input=password + "\n", capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr


def client_env(d: Path, user: str, password: str, base: dict | None = None) -> dict[str, str]:
    """libvirt's auth file and a Cyrus SASL client configuration choosing SCRAM-SHA-256, in a
    0755 directory (files 0644: the non-root client reads them; they are test credentials)."""
    sasl = d / "sasl2"
    sasl.mkdir(mode=0o755, exist_ok=True)
    (sasl / "libvirt.conf").write_text("mech_list: scram-sha-256\n")
    f = d / f"auth-{user}-{abs(hash(password)) % 10**8}.conf"
    f.write_text(f"[credentials-t]\nauthname={user}\npassword={password}\n\n[auth-libvirt-default]\ncredentials=t\n")
    for p in (sasl / "libvirt.conf", f):
        p.chmod(0o644)
    return {**(base if base is not None else os.environ), "LIBVIRT_AUTH_FILE": str(f), "SASL_CONF_PATH": str(sasl)}


def conf_text(rw: str = "sasl", ro: str | None = None, allowed: str = '"fred", "ro*"') -> str:
    return (f'auth_unix_rw = "{rw}"\n' + (f'auth_unix_ro = "{ro}"\n' if ro else "")
            + f"sasl_allowed_username_list = [ {allowed} ]\n")


def uri(rpc_dir: Path, ro: bool = False) -> str:
    return f"secret:///system?socket={rpc_dir}/virtsecretd-sock{'-ro' if ro else ''}"


def start(bus, make_secretbusd, tmp_path: Path, rpc_dir: Path, *, text: str | None = None, dbus: bool = False):
    conf = tmp_path / "secretbusd.conf"
    conf.write_text(text if text is not None else conf_text())
    conf.chmod(0o600)
    for user, pw in USERS:
        sasl_passwd(tmp_path / "sasl-verifiers.json", user, pw)
    args = ("--rpc-dir", str(rpc_dir), "--config", str(conf))
    if not dbus:
        d = make_secretbusd(bus, system=True, wait=False, args=("--no-dbus", *args))
        harness.wait_until(lambda: "over libvirt RPC only" in d.log(), timeout=20, what="secretbusd's sockets",
                           proc=d.proc, log=d.log_path)
        return d, conf
    return make_secretbusd(bus, system=True, args=args), conf


def virsh(u: str, *args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", u, *args], capture_output=True, text=True, timeout=timeout, env=env)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"rc={r.returncode}\nstdout={r.stdout}\nstderr={r.stderr}"
    return r.stdout


def define_file(d: Path, uuid: str = U1, **kw) -> str:
    f = d / f"{uuid}.xml"
    f.write_text(secret_xml(uuid, **kw))
    f.chmod(0o644)
    return str(f)


@pytest.fixture
def scram_unix(session_bus, make_secretbusd, tmp_path, rpc_dir):
    d, conf = start(session_bus, make_secretbusd, tmp_path, rpc_dir)
    return d, conf, rpc_dir


def test_virsh_root_peer_authenticates_with_scram(scram_unix, tmp_path):
    """Root authenticates too (libvirt bypasses polkit for uid 0, not SASL), then has root's rights."""
    d, _conf, rpc_dir = scram_unix
    u = uri(rpc_dir)
    env = client_env(tmp_path, "fred", "fr3d-unix-pass")
    assert f"Secret {U1} created" in ok(virsh(u, "secret-define", define_file(tmp_path), env=env))
    assert U1 in ok(virsh(u, "secret-list", env=env))
    assert "Secret value set" in ok(virsh(u, "secret-set-value", U1, "--base64", B64, env=env))
    assert ok(virsh(u, "secret-get-value", U1, env=env)).strip() == B64
    # private: refused (not elevated), as libvirt's virsh over the socket is refused
    ok(virsh(u, "secret-define", define_file(tmp_path, U2, priv="yes", uid="other"), env=env))
    ok(virsh(u, "secret-set-value", U2, "--base64", B64, env=env))
    r = virsh(u, "secret-get-value", U2, env=env)
    assert r.returncode == 1 and "Invalid secret: secret is private" in r.stderr and B64 not in r.stdout
    assert f"Secret {U1} deleted" in ok(virsh(u, "secret-undefine", U1, env=env))
    assert U1 not in ok(virsh(u, "secret-list", env=env))
    log = d.log()
    assert "SASL user 'fred'" in log and "authenticated" in log
    assert "fr3d-unix-pass" not in log and B64 not in log
    # the audit record names the SASL user beside the peer's uid and pid
    entries = [{k: v[0].decode(errors="replace") for k, v in e.items()} for e in list(d.journal.entries)]
    reads = [e for e in entries if e.get("SECRET_UUID") in (U1, U2) and "secret value read" in e.get("MESSAGE", "")]
    assert any(e.get("CALLER_IDENTITY", "").startswith("SASL user 'fred'") and e["SECRET_UUID"] == U1
               and "allowed" in e["MESSAGE"] for e in reads), reads
    assert any("denied (private)" in e["MESSAGE"] and e["SECRET_UUID"] == U2 for e in reads), reads


def test_virsh_events_over_scram_unix(scram_unix, tmp_path):
    _d, _conf, rpc_dir = scram_unix
    u = uri(rpc_dir)
    env = client_env(tmp_path, "fred", "fr3d-unix-pass")
    ev = EventWatch(["virsh", "-c", u, "secret-event", "--event", "lifecycle", "--loop", "--timeout", "20"], env=env)
    try:
        time.sleep(1.5)
        ok(virsh(u, "secret-define", define_file(tmp_path), env=env))
        ok(virsh(u, "secret-undefine", U1, env=env))
        out, err = ev.until(f"secret {U1}: Undefined")
    finally:
        ev.kill()
    assert f"'lifecycle' for secret {U1}: Defined" in out, (out, err)
    assert f"'lifecycle' for secret {U1}: Undefined" in out, (out, err)


PY_CLIENT = r'''
import sys, libvirt, threading, time
uri, uuid, xml = sys.argv[1], sys.argv[2], sys.argv[3]
libvirt.virEventRegisterDefaultImpl()
seen = []
def loop():
    while True:
        libvirt.virEventRunDefaultImpl()
threading.Thread(target=loop, daemon=True).start()
asked = []
def ask(creds, _opaque):        # never called: libvirt fills both from LIBVIRT_AUTH_FILE first
    asked.append([c[0] for c in creds])
    return -1
# libvirt.open() has no credential callback, and Cyrus then finds no SASL mechanism worthy:
# a SASL client opens with openAuth and the credential types, as virsh does.
c = libvirt.openAuth(uri, [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], ask, None], 0)
print("asked", asked)
c.secretEventRegisterAny(None, libvirt.VIR_SECRET_EVENT_ID_VALUE_CHANGED,
                         lambda c, s, o: seen.append(s.UUIDString()), None)
s = c.secretDefineXML(xml)
s.setValue(b"python-value")
print("value", s.value().decode())
print("list", [x.UUIDString() for x in c.listAllSecrets()])
for _ in range(50):
    if seen:
        break
    time.sleep(0.1)
print("event", seen)
s.undefine()
print("after", c.numOfSecrets())
'''


def test_python_libvirt_over_scram_unix(scram_unix, tmp_path):
    if not Path(DEBIAN_PYTHON).exists():
        pytest.skip("Debian's python3 not there")
    _d, _conf, rpc_dir = scram_unix
    r = subprocess.run([DEBIAN_PYTHON, "-c", PY_CLIENT, uri(rpc_dir), U1, secret_xml(U1)], capture_output=True,
                       text=True, timeout=60, env=client_env(tmp_path, "fred", "fr3d-unix-pass"))
    if "No module named 'libvirt'" in r.stderr:
        pytest.skip("python3-libvirt not installed")
    out = ok(r)
    assert "value python-value" in out and f"list ['{U1}']" in out and "asked []" in out
    assert f"event ['{U1}']" in out and "after 0" in out


@pytest.mark.parametrize("user,password,log_words", [
    ("fred", "wrong-pass", "SASL authentication of user 'fred' failed"),
    ("nobody", "n0b0dy-pass", "SASL authentication of user 'nobody' failed"),      # unknown: as a wrong password
    ("bob", "b0b-unix-pass", "SASL user 'bob' is not in sasl_allowed_username_list"),
])
def test_refusals_with_libvirts_client_message(scram_unix, tmp_path, user, password, log_words):
    d, _conf, rpc_dir = scram_unix
    u = uri(rpc_dir)
    r = virsh(u, "secret-define", define_file(tmp_path, U2, uid="other"), env=client_env(tmp_path, user, password))
    assert r.returncode == 1, r
    assert "error: failed to connect to the hypervisor" in r.stderr and "authentication failed" in r.stderr, r.stderr
    if user in ("fred", "nobody"):                   # the same words for both: no user enumeration
        assert "The client keys don't match" in r.stderr, r.stderr
    assert password not in r.stderr + d.log()
    harness.wait_until(lambda: log_words in d.log(), timeout=10, what=log_words, proc=d.proc, log=d.log_path)
    out = ok(virsh(u, "secret-list", env=client_env(tmp_path, "fred", "fr3d-unix-pass")))
    assert U2 not in out                                                     # nothing was served


def test_no_credentials_and_polkit_skipped_is_refused(scram_unix, tmp_path):
    """A client that skips SASL (AUTH_POLKIT, or a call straight away) is served nothing."""
    _d, _conf, rpc_dir = scram_unix
    with RawClient(rpc_dir / "virtsecretd-sock") as c:
        assert c.call(P.Proc.AUTH_LIST)["types"] == [P.AuthType.SASL]
        with pytest.raises(RemoteError) as e:
            c.call(P.Proc.AUTH_POLKIT)
        assert e.value.body["code"] == 45
        assert e.value.body["message"] == "authentication failed: authentication failed"
        with pytest.raises(RemoteError) as e:
            c.call(P.Proc.CONNECT_OPEN, {"name": "secret:///system", "flags": 0})
        assert "authentication required" in e.value.body["message"]
        assert c.call(P.Proc.AUTH_LIST)["types"] == [P.AuthType.SASL]


def test_sighup_switches_the_mode_for_new_connections(session_bus, make_secretbusd, tmp_path, rpc_dir):
    """polkit (the default: root passes) -> sasl -> none; an open connection keeps its state."""
    d, conf = start(session_bus, make_secretbusd, tmp_path, rpc_dir, text="")
    sock = rpc_dir / "virtsecretd-sock"
    env_none = {k: v for k, v in os.environ.items() if k != "LIBVIRT_AUTH_FILE"}
    assert "SASL" not in ok(virsh(uri(rpc_dir), "secret-list", env=env_none))
    with RawClient(sock) as before:
        assert before.call(P.Proc.AUTH_LIST)["types"] == [P.AuthType.NONE]       # root, polkit mode
        conf.write_text(conf_text())
        d.signal(signal.SIGHUP)
        harness.wait_until(lambda: "reloaded" in d.log() and str(conf) in d.log(), timeout=10, what="reload",
                           proc=d.proc, log=d.log_path)
        with RawClient(sock) as after:
            assert after.call(P.Proc.AUTH_LIST)["types"] == [P.AuthType.SASL]
        before.call(P.Proc.CONNECT_OPEN, {"name": "secret:///system", "flags": 0})   # still served
    r = virsh(uri(rpc_dir), "secret-list", env=env_none)
    assert r.returncode == 1 and "authentication failed" in r.stderr, r.stderr
    ok(virsh(uri(rpc_dir), "secret-list", env=client_env(tmp_path, "fred", "fr3d-unix-pass")))


# -- a non-root user (setpriv) over the socket in a 0755 directory --------------------------------
BUS_CONF = REPO / "dbus" / "org.libvirt.secret.conf"
API_ACTIONS = ("sbtest-scram.org.libvirt.api.secret.policy",
               (REPO / "polkit" / "org.libvirt.api.secret.policy").read_text())
UNIX_ACTIONS = ("sbtest-scram.org.libvirt.unix.policy", (REPO / "polkit" / "org.libvirt.unix.policy").read_text())
OPEN = "7a0f0002-0000-4000-8000-000000000001"       # the member may read and write it
CLOSED = "7a0f0002-0000-4000-8000-000000000002"     # the member may see it, not read its value
RULES = ("50-sbtest-scram.rules", f"""
polkit.addRule(function(action, subject) {{
    var uuid = action.lookup("secret_uuid");
    if ((action.id == "org.libvirt.api.secret.read-secure" || action.id == "org.libvirt.api.secret.write") &&
            uuid == "{OPEN}" && subject.isInGroup("libvirt"))
        return polkit.Result.YES;
    return polkit.Result.NOT_HANDLED;
}});
""")


def xml(uuid: str) -> str:
    return (f"<secret ephemeral='no' private='no'><uuid>{uuid}</uuid>"
            f"<usage type='volume'><volume>/var/lib/sbtest/scram-{uuid[-2:]}.img</volume></usage></secret>")


@pytest.mark.bus_policy(BUS_CONF)
def test_non_root_user_authenticates_and_keeps_its_uids_rights(system_bus, make_polkitd, make_secretbusd,
                                                               test_users, tmp_path, rpc_dir):
    """sbtest-member with SCRAM: no org.libvirt.unix.manage asked (SASL is the socket's auth), every
    call still decided by polkit for its uid, as libvirt's access driver decides by the process."""
    make_polkitd(system_bus, actions=[API_ACTIONS, UNIX_ACTIONS], rules=[RULES])
    d, _conf = start(system_bus, make_secretbusd, tmp_path, rpc_dir, dbus=True)
    public = harness.public_tempdir("sb-scram-")
    try:
        public.chmod(0o755)
        root_env = client_env(public, "fred", "fr3d-unix-pass")
        for uuid in (OPEN, CLOSED):
            f = public / f"{uuid}.xml"
            f.write_text(xml(uuid))
            ok(virsh(uri(rpc_dir), "secret-define", str(f), env=root_env))
            ok(virsh(uri(rpc_dir), "secret-set-value", uuid, "--base64", B64, env=root_env))
        member = test_users.member
        env = client_env(public, "fred", "fr3d-unix-pass", base=harness.user_env(member))
        def as_member(*args: str, e: dict[str, str] = env) -> subprocess.CompletedProcess:
            return harness.run_as(member, ["virsh", "-c", uri(rpc_dir), *args], env=e, timeout=60)
        listed = ok(as_member("secret-list"))
        assert OPEN in listed and CLOSED in listed
        assert ok(as_member("secret-get-value", OPEN)).strip() == B64
        for cmd in (("secret-get-value", CLOSED), ("secret-set-value", CLOSED, "--base64", "QUJD")):
            r = as_member(*cmd)                                                 # polkit said no
            assert r.returncode == 1 and "access denied: 'secret' denied access" in r.stderr, (cmd, r.stderr)
            assert B64 not in r.stdout
        bad = client_env(public, "fred", "not-the-pass", base=harness.user_env(member))
        r = as_member("secret-list", e=bad)
        assert r.returncode == 1 and "authentication failed" in r.stderr, r.stderr
        log = d.log()
        assert f"uid {member.uid} authenticated: SASL user 'fred'" in log, log
        assert "org.libvirt.unix.manage" not in log and "fr3d-unix-pass" not in log and B64 not in log
    finally:
        remove_tree(public)


# -- secretbus's own client: auth file, and the prompt on a real pseudo-terminal --------------------
def sb_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No auth file anywhere libvirt's search looks (LIBVIRT_AUTH_FILE unset, an empty
    XDG_CONFIG_HOME), unless `extra` names one."""
    env = {k: v for k, v in os.environ.items() if k not in ("LIBVIRT_AUTH_FILE", "SASL_CONF_PATH")}
    (tmp_path / "xdg").mkdir(exist_ok=True)
    return {**env, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), **extra}


def sb(u: str, *args: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", u, *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=env, **kw)


def test_secretbus_client_with_the_auth_file(scram_unix, tmp_path):
    from secretbus.core import errors
    from secretbus.uri import open_connection
    d, _conf, rpc_dir = scram_unix
    u = uri(rpc_dir)
    env = client_env(tmp_path, "fred", "fr3d-unix-pass", base=sb_env(tmp_path))
    assert f"Secret {U1} created" in ok(sb(u, "secret-define", define_file(tmp_path), env=env))
    ok(sb(u, "secret-set-value", U1, "--base64", B64, env=env))
    assert ok(sb(u, "secret-get-value", U1, env=env)).strip() == B64
    ok(sb(u, "secret-define", define_file(tmp_path, U2, priv="yes", uid="other"), env=env))
    ok(sb(u, "secret-set-value", U2, "--base64", B64, env=env))
    r = sb(u, "secret-get-value", U2, env=env)
    assert r.returncode == 1 and "secret is private" in r.stderr and B64 not in r.stdout
    # the Python API, authfile= in the URI; the host of a unix URI is libvirt's "localhost"
    f = tmp_path / "auth-localhost.conf"
    f.write_text("[credentials-x]\nauthname=fred\npassword=fr3d-unix-pass\n[auth-libvirt-localhost]\ncredentials=x\n")
    with open_connection(f"{u}&authfile={f}", timeout=10) as conn:
        assert sorted(s.uuid for s in conn.list_secrets()) == sorted([U1, U2])
    bad = client_env(tmp_path, "fred", "wrong-pass")["LIBVIRT_AUTH_FILE"]
    with pytest.raises(errors.SecretError) as e:
        open_connection(f"{u}&authfile={bad}", timeout=10).close()
    shown = errors.display(e.value)
    assert shown.startswith("authentication failed: The client keys don't match"), shown
    assert "wrong-pass" not in shown
    assert f"Secret {U1} deleted" in ok(sb(u, "secret-undefine", U1, env=env))
    assert "fr3d-unix-pass" not in d.log()


def test_without_credentials_or_terminal_a_clear_auth_error(scram_unix, tmp_path):
    _d, _conf, rpc_dir = scram_unix
    r = sb(uri(rpc_dir), "secret-list", env=sb_env(tmp_path), stdin=subprocess.DEVNULL, start_new_session=True)
    assert r.returncode == 1, r
    assert ("error: authentication failed: no SASL credentials for localhost: give authfile= or "
            "LIBVIRT_AUTH_FILE, or run on a terminal to be asked") in r.stderr, r.stderr


def in_pty(argv: list[str], env: dict[str, str], answers: list[tuple[bytes, bytes]],
           timeout: float = 60) -> tuple[int, bytes]:
    """Run `argv` with a new pseudo-terminal as its controlling terminal and stdio; each time the
    next prompt appears, type its answer. (status, everything the terminal showed)."""
    import pty
    import select
    pid, fd = pty.fork()
    if pid == 0:                                          # the child: its own session on the pty
        try:
            os.chdir(REPO)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    out, seen, deadline = bytearray(), 0, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            try:
                chunk = os.read(fd, 4096)
            except OSError:                               # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            while answers and answers[0][0] in out[seen:]:
                seen = out.index(answers[0][0], seen) + len(answers[0][0])
                os.write(fd, answers.pop(0)[1])
    finally:
        os.close(fd)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        status = 1
    return os.waitstatus_to_exitcode(status), bytes(out)


NAME_PROMPT = b"Please enter your authentication name: "
PASS_PROMPT = b"Please enter your password: "


def test_the_password_prompt_on_a_terminal(scram_unix, tmp_path):
    d, _conf, rpc_dir = scram_unix
    u = uri(rpc_dir)
    ok(virsh(u, "secret-define", define_file(tmp_path), env=client_env(tmp_path, "fred", "fr3d-unix-pass")))
    argv = [sys.executable, "-m", "secretbus.cli", "-c", u, "secret-list"]
    status, shown = in_pty(argv, sb_env(tmp_path), [(NAME_PROMPT, b"fred\n"), (PASS_PROMPT, b"fr3d-unix-pass\n")])
    assert status == 0, shown
    assert NAME_PROMPT in shown and PASS_PROMPT in shown and U1.encode() in shown
    assert b"fred" in shown                               # the name is echoed ...
    assert b"fr3d-unix-pass" not in shown                 # ... the password never
    # a wrong password typed: the server's refusal, the password in no message
    status, shown = in_pty(argv, sb_env(tmp_path), [(NAME_PROMPT, b"fred\n"), (PASS_PROMPT, b"typed-wrong\n")])
    assert status == 1 and b"authentication failed" in shown and b"typed-wrong" not in shown, shown
    # end of input at the prompt (Ctrl-D): cancelled, nothing sent
    status, shown = in_pty(argv, sb_env(tmp_path), [(NAME_PROMPT, b"\x04")])
    assert status == 1 and b"authentication cancelled: no authentication name given" in shown, shown
    # no_tty=1: never asked
    status, shown = in_pty([*argv[:4], f"{u}&no_tty=1", argv[5]], sb_env(tmp_path), [])
    assert status == 1 and NAME_PROMPT not in shown and b"no SASL credentials" in shown, shown
    log = d.log()
    assert "fr3d-unix-pass" not in log and "typed-wrong" not in log


def test_read_only_socket_with_its_own_mode(session_bus, make_secretbusd, tmp_path, rpc_dir):
    """auth_unix_ro = "sasl" asks SCRAM on -sock-ro too; the connection stays read-only after it."""
    d, _conf = start(session_bus, make_secretbusd, tmp_path, rpc_dir, text=conf_text(rw="none", ro="sasl"))
    env = client_env(tmp_path, "fred", "fr3d-unix-pass")
    no_creds = sb_env(tmp_path)
    ok(virsh(uri(rpc_dir), "secret-define", define_file(tmp_path), env=no_creds))         # rw: none
    ok(virsh(uri(rpc_dir), "secret-set-value", U1, "--base64", B64, env=no_creds))
    assert U1 in ok(virsh(uri(rpc_dir, ro=True), "secret-list", env=env))
    r = virsh(uri(rpc_dir, ro=True), "secret-get-value", U1, env=env)
    assert r.returncode == 1 and "read only access prevents virSecretGetValue" in r.stderr, r.stderr
    r = virsh(uri(rpc_dir, ro=True), "secret-list", env=client_env(tmp_path, "fred", "wrong-pass"))
    assert r.returncode == 1 and "authentication failed" in r.stderr, r.stderr
    assert B64 not in d.log()

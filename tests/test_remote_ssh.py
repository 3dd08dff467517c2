"""secret+ssh:// end to end: a real sshd (harness/sshd.py) on loopback in front of a real
secretbusd RPC socket, reached by unmodified virsh and python3-libvirt (libvirt's own remote
command: `nc -U` with socket=, `virt-ssh-helper` without) and by secretbus's CLI and open()
(which run `secretbus ssh-bridge`, falling back to virt-ssh-helper, then nc). Also: errors
that name the failing step, hostile URIs that cannot inject shell, the bridge's EOF handling,
and a non-root ssh user getting that user's rights, not root's."""
from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import harness
import pytest
from fixtures import U1, U2, secret_xml
from harness import programs
from harness.ports import free_port
from harness.procs import remove_tree
from harness.sshd import SSH_USER, Sshd, ensure_ssh_user
from test_cli import entry_point
from test_rpc_client import rpc_only

import secretbus
from secretbus.core import errors
from secretbus.rpc import protocol as P
from secretbus.rpc.facade import RpcConnection
from secretbus.rpc.frame import Header, encode_frame
from secretbus.rpc.sshcommand import explain, remote_command, ssh_argv
from secretbus.rpc.sshuri import parse_ssh_uri

SENTINEL = b"ssh-S3ntinel\x00\x01\xfe"
DEBIAN_PYTHON = "/usr/bin/python3"      # python3-libvirt is Debian's


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def sysd(session_bus, make_secretbusd, rpc_dir):
    """secretbusd's system instance, RPC only, its sockets in rpc_dir."""
    return rpc_only(session_bus, make_secretbusd, rpc_dir, system=True)


@pytest.fixture
def make_sshd():
    started: list[Sshd] = []

    def make(**kw) -> Sshd:
        d = Sshd(**kw)
        started.append(d)
        return d.start()
    yield make
    for d in started:
        d.cleanup()


def sock(rpc_dir: Path, ro: bool = False) -> str:
    return f"{rpc_dir}/virtsecretd-sock{'-ro' if ro else ''}"


def cli(u: str, *args: str, top: tuple[str, ...] = (), timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SECRETBUS_DEFAULT_URI"}
    return subprocess.run(entry_point() + [*top, "-c", u, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def virsh(u: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", u, *args], capture_output=True, text=True, timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def xml_file(tmp_path: Path, name: str = "s.xml", **kw) -> str:
    f = tmp_path / name
    f.write_text(secret_xml(**kw))
    return str(f)


def one_event(run, u: str, kind: str, change, *extra: str) -> str:
    """Start `secret-event --event kind --timeout 30` over `u`, make the change until the
    one-shot watcher has printed it (a loaded machine may take a while to subscribe)."""
    p = subprocess.Popen(run(u, "secret-event", "--event", kind, *extra, "--timeout", "30"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 40
        while p.poll() is None and time.monotonic() < deadline:
            change()
            time.sleep(0.5)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, (out, err)
    return out


def cli_argv(u: str, *args: str) -> list[str]:
    return entry_point() + ["-c", u, *args]


def virsh_argv(u: str, *args: str) -> list[str]:
    return ["virsh", "-c", u, *args]


def walk(run_ok, run_fail, u: str, tmp_path: Path, argv) -> None:
    """define, list, set/get a non-private value, private refused, events, undefine."""
    assert f"Secret {U1} created" in run_ok(u, "secret-define", xml_file(tmp_path))
    ok_priv = run_ok(u, "secret-define", xml_file(tmp_path, "p.xml", uuid=U2, priv="yes", usage="volume", uid="/p.img"))
    assert f"Secret {U2} created" in ok_priv
    out = run_ok(u, "secret-list")
    assert U1 in out and "ceph client.admin" in out and U2 in out
    b64 = base64.b64encode(SENTINEL).decode()
    assert "Secret value set" in run_ok(u, "secret-set-value", U1, "--base64", b64)
    assert run_ok(u, "secret-get-value", U1).strip() == b64
    run_ok(u, "secret-set-value", U2, "--base64", "cHJpdg==")
    r = run_fail(u, "secret-get-value", U2)
    assert r.returncode == 1 and "Invalid secret: secret is private" in r.stderr, r.stderr
    out = one_event(argv, u, "value-changed", lambda: run_ok(u, "secret-set-value", U1, "--base64", "QUJD"),
                    "--secret", U1)
    assert f"event 'value-changed' for secret {U1}" in out and "events received: 1" in out
    out = one_event(argv, u, "lifecycle", lambda: run_ok(u, "secret-define", xml_file(tmp_path)))
    assert f"event 'lifecycle' for secret {U1}: Defined" in out
    assert f"Secret {U1} deleted" in run_ok(u, "secret-undefine", U1)
    r = run_fail(u, "secret-dumpxml", U1)
    assert r.returncode == 1 and f"no secret with matching uuid '{U1}'" in r.stderr


# -- unmodified virsh and python3-libvirt ----------------------------------------------------------
def test_virsh_over_ssh_with_socket_uses_nc(sysd, rpc_dir, make_sshd, tmp_path):
    """libvirt's own remote command (socket= forces `nc -U`); virsh's ssh gets our known_hosts
    and key through command= (libvirt 9.0 passes known_hosts= only to libssh)."""
    d = make_sshd(programs=("nc",))
    u = d.uri(socket=sock(rpc_dir))
    walk(lambda *a: ok(virsh(*a)), virsh, u, tmp_path, virsh_argv)
    assert SENTINEL.hex() not in sysd.log() and base64.b64encode(SENTINEL).decode() not in sysd.log()


def test_virsh_over_ssh_through_virt_ssh_helper(sysd, rpc_dir, make_sshd, tmp_path):
    """No socket=: libvirt runs virt-ssh-helper on the remote host, which picks
    /var/run/libvirt/virtsecretd-sock with mode=auto: secretbusd's socket there."""
    if not os.access("/usr/bin/virt-ssh-helper", os.X_OK):
        pytest.skip("virt-ssh-helper (Debian's libvirt-daemon) is not installed")
    d = make_sshd(programs=("virt-ssh-helper",), libvirt_run=rpc_dir)
    u = d.uri()
    walk(lambda *a: ok(virsh(*a)), virsh, u, tmp_path, virsh_argv)
    # read-only: virt-ssh-helper -r, the -ro socket
    r = subprocess.run(["virsh", "-r", "-c", u, "secret-get-value", U2], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "read only access prevents virSecretGetValue" in r.stderr, r.stderr
    assert U2 in ok(subprocess.run(["virsh", "-r", "-c", u, "secret-list"], capture_output=True, text=True,
                                   timeout=60))


@pytest.mark.parametrize("via", ["nc", "virt-ssh-helper"])
def test_python_libvirt_over_ssh(via, sysd, rpc_dir, make_sshd):
    if via == "virt-ssh-helper" and not os.access("/usr/bin/virt-ssh-helper", os.X_OK):
        pytest.skip("virt-ssh-helper (Debian's libvirt-daemon) is not installed")
    if via == "nc":
        d = make_sshd(programs=("nc",))
        u = d.uri(socket=sock(rpc_dir))
    else:
        d = make_sshd(programs=("virt-ssh-helper",), libvirt_run=rpc_dir)
        u = d.uri()
    r = subprocess.run([DEBIAN_PYTHON, "-c", programs.source("libvirt_remote_client"), u, U1, U2, SENTINEL.hex()],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["define"] == U1 and got["define_private"] == U2 and got["list"] == sorted([U1, U2])
    assert got["set_value"] == 0 and got["value"] == SENTINEL.hex()
    assert got["set_private"] == 0
    assert got["private_value"]["error"] == [65, 30, "Invalid secret: secret is private"]
    assert got["undefine"] == 0
    assert got["events"] == [["lifecycle", U1, 0], ["lifecycle", U2, 0], ["value-changed", U1],
                             ["value-changed", U2], ["lifecycle", U1, 1]]


# -- secretbus's own client ---------------------------------------------------------------------
def test_secretbus_cli_over_ssh_bridge(sysd, rpc_dir, make_sshd, tmp_path):
    """`secretbus -c secret+ssh://…?socket=`: the remote side runs `secretbus ssh-bridge`."""
    d = make_sshd(programs=("secretbus",))          # no virt-ssh-helper, no nc: only the bridge works
    u = d.uri(socket=sock(rpc_dir))
    walk(lambda *a: ok(cli(*a)), cli, u, tmp_path, cli_argv)
    log = sysd.log()
    assert SENTINEL.hex() not in log and base64.b64encode(SENTINEL).decode() not in log


def test_bridge_picks_the_default_socket_and_the_ro_one(sysd, rpc_dir, make_sshd, tmp_path):
    """No socket=: the bridge's mode=auto choice finds /var/run/libvirt/virtsecretd-sock (the
    test's secretbusd, in sshd's mount namespace); `-r` the -ro socket, where values are refused."""
    d = make_sshd(programs=("secretbus",), libvirt_run=rpc_dir)
    u = d.uri()
    ok(cli(u, "secret-define", xml_file(tmp_path)))
    ok(cli(u, "secret-set-value", U1, "--base64", "QUJD"))
    assert cli(u, "secret-get-value", U1).stdout.strip() == "QUJD"
    r = cli(u, "secret-get-value", U1, top=("-r",))
    assert r.returncode == 1 and "read only access prevents virSecretGetValue" in r.stderr, r.stderr
    assert U1 in ok(cli(u, "secret-list", top=("-r",)))


def test_mode_auto_falls_back_to_libvirtds_socket(sysd, rpc_dir, make_sshd, tmp_path):
    """A remote /run/libvirt with only libvirtd's legacy `libvirt-sock` (here a link to
    secretbusd's socket): the bridge's mode=auto choice, our nc fallback and libvirt's own nc
    fallback (virsh without virt-ssh-helper) all take it; mode=legacy names it directly."""
    legacy = harness.public_tempdir("sb-ssh-legacy-")
    try:
        (legacy / "libvirt-sock").symlink_to(sock(rpc_dir))
        ok(cli(f"secret:///system?socket={sock(rpc_dir)}", "secret-define", xml_file(tmp_path)))
        for programs_ in (("secretbus",), ("nc",)):
            d = make_sshd(programs=programs_, libvirt_run=legacy)
            assert U1 in ok(cli(d.uri(), "secret-list")), programs_
            assert U1 in ok(cli(d.uri(mode="legacy"), "secret-list")), programs_
        assert U1 in ok(virsh(d.uri(), "secret-list"))          # libvirt: nc -U /var/run/libvirt/libvirt-sock
    finally:
        remove_tree(legacy)


def test_choose_socket(monkeypatch, tmp_path):
    from secretbus.rpc import paths
    monkeypatch.setattr(paths, "SYSTEM_DIR", tmp_path)
    assert paths.choose_socket(True) == tmp_path / "virtsecretd-sock"          # neither: the direct one
    (tmp_path / "libvirt-sock").touch()
    (tmp_path / "libvirt-sock-ro").touch()
    assert paths.choose_socket(True) == tmp_path / "libvirt-sock"
    assert paths.choose_socket(True, readonly=True) == tmp_path / "libvirt-sock-ro"
    (tmp_path / "virtsecretd-sock").touch()
    assert paths.choose_socket(True) == tmp_path / "virtsecretd-sock"
    assert paths.choose_socket(True, readonly=True) == tmp_path / "libvirt-sock-ro"   # no direct -ro yet
    assert paths.choose_socket(True, mode="legacy") == tmp_path / "libvirt-sock"
    assert paths.choose_socket(True, readonly=True, mode="direct") == tmp_path / "virtsecretd-sock-ro"

@pytest.mark.parametrize("programs_, via", [(("virt-ssh-helper",), "virt-ssh-helper"), (("nc",), "nc")])
def test_secretbus_client_falls_back(programs_, via, sysd, rpc_dir, make_sshd, tmp_path):
    """A remote host without secretbus: the client's command falls back as libvirt's does."""
    if via == "virt-ssh-helper" and not os.access("/usr/bin/virt-ssh-helper", os.X_OK):
        pytest.skip("virt-ssh-helper (Debian's libvirt-daemon) is not installed")
    d = make_sshd(programs=programs_, libvirt_run=rpc_dir)
    with secretbus.open(d.uri()) as conn:
        assert isinstance(conn, RpcConnection)
        s = conn.define_xml(secret_xml())
        s.set_value(SENTINEL)
        assert s.get_value() == SENTINEL
        assert [x.uuid for x in conn.list_secrets()] == [U1]
        seen: list = []
        conn.subscribe(lambda sec, ev: seen.append((ev.event_id, ev.uuid)))
        s.undefine()
        harness.wait_until(lambda: seen, timeout=20, what="the undefine event over ssh")
        assert seen[0][1] == U1
    # both ends of the tunnel went away with the connection
    harness.wait_until(lambda: "Disconnected from user root" in d.log() or "Close session" in d.log(),
                       timeout=10, what="the ssh session to end")


def test_open_api_over_ssh_many_threads(sysd, rpc_dir, make_sshd):
    d = make_sshd(programs=("secretbus",))
    import threading
    with secretbus.open(d.uri(socket=sock(rpc_dir))) as conn:
        s = conn.define_xml(secret_xml())
        s.set_value(SENTINEL)
        results: list = []

        def worker() -> None:
            for _ in range(10):
                results.append(conn.secret_get_value(U1) == SENTINEL)
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [True] * 40


# -- errors name the step ----------------------------------------------------------------------
def failure(u: str) -> str:
    with pytest.raises(errors.SecretError) as ei:
        secretbus.open(u, timeout=20)
    return str(ei.value)


def test_errors_say_which_step_failed(sysd, rpc_dir, make_sshd, tmp_path):
    d = make_sshd(programs=("secretbus",))
    good = dict(socket=sock(rpc_dir))
    # connection: nothing listens on the port
    free = free_port()
    msg = failure(d.uri(**good).replace(f":{d.port}/", f":{free}/"))
    assert "ssh connection failed" in msg and "Connection refused" in msg, msg
    # host key: a known_hosts that has another key for the host
    other = tmp_path / "other_known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    other.write_text(f"[127.0.0.1]:{d.port} " + " ".join((tmp_path / "k.pub").read_text().split()[:2]) + "\n")
    msg = failure(d.uri(**good, known_hosts=str(other)))
    assert "ssh host key verification failed" in msg, msg
    # authentication: a user with no authorised key
    msg = failure(d.uri("nobody", **good))
    assert "ssh authentication failed" in msg and "Permission denied" in msg, msg
    # the remote helper: the socket is not there
    msg = failure(d.uri(socket="/nonexistent/virtsecretd-sock"))
    assert "the remote helper failed" in msg, msg
    assert "Failed to connect socket to '/nonexistent/virtsecretd-sock'" in msg, msg
    # and through the CLI: virsh's two lines
    r = cli(d.uri("nobody", **good), "secret-list")
    assert r.returncode == 1 and r.stderr.startswith("error: failed to connect to the hypervisor\n"), r.stderr
    assert "ssh authentication failed" in r.stderr


def test_no_remote_helper_at_all(sysd, rpc_dir, make_sshd):
    d = make_sshd(programs=())
    msg = failure(d.uri(socket=sock(rpc_dir)))
    assert "no remote helper" in msg and "secretbus, nc" in msg, msg
    msg = failure(d.uri())
    assert "secretbus, virt-ssh-helper, nc" in msg, msg


def test_access_is_the_ssh_users_not_roots(sysd, rpc_dir, make_sshd, tmp_path):
    """Over ssh the server sees a local peer with the ssh user's uid: root is served, the
    non-root test user gets what that user gets locally (here, without polkit: refused)."""
    user = ensure_ssh_user()
    lib = harness.unpriv_python()
    d = make_sshd(users=("root", SSH_USER), programs=("secretbus", "nc"), secretbus_pythonpath=str(lib.site))
    ok(cli(d.uri(socket=sock(rpc_dir)), "secret-define", xml_file(tmp_path)))
    r = cli(d.uri(SSH_USER, socket=sock(rpc_dir)), "secret-list")
    assert r.returncode == 1 and "authentication failed: access denied by policy" in r.stderr, r.stderr
    harness.wait_until(lambda: f"uid {user.uid} refused" in sysd.log(), timeout=10, what="the server's refusal")
    r = virsh(d.uri(SSH_USER, socket=sock(rpc_dir)), "secret-list")
    assert r.returncode == 1 and "authentication failed: access denied by policy" in r.stderr, r.stderr



SSH_RULES = ("50-sbtest-ssh.rules", f"""
polkit.addRule(function(action, subject) {{
    if (subject.user != "{SSH_USER}")
        return polkit.Result.NOT_HANDLED;
    if (action.id == "org.libvirt.unix.manage")
        return polkit.Result.YES;
    var uuid = action.lookup("secret_uuid");
    if (action.id == "org.libvirt.api.secret.read-secure" && (uuid == "{U1}" || uuid == "{U2}"))
        return polkit.Result.YES;
    return polkit.Result.NOT_HANDLED;
}});
""")
OTHER = "1b40a534-8301-45d5-b1aa-11894ebb1799"


@pytest.mark.bus_policy(Path(__file__).resolve().parents[1] / "dbus" / "org.libvirt.secret.conf")
def test_polkit_decides_for_the_ssh_user(system_bus, make_polkitd, make_secretbusd, rpc_dir, make_sshd, tmp_path):
    """With polkit: the non-root ssh user is authorised as that uid, per call and per secret,
    and a private value stays refused even where polkit says yes."""
    repo = Path(__file__).resolve().parents[1]
    make_polkitd(system_bus, rules=[SSH_RULES], actions=[
        ("sbtest-ssh.org.libvirt.api.secret.policy", (repo / "polkit" / "org.libvirt.api.secret.policy").read_text()),
        ("sbtest-ssh.org.libvirt.unix.policy", (repo / "polkit" / "org.libvirt.unix.policy").read_text())])
    sbd = make_secretbusd(system_bus, system=True, args=("--rpc-dir", str(rpc_dir)))
    user = ensure_ssh_user()
    d = make_sshd(users=("root", SSH_USER), programs=("secretbus",),
                  secretbus_pythonpath=str(harness.unpriv_python().site))
    root_u, user_u = d.uri(socket=sock(rpc_dir)), d.uri(SSH_USER, socket=sock(rpc_dir))
    ok(cli(root_u, "secret-define", xml_file(tmp_path)))
    ok(cli(root_u, "secret-define", xml_file(tmp_path, "p.xml", uuid=U2, priv="yes", usage="volume", uid="/p.img")))
    ok(cli(root_u, "secret-define", xml_file(tmp_path, "o.xml", uuid=OTHER, usage="volume", uid="/o.img")))
    for u in (U1, U2, OTHER):
        ok(cli(root_u, "secret-set-value", u, "--base64", base64.b64encode(SENTINEL).decode()))
    assert ok(cli(user_u, "secret-get-value", U1)).strip() == base64.b64encode(SENTINEL).decode()
    r = cli(user_u, "secret-get-value", OTHER)
    assert r.returncode == 1 and "access denied" in r.stderr, r.stderr
    r = cli(user_u, "secret-get-value", U2)
    assert r.returncode == 1 and "secret is private" in r.stderr, r.stderr
    # the audit trail names the ssh user's uid
    reads = [{k: v[0].decode() for k, v in e.items()} for e in list(sbd.journal.entries)]
    assert any(f.get("SECRET_UUID") == U1 and f.get("CALLER_UID") == str(user.uid) for f in reads), reads
    assert SENTINEL.hex() not in sbd.log()


# -- hostile URIs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    "secret+ssh://-oProxyCommand=touch%20x/system",
    "secret+ssh://-x@host/system",
    "secret+ssh://a;b@host/system",
    "secret+ssh://host:0/system",
    "secret+ssh://host:99999/system",
    "secret+ssh://host/embed",
    "secret+ssh:///system",
    "secret+ssh://u:pw@host/system",
    "secret+ssh://host/system?keyfile=/tmp/a%20b",
    "secret+ssh://host/system?known_hosts=/tmp/%25d",
    "secret+ssh://host/system?known_hosts=/tmp/x%22y",
    "secret+ssh://host/system?command=ssh%20-oProxyCommand=x",
    "secret+ssh://host/system?netcat=nc;touch%20x",
    "secret+ssh://host/system?socket=relative",
    "secret+ssh://host/system?socket=/a%0Ab",
    "secret+ssh://host/system?mode=direct",
    "secret+ssh://host/system?proxy=evil",
    "secret+ssh://host/system?no_verify=yes",
])
def test_hostile_uris_are_refused_before_anything_runs(bad):
    with pytest.raises(errors.InvalidArg):
        parse_ssh_uri(bad)


def test_a_password_in_the_uri_is_never_shown():
    for uri in ("secret+ssh://u:S3cretPw@/system", "secret+ssh://u:S3cretPw@host/system"):
        with pytest.raises(errors.InvalidArg) as ei:
            parse_ssh_uri(uri)
        assert "S3cretPw" not in ei.value.message and "password" in ei.value.message


def test_uri_parameters_map_to_ssh_options():
    t = parse_ssh_uri("secret+ssh://[::1]:2222/session?known_hosts_verify=auto&foo=bar&proxy=native")
    assert (t.host, t.port, t.user, t.system) == ("::1", 2222, None, False)
    assert t.open_name() == "secret:///session?foo=bar" and t.describe() == "ssh [::1]:2222"
    argv = ssh_argv(t, True)
    assert "StrictHostKeyChecking=accept-new" in argv and argv[-3:-1] == ["--", "::1"]
    assert "virt-ssh-helper -r secret:///session" in argv[-1] and " nc " not in argv[-1]
    t = parse_ssh_uri("secret+ssh://h/system?no_verify=1&proxy=netcat&netcat=/opt/nc&mode=legacy")
    script = ssh_argv(t, False)[-1]
    assert "StrictHostKeyChecking=no" in ssh_argv(t, False) and "ssh-bridge" not in script
    assert "/opt/nc" in script and "/run/libvirt/libvirt-sock" in script and "virtsecretd-sock" not in script


def test_failures_are_explained_by_step():
    """The classification of ssh's exit status and stderr (pure logic; the real cases run
    through sshd in test_errors_say_which_step_failed)."""
    w = "ssh h"
    assert explain(w, None, "") is None and explain(w, 0, "Could not chdir to home directory") is None
    said = "No ED25519 host key is known for h and you have requested strict checking.\nHost key verification failed."
    assert "ssh host key verification failed" in explain(w, 255, said)
    assert "ssh authentication failed: root@h: Permission denied (publickey)." == \
        explain(w, 255, "root@h: Permission denied (publickey).").split(": ", 1)[1]
    assert "ssh connection failed" in explain(w, 255, "ssh: connect to host h port 22: Connection refused")
    assert "no remote helper" in explain(w, 127, "secretbus-ssh: not in the remote PATH: secretbus, nc")
    assert "the remote helper failed (status 1): error: Failed to connect" in explain(w, 1, "error: Failed to connect")


HOSTILE = "/tmp/x'y\"z $(touch /tmp/sb-pwned-1) `touch /tmp/sb-pwned-2`;touch /tmp/sb-pwned-3 \\ & | * ~ #"


def test_remote_command_quoting_round_trips_through_two_shells(tmp_path):
    """The remote command, parsed by a login shell and then by `sh -c`, gives the helper exactly
    the URI's values: a fake `secretbus` on PATH prints its argv."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "secretbus").write_text("#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n")
    (fake / "secretbus").chmod(0o755)
    for ro in (False, True):
        t = parse_ssh_uri("secret+ssh://h/system?" + urlencode({"socket": HOSTILE}))
        cmd = remote_command(t, ro)
        # what sshd does: the user's shell runs the command string
        r = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, timeout=10,
                           env={"PATH": f"{fake}:/usr/bin:/bin"})
        args = r.stdout.splitlines()
        assert args == (["-r"] if ro else []) + ["ssh-bridge", t.remote_uri()], r
        assert parse_ssh_uri("secret+ssh://h/system?" + args[-1].split("?", 1)[1]).socket == Path(HOSTILE)
    for n in (1, 2, 3):
        assert not Path(f"/tmp/sb-pwned-{n}").exists()
    argv = ssh_argv(parse_ssh_uri("secret+ssh://u@h:2/system?keyfile=/k&known_hosts=/kh&no_tty=1"), False)
    assert argv[:13] == ["ssh", "-p", "2", "-l", "u", "-i", "/k", "-T", "-e", "none", "-o", "BatchMode=yes", "-o"]
    assert argv[13:16] == ["UserKnownHostsFile=/kh", "--", "h"] and argv[16].startswith("sh -c ")


def test_hostile_socket_path_reaches_the_bridge_intact(session_bus, make_secretbusd, make_sshd, tmp_path):
    """A socket directory whose name is full of shell syntax, through real sshd and bridge."""
    base = harness.public_tempdir("sb-ssh-q-")
    weird = base / "d'q\"$(touch p1) `touch p2`;touch p3 &"
    weird.mkdir(mode=0o755)
    try:
        rpc_only(session_bus, make_secretbusd, weird, system=True)
        d = make_sshd(programs=("secretbus", "nc"))
        for proxy in ("native", "netcat"):
            u = d.uri(socket=sock(weird), proxy=proxy)
            assert ok(cli(u, "secret-list")).startswith(" UUID")
        assert sorted(os.listdir(base)) == [weird.name] and not any(Path("/", p).exists() for p in ("p1", "p2", "p3"))
    finally:
        remove_tree(base)


# -- the bridge itself ------------------------------------------------------------------------------
def _frame(proc: int, serial: int) -> bytes:
    return encode_frame(Header(P.REMOTE_PROGRAM, P.PROTOCOL_VERSION, proc, P.MsgType.CALL, serial, P.Status.OK))


def test_bridge_relays_after_end_of_input_and_ends_with_the_server(sysd, rpc_dir):
    """stdin ends right after a call: the server's reply still comes out, then the bridge exits 0."""
    p = subprocess.run(entry_point() + ["ssh-bridge", f"secret:///system?socket={sock(rpc_dir)}"],
                       input=_frame(P.Proc.AUTH_LIST, 0), capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout) >= 28 and struct.unpack(">I", p.stdout[:4])[0] == len(p.stdout)
    # the server goes away mid-stream: the bridge ends too, with status 0, nothing on stdout after
    b = subprocess.Popen(entry_point() + ["ssh-bridge", f"secret:///system?socket={sock(rpc_dir)}"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        b.stdin.write(_frame(P.Proc.AUTH_LIST, 0))
        b.stdin.flush()
        reply = b.stdout.read(4)
        assert len(reply) == 4
        sysd.stop()
        b.stdout.read()             # EOF once the server is gone
        assert b.wait(20) == 0
    finally:
        if b.poll() is None:
            b.kill()
            b.wait()


def test_bridge_errors(rpc_dir):
    r = subprocess.run(entry_point() + ["ssh-bridge", f"secret:///system?socket={rpc_dir}/none"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stdout == ""
    assert f"error: Failed to connect socket to '{rpc_dir}/none': No such file or directory" in r.stderr
    r = subprocess.run(entry_point() + ["ssh-bridge", "secret:///embed?root=/tmp"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1 and "ssh-bridge needs secret:///system or secret:///session" in r.stderr
    r = subprocess.run(entry_point() + ["ssh-bridge"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stdout == ""


def test_ssh_binary_missing():
    with pytest.raises(errors.OperationFailed) as ei:
        secretbus.open("secret+ssh://127.0.0.1/system?command=/nonexistent/ssh", timeout=5)
    assert "cannot run '/nonexistent/ssh'" in str(ei.value)


# -- the bench cannot rot ---------------------------------------------------------------------
def test_bench_rpc_remote_smoke(rpc_dir):
    """bench/bench_rpc_remote.py --quick: a row per transport, every figure measured (in a
    short /tmp directory: a unix socket path has at most 107 bytes)."""
    tmp_path = rpc_dir
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_rpc_remote.py"
    r = subprocess.run([sys.executable, str(bench), "--quick", "--secrets", "5",
                        "--calls", "10", "--seconds", "0.2", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines()
            if line.startswith("| unix") or line.startswith("| ssh")}
    assert set(rows) == {"unix", "ssh"}, r.stdout
    for row in rows.values():
        cells = [c.strip().replace(",", "") for c in row.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells[1:]), row
    assert list(tmp_path.iterdir()) == []

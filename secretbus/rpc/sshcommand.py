"""The ssh command line of a secret+ssh:// connection, and what its failure means.

    ssh [-p port] [-l user] [-i keyfile] -T -e none [-o …] -- host sh -c '<script>'

The script runs on the remote host and turns the ssh channel into the RPC stream, trying in
turn (libvirt's virNetClientSSHHelperCommand does the last two the same way):
  1. `secretbus ssh-bridge URI` (this project's bridge, for hosts without libvirt);
  2. `virt-ssh-helper URI` (libvirt's, which picks the socket with mode=auto);
  3. `nc -U SOCKET` (the socket named by socket=, else the direct socket if it exists, else
     libvirtd's legacy socket: the same choice as the helpers make).
`proxy=netcat` keeps only 3, `proxy=native` only 1 and 2; `socket=` skips 2 (virt-ssh-helper
cannot be given a socket), as libvirt forces nc then.

Quoting: ssh hands the remote command to the remote user's login shell as one string. Every
value from the URI goes through `shlex.quote` inside the script, and the script through
`shlex.quote` again as `sh -c`'s argument, so no URI can add shell syntax on either side (the
local side runs ssh without a shell at all). sshuri.py refuses what ssh itself would expand.
"""
from __future__ import annotations

import re
import shlex

from secretbus.rpc.paths import LEGACY_SOCKET_NAME, RO_SOCKET_NAME, SOCKET_NAME, SYSTEM_DIR
from secretbus.rpc.sshuri import SshTarget

NONE_FOUND = "secretbus-ssh: not in the remote PATH:"     # + the programs tried
NONE_FOUND_STATUS = 127
SSH_FAILED = 255            # ssh's own exit status for its errors


def ssh_argv(t: SshTarget, readonly: bool) -> list[str]:
    argv = [t.command]
    if t.port is not None:
        argv += ["-p", str(t.port)]
    if t.user is not None:
        argv += ["-l", t.user]
    if t.keyfile is not None:
        argv += ["-i", str(t.keyfile)]
    argv += ["-T", "-e", "none"]
    if t.no_tty:
        argv += ["-o", "BatchMode=yes"]          # never prompt (libvirt's no_tty)
    if t.no_verify or t.known_hosts_verify == "ignore":
        argv += ["-o", "StrictHostKeyChecking=no"]
    elif t.known_hosts_verify == "auto":
        argv += ["-o", "StrictHostKeyChecking=accept-new"]
    if t.known_hosts is not None:
        argv += ["-o", f"UserKnownHostsFile={t.known_hosts}"]
    return [*argv, "--", t.host, remote_command(t, readonly)]


def _socket_expr(t: SshTarget, readonly: bool) -> str:
    """Shell code that sets $S to the socket nc connects to."""
    if t.socket is not None:
        return f"S={shlex.quote(str(t.socket))}"
    if t.system:
        d = shlex.quote(str(SYSTEM_DIR))
        direct = RO_SOCKET_NAME if readonly else SOCKET_NAME
        legacy = LEGACY_SOCKET_NAME + ("-ro" if readonly else "")
    else:
        d = '"${XDG_RUNTIME_DIR:-/run/user/$(id -u)}/libvirt"'
        direct, legacy = SOCKET_NAME, LEGACY_SOCKET_NAME
    if t.mode == "legacy":
        return f"S={d}/{legacy}"
    return f"S={d}/{direct}; if ! test -S \"$S\" && test -S {d}/{legacy}; then S={d}/{legacy}; fi"


def remote_script(t: SshTarget, readonly: bool) -> str:
    uri = shlex.quote(t.remote_uri())
    ro = " -r" if readonly else ""
    steps, tried = [], []
    if t.proxy != "netcat":
        tried.append("secretbus")
        steps.append(f"if command -v secretbus >/dev/null 2>&1; then exec secretbus{ro} ssh-bridge {uri}; fi")
        if t.socket is None:
            tried.append("virt-ssh-helper")
            steps.append(f"if command -v virt-ssh-helper >/dev/null 2>&1; then exec virt-ssh-helper{ro} {uri}; fi")
    if t.proxy != "native":
        nc = shlex.quote(t.netcat)
        tried.append(t.netcat)
        steps.append(f"if command -v {nc} >/dev/null 2>&1; then {_socket_expr(t, readonly)}; "
                     f"if {nc} -q 2>&1 | grep 'requires an argument' >/dev/null 2>&1; then ARG=-q0; else ARG=; fi; "
                     f"exec {nc} $ARG -U \"$S\"; fi")
    steps.append(f"echo {shlex.quote(NONE_FOUND + ' ' + ', '.join(tried))} >&2; exit {NONE_FOUND_STATUS}")
    return "; ".join(steps)


def remote_command(t: SshTarget, readonly: bool) -> str:
    return "sh -c " + shlex.quote(remote_script(t, readonly))


# -- what went wrong ------------------------------------------------------------------------
_HOST_KEY = re.compile(r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|"
                       r"host key for .* has changed|No \S+ host key is known|Host key .* not verified", re.I)
_AUTH = re.compile(r"Permission denied|Too many authentication failures|no more authentication methods", re.I)
_NOISE = re.compile(r"^(Warning: Permanently added|\*\*|@@)")


def _tail(stderr: str, lines: int = 3, limit: int = 400) -> str:
    kept = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not _NOISE.match(ln.strip())]
    text = "; ".join(kept[-lines:])
    return text if len(text) <= limit else text[:limit] + "…"


def explain(where: str, status: int | None, stderr: str) -> str | None:
    """Why the ssh stream ended, naming the step that failed; None when ssh is still running
    (the stream ended for another reason) or ended without complaint."""
    if status is None or status == 0:
        return None         # ssh still up, or the session ended normally (the server closed)
    said = _tail(stderr)
    if status == SSH_FAILED:
        if _HOST_KEY.search(stderr):
            step = "host key verification"
        elif _AUTH.search(stderr):
            step = "authentication"
        else:
            step = "connection"
        return f"{where}: ssh {step} failed: {said or f'ssh exited with status {status}'}"
    if status == NONE_FOUND_STATUS and NONE_FOUND in stderr:
        return f"{where}: no remote helper: {said.split('secretbus-ssh: ', 1)[-1]}"
    return f"{where}: the remote helper failed (status {status}): {said or 'no message'}"

"""Differential test of the command line: the same `secret-*` command lines run by the real
`virsh` 9.0 and by `secretbus`, against the same secretbusd, compared on stdout, stderr, exit
status and the server's state afterwards.

One secretbusd (the system instance, RPC only) serves both programs through
`secret:///system?socket=…` (`secretbus -c` speaks libvirt RPC for a URI naming a socket,
secretbus/uri.py). Before each program runs a case, the server is put into the case's state
(its secrets, defined and given their values over RPC from this process), so neither program
sees what the other did; the state each leaves behind is compared too (values by digest).
virsh also runs every case against Debian's libvirtd 9.0 (bench/bench_rpc.py's
`start_libvirtd`), so that a difference can be told apart: virsh's formatting (virsh differs
from secretbus on both servers) or the server's answer (virsh's two outputs differ).

Files named by the cases (`{T}/…`) are the same paths for both programs; the UUIDs are the same
too. Nothing is normalised but `--timestamp`'s time. A case whose outputs differ on purpose is
in DELIBERATE (asserting ours, citing docs/libvirt-differences.md); a bug not fixed yet is in
XFAIL (asserting virsh's output, strict). Values are test data, but no assertion message shows
what `secret-get-value` printed: results are compared by equality, and shown as digests.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import harness
import pytest
from harness import reference
from harness.procs import remove_tree

pytestmark = pytest.mark.integration     # root: libvirtd runs in a mount namespace of its own
bench_rpc = harness.load_bench("bench_rpc")
REPO = Path(__file__).resolve().parents[1]

UA = "aaaaaaaa-1111-4111-8111-000000000001"
UB = "bbbbbbbb-2222-4222-8222-000000000002"
UC = "cccccccc-3333-4333-8333-000000000003"
UD = "dddddddd-4444-4444-8444-000000000004"
UE = "eeeeeeee-5555-4555-8555-000000000005"
UF = "ffffffff-6666-4666-8666-000000000006"
UN = "99999999-9999-4999-8999-000000000009"     # never defined


def _xml(uuid: str, usage: str = "", eph: str = "no", priv: str = "no", desc: str | None = None) -> str:
    d = f"<description>{desc}</description>" if desc is not None else ""
    return f"<secret ephemeral='{eph}' private='{priv}'><uuid>{uuid}</uuid>{d}{usage}</secret>"


# name: (definition, value or None)
SECRETS: dict[str, tuple[str, bytes | None]] = {
    "ceph": (_xml(UA, "<usage type='ceph'><name>client.admin secret</name></usage>", desc="ceph key"),
             b"ceph-value\x00\xff\n"),
    "volume": (_xml(UB, "<usage type='volume'><volume>/var/lib/images/disk.img</volume></usage>",
                    priv="yes", desc="a volume's passphrase"), b"volume-value"),
    "iscsi": (_xml(UC, "<usage type='iscsi'><target>iqn.2013-07.com.example:t1</target></usage>", eph="yes"),
              b"iscsi-value"),
    "tls": (_xml(UD, "<usage type='tls'><name>tls-x509</name></usage>", eph="yes", priv="yes"), None),
    "vtpm": (_xml(UE, "<usage type='vtpm'><name>vm-1 vtpm</name></usage>", desc="vTPM of vm-1"),
             b"vtpm-value"),
    "none": (_xml(UF), None),
}
ALL = tuple(SECRETS)

# Files the cases name as {T}/NAME (bytes written before any case runs).
FILES: dict[str, bytes] = {
    "new.xml": _xml(UN, "<usage type='ceph'><name>new one</name></usage>").encode(),
    "redefine.xml": _xml(UA, "<usage type='ceph'><name>client.admin secret</name></usage>",
                         desc="changed").encode(),
    "nouuid.xml": b"<secret ephemeral='no' private='no'><usage type='ceph'><name>no uuid</name></usage></secret>",
    "clash.xml": _xml(UN, "<usage type='ceph'><name>client.admin secret</name></usage>").encode(),
    "badusage.xml": _xml(UN, "<usage type='passphrase'><name>x</name></usage>").encode(),
    "notwf.xml": b"<secret ephemeral='no'><uuid>" + UN.encode() + b"</uuid>\n<usage type='ceph'>\n</secret>\n",
    "root.xml": b"<volume/>",
    "invalid.xml": _xml(UN, "<usage type='ceph'><name>v</name></usage>").replace(
        "<secret ", "<secret bogus='1' ").encode(),
    "badattr.xml": _xml(UN, "<usage type='ceph'><name>v</name></usage>", eph="maybe").encode(),
    "empty": b"",
    "value.b64": b"ZmlsZS12YWx1ZQ==\n",          # "file-value", with base64(1)'s newline
    "wrapped.b64": b"ZmlsZS12YWx1ZS1maWxlLXZhbHVlLWZpbGUtdmFsdWUtZmlsZS12YWx1ZS1maWxlLXZh\nbHVl\n",
    "value.raw": b"raw\x00value\n",
    "bad.b64": b"%%not base64%%\n",
}


@dataclass(frozen=True)
class Case:
    line: str                                   # the words after `PROG -c URI`, shlex syntax
    state: tuple[str, ...] = ALL                # SECRETS defined (with their values) before it runs
    stdin: bytes = b""
    top: tuple[str, ...] = ()                   # options before -c

    @property
    def id(self) -> str:
        t = " ".join(self.top)
        s = "" if self.state == ALL else "[" + ",".join(self.state) + "] "
        return (t + " " if t else "") + s + self.line + (" <" + repr(self.stdin) if self.stdin else "")

    def argv(self, tmp: Path) -> list[str]:
        subst = {"T": str(tmp), "A": UA, "B": UB, "C": UC, "D": UD, "E": UE, "F": UF, "N": UN}
        return [re.sub(r"\{([A-Z])\}", lambda m: subst[m.group(1)], w) for w in shlex.split(self.line)]


def C(line: str, *state: str, stdin: bytes = b"", top: tuple[str, ...] = (), empty: bool = False) -> Case:
    """A case run on the SECRETS named in `state` (all of them if none is named, none if `empty`)."""
    return Case(line, () if empty else tuple(state) if state else ALL, stdin, top)


CASES: list[Case] = [
    # -- secret-define ---------------------------------------------------------------------
    C("secret-define {T}/new.xml"),
    C("secret-define --file {T}/new.xml"),
    C("secret-define --file={T}/new.xml --validate"),
    C("secret-define --validate {T}/new.xml", "none"),
    C("secret-define {T}/new.xml", top=("-q",)),
    C("secret-define {T}/redefine.xml"),
    C("secret-define {T}/nouuid.xml", "none"),
    C("secret-define {T}/missing.xml"),
    C("secret-define {T}"),
    C("secret-define {T}/empty"),
    C("secret-define {T}/notwf.xml"),
    C("secret-define {T}/root.xml"),
    C("secret-define {T}/clash.xml"),
    C("secret-define {T}/badusage.xml"),
    C("secret-define {T}/badattr.xml"),
    C("secret-define {T}/invalid.xml"),
    C("secret-define {T}/invalid.xml --validate"),
    C("secret-define {T}/new.xml extra"),
    C("secret-define --bogus {T}/new.xml"),
    C("secret-define"),
    C("secret-define --file"),
    C("secret-define ''"),
    C("secret-define {T}/missing.xml", top=("-q",)),
    # -- secret-dumpxml ----------------------------------------------------------------------
    C("secret-dumpxml {A}"),
    C("secret-dumpxml --secret {B}"),
    C("secret-dumpxml --secret={C}"),
    C("secret-dumpxml {D}"),
    C("secret-dumpxml {E}", top=("-q",)),
    C("secret-dumpxml {F}"),
    C("secret-dumpxml {A}", "ceph", top=("--quiet",)),
    C("secret-dumpxml 'client.admin secret'"),          # virsh 9.0 looks secrets up by UUID only
    C("secret-dumpxml /var/lib/images/disk.img"),
    C("secret-dumpxml {N}"),
    C("secret-dumpxml not-a-uuid"),
    C("secret-dumpxml AAAAAAAA-1111-4111-8111-000000000001"),
    C("secret-dumpxml aaaaaaaa11114111811100000000000 1"),
    C("secret-dumpxml aaaaaaaa111141118111000000000001"),
    C("secret-dumpxml ' {A}'"),
    C("secret-dumpxml '{A} '"),
    C("secret-dumpxml {A}-"),
    C("secret-dumpxml '\t{A}'"),
    C("secret-dumpxml '{A}\t'"),
    C("secret-dumpxml -{A}"),
    C("secret-dumpxml {A} --xpath /secret/usage/name/text()"),
    C("secret-dumpxml {A} --xpath=/secret/@private --wrap"),
    C("secret-dumpxml {A} --xpath //nothing"),
    C("secret-dumpxml {A} extra"),
    C("secret-dumpxml"),
    C("secret-dumpxml --secret"),
    C("secret-dumpxml --uuid {A}"),
    # -- secret-list --------------------------------------------------------------------------
    C("secret-list", empty=True),
    C("secret-list", empty=True, top=("-q",)),
    C("secret-list --private --no-ephemeral", empty=True),
    C("secret-list"),
    C("secret-list", "ceph"),
    C("secret-list --ephemeral"),
    C("secret-list --no-ephemeral"),
    C("secret-list --private"),
    C("secret-list --no-private"),
    C("secret-list --ephemeral --private"),
    C("secret-list --ephemeral --no-private"),
    C("secret-list --no-ephemeral --private"),
    C("secret-list --no-ephemeral --no-private"),
    C("secret-list --ephemeral --no-ephemeral"),
    C("secret-list --private --no-private"),
    C("secret-list --ephemeral --no-ephemeral --private --no-private"),
    C("secret-list --private", "ceph"),
    C("secret-list", top=("-q",)),
    C("secret-list --private", "ceph", top=("-q",)),
    C("secret-list --all"),
    C("secret-list --private=yes"),
    C("secret-list --private --private"),
    C("secret-list extra"),
    # -- secret-set-value -----------------------------------------------------------------------
    C("secret-set-value {A} dmFsdWU="),
    C("secret-set-value {F} --base64 dmFsdWU="),
    C("secret-set-value --secret={F} --base64=dmFsdWU="),
    C("secret-set-value --base64 dmFsdWU= {F}"),
    C("secret-set-value {A} dmFsdWU=", top=("-q",)),
    C("secret-set-value {A} 'dmFs dWU='"),
    C("secret-set-value {A} '%%not base64%%'"),
    C("secret-set-value {A} dmFsdWU"),
    C("secret-set-value {A} ''"),
    C("secret-set-value {A} --file {T}/value.b64"),
    C("secret-set-value {A} --file={T}/wrapped.b64"),
    C("secret-set-value {A} --file {T}/value.raw --plain"),
    C("secret-set-value {A} --plain --file {T}/value.b64"),
    C("secret-set-value {A} --file {T}/bad.b64"),
    C("secret-set-value {A} --file {T}/value.raw"),
    C("secret-set-value {A} --base64=''"),
    C("secret-set-value {C} --file {T}/value.b64"),
    C("secret-set-value {A} --file {T}/empty"),
    C("secret-set-value {A} --file {T}/empty --plain"),
    C("secret-set-value {A} --file {T}/missing"),
    C("secret-set-value {A} --file {T}/value.b64", top=("-q",)),
    C("secret-set-value {A} --interactive", stdin=b"typed value\n"),
    C("secret-set-value {A} --interactive", stdin=b"\n"),
    C("secret-set-value {A} --interactive", stdin=b""),
    C("secret-set-value {A} --interactive", stdin=b"typed value\n", top=("-q",)),
    C("secret-set-value {A}"),
    C("secret-set-value {A} --plain"),
    C("secret-set-value {A} --file {T}/value.b64 dmFsdWU="),
    C("secret-set-value {A} --plain dmFsdWU="),
    C("secret-set-value {A} --interactive dmFsdWU="),
    C("secret-set-value {A} --interactive --plain"),
    C("secret-set-value {A} --interactive --file {T}/value.b64"),
    C("secret-set-value {N} dmFsdWU="),
    C("secret-set-value {N} --file {T}/value.b64"),
    C("secret-set-value not-a-uuid dmFsdWU="),
    C("secret-set-value {A} dmFsdWU= extra"),
    C("secret-set-value {A} {T}/value.b64 --file {T}/value.b64"),
    C("secret-set-value"),
    C("secret-set-value {A} --file"),
    C("secret-set-value {A} --value dmFsdWU="),
    C("secret-set-value {B} dmFsdWU="),
    C("secret-set-value {D} dmFsdWU="),
    # -- secret-get-value -----------------------------------------------------------------------
    C("secret-get-value {A}"),
    C("secret-get-value {A} --plain"),
    C("secret-get-value --secret {A} --plain"),
    C("secret-get-value --secret={E}"),
    C("secret-get-value {A}", top=("-q",)),
    C("secret-get-value {A} --plain", top=("-q",)),
    C("secret-get-value {B}"),
    C("secret-get-value {B} --plain"),
    C("secret-get-value {F}"),
    C("secret-get-value {D}"),
    C("secret-get-value {F}", top=("-q",)),
    C("secret-get-value {C}"),
    C("secret-get-value {C} --plain"),
    C("secret-get-value {N}"),
    C("secret-get-value not-a-uuid"),
    C("secret-get-value {A} extra"),
    C("secret-get-value {A} --plain=1"),
    C("secret-get-value"),
    C("secret-get-value --secret"),
    # -- secret-undefine ------------------------------------------------------------------------
    C("secret-undefine {A}"),
    C("secret-undefine --secret {C}"),
    C("secret-undefine --secret={B}"),
    C("secret-undefine {A}", top=("-q",)),
    C("secret-undefine {N}"),
    C("secret-undefine {N}", top=("-q",)),
    C("secret-undefine {A}", "volume", "iscsi", "tls", "vtpm", "none"),     # the second undefine of A
    C("secret-undefine {D}"),
    C("secret-undefine not-a-uuid"),
    C("secret-undefine {A} {B}"),
    C("secret-undefine"),
    C("secret-undefine --secret"),
    C("secret-undefine --force {A}"),
    # -- secret-event: what ends at once -----------------------------------------------------------
    C("secret-event --list"),
    C("secret-event --list", top=("-q",)),
    C("secret-event --list --event lifecycle"),
    C("secret-event"),
    C("secret-event --event bogus"),
    C("secret-event --event=bogus --timeout 1"),
    C("secret-event --event Lifecycle --timeout 1"),
    C("secret-event --event lifecycle --timeout 0"),
    C("secret-event --event lifecycle --timeout -1"),
    C("secret-event --event lifecycle --timeout abc"),
    C("secret-event --event lifecycle --timeout"),
    C("secret-event --event lifecycle --secret not-a-uuid --timeout 1"),
    C("secret-event --event lifecycle --loop=1"),
    C("secret-event {A} lifecycle 1 extra"),
    C("secret-event --bogus"),
    # -- the top level ---------------------------------------------------------------------------
    C("secret-bogus"),
    C("secret-list", top=("-x",)),
    C("secret-list", top=("--bogus",)),
    C("help secret-undefine"),
    C("help --command secret-list"),
    C("help --command=secret-get-value"),
    C("help -- secret-list"),
    C("help secret-list extra"),
    C("help --bogus secret-event"),
    C("help secret"),
    C("help secret", top=("-q",)),
    C("help --command"),
    C("help secret-bogus"),
    C("help secret-bogus", top=("-q",)),
    C("secret-undefine --help"),
    C("secret-set-value --help"),
    C("secret-list --help --help"),
    C("secret-list --help extra"),
    C("secret-list --help --bogus"),
    C("secret-dumpxml --help --xpath"),
    C("secret-dumpxml --help x y"),
]

# secret-event cases that wait, run by all programs at once on state ALL, in three batches:
# WAITS see no event and time out; ONE_SHOT are sent events until all have ended (ceph defined,
# ceph's then vtpm's value set); LOOPS are sent LOOP_EVENTS once.
WAITS: list[str] = [
    "secret-event --event lifecycle --timeout 1",
    "secret-event --event=value-changed --timeout=1",
    "secret-event --event lifecycle --loop --timeout 1",
    "secret-event --event lifecycle --timeout 1 --timestamp",
    "secret-event {A} lifecycle 1",
    "secret-event --secret {A} --event value-changed --timeout 1",
    "secret-event --event lifecycle --secret {N} --timeout 1",
    "-q secret-event --event lifecycle --timeout 1",
]


ONE_SHOT: list[str] = [
    "secret-event --event lifecycle --timeout 10",
    "secret-event --event lifecycle --timeout 10 --timestamp",
    "secret-event --event value-changed --secret {E} --timeout 10",
    "secret-event {A} value-changed 10",
    "-q secret-event --secret={A} --event=value-changed --timeout=10",
]
ONE_SHOT_EVENTS = (("define", "ceph"), ("set", "ceph"), ("set", "vtpm"))
LOOPS: list[str] = [
    "secret-event --event lifecycle --loop --timeout 3",
    "secret-event --event value-changed --loop --timeout 3",
    "secret-event --event value-changed --secret {A} --loop --timeout 3 --timestamp",
    "-q secret-event --event lifecycle --loop --timeout 3",
]
LOOP_EVENTS = (("undefine", "none"), ("set", "ceph"), ("define", "none"), ("set", "vtpm"), ("set", "ceph"))


# -- running the programs ----------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SECRETBUS_DEFAULT_URI", "LIBVIRT_DEFAULT_URI", "VIRSH_DEFAULT_CONNECT_URI",
                        "LIBVIRT_DEBUG", "VIRSH_DEBUG", "LANGUAGE")}
    env.update(LC_ALL="C", LANG="C", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    return env


SECRETBUS = [sys.executable, "-m", "secretbus.cli"]     # this checkout's code (PYTHONPATH, _env)
VIRSH = ["virsh"]


@dataclass
class Result:
    rc: int
    stdout: bytes
    stderr: bytes
    state: tuple[Any, ...] = ()
    secret_output: bool = False     # stdout may hold a value: shown as a digest only

    def key(self) -> tuple[Any, ...]:
        return (self.rc, self.stdout, self.stderr, self.state)

    def __repr__(self) -> str:
        out = (f"<{len(self.stdout)} bytes, sha256 {hashlib.sha256(self.stdout).hexdigest()[:16]}>"
               if self.secret_output else repr(self.stdout.decode("utf-8", "backslashreplace")))
        return (f"Result(rc={self.rc}, stdout={out}, stderr={self.stderr.decode('utf-8', 'backslashreplace')!r}, "
                f"state={self.state!r})")


TIMESTAMP = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\+0000: ", re.M)
UUID_RE = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
OURS = {UA, UB, UC, UD, UE, UF, UN}


def _generated(text: str) -> str:
    """A UUID the server made up (a definition without one) is not the same twice."""
    return re.sub(UUID_RE, lambda m: m.group(0) if m.group(0) in OURS else "<generated-uuid>", text)


# virsh's own refcount warning when an event was still queued as it closed (one-shot waits while
# more events come): a race inside virsh, whichever server sent the event, not its output.
LEAKED = b"error: One or more references were leaked after disconnect from the hypervisor\n"


def _result(p: subprocess.CompletedProcess, words: list[str]) -> Result:
    out = TIMESTAMP.sub(b"<time>: ", p.stdout)
    if "secret-get-value" not in words:
        out = _generated(out.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
    err = p.stderr.replace(LEAKED, b"") if "secret-event" in words else p.stderr
    return Result(p.returncode, out, err, secret_output="secret-get-value" in words)


class Server:
    """One server (its URI), and this process's RPC connection to it for setting states."""

    def __init__(self, uri: str):
        from secretbus.uri import open_connection
        self.uri = uri
        self.conn = open_connection(uri)

    def reset(self, state: tuple[str, ...]) -> None:
        for s in self.conn.list_secrets():
            self.conn.secret_undefine(s.uuid)
        for name in state:
            xml, value = SECRETS[name]
            s = self.conn.define_xml(xml)
            if value is not None:
                self.conn.secret_set_value(s.uuid, value)

    def act(self, what: str, name: str) -> None:
        xml, value = SECRETS[name]
        uuid = xml.partition("<uuid>")[2].partition("</uuid>")[0]
        if what == "define":
            self.conn.define_xml(xml)
        elif what == "undefine":
            self.conn.secret_undefine(uuid)
        else:
            self.conn.secret_set_value(uuid, value or b"v")

    def state(self) -> tuple[Any, ...]:
        from secretbus.core import errors
        out = []
        for s in sorted(self.conn.list_secrets(), key=lambda s: _generated(s.uuid)):
            try:
                digest = hashlib.sha256(self.conn.secret_get_value(s.uuid)).hexdigest()[:16]
            except errors.SecretError as e:
                digest = type(e).__name__       # private (refused over RPC), or no value
            out.append((_generated(s.uuid), _generated(self.conn.secret_xml_desc(s.uuid)), digest))
        return tuple(out)


def run(prog: list[str], server: Server, words: list[str], top: tuple[str, ...], stdin: bytes,
        timeout: float = 30) -> Result:
    p = subprocess.run([*prog, *top, "-c", server.uri, *words], input=stdin, capture_output=True,
                       timeout=timeout, env=_env())
    return _result(p, words)


def run_case(prog: list[str], server: Server, case: Case, tmp: Path) -> Result:
    server.reset(case.state)
    r = run(prog, server, case.argv(tmp), case.top, case.stdin)
    r.state = server.state()
    return r


READ_ONLY = {"secret-dumpxml", "secret-get-value", "secret-list", "secret-event", "help"}


def run_cases(progs: dict[str, tuple[list[str], Server]], tmp: Path) -> dict[str, dict[str, Result]]:
    """Every CASE by every program. Those of a command that changes nothing and on state ALL
    run two at a time on one reset (the state is checked unchanged after them); the others
    one by one, each on its state."""
    out: dict[str, dict[str, Result]] = {c.id: {} for c in CASES}
    servers = list({id(s): s for _p, s in progs.values()}.values())
    shared = [c for c in CASES if c.state == ALL and c.argv(tmp)[0] in READ_ONLY]
    for s in servers:
        s.reset(ALL)
    before = [s.state() for s in servers]
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {(c.id, name): pool.submit(run, prog, server, c.argv(tmp), c.top, c.stdin)
                for c in shared for name, (prog, server) in progs.items()}
        for (cid, name), job in jobs.items():
            out[cid][name] = job.result()
    assert [s.state() for s in servers] == before, "a read-only case changed the server's state"
    for c in CASES:
        if c not in shared:
            out[c.id] = {name: run_case(prog, server, c, tmp) for name, (prog, server) in progs.items()}
    return out


def _split(line: str, tmp: Path) -> tuple[tuple[str, ...], list[str]]:
    words = Case(line).argv(tmp)
    top = tuple(w for w in words[:1] if w.startswith("-"))
    return top, words[len(top):]


def _spawn(prog: list[str], server: Server, line: str, tmp: Path) -> tuple[subprocess.Popen, list[str]]:
    top, words = _split(line, tmp)
    p = subprocess.Popen([*prog, *top, "-c", server.uri, *words], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    return p, words


def _collect(p: subprocess.Popen, words: list[str], timeout: float = 30) -> Result:
    out, err = p.communicate(timeout=timeout)
    return _result(subprocess.CompletedProcess(p.args, p.returncode, out, err), words)


def _connected(p: subprocess.Popen) -> bool:
    """The process holds a socket (its connection to the server) or is gone already."""
    try:
        return any(os.readlink(f"/proc/{p.pid}/fd/{fd}").startswith("socket:")
                   for fd in os.listdir(f"/proc/{p.pid}/fd"))
    except OSError:
        return True


def _batch(progs: dict[str, tuple[list[str], Server]], lines: list[str], tmp: Path,
           trigger: Callable[[], bool] | None = None) -> dict[str, dict[str, Result]]:
    """`lines` run by every program at once, on state ALL. `trigger`, once all are connected,
    sends events (again while it answers True, until all programs have ended)."""
    for s in {id(s): s for _p, s in progs.values()}.values():
        s.reset(ALL)
    procs = {(name, line): _spawn(prog, server, line, tmp) for line in lines for name, (prog, server) in progs.items()}
    if trigger is not None:
        deadline = time.monotonic() + 10
        while not all(_connected(p) for p, _w in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)             # connected; each registers its callback right after
        while trigger() and time.monotonic() < deadline:
            # A one-shot wait ends at its first event; more events while virsh closes make it
            # say "One or more references were leaked": give them time to end before more.
            end = time.monotonic() + 1
            while time.monotonic() < end and not all(p.poll() is not None for p, _w in procs.values()):
                time.sleep(0.05)
            if all(p.poll() is not None for p, _w in procs.values()):
                break
    out: dict[str, dict[str, Result]] = {line: {} for line in lines}
    for (name, line), (p, words) in procs.items():
        out[line][name] = _collect(p, words)
    return out


def _actions(servers: list[Server], actions: tuple[tuple[str, str], ...], again: bool) -> Callable[[], bool]:
    def send() -> bool:
        for what, name in actions:
            for s in servers:
                s.act(what, name)
        return again
    return send


# -- the module's runs ------------------------------------------------------------------------
def _have() -> str | None:
    if shutil.which("virsh") is None:
        return "virsh (libvirt-clients) not installed"
    v = subprocess.run(["virsh", "--version"], capture_output=True, text=True)
    if not v.stdout.startswith("9.0."):
        return f"virsh {v.stdout.strip()} is not 9.0, whose texts secretbus follows"
    return reference.missing_libvirtd()


@pytest.fixture(scope="module")
def runs():
    why = _have()
    if why:
        pytest.skip(why)
    work = harness.public_tempdir("sb-clidiff-")
    procs, daemons, servers = bench_rpc.Procs(), [], []
    try:
        tmp = work / "files"
        tmp.mkdir()
        for name, data in FILES.items():
            (tmp / name).write_bytes(data)
        empty = work / "empty"
        empty.mkdir(mode=0o700)
        s = reference.start_secretbusd(daemons, work, None, 0)
        lv = reference.start_libvirtd(procs, work / "lv", empty, 0)
        sb, lvd = Server(s.uri), Server(lv.uri)
        servers += [sb, lvd]
        where = subprocess.run([*SECRETBUS[:1], "-c", "import secretbus; print(secretbus.__file__)"],
                               capture_output=True, text=True, env=_env(), cwd="/")
        assert where.stdout.strip() == str(REPO / "secretbus" / "__init__.py"), where
        both = {"virsh": (VIRSH, sb), "secretbus": (SECRETBUS, sb)}
        cases = run_cases(both, tmp)
        # virsh against libvirtd where the two differ: virsh's formatting, or the server's answer?
        for case in CASES:
            r = cases[case.id]
            if r["virsh"].key() != r["secretbus"].key():
                r["virsh@libvirtd"] = run_case(VIRSH, lvd, case, tmp)
        every = {**both, "virsh@libvirtd": (VIRSH, lvd)}
        cases.update(_batch(every, WAITS, tmp))
        cases.update(_batch(every, ONE_SHOT, tmp, _actions([sb, lvd], ONE_SHOT_EVENTS, True)))
        cases.update(_batch(every, LOOPS, tmp, _actions([sb, lvd], LOOP_EVENTS, False)))
        yield SimpleNamespace(tmp=tmp, cases=cases)
    finally:
        for srv in servers:
            srv.conn.close()
        for d in daemons:
            d.cleanup()
        procs.stop_all()
        remove_tree(work)


# -- triage --------------------------------------------------------------------------------------
# case id: (where docs/libvirt-differences.md says so, a check of (virsh's result, ours)).
Check = Callable[[Result, Result], None]
DOC = "docs/libvirt-differences.md"
PROMPT = b"Enter new value for secret:"
NOT_BASE64 = b"error: Failed to set secret value\nerror: secret value is not valid base64\n"
INSECURE = b"error: Passing secret value as command-line argument is insecure!\n"


def _value_of(state: tuple[Any, ...], uuid: str) -> str:
    return next(digest for u, _xml, digest in state if u == uuid)


def _refused_b64(warned: bool) -> Check:
    def check(v: Result, ours: Result) -> None:
        assert v.rc == 0 and v.stdout == b"Secret value set\n\n"        # virsh stored what it made of it
        assert (ours.rc, ours.stdout, ours.stderr) == (1, b"\n", (INSECURE if warned else b"") + NOT_BASE64)
        old = hashlib.sha256(SECRETS["ceph"][1] or b"").hexdigest()[:16]
        assert _value_of(ours.state, UA) == old != _value_of(v.state, UA)      # ours kept the old value
    return check


def _raw_refused(v: Result, ours: Result) -> None:
    assert v.stderr == b"error: Failed to set secret value\nerror: value in virSecretSetValue must not be NULL\n"
    assert (ours.rc, ours.stdout, ours.stderr, ours.state) == (v.rc, v.stdout, NOT_BASE64, v.state)


def _prompt_on_stderr(v: Result, ours: Result) -> None:
    """The prompt goes to stderr (stdin is no terminal here), with a newline after the answer."""
    assert v.stdout.startswith(PROMPT)
    assert (ours.rc, ours.stdout, ours.stderr, ours.state) == (
        v.rc, v.stdout[len(PROMPT):], PROMPT + b"\n" + v.stderr, v.state)


def _interactive_eof(v: Result, ours: Result) -> None:
    # virsh sends the empty value, which the RPC refuses (row 3: it arrives as NULL); ours
    # sends nothing. Either way the old value stays.
    assert v.stderr == b"error: Failed to set secret value\nerror: value in virSecretSetValue must not be NULL\n"
    assert (ours.rc, ours.stdout, ours.state) == (v.rc, v.stdout[len(PROMPT):], v.state)
    assert ours.stderr == PROMPT + b"\nerror: Failed to read secret: end of input before any value\n"


def _event_lookup_ends(v: Result, ours: Result) -> None:
    assert v.stdout == b"event loop timed out\nevents received: 0\n\n"     # virsh waited for all secrets
    assert (ours.rc, ours.stdout, ours.stderr) == (1, b"\n", v.stderr)


ROW_B64 = f"{DOC} #6 and Command line: 'base64 input with invalid characters ...' (strict decoding)"
ROW_PROMPT = f"{DOC} Command line: 'The prompt `Enter new value for secret:` goes to stdout.'"
DELIBERATE: dict[str, tuple[str, Check]] = {
    "secret-set-value {A} '%%not base64%%'": (ROW_B64, _refused_b64(True)),
    # no padding is not base64 either (RFC 4648 §3.2); virsh's g_base64_decode takes it
    "secret-set-value {A} dmFsdWU": (ROW_B64, _refused_b64(True)),
    "secret-set-value {A} --file {T}/bad.b64": (ROW_B64, _refused_b64(False)),
    # virsh reads the file as a C string: "raw" (before the NUL), decoded to nothing, then refused
    "secret-set-value {A} --file {T}/value.raw": (ROW_B64, _raw_refused),
    "secret-set-value {A} --interactive <b'typed value\\n'": (ROW_PROMPT, _prompt_on_stderr),
    "secret-set-value {A} --interactive <b'\\n'": (ROW_PROMPT, _prompt_on_stderr),
    "-q secret-set-value {A} --interactive <b'typed value\\n'": (ROW_PROMPT, _prompt_on_stderr),
    "secret-set-value {A} --interactive": (f"{DOC} Command line: '--interactive reading end of input'",
                                           _interactive_eof),
    "secret-event --event lifecycle --secret not-a-uuid --timeout 1":
        (f"{DOC} Command line: 'secret-event --secret X with an unknown X'", _event_lookup_ends),
    "secret-event --event lifecycle --secret {N} --timeout 1":
        (f"{DOC} Command line: 'secret-event --secret X with an unknown X'", _event_lookup_ends),
}
# case id: why (virsh's output is asserted, strict xfail)
XFAIL: dict[str, str] = {}     # none now


def _differences(results: dict[str, Result]) -> str:
    """What differs, field by field (a stdout that may hold a value: only its digest)."""
    v, ours = results["virsh"], results["secretbus"]
    lines = []
    for f in ("rc", "stdout", "stderr"):
        a, b = getattr(v, f), getattr(ours, f)
        if a != b:
            if f == "stdout" and v.secret_output:
                a, b = (f"<{len(x)} bytes, sha256 {hashlib.sha256(x).hexdigest()[:16]}>" for x in (a, b))
            lines.append(f"{f}: virsh {a!r}\n{' ' * len(f)}  ours  {b!r}")
    if v.state != ours.state:
        lines.append(f"state: virsh only {set(v.state) - set(ours.state)}\n"
                     f"       ours only  {set(ours.state) - set(v.state)}")
    lv = results.get("virsh@libvirtd")
    if lv is not None:
        same = (lv.rc, lv.stdout, lv.stderr) == (v.rc, v.stdout, v.stderr)
        lines.append("virsh against libvirtd: " + ("the same as against secretbusd" if same else repr(lv)))
    return "\n".join(lines)


def _compare(results: dict[str, Result], cid: str) -> None:
    v, ours = results["virsh"], results["secretbus"]
    if cid in DELIBERATE:
        _doc, check = DELIBERATE[cid]
        assert v.key() != ours.key(), "documented as different, but virsh now prints the same"
        check(v, ours)
        return
    assert ours.key() == v.key(), _differences(results)


ALL_IDS = [c.id for c in CASES] + WAITS + ONE_SHOT + LOOPS


def _results(runs: SimpleNamespace, cid: str) -> dict[str, Result]:
    return runs.cases[cid]


def _params() -> list[Any]:
    return [pytest.param(cid, marks=pytest.mark.xfail(strict=True, reason=XFAIL[cid])) if cid in XFAIL
            else cid for cid in ALL_IDS]


def test_case_ids_are_unique():
    assert len(set(ALL_IDS)) == len(ALL_IDS)
    assert set(DELIBERATE) | set(XFAIL) <= set(ALL_IDS)


@pytest.mark.parametrize("cid", _params())
def test_same_as_virsh(runs, cid):
    _compare(_results(runs, cid), cid)


# What the event batches must have seen (virsh's count; so that no case passes because neither
# program was sent anything): ONE_SHOT one event each, LOOPS what LOOP_EVENTS make.
EVENTS_SEEN = {**dict.fromkeys(ONE_SHOT, 1), LOOPS[0]: 2, LOOPS[1]: 3, LOOPS[2]: 2, LOOPS[3]: 2}


@pytest.mark.parametrize("cid", ONE_SHOT + LOOPS)
def test_events_were_sent_and_libvirtd_agrees(runs, cid):
    r = runs.cases[cid]
    assert r["virsh"].stdout.endswith(f"events received: {EVENTS_SEEN[cid]}\n".encode() +
                                      (b"" if cid.startswith("-q") else b"\n")), r["virsh"]
    lv = r["virsh@libvirtd"]
    assert (lv.rc, lv.stdout, lv.stderr) == (r["virsh"].rc, r["virsh"].stdout, r["virsh"].stderr)

#!/usr/bin/env python3
"""Store failure modes: a damaged store, and a full disk.

    python bench/corruption.py [--size small|full] [--keep] [--journal] [--disk tmpfs|fsize]

1. Corruption: damage an encrypted store in every known way, start the real daemon, check that
it serves the healthy secrets, skips exactly the damaged ones (each with a log line naming the
secret and the kind of damage) and deletes or changes nothing.

Run as root. The daemon is NOT root: `secretbusd --session --root DIR` runs as the test user
`sbtest-member` (through setpriv, with Debian's python3 and a copy of the packages, see
tests/harness/unpriv.py) on a private session bus owned by that user, so that a file of mode 000
really is unreadable to it. The store is built with the embedded driver (AES-256-GCM, key from
DIR/etc/secret.conf), then damaged, then handed to the user (chown). Clients are a dbus-fast
script run as the same user. After the checks, SIGHUP makes the daemon load the damaged store a
second time (the same skips are expected), then SIGTERM; the store directory (names, modes,
owners, contents) is compared with its state before the daemon started.

Damage kinds (each one secret, or two for the swap and the usage clash; "full" injects several
of each, with random cut points and bit positions, and more healthy secrets):
    truncated value          gcm file cut inside a base64 quantum        -> skipped, "truncated"
    empty value file         gcm file of 0 bytes                         -> skipped, "truncated"
    flipped bit              one bit of the ciphertext or tag            -> skipped, "failed authentication"
    value files swapped      A's and B's value files exchanged           -> both skipped, "belongs to another secret",
                                                                            naming the other
    not base64               value file of foreign bytes                 -> skipped, "not valid base64"
    wrong key                value encrypted with another key            -> skipped, "encrypted with a different key"
    unreadable value file    mode 000 (daemon not root)                  -> skipped, "cannot read: Permission denied"
    unreadable XML           mode 000                                    -> skipped, "cannot read: Permission denied"
    malformed XML            the XML cut in half                         -> skipped, "invalid XML"
    UUID differs from name   F.xml holds <uuid>G</uuid>                  -> skipped,
                                                                            "G does not match secret file name 'F.xml'"
    duplicate usage          two files, same usage; older mtime wins     -> newer skipped,
                                                                            "already defined for use with"
    two value files          .base64 (older) and .aes256gcm (newer)      -> GCM value served,
                                                                            warning "has 2 value files"
                             (a .base64 beside a .aes256gcm is never read, even if newer)
    stale temp file          <uuid>.aes256gcm.new left by a crash        -> removed (the one deletion allowed),
                                                                            warning; secret served
    symlink                  value file replaced by a symlink            -> skipped, "cannot read" (O_NOFOLLOW)
    directory                a directory named <uuid>.aes256gcm          -> skipped, "cannot read: not a regular file"

A FIFO in place of a value or XML file is tried in a store of its own (`fifo_run()`): opening it
for reading blocks until a writer appears, so start-up must skip it rather than open it.

2. Full disk (`full_disk()`): the store directory is a small tmpfs (`mount -t tmpfs -o size=1m`;
where mounting is not allowed, RLIMIT_FSIZE set on the running daemon with prlimit(1) stands in:
writes then fail with EFBIG instead of ENOSPC). secretbusd runs as root on a private session
bus. With the disk nearly full (16 KiB left) a 64 KiB SetValue fails part-way through its write;
with room for one small file, an ephemeral->persistent redefine writes the value file but not
the XML (the value file must be removed again); with the disk full, SetValue (with and without
an old value), a redefine, a new define and an ephemeral->persistent redefine fail over D-Bus,
and set-value / redefine / new define fail through the CLI. Each must answer a clear error
(org.libvirt.Error.SystemError naming the file and "No space left on device") and leave the
previous value, XML and directory unchanged, also after a restart; once space is freed, the same
writes succeed without a restart.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402
from harness.procs import remove_tree  # noqa: E402

from secretbus.bus.names import secret_path as spath  # noqa: E402

USER = "sbtest-member"
BUS_NAME = "org.libvirt.secret"

# Runs as the test user: asks the daemon about every secret, prints JSON.
CLIENT = r'''
import asyncio, base64, json, sys
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from secretbus.bus.names import BUS_NAME as NAME, secret_path as spath, uuid_from_path

async def call(bus, path, iface, member, sig, body):
    r = await bus.call(Message(destination=NAME, path=path, interface=iface, member=member, signature=sig, body=body))
    if r.message_type is MessageType.ERROR:
        return {"error": r.error_name, "message": r.body[0] if r.body else ""}
    return {"ok": r.body}

async def main():
    address, uuids = sys.argv[1], json.loads(sys.argv[2])
    bus = await MessageBus(bus_address=address).connect()
    out = {"list": None, "lookup": {}, "value": {}}
    r = await call(bus, "/org/libvirt/secret", "org.libvirt.Connect", "ListSecrets", "u", [0])
    out["list"] = sorted(uuid_from_path(p) for p in r["ok"][0]) if "ok" in r else r
    for u in uuids:
        r = await call(bus, "/org/libvirt/secret", "org.libvirt.Connect", "SecretLookupByUUID", "s", [u])
        out["lookup"][u] = "ok" if "ok" in r else r
        r = await call(bus, spath(u), "org.libvirt.Secret", "GetValue", "u", [0])
        out["value"][u] = {"b64": base64.b64encode(bytes(r["ok"][0])).decode()} if "ok" in r else r
    bus.disconnect()
    print(json.dumps(out))

asyncio.run(main())
'''


def xml_text(uuid: str, usage_id: str, desc: str = "") -> str:
    d = f"  <description>{desc}</description>\n" if desc else ""
    return (f"<secret ephemeral='no' private='no'>\n  <uuid>{uuid}</uuid>\n{d}"
            f"  <usage type='ceph'>\n    <name>{usage_id}</name>\n  </usage>\n</secret>\n")


@dataclass
class Expect:
    """What the daemon should do with one secret."""

    uuid: str
    kind: str                           # damage kind, or "healthy"
    served: bool
    value: bytes | None = None          # expected value if served (None: no value)
    log_file: str | None = None         # file named in the skip line (default <uuid>.xml)
    phrases: tuple[str, ...] = ()       # must all be in that secret's log line
    warning: str | None = None          # for served-with-warning kinds: text of the warning


@dataclass
class Result:
    kinds: list[str] = field(default_factory=list)
    expected: list[Expect] = field(default_factory=list)
    damaged: int = 0
    kind_ok: dict[str, bool] = field(default_factory=dict)
    kind_notes: dict[str, str] = field(default_factory=dict)
    healthy_total: int = 0
    healthy_served: int = 0
    garbage_served: int = 0             # damaged secrets served anyway
    skipped_expected: int = 0
    skipped_seen: int = 0
    unexpected_skips: list[str] = field(default_factory=list)
    files_deleted: list[str] = field(default_factory=list)     # other than stale *.new
    stale_planted: int = 0
    stale_removed: int = 0
    files_changed: list[str] = field(default_factory=list)
    files_added: list[str] = field(default_factory=list)
    reload_same: bool = False
    log_has_values: int = 0
    log: str = ""
    journal_entries: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def kinds_named(self) -> int:
        return sum(self.kind_ok.values())


# -- building the store -------------------------------------------------------------------
class StoreBuilder:
    def __init__(self, root: Path, rng: random.Random):
        import secretbus
        self.root = root
        self.rng = rng
        self.cfg = root / "etc" / "secrets"
        (root / "etc").mkdir(parents=True, mode=0o700)
        self.key = root / "key"
        self.key.write_bytes(os.urandom(32))
        self.key.chmod(0o600)
        (root / "etc" / "secret.conf").write_text(f'secrets_encryption_key = "{self.key}"\n')
        self.conn = secretbus.open(f"secret:///embed?root={root}")
        self.expect: list[Expect] = []
        self.stale: list[str] = []
        self.n = 0

    def close(self) -> None:
        self.conn.close()

    def new_uuid(self) -> str:
        return str(uuidlib.UUID(int=self.rng.getrandbits(128), version=4))

    def value(self, u: str) -> bytes:
        return f"value-of-{u}-".encode() + bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(0, 40)))

    def secret(self, value: bytes | None = b"", usage: str | None = None, mtime: int | None = None) -> str:
        u = self.new_uuid()
        self.n += 1
        self.conn.define_xml(xml_text(u, usage or f"usage-{self.n}-{u[:8]}"))
        if value is not None:
            self.conn.lookup_by_uuid(u).set_value(value)
        if mtime is not None:
            os.utime(self.cfg / f"{u}.xml", ns=(mtime, mtime))
        return u

    def gcm(self, u: str) -> Path:
        return self.cfg / f"{u}.aes256gcm"

    # healthy -----------------------------------------------------------------------
    def healthy(self, value: bytes | None = None, empty=False, none=False) -> None:
        u = self.new_uuid()
        v = None if none else (b"" if empty else (value or self.value(u)))
        self.n += 1
        self.conn.define_xml(xml_text(u, f"healthy-{self.n}"))
        if v is not None:
            self.conn.lookup_by_uuid(u).set_value(v)
        self.expect.append(Expect(u, "healthy", True, v))

    # damage kinds ------------------------------------------------------------------
    def truncated(self, random_cut: bool) -> None:
        u = self.secret(self.value(""))
        data = self.gcm(u).read_bytes()
        # A cut inside a 4-character base64 quantum (a cut at a quantum boundary decodes
        # cleanly and is indistinguishable from a modified file: see notes).
        cuts = [c for c in range(1, len(data)) if c % 4]
        cut = self.rng.choice(cuts) if random_cut else len(data) - 3
        self.gcm(u).write_bytes(data[:cut])
        self.expect.append(Expect(u, "truncated value", False, phrases=(f"{u}.aes256gcm", "truncated")))

    def empty_file(self) -> None:
        u = self.secret(self.value(""))
        self.gcm(u).write_bytes(b"")
        self.expect.append(Expect(u, "empty value file", False, phrases=(f"{u}.aes256gcm", "truncated")))

    def flipped_bit(self, random_pos: bool) -> None:
        u = self.secret(self.value(""))
        raw = bytearray(base64.b64decode(self.gcm(u).read_bytes()))
        header = 4 + 8 + 12
        pos = self.rng.randrange(header, len(raw)) if random_pos else len(raw) - 20
        raw[pos] ^= 1 << self.rng.randrange(8)
        self.gcm(u).write_bytes(base64.b64encode(bytes(raw)))
        self.expect.append(Expect(u, "flipped bit", False,
                                  phrases=(f"{u}.aes256gcm", "failed authentication (modified or corrupted)")))

    def swapped(self) -> None:
        a, b = self.secret(self.value("")), self.secret(self.value(""))
        da, db = self.gcm(a).read_bytes(), self.gcm(b).read_bytes()
        self.gcm(a).write_bytes(db)
        self.gcm(b).write_bytes(da)
        for x, y in ((a, b), (b, a)):
            self.expect.append(Expect(x, "value files swapped", False,
                                      phrases=(f"{x}.aes256gcm", "belongs to another secret (moved or swapped)",
                                               f"written for secret {y}")))

    def not_base64(self) -> None:
        u = self.secret(self.value(""))
        self.gcm(u).write_bytes(b"this is not base64 at all: \x00\xff\n")
        self.expect.append(Expect(u, "not base64", False, phrases=(f"{u}.aes256gcm", "not valid base64")))

    def wrong_key(self) -> None:
        from secretbus.store.codec import Binding
        from secretbus.store.crypto import GcmCodec
        u = self.secret(None)
        self.gcm(u).write_bytes(GcmCodec(os.urandom(32)).encode(Binding(u), self.value(u)))
        os.chmod(self.gcm(u), 0o600)
        self.expect.append(Expect(u, "wrong key", False,
                                  phrases=(f"{u}.aes256gcm", "encrypted with a different key")))

    def unreadable_value(self) -> None:
        u = self.secret(self.value(""))
        self.expect.append(Expect(u, "unreadable value file (mode 000)", False,
                                  phrases=(f"{u}.aes256gcm", "cannot read: Permission denied")))

    def unreadable_xml(self) -> None:
        u = self.secret(self.value(""))
        self.expect.append(Expect(u, "unreadable XML (mode 000)", False,
                                  phrases=(f"'{u}.xml'", "cannot read: Permission denied")))

    def malformed_xml(self, random_cut: bool) -> None:
        u = self.secret(self.value(""))
        p = self.cfg / f"{u}.xml"
        text = p.read_bytes()
        cut = self.rng.randrange(1, len(text) - 12) if random_cut else len(text) // 2
        p.write_bytes(text[:cut])
        self.expect.append(Expect(u, "malformed XML", False, phrases=(f"'{u}.xml'", "invalid XML")))

    def uuid_mismatch(self) -> None:
        u = self.secret(self.value(""))
        other = self.new_uuid()
        p = self.cfg / f"{u}.xml"
        p.write_text(p.read_text().replace(u, other))
        self.expect.append(Expect(u, "UUID differs from file name", False,
                                  phrases=(f"{other} does not match secret file name '{u}.xml'",)))

    def duplicate_usage(self) -> None:
        usage = f"dup-{self.n}"
        base = 1_600_000_000 * 10**9 + self.n * 10**9
        # Value-less: a value is bound to its usage, so the edit below would (rightly) make
        # a valued older secret fail authentication instead of testing the usage clash.
        older_value = None
        older = self.secret(older_value, usage=f"tmp-{self.n}")
        newer = self.secret(self.value(""), usage=usage, mtime=base + 10**9)
        # Give the older file the same usage afterwards (the driver refuses a clash).
        p = self.cfg / f"{older}.xml"
        p.write_text(xml_text(older, usage))
        os.chmod(p, 0o600)
        os.utime(p, ns=(base, base))
        self.expect.append(Expect(older, "duplicate usage (older file)", True, older_value))
        self.expect.append(Expect(newer, "duplicate usage", False,
                                  phrases=(f"'{newer}.xml'", f"a secret with UUID {older} already defined "
                                                            f"for use with {usage}")))

    def two_value_files(self) -> None:
        new_value = self.value("")
        u = self.secret(new_value)
        old = self.cfg / f"{u}.base64"
        old.write_bytes(base64.b64encode(b"old value, superseded"))
        os.chmod(old, 0o600)
        t = self.gcm(u).stat().st_mtime_ns - 5 * 10**9
        os.utime(old, ns=(t, t))
        self.expect.append(Expect(u, "two value files (.base64 + .aes256gcm)", True, new_value,
                                  warning=f"secret {u} has 2 value files; using {u}.aes256gcm and ignoring {u}.base64"))

    def symlink_value(self) -> None:
        """The value file replaced by a symlink to another secret's value file."""
        u, other = self.secret(self.value("")), self.secret(self.value(""))
        self.gcm(u).unlink()
        os.symlink(self.gcm(other).name, self.gcm(u))
        self.expect.append(Expect(u, "symlink instead of a value file", False,
                                  phrases=(f"{u}.aes256gcm", "cannot read")))
        self.expect.append(Expect(other, "symlink target (healthy)", True, None))
        self._fix_value(other)

    def _fix_value(self, u: str) -> None:
        # The expected value of a served helper secret is whatever the embedded driver stored.
        self.expect[-1].value = self.conn.lookup_by_uuid(u).get_value()

    def directory_value(self) -> None:
        u = self.secret(self.value(""))
        self.gcm(u).unlink()
        self.gcm(u).mkdir(mode=0o700)
        self.expect.append(Expect(u, "directory instead of a value file", False,
                                  phrases=(f"{u}.aes256gcm", "cannot read: not a regular file")))

    def fifo(self, which: str) -> None:
        """A FIFO in place of the value file or the XML: opening it for reading would block."""
        u = self.secret(self.value(""))
        p = self.gcm(u) if which == "value" else self.cfg / f"{u}.xml"
        p.unlink()
        os.mkfifo(p, 0o600)
        self.expect.append(Expect(u, f"FIFO instead of the {which} file", False,
                                  phrases=(p.name if which == "value" else f"'{p.name}'",)))

    def stale_temp(self) -> None:
        """A write that never completed (the one thing start-up may delete)."""
        v = self.value("")
        u = self.secret(v)
        p = self.cfg / f"{u}.aes256gcm.new"
        p.write_bytes(b"half a wri")
        os.chmod(p, 0o600)
        self.stale.append(p.name)
        self.expect.append(Expect(u, "stale temp file (*.new)", True, v,
                                  warning=f"removing incomplete write '{p.name}'"))

    def finish_modes(self, uid: int, gid: int) -> None:
        """Hand everything to the daemon's user; then make the 'unreadable' files mode 000."""
        for dirpath, dirs, files in os.walk(self.root):
            os.lchown(dirpath, uid, gid)
            for f in files + dirs:
                os.lchown(os.path.join(dirpath, f), uid, gid)
        for e in self.expect:
            if e.kind.startswith("unreadable value"):
                self.gcm(e.uuid).chmod(0)
            elif e.kind.startswith("unreadable XML"):
                (self.cfg / f"{e.uuid}.xml").chmod(0)


KINDS_SINGLE = ("truncated", "empty_file", "flipped_bit", "swapped", "not_base64", "wrong_key",
                "unreadable_value", "unreadable_xml", "malformed_xml", "uuid_mismatch",
                "duplicate_usage", "two_value_files")


def build(root: Path, size: str, rng: random.Random, fifos: bool = False) -> StoreBuilder:
    b = StoreBuilder(root, rng)
    try:
        if fifos:       # a store with FIFOs and healthy secrets only (see fifo_run)
            for _ in range(3):
                b.healthy()
            b.fifo("value")
            b.fifo("XML")
            return b
        per_kind, healthy = (1, 6) if size == "small" else (5, 60)
        rand = size != "small"
        for i in range(healthy):
            if i == 0:
                b.healthy(none=True)
            elif i == 1:
                b.healthy(empty=True)
            elif i == 2:
                b.healthy(value=bytes(rng.getrandbits(8) for _ in range(65536)))   # the maximum
            else:
                b.healthy()
        for _ in range(per_kind):
            b.truncated(rand)
            b.empty_file()
            b.flipped_bit(rand)
            b.swapped()
            b.not_base64()
            b.wrong_key()
            b.unreadable_value()
            b.unreadable_xml()
            b.malformed_xml(rand)
            b.uuid_mismatch()
            b.duplicate_usage()
            b.two_value_files()
            b.stale_temp()
            b.symlink_value()
            b.directory_value()
    finally:
        b.close()
    return b


def snapshot(directory: Path) -> dict[str, tuple[int, int, int, object]]:
    """name -> (mode, uid, gid, content); never opens a FIFO, follows no symlink."""
    import stat as st_
    out = {}
    for name in sorted(os.listdir(directory)):
        p = directory / name
        st = os.lstat(p)
        if st_.S_ISREG(st.st_mode):
            content: object = p.read_bytes()
        elif st_.S_ISLNK(st.st_mode):
            content = ("symlink", os.readlink(p))
        elif st_.S_ISDIR(st.st_mode):
            content = ("dir", sorted(os.listdir(p)))
        else:
            content = ("special", st.st_rdev)
        out[name] = (st.st_mode, st.st_uid, st.st_gid, content)
    return out


# -- the daemon as the test user -------------------------------------------------------
class UserDaemon:
    """secretbusd --session --root DIR --bus-address ADDR as `user`, stderr to `log`; with
    `journal` (a harness JournalSocket) it logs to that emulated journald instead."""

    def __init__(self, user: harness.User, bus: harness.PrivateBus, root: Path, log: Path,
                 py: harness.UnprivPython, args: tuple[str, ...] = (), journal=None):
        self.user, self.bus, self.root, self.log_path, self.py = user, bus, root, log, py
        self.args = args
        self.journal = journal
        self.proc: subprocess.Popen | None = None

    def log(self) -> str:
        """Everything logged so far; journal entries as one line each, fields appended."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if self.journal is not None:
            text += "".join(journal_line(e) + "\n" for e in self.journal.snapshot()
                            if e.get("SYSLOG_IDENTIFIER") == [b"secretbusd"])
        return text

    def start(self, ready_text: str = "serving ", timeout: float = 30) -> UserDaemon:
        env = self.py.env(harness.user_env(self.user))
        for k in [k for k in env if k.startswith(("DBUS_", "NOTIFY_SOCKET", "LISTEN_", "JOURNAL_STREAM",
                                                   "CREDENTIALS_DIRECTORY"))]:
            del env[k]
        if self.journal is not None:
            from harness.journal import stream_env
            self.log_path.touch()
            env.update(stream_env(self.log_path))
        argv = harness.as_user(self.user, self.py.argv("-m", "secretbus.daemon", "--session", "--root",
                                                        str(self.root), "--bus-address", self.bus.address,
                                                        *self.args))
        self.proc = harness.spawn(argv, what="secretbusd (user)", log=self.log_path, env=env)
        harness.wait_until(lambda: ready_text in self.log(), timeout=timeout, proc=self.proc,
                           log=self.log_path, what="secretbusd ready")
        return self

    def stop(self) -> int | None:
        harness.stop_process(self.proc)
        return self.proc.returncode if self.proc else None


def journal_line(e: dict[str, list[bytes]]) -> str:
    """A journal entry as the stderr formatter would print it: message [FIELD=value ...]."""
    msg = e.get("MESSAGE", [b""])[0].decode("utf-8", "replace")
    extra = " ".join(f"{k}={e[k][0].decode('utf-8', 'replace')}" for k in ("SECRET_UUID", "SECRET_OPERATION",
                                                                             "CALLER_UID", "PRIORITY") if k in e)
    return f"{msg} [{extra}]"


def ask(py: harness.UnprivPython, user: harness.User, bus: harness.PrivateBus, uuids: list[str]) -> dict:
    r = py.run(user, "-c", CLIENT, bus.address, json.dumps(uuids), timeout=60)
    if r.returncode != 0:
        raise harness.HarnessError(f"client failed ({r.returncode}): {r.stderr}")
    return json.loads(r.stdout)


# -- judging ---------------------------------------------------------------------------
_SKIP = re.compile(r"skipping secret file '([^']+)': (.*)$")


def skip_lines(log: str) -> list[tuple[str, str]]:
    """(file, whole line) of every skip line."""
    out = []
    for line in log.splitlines():
        m = _SKIP.search(line)
        if m:
            out.append((m.group(1), line))
    return out


def judge(res: Result, expected: list[Expect], answers: dict, log_first: str) -> None:
    skips = skip_lines(log_first)
    listed = set(answers["list"]) if isinstance(answers["list"], list) else set()
    expected_skip_files = set()
    for e in expected:
        ok = True
        note = ""
        got = answers["value"].get(e.uuid, {})
        if e.served:
            want_b64 = base64.b64encode(e.value).decode() if e.value is not None else None
            if e.uuid not in listed:
                ok, note = False, "not listed"
            elif want_b64 is None:
                ok = (got.get("error") == "org.libvirt.Error.NoSecret"
                      and "does not have a value" in got.get("message", ""))
                note = "" if ok else f"expected no value, got {str(got)[:80]}"
            else:
                ok = got.get("b64") == want_b64
                note = "" if ok else "wrong value served"
            if e.warning and not any(e.warning in line for line in log_first.splitlines()):
                ok, note = False, f"no warning '{e.warning}'"
            if e.kind == "healthy":
                res.healthy_total += 1
                res.healthy_served += ok
                continue
        else:
            res.damaged += 1
            expected_skip_files.add(e.log_file or f"{e.uuid}.xml")
            if e.uuid in listed or "b64" in got or answers["lookup"].get(e.uuid) == "ok":
                res.garbage_served += 1
                ok, note = False, "served although damaged"
            lines = [line for f, line in skips if f == (e.log_file or f"{e.uuid}.xml")]
            if not lines:
                ok, note = False, "no skip line"
            elif not any(all(p in line for p in e.phrases) for line in lines):
                ok, note = False, f"skip line lacks {e.phrases}: {lines[0][-160:]}"
            elif got.get("error") != "org.libvirt.Error.NoSecret":
                ok, note = False, f"GetValue answered {str(got)[:80]}"
        kind = (e.kind.replace(" (older file)", "")
                .replace("symlink target (healthy)", "symlink instead of a value file"))
        res.kind_ok[kind] = res.kind_ok.get(kind, True) and ok
        if note and kind not in res.kind_notes:
            res.kind_notes[kind] = f"{e.uuid}: {note}"
    res.skipped_expected = len(expected_skip_files)
    seen = {f for f, _ in skips}
    res.skipped_seen = len(seen)
    res.unexpected_skips = sorted(seen - expected_skip_files)
    res.kinds = sorted(res.kind_ok)


def run(size: str = "small", seed: int | None = None, keep: bool = False, journal: bool = False) -> Result:
    t0 = time.monotonic()
    rng = random.Random(seed if seed is not None else time.time_ns())
    user = harness.ensure_user(USER, ["libvirt"])
    py = harness.unpriv_python()
    base = harness.public_tempdir("sb-corrupt-")
    res = Result()
    bus = daemon = jsock = None
    try:
        if journal:
            from harness.journal import JournalSocket
            jsock = JournalSocket().start()
        root = base / "root"
        b = build(root, size, rng)
        expected, cfg = b.expect, b.cfg
        res.expected = expected
        b.finish_modes(user.uid, user.gid)
        before = snapshot(cfg)
        bus = harness.PrivateBus("session", user=user).start()
        log = base / "secretbusd.log"
        daemon = UserDaemon(user, bus, root, log, py, journal=jsock).start()
        answers = ask(py, user, bus, [e.uuid for e in expected])
        first = daemon.log()
        judge(res, expected, answers, first)
        # The same store loaded again (SIGHUP): the same files are skipped.
        daemon.proc.send_signal(signal.SIGHUP)
        harness.wait_until(lambda: "reloaded:" in daemon.log(), timeout=20, proc=daemon.proc,
                           log=log, what="reload")
        second = daemon.log()[len(first):]
        res.reload_same = ({f for f, _ in skip_lines(second)} == {f for f, _ in skip_lines(first)}
                           and ask(py, user, bus, [])["list"] == answers["list"])
        daemon.stop()
        res.log = daemon.log()
        daemon = None
        after = snapshot(cfg)
        gone = set(before) - set(after)
        res.stale_planted = len(b.stale)
        res.stale_removed = len(gone & set(b.stale))
        res.files_deleted = sorted(gone - set(b.stale))
        res.files_added = sorted(set(after) - set(before))
        res.files_changed = sorted(n for n in set(before) & set(after) if before[n] != after[n])
        res.log_has_values = sum(1 for e in expected if e.value and len(e.value) > 8
                                 and (e.value in res.log.encode() or base64.b64encode(e.value).decode() in res.log))
    finally:
        if daemon is not None:
            daemon.stop()
        if bus is not None:
            bus.stop()
        if jsock is not None:
            res.journal_entries = [e for e in jsock.snapshot() if e.get("SYSLOG_IDENTIFIER") == [b"secretbusd"]]
            jsock.close()
        if keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            remove_tree(base)
    res.seconds = time.monotonic() - t0
    return res


# -- a synchronous D-Bus client for the tests' own calls ------------------------------------
class Reply(NamedTuple):
    ok: bool
    body: list[Any]
    error: str | None = None
    message: str = ""


class SyncBus:
    """One dbus-fast connection driven from synchronous code (its own event loop)."""

    def __init__(self, address: str):
        from dbus_fast.aio import MessageBus
        self.loop = asyncio.new_event_loop()

        async def connect():
            return await MessageBus(bus_address=address).connect()
        self.bus = self.loop.run_until_complete(connect())

    def call(self, path: str, iface: str, member: str, sig: str = "", body: list | None = None,
             timeout: float = 30, destination: str = BUS_NAME) -> Reply:
        from dbus_fast import Message, MessageType
        msg = Message(destination=destination, path=path, interface=iface, member=member, signature=sig,
                      body=body or [])
        r = self.loop.run_until_complete(asyncio.wait_for(self.bus.call(msg), timeout))
        if r.message_type is MessageType.ERROR:
            return Reply(False, r.body, r.error_name, r.body[0] if r.body else "")
        return Reply(True, r.body)

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


CONNECT_PATH = "/org/libvirt/secret"


# -- full disk --------------------------------------------------------------------------
FD_A = "0a5e0000-0000-4000-8000-00000000000a"    # persistent, value, description "before"
FD_B = "0a5e0000-0000-4000-8000-00000000000b"    # persistent, no value
FD_C = "0a5e0000-0000-4000-8000-00000000000c"    # new define (D-Bus)
FD_D = "0a5e0000-0000-4000-8000-00000000000d"    # new define (CLI)
FD_E = "0a5e0000-0000-4000-8000-00000000000e"    # ephemeral, value; redefined persistent


def fd_xml(uuid: str, desc: str, eph: str = "no") -> str:
    return (f"<secret ephemeral='{eph}' private='no'><uuid>{uuid}</uuid><description>{desc}</description>"
            f"<usage type='volume'><volume>/var/lib/sbtest/{uuid}.img</volume></usage></secret>")


@dataclass
class DiskAttempt:
    what: str
    failed: bool
    clear: bool                 # the error names the cause (and the D-Bus error kind)
    intact: bool                # state and directory unchanged afterwards
    detail: str = ""


@dataclass
class DiskResult:
    mode: str = ""
    attempts: list[DiskAttempt] = field(default_factory=list)
    intact_after_restart: bool = False
    temp_files_left: int = 0
    recovered: bool = False      # the same writes succeed once space is back
    recovered_after_restart: bool = False
    log: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(a.failed for a in self.attempts)

    @property
    def clear(self) -> int:
        return sum(a.failed and a.clear for a in self.attempts)

    @property
    def intact(self) -> bool:
        return all(a.intact for a in self.attempts) and self.intact_after_restart


def _mount_tmpfs(path: Path, size: str) -> bool:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


class _Filler:
    """Takes the space of the store's file system (tmpfs) or the daemon's RLIMIT_FSIZE (fsize)."""

    def __init__(self, mode: str, store: Path, base: Path):
        self.mode, self.store, self.base = mode, store, base
        self.path = store / "filler"        # not a secret file name: the store ignores it

    def leave(self, free: int, pid: int) -> None:
        """Leave `free` bytes writable (0: none at all)."""
        if self.mode == "fsize":
            limit = str(free)
            subprocess.run(["prlimit", f"--pid={pid}", f"--fsize={limit}:{limit}"], check=True)
            return
        self.path.unlink(missing_ok=True)
        st = os.statvfs(self.store)
        want = st.f_bavail * st.f_frsize - free
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            chunk = b"\0" * 65536
            while want > 0:
                try:
                    want -= os.write(fd, chunk[:min(want, len(chunk))])
                except OSError:
                    break
            while free == 0:            # up to the very last block
                try:
                    os.write(fd, chunk[:4096])
                except OSError:
                    break
        finally:
            os.close(fd)

    def release(self, pid: int | None) -> None:
        if self.mode == "fsize":
            if pid is not None:
                subprocess.run(["prlimit", f"--pid={pid}", "--fsize=unlimited"], check=False)
            return
        self.path.unlink(missing_ok=True)


def _state(c: SyncBus) -> dict:
    """What the daemon serves for A, B, C, D, E: XML and value (or the error)."""
    out = {}
    for u in (FD_A, FD_B, FD_C, FD_D, FD_E):
        x = c.call(spath(u), "org.libvirt.Secret", "GetXMLDesc", "u", [0])
        v = c.call(spath(u), "org.libvirt.Secret", "GetValue", "u", [0])
        out[u] = (x.body[0] if x.ok else x.error,
                  bytes(v.body[0]) if v.ok else (v.error, v.message))
    return out


def _store_files(store: Path) -> dict[str, bytes]:
    return {n: (store / n).read_bytes() for n in sorted(os.listdir(store)) if n != "filler"}


def full_disk(mode: str = "auto", keep: bool = False) -> DiskResult:
    """Writes that fail for lack of space: clear errors, previous state intact (see the docstring)."""
    t0 = time.monotonic()
    res = DiskResult()
    base = harness.public_tempdir("sb-fulldisk-")
    root = base / "root"
    store = root / "etc" / "secrets"
    store.mkdir(parents=True, mode=0o700)
    (root / "etc").chmod(0o700)
    key = base / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    mounted = False
    if mode in ("auto", "tmpfs"):
        mounted = _mount_tmpfs(store, "1m")
        if not mounted and mode == "tmpfs":
            raise harness.HarnessError("cannot mount a tmpfs here")
    res.mode = "tmpfs" if mounted else "fsize"
    cause = "No space left on device" if mounted else "File too large"
    filler = _Filler(res.mode, store, base)
    bus = daemon = c = None
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        e = {k: v for k, v in env.items() if k != "SECRETBUS_DEFAULT_URI"}
        e["DBUS_SESSION_BUS_ADDRESS"] = bus.address
        return subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", "secret:///session", *args],
                              capture_output=True, text=True, env=e, timeout=60)

    def start() -> harness.Secretbusd:
        d = harness.Secretbusd(bus, root=root, conf=f'secrets_encryption_key = "{key}"\n')
        return d.start()

    try:
        bus = harness.PrivateBus("session").start()
        daemon = start()
        c = SyncBus(bus.address)
        old_a, old_e = b"old value of A \x00\xff", b"ephemeral value of E"
        for u, desc, eph in ((FD_A, "before", "no"), (FD_B, "before", "no"), (FD_E, "before", "yes")):
            assert c.call(CONNECT_PATH, "org.libvirt.Connect", "SecretDefineXML", "su", [fd_xml(u, desc, eph), 0]).ok
        assert c.call(spath(FD_A), "org.libvirt.Secret", "SetValue", "ayu", [old_a, 0]).ok
        assert c.call(spath(FD_E), "org.libvirt.Secret", "SetValue", "ayu", [old_e, 0]).ok
        before_state, before_files = _state(c), _store_files(store)
        value_file = base / "value"
        value_file.write_bytes(b"new value from the CLI")
        xml_redefine, xml_new = base / "redefine.xml", base / "new.xml"
        xml_redefine.write_text(fd_xml(FD_A, "after (CLI)"))
        xml_new.write_text(fd_xml(FD_D, "new (CLI)"))

        def attempt(what: str, do) -> None:
            failed, clear, detail = do()
            now_state, now_files = _state(c), _store_files(store)
            intact = now_state == before_state and now_files == before_files
            if not intact:
                detail += f"; state changed: {sorted(k for k in now_files.keys() ^ before_files.keys())}"
            res.attempts.append(DiskAttempt(what, failed, clear, intact, detail))

        def dbus(path, iface, member, sig, body):
            def do():
                r = c.call(path, iface, member, sig, body)
                clear = (r.error == "org.libvirt.Error.SystemError" and cause in r.message
                         and "cannot write" in r.message)
                return (not r.ok), clear, f"{r.error}: {r.message}" if not r.ok else "succeeded"
            return do

        def via_cli(*args: str, first_line: str):
            def do():
                p = cli(*args)
                clear = p.returncode == 1 and f"error: {first_line}" in p.stderr and cause in p.stderr
                return p.returncode != 0, clear, p.stderr.strip().replace("\n", " / ")
            return do

        # Nearly full: a large value does not fit; the write fails part-way.
        filler.leave(16384, daemon.proc.pid)
        big = os.urandom(65536)
        attempt("SetValue 64 KiB, 16 KiB free (D-Bus)",
                dbus(spath(FD_A), "org.libvirt.Secret", "SetValue", "ayu", [big, 0]))
        # Room for one small file (tmpfs: one page; fsize: 150 bytes): E's value file fits,
        # its XML does not, so the value file just written must be removed again.
        filler.leave(4096 if res.mode == "tmpfs" else 150, daemon.proc.pid)
        attempt("DefineXML, ephemeral -> persistent, value written but XML not (D-Bus)",
                dbus(CONNECT_PATH, "org.libvirt.Connect", "SecretDefineXML", "su", [fd_xml(FD_E, "before"), 0]))
        # Full.
        filler.leave(0, daemon.proc.pid)
        new = b"new value"
        attempt("SetValue, replacing a value (D-Bus)",
                dbus(spath(FD_A), "org.libvirt.Secret", "SetValue", "ayu", [new, 0]))
        attempt("SetValue, first value (D-Bus)", dbus(spath(FD_B), "org.libvirt.Secret", "SetValue", "ayu", [new, 0]))
        attempt("DefineXML, redefine (D-Bus)", dbus(CONNECT_PATH, "org.libvirt.Connect", "SecretDefineXML", "su",
                                                    [fd_xml(FD_A, "after"), 0]))
        attempt("DefineXML, new secret (D-Bus)", dbus(CONNECT_PATH, "org.libvirt.Connect", "SecretDefineXML", "su",
                                                      [fd_xml(FD_C, "new"), 0]))
        attempt("DefineXML, ephemeral -> persistent (D-Bus)",
                dbus(CONNECT_PATH, "org.libvirt.Connect", "SecretDefineXML", "su", [fd_xml(FD_E, "before"), 0]))
        attempt("secret-set-value (CLI)", via_cli("secret-set-value", FD_A, "--file", str(value_file), "--plain",
                                                  first_line="Failed to set secret value"))
        attempt("secret-define, redefine (CLI)", via_cli("secret-define", str(xml_redefine),
                                                         first_line=f"Failed to set attributes from {xml_redefine}"))
        attempt("secret-define, new secret (CLI)", via_cli("secret-define", str(xml_new),
                                                           first_line=f"Failed to set attributes from {xml_new}"))
        res.temp_files_left = sum(1 for n in os.listdir(store) if n.endswith(".new"))
        # Restart on the full disk: the persistent state is the old one (E, ephemeral, is gone).
        c.close()
        c = None
        daemon.stop()
        res.log = daemon.log()
        daemon = start()
        c = SyncBus(bus.address)
        after = _state(c)
        expect = dict(before_state)
        expect[FD_E] = ("org.libvirt.Error.NoSecret", ("org.libvirt.Error.NoSecret",
                                                       f"Secret not found: no secret with matching uuid '{FD_E}'"))
        res.intact_after_restart = after == expect and _store_files(store) == before_files
        # Space back: the same writes succeed, without a restart.
        filler.release(daemon.proc.pid)
        ok = [c.call(spath(FD_A), "org.libvirt.Secret", "SetValue", "ayu", [new, 0]).ok,
              c.call(spath(FD_B), "org.libvirt.Secret", "SetValue", "ayu", [new, 0]).ok,
              c.call(CONNECT_PATH, "org.libvirt.Connect", "SecretDefineXML", "su", [fd_xml(FD_A, "after"), 0]).ok,
              c.call(CONNECT_PATH, "org.libvirt.Connect", "SecretDefineXML", "su", [fd_xml(FD_C, "new"), 0]).ok,
              cli("secret-define", str(xml_new)).returncode == 0]
        res.recovered = all(ok)
        c.close()
        c = None
        daemon.stop()
        res.log += daemon.log()
        daemon = start()
        c = SyncBus(bus.address)
        st = _state(c)
        res.recovered_after_restart = (st[FD_A][1] == new and st[FD_B][1] == new and "<description>after" in st[FD_A][0]
                                       and st[FD_C][0].startswith("<secret") and st[FD_D][0].startswith("<secret"))
    finally:
        if c is not None:
            c.close()
        if daemon is not None:
            daemon.stop()
            res.log += daemon.log()
        if bus is not None:
            bus.stop()
        if mounted:
            _umount(store)
        if keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            remove_tree(base)
    res.seconds = time.monotonic() - t0
    return res


def disk_rows(r: DiskResult) -> list[tuple[str, object, str]]:
    n = len(r.attempts)
    return [
        (f"full disk ({r.mode}): writes attempted without space", n, "-"),
        ("full disk: writes failed with a clear error (D-Bus and CLI)", r.clear, f"= {n}"),
        ("full disk: previous value and XML intact, also after restart", "yes" if r.intact else "no", "yes"),
        ("full disk: temp files left behind", r.temp_files_left, "0"),
        ("full disk: writes succeed once space is freed (no restart)", "yes" if r.recovered else "no", "yes"),
    ]


def disk_ok(r: DiskResult) -> bool:
    return (r.clear == len(r.attempts) > 0 and r.intact and r.temp_files_left == 0 and r.recovered
            and r.recovered_after_restart)


# -- special files ----------------------------------------------------------------------------
@dataclass
class FifoResult:
    started: bool = False          # the daemon got through start-up
    healthy_served: int = 0
    healthy_total: int = 0
    fifos_skipped_with_line: int = 0
    fifos: int = 0
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.started and self.healthy_served == self.healthy_total
                and self.fifos_skipped_with_line == self.fifos)


def fifo_run(timeout: float = 8.0, keep: bool = False) -> FifoResult:
    """A FIFO where a value file or an XML file should be: start-up must skip it, not wait for a
    writer that never comes (the store opens files without O_NONBLOCK)."""
    t0 = time.monotonic()
    res = FifoResult()
    user = harness.ensure_user(USER, ["libvirt"])
    py = harness.unpriv_python()
    base = harness.public_tempdir("sb-fifo-")
    bus = daemon = None
    try:
        root = base / "root"
        b = build(root, "small", random.Random(1), fifos=True)
        b.finish_modes(user.uid, user.gid)
        bus = harness.PrivateBus("session", user=user).start()
        daemon = UserDaemon(user, bus, root, base / "secretbusd.log", py)
        try:
            daemon.start(timeout=timeout)
            res.started = True
        except harness.HarnessError as e:
            if daemon.proc.poll() is not None:
                res.detail = f"daemon exited with {daemon.proc.returncode}: {str(e)[-300:]}"
            else:
                try:
                    wchan = Path(f"/proc/{daemon.proc.pid}/wchan").read_text().strip()
                except OSError:
                    wchan = "?"
                res.detail = f"start-up did not finish within {timeout:.0f} s (daemon waiting in {wchan})"
            return res
        answers = ask(py, user, bus, [e.uuid for e in b.expect])
        skips = skip_lines(daemon.log())
        for e in b.expect:
            if e.served:
                res.healthy_total += 1
                res.healthy_served += answers["value"][e.uuid].get("b64") == base64.b64encode(e.value).decode()
            else:
                res.fifos += 1
                res.fifos_skipped_with_line += any(f == f"{e.uuid}.xml" and all(p in line for p in e.phrases)
                                                   for f, line in skips)
    finally:
        if daemon is not None and daemon.proc is not None:
            daemon.stop()
        if bus is not None:
            bus.stop()
        if keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            remove_tree(base)
        res.seconds = time.monotonic() - t0
    return res


def fifo_rows(r: FifoResult) -> list[tuple[str, object, str]]:
    return [("corruption: FIFO in place of a value / XML file: start-up completes and skips it",
             "yes" if r.ok else f"no ({r.detail or 'not skipped'})", "yes")]


def figures(size: str = "small") -> list[tuple[str, object, str]]:
    return rows(run(size)) + fifo_rows(fifo_run()) + disk_rows(full_disk())


def rows(r: Result) -> list[tuple[str, object, str]]:
    n = len(r.kinds)
    return [
        ("corruption: kinds injected (damage and crash leftovers)", n, "-"),
        ("corruption: damaged secrets injected", r.damaged, "-"),
        ("corruption: kinds detected and named correctly", r.kinds_named, f"= {n}"),
        ("corruption: skipped files (expected exactly the damaged)", r.skipped_seen, f"= {r.skipped_expected}"),
        ("corruption: unexpected skips", len(r.unexpected_skips), "0"),
        ("corruption: damaged secrets served anyway", r.garbage_served, "0"),
        ("corruption: healthy secrets served with their value", r.healthy_served, f"= {r.healthy_total}"),
        ("corruption: same result after reload (SIGHUP)", "yes" if r.reload_same else "no", "yes"),
        ("corruption: files deleted (other than stale *.new temp files)", len(r.files_deleted), "0"),
        ("corruption: stale *.new temp files removed", r.stale_removed, f"= {r.stale_planted}"),
        ("corruption: files changed or added", len(r.files_changed) + len(r.files_added), "0"),
        ("corruption: values in the log", r.log_has_values, "0"),
    ]


def ok(r: Result) -> bool:
    return (r.kinds_named == len(r.kinds) and r.skipped_seen == r.skipped_expected and not r.unexpected_skips
            and r.garbage_served == 0 and r.healthy_served == r.healthy_total and r.reload_same
            and not r.files_deleted and not r.files_changed and not r.files_added and r.log_has_values == 0
            and r.stale_removed == r.stale_planted)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("small", "full"), default="full")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--journal", action="store_true",
                    help="log to an emulated journald (native protocol) instead of stderr")
    ap.add_argument("--disk", choices=("auto", "tmpfs", "fsize"), default="auto",
                    help="how the full disk is made (auto: tmpfs if mounting works)")
    a = ap.parse_args(argv)
    r = run(a.size, a.seed, a.keep, a.journal)
    print(f"store corruption ({a.size}: {r.damaged} damaged + {r.healthy_total} healthy secrets, "
          f"daemon as {USER}, {r.seconds:.1f} s)")
    print("| figure | value | goal |\n|---|---|---|")
    for name, value, goal in rows(r):
        print(f"| {name} | {value} | {goal} |")
    print("\n| kind | detected and named |\n|---|---|")
    for k in r.kinds:
        print(f"| {k} | {'yes' if r.kind_ok[k] else 'NO: ' + r.kind_notes.get(k, '')} |")
    f = fifo_run(keep=a.keep)
    print(f"\nspecial files ({f.seconds:.1f} s)\n| figure | value | goal |\n|---|---|---|")
    for name, value, goal in fifo_rows(f):
        print(f"| {name} | {value} | {goal} |")
    d = full_disk(a.disk, a.keep)
    print(f"\nfull disk ({d.mode}, {d.seconds:.1f} s)")
    print("| figure | value | goal |\n|---|---|---|")
    for name, value, goal in disk_rows(d):
        print(f"| {name} | {value} | {goal} |")
    print("\n| write | failed | clear error | state intact | error |\n|---|---|---|---|---|")
    for x in d.attempts:
        print(f"| {x.what} | {'yes' if x.failed else 'NO'} | {'yes' if x.clear else 'NO'} | "
              f"{'yes' if x.intact else 'NO'} | {x.detail[:140]} |")
    return 0 if ok(r) and f.ok and disk_ok(d) else 1


if __name__ == "__main__":
    sys.exit(main())

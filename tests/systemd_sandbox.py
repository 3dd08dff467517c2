#!/usr/bin/env python3
"""Run a command inside the sandbox that a systemd unit file asks for, as far as that can be
reproduced without systemd as PID 1 (for tests; run as root).

    systemd_sandbox.py --unit FILE [--dropin FILE]... [--user] [--map UNITPATH=REALPATH]... -- COMMAND [ARG]...

It reads the unit's [Service] settings, and then each --dropin file's in the order given (as
systemd reads FILE.d/*.conf after the unit, in file name order: every assignment continues
the unit's, so a list key appends, a key assigned the empty string is reset, and for a single
value the last assignment wins), and applies them with the same kernel mechanisms
systemd uses, in three stages that each exec the next, so the command keeps this PID:

 1. `unshare --mount [--net] --propagation private` (PrivateNetwork=: a new network
    namespace with only lo, brought up as systemd does in stage 2; AF_UNIX path sockets
    still work, only abstract ones are per namespace);
 2. mounts, as root: TemporaryFileSystem= (a tmpfs, read-only with ":ro") with
    BindReadOnlyPaths= bound onto it from what it hides, InaccessiblePaths= and
    ProtectHome=yes (/home, /root, /run/user) covered by an empty mode-0000 tmpfs or file,
    then ProtectSystem=strict (every mount read-only except /proc and /dev, which also gives
    ProtectKernelTunables='s read-only /sys) with ReadWritePaths= and the unit's
    Configuration/Runtime/StateDirectory= left writable (through --map when the unit's
    paths are stood in for by test directories; --user: a user unit's directories, named
    %E/DIR, %t/DIR and %S/DIR for --map, as systemd's specifiers name their roots),
    PrivateTmp= (/var/tmp, see below), ProcSubset=pid / ProtectProc= (a fresh procfs with
    subset=pid,hidepid=...), UMask=;
    then `setpriv` for NoNewPrivileges=, CapabilityBoundingSet= and AmbientCapabilities=;
 3. seccomp filters through libseccomp, built like systemd builds them:
    SystemCallFilter= (allow list: its groups and names, minus the ~ lines, plus @default,
    groups expanded with `systemd-analyze syscall-filter`), SystemCallErrorNumber=,
    SystemCallArchitectures=native (a native-only filter), RestrictAddressFamilies=
    (socket() of another family fails with EAFNOSUPPORT; an allow list of several families is
    built as systemd builds it: below the lowest, above the highest and each gap refused),
    MemoryDenyWriteExecute=
    (mmap W+X, mprotect/pkey_mprotect +X and shmat SHM_EXEC fail with EPERM),
    RestrictNamespaces=yes (unshare/clone with namespace flags and setns fail with EPERM,
    clone3 with ENOSYS so that glibc falls back to clone).

A --map UNITPATH=REALPATH also moves a BindReadOnlyPaths= source (e.g. /etc/pki from a test
directory), so that the command sees REALPATH's files at UNITPATH.

PrivateTmp=yes is reproduced only as far as the service needs it: /var/tmp stays writable
(not a fresh one: the tests keep disk-backed directories there), and /tmp stays the host's,
where the tests keep the files the command needs.

Not reproduced (listed on stderr): PrivateDevices=/DevicePolicy=, PrivateUsers=,
ProtectHome= other than yes, the other Protect*= mounts, LoadCredentialEncrypted= (the caller
decrypts the credential itself), IPAddressDeny=/IPAddressAllow= (cgroup BPF), the cgroup
limits (MemoryMax= and the like) and the remaining seccomp-based Restrict*=/LockPersonality= options.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import overload

SELF = os.path.abspath(__file__)

EMULATED = {
    "PrivateNetwork", "ProtectSystem", "ReadWritePaths", "ProtectKernelTunables", "ProcSubset",
    "ProtectProc", "UMask", "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities",
    "SystemCallFilter", "SystemCallErrorNumber", "SystemCallArchitectures",
    "RestrictAddressFamilies", "MemoryDenyWriteExecute", "RestrictNamespaces",
    "TemporaryFileSystem", "BindReadOnlyPaths", "InaccessiblePaths", "PrivateMounts", "ProtectHome",
    "PrivateTmp",   # /var/tmp writable only (see stage_mounts)
}
NOT_SANDBOXING = {  # [Service] keys that are not about the sandbox at all
    "Type", "NotifyAccess", "BusName", "ExecStart", "ExecReload", "Restart",
    "RestartPreventExitStatus", "RemainAfterExit", "ConfigurationDirectory",
    "ConfigurationDirectoryMode", "RuntimeDirectory", "RuntimeDirectoryMode", "StateDirectory",
    "StateDirectoryMode", "RuntimeDirectoryPreserve", "LoadCredentialEncrypted", "Environment",
}
# Where systemd puts a unit's exec directories: (system root, user-unit specifier).
EXEC_DIRS = {"ConfigurationDirectory": ("/etc", "%E"), "RuntimeDirectory": ("/run", "%t"),
             "StateDirectory": ("/var/lib", "%S")}
PROTECT_HOME = ("/home", "/root", "/run/user")


# -- unit files ----------------------------------------------------------------------------
def parse_unit(path: str | os.PathLike, dropins: Sequence[str | os.PathLike] = ()) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}} of the unit and then its drop-ins, read as systemd
    reads them: each assignment continues the ones before it, in the unit and across files, so
    repeated keys accumulate (lists append; for a single value `last()` is the one in force)
    and a key assigned the empty string starts again from nothing (`KEY=` resets a list, e.g.
    IPAddressDeny=, and leaves CapabilityBoundingSet= as the empty set: the key is kept with
    no values)."""
    sections: dict[str, dict[str, list[str]]] = {}
    for f in (path, *dropins):
        for section, key, value in _assignments(f):
            values = sections.setdefault(section, {}).setdefault(key, [])
            if value:
                values.append(value)
            else:
                values.clear()
    return sections


def _assignments(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    out = []
    current = None
    text = Path(path).read_text()
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        if current is None or "=" not in line:
            raise ValueError(f"{path}: cannot parse line {raw!r}")
        key, value = line.split("=", 1)
        out.append((current, key.strip(), value.strip()))
    return out


def service(unit: dict) -> dict[str, list[str]]:
    return unit.get("Service", {})


@overload
def last(svc: dict[str, list[str]], key: str, default: str) -> str: ...
@overload
def last(svc: dict[str, list[str]], key: str, default: None = None) -> str | None: ...
def last(svc: dict[str, list[str]], key: str, default: str | None = None) -> str | None:
    values = svc.get(key)
    return values[-1] if values else default


def yes(value: str | None) -> bool:
    return (value or "").lower() in ("1", "yes", "true", "on")


def words(svc: dict[str, list[str]], key: str) -> list[list[str]]:
    return [shlex.split(v) for v in svc.get(key, [])]


# -- stage 1: namespaces -------------------------------------------------------------------
def stage_namespaces(args, svc) -> None:
    argv = ["unshare", "--mount", "--propagation", "private"]
    if yes(last(svc, "PrivateNetwork")):
        argv.append("--net")
    _exec(argv + ["--", sys.executable, SELF, "--stage", "mounts", *args.passthrough])


# -- stage 2: mounts and privileges --------------------------------------------------------
def _mountpoints() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            points.append(mp.encode().decode("unicode_escape"))  # \040 etc.
    return points


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True)


def _exec_dirs(svc, user: bool) -> list[str]:
    """The unit paths of its Configuration/Runtime/StateDirectory= (writable under strict)."""
    out = []
    for key, (root, spec) in EXEC_DIRS.items():
        for group in words(svc, key):
            out += [f"{spec if user else root}/{d}" for d in group]
    return out


def _optional(p: str) -> tuple[str, bool]:
    return (p[1:], True) if p.startswith("-") else (p, False)


# What the sandboxed command runs from (this checkout, its venv) is never hidden.
KEEP = [os.path.realpath(Path(__file__).resolve().parent.parent)]


def hide_paths(svc, mapping: dict[str, str], stage: Path) -> list[str]:
    """TemporaryFileSystem= with BindReadOnlyPaths= onto it, InaccessiblePaths= and
    ProtectHome=yes. Returns the mounts to make read-only afterwards."""
    read_only: list[str] = []
    tmpfs = [t for group in words(svc, "TemporaryFileSystem") for t in group]
    binds = [b for group in words(svc, "BindReadOnlyPaths") for b in group]
    hidden = [h for group in words(svc, "InaccessiblePaths") for h in group]
    home = last(svc, "ProtectHome", "no")
    if yes(home):
        hidden += [f"-{p}" for p in PROTECT_HOME]
    elif home == "read-only" and last(svc, "ProtectSystem") != "strict":   # strict covers it
        raise SystemExit("sandbox: ProtectHome=read-only needs ProtectSystem=strict here")
    elif home not in ("no", "false", "0", "off", "read-only"):
        raise SystemExit(f"sandbox: ProtectHome={home} is not supported")
    # Bind sources are resolved on the host's tree (symlinks too), as systemd does, so
    # resolve them first and keep a view of each directory a tmpfs is about to cover.
    sources = []
    for b in binds:
        spec, optional = _optional(b)
        src, _, dst = spec.partition(":")
        real = os.path.realpath(mapping.get(src, src))
        if not os.path.exists(real):
            if optional:
                continue
            raise SystemExit(f"sandbox: BindReadOnlyPaths {src} ({real}) does not exist")
        sources.append((real, dst.partition(":")[0] or src))
    views: dict[str, Path] = {}
    for n, t in enumerate(tmpfs):
        path, _, opts = t.partition(":")
        views[path] = stage / f"view{n}"
        views[path].mkdir()
        _mount("--bind", path, str(views[path]))
        _mount("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", path)
        if "ro" in opts.split(","):
            read_only.append(path)

    def host_path(p: str) -> str:
        for top, view in views.items():
            if _under(p, top):
                return str(view) + p[len(top):]
        return p

    for src, dst in sources:
        real = host_path(src)
        if os.path.isdir(real):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not os.path.exists(dst):
                open(dst, "w").close()
        _mount("--bind", real, dst)
        read_only.append(dst)
    for view in views.values():
        _mount("--make-private", str(view))
        subprocess.run(["umount", "-l", str(view)], check=True)
    empty_file = stage / "inaccessible"
    empty_file.touch(mode=0)
    for h in hidden:
        path, optional = _optional(h)
        if not os.path.lexists(path):
            if optional:
                continue
            raise SystemExit(f"sandbox: InaccessiblePaths {path} does not exist")
        kept = [k for k in KEEP if _under(k, os.path.realpath(path))] if os.path.isdir(path) else []
        if kept:
            # The test's own checkout and venv stand in for the installed program (under /usr or
            # /opt on a real host): a checkout under /root or /home stays visible, nothing else.
            view = stage / f"keep{len(read_only)}"
            view.mkdir()
            _mount("--bind", path, str(view))
            _mount("-t", "tmpfs", "-o", "mode=0111,nosuid,nodev", "tmpfs", path)   # pass through, not list
            for k in kept:
                os.makedirs(k, exist_ok=True)
                _mount("--bind", str(view) + k[len(os.path.realpath(path)):], k)
            _mount("--make-private", str(view))
            subprocess.run(["umount", "-l", str(view)], check=True)
            read_only.append(path)
        elif os.path.isdir(path) and not os.path.islink(path):
            _mount("-t", "tmpfs", "-o", "mode=0000,ro,nosuid,nodev,noexec", "tmpfs", path)
        else:
            _mount("--bind", str(empty_file), path)
            read_only.append(path)
    return read_only


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    """`ip link set lo up` without iproute2 (a minimal Debian has no `ip`): the kernel then
    gives lo 127.0.0.1 and ::1 itself."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", b"lo", 0)              # struct ifreq: name, flags, padding
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def stage_mounts(args, svc) -> None:
    if yes(last(svc, "PrivateNetwork")):
        # systemd configures the namespace's loopback device (up, 127.0.0.1 and ::1); unshare
        # leaves it down. Done here, where the new namespace is ours and capabilities still are.
        loopback_up()
    mapping = dict(m.split("=", 1) for m in args.map)
    with tempfile.TemporaryDirectory(prefix="sandbox-", dir="/run") as stage:
        read_only = hide_paths(svc, mapping, Path(stage))
    for p in read_only:
        _mount("-o", "remount,bind,ro", p)
    writable = []
    if yes(last(svc, "PrivateTmp")):
        # /var/tmp writable under ProtectSystem=strict, as systemd's private one is (MIT
        # Kerberos keeps its replay cache there). Not a fresh one: the tests' disk-backed
        # directories are under /var/tmp where /tmp is a tmpfs (a fresh Debian root), and
        # /tmp stays the host's too, with the tests' sockets, certificates and configs.
        writable.append("/var/tmp")
    if last(svc, "ProtectSystem") == "strict":
        paths = [p for group in words(svc, "ReadWritePaths") for p in group] + _exec_dirs(svc, args.user)
        for p in paths:
            optional = p.startswith("-")
            real = mapping.get(p.lstrip("-"), p.lstrip("-"))
            if "%" in real:
                raise SystemExit(f"sandbox: {p} needs --map")
            if not os.path.isdir(real):
                if optional:
                    continue
                raise SystemExit(f"sandbox: writable path {p} ({real}) does not exist")
            writable.append(os.path.realpath(real))
        for w in writable:
            _mount("--bind", w, w)
        for mp in _mountpoints():
            if _under(mp, "/proc") or _under(mp, "/dev") or any(_under(mp, w) for w in writable):
                continue
            # util-linux keeps the mount's other flags; errors on odd mounts are fatal here,
            # since a mount left writable would make the emulation lie.
            _mount("-o", "remount,bind,ro", mp)
    subset, hidepid = last(svc, "ProcSubset"), last(svc, "ProtectProc")
    if subset == "pid" or hidepid in ("invisible", "noaccess", "ptraceable"):
        opts = []
        if hidepid in ("invisible", "noaccess", "ptraceable"):
            opts.append(f"hidepid={hidepid}")
        if subset == "pid":
            opts.append("subset=pid")
        _mount("-t", "proc", "-o", ",".join(opts + ["nosuid", "nodev", "noexec"]), "proc", "/proc")
    umask = last(svc, "UMask")
    if umask is not None:
        os.umask(int(umask, 8))

    setpriv = ["setpriv"]
    if yes(last(svc, "NoNewPrivileges")) or svc.get("SystemCallFilter"):
        setpriv.append("--no-new-privs")
    if "CapabilityBoundingSet" in svc:
        caps = [c for v in svc["CapabilityBoundingSet"] for c in v.split()]
        if any(c.startswith("~") for c in caps):
            raise SystemExit("sandbox: CapabilityBoundingSet=~... is not supported")
        setpriv.append("--bounding-set=" + ",".join(["-all"] + [f"+{c.lower()[4:]}" for c in caps]))
    ambient = [c for v in svc.get("AmbientCapabilities", []) for c in v.split()]
    setpriv += ["--inh-caps=-all", "--ambient-caps=" + ",".join(["-all"] + [f"+{c.lower()[4:]}" for c in ambient])]
    _exec(setpriv + ["--", sys.executable, SELF, "--stage", "seccomp", *args.passthrough])


# -- stage 3: seccomp -----------------------------------------------------------------------
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_LT, SCMP_CMP_EQ, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 1, 2, 4, 6, 7
SCMP_FLTATR_CTL_NNP = 3
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
NS_FLAGS = {"cgroup": 0x02000000, "ipc": 0x08000000, "net": 0x40000000, "mnt": 0x00020000,
            "pid": 0x20000000, "user": 0x10000000, "uts": 0x04000000}
AF = {"AF_UNIX": 1, "AF_LOCAL": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}


def SCMP_ACT_ERRNO(e: int) -> int:
    return 0x00050000 | (e & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class Filter:
    """One seccomp filter (native architecture only, like SystemCallArchitectures=native)."""
    lib = None

    def __init__(self, default_action: int):
        if Filter.lib is None:
            Filter.lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
            Filter.lib.seccomp_init.restype = ctypes.c_void_p
            Filter.lib.seccomp_init.argtypes = [ctypes.c_uint32]
            Filter.lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                                          ctypes.c_uint, ctypes.POINTER(ArgCmp)]
            Filter.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
            Filter.lib.seccomp_load.argtypes = [ctypes.c_void_p]
            Filter.lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        self.ctx = Filter.lib.seccomp_init(default_action)
        if not self.ctx:
            raise OSError("seccomp_init failed")
        Filter.lib.seccomp_attr_set(self.ctx, SCMP_FLTATR_CTL_NNP, 0)  # setpriv did it already

    @staticmethod
    def nr(name: str) -> int:
        assert Filter.lib is not None
        n = Filter.lib.seccomp_syscall_resolve_name(name.encode())
        return n  # negative: unknown here, or a pseudo-syscall of another architecture

    def add(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        n = self.nr(name)
        if n < 0:
            return
        arr = (ArgCmp * max(1, len(cmps)))(*[ArgCmp(*c) for c in cmps])
        assert Filter.lib is not None
        rc = Filter.lib.seccomp_rule_add_array(self.ctx, action, n, len(cmps), arr)
        if rc < 0:
            raise OSError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")

    def load(self) -> None:
        assert Filter.lib is not None
        rc = Filter.lib.seccomp_load(self.ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def syscall_groups() -> dict[str, list[str]]:
    """Every @group with its members (names and nested @groups), from systemd-analyze."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], check=True,
                         capture_output=True, text=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(items, groups, seen=None) -> set[str]:
    seen = set() if seen is None else seen
    names: set[str] = set()
    for item in items:
        if item.startswith("@"):
            if item not in seen:
                seen.add(item)
                names |= expand(groups[item], groups, seen)
        else:
            names.add(item.split(":")[0])
    return names


def allowed_syscalls(svc) -> set[str] | None:
    """The allow list systemd builds from SystemCallFilter= lines (None: no allow list)."""
    lines = svc.get("SystemCallFilter", [])
    if not lines:
        return None
    groups = syscall_groups()
    allow: set[str] | None = None
    for v in lines:
        invert = v.startswith("~")
        items = v.lstrip("~").split()
        if allow is None:
            if invert:
                raise SystemExit("sandbox: deny-list SystemCallFilter= is not supported")
            allow = expand(["@default"], groups)
        if invert:
            allow -= expand(items, groups)
        else:
            allow |= expand(items, groups)
    return allow


def address_family_rules(allowed: set[int]) -> list[tuple[int, int, int, int]]:
    """The socket() argument-0 comparisons refused for an allow list of address families, one
    rule each, as systemd's seccomp_restrict_address_families() adds them (a seccomp rule
    cannot compare one argument twice): below the lowest, above the highest, and every
    family in between that is not allowed."""
    lo, hi = min(allowed), max(allowed)
    rules = [(0, SCMP_CMP_LT, lo, 0)] if lo > 1 else []
    rules.append((0, SCMP_CMP_GT, hi, 0))
    rules += [(0, SCMP_CMP_EQ, af, 0) for af in range(lo + 1, hi) if af not in allowed]
    return rules


def build_filters(svc) -> list[Filter]:
    filters = []
    errno_name = last(svc, "SystemCallErrorNumber")
    deny = SCMP_ACT_ERRNO(getattr(errno, errno_name)) if errno_name else SCMP_ACT_KILL_PROCESS
    if os.environ.get("SANDBOX_DENY") == "kill":   # to find which denied call a program makes
        deny = SCMP_ACT_KILL_PROCESS
    allow = allowed_syscalls(svc)
    families = [f for v in svc.get("RestrictAddressFamilies", []) for f in v.split()]
    if allow is not None:
        f = Filter(deny)
        for name in sorted(allow):
            f.add(SCMP_ACT_ALLOW, name)
        filters.append(f)
    if families:
        if any(x.startswith("~") for x in families):
            raise SystemExit("sandbox: RestrictAddressFamilies=~ is not supported")
        f = Filter(SCMP_ACT_ALLOW)
        for cmp in address_family_rules({AF[x] for x in families}):
            f.add(SCMP_ACT_ERRNO(errno.EAFNOSUPPORT), "socket", cmp)
        filters.append(f)
    if yes(last(svc, "MemoryDenyWriteExecute")):
        f = Filter(SCMP_ACT_ALLOW)
        wx = PROT_WRITE | PROT_EXEC
        f.add(SCMP_ACT_ERRNO(errno.EPERM), "mmap", (2, SCMP_CMP_MASKED_EQ, wx, wx))
        f.add(SCMP_ACT_ERRNO(errno.EPERM), "mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.add(SCMP_ACT_ERRNO(errno.EPERM), "pkey_mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.add(SCMP_ACT_ERRNO(errno.EPERM), "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        filters.append(f)
    if yes(last(svc, "RestrictNamespaces")):
        f = Filter(SCMP_ACT_ALLOW)
        for flag in NS_FLAGS.values():
            f.add(SCMP_ACT_ERRNO(errno.EPERM), "unshare", (0, SCMP_CMP_MASKED_EQ, flag, flag))
            f.add(SCMP_ACT_ERRNO(errno.EPERM), "clone", (0, SCMP_CMP_MASKED_EQ, flag, flag))
        f.add(SCMP_ACT_ERRNO(errno.EPERM), "setns")
        f.add(SCMP_ACT_ERRNO(errno.ENOSYS), "clone3")
        filters.append(f)
    return filters


def stage_seccomp(args, svc) -> None:
    filters = build_filters(svc)
    cmd = args.passthrough[args.passthrough.index("--") + 1:]
    # The allow list (first) goes in last: it denies seccomp() itself.
    for f in reversed(filters):
        f.load()
    os.execvp(cmd[0], cmd)


# -- driver --------------------------------------------------------------------------------
def _exec(argv: list[str]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unit", required=True)
    p.add_argument("--dropin", action="append", default=[], metavar="FILE",
                   help="a drop-in (FILE.d/*.conf) read after the unit, in the order given")
    p.add_argument("--map", action="append", default=[], metavar="UNITPATH=REALPATH")
    p.add_argument("--user", action="store_true", help="a user unit (its directories are %%E/..., %%t/...)")
    p.add_argument("--stage", default="namespaces", choices=("namespaces", "mounts", "seccomp"))
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if not args.command or args.command[0] != "--" or len(args.command) < 2:
        p.error("missing -- COMMAND")
    args.passthrough = ["--unit", args.unit, *[x for d in args.dropin for x in ("--dropin", d)],
                        *(["--user"] if args.user else []),
                        *[x for m in args.map for x in ("--map", m)], *args.command]
    svc = service(parse_unit(args.unit, args.dropin))
    if args.stage == "namespaces":
        # A key reset to nothing (IPAddressDeny= in a drop-in) leaves nothing to emulate.
        skipped = sorted(k for k, v in svc.items() if v and k not in EMULATED and k not in NOT_SANDBOXING)
        if skipped:
            print("sandbox: not emulated: " + json.dumps(skipped), file=sys.stderr)
        stage_namespaces(args, svc)
    elif args.stage == "mounts":
        stage_mounts(args, svc)
    else:
        stage_seccomp(args, svc)


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env python3
"""GetValue throughput for a non-root caller on the system bus, polkit decision cache on/off.

Run as root from the dev venv (it starts everything itself and stops it by PID):

    .venv/bin/python bench/bench_polkit.py [--seconds 2] [--inflight 1,16]

Set-up: a private system-type dbus-daemon with dbus/org.libvirt.secret.conf, a real polkitd
with polkit/org.libvirt.api.secret.policy and the example rules (group libvirt gets
read-secure), and secretbusd (`--system --root DIR --bus-address ADDR`, as root) whose
PolkitAccess is built in one of three modes (a small launcher passes the class to
secretbus.daemon.main): "on" (as shipped), "off"
(cache=False: no decision cache, but concurrent identical checks still share one polkit
answer) and "off, no sharing" (every call pays one CheckAuthorization). The client is a
dbus-fast script run as the test user `sbtest-member` (group libvirt) through setpriv with
Debian's python3, one connection, N calls in flight. In the same client run it measures the
bus floor: org.freedesktop.DBus.GetId and org.freedesktop.DBus.Peer.Ping to the bus daemon
(the system policy refuses Peer.Ping to non-root callers, so that one measures an
AccessDenied reply made by dbus-daemon — still one full round trip), and Peer.Ping to
secretbusd (answered by dbus-fast, no access check: the service's own floor).

Goals: cached >= 5x uncached ("off, no sharing"), cached >= 30 % of the bus floor (GetId),
judged at every in-flight count. Exit status 0 when met, 2 when not, 1 on errors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402
from harness import gdbus  # noqa: E402
from harness.procs import remove_tree  # noqa: E402

from secretbus.bus.names import secret_path  # noqa: E402

BUS_NAME = "org.libvirt.secret"
MEMBER = "sbtest-member"

# Mode "on": the daemon as shipped. "off": PolkitAccess(cache=False), which still lets
# concurrent identical checks share one CheckAuthorization. "every": one CheckAuthorization per
# check, no sharing (leans on PolkitAccess._check; bench-only).
LAUNCHER = """
import functools, sys
import secretbus.access.permissions as access
import secretbus.daemon as daemon
import secretbus.bus.polkit as polkit

class EveryCall(polkit.PolkitAccess):
    async def allowed(self, caller, perm, d):
        details = access.details_for(d)
        key = (caller.sender, perm.value, tuple(sorted(details.items())))
        return await self._check(caller, perm, details, key)

mode = sys.argv[1]
kinds = {"on": polkit.PolkitAccess, "off": functools.partial(polkit.PolkitAccess, cache=False),
         "every": functools.partial(EveryCall, cache=False)}
sys.exit(daemon.main(sys.argv[2:], polkit=kinds[mode]))
"""
MODES = ("on", "off", "every")
MODE_TEXT = {"on": "on", "off": "off", "every": "off, no sharing"}

CLIENT = r'''
import asyncio, json, statistics, sys, time
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

async def rate(bus, make, seconds, inflight, errors):
    # calls per second of make() with `inflight` calls outstanding; error replies counted
    async def worker(deadline, counter):
        while time.monotonic() < deadline:
            reply = await bus.call(make())
            if reply.message_type == MessageType.ERROR:
                errors[reply.error_name] = errors.get(reply.error_name, 0) + 1
            counter[0] += 1
    warm = [0]
    await asyncio.gather(*(worker(time.monotonic() + 0.05, warm) for _ in range(inflight)))
    n = [0]
    t0 = time.monotonic()
    await asyncio.gather(*(worker(t0 + seconds, n) for _ in range(inflight)))
    return n[0] / (time.monotonic() - t0)

def call(dest, path, iface, member, sig="", body=()):
    return lambda: Message(destination=dest, path=path, interface=iface, member=member,
                           signature=sig, body=list(body))

async def main():
    spec = json.loads(sys.argv[1])
    ops = []   # (mode, label, bus, make)
    for mode, t in spec["targets"].items():
        bus = await MessageBus(bus_address=t["address"]).connect()
        if mode == spec["floor_mode"]:
            ops += [(mode, "bus GetId", bus, call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                                   "org.freedesktop.DBus", "GetId")),
                    (mode, "bus Peer.Ping", bus, call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                                       "org.freedesktop.DBus.Peer", "Ping")),
                    (mode, "secretbusd Peer.Ping", bus, call("org.libvirt.secret", "/org/libvirt/secret",
                                                              "org.freedesktop.DBus.Peer", "Ping"))]
        for label, path in t["secrets"].items():
            make = call("org.libvirt.secret", path, "org.libvirt.Secret", "GetValue", "u", [0])
            reply = await bus.call(make())     # the value must come back, not an error
            if reply.message_type == MessageType.ERROR:
                raise SystemExit(f"{mode} {label}: {reply.error_name}: {reply.body}")
            ops.append((mode, label, bus, make))
    out = []
    for inflight in spec["inflight"]:
        samples = {(m, l): [] for m, l, _, _ in ops}
        errors = {(m, l): {} for m, l, _, _ in ops}
        for _ in range(spec["rounds"]):        # interleaved, so load changes hit every op alike
            for m, l, bus, make in ops:
                samples[m, l].append(await rate(bus, make, spec["seconds"], inflight, errors[m, l]))
        for (m, l), xs in samples.items():
            out.append({"mode": m, "op": l, "inflight": inflight, "rate": statistics.median(xs),
                        "min": min(xs), "max": max(xs), "errors": errors[m, l]})
    print(json.dumps(out))

asyncio.run(main())
'''


def define(bus, uuid: str, private: bool, value: bytes) -> str:
    xml = (f"<secret ephemeral='no' private='{'yes' if private else 'no'}'><uuid>{uuid}</uuid>"
           f"<usage type='volume'><volume>/var/lib/sbbench/{uuid}.img</volume></usage></secret>")
    for path, method, args in (("/org/libvirt/secret", "org.libvirt.Connect.SecretDefineXML", (xml, "0")),
                               (secret_path(uuid), "org.libvirt.Secret.SetValue",
                                ("[" + ", ".join(f"byte 0x{b:02x}" for b in value) + "]", "0"))):
        r = gdbus(bus.address, "call", "--dest", BUS_NAME, "--object-path", path, "--method", method, *args)
        if r.returncode != 0:
            raise SystemExit(f"{method} failed: {r.stderr}")
    return secret_path(uuid)


class Daemon:
    def __init__(self, bus, mode: str, readers: str):
        self.dir = harness.public_tempdir("sb-bench-root-")
        (self.dir / "etc").mkdir(mode=0o700)
        (self.dir / "etc" / "secret.conf").write_text(f'private_value_readers = [ "{readers}" ]\n')
        launcher = self.dir / "launch.py"
        launcher.write_text(LAUNCHER)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DBUS_", "NOTIFY_SOCKET"))}
        self.log = self.dir / "secretbusd.log"
        self.proc = harness.spawn([sys.executable, str(launcher), mode, "--system",
                                   "--root", str(self.dir), "--bus-address", bus.address],
                                  what="secretbusd (bench)", log=self.log, env=env)
        try:
            bus.wait_for_name(BUS_NAME, proc=self.proc, log=self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        harness.stop_process(self.proc)
        remove_tree(self.dir)


def run_client(unpriv, user, script: Path, spec: dict) -> list[dict]:
    r = unpriv.run(user, str(script), json.dumps(spec), timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"client failed ({r.returncode}): {r.stderr}")
    return json.loads(r.stdout)


class Stack:
    """A private system bus, its polkitd (our actions + the example rules) and secretbusd in
    one cache mode. The three stacks run side by side so the client can interleave them."""

    def __init__(self, mode: str):
        self.mode = mode
        self.bus = self.pk = self.daemon = None

    def start(self) -> Stack:
        self.bus = harness.PrivateBus("system", policy_files=[REPO / "dbus" / "org.libvirt.secret.conf"]).start()
        # file names of our own per stack: the polkit directories are shared by every polkitd
        self.pk = harness.Polkitd(self.bus, actions=[(f"sbbench-{self.mode}.org.libvirt.api.secret.policy",
                                                      (REPO / "polkit" / "org.libvirt.api.secret.policy").read_text())],
                                  rules=[(f"50-sbbench-{self.mode}-libvirt-group.rules",
                                          (REPO / "polkit" / "50-secretbus-libvirt-group.rules.example").read_text())]
                                  ).start()
        self.daemon = Daemon(self.bus, self.mode, MEMBER)
        self.secrets = {
            "GetValue (public)": define(self.bus, "5b7e57be-0000-4000-8000-000000000001", False, b"x" * 32),
            "GetValue (private, reader)": define(self.bus, "5b7e57be-0000-4000-8000-000000000002", True, b"y" * 32),
        }
        return self

    def stop(self) -> None:
        for part in (self.daemon, self.pk, self.bus):
            if part is not None:
                part.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=0.3, help="length of one sample")
    ap.add_argument("--rounds", type=int, default=5, help="samples per figure (median shown)")
    ap.add_argument("--inflight", default="1,16", help="calls in flight, comma-separated")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (starts dbus-daemon, polkitd and secretbusd, switches users)")
    inflight = [int(x) for x in args.inflight.split(",")]

    user = harness.ensure_user(MEMBER, ["libvirt"])
    unpriv = harness.unpriv_python()
    tmp = harness.public_tempdir("sb-bench-client-")
    script = tmp / "client.py"
    script.write_text(CLIENT)
    script.chmod(0o644)
    stacks: list[Stack] = []
    try:
        for mode in MODES:
            stacks.append(Stack(mode))
            stacks[-1].start()
        spec = {"targets": {st.mode: {"address": st.bus.address, "secrets": st.secrets} for st in stacks},
                "floor_mode": "on", "inflight": inflight, "rounds": args.rounds, "seconds": args.seconds}
        results = run_client(unpriv, user, script, spec)
    finally:
        for st in reversed(stacks):
            st.stop()
        remove_tree(tmp)
    secrets = list(stacks[0].secrets)

    rate = {(r["mode"], r["op"], r["inflight"]): r for r in results}
    print(f"GetValue throughput, caller {MEMBER} (uid {user.uid}, group libvirt) on private system buses;"
          f" median of {args.rounds} interleaved samples of {args.seconds:g} s; {os.cpu_count()} CPUs;"
          f" load average {os.getloadavg()[0]:.2f}")
    head = ["call", "cache", *(f"{n} in flight" for n in inflight)]
    rows = []
    for op in ("bus GetId", "bus Peer.Ping", "secretbusd Peer.Ping"):
        rows.append([op + (" (AccessDenied)" if op == "bus Peer.Ping" else ""), "-",
                     *(f"{rate['on', op, n]['rate']:,.0f}/s" for n in inflight)])
    for op in secrets:
        for mode in MODES:
            rows.append([op, MODE_TEXT[mode], *(f"{rate[mode, op, n]['rate']:,.0f}/s" for n in inflight)])
    for op in secrets:
        for mode in ("every", "off"):
            rows.append([f"{op}: cached / cache {MODE_TEXT[mode]}", "", *(
                f"{rate['on', op, n]['rate'] / rate[mode, op, n]['rate']:.1f}x" for n in inflight)])
        rows.append([f"{op}: cached / bus GetId", "", *(
            f"{100 * rate['on', op, n]['rate'] / rate['on', 'bus GetId', n]['rate']:.0f} %" for n in inflight)])
    table = [head] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for i, r in enumerate(table):
        print("  ".join(c.rjust(w) if j >= 2 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    bad = {(r["mode"], r["op"], r["inflight"]): r["errors"] for r in results
           if r["errors"] and r["op"] != "bus Peer.Ping"}
    if bad:
        print(f"errors: {bad}")
        return 1
    # "uncached" = every call pays a polkit check (mode "every"); with cache=False alone,
    # concurrent identical checks share one answer, so that mode is shown but not judged.
    ok = all(rate["on", op, n]["rate"] >= 5 * rate["every", op, n]["rate"]
             and rate["on", op, n]["rate"] >= 0.3 * rate["on", "bus GetId", n]["rate"]
             for op in secrets for n in inflight)
    print("goals (cached >= 5x every-call-checked, >= 30 % of bus GetId):", "met" if ok else "NOT met")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())

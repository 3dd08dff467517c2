"""A refusal must not name a secret its caller may not getattr (DESIGN §12). A define whose usage
another secret holds is refused with libvirt's text, "a secret with UUID <holder> is already
defined for use with <usage>"; libvirt says so to anyone allowed to define, so a member
granted writes of a usage learns the UUID of a secret polkit hides from it. Here it gets
"another secret is already defined for use with <usage>" instead, over D-Bus (gdbus) and over
RPC (Debian's virsh), while a caller that may see the holder (the member for a visible one,
root always) still gets libvirt's text. Likewise a redefine that would change a secret's usage
id, whose text names the current one: not to a caller without getattr on it.

A private system-type bus with the shipped policy, real polkitd with the shipped actions and
the rules below, `secretbusd --system` serving both front ends from one driver, and the
unprivileged `sbtest-member` (group libvirt) through setpriv.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid as uuidlib
from pathlib import Path

import harness
import pytest
from harness.procs import remove_tree
from test_polkit import g
from test_rpc_polkit import API_ACTIONS, BUS_CONF, UNIX_ACTIONS, uri

from secretbus.access.disclosure import disclosed
from secretbus.core import errors
from secretbus.core.model import SecretDef, UsageType

CONNECT_PATH = "/org/libvirt/secret"
DEFINE = "org.libvirt.Connect.SecretDefineXML"
HIDDEN = "7a0f0003-0000-4000-8000-000000000001"      # its usage taken; the member may not see it
SEEN = "7a0f0003-0000-4000-8000-000000000002"        # its usage taken; the member sees it
NEW = "7a0f0003-0000-4000-8000-000000000003"         # the member's define
REDEF = "7a0f0003-0000-4000-8000-000000000004"       # the member may write and save it, not getattr it
FIRST = "7a0f0003-0000-4000-8000-000000000005"       # in the store: claims a usage first
SECOND = "7a0f0003-0000-4000-8000-000000000006"      # in the store: claims it too, so not loaded; as REDEF
VOLUMES = "/var/lib/sbtest/clash-"

RULES = ("50-sbtest-disclosure.rules", f"""
// Members may connect over RPC, and define volume secrets under {VOLUMES}*; one secret is
// hidden from them (getattr, like everything else on it, denied), and two they may write and
// save but not getattr.
polkit.addRule(function(action, subject) {{
    if (!subject.isInGroup("libvirt"))
        return polkit.Result.NOT_HANDLED;
    if (action.id == "org.libvirt.unix.manage")
        return polkit.Result.YES;
    var uuid = action.lookup("secret_uuid");
    if (uuid == "{HIDDEN}" ||
            ((uuid == "{REDEF}" || uuid == "{SECOND}") && action.id == "org.libvirt.api.secret.getattr"))
        return polkit.Result.NO;
    var volume = action.lookup("secret_usage_volume") || "";
    if ((action.id == "org.libvirt.api.secret.write" || action.id == "org.libvirt.api.secret.save") &&
            volume.indexOf("{VOLUMES}") == 0)
        return polkit.Result.YES;
    return polkit.Result.NOT_HANDLED;
}});
""")

pytestmark = [pytest.mark.integration, pytest.mark.bus_policy(BUS_CONF)]


def xml(uuid: str, name: str) -> str:
    return (f"<secret ephemeral='no' private='no'><uuid>{uuid}</uuid>"
            f"<usage type='volume'><volume>{VOLUMES}{name}.img</volume></usage></secret>")


def spellings(uuid: str) -> list[str]:
    """Every form a UUID could leak in: dashed, bare hex, an object path's."""
    return [uuid, uuid.replace("-", ""), uuid.replace("-", "_")]


def virsh_define(user, rpc_dir: Path, uuid: str, name: str) -> subprocess.CompletedProcess:
    f = rpc_dir / f"{name}-{uuid[-4:]}.xml"      # readable by the member (0755 directory)
    f.write_text(xml(uuid, name))
    f.chmod(0o644)
    return harness.run_as(user, ["virsh", "-c", uri(rpc_dir), "secret-define", str(f)], timeout=60)


@pytest.mark.skipif(shutil.which("virsh") is None, reason="virsh (libvirt-clients) not installed")
def test_a_usage_clash_names_the_holder_only_to_who_may_see_it(system_bus, make_polkitd, make_secretbusd,
                                                               rpc_dir, test_users):
    make_polkitd(system_bus, actions=[API_ACTIONS, UNIX_ACTIONS], rules=[RULES])
    make_secretbusd(system_bus, system=True, args=("--rpc-dir", str(rpc_dir)))
    member = test_users.member
    for u, name in ((HIDDEN, "hidden"), (SEEN, "seen"), (REDEF, "redef")):
        r = virsh_define(None, rpc_dir, u, name)
        assert r.returncode == 0, r.stderr
    hidden_text = f"another secret is already defined for use with {VOLUMES}hidden.img"

    # D-Bus: the hidden holder is not named; the visible one is, in libvirt's words.
    r = g(system_bus, member, CONNECT_PATH, DEFINE, xml(NEW, "hidden"), "0")
    assert not r.ok and r.error == "org.libvirt.Error.InternalError", r
    assert hidden_text in r.message, r
    assert not any(s in r.message for s in spellings(HIDDEN)), r
    r = g(system_bus, member, CONNECT_PATH, DEFINE, xml(NEW, "seen"), "0")
    assert not r.ok and f"a secret with UUID {SEEN} is already defined for use with {VOLUMES}seen.img" in r.message, r

    # RPC, with libvirt's own client.
    r = virsh_define(member, rpc_dir, NEW, "hidden")
    assert r.returncode == 1 and f"error: internal error: {hidden_text}" in r.stderr, r.stderr
    assert not any(s in r.stdout + r.stderr for s in spellings(HIDDEN)), r.stderr
    r = virsh_define(member, rpc_dir, NEW, "seen")
    assert r.returncode == 1 and f"a secret with UUID {SEEN} is already defined" in r.stderr, r.stderr

    # A redefine that would change a usage id names the current one; not to a caller that may
    # write and save the secret but not getattr it.
    changed = f"a secret with UUID {REDEF} is already defined for another usage"
    r = g(system_bus, member, CONNECT_PATH, DEFINE, xml(REDEF, "redef-2"), "0")
    assert not r.ok and changed in r.message and "clash-redef.img" not in r.message, r
    r = virsh_define(member, rpc_dir, REDEF, "redef-2")
    assert r.returncode == 1 and changed in r.stderr and "clash-redef.img" not in r.stderr, r.stderr
    r = virsh_define(None, rpc_dir, REDEF, "redef-2")
    assert r.returncode == 1 and f"already defined for use with {VOLUMES}redef.img" in r.stderr, r.stderr

    # Root sees every secret: libvirt's text, on both front ends.
    r = g(system_bus, None, CONNECT_PATH, DEFINE, xml(NEW, "hidden"), "0")
    assert not r.ok and f"a secret with UUID {HIDDEN} is already defined" in r.message, r
    r = virsh_define(None, rpc_dir, NEW, "hidden")
    assert r.returncode == 1 and f"a secret with UUID {HIDDEN} is already defined" in r.stderr, r.stderr

    # The refusals came from the clash, not from the grant: a free usage is defined.
    r = virsh_define(member, rpc_dir, NEW, "free")
    assert r.returncode == 0, r.stderr
    r = g(system_bus, member, CONNECT_PATH, DEFINE, xml(str(uuidlib.uuid4()), "free-dbus"), "0")
    assert r.ok, r


def test_why_a_secret_did_not_load_is_told_only_to_who_may_see_it(system_bus, make_polkitd, make_secretbusd,
                                                                 test_users):
    """A define of a UUID whose files did not load is refused with the reason; when that is a
    usage clash at load, the reason names the secret that won it."""
    root = harness.public_tempdir("sb-root-")
    try:
        store = root / "etc" / "secrets"
        store.mkdir(parents=True, mode=0o700)
        (root / "etc").chmod(0o700)
        for i, u in enumerate((FIRST, SECOND)):
            f = store / f"{u}.xml"
            f.write_text(xml(u, "dup"))
            f.chmod(0o600)
            os.utime(f, ns=(10**18 + i, 10**18 + i))      # FIRST's claim is the older: it wins
        make_polkitd(system_bus, actions=[API_ACTIONS, UNIX_ACTIONS], rules=[RULES])
        make_secretbusd(system_bus, system=True, root=root)
        told = f"secret {SECOND} exists in the store but could not be loaded"
        r = g(system_bus, test_users.member, CONNECT_PATH, DEFINE, xml(SECOND, "dup-2"), "0")
        assert not r.ok and r.error == "org.libvirt.Error.OperationFailed", r
        assert f"{told}; its files are left untouched until it loads" in r.message, r
        assert not any(x in r.message for x in (*spellings(FIRST), "dup.img")), r
        r = g(system_bus, None, CONNECT_PATH, DEFINE, xml(SECOND, "dup-2"), "0")
        assert not r.ok and f"{told} (a secret with UUID {FIRST} already defined for use with {VOLUMES}dup.img)" \
            in r.message, r
    finally:
        remove_tree(root)


# -- the rule alone ------------------------------------------------------------------------
CLASH = errors.UsageClash(HIDDEN, SecretDef(NEW, usage_type=UsageType.CEPH, usage_id="client.x"))


def run(coro):
    import asyncio
    return asyncio.run(coro)


async def no(d: SecretDef) -> bool:
    """A getattr check that denies."""
    return False


def test_the_holder_is_asked_about_with_the_usage_it_shares():
    assert CLASH.holder == SecretDef(HIDDEN, usage_type=UsageType.CEPH, usage_id="client.x")
    assert CLASH.display() == f"internal error: a secret with UUID {HIDDEN} is already defined for use with client.x"


def test_a_clash_is_told_as_the_check_allows():
    asked: list[SecretDef] = []

    async def yes(d: SecretDef) -> bool:
        asked.append(d)
        return True

    async def broken(d: SecretDef) -> bool:
        raise OSError("polkit gone")

    assert run(disclosed(CLASH, yes)) is CLASH and asked == [CLASH.holder]
    for check in (no, broken):         # denied, or not asked: closed
        e = run(disclosed(CLASH, check))
        assert type(e) is errors.InternalError and e.code == CLASH.code and e.kind == CLASH.kind
        assert e.display() == "internal error: another secret is already defined for use with client.x"
        assert not any(s in e.display() for s in spellings(HIDDEN))


def test_a_usage_change_is_told_as_the_check_allows():
    old = SecretDef(REDEF, usage_type=UsageType.VOLUME, usage_id="/v/old.img")
    e = errors.UsageChange(old)
    assert e.holder is old
    assert e.display() == f"internal error: a secret with UUID {REDEF} is already defined for use with /v/old.img"
    h = run(disclosed(e, no))
    assert h.display() == f"internal error: a secret with UUID {REDEF} is already defined for another usage"
    assert errors.UsageChange(SecretDef(REDEF)).message.endswith("for use with (null)")


def test_why_it_did_not_load_is_told_as_the_check_allows():
    e = errors.NotLoaded(SecretDef(SECOND), f"a secret with UUID {FIRST} already defined for use with x")
    h = run(disclosed(e, no))
    assert type(h) is errors.OperationFailed and e.kind == h.kind == "OperationFailed" and e.code == h.code == 9
    assert h.display() == (f"operation failed: secret {SECOND} exists in the store but could not be loaded; "
                           "its files are left untouched until it loads")
    assert FIRST in e.message and FIRST not in h.display()


def test_other_errors_are_told_as_they_are():
    async def never(d: SecretDef) -> bool:
        raise AssertionError("asked")
    for e in (errors.NoSecret(f"no secret with matching uuid '{HIDDEN}'"), errors.InternalError("x"), ValueError()):
        assert run(disclosed(e, never)) is e
